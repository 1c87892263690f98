//! The stream client: how a request that asks for an event stream reaches the upstream.
//!
//! Such a request (an `EventSource` GET) may hold its upstream connection for hours, and
//! most of that time nothing arrives. pingora's proxy path keeps a 64 KiB body buffer
//! and a second HTTP session per proxied request, and passes every chunk through a
//! channel to the relay; for thousands of quiet streams that is most of the gateway's
//! memory, and for busy ones an extra task hop per event. So these requests go out on a
//! connection of their own, spoken by hyper's HTTP/1.1 client (which reads into a buffer
//! sized by what actually arrives), and the response is read in the task that consumes
//! it: the client's relay, or the hub's pump once the stream becomes a hub.
//!
//! Every other request keeps pingora's path (with its connection pool): a stream
//! connection is never reused after its response anyway.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;

use bytes::Bytes;
use http::{header, Request, Version};
use http_body_util::{BodyExt, Empty};
use hyper::body::{Body as _, Incoming};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use pingora::prelude::*;
use pingora::protocols::http::HttpTask;
use pingora::ErrorType;
use tokio::net::TcpStream;

use crate::metrics::Metrics;
use crate::request::{self, ClientInfo};

type Conn = http1::Connection<TokioIo<TcpStream>, Empty<Bytes>>;
type ResponseFuture = Pin<Box<dyn Future<Output = hyper::Result<http::Response<Incoming>>> + Send>>;

/// One request and its response, on a connection of its own.
pub struct Exchange {
    /// The connection; polled alongside the response, since it does the reading.
    conn: Option<Conn>,
    /// The response header, until it arrives.
    response: Option<ResponseFuture>,
    /// The response body, until it ends.
    body: Option<Incoming>,
}

/// Sends `req` (a GET without a body) to the route's upstream: connects to its servers
/// in round-robin order, moving on to the next one when a connect fails (nothing was
/// sent yet, so that is safe), and writes the request head with the forwarding headers.
pub async fn open(req: &RequestHeader, client: &ClientInfo, metrics: &Metrics) -> Result<Exchange> {
    let upstream = &client.route.upstream;
    let mut last_error = None;
    let mut stream = None;
    for (i, addr) in client.servers_in_turn()?.enumerate() {
        match connect(addr, upstream.connect_timeout).await {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => {
                client.connect_failed(metrics, addr, i + 1, &e);
                last_error = Some(e);
            }
        }
    }
    let Some(stream) = stream else {
        return Err(last_error.unwrap_or_else(|| {
            Error::explain(ErrorType::ConnectNoRoute, "no upstream server to try")
        }));
    };
    metrics
        .upstream_connections
        .with_label_values(&[upstream.name.as_str(), "no"])
        .inc();

    let (mut sender, conn) = http1::Builder::new()
        // pingora's own limit for the rest of the traffic (hyper's default is 100).
        .max_headers(256)
        .handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
        .await
        .map_err(|e| upstream_error(ErrorType::ConnectError, "handshake", e))?;
    let request = upstream_request(req)?;
    let response = Box::pin(sender.send_request(request));
    // Dropping the sender now lets the connection close once this response is over.
    drop(sender);
    Ok(Exchange {
        conn: Some(conn),
        response: Some(response),
        body: None,
    })
}

async fn connect(addr: SocketAddr, timeout: std::time::Duration) -> Result<TcpStream> {
    let stream = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(upstream_error(ErrorType::ConnectRefused, "connect", e)),
        Err(_) => return Error::e_explain(ErrorType::ConnectTimedout, "connect timed out"),
    };
    // Events are small and must not wait for more to fill a segment.
    stream
        .set_nodelay(true)
        .map_err(|e| upstream_error(ErrorType::ConnectError, "set TCP_NODELAY", e))?;
    Ok(stream)
}

fn upstream_error(
    etype: ErrorType,
    what: &'static str,
    e: impl Into<Box<dyn std::error::Error + Send + Sync>>,
) -> Box<Error> {
    Error::because(etype, what, e).into_up()
}

