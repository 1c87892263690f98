//! The cluster: several gateway nodes that behave as one, through Redis.
//!
//! Per stream key, Redis holds the recent history (offsets and an epoch assigned by the
//! store, see [`lua`]), the response head every node answers with, and a lease that
//! names the one node reading the upstream. That reader appends each block (fenced by
//! its lease); other nodes serving the same stream follow the history ([`follow`]), and
//! a client that reconnects anywhere is resumed from it. Redis is never on the critical
//! path of a stream: every call has a short timeout, and a node that cannot reach Redis
//! serves from its local hubs as a single node would, and says so in logs and metrics.
//!
//! Key names are an HMAC of the stream key ([`Cluster::tag`]): no cookie or token value
//! ever appears in Redis. Knows nothing of pingora.

mod batch;
mod codec;
pub mod follow;
mod lua;
pub mod writer;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Value;

use codec::{bulk, decode_entry, decode_remote};
pub use codec::{decode_head, encode_head};

use crate::config;
use crate::key::StreamKey;
use crate::replay::{RingBounds, StoredEvent};

/// Counters the metrics export.
#[derive(Debug, Default)]
pub struct ClusterCounters {
    /// Redis answered the last call.
    pub up: AtomicBool,
    /// Leases taken (this node became a stream's reader).
    pub leases_taken: AtomicU64,
    /// Streams this node reads for the cluster now.
    pub leases_held: AtomicU64,
    /// Streams this node follows from another node's reader now.
    pub followed: AtomicU64,
    /// Resumes served from the shared history (the id was not in a local hub).
    pub cross_node_resumes: AtomicU64,
    /// Readers stopped because another node holds their lease now (found on an append
    /// or a renewal, both checked in Redis in one step with the lease).
    pub fenced: AtomicU64,
    /// Histories restarted with a new epoch (Redis lost one, or a hole was possible);
    /// a stream's first history does not count.
    pub epoch_resets: AtomicU64,
    /// Followers that took the upstream over (the reader was gone or Redis away).
    pub takeovers: AtomicU64,
    /// Redis calls that failed or timed out.
    pub errors: AtomicU64,
    /// Redis call latency, microseconds summed, and calls.
    pub latency_us: AtomicU64,
    /// Calls timed.
    pub calls: AtomicU64,
}

/// Why a Redis call gave nothing.
#[derive(Debug, thiserror::Error)]
pub enum Down {
    /// Not connected (yet, or any more).
    #[error("redis is not connected")]
    NotConnected,
    /// It took longer than `cluster.timeout`.
    #[error("redis call timed out")]
    Timeout,
    /// Redis or the connection said no.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// The answer was not of the expected shape.
    #[error("unexpected redis answer")]
    Shape,
}

/// A stream's name in Redis: its keys share this hash tag.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Tag(Arc<str>);

impl Tag {
    fn key(&self, prefix: &str, part: &str) -> String {
        format!("{prefix}:{{{}}}:{part}", self.0)
    }
}

/// A lease this node holds on a stream: it reads the upstream for the cluster.
#[derive(Debug, Clone)]
pub struct Lease {
    /// The stream.
    pub tag: Tag,
    /// `<node>/<pid>/<token>`: only this holder's writes are accepted.
    value: String,
    /// The epoch and top offset of the history when it was taken.
    pub epoch: String,
    /// See `epoch`.
    pub offset: u64,
    /// The event id of the history's newest block ("" for none).
    pub last_id: String,
}

/// One block of a stream's shared history.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Position in the history.
    pub offset: u64,
    /// The history's epoch when it was written.
    pub epoch: Arc<str>,
    /// The block as hubs keep it.
    pub block: StoredEvent,
    /// Not a block: the reader is done with the stream (take it over now).
    pub end: bool,
    /// Not a block: the reader will be done soon (open the upstream beside it now).
    pub handoff: bool,
}

/// What Redis holds of a stream.
#[derive(Debug, Default)]
pub struct Remote {
    /// The lease holder's value, if any node reads the stream now.
    pub reader: Option<String>,
    /// The history's epoch (`None`: no history).
    pub epoch: Option<Arc<str>>,
    /// Its top offset.
    pub offset: u64,
    /// The response head, as [`encode_head`] wrote it.
    pub head: Bytes,
    /// The audience fingerprint the reader recorded.
    pub audience: Bytes,
    /// The history, oldest first (when asked for).
    pub entries: Vec<Entry>,
    /// The reader has announced a planned handoff: a node that starts following now
    /// opens the upstream beside it at once (the announcement is behind it).
    pub handoff: bool,
}

