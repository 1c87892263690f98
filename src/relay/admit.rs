//! Whether a stream may start, and how a refusal is answered (in a way an
//! `EventSource` survives).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header;
use pingora::prelude::*;

use super::hubs::ReplayCx;
use crate::limit::{self, Decision, Limiter, RefuseReason, StreamSlot};
use crate::metrics::Metrics;

/// Whether the relay may start a stream, and how to say no.
pub struct Admission {
    /// Where stream metrics go.
    pub metrics: Arc<Metrics>,
    /// Hub use for this request, when replay applies (GET streams on replay routes).
    pub replay: Option<ReplayCx>,
    /// The stream slot taken before the request went upstream (for requests that said
    /// they want an event stream); otherwise one is taken when a stream shows up.
    pub slot: Option<StreamSlot>,
    /// The limits to take a slot from.
    pub limits: Arc<Limiter>,
    /// How to answer a refusal.
    pub refusal: Refusal,
}

/// The stream's slot: the one taken before the request went upstream, or a new one now
/// that a stream showed up. `Err` when the limits refuse it. (Takes the two fields, not
/// the `Admission`, so callers may hold its replay settings meanwhile.)
fn take_slot(
    slot: &mut Option<StreamSlot>,
    limits: &Limiter,
    key: Option<limit::ClientKey>,
) -> std::result::Result<Option<StreamSlot>, (RefuseReason, Duration)> {
    match (slot.take(), key) {
        (Some(s), _) => Ok(Some(s)),
        (None, Some(k)) => match limits.open_stream(&k) {
            Decision::Allow(s) => Ok(Some(s)),
            Decision::Refuse {
                reason,
                retry_after,
            } => Err((reason, retry_after)),
        },
        (None, None) => Ok(None),
    }
}

/// A stream about to start: its slot, or the refusal already answered.
pub(super) enum Admit {
    /// Go on, holding this slot (none when the client has no limiting key).
    Go(Option<StreamSlot>),
    /// Refused, and answered.
    Refused,
}

/// Takes the stream's slot (see [`take_slot`]), or answers the refusal.
pub(super) async fn admit_stream(
    session: &mut Session,
    admission: &mut Admission,
    owner: Option<limit::ClientKey>,
    stats: &mut super::RelayStats,
) -> Result<Admit> {
    match take_slot(&mut admission.slot, &admission.limits, owner) {
        Ok(slot) => Ok(Admit::Go(slot)),
        Err((reason, retry_after)) => {
            stats.refused = Some(reason);
            refuse(session, &admission.refusal, reason, retry_after).await?;
            Ok(Admit::Refused)
        }
    }
}

/// How a refusal is answered.
#[derive(Debug, Clone)]
pub struct Refusal {
    /// Answer with a 200 event stream carrying `retry:` (for `EventSource` clients).
    pub as_event_stream: bool,
    /// Smallest retry delay to give.
    pub base_retry: Duration,
    /// Random stretch of the delay.
    pub jitter: f64,
}

/// Answers a refused request. An `EventSource` that gets anything but a 200 event
/// stream stops for good, so stream clients get a 200 stream that sets a (jittered)
/// reconnection delay and ends; others get 429 with `Retry-After`.
pub async fn refuse(
    session: &mut Session,
    how: &Refusal,
    reason: RefuseReason,
    retry_after: Duration,
) -> Result<()> {
    let delay = limit::jittered(retry_after.max(how.base_retry), how.jitter);
    tracing::debug!(reason = reason.as_str(), ?delay, "refused");
    if how.as_event_stream {
        let mut resp = ResponseHeader::build(200, Some(5))?;
        resp.insert_header(header::CONTENT_TYPE, "text/event-stream")?;
        resp.insert_header(header::CACHE_CONTROL, "no-cache")?;
        resp.insert_header("x-ssegate-refused", reason.as_str())?;
        let body = Bytes::from(format!(
            ": ssegate: refused ({}), come back later\nretry: {}\n\n",
            reason.as_str(),
            delay.as_millis()
        ));
        resp.insert_header(header::CONTENT_LENGTH, body.len().to_string())?;
        session.write_response_header(Box::new(resp), false).await?;
        return session.write_response_body(Some(body), true).await;
    }
    let body: &'static str = "429 Too Many Requests: slow down and retry later\n";
    let mut resp = ResponseHeader::build(429, Some(5))?;
    resp.insert_header(header::CONTENT_TYPE, "text/plain; charset=utf-8")?;
    resp.insert_header(header::CONTENT_LENGTH, body.len().to_string())?;
    resp.insert_header(
        header::RETRY_AFTER,
        delay.as_secs_f64().ceil().max(1.0).to_string(),
    )?;
    resp.insert_header("x-ssegate-refused", reason.as_str())?;
    session.write_response_header(Box::new(resp), false).await?;
    session
        .write_response_body(Some(Bytes::from_static(body.as_bytes())), true)
        .await
}
