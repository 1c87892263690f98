//! Builds the pingora [`Server`] from a checked [`Config`]: pingora's own `ServerConf`,
//! the proxy service with its listeners, and the shutdown bridge.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use pingora::apps::HttpServerOptions;
use pingora::listeners::tls::TlsSettings;
use pingora::listeners::ListenerConfig;
use pingora::prelude::*;
use pingora::protocols::l4::stream::L4BufferSettings;
use pingora::server::configuration::ServerConf;
use pingora::services::background::background_service;

use crate::config::Config;
use crate::conn::{ConnGuard, ConnLimits};
use crate::handover;
use crate::lifecycle::{ClusterLink, LimitPruner, ShutdownBridge};
use crate::metrics::Admin;
use crate::proxy::Gateway;
use crate::reload::Reloader;
use crate::shutdown::Graceful;
use crate::tls::ReloadableCert;

/// How long past its own grace period the new process of an upgrade keeps asking the
/// old one for streams (a bound only: a gone process is noticed at once).
const HANDOVER_SLACK: Duration = Duration::from_secs(10);

/// Most connections the admin listener holds at once (scrapers and probes need few).
const ADMIN_MAX_CONNECTIONS: usize = 64;

/// Makes pingora's settings from ours.
pub fn server_conf(config: &Config) -> ServerConf {
    let mut conf = ServerConf {
        threads: config.server.threads,
        // Streams end themselves at shutdown; the grace period only bounds ordinary
        // requests still running, and the process exits as soon as none is left.
        grace_period_seconds: Some(config.server.grace_period.as_secs_f64().ceil() as u64),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    if let Some(p) = &config.server.pid_file {
        conf.pid_file = p.display().to_string();
    }
    conf.upgrade_sock = upgrade_sock(config).display().to_string();
    conf
}

/// pingora's upgrade socket: the configured path, else a private default (never
/// pingora's own default under `/tmp`, where any local user could take it).
fn upgrade_sock(config: &Config) -> std::path::PathBuf {
    config
        .server
        .upgrade_sock
        .clone()
        .unwrap_or_else(handover::default_upgrade_sock)
}

/// What is served where, one line each: every listener (address, protocols, TLS
/// names), the admin listener, the cluster node, and the route table. Logged at start.
pub fn log_served(config: &Config) {
    for l in &config.listeners {
        match &l.tls {
            None => tracing::info!(address = %l.address, protocols = "HTTP/1.1, h2c", "listening"),
            Some(t) => {
                let names: Vec<&str> = t
                    .sni
                    .iter()
                    .flat_map(|s| s.names.iter().map(String::as_str))
                    .collect();
                tracing::info!(
                    address = %l.address,
                    protocols = "TLS 1.2/1.3: h2, HTTP/1.1",
                    default_cert = %t.cert_path.display(),
                    sni_names = ?names,
                    "listening"
                );
            }
        }
    }
    if let Some(a) = config.server.admin {
        tracing::info!(address = %a, paths = "/metrics /healthz /readyz", "admin listening");
    }
    if let Some(c) = &config.cluster {
        tracing::info!(node = %c.node_id, prefix = %c.prefix, "cluster node (Redis)");
    }
    log_routes(config);
}

/// The route table, one line a route: at start, and after each reload (listeners are
/// fixed at start, so a reload does not list them).
pub fn log_routes(config: &Config) {
    for r in &config.routes {
        let replay = match (&r.replay.enabled, &r.replay.shared) {
            (false, _) => "off",
            (true, false) => "on",
            (true, true) => "shared",
        };
        tracing::info!(
            route = %r.name,
            host = r.host.as_deref().unwrap_or("*"),
            path_prefix = %r.path_prefix,
            upstream = %r.upstream.name,
            servers = ?r.upstream.servers,
            replay,
            token_param = r.token_param.as_deref(),
            "route"
        );
    }
}

/// Builds a ready-to-run server. `upgrade` takes the listening sockets over from a
/// running instance (pingora's graceful upgrade).
pub fn build(config: Arc<Config>, upgrade: bool) -> Result<Server> {
    check_upgrade_sock(&config)?;
    // Read before this process writes its own: the PID the handover must come from.
    let old_pid = upgrade
        .then(|| config.server.pid_file.as_ref())
        .flatten()
        .and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|s| s.trim().parse::<u32>().ok());
    let opt = pingora::server::configuration::Opt {
        upgrade,
        ..Default::default()
    };
    let mut server = Server::new_with_opt_and_conf(opt, server_conf(&config));
    server.bootstrap();

    let shutdown = Graceful::new();
    let handover_path = handover::socket_path(Path::new(&server.configuration.upgrade_sock));
    let mut gateway = Gateway::new(config.clone(), shutdown.clone())
        .map_err(|e| Error::because(ErrorType::InternalError, "cannot register metrics", e))?;
    if upgrade {
        // The listening sockets are ours now (bootstrap waited for them); the old
        // process offers its streams until its grace period ends.
        gateway = gateway.with_handover(handover::Source::new(
            handover_path.clone(),
            config.server.grace_period + HANDOVER_SLACK,
            old_pid,
        ));
    }
    let cluster = match &config.cluster {
        Some(settings) => {
            let c = crate::cluster::Cluster::new(settings.clone())
                .map_err(|e| Error::because(ErrorType::InternalError, "cluster.redis", e))?;
            gateway = gateway.with_cluster(c.clone()).map_err(|e| {
                Error::because(ErrorType::InternalError, "cannot register metrics", e)
            })?;
            server.add_service(background_service("cluster", ClusterLink(c.clone())));
            Some(c)
        }
        None => None,
    };
    let metrics = gateway.metrics();
    let live = gateway.live();
    let registry = gateway.registry();
    let (proxy, certs) = proxy_service(&server, &config, gateway)?;
    server.add_service(proxy);
    if let Some(admin) = admin_service(&config, &metrics, &shutdown) {
        server.add_service(admin);
    }
    let phases = server.watch_execution_phase();
    server.add_service(background_service(
        "shutdown",
        ShutdownBridge {
            shutdown,
            phases: std::sync::Mutex::new(Some(phases)),
            handover_path,
            pid_file: config.server.pid_file.clone(),
            registry,
            live: live.clone(),
            cluster,
        },
    ));
    server.add_service(background_service(
        "reload",
        Reloader {
            path: config.path.clone(),
            live: live.clone(),
            certs,
            metrics,
        },
    ));
    server.add_service(background_service(
        "limit pruner",
        LimitPruner {
            live,
            every: config.limits.prune_interval,
        },
    ));
    Ok(server)
}

