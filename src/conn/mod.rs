//! Guards each client connection before pingora's HTTP code reads from it: a cap on open
//! connections, and a deadline for every request header.
//!
//! pingora times each read of a first request out after 60 s but lets a client trickle
//! one byte a minute, and waits forever for the next request on a kept-alive HTTP/1.1
//! connection; it has no connection cap. [`ConnGuard`] wraps the proxy app: a connection
//! beyond `server.max_connections` is closed at once, and every connection's stream is
//! wrapped in [`Deadline`], which fails reads once `server.request_header_timeout` has
//! passed without a complete request header. The deadline is re-armed after each HTTP/1
//! response ([`rearm`], called by the proxy as a request ends), so the next request's
//! header gets the same time, and an idle keep-alive connection is closed quietly after
//! it (an idle close is not a late header: it is not counted as one).
//!
//! - `held`: on plaintext connections, the writes `Deadline` passes on are held until
//!   the flush, in a buffer that exists only between the two.

mod held;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, Ssl, Stream, UniqueID,
    UniqueIDType, ALPN,
};
use pingora::server::ShutdownWatch;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::metrics::Metrics;
use held::Held;

/// The limits a [`ConnGuard`] applies.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// Most client connections open at once (0: no cap).
    pub max_connections: usize,
    /// Longest wait for a complete request header, idle keep-alive time included.
    pub header_timeout: Duration,
}

/// A pingora app wrapped with connection limits.
pub struct ConnGuard<A> {
    inner: Arc<A>,
    limits: ConnLimits,
    open: Arc<AtomicUsize>,
    /// Where the public listeners' connections are counted; `None` for the admin
    /// listener, whose connections are not the gateway's traffic.
    metrics: Option<Arc<Metrics>>,
}

impl<A> ConnGuard<A> {
    /// Guards `inner`'s connections with `limits`.
    pub fn new(inner: A, limits: ConnLimits, metrics: Option<Arc<Metrics>>) -> Self {
        ConnGuard {
            inner: Arc::new(inner),
            limits,
            open: Arc::new(AtomicUsize::new(0)),
            metrics,
        }
    }
}

impl<A> ConnGuard<A> {
    /// The guarded app.
    pub fn app(&self) -> Arc<A> {
        self.inner.clone()
    }
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for ConnGuard<A> {
    // Written out rather than `async fn`: the guard's work is synchronous, so the
    // connection's future is pingora's own, without a layer of ours to allocate and to
    // poll through on every wake-up of every stream.
    fn process_new<'life0, 'life1, 'async_trait>(
        self: &'life0 Arc<Self>,
        stream: Stream,
        shutdown: &'life1 ShutdownWatch,
    ) -> Pin<Box<dyn Future<Output = Option<Stream>> + Send + 'async_trait>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        Self: 'async_trait,
    {
        let stream: Stream = match stream.as_any().downcast_ref::<Deadline>() {
            Some(d) => {
                // A kept-alive connection handed back for its next request (pingora 0.9's
                // HTTP/1 app keeps those in its own loop; the proxy re-arms, see `rearm`).
                d.rearm.store(true, Ordering::Release);
                stream
            }
            None => {
                let open = self.open.fetch_add(1, Ordering::AcqRel) + 1;
                let cap = self.limits.max_connections;
                if cap > 0 && open > cap {
                    self.open.fetch_sub(1, Ordering::AcqRel);
                    if let Some(m) = &self.metrics {
                        m.refusals.with_label_values(&["max_connections"]).inc();
                    }
                    tracing::debug!(open, cap, "connection closed: max_connections");
                    return Box::pin(std::future::ready(None));
                }
                if let Some(m) = &self.metrics {
                    m.connections_open.inc();
                }
                Box::new(Deadline::new(
                    stream,
                    self.limits.header_timeout,
                    Counted {
                        open: self.open.clone(),
                        metrics: self.metrics.clone(),
                    },
                ))
            }
        };
        self.inner.process_new(stream, shutdown)
    }

    async fn cleanup(&self) {
        self.inner.cleanup().await
    }
}

/// Counts a connection as open until dropped.
struct Counted {
    open: Arc<AtomicUsize>,
    metrics: Option<Arc<Metrics>>,
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::AcqRel);
        if let Some(m) = &self.metrics {
            m.connections_open.dec();
        }
    }
}

/// A client stream whose reads fail once its request header is late.
///
/// The header counts as complete at its blank line (CRLF CRLF or LF LF; the HTTP/2
/// preface has one too), or when a response is written (a pipelined request may have
/// been read with the previous one).
pub struct Deadline {
    inner: Stream,
    timeout: Duration,
    sleep: Pin<Box<Sleep>>,
    /// Still waiting for the end of a request header.
    armed: bool,
    /// Set when a response has ended and the connection waits for another request.
    rearm: std::sync::atomic::AtomicBool,
    /// Re-armed, and no byte of the next request read yet.
    idle: bool,
    /// The last bytes read, to find a blank line split across reads.
    tail: [u8; 3],
    /// Bytes read by `try_peek`, handed out again by the next reads.
    peeked: Vec<u8>,
    /// Writes held until the next flush (plaintext connections, see [`held`]).
    held: Held,
    _counted: Counted,
}

