//! Stream hubs: one upstream event stream, its recent blocks, and the clients reading it.
//!
//! A hub is fed upstream bytes (by `relay`, which owns the pingora subrequest), cuts them
//! into blocks with [`sse::Parser`], records each in its [`ReplayStore`] and broadcasts
//! it, under one lock, so a subscriber that attaches with a `Last-Event-ID` gets the
//! replay and then the live blocks with no gap and no duplicate.
//!
//! The [`Registry`] finds hubs by [`StreamKey`] (the primary key, see [`crate::key`]), and
//! lets a request read a hub only when the hub's [`Audience`] admits it (the secondary
//! key: `Vary`, private responses), so two users never share a hub unless the route
//! says its streams are public.
//! When a hub's last subscriber leaves it lingers, still recording, so a client that comes
//! back soon misses nothing even if the backend ignores `Last-Event-ID`.
//!
//! Knows nothing of pingora: only tokio's sync primitives and the `http` header types.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{broadcast, Notify};

pub use crate::key::StreamKey;
use crate::key::{Audience, Denied};
use crate::limit::ClientKey;
use crate::replay::{Lookup, ReplayStore, StoredEvent};
use crate::sse;

/// A message from a hub to its subscribers.
#[derive(Debug, Clone)]
pub enum HubMsg {
    /// A block to forward as is. Shared: the channel preallocates a slot per
    /// `lag_blocks` for every hub, idle or not, so slots stay pointer-sized.
    Block(Arc<StoredEvent>),
    /// The upstream stream ended (or failed): end the client's stream.
    End,
}

/// Counters the metrics work exports.
#[derive(Debug, Default)]
pub struct ReplayCounters {
    /// Resumes whose `Last-Event-ID` was found.
    pub hits: AtomicU64,
    /// Resumes whose `Last-Event-ID` was not found, by [`Miss::index`].
    pub misses: [AtomicU64; Miss::ALL.len()],
    /// Blocks sent from stores on resume.
    pub events_replayed: AtomicU64,
    /// Clients served from an existing hub instead of a new upstream request.
    pub upstreams_saved: AtomicU64,
    /// Hubs alive (with subscribers or lingering).
    pub hubs: AtomicUsize,
    /// Blocks taken over from the process this one replaced (graceful upgrade).
    pub handed_over: AtomicU64,
    /// Lingering hubs closed early because their client opened too many.
    pub evicted: AtomicU64,
}

/// Where a new subscriber starts.
#[derive(Debug, Clone, Copy)]
pub enum Start<'a> {
    /// Live, from the next block.
    Live,
    /// After the block that carried this id; fails if the id is unknown.
    After(&'a str),
    /// With the last `n` blocks, then live.
    Last(usize),
}

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

/// Why a resume found nothing to replay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Miss {
    /// No live hub of the key holds the id (evicted, expired, or never seen).
    Unknown,
    /// A hub of the key exists but may not be read by this request.
    Denied(Denied),
}

impl Miss {
    /// Every miss, in [`Miss::index`] order.
    pub const ALL: [Miss; 4] = [
        Miss::Unknown,
        Miss::Denied(Denied::Vary),
        Miss::Denied(Denied::VaryAny),
        Miss::Denied(Denied::Private),
    ];

    /// Position in [`ReplayCounters::misses`].
    pub fn index(self) -> usize {
        Miss::ALL.iter().position(|m| *m == self).unwrap_or(0)
    }

    /// For metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Miss::Unknown => "unknown_id",
            Miss::Denied(d) => d.as_str(),
        }
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

/// A subscriber's view of a hub.
pub struct Subscription {
    /// Blocks to send first (the replay).
    pub replay: Vec<StoredEvent>,
    /// Then these, live.
    pub rx: broadcast::Receiver<HubMsg>,
    /// The subscriber asked to resume after an id and the replay starts right after it.
    pub resumed: bool,
    /// Keeps the subscriber counted; dropping it lets the hub linger.
    _guard: SubscriberGuard,
}

struct SubscriberGuard(Arc<Hub>);

