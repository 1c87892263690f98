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
//! Wire format, length-delimited frames (tokio-util's codec) on the unix socket. The old
//! process speaks first: a random secret of this upgrade. The request is then three
//! frames: the stream key and the audience fingerprint of the new process's response
//! ([`crate::key::Audience::fingerprint`]: only a hub with the same `Vary` values and
//! privacy is handed over), each as an HMAC-SHA256 under that secret, so no cookie or
//! token value ever crosses the socket, and the client's last event id (empty for
//! none). The answer is the stored raw blocks, an empty frame, then live raw blocks
//! until the old process closes. A stream the old process does not have is answered by
//! closing.
//!
//! Who is on the other end is checked, not assumed: the socket's directory must be
//! private to the gateway's user ([`ensure_private_dir`], checked at start for
//! pingora's upgrade socket too), each side checks its peer's credentials
//! (`SO_PEERCRED`: same user; the new process also expects the old process's PID from
//! the PID file), and the new process stops asking once the old one is gone. The
//! socket is mode 0600: it carries the events of every user.

use std::collections::HashMap;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::time::{sleep_until, timeout, Instant};
use tokio_util::codec::{Framed, LengthDelimitedCodec};

use ring::hmac;

use crate::hub::{stored, Hub, HubMsg, Registry, Seed, StreamKey};
use crate::replay::StoredEvent;
use crate::shutdown::Graceful;
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

/// This process's effective user.
fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Where pingora's upgrade socket goes when the config names none: a directory only
/// this user can write (`/run/ssegate/` for root, else the user's runtime directory,
/// else `/tmp/ssegate-<uid>/`, created 0700).
pub fn default_upgrade_sock() -> PathBuf {
    let uid = euid();
    let dir = if uid == 0 {
        PathBuf::from("/run/ssegate")
    } else {
        match std::env::var_os("XDG_RUNTIME_DIR") {
            Some(d) if !d.is_empty() => PathBuf::from(d).join("ssegate"),
            _ => PathBuf::from(format!("/tmp/ssegate-{uid}")),
        }
    };
    dir.join("upgrade.sock")
}

/// Makes sure only this user can create or replace files beside `sock`: its directory
/// is created (mode 0700) when missing, and refused when it is a symbolic link, owned
/// by another user (root excepted), or writable by group or others. Whoever can put a
/// file there can stand in for either process of an upgrade and be handed the
/// listening sockets or every stream's events.
pub fn ensure_private_dir(sock: &Path) -> Result<(), String> {
    let dir = match sock.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let show = dir.display();
    if let Err(e) = std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
    {
        return Err(format!("cannot create {show}: {e}"));
    }
    let meta = std::fs::symlink_metadata(dir).map_err(|e| format!("{show}: {e}"))?;
    if meta.file_type().is_symlink() {
        return Err(format!("{show} is a symbolic link"));
    }
    if !meta.is_dir() {
        return Err(format!("{show} is not a directory"));
    }
    if meta.uid() != euid() && meta.uid() != 0 {
        return Err(format!(
            "{show} belongs to another user (uid {})",
            meta.uid()
        ));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(format!(
            "{show} is writable by other users (mode {:o})",
            meta.mode() & 0o7777
        ));
    }
    Ok(())
}

/// The peer of a unix socket is this user (and, when given, this process).
fn check_peer(stream: &UnixStream, pid: Option<u32>) -> std::io::Result<()> {
    let cred = stream.peer_cred()?;
    let pid_ok = pid.is_none_or(|p| cred.pid().is_some_and(|c| i64::from(c) == i64::from(p)));
    if cred.uid() != euid() || !pid_ok {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "the peer is uid {} pid {:?}, not the gateway's own process",
                cred.uid(),
                cred.pid()
            ),
        ));
    }
    Ok(())
}

/// A stream key or fingerprint as it crosses the socket.
fn tag(secret: &hmac::Key, bytes: &[u8]) -> hmac::Tag {
    hmac::sign(secret, bytes)
}

/// The old process's map from key tags to keys, rebuilt when a request names a tag it
/// does not hold (a hub may have opened since), at most every `REINDEX_EVERY`.
struct Index {
    by_tag: HashMap<Vec<u8>, StreamKey>,
    built: Option<Instant>,
}

