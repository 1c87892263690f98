//! What a stream is keyed on. The replay store is a shared cache of responses, so a
//! stream is keyed as an HTTP cache keys a response (RFC 9111 §4.1):
//!
//! - the **primary key** ([`StreamKey`], built by [`stream_key`] and nowhere else) is the
//!   request as the upstream receives it: route, upstream, method, scheme, the normalised
//!   host, path and query (without the last-event-id parameter), the forwarded host, and
//!   the values of the route's identity headers;
//! - the **secondary key** ([`Audience`]) is what the response says about who else may
//!   read it: the request headers its `Vary` names must match (`Vary: *` matches no one),
//!   and a private response (`Set-Cookie`, `Cache-Control: private` or `no-store`) is
//!   never handed to a request that carries no identity.
//!
//! Also here, because the key depends on it: the one normalisation of the request's
//! host ([`normalize_authority`]) that routing, the key and the upstream all use.
//!
//! Pure: only the `http` types, no pingora.

use std::sync::Arc;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// What identifies one stream (the primary key). Values are kept whole, not hashed,
/// so two different requests can never collide.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StreamKey(Arc<[u8]>);

impl StreamKey {
    /// The key's bytes, to name the stream to another process (see `handover`).
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// A key received from another process. It only ever matches the same bytes, so a
    /// made-up key finds nothing.
    pub fn from_bytes(bytes: &[u8]) -> StreamKey {
        StreamKey(bytes.into())
    }

    /// Builds a key from its parts; each part is length-prefixed so no value can be
    /// crafted to look like another split.
    pub fn new<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> StreamKey {
        let mut buf = Vec::new();
        for p in parts {
            buf.extend_from_slice(&(p.len() as u64).to_le_bytes());
            buf.extend_from_slice(p);
        }
        StreamKey(buf.into())
    }
}

/// The resource a stream request names, as the upstream receives it: everything in the
/// primary key but the identity headers.
#[derive(Debug, Clone)]
pub struct Resource {
    /// Route name (by name, not position, so keys survive reloads).
    pub route: String,
    /// Upstream name.
    pub upstream: String,
    /// Request method.
    pub method: String,
    /// `http` or `https`, as the upstream is told in `X-Forwarded-Proto`.
    pub scheme: &'static str,
    /// The `Host` the upstream receives, normalised ([`normalize_authority`]); empty for
    /// an HTTP/1.0 request without one.
    pub host: String,
    /// The path, as sent.
    pub path: Vec<u8>,
    /// The query, without the last-event-id parameter.
    pub query: Vec<u8>,
}

/// Headers a trusted proxy in front of the gateway may use to name the original host;
/// when they reach the upstream they are part of the URI it sees, so part of the key.
/// (From untrusted clients they never reach the upstream: see `proxy`.)
const FORWARDED_HOST: [&str; 2] = ["x-forwarded-host", "forwarded"];

/// The primary key of a stream request: `resource`, the forwarded-host headers, and the
/// values of the `identity` headers in `headers` (the request as the upstream receives
/// it: on a shared route those were removed, so the key carries none).
pub fn stream_key(resource: &Resource, identity: &[String], headers: &HeaderMap) -> StreamKey {
    let mut parts: Vec<&[u8]> = vec![
        resource.route.as_bytes(),
        resource.upstream.as_bytes(),
        resource.method.as_bytes(),
        resource.scheme.as_bytes(),
        resource.host.as_bytes(),
        &resource.path,
        &resource.query,
    ];
    // Each header as name, count, values: an absent header and an empty one differ,
    // and values cannot slide from one header into the next.
    let counts: Vec<[u8; 8]> = FORWARDED_HOST
        .iter()
        .copied()
        .chain(identity.iter().map(String::as_str))
        .map(|n| (headers.get_all(n).iter().count() as u64).to_le_bytes())
        .collect();
    for (name, count) in FORWARDED_HOST
        .iter()
        .copied()
        .chain(identity.iter().map(String::as_str))
        .zip(&counts)
    {
        parts.push(name.as_bytes());
        parts.push(count);
        parts.extend(headers.get_all(name).iter().map(HeaderValue::as_bytes));
    }
    StreamKey::new(parts)
}

/// Whether the request carries any of the `identity` headers (a non-empty value).
pub fn has_identity(identity: &[String], headers: &HeaderMap) -> bool {
    identity.iter().any(|n| {
        headers
            .get_all(n.as_str())
            .iter()
            .any(|v| !v.as_bytes().iter().all(u8::is_ascii_whitespace))
    })
}

