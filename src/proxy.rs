//! The pingora glue: the `ProxyHttp` implementation, routing and upstream choice,
//! header hygiene, and the hand-off of every request to [`crate::relay`].
//!
//! Each request runs twice through these phases. The *outer* pass (the client's real
//! session) picks the route and hands the request to the relay, which runs it again as a
//! pingora subrequest (the *inner* pass) to reach the upstream through pingora's ordinary
//! proxy path; a GET that asks for an event stream on a replay route takes the
//! [`crate::upstream`] stream client instead (with the same forwarding headers). The
//! relay then sees the upstream's response header first and decides: an event stream is
//! pumped with heartbeats and a clean shutdown, anything else is passed through as it
//! comes. WebSocket upgrades skip the relay and take the ordinary
//! path directly.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;
use http::header;
use pingora::prelude::*;
use pingora::protocols::l4::socket::SocketAddr as PingoraAddr;
use pingora::proxy::FailToProxy;
use pingora::server::{ExecutionPhase, ShutdownWatch};
use pingora::services::background::BackgroundService;
use pingora::{ErrorSource, ErrorType};

use arc_swap::ArcSwap;

use crate::config::{Config, RefuseStreamsWith, Route};
use crate::handover::{Offer, Source};
use crate::hub::Registry;
use crate::key::{self, BadHost};
use crate::limit::{self, ClientKey, Decision, Limits};
use crate::metrics::Metrics;
use crate::relay::{self, Admission, RelayStats, ReplayCx};
use crate::replay::{resume_request, Budget};
use crate::shutdown::{ActiveGuard, Shutdown};

/// Everything derived from the config file. A reload swaps it whole; a request keeps
/// the one it started with.
pub struct Live {
    /// How many configs were loaded so far, this one included (1 at start).
    pub generation: u64,
    /// The checked configuration.
    pub config: Arc<Config>,
    /// Round-robin position per upstream, by index in `config.upstreams`.
    next_server: Vec<AtomicUsize>,
    /// Rate limits and stream caps.
    pub limits: Arc<Limits>,
    /// Per-route limiters, by route index.
    pub route_limits: Vec<Arc<limit::RouteLimits>>,
}

impl Live {
    /// Builds the live state for `config`, keeping the limiters of `previous` when
    /// their settings did not change (so a reload does not hand out fresh quotas).
    pub fn new(config: Arc<Config>, previous: Option<&Live>) -> Live {
        let next_server = config
            .upstreams
            .iter()
            .map(|_| AtomicUsize::new(0))
            .collect();
        let max = config.limits.settings.max_tracked_clients;
        let route_limits = config
            .routes
            .iter()
            .map(|r| {
                Arc::new(limit::RouteLimits {
                    requests: r
                        .limits
                        .request_rate
                        .and_then(|rate| limit::ClientRate::new(rate, max)),
                })
            })
            .collect();
        let limits = match previous {
            Some(p) if p.config.limits.settings == config.limits.settings => p.limits.clone(),
            _ => Arc::new(Limits::new(config.limits.settings.clone())),
        };
        Live {
            generation: previous.map_or(1, |p| p.generation + 1),
            config,
            next_server,
            limits,
            route_limits,
        }
    }

    /// The server of an upstream to try first: round-robin.
    pub fn next_server(&self, upstream_index: usize) -> usize {
        self.next_server
            .get(upstream_index)
            .map_or(0, |c| c.fetch_add(1, Ordering::Relaxed))
    }
}

impl std::fmt::Debug for Live {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Live(generation {} of {})",
            self.generation,
            self.config.path.display()
        )
    }
}

/// State shared by every request of the proxy service.
pub struct Gateway {
    /// The configuration and what is built from it; swapped by reloads.
    live: Arc<ArcSwap<Live>>,
    /// Graceful shutdown signal and in-flight count.
    shutdown: Shutdown,
    /// Live stream hubs.
    registry: Arc<Registry>,
    /// Byte budget of all replay stores.
    budget: Arc<Budget>,
    /// Prometheus metrics.
    metrics: Arc<Metrics>,
    /// After a graceful upgrade: where the old process offers its streams' events.
    handover: Option<Arc<Source>>,
}

