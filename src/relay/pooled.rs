//! Every request reaches the upstream over pingora's pool of HTTP/1.1 connections
//! ([`Pool`]). The request head and body go out, and the response is read, in the task
//! that consumes it (the client's relay, or a hub's pump once a stream becomes a hub):
//! one pass through pingora per request, no second session, no channel between two
//! tasks. Once both directions are complete the connection goes back to the pool;
//! dropped before that (a client that left, a stream that ended), it is closed, which is
//! how a client's disconnect reaches the upstream at once.
//!
//! Event streams take this path too: a quiet stream costs what pingora's HTTP/1.1 client
//! session holds, which is less than hyper's client held (an 8 KiB write buffer, an
//! 8 KiB read buffer and a body channel per connection): see BENCHMARKS.md.

use std::sync::Arc;

use http::{header, Version};
use pingora::connectors::http::v1::Connector;
use pingora::connectors::ConnectorOptions;
use pingora::prelude::*;
use pingora::protocols::http::v1::client::HttpSession as H1;
use pingora::protocols::http::HttpTask;
use pingora::{ErrorType, RetryType};

use crate::metrics::Metrics;
use crate::request::{self, ClientInfo};

/// The process's pool of upstream connections (it outlives reloads).
#[derive(Clone)]
pub struct Pool(Arc<Connector>);

impl Pool {
    /// A pool sized as pingora's own proxy sizes its pool.
    pub fn new(conf: &pingora::server::configuration::ServerConf) -> Pool {
        Pool(Arc::new(Connector::new(Some(
            ConnectorOptions::from_server_conf(conf),
        ))))
    }
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

/// One request and its response on a pooled connection.
pub(super) struct Pooled {
    http: H1,
    peer: HttpPeer,
    pool: Pool,
    /// The connection came from the pool (the server may have closed it meanwhile).
    reused: bool,
    /// The request may go again on another connection: it has no body, and its
    /// response has not begun.
    resendable: bool,
    /// The client's request body is all sent upstream.
    body_done: bool,
    /// The response was read to its end.
    response_done: bool,
}

impl Pooled {
    /// Sends the head of `req` (already prepared for the upstream, see
    /// `request::prepare_upstream_request`) to the route's upstream: servers in
    /// round-robin order, moving on when a connect fails (nothing was sent yet, so that
    /// is safe for any method). `has_body`: the client sends a body; `body_done`: all
    /// of it has been read already.
    pub(super) async fn open(
        req: &RequestHeader,
        has_body: bool,
        body_done: bool,
        client: &ClientInfo,
        pool: &Pool,
        metrics: &Metrics,
    ) -> Result<Pooled> {
        let head = Box::new(upstream_head(req, has_body)?);
        let upstream = &client.route.upstream;
        let mut last_error = None;
        let mut head = Some(head);
        for (i, addr) in client.servers_in_turn()?.enumerate() {
            let mut peer = HttpPeer::new(addr, false, String::new());
            peer.options.connection_timeout = Some(upstream.connect_timeout);
            // Streams may be quiet for hours: no read timeout on the upstream. The relay
            // bounds the wait for the response header itself.
            peer.options.read_timeout = None;
            peer.options.idle_timeout = None;
            // A pooled connection the server closed meanwhile fails on first use: the
            // same server is tried once more, on another connection.
            for _ in 0..2 {
                let (http, reused) = match pool.0.get_http_session(&peer).await {
                    Ok(s) => s,
                    Err(e) => {
                        client.connect_failed(metrics, addr, i + 1, &e);
                        last_error = Some(e);
                        break;
                    }
                };
                metrics
                    .upstream_connections
                    .with_label_values(&[upstream.name.as_str(), if reused { "yes" } else { "no" }])
                    .inc();
                let mut pooled = Pooled {
                    http,
                    peer: peer.clone(),
                    pool: pool.clone(),
                    reused,
                    resendable: !has_body,
                    body_done: body_done || !has_body,
                    response_done: false,
                };
                // Built again only in the rare case that it must go again.
                let h = match head.take() {
                    Some(h) => h,
                    None => Box::new(upstream_head(req, has_body)?),
                };
                match pooled.http.write_request_header(h).await {
                    Ok(_) => return Ok(pooled),
                    Err(e) if reused => last_error = Some(e),
                    Err(e) => return Err(e.into_up()),
                }
            }
        }
        Err(last_error
            .unwrap_or_else(|| Error::explain(ErrorType::ConnectNoRoute, "no upstream server")))
    }

