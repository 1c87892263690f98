//! Configuration: the TOML schema (serde), its defaults, and validation into the types the
//! rest of the gateway uses.
//!
//! Two layers, as in River: `file::*` mirrors the TOML exactly (`deny_unknown_fields`),
//! and [`Config`] holds checked values and never derives `Deserialize`. Every problem is
//! collected, each naming the file, line, column and key, before any socket is bound.
//! Knows nothing of pingora.

mod check;
mod cluster;
mod file;
mod sections;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::limit::{ClientIdentity, LimitSettings, Rate};
use crate::tls::CertKey;
use check::Checker;

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
    /// Several nodes sharing replay history through Redis; `None`: this node alone.
    pub cluster: Option<Cluster>,
}

/// `[cluster]`: the shared history, leases and live feed between nodes, in Redis.
#[derive(Clone)]
pub struct Cluster {
    /// `redis://` or `rediss://` URL (user and password may be in it).
    pub redis: String,
    /// The password, when it comes from an environment variable or a file.
    pub password: Option<String>,
    /// This node's name in leases and logs.
    pub node_id: String,
    /// Key names in Redis are an HMAC of the stream key under this secret (the same on
    /// every node), so no cookie or token value ever appears in Redis.
    pub key_secret: Vec<u8>,
    /// How long a reader's lease lasts unrenewed: the bound on a failover.
    pub lease: Duration,
    /// Longest any Redis call may take before the node goes on without it.
    pub timeout: Duration,
    /// Prefix of every key name.
    pub prefix: String,
}

// Never print the secret or the password (logs, `-t` output).
impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("redis", &cluster::redact_url(&self.redis))
            .field("node_id", &self.node_id)
            .field("lease", &self.lease)
            .field("timeout", &self.timeout)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// Default lease: a dead reader is replaced within about this plus a third.
    pub const LEASE: Duration = Duration::from_secs(6);
    /// Default Redis call timeout.
    pub const TIMEOUT: Duration = Duration::from_millis(250);
    /// Default key prefix.
    pub const PREFIX: &'static str = "ssegate";
}

/// Replay settings for the whole gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
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
#[derive(Debug, Clone, PartialEq)]
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
    /// A query parameter that carries a bearer token (an `EventSource` cannot set
    /// headers): moved into `Authorization: Bearer …` for the upstream, and out of the
    /// path the upstream sees, the access log and the stream key's query.
    pub token_param: Option<String>,
    /// Position in `Config::routes`.
    pub index: usize,
}

// The defaults: one place each, stated again (and checked against, see the tests) in
// `conf/ssegate.toml`.

impl Default for Server {
    fn default() -> Server {
        Server {
            threads: 2,
            grace_period: Duration::from_secs(30),
            log_level: "info".into(),
            log_json: false,
            admin: None,
            pid_file: None,
            upgrade_sock: None,
            max_connections: 10_000,
            request_header_timeout: Duration::from_secs(30),
        }
    }
}

impl Default for SseSettings {
    fn default() -> SseSettings {
        SseSettings {
            heartbeat_interval: Duration::from_secs(15),
            heartbeat_comment: "heartbeat".into(),
            shutdown_retry: Duration::from_millis(1000),
            max_event_bytes: crate::sse::DEFAULT_MAX_EVENT_BYTES,
            retry: None,
            write_timeout: Duration::from_secs(30),
        }
    }
}

impl Default for ReplaySettings {
    fn default() -> ReplaySettings {
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

impl Default for ReplayGlobal {
    fn default() -> ReplayGlobal {
        ReplayGlobal {
            total_max_bytes: 256 * 1024 * 1024,
            // Each hub's broadcast ring holds this many slots from the start (about 90
            // bytes each), so it is a cost per stream, not only per slow client.
            lag_blocks: 128,
            max_hubs: 10_000,
            max_hubs_per_client: 16,
        }
    }
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            identity: ClientIdentity {
                trusted_proxies: Vec::new(),
                ipv6_prefix: 64,
            },
            settings: LimitSettings {
                request_rate: Rate::new(50.0, 100),
                stream_connect_rate: Rate::new(2.0, 20),
                max_streams_per_client: 64,
                max_streams: 10_000,
                max_tracked_clients: 100_000,
            },
            refusal_retry: Duration::from_secs(5),
            retry_jitter: 0.5,
            prune_interval: Duration::from_secs(10),
        }
    }
}

impl Upstream {
    /// Default `connect_timeout`.
    pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
    /// Default `response_timeout`.
    pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);
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
    fn a_token_param_must_be_a_name_and_part_of_the_identity() {
        let c = load(&format!("{MIN}token_param = \"access_token\"\n")).unwrap();
        assert_eq!(c.routes[0].token_param.as_deref(), Some("access_token"));
        for (extra, why) in [
            ("token_param = \"\"\n", "non-empty name"),
            ("token_param = \"a=b\"\n", "non-empty name"),
            (
                "token_param = \"t\"\nreplay = { last_event_id_param = \"t\" }\n",
                "last_event_id_param",
            ),
            (
                "token_param = \"t\"\nreplay = { identity_headers = [\"cookie\"] }\n",
                "authorization",
            ),
            (
                "token_param = \"t\"\nreplay = { shared = true }\n",
                "shared route",
            ),
        ] {
            let e = load(&format!("{MIN}{extra}")).unwrap_err();
            assert_eq!(e.0[0].key, "routes[0].token_param", "{e}");
            assert!(e.to_string().contains(why), "{e}");
        }
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

    #[test]
    fn the_reference_config_states_exactly_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/ssegate.toml");
        let c = Config::load(&path).expect("conf/ssegate.toml loads");
        let (s, d) = (&c.server, Server::default());
        assert_eq!(
            (s.threads, s.grace_period, &s.log_level, s.log_json),
            (d.threads, d.grace_period, &d.log_level, d.log_json)
        );
        assert_eq!(
            (s.max_connections, s.request_header_timeout),
            (d.max_connections, d.request_header_timeout)
        );
        assert_eq!(c.routes[0].sse, SseSettings::default());
        assert_eq!(c.routes[0].replay, ReplaySettings::default());
        assert_eq!(c.replay, ReplayGlobal::default());
        assert_eq!(c.limits, Limits::default());
        assert_eq!(
            c.routes[0].limits.refuse_streams_with,
            RefuseStreamsWith::EventStream
        );
        let u = &c.upstreams[0];
        assert_eq!(
            (u.connect_timeout, u.response_timeout),
            (Upstream::CONNECT_TIMEOUT, Upstream::RESPONSE_TIMEOUT)
        );
    }
}