/// What one request carries between phases.
#[derive(Default)]
pub struct RequestCtx {
    /// The configuration this request runs under.
    live: Option<Arc<Live>>,
    /// The route chosen for the request.
    route: Option<Arc<Route>>,
    /// Facts about the client, computed once in the outer pass.
    client: Option<ClientInfo>,
    /// This is the inner pass (a subrequest made by the relay).
    inner: bool,
    /// Index of the upstream in the config, for round-robin.
    upstream_index: usize,
    /// First server index tried and how many were tried, to skip refusing servers.
    first_server: usize,
    /// Connection attempts made so far.
    tries: usize,
    /// When the outer pass started.
    started: Option<Instant>,
    /// What the relay did, for the access log.
    relay: Option<RelayStats>,
    /// Why the limits refused the request, if they did.
    refused: Option<limit::RefuseReason>,
    /// Counts this request as in flight for graceful shutdown.
    _active: Option<ActiveGuard>,
}

/// What the outer pass hands the inner one (a pingora subrequest).
#[derive(Clone)]
pub struct InnerRequest {
    /// Facts about the client and the route.
    pub client: ClientInfo,
    /// The request as prepared for the upstream, for a subrequest that would otherwise
    /// re-read the client's raw HTTP/1 bytes (see `relay::Subrequest::spawn`).
    pub request: Option<RequestHeader>,
}

/// Client facts passed from the outer pass to the inner one.
#[derive(Clone, Debug)]
pub struct ClientInfo {
    /// The peer's IP as text, appended to `X-Forwarded-For`.
    pub ip: Option<String>,
    /// The client's address as limits see it (trusted proxies resolved), for logs.
    pub client_ip: Option<std::net::IpAddr>,
    /// The client's limiting key.
    pub key: Option<ClientKey>,
    /// `https` or `http`, for `X-Forwarded-Proto` and the stream key.
    pub proto: &'static str,
    /// The request's host, normalised once: routing, the stream key and the upstream's
    /// `Host` all use this value. `None` only for an HTTP/1.0 request that names none.
    pub host: Option<String>,
    /// The peer is a trusted proxy: its forwarding headers are kept and appended to.
    pub trusted_peer: bool,
    /// The route chosen in the outer pass.
    pub route: Arc<Route>,
    /// Index of the route's upstream.
    pub upstream_index: usize,
    /// The configuration the request runs under.
    pub live: Arc<Live>,
}

impl Gateway {
    /// A gateway serving `config`.
    pub fn new(config: Arc<Config>, shutdown: Shutdown) -> prometheus::Result<Self> {
        let registry = Arc::new(
            Registry::new(config.replay.lag_blocks, config.replay.max_hubs)
                .with_client_cap(config.replay.max_hubs_per_client),
        );
        let budget = Budget::new(config.replay.total_max_bytes);
        Ok(Gateway {
            metrics: Metrics::new(registry.clone(), budget.clone())?,
            registry,
            budget,
            live: Arc::new(ArcSwap::from_pointee(Live::new(config, None))),
            shutdown,
            handover: None,
        })
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

    /// Replay context for a GET on a replay route: the stream key (see
    /// [`crate::key`]: built from the request as the upstream receives it, so call this
    /// after [`prepare_upstream_request`]) and the client's last event ID.
    fn replay_cx(&self, session: &Session, client: &ClientInfo) -> Option<ReplayCx> {
        let route = &client.route;
        let settings = &route.replay;
        let req = session.req_header();
        if !settings.enabled || req.method != http::Method::GET {
            return None;
        }
        let resume = resume_request(
            req.headers.get("last-event-id").map(|v| v.as_bytes()),
            req.uri.query().unwrap_or(""),
            settings.last_event_id_param.as_deref(),
        );
        let resource = key::Resource {
            route: route.name.clone(),
            upstream: route.upstream.name.clone(),
            method: req.method.as_str().to_owned(),
            scheme: client.proto,
            host: client.host.clone().unwrap_or_default(),
            path: req.uri.path().as_bytes().to_vec(),
            query: resume.query_key,
        };
        let identity = &settings.identity_headers;
        Some(ReplayCx {
            handover: self.handover.clone(),
            registry: self.registry.clone(),
            budget: self.budget.clone(),
            key: key::stream_key(&resource, identity, &req.headers),
            has_identity: key::has_identity(identity, &req.headers),
            resource,
            last_event_id: resume.last_event_id,
            settings: settings.clone(),
        })
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

    fn upstream_index(live: &Live, route: &Route) -> usize {
        live.config
            .upstreams
            .iter()
            .position(|u| Arc::ptr_eq(u, &route.upstream))
            .unwrap_or(0)
    }
}

/// Does the client say it wants an event stream?
pub fn accepts_event_stream(req: &RequestHeader) -> bool {
    req.headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|m| {
            m.split(';')
                .next()
                .is_some_and(|t| t.trim().eq_ignore_ascii_case("text/event-stream"))
        })
}

/// Hop-by-hop fields: they describe one connection, not the message. (pingora frames
/// bodies by `Transfer-Encoding`, so that one is handled where a body is written.)
pub const HOP_BY_HOP: [&str; 6] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
];