impl Drop for SubscriberGuard {
    fn drop(&mut self) {
        // Under the hub's lock, so an idle check never races an attach or a leave.
        let inner = self.0.lock();
        self.0.subscribers.fetch_sub(1, Ordering::AcqRel);
        drop(inner);
        self.0.changed.notify_waiters();
    }
}

/// State changed together under the hub's lock.
struct Inner {
    /// Cuts upstream bytes into blocks.
    parser: sse::Parser,
    /// Recent blocks.
    store: Box<dyn ReplayStore>,
    /// Live blocks to subscribers.
    tx: broadcast::Sender<HubMsg>,
    /// No more blocks will come.
    ended: bool,
    /// Set while blocks handed over by the process this one replaced are merged with
    /// this hub's own upstream.
    merge: Option<Merge>,
    /// Most upstream blocks held back while merging.
    max_pending: usize,
}

/// Merging two feeds of one stream after an upgrade: the old process's hub (its store,
/// then its live blocks) and this process's new upstream. Old blocks are published as
/// they come; new ones are held back until the new upstream repeats an id the old one
/// handed over ("caught up"). From there on the new upstream alone feeds the hub, minus
/// the blocks the old feed published already, so each event goes out once and in order.
#[derive(Default)]
struct Merge {
    /// Ids handed over so far.
    handed: HashSet<Arc<str>>,
    /// New upstream blocks not yet matched with the old feed.
    pending: VecDeque<StoredEvent>,
    /// The new upstream repeated a handed-over id: the old feed is no longer used.
    caught_up: bool,
}

impl Merge {
    fn was_handed(&self, b: &StoredEvent) -> bool {
        b.has_id_field && self.handed.contains(&b.id)
    }
}

impl Inner {
    /// Records a block and sends it to the subscribers.
    fn publish(&mut self, block: StoredEvent) {
        let shared = Arc::new(block);
        self.store.push(StoredEvent::clone(&shared));
        // No receiver is fine: the hub is lingering and only records.
        let _ = self.tx.send(HubMsg::Block(shared));
    }

    /// Whether the old feed is still wanted.
    fn merging(&self) -> bool {
        self.merge.as_ref().is_some_and(|m| !m.caught_up)
    }

    /// A block from this hub's own upstream.
    fn take_upstream(&mut self, block: StoredEvent) {
        let Some(merge) = &mut self.merge else {
            return self.publish(block);
        };
        if merge.was_handed(&block) {
            // The old feed published this one already.
            if !merge.caught_up {
                merge.caught_up = true;
                self.flush_pending();
            }
            return;
        }
        if merge.caught_up {
            // Past the last handed-over block: nothing left to filter.
            self.merge = None;
            return self.publish(block);
        }
        merge.pending.push_back(block);
        if merge.pending.len() > self.max_pending {
            // No overlap in sight (ids that never repeat, or none at all): stop waiting.
            self.end_merge();
        }
    }

    /// A block handed over by the old process (ignored once the new upstream caught up).
    fn take_old(&mut self, block: StoredEvent) {
        let Some(merge) = self.merge.as_mut().filter(|m| !m.caught_up) else {
            return;
        };
        let matched = block.has_id_field.then(|| {
            merge
                .pending
                .iter()
                .position(|p| p.has_id_field && p.id == block.id)
        });
        match matched.flatten() {
            Some(i) => {
                // The new upstream got this one too: it is the overlap, and the held-back
                // blocks after it are newer than anything the old feed sent.
                merge.pending.drain(..=i);
                self.publish(block);
                self.end_merge();
            }
            None => {
                if block.has_id_field {
                    merge.handed.insert(block.id.clone());
                }
                self.publish(block);
            }
        }
    }

    /// Publishes the held-back blocks the old feed did not publish.
    fn flush_pending(&mut self) {
        let Some(merge) = &mut self.merge else {
            return;
        };
        let pending = std::mem::take(&mut merge.pending);
        let fresh: Vec<StoredEvent> = pending
            .into_iter()
            .filter(|b| !merge.was_handed(b))
            .collect();
        for b in fresh {
            self.publish(b);
        }
    }

    /// Ends the merge at once: the new upstream alone feeds the hub from now.
    fn end_merge(&mut self) {
        self.flush_pending();
        self.merge = None;
    }
}

