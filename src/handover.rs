//! Handing the streams' recent events from an old process to its replacement during a
//! graceful upgrade, so that clients who reconnect to the new process are replayed what
//! they missed even when the backend ignores `Last-Event-ID`.
//!
//! pingora passes the listening sockets on SIGQUIT; this passes on the hubs' memory. The
//! old process binds a unix socket beside pingora's upgrade socket ([`socket_path`]) and,
//! after ending its clients' streams, keeps its hubs (upstream connections and stores)
//! for a short window. A client reconnecting to the new process makes it open its own
//! upstream and ask the old process for that stream: the answer is the old store (the
//! client is resumed from it) and then the old upstream's live blocks, until the new
//! upstream repeats one of them; the hub merges the two feeds by event id (see
//! `hub::Merge`), so nothing sent in between is lost or doubled.
//!
//! Wire format, length-delimited frames (tokio-util's codec) on the unix socket:
//! the request is three frames, the stream key, the client's last event id (empty for
//! none) and the audience fingerprint of the new process's response
//! ([`crate::key::Audience::fingerprint`]: only a hub with the same `Vary` values and
//! privacy is handed over); the answer is the stored raw blocks, an empty frame, then live raw blocks until
//! the old process closes. A stream the old process does not have is answered by closing.
//! The socket is only reachable by the gateway's own user (mode 0600): it carries the
//! events of every user.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::time::{sleep_until, timeout, Instant};
use tokio_util::codec::{Framed, LengthDelimitedCodec};

use crate::hub::{stored, Hub, HubMsg, Registry, Seed, StreamKey};
use crate::replay::StoredEvent;
use crate::shutdown::Shutdown;
use crate::sse;

/// Longest a new process waits for the old store before going on without it.
const FETCH_TIMEOUT: Duration = Duration::from_secs(2);

/// Largest frame: stream keys and raw blocks (blocks are bounded by `max_event_bytes`,
/// which is at most this).
const MAX_FRAME: usize = 16 * 1024 * 1024;

/// Where the old process offers its hubs: pingora's upgrade socket path + `.replay`.
pub fn socket_path(upgrade_sock: &Path) -> PathBuf {
    let mut p = upgrade_sock.as_os_str().to_owned();
    p.push(".replay");
    PathBuf::from(p)
}

fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .max_frame_length(MAX_FRAME)
        .new_codec()
}

/// The old process's side: binds the socket now (before the streams are ended, so it is
/// there when clients come back) and answers until `until`.
pub struct Offer {
    listener: UnixListener,
    path: PathBuf,
}

impl Offer {
    /// Binds `path`, replacing a stale socket file.
    pub fn bind(path: &Path) -> std::io::Result<Offer> {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let listener = UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        Ok(Offer {
            listener,
            path: path.to_owned(),
        })
    }