/// How far below the client threads the cluster's thread runs (nice levels). Its work
/// (every block appended to Redis, renewals, following) wakes in the same instant as the
/// deliveries it copies: an upstream burst has both at once. Below them, the appends
/// wait for the burst to be delivered (measured: 1:1 cluster p99 45.5 -> 38.5 ms, medians
/// of four runs each, BENCHMARKS.md); still ~10% of a busy core, plenty for renewals.
const BELOW_CLIENTS: libc::c_int = 10;

/// Lowers the calling thread's priority by [`BELOW_CLIENTS`] (Linux: nice is per thread).
fn lower_priority() {
    // SAFETY: plain syscalls on the calling thread; nothing is shared or borrowed.
    let r = unsafe {
        let tid = libc::gettid() as libc::id_t;
        let now = libc::getpriority(libc::PRIO_PROCESS, tid);
        libc::setpriority(libc::PRIO_PROCESS, tid, now.saturating_add(BELOW_CLIENTS))
    };
    if r != 0 {
        tracing::debug!(
            "cluster: thread priority unchanged ({})",
            std::io::Error::last_os_error()
        );
    }
}

/// The cluster handle: cheap to clone through its `Arc`.
pub struct Cluster {
    /// The settings.
    pub settings: config::Cluster,
    /// How to reach Redis (for the follower's blocking connection).
    client: redis::Client,
    /// The shared multiplexed connection, once it has been made (it reconnects itself).
    conn: ArcSwapOption<ConnectionManager>,
    /// `<node>/<pid>/`, computed once (every stream request compares against it).
    holder: String,
    /// Where the secret keys the HMAC of stream keys.
    secret: ring::hmac::Key,
    /// For metrics.
    pub counters: ClusterCounters,
    /// The node-wide follower of remote streams.
    pub follows: follow::Follows,
    /// Set when this process is about to exit: writers announce a handoff, and wait at
    /// most this long for a follower to be there before they end.
    handoff: tokio::sync::watch::Sender<Option<Duration>>,
    /// Appends, sent to Redis in pipelines ([`batch`]).
    appends: tokio::sync::mpsc::UnboundedSender<batch::Job>,
    /// The other end, until [`Cluster::run`] starts the sender.
    appends_rx: std::sync::Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<batch::Job>>>,
    /// The runtime [`Cluster::run`] runs on, where the writers go too ([`Cluster::spawn`]).
    runtime: std::sync::OnceLock<tokio::runtime::Handle>,
}

