//! The one stream writer: what every event stream the gateway serves gets, whichever
//! source feeds it (a hub's blocks, or an upstream's bytes relayed as they come): the
//! response header fixed for intermediaries, the initial `retry:`, heartbeat comments
//! at event boundaries while the source is quiet, the shutdown hint at a boundary, the
//! write timeout, and the stream's metrics.
//!
//! A [`Source`] says where the bytes come from and whether the stream is between two
//! events now; [`Writer::run`] is the one loop that serves it.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{header, Version};
use pingora::prelude::*;
use pingora::ErrorType;
use tokio::sync::watch;
use tokio::time::{sleep_until, Instant};

use super::RelayStats;
use crate::config::SseSettings;
use crate::hub::{HubMsg, RecvError, Subscription};
use crate::limit::{self, StreamSlot};
use crate::metrics::Metrics;
use crate::sse;

/// On shutdown, how long to wait for an upstream to finish the event it is sending.
const MID_EVENT_SHUTDOWN_WAIT: Duration = Duration::from_secs(5);

/// Metric handles of one stream, looked up once; the open-streams gauge goes back
/// down when the stream ends, however it ends.
pub(super) struct StreamMetrics {
    open: prometheus::IntGauge,
    events: prometheus::IntCounter,
    bytes: prometheus::IntCounter,
    heartbeats: prometheus::IntCounter,
}

impl StreamMetrics {
    pub(super) fn new(m: &Metrics, route: &str, session: &Session) -> StreamMetrics {
        let protocol = if session.is_http2() { "h2" } else { "h1" };
        StreamMetrics::of(m, route, protocol)
    }

    fn of(m: &Metrics, route: &str, protocol: &str) -> StreamMetrics {
        let open = m.streams_open.with_label_values(&[route, protocol]);
        open.inc();
        StreamMetrics {
            open,
            events: m.events.with_label_values(&[route]),
            bytes: m.stream_bytes.with_label_values(&[route]),
            heartbeats: m.heartbeats.with_label_values(&[route]),
        }
    }
}

impl Drop for StreamMetrics {
    fn drop(&mut self) {
        self.open.dec();
    }
}

/// What the writer needs of the client's connection: pingora's session in the
/// gateway, a recorder in the tests below (so the writer is tested without a network).
pub(super) trait Client: Send {
    /// Writes stream bytes.
    fn write(&mut self, bytes: Bytes) -> impl std::future::Future<Output = Result<()>> + Send;
    /// Ends the response.
    fn finish(&mut self) -> impl std::future::Future<Output = Result<()>> + Send;
    /// Resolves (with `Err`) once the client has gone.
    fn closed(&mut self) -> impl std::future::Future<Output = Result<()>> + Send;
    /// The pingora session, for sources that read through it.
    fn session(&mut self) -> Option<&mut Session>;
}

impl Client for Session {
    /// Straight to the client session, past pingora's module filters: the only module
    /// installed is response compression, which is off and must never touch an event
    /// stream anyway, and this runs for every event of every client.
    async fn write(&mut self, bytes: Bytes) -> Result<()> {
        self.as_downstream_mut()
            .write_response_body(bytes, false)
            .await
    }

    async fn finish(&mut self) -> Result<()> {
        self.write_response_body(None, true).await
    }

    async fn closed(&mut self) -> Result<()> {
        // A stream client has nothing more to send: whatever this reads is its close.
        self.downstream_session
            .read_body_or_idle(true)
            .await
            .map_err(|e| e.into_down())?;
        Error::e_explain(ErrorType::ConnectionClosed, "client closed")
    }

    fn session(&mut self) -> Option<&mut Session> {
        Some(self)
    }
}

/// A stream's client once the stream has left pingora's request task (see
/// [`super::Streaming`]): the client's HTTP session alone, which frames what is written.
impl Client for pingora::protocols::http::ServerSession {
    async fn write(&mut self, bytes: Bytes) -> Result<()> {
        self.write_response_body(bytes, false).await
    }

    async fn finish(&mut self) -> Result<()> {
        self.write_response_body(Bytes::new(), true).await
    }

    async fn closed(&mut self) -> Result<()> {
        self.read_body_or_idle(true)
            .await
            .map_err(|e| e.into_down())?;
        Error::e_explain(ErrorType::ConnectionClosed, "client closed")
    }

    fn session(&mut self) -> Option<&mut Session> {
        None
    }
}

/// A stream whose response head and first bytes are out: the rest of it, to run
/// wherever the client's connection now lives.
pub(super) struct Begun<S> {
    pub(super) writer: Writer,
    pub(super) source: S,
}

