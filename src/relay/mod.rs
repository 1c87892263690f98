//! The relay: runs one client request against the upstream and moves the response to
//! the client.
//!
//! One event's path through here: the response arrives on a pooled upstream connection
//! ([`pooled`]), read in this task. An event stream on a replay route becomes a hub
//! ([`hubs`]: its pump feeds the hub, the client follows it); any other event stream is
//! relayed byte for byte. Either way the client is served by the one stream writer
//! ([`stream`]): heartbeats at event boundaries, `retry:`, the shutdown hint. Once its
//! head (and a hub's replay) are out and the request body is all sent, a stream is
//! handed back to the proxy ([`Served::Stream`]) to be served on its own connection
//! outside pingora's request task (over HTTP/1.x on the bare connection, [`h1`]). A
//! response that is not an event stream is passed through task by task.
//!
//! - [`admit`]: whether a stream may start, and refusals an `EventSource` survives.
//! - [`pooled`]: requests over pingora's pool of upstream connections.
//! - [`hubs`]: resume, join or create a hub; following it.
//! - [`pump`]: a hub fed from its upstream.
//! - [`remote`]: the cluster's part: following another node's reader, or leading.
//! - [`stream`]: the stream writer, and a hub's blocks as its source.
//! - [`byte_stream`]: an upstream's bytes as its other source.
//! - [`h1`]: an HTTP/1.x stream's client once its head is out: the bare connection.

mod admit;
mod byte_stream;
mod h1;
mod h2;
mod hubs;
mod pooled;
mod pump;
mod remote;
mod stream;

use pingora::prelude::*;
use pingora::protocols::http::{HttpTask, ServerSession};
use pingora::ErrorType;
use tokio::sync::watch;
use tokio::time::{sleep_until, Instant};

pub use admit::{refuse, Admission, Refusal};
pub use h1::H1Stream;
pub use h2::H2Stream;
pub use hubs::ReplayCx;
pub use pooled::Pool;
pub use stream::is_event_stream;

use crate::limit::RefuseReason;
use crate::reply;
use crate::request::ClientInfo;
use admit::{admit_stream, Admit};
use byte_stream::ByteSource;
use hubs::{Follow, Found, GoUpstream};
use pooled::{Pooled, Up};
use stream::{is_compressed, Begun, HubSource, StreamMetrics, Writer};

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

/// What the relay leaves the proxy.
pub enum Served {
    /// The request is over: answered, relayed to its end, or failed (and answered
    /// with an error if nothing had been written yet).
    Done(RelayStats),
    /// An event stream, begun: its head (and a hub's replay) are out, the rest runs on
    /// the client's connection alone ([`Streaming::run`]).
    Stream(Box<Streaming>),
}

/// What the access line reports of a stream whose client session was let go
/// ([`H1Stream`], [`H2Stream`]).
pub struct Exchange {
    /// The request's method.
    pub method: http::Method,
    /// The request's target, as the client sent it.
    pub uri: String,
    /// The response's status.
    pub status: u16,
    /// Body bytes written (framing not counted, as pingora counts them).
    pub bytes: usize,
}

impl Exchange {
    /// The exchange of `req`, answered with `status`, `bytes` of its body written.
    fn of(req: &pingora::http::RequestHeader, status: u16, bytes: usize) -> Exchange {
        Exchange {
            method: req.method.clone(),
            uri: req.uri.to_string(),
            status,
            bytes,
        }
    }
}

/// The rest of an event stream: live events, heartbeats and the end, through the
/// stream writer. It needs nothing of the request but the client's HTTP session, so the
/// proxy runs it in a task of its own and lets pingora's request task (its futures, its
/// proxy session: about half of an idle stream's memory) end.
pub struct Streaming {
    rest: Rest,
    shutdown: watch::Receiver<bool>,
    stats: RelayStats,
}

/// A begun stream, by where its events come from.
#[allow(clippy::large_enum_variant)] // the large one is the common one: see `Bytes`
enum Rest {
    Hub(Begun<HubSource>),
    /// Boxed: a byte relay's source is the larger, and inline it would size every hub
    /// stream's task too.
    Bytes(Box<Begun<ByteSource>>),
}

impl Streaming {
    /// Serves the rest of the stream on the client's session (one that neither
    /// [`H1Stream`] nor [`H2Stream`] could take); what the relay did, for the access log.
    pub async fn run(self: Box<Self>, client: &mut ServerSession) -> RelayStats {
        self.run_on(client).await
    }

