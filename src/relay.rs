//! The relay: runs one client request against the upstream and moves the response to
//! the client. A GET that asks for an event stream goes out on the stream client
//! ([`crate::upstream`]); anything else runs as a pingora subrequest, so pingora's
//! ordinary proxy path does the connecting, pooling and body forwarding.
//!
//! This is where one event travels from the upstream socket to the client socket:
//! the response comes in as `HttpTask`s (header, then body bytes); an event stream on a
//! replay route becomes a hub (`Pump` reads the upstream and feeds it, `follow_hub`
//! writes its blocks to the client, with heartbeats between them). Otherwise the relay
//! feeds the bytes to the [`sse::Parser`] (to know where events end), writes them
//! unchanged to the client session (an HTTP/1 chunk or an HTTP/2 DATA frame, no
//! buffering), and, while nothing is written, a timer adds heartbeat comments at event
//! boundaries only.
//!
//! A response that is not `text/event-stream` is passed through task by task.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, StatusCode, Version};
use pingora::prelude::*;
use pingora::protocols::http::HttpTask;
use pingora::proxy::subrequest::{BodyMode, Ctx as SubrequestCtx};
use pingora::ErrorType;
use tokio::sync::{broadcast, watch};
use tokio::time::{sleep_until, Instant};

use crate::config::{ReplaySettings, Route, SseSettings};
use crate::handover::Source;
use crate::hub::{Hub, HubMsg, Miss, NewHub, Registry, Start, StreamKey, Subscription, Viewer};
use crate::key::{self, Audience};
use crate::limit::{self, Decision, Limits, RefuseReason, StreamSlot};
use crate::metrics::Metrics;
use crate::replay::{Budget, MemoryRing};
use crate::reply;
use crate::request::{accepts_event_stream, ClientInfo, InnerRequest};
use crate::sse;
use crate::upstream;

/// What a GET stream request needs to use hubs (replay, linger, sharing).
pub struct ReplayCx {
    /// Where hubs live.
    pub registry: Arc<Registry>,
    /// After a graceful upgrade: the old process's streams, to seed new hubs from.
    pub handover: Option<Arc<Source>>,
    /// The total byte budget of replay stores.
    pub budget: Arc<Budget>,
    /// The request's stream key.
    pub key: StreamKey,
    /// What the key was built from, to build the key a cookie set by the response
    /// will give (see [`key::cookie_set_by`]).
    pub resource: key::Resource,
    /// The request carries one of the route's identity headers.
    pub has_identity: bool,
    /// The client's `Last-Event-ID` (header or configured query parameter).
    pub last_event_id: Option<String>,
    /// The route's replay settings.
    pub settings: ReplaySettings,
}

impl ReplayCx {
    /// The request as a hub's audience sees it.
    fn viewer<'a>(&self, req: &'a RequestHeader) -> Viewer<'a> {
        Viewer {
            headers: &req.headers,
            has_identity: self.has_identity,
        }
    }
}

/// How a subscriber came to its hub, for the response header and the access log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Attach {
    /// Its `Last-Event-ID` was found: replayed from the store.
    Hit,
    /// Its `Last-Event-ID` was not found, or its hub may not be read by it.
    Miss(Miss),
    /// It started the hub, or joined a shared one without an id.
    Fresh,
}

/// Metric handles of one stream, looked up once; the open-streams gauge goes back
/// down when the stream ends, however it ends.
struct StreamMetrics {
    open: prometheus::IntGauge,
    events: prometheus::IntCounter,
    bytes: prometheus::IntCounter,
    heartbeats: prometheus::IntCounter,
}