const REINDEX_EVERY: Duration = Duration::from_millis(200);

impl Index {
    fn find(&mut self, registry: &Registry, secret: &hmac::Key, want: &[u8]) -> Option<StreamKey> {
        if let Some(k) = self.by_tag.get(want) {
            return Some(k.clone());
        }
        if self.built.is_some_and(|t| t.elapsed() < REINDEX_EVERY) {
            return None;
        }
        self.by_tag = registry
            .keys()
            .into_iter()
            .map(|k| (tag(secret, k.as_bytes()).as_ref().to_vec(), k))
            .collect();
        self.built = Some(Instant::now());
        self.by_tag.get(want).cloned()
    }
}

/// The old process's side: binds the socket now (before the streams are ended, so it is
/// there when clients come back) and answers until `until`.
pub struct Offer {
    listener: UnixListener,
    path: PathBuf,
    /// This upgrade's secret, under which keys are named on the socket.
    secret: [u8; 32],
}

impl Offer {
    /// Binds `path` (in a private directory), replacing a stale socket file.
    pub fn bind(path: &Path) -> std::io::Result<Offer> {
        ensure_private_dir(path).map_err(std::io::Error::other)?;
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let mut secret = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut secret)
            .map_err(|_| std::io::Error::other("no randomness for the handover secret"))?;
        let listener = UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        Ok(Offer {
            listener,
            path: path.to_owned(),
            secret,
        })
    }

    /// Answers the new process until `until`. Each answer counts as a request in flight,
    /// so the process does not exit under it.
    pub async fn serve(self, registry: Arc<Registry>, shutdown: Graceful, until: Instant) {
        let secret = Arc::new(self.secret);
        let index = Arc::new(Mutex::new(Index {
            by_tag: HashMap::new(),
            built: None,
        }));
        loop {
            let conn = tokio::select! {
                c = self.listener.accept() => c,
                _ = sleep_until(until) => break,
            };
            match conn {
                Ok((stream, _)) => {
                    if let Err(e) = check_peer(&stream, None) {
                        tracing::warn!("handover: refused a connection: {e}");
                        continue;
                    }
                    let guard = shutdown.track();
                    let registry = registry.clone();
                    let (secret, index) = (secret.clone(), index.clone());
                    tokio::spawn(async move {
                        if let Err(e) = answer(stream, &registry, &secret, &index, until).await {
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
async fn answer(
    stream: UnixStream,
    registry: &Registry,
    secret: &[u8; 32],
    index: &Mutex<Index>,
    until: Instant,
) -> std::io::Result<()> {
    let mut framed = Framed::new(stream, codec());
    framed.send(Bytes::copy_from_slice(secret)).await?;
    let read = async {
        let key = framed.next().await.transpose()?;
        let audience = framed.next().await.transpose()?;
        let last = framed.next().await.transpose()?;
        Ok::<_, std::io::Error>(key.zip(audience).zip(last))
    };
    let Some(((key_tag, audience_tag), last)) = timeout(FETCH_TIMEOUT, read).await?? else {
        return Ok(());
    };
    let last = std::str::from_utf8(&last).ok().filter(|s| !s.is_empty());
    let hkey = hmac::Key::new(hmac::HMAC_SHA256, secret);
    let key = index
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .find(registry, &hkey, &key_tag);
    let Some(key) = key else {
        return Ok(());
    };
    let same_audience = |fp: &[u8]| hmac::verify(&hkey, fp, &audience_tag).is_ok();
    let Some(mut sub) = registry.hand_over(&key, last, same_audience) else {
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
#[derive(Debug)]
pub struct Source {
    path: PathBuf,
    until: Instant,
    /// The old process's PID (from the PID file), which must be the socket's peer.
    old_pid: Option<u32>,
    /// The old process is gone (or something else answered): stop asking.
    gone: AtomicBool,
}

/// What the old process handed over for one stream.
pub struct Import {
    /// Its stored blocks, for the new hub's store.
    pub seed: Seed,
    framed: Framed<UnixStream, LengthDelimitedCodec>,
    parser: sse::Parser,
}

impl Source {
    /// Asks at `path` for `window` from now (the old process is gone after that). With
    /// `old_pid`, only that process is believed.
    pub fn new(path: PathBuf, window: Duration, old_pid: Option<u32>) -> Source {
        Source {
            path,
            until: Instant::now() + window,
            old_pid,
            gone: AtomicBool::new(false),
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
        if Instant::now() >= self.until || self.gone.load(Ordering::Relaxed) {
            return None;
        }
        let fetch = self.try_fetch(key, audience, last_id, max_event_bytes);
        match timeout(FETCH_TIMEOUT, fetch).await {
            Ok(Ok(found)) => found,
            Ok(Err(e)) => {
                use std::io::ErrorKind::{ConnectionRefused, NotFound, PermissionDenied};
                match e.kind() {
                    // The old process was there before this one served anything: once
                    // its socket is gone, it is gone for good.
                    NotFound | ConnectionRefused => self.gone.store(true, Ordering::Relaxed),
                    PermissionDenied => {
                        tracing::warn!("handover: {}: {e}; not asking again", self.path.display());
                        self.gone.store(true, Ordering::Relaxed);
                    }
                    _ => tracing::debug!("handover: {}: {e}", self.path.display()),
                }
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
        // Nothing is said before the peer is known to be the old process.
        check_peer(&stream, self.old_pid)?;
        let mut framed = Framed::new(stream, codec());
        let secret = match framed.next().await.transpose()? {
            Some(s) if s.len() == 32 => hmac::Key::new(hmac::HMAC_SHA256, &s),
            _ => return Ok(None),
        };
        framed
            .feed(Bytes::copy_from_slice(
                tag(&secret, key.as_bytes()).as_ref(),
            ))
            .await?;
        framed
            .feed(Bytes::copy_from_slice(tag(&secret, audience).as_ref()))
            .await?;
        framed
            .send(Bytes::copy_from_slice(last_id.unwrap_or("").as_bytes()))
            .await?;
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
                handed_over: true,
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
                            registry.count_handed_over(1);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::{NewHub, Viewer};
    use crate::key::Audience;
    use crate::replay::{Budget, MemoryRing, RingBounds};

    fn private_dir() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }

    /// A registry with one hub of `key` holding events 1..=3, and its audience's
    /// fingerprint.
    fn registry_with(key: &StreamKey) -> (Arc<Registry>, Vec<u8>, crate::hub::Subscription) {
        let registry = Arc::new(Registry::new(16, 10));
        let bounds = RingBounds {
            max_events: 10,
            max_bytes: 1 << 16,
            max_age: Duration::from_secs(60),
        };
        let head = http::Response::new(()).into_parts().0;
        let store = Box::new(MemoryRing::new(bounds, Budget::new(1 << 20)));
        let headers = http::HeaderMap::new();
        let viewer = Viewer {
            headers: &headers,
            has_identity: false,
        };
        let new = NewHub::open(key.clone(), false, head, store, 1 << 16);
        let (hub, sub, _) = registry.create(new, viewer);
        hub.feed(b"id: 1\ndata: a\n\nid: 2\ndata: b\n\nid: 3\ndata: c\n\n")
            .unwrap();
        let fp = Audience::of(&headers, &headers, &[], false)
            .fingerprint()
            .unwrap();
        (registry, fp, sub)
    }

    #[tokio::test]
    async fn the_old_process_hands_a_stream_over_by_keyed_hash() {
        let dir = private_dir();
        let path = dir.path().join("up.sock.replay");
        let key = StreamKey::new([&b"cookie: session=secret-value"[..]]);
        let (registry, fp, _sub) = registry_with(&key);
        let offer = Offer::bind(&path).unwrap();
        let until = Instant::now() + Duration::from_secs(5);
        tokio::spawn(offer.serve(registry, Graceful::new(), until));
        let source = Source::new(path, Duration::from_secs(5), Some(std::process::id()));
        let import = source.fetch(&key, &fp, Some("1"), 1 << 16).await.unwrap();
        let ids: Vec<&str> = import.seed.blocks.iter().map(|b| &*b.id).collect();
        assert_eq!(ids, ["1", "2", "3"]);
        // Another audience (here: a private response) is not handed over.
        let other = Audience::of(
            &[(http::header::CACHE_CONTROL, "private".parse().unwrap())]
                .into_iter()
                .collect(),
            &http::HeaderMap::new(),
            &[],
            false,
        )
        .fingerprint()
        .unwrap();
        assert!(source.fetch(&key, &other, None, 1 << 16).await.is_none());
    }

    #[tokio::test]
    async fn nothing_is_said_to_a_socket_that_is_not_the_old_process() {
        let dir = private_dir();
        let path = dir.path().join("up.sock.replay");
        // Something else listens where the old process would: this test process, while
        // the new one expects the old process's PID (here: one that is not ours).
        let impostor = UnixListener::bind(&path).unwrap();
        let heard = tokio::spawn(async move {
            let (mut s, _) = impostor.accept().await.unwrap();
            let mut got = Vec::new();
            let _ = tokio::time::timeout(
                Duration::from_secs(2),
                tokio::io::AsyncReadExt::read_to_end(&mut s, &mut got),
            )
            .await;
            got
        });
        let source = Source::new(path.clone(), Duration::from_secs(5), Some(1));
        let key = StreamKey::new([&b"cookie: session=secret-value"[..]]);
        assert!(source
            .fetch(&key, b"fp", Some("7"), 1 << 16)
            .await
            .is_none());
        assert!(
            heard.await.unwrap().is_empty(),
            "the impostor was told something"
        );
        // And it is not asked again.
        assert!(source.gone.load(Ordering::Relaxed));
    }

    #[tokio::test]
    async fn stream_keys_cross_the_socket_as_keyed_hashes_only() {
        let dir = private_dir();
        let path = dir.path().join("up.sock.replay");
        let listener = UnixListener::bind(&path).unwrap();
        let heard = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let mut framed = Framed::new(s, codec());
            framed.send(Bytes::from_static(&[7u8; 32])).await.unwrap();
            let mut frames = Vec::new();
            for _ in 0..3 {
                frames.push(framed.next().await.unwrap().unwrap().to_vec());
            }
            frames
        });
        let source = Source::new(path, Duration::from_secs(5), Some(std::process::id()));
        let key = StreamKey::new([&b"cookie: session=secret-value"[..]]);
        assert!(source
            .fetch(&key, b"fp", Some("7"), 1 << 16)
            .await
            .is_none());
        let frames = heard.await.unwrap();
        let secret = hmac::Key::new(hmac::HMAC_SHA256, &[7u8; 32]);
        assert_eq!(frames[0], tag(&secret, key.as_bytes()).as_ref());
        assert_eq!(frames[1], tag(&secret, b"fp").as_ref());
        assert_eq!(frames[2], b"7");
        let all = frames.concat();
        assert!(!all.windows(12).any(|w| w == b"secret-value"));
    }

    #[test]
    fn sockets_only_go_in_private_directories() {
        use std::os::unix::fs::PermissionsExt;
        let dir = private_dir();
        // Created 0700 when missing.
        let fresh = dir.path().join("run/ssegate/upgrade.sock");
        ensure_private_dir(&fresh).unwrap();
        let mode = std::fs::metadata(fresh.parent().unwrap()).unwrap().mode();
        assert_eq!(mode & 0o777, 0o700);
        // World-writable (like /tmp), group-writable, or a symbolic link: refused.
        for m in [0o1777, 0o770] {
            let d = dir.path().join(format!("open-{m:o}"));
            std::fs::create_dir(&d).unwrap();
            std::fs::set_permissions(&d, std::fs::Permissions::from_mode(m)).unwrap();
            let e = ensure_private_dir(&d.join("upgrade.sock")).unwrap_err();
            assert!(e.contains("writable by other users"), "{e}");
        }
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(fresh.parent().unwrap(), &link).unwrap();
        assert!(ensure_private_dir(&link.join("upgrade.sock"))
            .unwrap_err()
            .contains("symbolic link"));
        assert!(ensure_private_dir(Path::new("/tmp/upgrade.sock")).is_err());
    }
}
