//! The pingora glue: the `ProxyHttp` implementation, routing, limits, header hygiene,
//! and the hand-off of every request to [`crate::relay`].
//!
//! pingora reads the client's request; `request_filter` picks the route, checks the
//! limits, prepares the request for the upstream and hands it to the relay, which
//! reaches the upstream itself (on pingora's pool of upstream connections), sees the
//! response header first and decides: an event stream is pumped with heartbeats and a
//! clean shutdown, anything else is passed through as it comes. An event stream, once
//! begun, is moved out of pingora's request task with the client's HTTP session
//! ([`Gateway::detach`], [`detached`]) and logged when it ends. WebSocket upgrades skip
//! the relay and take pingora's own proxy path (`upstream_peer` and the phases after it).

mod access;
mod detached;

use std::sync::{Arc, OnceLock, Weak};
use std::time::Instant;

use async_trait::async_trait;
use pingora::prelude::*;
use pingora::protocols::http::ServerSession;
use pingora::protocols::l4::socket::SocketAddr as PingoraAddr;
use pingora::proxy::FailToProxy;
use pingora::ErrorType;

use crate::cluster::Cluster;
use crate::config::{Config, RefuseStreamsWith, Route};
use crate::handover::Source;
use crate::hub::Registry;
use crate::limit::{self, Decision};
use crate::live::Live;
use crate::metrics::Metrics;
use crate::relay::{self, Admission, Pool, RelayStats, ReplayCx, Served};
use crate::replay::Budget;
use crate::reply::{self, refuse_malformed, respond_text};
use crate::request::{
    accepts_event_stream, content_length_is_one_number, prepare_upstream_request,
    request_authority, ClientInfo,
};
use crate::shutdown::{ActiveGuard, Graceful};
use arc_swap::ArcSwap;

/// pingora's proxy app around the gateway: what serves a client connection's requests.
pub type App = pingora::proxy::HttpProxy<Gateway>;

/// State shared by every request of the proxy service.
pub struct Gateway {
    /// The configuration and what is built from it; swapped by reloads.
    live: Arc<ArcSwap<Live>>,
    /// Graceful shutdown signal and in-flight count.
    shutdown: Graceful,
    /// Live stream hubs.
    registry: Arc<Registry>,
    /// Byte budget of all replay stores.
    budget: Arc<Budget>,
    /// Prometheus metrics.
    metrics: Arc<Metrics>,
    /// After a graceful upgrade: where the old process offers its streams' events.
    handover: Option<Arc<Source>>,
    cluster: Option<Arc<Cluster>>, // with a `[cluster]`: the other nodes, through Redis
    /// Upstream connections for ordinary requests, kept across requests and reloads.
    pool: Pool,
    /// The app this gateway runs in, set once the server is built: a stream's kept-alive
    /// connection goes back to it for its next request ([`Gateway::detach`]).
    app: Arc<OnceLock<Weak<App>>>,
}

/// What one request carries between phases.
#[derive(Default)]
pub struct RequestCtx {
    /// The configuration this request runs under.
    live: Option<Arc<Live>>,
    /// The route chosen for the request.
    route: Option<Arc<Route>>,
    /// Facts about the client, computed once.
    client: Option<ClientInfo>,
    /// Index of the upstream in the config, for round-robin.
    upstream_index: usize,
    /// First server index tried and how many were tried, to skip refusing servers.
    first_server: usize,
    /// Connection attempts made so far.
    tries: usize,
    /// When the request started.
    started: Option<Instant>,
    /// What the relay did, for the access log.
    relay: Option<RelayStats>,
    /// Why the limits refused the request, if they did.
    refused: Option<limit::RefuseReason>,
    /// Counts this request as in flight for graceful shutdown.
    _active: Option<ActiveGuard>,
    /// The request went on in a task of its own ([`Gateway::detach`]): this context is
    /// a stand-in, with nothing to log.
    detached: bool,
}

impl Gateway {
    /// A gateway serving `config`.
    pub fn new(config: Arc<Config>, shutdown: Graceful) -> prometheus::Result<Self> {
        let registry = Arc::new(
            Registry::new(config.replay.lag_blocks, config.replay.max_hubs)
                .with_client_cap(config.replay.max_hubs_per_client),
        );
        let budget = Budget::new(config.replay.total_max_bytes);
        let metrics = Metrics::new(registry.clone(), budget.clone())?;
        metrics.init_series(&config);
        let pool = Pool::new(&crate::server::server_conf(&config));
        Ok(Gateway {
            pool,
            metrics,
            registry,
            budget,
            live: Arc::new(ArcSwap::from_pointee(Live::new(config, None))),
            shutdown,
            handover: None,
            cluster: None,
            app: Arc::new(OnceLock::new()),
        })
    }

    /// Where the server puts the app this gateway runs in, once built.
    pub fn app_slot(&self) -> Arc<OnceLock<Weak<App>>> {
        self.app.clone()
    }

    /// Shares replay history, leases and live streams with other nodes.
    pub fn with_cluster(mut self, cluster: Arc<Cluster>) -> prometheus::Result<Self> {
        self.metrics.with_cluster(cluster.clone())?;
        self.cluster = Some(cluster);
        Ok(self)
    }