/// What a source hands the writer.
pub(super) enum Piece {
    /// Bytes to write as they are, in which `events` events end; `sets_retry`: the
    /// upstream just set its own reconnection delay (the gateway's goes right after it,
    /// at the next boundary).
    Bytes {
        bytes: Bytes,
        events: u64,
        sets_retry: bool,
    },
    /// The source is over: end the response (with why, for the access log, if it was
    /// not the upstream's own end).
    End(Option<String>),
}

/// Where a stream's bytes come from: a hub's whole blocks ([`HubSource`]), or an
/// upstream's bytes as they arrive ([`ByteSource`]). A trait rather than an enum, so
/// each stream's task is sized for its own source: a hub follower, the common case,
/// does not carry the byte relay's state.
pub(super) trait Source: Send {
    /// The next piece, while watching the client: a client that closes ends the wait
    /// with `Err`. `wrote`: the gateway has written body bytes already (which changes
    /// what a leading BOM means).
    fn next<C: Client>(
        &mut self,
        client: &mut C,
        wrote: bool,
    ) -> impl std::future::Future<Output = Result<Piece>> + Send;

    /// Between two events now: a heartbeat or the shutdown hint may go out.
    fn at_boundary(&self) -> bool;

    /// Compressed upstream bytes: no heartbeats, nothing to wait for on shutdown.
    fn opaque(&self) -> bool {
        false
    }
}

/// A subscriber's side of a hub.
pub(super) struct HubSource {
    pub(super) sub: Subscription,
    /// Drop a block that carries exactly this id (the client has it already).
    pub(super) skip_id: Option<Arc<str>>,
}

impl Source for HubSource {
    fn at_boundary(&self) -> bool {
        // A hub hands out whole blocks only.
        true
    }

    async fn next<C: Client>(&mut self, client: &mut C, wrote: bool) -> Result<Piece> {
        loop {
            let m = tokio::select! {
                // Blocks first: a busy stream is served without polling the client.
                biased;
                m = self.sub.rx.recv() => m,
                r = client.closed() => {
                    r?;
                    return Error::e_explain(ErrorType::ConnectionClosed, "client closed");
                }
            };
            return Ok(match m {
                Ok(HubMsg::Block(b)) => {
                    // Only the upstream's first id can repeat the client's last one.
                    if b.has_id_field && self.skip_id.take().is_some_and(|id| id == b.id) {
                        continue;
                    }
                    let bytes = if !wrote && b.raw.starts_with(sse::BOM) {
                        // Past the body's start this block was an ignored unknown field;
                        // as its first bytes the client would strip the BOM and read it.
                        let mut v = BytesMut::with_capacity(b.raw.len() + 1);
                        v.extend_from_slice(b"\n");
                        v.extend_from_slice(&b.raw);
                        v.freeze()
                    } else {
                        b.raw.clone()
                    };
                    Piece::Bytes {
                        bytes,
                        events: 1,
                        sets_retry: b.sets_retry,
                    }
                }
                Ok(HubMsg::End) | Err(RecvError::Closed) => Piece::End(None),
                Err(RecvError::Lagged(n)) => {
                    // Too slow a reader: it comes back with Last-Event-ID and resumes
                    // from the store, instead of holding memory here.
                    tracing::warn!(
                        behind = n,
                        "client fell behind its stream; disconnecting it"
                    );
                    Piece::End(Some(format!("fell behind by {n} blocks")))
                }
            });
        }
    }
}

/// Writes one stream to its client.
pub(super) struct Writer {
    /// Silence after which a heartbeat goes out.
    heartbeat_interval: Duration,
    /// The reconnection delay of the shutdown hint.
    shutdown_retry: Duration,
    /// The `retry:` block the gateway sends to set or override the client's delay.
    retry_block: Option<Bytes>,
    heartbeat: Bytes,
    metrics: StreamMetrics,
    /// Holds the stream's place in the limits while it lives.
    _slot: Option<StreamSlot>,
    /// When the gateway last wrote: a heartbeat is due `heartbeat_interval` later.
    last_write: Instant,
    /// Body bytes went out already.
    wrote: bool,
}

