//! Configuration: the TOML schema (serde), its defaults, and validation into the types the
//! rest of the gateway uses.
//!
//! Two layers, as in River: `file::*` mirrors the TOML exactly (`deny_unknown_fields`),
//! and [`Config`] holds checked values and never derives `Deserialize`. Every problem is
//! collected, each naming the file, line, column and key, before any socket is bound.
//! Knows nothing of pingora.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::limit::{ClientIdentity, LimitSettings, Rate};
use crate::tls::CertKey;

/// One problem found in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file it was found in.
    pub file: PathBuf,
    /// 1-based line, 0 when the problem has no place in the file.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
    /// The key, as a path such as `routes[2].upstream`.
    pub key: String,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.file.display())?;
        if self.line > 0 {
            write!(f, ":{}:{}", self.line, self.column)?;
        }
        if !self.key.is_empty() {
            write!(f, ": {}", self.key)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Every problem found in a config file.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl std::fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// A checked, ready-to-use configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where it was read from (for reloads and messages).
    pub path: PathBuf,
    /// Process-wide settings.
    pub server: Server,
    /// Sockets to accept clients on.
    pub listeners: Vec<Listener>,
    /// Backend pools, by index; routes refer to them by index.
    pub upstreams: Vec<Arc<Upstream>>,
    /// Routing table, in file order.
    pub routes: Vec<Arc<Route>>,
    /// Rate limits and stream caps.
    pub limits: Limits,
    /// Replay settings that are not per route.
    pub replay: ReplayGlobal,
}

/// Replay settings for the whole gateway.
#[derive(Debug, Clone)]
pub struct ReplayGlobal {
    /// Bytes all replay stores may hold together.
    pub total_max_bytes: usize,
    /// How many blocks a subscriber may fall behind before it is disconnected.
    pub lag_blocks: usize,
    /// Most hubs at once (live and lingering); past it, new streams are relayed
    /// directly, without replay.
    pub max_hubs: usize,
    /// Most hubs one client may have opened that are still alive (live and lingering);
    /// past it, its oldest lingering hub is closed first.
    pub max_hubs_per_client: usize,
}

/// Replay behaviour of one route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplaySettings {
    /// Record streams and resume them (GET streams only).
    pub enabled: bool,
    /// Streams are public: one upstream connection for every client of a key.
    pub shared: bool,
    /// How long a stream without clients keeps its upstream open and recording.
    pub linger: Duration,
    /// Per-stream bounds.
    pub bounds: crate::replay::RingBounds,
    /// Request headers that tell users apart (lowercase); part of the stream key.
    pub identity_headers: Vec<String>,
    /// A query parameter that also carries the last event ID, for clients that cannot
    /// set headers; it is left out of the stream key.
    pub last_event_id_param: Option<String>,
    /// Shared streams: a new client without `Last-Event-ID` starts with this many of
    /// the latest blocks.
    pub on_connect: usize,
    /// On a miss, also tell the client in-band with an `ssegate-replay-miss` event.
    pub miss_event: bool,
}

/// Rate limits, stream caps and how refusals are answered.
#[derive(Debug, Clone)]
pub struct Limits {
    /// How a client's address is found and grouped.
    pub identity: ClientIdentity,
    /// The limiter's numbers.
    pub settings: LimitSettings,
    /// Base `retry:` / `Retry-After` for refusals.
    pub refusal_retry: Duration,
    /// Random stretch of retry delays (0.5 = up to +50 %), so refused clients spread out.
    pub retry_jitter: f64,
    /// How often idle clients are dropped from the limiters.
    pub prune_interval: Duration,
}

/// How a refused stream request is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefuseStreamsWith {
    /// A 200 event stream carrying `retry:` that then ends: an `EventSource` reconnects
    /// later instead of giving up for good, as it would on a 429.
    EventStream,
    /// 429 with `Retry-After`.
    TooManyRequests,
}

/// Limits specific to one route.
#[derive(Debug, Clone)]
pub struct RouteLimits {
    /// Per-client request rate on this route, on top of the global one.
    pub request_rate: Option<Rate>,
    /// How refused stream requests on this route are answered.
    pub refuse_streams_with: RefuseStreamsWith,
}

/// Process-wide settings.
#[derive(Debug, Clone)]
pub struct Server {
    /// Worker threads for the proxy service.
    pub threads: usize,
    /// Longest time open requests get to finish after SIGTERM before they are cut.
    pub grace_period: Duration,
    /// `tracing` filter directive (overridden by `RUST_LOG`).
    pub log_level: String,
    /// Log lines as JSON objects instead of text.
    pub log_json: bool,
    /// Admin listener for `/metrics`, `/healthz`, `/readyz`; none when unset.
    pub admin: Option<SocketAddr>,
    /// pingora's PID file.
    pub pid_file: Option<PathBuf>,
    /// pingora's socket for handing listeners to a new process on upgrade.
    pub upgrade_sock: Option<PathBuf>,
    /// Most client connections open at once on the public listeners (0: no cap).
    pub max_connections: usize,
    /// Longest wait for a complete request header, idle keep-alive time included.
    pub request_header_timeout: Duration,
}

