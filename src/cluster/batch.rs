//! Appends from every stream this node reads, sent to Redis together: whatever is
//! waiting when the connection is free goes out as one pipeline (one write, one read,
//! one wake-up for many events), and up to [`PER_CALL`] streams' appends share one
//! script call (the script's fixed cost and the clock read are paid once for them).
//! Each stream's append is still fenced by its own lease inside that call. The queue is
//! bounded by the writers themselves: each waits for its answer before it sends the
//! next, and one that gave up is skipped.

use std::sync::Arc;
use std::time::Instant;

use redis::aio::ConnectionManager;
use redis::Value;
use tokio::sync::{mpsc, oneshot};

use super::{codec::flags, lua, new_epoch, Cluster, Down, Lease, HANDOFF};
use crate::replay::{RingBounds, StoredEvent};

/// Most appends in one pipeline.
const MAX_BATCH: usize = 256;

/// Most streams in one script call: Redis runs nothing else while a script runs, so a
/// call stays short (a few hundred microseconds) for the other nodes' sake.
const PER_CALL: usize = 32;

/// One stream's append waiting to be sent.
pub(super) struct Job {
    /// The stream's keys: `s`, `m`, `l`.
    pub(super) keys: [String; 3],
    /// Its section of the script's arguments (see [`lua::APPEND`]), as a bare argument
    /// list.
    pub(super) args: redis::Cmd,
    /// Where its answer goes.
    pub(super) reply: oneshot::Sender<Result<Value, Down>>,
}

/// Sends appends in pipelines until the process exits.
pub(super) async fn run(cluster: Arc<Cluster>, mut rx: mpsc::UnboundedReceiver<Job>) {
    let mut jobs = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = rx.recv().await {
        jobs.push(first);
        while jobs.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        jobs.retain(|j| !j.reply.is_closed());
        let Some(conn) = cluster.conn.load_full() else {
            for j in jobs.drain(..) {
                let _ = j.reply.send(Err(Down::NotConnected));
            }
            continue;
        };
        let mut conn = ConnectionManager::clone(&conn);
        let pipe = pipeline(&jobs);
        let mut answers = pipe.query_async::<Vec<Value>>(&mut conn).await;
        // Redis restarted and forgot the script: load it and send those again, once.
        let forgot = matches!(&answers, Ok(v) if v.iter().any(is_noscript));
        if forgot
            && lua::APPEND
                .prepare_invoke()
                .load_async(&mut conn)
                .await
                .is_ok()
        {
            answers = pipe.query_async(&mut conn).await;
        }
        match answers {
            Ok(calls) if calls.len() == jobs.len().div_ceil(PER_CALL) => {
                let mut rest = jobs.drain(..);
                for call in calls {
                    let n = rest.len().min(PER_CALL);
                    answer(rest.by_ref().take(n), n, call);
                }
            }
            Ok(_) => {
                for j in jobs.drain(..) {
                    let _ = j.reply.send(Err(Down::Shape));
                }
            }
            Err(e) => {
                let kind = e.kind();
                for j in jobs.drain(..) {
                    let _ = j.reply.send(Err(Down::Redis(redis::RedisError::from((
                        kind,
                        "pipeline failed",
                    )))));
                }
            }
        }
    }
}

/// One `EVALSHA` per [`PER_CALL`] jobs: their keys, then their sections in that order.
fn pipeline(jobs: &[Job]) -> redis::Pipeline {
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    for chunk in jobs.chunks(PER_CALL) {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(lua::APPEND.get_hash()).arg(chunk.len() * 3);
        for j in chunk {
            cmd.arg(&j.keys[..]);
        }
        for j in chunk {
            for a in j.args.args_iter() {
                if let redis::Arg::Simple(b) = a {
                    cmd.arg(b);
                }
            }
        }
        pipe.add_command(cmd);
    }
    pipe
}

/// Hands each of the `n` jobs of `chunk` its stream's part of `call`'s answer.
fn answer(chunk: impl Iterator<Item = Job>, n: usize, call: Value) {
    match call {
        Value::Array(parts) if parts.len() == n => {
            for (j, v) in chunk.zip(parts) {
                let _ = j.reply.send(match v {
                    Value::ServerError(e) => Err(Down::Redis(e.into())),
                    v => Ok(v),
                });
            }
        }
        Value::ServerError(e) => {
            for j in chunk {
                let _ = j.reply.send(Err(Down::Redis(e.clone().into())));
            }
        }
        _ => {
            for j in chunk {
                let _ = j.reply.send(Err(Down::Shape));
            }
        }
    }
}

fn is_noscript(v: &Value) -> bool {
    matches!(v, Value::ServerError(e) if e.code() == "NOSCRIPT")
}

