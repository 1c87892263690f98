//! What an upstream response keeps allocated once its head is read: the claim behind the
//! patched pingora-core (`vendor/README.md`). Its own test binary, because it counts
//! allocations with a global allocator of its own.
//!
//! The upstream is a raw TCP server of the test's own: what is measured is pingora's
//! client session reading a head, so the backend only has to write one.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::{Read, Write};

use pingora::http::RequestHeader;
use pingora::protocols::http::v1::client::HttpSession;

use common::read_request_head;

/// Counts the bytes allocated and not yet freed by the current thread.
struct PerThread;

thread_local! {
    // `const` and without `Drop`: reading it never allocates.
    static LIVE: Cell<isize> = const { Cell::new(0) };
}

fn add(n: isize) {
    let _ = LIVE.try_with(|l| l.set(l.get() + n));
}

unsafe impl GlobalAlloc for PerThread {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        add(layout.size() as isize);
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        add(-(layout.size() as isize));
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        add(new_size as isize - layout.size() as isize);
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static ALLOC: PerThread = PerThread;

fn live() -> isize {
    LIVE.with(|l| l.get())
}

/// A pingora client session to a raw loopback server that answers a request with
/// `response`, one write per part, 200 ms apart; the request (`GET /`, `Host` and
/// `headers`) already sent.
async fn session_answered_with(
    response: Vec<Vec<u8>>,
    headers: &[(&'static str, &'static str)],
) -> (HttpSession, std::thread::JoinHandle<()>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().expect("accept");
        if read_request_head(&mut conn).is_none() {
            return;
        }
        for (i, part) in response.iter().enumerate() {
            if i > 0 {
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
            let _ = conn.write_all(part);
        }
        let _ = conn.read(&mut [0u8; 4096]);
    });

    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let stream = pingora::protocols::l4::stream::Stream::from(tcp);
    let mut session = HttpSession::new(Box::new(stream));
    let mut req = RequestHeader::build("GET", b"/", None).expect("request");
    req.insert_header("Host", "localhost").expect("host");
    for (name, value) in headers {
        req.append_header(*name, *value).expect("header");
    }
    session
        .write_request_header(Box::new(req))
        .await
        .expect("write head");
    (session, server)
}

/// pingora reads a response head into a buffer of at least 4 KiB. A session that kept
/// that buffer for the response's life made every open event stream hold it (3.9 KiB of
/// an idle stream's 18.4). The session now keeps what it read in an exact-size copy.
#[tokio::test(flavor = "current_thread")]
async fn a_read_response_head_does_not_keep_the_4_kib_read_buffer() {
    // A small head (~100 bytes) and no body.
    let (mut session, server) = session_answered_with(vec![
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: 0\r\nX-Test: a\r\n\r\n".to_vec(),
    ], &[])
    .await;

    let before = live();
    session.read_response().await.expect("read head");
    let kept = live() - before;
    println!("kept after reading the head: {kept} bytes");
    assert_eq!(
        session.resp_header().map(|h| h.status.as_u16()),
        Some(200),
        "the head was read"
    );
    assert_eq!(session.get_header_bytes("x-test"), b"a");
    // What stays: the parsed head (its header map, names and values) and the raw bytes,
    // about 1 KiB; with the read buffer kept, 4 KiB more.
    assert!(
        kept < 3 * 1024,
        "the session keeps {kept} bytes after reading a ~100-byte head"
    );
    drop(session);
    let _ = server.join();
}

/// pingora reads a response body through a 64 KiB buffer the response holds to its end.
/// An event stream, read for hours an event at a time, asks for a smaller one
/// (`set_body_buffer_size`, the second change of the patch): the 64 KiB go, and the
/// bytes already read with the head (the stream's first event) stay readable.
#[tokio::test(flavor = "current_thread")]
async fn a_smaller_body_buffer_replaces_the_64_kib_one_and_keeps_what_it_holds() {
    // The head and the first event in one write, so that the event is read with it.
    let (mut session, server) = session_answered_with(
        vec![b"HTTP/1.1 200 OK\r\n\
        Content-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n\
        9\r\ndata: 1\n\n\r\n"
            .to_vec()],
        &[],
    )
    .await;
    session.read_response().await.expect("read head");
    assert!(!session.is_body_done(), "a chunked body follows");

    let before = live();
    session.set_body_buffer_size(5 * 1024);
    let freed = before - live();
    println!("freed by the smaller buffer: {freed} bytes");
    assert!(
        freed > 50 * 1024,
        "the 64 KiB buffer goes (freed {freed} bytes)"
    );
    assert_eq!(session.body_buffer_size(), 5 * 1024);
    let first = session.read_body_bytes().await.expect("read the event");
    assert_eq!(first.as_deref(), Some(&b"data: 1\n\n"[..]));
    drop(session);
    let _ = server.join();
}