/// One upstream stream and its subscribers.
pub struct Hub {
    /// The keys the hub is registered under, to leave the registry: the primary key
    /// first, then aliases (see [`NewHub::aliases`]).
    keys: Vec<StreamKey>,
    /// Public route: new clients without `Last-Event-ID` join this hub.
    pub shared: bool,
    /// Who else may read it (secondary key).
    audience: Audience,
    /// The client charged for it.
    owner: Option<ClientKey>,
    /// The upstream's response status and headers, for every subscriber.
    pub head: http::response::Parts,
    inner: Mutex<Inner>,
    /// Subscribers now; changed only under `inner`'s lock.
    subscribers: AtomicUsize,
    /// Woken when `subscribers` changes or the hub ends.
    changed: Notify,
    /// Woken (with a stored permit) when a merge ends or the hub ends.
    merged: Notify,
}

/// Why a block could not be taken from the upstream.
pub type FeedError = sse::ParseError;

impl Hub {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves consistent data (each step is atomic
        // enough for a replay cache); keep serving rather than poison every stream.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Feeds upstream bytes: each finished block is recorded and broadcast.
    pub fn feed(&self, bytes: &[u8]) -> Result<usize, FeedError> {
        let mut inner = self.lock();
        inner.parser.push(bytes);
        let mut n = 0;
        let was_merging = inner.merging();
        while let Some(ev) = inner.parser.next_block()? {
            let block = stored(&ev);
            inner.take_upstream(block);
            n += 1;
        }
        let merge_ended = was_merging && !inner.merging();
        drop(inner);
        if merge_ended {
            self.merged.notify_one();
        }
        Ok(n)
    }

    /// Publishes a block handed over by the process this one replaced, unless this
    /// hub's own upstream has caught up already (see [`Merge`]).
    pub fn take_handed_over(&self, block: StoredEvent) {
        let mut inner = self.lock();
        if inner.ended {
            return;
        }
        inner.take_old(block);
        let merge_ended = !inner.merging();
        drop(inner);
        if merge_ended {
            self.merged.notify_one();
        }
    }

    /// The old process's feed is over: this hub's own upstream takes over (still
    /// skipping blocks the old feed published).
    pub fn end_handover(&self) {
        let mut inner = self.lock();
        if inner.merging() {
            if let Some(m) = &mut inner.merge {
                m.caught_up = true;
            }
            inner.flush_pending();
        }
        drop(inner);
        self.merged.notify_one();
    }

    /// Whether blocks handed over are still wanted.
    pub fn merging(&self) -> bool {
        self.lock().merging()
    }

    /// Resolves once the merge is over or the hub has ended.
    pub async fn merge_over(&self) {
        while self.merging() && !self.ended() {
            self.merged.notified().await;
        }
    }

    /// The upstream stream is over: tell the subscribers.
    pub fn end(&self) {
        let mut inner = self.lock();
        if !inner.ended {
            inner.ended = true;
            let _ = inner.tx.send(HubMsg::End);
        }
        drop(inner);
        self.changed.notify_waiters();
        self.merged.notify_one();
    }

    /// Whether the upstream stream is over.
    pub fn ended(&self) -> bool {
        self.lock().ended
    }

    /// Subscribers now.
    pub fn subscribers(&self) -> usize {
        self.subscribers.load(Ordering::Acquire)
    }

    /// Attaches a subscriber. `None` when `start` names an id the store does not hold,
    /// or the hub has ended.
    pub fn subscribe(self: &Arc<Self>, start: Start<'_>) -> Option<Subscription> {
        let mut inner = self.lock();
        if inner.ended {
            return None;
        }
        let replay = match start {
            Start::Live => vec![],
            Start::Last(n) => inner.store.last(n),
            Start::After(id) => match inner.store.after(id) {
                Lookup::After(v) => v,
                Lookup::Unknown => return None,
            },
        };
        Some(self.attach(inner, replay))
    }

    /// Subscribes while holding the lock the feeder takes: nothing slips between the
    /// replay and the live blocks. Counted under it too, so `end_if_idle` cannot end
    /// the hub in between.
    fn attach(
        self: &Arc<Self>,
        inner: MutexGuard<'_, Inner>,
        replay: Vec<StoredEvent>,
    ) -> Subscription {
        let rx = inner.tx.subscribe();
        self.subscribers.fetch_add(1, Ordering::AcqRel);
        drop(inner);
        self.changed.notify_waiters();
        Subscription {
            replay,
            rx,
            resumed: false,
            _guard: SubscriberGuard(self.clone()),
        }
    }

    /// Ends the hub if it still has no subscriber (checked under the lock attaches
    /// take); returns whether it ended.
    pub fn end_if_idle(&self) -> bool {
        let mut inner = self.lock();
        if self.subscribers() > 0 {
            return false;
        }
        if !inner.ended {
            inner.ended = true;
            let _ = inner.tx.send(HubMsg::End);
        }
        drop(inner);
        // The pump may be waiting out the linger window: it closes the upstream now.
        self.changed.notify_waiters();
        self.merged.notify_one();
        true
    }

    /// Resolves when the hub has had no subscriber for `linger` in a row, or has ended.
    /// (Create it once and keep polling the same future: each new call starts over.)
    pub async fn idle_for(&self, linger: Duration) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.ended() {
                return;
            }
            if self.subscribers() == 0 {
                tokio::select! {
                    _ = tokio::time::sleep(linger) => {
                        if self.subscribers() == 0 {
                            return;
                        }
                    }
                    _ = changed => {}
                }
            } else {
                changed.await;
            }
        }
    }
}