/// One stream's answer: `None` when fenced, else its top offset and epoch.
fn decode(v: Value) -> Result<Option<(u64, String)>, Down> {
    let Value::Array(v) = v else {
        return Err(Down::Shape);
    };
    let int = |v: Option<&Value>| match v {
        Some(Value::Int(i)) => Some(*i),
        _ => None,
    };
    if int(v.first()) != Some(1) {
        return Ok(None);
    }
    let offset = int(v.get(1)).ok_or(Down::Shape)? as u64;
    let epoch = match v.get(2) {
        Some(Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
        _ => return Err(Down::Shape),
    };
    Ok(Some((offset, epoch)))
}

impl Cluster {
    /// Appends `blocks` after offset `prev` (`None`: continuity unknown, start a new
    /// epoch). `None` when fenced: another node holds the lease now.
    pub async fn append<'a>(
        &self,
        lease: &Lease,
        prev: Option<u64>,
        bounds: RingBounds,
        blocks: impl IntoIterator<Item = &'a Arc<StoredEvent>>,
    ) -> Result<Option<(u64, String)>, Down> {
        let entries: Vec<(&str, u8, &[u8])> = blocks
            .into_iter()
            .map(|b| (&*b.id, flags(b), &b.raw[..]))
            .collect();
        self.append_entries(lease, prev, bounds, &entries).await
    }

    /// Announces a planned handoff in the history: followers open the upstream beside
    /// this reader now, while it still reads (see `relay::remote`).
    pub async fn announce_handoff(
        &self,
        lease: &Lease,
        prev: Option<u64>,
        bounds: RingBounds,
    ) -> Result<Option<(u64, String)>, Down> {
        self.append_entries(lease, prev, bounds, &[("", HANDOFF, b"")])
            .await
    }

    async fn append_entries(
        &self,
        lease: &Lease,
        prev: Option<u64>,
        bounds: RingBounds,
        entries: &[(&str, u8, &[u8])],
    ) -> Result<Option<(u64, String)>, Down> {
        let (reply, answer) = oneshot::channel();
        let job = self.job(lease, prev, bounds, entries, reply);
        decode(self.batched(job, answer).await?)
    }

    /// One stream's append: its keys and its section of [`lua::APPEND`]'s arguments.
    fn job(
        &self,
        lease: &Lease,
        prev: Option<u64>,
        bounds: RingBounds,
        entries: &[(&str, u8, &[u8])],
        reply: oneshot::Sender<Result<Value, Down>>,
    ) -> Job {
        let keys = [
            self.key(&lease.tag, "s"),
            self.key(&lease.tag, "m"),
            self.key(&lease.tag, "l"),
        ];
        let mut args = redis::Cmd::new();
        args.arg(&lease.value)
            .arg(prev.map(|p| p.to_string()).unwrap_or_default())
            .arg(new_epoch())
            .arg(bounds.max_events)
            .arg(bounds.max_bytes)
            .arg(bounds.max_age.as_millis() as u64)
            .arg(self.ttl(bounds).as_millis() as u64)
            .arg(entries.len());
        for (id, flags, raw) in entries {
            args.arg(*id).arg(*flags).arg(*raw);
        }
        Job { keys, args, reply }
    }

    /// Sends `job` with the other appends waiting now (see the module), within the
    /// timeout; `answer` is where its reply comes.
    async fn batched(
        &self,
        job: Job,
        answer: oneshot::Receiver<Result<Value, Down>>,
    ) -> Result<Value, Down> {
        if self.conn.load().is_none() {
            return Err(Down::NotConnected);
        }
        self.appends.send(job).map_err(|_| Down::NotConnected)?;
        let started = Instant::now();
        let r = match tokio::time::timeout(self.settings.timeout, answer).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(Down::NotConnected),
            Err(_) => Err(Down::Timeout),
        };
        self.count(started, &r);
        r
    }
}

#[cfg(test)]
pub(super) mod tests {
    use std::time::Duration;

    use super::*;
    use crate::cluster::Remote;
    use crate::config;
    use crate::key::StreamKey;

    /// Debian's `redis-server` on a free loopback port, killed when dropped (its
    /// directory, the last field, with it).
    pub(in crate::cluster) struct Server(
        std::process::Child,
        pub(in crate::cluster) u16,
        #[allow(dead_code)] tempfile::TempDir,
    );

    impl Drop for Server {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    pub(in crate::cluster) fn redis() -> Server {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .port();
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .arg("--dir")
            .arg(dir.path())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server (scripts/setup-deps test installs it)");
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Server(child, port, dir)
    }

    pub(in crate::cluster) async fn node(port: u16, name: &str) -> Arc<Cluster> {
        let c = Cluster::new(config::Cluster {
            redis: format!("redis://127.0.0.1:{port}/"),
            password: None,
            node_id: name.into(),
            key_secret: b"a unit test secret".to_vec(),
            lease: Duration::from_millis(1000),
            timeout: Duration::from_millis(300),
            prefix: "t".into(),
        })
        .unwrap();
        tokio::spawn(c.clone().run());
        while c.conn.load().is_none() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        c
    }

