//! How a hub's blocks reach its readers (clients, an upgrade's handover, the cluster's
//! writer), each at its own pace, a reader that falls `lag_blocks` behind being told
//! so instead of holding more.
//!
//! A shared hub has thousands of readers: tokio's broadcast ring serves them without a
//! lock per receive, and its `lag_blocks` slots are few per reader. A private hub has one
//! reader, nearly always caught up, and tokio's ring would still preallocate
//! `lag_blocks` slots (4.9 KiB of every idle private stream at 128): there the queue is
//! `async-broadcast`'s, which starts at one slot and grows, up to `lag_blocks`, only as
//! far as its slowest reader falls behind.
//!
//! The cluster's writer reads through a [`Tap`] of its own instead: it runs on another
//! thread, at a lower priority, and sharing the clients' queue would make the hub's
//! thread take a lock that thread may hold while it waits for a core.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::sync::{broadcast, mpsc};

use super::HubMsg;
use crate::replay::StoredEvent;

/// Why a receive gave no block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecvError {
    /// The reader fell this many blocks behind: they are gone for it.
    Lagged(u64),
    /// The hub is gone.
    Closed,
}

/// Why [`Receiver::try_recv`] gave no block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TryRecvError {
    /// Nothing new yet.
    Empty,
    /// See [`RecvError::Lagged`].
    Lagged(u64),
    /// See [`RecvError::Closed`].
    Closed,
}

/// The hub's side.
pub(super) enum Sender {
    /// A shared hub's: tokio's ring of `lag_blocks` slots.
    Ring(broadcast::Sender<HubMsg>),
    /// A private hub's: a queue that grows up to `lag_blocks`.
    Queue {
        tx: async_broadcast::Sender<HubMsg>,
        /// Keeps the queue open while the hub has no reader (it lingers).
        _open: async_broadcast::InactiveReceiver<HubMsg>,
        /// `lag_blocks`.
        max: usize,
    },
}

/// A reader's side: every block sent after it subscribed.
pub enum Receiver {
    /// A shared hub's reader.
    Ring(broadcast::Receiver<HubMsg>),
    /// A private hub's reader.
    Queue(async_broadcast::Receiver<HubMsg>),
}

impl Sender {
    /// A fan-out for a shared or a private hub whose readers may fall `lag_blocks`
    /// behind.
    pub(super) fn new(shared: bool, lag_blocks: usize) -> Sender {
        let max = lag_blocks.max(1);
        if shared {
            return Sender::Ring(broadcast::channel(max).0);
        }
        let (tx, rx) = async_broadcast::broadcast(1);
        Sender::Queue {
            tx,
            _open: rx.deactivate(),
            max,
        }
    }

    /// Sends `msg` to every reader; none is fine (the hub lingers and only records).
    pub(super) fn send(&mut self, msg: HubMsg) {
        match self {
            Sender::Ring(tx) => {
                let _ = tx.send(msg);
            }
            Sender::Queue { tx, max, .. } => {
                // One lock when there is room; full, the queue grows, and at `max` it
                // turns to dropping its oldest block (the reader that had not taken it
                // learns it fell behind, as with tokio's ring).
                if let Err(async_broadcast::TrySendError::Full(msg)) = tx.try_broadcast(msg) {
                    let cap = tx.capacity();
                    if cap < *max {
                        tx.set_capacity((cap * 2).min(*max));
                    } else {
                        tx.set_overflow(true);
                    }
                    let _ = tx.try_broadcast(msg);
                }
            }
        }
    }

    /// A new reader, from the next block sent.
    pub(super) fn subscribe(&self) -> Receiver {
        match self {
            Sender::Ring(tx) => Receiver::Ring(tx.subscribe()),
            Sender::Queue { tx, .. } => Receiver::Queue(tx.new_receiver()),
        }
    }
}

impl Receiver {
    /// The next block; cancel-safe (a receive dropped before it completes takes
    /// nothing).
    pub async fn recv(&mut self) -> Result<HubMsg, RecvError> {
        match self {
            Receiver::Ring(rx) => rx.recv().await.map_err(|e| match e {
                broadcast::error::RecvError::Lagged(n) => RecvError::Lagged(n),
                broadcast::error::RecvError::Closed => RecvError::Closed,
            }),
            Receiver::Queue(rx) => rx.recv_direct().await.map_err(|e| match e {
                async_broadcast::RecvError::Overflowed(n) => RecvError::Lagged(n),
                async_broadcast::RecvError::Closed => RecvError::Closed,
            }),
        }
    }