/// The field names a `Connection` header nominates as hop-by-hop, lowercased.
pub fn connection_nominated(headers: &http::HeaderMap) -> Vec<String> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty() && t != "close" && t != "keep-alive")
        .collect()
}

/// Removes the upstream connection's hop-by-hop fields from a response.
pub fn strip_hop_by_hop(resp: &mut ResponseHeader) {
    for name in connection_nominated(&resp.headers) {
        resp.remove_header(&name);
    }
    for name in HOP_BY_HOP {
        resp.remove_header(name);
    }
}

/// Headers that name the client or the original request to the upstream. Believed
/// only from trusted proxies; from anyone else they are dropped (the gateway then says
/// who the client is itself), so a client can neither pose as another address nor,
/// through `X-Forwarded-Host`, as another site.
const FORWARDING: [&str; 5] = [
    "x-forwarded-for",
    "forwarded",
    "x-real-ip",
    "x-forwarded-host",
    "x-forwarded-proto",
];

/// Turns the client's request into the one the upstream receives, once, before either
/// upstream path (pingora's or the stream client) copies it, so the stream key (built
/// from it) is what the upstream sees:
/// - `Host` is the one normalised host, and the target is in origin form;
/// - HTTP/2 cookie crumbs are one `Cookie` line, `; `-joined (RFC 9113 §8.2.3);
/// - forwarding headers: believed and appended to from a trusted proxy, replaced from
///   anyone else (`X-Forwarded-For` is the peer, `X-Forwarded-Proto` the scheme);
/// - a stream request asks for no compression (gzip does not flush per event; asking
///   for identity keeps mod_deflate and PHP's zlib output off);
/// - a GET on a shared route carries no identity (`Cookie`, `Authorization`, the
///   route's identity headers): what is shared is what an anonymous visitor gets.
pub fn prepare_upstream_request(req: &mut RequestHeader, client: &ClientInfo) -> Result<()> {
    if let Some(host) = &client.host {
        req.insert_header(header::HOST, host.as_str())?;
    }
    if target_authority(req).is_some() {
        // Origin form: the upstream learns the host from `Host` alone.
        let target = req.uri.path_and_query().map_or("/", |p| p.as_str());
        let uri = http::Uri::try_from(target)
            .map_err(|e| Error::because(ErrorType::InvalidHTTPHeader, "request target", e))?;
        req.set_uri(uri);
    }
    join_cookie_crumbs(req)?;
    let xff = if client.trusted_peer {
        let prev: Vec<&str> = req
            .headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .collect();
        let mut all = prev.join(", ");
        if let Some(ip) = &client.ip {
            if !all.is_empty() {
                all.push_str(", ");
            }
            all.push_str(ip);
        }
        all
    } else {
        for name in FORWARDING {
            req.remove_header(name);
        }
        client.ip.clone().unwrap_or_default()
    };
    if !xff.is_empty() {
        req.insert_header("x-forwarded-for", xff)?;
    }
    req.insert_header("x-forwarded-proto", client.proto)?;
    if accepts_event_stream(req) {
        req.remove_header(&header::ACCEPT_ENCODING);
    }
    let replay = &client.route.replay;
    if replay.enabled && replay.shared && req.method == http::Method::GET {
        req.remove_header(&header::COOKIE);
        req.remove_header(&header::AUTHORIZATION);
        for name in &replay.identity_headers {
            req.remove_header(name.as_str());
        }
    }
    Ok(())
}