    fn block(id: &str) -> Arc<StoredEvent> {
        Arc::new(StoredEvent {
            id: id.into(),
            has_id_field: true,
            raw: bytes::Bytes::from(format!("id: {id}\ndata: x\n\n")),
            sets_retry: false,
            at: Instant::now(),
        })
    }

    /// The fencing token: an append under a lease that ran out and was taken by another
    /// node is refused by Redis in the same step, and writes nothing; the new holder's
    /// appends continue the history.
    #[tokio::test]
    async fn an_append_under_a_lost_lease_is_refused_and_writes_nothing() {
        let server = redis();
        let (a, b) = (node(server.1, "a").await, node(server.1, "b").await);
        let bounds = RingBounds {
            max_events: 100,
            max_bytes: 1 << 20,
            max_age: Duration::from_secs(60),
        };
        let tag = a.tag(&StreamKey::new([&b"k"[..]]));
        let old = a.acquire(&tag).await.unwrap().unwrap();
        let (offset, _) = a
            .append(&old, None, bounds, &[block("1")])
            .await
            .unwrap()
            .unwrap();
        assert!(
            b.acquire(&tag).await.unwrap().is_none(),
            "the lease is held"
        );
        // The holder pauses past its lease; another node takes it.
        tokio::time::sleep(Duration::from_millis(1300)).await;
        let new = b
            .acquire(&tag)
            .await
            .unwrap()
            .expect("a lapsed lease is free");
        assert_eq!((new.offset, new.last_id.as_str()), (offset, "1"));
        let late = a.append(&old, Some(offset), bounds, &[block("2")]).await;
        assert!(
            matches!(late, Ok(None)),
            "a late append was not fenced: {late:?}"
        );
        assert!(!a.renew(&old).await.unwrap(), "a lost lease was renewed");
        let next = b
            .append(&new, Some(new.offset), bounds, &[block("3")])
            .await;
        assert_eq!(next.unwrap().map(|(o, _)| o), Some(offset + 1));
        let ids: Vec<String> = b
            .peek(&tag, true)
            .await
            .unwrap()
            .entries
            .iter()
            .map(|e| e.block.id.to_string())
            .collect();
        assert_eq!(ids, ["1", "3"]);
    }

    /// Several streams' appends in one script call: each is fenced by its own lease (a
    /// stale one writes nothing while the others in the same call go through), and
    /// each gets its own answer.
    #[tokio::test]
    async fn streams_sharing_one_call_are_fenced_each_by_its_own_lease() {
        let server = redis();
        let (a, b) = (node(server.1, "a").await, node(server.1, "b").await);
        let bounds = RingBounds {
            max_events: 2,
            max_bytes: 1 << 20,
            max_age: Duration::from_secs(60),
        };
        let (one, two) = (
            a.tag(&StreamKey::new([&b"one"[..]])),
            a.tag(&StreamKey::new([&b"two"[..]])),
        );
        let mine = a.acquire(&one).await.unwrap().unwrap();
        let theirs = b.acquire(&two).await.unwrap().unwrap();
        // `a` writes to `two` under a lease that is not the holder's.
        let stale = Lease {
            value: mine.value.clone(),
            ..theirs.clone()
        };
        let blocks: Vec<(&str, u8, &[u8])> = vec![("1", 0, b"1"), ("2", 0, b"2"), ("3", 0, b"3")];
        let (r1, a1) = oneshot::channel();
        let (r2, a2) = oneshot::channel();
        let jobs = [
            a.job(&mine, None, bounds, &blocks, r1),
            a.job(&stale, None, bounds, &blocks[..1], r2),
        ];
        let pipe = pipeline(&jobs);
        let mut conn = ConnectionManager::clone(&a.conn.load_full().unwrap());
        lua::APPEND
            .prepare_invoke()
            .load_async(&mut conn)
            .await
            .unwrap();
        let calls: Vec<Value> = pipe.query_async(&mut conn).await.unwrap();
        assert_eq!(calls.len(), 1, "two streams, one call");
        let n = jobs.len();
        answer(jobs.into_iter(), n, calls.into_iter().next().unwrap());
        let first = decode(a1.await.unwrap().unwrap()).unwrap();
        assert_eq!(first.map(|(o, _)| o), Some(3));
        assert!(decode(a2.await.unwrap().unwrap()).unwrap().is_none());
        // The count bound held (two of three kept), and the fenced stream is empty.
        let ids = |r: Remote| -> Vec<String> {
            r.entries.iter().map(|e| e.block.id.to_string()).collect()
        };
        assert_eq!(ids(a.peek(&one, true).await.unwrap()), ["2", "3"]);
        assert!(ids(b.peek(&two, true).await.unwrap()).is_empty());
    }
}