impl StreamMetrics {
    fn new(m: &Metrics, route: &str, session: &Session) -> StreamMetrics {
        let protocol = if session.is_http2() { "h2" } else { "h1" };
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

/// Whether the relay may start a stream, and how to say no.
pub struct Admission {
    /// Where stream metrics go.
    pub metrics: Arc<Metrics>,
    /// Hub use for this request, when replay applies (GET streams on replay routes).
    pub replay: Option<ReplayCx>,
    /// The stream slot taken before the request went upstream (for requests that said
    /// they want an event stream); otherwise one is taken when a stream shows up.
    pub slot: Option<StreamSlot>,
    /// The limits to take a slot from.
    pub limits: Arc<Limits>,
    /// How to answer a refusal.
    pub refusal: Refusal,
}

/// The stream's slot: the one taken before the request went upstream, or a new one now
/// that a stream showed up. `Err` when the limits refuse it. (Takes the two fields, not
/// the `Admission`, so callers may hold its replay settings meanwhile.)
fn take_slot(
    slot: &mut Option<StreamSlot>,
    limits: &Limits,
    key: Option<limit::ClientKey>,
) -> std::result::Result<Option<StreamSlot>, (RefuseReason, Duration)> {
    match (slot.take(), key) {
        (Some(s), _) => Ok(Some(s)),
        (None, Some(k)) => match limits.open_stream(&k) {
            Decision::Allow(s) => Ok(Some(s)),
            Decision::Refuse {
                reason,
                retry_after,
            } => Err((reason, retry_after)),
        },
        (None, None) => Ok(None),
    }
}

/// How a refusal is answered.
#[derive(Debug, Clone)]
pub struct Refusal {
    /// Answer with a 200 event stream carrying `retry:` (for `EventSource` clients).
    pub as_event_stream: bool,
    /// Smallest retry delay to give.
    pub base_retry: Duration,
    /// Random stretch of the delay.
    pub jitter: f64,
}

/// Answers a refused request. An `EventSource` that gets anything but a 200 event
/// stream stops for good, so stream clients get a 200 stream that sets a (jittered)
/// reconnection delay and ends; others get 429 with `Retry-After`.
pub async fn refuse(
    session: &mut Session,
    how: &Refusal,
    reason: RefuseReason,
    retry_after: Duration,
) -> Result<()> {
    let delay = limit::jittered(retry_after.max(how.base_retry), how.jitter);
    tracing::debug!(reason = reason.as_str(), ?delay, "refused");
    if how.as_event_stream {
        let mut resp = ResponseHeader::build(200, Some(5))?;
        resp.insert_header(header::CONTENT_TYPE, "text/event-stream")?;
        resp.insert_header(header::CACHE_CONTROL, "no-cache")?;
        resp.insert_header("x-ssegate-refused", reason.as_str())?;
        let body = Bytes::from(format!(
            ": ssegate: refused ({}), come back later\nretry: {}\n\n",
            reason.as_str(),
            delay.as_millis()
        ));
        resp.insert_header(header::CONTENT_LENGTH, body.len().to_string())?;
        session.write_response_header(Box::new(resp), false).await?;
        return session.write_response_body(Some(body), true).await;
    }
    let body: &'static str = "429 Too Many Requests: slow down and retry later\n";
    let mut resp = ResponseHeader::build(429, Some(5))?;
    resp.insert_header(header::CONTENT_TYPE, "text/plain; charset=utf-8")?;
    resp.insert_header(header::CONTENT_LENGTH, body.len().to_string())?;
    resp.insert_header(
        header::RETRY_AFTER,
        delay.as_secs_f64().ceil().max(1.0).to_string(),
    )?;
    resp.insert_header("x-ssegate-refused", reason.as_str())?;
    session.write_response_header(Box::new(resp), false).await?;
    session
        .write_response_body(Some(Bytes::from_static(body.as_bytes())), true)
        .await
}

/// On shutdown, how long to wait for an upstream to finish the event it is sending.
const MID_EVENT_SHUTDOWN_WAIT: Duration = Duration::from_secs(5);

/// What the relay did, for the access log.
#[derive(Debug, Default, Clone)]
pub struct RelayStats {
    /// The response was an event stream.
    pub stream: bool,
    /// Events relayed.
    pub events: u64,
    /// Heartbeats written.
    pub heartbeats: u64,
    /// Why the relay stopped early, if it did.
    pub error: Option<String>,
    /// The limits refused the stream when it showed up.
    pub refused: Option<RefuseReason>,
    /// Replay outcome: `hit`, `miss` or `fresh` (hub streams only).
    pub replay: Option<&'static str>,
    /// Why a resume missed: `unknown_id`, or why the hub that had it was not shared
    /// with this request (`vary`, `vary_star`, `private`).
    pub miss: Option<&'static str>,
    /// Blocks sent from the replay store.
    pub replayed: u64,
}

/// Is this response an event stream? By `Content-Type` only: any case, parameters allowed.
pub fn is_event_stream(resp: &ResponseHeader) -> bool {
    resp.headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("text/event-stream"))
}

/// Where the response stands.
enum Phase {
    /// No response header yet.
    Waiting,
    /// An ordinary response: tasks pass through.
    Plain,
    /// An event stream: parsed, heartbeated.
    Stream(Box<StreamState>),
}

/// Per-stream state of an event-stream response.
struct StreamState {
    /// Finds event boundaries in the upstream bytes.
    parser: sse::Parser,
    /// Removes a late leading BOM once the gateway has written first.
    bom: Option<sse::BomStripper>,
    /// The upstream has sent body bytes.
    upstream_spoke: bool,
    /// When the gateway last wrote to the client: a heartbeat is due `interval` later.
    last_write: Instant,
    /// The heartbeat interval.
    interval: Duration,
    /// The heartbeat bytes.
    heartbeat: Bytes,
    /// Shutdown started: end at the next boundary.
    closing: bool,
    /// Shutdown started mid-event: end by then even if the event never finishes.
    close_by: Instant,
    /// Reconnection delay to send on shutdown.
    shutdown_retry_ms: u64,
    /// The upstream's body is not parseable (compressed): relay without heartbeats.
    opaque: bool,
    /// The `retry:` block the gateway sends to set or override the client's delay.
    retry_block: Option<Bytes>,
    /// An upstream `retry:` went out: send ours again at the next boundary.
    retry_due: bool,
    /// Holds the stream's place in the limits while it lives.
    _slot: Option<StreamSlot>,
    /// The stream's metric handles.
    metrics: StreamMetrics,
}

/// Serves the request in `session` (the outer pass) through a subrequest. Errors are
/// answered to the client here; the returned stats describe what happened.
pub async fn serve(
    session: &mut Session,
    client: ClientInfo,
    mut admission: Admission,
    mut shutdown: watch::Receiver<bool>,
) -> RelayStats {
    let mut stats = RelayStats::default();
    if let Err(e) = run(session, client, &mut admission, &mut shutdown, &mut stats).await {
        tracing::debug!("relay ended: {e}");
        if session.response_written().is_none() {
            reply::error(session, &e).await;
        }
        stats.error = Some(e.to_string());
    }
    stats
}

async fn run(
    session: &mut Session,
    client: ClientInfo,
    admission: &mut Admission,
    shutdown: &mut watch::Receiver<bool>,
    stats: &mut RelayStats,
) -> Result<()> {
    let route = client.route.clone();
    let key = client.key;
    let response_timeout = route.upstream.response_timeout;

    let mut missed = None;
    // Held while this request opens a shared key's upstream (see `Registry::open_lock`).
    let mut opening = None;
    if let Some(rcx) = &admission.replay {
        let shared = rcx.settings.shared;
        let mut attached = None;
        if let Some(id) = &rcx.last_event_id {
            match rcx
                .registry
                .resume(&rcx.key, id, rcx.viewer(session.req_header()))
            {
                Ok((h, s)) => attached = Some((h, s, Attach::Hit)),
                Err(m) => missed = Some(m),
            }
        }
        if attached.is_none() && shared {
            // A shared upstream cannot replay for one client: a miss joins live too.
            let start = match (missed, rcx.settings.on_connect) {
                (None, n) if n > 0 => Start::Last(n),
                _ => Start::Live,
            };
            let how = missed.map_or(Attach::Fresh, Attach::Miss);
            attached = rcx
                .registry
                .join_shared(&rcx.key, start, rcx.viewer(session.req_header()))
                .map(|(h, s)| (h, s, how));
            if attached.is_none() {
                // Nobody streams this key yet: one client opens it while the others
                // wait here, then join.
                // Bounded: if the opener's upstream is slow, go to the upstream alone.
                let guard =
                    tokio::time::timeout(response_timeout, rcx.registry.open_lock(&rcx.key))
                        .await
                        .ok();
                attached = rcx
                    .registry
                    .join_shared(&rcx.key, start, rcx.viewer(session.req_header()))
                    .map(|(h, s)| (h, s, how));
                if attached.is_none() {
                    opening = guard;
                }
            }
        }
        if let Some((hub, sub, how)) = attached {
            let slot = match take_slot(&mut admission.slot, &admission.limits, key) {
                Ok(slot) => slot,
                Err((reason, retry_after)) => {
                    stats.refused = Some(reason);
                    return refuse(session, &admission.refusal, reason, retry_after).await;
                }
            };
            // The live hub's upstream never saw this client's id: nothing to skip. The
            // head came from another request: its cookies are not this client's.
            let follow = Follow::new(how, None, false, &route, rcx, admission, slot, session);
            return follow_hub(session, hub, sub, follow, shutdown, stats).await;
        }
    }

    let body_done = session.as_downstream_mut().is_body_done();
    // A GET that asks for an event stream goes out on the stream client; the rest take
    // pingora's proxy path (see `upstream`).
    let mut source =
        if admission.replay.is_some() && body_done && accepts_event_stream(session.req_header()) {
            Feed::Direct(Box::new(
                upstream::open(session.req_header(), &client, &admission.metrics).await?,
            ))
        } else {
            Feed::Sub(Subrequest::spawn(session, client, body_done)?)
        };

    let mut phase = Phase::Waiting;
    let header_deadline = Instant::now() + response_timeout;
    let far_future = Instant::now() + Duration::from_secs(86400 * 365);

    // One heartbeat timer and one shutdown wait for the whole response, not one per
    // chunk (see `follow_hub`); both are dropped before a hub takes over.
    let first = {
        let heartbeat_timer = sleep_until(far_future);
        tokio::pin!(heartbeat_timer);
        let mut heartbeat_armed = false;
        let shutdown_wait = shutdown_started(shutdown);
        tokio::pin!(shutdown_wait);
        loop {
            let beating = matches!(&phase, Phase::Stream(s) if !s.opaque && !s.closing);
            if let (Phase::Stream(s), false) = (&phase, heartbeat_armed) {
                heartbeat_timer.as_mut().reset(s.last_write + s.interval);
                heartbeat_armed = true;
            }
            let waiting = matches!(phase, Phase::Waiting);
            let streaming = matches!(phase, Phase::Stream(_));
            let closing = matches!(&phase, Phase::Stream(s) if s.closing);
            let close_by = match &phase {
                Phase::Stream(s) if s.closing => s.close_by,
                _ => far_future,
            };
            tokio::select! {
                biased;

                u = source.next(session) => match u? {
                    Up::Ended => {
                        // The upstream side ended without finishing the response.
                        return match phase {
                            Phase::Waiting => Error::e_explain(ErrorType::ConnectProxyFailure, "upstream produced no response"),
                            Phase::Plain => Error::e_explain(ErrorType::ReadError, "upstream response cut short"),
                            Phase::Stream(_) => {
                                // Upstream closed: end the stream so the client reconnects.
                                session.write_response_body(None, true).await?;
                                Ok(())
                            }
                        };
                    }
                    Up::Failed(e) if session.response_written().is_none() => return Err(e),
                    Up::Failed(e) => {
                        // The header is out: all we can do is end the response.
                        tracing::debug!("upstream failed mid-response: {e}");
                        if streaming {
                            session.write_response_body(None, true).await?;
                            return Ok(());
                        }
                        return Err(e);
                    }
                    Up::Task(t) => {
                        let mut batch = vec![t];
                        source.drain(&mut batch);
                        if admission.replay.as_ref().is_some_and(|r| r.registry.has_room())
                            && matches!(phase, Phase::Waiting)
                            && matches!(&batch[0], HttpTask::Header(resp, false) if resp.status == StatusCode::OK && is_event_stream(resp) && !is_compressed(resp))
                        {
                            // An event stream on a replay route: it becomes a hub that outlives
                            // this client; this client becomes its first subscriber.
                            break batch;
                        }
                        // Not a hub after all (an error page, a compressed stream...): the other
                        // clients of a shared key must not wait for this response to finish.
                        opening = None;
                        for t in batch {
                            let mut cx = TaskCx { stats: &mut *stats, settings: &route.sse, route_name: &route.name, admission: &mut *admission, key };
                            if handle_task(session, &mut phase, t, &mut cx).await? {
                                if matches!(phase, Phase::Plain) {
                                    source.finish();
                                }
                                return Ok(());
                            }
                        }
                    }
                },

                _ = sleep_until(header_deadline), if waiting => {
                    return Error::e_explain(ErrorType::HTTPStatus(504), "no response header in time");
                }
                _ = &mut heartbeat_timer, if beating => {
                    if let Phase::Stream(s) = &mut phase {
                        let mut next = s.last_write + s.interval;
                        if s.last_write.elapsed() >= s.interval {
                            if s.parser.at_boundary() {
                                session.write_response_body(Some(s.heartbeat.clone()), false).await?;
                                stats.heartbeats += 1;
                                s.metrics.heartbeats.inc();
                                if !s.upstream_spoke && s.bom.is_none() {
                                    s.bom = Some(sse::BomStripper::default());
                                }
                                s.last_write = Instant::now();
                            }
                            // Mid-event: the upstream owes the rest; check again later.
                            next = Instant::now() + s.interval;
                        }
                        heartbeat_timer.as_mut().reset(next);
                    }
                }

                _ = &mut shutdown_wait, if streaming && !closing => {
                    if let Phase::Stream(s) = &mut phase {
                        s.closing = true;
                        if s.opaque || s.parser.at_boundary() {
                            end_with_retry(session, s).await?;
                            return Ok(());
                        }
                        s.close_by = Instant::now() + MID_EVENT_SHUTDOWN_WAIT;
                    }
                }

                _ = sleep_until(close_by), if closing => {
                    // The upstream never finished its event. A hint appended now would join
                    // the unfinished line, so end without one: the client drops the partial
                    // event and reconnects after its current delay.
                    tracing::debug!("shutdown: upstream left an event unfinished");
                    session.write_response_body(None, true).await?;
                    return Ok(());
                }
            }
        }
    };

    // Hand the upstream over to a hub.
    let Some(rcx) = admission.replay.as_ref() else {
        return Error::e_explain(ErrorType::InternalError, "hub without replay settings");
    };
    let mut tasks = first.into_iter();
    let Some(HttpTask::Header(resp, _)) = tasks.next() else {
        return Error::e_explain(ErrorType::InternalError, "hub without a response header");
    };
    let slot = match take_slot(&mut admission.slot, &admission.limits, key) {
        Ok(slot) => slot,
        Err((reason, retry_after)) => {
            stats.refused = Some(reason);
            return refuse(session, &admission.refusal, reason, retry_after).await;
        }
    };
    let head: http::response::Parts = (**resp).clone();
    let req = session.req_header();
    let identity = &rcx.settings.identity_headers;
    let audience = Audience::of(&head.headers, &req.headers, identity, rcx.settings.shared);
    // A visitor answered with a session cookie comes back with it: the hub answers to
    // that key too (only that visitor holds the cookie).
    let aliases = match key::cookie_set_by(&head.headers) {
        Some(cookie)
            if !rcx.settings.shared
                && !req.headers.contains_key(header::COOKIE)
                && identity.iter().any(|n| n == "cookie") =>
        {
            let mut h = req.headers.clone();
            h.insert(header::COOKIE, cookie);
            vec![key::stream_key(&rcx.resource, identity, &h)]
        }
        _ => vec![],
    };
    // Whether another request with this key could ever read what this one records.
    let reusable = audience.admits(&req.headers, rcx.has_identity).is_ok();
    if let Err(d) = audience.admits(&req.headers, rcx.has_identity) {
        tracing::debug!(
            reason = d.as_str(),
            "stream recorded for its own client only"
        );
    }
    let store = Box::new(MemoryRing::new(rcx.settings.bounds, rcx.budget.clone()));
    // Just after an upgrade, the old process may still hold this stream's recent events
    // and its upstream: take them over (only those recorded for the same audience).
    let mut import = match (&rcx.handover, audience.fingerprint()) {
        (Some(source), Some(fingerprint)) if reusable => {
            source
                .fetch(
                    &rcx.key,
                    &fingerprint,
                    rcx.last_event_id.as_deref(),
                    route.sse.max_event_bytes,
                )
                .await
        }
        _ => None,
    };
    let seed = import.as_mut().map(|i| std::mem::take(&mut i.seed));
    if let Some(seed) = &seed {
        rcx.registry
            .counters
            .handed_over
            .fetch_add(seed.blocks.len() as u64, Ordering::Relaxed);
    }
    // Nobody else could resume a stream of its own client only: no linger for it.
    let linger = if reusable || !aliases.is_empty() {
        rcx.settings.linger
    } else {
        Duration::ZERO
    };
    let viewer_headers = req.headers.clone();
    let new = NewHub {
        key: rcx.key.clone(),
        aliases,
        shared: rcx.settings.shared,
        audience,
        head,
        store,
        max_event_bytes: route.sse.max_event_bytes,
        seed,
        owner: key,
    };
    let viewer = Viewer {
        headers: &viewer_headers,
        has_identity: rcx.has_identity,
    };
    let (hub, sub, created) = rcx.registry.create(new, viewer);
    // The hub is registered: waiting clients of a shared key may join it now.
    drop(opening);
    if sub.resumed {
        let counters = &rcx.registry.counters;
        counters.hits.fetch_add(1, Ordering::Relaxed);
        counters
            .events_replayed
            .fetch_add(sub.replay.len() as u64, Ordering::Relaxed);
    }
    if created {
        if let Some(import) = import {
            tokio::spawn(import.follow(hub.clone(), rcx.registry.clone()));
        }
        let pump = Pump {
            hub: hub.clone(),
            registry: rcx.registry.clone(),
            source,
            pending: tasks.collect(),
            linger,
        };
        tokio::spawn(pump.run());
    } else {
        // Another client's request made the shared hub first: ours is not needed.
        drop(source);
    }
    let how = match (sub.resumed, missed) {
        (true, _) => Attach::Hit,
        (false, Some(m)) => Attach::Miss(m),
        (false, None) => Attach::Fresh,
    };
    // A new upstream got the client's Last-Event-ID: if it replays that very event
    // too, the client must not see it twice.
    let skip_id = match how {
        Attach::Miss(_) => rcx.last_event_id.as_deref().map(Arc::from),
        _ => None,
    };
    let follow = Follow::new(how, skip_id, created, &route, rcx, admission, slot, session);
    follow_hub(session, hub, sub, follow, shutdown, stats).await
}

/// Feeds a hub from its upstream until the upstream ends or the hub has had no
/// subscriber for its linger window; then closes the upstream (by dropping the source)
/// and unregisters.
struct Pump {
    hub: Arc<Hub>,
    registry: Arc<Registry>,
    source: Feed,
    /// Tasks that came with the response header.
    pending: Vec<HttpTask>,
    linger: Duration,
}

impl Pump {
    async fn run(mut self) {
        let mut alive = std::mem::take(&mut self.pending)
            .into_iter()
            .all(|t| feed_task(&self.hub, t));
        let hub = self.hub.clone();
        let idle = hub.idle_for(self.linger);
        tokio::pin!(idle);
        while alive {
            tokio::select! {
                t = self.source.next_task() => alive = t.is_some_and(|t| feed_task(&self.hub, t)),
                _ = &mut idle => {
                    if self.hub.end_if_idle() {
                        tracing::debug!("stream without clients for its linger window: closing upstream");
                        alive = false;
                    } else {
                        // Someone attached just now: wait for the next idle window.
                        idle.set(hub.idle_for(self.linger));
                    }
                }
            }
        }
        self.hub.end();
        self.registry.remove(&self.hub);
    }
}

/// Feeds one subrequest task to a hub; `false` when the upstream stream is over.
fn feed_task(hub: &Hub, t: HttpTask) -> bool {
    match t {
        HttpTask::Body(Some(b), end) => match hub.feed(&b) {
            Ok(_) => !end,
            Err(e) => {
                tracing::warn!("closing stream: upstream sent an {e}");
                false
            }
        },
        HttpTask::Body(None, end) | HttpTask::UpgradedBody(_, end) => !end,
        HttpTask::Header(..) => true,
        HttpTask::Trailer(_) | HttpTask::Done | HttpTask::Failed(_) => false,
    }
}

/// How a subscriber follows its hub.
struct Follow<'a> {
    how: Attach,
    /// The hub's head is the response to this client's own request, so its
    /// `Set-Cookie` is this client's; no other subscriber ever gets it.
    own_head: bool,
    /// Drop a block that carries exactly this id (the client has it).
    skip_id: Option<Arc<str>>,
    sse: &'a SseSettings,
    replay: &'a ReplaySettings,
    last_event_id: Option<&'a str>,
    jitter: f64,
    /// The stream's place in the limits.
    _slot: Option<StreamSlot>,
    /// The stream's metric handles.
    metrics: StreamMetrics,
}