/// A parsed block as hubs keep it.
pub fn stored(ev: &sse::Event) -> StoredEvent {
    StoredEvent {
        id: ev.id.as_str().into(),
        has_id_field: ev.has_id_field,
        sets_retry: ev.retry.is_some(),
        // A block split from the parser's buffer would pin that whole buffer for as long
        // as the store keeps it: copy it out, so the byte bounds count what is really
        // held.
        raw: bytes::Bytes::copy_from_slice(&ev.raw),
        at: Instant::now(),
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
                let c = &self.counters;
                c.hits.fetch_add(1, Ordering::Relaxed);
                c.events_replayed
                    .fetch_add(s.replay.len() as u64, Ordering::Relaxed);
                c.upstreams_saved.fetch_add(1, Ordering::Relaxed);
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
        let (tx, _) = broadcast::channel(self.lag_blocks);
        let mut merge = None;
        let mut replay = None;
        if let Some(seed) = seed {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replay::{Budget, MemoryRing, RingBounds};

    static NO_HEADERS: std::sync::LazyLock<http::HeaderMap> =
        std::sync::LazyLock::new(http::HeaderMap::new);

    /// An anonymous request with no headers.
    fn nobody() -> Viewer<'static> {
        Viewer {
            headers: &NO_HEADERS,
            has_identity: false,
        }
    }

    /// A hub of `key` for a response with `head` headers.
    fn new_hub(key: &StreamKey, head: http::HeaderMap, seed: Option<Seed>) -> NewHub {
        let bounds = RingBounds {
            max_events: 100,
            max_bytes: 1 << 20,
            max_age: Duration::from_secs(60),
        };
        let mut response = http::Response::new(()).into_parts().0;
        let identity = ["cookie".to_owned()];
        let audience = Audience::of(&head, &http::HeaderMap::new(), &identity, false);
        response.headers = head;
        NewHub {
            key: key.clone(),
            aliases: vec![],
            shared: false,
            audience,
            head: response,
            store: Box::new(MemoryRing::new(bounds, Budget::new(1 << 20))),
            max_event_bytes: 1 << 16,
            seed,
            owner: None,
        }
    }

    fn block(id: u32) -> StoredEvent {
        let raw = format!("id: {id}\ndata: {id}\n\n");
        let mut p = sse::Parser::boundaries_only(1 << 16);
        p.push(raw.as_bytes());
        stored(&p.next_block().unwrap().unwrap())
    }

    fn raw(ids: &[u32]) -> Vec<u8> {
        ids.iter()
            .flat_map(|i| format!("id: {i}\ndata: {i}\n\n").into_bytes())
            .collect()
    }

    /// A hub seeded with `seed` as handed over, its first subscriber resuming after
    /// `after`.
    fn seeded(seed: &[u32], after: &str) -> (Arc<Hub>, Subscription) {
        let registry = Registry::new(64, 10);
        let seed = Seed {
            blocks: seed.iter().map(|i| block(*i)).collect(),
            resume_after: Some(after.into()),
        };
        let (hub, sub, created) = registry.create(
            new_hub(
                &StreamKey::new([&b"k"[..]]),
                http::HeaderMap::new(),
                Some(seed),
            ),
            nobody(),
        );
        assert!(created);
        (hub, sub)
    }

    fn received(sub: &mut Subscription) -> Vec<String> {
        let mut ids: Vec<String> = sub.replay.iter().map(|b| b.id.to_string()).collect();
        while let Ok(HubMsg::Block(b)) = sub.rx.try_recv() {
            ids.push(b.id.to_string());
        }
        ids
    }

    #[test]
    fn seed_resumes_the_first_subscriber_after_its_id() {
        let (_hub, mut sub) = seeded(&[1, 2, 3, 4], "2");
        assert!(sub.resumed);
        assert_eq!(received(&mut sub), ["3", "4"]);
    }

    #[test]
    fn new_upstream_behind_the_old_feed_is_cut_at_the_overlap() {
        let (hub, mut sub) = seeded(&[1, 2, 3], "3");
        hub.take_handed_over(block(4));
        hub.take_handed_over(block(5));
        // The new upstream starts at 4: the old feed had 4 and 5 already.
        hub.feed(&raw(&[4, 5, 6, 7])).unwrap();
        assert!(!hub.merging());
        // Late blocks of the old feed are ignored now.
        hub.take_handed_over(block(6));
        assert_eq!(received(&mut sub), ["4", "5", "6", "7"]);
    }

    #[test]
    fn new_upstream_ahead_of_the_old_feed_waits_for_it() {
        let (hub, mut sub) = seeded(&[1, 2], "2");
        // The new upstream is quicker than the old feed: held back until they meet.
        hub.feed(&raw(&[4, 5])).unwrap();
        assert!(hub.merging());
        hub.take_handed_over(block(3));
        hub.take_handed_over(block(4));
        assert!(!hub.merging());
        hub.feed(&raw(&[6])).unwrap();
        assert_eq!(received(&mut sub), ["3", "4", "5", "6"]);
    }

    #[test]
    fn old_feed_ending_without_overlap_releases_the_new_upstream() {
        let (hub, mut sub) = seeded(&[1, 2], "2");
        hub.take_handed_over(block(3));
        hub.feed(&raw(&[5])).unwrap();
        hub.end_handover();
        hub.feed(&raw(&[6])).unwrap();
        assert_eq!(received(&mut sub), ["3", "5", "6"]);
    }

    #[test]
    fn hand_over_prefers_the_hub_that_holds_the_id() {
        let registry = Registry::new(64, 10);
        let key = StreamKey::new([&b"k"[..]]);
        let mut hubs = vec![];
        for ids in [&[1u32, 2][..], &[7, 8][..]] {
            let (hub, sub, _) =
                registry.create(new_hub(&key, http::HeaderMap::new(), None), nobody());
            hub.feed(&raw(ids)).unwrap();
            hubs.push((hub, sub));
        }
        let ids = |s: Subscription| {
            s.replay
                .iter()
                .map(|b| b.id.to_string())
                .collect::<Vec<_>>()
        };
        let public = Audience::of(&http::HeaderMap::new(), &http::HeaderMap::new(), &[], false)
            .fingerprint()
            .unwrap();
        assert_eq!(
            ids(registry
                .hand_over(&key, Some("1"), |f| f == public)
                .unwrap()),
            ["1", "2"]
        );
        assert_eq!(
            ids(registry.hand_over(&key, None, |f| f == public).unwrap()),
            ["7", "8"]
        );
        assert!(registry
            .hand_over(&StreamKey::new([&b"other"[..]]), None, |f| f == public)
            .is_none());
        // Another audience (here: a private response) is not handed over.
        let mut private = http::HeaderMap::new();
        private.insert(http::header::CACHE_CONTROL, "private".parse().unwrap());
        let other = Audience::of(&private, &http::HeaderMap::new(), &[], false)
            .fingerprint()
            .unwrap();
        assert!(registry.hand_over(&key, None, |f| f == other).is_none());
        // Held hubs do not linger out.
        let held = registry.hold_all();
        assert_eq!(held.len(), 2);
        drop(hubs);
        assert_eq!((registry.lingering(), registry.len()), (0, 2));
    }

    #[test]
    fn only_the_audience_of_a_hub_may_resume_or_join_it() {
        let registry = Registry::new(64, 10);
        let key = StreamKey::new([&b"anonymous"[..]]);
        let alias = StreamKey::new([&b"with its cookie"[..]]);
        let mut head = http::HeaderMap::new();
        head.insert(http::header::SET_COOKIE, "s=1; path=/".parse().unwrap());
        let mut new = new_hub(&key, head, None);
        new.aliases = vec![alias.clone()];
        let (hub, first, _) = registry.create(new, nobody());
        hub.feed(&raw(&[1, 2, 3])).unwrap();
        drop(first);
        // Another anonymous visitor with a guessed id: the response was private.
        assert_eq!(
            registry.resume(&key, "1", nobody()).err(),
            Some(Miss::Denied(Denied::Private))
        );
        // The visitor it was for comes back with the cookie it was given.
        let mut cookie = http::HeaderMap::new();
        cookie.insert(http::header::COOKIE, "s=1".parse().unwrap());
        let back = Viewer {
            headers: &cookie,
            has_identity: true,
        };
        let (_, sub) = registry.resume(&alias, "1", back).unwrap();
        assert_eq!(sub.replay.len(), 2);
        assert_eq!(
            registry.resume(&alias, "9", back).err(),
            Some(Miss::Unknown)
        );
        // Listed once, removed from every key.
        assert_eq!(registry.len(), 1);
        drop(sub);
        registry.remove(&hub);
        assert!(registry.is_empty());
        assert_eq!(registry.counters.hubs.load(Ordering::Relaxed), 0);

        // Vary: a shared hub is joined only by requests with the same values.
        let mut vary = http::HeaderMap::new();
        vary.insert(http::header::VARY, "accept-language".parse().unwrap());
        let mut de = http::HeaderMap::new();
        de.insert(http::header::ACCEPT_LANGUAGE, "de".parse().unwrap());
        let mut fr = http::HeaderMap::new();
        fr.insert(http::header::ACCEPT_LANGUAGE, "fr".parse().unwrap());
        let mut new = new_hub(&key, http::HeaderMap::new(), None);
        new.shared = true;
        new.audience = Audience::of(&vary, &de, &[], true);
        let viewer = |h| Viewer {
            headers: h,
            has_identity: false,
        };
        let (_hub, _sub, _) = registry.create(new, viewer(&de));
        assert!(registry
            .join_shared(&key, Start::Live, viewer(&fr))
            .is_none());
        assert!(registry
            .join_shared(&key, Start::Live, viewer(&de))
            .is_some());
    }

    #[test]
    fn a_client_at_its_cap_loses_its_oldest_lingering_hub() {
        let registry = Registry::new(64, 100).with_client_cap(2);
        let me = ClientKey("127.0.0.1".parse().unwrap());
        let other = ClientKey("127.0.0.2".parse().unwrap());
        let open = |name: &str, owner| {
            let mut new = new_hub(
                &StreamKey::new([name.as_bytes()]),
                http::HeaderMap::new(),
                None,
            );
            new.owner = Some(owner);
            registry.create(new, nobody())
        };
        let (theirs, sub, _) = open("theirs", other);
        drop(sub);
        let (first, sub, _) = open("a", me);
        drop(sub);
        let (second, live, _) = open("b", me);
        // At the cap: the lingering one goes, the one with a client stays.
        let (_third, _sub, _) = open("c", me);
        assert!(first.ended());
        assert!(!second.ended());
        assert!(!theirs.ended());
        assert_eq!(registry.counters.evicted.load(Ordering::Relaxed), 1);
        // Both remaining have clients or are new: nothing to close, the hub still opens.
        let (_fourth, _sub4, _) = open("d", me);
        assert!(!second.ended());
        drop(live);
    }
}
