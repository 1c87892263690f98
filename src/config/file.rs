//! The file layer: exactly what the TOML may contain (`deny_unknown_fields`).

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
    pub cluster: Option<Cluster>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cluster {
    pub redis: Spanned<String>,
    pub password_env: Option<Spanned<String>>,
    pub password_file: Option<Spanned<String>>,
    pub node_id: Option<Spanned<String>>,
    pub key_secret: Option<Spanned<String>>,
    pub key_secret_env: Option<Spanned<String>>,
    pub key_secret_file: Option<Spanned<String>>,
    pub lease: Option<Spanned<String>>,
    pub timeout: Option<Spanned<String>>,
    pub prefix: Option<Spanned<String>>,
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
    pub token_param: Option<Spanned<String>>,
}
