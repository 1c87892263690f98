//! Graceful shutdown bookkeeping: a signal streams can wait on, and a count of requests
//! in flight so the process can exit as soon as the last one is gone instead of sleeping
//! out the whole grace period.
//!
//! Knows nothing of pingora; `proxy` wires it to pingora's shutdown watch.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::watch;

/// Shared shutdown state; cheap to clone.
#[derive(Debug, Clone)]
pub struct Graceful {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Flips to `true` once, when a graceful shutdown starts.
    tx: watch::Sender<bool>,
    /// Requests (streams included) currently being served.
    active: AtomicUsize,
}

/// Held for the life of one request; counts it as in flight.
#[derive(Debug)]
pub struct ActiveGuard {
    inner: Arc<Inner>,
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.inner.active.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Default for Graceful {
    fn default() -> Self {
        Self::new()
    }
}

impl Graceful {
    /// A shutdown that has not started.
    pub fn new() -> Self {
        Graceful {
            inner: Arc::new(Inner {
                tx: watch::channel(false).0,
                active: AtomicUsize::new(0),
            }),
        }
    }

    /// Starts the graceful shutdown: every subscriber is woken.
    pub fn begin(&self) {
        self.inner.tx.send_replace(true);
    }

    /// Whether the shutdown has started.
    pub fn started(&self) -> bool {
        *self.inner.tx.borrow()
    }

    /// A receiver to `await` the start of the shutdown on.
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.inner.tx.subscribe()
    }

    /// Counts one request in flight until the guard is dropped.
    pub fn track(&self) -> ActiveGuard {
        self.inner.active.fetch_add(1, Ordering::AcqRel);
        ActiveGuard {
            inner: self.inner.clone(),
        }
    }

    /// Requests in flight.
    pub fn active(&self) -> usize {
        self.inner.active.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn guards_count_and_subscribers_wake() {
        let s = Graceful::new();
        let g = s.track();
        let _g2 = s.track();
        assert_eq!(s.active(), 2);
        drop(g);
        assert_eq!(s.active(), 1);
        let mut rx = s.subscribe();
        let waiter = tokio::spawn(async move { rx.wait_for(|v| *v).await.is_ok() });
        s.begin();
        assert!(waiter.await.unwrap());
        assert!(s.started());
    }
}
