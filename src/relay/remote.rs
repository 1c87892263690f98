//! A stream request meets the cluster (see [`crate::cluster`]) when no local hub serves
//! it: another node may read the stream already (this node then follows the shared
//! history: [`Follower`]), or this node takes the lease and becomes its reader (the
//! shared history seeds the new hub, so a client that moved here resumes with no gap).
//! A follower whose reader is gone, or that cannot reach Redis, takes the upstream
//! over itself, dropping what the upstream repeats.

use std::sync::Arc;
use std::time::Duration;

use pingora::prelude::*;
use pingora::protocols::http::HttpTask;

use super::hubs::{Attach, ReplayCx};
use super::pooled::{Pool, Pooled, Up};
use super::stream::is_event_stream;
use crate::cluster::{self, follow, Cluster, Entry, Lease, Tag};
use crate::hub::{Hub, Miss, NewHub, Registry, Seed, Start, Subscription};
use crate::key::Audience;
use crate::metrics::Metrics;
use crate::replay::{MemoryRing, ReplayStore};
use crate::request::ClientInfo;

/// What the cluster says of a request no local hub serves.
pub(super) enum Clustered {
    /// Another node reads it: follow that node's history from here.
    Follow(Arc<Hub>, Subscription, Attach),
    /// Nobody reads it: this node took the lease and opens the upstream.
    Lead(Lead),
    /// Serve it from this node alone (no cluster for it, Redis away, or not admitted).
    Local(Option<Miss>),
}

/// This node reads the stream for the cluster.
pub(super) struct Lead {
    pub(super) cluster: Arc<Cluster>,
    pub(super) lease: Lease,
    /// The shared history, when the client asked to resume from it.
    pub(super) history: Vec<Entry>,
}

impl Lead {
    /// The history as a seed for the new hub, resuming the client after its id.
    pub(super) fn seed(&mut self, last_event_id: Option<&str>) -> Option<Seed> {
        if self.history.is_empty() {
            return None;
        }
        Some(Seed {
            blocks: std::mem::take(&mut self.history)
                .into_iter()
                .map(|e| e.block)
                .collect(),
            resume_after: last_event_id.map(str::to_owned),
            handed_over: false,
        })
    }
}

/// The audience as stored beside the history: the private flag (the stored head has
/// no `Set-Cookie`, which made it private), then the fingerprint.
pub(super) fn stored_audience(audience: &Audience) -> Option<Vec<u8>> {
    let mut out = vec![if audience.private() { b'1' } else { b'0' }];
    out.extend(audience.fingerprint()?);
    Some(out)
}

/// Asks the cluster about `rcx`'s stream (see [`Clustered`]).
pub(super) async fn find(
    rcx: &ReplayCx,
    req: &RequestHeader,
    client: &ClientInfo,
    pool: &Pool,
    metrics: &Arc<Metrics>,
    missed: Option<Miss>,
) -> Clustered {
    let Some(cluster) = rcx.cluster.clone().filter(|_| rcx.ask_cluster_first) else {
        return Clustered::Local(missed);
    };
    let tag = cluster.tag(&rcx.key);
    let want_history = rcx.last_event_id.is_some() || rcx.settings.on_connect > 0;
    for _ in 0..2 {
        let remote = match cluster.peek(&tag, want_history).await {
            Ok(r) => r,
            Err(_) => return Clustered::Local(missed),
        };
        let mine = remote
            .reader
            .as_deref()
            .is_some_and(|r| r.starts_with(cluster.holder()));
        if remote.reader.is_some() && !mine {
            return follow_remote(
                rcx, req, client, pool, metrics, &cluster, tag, remote, missed,
            )
            .await;
        }
        if mine {
            // This node is opening it right now (or just ended it): alone.
            return Clustered::Local(missed);
        }
        match cluster.acquire(&tag).await {
            Ok(Some(lease)) => {
                let history = match (&rcx.last_event_id, &remote.epoch) {
                    (Some(_), Some(epoch)) if **epoch == *lease.epoch => remote.entries,
                    _ => vec![],
                };
                return Clustered::Lead(Lead {
                    cluster,
                    lease,
                    history,
                });
            }
            Ok(None) => continue, // Another node took it just now: follow it.
            Err(_) => return Clustered::Local(missed),
        }
    }
    Clustered::Local(missed)
}