impl<'a> Follow<'a> {
    /// How a client that attached to a hub follows it. A miss is counted here, once the
    /// attach is final (a handover may still have turned it into a hit).
    #[allow(clippy::too_many_arguments)]
    fn new(
        how: Attach,
        skip_id: Option<Arc<str>>,
        own_head: bool,
        route: &'a Route,
        rcx: &'a ReplayCx,
        admission: &Admission,
        slot: Option<StreamSlot>,
        session: &Session,
    ) -> Follow<'a> {
        if let Attach::Miss(m) = how {
            rcx.registry.counters.misses[m.index()].fetch_add(1, Ordering::Relaxed);
        }
        Follow {
            how,
            own_head,
            skip_id,
            sse: &route.sse,
            replay: &rcx.settings,
            last_event_id: rcx.last_event_id.as_deref(),
            jitter: admission.refusal.jitter,
            _slot: slot,
            metrics: StreamMetrics::new(&admission.metrics, &route.name, session),
        }
    }
}

/// Serves one client from a hub: the response head, the replay, then live blocks with
/// heartbeats between them. A hub only ever hands out whole blocks, so every moment
/// between two writes is an event boundary.
async fn follow_hub(
    session: &mut Session,
    hub: Arc<Hub>,
    mut sub: Subscription,
    f: Follow<'_>,
    shutdown: &mut watch::Receiver<bool>,
    stats: &mut RelayStats,
) -> Result<()> {
    stats.stream = true;
    stats.replay = Some(match f.how {
        Attach::Hit => "hit",
        Attach::Miss(m) => {
            stats.miss = Some(m.as_str());
            "miss"
        }
        Attach::Fresh => "fresh",
    });
    let mut resp = ResponseHeader::build(hub.head.status, Some(hub.head.headers.len() + 4))?;
    for (name, value) in &hub.head.headers {
        resp.append_header(name.clone(), value.clone())?;
    }
    if hub.shared || !f.own_head {
        // A stored `Set-Cookie` is never replayed (RFC 9111 §3.1 leaves that to us): it
        // belongs to the request the head answered, and a shared route's request went
        // out without this client's identity anyway.
        resp.remove_header(&header::SET_COOKIE);
    }
    let replay_note = match f.how {
        Attach::Hit => format!("hit; events={}", sub.replay.len()),
        Attach::Miss(_) => "miss".to_owned(),
        Attach::Fresh => "fresh".to_owned(),
    };
    resp.insert_header("x-ssegate-replay", replay_note)?;
    fix_stream_headers(session, &mut resp)?;
    // A client that stops reading must not hold its stream (and the hub's unread
    // events) forever: a write that cannot finish in time ends the stream.
    session
        .as_downstream_mut()
        .set_write_timeout(Some(f.sse.write_timeout));
    session.write_response_header(Box::new(resp), false).await?;

    let retry_block = f.sse.retry.map(|r| {
        Bytes::from(format!(
            "retry: {}\n\n",
            limit::jittered(r, f.jitter).as_millis()
        ))
    });
    let mut first = bytes::BytesMut::new();
    if let Some(b) = &retry_block {
        first.extend_from_slice(b);
    }
    if matches!(f.how, Attach::Miss(_)) && f.replay.miss_event {
        first.extend_from_slice(b"event: ssegate-replay-miss\ndata: ");
        first.extend_from_slice(f.last_event_id.unwrap_or("").as_bytes());
        first.extend_from_slice(b"\n\n");
    }
    stats.replayed = sub.replay.len() as u64;
    for b in std::mem::take(&mut sub.replay) {
        if first.is_empty() && b.raw.starts_with(sse::BOM) {
            first.extend_from_slice(b"\n");
        }
        first.extend_from_slice(&b.raw);
        stats.events += 1;
        f.metrics.events.inc();
    }
    f.metrics.bytes.inc_by(first.len() as u64);
    // Once the body has begun, a block that starts with a BOM is an (ignored) unknown
    // field; as the body's first bytes the client would strip the BOM and read the field.
    let mut body_started = !first.is_empty();
    if body_started {
        session
            .write_response_body(Some(first.freeze()), false)
            .await?;
    }

    let heartbeat = sse::heartbeat(&f.sse.heartbeat_comment);
    let interval = f.sse.heartbeat_interval;
    // One timer and one shutdown wait for the stream's life, not one per event: with
    // thousands of followers, re-registering both on every event costs more than the
    // event (the timer and the shutdown watch are shared, locked structures). A block
    // only moves `last_write`; the timer, when it fires, checks the real silence.
    let mut last_write = Instant::now();
    let heartbeat_timer = tokio::time::sleep_until(last_write + interval);
    tokio::pin!(heartbeat_timer);
    let shutdown = shutdown_started(shutdown);
    tokio::pin!(shutdown);
    let mut skip_id = f.skip_id;
    loop {
        tokio::select! {
            // Blocks first: a busy stream is served without polling the rest.
            biased;

            m = sub.rx.recv() => match m {
                Ok(HubMsg::Block(b)) => {
                    if b.has_id_field {
                        // Only the upstream's first id can repeat the client's last one.
                        if skip_id.take().is_some_and(|id| id == b.id) {
                            continue;
                        }
                    }
                    if !body_started && b.raw.starts_with(sse::BOM) {
                        write_stream(session, Bytes::from_static(b"\n")).await?;
                    }
                    body_started = true;
                    write_stream(session, b.raw.clone()).await?;
                    stats.events += 1;
                    f.metrics.events.inc();
                    f.metrics.bytes.inc_by(b.raw.len() as u64);
                    if b.sets_retry {
                        if let Some(r) = &retry_block {
                            // The upstream just set its own delay: ours goes right after.
                            write_stream(session, r.clone()).await?;
                        }
                    }
                    last_write = Instant::now();
                }
                Ok(HubMsg::End) | Err(broadcast::error::RecvError::Closed) => {
                    return session.write_response_body(None, true).await;
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    // Too slow a reader: it comes back with Last-Event-ID and resumes
                    // from the store, instead of holding memory here.
                    tracing::warn!(behind = n, "client fell behind its stream; disconnecting it");
                    stats.error = Some(format!("fell behind by {n} blocks"));
                    return session.write_response_body(None, true).await;
                }
            },
            _ = &mut heartbeat_timer => {
                if last_write.elapsed() >= interval {
                    write_stream(session, heartbeat.clone()).await?;
                    body_started = true;
                    stats.heartbeats += 1;
                    f.metrics.heartbeats.inc();
                    last_write = Instant::now();
                }
                heartbeat_timer.as_mut().reset(last_write + interval);
            }
            _ = &mut shutdown => {
                session
                    .write_response_body(Some(sse::shutdown_hint(f.sse.shutdown_retry.as_millis() as u64)), false)
                    .await?;
                return session.write_response_body(None, true).await;
            }
            r = session.downstream_session.read_body_or_idle(true) => {
                r.map_err(|e| e.into_down())?;
                return Error::e_explain(ErrorType::ConnectionClosed, "client closed");
            }
        }
    }
}

