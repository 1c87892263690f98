//! ssegate: an edge gateway that makes Server-Sent Events work behind real
//! infrastructure.
//!
//! # Layout
//! - [`config`]: the TOML file, its defaults and validation (pure).
//! - [`sse`]: the WHATWG event-stream parser and the bytes the gateway writes (pure).
//! - [`shutdown`]: graceful-shutdown signal and in-flight count (pure).
//! - [`limit`]: request, stream-connect and concurrent-stream limits (pure).
//! - [`tls`]: certificate loading and the rustls resolver.
//! - [`proxy`]: the pingora `ProxyHttp` glue: routing, upstream choice, headers.
//! - [`relay`]: one response from upstream to client; streams get heartbeats.
//! - [`server`]: builds the pingora server from a [`config::Config`].
//!
//! One event's path: upstream socket → pingora subrequest (`proxy`, inner pass) →
//! `relay` (parsed by `sse::Parser`, heartbeats between events) → client session.
#![warn(missing_docs)]

pub mod config;
pub mod hub;
pub mod limit;
pub mod proxy;
pub mod relay;
pub mod replay;
pub mod server;
pub mod shutdown;
pub mod sse;
pub mod tls;
