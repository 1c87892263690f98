//! An event stream that is not a hub (POST streams, routes without replay, streams past
//! `max_hubs`): the upstream's bytes go to the stream writer as they come, with the
//! parser tracking where events end so heartbeats and the shutdown hint fall between
//! them.

use pingora::prelude::*;
use pingora::protocols::http::HttpTask;
use pingora::ErrorType;

use super::pooled::{Pooled, Up};
use super::stream::{Client, Piece, Source};
use crate::sse;

/// An upstream response relayed byte for byte (POST streams, routes without replay,
/// and streams past `max_hubs`).
pub(super) struct ByteSource {
    pub(super) feed: Box<Pooled>,
    /// Finds event boundaries in the upstream bytes.
    pub(super) parser: sse::Parser,
    /// The upstream's body is not parseable (compressed): relayed as is.
    pub(super) opaque: bool,
    /// Removes a late leading BOM once the gateway has written first.
    bom: Option<sse::BomStripper>,
    /// The upstream has sent body bytes.
    upstream_spoke: bool,
    /// The last bytes came with the end of the response.
    ended: bool,
}

impl ByteSource {
    pub(super) fn new(feed: Box<Pooled>, max_event_bytes: usize, opaque: bool) -> ByteSource {
        if opaque {
            tracing::warn!("upstream compressed an event stream; relaying it without heartbeats");
        }
        ByteSource {
            feed,
            parser: sse::Parser::boundaries_only(max_event_bytes),
            opaque,
            bom: None,
            upstream_spoke: false,
            ended: false,
        }
    }
}

impl Source for ByteSource {
    async fn next<C: Client>(&mut self, client: &mut C, wrote: bool) -> Result<Piece> {
        if self.ended {
            return Ok(Piece::End(None));
        }
        if wrote && !self.upstream_spoke && self.bom.is_none() {
            // The upstream's BOM may only open the body, and the gateway wrote first.
            self.bom = Some(sse::BomStripper::default());
        }
        loop {
            let task = match client.session() {
                // The request body may still be on its way: pingora's session reads it
                // for the upstream (and sees the client leave).
                Some(session) => match self.feed.next(session).await? {
                    Up::Task(t) => Some(t),
                    Up::Ended => None,
                    Up::Failed(e) => Some(HttpTask::Failed(e)),
                },
                // The body is all sent (the stream left pingora's request task): only
                // the client's leaving can come from its side.
                None => tokio::select! {
                    biased;
                    t = self.feed.next_task() => t,
                    r = client.closed() => {
                        r?;
                        return Error::e_explain(ErrorType::ConnectionClosed, "client closed");
                    }
                },
            };
            let Some(task) = task else {
                return Ok(Piece::End(None));
            };
            let (bytes, end) = match task {
                HttpTask::Body(Some(bytes), end) => (bytes, end),
                HttpTask::Body(None, false) | HttpTask::Header(..) | HttpTask::UpgradedBody(..) => {
                    continue
                }
                HttpTask::Failed(e) => {
                    // The header is out: all that is left is to end the response.
                    tracing::debug!("upstream failed mid-response: {e}");
                    return Ok(Piece::End(None));
                }
                HttpTask::Body(None, true) | HttpTask::Done | HttpTask::Trailer(_) => {
                    return Ok(Piece::End(None))
                }
            };
            self.ended = end;
            let bytes = match self.bom.as_mut() {
                Some(b) => b.feed(bytes),
                None => bytes,
            };
            if bytes.is_empty() {
                if end {
                    return Ok(Piece::End(None));
                }
                continue;
            }
            self.upstream_spoke = true;
            let (mut events, mut sets_retry) = (0, false);
            if !self.opaque {
                self.parser.push(&bytes);
                loop {
                    match self.parser.next_event() {
                        Ok(Some(ev)) => {
                            events += 1;
                            sets_retry |= ev.retry.is_some();
                        }
                        Ok(None) => break,
                        Err(e) => {
                            tracing::warn!("closing stream: upstream sent an {e}");
                            return Ok(Piece::End(None));
                        }
                    }
                }
            }
            return Ok(Piece::Bytes {
                bytes,
                events,
                sets_retry,
            });
        }
    }

    fn at_boundary(&self) -> bool {
        self.opaque || self.parser.at_boundary()
    }

    fn opaque(&self) -> bool {
        self.opaque
    }
}
