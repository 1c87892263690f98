//! Stream hubs: one upstream event stream, its recent blocks, and the clients reading it.
//!
//! A hub is fed upstream bytes (by the relay's pump, which owns the upstream response),
//! cuts them into blocks with [`sse::Parser`], records each in its [`ReplayStore`] and
//! broadcasts it, under one lock, so a subscriber that attaches with a `Last-Event-ID` gets the
//! replay and then the live blocks with no gap and no duplicate.
//!
//! The [`Registry`] finds hubs by [`StreamKey`] (the primary key, see [`crate::key`]), and
//! lets a request read a hub only when the hub's [`Audience`] admits it (the secondary
//! key: `Vary`, private responses), so two users never share a hub unless the route
//! says its streams are public.
//! When a hub's last subscriber leaves it lingers, still recording, so a client that comes
//! back soon misses nothing even if the backend ignores `Last-Event-ID`.
//!
//! - `registry`: finding, creating and charging hubs; the counters metrics export.
//! - `counters`: what the registry counts, and why a resume missed.
//! - `merge`: merging the old process's feed with a new upstream after an upgrade.
//! - `fanout`: how the blocks reach each reader at its own pace.
//!
//! Knows nothing of pingora: only tokio's sync primitives and the `http` header types.

mod counters;
mod fanout;
mod merge;
mod registry;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

pub use crate::key::StreamKey;
pub use counters::{Miss, ReplayCounters};
pub use fanout::{Receiver, RecvError, Tap, Tapped, TryRecvError};
pub use registry::{NewHub, Registry, Seed, Viewer};

use crate::key::Audience;
use crate::limit::ClientKey;
use crate::replay::{Lookup, ReplayStore, StoredEvent};
use crate::sse;
use merge::Merge;

/// A message from a hub to its subscribers.
#[derive(Debug, Clone)]
pub enum HubMsg {
    /// A block to forward as is. Shared: a shared hub's ring preallocates a slot per
    /// `lag_blocks`, so slots stay pointer-sized.
    Block(Arc<StoredEvent>),
    /// The upstream stream ended (or failed): end the client's stream.
    End,
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
    pub rx: Receiver,
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
    tx: fanout::Sender,
    /// Live blocks to readers that are not subscribers (the cluster's writer).
    taps: Vec<fanout::TapSender>,
    /// No more blocks will come.
    ended: bool,
    /// Set while blocks handed over by the process this one replaced are merged with
    /// this hub's own upstream.
    merge: Option<Merge>,
    /// Most upstream blocks held back while merging.
    max_pending: usize,
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

    /// A block another node's reader wrote to the shared history (this hub follows
    /// it): recorded and sent like an upstream block.
    pub fn take_remote(&self, block: StoredEvent) {
        let mut inner = self.lock();
        if !inner.ended {
            inner.publish(block);
        }
    }

    /// This hub, which followed another node's reader, now reads the upstream itself:
    /// the blocks the upstream repeats of those already published are dropped (merged
    /// by id, as after an upgrade). `overlap`: the other reader still feeds it (a
    /// planned handoff), so the upstream's blocks wait until they meet its feed, which
    /// goes on through [`Hub::take_handed_over`]; else only the repeats are dropped.
    pub fn begin_takeover(&self, overlap: bool) {
        let mut inner = self.lock();
        let handed = inner
            .store
            .last(usize::MAX)
            .into_iter()
            .filter(|b| b.has_id_field)
            .map(|b| b.id)
            .collect();
        inner.merge = Some(Merge {
            handed,
            pending: Default::default(),
            caught_up: !overlap,
        });
    }

    /// The upstream opened beside another reader failed: that reader's feed alone goes
    /// on (what the upstream sent and was held back is dropped: the feed has it).
    pub fn abort_takeover(&self) {
        self.lock().merge = None;
    }

    /// Who may read it.
    pub fn audience(&self) -> Audience {
        self.audience.clone()
    }

    /// The last event id this hub published, if any.
    pub fn last_id(&self) -> Option<Arc<str>> {
        self.lock()
            .store
            .last(1)
            .pop()
            .map(|b| b.id)
            .filter(|id| !id.is_empty())
    }

    /// Every block this hub publishes from now on, without counting as a subscriber
    /// (the cluster's writer: it must not keep the hub from lingering out), and, taken
    /// under the same lock so nothing slips between, the blocks it holds after the one
    /// that carried `after` (`None` when it holds no such block).
    /// Its queue holds `lag_blocks`, as a subscriber's does; it closes when the hub ends.
    pub fn tap_after(&self, after: Option<&str>) -> (Option<Vec<StoredEvent>>, Tap) {
        let mut inner = self.lock();
        let held = match after {
            Some(id) => match inner.store.after(id) {
                Lookup::After(v) => Some(v),
                Lookup::Unknown => None,
            },
            None => None,
        };
        let (tx, tap) = fanout::TapSender::new(inner.max_pending);
        if inner.ended {
            // Closed at once: the reader sees the end after what is held.
            drop(tx);
        } else {
            inner.taps.push(tx);
        }
        (held, tap)
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
        self.finish(self.lock());
    }

    /// Marks the hub ended (under its lock, which it releases), tells the subscribers,
    /// and wakes the pump (it may be waiting out the linger window: it closes the
    /// upstream now) and a merge.
    fn finish(&self, mut inner: MutexGuard<'_, Inner>) {
        if !inner.ended {
            inner.ended = true;
            inner.tx.send(HubMsg::End);
            inner.taps.clear();
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
        let inner = self.lock();
        if self.subscribers() > 0 {
            return false;
        }
        self.finish(inner);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::Denied;
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
            handed_over: true,
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