/// The `Cookie` header a browser sends back after a response that set cookies and a
/// request that carried none: `name=value` of each `Set-Cookie`, in order, `; `-joined.
/// `None` when the response sets no cookie (or only removes them).
pub fn cookie_set_by(response: &HeaderMap) -> Option<HeaderValue> {
    let pairs: Vec<&[u8]> = response
        .get_all(header::SET_COOKIE)
        .iter()
        .filter_map(|v| {
            let pair = v.as_bytes().split(|&b| b == b';').next()?.trim_ascii();
            let (name, value) = split_once(pair, b'=')?;
            let expired = v
                .to_str()
                .is_ok_and(|s| s.to_ascii_lowercase().contains("max-age=0"));
            (!name.trim_ascii().is_empty() && !value.is_empty() && !expired).then_some(pair)
        })
        .collect();
    if pairs.is_empty() {
        return None;
    }
    HeaderValue::from_bytes(&pairs.join(&b"; "[..])).ok()
}

fn split_once(s: &[u8], sep: u8) -> Option<(&[u8], &[u8])> {
    let i = s.iter().position(|&b| b == sep)?;
    Some((&s[..i], &s[i + 1..]))
}

/// Who besides the request that opened a stream may read it (the secondary key), from
/// the stream's response and the request that produced it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Audience {
    /// What `Vary` asks to match.
    vary: Vary,
    /// The response is private: only requests that carry an identity (which is in the
    /// primary key) may read it.
    private: bool,
}

/// The request headers a response varies on, with the values the upstream received.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Vary {
    /// Headers (lowercase, sorted, each once) and their values, in order.
    Headers(Vec<(HeaderName, Vec<HeaderValue>)>),
    /// `Vary: *` (or a `Vary` that cannot be read): no other request matches.
    Any,
}

/// Why a request may not read a stream that holds what it asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// The response said `Vary: *`.
    VaryAny,
    /// A header the response varies on differs.
    Vary,
    /// A private response, and the request carries no identity.
    Private,
}

impl Denied {
    /// For metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Denied::VaryAny => "vary_star",
            Denied::Vary => "vary",
            Denied::Private => "private",
        }
    }
}

/// Headers whose values never enter the secondary key: the identity headers are in the
/// primary key already (so a visitor who got a session cookie can still resume, see
/// `cookie_set_by`), and `Last-Event-ID` is what the gateway itself answers.
fn vary_skips(name: &str, identity: &[String]) -> bool {
    name == "last-event-id" || identity.iter().any(|i| i == name)
}

impl Audience {
    /// The audience of a stream whose `response` answered `request` (as the upstream
    /// received it). `shared`: the route declares its streams public, so a response
    /// to an anonymous request (the only kind a shared route sends) is not private.
    pub fn of(
        response: &HeaderMap,
        request: &HeaderMap,
        identity: &[String],
        shared: bool,
    ) -> Self {
        let mut names: Vec<HeaderName> = Vec::new();
        let mut any = false;
        for v in response.get_all(header::VARY) {
            let Ok(v) = v.to_str() else {
                any = true;
                continue;
            };
            for token in v.split(',').map(str::trim).filter(|t| !t.is_empty()) {
                match HeaderName::from_bytes(token.as_bytes()) {
                    _ if token == "*" => any = true,
                    Ok(n) if !vary_skips(n.as_str(), identity) => names.push(n),
                    Ok(_) => {}
                    Err(_) => any = true,
                }
            }
        }
        names.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        names.dedup();
        let vary = if any {
            Vary::Any
        } else {
            Vary::Headers(
                names
                    .into_iter()
                    .map(|n| {
                        let values = request.get_all(&n).iter().cloned().collect();
                        (n, values)
                    })
                    .collect(),
            )
        };
        let private = !shared && is_private(response);
        Audience { vary, private }
    }

    /// Whether another request (its headers as the upstream would receive them) may
    /// read this stream.
    pub fn admits(&self, request: &HeaderMap, has_identity: bool) -> Result<(), Denied> {
        let Vary::Headers(wanted) = &self.vary else {
            return Err(Denied::VaryAny);
        };
        if self.private && !has_identity {
            return Err(Denied::Private);
        }
        let same = wanted
            .iter()
            .all(|(n, values)| request.get_all(n).iter().eq(values.iter()));
        if same {
            Ok(())
        } else {
            Err(Denied::Vary)
        }
    }

    /// The same audience, private as well when `private` (a head kept without its
    /// `Set-Cookie`, which made it private, says so separately).
    pub fn marked_private(mut self, private: bool) -> Self {
        self.private |= private;
        self
    }

