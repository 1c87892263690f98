//! A stream request on a replay route meets the hubs: it resumes or joins a live hub,
//! or its upstream response becomes a new hub (fed by a [`Pump`]); either way the
//! client then follows the hub through the stream writer.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header;
use pingora::prelude::*;

use super::admit::{admit_stream, Admission, Admit};
use super::pooled::{Pool, Pooled};
use super::pump::pump;
use super::remote::{self, stored_audience, Clustered, Lead};
use super::stream::{Begun, HubSource, StreamMetrics, Writer};
use super::RelayStats;
use crate::cluster::{self, Cluster};
use crate::config::{ReplaySettings, Route};
use crate::handover::{Import, Source as Handover};
use crate::hub::{Hub, Miss, NewHub, Registry, Start, StreamKey, Subscription, Viewer};
use crate::key::{self, Audience};
use crate::limit::ClientKey;
use crate::metrics::Metrics;
use crate::replay::{resume_request, Budget, MemoryRing};
use crate::request::ClientInfo;

/// What a GET stream request needs to use hubs (replay, linger, sharing).
pub struct ReplayCx {
    /// Where hubs live.
    pub registry: Arc<Registry>,
    /// After a graceful upgrade: the old process's streams, to seed new hubs from.
    pub handover: Option<Arc<Handover>>,
    /// The total byte budget of replay stores.
    pub budget: Arc<Budget>,
    /// The request's stream key.
    pub key: StreamKey,
    /// What the key was built from, to build the key a cookie set by the response
    /// will give (see [`key::cookie_set_by`]).
    pub resource: key::Resource,
    /// The request carries one of the route's identity headers.
    pub has_identity: bool,
    /// The client's `Last-Event-ID` (header or configured query parameter).
    pub last_event_id: Option<String>,
    /// The route's replay settings.
    pub settings: ReplaySettings,
    /// The cluster, when this node is one of several.
    pub cluster: Option<Arc<Cluster>>,
    /// The request looks like a stream client's: the cluster is asked before the
    /// upstream (else only once the response turned out to be a stream).
    pub ask_cluster_first: bool,
}

impl ReplayCx {
    /// Replay context for a GET on a replay route: the stream key (see [`crate::key`]:
    /// built from the request as the upstream receives it, so only after
    /// `request::prepare_upstream_request`) and the client's last event ID.
    /// `wants_stream`: the request accepts `text/event-stream`.
    pub fn for_request(
        req: &RequestHeader,
        wants_stream: bool,
        client: &ClientInfo,
        registry: &Arc<Registry>,
        budget: &Arc<Budget>,
        handover: Option<&Arc<Handover>>,
        cluster: Option<&Arc<Cluster>>,
    ) -> Option<ReplayCx> {
        let route = &client.route;
        let settings = &route.replay;
        if !settings.enabled || req.method != http::Method::GET {
            return None;
        }
        let resume = resume_request(
            req.headers.get("last-event-id").map(|v| v.as_bytes()),
            req.uri.query().unwrap_or(""),
            settings.last_event_id_param.as_deref(),
        );
        let resource = key::Resource {
            route: route.name.clone(),
            upstream: route.upstream.name.clone(),
            method: req.method.as_str().to_owned(),
            scheme: client.proto,
            host: client.host.clone().unwrap_or_default(),
            path: req.uri.path().as_bytes().to_vec(),
            query: resume.query_key,
        };
        let identity = &settings.identity_headers;
        // Asking the cluster before the upstream costs Redis round trips (a peek, and a
        // lease taken and given back when nobody reads the stream): only for a request
        // that looks like a stream client's. An `EventSource` always sends `Accept:
        // text/event-stream`; a resume carries its id. Any other GET (a page of the site)
        // goes to the upstream at once, and asks for the lease only if its response is
        // a stream.
        let ask_cluster_first = wants_stream || resume.last_event_id.is_some();
        Some(ReplayCx {
            handover: handover.cloned(),
            registry: registry.clone(),
            budget: budget.clone(),
            key: key::stream_key(&resource, identity, &req.headers),
            has_identity: key::has_identity(identity, &req.headers),
            resource,
            last_event_id: resume.last_event_id,
            settings: settings.clone(),
            cluster: cluster.cloned(),
            ask_cluster_first,
        })
    }

    /// The request as a hub's audience sees it.
    pub(super) fn viewer<'a>(&self, req: &'a RequestHeader) -> Viewer<'a> {
        Viewer {
            headers: &req.headers,
            has_identity: self.has_identity,
        }
    }
}