/// Refuses to start where another local user could take the upgrade socket: checked
/// before pingora listens on it (or sends the listeners to it).
fn check_upgrade_sock(config: &Config) -> Result<()> {
    let sock = upgrade_sock(config);
    match handover::ensure_private_dir(&sock) {
        Ok(()) => Ok(()),
        Err(e) => Error::e_explain(
            ErrorType::InternalError,
            format!(
                "server.upgrade_sock {}: {e}; another local user could stand in for an \
                 upgrade and be handed the listeners and every stream's events. Use a \
                 directory only the gateway's user can write, such as /run/ssegate/",
                sock.display()
            ),
        ),
    }
}

/// The public listeners' service: the proxy behind the connection guard, on every
/// listener; with the TLS listeners' certificates, for reloads.
type ProxyService =
    pingora::services::listening::Service<ConnGuard<pingora::proxy::HttpProxy<Gateway>>>;

/// Each TLS listener's reloadable certificates, by address.
type Certs = Vec<(std::net::SocketAddr, Arc<ReloadableCert>)>;

fn proxy_service(
    server: &Server,
    config: &Config,
    gateway: Gateway,
) -> Result<(ProxyService, Certs)> {
    let metrics = gateway.metrics();
    let mut options = HttpServerOptions::default();
    options.h2c = true;
    // An HTTP/2 connection with no stream open is closed like an idle HTTP/1 one.
    options.h2_idle_timeout = Some(config.server.request_header_timeout);
    let app_slot = gateway.app_slot();
    let mut app = pingora::proxy::http_proxy(&server.configuration, gateway);
    app.server_options = Some(options);
    let limits = ConnLimits {
        max_connections: config.server.max_connections,
        header_timeout: config.server.request_header_timeout,
    };
    let guard = ConnGuard::new(app, limits, Some(metrics.clone()));
    // A stream served outside pingora's loop hands its kept-alive connection back here.
    let _ = app_slot.set(Arc::downgrade(&guard.app()));
    let mut proxy = pingora::services::listening::Service::new("ssegate".to_owned(), guard);
    let mut certs = vec![];
    for l in &config.listeners {
        let addr = l.address.to_string();
        let Some(tls) = &l.tls else {
            proxy.add_listener(ListenerConfig::tcp(addr).l4_buffer(L4BufferSettings::unbuffered()));
            continue;
        };
        let mut settings = TlsSettings::with_callbacks(Box::new(TlsCounter {
            metrics: metrics.clone(),
        }))?;
        let cert = Arc::new(ReloadableCert::new(
            tls.cert_set(),
            metrics.tls_hellos.clone(),
        ));
        certs.push((l.address, cert.clone()));
        settings.set_cert_resolver(cert);
        settings.enable_h2();
        proxy.add_listener(
            ListenerConfig::tcp(addr)
                .tls(settings)
                .l4_buffer(client_buffers()),
        );
    }
    Ok((proxy, certs))
}