/// A socket clients connect to.
#[derive(Debug, Clone)]
pub struct Listener {
    /// `ip:port` to bind.
    pub address: SocketAddr,
    /// TLS (ALPN h2 and http/1.1) when set; else plaintext HTTP/1.1 plus h2c.
    pub tls: Option<ListenerTls>,
}

/// Certificate settings of a TLS listener.
#[derive(Debug, Clone)]
pub struct ListenerTls {
    /// PEM certificate chain path.
    pub cert_path: PathBuf,
    /// PEM private key path.
    pub key_path: PathBuf,
    /// The pair, loaded and checked to match.
    pub cert_key: Arc<CertKey>,
    /// More certificates, chosen by the name the client asks for (SNI); the one above
    /// serves every other name and clients that send none.
    pub sni: Vec<SniCert>,
}

impl ListenerTls {
    /// The certificates this listener serves, by name.
    pub fn cert_set(&self) -> crate::tls::CertSet {
        let mut by_name = std::collections::HashMap::new();
        for s in &self.sni {
            for n in &s.names {
                by_name.insert(n.clone(), s.cert_key.certified.clone());
            }
        }
        crate::tls::CertSet {
            default: self.cert_key.certified.clone(),
            by_name,
        }
    }
}

/// A certificate served to clients that ask for one of its names.
#[derive(Debug, Clone)]
pub struct SniCert {
    /// Host names, lowercase; each checked to be covered by the certificate.
    pub names: Vec<String>,
    /// The pair, loaded and checked to match.
    pub cert_key: Arc<CertKey>,
}

/// A pool of backend servers.
#[derive(Debug)]
pub struct Upstream {
    /// Name routes use to refer to it.
    pub name: String,
    /// Resolved server addresses, tried round-robin.
    pub servers: Vec<SocketAddr>,
    /// TCP connect timeout per server.
    pub connect_timeout: Duration,
    /// Longest wait for the response header before answering 504.
    pub response_timeout: Duration,
}

/// How streams on a route behave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseSettings {
    /// Silence toward the client after which a heartbeat comment is written.
    pub heartbeat_interval: Duration,
    /// Text of the heartbeat comment line.
    pub heartbeat_comment: String,
    /// Reconnection delay sent to clients when the gateway ends a stream on shutdown.
    pub shutdown_retry: Duration,
    /// Largest event block accepted from the upstream; a larger one ends the stream.
    pub max_event_bytes: usize,
    /// When set, the reconnection delay the gateway gives clients at stream start and
    /// after every upstream `retry:` (overriding it), stretched by `limits.retry_jitter`.
    pub retry: Option<Duration>,
    /// A write to a stream's client that does not complete within this long (a client
    /// that stopped reading) ends the stream.
    pub write_timeout: Duration,
}

/// One routing rule.
#[derive(Debug)]
pub struct Route {
    /// Name for logs (defaults to `routes[N]`).
    pub name: String,
    /// Exact host (lowercase, no port) or `None` for any host.
    pub host: Option<String>,
    /// Path prefix, always starting with `/`.
    pub path_prefix: String,
    /// The upstream this route sends to.
    pub upstream: Arc<Upstream>,
    /// Stream behaviour on this route.
    pub sse: SseSettings,
    /// Limits on this route.
    pub limits: RouteLimits,
    /// Replay on this route.
    pub replay: ReplaySettings,
    /// Position in `Config::routes`.
    pub index: usize,
}

impl ReplaySettings {
    /// The defaults documented in `conf/ssegate.toml`.
    pub fn defaults() -> ReplaySettings {
        ReplaySettings {
            enabled: true,
            shared: false,
            linger: Duration::from_secs(30),
            bounds: crate::replay::RingBounds {
                max_events: 1000,
                max_bytes: 1024 * 1024,
                max_age: Duration::from_secs(300),
            },
            identity_headers: vec!["cookie".into(), "authorization".into()],
            last_event_id_param: None,
            on_connect: 0,
            miss_event: false,
        }
    }
}