    /// The next block if one is ready.
    pub fn try_recv(&mut self) -> Result<HubMsg, TryRecvError> {
        match self {
            Receiver::Ring(rx) => rx.try_recv().map_err(|e| match e {
                broadcast::error::TryRecvError::Empty => TryRecvError::Empty,
                broadcast::error::TryRecvError::Lagged(n) => TryRecvError::Lagged(n),
                broadcast::error::TryRecvError::Closed => TryRecvError::Closed,
            }),
            Receiver::Queue(rx) => rx.try_recv().map_err(|e| match e {
                async_broadcast::TryRecvError::Empty => TryRecvError::Empty,
                async_broadcast::TryRecvError::Overflowed(n) => TryRecvError::Lagged(n),
                async_broadcast::TryRecvError::Closed => TryRecvError::Closed,
            }),
        }
    }
}

/// The hub's side of a [`Tap`].
pub(super) struct TapSender {
    tx: mpsc::Sender<Tapped>,
    /// Blocks were dropped since the last one sent: the next one sent says so.
    dropped: bool,
    /// Set when the hub ends with blocks dropped after the last one sent.
    dropped_at_end: Arc<AtomicBool>,
}

/// A block from a [`Tap`], and whether blocks were dropped just before it (the reader
/// was `lag_blocks` behind): nothing before it can be vouched to continue into it.
pub struct Tapped {
    /// The block.
    pub block: Arc<StoredEvent>,
    /// Blocks were dropped between the one before and this one.
    pub after_gap: bool,
}

/// Every block a hub publishes, for a reader that is not a subscriber (the cluster's
/// writer): its own bounded queue, so the hub's send takes no lock its reader holds.
/// A reader `lag_blocks` behind has the next blocks dropped, and learns where: on the
/// next block that fits, or at the end.
pub struct Tap {
    rx: mpsc::Receiver<Tapped>,
    dropped_at_end: Arc<AtomicBool>,
}

impl TapSender {
    /// A tap of `lag_blocks` slots.
    pub(super) fn new(lag_blocks: usize) -> (TapSender, Tap) {
        let (tx, rx) = mpsc::channel(lag_blocks.max(1));
        let dropped_at_end = Arc::new(AtomicBool::new(false));
        let tap = Tap {
            rx,
            dropped_at_end: dropped_at_end.clone(),
        };
        let tx = TapSender {
            tx,
            dropped: false,
            dropped_at_end,
        };
        (tx, tap)
    }

