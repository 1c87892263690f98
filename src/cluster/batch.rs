//! Appends from every stream this node reads, sent to Redis together: whatever is
//! waiting when the connection is free goes out as one pipeline (one write, one read,
//! one wake-up for many events). Each append is still its own fenced script call;
//! only the transport is shared. The queue is bounded by the writers themselves: each
//! waits for its answer before it sends the next, and one that gave up is skipped.

use std::sync::Arc;

use redis::aio::ConnectionManager;
use redis::Value;
use tokio::sync::{mpsc, oneshot};

use super::{lua, Cluster, Down};

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
