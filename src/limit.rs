//! Connection-aware rate limiting: a per-client request limiter (governor), a per-client
//! stream-connect limiter for reconnect storms, and counters that cap concurrent streams
//! per client and in total.
//!
//! Decisions are made when a request or stream *starts*; nothing here ever cuts an open
//! stream. Memory is bounded: limiter state lives in a [`BoundedStore`] that stops adding
//! clients at a cap (new clients then share one overflow bucket) and is pruned of idle
//! clients by [`Limiter::prune`]; stream counters hold only clients with open streams.
//!
//! Knows nothing of pingora or HTTP: `proxy` extracts the client address and maps
//! [`Decision`]s to responses.

use std::hash::Hash;
use std::net::{IpAddr, Ipv6Addr};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::keyed::ShrinkableKeyedStateStore;
use governor::state::StateStore;
use governor::{Quota, RateLimiter};
use ipnet::IpNet;

/// Who a client is for limiting: an IPv4 address, or an IPv6 address masked to the
/// configured prefix (one subscriber usually holds a whole /64).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientKey(pub IpAddr);

/// How client addresses are found and grouped.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientIdentity {
    /// Peers whose `X-Forwarded-For` / `Forwarded` headers are believed.
    pub trusted_proxies: Vec<IpNet>,
    /// IPv6 clients are grouped by this prefix length.
    pub ipv6_prefix: u8,
}

impl ClientIdentity {
    /// The client's address: the peer, or, when the peer is a trusted proxy, the
    /// right-most address in the forwarding headers that is not itself trusted.
    /// `forwarded_for` is the `X-Forwarded-For` values in order; `forwarded` the
    /// `Forwarded` values (used when there is no `X-Forwarded-For`).
    pub fn client_ip<'a>(
        &self,
        peer: IpAddr,
        forwarded_for: impl Iterator<Item = &'a str>,
        forwarded: impl Iterator<Item = &'a str>,
    ) -> IpAddr {
        let peer = canonical(peer);
        if !self.is_trusted(peer) {
            return peer;
        }
        let mut hops: Vec<IpAddr> = forwarded_for
            .flat_map(|v| v.split(','))
            .filter_map(|s| parse_node(s.trim()))
            .collect();
        if hops.is_empty() {
            hops = forwarded
                .flat_map(|v| v.split(','))
                .flat_map(|elem| elem.split(';'))
                .filter_map(|pair| {
                    let (k, v) = pair.split_once('=')?;
                    k.trim().eq_ignore_ascii_case("for").then(|| v.trim())
                })
                .filter_map(|v| parse_node(v.trim_matches('"')))
                .collect();
        }
        hops.iter()
            .rev()
            .copied()
            .map(canonical)
            .find(|ip| !self.is_trusted(*ip))
            .or(hops.first().copied().map(canonical))
            .unwrap_or(peer)
    }

    /// Whether `ip` is a trusted proxy, whose forwarding headers are believed.
    pub fn is_trusted(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.trusted_proxies.iter().any(|n| n.contains(&ip))
    }

    /// The limiting key for an address.
    pub fn key(&self, ip: IpAddr) -> ClientKey {
        match canonical(ip) {
            IpAddr::V6(v6) => {
                let bits = u128::from(v6);
                let prefix = u32::from(self.ipv6_prefix.min(128));
                let mask = if prefix == 0 {
                    0
                } else {
                    u128::MAX << (128 - prefix)
                };
                ClientKey(IpAddr::V6(Ipv6Addr::from(bits & mask)))
            }
            v4 => ClientKey(v4),
        }
    }
}

/// IPv4-mapped IPv6 addresses are IPv4 clients.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Parses one forwarding node: `1.2.3.4`, `1.2.3.4:80`, `2001:db8::1`, `[2001:db8::1]:80`.
fn parse_node(s: &str) -> Option<IpAddr> {
    if let Ok(ip) = s.parse() {
        return Some(ip);
    }
    if let Some(rest) = s.strip_prefix('[') {
        return rest.split_once(']')?.0.parse().ok();
    }
    s.rsplit_once(':')?.0.parse().ok()
}