/// HTTP/2 clients may split `Cookie` into one field per pair; an HTTP/1.1 upstream
/// (Apache joins repeated fields with `, `) and the stream key need the one line.
fn join_cookie_crumbs(req: &mut RequestHeader) -> Result<()> {
    if req.headers.get_all(header::COOKIE).iter().nth(1).is_none() {
        return Ok(());
    }
    let joined: Vec<u8> = req
        .headers
        .get_all(header::COOKIE)
        .iter()
        .map(http::HeaderValue::as_bytes)
        .collect::<Vec<_>>()
        .join(&b"; "[..]);
    let value = http::HeaderValue::from_bytes(&joined)
        .map_err(|e| Error::because(ErrorType::InvalidHTTPHeader, "cookie", e))?;
    req.insert_header(header::COOKIE, value)
}

/// The authority the request target names: HTTP/2's `:authority`, or an HTTP/1
/// absolute-form target (which pingora keeps verbatim beside a path-only URI).
fn target_authority(req: &RequestHeader) -> Option<String> {
    if let Some(a) = req.uri.authority() {
        return Some(a.as_str().to_owned());
    }
    let raw = req.raw_path();
    if raw.starts_with(b"/") || raw == b"*" {
        return None;
    }
    let uri = http::Uri::try_from(raw).ok()?;
    uri.authority().map(|a| a.as_str().to_owned())
}

/// The request's host, normalised once (see [`key::request_authority`]), or why it is
/// refused.
fn request_authority(req: &RequestHeader, https: bool) -> Result<Option<String>, BadHost> {
    let hosts: Vec<&http::HeaderValue> = req.headers.get_all(header::HOST).iter().collect();
    key::request_authority(
        target_authority(req).as_deref(),
        &hosts,
        https,
        req.version >= http::Version::HTTP_11,
    )
}

/// A request whose framing or host cannot be trusted: 400, and the connection closes
/// (what follows on it may be a body we never read).
async fn refuse_malformed(session: &mut Session, body: &'static str) -> Result<bool> {
    session.set_keepalive(None);
    respond_text(session, 400, body).await?;
    Ok(true)
}

/// RFC 9110 §8.6 lets a proxy take `Content-Length: 3, 3` as 3 or refuse it; pingora
/// and the two upstream paths would read it differently, so it is refused (as are two
/// `Content-Length` lines).
fn content_length_is_one_number(req: &RequestHeader) -> bool {
    let mut values = req.headers.get_all(header::CONTENT_LENGTH).iter();
    match (values.next(), values.next()) {
        (None, _) => true,
        (Some(v), None) => !v.is_empty() && v.as_bytes().iter().all(u8::is_ascii_digit),
        (Some(_), Some(_)) => false,
    }
}

