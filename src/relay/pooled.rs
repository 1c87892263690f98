//! Every request reaches the upstream over pingora's pool of HTTP/1.1 connections
//! ([`Pool`]). The request head and body go out, and the response is read, in the task
//! that consumes it (the client's relay, or a hub's pump once a stream becomes a hub):
//! one pass through pingora per request, no second session, no channel between two
//! tasks. Once both directions are complete the connection goes back to the pool;
//! dropped before that (a client that left, a stream that ended), it is closed, which is
//! how a client's disconnect reaches the upstream at once.
//!
//! Event streams take this path too: a quiet stream costs what pingora's HTTP/1.1 client
//! session holds, which is less than hyper's client held (an 8 KiB write buffer, an
//! 8 KiB read buffer and a body channel per connection): see BENCHMARKS.md.

use std::sync::Arc;

use bytes::BytesMut;
use http::{header, HeaderValue, Version};
use pingora::connectors::http::v1::Connector;
use pingora::connectors::ConnectorOptions;
use pingora::prelude::*;
use pingora::protocols::http::v1::client::HttpSession as H1;
use pingora::protocols::http::HttpTask;
use pingora::{ErrorType, RetryType};

use crate::metrics::Metrics;
use crate::request::{self, ClientInfo};

/// The process's pool of upstream connections (it outlives reloads).
#[derive(Clone)]
pub struct Pool(Arc<Connector>);

impl Pool {
    /// A pool sized as pingora's own proxy sizes its pool.
    pub fn new(conf: &pingora::server::configuration::ServerConf) -> Pool {
        Pool(Arc::new(Connector::new(Some(
            ConnectorOptions::from_server_conf(conf),
        ))))
    }

    /// A connection to `peer`, and whether it came from the pool. pingora's connect
    /// path is a future of 8 KiB (its TLS handshake is in it even for plaintext
    /// peers); awaited inline, it would size every request's future and be copied with
    /// it, when a keep-alive site finds a pooled connection almost every time. Boxed,
    /// only a new connection pays for it.
    async fn session(&self, peer: &HttpPeer) -> Result<(H1, bool)> {
        if let Some(http) = self.0.reused_http_session(peer).await {
            return Ok((http, true));
        }
        Box::pin(self.0.get_http_session(peer)).await
    }
}

/// The most an event stream's body read takes at a time, in a buffer it holds for its
/// life: pingora's 64 KiB suits a download, not a stream of small events (nginx's
/// `proxy_buffer_size` is a page or two). Measured per idle stream (BENCHMARKS.md): 5 KiB
/// beat 8 (2 KiB more over h2c) and 4 (4 KiB more over HTTP/1.1: the allocator's 4 KiB
/// class is the one every request's head buffer passes through, and shares its pages).
const STREAM_READ_BUFFER: usize = 5 * 1024;

/// What the upstream side produced.
pub(super) enum Up {
    /// A piece of the response.
    Task(HttpTask),
    /// It ended (the response may be incomplete).
    Ended,
    /// It failed.
    Failed(Box<Error>),
}

/// One request and its response on a pooled connection.
pub(super) struct Pooled {
    http: H1,
    /// Where the connection goes: to open another if the request must go again, and to
    /// give it back to the pool. An event stream needs neither (its response has begun,
    /// and its connection closes with it: only `pass_through` gives one back), so it
    /// lets the peer go: 672 bytes of every stream's life.
    peer: Option<Box<HttpPeer>>,
    pool: Pool,
    /// The connection came from the pool (the server may have closed it meanwhile).
    reused: bool,
    /// The request may go again on another connection: it has no body, and its
    /// response has not begun.
    resendable: bool,
    /// The client's request body is all sent upstream.
    body_done: bool,
    /// The response was read to its end.
    response_done: bool,
    /// The response is an event stream: it waits for each read holding no buffer.
    stream: bool,
}