    /// Takes streams over from the process this one replaces (graceful upgrade).
    pub fn with_handover(mut self, source: Source) -> Self {
        self.handover = Some(Arc::new(source));
        self
    }

    /// The swappable live state, for reloads and housekeeping.
    pub fn live(&self) -> Arc<ArcSwap<Live>> {
        self.live.clone()
    }

    /// The metrics, for the admin listener.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// The hub registry, for metrics and tests.
    pub fn registry(&self) -> Arc<Registry> {
        self.registry.clone()
    }

    /// The client's address as limits see it: the peer, or the forwarded client when the
    /// peer is a trusted proxy.
    fn client_ip(&self, live: &Live, session: &Session) -> Option<std::net::IpAddr> {
        let peer = session.client_addr().and_then(PingoraAddr::as_inet)?.ip();
        let req = session.req_header();
        let values = |name| {
            req.headers
                .get_all(name)
                .iter()
                .filter_map(|v| v.to_str().ok())
        };
        Some(live.config.limits.identity.client_ip(
            peer,
            values("x-forwarded-for"),
            values("forwarded"),
        ))
    }

    /// Checks the request's host and framing and picks its route: the client as the
    /// rest of the request sees it, or `None` once it is answered (400, 404).
    async fn route_request(
        &self,
        session: &mut Session,
        live: &Arc<Live>,
    ) -> Result<Option<ClientInfo>> {
        let https = session
            .digest()
            .and_then(|d| d.ssl_digest.as_ref())
            .is_some();
        let host = match request_authority(session.req_header(), https) {
            Ok(h) => h,
            Err(e) => {
                tracing::debug!("refused: {e}");
                refuse_malformed(session, "400 Bad Request: bad or conflicting host\n").await?;
                return Ok(None);
            }
        };
        if !content_length_is_one_number(session.req_header()) {
            refuse_malformed(session, "400 Bad Request: bad Content-Length\n").await?;
            return Ok(None);
        }
        let Some(route) = live
            .config
            .route_for(host.as_deref(), session.req_header().uri.path())
            .cloned()
        else {
            respond_text(session, 404, "404 Not Found: no route for this request\n").await?;
            return Ok(None);
        };
        let peer = session
            .client_addr()
            .and_then(PingoraAddr::as_inet)
            .map(|a| a.ip());
        let client_ip = self.client_ip(live, session);
        Ok(Some(ClientInfo {
            ip: peer.map(|ip| ip.to_string()),
            trusted_peer: peer.is_some_and(|ip| live.config.limits.identity.is_trusted(ip)),
            proto: if https { "https" } else { "http" },
            host,
            upstream_index: Self::upstream_index(live, &route),
            client_ip,
            key: client_ip.map(|ip| live.config.limits.identity.key(ip)),
            route,
            live: live.clone(),
        }))
    }

    /// Runs the rest of an event stream in a task of its own that holds only what the stream
    /// needs: the client's connection (HTTP/1.x: bare, see [`relay::H1Stream`]; HTTP/2:
    /// its stream's body writer, [`relay::H2Stream`]), and the request's context for its
    /// access line.
    /// pingora's request task ends now, and with it what it held for the stream's whole
    /// life (its connection and request futures, the proxy session: half of an idle
    /// stream's memory). pingora finishes the request on an empty stand-in session,
    /// which writes nothing to the client and closes nothing of the client's.
    fn detach(&self, session: &mut Session, ctx: &mut RequestCtx, stream: Box<relay::Streaming>) {
        let stand_in = ServerSession::new_http1(Box::new(std::io::Cursor::new(Vec::new())));
        let client = std::mem::replace(&mut session.downstream_session, Box::new(stand_in));
        let stand_in_ctx = RequestCtx {
            detached: true,
            ..RequestCtx::default()
        };
        let ctx = std::mem::replace(ctx, stand_in_ctx);
        let metrics = self.metrics.clone();
        let app = self.app.clone();
        let shutdown = self.shutdown.subscribe();
        tokio::spawn(detached::serve(client, stream, ctx, metrics, app, shutdown));
    }

    fn upstream_index(live: &Live, route: &Route) -> usize {
        live.config
            .upstreams
            .iter()
            .position(|u| Arc::ptr_eq(u, &route.upstream))
            .unwrap_or(0)
    }
}

/// As a request ends in pingora's loop (`logging`): the next request on this
/// connection gets its own header deadline.
/// A body left unread would be drained after this point and read as header bytes, so
/// such a connection is not reused at all.
fn end_request(session: &mut ServerSession) {
    if !session.is_body_done() {
        session.set_keepalive(None);
    } else if let Some(stream) = session.stream() {
        crate::conn::rearm(stream);
    }
}

