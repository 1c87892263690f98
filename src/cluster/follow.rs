//! Following the streams other nodes read: one blocking `XREAD` per node, over every
//! followed stream at once, on a connection of its own (a blocked command would hold
//! up every other call on the shared one). Each follower gets its entries through a
//! bounded channel; one that cannot keep up loses its channel and ends (its clients
//! resume with `Last-Event-ID`), it is never skipped silently.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use redis::Value;
use tokio::sync::{mpsc, Notify};

use super::{bulk, decode_entry, Cluster, Entry, Tag};

/// How long one `XREAD` blocks; a new follower wakes it at once (`CLIENT UNBLOCK`).
const BLOCK: Duration = Duration::from_millis(2000);
/// Most entries one `XREAD` returns per stream.
const COUNT: usize = 256;
/// Batches a follower may have unread before it is cut.
const QUEUE: usize = 16;

/// The streams this node follows.
#[derive(Default)]
pub struct Follows {
    /// By follower: its stream, the last offset delivered and where to deliver.
    streams: Mutex<HashMap<u64, Followed>>,
    /// The next follower's number.
    serial: std::sync::atomic::AtomicU64,
    /// Woken when the set changes.
    changed: Notify,
    /// `CLIENT ID` of the blocking connection (0: none), to wake it.
    reader_id: AtomicI64,
}

struct Followed {
    tag: Tag,
    /// Entries after this offset are wanted.
    after: u64,
    tx: mpsc::Sender<Vec<Entry>>,
}

/// A follower's end: entries in order; `None` once the feed is lost.
pub struct Following {
    /// Batches of entries, in history order.
    pub rx: mpsc::Receiver<Vec<Entry>>,
    serial: u64,
    cluster: Arc<Cluster>,
}

impl Drop for Following {
    fn drop(&mut self) {
        self.cluster.follows.lock().remove(&self.serial);
        self.cluster
            .counters
            .followed
            .fetch_sub(1, Ordering::Relaxed);
    }
}

impl Follows {
    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Followed>> {
        self.streams.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Starts following `tag` after offset `after`.
pub async fn follow(cluster: &Arc<Cluster>, tag: Tag, after: u64) -> Following {
    let (tx, rx) = mpsc::channel(QUEUE);
    let serial = cluster.follows.serial.fetch_add(1, Ordering::Relaxed);
    cluster
        .follows
        .lock()
        .insert(serial, Followed { tag, after, tx });
    cluster.counters.followed.fetch_add(1, Ordering::Relaxed);
    cluster.follows.changed.notify_one();
    let id = cluster.follows.reader_id.load(Ordering::Relaxed);
    if id > 0 {
        let mut cmd = redis::cmd("CLIENT");
        cmd.arg("UNBLOCK").arg(id);
        let _ = cluster.command::<i64>(cmd).await;
    }
    Following {
        rx,
        serial,
        cluster: cluster.clone(),
    }
}

/// The node's follower loop.
pub(super) async fn run(cluster: Arc<Cluster>) {
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(cluster.settings.timeout * 4))
        .set_response_timeout(Some(BLOCK + cluster.settings.timeout));
    let mut conn = None;
    loop {
        // One position per stream: the lowest any of its followers wants.
        let mut after: HashMap<Tag, u64> = HashMap::new();
        for f in cluster.follows.lock().values() {
            let a = after.entry(f.tag.clone()).or_insert(f.after);
            *a = (*a).min(f.after);
        }
        let wanted: Vec<(Tag, String, String)> = after
            .into_iter()
            .map(|(t, a)| {
                let key = cluster.stream_key(&t);
                (t, key, format!("{a}-0"))
            })
            .collect();
        if wanted.is_empty() {
            let _ = tokio::time::timeout(BLOCK, cluster.follows.changed.notified()).await;
            continue;
        }
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match connect(&cluster, &config).await {
                Some(c) => conn.insert(c),
                None => {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            },
        };
        let mut cmd = redis::cmd("XREAD");
        cmd.arg("COUNT")
            .arg(COUNT)
            .arg("BLOCK")
            .arg(BLOCK.as_millis() as u64)
            .arg("STREAMS");
        for (_, key, _) in &wanted {
            cmd.arg(key);
        }
        for (_, _, id) in &wanted {
            cmd.arg(id);
        }
        match cmd.query_async::<Value>(c).await {
            Ok(v) => deliver(&cluster, &wanted, v),
            Err(e) => {
                tracing::debug!("cluster: follower read failed: {e}");
                conn = None;
                cluster.follows.reader_id.store(0, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

async fn connect(
    cluster: &Cluster,
    config: &redis::AsyncConnectionConfig,
) -> Option<redis::aio::MultiplexedConnection> {
    let mut c = cluster
        .client
        .get_multiplexed_async_connection_with_config(config)
        .await
        .ok()?;
    let id: i64 = redis::cmd("CLIENT")
        .arg("ID")
        .query_async(&mut c)
        .await
        .ok()?;
    cluster.follows.reader_id.store(id, Ordering::Relaxed);
    Some(c)
}

/// Hands each stream's new entries to its follower.
fn deliver(cluster: &Cluster, wanted: &[(Tag, String, String)], v: Value) {
    let per_stream: Vec<(Vec<u8>, Value)> = match v {
        Value::Array(streams) => streams
            .into_iter()
            .filter_map(|s| match s {
                Value::Array(mut kv) if kv.len() == 2 => {
                    let entries = kv.pop()?;
                    let key = bulk(&kv[0])?.to_vec();
                    Some((key, entries))
                }
                _ => None,
            })
            .collect(),
        Value::Map(m) => m
            .into_iter()
            .filter_map(|(k, e)| Some((bulk(&k)?.to_vec(), e)))
            .collect(),
        _ => return, // Nil: the block timed out (or was woken).
    };
    let mut follows = cluster.follows.lock();
    for (key, entries) in per_stream {
        let Some((tag, _, _)) = wanted.iter().find(|(_, k, _)| k.as_bytes() == key) else {
            continue;
        };
        let Value::Array(list) = entries else {
            continue;
        };
        let batch: Vec<Entry> = list.iter().filter_map(decode_entry).collect();
        let Some(last) = batch.last().map(|e| e.offset) else {
            continue;
        };
        let mut cut = vec![];
        for (serial, f) in follows.iter_mut().filter(|(_, f)| f.tag == *tag) {
            let fresh: Vec<Entry> = batch
                .iter()
                .filter(|e| e.offset > f.after)
                .cloned()
                .collect();
            f.after = f.after.max(last);
            if !fresh.is_empty() && f.tx.try_send(fresh).is_err() {
                // Behind by a whole queue, or gone: cut it (its clients resume).
                cut.push(*serial);
            }
        }
        for serial in cut {
            follows.remove(&serial);
        }
    }
}
