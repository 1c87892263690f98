//! Where a response comes from: a pingora subrequest (pingora's proxy path, for
//! ordinary requests and any with a body) or the stream client ([`crate::stream_client`],
//! for GETs that ask for an event stream).

use http::{header, Version};
use pingora::prelude::*;
use pingora::protocols::http::HttpTask;
use pingora::proxy::subrequest::{BodyMode, Ctx as SubrequestCtx};
use pingora::ErrorType;

use crate::request::{ClientInfo, InnerRequest};
use crate::stream_client;

/// Where a response comes from.
pub(super) enum Origin {
    /// A pingora subrequest: ordinary requests, and any with a body.
    Sub(Subrequest),
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
    /// (or, for a subrequest, whose request body fails) ends the wait with `Err`.
    pub(super) async fn next(&mut self, session: &mut Session) -> Result<Up> {
        match self {
            Origin::Sub(sub) => sub.next(session).await,
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
            Origin::Sub(sub) => sub.rx.recv().await,
            Origin::Direct(exchange) => exchange.next().await,
        }
    }

    /// Adds what else is ready now to `batch`, so a hub gets it with the header.
    pub(super) fn drain(&mut self, batch: &mut Vec<HttpTask>) {
        if let Origin::Sub(sub) = self {
            while let Ok(more) = sub.rx.try_recv() {
                batch.push(more);
            }
        }
    }

    /// An ordinary response is complete: let a subrequest finish, so its upstream
    /// connection goes back to the pool (a stream's is cut when the source is dropped).
    /// The inner pass may still be handing over its last task (a body longer than one
    /// read ends with a separate `Done`): its channel is read until the inner pass
    /// closes it, because a channel dropped before that makes pingora take the upstream
    /// response as cut short and close a connection it could have kept.
    pub(super) async fn finish(&mut self) {
        if let Origin::Sub(sub) = self {
            sub.abort.disarm();
            // A client body not all sent: the inner pass may wait for it; the upstream
            // connection is not reusable then anyway.
            if sub.body_done {
                let rest = async { while sub.rx.recv().await.is_some() {} };
                let _ = tokio::time::timeout(FINISH_WAIT, rest).await;
            }
        }
    }
}

/// Bounds the wait for a finished subrequest to close its channel (it has nothing
/// left to read: this is only a guard).
const FINISH_WAIT: std::time::Duration = std::time::Duration::from_millis(200);

/// A pingora subrequest running the request through the proxy path (the inner pass),
/// with the channels it talks through.
pub(super) struct Subrequest {
    tx: tokio::sync::mpsc::Sender<HttpTask>,
    rx: tokio::sync::mpsc::Receiver<HttpTask>,
    wants_body_rx: tokio::sync::oneshot::Receiver<()>,
    wants_body: bool,
    wants_body_closed: bool,
    proxy_error_rx: tokio::sync::oneshot::Receiver<Box<Error>>,
    proxy_error_closed: bool,
    task: tokio::task::JoinHandle<()>,
    finished: bool,
    /// The client has sent its whole request body.
    body_done: bool,
    /// The subrequest owns the upstream connection: aborting it closes that
    /// connection, which is how a client's disconnect reaches the upstream at once.
    abort: AbortOnDrop,
}

impl Subrequest {
    pub(super) fn spawn(
        session: &mut Session,
        client: ClientInfo,
        body_done: bool,
    ) -> Result<Subrequest> {
        // A subrequest re-reads the request as HTTP/1 text: give an HTTP/2 request the
        // version and `Host` an HTTP/1.1 request would have.
        if session.is_http2() {
            let req = session.req_header_mut();
            req.set_version(Version::HTTP_11);
            if req.headers.get(header::HOST).is_none() {
                if let Some(authority) = req.uri.authority().map(|a| a.to_string()) {
                    req.insert_header(header::HOST, authority)?;
                }
            }
        }
        // pingora re-reads an HTTP/1 client's request from its raw bytes, which lack what
        // `proxy::prepare_upstream_request` changed: the inner pass takes this copy.
        let prepare = !session.is_http2();
        let sub_ctx = SubrequestCtx::builder()
            .body_mode(if body_done {
                BodyMode::NoBody
            } else {
                BodyMode::ExpectBody
            })
            .user_ctx(Box::new(InnerRequest { client, prepare }))
            .build();
        let spawner = session
            .subrequest_spawner
            .as_ref()
            .ok_or_else(|| Error::explain(ErrorType::InternalError, "subrequests not enabled"))?;
        let (subrequest, handle) = spawner.create_subrequest(session.as_downstream(), sub_ctx);
        let task = tokio::spawn(subrequest.run());
        Ok(Subrequest {
            abort: AbortOnDrop(Some(task.abort_handle())),
            task,
            finished: false,
            tx: handle.tx,
            rx: handle.rx,
            wants_body_rx: handle.subreq_wants_body,
            wants_body: false,
            wants_body_closed: false,
            proxy_error_rx: handle.subreq_proxy_error,
            proxy_error_closed: false,
            body_done,
        })
    }

    /// The next task from the subrequest, passing the client's request body to it as
    /// it asks for it.
    async fn next(&mut self, session: &mut Session) -> Result<Up> {
        loop {
            let permit = self.tx.try_reserve();
            tokio::select! {
                biased;

                t = self.rx.recv() => return Ok(t.map_or(Up::Ended, Up::Task)),

                r = &mut self.proxy_error_rx, if !self.proxy_error_closed => match r {
                    Ok(e) => return Ok(Up::Failed(e)),
                    Err(_) => self.proxy_error_closed = true,
                },

                r = &mut self.wants_body_rx, if !self.wants_body && !self.wants_body_closed => {
                    if r.is_ok() { self.wants_body = true } else { self.wants_body_closed = true }
                }

                _ = self.tx.reserve(), if self.wants_body && !self.body_done && permit.is_err() && !self.tx.is_closed() => {}

                b = session.downstream_session.read_body_or_idle(self.body_done),
                    if self.body_done || (self.wants_body && permit.is_ok()) =>
                {
                    let b = b.map_err(|e| e.into_down())?;
                    if self.body_done {
                        // A client with nothing more to send only reads: this was a close.
                        return Error::e_explain(ErrorType::ConnectionClosed, "client closed");
                    }
                    let end = b.is_none() || session.as_downstream_mut().is_body_done();
                    if let Ok(p) = permit {
                        p.send(HttpTask::Body(b, end));
                    }
                    self.body_done = end;
                }

                r = &mut self.task, if !self.finished => {
                    self.finished = true;
                    if let Err(e) = r {
                        if e.is_panic() {
                            return Error::e_explain(ErrorType::InternalError, "subrequest panicked");
                        }
                    }
                }
            }
        }
    }
}

/// Aborts the subrequest task when dropped, unless disarmed.
struct AbortOnDrop(Option<tokio::task::AbortHandle>);

impl AbortOnDrop {
    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(h) = self.0.take() {
            h.abort();
        }
    }
}