/// Writes stream bytes straight to the client session, past pingora's module filters:
/// the only module installed is response compression, which is off and must never touch
/// an event stream anyway, and this runs for every event of every client.
async fn write_stream(session: &mut Session, bytes: Bytes) -> Result<()> {
    session
        .as_downstream_mut()
        .write_response_body(bytes, false)
        .await
}

/// Headers every stream response gets, whichever path it takes.
fn fix_stream_headers(session: &Session, resp: &mut ResponseHeader) -> Result<()> {
    resp.remove_header(&header::CONTENT_LENGTH);
    resp.remove_header(&header::TRANSFER_ENCODING);
    resp.insert_header(header::CACHE_CONTROL, "no-cache")?;
    resp.insert_header("x-accel-buffering", "no")?;
    if !session.is_http2() && session.req_header().version == Version::HTTP_11 {
        resp.insert_header(header::TRANSFER_ENCODING, "chunked")?;
    }
    Ok(())
}

fn is_compressed(resp: &ResponseHeader) -> bool {
    resp.headers
        .get(header::CONTENT_ENCODING)
        .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"))
}

/// Handles one task from the subrequest. Returns `true` when the response is complete.
/// What `handle_task` needs beside the session and the phase.
struct TaskCx<'a> {
    stats: &'a mut RelayStats,
    settings: &'a SseSettings,
    route_name: &'a str,
    admission: &'a mut Admission,
    key: Option<limit::ClientKey>,
}