impl std::fmt::Debug for Deadline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deadline")
            .field("inner", &self.inner)
            .field("armed", &self.armed)
            .finish()
    }
}

impl Deadline {
    fn new(inner: Stream, timeout: Duration, counted: Counted) -> Deadline {
        Deadline {
            timeout,
            sleep: Box::pin(tokio::time::sleep(timeout)),
            armed: true,
            rearm: std::sync::atomic::AtomicBool::new(false),
            idle: false,
            tail: [0; 3],
            peeked: Vec::new(),
            // A TLS stream buffers beneath rustls (see `server::client_buffers`).
            held: Held::new(inner.get_ssl_digest().is_none()),
            inner,
            _counted: counted,
        }
    }

    fn take_rearm(&mut self) {
        if self.rearm.swap(false, Ordering::AcqRel) {
            self.armed = true;
            self.idle = true;
            self.tail = [0; 3];
            let at = Instant::now() + self.timeout;
            self.sleep.as_mut().reset(at);
        }
    }

    /// Looks for the header's blank line in newly read bytes.
    fn scan(&mut self, new: &[u8]) {
        for &b in new {
            let t = self.tail;
            if b == b'\n' && (t[2] == b'\n' || (t[2] == b'\r' && t[1] == b'\n')) {
                self.armed = false;
                return;
            }
            self.tail = [t[1], t[2], b];
        }
    }

    fn timed_out(&mut self, cx: &mut Context<'_>) -> bool {
        self.armed && self.sleep.as_mut().poll(cx).is_ready()
    }
}

/// Gives an HTTP/1 connection's next request header a new deadline, counted from now
/// (the end of the last response). Over HTTP/2 the deadline is the connection's, and
/// pingora's idle timeout closes an HTTP/2 connection with no stream open.
pub fn rearm(stream: &Stream) {
    if let Some(d) = stream.as_any().downcast_ref::<Deadline>() {
        d.rearm.store(true, Ordering::Release);
    }
}

fn late() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "request header not complete in time (server.request_header_timeout)",
    )
}

impl AsyncRead for Deadline {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        this.take_rearm();
        if !this.peeked.is_empty() {
            let n = this.peeked.len().min(buf.remaining());
            let bytes: Vec<u8> = this.peeked.drain(..n).collect();
            buf.put_slice(&bytes);
            if this.armed {
                this.idle = false;
                this.scan(&bytes);
            }
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if this.armed {
                    this.idle &= buf.filled().len() == before;
                    this.scan(&buf.filled()[before..]);
                }
                Poll::Ready(Ok(()))
            }
            // An idle keep-alive connection ends as if the client had closed it: pingora
            // then drops it without an error.
            Poll::Pending if this.timed_out(cx) && this.idle => Poll::Ready(Ok(())),
            Poll::Pending if this.armed && this.sleep.is_elapsed() => {
                this.metrics_timeout();
                Poll::Ready(Err(late()))
            }
            other => other,
        }
    }
}

impl Deadline {
    fn metrics_timeout(&self) {
        if let Some(m) = &self._counted.metrics {
            m.header_timeouts.inc();
        }
    }
}

impl Drop for Deadline {
    /// What is held goes out if the socket takes it now, as pingora's stream does with
    /// its buffer when dropped (an error page written just before the connection is let
    /// go, say).
    fn drop(&mut self) {
        if self.held.unsent() {
            let mut cx = Context::from_waker(std::task::Waker::noop());
            let _ = self.held.poll_send(&mut self.inner, &mut cx);
        }
    }
}

impl AsyncWrite for Deadline {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = this.held.poll_write(&mut this.inner, cx, buf);
        this.wrote(&r);
        r
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        this.held.poll_flush(&mut this.inner, cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        this.held.poll_shutdown(&mut this.inner, cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = this.held.poll_write_vectored(&mut this.inner, cx, bufs);
        this.wrote(&r);
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.held.is_write_vectored(&self.inner)
    }
}

impl Deadline {
    /// A response is being written: its request's header was complete.
    fn wrote(&mut self, r: &Poll<std::io::Result<usize>>) {
        if matches!(r, Poll::Ready(Ok(n)) if *n > 0) {
            self.armed = false;
        }
    }
}

#[async_trait]
impl Shutdown for Deadline {
    async fn shutdown(&mut self) {
        // What is held goes first, as pingora's buffer's did.
        let _ = std::future::poll_fn(|cx| self.held.poll_send(&mut self.inner, cx)).await;
        self.inner.shutdown().await
    }
}

impl UniqueID for Deadline {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for Deadline {
    fn get_ssl(&self) -> Option<&pingora::protocols::tls::TlsRef> {
        self.inner.get_ssl()
    }

