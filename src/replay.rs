//! The replay store: the recent events of one stream, found again by `Last-Event-ID`.
//!
//! [`ReplayStore`] is the small interface a hub records into and looks up in; the
//! in-memory [`MemoryRing`] is the default. A store shared by several gateway instances
//! would implement the same trait. Knows nothing of pingora or HTTP.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

/// One recorded block: an event, or a block that only moved the id or set `retry`.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    /// The last event ID after this block (own or inherited).
    pub id: Arc<str>,
    /// The block carried its own `id` field (resume points are such blocks).
    pub has_id_field: bool,
    /// The block's bytes, forwarded verbatim on replay.
    pub raw: Bytes,
    /// The block has a valid `retry` field.
    pub sets_retry: bool,
    /// When it was recorded, for the age bound.
    pub at: Instant,
}

/// Where a reconnecting client asks to resume, and its query as part of the stream key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResumeRequest {
    /// The `Last-Event-ID` header, else the route's query parameter; `None` when absent,
    /// empty, or not an id an event stream could have set (a line break or NUL in it
    /// could never have come from a stream, and must never be echoed into one).
    pub last_event_id: Option<String>,
    /// The query's name/value pairs without the id parameter, length-prefixed, so the
    /// same stream is found whatever id the client sends in its URL.
    pub query_key: Vec<u8>,
}

/// Reads the resume point from the request's `Last-Event-ID` header value and query.
/// `param` is the route's `last_event_id_param` (for clients that cannot set headers).
pub fn resume_request(header: Option<&[u8]>, query: &str, param: Option<&str>) -> ResumeRequest {
    let mut from_query = None;
    let mut query_key = Vec::new();
    for (name, value) in form_urlencoded::parse(query.as_bytes()) {
        if param == Some(&*name) {
            from_query = Some(value.into_owned());
        } else {
            query_key.extend_from_slice(&(name.len() as u64).to_le_bytes());
            query_key.extend_from_slice(name.as_bytes());
            query_key.extend_from_slice(&(value.len() as u64).to_le_bytes());
            query_key.extend_from_slice(value.as_bytes());
        }
    }
    let header = header
        .and_then(|h| std::str::from_utf8(h).ok())
        .map(str::to_owned);
    let last_event_id = header
        .or(from_query)
        .filter(|id| !id.is_empty() && !id.contains(['\r', '\n', '\0']));
    ResumeRequest {
        last_event_id,
        query_key,
    }
}

/// What a lookup by last event ID found.
#[derive(Debug)]
pub enum Lookup {
    /// The id is known: these blocks followed it (possibly none).
    After(Vec<StoredEvent>),
    /// The id is not (or no longer) in the store.
    Unknown,
}

/// Bounds on what one stream keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingBounds {
    /// Most blocks kept.
    pub max_events: usize,
    /// Most bytes kept.
    pub max_bytes: usize,
    /// Oldest block kept.
    pub max_age: Duration,
}

/// A byte budget shared by every stream's store: the total bound.
#[derive(Debug)]
pub struct Budget {
    /// The bound.
    max: usize,
    /// Bytes held by all stores now.
    used: AtomicUsize,
}

impl Budget {
    /// A budget of `max` bytes.
    pub fn new(max: usize) -> Arc<Budget> {
        Arc::new(Budget {
            max,
            used: AtomicUsize::new(0),
        })
    }

    /// Bytes held now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    fn over(&self) -> bool {
        self.used() > self.max
    }
}

/// Where a hub records its stream's recent blocks.
pub trait ReplayStore: Send {
    /// Records a block; the oldest go when a bound is passed.
    fn push(&mut self, ev: StoredEvent);
    /// The blocks after the latest block whose own id field is `last_id`.
    fn after(&mut self, last_id: &str) -> Lookup;
    /// The last `n` blocks.
    fn last(&mut self, n: usize) -> Vec<StoredEvent>;
    /// Blocks held.
    fn len(&self) -> usize;
    /// True when nothing is held.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Bytes held.
    fn bytes(&self) -> usize;
}

/// The default store: a bounded ring in memory.
#[derive(Debug)]
pub struct MemoryRing {
    events: VecDeque<StoredEvent>,
    bytes: usize,
    bounds: RingBounds,
    budget: Arc<Budget>,
}

impl MemoryRing {
    /// An empty ring with `bounds`, drawing on the shared `budget`.
    pub fn new(bounds: RingBounds, budget: Arc<Budget>) -> MemoryRing {
        MemoryRing {
            events: VecDeque::new(),
            bytes: 0,
            bounds,
            budget,
        }
    }

    fn pop_oldest(&mut self) -> bool {
        match self.events.pop_front() {
            Some(e) => {
                self.bytes -= e.raw.len();
                self.budget.used.fetch_sub(e.raw.len(), Ordering::Relaxed);
                true
            }
            None => false,
        }
    }