impl Pooled {
    /// Sends the head of `req` (already prepared for the upstream, see
    /// `request::prepare_upstream_request`) to the route's upstream: servers in
    /// round-robin order, moving on when a connect fails (nothing was sent yet, so that
    /// is safe for any method). `has_body`: the client sends a body; `body_done`: all
    /// of it has been read already.
    pub(super) async fn open(
        req: &RequestHeader,
        has_body: bool,
        body_done: bool,
        client: &ClientInfo,
        pool: &Pool,
        metrics: &Metrics,
    ) -> Result<Pooled> {
        let head = Box::new(upstream_head(req, has_body)?);
        let upstream = &client.route.upstream;
        let mut last_error = None;
        let mut head = Some(head);
        for (i, addr) in client.servers_in_turn()?.enumerate() {
            let mut peer = Box::new(HttpPeer::new(addr, false, String::new()));
            peer.options.connection_timeout = Some(upstream.connect_timeout);
            // Streams may be quiet for hours: no read timeout on the upstream. The relay
            // bounds the wait for the response header itself.
            peer.options.read_timeout = None;
            peer.options.idle_timeout = None;
            // A pooled connection the server closed meanwhile fails on first use: the
            // same server is tried once more, on another connection.
            for _ in 0..2 {
                let (http, reused) = match pool.session(&peer).await {
                    Ok(s) => s,
                    Err(e) => {
                        client.connect_failed(metrics, addr, i + 1, &e);
                        last_error = Some(e);
                        break;
                    }
                };
                metrics
                    .upstream_connections
                    .with_label_values(&[upstream.name.as_str(), if reused { "yes" } else { "no" }])
                    .inc();
                let mut pooled = Pooled {
                    http,
                    peer: Some(peer),
                    pool: pool.clone(),
                    reused,
                    resendable: !has_body,
                    body_done: body_done || !has_body,
                    response_done: false,
                    stream: false,
                };
                // Built again only in the rare case that it must go again.
                let h = match head.take() {
                    Some(h) => h,
                    None => Box::new(upstream_head(req, has_body)?),
                };
                match pooled.http.write_request_header(h).await {
                    Ok(_) => return Ok(pooled),
                    Err(e) if reused => last_error = Some(e),
                    Err(e) => return Err(e.into_up()),
                }
                let Some(p) = pooled.peer.take() else { break };
                peer = p;
            }
        }
        Err(last_error
            .unwrap_or_else(|| Error::explain(ErrorType::ConnectNoRoute, "no upstream server")))
    }

    /// The next piece of the response, passing the client's request body on as it
    /// comes (both directions at once, as pingora's proxy does) and watching the
    /// client: a client that closes ends the wait with `Err`.
    pub(super) async fn next(&mut self, session: &mut Session) -> Result<Up> {
        if self.response_done {
            return Ok(Up::Ended);
        }
        loop {
            tokio::select! {
                biased;
                t = read(&mut self.http, self.stream), if !self.response_done => {
                    let t = self.resend_if_stale(t, session.req_header()).await;
                    return Ok(self.took(t));
                }
                b = session.downstream_session.read_body_or_idle(self.body_done) => {
                    let b = b.map_err(|e| e.into_down())?;
                    if self.body_done {
                        // A client with nothing more to send only reads: this was a close.
                        return Error::e_explain(ErrorType::ConnectionClosed, "client closed");
                    }
                    let end = b.is_none() || session.as_downstream_mut().is_body_done();
                    if let Some(b) = b.filter(|b| !b.is_empty()) {
                        self.http.write_body(&b).await.map_err(|e| e.into_up())?;
                    }
                    if end {
                        self.http.finish_body().await.map_err(|e| e.into_up())?;
                        self.body_done = true;
                    }
                }
            }
        }
    }

    /// The client's request body has all gone to the upstream (or there was none): the
    /// response can be read without the client's session.
    pub(super) fn body_sent(&self) -> bool {
        self.body_done
    }

    /// The final response header of `req` (sent by [`Pooled::open`]), for a caller
    /// without a client session to watch (a cluster node taking a stream over);
    /// informational ones are skipped, having nobody to go to.
    pub(super) async fn first_task(&mut self, req: &RequestHeader) -> Up {
        loop {
            let t = self.http.read_response_task().await;
            let t = self.resend_if_stale(t, req).await;
            match self.took(t) {
                Up::Task(HttpTask::Header(resp, false)) if resp.status.is_informational() => {}
                up => return up,
            }
        }
    }