/// Gives a lease taken for a stream that did not start back at once: until it ran out,
/// other nodes' clients of the stream would wait to follow a reader that does not read.
pub(super) async fn give_back(lead: Option<Lead>) {
    if let Some(l) = lead {
        l.cluster.release(&l.lease).await;
    }
}

/// Takes the lease of `rcx`'s stream if no node holds it, without history (for a
/// request that did not ask the cluster first, see [`ReplayCx::ask_cluster_first`]).
pub(super) async fn lead_now(rcx: &ReplayCx) -> Option<Lead> {
    let cluster = rcx.cluster.clone()?;
    let tag = cluster.tag(&rcx.key);
    let lease = cluster.acquire(&tag).await.ok()??;
    Some(Lead {
        cluster,
        lease,
        history: vec![],
    })
}

/// Makes a hub on this node that follows another node's reader.
#[allow(clippy::too_many_arguments)]
async fn follow_remote(
    rcx: &ReplayCx,
    req: &RequestHeader,
    client: &ClientInfo,
    pool: &Pool,
    metrics: &Arc<Metrics>,
    cluster: &Arc<Cluster>,
    tag: Tag,
    remote: cluster::Remote,
    missed: Option<Miss>,
) -> Clustered {
    let (Some(head), Some(epoch)) = (cluster::decode_head(&remote.head), remote.epoch.clone())
    else {
        return Clustered::Local(missed);
    };
    let viewer = rcx.viewer(req);
    let audience = match admitted(rcx, req, &head, &remote.audience) {
        Ok(a) => a,
        Err(m) => return Clustered::Local(Some(m)),
    };
    // The history this node starts from: all of it (bounded), so later resumes here
    // find their ids too.
    let mut store = MemoryRing::new(rcx.settings.bounds, rcx.budget.clone());
    let after = remote.entries.last().map_or(remote.offset, |e| e.offset);
    let handoff = remote.handoff;
    for e in remote.entries.into_iter().filter(|e| e.epoch == epoch) {
        store.push(e.block);
    }
    let new = NewHub {
        key: rcx.key.clone(),
        aliases: vec![],
        shared: rcx.settings.shared,
        audience,
        head,
        store: Box::new(store),
        max_event_bytes: client.route.sse.max_event_bytes,
        seed: None,
        owner: client.key,
    };
    let (hub, first, created) = rcx.registry.create(new, viewer);
    if !created {
        // A shared hub appeared here meanwhile: it is as good.
        return Clustered::Follow(hub, first, missed.map_or(Attach::Fresh, Attach::Miss));
    }
    let resumed = rcx
        .last_event_id
        .as_deref()
        .and_then(|id| hub.subscribe(Start::After(id)));
    let (sub, how) = match (resumed, &rcx.last_event_id) {
        (Some(sub), _) => {
            rcx.registry.count_resume(sub.replay.len());
            cluster
                .counters
                .cross_node_resumes
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            (sub, Attach::Hit)
        }
        (None, Some(_)) => (first, Attach::Miss(missed.unwrap_or(Miss::Unknown))),
        (None, None) => {
            // A new client of a shared stream may start with the latest blocks.
            let n = rcx.settings.on_connect;
            let last = (rcx.settings.shared && n > 0)
                .then(|| hub.subscribe(Start::Last(n)))
                .flatten();
            (
                last.unwrap_or(first),
                missed.map_or(Attach::Fresh, Attach::Miss),
            )
        }
    };
    let following = follow::follow(cluster, tag.clone(), after).await;
    let follower = Follower {
        hub: hub.clone(),
        registry: rcx.registry.clone(),
        cluster: cluster.clone(),
        tag,
        epoch,
        next: after,
        following: Some(following),
        own: None,
        handoff,
        linger: rcx.settings.linger,
        reopen: Reopen {
            req: req.clone(),
            client: client.clone(),
            pool: pool.clone(),
            metrics: metrics.clone(),
            bounds: rcx.settings.bounds,
        },
    };
    tokio::spawn(follower.run());
    Clustered::Follow(hub, sub, how)
}