impl Config {
    /// Reads and checks `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        // A device or FIFO named by mistake would be read forever.
        let text = match std::fs::metadata(path) {
            Ok(m) if !m.is_file() => Err(std::io::Error::other("not a regular file")),
            Ok(m) if m.len() > 16 * 1024 * 1024 => Err(std::io::Error::other("larger than 16 MiB")),
            Ok(_) => std::fs::read_to_string(path),
            Err(e) => Err(e),
        };
        let text = text.map_err(|e| {
            ConfigErrors(vec![ConfigError {
                file: path.to_owned(),
                line: 0,
                column: 0,
                key: String::new(),
                message: format!("cannot read config file: {e}"),
            }])
        })?;
        Self::from_str(&text, path)
    }

    /// Checks the TOML `text`, naming `path` in errors and resolving relative file
    /// names against its directory.
    pub fn from_str(text: &str, path: &Path) -> Result<Config, ConfigErrors> {
        let mut cx = Checker {
            path,
            text,
            errors: vec![],
        };
        let raw: file::Root =
            match toml::Deserializer::parse(text).and_then(serde::Deserialize::deserialize) {
                Ok(r) => r,
                Err(e) => {
                    cx.error(e.span(), "", e.message().trim_end());
                    return Err(ConfigErrors(cx.errors));
                }
            };
        let cfg = cx.check(raw);
        if cx.errors.is_empty() {
            Ok(cfg)
        } else {
            Err(ConfigErrors(cx.errors))
        }
    }

    /// Picks the route for a request: routes naming the request's host first, then
    /// routes for any host; among those, the longest matching path prefix; among equal
    /// prefixes, the first in the file.
    pub fn route_for(&self, host: Option<&str>, path: &str) -> Option<&Arc<Route>> {
        let host = host.map(normalize_host);
        let best = |want_host: bool| {
            self.routes
                .iter()
                .filter(|r| match (&r.host, &host) {
                    (Some(rh), Some(h)) => want_host && rh == h,
                    (None, _) => !want_host,
                    (Some(_), None) => false,
                })
                .filter(|r| path.starts_with(&r.path_prefix))
                .fold(None::<&Arc<Route>>, |acc, r| match acc {
                    Some(a) if a.path_prefix.len() >= r.path_prefix.len() => Some(a),
                    _ => Some(r),
                })
        };
        best(true).or_else(|| best(false))
    }
}

/// Lowercases a host and drops a `:port` and trailing dots (keeping IPv6 brackets
/// intact), as [`crate::key::normalize_authority`] does for requests.
fn normalize_host(host: &str) -> String {
    crate::key::host_name(host)
        .trim_end_matches('.')
        .to_ascii_lowercase()
}

/// The longest duration any setting may have.
const MAX_DURATION: Duration = Duration::from_secs(366 * 24 * 3600);

/// Collects errors with their places while converting the file layer.
struct Checker<'a> {
    path: &'a Path,
    text: &'a str,
    errors: Vec<ConfigError>,
}