/// A body buffer set smaller than a chunk head may be (pingora allows 8 KiB of chunk
/// extensions) must still read one whole. Reading the rest of a partial chunk head
/// took `size - head` bytes: none once the head filled the buffer, which pingora took
/// for the upstream closing (and an overflow had the head read brought more).
#[tokio::test(flavor = "current_thread")]
async fn a_partial_chunk_head_longer_than_the_buffer_is_read_whole() {
    // A long header, then 6 KB of a chunk head (a long extension, within the limit) in
    // the same write; the rest of the chunk follows in a second write.
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nX-Pad: {}\r\n\
         Transfer-Encoding: chunked\r\n\r\n9;ext={}",
        "p".repeat(5000),
        "e".repeat(6000)
    );
    let (mut session, server) = session_answered_with(
        vec![head.into_bytes(), b"\r\ndata: 1\n\n\r\n".to_vec()],
        &[],
    )
    .await;
    // The whole first write, so that the bytes after the head come with it.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    session.read_response().await.expect("read head");
    session.set_body_buffer_size(5 * 1024);
    // Reads that end inside the chunk head give no payload yet.
    let mut first = None;
    for _ in 0..1000 {
        match session.read_body_bytes().await.expect("read the event") {
            Some(b) if b.is_empty() => continue,
            b => {
                first = b;
                break;
            }
        }
    }
    assert_eq!(first.as_deref(), Some(&b"data: 1\n\n"[..]));
    drop(session);
    let _ = server.join();
}

/// An event stream spends most of its life waiting for its next event. Waiting through
/// `wait_body_readable` (the third change of the patch) lets the body buffer go when it
/// holds nothing unread, and returns at once when it does (two events read in one go),
/// so that no event waits on a socket that has nothing more to give.
#[tokio::test(flavor = "current_thread")]
async fn a_stream_waiting_for_its_next_event_holds_no_body_buffer() {
    use futures::FutureExt;
    let (mut session, server) = session_answered_with(
        vec![
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\
          Transfer-Encoding: chunked\r\n\r\n"
                .to_vec(),
            b"9\r\ndata: 1\n\n\r\n9\r\ndata: 2\n\n\r\n".to_vec(),
            b"9\r\ndata: 3\n\n\r\n".to_vec(),
        ],
        &[],
    )
    .await;
    session.read_response().await.expect("read head");
    session.set_body_buffer_size(5 * 1024);
    let bound = std::time::Duration::from_secs(10);
    let next = async |session: &mut HttpSession| {
        tokio::time::timeout(bound, session.wait_body_readable())
            .await
            .expect("the next event arrives")
            .expect("readable");
        session.read_body_bytes().await.expect("read an event")
    };

    // Events 1 and 2 come in one write: one read takes both.
    assert_eq!(
        next(&mut session).await.as_deref(),
        Some(&b"data: 1\n\n"[..])
    );
    assert!(
        session.wait_body_readable().now_or_never().is_some(),
        "event 2 is buffered already: the wait returns at once"
    );
    let second = session.read_body_bytes().await.expect("read event 2");
    assert_eq!(second.as_deref(), Some(&b"data: 2\n\n"[..]));

    // Nothing unread now: the wait holds no buffer (whether or not event 3 is in yet).
    let before = live();
    let _ = session.wait_body_readable().now_or_never();
    let freed = before - live();
    println!("freed for the wait: {freed} bytes");
    assert!(
        freed >= 5 * 1024,
        "the body buffer goes for the wait (freed {freed} bytes)"
    );
    assert_eq!(
        next(&mut session).await.as_deref(),
        Some(&b"data: 3\n\n"[..])
    );
    drop(session);
    let _ = server.join();
}

/// pingora's client session keeps the request head it wrote for the response's life.
/// An event stream's is a browser's whole request (cookies, user agent, languages, in a
/// header map and a map of the names' spelling); once the response head is in, the
/// session reads only the method, the version and `Connection`/`Upgrade` of it
/// (`shrink_request_header`, the fourth change of the patch).
#[tokio::test(flavor = "current_thread")]
async fn a_stream_keeps_only_what_it_still_reads_of_its_request_head() {
    let (mut session, server) = session_answered_with(
        vec![b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\
          Transfer-Encoding: chunked\r\n\r\n9\r\ndata: 1\n\n\r\n0\r\n\r\n"
            .to_vec()],
        &[
            ("Accept", "text/event-stream"),
            ("Accept-Language", "en-GB,en;q=0.9,fr;q=0.8,de;q=0.7"),
            ("Cache-Control", "no-cache"),
            ("Connection", "close"),
            (
                "Cookie",
                "session=0123456789abcdef0123456789abcdef; theme=dark",
            ),
            ("Referer", "https://example.test/dashboard/overview"),
            (
                "User-Agent",
                "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36",
            ),
            ("X-Forwarded-For", "192.0.2.10"),
            ("X-Forwarded-Proto", "https"),
        ],
    )
    .await;
    session.read_response().await.expect("read head");

    let before = live();
    session.shrink_request_header();
    let freed = before - live();
    println!("freed by shrinking the request head: {freed} bytes");
    assert!(
        freed > 1024,
        "the request head's maps and values go (freed {freed} bytes)"
    );
    // What the session still reads of it: the request said `Connection: close`, so the
    // connection must not be pooled once the body is read.
    let first = session.read_body_bytes().await.expect("read the event");
    assert_eq!(first.as_deref(), Some(&b"data: 1\n\n"[..]));
    while session
        .read_body_bytes()
        .await
        .expect("read to the end")
        .is_some()
    {}
    session.respect_keepalive();
    assert!(
        !session.will_keepalive(),
        "`Connection: close` of the request still counts"
    );
    drop(session);
    let _ = server.join();
}
