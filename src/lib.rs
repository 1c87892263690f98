//! ssegate: an edge gateway that makes Server-Sent Events work behind real
//! infrastructure.
//!
//! # Layout
//! - [`config`]: the TOML file, its defaults and validation (pure).
//! - [`sse`]: the WHATWG event-stream parser and the bytes the gateway writes (pure).
//! - [`shutdown`]: graceful-shutdown signal and in-flight count (pure).
//! - [`key`]: what a stream is keyed on (the request as the upstream sees it, `Vary`,
//!   private responses) and the one host normalisation (pure).
//! - [`replay`]: the bounded store of a stream's recent events (pure).
//! - [`hub`]: one upstream stream, its store and its subscribers; the registry (pure).
//! - [`limit`]: request, stream-connect and concurrent-stream limits (pure).
//! - [`tls`]: certificate loading and the rustls resolver.
//! - [`conn`]: client connection cap and request-header deadline (slowloris).
//! - [`proxy`]: the pingora `ProxyHttp` glue: routing, upstream choice, headers.
//! - [`relay`]: one response from upstream to client; streams get heartbeats.
//! - [`metrics`]: Prometheus metrics and the admin endpoints.
//! - [`reload`]: config reload on SIGHUP.
//! - [`handover`]: recent events passed from the old process to the new one on a
//!   graceful upgrade.
//! - [`server`]: builds the pingora server from a [`config::Config`].
//!
//! - [`upstream`]: the stream client: event-stream requests on connections of their own.
//!
//! One event's path: upstream socket → `upstream::Exchange` (hyper's HTTP/1.1 client,
//! read in the task that consumes it) → `relay::Pump` → `hub::Hub::feed` (cut into
//! blocks by `sse::Parser`, recorded in the `replay` store, broadcast) →
//! `relay::follow_hub` (replay first, heartbeats between blocks) → client session.
//! Requests that do not ask for an event stream reach the upstream as a pingora
//! subrequest (`proxy`, inner pass) instead; if one answers with a stream anyway, the
//! subrequest feeds the hub, and streams without replay (POST, or replay off) go from
//! the subrequest straight through `relay::run` with the parser tracking boundaries.
#![warn(missing_docs)]
// Network and file data must never be able to panic the gateway.
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod config;
pub mod conn;
pub mod handover;
pub mod hub;
pub mod key;
pub mod lifecycle;
pub mod limit;
pub mod live;
pub mod metrics;
pub mod proxy;
pub mod relay;
pub mod reload;
pub mod replay;
pub mod reply;
pub mod request;
pub mod server;
pub mod shutdown;
pub mod sse;
pub mod tls;
pub mod upstream;