impl Checker<'_> {
    fn error(&mut self, span: Option<std::ops::Range<usize>>, key: &str, msg: &str) {
        let (line, column) = span.map_or((0, 0), |s| line_col(self.text, s.start));
        self.errors.push(ConfigError {
            file: self.path.to_owned(),
            line,
            column,
            key: key.to_owned(),
            message: msg.to_owned(),
        });
    }

    fn span_error<T>(&mut self, v: &toml::Spanned<T>, key: &str, msg: &str) {
        self.error(Some(v.span()), key, msg);
    }

    fn relative(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_owned()
        } else {
            self.path.parent().unwrap_or(Path::new(".")).join(p)
        }
    }

    /// Loads a certificate and its key, naming the field at fault on error.
    fn cert_key(
        &mut self,
        cert: &toml::Spanned<String>,
        key: &toml::Spanned<String>,
        base: &str,
    ) -> Option<CertKey> {
        match CertKey::load(
            &self.relative(cert.get_ref()),
            &self.relative(key.get_ref()),
        ) {
            Ok(ck) => Some(ck),
            Err(e) => {
                let (span, field) = if e.is_key_error() {
                    (key, "key")
                } else {
                    (cert, "cert")
                };
                self.span_error(span, &format!("{base}.{field}"), &e.to_string());
                None
            }
        }
    }

    fn duration(&mut self, v: &toml::Spanned<String>, key: &str) -> Duration {
        match humantime::parse_duration(v.get_ref()) {
            // Deadlines are computed as `now + d`: a duration of centuries would overflow.
            Ok(d) if d > MAX_DURATION => {
                self.span_error(v, key, "longer than a year: not a sensible setting");
                Duration::ZERO
            }
            Ok(d) => d,
            Err(e) => {
                self.span_error(v, key, &format!("not a duration such as \"15s\": {e}"));
                Duration::ZERO
            }
        }
    }

    fn check(&mut self, raw: file::Root) -> Config {
        let server = Server {
            threads: raw.server.threads.unwrap_or(2).max(1),
            grace_period: raw
                .server
                .grace_period
                .as_ref()
                .map_or(Duration::from_secs(30), |v| {
                    self.duration(v, "server.grace_period")
                }),
            log_level: raw.server.log_level.unwrap_or_else(|| "info".into()),
            log_json: match raw.server.log_format.as_ref() {
                None => false,
                Some(v) => match v.get_ref().as_str() {
                    "text" => false,
                    "json" => true,
                    _ => {
                        self.span_error(v, "server.log_format", "must be \"text\" or \"json\"");
                        false
                    }
                },
            },
            admin: match raw.server.admin_address.as_ref() {
                None => None,
                Some(v) => match v.get_ref().parse::<SocketAddr>() {
                    Ok(a) => Some(a),
                    Err(_) => {
                        self.span_error(v, "server.admin_address", "not an ip:port address");
                        None
                    }
                },
            },
            pid_file: raw.server.pid_file.map(|p| self.relative(&p)),
            upgrade_sock: raw.server.upgrade_sock.map(|p| self.relative(&p)),
            max_connections: raw.server.max_connections.unwrap_or(10_000),
            request_header_timeout: match raw.server.request_header_timeout.as_ref() {
                None => Duration::from_secs(30),
                Some(v) => {
                    let d = self.duration(v, "server.request_header_timeout");
                    if d.is_zero() {
                        self.span_error(v, "server.request_header_timeout", "must be more than 0s");
                    }
                    d
                }
            },
        };
        if raw.listeners.is_empty() {
            self.error(None, "listeners", "at least one [[listeners]] is required");
        }
        let mut listeners = vec![];
        for (i, l) in raw.listeners.iter().enumerate() {
            let key = format!("listeners[{i}].address");
            let address = match l.address.get_ref().parse::<SocketAddr>() {
                Ok(a) => a,
                Err(_) => {
                    self.span_error(&l.address, &key, "not an ip:port address");
                    continue;
                }
            };
            let tls = match &l.tls {
                None => None,
                Some(t) => {
                    let base = format!("listeners[{i}].tls");
                    let default = self.cert_key(&t.cert, &t.key, &base);
                    let mut sni = vec![];
                    for (j, extra) in t.sni.iter().flatten().enumerate() {
                        let base = format!("{base}.sni[{j}]");
                        let Some(ck) = self.cert_key(&extra.cert, &extra.key, &base) else {
                            continue;
                        };
                        let mut names = vec![];
                        for name in extra.names.get_ref() {
                            match crate::tls::check_name(&ck, name) {
                                Ok(n) => names.push(n),
                                Err(e) => {
                                    self.span_error(&extra.names, &format!("{base}.names"), &e)
                                }
                            }
                        }
                        if extra.names.get_ref().is_empty() {
                            self.span_error(
                                &extra.names,
                                &format!("{base}.names"),
                                "at least one host name is required",
                            );
                        }
                        sni.push(SniCert {
                            names,
                            cert_key: Arc::new(ck),
                        });
                    }
                    default.map(|ck| ListenerTls {
                        cert_path: self.relative(t.cert.get_ref()),
                        key_path: self.relative(t.key.get_ref()),
                        cert_key: Arc::new(ck),
                        sni,
                    })
                }
            };
            listeners.push(Listener { address, tls });
        }

        let global_sse = self.sse(raw.sse.as_ref(), "sse", None);
        let limits = self.limits(raw.limits.as_ref());
        let global_replay = self.replay(raw.replay.as_ref(), "replay", &ReplaySettings::defaults());
        let gateway_wide = |f: fn(&file::Replay) -> Option<&toml::Spanned<usize>>| {
            raw.replay.as_ref().and_then(f).map(|v| *v.get_ref())
        };
        let replay_global = ReplayGlobal {
            total_max_bytes: gateway_wide(|r| r.total_max_bytes.as_ref())
                .unwrap_or(256 * 1024 * 1024),
            // Each hub's broadcast ring holds this many slots from the start (about
            // 90 bytes each), so it is a cost per stream, not only per slow client.
            lag_blocks: gateway_wide(|r| r.lag_blocks.as_ref())
                .unwrap_or(128)
                .max(1),
            max_hubs: gateway_wide(|r| r.max_hubs.as_ref()).unwrap_or(10_000),
            max_hubs_per_client: gateway_wide(|r| r.max_hubs_per_client.as_ref())
                .unwrap_or(16)
                .max(1),
        };
        let refuse_default = match raw
            .limits
            .as_ref()
            .and_then(|l| l.refuse_streams_with.as_ref())
        {
            Some(v) => self.refuse_mode(v, "limits.refuse_streams_with"),
            None => RefuseStreamsWith::EventStream,
        };

        let mut upstreams: Vec<Arc<Upstream>> = vec![];
        for (i, u) in raw.upstreams.iter().enumerate() {
            let base = format!("upstreams[{i}]");
            if upstreams.iter().any(|x| x.name == *u.name.get_ref()) {
                self.span_error(&u.name, &format!("{base}.name"), "duplicate upstream name");
            }
            if u.servers.is_empty() {
                self.error(
                    None,
                    &format!("{base}.servers"),
                    "at least one server is required",
                );
            }
            let mut servers = vec![];
            for (j, s) in u.servers.iter().enumerate() {
                match s.get_ref().to_socket_addrs() {
                    Ok(mut addrs) => match addrs.next() {
                        Some(a) => servers.push(a),
                        None => self.span_error(
                            s,
                            &format!("{base}.servers[{j}]"),
                            "resolves to no address",
                        ),
                    },
                    Err(e) => self.span_error(
                        s,
                        &format!("{base}.servers[{j}]"),
                        &format!("not a host:port address: {e}"),
                    ),
                }
            }
            let connect_timeout = u
                .connect_timeout
                .as_ref()
                .map_or(Duration::from_secs(3), |v| {
                    self.duration(v, &format!("{base}.connect_timeout"))
                });
            let response_timeout = u
                .response_timeout
                .as_ref()
                .map_or(Duration::from_secs(60), |v| {
                    self.duration(v, &format!("{base}.response_timeout"))
                });
            upstreams.push(Arc::new(Upstream {
                name: u.name.get_ref().clone(),
                servers,
                connect_timeout,
                response_timeout,
            }));
        }

        if raw.routes.is_empty() {
            self.error(None, "routes", "at least one [[routes]] is required");
        }
        let mut routes = vec![];
        for (i, r) in raw.routes.iter().enumerate() {
            let base = format!("routes[{i}]");
            let path_prefix = r
                .path_prefix
                .as_ref()
                .map_or("/".to_owned(), |p| p.get_ref().clone());
            if !path_prefix.starts_with('/') {
                if let Some(p) = &r.path_prefix {
                    self.span_error(p, &format!("{base}.path_prefix"), "must start with '/'");
                }
            }
            let sse = self.sse(r.sse.as_ref(), &format!("{base}.sse"), Some(&global_sse));
            let route_limits = match &r.limits {
                None => RouteLimits {
                    request_rate: None,
                    refuse_streams_with: refuse_default,
                },
                Some(l) => RouteLimits {
                    request_rate: self.rate(
                        l.request_rate.as_ref(),
                        l.request_burst.as_ref(),
                        None,
                        &format!("{base}.limits.request_rate"),
                    ),
                    refuse_streams_with: match &l.refuse_streams_with {
                        Some(v) => {
                            self.refuse_mode(v, &format!("{base}.limits.refuse_streams_with"))
                        }
                        None => refuse_default,
                    },
                },
            };
            let upstream = match upstreams.iter().find(|u| u.name == *r.upstream.get_ref()) {
                Some(u) => u.clone(),
                None => {
                    self.span_error(
                        &r.upstream,
                        &format!("{base}.upstream"),
                        "no upstream has this name",
                    );
                    continue;
                }
            };
            let replay = self.replay(r.replay.as_ref(), &format!("{base}.replay"), &global_replay);
            routes.push(Arc::new(Route {
                replay,
                index: routes.len(),
                limits: route_limits,
                name: r.name.clone().unwrap_or_else(|| base.clone()),
                host: r.host.as_deref().map(normalize_host),
                path_prefix,
                upstream,
                sse,
            }));
        }
        Config {
            path: self.path.to_owned(),
            server,
            listeners,
            upstreams,
            routes,
            limits,
            replay: replay_global,
        }
    }

    fn replay(
        &mut self,
        own: Option<&file::Replay>,
        base: &str,
        parent: &ReplaySettings,
    ) -> ReplaySettings {
        let Some(own) = own else {
            return parent.clone();
        };
        if base != "replay" {
            for (name, v) in [
                ("total_max_bytes", &own.total_max_bytes),
                ("lag_blocks", &own.lag_blocks),
                ("max_hubs", &own.max_hubs),
                ("max_hubs_per_client", &own.max_hubs_per_client),
            ] {
                if let Some(v) = v {
                    self.span_error(
                        v,
                        &format!("{base}.{name}"),
                        "gateway-wide: set it in [replay]",
                    );
                }
            }
        }
        let mut r = parent.clone();
        if let Some(v) = own.enabled {
            r.enabled = v;
        }
        if let Some(v) = own.shared {
            r.shared = v;
        }
        if let Some(v) = &own.linger {
            r.linger = self.duration(v, &format!("{base}.linger"));
        }
        if let Some(v) = own.max_events {
            r.bounds.max_events = v;
        }
        if let Some(v) = own.max_bytes {
            r.bounds.max_bytes = v;
        }
        if let Some(v) = &own.max_age {
            r.bounds.max_age = self.duration(v, &format!("{base}.max_age"));
        }
        if let Some(v) = &own.identity_headers {
            r.identity_headers = v.iter().map(|h| h.to_ascii_lowercase()).collect();
        }
        if let Some(v) = &own.last_event_id_param {
            r.last_event_id_param = (!v.is_empty()).then(|| v.clone());
        }
        if let Some(v) = own.on_connect {
            r.on_connect = v;
        }
        if let Some(v) = own.miss_event {
            r.miss_event = v;
        }
        r
    }
    fn refuse_mode(&mut self, v: &toml::Spanned<String>, key: &str) -> RefuseStreamsWith {
        match v.get_ref().as_str() {
            "event-stream" => RefuseStreamsWith::EventStream,
            "429" => RefuseStreamsWith::TooManyRequests,
            _ => {
                self.span_error(v, key, "must be \"event-stream\" or \"429\"");
                RefuseStreamsWith::EventStream
            }
        }
    }

    /// A rate from `rate` (per second, 0 = off) and `burst`, with defaults.
    fn rate(
        &mut self,
        rate: Option<&toml::Spanned<f64>>,
        burst: Option<&toml::Spanned<u32>>,
        default: Option<(f64, u32)>,
        key: &str,
    ) -> Option<Rate> {
        let per_second = match rate {
            Some(r) if !r.get_ref().is_finite() || *r.get_ref() < 0.0 => {
                self.span_error(
                    r,
                    key,
                    "must be a number of requests per second, 0 to turn off",
                );
                return None;
            }
            Some(r) => *r.get_ref(),
            None => default?.0,
        };
        if per_second == 0.0 {
            return None;
        }
        let burst_key = key.replace("_rate", "_burst");
        let burst = match burst {
            Some(b) => match std::num::NonZeroU32::new(*b.get_ref()) {
                Some(n) => n,
                None => {
                    self.span_error(b, &burst_key, "must be at least 1");
                    return None;
                }
            },
            None => {
                std::num::NonZeroU32::new(default.map_or(per_second.ceil() as u32, |d| d.1).max(1))?
            }
        };
        Some(Rate { per_second, burst })
    }

    fn limits(&mut self, raw: Option<&file::Limits>) -> Limits {
        let empty = file::Limits::default();
        let l = raw.unwrap_or(&empty);
        let mut trusted_proxies = vec![];
        for (i, n) in l.trusted_proxies.iter().enumerate() {
            let text = n.get_ref();
            // A bare address means that one host.
            let parsed = text
                .parse::<ipnet::IpNet>()
                .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from));
            match parsed {
                Ok(net) => trusted_proxies.push(net),
                Err(_) => self.span_error(
                    n,
                    &format!("limits.trusted_proxies[{i}]"),
                    "not an address or network such as \"10.0.0.0/8\"",
                ),
            }
        }
        let ipv6_prefix = match &l.ipv6_prefix {
            Some(p) if *p.get_ref() > 128 => {
                self.span_error(p, "limits.ipv6_prefix", "must be 0 to 128");
                64
            }
            Some(p) => *p.get_ref(),
            None => 64,
        };
        let settings = LimitSettings {
            request_rate: self.rate(
                l.request_rate.as_ref(),
                l.request_burst.as_ref(),
                Some((50.0, 100)),
                "limits.request_rate",
            ),
            stream_connect_rate: self.rate(
                l.stream_connect_rate.as_ref(),
                l.stream_connect_burst.as_ref(),
                Some((2.0, 20)),
                "limits.stream_connect_rate",
            ),
            max_streams_per_client: l.max_streams_per_client.unwrap_or(64),
            max_streams: l.max_streams.unwrap_or(10_000),
            max_tracked_clients: match &l.max_tracked_clients {
                Some(v) if *v.get_ref() == 0 => {
                    self.span_error(v, "limits.max_tracked_clients", "must be at least 1");
                    1
                }
                Some(v) => *v.get_ref(),
                None => 100_000,
            },
        };
        let refusal_retry = l
            .refusal_retry
            .as_ref()
            .map_or(Duration::from_secs(5), |v| {
                self.duration(v, "limits.refusal_retry")
            });
        let retry_jitter = match &l.retry_jitter {
            Some(v) if !(0.0..=10.0).contains(v.get_ref()) => {
                self.span_error(v, "limits.retry_jitter", "must be between 0 and 10");
                0.5
            }
            Some(v) => *v.get_ref(),
            None => 0.5,
        };
        let prune_interval = l
            .prune_interval
            .as_ref()
            .map_or(Duration::from_secs(10), |v| {
                self.duration(v, "limits.prune_interval")
            });
        Limits {
            identity: ClientIdentity {
                trusted_proxies,
                ipv6_prefix,
            },
            settings,
            refusal_retry,
            retry_jitter,
            prune_interval: prune_interval.max(Duration::from_millis(100)),
        }
    }

    /// Builds stream settings from `own` (a route's `[sse]` or the global one), falling
    /// back to `parent` for keys it leaves out.
    fn sse(
        &mut self,
        own: Option<&file::Sse>,
        base: &str,
        parent: Option<&SseSettings>,
    ) -> SseSettings {
        let defaults = SseSettings {
            heartbeat_interval: Duration::from_secs(15),
            heartbeat_comment: "heartbeat".into(),
            shutdown_retry: Duration::from_millis(1000),
            max_event_bytes: crate::sse::DEFAULT_MAX_EVENT_BYTES,
            retry: None,
            write_timeout: Duration::from_secs(30),
        };
        let parent = parent.unwrap_or(&defaults);
        let Some(own) = own else {
            return parent.clone();
        };
        let heartbeat_interval = match &own.heartbeat_interval {
            Some(v) => {
                let d = self.duration(v, &format!("{base}.heartbeat_interval"));
                if d < Duration::from_millis(10) {
                    self.span_error(
                        v,
                        &format!("{base}.heartbeat_interval"),
                        "must be at least 10ms",
                    );
                }
                d
            }
            None => parent.heartbeat_interval,
        };
        let heartbeat_comment = match &own.heartbeat_comment {
            Some(v) => {
                if v.get_ref().contains(['\r', '\n']) {
                    self.span_error(v, &format!("{base}.heartbeat_comment"), "must be one line");
                }
                v.get_ref().clone()
            }
            None => parent.heartbeat_comment.clone(),
        };
        let shutdown_retry = match &own.shutdown_retry {
            Some(v) => self.duration(v, &format!("{base}.shutdown_retry")),
            None => parent.shutdown_retry,
        };
        let max_event_bytes = match &own.max_event_bytes {
            Some(v) if *v.get_ref() < 64 => {
                self.span_error(v, &format!("{base}.max_event_bytes"), "must be at least 64");
                parent.max_event_bytes
            }
            Some(v) => *v.get_ref(),
            None => parent.max_event_bytes,
        };
        let retry = match &own.retry {
            Some(v) => Some(self.duration(v, &format!("{base}.retry"))),
            None => parent.retry,
        };
        let write_timeout = match &own.write_timeout {
            Some(v) => self.duration(v, &format!("{base}.write_timeout")),
            None => parent.write_timeout,
        };
        SseSettings {
            heartbeat_interval,
            heartbeat_comment,
            shutdown_retry,
            max_event_bytes,
            retry,
            write_timeout,
        }
    }
}