    fn get_ssl_digest(&self) -> Option<Arc<pingora::protocols::tls::SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for Deadline {
    fn get_timing_digest(&self) -> Vec<Option<pingora::protocols::TimingDigest>> {
        self.inner.get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for Deadline {
    fn get_proxy_digest(&self) -> Option<Arc<pingora::protocols::raw_connect::ProxyDigest>> {
        self.inner.get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: pingora::protocols::raw_connect::ProxyDigest) {
        self.inner.set_proxy_digest(digest)
    }
}

impl GetSocketDigest for Deadline {
    fn get_socket_digest(&self) -> Option<Arc<pingora::protocols::SocketDigest>> {
        self.inner.get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: pingora::protocols::SocketDigest) {
        self.inner.set_socket_digest(digest)
    }
}

/// The HTTP/2 connection preface, as pingora peeks for it on plaintext listeners.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

#[async_trait]
impl Peek for Deadline {
    /// pingora peeks for the whole preface before choosing HTTP/1 or HTTP/2, and the
    /// plain stream's peek waits for all its bytes: a complete HTTP/1 request shorter
    /// than the preface would hang. This peek stops as soon as the bytes cannot be the
    /// preface, within the header deadline; what it read is replayed to the next reads.
    async fn try_peek(&mut self, buf: &mut [u8]) -> std::io::Result<bool> {
        self.take_rearm();
        let want = buf.len();
        let deadline = self.sleep.deadline();
        let fill = async {
            while self.peeked.len() < want && H2_PREFACE.starts_with(&self.peeked) {
                let mut chunk = [0u8; 64];
                let room = (want - self.peeked.len()).min(chunk.len());
                let n = tokio::io::AsyncReadExt::read(&mut self.inner, &mut chunk[..room]).await?;
                if n == 0 {
                    break;
                }
                self.peeked.extend_from_slice(&chunk[..n]);
            }
            Ok::<_, std::io::Error>(())
        };
        match tokio::time::timeout_at(deadline, fill).await {
            Ok(r) => r?,
            Err(_) => {
                self.metrics_timeout();
                return Err(late());
            }
        }
        let n = self.peeked.len().min(want);
        buf[..n].copy_from_slice(&self.peeked[..n]);
        buf[n..].fill(0);
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::held::HELD_MAX;
    use super::*;
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// A plaintext connection as a listener hands it over, and its peer.
    async fn pair() -> (Deadline, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let peer = TcpStream::connect(listener.local_addr().unwrap());
        let (peer, accepted) = tokio::join!(peer, listener.accept());
        let counted = Counted {
            open: Arc::new(AtomicUsize::new(1)),
            metrics: None,
        };
        let inner: Stream = Box::new(pingora::protocols::l4::stream::Stream::from(
            accepted.unwrap().0,
        ));
        let d = Deadline::new(inner, Duration::from_secs(10), counted);
        (d, peer.unwrap())
    }

    /// What the peer has received within a short wait.
    async fn received(peer: &mut TcpStream) -> Vec<u8> {
        let mut got = vec![0; 64 * 1024];
        let mut n = 0;
        while let Ok(Ok(m)) =
            tokio::time::timeout(Duration::from_millis(100), peer.read(&mut got[n..])).await
        {
            if m == 0 {
                break;
            }
            n += m;
        }
        got.truncate(n);
        got
    }

    #[tokio::test]
    async fn small_writes_leave_together_at_the_flush_and_the_buffer_is_given_back() {
        let (mut d, mut peer) = pair().await;
        assert!(d.held.on, "a plaintext connection holds its writes");
        d.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await.unwrap();
        d.write_all(b"body").await.unwrap();
        assert_eq!(received(&mut peer).await, b"", "sent before the flush");
        d.flush().await.unwrap();
        assert_eq!(received(&mut peer).await, b"HTTP/1.1 200 OK\r\n\r\nbody");
        assert_eq!(
            d.held.bytes.capacity(),
            0,
            "an idle connection holds a buffer"
        );
    }

    #[tokio::test]
    async fn what_is_held_goes_out_when_the_connection_is_dropped() {
        let (mut d, mut peer) = pair().await;
        d.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n")
            .await
            .unwrap();
        drop(d);
        assert_eq!(
            received(&mut peer).await,
            b"HTTP/1.1 400 Bad Request\r\n\r\n"
        );
    }

    #[tokio::test]
    async fn a_large_write_goes_out_after_what_is_held() {
        let (mut d, mut peer) = pair().await;
        d.write_all(b"head;").await.unwrap();
        let big = vec![b'x'; HELD_MAX * 3];
        let slices = [
            std::io::IoSlice::new(b"chunk;"),
            std::io::IoSlice::new(&big),
        ];
        // Loopback takes 12 KiB at once: no partial write to resume.
        let n = d.write_vectored(&slices).await.unwrap();
        assert_eq!(n, 6 + big.len());
        d.flush().await.unwrap();
        let got = received(&mut peer).await;
        assert_eq!(got.len(), 5 + 6 + big.len());
        assert!(got.starts_with(b"head;chunk;x"), "out of order");
    }
}