    /// The next piece of the response, for a hub's pump (no client to watch; a stream
    /// that becomes a hub has no body left to send).
    pub(super) async fn next_task(&mut self) -> Option<HttpTask> {
        if self.response_done {
            return None;
        }
        let t = read(&mut self.http, self.stream).await;
        match self.took(t) {
            Up::Task(t) => Some(t),
            Up::Failed(e) => Some(HttpTask::Failed(e)),
            Up::Ended => None,
        }
    }

    /// Notes what a response read gave.
    fn took(&mut self, t: Result<HttpTask>) -> Up {
        match t {
            Ok(HttpTask::Header(mut resp, end)) => {
                if !resp.status.is_informational() {
                    // The response began: no request goes again from here.
                    self.resendable = false;
                }
                request::strip_hop_by_hop(&mut resp);
                if !end && super::is_event_stream(&resp) {
                    // A stream is read for hours, an event at a time: a 64 KiB buffer
                    // (pingora's default) would be held all that while, mostly unused,
                    // and often on pages left resident by memory freed just before.
                    self.http.set_body_buffer_size(STREAM_READ_BUFFER);
                    // Nor need it keep the request head it was asked with.
                    self.http.shrink_request_header();
                    self.peer = None;
                    self.stream = true;
                }
                self.response_done |= end;
                Up::Task(HttpTask::Header(resp, end))
            }
            Ok(t) => {
                self.response_done |= t.is_end();
                Up::Task(t)
            }
            Err(e) => {
                self.response_done = true;
                Up::Failed(e.into_up())
            }
        }
    }

    /// A reused connection the server had closed (the read failed before any response
    /// byte): `req` once more, on a fresh connection.
    async fn resend_if_stale(
        &mut self,
        t: Result<HttpTask>,
        req: &RequestHeader,
    ) -> Result<HttpTask> {
        match t {
            Err(e) if self.reused && self.resendable && e.retry != RetryType::Decided(false) => {
                self.resendable = false;
                match upstream_head(req, false) {
                    Ok(head) => self.again(Box::new(head)).await,
                    Err(_) => Err(e),
                }
            }
            t => t,
        }
    }

    /// Sends `head` again on a fresh connection and reads its response's first task.
    async fn again(&mut self, head: Box<RequestHeader>) -> Result<HttpTask> {
        let Some(peer) = &self.peer else {
            return Error::e_explain(ErrorType::InternalError, "no peer to send again to");
        };
        let (http, _) = self.pool.session(peer).await?;
        self.http = http;
        self.reused = false;
        self.http.write_request_header(head).await?;
        self.http.read_response_task().await
    }

    /// Both directions are complete: the connection goes back to the pool.
    pub(super) async fn finish(self: Box<Self>) {
        // Boxed still: moved into this future, the whole feed would be copied with it.
        if let (true, true, Some(peer)) = (self.response_done, self.body_done, &self.peer) {
            self.pool
                .0
                .release_http_session(self.http, &**peer, None)
                .await;
        }
    }
}

/// The next piece of the response on `http`. An event stream (`stream`) waits for it
/// without a read buffer: most of a stream's life is that wait, and a buffer held
/// through it is most of what an idle stream costs besides its sockets (BENCHMARKS.md).
async fn read(http: &mut H1, stream: bool) -> Result<HttpTask> {
    if stream {
        // An error here is the read's to report.
        let _ = http.wait_body_readable().await;
    }
    http.read_response_task().await
}

/// The request as an HTTP/1.1 upstream gets it: the client's head (prepared for the
/// upstream) without hop-by-hop fields, with `Host` for an HTTP/2 request, and framed
/// for its body (`Content-Length` as the client sent it, else chunked).
fn upstream_head(req: &RequestHeader, has_body: bool) -> Result<RequestHeader> {
    // A stream client's request is copied, any other cloned: the copy costs ~0.4 µs more
    // (0.7 against 0.3), which every page of the site would pay for nothing. An
    // `EventSource` always sends `Accept: text/event-stream`; a resume carries its id.
    let mut head =
        match request::accepts_event_stream(req) || req.headers.contains_key("last-event-id") {
            true => owned_copy(req)?,
            false => req.clone(),
        };
    head.set_version(Version::HTTP_11);
    // Most requests carry none of these: look before removing each by name.
    let hop = |n: &header::HeaderName| {
        request::HOP_BY_HOP.contains(&n.as_str())
            || n == header::TRANSFER_ENCODING
            || n.as_str() == "http2-settings"
    };
    if head.headers.keys().any(hop) {
        for name in request::connection_nominated(&head.headers) {
            head.remove_header(&name);
        }
        for name in request::HOP_BY_HOP {
            head.remove_header(name);
        }
        head.remove_header(&header::TRANSFER_ENCODING);
        head.remove_header("http2-settings");
    }
    if head.headers.get(header::HOST).is_none() {
        if let Some(authority) = req.uri.authority().map(|a| a.to_string()) {
            head.insert_header(header::HOST, authority)?;
        }
    }
    if has_body && head.headers.get(header::CONTENT_LENGTH).is_none() {
        head.insert_header(header::TRANSFER_ENCODING, "chunked")?;
    }
    Ok(head)
}

