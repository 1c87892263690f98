//! The registry of live hubs: finding one by key for a request its audience admits,
//! creating one, charging it to the client that opened it, and the counters the
//! metrics export.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

use super::counters::{Miss, ReplayCounters};
use super::{merge::Merge, Hub, Inner, Start, StreamKey, Subscription};
use crate::key::{Audience, Denied};
use crate::limit::ClientKey;
use crate::replay::{Lookup, ReplayStore, StoredEvent};
use crate::sse;

/// The request that asks to read a hub, as the secondary key sees it.
#[derive(Clone, Copy)]
pub struct Viewer<'a> {
    /// Its headers, as the upstream would receive them.
    pub headers: &'a http::HeaderMap,
    /// It carries one of the route's identity headers.
    pub has_identity: bool,
}

impl Viewer<'_> {
    fn may_read(&self, hub: &Hub) -> Result<(), Denied> {
        hub.audience.admits(self.headers, self.has_identity)
    }
}

/// What a new hub is made of.
pub struct NewHub {
    /// The stream's primary key.
    pub key: StreamKey,
    /// More keys the same stream answers to: the key a visitor's reconnect will carry
    /// once it sends the cookie this response set (see [`crate::key::cookie_set_by`]).
    pub aliases: Vec<StreamKey>,
    /// Public route: new clients without `Last-Event-ID` join this hub.
    pub shared: bool,
    /// Who else may read it.
    pub audience: Audience,
    /// The upstream's response status and headers.
    pub head: http::response::Parts,
    /// Where its recent blocks are kept.
    pub store: Box<dyn ReplayStore>,
    /// Largest event the parser takes.
    pub max_event_bytes: usize,
    /// After an upgrade: what the old process handed over.
    pub seed: Option<Seed>,
    /// The client whose request opened it: its upstream connection is charged to that
    /// client while the hub lives, lingering included (see `Registry::with_client_cap`).
    pub owner: Option<ClientKey>,
}

impl NewHub {
    /// A hub of `key` that anyone asking for that key may read (the response named no
    /// `Vary` and was not private), with nothing handed over.
    pub fn open(
        key: StreamKey,
        shared: bool,
        head: http::response::Parts,
        store: Box<dyn ReplayStore>,
        max_event_bytes: usize,
    ) -> NewHub {
        let audience = Audience::of(&head.headers, &http::HeaderMap::new(), &[], shared);
        NewHub {
            key,
            aliases: Vec::new(),
            shared,
            audience,
            head,
            store,
            max_event_bytes,
            seed: None,
            owner: None,
        }
    }
}

/// What a new hub starts with after an upgrade: the blocks the old process handed over,
/// and the first client's `Last-Event-ID` to resume after.
#[derive(Debug, Default)]
pub struct Seed {
    /// The old store's blocks, oldest first.
    pub blocks: Vec<StoredEvent>,
    /// Resume the first subscriber after this id, if the blocks hold it.
    pub resume_after: Option<String>,
    /// From the old process of an upgrade (counted as handed over), not the cluster.
    pub handed_over: bool,
}

/// All live hubs, by key.
pub struct Registry {
    hubs: Mutex<HashMap<StreamKey, Vec<Arc<Hub>>>>,
    /// One lock per shared key being opened, so simultaneous first clients send one
    /// upstream request, not one each.
    opening: Mutex<HashMap<StreamKey, std::sync::Weak<tokio::sync::Mutex<()>>>>,
    /// Shared counters.
    pub counters: Arc<ReplayCounters>,
    /// Broadcast capacity per hub: how far a subscriber may fall behind before it is
    /// disconnected (it comes back with `Last-Event-ID`).
    pub lag_blocks: usize,
    /// Most hubs at once; each holds an upstream connection, lingering ones too.
    pub max_hubs: usize,
    /// Most hubs alive per client that opened them.
    max_per_client: usize,
    /// The hubs alive per client that opened them, oldest first. (Taken before a hub's
    /// own lock, never while holding `hubs`.)
    by_owner: Mutex<HashMap<ClientKey, VecDeque<Arc<Hub>>>>,
}