/// The admin listener's service, if one is configured: the same guard as the public
/// listeners, with a cap of its own (idle connections must not pile up on the
/// operators' port either).
fn admin_service(
    config: &Config,
    metrics: &Arc<crate::metrics::Metrics>,
    shutdown: &Graceful,
) -> Option<pingora::services::listening::Service<ConnGuard<Admin>>> {
    let addr = config.server.admin?;
    let limits = ConnLimits {
        max_connections: ADMIN_MAX_CONNECTIONS,
        header_timeout: config.server.request_header_timeout,
    };
    let admin = Admin {
        metrics: metrics.clone(),
        shutdown: shutdown.clone(),
    };
    let mut service = pingora::services::listening::Service::new(
        "ssegate admin".to_owned(),
        ConnGuard::new(admin, limits, None),
    );
    service.add_tcp(&addr.to_string());
    Some(service)
}

/// Client connections' socket buffers (TLS listeners; a plaintext listener has none).
/// pingora's default read buffer is 64 KiB per connection; SSE clients send one request
/// header and then only read, so a small one keeps an open stream cheap (headers larger
/// than it are still read whole). The write buffer holds a response header until its
/// body follows: at 4 KiB a small response (header and body) leaves in one send, where
/// pingora's 1,460 bytes sent the header alone first.
///
/// A plaintext listener reads and writes unbuffered: pingora's HTTP/1 and HTTP/2
/// sessions read into buffers of their own of at least 4 KiB, which a reader's buffer
/// would only pass through (it held 4 KiB of every open stream: 38.1 -> 33.9 KiB per
/// idle stream), and writes are held for the flush by `conn::Deadline`, whose buffer
/// exists only between a write and its flush (27.6 -> 23.5 KiB).
fn client_buffers() -> L4BufferSettings {
    L4BufferSettings::new(4096, 4096)
}

/// Counts completed TLS handshakes (certificates come from the resolver).
struct TlsCounter {
    metrics: Arc<crate::metrics::Metrics>,
}

#[async_trait::async_trait]
impl pingora::listeners::TlsAccept for TlsCounter {
    async fn handshake_complete_callback(
        &self,
        tls: &pingora::protocols::tls::TlsRef,
    ) -> Option<Arc<dyn std::any::Any + Send + Sync>> {
        let version = tls.version().unwrap_or("unknown");
        self.metrics
            .tls_handshakes
            .with_label_values(&[version])
            .inc();
        None
    }
}