async fn respond_text(session: &mut Session, status: u16, body: &'static str) -> Result<()> {
    let mut resp = ResponseHeader::build(status, Some(3))?;
    resp.insert_header(header::CONTENT_TYPE, "text/plain; charset=utf-8")?;
    resp.insert_header(header::CONTENT_LENGTH, body.len().to_string())?;
    resp.insert_header(header::CACHE_CONTROL, "no-store")?;
    session.write_response_header(Box::new(resp), false).await?;
    session
        .write_response_body(Some(Bytes::from_static(body.as_bytes())), true)
        .await
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx::default()
    }

    fn allow_spawning_subrequest(&self, session: &Session, _ctx: &RequestCtx) -> bool {
        // Only the outer pass spawns; the inner pass is the subrequest.
        session.subrequest_ctx.is_none()
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        if let Some(sub) = session.subrequest_ctx.as_ref() {
            // Inner pass: take the outer pass's decisions and go the ordinary path.
            let InnerRequest {
                client: info,
                request,
            } = sub
                .user_ctx()
                .and_then(|u| u.downcast_ref::<InnerRequest>())
                .cloned()
                .ok_or_else(|| {
                    Error::explain(ErrorType::InternalError, "subrequest without client info")
                })?;
            if let Some(mut prepared) = request {
                // The request as prepared for the upstream, with this pass's framing.
                let req = session.req_header();
                let keep_cl = req.headers.contains_key(header::CONTENT_LENGTH);
                let keep_te = req.headers.contains_key(header::TRANSFER_ENCODING);
                prepared.set_version(req.version);
                if !keep_cl {
                    prepared.remove_header(&header::CONTENT_LENGTH);
                }
                if !keep_te {
                    prepared.remove_header(&header::TRANSFER_ENCODING);
                }
                *session.req_header_mut() = prepared;
            }
            ctx.inner = true;
            ctx.live = Some(info.live.clone());
            ctx.upstream_index = info.upstream_index;
            ctx.route = Some(info.route.clone());
            ctx.client = Some(info);
            return Ok(false);
        }
        ctx.started = Some(Instant::now());
        ctx._active = Some(self.shutdown.track());

        let live = self.live.load_full();
        ctx.live = Some(live.clone());
        let https = session
            .digest()
            .and_then(|d| d.ssl_digest.as_ref())
            .is_some();
        let host = match request_authority(session.req_header(), https) {
            Ok(h) => h,
            Err(e) => {
                tracing::debug!("refused: {e}");
                return refuse_malformed(session, "400 Bad Request: bad or conflicting host\n")
                    .await;
            }
        };
        if !content_length_is_one_number(session.req_header()) {
            return refuse_malformed(session, "400 Bad Request: bad Content-Length\n").await;
        }
        let Some(route) = live
            .config
            .route_for(host.as_deref(), session.req_header().uri.path())
            .cloned()
        else {
            respond_text(session, 404, "404 Not Found: no route for this request\n").await?;
            return Ok(true);
        };
        let peer = session
            .client_addr()
            .and_then(PingoraAddr::as_inet)
            .map(|a| a.ip());
        let client_ip = self.client_ip(&live, session);
        let client = ClientInfo {
            ip: peer.map(|ip| ip.to_string()),
            trusted_peer: peer.is_some_and(|ip| live.config.limits.identity.is_trusted(ip)),
            proto: if https { "https" } else { "http" },
            host,
            upstream_index: Self::upstream_index(&live, &route),
            client_ip,
            key: client_ip.map(|ip| live.config.limits.identity.key(ip)),
            route: route.clone(),
            live: live.clone(),
        };
        // After the client's address is read from the forwarding headers it came with.
        prepare_upstream_request(session.req_header_mut(), &client)?;
        ctx.upstream_index = client.upstream_index;
        ctx.route = Some(route.clone());
        ctx.client = Some(client.clone());

        let wants_stream = accepts_event_stream(session.req_header());
        let refusal = relay::Refusal {
            as_event_stream: wants_stream
                && route.limits.refuse_streams_with == RefuseStreamsWith::EventStream,
            base_retry: live.config.limits.refusal_retry,
            jitter: live.config.limits.retry_jitter,
        };
        let mut slot = None;
        if let Some(key) = client.key {
            let route_limits = live
                .route_limits
                .get(route.index)
                .cloned()
                .unwrap_or_default();
            if let Decision::Refuse {
                reason,
                retry_after,
            } = live.limits.check_request(&key, &route_limits)
            {
                ctx.refused = Some(reason);
                relay::refuse(session, &refusal, reason, retry_after).await?;
                return Ok(true);
            }
            if wants_stream {
                // A stream request (EventSource always says so): admit it before the
                // upstream is bothered, so a reconnect storm never reaches the backend.
                match live.limits.open_stream(&key) {
                    Decision::Allow(s) => slot = Some(s),
                    Decision::Refuse {
                        reason,
                        retry_after,
                    } => {
                        ctx.refused = Some(reason);
                        relay::refuse(session, &refusal, reason, retry_after).await?;
                        return Ok(true);
                    }
                }
            }
        }

        if session.is_upgrade_req() {
            // WebSocket and other upgrades: pingora's ordinary path pipes them both ways.
            return Ok(false);
        }
        let admission = Admission {
            metrics: self.metrics.clone(),
            replay: self.replay_cx(session, &client),
            slot,
            limits: live.limits.clone(),
            refusal,
        };
        let stats = relay::serve(session, client, admission, self.shutdown.subscribe()).await;
        ctx.relay = Some(stats);
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

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        req: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        // The forwarding headers were set in the outer pass (`prepare_upstream_request`).
        if ctx.client.is_none() {
            return Ok(());
        }
        if session.get_header(header::HOST).is_none() {
            if let Some(host) = req.uri.authority().map(|a| a.to_string()) {
                req.insert_header(header::HOST, host)?;
            }
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if ctx.inner && resp.status != http::StatusCode::SWITCHING_PROTOCOLS {
            strip_hop_by_hop(resp);
        }
        Ok(())
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        _ctx: &mut RequestCtx,
    ) -> FailToProxy {
        let code = match e.etype() {
            ErrorType::HTTPStatus(code) => *code,
            ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout
                if e.esource() == &ErrorSource::Upstream =>
            {
                504
            }
            _ => match e.esource() {
                ErrorSource::Upstream => 502,
                ErrorSource::Downstream => match e.etype() {
                    ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed => 0,
                    _ => 400,
                },
                ErrorSource::Internal | ErrorSource::Unset => 500,
            },
        };
        if code > 0 {
            let body = match code {
                502 => "502 Bad Gateway: the upstream failed\n",
                504 => "504 Gateway Timeout: the upstream did not answer in time\n",
                400 => "400 Bad Request\n",
                _ => "the gateway could not complete this request\n",
            };
            if let Err(err) = respond_text(session, code, body).await {
                tracing::debug!("could not send the error response: {err}");
            }
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        if ctx.inner {
            return;
        }
        let req = session.req_header();
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        let ms = ctx.started.map_or(0, |s| s.elapsed().as_millis());
        let route = ctx.route.as_ref().map_or("-", |r| r.name.as_str());
        let client = ctx
            .client
            .as_ref()
            .and_then(|c| c.client_ip)
            .map_or_else(|| "-".to_owned(), |ip| ip.to_string());
        let (kind, events, heartbeats) = match &ctx.relay {
            Some(r) if r.stream => ("stream", r.events, r.heartbeats),
            _ => ("request", 0, 0),
        };
        let refused = ctx.refused.or(ctx.relay.as_ref().and_then(|r| r.refused));
        if let Some(reason) = refused {
            self.metrics
                .refusals
                .with_label_values(&[reason.as_str()])
                .inc();
        }
        self.metrics
            .requests
            .with_label_values(&[route, &status.to_string()])
            .inc();
        tracing::info!(
            target: "ssegate::access",
            client,
            method = %req.method,
            path = %req.uri,
            route,
            status,
            duration_ms = ms as u64,
            bytes = session.body_bytes_sent(),
            kind,
            events,
            heartbeats,
            replay = ctx.relay.as_ref().and_then(|r| r.replay),
            replay_miss = ctx.relay.as_ref().and_then(|r| r.miss),
            replayed = ctx.relay.as_ref().map_or(0, |r| r.replayed),
            refused = refused.map(|r| r.as_str()),
            error = e
                .map(|e| e.to_string())
                .or_else(|| ctx.relay.as_ref().and_then(|r| r.error.clone())),
        );
    }
}

/// Drops limiter state of clients idle long enough to be fresh again, so limiter
/// memory follows the active clients, not every address ever seen.
pub struct LimitPruner {
    /// The live limits (swapped by reloads).
    pub live: Arc<ArcSwap<Live>>,
    /// How often.
    pub every: std::time::Duration,
    /// Hub counters, reported alongside.
    pub registry: Arc<Registry>,
}

#[async_trait]
impl BackgroundService for LimitPruner {
    async fn start(&self, mut watch: ShutdownWatch) {
        let mut last = usize::MAX;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(self.every) => {}
                _ = watch.changed() => return,
            }
            let live = self.live.load();
            let tracked = live.limits.prune(&live.route_limits);
            if tracked != last {
                tracing::info!(
                    tracked,
                    open_streams = live.limits.open_streams(),
                    "limits pruned"
                );
                last = tracked;
            }
        }
    }
}