async fn handle_task(
    session: &mut Session,
    phase: &mut Phase,
    t: HttpTask,
    cx: &mut TaskCx<'_>,
) -> Result<bool> {
    let stats = &mut *cx.stats;
    match phase {
        Phase::Waiting => match t {
            HttpTask::Header(resp, end) if resp.status.is_informational() => {
                // 1xx (e.g. 100 Continue) passes through; keep waiting for the final one.
                session
                    .write_response_tasks(vec![HttpTask::Header(resp, end)])
                    .await?;
                Ok(false)
            }
            HttpTask::Header(resp, end)
                if !end && resp.status == StatusCode::OK && is_event_stream(&resp) =>
            {
                // Not announced as a stream: admitted now that it turned out to be one.
                let slot = match take_slot(&mut cx.admission.slot, &cx.admission.limits, cx.key) {
                    Ok(slot) => slot,
                    Err((reason, retry_after)) => {
                        stats.refused = Some(reason);
                        refuse(session, &cx.admission.refusal, reason, retry_after).await?;
                        return Ok(true);
                    }
                };
                let metrics = StreamMetrics::new(&cx.admission.metrics, cx.route_name, session);
                let s = start_stream(
                    session,
                    resp,
                    cx.settings,
                    cx.admission.refusal.jitter,
                    slot,
                    metrics,
                )
                .await?;
                stats.stream = true;
                *phase = Phase::Stream(Box::new(s));
                Ok(false)
            }
            other => {
                // Not a stream after all: give the slot back now.
                cx.admission.slot = None;
                *phase = Phase::Plain;
                session.write_response_tasks(vec![other]).await
            }
        },
        Phase::Plain => session.write_response_tasks(vec![t]).await,
        Phase::Stream(s) => match t {
            HttpTask::Body(Some(bytes), end) => {
                let bytes = match s.bom.as_mut() {
                    Some(b) => b.feed(bytes),
                    None => bytes,
                };
                if !bytes.is_empty() {
                    s.upstream_spoke = true;
                    if !s.opaque {
                        s.parser.push(&bytes);
                        loop {
                            match s.parser.next_event() {
                                Ok(Some(ev)) => {
                                    stats.events += 1;
                                    s.metrics.events.inc();
                                    s.retry_due |= ev.retry.is_some() && s.retry_block.is_some();
                                }
                                Ok(None) => break,
                                Err(e) => {
                                    tracing::warn!("closing stream: upstream sent an {e}");
                                    session.write_response_body(None, true).await?;
                                    return Ok(true);
                                }
                            }
                        }
                    }
                    s.metrics.bytes.inc_by(bytes.len() as u64);
                    session.write_response_body(Some(bytes), false).await?;
                    s.last_write = Instant::now();
                    if s.retry_due && s.parser.at_boundary() {
                        // The upstream just set its own delay: ours goes right after it.
                        s.retry_due = false;
                        if let Some(b) = s.retry_block.clone() {
                            session.write_response_body(Some(b), false).await?;
                        }
                    }
                }
                if end {
                    session.write_response_body(None, true).await?;
                    return Ok(true);
                }
                if s.closing && s.parser.at_boundary() {
                    end_with_retry(session, s).await?;
                    return Ok(true);
                }
                Ok(false)
            }
            HttpTask::Body(None, end) => {
                if end {
                    session.write_response_body(None, true).await?;
                }
                Ok(end)
            }
            HttpTask::Done | HttpTask::Trailer(_) => {
                session.write_response_body(None, true).await?;
                Ok(true)
            }
            HttpTask::Failed(e) => {
                tracing::debug!("upstream stream failed: {e}");
                session.write_response_body(None, true).await?;
                Ok(true)
            }
            HttpTask::Header(..) | HttpTask::UpgradedBody(..) => Ok(false),
        },
    }
}