impl Cluster {
    /// A handle for `settings`; nothing is connected until [`Cluster::run`].
    pub fn new(settings: config::Cluster) -> Result<Arc<Cluster>, redis::RedisError> {
        let mut info = redis::IntoConnectionInfo::into_connection_info(settings.redis.as_str())?;
        if let Some(p) = &settings.password {
            let redis_settings = info.redis_settings().clone().set_password(p.clone());
            info = info.set_redis_settings(redis_settings);
        }
        let client = redis::Client::open(info)?;
        let secret = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &settings.key_secret);
        let (appends, appends_rx) = tokio::sync::mpsc::unbounded_channel();
        Ok(Arc::new(Cluster {
            holder: format!("{}/{}/", settings.node_id, std::process::id()),
            appends,
            appends_rx: std::sync::Mutex::new(Some(appends_rx)),
            settings,
            client,
            conn: ArcSwapOption::empty(),
            secret,
            counters: ClusterCounters::default(),
            follows: follow::Follows::default(),
            handoff: tokio::sync::watch::Sender::new(None),
            runtime: std::sync::OnceLock::new(),
        }))
    }

    /// Connects (retrying while Redis is away) and then runs the follower loop, for
    /// the life of the process.
    pub async fn run(self: Arc<Self>) {
        let _ = self.runtime.set(tokio::runtime::Handle::current());
        lower_priority();
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.settings.timeout * 4))
            .set_response_timeout(Some(self.settings.timeout))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(1));
        loop {
            match self
                .client
                .get_connection_manager_with_config(config.clone())
                .await
            {
                Ok(c) => {
                    self.conn.store(Some(Arc::new(c)));
                    self.counters.up.store(true, Ordering::Relaxed);
                    tracing::info!(node = %self.settings.node_id, "cluster: connected to redis");
                    break;
                }
                Err(e) => {
                    self.counters.up.store(false, Ordering::Relaxed);
                    tracing::warn!(
                        "cluster: cannot reach redis ({e}); serving from this node alone"
                    );
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
        let rx = self.appends_rx.lock().ok().and_then(|mut r| r.take());
        if let Some(rx) = rx {
            tokio::spawn(batch::run(self.clone(), rx));
        }
        follow::run(self.clone()).await;
    }

    /// Runs `task` (a stream's writer) on the cluster's runtime, beside the Redis
    /// connection, so the client-facing threads only deliver.
    pub fn spawn<F>(&self, task: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        match self.runtime.get() {
            Some(h) => drop(h.spawn(task)),
            None => drop(tokio::spawn(task)),
        }
    }

    /// The stream's name in Redis: an HMAC of its key (no identity value in Redis).
    pub fn tag(&self, key: &StreamKey) -> Tag {
        let mac = ring::hmac::sign(&self.secret, key.as_bytes());
        let hex: String = mac.as_ref()[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Tag(hex.into())
    }

    /// How this process's leases begin: `<node>/<pid>/` (the two processes of an
    /// upgrade share a node id but are two readers).
    pub fn holder(&self) -> &str {
        &self.holder
    }

    pub(super) fn key(&self, tag: &Tag, part: &str) -> String {
        tag.key(&self.settings.prefix, part)
    }

    /// Runs one call with the cluster timeout, counting its outcome.
    async fn call<T: redis::FromRedisValue>(
        &self,
        inv: redis::ScriptInvocation<'_>,
    ) -> Result<T, Down> {
        let Some(conn) = self.conn.load_full() else {
            return Err(Down::NotConnected);
        };
        let mut conn = ConnectionManager::clone(&conn);
        let started = Instant::now();
        let r = match tokio::time::timeout(self.settings.timeout, inv.invoke_async(&mut conn)).await
        {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(Down::Redis(e)),
            Err(_) => Err(Down::Timeout),
        };
        self.count(started, &r);
        r
    }

    /// Counts a call's outcome and time, and logs when Redis goes away or comes back.
    pub(super) fn count<T>(&self, started: Instant, r: &Result<T, Down>) {
        let c = &self.counters;
        c.calls.fetch_add(1, Ordering::Relaxed);
        c.latency_us
            .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        let ok = r.is_ok();
        if !ok {
            c.errors.fetch_add(1, Ordering::Relaxed);
        }
        if c.up.swap(ok, Ordering::Relaxed) != ok {
            if ok {
                tracing::info!("cluster: redis answers again");
            } else if let Err(e) = r {
                tracing::warn!("cluster: {e}; streams go on from local hubs");
            }
        }
    }

    /// What Redis holds of `tag` (with its history when `entries`).
    pub async fn peek(&self, tag: &Tag, entries: bool) -> Result<Remote, Down> {
        let mut inv = lua::PEEK.prepare_invoke();
        inv.key(self.key(tag, "s"))
            .key(self.key(tag, "m"))
            .key(self.key(tag, "l"))
            .arg(if entries { "1" } else { "0" });
        let v: Value = self.call(inv).await?;
        decode_remote(v).ok_or(Down::Shape)
    }

    /// Takes `tag`'s lease if no node holds it.
    pub async fn acquire(&self, tag: &Tag) -> Result<Option<Lease>, Down> {
        let value = format!("{}{:016x}", self.holder(), fastrand::u64(..));
        let mut inv = lua::ACQUIRE.prepare_invoke();
        inv.key(self.key(tag, "l"))
            .key(self.key(tag, "m"))
            .key(self.key(tag, "s"))
            .arg(&value)
            .arg(self.settings.lease.as_millis() as u64);
        let (taken, epoch, offset, last_id): (i64, String, u64, String) = self.call(inv).await?;
        if taken != 1 {
            return Ok(None);
        }
        self.counters.leases_taken.fetch_add(1, Ordering::Relaxed);
        Ok(Some(Lease {
            tag: tag.clone(),
            value,
            epoch,
            offset,
            last_id,
        }))
    }

    /// Records the head and audience other nodes answer followers with.
    pub async fn open(
        &self,
        lease: &Lease,
        head: &[u8],
        audience: &[u8],
        ttl: Duration,
    ) -> Result<bool, Down> {
        let mut inv = lua::OPEN.prepare_invoke();
        inv.key(self.key(&lease.tag, "l"))
            .key(self.key(&lease.tag, "m"))
            .arg(&lease.value)
            .arg(head)
            .arg(audience)
            .arg(ttl.as_millis() as u64);
        let ok: i64 = self.call(inv).await?;
        Ok(ok == 1)
    }

    /// Extends the lease; `false` when it was lost.
    pub async fn renew(&self, lease: &Lease) -> Result<bool, Down> {
        let mut inv = lua::RENEW.prepare_invoke();
        inv.key(self.key(&lease.tag, "l"))
            .arg(&lease.value)
            .arg(self.settings.lease.as_millis() as u64);
        let ok: i64 = self.call(inv).await?;
        Ok(ok == 1)
    }

    /// This process will exit soon: every writer announces a handoff to its followers,
    /// and ends its stream once one follows it (or after `wait`).
    pub fn begin_handoff(&self, wait: Duration) {
        self.handoff.send_replace(Some(wait));
    }

    /// Set once a handoff has begun.
    pub fn handoff(&self) -> tokio::sync::watch::Receiver<Option<Duration>> {
        self.handoff.subscribe()
    }

    /// The stream ends here (upstream over, or this node shuts down): followers are told
    /// in the history itself and take the upstream over at once.
    pub async fn finish(&self, lease: &Lease) {
        let mut inv = lua::FINISH.prepare_invoke();
        inv.key(self.key(&lease.tag, "s"))
            .key(self.key(&lease.tag, "m"))
            .key(self.key(&lease.tag, "l"))
            .arg(&lease.value);
        let _: Result<i64, _> = self.call(inv).await;
    }

    /// Gives a lease up that nothing was written under.
    pub async fn release(&self, lease: &Lease) {
        let mut inv = lua::RELEASE.prepare_invoke();
        inv.key(self.key(&lease.tag, "l")).arg(&lease.value);
        let _: Result<i64, _> = self.call(inv).await;
    }

    /// Marks `tag` as followed by clients of this node (the reader keeps reading).
    pub async fn watch(&self, tag: &Tag) -> Result<(), Down> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(self.key(tag, "w"))
            .arg(&self.settings.node_id)
            .arg("PX")
            .arg((self.settings.lease * 2).as_millis() as u64);
        self.command::<()>(cmd).await
    }

    /// Whether other nodes' clients follow `tag` (errors count as no).
    pub async fn watched(&self, tag: &Tag) -> bool {
        let mut cmd = redis::cmd("EXISTS");
        cmd.arg(self.key(tag, "w"));
        self.command::<i64>(cmd).await.is_ok_and(|n| n > 0)
    }

    async fn command<T: redis::FromRedisValue>(&self, cmd: redis::Cmd) -> Result<T, Down> {
        let Some(conn) = self.conn.load_full() else {
            return Err(Down::NotConnected);
        };
        let mut conn = ConnectionManager::clone(&conn);
        let started = Instant::now();
        let r = match tokio::time::timeout(self.settings.timeout, cmd.query_async(&mut conn)).await
        {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(Down::Redis(e)),
            Err(_) => Err(Down::Timeout),
        };
        self.count(started, &r);
        r
    }

    /// How long a stream's keys outlive its last write.
    pub(super) fn ttl(&self, bounds: RingBounds) -> Duration {
        bounds.max_age + self.settings.lease * 2
    }

    /// The Redis name of `tag`'s history, for the follower.
    fn stream_key(&self, tag: &Tag) -> String {
        self.key(tag, "s")
    }
}

/// Entry flags of the markers (blocks use bits 0 and 1, see `codec::flags`).
const END: u8 = 4;
const HANDOFF: u8 = 8;

/// A fresh epoch candidate (used only when a history starts anew).
pub(super) fn new_epoch() -> String {
    const LETTERS: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    (0..10)
        .map(|_| LETTERS[fastrand::usize(..LETTERS.len())] as char)
        .collect()
}
