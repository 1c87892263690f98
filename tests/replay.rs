//! Replay: clients that come back with `Last-Event-ID` get exactly what they missed,
//! from backends that ignore it (Apache + mod_php scripts), through curl, the npm
//! `eventsource` package and headless Chromium.

mod common;

use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

fn consecutive(ids: &[u64]) -> bool {
    ids.windows(2).all(|w| w[1] == w[0] + 1)
}

#[test]
fn reconnect_with_last_event_id_gets_exactly_what_was_missed() {
    let php = Php::start();
    let gw = GatewayOptions::to(&php)
        .replay("linger = \"30s\"\n")
        .start();
    let url = gw.url("/broadcast.php?period=0.1");
    let first = sse(&url, &[], 1.0);
    let ids = first.ids();
    assert!(ids.len() >= 5 && consecutive(&ids), "{ids:?}");
    let k = *ids.last().expect("ids");
    // Away for a second: about ten events happen meanwhile.
    std::thread::sleep(Duration::from_millis(1000));
    let started = Instant::now();
    let lines = curl_lines(&[
        "-N",
        "--max-time",
        "1.5",
        "-H",
        &format!("Last-Event-ID: {k}"),
        &url,
    ]);
    let first_replayed = lines.iter().find(|l| l.line.starts_with("id: ")).map(|l| {
        l.at.duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
    });
    let text: String = lines.iter().map(|l| format!("{}\n", l.line)).collect();
    let ids: Vec<u64> = parse_stream(text.as_bytes())
        .0
        .iter()
        .filter_map(|e| e.0.parse().ok())
        .collect();
    assert_eq!(
        ids.first(),
        Some(&(k + 1)),
        "no gap, no duplicate at the join: {ids:?}"
    );
    assert!(consecutive(&ids), "{ids:?}");
    assert!(ids.len() >= 15, "replayed ~10 and then live: {ids:?}");
    if let Some(at) = first_replayed {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let since_start = started.elapsed().as_secs_f64() - (now.as_secs_f64() - at.as_secs_f64());
        println!(
            "reconnect to first replayed event: {:.1} ms (curl start included)",
            since_start * 1000.0
        );
    }
    // The same through the response header.
    let again = sse(
        &url,
        &[&format!("Last-Event-ID: {}", ids[ids.len() - 1])],
        0.5,
    );
    assert!(
        again.replay_header().starts_with("hit; events="),
        "{}",
        again.head
    );
}

#[test]
fn unknown_id_is_a_documented_miss_and_the_stream_goes_on() {
    let php = Php::start();
    let gw = GatewayOptions::to(&php)
        .replay("linger = \"0s\"\nmiss_event = true\n")
        .start();
    let seen = sse(
        &gw.url("/broadcast.php?period=0.1"),
        &["Last-Event-ID: no-such-id"],
        0.8,
    );
    assert_eq!(seen.replay_header(), "miss", "{}", seen.head);
    assert_eq!(seen.events[0].1, "ssegate-replay-miss");
    assert_eq!(seen.events[0].2, "no-such-id");
    assert!(seen.events.len() >= 3, "live events follow the miss");
}

#[test]
fn upstream_that_replays_too_does_not_cause_duplicates() {
    let php = Php::start();
    let gw = GatewayOptions::to(&php).start();
    // The backend itself replays from the id it is given, inclusive.
    let direct = sse(&php.url("/honors.php"), &["Last-Event-ID: 5"], 0.5);
    assert_eq!(direct.ids().first(), Some(&5));
    let seen = sse(&gw.url("/honors.php"), &["Last-Event-ID: 5"], 0.8);
    assert_eq!(seen.replay_header(), "miss");
    let ids = seen.ids();
    assert_eq!(ids.first(), Some(&6), "event 5 again: {ids:?}");
    assert!(consecutive(&ids), "{ids:?}");
}