/// Bridges pingora's shutdown watch to [`Shutdown`], and exits the process once a
/// graceful shutdown has started and no request is left in flight (pingora alone would
/// sleep out the whole grace period).
///
/// On a graceful upgrade (SIGQUIT) it first offers the hubs to the new process (see
/// [`crate::handover`]) and keeps them, and the process, for a window after the streams
/// end: long enough for their clients to reconnect to the new process.
pub struct ShutdownBridge {
    /// The state streams watch.
    pub shutdown: Shutdown,
    /// pingora's execution phases, to tell an upgrade from a plain shutdown.
    pub phases: std::sync::Mutex<Option<tokio::sync::broadcast::Receiver<ExecutionPhase>>>,
    /// Where to offer the hubs on an upgrade.
    pub handover_path: std::path::PathBuf,
    /// Removed at exit unless a new process took it over.
    pub pid_file: Option<std::path::PathBuf>,
    /// The hubs to offer.
    pub registry: Arc<Registry>,
    /// For the window: the streams' reconnection delay and the grace period.
    pub live: Arc<ArcSwap<Live>>,
}

/// How long after its streams end an upgraded-away process keeps its hubs, beyond the
/// longest `retry:` it told clients to wait.
const HANDOVER_MARGIN: std::time::Duration = std::time::Duration::from_secs(5);