    /// Serves the rest of the stream on an HTTP/1.x connection.
    pub async fn run_h1(self: Box<Self>, client: &mut H1Stream) -> RelayStats {
        self.run_on(client).await
    }

    /// Serves the rest of the stream on its HTTP/2 body writer.
    pub async fn run_h2(self: Box<Self>, client: &mut H2Stream) -> RelayStats {
        self.run_on(client).await
    }

    async fn run_on<C: stream::Client>(self: Box<Self>, client: &mut C) -> RelayStats {
        // Out of the box once, then only borrowed: see `Writer::run`.
        let Streaming {
            mut rest,
            mut shutdown,
            mut stats,
        } = *self;
        let r = match &mut rest {
            Rest::Hub(b) => {
                let Begun { writer, source } = b;
                writer.run(client, source, &mut shutdown, &mut stats).await
            }
            // Boxed: the byte relay's loop is the larger (sized with states it never
            // reaches here), and inline it sized every hub stream's task as well (an idle
            // stream's RSS went from 40 to 50 KiB).
            Rest::Bytes(b) => {
                let Begun { writer, source } = &mut **b;
                Box::pin(writer.run(client, source, &mut shutdown, &mut stats)).await
            }
        };
        drop(rest);
        if let Err(e) = r {
            tracing::debug!("relay ended: {e}");
            stats.error = Some(e.to_string());
        }
        stats
    }
}

/// Serves the request in `session`. Errors are answered to the client here.
pub async fn serve(
    session: &mut Session,
    client: ClientInfo,
    mut admission: Admission,
    pool: &Pool,
    mut shutdown: watch::Receiver<bool>,
) -> Served {
    let mut stats = RelayStats::default();
    let route = client.route.clone();
    let r = run(
        session,
        client,
        &mut admission,
        pool,
        &mut shutdown,
        &mut stats,
    )
    .await;
    match r {
        Ok(Some(rest)) => Served::Stream(Box::new(Streaming {
            rest,
            shutdown,
            stats,
        })),
        Ok(None) => Served::Done(stats),
        Err(e) => {
            tracing::debug!("relay ended: {e}");
            if session.response_written().is_none() {
                let code = reply::error(session, &e).await;
                if reply::upstream_failed(&e, code) {
                    let m = &admission.metrics.upstream_errors;
                    m.with_label_values(&[route.upstream.name.as_str()]).inc();
                }
            }
            stats.error = Some(e.to_string());
            Served::Done(stats)
        }
    }
}

async fn run(
    session: &mut Session,
    client: ClientInfo,
    admission: &mut Admission,
    pool: &Pool,
    shutdown: &mut watch::Receiver<bool>,
    stats: &mut RelayStats,
) -> Result<Option<Rest>> {
    let route = client.route.clone();
    let owner = client.key;
    let response_timeout = route.upstream.response_timeout;

    // A live hub may serve the request without bothering the upstream.
    let mut up = GoUpstream::default();
    if let Some(rcx) = &admission.replay {
        match hubs::find(rcx, session.req_header(), &client, pool, &admission.metrics).await {
            Found::Hub(hub, sub, how) => {
                let Admit::Go(slot) = admit_stream(session, admission, owner, stats).await? else {
                    return Ok(None);
                };
                // The live hub's upstream never saw this client's id: nothing to skip.
                // Its head answered another request: its cookies are not this client's.
                let follow = Follow {
                    how,
                    skip_id: None,
                    own_head: false,
                    slot,
                };
                let begun = follow.begin(session, hub, sub, &route, admission, stats);
                return begun.await.map(|b| Some(Rest::Hub(b)));
            }
            Found::Upstream(u) => up = u,
        }
    }

    let body_done = session.as_downstream_mut().is_body_done();
    let has_body = !session.as_downstream_mut().is_body_empty();
    let opened = async {
        let req = session.req_header();
        let pooled = Pooled::open(req, has_body, body_done, &client, pool, &admission.metrics);
        let mut feed = Box::new(pooled.await?);
        let (resp, end) = response_header(session, &mut feed, response_timeout).await?;
        Ok((feed, resp, end))
    };
    let (feed, resp, end) = match opened.await {
        Ok(o) => o,
        Err(e) => {
            remote::give_back(up.lead.take()).await;
            return Err(e);
        }
    };
    let stream = resp.status == http::StatusCode::OK && !end && is_event_stream(&resp);
    let room = admission
        .replay
        .as_ref()
        .is_some_and(|r| r.registry.has_room());
    if stream && room && !is_compressed(&resp) {
        // An event stream on a replay route: it becomes a hub that outlives this
        // client, which becomes its first subscriber.
        let begun = hubs::start(session, admission, &route, owner, &resp, feed, up, stats);
        return Ok(begun.await?.map(Rest::Hub));
    }
    // Not a hub after all (an error page, a compressed stream...): the other clients of
    // a shared key must not wait for this response to finish; nor do other nodes.
    drop(up.opening);
    remote::give_back(up.lead).await;
    if !stream {
        // Not a stream: give the slot taken for one back now.
        admission.slot = None;
        return pass_through(session, feed, resp, end).await.map(|_| None);
    }
    relay_bytes(
        session, admission, &route, owner, resp, feed, shutdown, stats,
    )
    .await
}