/// The audience of a stream another node reads, if `req` may read it: the same `Vary`
/// values and privacy as the reader recorded (as a handover checks), and admitted.
fn admitted(
    rcx: &ReplayCx,
    req: &RequestHeader,
    head: &http::response::Parts,
    stored: &[u8],
) -> Result<Audience, Miss> {
    let private = stored.first() == Some(&b'1');
    let identity = &rcx.settings.identity_headers;
    let audience = Audience::of(&head.headers, &req.headers, identity, rcx.settings.shared)
        .marked_private(private);
    let viewer = rcx.viewer(req);
    audience
        .admits(viewer.headers, viewer.has_identity)
        .map_err(Miss::Denied)?;
    let same = audience
        .fingerprint()
        .is_some_and(|f| stored.get(1..) == Some(&f[..]));
    if !same {
        return Err(Miss::Denied(crate::key::Denied::Vary));
    }
    Ok(audience)
}

/// What a follower needs to open the upstream itself.
struct Reopen {
    /// The request of the client that started following (prepared for the upstream;
    /// every client of the key sends the same identity).
    req: RequestHeader,
    client: ClientInfo,
    pool: Pool,
    metrics: Arc<Metrics>,
    bounds: crate::replay::RingBounds,
}

/// Feeds a hub from another node's history, until the hub has had no client for its
/// linger window, or the reader is gone (then it takes over). When the reader announces
/// a planned handoff (it is about to exit), the upstream is opened beside it and merged
/// with its feed by id, so the switch loses nothing even from a backend that ignores
/// `Last-Event-ID`.
struct Follower {
    hub: Arc<Hub>,
    registry: Arc<Registry>,
    cluster: Arc<Cluster>,
    tag: Tag,
    /// The history's epoch this hub follows; another one means history was lost.
    epoch: Arc<str>,
    /// The last offset published.
    next: u64,
    /// Taken away once following stops.
    following: Option<follow::Following>,
    /// The upstream, opened beside the reader during a planned handoff.
    own: Option<Box<Pooled>>,
    /// The reader announced its handoff before this node followed it.
    handoff: bool,
    linger: Duration,
    reopen: Reopen,
}

/// Why following stopped.
enum Stop {
    /// The hub ended (idle, or history lost: its clients resume and are told).
    Ended,
    /// The reader is gone (or Redis is): read the upstream here, with this lease if
    /// one was taken.
    TakeOver(Option<Lease>),
}

/// Opens the upstream with the last id `hub` published; `overlap`: the reader still
/// feeds the hub, merge the two (see [`Hub::begin_takeover`]).
async fn open_upstream(hub: &Hub, reopen: &Reopen, overlap: bool) -> Option<Box<Pooled>> {
    let mut req = reopen.req.clone();
    if let Some(id) = hub.last_id() {
        let _ = req.insert_header("last-event-id", &*id);
    }
    let (client, metrics) = (&reopen.client, &reopen.metrics);
    let pooled = Pooled::open(&req, false, true, client, &reopen.pool, metrics).await;
    let mut feed = Box::new(pooled.ok()?);
    // Bounded as a client's wait for a response header is.
    let first = tokio::time::timeout(
        client.route.upstream.response_timeout,
        feed.first_task(&req),
    );
    match first.await.ok()? {
        Up::Task(HttpTask::Header(resp, false)) if resp.status == 200 && is_event_stream(&resp) => {
        }
        _ => return None,
    }
    hub.begin_takeover(overlap);
    Some(feed)
}

/// The next piece of `own`'s response; never, without one.
async fn next_own(own: &mut Option<Box<Pooled>>) -> Option<HttpTask> {
    match own {
        Some(o) => o.next_task().await,
        None => std::future::pending().await,
    }
}

impl Follower {
    async fn run(mut self) {
        if self.handoff {
            // The announcement is behind this node's feed, and the reader ends once
            // followed: open the upstream beside it now, or the switch leaves a hole.
            self.own = open_upstream(&self.hub, &self.reopen, true).await;
        }
        let stop = self.follow().await;
        let (hub, registry) = (self.hub.clone(), self.registry.clone());
        if let Stop::TakeOver(lease) = stop {
            self.cluster
                .counters
                .takeovers
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if self.take_over(lease).await {
                return;
            }
        }
        hub.end();
        registry.remove(&hub);
    }