/// Writes the stream's response header, fixed for intermediaries.
async fn start_stream(
    session: &mut Session,
    mut resp: Box<ResponseHeader>,
    settings: &SseSettings,
    jitter: f64,
    slot: Option<StreamSlot>,
    metrics: StreamMetrics,
) -> Result<StreamState> {
    resp.remove_header(&header::CONTENT_LENGTH);
    resp.insert_header(header::CACHE_CONTROL, "no-cache")?;
    resp.insert_header("x-accel-buffering", "no")?;
    let opaque = resp
        .headers
        .get(header::CONTENT_ENCODING)
        .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"));
    if opaque {
        tracing::warn!("upstream compressed an event stream; relaying it without heartbeats");
    }
    if !session.is_http2() && session.req_header().version == Version::HTTP_11 {
        resp.insert_header(header::TRANSFER_ENCODING, "chunked")?;
    }
    session.write_response_header(resp, false).await?;
    session
        .as_downstream_mut()
        .set_write_timeout(Some(settings.write_timeout));
    let retry_block = settings.retry.map(|r| {
        Bytes::from(format!(
            "retry: {}\n\n",
            limit::jittered(r, jitter).as_millis()
        ))
    });
    let mut bom = None;
    if let Some(b) = &retry_block {
        // Written before the upstream's first byte, so a BOM from it would now be late.
        session.write_response_body(Some(b.clone()), false).await?;
        bom = Some(sse::BomStripper::default());
    }
    Ok(StreamState {
        retry_block,
        retry_due: false,
        _slot: slot,
        metrics,
        parser: sse::Parser::boundaries_only(settings.max_event_bytes),
        bom,
        upstream_spoke: false,
        last_write: Instant::now(),
        interval: settings.heartbeat_interval,
        heartbeat: sse::heartbeat(&settings.heartbeat_comment),
        closing: false,
        close_by: Instant::now(),
        shutdown_retry_ms: settings.shutdown_retry.as_millis() as u64,
        opaque,
    })
}