/// How a subscriber came to its hub, for the response header and the access log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Attach {
    /// Its `Last-Event-ID` was found: replayed from the store.
    Hit,
    /// Its `Last-Event-ID` was not found, or its hub may not be read by it.
    Miss(Miss),
    /// It started the hub, or joined a shared one without an id.
    Fresh,
}

/// What looking for a live hub gave.
pub(super) enum Found {
    /// A live hub to follow.
    Hub(Arc<Hub>, Subscription, Attach),
    /// None: the request goes upstream.
    Upstream(GoUpstream),
}

/// A request that goes upstream, and what its hub will need to know.
#[derive(Default)]
pub(super) struct GoUpstream {
    /// Its resume missed.
    pub(super) missed: Option<Miss>,
    /// It holds the right to open a shared key's upstream (the others wait for its hub).
    pub(super) opening: Option<tokio::sync::OwnedMutexGuard<()>>,
    /// This node took the stream's lease: it reads it for the cluster.
    pub(super) lead: Option<Lead>,
}

/// Resumes the request from a live hub that holds its `Last-Event-ID`, or joins the
/// shared hub of its key; else asks the cluster (another node may read the stream).
pub(super) async fn find(
    rcx: &ReplayCx,
    req: &RequestHeader,
    client: &ClientInfo,
    pool: &Pool,
    metrics: &Arc<Metrics>,
) -> Found {
    let mut missed = None;
    if let Some(id) = &rcx.last_event_id {
        match rcx.registry.resume(&rcx.key, id, rcx.viewer(req)) {
            Ok((h, s)) => return Found::Hub(h, s, Attach::Hit),
            Err(m) => missed = Some(m),
        }
    }
    if !rcx.settings.shared {
        return match remote::find(rcx, req, client, pool, metrics, missed).await {
            Clustered::Follow(h, s, how) => Found::Hub(h, s, how),
            Clustered::Lead(lead) => Found::Upstream(GoUpstream {
                missed,
                opening: None,
                lead: Some(lead),
            }),
            Clustered::Local(m) => Found::Upstream(GoUpstream {
                missed: m.or(missed),
                opening: None,
                lead: None,
            }),
        };
    }
    // A shared upstream cannot replay for one client: a miss joins live too.
    let start = match (missed, rcx.settings.on_connect) {
        (None, n) if n > 0 => Start::Last(n),
        _ => Start::Live,
    };
    let how = missed.map_or(Attach::Fresh, Attach::Miss);
    if let Some((h, s)) = rcx.registry.join_shared(&rcx.key, start, rcx.viewer(req)) {
        return Found::Hub(h, s, how);
    }
    // Nobody streams this key here yet: one client opens it (or finds it in the
    // cluster) while the others wait here, then join. Bounded: if the opener's upstream
    // is slow, go to the upstream alone.
    let response_timeout = client.route.upstream.response_timeout;
    let guard = tokio::time::timeout(response_timeout, rcx.registry.open_lock(&rcx.key))
        .await
        .ok();
    if let Some((h, s)) = rcx.registry.join_shared(&rcx.key, start, rcx.viewer(req)) {
        return Found::Hub(h, s, how);
    }
    let lead = match remote::find(rcx, req, client, pool, metrics, missed).await {
        Clustered::Follow(h, s, how) => return Found::Hub(h, s, how),
        Clustered::Lead(lead) => Some(lead),
        Clustered::Local(_) => None,
    };
    Found::Upstream(GoUpstream {
        missed,
        opening: guard,
        lead,
    })
}