#[test]
fn ids_persist_across_idless_events_and_an_empty_id_resets() {
    let php = Php::start();
    let gw = GatewayOptions::to(&php)
        .replay("linger = \"30s\"\n")
        .start();
    let url = gw.url("/mixed.php");
    let all = sse(&url, &[], 0.8);
    let got: Vec<(&str, &str)> = all
        .events
        .iter()
        .map(|e| (e.0.as_str(), e.2.as_str()))
        .collect();
    assert_eq!(
        got,
        [("1", "a"), ("1", "b"), ("", "c"), ("2", "d"), ("2", "e")]
    );
    // Resume points are the blocks that carried the id.
    let from1 = sse(&url, &["Last-Event-ID: 1"], 0.5);
    assert!(from1.replay_header().starts_with("hit"), "{}", from1.head);
    // (A browser keeps its last event ID "1" for "b"; this fresh parser starts empty.)
    let got: Vec<(&str, &str)> = from1
        .events
        .iter()
        .map(|e| (e.0.as_str(), e.2.as_str()))
        .collect();
    assert_eq!(got, [("", "b"), ("", "c"), ("2", "d"), ("2", "e")]);
    let from2 = sse(&url, &["Last-Event-ID: 2"], 0.5);
    let got: Vec<&str> = from2.events.iter().map(|e| e.2.as_str()).collect();
    assert_eq!(got, ["e"]);
}

#[test]
fn evicted_id_is_a_miss() {
    let php = Php::start();
    let gw = GatewayOptions::to(&php)
        .replay("linger = \"30s\"\nmax_events = 5\n")
        .start();
    let url = gw.url("/broadcast.php?period=0.1");
    let k = *sse(&url, &[], 0.6).ids().last().expect("events");
    std::thread::sleep(Duration::from_millis(1200));
    let seen = sse(&url, &[&format!("Last-Event-ID: {k}")], 0.5);
    assert_eq!(seen.replay_header(), "miss", "{}", seen.head);
}

#[test]
fn users_never_see_each_others_events_live_or_replayed() {
    let php = Php::start();
    let gw = GatewayOptions::to(&php)
        .replay("linger = \"30s\"\n")
        .admin()
        .start();
    let admin = gw.admin_port.expect("admin");
    let url = gw.url("/broadcast.php?period=0.1");
    let users_of = |s: &Seen| -> Vec<String> {
        s.events
            .iter()
            .filter_map(|e| serde_json::from_str::<serde_json::Value>(&e.2).ok())
            .map(|v| v["user"].as_str().unwrap_or("").to_owned())
            .collect()
    };
    let alice = sse(&url, &["Cookie: user=alice"], 0.8);
    assert!(users_of(&alice).iter().all(|u| u == "alice"));
    let k = *alice.ids().last().expect("events");
    // Her hub lingers and records what she misses.
    assert!(wait_for(
        || admin_metric(admin, "ssegate_hubs_lingering") == 1.0
    ));
    let stored = admin_metric(admin, "ssegate_replay_bytes");
    assert!(wait_for(
        || admin_metric(admin, "ssegate_replay_bytes") > stored
    ));
    // Bob presents Alice's last id: her recorded stream must not be replayed to him.
    let bob = sse(
        &url,
        &["Cookie: user=bob", &format!("Last-Event-ID: {k}")],
        0.8,
    );
    assert_eq!(bob.replay_header(), "miss", "{}", bob.head);
    let bob_users = users_of(&bob);
    assert!(
        !bob_users.is_empty() && bob_users.iter().all(|u| u == "bob"),
        "{bob_users:?}"
    );
    // Alice herself resumes from her own recording.
    let back = sse(
        &url,
        &["Cookie: user=alice", &format!("Last-Event-ID: {k}")],
        0.5,
    );
    assert!(back.replay_header().starts_with("hit"), "{}", back.head);
    assert!(users_of(&back).iter().all(|u| u == "alice"));
    assert_eq!(back.ids().first(), Some(&(k + 1)));
}

#[test]
fn large_events_stay_within_the_byte_bound() {
    let php = Php::start();
    let gw = GatewayOptions::to(&php)
        .replay("linger = \"30s\"\nmax_bytes = 1048576\n")
        .start();
    let url = gw.url("/big.php?size=100000&n=50");
    let all = sse(&url, &[], 2.0);
    assert_eq!(all.ids().len(), 50);
    // 1 MiB holds ten 100 kB events: 41..=50.
    let hit = sse(&url, &["Last-Event-ID: 41"], 0.5);
    assert_eq!(hit.replay_header(), "hit; events=9", "{}", hit.head);
    assert_eq!(hit.ids(), (42..=50).collect::<Vec<_>>());
    let miss = sse(&url, &["Last-Event-ID: 39"], 0.5);
    assert_eq!(miss.replay_header(), "miss");
}