/// `req` with its header names and values copied into one buffer of its own. The ones
/// pingora parsed are slices of the client connection's 4 KiB read buffer, and the
/// upstream session keeps the head it wrote for as long as the response lasts, which for
/// a stream is its whole life: copied, they hold a few hundred bytes instead.
fn owned_copy(req: &RequestHeader) -> Result<RequestHeader> {
    // The client's spelling of each name where pingora kept it (HTTP/1.x), in the
    // header map's order.
    let fields = || {
        let mut case = req.case_header_iter().map(|(c, _)| c.as_slice());
        req.headers
            .iter()
            .map(move |(n, v)| (case.next().unwrap_or(n.as_str().as_bytes()), v))
    };
    let mut copy = BytesMut::with_capacity(fields().map(|(n, v)| n.len() + v.len()).sum());
    for (n, v) in fields() {
        copy.extend_from_slice(n);
        copy.extend_from_slice(v.as_bytes());
    }
    let copy = copy.freeze();
    let size = Some(req.headers.len());
    let mut head = match req.has_case() {
        true => RequestHeader::build(req.method.clone(), req.raw_path(), size)?,
        false => RequestHeader::build_no_case(req.method.clone(), req.raw_path(), size)?,
    };
    let mut at = 0;
    for (n, v) in fields() {
        let name = copy.slice(at..at + n.len());
        at += n.len();
        let mut value = HeaderValue::from_maybe_shared(copy.slice(at..at + v.len()))
            .or_err(ErrorType::InvalidHTTPHeader, "copying a request header")?;
        at += v.len();
        value.set_sensitive(v.is_sensitive());
        head.append_header(name, value)?;
    }
    Ok(head)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    /// A head as pingora's HTTP/1 server parses one: names and values are slices of the
    /// connection's read buffer, and the client's spelling is kept.
    fn parsed(buf: &Bytes, fields: &[(&str, &str)]) -> RequestHeader {
        let mut req = RequestHeader::build("GET", b"/feed?x=1", None).unwrap();
        for (n, v) in fields {
            let at = |s: &str| {
                let i = buf
                    .windows(s.len())
                    .position(|w| w == s.as_bytes())
                    .unwrap();
                buf.slice(i..i + s.len())
            };
            let value = HeaderValue::from_maybe_shared(at(v)).unwrap();
            req.append_header(at(n), value).unwrap();
        }
        req
    }

    #[test]
    fn the_upstream_head_keeps_no_slice_of_the_clients_buffer() {
        let buf = Bytes::from(
            "Host: example.test\r\nAccept: text/event-stream\r\nX-Mixed-Case: One\r\n\
             X-Mixed-Case: Two\r\nCookie: sid=secret\r\nConnection: keep-alive, X-Hop\r\n\
             X-Hop: hidden\r\nTE: trailers\r\n"
                .repeat(20),
        );
        let mut req = parsed(
            &buf,
            &[
                ("Host", "example.test"),
                ("Accept", "text/event-stream"),
                ("X-Mixed-Case", "One"),
                ("Cookie", "sid=secret"),
                ("X-Mixed-Case", "Two"),
                ("Connection", "keep-alive, X-Hop"),
                ("X-Hop", "hidden"),
                ("TE", "trailers"),
            ],
        );
        let mut sensitive = req.headers.get("cookie").unwrap().clone();
        sensitive.set_sensitive(true);
        req.insert_header("Cookie", sensitive).unwrap();

        let head = upstream_head(&req, true).unwrap();

        let mut wire = Vec::new();
        head.header_to_h1_wire(&mut wire);
        assert_eq!(
            String::from_utf8(wire).unwrap(),
            "Host: example.test\r\nAccept: text/event-stream\r\nX-Mixed-Case: One\r\n\
             X-Mixed-Case: Two\r\nCookie: sid=secret\r\nTransfer-Encoding: chunked\r\n",
            "spelling, order (pingora groups repeated fields) kept; hop-by-hop ones dropped"
        );
        assert_eq!(head.raw_path(), b"/feed?x=1");
        assert_eq!(head.version, Version::HTTP_11);
        assert!(head.headers.get("cookie").unwrap().is_sensitive());
        let client = buf.as_ptr_range();
        for ((_, v), (n, _)) in head.headers.iter().zip(head.case_header_iter()) {
            for p in [v.as_bytes().as_ptr(), n.as_slice().as_ptr()] {
                assert!(
                    !client.contains(&p),
                    "the head still holds the client's buffer"
                );
            }
        }
    }

    /// A response's head and first bytes from a raw loopback server (a real socket: the
    /// test is about what pingora's client session keeps while it reads).
    async fn read_head_of(response: &'static [u8]) -> (Pooled, Up) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            use std::io::{Read, Write};
            let (mut conn, _) = listener.accept().unwrap();
            let _ = conn.read(&mut [0u8; 1024]);
            let _ = conn.write_all(response);
            let _ = conn.read(&mut [0u8; 1024]);
        });
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let stream = pingora::protocols::l4::stream::Stream::from(tcp);
        let conf = pingora::server::configuration::ServerConf::default();
        let mut pooled = Pooled {
            http: H1::new(Box::new(stream)),
            peer: Some(Box::new(HttpPeer::new(addr, false, String::new()))),
            pool: Pool::new(&conf),
            reused: false,
            resendable: false,
            body_done: true,
            response_done: false,
            stream: false,
        };
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        req.insert_header("Host", "localhost").unwrap();
        pooled
            .http
            .write_request_header(Box::new(req))
            .await
            .unwrap();
        let head = pooled.next_task().await;
        let head = head.map(Up::Task).unwrap_or(Up::Ended);
        (pooled, head)
    }

    #[tokio::test]
    async fn an_event_stream_is_read_through_a_small_buffer() {
        // The head and the first events in one write: the events are in the buffer that
        // gets swapped for the smaller one, and must come out whole; the second is read
        // from that buffer, not waited for on the socket (which has nothing more).
        let (mut stream, head) = read_head_of(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\
              Transfer-Encoding: chunked\r\n\r\n9\r\ndata: 1\n\n\r\n9\r\ndata: 2\n\n\r\n",
        )
        .await;
        assert!(matches!(head, Up::Task(HttpTask::Header(_, false))));
        assert_eq!(stream.http.body_buffer_size(), STREAM_READ_BUFFER);
        assert!(stream.peer.is_none(), "a stream's feed lets its peer go");
        for event in [&b"data: 1\n\n"[..], b"data: 2\n\n"] {
            let bound = std::time::Duration::from_secs(10);
            match tokio::time::timeout(bound, stream.next_task()).await {
                Ok(Some(HttpTask::Body(Some(b), false))) => assert_eq!(&b[..], event),
                _ => panic!("the events read with the head"),
            }
        }

        let (page, _) = read_head_of(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 2\r\n\r\nhi",
        )
        .await;
        assert_eq!(
            page.http.body_buffer_size(),
            64 * 1024,
            "any other response keeps pingora's buffer, made for downloads"
        );
        assert!(page.peer.is_some(), "and its peer, to go back to the pool");
    }

    #[test]
    fn an_http2_request_gets_its_host_from_the_authority() {
        let mut req = RequestHeader::build_no_case("GET", b"/feed", None).unwrap();
        req.set_uri("http://example.test:8080/feed".parse().unwrap());
        req.set_version(Version::HTTP_2);
        req.append_header("accept", "text/event-stream").unwrap();
        let head = upstream_head(&req, false).unwrap();
        assert_eq!(head.headers["host"], "example.test:8080");
        assert_eq!(head.raw_path(), b"/feed");
        assert_eq!(head.version, Version::HTTP_11);
        assert!(head.headers.get(header::TRANSFER_ENCODING).is_none());
    }
}