/// Makes the upstream response (`resp`, then `feed`) a
/// hub that outlives this client, and serves the client as its first subscriber.
#[allow(clippy::too_many_arguments)]
pub(super) async fn start(
    session: &mut Session,
    admission: &mut Admission,
    route: &Route,
    owner: Option<ClientKey>,
    resp: &ResponseHeader,
    feed: Box<Pooled>,
    up: GoUpstream,
    stats: &mut RelayStats,
) -> Result<Option<Begun<HubSource>>> {
    let GoUpstream {
        missed,
        opening,
        mut lead,
    } = up;
    let slot = match admit_stream(session, admission, owner, stats).await {
        Ok(Admit::Go(slot)) => slot,
        refused_or_failed => {
            remote::give_back(lead).await;
            return refused_or_failed.map(|_| None);
        }
    };
    let Some(rcx) = admission.replay.as_ref() else {
        return Error::e_explain(ErrorType::InternalError, "hub without replay settings");
    };
    if !rcx.ask_cluster_first && lead.is_none() {
        // A request that did not look like a stream client's got a stream: read it for
        // the cluster if nobody does yet (if another node does, this hub is one more
        // reader, of this node alone).
        lead = remote::lead_now(rcx).await;
    }
    let req = session.req_header();
    let (mut new, import, linger) = new_hub(rcx, route, owner, resp, req).await;
    // The cluster's history of this stream (a client that moved here resumes from it),
    // unless the old process of an upgrade handed one over.
    let lead_seeded = new.seed.is_none() && lead.is_some();
    if lead_seeded {
        new.seed = lead
            .as_mut()
            .and_then(|l| l.seed(rcx.last_event_id.as_deref()));
    }
    // Only a stream another request could read again is worth writing for the cluster.
    let reusable = new.audience.admits(&req.headers, rcx.has_identity).is_ok();
    let audience = stored_audience(&new.audience).filter(|_| reusable);
    let head = lead.as_ref().map(|_| cluster::encode_head(&new.head));
    let writer = cluster_writer(lead, audience, head, rcx.settings.bounds).await;
    let (hub, sub, created) = rcx.registry.create(new, rcx.viewer(req));
    // The hub is registered: waiting clients of a shared key may join it now.
    drop(opening);
    if created {
        if let Some(import) = import {
            tokio::spawn(import.follow(hub.clone(), rcx.registry.clone()));
        } else if lead_seeded {
            // No feed goes on beside the upstream: only drop what it repeats.
            hub.end_handover();
        }
        let watch = writer
            .as_ref()
            .map(|w| (w.cluster.clone(), w.lease.tag.clone()));
        if let Some(w) = writer {
            w.cluster.clone().spawn(w.run(hub.clone()));
        }
        let registry = rcx.registry.clone();
        tokio::spawn(pump(hub.clone(), registry, feed, linger, watch));
    } else {
        if let Some(w) = writer {
            w.cluster.release(&w.lease).await;
        }
        // Another client's request made the shared hub first: ours is not needed.
        drop(feed);
    }
    let how = match (sub.resumed, missed) {
        (true, _) => Attach::Hit,
        (false, Some(m)) => Attach::Miss(m),
        (false, None) => Attach::Fresh,
    };
    // A new upstream got the client's Last-Event-ID: if it replays that very event
    // too, the client must not see it twice.
    let skip_id = match how {
        Attach::Miss(_) => rcx.last_event_id.as_deref().map(Arc::from),
        _ => None,
    };
    let follow = Follow {
        how,
        skip_id,
        own_head: created,
        slot,
    };
    follow
        .begin(session, hub, sub, route, admission, stats)
        .await
        .map(Some)
}

/// The cluster's writer for a new hub this node leads, given the stored form of its
/// audience (`None`: nobody else may read it, so the lease is given back) and head.
async fn cluster_writer(
    lead: Option<Lead>,
    audience: Option<Vec<u8>>,
    head: Option<Vec<u8>>,
    bounds: crate::replay::RingBounds,
) -> Option<cluster::writer::Writer> {
    let lead = lead?;
    match (audience, head) {
        (Some(audience), Some(head)) => Some(cluster::writer::Writer {
            cluster: lead.cluster,
            lease: lead.lease,
            bounds,
            head,
            audience,
        }),
        _ => {
            lead.cluster.release(&lead.lease).await;
            None
        }
    }
}

/// The hub a response becomes: its keys, audience and store, what the old process
/// handed over (just after an upgrade), and how long it lingers.
async fn new_hub(
    rcx: &ReplayCx,
    route: &Route,
    owner: Option<ClientKey>,
    resp: &ResponseHeader,
    req: &RequestHeader,
) -> (NewHub, Option<Import>, Duration) {
    let head: http::response::Parts = (**resp).clone();
    let (audience, aliases, reusable) = audience_of(rcx, &head, req);
    let store = Box::new(MemoryRing::new(rcx.settings.bounds, rcx.budget.clone()));
    // Just after an upgrade, the old process may still hold this stream's recent events
    // and its upstream: take them over (only those recorded for the same audience).
    let mut import = match (&rcx.handover, audience.fingerprint()) {
        (Some(source), Some(fingerprint)) if reusable => {
            let last = rcx.last_event_id.as_deref();
            let max = route.sse.max_event_bytes;
            source.fetch(&rcx.key, &fingerprint, last, max).await
        }
        _ => None,
    };
    let seed = import.as_mut().map(|i| std::mem::take(&mut i.seed));
    // Nobody else could resume a stream of its own client only: no linger for it.
    let linger = if reusable || !aliases.is_empty() {
        rcx.settings.linger
    } else {
        Duration::ZERO
    };
    let new = NewHub {
        key: rcx.key.clone(),
        aliases,
        shared: rcx.settings.shared,
        audience,
        head,
        store,
        max_event_bytes: route.sse.max_event_bytes,
        seed,
        owner,
    };
    (new, import, linger)
}

