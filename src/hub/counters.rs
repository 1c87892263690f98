//! What the registry counts (exported as metrics), and why a resume missed.

use std::sync::atomic::{AtomicU64, AtomicUsize};

use crate::key::Denied;

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
