//! The access line of each request or stream, and the request counters beside it.

use pingora::prelude::*;
use pingora::protocols::http::ServerSession;

use super::RequestCtx;
use crate::metrics::Metrics;
use crate::relay::Exchange;

/// What an access line says of the exchange itself.
pub(super) struct Line<'a> {
    method: &'a http::Method,
    uri: &'a dyn std::fmt::Display,
    status: u16,
    bytes: usize,
}

impl<'a> Line<'a> {
    /// The exchange in a client's session.
    pub(super) fn of(session: &'a ServerSession) -> Line<'a> {
        let req = session.req_header();
        Line {
            method: &req.method,
            uri: &req.uri,
            status: session.response_written().map_or(0, |r| r.status.as_u16()),
            bytes: session.body_bytes_sent(),
        }
    }
}

impl<'a> From<&'a Exchange> for Line<'a> {
    /// A stream's exchange, kept when its session was let go (see [`crate::relay::H1Stream`],
    /// [`crate::relay::H2Stream`]).
    fn from(x: &'a Exchange) -> Line<'a> {
        Line {
            method: &x.method,
            uri: &x.uri,
            status: x.status,
            bytes: x.bytes,
        }
    }
}

/// One access line, counted by route and status, and by refusal reason when the
/// limits refused the request.
pub(super) fn log(metrics: &Metrics, line: &Line, e: Option<&Error>, ctx: &RequestCtx) {
    let status = line.status;
    let ms = ctx.started.map_or(0, |s| s.elapsed().as_millis());
    let route = ctx.route.as_ref().map_or("-", |r| r.name.as_str());
    let client = ctx
        .client
        .as_ref()
        .and_then(|c| c.client_ip)
        .map_or_else(|| "-".to_owned(), |ip| ip.to_string());
    let (kind, events, heartbeats) = match &ctx.relay {
        Some(r) if r.stream => ("stream", r.events, r.heartbeats),
        _ => ("request", 0, 0),
    };
    let refused = ctx.refused.or(ctx.relay.as_ref().and_then(|r| r.refused));
    if let Some(reason) = refused {
        metrics.refusals.with_label_values(&[reason.as_str()]).inc();
    }
    metrics
        .requests
        .with_label_values(&[route, &status.to_string()])
        .inc();
    tracing::info!(
        target: "ssegate::access",
        client,
        method = %line.method,
        path = %line.uri,
        route,
        status,
        duration_ms = ms as u64,
        bytes = line.bytes,
        kind,
        events,
        heartbeats,
        replay = ctx.relay.as_ref().and_then(|r| r.replay),
        replay_miss = ctx.relay.as_ref().and_then(|r| r.miss),
        replayed = ctx.relay.as_ref().map_or(0, |r| r.replayed),
        refused = refused.map(|r| r.as_str()),
        error = e
            .map(|e| e.to_string())
            .or_else(|| ctx.relay.as_ref().and_then(|r| r.error.clone())),
    );
}
