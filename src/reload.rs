//! Config reload on SIGHUP: the new file is checked first; a good one replaces the live
//! routes, upstreams, limits, stream and replay settings and TLS certificates for new
//! requests, while open streams keep the config they started with; a bad one is
//! rejected with every error logged, and the old config keeps serving.
//!
//! Listeners, threads and the replay budget are fixed at start: changing them needs a
//! restart or a graceful upgrade (logged when a reload would change them).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tokio::signal::unix::{signal, SignalKind};

use crate::config::Config;
use crate::live::Live;
use crate::metrics::Metrics;
use crate::tls::ReloadableCert;

/// Watches for SIGHUP and reloads.
pub struct Reloader {
    /// The config file to read again.
    pub path: PathBuf,
    /// What requests read their config from.
    pub live: Arc<ArcSwap<Live>>,
    /// The TLS listeners' certificates, by listener address.
    pub certs: Vec<(SocketAddr, Arc<ReloadableCert>)>,
    /// Counts reloads.
    pub metrics: Arc<Metrics>,
}

impl Reloader {
    /// Reads, checks and installs the config file; returns whether it was installed.
    pub fn reload(&self) -> bool {
        let config = match Config::load(&self.path) {
            Ok(c) => c,
            Err(errors) => {
                for e in &errors.0 {
                    tracing::error!("reload rejected, old config kept: {e}");
                }
                self.metrics.reloads.with_label_values(&["error"]).inc();
                return false;
            }
        };
        let old = self.live.load();
        let addresses = |c: &Config| -> Vec<(SocketAddr, bool)> {
            c.listeners
                .iter()
                .map(|l| (l.address, l.tls.is_some()))
                .collect()
        };
        if addresses(&config) != addresses(&old.config) {
            tracing::warn!("listener changes take effect only after a restart or upgrade");
        }
        for l in &config.listeners {
            if let (Some(tls), Some((_, cert))) =
                (&l.tls, self.certs.iter().find(|(a, _)| *a == l.address))
            {
                cert.set(tls.cert_set());
            }
        }
        crate::server::log_routes(&config);
        self.metrics.init_series(&config);
        let live = Live::new(Arc::new(config), Some(&old));
        let generation = live.generation;
        self.live.store(Arc::new(live));
        self.metrics.reloads.with_label_values(&["ok"]).inc();
        tracing::info!(generation, path = %self.path.display(), "configuration reloaded");
        true
    }
}

#[async_trait]
impl BackgroundService for Reloader {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut hup = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("cannot watch SIGHUP, reload disabled: {e}");
                return;
            }
        };
        loop {
            tokio::select! {
                r = hup.recv() => {
                    if r.is_none() {
                        return;
                    }
                    tracing::info!("SIGHUP: reloading configuration");
                    // Reading the file and resolving upstream names may block: fine here,
                    // this service has a runtime of its own and nothing else to do.
                    let done = self.reload();
                    tracing::debug!(installed = done, "reload finished");
                }
                _ = shutdown.changed() => return,
            }
        }
    }
}