/// Who may read what this response records (see [`Audience`]), the keys a visitor's
/// reconnect will carry once it sends the cookie this response set, and whether any
/// other request could ever read it.
fn audience_of(
    rcx: &ReplayCx,
    head: &http::response::Parts,
    req: &RequestHeader,
) -> (Audience, Vec<StreamKey>, bool) {
    let identity = &rcx.settings.identity_headers;
    let audience = Audience::of(&head.headers, &req.headers, identity, rcx.settings.shared);
    // A visitor answered with a session cookie comes back with it: the hub answers to
    // that key too (only that visitor holds the cookie).
    let aliases = match key::cookie_set_by(&head.headers) {
        Some(cookie)
            if !rcx.settings.shared
                && !req.headers.contains_key(header::COOKIE)
                && identity.iter().any(|n| n == "cookie") =>
        {
            let mut h = req.headers.clone();
            h.insert(header::COOKIE, cookie);
            vec![key::stream_key(&rcx.resource, identity, &h)]
        }
        _ => vec![],
    };
    let reusable = match audience.admits(&req.headers, rcx.has_identity) {
        Ok(()) => true,
        Err(d) => {
            tracing::debug!(
                reason = d.as_str(),
                "stream recorded for its own client only"
            );
            false
        }
    };
    (audience, aliases, reusable)
}

/// How a client follows a hub.
pub(super) struct Follow {
    pub(super) how: Attach,
    /// Drop a block that carries exactly this id (the client has it).
    pub(super) skip_id: Option<Arc<str>>,
    /// The hub's head is the response to this client's own request, so its
    /// `Set-Cookie` is this client's; no other subscriber ever gets it.
    pub(super) own_head: bool,
    /// The stream's place in the limits.
    pub(super) slot: Option<crate::limit::StreamSlot>,
}

impl Follow {
    /// Begins serving one client from a hub: the response head and the replay; the live
    /// blocks follow through the stream writer it returns. A miss is counted here, once
    /// the attach is final (a handover may still have turned it into a hit).
    pub(super) async fn begin(
        self,
        session: &mut Session,
        hub: Arc<Hub>,
        mut sub: Subscription,
        route: &Route,
        admission: &Admission,
        stats: &mut RelayStats,
    ) -> Result<Begun<HubSource>> {
        let Some(rcx) = admission.replay.as_ref() else {
            return Error::e_explain(ErrorType::InternalError, "hub without replay settings");
        };
        stats.replay = Some(match self.how {
            Attach::Hit => "hit",
            Attach::Miss(m) => {
                rcx.registry.count_miss(m);
                stats.miss = Some(m.as_str());
                "miss"
            }
            Attach::Fresh => "fresh",
        });
        // An HTTP/2 session keeps the head it wrote for the stream's life; without a
        // map of names' spelling, which HTTP/2 does not carry, it is half the size.
        let size = Some(hub.head.headers.len() + 4);
        let mut resp = match session.is_http2() {
            true => ResponseHeader::build_no_case(hub.head.status, size)?,
            false => ResponseHeader::build(hub.head.status, size)?,
        };
        for (name, value) in &hub.head.headers {
            resp.append_header(name.clone(), value.clone())?;
        }
        if hub.shared || !self.own_head {
            // A stored `Set-Cookie` is never replayed (RFC 9111 §3.1 leaves that to us):
            // it belongs to the request the head answered, and a shared route's request
            // went out without this client's identity anyway.
            resp.remove_header(&header::SET_COOKIE);
        }
        let note = match self.how {
            Attach::Hit => format!("hit; events={}", sub.replay.len()),
            Attach::Miss(_) => "miss".to_owned(),
            Attach::Fresh => "fresh".to_owned(),
        };
        resp.insert_header("x-ssegate-replay", note)?;
        let metrics = StreamMetrics::new(&admission.metrics, &route.name, session);
        let jitter = admission.refusal.jitter;
        let mut writer =
            Writer::start(session, resp, &route.sse, jitter, self.slot, metrics).await?;
        let notice = match (self.how, rcx.settings.miss_event) {
            (Attach::Miss(_), true) => Some(
                [
                    &b"event: ssegate-replay-miss\ndata: "[..],
                    rcx.last_event_id.as_deref().unwrap_or("").as_bytes(),
                    b"\n\n",
                ]
                .concat(),
            ),
            _ => None,
        };
        let replay: Vec<Bytes> = std::mem::take(&mut sub.replay)
            .into_iter()
            .map(|b| b.raw)
            .collect();
        stats.replayed = replay.len() as u64;
        writer
            .first(session, notice.as_deref(), &replay, stats)
            .await?;
        let source = HubSource {
            sub,
            skip_id: self.skip_id,
        };
        Ok(Begun { writer, source })
    }
}
