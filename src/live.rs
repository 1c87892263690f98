//! What the gateway derives from its config file: the checked config, the limiters,
//! round-robin positions. A reload swaps it whole; a request keeps the one it started
//! with.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::config::Config;
use crate::limit::{self, Limiter};

/// Everything derived from the config file. A reload swaps it whole; a request keeps
/// the one it started with.
pub struct Live {
    /// How many configs were loaded so far, this one included (1 at start).
    pub generation: u64,
    /// The checked configuration.
    pub config: Arc<Config>,
    /// Round-robin position per upstream, by index in `config.upstreams`.
    next_server: Vec<AtomicUsize>,
    /// Rate limits and stream caps.
    pub limits: Arc<Limiter>,
    /// Per-route limiters, by route index.
    pub route_limits: Vec<Arc<limit::RouteLimiter>>,
}

impl Live {
    /// Builds the live state for `config`, keeping the limiters of `previous` when
    /// their settings did not change (so a reload does not hand out fresh quotas).
    pub fn new(config: Arc<Config>, previous: Option<&Live>) -> Live {
        let next_server = config
            .upstreams
            .iter()
            .map(|_| AtomicUsize::new(0))
            .collect();
        let max = config.limits.settings.max_tracked_clients;
        let limits = match previous {
            Some(p) if p.config.limits.settings == config.limits.settings => p.limits.clone(),
            _ => Arc::new(Limiter::new(config.limits.settings.clone())),
        };
        let route_limits = config
            .routes
            .iter()
            .map(|r| route_limiter(r, previous, max))
            .collect();
        Live {
            generation: previous.map_or(1, |p| p.generation + 1),
            config,
            next_server,
            limits,
            route_limits,
        }
    }

    /// The server of an upstream to try first: round-robin.
    pub fn next_server(&self, upstream_index: usize) -> usize {
        self.next_server
            .get(upstream_index)
            .map_or(0, |c| c.fetch_add(1, Ordering::Relaxed))
    }
}

/// A route's limiter: the previous one when the same route (by name) has the same rate
/// and client cap, so a reload does not hand out fresh quotas on it either.
fn route_limiter(
    route: &crate::config::Route,
    previous: Option<&Live>,
    max_tracked: usize,
) -> Arc<limit::RouteLimiter> {
    let kept = previous
        .filter(|p| p.config.limits.settings.max_tracked_clients == max_tracked)
        .and_then(|p| {
            // By name, and only a name one route has: two routes never share buckets.
            let mut same = p
                .config
                .routes
                .iter()
                .enumerate()
                .filter(|(_, o)| o.name == route.name);
            let (i, old) = same.next().filter(|_| same.next().is_none())?;
            (old.limits.request_rate == route.limits.request_rate)
                .then(|| p.route_limits.get(i).cloned())
                .flatten()
        });
    kept.unwrap_or_else(|| {
        Arc::new(limit::RouteLimiter {
            requests: route
                .limits
                .request_rate
                .and_then(|rate| limit::ClientRate::new(rate, max_tracked)),
        })
    })
}

impl std::fmt::Debug for Live {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Live(generation {} of {})",
            self.generation,
            self.config.path.display()
        )
    }
}