    async fn follow(&mut self) -> Stop {
        let hub = self.hub.clone();
        let idle = hub.idle_for(self.linger);
        tokio::pin!(idle);
        let every = self.cluster.settings.lease / 3;
        let mut check = tokio::time::interval(every);
        let Some(mut following) = self.following.take() else {
            return Stop::Ended;
        };
        loop {
            tokio::select! {
                batch = following.rx.recv() => {
                    // `None`: cut for being behind, or the feed is gone.
                    let Some(batch) = batch else { return Stop::Ended };
                    if let Some(stop) = self.take_batch(batch).await {
                        return stop;
                    }
                }
                t = next_own(&mut self.own) => {
                    if !t.is_some_and(|t| super::pump::feed_task(&self.hub, t)) {
                        // The upstream opened for a handoff failed: follow on.
                        self.own = None;
                        self.hub.abort_takeover();
                    }
                }
                _ = check.tick() => {
                    if let Some(stop) = self.check().await {
                        return stop;
                    }
                }
                _ = &mut idle => {
                    if self.hub.end_if_idle() {
                        return Stop::Ended;
                    }
                    idle.set(hub.idle_for(self.linger));
                }
            }
        }
    }

    /// Publishes a batch of the reader's entries; `Some` when following must stop.
    async fn take_batch(&mut self, batch: Vec<Entry>) -> Option<Stop> {
        let (mut ended, mut handoff) = (false, false);
        for e in batch {
            if e.offset <= self.next {
                continue;
            }
            if e.offset != self.next + 1 || e.epoch != self.epoch {
                tracing::info!("cluster: shared history has a hole; ending the stream here");
                return Some(Stop::Ended);
            }
            self.next = e.offset;
            if e.end {
                ended = true;
            } else if e.handoff {
                handoff = true;
            } else if self.own.is_some() {
                // Merging with the upstream opened for the handoff.
                self.hub.take_handed_over(e.block);
            } else {
                self.hub.take_remote(e.block);
            }
        }
        if handoff && self.own.is_none() {
            self.own = open_upstream(&self.hub, &self.reopen, true).await;
        }
        // The reader is done: the first follower to take the lease reads on.
        if ended {
            return match self.cluster.acquire(&self.tag).await {
                Ok(Some(lease)) => Some(Stop::TakeOver(Some(lease))),
                Ok(None) => None,
                Err(_) => Some(Stop::TakeOver(None)),
            };
        }
        None
    }

    /// Every third of a lease: keeps the reader reading for this node's clients, and
    /// looks for a gone reader or a lost history.
    async fn check(&mut self) -> Option<Stop> {
        if self.hub.subscribers() > 0 {
            let _ = self.cluster.watch(&self.tag).await;
        }
        match self.cluster.peek(&self.tag, false).await {
            Ok(r) if r.epoch.as_deref() != Some(&*self.epoch) => {
                tracing::info!("cluster: shared history restarted; ending the stream here");
                Some(Stop::Ended)
            }
            Ok(r) if r.reader.is_none() => match self.cluster.acquire(&self.tag).await {
                Ok(Some(lease)) => Some(Stop::TakeOver(Some(lease))),
                Ok(None) => None,
                Err(_) => Some(Stop::TakeOver(None)),
            },
            Ok(_) => None,
            Err(_) => Some(Stop::TakeOver(None)),
        }
    }

    /// Feeds the hub from the upstream (opened now, or for a handoff already), writing
    /// to the cluster when `lease`; `false` if the upstream would not answer.
    async fn take_over(mut self, lease: Option<Lease>) -> bool {
        let feed = match self.own.take() {
            Some(feed) => {
                // The reader's feed is over: the upstream alone goes on.
                self.hub.end_handover();
                feed
            }
            None => match open_upstream(&self.hub, &self.reopen, false).await {
                Some(feed) => feed,
                None => return false,
            },
        };
        tracing::info!(
            lease = lease.is_some(),
            "cluster: took a stream over from its reader"
        );
        let watch = lease
            .is_some()
            .then(|| (self.cluster.clone(), self.tag.clone()));
        if let Some(lease) = lease {
            let audience = stored_audience(&self.hub.audience()).unwrap_or_default();
            let writer = cluster::writer::Writer {
                cluster: self.cluster.clone(),
                lease,
                bounds: self.reopen.bounds,
                head: cluster::encode_head(&self.hub.head),
                audience,
            };
            self.cluster.spawn(writer.run(self.hub.clone()));
        }
        super::pump::pump(self.hub, self.registry, feed, self.linger, watch).await;
        true
    }
}