    /// Whether the response was private.
    pub fn private(&self) -> bool {
        self.private
    }

    /// Whether no other request can ever match (`Vary: *`).
    pub fn matches_no_one(&self) -> bool {
        self.vary == Vary::Any
    }

    /// The audience as bytes, to compare with another process's (see `handover`): equal
    /// bytes, equal audience. `None` for `Vary: *`, which matches nothing.
    pub fn fingerprint(&self) -> Option<Vec<u8>> {
        let Vary::Headers(wanted) = &self.vary else {
            return None;
        };
        let mut parts: Vec<&[u8]> = vec![if self.private { b"private" } else { b"public" }];
        let counts: Vec<[u8; 8]> = wanted
            .iter()
            .map(|(_, v)| (v.len() as u64).to_le_bytes())
            .collect();
        for ((n, values), count) in wanted.iter().zip(&counts) {
            parts.push(n.as_str().as_bytes());
            parts.push(count);
            parts.extend(values.iter().map(HeaderValue::as_bytes));
        }
        Some(StreamKey::new(parts).as_bytes().to_vec())
    }
}

/// RFC 9111 §3 and §5.2.2: a response a shared cache must not hand to another user.
/// `Set-Cookie` counts too: it makes the response one visitor's (a PHP session).
fn is_private(response: &HeaderMap) -> bool {
    if response.contains_key(header::SET_COOKIE) {
        return true;
    }
    response
        .get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|d| d.split('=').next().unwrap_or("").trim())
        .any(|d| d.eq_ignore_ascii_case("private") || d.eq_ignore_ascii_case("no-store"))
}

/// Why a request's host is refused (400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadHost {
    /// Not an `authority` (RFC 9110 §7.2): spaces, user info, an empty host...
    #[error("malformed host {0:?}")]
    Malformed(String),
    /// More than one `Host` header.
    #[error("more than one Host header")]
    Duplicate,
    /// The request target (absolute form, or HTTP/2 `:authority`) and `Host` differ.
    #[error("the request target names {target:?} but Host says {host:?}")]
    Conflict {
        /// From the request target.
        target: String,
        /// From the `Host` header.
        host: String,
    },
    /// An HTTP/1.1 request without a host (RFC 9112 §3.2).
    #[error("no Host header")]
    Missing,
}

/// Normalises an authority as the key and the upstream use it: lower case, trailing
/// dots removed, the scheme's default port (80, or 443 with `https`) removed, an empty
/// port removed. User info, an empty host and anything that is not an authority are
/// refused.
pub fn normalize_authority(raw: &str, https: bool) -> Result<String, BadHost> {
    let bad = || BadHost::Malformed(raw.chars().take(100).collect());
    if raw.contains('@') || raw.is_empty() {
        return Err(bad());
    }
    let authority: http::uri::Authority = raw.parse().map_err(|_| bad())?;
    let host = authority.host();
    let host = if host.starts_with('[') {
        host.to_ascii_lowercase()
    } else {
        host.trim_end_matches('.').to_ascii_lowercase()
    };
    if host.is_empty() {
        return Err(bad());
    }
    // The port as written (`Authority::port` cannot tell "a.test:" from "a.test").
    let after_host = if raw.starts_with('[') {
        raw.find(']').map_or("", |i| &raw[i + 1..])
    } else {
        raw.rfind(':').map_or("", |i| &raw[i..])
    };
    let port = match after_host.strip_prefix(':') {
        None | Some("") => None,
        Some(p) => Some(p.parse::<u16>().map_err(|_| bad())?),
    };
    let default = if https { 443 } else { 80 };
    Ok(match port {
        Some(p) if p != default => format!("{host}:{p}"),
        _ => host,
    })
}

/// The host of a request: from its target (absolute form, HTTP/2 `:authority`) and its
/// `Host` header, which must agree; normalised. `Ok(None)` only for a request before
/// HTTP/1.1 that names no host.
pub fn request_authority(
    target: Option<&str>,
    host_headers: &[&HeaderValue],
    https: bool,
    http11_or_later: bool,
) -> Result<Option<String>, BadHost> {
    if host_headers.len() > 1 {
        return Err(BadHost::Duplicate);
    }
    let from_header = match host_headers.first() {
        Some(v) => {
            let s = v
                .to_str()
                .map_err(|_| BadHost::Malformed(String::from_utf8_lossy(v.as_bytes()).into()))?;
            Some(normalize_authority(s, https)?)
        }
        None => None,
    };
    let from_target = target.map(|t| normalize_authority(t, https)).transpose()?;
    match (from_target, from_header) {
        (Some(t), Some(h)) if t != h => Err(BadHost::Conflict { target: t, host: h }),
        (Some(t), _) => Ok(Some(t)),
        (None, Some(h)) => Ok(Some(h)),
        (None, None) if http11_or_later => Err(BadHost::Missing),
        (None, None) => Ok(None),
    }
}