/// A rate: `rate` per second sustained, with `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Sustained requests per second (may be below 1).
    pub per_second: f64,
    /// Requests allowed at once.
    pub burst: NonZeroU32,
}

impl Rate {
    /// `per_second` sustained with `burst` at once; `None` for a burst of 0.
    pub fn new(per_second: f64, burst: u32) -> Option<Rate> {
        NonZeroU32::new(burst).map(|burst| Rate { per_second, burst })
    }

    fn quota(&self) -> Option<Quota> {
        let period = Duration::from_secs_f64(1.0 / self.per_second.max(1e-6));
        Quota::with_period(period).map(|q| q.allow_burst(self.burst))
    }
}

/// Why a request or stream was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefuseReason {
    /// The client's request rate (global or route) is exceeded.
    RequestRate,
    /// The client opens streams too often (reconnect storm).
    StreamConnectRate,
    /// The client has too many streams open.
    ClientStreams,
    /// The gateway has too many streams open.
    TotalStreams,
}

impl RefuseReason {
    /// Short name for logs and metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            RefuseReason::RequestRate => "request_rate",
            RefuseReason::StreamConnectRate => "stream_connect_rate",
            RefuseReason::ClientStreams => "client_streams",
            RefuseReason::TotalStreams => "total_streams",
        }
    }
}

/// The outcome of a check.
#[derive(Debug)]
pub enum Decision<T> {
    /// Go ahead (with whatever must be held while the request or stream lives).
    Allow(T),
    /// Refused; the client may try again after `retry_after`.
    Refuse {
        /// Why.
        reason: RefuseReason,
        /// Earliest sensible retry.
        retry_after: Duration,
    },
}

/// A keyed GCRA state store that holds at most `max_keys` clients (give or take the
/// few that race past the unlocked size check); beyond that, new clients share one
/// overflow state, so a flood of addresses costs no memory.
pub struct BoundedStore<K: Hash + Eq> {
    /// Theoretical arrival time per client, in nanoseconds since the limiter's start
    /// (0 = fresh), as governor's own in-memory state.
    map: DashMap<K, AtomicU64>,
    /// State shared by clients that arrived while the map was full.
    overflow: AtomicU64,
    /// Cap on `map`'s size.
    max_keys: usize,
}

impl<K: Hash + Eq + Clone> BoundedStore<K> {
    /// An empty store capped at `max_keys` clients.
    pub fn new(max_keys: usize) -> Self {
        BoundedStore {
            map: DashMap::new(),
            overflow: AtomicU64::new(0),
            max_keys,
        }
    }
}

/// governor's compare-and-swap update of one GCRA state.
fn measure_one<T, E>(
    cell: &AtomicU64,
    f: impl Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
) -> Result<T, E> {
    let mut prev = cell.load(Ordering::Acquire);
    let mut decision = f((prev != 0).then(|| Nanos::from(prev)));
    while let Ok((result, new)) = decision {
        match cell.compare_exchange_weak(prev, new.as_u64(), Ordering::Release, Ordering::Relaxed) {
            Ok(_) => return Ok(result),
            Err(next) => prev = next,
        }
        decision = f((prev != 0).then(|| Nanos::from(prev)));
    }
    decision.map(|(r, _)| r)
}

impl<K: Hash + Eq + Clone> StateStore for BoundedStore<K> {
    type Key = K;

    fn measure_and_replace<T, F, E>(&self, key: &K, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        if let Some(v) = self.map.get(key) {
            return measure_one(&v, f);
        }
        if self.map.len() >= self.max_keys {
            return measure_one(&self.overflow, f);
        }
        let entry = self
            .map
            .entry(key.clone())
            .or_insert_with(|| AtomicU64::new(0));
        measure_one(&entry, f)
    }
}

impl<K: Hash + Eq + Clone> ShrinkableKeyedStateStore<K> for BoundedStore<K> {
    fn retain_recent(&self, drop_below: Nanos) {
        // A client whose state is as good as fresh carries no information: drop it.
        self.map
            .retain(|_, v| v.load(Ordering::Relaxed) > drop_below.as_u64());
    }

    fn shrink_to_fit(&self) {
        self.map.shrink_to_fit();
    }

    fn len(&self) -> usize {
        self.map.len()
    }

    fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

type Keyed = RateLimiter<ClientKey, BoundedStore<ClientKey>, DefaultClock, NoOpMiddleware>;

/// A per-client rate limiter with bounded memory.
pub struct ClientRate {
    limiter: Keyed,
    clock: DefaultClock,
}

impl ClientRate {
    /// A limiter for `rate`, tracking at most `max_clients`; `None` when the rate is 0.
    pub fn new(rate: Rate, max_clients: usize) -> Option<ClientRate> {
        let quota = rate.quota()?;
        let clock = DefaultClock::default();
        Some(ClientRate {
            limiter: RateLimiter::new(quota, BoundedStore::new(max_clients), clock.clone()),
            clock,
        })
    }

    /// Counts one request of `key`; on refusal, how long until one would pass.
    pub fn check(&self, key: &ClientKey) -> Result<(), Duration> {
        self.limiter
            .check_key(key)
            .map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }

    /// Clients tracked now.
    pub fn tracked(&self) -> usize {
        self.limiter.len()
    }

    fn prune(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }
}

/// Limiter for one route (beyond the global ones).
#[derive(Default)]
pub struct RouteLimiter {
    /// Per-client request rate on this route.
    pub requests: Option<ClientRate>,
}

/// Settings for [`Limiter`].
#[derive(Debug, Clone, PartialEq)]
pub struct LimitSettings {
    /// Per-client request rate across all routes.
    pub request_rate: Option<Rate>,
    /// Per-client stream (re)connect rate.
    pub stream_connect_rate: Option<Rate>,
    /// Concurrent streams per client; 0 = no cap.
    pub max_streams_per_client: u32,
    /// Concurrent streams in total; 0 = no cap.
    pub max_streams: usize,
    /// Clients each limiter tracks at most.
    pub max_tracked_clients: usize,
}

/// Every limit of the gateway; shared by all requests.
pub struct Limiter {
    settings: LimitSettings,
    requests: Option<ClientRate>,
    stream_connects: Option<ClientRate>,
    streams: Arc<StreamCounts>,
}

/// Open streams per client and in total.
#[derive(Default)]
struct StreamCounts {
    /// Only clients with at least one open stream.
    per_client: DashMap<ClientKey, u32>,
    total: AtomicUsize,
}

/// Holds one stream slot; released on drop.
pub struct StreamSlot {
    /// The counters to give the slot back to.
    counts: Arc<StreamCounts>,
    /// Whose slot it is.
    key: ClientKey,
}

impl std::fmt::Debug for StreamSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StreamSlot({:?})", self.key.0)
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let counts = &self.counts;
        counts.total.fetch_sub(1, Ordering::AcqRel);
        // Remove the client's entry with its last stream, so the map stays small.
        counts.per_client.remove_if_mut(&self.key, |_, n| {
            *n = n.saturating_sub(1);
            *n == 0
        });
    }
}

impl Limiter {
    /// Limiter with `settings`.
    pub fn new(settings: LimitSettings) -> Limiter {
        let max = settings.max_tracked_clients;
        Limiter {
            requests: settings.request_rate.and_then(|r| ClientRate::new(r, max)),
            stream_connects: settings
                .stream_connect_rate
                .and_then(|r| ClientRate::new(r, max)),
            streams: Arc::new(StreamCounts::default()),
            settings,
        }
    }

    /// The settings in force.
    pub fn settings(&self) -> &LimitSettings {
        &self.settings
    }

    /// Counts a request against the global and the route's request rates.
    pub fn check_request(&self, key: &ClientKey, route: &RouteLimiter) -> Decision<()> {
        for limiter in [self.requests.as_ref(), route.requests.as_ref()]
            .into_iter()
            .flatten()
        {
            if let Err(wait) = limiter.check(key) {
                return Decision::Refuse {
                    reason: RefuseReason::RequestRate,
                    retry_after: wait,
                };
            }
        }
        Decision::Allow(())
    }