    fn expire(&mut self, now: Instant) {
        while self
            .events
            .front()
            .is_some_and(|e| now.duration_since(e.at) > self.bounds.max_age)
        {
            self.pop_oldest();
        }
    }
}

impl Drop for MemoryRing {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

impl ReplayStore for MemoryRing {
    fn push(&mut self, ev: StoredEvent) {
        let size = ev.raw.len();
        self.expire(ev.at);
        if size > self.bounds.max_bytes || self.bounds.max_events == 0 {
            // Too big to keep at all: a later resume from before it is a miss. Clear the
            // ring so no resume can skip over it silently.
            while self.pop_oldest() {}
            return;
        }
        self.events.push_back(ev);
        self.bytes += size;
        self.budget.used.fetch_add(size, Ordering::Relaxed);
        // The total bound is enforced where memory is added: this stream gives up its
        // oldest blocks, down to none (idle streams shrink by age). A resume from a
        // store emptied so is a miss, never a silent gap.
        while self.events.len() > self.bounds.max_events
            || self.bytes > self.bounds.max_bytes
            || (self.budget.over() && !self.events.is_empty())
        {
            self.pop_oldest();
        }
    }

    fn after(&mut self, last_id: &str) -> Lookup {
        self.expire(Instant::now());
        match self
            .events
            .iter()
            .rposition(|e| e.has_id_field && &*e.id == last_id)
        {
            Some(i) => Lookup::After(self.events.iter().skip(i + 1).cloned().collect()),
            None => Lookup::Unknown,
        }
    }

    fn last(&mut self, n: usize) -> Vec<StoredEvent> {
        self.expire(Instant::now());
        let skip = self.events.len().saturating_sub(n);
        self.events.iter().skip(skip).cloned().collect()
    }

    fn len(&self) -> usize {
        self.events.len()
    }

    fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(id: &str, own: bool, size: usize) -> StoredEvent {
        StoredEvent {
            id: id.into(),
            has_id_field: own,
            raw: Bytes::from(vec![b'x'; size]),
            sets_retry: false,
            at: Instant::now(),
        }
    }

    fn bounds() -> RingBounds {
        RingBounds {
            max_events: 4,
            max_bytes: 100,
            max_age: Duration::from_secs(60),
        }
    }

    fn ids(l: Lookup) -> Vec<String> {
        match l {
            Lookup::After(v) => v.iter().map(|e| e.id.to_string()).collect(),
            Lookup::Unknown => vec!["<unknown>".into()],
        }
    }

    #[test]
    fn resumes_after_the_block_that_carried_the_id() {
        let mut r = MemoryRing::new(bounds(), Budget::new(1000));
        r.push(ev("1", true, 10));
        r.push(ev("1", false, 10)); // inherited id
        r.push(ev("2", true, 10));
        assert_eq!(ids(r.after("1")), ["1", "2"]);
        assert_eq!(ids(r.after("2")), Vec::<String>::new());
        assert_eq!(ids(r.after("9")), ["<unknown>"]);
    }

    #[test]
    fn count_bytes_and_total_bounds_evict_oldest() {
        let budget = Budget::new(1000);
        let mut r = MemoryRing::new(bounds(), budget.clone());
        for i in 0..6 {
            r.push(ev(&i.to_string(), true, 10));
        }
        assert_eq!(r.len(), 4);
        assert_eq!(ids(r.after("1")), ["<unknown>"]);
        r.push(ev("big", true, 90));
        assert!(r.bytes() <= 100);
        assert_eq!(budget.used(), r.bytes());
        let mut small = MemoryRing::new(bounds(), Budget::new(25));
        for i in 0..4 {
            small.push(ev(&i.to_string(), true, 10));
        }
        assert!(small.bytes() <= 25, "total budget bounds the ring");
        // A block larger than the whole budget is not kept either, nor what came before.
        small.push(ev("huge", true, 40));
        assert_eq!((small.len(), small.bytes()), (0, 0));
        drop(r);
        assert_eq!(budget.used(), 0, "a dropped ring gives its bytes back");
    }

    #[test]
    fn oversized_block_clears_the_ring() {
        let mut r = MemoryRing::new(bounds(), Budget::new(1000));
        r.push(ev("1", true, 10));
        r.push(ev("2", true, 500));
        assert!(r.is_empty());
        assert_eq!(ids(r.after("1")), ["<unknown>"]);
    }

    #[test]
    fn old_blocks_expire() {
        let mut b = bounds();
        b.max_age = Duration::from_millis(1);
        let mut r = MemoryRing::new(b, Budget::new(1000));
        r.push(ev("1", true, 10));
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(ids(r.after("1")), ["<unknown>"]);
    }
}
