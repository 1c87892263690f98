//! The process around the proxy: graceful shutdown and upgrade (bridged from
//! pingora's signals), the PID file, and limiter housekeeping.

use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::server::{ExecutionPhase, ShutdownWatch};
use pingora::services::background::BackgroundService;

use crate::handover::Offer;
use crate::hub::Registry;
use crate::live::Live;
use crate::shutdown::Graceful;

/// Drops limiter state of clients idle long enough to be fresh again, so limiter
/// memory follows the active clients, not every address ever seen.
pub struct LimitPruner {
    /// The live limits (swapped by reloads).
    pub live: Arc<ArcSwap<Live>>,
    /// How often.
    pub every: std::time::Duration,
}

/// Keeps the cluster's Redis connections (and its follower loop) for the life of the
/// process; they run on this service's runtime.
pub struct ClusterLink(pub Arc<crate::cluster::Cluster>);

#[async_trait]
impl BackgroundService for ClusterLink {
    async fn start(&self, _watch: ShutdownWatch) {
        // Not ended at shutdown: streams still draining (and an upgrade's held hubs)
        // keep writing until the process exits.
        self.0.clone().run().await;
    }
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

/// Bridges pingora's shutdown watch to [`Graceful`], and exits the process once a
/// graceful shutdown has started and no request is left in flight (pingora alone would
/// sleep out the whole grace period).
///
/// On a graceful upgrade (SIGQUIT) it first offers the hubs to the new process (see
/// [`crate::handover`]) and keeps them, and the process, for a window after the streams
/// end: long enough for their clients to reconnect to the new process.
pub struct ShutdownBridge {
    /// The state streams watch.
    pub shutdown: Graceful,
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
    /// With a `[cluster]`: the streams this node reads are handed to followers at exit.
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
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
    /// The longest reconnection delay streams are told at shutdown.
    fn longest_retry(&self) -> std::time::Duration {
        let live = self.live.load();
        live.config
            .routes
            .iter()
            .map(|r| r.sse.shutdown_retry)
            .max()
            .unwrap_or_default()
    }

    /// How long the old process keeps its hubs for the new one.
    fn handover_window(&self) -> std::time::Duration {
        let grace = self.live.load().config.server.grace_period;
        (self.longest_retry() + HANDOVER_MARGIN).min(grace)
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
        // Begun before it is logged: whoever reads the line finds `/readyz` at 503.
        self.shutdown.begin();
        tracing::info!(
            active = self.shutdown.active(),
            "graceful shutdown: ending streams"
        );
        std::thread::spawn({
            let shutdown = self.shutdown.clone();
            let pid_file = self.pid_file.clone();
            let (cluster, registry) = (self.cluster.clone(), self.registry.clone());
            let wait = self.longest_retry() + HANDOFF_MARGIN;
            move || loop {
                let kept = keep_until.is_some_and(|t| std::time::Instant::now() < t);
                if shutdown.active() == 0 && !kept {
                    if let Some(c) = &cluster {
                        hand_over_to_followers(c, &registry, wait);
                    }
                    tracing::info!("graceful shutdown: no request left, exiting");
                    if let Some(p) = &pid_file {
                        remove_pid_file_if_ours(p);
                    }
                    std::process::exit(0);
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        });
    }
}

/// How long an exiting reader waits for another node to follow each of its streams,
/// beyond the longest `retry:` it told its own clients (they reconnect, perhaps after
/// bouncing off this node once, to nodes that then follow it).
const HANDOFF_MARGIN: std::time::Duration = std::time::Duration::from_millis(2000);

/// Announces a handoff; each hub this node reads for the cluster ends once followed, so
/// each writer marks its stream's end
/// in the shared history and gives the lease up: followers on other nodes take the
/// upstream over at once instead of after the lease runs out. Bounded: Redis may be away.
fn hand_over_to_followers(
    cluster: &crate::cluster::Cluster,
    registry: &Registry,
    wait: std::time::Duration,
) {
    use std::sync::atomic::Ordering;
    let held = || cluster.counters.leases_held.load(Ordering::Relaxed);
    if held() == 0 {
        return;
    }
    // Each writer announces the handoff, and ends its stream once another node follows
    // it (that node opens the upstream beside this one and merges), or after `wait`.
    cluster.begin_handoff(wait);
    let deadline = std::time::Instant::now() + wait + std::time::Duration::from_secs(2);
    while held() > 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    // Stragglers (Redis away): end them now, and give their writers a moment.
    registry.end_all();
    let deadline = std::time::Instant::now() + cluster.settings.timeout * 4;
    while held() > 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    tracing::info!(left = held(), "cluster: streams handed to followers");
}

/// Writes this process's id to `path`. During an upgrade the new process overwrites the
/// old one's: the file always names the process that owns the listeners.
pub fn write_pid_file(path: &Path) -> std::io::Result<()> {
    std::fs::write(path, format!("{}\n", std::process::id()))
}

/// Removes `path` at exit if it still names this process (not the one that replaced it).
pub fn remove_pid_file_if_ours(path: &Path) {
    let ours =
        std::fs::read_to_string(path).is_ok_and(|s| s.trim() == std::process::id().to_string());
    if ours {
        let _ = std::fs::remove_file(path);
    }
}