    /// Sends `block`, or drops it when the reader's queue is full; `false` once the
    /// reader is gone.
    pub(super) fn send(&mut self, block: &Arc<StoredEvent>) -> bool {
        let tapped = Tapped {
            block: block.clone(),
            after_gap: self.dropped,
        };
        match self.tx.try_send(tapped) {
            Ok(()) => {
                self.dropped = false;
                true
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.dropped = true;
                true
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }
}

impl Drop for TapSender {
    fn drop(&mut self) {
        // Before the queue closes (the fields drop after this): a reader that sees the
        // end sees this too.
        if self.dropped {
            self.dropped_at_end.store(true, Ordering::SeqCst);
        }
    }
}

impl Tap {
    /// Waits for blocks and moves up to `max` of those ready into `into`; 0 when the
    /// hub has ended and every block was taken. Cancel-safe.
    pub async fn recv_many(&mut self, into: &mut Vec<Tapped>, max: usize) -> usize {
        self.rx.recv_many(into, max).await
    }

    /// Once [`Tap::recv_many`] gave 0: whether blocks were dropped after the last one
    /// taken.
    pub fn dropped_at_end(&self) -> bool {
        self.dropped_at_end.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replay::StoredEvent;
    use std::sync::Arc;

    fn block(i: u32) -> HubMsg {
        HubMsg::Block(Arc::new(StoredEvent {
            id: i.to_string().into(),
            has_id_field: true,
            raw: bytes::Bytes::from(format!("id: {i}\n\n")),
            sets_retry: false,
            at: std::time::Instant::now(),
        }))
    }

    fn id(m: Result<HubMsg, TryRecvError>) -> Result<String, TryRecvError> {
        m.map(|m| match m {
            HubMsg::Block(b) => b.id.to_string(),
            HubMsg::End => "end".into(),
        })
    }

    /// Both kinds promise the same: every block to every reader, in order, from the
    /// next one sent when it subscribed, and a lag past `lag_blocks` told, not hidden.
    #[test]
    fn a_reader_gets_every_block_in_order_and_is_told_when_it_fell_behind() {
        for shared in [true, false] {
            let mut tx = Sender::new(shared, 4);
            tx.send(block(0)); // nobody reads yet: not kept
            let mut fast = tx.subscribe();
            let mut slow = tx.subscribe();
            for i in 1..=3 {
                tx.send(block(i));
                assert_eq!(id(fast.try_recv()), Ok(i.to_string()), "shared {shared}");
            }
            for i in 4..=10 {
                tx.send(block(i));
            }
            tx.send(HubMsg::End);
            // The slow one took nothing: 11 sent, the last 4 kept.
            assert_eq!(
                slow.try_recv().err(),
                Some(TryRecvError::Lagged(7)),
                "shared {shared}"
            );
            let rest: Vec<_> = std::iter::from_fn(|| id(slow.try_recv()).ok()).collect();
            assert_eq!(rest, ["8", "9", "10", "end"], "shared {shared}");
            assert_eq!(slow.try_recv().err(), Some(TryRecvError::Empty));
            // The fast one stopped reading at 3: 4 behind when it looks again.
            assert_eq!(
                fast.try_recv().err(),
                Some(TryRecvError::Lagged(4)),
                "shared {shared}"
            );
            let rest: Vec<_> = std::iter::from_fn(|| id(fast.try_recv()).ok()).collect();
            assert_eq!(rest, ["8", "9", "10", "end"], "shared {shared}");
        }
    }

    fn queue(tx: &Sender) -> &async_broadcast::Sender<HubMsg> {
        match tx {
            Sender::Queue { tx, .. } => tx,
            Sender::Ring(_) => panic!("a private hub's fan-out is a queue"),
        }
    }

    #[test]
    fn a_private_queue_grows_only_as_far_as_its_reader_lags() {
        let mut tx = Sender::new(false, 128);
        let mut rx = tx.subscribe();
        for i in 0..1000 {
            tx.send(block(i));
            assert!(rx.try_recv().is_ok());
        }
        let q = queue(&tx);
        assert_eq!(q.capacity(), 1, "a caught-up reader needs one slot");
        for i in 0..100 {
            tx.send(block(i));
        }
        let Sender::Queue { tx: q, .. } = &tx else {
            panic!("a private hub's fan-out is a queue");
        };
        assert_eq!(
            q.capacity(),
            128,
            "grown to what the reader is behind, within the bound"
        );
        assert_eq!(q.len(), 100);
    }

    /// A tap that falls behind loses the blocks past its bound and learns where: on
    /// the next block that fits, or at the end.
    #[tokio::test]
    async fn a_tap_behind_its_bound_learns_where_blocks_were_dropped() {
        let arc = |i| match block(i) {
            HubMsg::Block(b) => b,
            HubMsg::End => unreachable!(),
        };
        let (mut tx, mut tap) = TapSender::new(2);
        for i in 1..=3 {
            assert!(tx.send(&arc(i)));
        }
        let mut got = vec![];
        assert_eq!(tap.recv_many(&mut got, 8).await, 2);
        assert!(tx.send(&arc(4)));
        assert!(tx.send(&arc(5)));
        assert!(tx.send(&arc(6)), "full: dropped");
        assert_eq!(tap.recv_many(&mut got, 8).await, 2);
        drop(tx);
        assert_eq!(tap.recv_many(&mut got, 8).await, 0);
        let seen: Vec<_> = got
            .iter()
            .map(|t| (t.block.id.to_string(), t.after_gap))
            .collect();
        let want = [("1", false), ("2", false), ("4", true), ("5", false)];
        assert_eq!(seen, want.map(|(i, g)| (i.to_string(), g)));
        assert!(
            tap.dropped_at_end(),
            "6 was dropped after the last block taken"
        );
        let (mut tx, tap) = TapSender::new(2);
        drop(tap);
        assert!(!tx.send(&arc(1)), "a reader that left is reported gone");
    }

    #[tokio::test]
    async fn a_lingering_private_hub_keeps_its_queue_open_for_the_next_reader() {
        let mut tx = Sender::new(false, 8);
        drop(tx.subscribe());
        tx.send(block(1)); // no reader: dropped, and the queue stays open
        let mut rx = tx.subscribe();
        tx.send(block(2));
        let got = rx.recv().await;
        assert!(matches!(got, Ok(HubMsg::Block(b)) if &*b.id == "2"));
    }
}