    /// Answers the new process until `until`. Each answer counts as a request in flight,
    /// so the process does not exit under it.
    pub async fn serve(self, registry: Arc<Registry>, shutdown: Shutdown, until: Instant) {
        loop {
            let conn = tokio::select! {
                c = self.listener.accept() => c,
                _ = sleep_until(until) => break,
            };
            match conn {
                Ok((stream, _)) => {
                    let guard = shutdown.track();
                    let registry = registry.clone();
                    tokio::spawn(async move {
                        if let Err(e) = answer(stream, &registry, until).await {
                            tracing::debug!("handover: {e}");
                        }
                        drop(guard);
                    });
                }
                Err(e) => {
                    tracing::warn!("handover: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Answers one request of the new process.
async fn answer(stream: UnixStream, registry: &Registry, until: Instant) -> std::io::Result<()> {
    let mut framed = Framed::new(stream, codec());
    let read = async {
        let key = framed.next().await.transpose()?;
        let last = framed.next().await.transpose()?;
        let audience = framed.next().await.transpose()?;
        Ok::<_, std::io::Error>(key.zip(last).zip(audience))
    };
    let Some(((key, last), audience)) = timeout(FETCH_TIMEOUT, read).await?? else {
        return Ok(());
    };
    let last = std::str::from_utf8(&last).ok().filter(|s| !s.is_empty());
    let Some(mut sub) = registry.hand_over(&StreamKey::from_bytes(&key), last, &audience) else {
        return Ok(());
    };
    let replayed = sub.replay.len();
    for b in sub.replay.drain(..) {
        framed.feed(b.raw).await?;
    }
    framed.send(Bytes::new()).await?;
    tracing::info!(
        events = replayed,
        "handover: stream handed to the new process"
    );
    let mut live = 0u64;
    loop {
        tokio::select! {
            m = sub.rx.recv() => match m {
                Ok(HubMsg::Block(b)) => {
                    framed.send(b.raw.clone()).await?;
                    live += 1;
                }
                // The upstream ended, or the new process fell behind: it takes over.
                Ok(HubMsg::End) | Err(_) => break,
            },
            // The new process hung up: its own upstream caught up.
            _ = framed.next() => break,
            _ = sleep_until(until) => break,
        }
    }
    tracing::debug!(live, "handover: stream done");
    Ok(())
}

/// The new process's side: where to ask, and until when it is worth asking.
#[derive(Debug, Clone)]
pub struct Source {
    path: PathBuf,
    until: Instant,
}

/// What the old process handed over for one stream.
pub struct Import {
    /// Its stored blocks, for the new hub's store.
    pub seed: Seed,
    framed: Framed<UnixStream, LengthDelimitedCodec>,
    parser: sse::Parser,
}

impl Source {
    /// Asks at `path` for `window` from now (the old process is gone after that).
    pub fn new(path: PathBuf, window: Duration) -> Source {
        Source {
            path,
            until: Instant::now() + window,
        }
    }

    /// Asks the old process for stream `key`, recorded for the same `audience`
    /// fingerprint. `None` when it has none, is gone, or does not answer in time.
    pub async fn fetch(
        &self,
        key: &StreamKey,
        audience: &[u8],
        last_id: Option<&str>,
        max_event_bytes: usize,
    ) -> Option<Import> {
        if Instant::now() >= self.until {
            return None;
        }
        let fetch = self.try_fetch(key, audience, last_id, max_event_bytes);
        match timeout(FETCH_TIMEOUT, fetch).await {
            Ok(Ok(found)) => found,
            Ok(Err(e)) => {
                // Most often: no old process (any more).
                tracing::debug!("handover: {}: {e}", self.path.display());
                None
            }
            Err(_) => {
                tracing::warn!("handover: the old process did not answer in time");
                None
            }
        }
    }

    async fn try_fetch(
        &self,
        key: &StreamKey,
        audience: &[u8],
        last_id: Option<&str>,
        max_event_bytes: usize,
    ) -> std::io::Result<Option<Import>> {
        let stream = UnixStream::connect(&self.path).await?;
        let mut framed = Framed::new(stream, codec());
        framed.feed(Bytes::copy_from_slice(key.as_bytes())).await?;
        framed
            .feed(Bytes::copy_from_slice(last_id.unwrap_or("").as_bytes()))
            .await?;
        framed.send(Bytes::copy_from_slice(audience)).await?;
        let mut parser = sse::Parser::boundaries_only(max_event_bytes).mid_stream();
        let mut blocks = Vec::new();
        loop {
            match framed.next().await.transpose()? {
                // Closed before the end of the store: the old process has no such stream.
                None => return Ok(None),
                Some(f) if f.is_empty() => break,
                Some(f) => blocks.extend(parse(&mut parser, &f)),
            }
        }
        tracing::info!(events = blocks.len(), "handover: took a stream over");
        Ok(Some(Import {
            seed: Seed {
                blocks,
                resume_after: last_id.map(str::to_owned),
            },
            framed,
            parser,
        }))
    }
}

/// Cuts one handed-over frame (whole raw blocks) into stored blocks.
fn parse(parser: &mut sse::Parser, frame: &[u8]) -> Vec<StoredEvent> {
    parser.push(frame);
    let mut out = Vec::new();
    loop {
        match parser.next_block() {
            Ok(Some(ev)) => out.push(stored(&ev)),
            Ok(None) => return out,
            Err(e) => {
                tracing::warn!("handover: dropping a block: {e}");
                return out;
            }
        }
    }
}

impl Import {
    /// Feeds the old process's live blocks to `hub` until its own upstream has caught up
    /// (then hangs up, which lets the old process drop the stream) or the old feed ends.
    pub async fn follow(mut self, hub: Arc<Hub>, registry: Arc<Registry>) {
        loop {
            tokio::select! {
                f = self.framed.next() => match f {
                    Some(Ok(f)) => {
                        for b in parse(&mut self.parser, &f) {
                            hub.take_handed_over(b);
                            registry.counters.handed_over.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    _ => break,
                },
                _ = hub.merge_over() => break,
            }
        }
        hub.end_handover();
    }
}