/// `total_max_bytes` is a bound, not a hint: a store over the shared budget gives up its
/// blocks down to none (a later resume is a miss), even its newest one.
#[test]
fn the_total_replay_budget_holds_for_events_larger_than_it() {
    let php = Php::start();
    let gw = GatewayOptions::to(&php)
        .replay("linger = \"30s\"\ntotal_max_bytes = 65536\n")
        .admin()
        .start();
    let admin = gw.admin_port.expect("admin");
    let url = |i: u32| gw.url(&format!("/big.php?size=1000000&n=1&stream={i}"));
    for i in 0..11 {
        let s = sse(&url(i), &[], 0.8);
        assert_eq!(s.ids(), [1], "stream {i}");
    }
    // Eleven lingering hubs, each with a 1 MB event it may not keep.
    assert_eq!(admin_metric(admin, "ssegate_hubs"), 11.0);
    let held = admin_metric(admin, "ssegate_replay_bytes");
    assert!(held <= 65536.0, "{held} bytes held");
    let back = sse(&url(0), &["Last-Event-ID: 1"], 0.5);
    assert_eq!(back.replay_header(), "miss", "{}", back.head);
}

/// A TCP forwarder whose connections the test can cut, to drop a browser's stream
/// without the browser choosing to.
struct Cutter {
    port: u16,
    conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl Cutter {
    async fn start(target: u16) -> Cutter {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let c = conns.clone();
        tokio::spawn(async move {
            while let Ok((mut down, _)) = listener.accept().await {
                let task = tokio::spawn(async move {
                    if let Ok(mut up) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                    }
                });
                c.lock().expect("lock").push(task.abort_handle());
            }
        });
        Cutter { port, conns }
    }