impl Writer {
    /// Writes the stream's response header (fixed for intermediaries) and sets the
    /// write timeout: a client that stops reading must not hold its stream, and the
    /// hub's unread events, forever.
    pub(super) async fn start(
        session: &mut Session,
        mut resp: ResponseHeader,
        sse: &SseSettings,
        jitter: f64,
        slot: Option<StreamSlot>,
        metrics: StreamMetrics,
    ) -> Result<Writer> {
        resp.remove_header(&header::CONTENT_LENGTH);
        resp.remove_header(&header::TRANSFER_ENCODING);
        resp.insert_header(header::CACHE_CONTROL, "no-cache")?;
        resp.insert_header("x-accel-buffering", "no")?;
        if !session.is_http2() && session.req_header().version == Version::HTTP_11 {
            resp.insert_header(header::TRANSFER_ENCODING, "chunked")?;
        }
        session
            .as_downstream_mut()
            .set_write_timeout(Some(sse.write_timeout));
        session.write_response_header(Box::new(resp), false).await?;
        Ok(Writer::new(sse, jitter, slot, metrics))
    }

    /// A writer whose response header is out.
    fn new(
        sse: &SseSettings,
        jitter: f64,
        slot: Option<StreamSlot>,
        metrics: StreamMetrics,
    ) -> Writer {
        Writer {
            heartbeat_interval: sse.heartbeat_interval,
            shutdown_retry: sse.shutdown_retry,
            retry_block: sse.retry.map(|r| {
                Bytes::from(format!(
                    "retry: {}\n\n",
                    limit::jittered(r, jitter).as_millis()
                ))
            }),
            heartbeat: sse::heartbeat(&sse.heartbeat_comment),
            metrics,
            _slot: slot,
            last_write: Instant::now(),
            wrote: false,
        }
    }

    /// The body's first bytes, in one write: the gateway's `retry:`, then `notice` (a
    /// replay-miss event), then the `replay`ed blocks.
    pub(super) async fn first(
        &mut self,
        client: &mut impl Client,
        notice: Option<&[u8]>,
        replay: &[Bytes],
        stats: &mut RelayStats,
    ) -> Result<()> {
        let mut first = BytesMut::new();
        if let Some(b) = &self.retry_block {
            first.extend_from_slice(b);
        }
        if let Some(n) = notice {
            first.extend_from_slice(n);
        }
        for b in replay {
            // See `HubSource::next`: a BOM block may not open the body.
            if first.is_empty() && b.starts_with(sse::BOM) {
                first.extend_from_slice(b"\n");
            }
            first.extend_from_slice(b);
        }
        stats.events += replay.len() as u64;
        self.metrics.events.inc_by(replay.len() as u64);
        if !first.is_empty() {
            self.write(client, first.freeze()).await?;
        }
        Ok(())
    }

    /// Every byte of the stream's body goes out here, so the byte count includes the
    /// `retry:` blocks and heartbeats a client reads too.
    async fn write(&mut self, client: &mut impl Client, bytes: Bytes) -> Result<()> {
        let n = bytes.len() as u64;
        client.write(bytes).await?;
        self.metrics.bytes.inc_by(n);
        self.wrote = true;
        self.last_write = Instant::now();
        Ok(())
    }

    /// Ends the stream at a boundary with a short reconnection delay, so clients come
    /// back at once (to this process's successor).
    async fn end_with_hint(&mut self, client: &mut impl Client) -> Result<()> {
        let hint = sse::shutdown_hint(self.shutdown_retry.as_millis() as u64);
        self.write(client, hint).await?;
        client.finish().await
    }