    /// Admits a new stream of `key`: checks the stream caps, then counts a connect.
    /// The returned slot holds the stream's place until dropped.
    pub fn open_stream(&self, key: &ClientKey) -> Decision<StreamSlot> {
        let s = &self.settings;
        let total = self.streams.total.fetch_add(1, Ordering::AcqRel) + 1;
        // Take the slot first, then check, so concurrent opens cannot overshoot.
        let slot = StreamSlot {
            counts: self.streams.clone(),
            key: *key,
        };
        let mine = {
            let mut n = self.streams.per_client.entry(*key).or_insert(0);
            *n += 1;
            *n
        };
        if s.max_streams > 0 && total > s.max_streams {
            return Decision::Refuse {
                reason: RefuseReason::TotalStreams,
                // No telling when a slot frees up: the configured base delay applies.
                retry_after: Duration::ZERO,
            };
        }
        if s.max_streams_per_client > 0 && mine > s.max_streams_per_client {
            return Decision::Refuse {
                reason: RefuseReason::ClientStreams,
                retry_after: Duration::ZERO,
            };
        }
        if let Some(l) = &self.stream_connects {
            if let Err(wait) = l.check(key) {
                return Decision::Refuse {
                    reason: RefuseReason::StreamConnectRate,
                    retry_after: wait,
                };
            }
        }
        Decision::Allow(slot)
    }

    /// Open streams in total.
    pub fn open_streams(&self) -> usize {
        self.streams.total.load(Ordering::Acquire)
    }

    /// Drops limiter state of clients that have been idle long enough to be fresh again;
    /// returns how many clients the limiters still track.
    pub fn prune(&self, routes: &[Arc<RouteLimiter>]) -> usize {
        let mut tracked = 0;
        let all = [self.requests.as_ref(), self.stream_connects.as_ref()]
            .into_iter()
            .flatten()
            .chain(routes.iter().filter_map(|r| r.requests.as_ref()));
        for l in all {
            l.prune();
            tracked += l.tracked();
        }
        tracked
    }
}

