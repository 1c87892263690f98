//! From the file layer to checked values: every problem is collected with its place
//! (file, line, column, key), none stops the others from being found.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::file;
use super::*;
use crate::tls::CertKey;

/// The longest duration any setting may have.
const MAX_DURATION: Duration = Duration::from_secs(366 * 24 * 3600);

/// Collects errors with their places while converting the file layer.
pub(super) struct Checker<'a> {
    pub(super) path: &'a Path,
    pub(super) text: &'a str,
    pub(super) errors: Vec<ConfigError>,
}

impl Checker<'_> {
    pub(super) fn error(&mut self, span: Option<std::ops::Range<usize>>, key: &str, msg: &str) {
        let (line, column) = span.map_or((0, 0), |s| line_col(self.text, s.start));
        self.errors.push(ConfigError {
            file: self.path.to_owned(),
            line,
            column,
            key: key.to_owned(),
            message: msg.to_owned(),
        });
    }

    pub(super) fn span_error<T>(&mut self, v: &toml::Spanned<T>, key: &str, msg: &str) {
        self.error(Some(v.span()), key, msg);
    }

    pub(super) fn relative(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_owned()
        } else {
            self.path.parent().unwrap_or(Path::new(".")).join(p)
        }
    }

    /// Loads a certificate and its key, naming the field at fault on error.
    pub(super) fn cert_key(
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

    pub(super) fn duration(&mut self, v: &toml::Spanned<String>, key: &str) -> Duration {
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

    pub(super) fn check(&mut self, raw: file::Root) -> Config {
        let server = self.server(raw.server);
        let listeners = self.listeners(&raw.listeners);
        let global_sse = self.sse(raw.sse.as_ref(), "sse", None);
        let limits = self.limits(raw.limits.as_ref());
        let global_replay = self.replay(raw.replay.as_ref(), "replay", &ReplaySettings::default());
        let gateway_wide = |f: fn(&file::Replay) -> Option<&toml::Spanned<usize>>| {
            raw.replay.as_ref().and_then(f).map(|v| *v.get_ref())
        };
        let d = ReplayGlobal::default();
        let replay_global = ReplayGlobal {
            total_max_bytes: gateway_wide(|r| r.total_max_bytes.as_ref())
                .unwrap_or(d.total_max_bytes),
            lag_blocks: gateway_wide(|r| r.lag_blocks.as_ref())
                .unwrap_or(d.lag_blocks)
                .max(1),
            max_hubs: gateway_wide(|r| r.max_hubs.as_ref()).unwrap_or(d.max_hubs),
            max_hubs_per_client: gateway_wide(|r| r.max_hubs_per_client.as_ref())
                .unwrap_or(d.max_hubs_per_client)
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

        let upstreams = self.upstreams(&raw.upstreams);
        let routes = self.routes(
            &raw.routes,
            &upstreams,
            &global_sse,
            &global_replay,
            refuse_default,
        );
        let cluster = raw.cluster.as_ref().and_then(|c| self.cluster(c));
        Config {
            path: self.path.to_owned(),
            server,
            listeners,
            upstreams,
            routes,
            limits,
            replay: replay_global,
            cluster,
        }
    }

    /// `[server]`.
    fn server(&mut self, raw: file::ServerSection) -> Server {
        let d = Server::default();
        Server {
            threads: raw.threads.unwrap_or(d.threads).max(1),
            grace_period: raw
                .grace_period
                .as_ref()
                .map_or(d.grace_period, |v| self.duration(v, "server.grace_period")),
            log_level: raw.log_level.unwrap_or(d.log_level),
            log_json: match raw.log_format.as_ref() {
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
            admin: match raw.admin_address.as_ref() {
                None => None,
                Some(v) => match v.get_ref().parse::<SocketAddr>() {
                    Ok(a) => Some(a),
                    Err(_) => {
                        self.span_error(v, "server.admin_address", "not an ip:port address");
                        None
                    }
                },
            },
            pid_file: raw.pid_file.map(|p| self.relative(&p)),
            upgrade_sock: raw.upgrade_sock.map(|p| self.relative(&p)),
            max_connections: raw.max_connections.unwrap_or(d.max_connections),
            request_header_timeout: match raw.request_header_timeout.as_ref() {
                None => d.request_header_timeout,
                Some(v) => {
                    let d = self.duration(v, "server.request_header_timeout");
                    if d.is_zero() {
                        self.span_error(v, "server.request_header_timeout", "must be more than 0s");
                    }
                    d
                }
            },
        }
    }

    /// `[[listeners]]`, their TLS certificates loaded and checked.
    fn listeners(&mut self, raw: &[file::Listener]) -> Vec<Listener> {
        if raw.is_empty() {
            self.error(None, "listeners", "at least one [[listeners]] is required");
        }
        let mut listeners = vec![];
        for (i, l) in raw.iter().enumerate() {
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

        listeners
    }

    /// `[[upstreams]]`.
    fn upstreams(&mut self, raw: &[file::Upstream]) -> Vec<Arc<Upstream>> {
        let mut upstreams: Vec<Arc<Upstream>> = vec![];
        for (i, u) in raw.iter().enumerate() {
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
                .map_or(Upstream::CONNECT_TIMEOUT, |v| {
                    self.duration(v, &format!("{base}.connect_timeout"))
                });
            let response_timeout = u
                .response_timeout
                .as_ref()
                .map_or(Upstream::RESPONSE_TIMEOUT, |v| {
                    self.duration(v, &format!("{base}.response_timeout"))
                });
            upstreams.push(Arc::new(Upstream {
                name: u.name.get_ref().clone(),
                servers,
                connect_timeout,
                response_timeout,
            }));
        }

        upstreams
    }

    /// `[[routes]]`, each with its settings merged over the global ones.
    fn routes(
        &mut self,
        raw: &[file::Route],
        upstreams: &[Arc<Upstream>],
        global_sse: &SseSettings,
        global_replay: &ReplaySettings,
        refuse_default: RefuseStreamsWith,
    ) -> Vec<Arc<Route>> {
        if raw.is_empty() {
            self.error(None, "routes", "at least one [[routes]] is required");
        }
        let mut routes = vec![];
        for (i, r) in raw.iter().enumerate() {
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
            let sse = self.sse(r.sse.as_ref(), &format!("{base}.sse"), Some(global_sse));
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
            let replay = self.replay(r.replay.as_ref(), &format!("{base}.replay"), global_replay);
            let token_param = r.token_param.as_ref().map(|t| {
                let key = format!("{base}.token_param");
                let name = t.get_ref();
                if name.is_empty()
                    || !name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
                {
                    self.span_error(
                        t,
                        &key,
                        "must be a non-empty name of letters, digits, '-', '_' or '.'",
                    );
                } else if replay.last_event_id_param.as_ref() == Some(name) {
                    self.span_error(t, &key, "is also this route's last_event_id_param");
                } else if replay.enabled && replay.shared {
                    // A shared GET reaches the upstream without Authorization: the token
                    // would be moved into the header, then dropped.
                    self.span_error(t, &key, "cannot be used on a shared route (replay.shared)");
                } else if replay.enabled
                    && !replay.identity_headers.iter().any(|h| h == "authorization")
                {
                    // The token becomes the identity: without it in the key, one user's
                    // stream could be resumed by another.
                    self.span_error(
                        t,
                        &key,
                        "needs \"authorization\" in replay.identity_headers",
                    );
                }
                name.clone()
            });
            routes.push(Arc::new(Route {
                replay,
                token_param,
                index: routes.len(),
                limits: route_limits,
                name: r.name.clone().unwrap_or_else(|| base.clone()),
                host: r.host.as_deref().map(normalize_host),
                path_prefix,
                upstream,
                sse,
            }));
        }
        routes
    }
}

/// 1-based line and column of byte `offset` in `text`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text.as_bytes()[..offset.min(text.len())];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let col = before.iter().rev().take_while(|&&b| b != b'\n').count() + 1;
    (line, col)
}
