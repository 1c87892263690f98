//! Stream hubs: one upstream event stream, its recent blocks, and the clients reading it.
//!
//! A hub is fed upstream bytes (by `relay`, which owns the pingora subrequest), cuts them
//! into blocks with [`sse::Parser`], records each in its [`ReplayStore`] and broadcasts
//! it, under one lock, so a subscriber that attaches with a `Last-Event-ID` gets the
//! replay and then the live blocks with no gap and no duplicate.
//!
//! The [`Registry`] finds hubs by [`StreamKey`]. Keys include the identity headers of the
//! route, so two users never share a hub unless the route says its streams are public.
//! When a hub's last subscriber leaves it lingers, still recording, so a client that comes
//! back soon misses nothing even if the backend ignores `Last-Event-ID`.
//!
//! Knows nothing of pingora: only tokio's sync primitives and the `http` header types.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{broadcast, Notify};

use crate::replay::{Lookup, ReplayStore, StoredEvent};
use crate::sse;

/// What identifies one stream: route, upstream, method, path and query, and the values
/// of the route's identity headers (for public routes, none). Values are kept whole, not
/// hashed, so two different identities can never collide.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StreamKey(Arc<[u8]>);

impl StreamKey {
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

/// A message from a hub to its subscribers.
#[derive(Debug, Clone)]
pub enum HubMsg {
    /// A block to forward as is.
    Block(StoredEvent),
    /// The upstream stream ended (or failed): end the client's stream.
    End,
}

/// Counters the metrics work exports.
#[derive(Debug, Default)]
pub struct ReplayCounters {
    /// Resumes whose `Last-Event-ID` was found.
    pub hits: AtomicU64,
    /// Resumes whose `Last-Event-ID` was not found.
    pub misses: AtomicU64,
    /// Blocks sent from stores on resume.
    pub events_replayed: AtomicU64,
    /// Clients served from an existing hub instead of a new upstream request.
    pub upstreams_saved: AtomicU64,
    /// Hubs alive (with subscribers or lingering).
    pub hubs: AtomicUsize,
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

/// A subscriber's view of a hub.
pub struct Subscription {
    /// Blocks to send first (the replay).
    pub replay: Vec<StoredEvent>,
    /// Then these, live.
    pub rx: broadcast::Receiver<HubMsg>,
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
}

/// One upstream stream and its subscribers.
pub struct Hub {
    /// The stream's key, to leave the registry.
    key: StreamKey,
    /// Public route: new clients without `Last-Event-ID` join this hub.
    pub shared: bool,
    /// The upstream's response status and headers, for every subscriber.
    pub head: http::response::Parts,
    inner: Mutex<Inner>,
    /// Subscribers now; changed only under `inner`'s lock.
    subscribers: AtomicUsize,
    /// Woken when `subscribers` changes or the hub ends.
    changed: Notify,
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
        while let Some(ev) = inner.parser.next_block()? {
            let block = StoredEvent {
                id: ev.id.as_str().into(),
                has_id_field: ev.has_id_field,
                sets_retry: ev.retry.is_some(),
                // A block split from the parser's buffer would pin that whole buffer
                // for as long as the store keeps it: copy it out, so the byte bounds
                // count what is really held.
                raw: bytes::Bytes::copy_from_slice(&ev.raw),
                at: Instant::now(),
            };
            inner.store.push(block.clone());
            // No receiver is fine: the hub is lingering and only records.
            let _ = inner.tx.send(HubMsg::Block(block));
            n += 1;
        }
        Ok(n)
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
}

impl Registry {
    /// An empty registry.
    pub fn new(lag_blocks: usize, max_hubs: usize) -> Registry {
        Registry {
            max_hubs,
            hubs: Mutex::new(HashMap::new()),
            opening: Mutex::new(HashMap::new()),
            counters: Arc::new(ReplayCounters::default()),
            lag_blocks: lag_blocks.max(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<StreamKey, Vec<Arc<Hub>>>> {
        self.hubs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Resumes `key` after `last_id` from any live hub that still holds that id
    /// (newest hub first).
    pub fn resume(&self, key: &StreamKey, last_id: &str) -> Option<(Arc<Hub>, Subscription)> {
        let hubs: Vec<Arc<Hub>> = self.lock().get(key).cloned().unwrap_or_default();
        let found = hubs
            .iter()
            .rev()
            .find_map(|h| h.subscribe(Start::After(last_id)).map(|s| (h.clone(), s)));
        let c = &self.counters;
        match &found {
            Some((_, s)) => {
                c.hits.fetch_add(1, Ordering::Relaxed);
                c.events_replayed
                    .fetch_add(s.replay.len() as u64, Ordering::Relaxed);
                c.upstreams_saved.fetch_add(1, Ordering::Relaxed);
            }
            None => {
                c.misses.fetch_add(1, Ordering::Relaxed);
            }
        }
        found
    }

    /// Joins the live shared hub of `key`, if there is one.
    pub fn join_shared(
        &self,
        key: &StreamKey,
        start: Start<'_>,
    ) -> Option<(Arc<Hub>, Subscription)> {
        let hubs: Vec<Arc<Hub>> = self.lock().get(key).cloned().unwrap_or_default();
        let found = hubs
            .iter()
            .rev()
            .filter(|h| h.shared)
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

    /// Creates and registers a hub for a stream whose response head is `head`, and
    /// subscribes its first client. For a shared key that gained a live hub meanwhile,
    /// joins that one instead and returns `created = false` (the caller drops its own
    /// upstream request).
    pub fn create(
        &self,
        key: StreamKey,
        shared: bool,
        head: http::response::Parts,
        store: Box<dyn ReplayStore>,
        max_event_bytes: usize,
    ) -> (Arc<Hub>, Subscription, bool) {
        let mut map = self.lock();
        if shared {
            if let Some(existing) = map.get(&key).and_then(|v| {
                v.iter()
                    .rev()
                    .find_map(|h| h.subscribe(Start::Live).map(|s| (h.clone(), s)))
            }) {
                self.counters
                    .upstreams_saved
                    .fetch_add(1, Ordering::Relaxed);
                return (existing.0, existing.1, false);
            }
        }
        let (tx, _) = broadcast::channel(self.lag_blocks);
        let hub = Arc::new(Hub {
            key: key.clone(),
            shared,
            head,
            inner: Mutex::new(Inner {
                parser: sse::Parser::boundaries_only(max_event_bytes),
                store,
                tx,
                ended: false,
            }),
            subscribers: AtomicUsize::new(0),
            changed: Notify::new(),
        });
        map.entry(key).or_default().push(hub.clone());
        self.counters.hubs.fetch_add(1, Ordering::Relaxed);
        drop(map);
        // A hub that has not started cannot have ended: attach directly.
        let sub = hub.attach(hub.lock(), vec![]);
        (hub, sub, true)
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
        if let Some(v) = map.get_mut(&hub.key) {
            let before = v.len();
            v.retain(|h| !Arc::ptr_eq(h, hub));
            if v.len() < before {
                self.counters.hubs.fetch_sub(1, Ordering::Relaxed);
            }
            if v.is_empty() {
                map.remove(&hub.key);
            }
        }
    }

    /// Hubs without a subscriber now, waiting out their linger window.
    pub fn lingering(&self) -> usize {
        self.lock()
            .values()
            .flatten()
            .filter(|h| h.subscribers() == 0)
            .count()
    }

    /// Whether another hub may be created.
    pub fn has_room(&self) -> bool {
        self.counters.hubs.load(Ordering::Relaxed) < self.max_hubs
    }

    /// Hubs registered now.
    pub fn len(&self) -> usize {
        self.lock().values().map(Vec::len).sum()
    }

    /// True when no hub is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