    /// Serves `source` to the client until it ends, the client leaves, or shutdown.
    /// Everything by reference: the stream's task holds the writer and its source once,
    /// where moved in they would be held twice more (this future's arguments and their
    /// copies), for the stream's whole life.
    pub(super) async fn run<C: Client, S: Source>(
        &mut self,
        client: &mut C,
        source: &mut S,
        shutdown: &mut watch::Receiver<bool>,
        stats: &mut RelayStats,
    ) -> Result<()> {
        stats.stream = true;
        let interval = self.heartbeat_interval;
        // One timer and one shutdown wait for the stream's life, not one per event: with
        // thousands of streams, re-registering both on every event costs more than the
        // event (the timer and the shutdown watch are shared, locked structures). A
        // write only moves `last_write`; the timer, when it fires, checks the silence.
        let heartbeat_timer = sleep_until(self.last_write + interval);
        tokio::pin!(heartbeat_timer);
        let shutdown_wait = shutdown_started(shutdown);
        tokio::pin!(shutdown_wait);
        // Shutdown came mid-event: end by then even if the event never finishes. Made
        // only then: a timer built for every turn of the loop would cost each event a
        // lookup of the runtime's timer, and every stream's task its size.
        let mut close_by: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
        let mut retry_due = false;
        loop {
            let beating = !source.opaque() && close_by.is_none();
            tokio::select! {
                biased;

                p = source.next(client, self.wrote) => match p? {
                    Piece::Bytes { bytes, events, sets_retry } => {
                        self.write(client, bytes).await?;
                        stats.events += events;
                        self.metrics.events.inc_by(events);
                        retry_due |= sets_retry && self.retry_block.is_some();
                        if retry_due && source.at_boundary() {
                            // The upstream just set its own delay: ours goes right after.
                            retry_due = false;
                            if let Some(b) = self.retry_block.clone() {
                                self.write(client, b).await?;
                            }
                        }
                        if close_by.is_some() && source.at_boundary() {
                            return self.end_with_hint(client).await;
                        }
                    }
                    Piece::End(why) => {
                        stats.error = stats.error.take().or(why);
                        return client.finish().await;
                    }
                },

                _ = &mut heartbeat_timer, if beating => {
                    let mut next = self.last_write + interval;
                    if self.last_write.elapsed() >= interval {
                        if source.at_boundary() {
                            self.write(client, self.heartbeat.clone()).await?;
                            stats.heartbeats += 1;
                            self.metrics.heartbeats.inc();
                        }
                        // Mid-event the upstream owes the rest: check again later.
                        next = Instant::now() + interval;
                    }
                    heartbeat_timer.as_mut().reset(next);
                }

                _ = &mut shutdown_wait, if close_by.is_none() => {
                    if source.at_boundary() {
                        return self.end_with_hint(client).await;
                    }
                    close_by = Some(Box::pin(tokio::time::sleep(MID_EVENT_SHUTDOWN_WAIT)));
                }

                _ = async { close_by.as_mut()?.await; Some(()) }, if close_by.is_some() => {
                    // The upstream never finished its event. A hint appended now would
                    // join the unfinished line, so end without one: the client drops the
                    // partial event and reconnects after its current delay.
                    tracing::debug!("shutdown: upstream left an event unfinished");
                    return client.finish().await;
                }
            }
        }
    }
}