impl Registry {
    /// An empty registry.
    pub fn new(lag_blocks: usize, max_hubs: usize) -> Registry {
        Registry {
            max_hubs,
            max_per_client: usize::MAX,
            by_owner: Mutex::new(HashMap::new()),
            hubs: Mutex::new(HashMap::new()),
            opening: Mutex::new(HashMap::new()),
            counters: Arc::new(ReplayCounters::default()),
            lag_blocks: lag_blocks.max(1),
        }
    }

    /// At most `n` hubs alive per client that opened them: a client that opens and
    /// leaves streams to many URLs cannot keep an upstream connection each lingering.
    pub fn with_client_cap(mut self, n: usize) -> Registry {
        self.max_per_client = n.max(1);
        self
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<StreamKey, Vec<Arc<Hub>>>> {
        self.hubs.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn owners(&self) -> MutexGuard<'_, HashMap<ClientKey, VecDeque<Arc<Hub>>>> {
        self.by_owner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Before `owner` opens another hub: while it is at its cap, close its oldest
    /// lingering hub (its pump then closes the upstream and unregisters it). Hubs with
    /// clients are never cut: those are bounded by the stream limits.
    fn make_room_for(&self, owner: ClientKey) {
        let mut owners = self.owners();
        let Some(hubs) = owners.get_mut(&owner) else {
            return;
        };
        hubs.retain(|h| !h.ended());
        while hubs.len() >= self.max_per_client {
            let Some(i) = hubs.iter().position(|h| h.end_if_idle()) else {
                break;
            };
            hubs.remove(i);
            self.counters.evicted.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(client = ?owner.0, "closed a lingering hub: its client opened too many");
        }
    }

    fn hubs_of(&self, key: &StreamKey) -> Vec<Arc<Hub>> {
        self.lock().get(key).cloned().unwrap_or_default()
    }

    /// Counts a resume that found nothing to replay (once it is final: a handover may
    /// still turn a miss into a hit).
    pub fn count_miss(&self, m: Miss) {
        self.counters.misses[m.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a resume served from a hub (here, or seeded from the cluster's history).
    pub fn count_resume(&self, blocks: usize) {
        let c = &self.counters;
        c.hits.fetch_add(1, Ordering::Relaxed);
        c.events_replayed
            .fetch_add(blocks as u64, Ordering::Relaxed);
        c.upstreams_saved.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts blocks taken over from the process this one replaced.
    pub fn count_handed_over(&self, blocks: usize) {
        self.counters
            .handed_over
            .fetch_add(blocks as u64, Ordering::Relaxed);
    }

    /// Resumes `key` after `last_id` from any live hub that still holds that id and may
    /// be read by `viewer` (newest hub first).
    pub fn resume(
        &self,
        key: &StreamKey,
        last_id: &str,
        viewer: Viewer<'_>,
    ) -> Result<(Arc<Hub>, Subscription), Miss> {
        let mut miss = Miss::Unknown;
        for h in self.hubs_of(key).iter().rev() {
            if let Err(d) = viewer.may_read(h) {
                miss = Miss::Denied(d);
                continue;
            }
            if let Some(s) = h.subscribe(Start::After(last_id)) {
                // A miss is counted by the caller, once it knows no handover covered it.
                self.count_resume(s.replay.len());
                return Ok((h.clone(), s));
            }
        }
        Err(miss)
    }

    /// The newest live shared hub of `key` that `viewer` may read, subscribed.
    fn find_shared(
        &self,
        hubs: &[Arc<Hub>],
        start: Start<'_>,
        viewer: Viewer<'_>,
    ) -> Option<(Arc<Hub>, Subscription)> {
        let found = hubs
            .iter()
            .rev()
            .filter(|h| h.shared && viewer.may_read(h).is_ok())
            .find_map(|h| h.subscribe(start).map(|s| (h.clone(), s)));
        if let Some((_, s)) = &found {
            self.counters
                .upstreams_saved
                .fetch_add(1, Ordering::Relaxed);
            self.counters
                .events_replayed
                .fetch_add(s.replay.len() as u64, Ordering::Relaxed);
        }
        found
    }

    /// Joins the live shared hub of `key` that `viewer` may read, if there is one.
    pub fn join_shared(
        &self,
        key: &StreamKey,
        start: Start<'_>,
        viewer: Viewer<'_>,
    ) -> Option<(Arc<Hub>, Subscription)> {
        self.find_shared(&self.hubs_of(key), start, viewer)
    }

    /// Creates and registers a hub (under its key and aliases), and subscribes its
    /// first client, `viewer`. For a shared key that gained a live hub `viewer` may
    /// read meanwhile, joins that one instead and returns `created = false` (the caller
    /// drops its own upstream request). A seed fills the store first and starts a merge
    /// with the old process's feed.
    pub fn create(&self, new: NewHub, viewer: Viewer<'_>) -> (Arc<Hub>, Subscription, bool) {
        let NewHub {
            key,
            aliases,
            shared,
            audience,
            head,
            mut store,
            max_event_bytes,
            seed,
            owner,
        } = new;
        if let Some(o) = owner {
            self.make_room_for(o);
        }
        let mut map = self.lock();
        if shared {
            let existing = map.get(&key).cloned().unwrap_or_default();
            if let Some((h, s)) = self.find_shared(&existing, Start::Live, viewer) {
                return (h, s, false);
            }
        }
        let tx = super::fanout::Sender::new(shared, self.lag_blocks);
        let mut merge = None;
        let mut replay = None;
        if let Some(seed) = seed {
            if seed.handed_over {
                self.count_handed_over(seed.blocks.len());
            }
            let mut m = Merge::default();
            for b in seed.blocks {
                if b.has_id_field {
                    m.handed.insert(b.id.clone());
                }
                store.push(b);
            }
            if let Some(id) = &seed.resume_after {
                if let Lookup::After(v) = store.after(id) {
                    replay = Some(v);
                }
            }
            merge = Some(m);
        }
        let mut keys: Vec<StreamKey> = aliases.into_iter().filter(|a| *a != key).collect();
        keys.insert(0, key);
        let hub = Arc::new(Hub {
            keys,
            shared,
            audience,
            owner,
            head,
            inner: Mutex::new(Inner {
                parser: sse::Parser::boundaries_only(max_event_bytes),
                store,
                tx,
                taps: Vec::new(),
                ended: false,
                merge,
                max_pending: self.lag_blocks,
            }),
            subscribers: AtomicUsize::new(0),
            changed: Notify::new(),
            merged: Notify::new(),
        });
        for k in &hub.keys {
            map.entry(k.clone()).or_default().push(hub.clone());
        }
        self.counters.hubs.fetch_add(1, Ordering::Relaxed);
        drop(map);
        if let Some(o) = owner {
            self.owners().entry(o).or_default().push_back(hub.clone());
        }
        // A hub that has not started cannot have ended: attach directly.
        let resumed = replay.is_some();
        if let Some(v) = &replay {
            self.counters.hits.fetch_add(1, Ordering::Relaxed);
            self.counters
                .events_replayed
                .fetch_add(v.len() as u64, Ordering::Relaxed);
        }
        let mut sub = hub.attach(hub.lock(), replay.unwrap_or_default());
        sub.resumed = resumed;
        (hub, sub, true)
    }

    /// Keeps every live hub from lingering out (each held as by a subscriber) for as
    /// long as the result is kept: the old process of an upgrade holds its hubs so the
    /// new one can take them over.
    pub fn hold_all(&self) -> Vec<Subscription> {
        self.each(|_| true)
            .iter()
            .filter_map(|h| h.subscribe(Start::Last(0)))
            .collect()
    }

    /// For the new process of an upgrade: all the recent blocks of `key`'s hub, then
    /// its live ones. Only hubs whose audience has the `audience` fingerprint the new
    /// process computed for its own request and response (see
    /// [`Audience::fingerprint`]; `same_audience` compares) qualify. Prefers the newest that holds `last_id`,
    /// else the newest.
    pub fn hand_over(
        &self,
        key: &StreamKey,
        last_id: Option<&str>,
        same_audience: impl Fn(&[u8]) -> bool,
    ) -> Option<Subscription> {
        let hubs: Vec<Arc<Hub>> = self
            .hubs_of(key)
            .into_iter()
            .filter(|h| h.audience.fingerprint().is_some_and(|f| same_audience(&f)))
            .collect();
        let holds = |h: &&Arc<Hub>| {
            last_id.is_some_and(|id| matches!(h.lock().store.after(id), Lookup::After(_)))
        };
        let hub = hubs.iter().rev().find(holds).or(hubs.last())?;
        hub.subscribe(Start::Last(usize::MAX))
    }

    /// Waits for the right to open `key`'s upstream. Whoever holds the guard opens (or
    /// finds) the hub; the others then join it.
    pub async fn open_lock(&self, key: &StreamKey) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = {
            let mut map = self.opening.lock().unwrap_or_else(|p| p.into_inner());
            if map.len() > 1024 {
                map.retain(|_, w| w.strong_count() > 0);
            }
            match map.get(key).and_then(std::sync::Weak::upgrade) {
                Some(l) => l,
                None => {
                    let l = Arc::new(tokio::sync::Mutex::new(()));
                    map.insert(key.clone(), Arc::downgrade(&l));
                    l
                }
            }
        };
        lock.lock_owned().await
    }

    /// Ends every hub (the process is about to exit: their cluster writers hand over).
    pub fn end_all(&self) {
        self.each(|_| true).iter().for_each(|h| h.end());
    }

    /// Removes a hub that ended or lingered out.
    pub fn remove(&self, hub: &Arc<Hub>) {
        let mut map = self.lock();
        let mut found = false;
        for key in &hub.keys {
            if let Some(v) = map.get_mut(key) {
                let before = v.len();
                v.retain(|h| !Arc::ptr_eq(h, hub));
                found |= v.len() < before;
                if v.is_empty() {
                    map.remove(key);
                }
            }
        }
        if found {
            self.counters.hubs.fetch_sub(1, Ordering::Relaxed);
        }
        drop(map);
        if let Some(o) = hub.owner {
            let mut owners = self.owners();
            if let Some(v) = owners.get_mut(&o) {
                v.retain(|h| !Arc::ptr_eq(h, hub));
                if v.is_empty() {
                    owners.remove(&o);
                }
            }
        }
    }

    /// Hubs without a subscriber now, waiting out their linger window.
    pub fn lingering(&self) -> usize {
        self.each(|h| h.subscribers() == 0).len()
    }

    /// Whether another hub may be created.
    pub fn has_room(&self) -> bool {
        self.counters.hubs.load(Ordering::Relaxed) < self.max_hubs
    }

    /// Hubs registered now.
    pub fn len(&self) -> usize {
        self.each(|_| true).len()
    }

    /// Every key a hub answers to now.
    pub fn keys(&self) -> Vec<StreamKey> {
        self.lock().keys().cloned().collect()
    }

    /// Every registered hub for which `pick` holds, each once (a hub with aliases is
    /// listed under each of its keys).
    fn each(&self, pick: impl Fn(&Hub) -> bool) -> Vec<Arc<Hub>> {
        self.lock()
            .iter()
            .flat_map(|(k, v)| v.iter().filter(move |h| h.keys.first() == Some(k)))
            .filter(|h| pick(h))
            .cloned()
            .collect()
    }

    /// True when no hub is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
