//! ssegate: an edge gateway that makes Server-Sent Events work behind real
//! infrastructure.
//!
//! # Layout
//! The lower floor knows nothing of pingora and is tested alone:
//! - [`config`]: the TOML file, its defaults and validation.
//! - [`sse`]: the WHATWG event-stream parser and the bytes the gateway writes.
//! - [`key`]: what a stream is keyed on (the request as the upstream sees it, `Vary`,
//!   private responses) and the one host normalisation.
//! - [`replay`]: the bounded store of a stream's recent events.
//! - [`hub`]: one upstream stream, its store and its subscribers; the registry.
//! - [`limit`]: request, stream-connect and concurrent-stream limits.
//! - `shutdown`: graceful-shutdown signal and in-flight count.
//! - `handover`: recent events passed from the old process to the new one on a
//!   graceful upgrade, over a checked unix socket.
//! - `cluster`: several nodes as one through Redis: the shared history (offsets and
//!   epochs assigned by the store), the lease naming each stream's one reader (its
//!   writes fenced by it), and the follower of other nodes' streams.
//!
//! The upper floor adapts them to pingora; arrows point down only (nothing imports
//! `proxy`):
//! - `server`: builds the pingora server from a [`config::Config`]; `lifecycle`: the
//!   shutdown bridge, the PID file, housekeeping; `reload`: config reload on SIGHUP.
//! - `proxy`: the `ProxyHttp` phases, each calling a named step.
//! - `request`: the client as the gateway sees it, the request as the upstream gets it.
//! - `relay`: one response from upstream to client (admission, pooled upstream
//!   connections, hubs, the one stream writer).
//! - `live`, `reply`, `conn`, `tls`, `metrics`: config-derived state, the gateway's own
//!   answers, the connection guard (and its held writes), certificates, Prometheus metrics.
//!
//! One event's path: upstream socket → `relay::pooled::Pooled` (pingora's HTTP/1.1
//! client on a pooled connection, read in the task that consumes it) → the hub's pump
//! (`relay::hubs`) → `hub::Hub::feed` (cut into blocks by `sse::Parser`, recorded in the
//! `replay` store, broadcast) → the subscriber's `relay::stream::Writer` (replay first,
//! then live blocks, heartbeats between them) → client session. Once the head and the
//! replay are out, that writer runs in a task of its own holding only the client's HTTP
//! session (`relay::Streaming`, spawned by `proxy`): pingora's request task and what it
//! holds end there (so does a byte-for-byte stream's, below, once the request body is
//! all sent). Every other request
//! reaches the upstream the same way, read in the client's task; an event stream that
//! does not become a hub (a POST, replay off) goes through the same writer byte for
//! byte, with the parser tracking event boundaries.
//!
//! With a `[cluster]`, the node that holds a stream's lease also appends each block the
//! hub publishes to Redis (`cluster::writer`, fenced by the lease, sent in pipelines by
//! `cluster::batch`); another node with clients of the same stream follows that history
//! (`cluster::follow`, one `XREAD` for all) into a hub of its own (`relay::remote`),
//! whose subscribers are served by the same stream writer.
#![warn(missing_docs)]
// Network and file data must never be able to panic the gateway.
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

mod cluster;
pub mod config;
mod conn;
mod handover;
pub mod hub;
pub mod key;
mod lifecycle;
pub mod limit;
mod live;
mod metrics;
mod proxy;
mod relay;
mod reload;
pub mod replay;
mod reply;
mod request;
pub mod server;
mod shutdown;
pub mod sse;
mod tls;

pub use lifecycle::write_pid_file;
