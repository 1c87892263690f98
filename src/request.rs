//! One client request: what the gateway knows of its client ([`ClientInfo`]), and the
//! request as the upstream receives it, prepared once ([`prepare_upstream_request`]):
//! the one normalised host, forwarding headers, hop-by-hop hygiene.

use std::sync::Arc;

use http::header;
use pingora::prelude::*;
use pingora::ErrorType;

use crate::config::Route;
use crate::key::{self, BadHost};
use crate::limit::ClientKey;
use crate::live::Live;

/// Facts about the client and its route, computed once per request.
#[derive(Clone, Debug)]
pub struct ClientInfo {
    /// The peer's IP as text, appended to `X-Forwarded-For`.
    pub ip: Option<String>,
    /// The client's address as limits see it (trusted proxies resolved), for logs.
    pub client_ip: Option<std::net::IpAddr>,
    /// The client's limiting key.
    pub key: Option<ClientKey>,
    /// `https` or `http`, for `X-Forwarded-Proto` and the stream key.
    pub proto: &'static str,
    /// The request's host, normalised once: routing, the stream key and the upstream's
    /// `Host` all use this value. `None` only for an HTTP/1.0 request that names none.
    pub host: Option<String>,
    /// The peer is a trusted proxy: its forwarding headers are kept and appended to.
    pub trusted_peer: bool,
    /// The route chosen for the request.
    pub route: Arc<Route>,
    /// Index of the route's upstream.
    pub upstream_index: usize,
    /// The configuration the request runs under.
    pub live: Arc<Live>,
}

impl ClientInfo {
    /// The route's upstream servers in the order to try them: round-robin from this
    /// request's turn, each once. `Err` when the upstream has none.
    pub fn servers_in_turn(&self) -> Result<impl Iterator<Item = std::net::SocketAddr> + '_> {
        let servers = &self.route.upstream.servers;
        let n = servers.len();
        if n == 0 {
            return Error::e_explain(ErrorType::ConnectNoRoute, "upstream has no servers");
        }
        let first = self.live.next_server(self.upstream_index);
        Ok((0..n).map(move |i| servers[(first + i) % n]))
    }

    /// A connect to `server` failed (the `tries`th): counted and logged, once here for
    /// both upstream paths.
    pub fn connect_failed(
        &self,
        metrics: &crate::metrics::Metrics,
        server: std::net::SocketAddr,
        tries: usize,
        e: &Error,
    ) {
        let name = self.route.upstream.name.as_str();
        metrics.upstream_errors.with_label_values(&[name]).inc();
        tracing::warn!(server = %server, tries, "upstream connect failed: {e}");
    }
}

/// Does the client say it wants an event stream?
pub fn accepts_event_stream(req: &RequestHeader) -> bool {
    req.headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|m| {
            m.split(';')
                .next()
                .is_some_and(|t| t.trim().eq_ignore_ascii_case("text/event-stream"))
        })
}

/// Hop-by-hop fields: they describe one connection, not the message. (pingora frames
/// bodies by `Transfer-Encoding`, so that one is handled where a body is written.)
pub const HOP_BY_HOP: [&str; 6] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
];

/// The field names a `Connection` header nominates as hop-by-hop, lowercased.
pub fn connection_nominated(headers: &http::HeaderMap) -> Vec<String> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty() && t != "close" && t != "keep-alive")
        .collect()
}

/// Removes the upstream connection's hop-by-hop fields from a response.
pub fn strip_hop_by_hop(resp: &mut ResponseHeader) {
    for name in connection_nominated(&resp.headers) {
        resp.remove_header(&name);
    }
    for name in HOP_BY_HOP {
        resp.remove_header(name);
    }
}

/// Headers that name the client or the original request to the upstream. Believed
/// only from trusted proxies; from anyone else they are dropped (the gateway then says
/// who the client is itself), so a client can neither pose as another address nor,
/// through `X-Forwarded-Host`, as another site.
const FORWARDING: [&str; 5] = [
    "x-forwarded-for",
    "forwarded",
    "x-real-ip",
    "x-forwarded-host",
    "x-forwarded-proto",
];

/// Turns the client's request into the one the upstream receives, once, before the
/// relay (or pingora's proxy path, for an upgrade) copies it, so the stream key (built
/// from it) is what the upstream sees:
/// - `Host` is the one normalised host, and the target is in origin form;
/// - HTTP/2 cookie crumbs are one `Cookie` line, `; `-joined (RFC 9113 §8.2.3);
/// - forwarding headers: believed and appended to from a trusted proxy, replaced from
///   anyone else (`X-Forwarded-For` is the peer, `X-Forwarded-Proto` the scheme);
/// - the route's `token_param` leaves the query for `Authorization: Bearer …`;
/// - a stream request asks for no compression (gzip does not flush per event; asking
///   for identity keeps mod_deflate and PHP's zlib output off);
/// - a GET on a shared route carries no identity (`Cookie`, `Authorization`, the
///   route's identity headers): what is shared is what an anonymous visitor gets.
pub fn prepare_upstream_request(req: &mut RequestHeader, client: &ClientInfo) -> Result<()> {
    if let Some(host) = &client.host {
        req.insert_header(header::HOST, host.as_str())?;
    }
    if target_authority(req).is_some() {
        // Origin form: the upstream learns the host from `Host` alone.
        let target = req.uri.path_and_query().map_or("/", |p| p.as_str());
        let uri = http::Uri::try_from(target)
            .map_err(|e| Error::because(ErrorType::InvalidHTTPHeader, "request target", e))?;
        req.set_uri(uri);
    }
    join_cookie_crumbs(req)?;
    if let Some(param) = &client.route.token_param {
        move_query_token(req, param)?;
    }
    let xff = if client.trusted_peer {
        let prev: Vec<&str> = req
            .headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .collect();
        let mut all = prev.join(", ");
        if let Some(ip) = &client.ip {
            if !all.is_empty() {
                all.push_str(", ");
            }
            all.push_str(ip);
        }
        all
    } else {
        for name in FORWARDING {
            req.remove_header(name);
        }
        client.ip.clone().unwrap_or_default()
    };
    if !xff.is_empty() {
        req.insert_header("x-forwarded-for", xff)?;
    }
    req.insert_header("x-forwarded-proto", client.proto)?;
    if accepts_event_stream(req) {
        req.remove_header(&header::ACCEPT_ENCODING);
    }
    let replay = &client.route.replay;
    if replay.enabled && replay.shared && req.method == http::Method::GET {
        req.remove_header(&header::COOKIE);
        req.remove_header(&header::AUTHORIZATION);
        for name in &replay.identity_headers {
            req.remove_header(name.as_str());
        }
    }
    Ok(())
}

