//! Where a response comes from: a pooled upstream connection ([`super::pooled`], for
//! ordinary requests and any with a body) or the stream client
//! ([`crate::stream_client`], for GETs that ask for an event stream).

use pingora::prelude::*;
use pingora::protocols::http::HttpTask;
use pingora::ErrorType;

use super::pooled::Pooled;
use crate::stream_client;

/// Where a response comes from.
pub(super) enum Origin {
    /// A pooled connection: ordinary requests, and any with a body.
    Pooled(Box<Pooled>),
    /// The stream client: GETs that ask for an event stream.
    Direct(Box<stream_client::Exchange>),
}

/// What the upstream side produced.
pub(super) enum Up {
    /// A piece of the response.
    Task(HttpTask),
    /// It ended (the response may be incomplete).
    Ended,
    /// It failed.
    Failed(Box<Error>),
}

impl Origin {
    /// The next piece of the response, while watching the client: a client that closes
    /// (or whose request body fails) ends the wait with `Err`.
    pub(super) async fn next(&mut self, session: &mut Session) -> Result<Up> {
        match self {
            Origin::Pooled(p) => p.next(session).await,
            Origin::Direct(exchange) => tokio::select! {
                t = exchange.next() => Ok(match t {
                    Some(HttpTask::Failed(e)) => Up::Failed(e),
                    Some(t) => Up::Task(t),
                    None => Up::Ended,
                }),
                r = session.downstream_session.read_body_or_idle(true) => {
                    r.map_err(|e| e.into_down())?;
                    Error::e_explain(ErrorType::ConnectionClosed, "client closed")
                }
            },
        }
    }

    /// The next piece of the response, for a hub's pump (no client to watch).
    pub(super) async fn next_task(&mut self) -> Option<HttpTask> {
        match self {
            Origin::Pooled(p) => p.next_task().await,
            Origin::Direct(exchange) => exchange.next().await,
        }
    }

    /// An ordinary response is complete: its connection goes back to the pool (a
    /// stream's is closed when the source is dropped).
    pub(super) async fn finish(self) {
        if let Origin::Pooled(p) = self {
            p.finish().await;
        }
    }
}