/// The request as the upstream gets it: the client's header (already prepared for the
/// upstream, see `request::prepare_upstream_request`) without its hop-by-hop fields, in
/// HTTP/1.1 form.
fn upstream_request(req: &RequestHeader) -> Result<Request<Empty<Bytes>>> {
    let mut head = RequestHeader::build(
        req.method.clone(),
        req.uri
            .path_and_query()
            .map_or(b"/".as_slice(), |p| p.as_str().as_bytes()),
        Some(req.headers.len() + 3),
    )?;
    let nominated = request::connection_nominated(&req.headers);
    for (name, value) in &req.headers {
        let skip = request::HOP_BY_HOP.contains(&name.as_str())
            || nominated.iter().any(|n| n == name.as_str())
            // hyper frames the (empty) body itself.
            || name == header::TRANSFER_ENCODING
            || name == header::CONTENT_LENGTH
            || name.as_str() == "http2-settings";
        if !skip {
            head.append_header(name.clone(), value.clone())?;
        }
    }
    if head.headers.get(header::HOST).is_none() {
        // An HTTP/2 client names the host in the URI only.
        if let Some(authority) = req.uri.authority().map(|a| a.to_string()) {
            head.insert_header(header::HOST, authority)?;
        }
    }

    let mut out = Request::builder()
        .method(head.method.clone())
        .uri(head.uri.clone())
        .version(Version::HTTP_11)
        .body(Empty::new())
        .map_err(|e| Error::because(ErrorType::InternalError, "building upstream request", e))?;
    *out.headers_mut() = head.headers.clone();
    Ok(out)
}

impl Exchange {
    /// The next piece of the response, in the form pingora's HTTP client hands it out:
    /// the header, body bytes, then `Body(None, true)` at the end or `Failed`.
    /// `None` once the response is over.
    pub async fn next(&mut self) -> Option<HttpTask> {
        loop {
            if let Some(response) = self.response.as_mut() {
                tokio::select! {
                    r = response => {
                        self.response = None;
                        return Some(match r {
                            Ok(resp) => self.header(resp),
                            Err(e) => HttpTask::Failed(upstream_error(ErrorType::ReadError, "reading the response header", e)),
                        });
                    }
                    r = drive(&mut self.conn) => {
                        if let Err(e) = r {
                            self.response = None;
                            return Some(HttpTask::Failed(e));
                        }
                    }
                }
                continue;
            }
            let body = self.body.as_mut()?;
            tokio::select! {
                f = body.frame() => match f {
                    Some(Ok(frame)) => {
                        // Trailers carry nothing an event stream needs.
                        if let Ok(data) = frame.into_data() {
                            if !data.is_empty() {
                                return Some(HttpTask::Body(Some(data), false));
                            }
                        }
                    }
                    Some(Err(e)) => {
                        self.body = None;
                        return Some(HttpTask::Failed(upstream_error(ErrorType::ReadError, "reading the response body", e)));
                    }
                    None => {
                        self.body = None;
                        return Some(HttpTask::Body(None, true));
                    }
                },
                r = drive(&mut self.conn) => {
                    if let Err(e) = r {
                        self.body = None;
                        return Some(HttpTask::Failed(e));
                    }
                }
            }
        }
    }

    fn header(&mut self, resp: http::Response<Incoming>) -> HttpTask {
        let (parts, body) = resp.into_parts();
        let end = body.is_end_stream();
        let mut head = match ResponseHeader::build(parts.status, Some(parts.headers.len())) {
            Ok(h) => h,
            Err(e) => return HttpTask::Failed(e),
        };
        for (name, value) in &parts.headers {
            if let Err(e) = head.append_header(name.clone(), value.clone()) {
                return HttpTask::Failed(e);
            }
        }
        request::strip_hop_by_hop(&mut head);
        if !end {
            self.body = Some(body);
        }
        HttpTask::Header(Box::new(head), end)
    }
}

/// Runs the connection until it is done; never resolves once it is.
async fn drive(conn: &mut Option<Conn>) -> Result<()> {
    let Some(c) = conn.as_mut() else {
        return std::future::pending().await;
    };
    let r = c.await;
    *conn = None;
    r.map_err(|e| upstream_error(ErrorType::ReadError, "upstream connection", e))
}