/// Resolves with the next execution phase; never, once there are no more.
async fn next_phase(
    rx: &mut Option<tokio::sync::broadcast::Receiver<ExecutionPhase>>,
) -> ExecutionPhase {
    if let Some(r) = rx {
        loop {
            match r.recv().await {
                Ok(p) => return p,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            }
        }
    }
    std::future::pending().await
}

impl ShutdownBridge {
    /// How long the old process keeps its hubs for the new one.
    fn handover_window(&self) -> std::time::Duration {
        let live = self.live.load();
        let config = &live.config;
        let retry = config
            .routes
            .iter()
            .map(|r| r.sse.shutdown_retry)
            .max()
            .unwrap_or_default();
        (retry + HANDOVER_MARGIN).min(config.server.grace_period)
    }
}

#[async_trait]
impl BackgroundService for ShutdownBridge {
    async fn start(&self, mut watch: ShutdownWatch) {
        let mut phases = self.phases.lock().ok().and_then(|mut p| p.take());
        let mut offer = None;
        loop {
            tokio::select! {
                biased;
                p = next_phase(&mut phases) => {
                    if matches!(p, ExecutionPhase::GracefulUpgradeTransferringFds) {
                        // Bound before the streams end, so it is there when their
                        // clients reach the new process.
                        match Offer::bind(&self.handover_path) {
                            Ok(o) => offer = Some(o),
                            Err(e) => tracing::warn!(
                                "upgrade: cannot offer the streams' events at {}: {e}",
                                self.handover_path.display()
                            ),
                        }
                    }
                }
                r = watch.wait_for(|v| *v) => {
                    if r.is_err() {
                        return;
                    }
                    break;
                }
            }
        }
        let mut keep_until = None;
        if let Some(offer) = offer {
            let window = self.handover_window();
            let until = tokio::time::Instant::now() + window;
            let holds = self.registry.hold_all();
            tracing::info!(
                hubs = holds.len(),
                window = ?window,
                "upgrade: offering streams to the new process"
            );
            tokio::spawn(offer.serve(self.registry.clone(), self.shutdown.clone(), until));
            tokio::spawn(async move {
                tokio::time::sleep_until(until).await;
                drop(holds);
            });
            keep_until = Some(until.into_std());
        }
        tracing::info!(
            active = self.shutdown.active(),
            "graceful shutdown: ending streams"
        );
        self.shutdown.begin();
        std::thread::spawn({
            let shutdown = self.shutdown.clone();
            let pid_file = self.pid_file.clone();
            move || loop {
                let kept = keep_until.is_some_and(|t| std::time::Instant::now() < t);
                if shutdown.active() == 0 && !kept {
                    tracing::info!("graceful shutdown: no request left, exiting");
                    if let Some(p) = &pid_file {
                        crate::server::remove_pid_file_if_ours(p);
                    }
                    std::process::exit(0);
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        });
    }
}