    fn cut(&self) {
        for c in self.conns.lock().expect("lock").drain(..) {
            c.abort();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_eventsource_cut_off_resumes_without_gap_or_duplicate() {
    let php = Php::start();
    let gw = GatewayOptions::to(&php)
        .replay("linger = \"30s\"\n")
        .admin()
        .start();
    let admin = gw.admin_port.expect("admin");
    let cutter = Cutter::start(gw.port).await;
    let page = format!("http://127.0.0.1:{}/es_page.html?period=0.1", cutter.port);
    let browser = tokio::task::spawn_blocking(move || browser_stats(&page, 70, 40000));
    // Cut once the browser has had some events.
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let events =
            tokio::task::spawn_blocking(move || admin_metric(admin, "ssegate_events_total"));
        if events.await.expect("metrics") >= 10.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cutter.cut();
    let stats = browser.await.expect("browser task");
    let ids = json_ids(&stats);
    assert!(
        stats["errors"].as_u64().unwrap_or(0) >= 1,
        "the cut was not noticed: {stats}"
    );
    assert_eq!(stats["closedForGood"], false);
    assert!(ids.len() >= 70, "{stats}");
    assert!(
        consecutive(&ids),
        "gap or duplicate across the cut: {ids:?}"
    );
}

#[test]
fn a_client_that_cannot_keep_up_is_cut_after_a_bounded_lag_and_resumes() {
    use std::io::{Read, Write};
    let php = Php::start();
    // The store holds the whole feed (400 events of 100 kB), so the client's last id is
    // still there when it comes back.
    let gw = GatewayOptions::to(&php)
        .replay("linger = \"30s\"\nlag_blocks = 16\nmax_bytes = 67108864\n")
        .admin()
        .start();
    let admin = gw.admin_port.expect("admin");
    let mut s = std::net::TcpStream::connect(("127.0.0.1", gw.port)).expect("connect");
    // HTTP/1.0: the body is the bare stream (no chunk framing) up to the close. The
    // `Host` is curl's, so the resume below asks for the same stream.
    let req = format!(
        "GET /big.php?size=100000&n=400&pause=300 HTTP/1.0\r\nHost: 127.0.0.1:{}\r\nAccept: text/event-stream\r\n\r\n",
        gw.port
    );
    s.write_all(req.as_bytes()).expect("request");
    // Read the head and the first whole event (the backend pauses after it), so the
    // client has an id to come back with: without the pause, on a busy machine the
    // pump could read 16 blocks before the client's writer first ran, and the client
    // was cut before its first event.
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut got = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    while !first_event_in(&got) {
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&chunk[..n]),
        }
    }
    // Do not read while 40 MB go by (the hub has stored them all): the socket fills up
    // and the client falls behind. It is cut when its writer next takes a block.
    assert!(
        wait_for(|| admin_metric(admin, "ssegate_replay_bytes") >= 40_000_000.0),
        "the hub stored {} bytes",
        admin_metric(admin, "ssegate_replay_bytes")
    );
    let _ = s.read_to_end(&mut got);
    let body = got
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(&got[..0], |i| &got[i + 4..]);
    let (events, _) = parse_stream(body);
    assert!(
        !events.is_empty() && events.len() < 400,
        "a stalled client got {} whole events; log:\n{}",
        events.len(),
        gw.log()
    );
    assert!(
        wait_for(|| gw.log().contains("fell behind")),
        "no lag disconnect in the log"
    );
    // It comes back with the id of its last whole event and resumes from the store.
    let last: u64 = events.last().and_then(|e| e.0.parse().ok()).expect("an id");
    let back = sse(
        &gw.url("/big.php?size=100000&n=400&pause=300"),
        &[&format!("Last-Event-ID: {last}")],
        2.0,
    );
    assert!(back.replay_header().starts_with("hit"), "{}", back.head);
    assert_eq!(back.ids().first(), Some(&(last + 1)), "{}", back.head);
}

/// Whether `got` (a response read so far) holds its head and a whole event.
fn first_event_in(got: &[u8]) -> bool {
    got.windows(4)
        .position(|w| w == b"\r\n\r\n")
        .is_some_and(|i| got[i + 4..].windows(2).any(|w| w == b"\n\n"))
}

/// Without a hub (replay off) nothing else cuts a client that stops reading: the write
/// timeout does, and the upstream it held is closed.
#[test]
fn a_client_that_never_reads_is_disconnected_and_its_stream_freed() {
    use std::io::Write;
    let php = Php::start();
    let gw = GatewayOptions::to(&php)
        .replay("enabled = false\n")
        .extra("[sse]\nwrite_timeout = \"2s\"\n")
        .start();
    let ended = php.file("never_read.log");
    let mut s = std::net::TcpStream::connect(("127.0.0.1", gw.port)).expect("connect");
    let req = format!(
        "GET /big.php?size=100000&n=400&log={} HTTP/1.1\r\nHost: t\r\nAccept: text/event-stream\r\n\r\n",
        ended.display()
    );
    s.write_all(req.as_bytes()).expect("request");
    // Never read. The gateway's writes stall once the socket buffers are full; after
    // the write timeout it gives up on this client and the stream's access line shows it.
    assert!(
        wait_for(|| gw.log().contains("kind=\"stream\"")),
        "the stalled stream did not end within 5 s:\n{}",
        gw.log()
    );
    let log = gw.log();
    let line = log
        .lines()
        .find(|l| l.contains("kind=\"stream\""))
        .unwrap_or("");
    assert!(line.contains("WriteTimedout"), "{line}");
    assert!(
        wait_for(|| ended.exists()),
        "the backend never saw its client go"
    );
    drop(s);
}

/// A lingering hub holds an upstream connection: it is charged to the client that
/// opened it, so one client touching many URLs cannot pin the backend's workers for the
/// linger window; its oldest lingering hubs go first, other clients' stay.
#[test]
fn lingering_hubs_are_charged_to_the_client_that_left_them() {
    let php = Php::start();
    let gw = GatewayOptions::to(&php)
        .replay("linger = \"30s\"\nmax_hubs_per_client = 3\n")
        .limits("request_rate = 0\nstream_connect_rate = 0\nmax_streams_per_client = 2\n")
        .admin()
        .start();
    let admin = gw.admin_port.expect("admin");
    // Another client (another loopback address) leaves one stream lingering first.
    let other_url = gw.url("/broadcast.php?period=0.1&who=other");
    let other = |extra: &[&str]| {
        let mut args = vec![
            "-s",
            "-i",
            "-N",
            "--interface",
            "127.0.0.2",
            "--max-time",
            "0.6",
        ];
        for h in extra {
            args.extend(["-H", h]);
        }
        args.push(&other_url);
        let out = Command::new("curl").args(&args).output().expect("curl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        Seen {
            head: head.to_ascii_lowercase(),
            events: parse_stream(body.as_bytes()).0,
        }
    };
    let first = other(&[]);
    let k = *first.ids().last().expect("events");
    // This client opens and drops streams to ten URLs.
    for i in 0..10 {
        let s = sse(
            &gw.url(&format!("/broadcast.php?period=0.1&url={i}")),
            &[],
            0.4,
        );
        assert!(!s.events.is_empty(), "stream {i}");
    }
    assert!(
        wait_for(|| admin_metric(admin, "ssegate_hubs") == 4.0),
        "{} hubs, {} lingering, {} evicted\n{}",
        admin_metric(admin, "ssegate_hubs"),
        admin_metric(admin, "ssegate_hubs_lingering"),
        admin_metric(admin, "ssegate_hubs_evicted_total"),
        gw.log()
    );
    assert_eq!(admin_metric(admin, "ssegate_hubs_evicted_total"), 7.0);
    // The other client's stream kept lingering and recording.
    let back = other(&[&format!("Last-Event-ID: {k}")]);
    assert!(back.replay_header().starts_with("hit"), "{}", back.head);
}

#[test]
fn linger_keeps_a_busy_upstream_for_its_window_then_closes_it() {
    let php = Php::start();
    let gw = GatewayOptions::to(&php)
        .replay("linger = \"1500ms\"\n")
        .start();
    let log = php.file("ended.log");
    // The upstream writes every 0.1 s, far more often than the linger window.
    let url = gw.url(&format!("/ticks.php?interval=0.1&log={}", log.display()));
    let seen = sse(&url, &[], 0.5);
    assert!(!seen.events.is_empty());
    let left = Instant::now();
    assert!(
        wait_for(|| log.exists()),
        "the upstream was still open 5 s after the client left (linger 1.5 s)"
    );
    let after = left.elapsed();
    assert!(
        after >= Duration::from_millis(1200),
        "closed after {after:?}, before the linger window"
    );
}

#[test]
fn an_id_with_a_line_break_is_ignored_not_echoed() {
    let php = Php::start();
    let gw = GatewayOptions::to(&php)
        .replay("linger = \"0s\"\nmiss_event = true\nlast_event_id_param = \"lastEventId\"\n")
        .start();
    let seen = sse(
        &gw.url("/broadcast.php?period=0.1&lastEventId=x%0Aevent%3A%20evil"),
        &[],
        0.5,
    );
    assert_eq!(seen.replay_header(), "fresh", "{}", seen.head);
    assert!(
        seen.events.iter().all(|e| e.1 == "tick"),
        "{:?}",
        seen.events
    );
    // A plain id in the parameter works like the header.
    let seen = sse(
        &gw.url("/broadcast.php?period=0.1&lastEventId=42"),
        &[],
        0.5,
    );
    assert_eq!(seen.replay_header(), "miss");
    assert_eq!(seen.events[0].1, "ssegate-replay-miss");
    assert_eq!(seen.events[0].2, "42");
}

#[test]
fn past_max_hubs_new_streams_are_relayed_without_replay() {
    let php = Php::start();
    let gw = GatewayOptions::to(&php)
        .replay("linger = \"0s\"\nmax_hubs = 1\n")
        .admin()
        .start();
    let admin = gw.admin_port.expect("admin");
    let url = gw.url("/broadcast.php?period=0.1");
    let mut first = curl_stream(&url, 5, &["-H", "Cookie: user=a"]);
    assert!(wait_for(|| admin_metric(admin, "ssegate_hubs") == 1.0));
    let second = sse(&url, &["Cookie: user=b"], 0.6);
    assert_eq!(second.replay_header(), "", "{}", second.head);
    assert!(second.events.len() >= 3, "the stream still flows");
    let _ = first.kill();
    let _ = first.wait();
}

#[test]
fn a_replay_that_starts_with_a_bom_block_cannot_set_the_clients_id() {
    let php = Php::start();
    let gw = GatewayOptions::to(&php)
        .replay("linger = \"30s\"\n")
        .start();
    let url = gw.url("/bom_mid.php");
    let first = sse(&url, &[], 0.5);
    let ids: Vec<&str> = first.events.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(ids, ["1", "1"], "{:?}", first.events);
    let resumed = sse(&url, &["Last-Event-ID: 1"], 0.5);
    assert_eq!(resumed.replay_header(), "hit; events=1");
    let got: Vec<(&str, &str)> = resumed
        .events
        .iter()
        .map(|e| (e.0.as_str(), e.2.as_str()))
        .collect();
    // A fresh client had no id yet: it must still have none, not "evil".
    assert_eq!(got, [("", "b")], "the replayed block set an id");
}
