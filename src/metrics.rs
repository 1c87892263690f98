//! Prometheus metrics and the admin endpoints (`/metrics`, `/healthz`, `/readyz`),
//! served on their own listener, apart from the public one.
//!
//! An adapter: counters are updated by `proxy` and `relay`; hub counters are read from
//! the [`Registry`] at scrape time.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use async_trait::async_trait;
use http::{Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use prometheus::{Encoder, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, TextEncoder};

use crate::cluster::{Cluster, ClusterCounters};
use crate::hub::{Miss, Registry};
use crate::replay::Budget;
use crate::shutdown::Graceful;

/// Every metric the gateway exports.
pub struct Metrics {
    registry: prometheus::Registry,
    /// Streams open now, by route and protocol (`h1`, `h2`).
    pub streams_open: IntGaugeVec,
    /// Events written to clients (replayed ones included), by route.
    pub events: IntCounterVec,
    /// Stream bytes written to clients, by route.
    pub stream_bytes: IntCounterVec,
    /// Heartbeat comments written, by route.
    pub heartbeats: IntCounterVec,
    /// Finished requests (streams included), by route and status.
    pub requests: IntCounterVec,
    /// Requests and streams refused by the limits, by reason.
    pub refusals: IntCounterVec,
    /// Failed upstream connects and responses, by upstream.
    pub upstream_errors: IntCounterVec,
    /// Upstream connections used, by upstream and whether the connection was reused.
    pub upstream_connections: IntCounterVec,
    /// Config reloads, by result (`ok`, `error`).
    pub reloads: IntCounterVec,
    /// Client connections open now (public listeners).
    pub connections_open: IntGauge,
    /// Connections closed because a request header was not complete in time.
    pub header_timeouts: IntCounter,
    /// TLS handshakes that reached certificate selection.
    pub tls_hellos: IntCounter,
    /// TLS handshakes completed, by protocol version.
    pub tls_handshakes: IntCounterVec,
    /// Replay and hub series, read from the hub registry at scrape time.
    replay: ReplayMetrics,
    /// With a `[cluster]`: its gauges, read from its counters at scrape time.
    cluster: std::sync::OnceLock<ClusterMetrics>,
}

/// Replay and hub series; the values live in the hub registry and the byte budget.
struct ReplayMetrics {
    replay_hits: IntCounter,
    /// By reason (`crate::hub::Miss`): children made once, set at scrape time.
    replay_misses: Vec<IntCounter>,
    events_replayed: IntCounter,
    upstreams_saved: IntCounter,
    handed_over: IntCounter,
    hubs_evicted: IntCounter,
    hubs: IntGauge,
    hubs_lingering: IntGauge,
    replay_bytes: IntGauge,
    /// The replay stores' byte budget.
    budget: Arc<Budget>,
    /// Where the hub counters live.
    hub_registry: Arc<Registry>,
}

/// The cluster's metrics (registered only when there is a cluster).
struct ClusterMetrics {
    cluster: Arc<Cluster>,
    /// Each series and what it reads.
    gauges: Vec<(IntGauge, ReadCounter)>,
}

/// Reads one of the cluster's counters.
type ReadCounter = fn(&ClusterCounters) -> i64;

/// The cluster's series: name, help, and which counter each shows.
const CLUSTER_SERIES: &[(&str, &str, ReadCounter)] = &[
    (
        "ssegate_cluster_redis_up",
        "1 when Redis answered the last call",
        |c| i64::from(c.up.load(Ordering::Relaxed)),
    ),
    (
        "ssegate_cluster_leases_held",
        "Streams this node reads for the cluster now",
        |c| c.leases_held.load(Ordering::Relaxed) as i64,
    ),
    (
        "ssegate_cluster_leases_taken_total",
        "Leases this node took",
        |c| c.leases_taken.load(Ordering::Relaxed) as i64,
    ),
    (
        "ssegate_cluster_followed_streams",
        "Streams this node follows from another node's reader",
        |c| c.followed.load(Ordering::Relaxed) as i64,
    ),
    (
        "ssegate_cluster_cross_node_resumes_total",
        "Resumes served from the shared history",
        |c| c.cross_node_resumes.load(Ordering::Relaxed) as i64,
    ),
    (
        "ssegate_cluster_fenced_writes_total",
        "Readers stopped because another node holds their lease now (fenced)",
        |c| c.fenced.load(Ordering::Relaxed) as i64,
    ),
    (
        "ssegate_cluster_epoch_resets_total",
        "Shared histories restarted with a new epoch",
        |c| c.epoch_resets.load(Ordering::Relaxed) as i64,
    ),
    (
        "ssegate_cluster_takeovers_total",
        "Streams this node took over from a gone reader or without Redis",
        |c| c.takeovers.load(Ordering::Relaxed) as i64,
    ),
    (
        "ssegate_cluster_redis_errors_total",
        "Redis calls that failed or timed out",
        |c| c.errors.load(Ordering::Relaxed) as i64,
    ),
    (
        "ssegate_cluster_redis_calls_total",
        "Redis calls timed",
        |c| c.calls.load(Ordering::Relaxed) as i64,
    ),
    (
        "ssegate_cluster_redis_latency_microseconds_total",
        "Redis call time, summed",
        |c| c.latency_us.load(Ordering::Relaxed) as i64,
    ),
];

fn counter_vec(
    r: &prometheus::Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntCounterVec> {
    let c = IntCounterVec::new(Opts::new(name, help), labels)?;
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

fn counter(r: &prometheus::Registry, name: &str, help: &str) -> prometheus::Result<IntCounter> {
    let c = IntCounter::new(name, help)?;
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

fn gauge(r: &prometheus::Registry, name: &str, help: &str) -> prometheus::Result<IntGauge> {
    let g = IntGauge::new(name, help)?;
    r.register(Box::new(g.clone()))?;
    Ok(g)
}

impl ReplayMetrics {
    fn new(
        r: &prometheus::Registry,
        hub_registry: Arc<Registry>,
        budget: Arc<Budget>,
    ) -> prometheus::Result<ReplayMetrics> {
        let r = r.clone();
        Ok(ReplayMetrics {
            replay_hits: counter(
                &r,
                "ssegate_replay_hits_total",
                "Resumes whose Last-Event-ID was found",
            )?,
            replay_misses: {
                let v = counter_vec(
                    &r,
                    "ssegate_replay_misses_total",
                    "Resumes not replayed: the Last-Event-ID was not found (unknown_id), or the stream that had it may not be shared with this request (vary, vary_star, private)",
                    &["reason"],
                )?;
                Miss::ALL
                    .iter()
                    .map(|m| v.with_label_values(&[m.as_str()]))
                    .collect()
            },
            events_replayed: counter(
                &r,
                "ssegate_events_replayed_total",
                "Events sent from replay stores",
            )?,
            upstreams_saved: counter(
                &r,
                "ssegate_upstream_requests_saved_total",
                "Clients served from an existing hub instead of a new upstream request",
            )?,
            hubs_evicted: counter(
                &r,
                "ssegate_hubs_evicted_total",
                "Lingering hubs closed early because the client that opened them opened too many (replay.max_hubs_per_client)",
            )?,
            handed_over: counter(
                &r,
                "ssegate_events_handed_over_total",
                "Events taken over from the process this one replaced (graceful upgrade)",
            )?,
            hubs: gauge(&r, "ssegate_hubs", "Stream hubs alive")?,
            hubs_lingering: gauge(
                &r,
                "ssegate_hubs_lingering",
                "Stream hubs without clients, waiting out their linger window",
            )?,
            replay_bytes: gauge(
                &r,
                "ssegate_replay_bytes",
                "Bytes held by all replay stores (bounded by replay.total_max_bytes)",
            )?,
            budget,
            hub_registry,
        })
    }

    /// Sets every series from the registry's counters.
    fn update(&self) {
        let c = &self.hub_registry.counters;
        let set = |m: &IntCounter, v: u64| {
            m.reset();
            m.inc_by(v);
        };
        set(&self.replay_hits, c.hits.load(Ordering::Relaxed));
        for (m, n) in self.replay_misses.iter().zip(&c.misses) {
            set(m, n.load(Ordering::Relaxed));
        }
        set(
            &self.events_replayed,
            c.events_replayed.load(Ordering::Relaxed),
        );
        set(
            &self.upstreams_saved,
            c.upstreams_saved.load(Ordering::Relaxed),
        );
        set(&self.handed_over, c.handed_over.load(Ordering::Relaxed));
        set(&self.hubs_evicted, c.evicted.load(Ordering::Relaxed));
        self.hubs.set(c.hubs.load(Ordering::Relaxed) as i64);
        self.replay_bytes.set(self.budget.used() as i64);
        self.hubs_lingering
            .set(self.hub_registry.lingering() as i64);
    }
}

impl Metrics {
    /// Creates, at zero, every series whose labels the config names (routes,
    /// upstreams, refusal reasons, reload results), so dashboards and `rate()` see them
    /// before their first event.
    pub fn init_series(&self, config: &crate::config::Config) {
        for r in &config.routes {
            let route = r.name.as_str();
            for protocol in ["h1", "h2"] {
                self.streams_open.with_label_values(&[route, protocol]);
            }
            self.events.with_label_values(&[route]);
            self.stream_bytes.with_label_values(&[route]);
            self.heartbeats.with_label_values(&[route]);
        }
        for u in &config.upstreams {
            self.upstream_errors.with_label_values(&[u.name.as_str()]);
            for reused in ["yes", "no"] {
                self.upstream_connections
                    .with_label_values(&[u.name.as_str(), reused]);
            }
        }
        use crate::limit::RefuseReason::*;
        let limits = [RequestRate, StreamConnectRate, ClientStreams, TotalStreams];
        for reason in limits.iter().map(|r| r.as_str()).chain(["max_connections"]) {
            self.refusals.with_label_values(&[reason]);
        }
        for result in ["ok", "error"] {
            self.reloads.with_label_values(&[result]);
        }
    }
    /// Registers every metric.
    pub fn new(
        hub_registry: Arc<Registry>,
        budget: Arc<Budget>,
    ) -> prometheus::Result<Arc<Metrics>> {
        let r = prometheus::Registry::new();
        let streams_open = IntGaugeVec::new(
            Opts::new("ssegate_streams_open", "Event streams open now"),
            &["route", "protocol"],
        )?;
        r.register(Box::new(streams_open.clone()))?;
        Ok(Arc::new(Metrics {
            streams_open,
            events: counter_vec(
                &r,
                "ssegate_events_total",
                "Events written to clients",
                &["route"],
            )?,
            stream_bytes: counter_vec(
                &r,
                "ssegate_stream_bytes_total",
                "Stream bytes written to clients",
                &["route"],
            )?,
            heartbeats: counter_vec(
                &r,
                "ssegate_heartbeats_total",
                "Heartbeat comments written",
                &["route"],
            )?,
            requests: counter_vec(
                &r,
                "ssegate_requests_total",
                "Finished requests and streams",
                &["route", "status"],
            )?,
            refusals: counter_vec(
                &r,
                "ssegate_refusals_total",
                "Requests and streams refused by limits",
                &["reason"],
            )?,
            reloads: counter_vec(
                &r,
                "ssegate_config_reloads_total",
                "Config reloads on SIGHUP",
                &["result"],
            )?,
            upstream_connections: counter_vec(
                &r,
                "ssegate_upstream_connections_total",
                "Upstream connections used for requests, by upstream and reuse of a kept-alive one",
                &["upstream", "reused"],
            )?,
            upstream_errors: counter_vec(
                &r,
                "ssegate_upstream_errors_total",
                "Failed upstream connects and responses",
                &["upstream"],
            )?,
            connections_open: gauge(
                &r,
                "ssegate_connections_open",
                "Client connections open now on the public listeners",
            )?,
            header_timeouts: counter(
                &r,
                "ssegate_request_header_timeouts_total",
                "Connections closed because a request header was not complete in time (slow or idle clients)",
            )?,
            tls_hellos: counter(
                &r,
                "ssegate_tls_handshakes_started_total",
                "TLS ClientHellos that reached certificate selection",
            )?,
            tls_handshakes: counter_vec(
                &r,
                "ssegate_tls_handshakes_total",
                "TLS handshakes completed, by protocol version (started minus completed: failed or abandoned)",
                &["version"],
            )?,
            replay: ReplayMetrics::new(&r, hub_registry, budget)?,
            registry: r,
            cluster: std::sync::OnceLock::new(),
        }))
    }

    /// Adds the cluster's series.
    pub fn with_cluster(&self, cluster: Arc<Cluster>) -> prometheus::Result<()> {
        let mut gauges = vec![];
        for (name, help, read) in CLUSTER_SERIES {
            gauges.push((gauge(&self.registry, name, help)?, *read));
        }
        let _ = self.cluster.set(ClusterMetrics { cluster, gauges });
        Ok(())
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> Vec<u8> {
        self.replay.update();
        if let Some(cm) = self.cluster.get() {
            for (g, read) in &cm.gauges {
                g.set(read(&cm.cluster.counters));
            }
        }
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::warn!("cannot encode metrics: {e}");
        }
        out
    }
}

/// The admin listener's endpoints.
pub struct Admin {
    /// What `/metrics` shows.
    pub metrics: Arc<Metrics>,
    /// `/readyz` turns 503 once a graceful shutdown has started.
    pub shutdown: Graceful,
}

fn reply(status: StatusCode, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    let mut r = Response::new(body);
    *r.status_mut() = status;
    if let Ok(v) = http::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    let len = r.body().len();
    r.headers_mut()
        .insert(http::header::CONTENT_LENGTH, len.into());
    r
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        match session.req_header().uri.path() {
            "/metrics" => reply(
                StatusCode::OK,
                "text/plain; version=0.0.4",
                self.metrics.encode(),
            ),
            "/healthz" => reply(StatusCode::OK, "text/plain", b"ok\n".to_vec()),
            "/readyz" if self.shutdown.started() => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                b"shutting down\n".to_vec(),
            ),
            "/readyz" => reply(StatusCode::OK, "text/plain", b"ready\n".to_vec()),
            _ => reply(StatusCode::NOT_FOUND, "text/plain", b"not found\n".to_vec()),
        }
    }
}