/// HTTP/2 clients may split `Cookie` into one field per pair; an HTTP/1.1 upstream
/// (Apache joins repeated fields with `, `) and the stream key need the one line.
fn join_cookie_crumbs(req: &mut RequestHeader) -> Result<()> {
    if req.headers.get_all(header::COOKIE).iter().nth(1).is_none() {
        return Ok(());
    }
    let joined: Vec<u8> = req
        .headers
        .get_all(header::COOKIE)
        .iter()
        .map(http::HeaderValue::as_bytes)
        .collect::<Vec<_>>()
        .join(&b"; "[..]);
    let value = http::HeaderValue::from_bytes(&joined)
        .map_err(|e| Error::because(ErrorType::InvalidHTTPHeader, "cookie", e))?;
    req.insert_header(header::COOKIE, value)
}

/// Moves the token parameter `param` out of the query into `Authorization: Bearer …`
/// (a request that has its own `Authorization` keeps it; the parameter goes either way).
/// The rest of the query keeps its bytes as they came.
fn move_query_token(req: &mut RequestHeader, param: &str) -> Result<()> {
    let Some(query) = req.uri.query() else {
        return Ok(());
    };
    let mut token = None;
    let mut kept = vec![];
    for piece in query.split('&') {
        match form_urlencoded::parse(piece.as_bytes()).next() {
            Some((name, value)) if name == param => {
                token.get_or_insert(value.into_owned());
            }
            _ => kept.push(piece),
        }
    }
    let Some(token) = token else {
        return Ok(());
    };
    if !req.raw_path_is_utf8() {
        // The URI is a lossy copy of such a target: rebuilt from it, the rest of the
        // query would not reach the upstream as sent.
        return Error::e_explain(
            ErrorType::HTTPStatus(400),
            "query token in a non-UTF-8 target",
        );
    }
    let mut target = req.uri.path().to_owned();
    if !kept.is_empty() {
        target.push('?');
        target.push_str(&kept.join("&"));
    }
    let bad = |e: Box<dyn std::error::Error + Send + Sync>| {
        Error::because(ErrorType::HTTPStatus(400), "query token", e)
    };
    req.set_uri(http::Uri::try_from(target).map_err(|e| bad(e.into()))?);
    if req.headers.get(header::AUTHORIZATION).is_none() && !token.is_empty() {
        let value =
            http::HeaderValue::try_from(format!("Bearer {token}")).map_err(|e| bad(e.into()))?;
        req.insert_header(header::AUTHORIZATION, value)?;
    }
    Ok(())
}

/// The authority the request target names: HTTP/2's `:authority`, or an HTTP/1
/// absolute-form target (which pingora keeps verbatim beside a path-only URI).
fn target_authority(req: &RequestHeader) -> Option<String> {
    if let Some(a) = req.uri.authority() {
        return Some(a.as_str().to_owned());
    }
    let raw = req.raw_path();
    if raw.starts_with(b"/") || raw == b"*" {
        return None;
    }
    let uri = http::Uri::try_from(raw).ok()?;
    uri.authority().map(|a| a.as_str().to_owned())
}

/// The request's host, normalised once (see [`key::request_authority`]), or why it is
/// refused.
pub fn request_authority(req: &RequestHeader, https: bool) -> Result<Option<String>, BadHost> {
    let hosts: Vec<&http::HeaderValue> = req.headers.get_all(header::HOST).iter().collect();
    key::request_authority(
        target_authority(req).as_deref(),
        &hosts,
        https,
        req.version >= http::Version::HTTP_11,
    )
}

/// RFC 9110 §8.6 lets a proxy take `Content-Length: 3, 3` as 3 or refuse it; pingora
/// and the two upstream paths would read it differently, so it is refused (as are two
/// `Content-Length` lines).
pub fn content_length_is_one_number(req: &RequestHeader) -> bool {
    let mut values = req.headers.get_all(header::CONTENT_LENGTH).iter();
    match (values.next(), values.next()) {
        (None, _) => true,
        (Some(v), None) => !v.is_empty() && v.as_bytes().iter().all(u8::is_ascii_digit),
        (Some(_), Some(_)) => false,
    }
}
