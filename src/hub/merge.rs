//! Merging two feeds of one stream after an upgrade (see [`Merge`]), and how a block
//! is published to a hub's store and subscribers.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

use super::{HubMsg, Inner};
use crate::replay::StoredEvent;

/// Merging two feeds of one stream after an upgrade: the old process's hub (its store,
/// then its live blocks) and this process's new upstream. Old blocks are published as
/// they come; new ones are held back until the new upstream repeats an id the old one
/// handed over ("caught up"). From there on the new upstream alone feeds the hub, minus
/// the blocks the old feed published already, so each event goes out once and in order.
#[derive(Default)]
pub(super) struct Merge {
    /// Ids handed over so far.
    pub(super) handed: HashSet<Arc<str>>,
    /// New upstream blocks not yet matched with the old feed.
    pub(super) pending: VecDeque<StoredEvent>,
    /// The new upstream repeated a handed-over id: the old feed is no longer used.
    pub(super) caught_up: bool,
}

impl Merge {
    pub(super) fn was_handed(&self, b: &StoredEvent) -> bool {
        b.has_id_field && self.handed.contains(&b.id)
    }
}

impl Inner {
    /// Records a block and sends it to the subscribers.
    pub(super) fn publish(&mut self, block: StoredEvent) {
        let shared = Arc::new(block);
        self.store.push(StoredEvent::clone(&shared));
        self.taps.retain_mut(|t| t.send(&shared));
        // No receiver is fine: the hub is lingering and only records.
        self.tx.send(HubMsg::Block(shared));
    }

    /// Whether the old feed is still wanted.
    pub(super) fn merging(&self) -> bool {
        self.merge.as_ref().is_some_and(|m| !m.caught_up)
    }

    /// A block from this hub's own upstream.
    pub(super) fn take_upstream(&mut self, block: StoredEvent) {
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
    pub(super) fn take_old(&mut self, block: StoredEvent) {
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
    pub(super) fn flush_pending(&mut self) {
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
    pub(super) fn end_merge(&mut self) {
        self.flush_pending();
        self.merge = None;
    }
}