/// 1-based line and column of byte `offset` in `text`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text.as_bytes()[..offset.min(text.len())];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let col = before.iter().rev().take_while(|&&b| b != b'\n').count() + 1;
    (line, col)
}

/// The file layer: exactly what the TOML may contain.
mod file {
    use serde::Deserialize;
    use toml::Spanned;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Root {
        #[serde(default)]
        pub server: ServerSection,
        #[serde(default)]
        pub listeners: Vec<Listener>,
        pub sse: Option<Sse>,
        #[serde(default)]
        pub upstreams: Vec<Upstream>,
        #[serde(default)]
        pub routes: Vec<Route>,
        pub limits: Option<Limits>,
        pub replay: Option<Replay>,
    }

    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Replay {
        pub enabled: Option<bool>,
        pub shared: Option<bool>,
        pub linger: Option<Spanned<String>>,
        pub max_events: Option<usize>,
        pub max_bytes: Option<usize>,
        pub max_age: Option<Spanned<String>>,
        pub identity_headers: Option<Vec<String>>,
        pub last_event_id_param: Option<String>,
        pub on_connect: Option<usize>,
        pub miss_event: Option<bool>,
        // Gateway-wide: accepted in `[replay]` only (a route that sets them is an error).
        pub total_max_bytes: Option<Spanned<usize>>,
        pub lag_blocks: Option<Spanned<usize>>,
        pub max_hubs: Option<Spanned<usize>>,
        pub max_hubs_per_client: Option<Spanned<usize>>,
    }

    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Limits {
        #[serde(default)]
        pub trusted_proxies: Vec<Spanned<String>>,
        pub ipv6_prefix: Option<Spanned<u8>>,
        pub request_rate: Option<Spanned<f64>>,
        pub request_burst: Option<Spanned<u32>>,
        pub stream_connect_rate: Option<Spanned<f64>>,
        pub stream_connect_burst: Option<Spanned<u32>>,
        pub max_streams_per_client: Option<u32>,
        pub max_streams: Option<usize>,
        pub max_tracked_clients: Option<Spanned<usize>>,
        pub refuse_streams_with: Option<Spanned<String>>,
        pub refusal_retry: Option<Spanned<String>>,
        pub retry_jitter: Option<Spanned<f64>>,
        pub prune_interval: Option<Spanned<String>>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct RouteLimits {
        pub request_rate: Option<Spanned<f64>>,
        pub request_burst: Option<Spanned<u32>>,
        pub refuse_streams_with: Option<Spanned<String>>,
    }

    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct ServerSection {
        pub threads: Option<usize>,
        pub grace_period: Option<Spanned<String>>,
        pub log_level: Option<String>,
        pub log_format: Option<Spanned<String>>,
        pub admin_address: Option<Spanned<String>>,
        pub pid_file: Option<String>,
        pub upgrade_sock: Option<String>,
        pub max_connections: Option<usize>,
        pub request_header_timeout: Option<Spanned<String>>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Listener {
        pub address: Spanned<String>,
        pub tls: Option<Tls>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Tls {
        pub cert: Spanned<String>,
        pub key: Spanned<String>,
        pub sni: Option<Vec<Sni>>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Sni {
        pub names: Spanned<Vec<String>>,
        pub cert: Spanned<String>,
        pub key: Spanned<String>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Sse {
        pub heartbeat_interval: Option<Spanned<String>>,
        pub heartbeat_comment: Option<Spanned<String>>,
        pub shutdown_retry: Option<Spanned<String>>,
        pub max_event_bytes: Option<Spanned<usize>>,
        pub retry: Option<Spanned<String>>,
        pub write_timeout: Option<Spanned<String>>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Upstream {
        pub name: Spanned<String>,
        #[serde(default)]
        pub servers: Vec<Spanned<String>>,
        pub connect_timeout: Option<Spanned<String>>,
        pub response_timeout: Option<Spanned<String>>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Route {
        pub name: Option<String>,
        pub host: Option<String>,
        pub path_prefix: Option<Spanned<String>>,
        pub upstream: Spanned<String>,
        pub sse: Option<Sse>,
        pub limits: Option<RouteLimits>,
        pub replay: Option<Replay>,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = r#"
[[listeners]]
address = "127.0.0.1:0"

[[upstreams]]
name = "php"
servers = ["127.0.0.1:9"]

[[routes]]
upstream = "php"
"#;

    fn load(s: &str) -> Result<Config, ConfigErrors> {
        Config::from_str(s, Path::new("/etc/ssegate/test.toml"))
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = load(MIN).unwrap();
        assert_eq!(c.routes[0].sse.heartbeat_interval, Duration::from_secs(15));
        assert_eq!(c.routes[0].path_prefix, "/");
        assert_eq!(c.upstreams[0].connect_timeout, Duration::from_secs(3));
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let e = load(&format!("{MIN}\n[server]\nthreads = 2\nbogus = 1\n")).unwrap_err();
        let msg = e.to_string();
        assert!(msg.starts_with("/etc/ssegate/test.toml:14:1"), "{msg}");
        assert!(msg.contains("bogus"), "{msg}");
    }

    #[test]
    fn malformed_toml_is_located() {
        let e = load("[[listeners]]\naddress = \n").unwrap_err();
        assert_eq!(e.0[0].line, 2, "{e}");
    }

    #[test]
    fn all_semantic_errors_are_collected() {
        let e = load(
            r#"
[[listeners]]
address = "nope"

[[upstreams]]
name = "php"
servers = ["127.0.0.1:9"]
connect_timeout = "soon"

[[routes]]
upstream = "missing"
"#,
        )
        .unwrap_err();
        let keys: Vec<_> = e.0.iter().map(|e| (e.key.as_str(), e.line)).collect();
        assert_eq!(
            keys,
            [
                ("listeners[0].address", 3),
                ("upstreams[0].connect_timeout", 8),
                ("routes[0].upstream", 11)
            ]
        );
    }

    #[test]
    fn missing_cert_file_is_an_error_on_the_cert_key() {
        let e = load(&format!(
            "{MIN}\n[[listeners]]\naddress = \"127.0.0.1:0\"\ntls = {{ cert = \"/nonexistent.pem\", key = \"/nonexistent.key\" }}\n"
        ))
        .unwrap_err();
        assert_eq!(e.0[0].key, "listeners[1].tls.cert", "{e}");
        assert!(e.0[0].message.contains("/nonexistent.pem"), "{e}");
    }

    #[test]
    fn route_sse_overrides_global() {
        let c = load(&format!(
            "{MIN}sse = {{ heartbeat_interval = \"2s\" }}\n[sse]\nheartbeat_comment = \"hb\"\n"
        ))
        .unwrap();
        assert_eq!(c.routes[0].sse.heartbeat_interval, Duration::from_secs(2));
        assert_eq!(c.routes[0].sse.heartbeat_comment, "hb");
    }

    #[test]
    fn gateway_wide_replay_keys_are_refused_on_routes() {
        let c = load(&format!(
            "{MIN}replay = {{ shared = true }}\n[replay]\nlag_blocks = 7\n"
        ))
        .unwrap();
        assert_eq!(c.replay.lag_blocks, 7);
        assert!(c.routes[0].replay.shared);
        let e = load(&format!("{MIN}replay = {{ lag_blocks = 7 }}\n")).unwrap_err();
        assert_eq!(e.0[0].key, "routes[0].replay.lag_blocks", "{e}");
    }

    #[test]
    fn routing_prefers_host_then_longest_prefix() {
        let c = load(
            r#"
[[listeners]]
address = "127.0.0.1:0"
[[upstreams]]
name = "a"
servers = ["127.0.0.1:9"]
[[routes]]
name = "any"
upstream = "a"
[[routes]]
name = "any-api"
path_prefix = "/api"
upstream = "a"
[[routes]]
name = "host"
host = "Example.com"
upstream = "a"
"#,
        )
        .unwrap();
        let r = |h: Option<&str>, p| c.route_for(h, p).map(|r| r.name.clone());
        assert_eq!(
            r(Some("example.com:8080"), "/api/x").as_deref(),
            Some("host")
        );
        assert_eq!(r(Some("other"), "/api/x").as_deref(), Some("any-api"));
        assert_eq!(r(None, "/x").as_deref(), Some("any"));
    }
}