/// The host name of a normalised authority, without its port: what routes match on.
pub fn host_name(authority: &str) -> &str {
    if authority.starts_with('[') {
        return authority.find(']').map_or(authority, |i| &authority[..=i]);
    }
    authority.rsplit_once(':').map_or(authority, |(h, _)| h)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resource() -> Resource {
        Resource {
            route: "r".into(),
            upstream: "u".into(),
            method: "GET".into(),
            scheme: "http",
            host: "a.test".into(),
            path: b"/feed.php".to_vec(),
            query: b"x=1".to_vec(),
        }
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn identity() -> Vec<String> {
        vec!["cookie".into(), "authorization".into()]
    }

    fn key(r: &Resource, h: &[(&str, &str)]) -> StreamKey {
        stream_key(r, &identity(), &headers(h))
    }

    #[test]
    fn every_part_of_the_request_separates_keys() {
        let base = key(&resource(), &[]);
        let variants: Vec<fn(&mut Resource)> = vec![
            |r| r.route = "r2".into(),
            |r| r.upstream = "u2".into(),
            |r| r.method = "POST".into(),
            |r| r.scheme = "https",
            |r| r.host = "b.test".into(),
            |r| r.host = "a.test:8080".into(),
            |r| r.path = b"/other.php".to_vec(),
            |r| r.query = b"x=2".to_vec(),
            |r| r.query = Vec::new(),
        ];
        for change in variants {
            let mut r = resource();
            change(&mut r);
            assert_ne!(key(&r, &[]), base, "{r:?}");
        }
        let r = resource();
        for h in [
            &[("cookie", "user=a")][..],
            &[("cookie", "")],
            &[("authorization", "Bearer a")],
            &[("x-forwarded-host", "b.test")],
            &[("forwarded", "host=b.test")],
        ] {
            assert_ne!(key(&r, h), base, "{h:?}");
        }
        assert_ne!(
            key(&r, &[("cookie", "user=a")]),
            key(&r, &[("cookie", "user=b")])
        );
        assert_ne!(
            key(&r, &[("authorization", "Bearer a")]),
            key(&r, &[("authorization", "Bearer b")])
        );
        // A value cannot pose as another header's.
        assert_ne!(
            key(&r, &[("cookie", "a"), ("cookie", "b")]),
            key(&r, &[("cookie", "a"), ("authorization", "b")])
        );
        // Headers that are not identity headers do not split streams (Vary does).
        assert_eq!(key(&r, &[("accept-language", "de")]), base);
        assert_eq!(
            key(&r, &[("cookie", "user=a")]),
            key(&r, &[("cookie", "user=a")])
        );
    }

    #[test]
    fn vary_names_headers_that_must_match() {
        let id = identity();
        let req_de = headers(&[("accept-language", "de")]);
        let req_fr = headers(&[("accept-language", "fr")]);
        let resp = headers(&[("vary", "Accept-Language, accept-encoding")]);
        let a = Audience::of(&resp, &req_de, &id, false);
        assert_eq!(a.admits(&req_de, false), Ok(()));
        assert_eq!(a.admits(&req_fr, false), Err(Denied::Vary));
        assert_eq!(a.admits(&HeaderMap::new(), false), Err(Denied::Vary));
        // No Vary: anyone with the same primary key.
        let none = Audience::of(&HeaderMap::new(), &req_de, &id, false);
        assert_eq!(none.admits(&req_fr, false), Ok(()));
        // Vary: * matches nobody, and a Vary that cannot be read counts as *.
        for v in ["*", "accept, *", "bad header name"] {
            let star = Audience::of(&headers(&[("vary", v)]), &req_de, &id, false);
            assert_eq!(star.admits(&req_de, true), Err(Denied::VaryAny), "{v}");
            assert!(star.fingerprint().is_none());
        }
        // Identity headers and Last-Event-ID are in the primary key or ours to answer.
        let cookie = Audience::of(
            &headers(&[("vary", "Cookie, Last-Event-ID")]),
            &HeaderMap::new(),
            &id,
            false,
        );
        assert_eq!(
            cookie.admits(&headers(&[("cookie", "s=1"), ("last-event-id", "4")]), true),
            Ok(())
        );
        assert_eq!(
            a.fingerprint(),
            Audience::of(&resp, &req_de, &id, false).fingerprint()
        );
        assert_ne!(
            a.fingerprint(),
            Audience::of(&resp, &req_fr, &id, false).fingerprint()
        );
    }

    #[test]
    fn private_responses_need_an_identity() {
        let id = identity();
        let req = HeaderMap::new();
        for resp in [
            headers(&[("set-cookie", "PHPSESSID=abc; path=/")]),
            headers(&[("cache-control", "no-store, no-cache, must-revalidate")]),
            headers(&[("cache-control", "Private")]),
            headers(&[("cache-control", "private=\"set-cookie\"")]),
        ] {
            let a = Audience::of(&resp, &req, &id, false);
            assert!(a.private(), "{resp:?}");
            assert_eq!(a.admits(&req, false), Err(Denied::Private));
            assert_eq!(a.admits(&req, true), Ok(()));
            // A shared route declares its (anonymous) streams public.
            assert!(!Audience::of(&resp, &req, &id, true).private());
            assert_ne!(
                a.fingerprint(),
                Audience::of(&HeaderMap::new(), &req, &id, false).fingerprint()
            );
        }
        let public = headers(&[("cache-control", "no-cache")]);
        assert!(!Audience::of(&public, &req, &id, false).private());
        assert!(has_identity(&id, &headers(&[("cookie", "a=1")])));
        assert!(!has_identity(&id, &headers(&[("cookie", " ")])));
        assert!(!has_identity(&id, &headers(&[("x-other", "a")])));
    }

    #[test]
    fn the_cookie_a_response_sets() {
        let set = headers(&[
            ("set-cookie", "PHPSESSID=abc; path=/; HttpOnly"),
            ("set-cookie", "theme=dark"),
            ("set-cookie", "old=; Max-Age=0"),
        ]);
        assert_eq!(
            cookie_set_by(&set).unwrap(),
            HeaderValue::from_static("PHPSESSID=abc; theme=dark")
        );
        assert!(cookie_set_by(&HeaderMap::new()).is_none());
        assert!(cookie_set_by(&headers(&[("set-cookie", "gone=x; max-age=0")])).is_none());
    }

    #[test]
    fn hosts_are_normalised_once() {
        for (raw, https, want) in [
            ("A.Test", false, "a.test"),
            ("a.test.", false, "a.test"),
            ("a.test.:80", false, "a.test"),
            ("a.test:80", false, "a.test"),
            ("a.test:443", true, "a.test"),
            ("a.test:443", false, "a.test:443"),
            ("a.test:", false, "a.test"),
            ("a.test:8080", false, "a.test:8080"),
            ("127.0.0.1:80", false, "127.0.0.1"),
            ("[::1]:8080", false, "[::1]:8080"),
            ("[::1]", true, "[::1]"),
        ] {
            assert_eq!(
                normalize_authority(raw, https).as_deref(),
                Ok(want),
                "{raw}"
            );
        }
        for raw in ["", "user@a.test", "a test", ":80", "a.test:http", "."] {
            assert!(normalize_authority(raw, false).is_err(), "{raw}");
        }
        assert_eq!(host_name("a.test:8080"), "a.test");
        assert_eq!(host_name("[::1]:8080"), "[::1]");
        assert_eq!(host_name("a.test"), "a.test");
    }

    #[test]
    fn target_and_host_header_must_agree() {
        let h = |s: &'static str| HeaderValue::from_static(s);
        let (a, b) = (h("a.test"), h("b.test"));
        assert_eq!(
            request_authority(Some("A.test:80"), &[&a], false, true),
            Ok(Some("a.test".into()))
        );
        assert!(matches!(
            request_authority(Some("b.test"), &[&a], false, true),
            Err(BadHost::Conflict { .. })
        ));
        assert_eq!(
            request_authority(None, &[&a, &b], false, true),
            Err(BadHost::Duplicate)
        );
        assert_eq!(
            request_authority(None, &[&a, &a], false, true),
            Err(BadHost::Duplicate)
        );
        assert_eq!(
            request_authority(Some("b.test"), &[], false, true),
            Ok(Some("b.test".into()))
        );
        assert_eq!(
            request_authority(None, &[], false, true),
            Err(BadHost::Missing)
        );
        assert_eq!(request_authority(None, &[], false, false), Ok(None));
    }
}
