//! The reader's side: every block its hub publishes is appended to the shared history,
//! in order, each append fenced by the lease in the same atomic step. The hub's own
//! clients never wait for Redis: the writer reads the hub through a tap of its own
//! ([`crate::hub::Tap`]), and what it could not write in order (Redis away, the tap
//! lagged) starts a new epoch.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::{Cluster, Lease};
use crate::hub::Hub;
use crate::replay::{RingBounds, StoredEvent};

/// Most blocks sent in one append.
const BATCH: usize = 64;

/// Writes one hub's stream to the cluster while this node holds its lease.
pub struct Writer {
    /// Where to write.
    pub cluster: Arc<Cluster>,
    /// The lease taken before the upstream was opened.
    pub lease: Lease,
    /// The route's history bounds, enforced in Redis too.
    pub bounds: RingBounds,
    /// The response head followers answer with ([`super::encode_head`]).
    pub head: Vec<u8>,
    /// The audience fingerprint, private flag first (see `relay::remote`).
    pub audience: Vec<u8>,
}

/// How long an exiting reader goes on once another node follows its stream: the
/// follower opens the upstream beside it and their feeds meet within a few events.
const FOLLOWER_OVERLAP: std::time::Duration = std::time::Duration::from_millis(1000);

/// Ends `hub` (so its writer hands the stream over) once another node's clients follow
/// it, plus the overlap; or after `wait` if none comes (its clients may have left).
async fn end_once_followed(
    cluster: Arc<Cluster>,
    tag: super::Tag,
    hub: Arc<Hub>,
    wait: std::time::Duration,
) {
    let deadline = tokio::time::Instant::now() + wait;
    while tokio::time::Instant::now() < deadline && !hub.ended() {
        if cluster.watched(&tag).await {
            tokio::time::sleep(FOLLOWER_OVERLAP).await;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    hub.end();
}

/// Counts a restarted history (not a first one): the epoch moved from the one last
/// written in (Redis lost it, or this writer could not vouch for continuity).
fn note_epoch(cluster: &Cluster, known: &mut Option<String>, epoch: String) {
    if known.as_ref().is_some_and(|k| *k != epoch) {
        cluster
            .counters
            .epoch_resets
            .fetch_add(1, Ordering::Relaxed);
    }
    *known = Some(epoch);
}

impl Writer {
    /// Runs until the hub ends (then gives the lease up) or another node holds the
    /// lease (then ends the hub: its clients resume from the shared history).
    pub async fn run(mut self, hub: Arc<Hub>) {
        let c = self.cluster.clone();
        // What this hub holds past the history's newest block (a follower that read
        // the upstream beside the old reader for a while) is written first.
        let last = Some(self.lease.last_id.as_str()).filter(|id| !id.is_empty());
        let (held, mut tap) = hub.tap_after(last);
        c.counters.leases_held.fetch_add(1, Ordering::Relaxed);
        // Continue the history where it stands, unless there is none yet or this hub
        // cannot vouch for what follows its newest block.
        let mut prev = match (&held, last) {
            _ if self.lease.epoch.is_empty() => None,
            (None, Some(_)) => None,
            _ => Some(self.lease.offset),
        };
        // The epoch last written in: another one means the history restarted.
        let mut epoch = Some(self.lease.epoch.clone()).filter(|e| !e.is_empty());
        let mut catch_up: Vec<Arc<StoredEvent>> =
            held.unwrap_or_default().into_iter().map(Arc::new).collect();
        let mut handoff = c.handoff();
        let mut announced = false;
        let mut opened = false;
        let every = self.cluster.settings.lease / 3;
        let mut renew = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        let mut fenced = false;
        let mut batch = Vec::new();
        loop {
            if !opened {
                opened = self.open().await;
            }
            tokio::select! {
                biased;
                n = tap.recv_many(&mut batch, BATCH), if catch_up.is_empty() => {
                    if n == 0 {
                        // The hub ended. Blocks dropped after the last one written: the
                        // history cannot vouch for its end (a new epoch, empty).
                        if tap.dropped_at_end() {
                            prev = None;
                            fenced = !self.write(&mut prev, &mut epoch, &[]).await;
                        }
                        break;
                    }
                    // Each run with no hole inside; after a hole (the tap fell behind)
                    // the history cannot continue: a new epoch.
                    let mut written = true;
                    for run in batch.chunk_by(|_, next| !next.after_gap) {
                        if run[0].after_gap {
                            prev = None;
                        }
                        let blocks = run.iter().map(|t| &t.block);
                        written = self.write(&mut prev, &mut epoch, blocks).await;
                        if !written {
                            break;
                        }
                    }
                    batch.clear();
                    if !written {
                        fenced = true;
                        break;
                    }
                }
                _ = std::future::ready(()), if !catch_up.is_empty() => {
                    let n = catch_up.len().min(BATCH);
                    let batch: Vec<_> = catch_up.drain(..n).collect();
                    if !self.write(&mut prev, &mut epoch, &batch).await {
                        fenced = true;
                        break;
                    }
                }
                wait = async { handoff.wait_for(|h| h.is_some()).await.ok().and_then(|h| *h) }, if !announced => {
                    announced = true;
                    if let Some(wait) = wait {
                        if let Ok(Some((offset, e))) =
                            c.announce_handoff(&self.lease, prev, self.bounds).await
                        {
                            prev = Some(offset);
                            note_epoch(&c, &mut epoch, e);
                        }
                        tokio::spawn(end_once_followed(c.clone(), self.lease.tag.clone(), hub.clone(), wait));
                    }
                }
                _ = renew.tick() => {
                    if let Ok(false) = c.renew(&self.lease).await {
                        if !self.retake().await {
                            fenced = true;
                            break;
                        }
                        prev = None;
                    }
                }
            }
        }
        if fenced {
            c.counters.fenced.fetch_add(1, Ordering::Relaxed);
            tracing::info!("cluster: another node reads this stream now; ending it here");
            hub.end();
        } else {
            c.finish(&self.lease).await;
        }
        // Only now: an exiting process waits for this count to reach zero.
        c.counters.leases_held.fetch_sub(1, Ordering::Relaxed);
    }

    /// Appends `batch` after `prev` (updated), taking the lease again if it ran out
    /// while no other node took it; `false` when another node holds it (fenced).
    async fn write<'a, I>(
        &mut self,
        prev: &mut Option<u64>,
        epoch: &mut Option<String>,
        batch: I,
    ) -> bool
    where
        I: IntoIterator<Item = &'a Arc<StoredEvent>> + Clone,
    {
        loop {
            match self
                .cluster
                .append(&self.lease, *prev, self.bounds, batch.clone())
                .await
            {
                Ok(Some((offset, e))) => {
                    *prev = Some(offset);
                    note_epoch(&self.cluster, epoch, e);
                }
                Ok(None) if self.retake().await => {
                    *prev = None;
                    self.open().await;
                    continue;
                }
                Ok(None) => return false,
                // Maybe written, maybe not: vouch for nothing from here.
                Err(_) => *prev = None,
            }
            return true;
        }
    }

    /// Records the head and audience; `false` if Redis did not take them (tried again
    /// before the next append).
    async fn open(&self) -> bool {
        let ttl = self.bounds.max_age + self.cluster.settings.lease * 2;
        matches!(
            self.cluster
                .open(
                    &self.lease,
                    &self.head,
                    &self.audience,
                    ttl.max(Duration::from_secs(1))
                )
                .await,
            Ok(true)
        )
    }

    /// The lease was lost: takes it again if no other node took it (it ran out while
    /// Redis was away). `false` when another node holds it.
    async fn retake(&mut self) -> bool {
        match self.cluster.acquire(&self.lease.tag).await {
            Ok(Some(lease)) => {
                self.lease = lease;
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::batch::tests::{node, redis};
    use crate::hub::{NewHub, Registry, Viewer};
    use crate::key::{Audience, StreamKey};
    use crate::replay::{Budget, MemoryRing};

    fn events(ids: std::ops::RangeInclusive<u32>) -> Vec<u8> {
        ids.flat_map(|i| format!("id: {i}\ndata: {i}\n\n").into_bytes())
            .collect()
    }

    /// A writer whose tap fell behind cannot vouch for what it missed: what it writes
    /// next starts a new epoch (a resume from before the hole is a miss), never a
    /// history that silently skips the dropped blocks.
    #[tokio::test(flavor = "current_thread")]
    async fn a_writer_that_fell_behind_starts_a_new_epoch() {
        let server = redis();
        let c = node(server.1, "a").await;
        let bounds = RingBounds {
            max_events: 100,
            max_bytes: 1 << 20,
            max_age: Duration::from_secs(60),
        };
        let key = StreamKey::new([&b"lagging"[..]]);
        let tag = c.tag(&key);
        let lease = c.acquire(&tag).await.unwrap().expect("a free lease");
        // Taps hold 4 blocks, as the clients' queues do.
        let registry = Registry::new(4, 10);
        let head = http::Response::new(()).into_parts().0;
        let no_headers = http::HeaderMap::new();
        let (hub, _client, _) = registry.create(
            NewHub {
                key: key.clone(),
                aliases: vec![],
                shared: false,
                audience: Audience::of(&head.headers, &no_headers, &[], false),
                head,
                store: Box::new(MemoryRing::new(bounds, Budget::new(1 << 20))),
                max_event_bytes: 1 << 16,
                seed: None,
                owner: None,
            },
            Viewer {
                headers: &no_headers,
                has_identity: false,
            },
        );
        let writer = Writer {
            cluster: c.clone(),
            lease,
            bounds,
            head: b"head".to_vec(),
            audience: b"audience".to_vec(),
        };
        let task = tokio::spawn(writer.run(hub.clone()));
        let history = |entries: bool| {
            let (c, tag) = (c.clone(), tag.clone());
            async move { c.peek(&tag, entries).await.unwrap() }
        };
        let wait_top = |top: u64| async move {
            for _ in 0..100 {
                if history(false).await.offset >= top {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            panic!("the history did not reach offset {top}");
        };
        // The writer has tapped the hub once it recorded the head.
        for _ in 0..100 {
            if !history(false).await.head.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Within the tap's bound: one history.
        hub.feed(&events(1..=3)).unwrap();
        wait_top(3).await;
        let first = history(false).await.epoch;
        // Twelve blocks at once while the writer cannot run (this runtime has one
        // thread): the tap keeps four and drops eight. The four continue the history.
        hub.feed(&events(4..=15)).unwrap();
        wait_top(7).await;
        assert_eq!(history(false).await.epoch, first);
        // The next block comes after the hole: a new epoch, holding only what follows.
        hub.feed(&events(16..=16)).unwrap();
        wait_top(8).await;
        let after = history(true).await;
        let ids = |entries: &[crate::cluster::Entry]| -> Vec<String> {
            entries
                .iter()
                .filter(|e| !e.end && !e.handoff)
                .map(|e| e.block.id.to_string())
                .collect()
        };
        assert_ne!(after.epoch, first, "the hole was crossed in the same epoch");
        assert_eq!(ids(&after.entries), ["16"]);
        assert_eq!(c.counters.epoch_resets.load(Ordering::Relaxed), 1);
        // Blocks dropped just before the hub ends: the history cannot vouch for its end.
        hub.feed(&events(17..=30)).unwrap();
        hub.end();
        task.await.unwrap();
        let end = history(true).await;
        assert_ne!(end.epoch, after.epoch, "a hole at the end went unsignalled");
        assert!(ids(&end.entries).is_empty(), "{:?}", ids(&end.entries));
        assert_eq!(c.counters.epoch_resets.load(Ordering::Relaxed), 2);
    }
}