/// Relays an event stream that is not a hub, byte for byte, through the stream writer:
/// begun here and handed back to run on its own once the request body is all sent (the
/// common case: a GET); until then pingora's session carries that body, so a stream
/// whose body is still coming runs here to its end.
#[allow(clippy::too_many_arguments)]
async fn relay_bytes(
    session: &mut Session,
    admission: &mut Admission,
    route: &crate::config::Route,
    owner: Option<crate::limit::ClientKey>,
    resp: Box<ResponseHeader>,
    feed: Box<Pooled>,
    shutdown: &mut watch::Receiver<bool>,
    stats: &mut RelayStats,
) -> Result<Option<Rest>> {
    // Announced as a stream or not, it is admitted now that it turned out to be one.
    let Admit::Go(slot) = admit_stream(session, admission, owner, stats).await? else {
        return Ok(None);
    };
    let metrics = StreamMetrics::new(&admission.metrics, &route.name, session);
    let opaque = is_compressed(&resp);
    let jitter = admission.refusal.jitter;
    let mut writer = Writer::start(session, *resp, &route.sse, jitter, slot, metrics).await?;
    writer.first(session, None, &[], stats).await?;
    let mut source = ByteSource::new(feed, route.sse.max_event_bytes, opaque);
    if source.feed.body_sent() {
        return Ok(Some(Rest::Bytes(Box::new(Begun { writer, source }))));
    }
    writer.run(session, &mut source, shutdown, stats).await?;
    Ok(None)
}

/// Waits for the upstream's final response header (within `timeout`), passing
/// informational ones (`100 Continue`) through.
async fn response_header(
    session: &mut Session,
    feed: &mut Pooled,
    timeout: std::time::Duration,
) -> Result<(Box<ResponseHeader>, bool)> {
    let deadline = Instant::now() + timeout;
    loop {
        let up = tokio::select! {
            u = feed.next(session) => u?,
            _ = sleep_until(deadline) => {
                return Error::e_explain(ErrorType::HTTPStatus(504), "no response header in time");
            }
        };
        match up {
            Up::Task(HttpTask::Header(resp, end)) if resp.status.is_informational() => {
                session
                    .write_response_tasks(vec![HttpTask::Header(resp, end)])
                    .await?;
            }
            Up::Task(HttpTask::Header(resp, end)) => return Ok((resp, end)),
            Up::Task(_) => {
                return Error::e_explain(
                    ErrorType::InvalidHTTPHeader,
                    "upstream body before header",
                )
            }
            Up::Ended => {
                return Error::e_explain(
                    ErrorType::ConnectProxyFailure,
                    "upstream produced no response",
                )
            }
            Up::Failed(e) => return Err(e),
        }
    }
}

/// Passes an ordinary response through as it comes, then lets its upstream connection
/// go back to the pool.
async fn pass_through(
    session: &mut Session,
    mut feed: Box<Pooled>,
    resp: Box<ResponseHeader>,
    end: bool,
) -> Result<()> {
    let mut task = HttpTask::Header(resp, end);
    loop {
        if session.write_response_tasks(vec![task]).await? {
            feed.finish().await;
            return Ok(());
        }
        task = match feed.next(session).await? {
            Up::Task(t) => t,
            Up::Ended => {
                return Error::e_explain(ErrorType::ReadError, "upstream response cut short")
            }
            Up::Failed(e) => return Err(e),
        };
    }
}