/// A `retry:` value with jitter: `base` stretched by up to `jitter` (0.5 = up to +50 %),
/// so clients refused together do not come back together.
pub fn jittered(base: Duration, jitter: f64) -> Duration {
    let j = jitter.clamp(0.0, 10.0);
    base.mul_f64(1.0 + fastrand::f64() * j)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ident(trusted: &[&str]) -> ClientIdentity {
        ClientIdentity {
            trusted_proxies: trusted.iter().map(|s| s.parse().unwrap()).collect(),
            ipv6_prefix: 64,
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn forwarded_headers_only_from_trusted_peers() {
        let id = ident(&["10.0.0.0/8"]);
        let xff = ["203.0.113.7, 10.1.1.1"];
        assert_eq!(
            id.client_ip(ip("192.0.2.1"), xff.into_iter(), [].into_iter()),
            ip("192.0.2.1")
        );
        assert_eq!(
            id.client_ip(ip("10.0.0.2"), xff.into_iter(), [].into_iter()),
            ip("203.0.113.7")
        );
        // Spoofed entries left of the real client are ignored: right-most untrusted wins.
        let xff = ["6.6.6.6", "203.0.113.7"];
        assert_eq!(
            id.client_ip(ip("10.0.0.2"), xff.into_iter(), [].into_iter()),
            ip("203.0.113.7")
        );
        let fwd = ["for=\"[2001:db8::1]:443\";proto=https, for=10.0.0.9"];
        assert_eq!(
            id.client_ip(ip("10.0.0.2"), [].into_iter(), fwd.into_iter()),
            ip("2001:db8::1")
        );
        assert_eq!(
            id.client_ip(ip("10.0.0.2"), ["junk"].into_iter(), [].into_iter()),
            ip("10.0.0.2")
        );
    }

    #[test]
    fn ipv6_grouped_by_prefix_and_mapped_v4_is_v4() {
        let id = ident(&[]);
        assert_eq!(
            id.key(ip("2001:db8:1:2:aaaa::1")),
            id.key(ip("2001:db8:1:2:bbbb::2"))
        );
        assert_ne!(id.key(ip("2001:db8:1:2::1")), id.key(ip("2001:db8:1:3::1")));
        assert_eq!(id.key(ip("::ffff:192.0.2.1")), ClientKey(ip("192.0.2.1")));
    }

    fn settings() -> LimitSettings {
        LimitSettings {
            request_rate: Some(Rate {
                per_second: 1.0,
                burst: NonZeroU32::new(3).unwrap(),
            }),
            stream_connect_rate: Some(Rate {
                per_second: 1.0,
                burst: NonZeroU32::new(2).unwrap(),
            }),
            max_streams_per_client: 2,
            max_streams: 3,
            max_tracked_clients: 100,
        }
    }

    #[test]
    fn request_rate_refuses_after_burst() {
        let l = Limiter::new(settings());
        let k = ClientKey(ip("192.0.2.1"));
        let r = RouteLimiter::default();
        for _ in 0..3 {
            assert!(matches!(l.check_request(&k, &r), Decision::Allow(())));
        }
        match l.check_request(&k, &r) {
            Decision::Refuse {
                reason,
                retry_after,
            } => {
                assert_eq!(reason, RefuseReason::RequestRate);
                assert!(
                    retry_after > Duration::from_millis(500)
                        && retry_after <= Duration::from_secs(1)
                );
            }
            d => panic!("{d:?}"),
        }
        // Another client is unaffected.
        assert!(matches!(
            l.check_request(&ClientKey(ip("192.0.2.2")), &r),
            Decision::Allow(())
        ));
    }

    #[test]
    fn stream_caps_refuse_and_recover_when_slots_drop() {
        let mut s = settings();
        s.stream_connect_rate = None;
        let l = Limiter::new(s);
        let a = ClientKey(ip("192.0.2.1"));
        let b = ClientKey(ip("192.0.2.2"));
        let s1 = l.open_stream(&a);
        let s2 = l.open_stream(&a);
        assert!(matches!(s1, Decision::Allow(_)) && matches!(s2, Decision::Allow(_)));
        assert!(matches!(
            l.open_stream(&a),
            Decision::Refuse {
                reason: RefuseReason::ClientStreams,
                ..
            }
        ));
        let s3 = l.open_stream(&b);
        assert!(matches!(s3, Decision::Allow(_)));
        assert!(matches!(
            l.open_stream(&b),
            Decision::Refuse {
                reason: RefuseReason::TotalStreams,
                ..
            }
        ));
        assert_eq!(l.open_streams(), 3);
        drop(s1);
        assert!(matches!(l.open_stream(&a), Decision::Allow(_)));
        drop((s2, s3));
        assert_eq!(l.open_streams(), 0);
        assert!(
            l.streams.per_client.is_empty(),
            "entries of clients without streams are removed"
        );
    }

    #[test]
    fn stream_connect_rate_damps_reconnects() {
        let mut s = settings();
        s.max_streams_per_client = 0;
        s.max_streams = 0;
        let l = Limiter::new(s);
        let a = ClientKey(ip("192.0.2.1"));
        assert!(matches!(l.open_stream(&a), Decision::Allow(_)));
        assert!(matches!(l.open_stream(&a), Decision::Allow(_)));
        assert!(matches!(
            l.open_stream(&a),
            Decision::Refuse {
                reason: RefuseReason::StreamConnectRate,
                ..
            }
        ));
    }

    #[test]
    fn bounded_store_never_grows_past_its_cap_and_prunes() {
        let mut s = settings();
        s.max_tracked_clients = 50;
        s.request_rate = Some(Rate {
            per_second: 10.0,
            burst: NonZeroU32::new(3).unwrap(),
        });
        let l = Limiter::new(s);
        let r = RouteLimiter::default();
        for i in 0..5000u32 {
            let k = ClientKey(IpAddr::V4((0x0A00_0000 + i).into()));
            let _ = l.check_request(&k, &r);
        }
        assert_eq!(l.requests.as_ref().unwrap().tracked(), 50);
        // Clients whose state is fresh again are pruned (10/s: after about 0.2 s).
        std::thread::sleep(Duration::from_millis(400));
        assert_eq!(l.prune(&[]), 0);
    }

    #[test]
    fn jitter_stretches_within_bounds() {
        for _ in 0..100 {
            let d = jittered(Duration::from_secs(2), 0.5);
            assert!(d >= Duration::from_secs(2) && d <= Duration::from_secs(3));
        }
    }
}