/// The request limits, then, for a stream request (an `EventSource` always says so),
/// its stream slot: taken before the upstream is bothered, so a reconnect storm never
/// reaches the backend.
fn check_limits(
    live: &Live,
    client: &ClientInfo,
    wants_stream: bool,
) -> std::result::Result<Option<limit::StreamSlot>, (limit::RefuseReason, std::time::Duration)> {
    let Some(key) = client.key else {
        return Ok(None);
    };
    let route_limits = live
        .route_limits
        .get(client.route.index)
        .cloned()
        .unwrap_or_default();
    if let Decision::Refuse {
        reason,
        retry_after,
    } = live.limits.check_request(&key, &route_limits)
    {
        return Err((reason, retry_after));
    }
    if !wants_stream {
        return Ok(None);
    }
    match live.limits.open_stream(&key) {
        Decision::Allow(s) => Ok(Some(s)),
        Decision::Refuse {
            reason,
            retry_after,
        } => Err((reason, retry_after)),
    }
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx::default()
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        ctx.started = Some(Instant::now());
        ctx._active = Some(self.shutdown.track());
        let live = self.live.load_full();
        ctx.live = Some(live.clone());
        let Some(client) = self.route_request(session, &live).await? else {
            return Ok(true); // answered: 400 or 404
        };
        // After the client's address is read from the forwarding headers it came with.
        prepare_upstream_request(session.req_header_mut(), &client)?;
        ctx.upstream_index = client.upstream_index;
        ctx.route = Some(client.route.clone());
        ctx.client = Some(client.clone());

        let wants_stream = accepts_event_stream(session.req_header());
        let refusal = relay::Refusal {
            as_event_stream: wants_stream
                && client.route.limits.refuse_streams_with == RefuseStreamsWith::EventStream,
            base_retry: live.config.limits.refusal_retry,
            jitter: live.config.limits.retry_jitter,
        };
        let slot = match check_limits(&live, &client, wants_stream) {
            Ok(slot) => slot,
            Err((reason, retry_after)) => {
                ctx.refused = Some(reason);
                relay::refuse(session, &refusal, reason, retry_after).await?;
                return Ok(true);
            }
        };
        if session.is_upgrade_req() {
            // WebSocket and other upgrades: pingora's ordinary path pipes them both ways.
            return Ok(false);
        }
        let admission = Admission {
            metrics: self.metrics.clone(),
            replay: ReplayCx::for_request(
                session.req_header(),
                wants_stream,
                &client,
                &self.registry,
                &self.budget,
                self.handover.as_ref(),
                self.cluster.as_ref(),
            ),
            slot,
            limits: live.limits.clone(),
            refusal,
        };
        let shutdown = self.shutdown.subscribe();
        match relay::serve(session, client, admission, &self.pool, shutdown).await {
            Served::Done(stats) => ctx.relay = Some(stats),
            Served::Stream(stream) => self.detach(session, ctx, stream),
        }
        Ok(true)
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        let route = ctx
            .route
            .as_ref()
            .ok_or_else(|| Error::explain(ErrorType::InternalError, "no route chosen"))?;
        let upstream = &route.upstream;
        let n = upstream.servers.len();
        if n == 0 {
            return Error::e_explain(ErrorType::ConnectNoRoute, "upstream has no servers");
        }
        if ctx.tries == 0 {
            ctx.first_server = ctx
                .live
                .as_ref()
                .map_or(0, |l| l.next_server(ctx.upstream_index));
        }
        let addr = upstream.servers[(ctx.first_server + ctx.tries) % n];
        let mut peer = HttpPeer::new(addr, false, String::new());
        peer.options.connection_timeout = Some(upstream.connect_timeout);
        // Streams may be quiet for hours: never time out reads on the upstream. The
        // relay enforces the wait for the response header itself.
        peer.options.read_timeout = None;
        peer.options.idle_timeout = None;
        Ok(Box::new(peer))
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        ctx.tries += 1;
        let n = ctx.route.as_ref().map_or(0, |r| r.upstream.servers.len());
        if let Some(r) = &ctx.route {
            self.metrics
                .upstream_errors
                .with_label_values(&[r.upstream.name.as_str()])
                .inc();
        }
        tracing::warn!(server = %peer, tries = ctx.tries, "upstream connect failed: {e}");
        // Nothing was sent yet, so trying the next server is safe for any method.
        e.set_retry(ctx.tries < n);
        e
    }

    async fn connected_to_upstream(
        &self,
        _session: &mut Session,
        reused: bool,
        _peer: &HttpPeer,
        _fd: std::os::unix::io::RawFd,
        _digest: Option<&pingora::protocols::Digest>,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let Some(r) = &ctx.route {
            let reused = if reused { "yes" } else { "no" };
            self.metrics
                .upstream_connections
                .with_label_values(&[r.upstream.name.as_str(), reused])
                .inc();
        }
        Ok(())
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        let code = reply::error(session, e).await;
        if let Some(r) = ctx
            .route
            .as_ref()
            .filter(|_| reply::upstream_failed(e, code))
        {
            self.metrics
                .upstream_errors
                .with_label_values(&[r.upstream.name.as_str()])
                .inc();
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        if ctx.detached {
            return; // the stream's own task logs it when it ends
        }
        end_request(session.as_downstream_mut());
        access::log(&self.metrics, &access::Line::of(session), e, ctx);
    }
}
