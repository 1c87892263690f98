//! Appends from every stream this node reads, sent to Redis together: whatever is
//! waiting when the connection is free goes out as one pipeline (one write, one read,
//! one wake-up for many events). Each append is still its own fenced script call;
//! only the transport is shared. The queue is bounded by the writers themselves: each
//! waits for its answer before it sends the next, and one that gave up is skipped.

use std::sync::Arc;
use std::time::Instant;

use redis::aio::ConnectionManager;
use redis::Value;
use tokio::sync::{mpsc, oneshot};

use super::{codec::flags, lua, new_epoch, Cluster, Down, Lease, HANDOFF};
use crate::replay::{RingBounds, StoredEvent};

/// Most appends in one pipeline.
const MAX_BATCH: usize = 256;

/// One append waiting to be sent.
pub(super) struct Job {
    /// `EVALSHA` of the append script, with its keys and arguments.
    pub(super) cmd: redis::Cmd,
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
        let mut answers = send(&mut conn, &jobs).await;
        // Redis restarted and forgot the script: load it and send those again, once.
        let forgot = matches!(&answers, Ok(v) if v.iter().any(is_noscript));
        if forgot
            && lua::APPEND
                .prepare_invoke()
                .load_async(&mut conn)
                .await
                .is_ok()
        {
            answers = send(&mut conn, &jobs).await;
        }
        match answers {
            Ok(values) if values.len() == jobs.len() => {
                for (j, v) in jobs.drain(..).zip(values) {
                    let r = match v {
                        Value::ServerError(e) => Err(Down::Redis(e.into())),
                        v => Ok(v),
                    };
                    let _ = j.reply.send(r);
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

async fn send(conn: &mut ConnectionManager, jobs: &[Job]) -> redis::RedisResult<Vec<Value>> {
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    for j in jobs {
        pipe.add_command(j.cmd.clone());
    }
    pipe.query_async(conn).await
}

fn is_noscript(v: &Value) -> bool {
    matches!(v, Value::ServerError(e) if e.code() == "NOSCRIPT")
}

impl Cluster {
    /// Appends `blocks` after offset `prev` (`None`: continuity unknown, start a new
    /// epoch). `None` when fenced: another node holds the lease now.
    pub async fn append(
        &self,
        lease: &Lease,
        prev: Option<u64>,
        bounds: RingBounds,
        blocks: &[Arc<StoredEvent>],
    ) -> Result<Option<(u64, String)>, Down> {
        let entries: Vec<(&str, u8, &[u8])> = blocks
            .iter()
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
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(lua::APPEND.get_hash())
            .arg(3)
            .arg(self.key(&lease.tag, "s"))
            .arg(self.key(&lease.tag, "m"))
            .arg(self.key(&lease.tag, "l"))
            .arg(&lease.value)
            .arg(self.settings.lease.as_millis() as u64)
            .arg(prev.map(|p| p.to_string()).unwrap_or_default())
            .arg(new_epoch())
            .arg(bounds.max_events)
            .arg(bounds.max_bytes)
            .arg(bounds.max_age.as_millis() as u64)
            .arg(self.ttl(bounds).as_millis() as u64);
        for (id, flags, raw) in entries {
            cmd.arg(*id).arg(*flags).arg(*raw);
        }
        let v: Vec<Value> = match self.batched(cmd).await? {
            Value::Array(v) => v,
            _ => return Err(Down::Shape),
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

    /// Sends `cmd` with the other appends waiting now ([`batch`]), within the timeout.
    async fn batched(&self, cmd: redis::Cmd) -> Result<Value, Down> {
        if self.conn.load().is_none() {
            return Err(Down::NotConnected);
        }
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.appends
            .send(Job { cmd, reply })
            .map_err(|_| Down::NotConnected)?;
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
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config;
    use crate::key::StreamKey;

    /// Debian's `redis-server` on a free loopback port, killed when dropped (its
    /// directory, the last field, with it).
    struct Server(
        std::process::Child,
        u16,
        #[allow(dead_code)] tempfile::TempDir,
    );

    impl Drop for Server {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn redis() -> Server {
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

    async fn node(port: u16, name: &str) -> Arc<Cluster> {
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
}