/// Resolves once the shutdown has started; never, if its sender is gone.
async fn shutdown_started(rx: &mut watch::Receiver<bool>) {
    loop {
        if *rx.borrow_and_update() {
            return;
        }
        if rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Is this response an event stream? By `Content-Type` only: any case, parameters allowed.
pub fn is_event_stream(resp: &ResponseHeader) -> bool {
    resp.headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("text/event-stream"))
}

/// The body is compressed: not parseable as events.
pub(super) fn is_compressed(resp: &ResponseHeader) -> bool {
    resp.headers
        .get(header::CONTENT_ENCODING)
        .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"))
}

/// The stream writer in process, against a hub and a recording client: what the
/// end-to-end suites check through Apache, here with tokio's paused clock.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::{NewHub, Registry, Viewer};
    use crate::replay::{Budget, MemoryRing, RingBounds};

    /// A client that records what it is sent, and never leaves.
    #[derive(Default)]
    struct Recorder {
        writes: Vec<(Instant, Bytes)>,
        finished: bool,
    }

    impl Client for Recorder {
        async fn write(&mut self, bytes: Bytes) -> Result<()> {
            self.writes.push((Instant::now(), bytes));
            Ok(())
        }
        async fn finish(&mut self) -> Result<()> {
            self.finished = true;
            Ok(())
        }
        async fn closed(&mut self) -> Result<()> {
            std::future::pending().await
        }
        fn session(&mut self) -> Option<&mut Session> {
            None
        }
    }

    impl Recorder {
        fn texts(&self) -> Vec<String> {
            self.writes
                .iter()
                .map(|(_, b)| String::from_utf8_lossy(b).into_owned())
                .collect()
        }
    }

    /// A hub with one subscriber; its ring holds `lag` blocks.
    fn hub(lag: usize) -> (Arc<crate::hub::Hub>, Subscription, Arc<Registry>) {
        let registry = Arc::new(Registry::new(lag, 10));
        let bounds = RingBounds {
            max_events: 100,
            max_bytes: 1 << 20,
            max_age: Duration::from_secs(600),
        };
        let head = http::Response::new(()).into_parts().0;
        let store = Box::new(MemoryRing::new(bounds, Budget::new(1 << 20)));
        let new = NewHub::open(
            crate::hub::StreamKey::new([&b"k"[..]]),
            false,
            head,
            store,
            1 << 16,
        );
        let headers = http::HeaderMap::new();
        let viewer = Viewer {
            headers: &headers,
            has_identity: false,
        };
        let (hub, sub, _) = registry.create(new, viewer);
        (hub, sub, registry)
    }

    fn settings(heartbeat_ms: u64, retry: Option<Duration>) -> SseSettings {
        SseSettings {
            heartbeat_interval: Duration::from_millis(heartbeat_ms),
            retry,
            ..SseSettings::default()
        }
    }

    /// Serves `sub` to a recorder until the hub ends or `shutdown` fires.
    async fn serve(
        sse: &SseSettings,
        sub: Subscription,
        registry: &Arc<Registry>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> (Recorder, RelayStats) {
        let metrics = Metrics::new(registry.clone(), Budget::new(1)).unwrap();
        let mut writer = Writer::new(sse, 0.0, None, StreamMetrics::of(&metrics, "r", "h1"));
        let (mut client, mut stats) = (Recorder::default(), RelayStats::default());
        writer
            .first(&mut client, None, &[], &mut stats)
            .await
            .unwrap();
        let mut source = HubSource { sub, skip_id: None };
        writer
            .run(&mut client, &mut source, shutdown, &mut stats)
            .await
            .unwrap();
        (client, stats)
    }

    fn block(i: u32) -> Vec<u8> {
        format!("id: {i}\ndata: {i}\n\n").into_bytes()
    }

    #[tokio::test(start_paused = true)]
    async fn heartbeats_fill_silence_only() {
        let (hub, sub, registry) = hub(64);
        let feeder = tokio::spawn(async move {
            // Events faster than the heartbeat interval, then silence.
            for i in 1..=10 {
                tokio::time::sleep(Duration::from_millis(30)).await;
                hub.feed(&block(i)).unwrap();
            }
            tokio::time::sleep(Duration::from_millis(350)).await;
            hub.end();
        });
        let (_tx, mut rx) = watch::channel(false);
        let (client, stats) = serve(&settings(100, None), sub, &registry, &mut rx).await;
        feeder.await.unwrap();
        let texts = client.texts();
        let first_beat = texts.iter().position(|t| t == ":heartbeat\n\n").unwrap();
        assert_eq!(first_beat, 10, "no heartbeat while events flow: {texts:?}");
        assert_eq!(stats.heartbeats, 3, "{texts:?}");
        assert_eq!(stats.events, 10);
        // Each heartbeat a full interval after the last write.
        let times: Vec<Instant> = client.writes.iter().map(|w| w.0).collect();
        for w in times.windows(2).skip(9) {
            assert!(
                w[1] - w[0] >= Duration::from_millis(100),
                "{:?}",
                w[1] - w[0]
            );
        }
        assert!(client.finished);
    }

    #[tokio::test(start_paused = true)]
    async fn the_gateways_retry_opens_the_stream_and_follows_the_upstreams() {
        let (hub, sub, registry) = hub(64);
        let feeder = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            hub.feed(&block(1)).unwrap();
            hub.feed(b"retry: 500\ndata: x\n\n").unwrap();
            hub.feed(&block(2)).unwrap();
            hub.end();
        });
        let (_tx, mut rx) = watch::channel(false);
        let sse = settings(1000, Some(Duration::from_secs(2)));
        let (client, _) = serve(&sse, sub, &registry, &mut rx).await;
        feeder.await.unwrap();
        assert_eq!(
            client.texts(),
            [
                "retry: 2000\n\n",
                "id: 1\ndata: 1\n\n",
                "retry: 500\ndata: x\n\n",
                "retry: 2000\n\n",
                "id: 2\ndata: 2\n\n",
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_ends_the_stream_with_a_reconnection_hint() {
        let (hub, sub, registry) = hub(64);
        let (tx, mut rx) = watch::channel(false);
        let feeder = tokio::spawn(async move {
            hub.feed(&block(1)).unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
            tx.send(true).unwrap();
            hub
        });
        let (client, _) = serve(&settings(1000, None), sub, &registry, &mut rx).await;
        let _hub = feeder.await.unwrap();
        let texts = client.texts();
        assert_eq!(
            texts.last().map(String::as_str),
            Some(": ssegate shutting down\nretry: 1000\n\n")
        );
        assert!(client.finished);
    }

    #[tokio::test(start_paused = true)]
    async fn a_subscriber_that_falls_behind_is_ended_not_skipped() {
        let (hub, sub, registry) = hub(2);
        // Ten blocks before the subscriber reads any: past its ring of two.
        for i in 1..=10 {
            hub.feed(&block(i)).unwrap();
        }
        let (_tx, mut rx) = watch::channel(false);
        let (client, stats) = serve(&settings(1000, None), sub, &registry, &mut rx).await;
        assert!(client.writes.is_empty(), "{:?}", client.texts());
        assert!(client.finished);
        assert_eq!(stats.error.as_deref(), Some("fell behind by 8 blocks"));
    }
}