async fn end_with_retry(session: &mut Session, s: &StreamState) -> Result<()> {
    session
        .write_response_body(Some(sse::shutdown_hint(s.shutdown_retry_ms)), false)
        .await?;
    session.write_response_body(None, true).await
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

/// Where a response comes from.
enum Feed {
    /// A pingora subrequest: ordinary requests, and any with a body.
    Sub(Subrequest),
    /// The stream client: GETs that ask for an event stream.
    Direct(Box<upstream::Exchange>),
}

/// What the upstream side produced.
enum Up {
    /// A piece of the response.
    Task(HttpTask),
    /// It ended (the response may be incomplete).
    Ended,
    /// It failed.
    Failed(Box<Error>),
}

impl Feed {
    /// The next piece of the response, while watching the client: a client that closes
    /// (or, for a subrequest, whose request body fails) ends the wait with `Err`.
    async fn next(&mut self, session: &mut Session) -> Result<Up> {
        match self {
            Feed::Sub(sub) => sub.next(session).await,
            Feed::Direct(exchange) => tokio::select! {
                t = exchange.next() => Ok(match t {
                    Some(HttpTask::Failed(e)) => Up::Failed(e),
                    Some(t) => Up::Task(t),
                    None => Up::Ended,
                }),
                r = session.downstream_session.read_body_or_idle(true) => {
                    r.map_err(|e| e.into_down())?;
                    Error::e_explain(ErrorType::ConnectionClosed, "client closed")
                }
            },
        }
    }

    /// The next piece of the response, for a hub's pump (no client to watch).
    async fn next_task(&mut self) -> Option<HttpTask> {
        match self {
            Feed::Sub(sub) => sub.rx.recv().await,
            Feed::Direct(exchange) => exchange.next().await,
        }
    }

    /// Adds what else is ready now to `batch`, so a hub gets it with the header.
    fn drain(&mut self, batch: &mut Vec<HttpTask>) {
        if let Feed::Sub(sub) = self {
            while let Ok(more) = sub.rx.try_recv() {
                batch.push(more);
            }
        }
    }

    /// An ordinary response is complete: let a subrequest finish, so its upstream
    /// connection goes back to the pool (a stream's is cut when the source is dropped).
    fn finish(&mut self) {
        if let Feed::Sub(sub) = self {
            sub.abort.disarm();
        }
    }
}

/// A pingora subrequest running the request through the proxy path (the inner pass),
/// with the channels it talks through.
struct Subrequest {
    tx: tokio::sync::mpsc::Sender<HttpTask>,
    rx: tokio::sync::mpsc::Receiver<HttpTask>,
    wants_body_rx: tokio::sync::oneshot::Receiver<()>,
    wants_body: bool,
    wants_body_closed: bool,
    proxy_error_rx: tokio::sync::oneshot::Receiver<Box<Error>>,
    proxy_error_closed: bool,
    task: tokio::task::JoinHandle<()>,
    finished: bool,
    /// The client has sent its whole request body.
    body_done: bool,
    /// The subrequest owns the upstream connection: aborting it closes that
    /// connection, which is how a client's disconnect reaches the upstream at once.
    abort: AbortOnDrop,
}

impl Subrequest {
    fn spawn(session: &mut Session, client: ClientInfo, body_done: bool) -> Result<Subrequest> {
        // A subrequest re-reads the request as HTTP/1 text: give an HTTP/2 request the
        // version and `Host` an HTTP/1.1 request would have.
        if session.is_http2() {
            let req = session.req_header_mut();
            req.set_version(Version::HTTP_11);
            if req.headers.get(header::HOST).is_none() {
                if let Some(authority) = req.uri.authority().map(|a| a.to_string()) {
                    req.insert_header(header::HOST, authority)?;
                }
            }
        }
        // pingora re-reads an HTTP/1 client's request from its raw bytes, which lack what
        // `proxy::prepare_upstream_request` changed: the inner pass takes this copy.
        let request = (!session.is_http2()).then(|| session.req_header().clone());
        let sub_ctx = SubrequestCtx::builder()
            .body_mode(if body_done {
                BodyMode::NoBody
            } else {
                BodyMode::ExpectBody
            })
            .user_ctx(Box::new(InnerRequest { client, request }))
            .build();
        let spawner = session
            .subrequest_spawner
            .as_ref()
            .ok_or_else(|| Error::explain(ErrorType::InternalError, "subrequests not enabled"))?;
        let (subrequest, handle) = spawner.create_subrequest(session.as_downstream(), sub_ctx);
        let task = tokio::spawn(subrequest.run());
        Ok(Subrequest {
            abort: AbortOnDrop(Some(task.abort_handle())),
            task,
            finished: false,
            tx: handle.tx,
            rx: handle.rx,
            wants_body_rx: handle.subreq_wants_body,
            wants_body: false,
            wants_body_closed: false,
            proxy_error_rx: handle.subreq_proxy_error,
            proxy_error_closed: false,
            body_done,
        })
    }

    /// The next task from the subrequest, passing the client's request body to it as
    /// it asks for it.
    async fn next(&mut self, session: &mut Session) -> Result<Up> {
        loop {
            let permit = self.tx.try_reserve();
            tokio::select! {
                biased;

                t = self.rx.recv() => return Ok(t.map_or(Up::Ended, Up::Task)),

                r = &mut self.proxy_error_rx, if !self.proxy_error_closed => match r {
                    Ok(e) => return Ok(Up::Failed(e)),
                    Err(_) => self.proxy_error_closed = true,
                },

                r = &mut self.wants_body_rx, if !self.wants_body && !self.wants_body_closed => {
                    if r.is_ok() { self.wants_body = true } else { self.wants_body_closed = true }
                }

                _ = self.tx.reserve(), if self.wants_body && !self.body_done && permit.is_err() && !self.tx.is_closed() => {}

                b = session.downstream_session.read_body_or_idle(self.body_done),
                    if self.body_done || (self.wants_body && permit.is_ok()) =>
                {
                    let b = b.map_err(|e| e.into_down())?;
                    if self.body_done {
                        // A client with nothing more to send only reads: this was a close.
                        return Error::e_explain(ErrorType::ConnectionClosed, "client closed");
                    }
                    let end = b.is_none() || session.as_downstream_mut().is_body_done();
                    if let Ok(p) = permit {
                        p.send(HttpTask::Body(b, end));
                    }
                    self.body_done = end;
                }

                r = &mut self.task, if !self.finished => {
                    self.finished = true;
                    if let Err(e) = r {
                        if e.is_panic() {
                            return Error::e_explain(ErrorType::InternalError, "subrequest panicked");
                        }
                    }
                }
            }
        }
    }
}

/// Aborts the subrequest task when dropped, unless disarmed.
struct AbortOnDrop(Option<tokio::task::AbortHandle>);

impl AbortOnDrop {
    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(h) = self.0.take() {
            h.abort();
        }
    }
}