    /// The next piece of the response, passing the client's request body on as it
    /// comes (both directions at once, as pingora's proxy does) and watching the
    /// client: a client that closes ends the wait with `Err`.
    pub(super) async fn next(&mut self, session: &mut Session) -> Result<Up> {
        if self.response_done {
            return Ok(Up::Ended);
        }
        loop {
            tokio::select! {
                biased;
                t = self.http.read_response_task(), if !self.response_done => {
                    let t = self.resend_if_stale(t, session.req_header()).await;
                    return Ok(self.took(t));
                }
                b = session.downstream_session.read_body_or_idle(self.body_done) => {
                    let b = b.map_err(|e| e.into_down())?;
                    if self.body_done {
                        // A client with nothing more to send only reads: this was a close.
                        return Error::e_explain(ErrorType::ConnectionClosed, "client closed");
                    }
                    let end = b.is_none() || session.as_downstream_mut().is_body_done();
                    if let Some(b) = b.filter(|b| !b.is_empty()) {
                        self.http.write_body(&b).await.map_err(|e| e.into_up())?;
                    }
                    if end {
                        self.http.finish_body().await.map_err(|e| e.into_up())?;
                        self.body_done = true;
                    }
                }
            }
        }
    }

    /// The client's request body has all gone to the upstream (or there was none): the
    /// response can be read without the client's session.
    pub(super) fn body_sent(&self) -> bool {
        self.body_done
    }

    /// The final response header of `req` (sent by [`Pooled::open`]), for a caller
    /// without a client session to watch (a cluster node taking a stream over);
    /// informational ones are skipped, having nobody to go to.
    pub(super) async fn first_task(&mut self, req: &RequestHeader) -> Up {
        loop {
            let t = self.http.read_response_task().await;
            let t = self.resend_if_stale(t, req).await;
            match self.took(t) {
                Up::Task(HttpTask::Header(resp, false)) if resp.status.is_informational() => {}
                up => return up,
            }
        }
    }

    /// The next piece of the response, for a hub's pump (no client to watch; a stream
    /// that becomes a hub has no body left to send).
    pub(super) async fn next_task(&mut self) -> Option<HttpTask> {
        if self.response_done {
            return None;
        }
        let t = self.http.read_response_task().await;
        match self.took(t) {
            Up::Task(t) => Some(t),
            Up::Failed(e) => Some(HttpTask::Failed(e)),
            Up::Ended => None,
        }
    }

    /// Notes what a response read gave.
    fn took(&mut self, t: Result<HttpTask>) -> Up {
        match t {
            Ok(HttpTask::Header(mut resp, end)) => {
                if !resp.status.is_informational() {
                    // The response began: no request goes again from here.
                    self.resendable = false;
                }
                request::strip_hop_by_hop(&mut resp);
                self.response_done |= end;
                Up::Task(HttpTask::Header(resp, end))
            }
            Ok(t) => {
                self.response_done |= t.is_end();
                Up::Task(t)
            }
            Err(e) => {
                self.response_done = true;
                Up::Failed(e.into_up())
            }
        }
    }

    /// A reused connection the server had closed (the read failed before any response
    /// byte): `req` once more, on a fresh connection.
    async fn resend_if_stale(
        &mut self,
        t: Result<HttpTask>,
        req: &RequestHeader,
    ) -> Result<HttpTask> {
        match t {
            Err(e) if self.reused && self.resendable && e.retry != RetryType::Decided(false) => {
                self.resendable = false;
                match upstream_head(req, false) {
                    Ok(head) => self.again(Box::new(head)).await,
                    Err(_) => Err(e),
                }
            }
            t => t,
        }
    }

    /// Sends `head` again on a fresh connection and reads its response's first task.
    async fn again(&mut self, head: Box<RequestHeader>) -> Result<HttpTask> {
        let (http, _) = self.pool.0.get_http_session(&self.peer).await?;
        self.http = http;
        self.reused = false;
        self.http.write_request_header(head).await?;
        self.http.read_response_task().await
    }

    /// Both directions are complete: the connection goes back to the pool.
    pub(super) async fn finish(self) {
        if self.response_done && self.body_done {
            self.pool
                .0
                .release_http_session(self.http, &self.peer, None)
                .await;
        }
    }
}

/// The request as an HTTP/1.1 upstream gets it: the client's head (prepared for the
/// upstream) without hop-by-hop fields, with `Host` for an HTTP/2 request, and framed
/// for its body (`Content-Length` as the client sent it, else chunked).
fn upstream_head(req: &RequestHeader, has_body: bool) -> Result<RequestHeader> {
    let mut head = req.clone();
    head.set_version(Version::HTTP_11);
    // Most requests carry none of these: look before removing each by name.
    let hop = |n: &header::HeaderName| {
        request::HOP_BY_HOP.contains(&n.as_str())
            || n == header::TRANSFER_ENCODING
            || n.as_str() == "http2-settings"
    };
    if head.headers.keys().any(hop) {
        for name in request::connection_nominated(&head.headers) {
            head.remove_header(&name);
        }
        for name in request::HOP_BY_HOP {
            head.remove_header(name);
        }
        head.remove_header(&header::TRANSFER_ENCODING);
        head.remove_header("http2-settings");
    }
    if head.headers.get(header::HOST).is_none() {
        if let Some(authority) = head.uri.authority().map(|a| a.to_string()) {
            head.insert_header(header::HOST, authority)?;
        }
    }
    if has_body && head.headers.get(header::CONTENT_LENGTH).is_none() {
        head.insert_header(header::TRANSFER_ENCODING, "chunked")?;
    }
    Ok(head)
}
