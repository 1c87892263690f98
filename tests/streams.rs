//! Event streams through the gateway: heartbeats, framing, disconnects, shutdown.
//! Real PHP backend, real gateway binary, curl as the client.

mod common;

use std::time::{Duration, Instant};

use common::*;

fn body_of(args: &[&str]) -> Vec<u8> {
    let (status, out) = curl(&[&["-N"], args].concat());
    assert!(status.success(), "curl {args:?} failed: {status}");
    out
}

#[test]
fn heartbeats_fill_upstream_silence() {
    // Through a hub (the default) and relayed as it comes (replay off).
    for replay in ["linger = \"0s\"\n", "enabled = false\n"] {
        heartbeats_fill_silence_with(replay);
    }
}

fn heartbeats_fill_silence_with(replay: &str) {
    let php = Php::start();
    let gw = GatewayOptions::to(&php)
        .replay(replay)
        .extra("[sse]\nheartbeat_interval = \"400ms\"\nheartbeat_comment = \"hb\"\n")
        .start();
    let start = Instant::now();
    let lines = curl_lines(&[&gw.url("/quiet.php?quiet=2.5")]);
    let took = start.elapsed();
    let hb: Vec<_> = lines.iter().filter(|l| l.line == ":hb").collect();
    // 2.5 s of silence at 400 ms: about 6; allow a slow machine plenty of room.
    assert!(hb.len() >= 3 && hb.len() <= 8, "heartbeats: {}", hb.len());
    assert!(took < Duration::from_secs(10));
    let text: String = lines.iter().map(|l| format!("{}\n", l.line)).collect();
    let (events, _) = parse_stream(text.as_bytes());
    assert_eq!(
        events,
        vec![
            ("1".into(), "message".into(), "first".into(), None),
            ("2".into(), "message".into(), "second".into(), None)
        ]
    );
    // Heartbeats come only between events: the stream is events and ":hb\n\n" blocks.
    assert!(text.starts_with("id: 1\ndata: first\n\n"), "{text}");
    assert!(text.ends_with("id: 2\ndata: second\n\n"), "{text}");
    let middle =
        &text["id: 1\ndata: first\n\n".len()..text.len() - "id: 2\ndata: second\n\n".len()];
    assert_eq!(middle, ":hb\n\n".repeat(hb.len()), "{text}");
}

/// A heartbeat fills silence only: while events come faster than the interval (ten
/// times faster here), none is written.
#[test]
fn no_heartbeats_while_events_flow() {
    for replay in ["linger = \"0s\"\n", "enabled = false\n"] {
        let php = Php::start();
        let gw = GatewayOptions::to(&php)
            .replay(replay)
            .extra("[sse]\nheartbeat_interval = \"1s\"\nheartbeat_comment = \"hb\"\n")
            .start();
        let lines = curl_lines(&["-N", &gw.url("/legacy.php?n=25&interval=0.1")]);
        let text: String = lines.iter().map(|l| format!("{}\n", l.line)).collect();
        assert_eq!(parse_stream(text.as_bytes()).0.len(), 25, "{text}");
        assert!(
            !text.contains(":hb"),
            "{replay}: a heartbeat between events:\n{text}"
        );
    }
}

#[test]
fn no_heartbeat_inside_an_unfinished_event() {
    let php = Php::start();
    // Without replay the relay forwards upstream bytes as they come, so it must wait
    // for the upstream to finish the event before it may write a heartbeat.
    let gw = GatewayOptions::to(&php)
        .replay("enabled = false\n")
        .extra("[sse]\nheartbeat_interval = \"200ms\"\n")
        .start();
    let out = body_of(&[&gw.url("/quiet.php?quiet=1.5&partial=1")]);
    let text = String::from_utf8(out).expect("utf8");
    assert_eq!(
        text, "id: 1\ndata: first\n\nid: 2\ndata: half and half\n\n",
        "{text}"
    );
}

#[test]
fn hub_holds_a_partial_event_and_keeps_the_client_alive_meanwhile() {
    let php = Php::start();
    // With replay (the default) a hub hands out whole blocks only, so the client is
    // always between events and heartbeats continue while the upstream pauses inside one.
    let gw = GatewayOptions::to(&php)
        .extra("[sse]\nheartbeat_interval = \"200ms\"\n")
        .start();
    let out = body_of(&[&gw.url("/quiet.php?quiet=1.5&partial=1")]);
    let text = String::from_utf8(out).expect("utf8");
    let hb = text.matches(":heartbeat\n\n").count();
    assert!(hb >= 3, "{text}");
    let expected = format!(
        "id: 1\ndata: first\n\n{}id: 2\ndata: half and half\n\n",
        ":heartbeat\n\n".repeat(hb)
    );
    assert_eq!(text, expected);
}

#[test]
fn framing_survives_every_split_offset() {
    let php = Php::start();
    // A heartbeat every 10 ms: any gap in the upstream's writes gets one if the
    // gateway thinks it is at a boundary, so a wrong boundary would corrupt events.
    let gw = GatewayOptions::to(&php)
        .extra("[sse]\nheartbeat_interval = \"10ms\"\n")
        .start();
    let direct = body_of(&[&php.url("/split.php?at=0&pause=0")]);
    let expected = parse_stream(&direct);
    assert_eq!(
        expected.0.len(),
        5,
        "fixture parses to 5 events: {expected:?}"
    );
    let len = direct.len();
    let offsets: Vec<usize> = (0..=len).collect();
    let mut heartbeats_seen = 0;
    std::thread::scope(|s| {
        let handles: Vec<_> = offsets
            .chunks(offsets.len().div_ceil(4))
            .map(|chunk| {
                let gw = &gw;
                let expected = &expected;
                s.spawn(move || {
                    let mut hb = 0;
                    for &at in chunk {
                        let out = body_of(&[&gw.url(&format!("/split.php?at={at}&pause=0.03"))]);
                        hb += out.windows(11).filter(|w| w == b":heartbeat\n").count();
                        assert_eq!(
                            &parse_stream(&out),
                            expected,
                            "split at byte {at}: {:?}",
                            String::from_utf8_lossy(&out)
                        );
                    }
                    hb
                })
            })
            .collect();
        for h in handles {
            heartbeats_seen += h.join().expect("split worker");
        }
    });
    // Heartbeats did get written in the pauses that fell between events.
    assert!(heartbeats_seen > 0, "no heartbeat was ever written");
}

#[test]
fn post_stream_without_accept_header_is_a_stream() {
    let php = Php::start();
    let gw = GatewayOptions::to(&php).start();
    let out = body_of(&[
        "-i",
        "-X",
        "POST",
        "--data",
        "one two three",
        &gw.url("/post_stream.php"),
    ]);
    let text = String::from_utf8(out).expect("utf8");
    let (head, body) = text.split_once("\r\n\r\n").expect("header and body");
    let head = head.to_ascii_lowercase();
    assert!(head.contains("cache-control: no-cache"), "{head}");
    assert!(head.contains("x-accel-buffering: no"), "{head}");
    assert!(!head.contains("content-length"), "{head}");
    let (events, _) = parse_stream(body.as_bytes());
    let data: Vec<_> = events.iter().map(|e| e.2.as_str()).collect();
    assert_eq!(
        data,
        [
            r#"{"token":"one"}"#,
            r#"{"token":"two"}"#,
            r#"{"token":"three"}"#,
            "[DONE]"
        ]
    );
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64()
}

/// When `ticks.php` noticed its client had gone (the time it wrote to `log`), waiting
/// up to `limit` for it.
fn noticed_gone(log: &std::path::Path, limit: Duration) -> Option<f64> {
    let deadline = Instant::now() + limit;
    loop {
        // The file may be seen before PHP has written its line: read it again then.
        if let Some(t) = std::fs::read_to_string(log)
            .ok()
            .and_then(|s| s.trim().parse::<f64>().ok())
        {
            return Some(t);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_streams_open(admin: u16, n: f64) {
    assert!(
        wait_for(|| admin_metric(admin, "ssegate_streams_open") == n),
        "{} streams open, not {n}",
        admin_metric(admin, "ssegate_streams_open")
    );
}

#[test]
fn client_disconnect_closes_the_upstream() {
    // Through a hub, and relayed byte for byte (replay off): either way the stream runs
    // outside pingora's request task, watching the client's session for its close.
    for (r, replay) in ["linger = \"0s\"\n", "enabled = false\n"]
        .iter()
        .enumerate()
    {
        client_disconnect_closes_the_upstream_with(r, replay);
    }
}

fn client_disconnect_closes_the_upstream_with(r: usize, replay: &str) {
    let php = Php::start();
    let gw = GatewayOptions::to(&php).replay(replay).admin().start();
    let admin = gw.admin_port.expect("admin");
    // Without and with `Accept: text/event-stream`.
    for (i, extra) in [&[][..], &["-H", "Accept: text/event-stream"][..]]
        .into_iter()
        .enumerate()
    {
        let log = php.file(&format!("abort{r}-{i}.log"));
        let url = gw.url(&format!("/ticks.php?interval=0.1&log={}", log.display()));
        let mut child = curl_stream(&url, 30, extra);
        wait_streams_open(admin, 1.0);
        let _ = child.kill();
        let _ = child.wait();
        let closed_at = unix_now();
        // PHP notices a closed connection on its second write after the close (~0.2 s).
        let noticed = noticed_gone(&log, Duration::from_secs(5))
            .unwrap_or_else(|| panic!("the backend never saw the client leave ({extra:?})"));
        let delay = noticed - closed_at;
        assert!(
            delay < 1.0,
            "upstream noticed {delay:.3}s after the client left ({extra:?})"
        );
        wait_streams_open(admin, 0.0);
    }
}

/// A client that leaves a quiet stream is noticed at once, not at the next heartbeat
/// (15 s by default): the stream, running outside pingora's request task, watches the
/// client's connection while it waits for the upstream. Through a hub and relayed byte
/// for byte.
#[test]
fn a_client_leaving_a_quiet_stream_is_noticed_at_once() {
    for replay in ["linger = \"0s\"\n", "enabled = false\n"] {
        let php = Php::start();
        let gw = GatewayOptions::to(&php).replay(replay).admin().start();
        let admin = gw.admin_port.expect("admin");
        let url = gw.url("/quiet.php?quiet=30");
        let mut child = curl_stream(&url, 40, &["-H", "Accept: text/event-stream"]);
        wait_streams_open(admin, 1.0);
        let _ = child.kill();
        let _ = child.wait();
        // `wait_for` gives it 5 s, a third of the heartbeat interval.
        wait_streams_open(admin, 0.0);
    }
}

/// Over HTTP/2 a client leaves one stream with RST_STREAM and keeps its connection:
/// that stream's upstream is closed all the same, and the connection still serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_stream_reset_closes_its_upstream() {
    let php = Php::start();
    let gw = GatewayOptions::to(&php).start();
    let client = h2c_connect(gw.port).await;
    for (i, accept) in ["*/*", "text/event-stream"].into_iter().enumerate() {
        let log = php.file(&format!("reset{i}.log"));
        let url = gw.url(&format!("/ticks.php?interval=0.1&log={}", log.display()));
        let req = http::Request::get(url)
            .header("accept", accept)
            .body(())
            .expect("request");
        let mut client = client.clone().ready().await.expect("h2 ready");
        let (resp, _) = client.send_request(req, true).expect("send");
        let mut body = resp.await.expect("response").into_body();
        let first = body.data().await.expect("a first event").expect("data");
        assert!(first.starts_with(b"id: 1\n"), "{first:?}");
        drop(body); // h2 sends RST_STREAM(CANCEL) for a body dropped before its end
        let closed_at = unix_now();
        let noticed =
            tokio::task::spawn_blocking(move || noticed_gone(&log, Duration::from_secs(5)))
                .await
                .expect("join")
                .unwrap_or_else(|| panic!("the backend never saw the reset ({accept})"));
        let delay = noticed - closed_at;
        assert!(
            delay < 1.0,
            "upstream noticed {delay:.3}s after the reset ({accept})"
        );
    }
    // The connection itself was never closed.
    let req = http::Request::get(gw.url("/echo.php"))
        .body(())
        .expect("request");
    let mut client = client.ready().await.expect("h2 ready");
    let (resp, _) = client.send_request(req, true).expect("send");
    assert_eq!(resp.await.expect("response").status(), 200);
}

/// With the default linger (30 s), a GET stream another client could resume keeps its
/// upstream open and recording for the window after its client leaves, then closes it.
#[test]
fn with_the_default_linger_the_upstream_closes_when_the_window_ends() {
    let php = Php::start();
    let gw = GatewayOptions::to(&php).replay("").admin().start();
    let admin = gw.admin_port.expect("admin");
    let log = php.file("lingered.log");
    let url = gw.url(&format!("/ticks.php?interval=0.2&log={}", log.display()));
    let mut child = curl_stream(&url, 60, &["-H", "Accept: text/event-stream"]);
    wait_streams_open(admin, 1.0);
    let _ = child.kill();
    let _ = child.wait();
    let left = unix_now();
    assert!(
        wait_for(|| admin_metric(admin, "ssegate_hubs_lingering") == 1.0),
        "the hub does not linger"
    );
    assert_eq!(
        noticed_gone(&log, Duration::from_secs(3)),
        None,
        "closed at once"
    );
    let noticed = noticed_gone(&log, Duration::from_secs(40)).expect("never closed");
    let after = noticed - left;
    assert!(
        (29.0..36.0).contains(&after),
        "closed {after:.1} s after the client left"
    );
}

#[test]
fn upstream_end_ends_the_stream() {
    let php = Php::start();
    let gw = GatewayOptions::to(&php).start();
    let out = body_of(&["--max-time", "10", &gw.url("/legacy.php?n=3&interval=0.05")]);
    let (events, last) = parse_stream(&out);
    assert_eq!(events.len(), 3);
    assert_eq!(last, "3");
}

/// A stream that ends (the backend's script finished) leaves its HTTP/1.1 connection to
/// the client's next request, as any response does, though the stream was served outside
/// pingora's request loop: curl asks for the stream, then for a page and another stream,
/// all on its first connection.
#[test]
fn the_connection_is_kept_alive_after_a_stream_ends() {
    let php = Php::start();
    let gw = GatewayOptions::to(&php).start();
    let stream = gw.url("/legacy.php?n=3&interval=0.05");
    let page = gw.url("/es_page.html");
    let (status, out) = curl(&[
        "-sS",
        "-N",
        "--max-time",
        "10",
        "-H",
        "Accept: text/event-stream",
        "-w",
        "\nconnects=%{num_connects} status=%{http_code}\n",
        &stream,
        &page,
        &stream,
    ]);
    let out = String::from_utf8_lossy(&out);
    assert!(status.success(), "{out}");
    let connects: Vec<&str> = out
        .lines()
        .filter_map(|l| l.strip_prefix("connects="))
        .collect();
    assert_eq!(
        connects,
        ["1 status=200", "0 status=200", "0 status=200"],
        "{out}"
    );
    assert_eq!(out.matches("data: ").count(), 6, "{out}");
}

#[test]
fn sigterm_ends_streams_with_retry_and_exits_promptly() {
    let php = Php::start();
    let mut gw = GatewayOptions::to(&php)
        .extra("[sse]\nshutdown_retry = \"750ms\"\n")
        .admin()
        .start();
    let admin = gw.admin_port.expect("admin");
    let clients: Vec<_> = (0..3)
        .map(|_| curl_stream(&gw.url("/broadcast.php?period=0.2"), 20, &[]))
        .collect();
    wait_streams_open(admin, 3.0);
    assert!(wait_for(
        || admin_metric(admin, "ssegate_events_total") >= 3.0
    ));
    gw.signal("TERM");
    // The streams end at their next boundary (events every 0.2 s) and the clients go:
    // nothing is left to wait for.
    let exited = gw.wait_exit(Duration::from_secs(3));
    assert!(exited.is_some(), "gateway still running 3 s after SIGTERM");
    for c in clients {
        let out = read_all_with_limit(c, Duration::from_secs(10));
        let text = String::from_utf8_lossy(&out);
        assert!(
            text.ends_with("retry: 750\n\n"),
            "stream did not end with a retry hint: {text}"
        );
        let (events, _) = parse_stream(&out);
        assert!(!events.is_empty(), "{text}");
        // Every event arrived whole: the hint came at a boundary.
        for e in &events {
            assert!(e.2.starts_with("{\"k\":") && e.2.ends_with('}'), "{e:?}");
        }
    }
}

#[test]
fn sigterm_mid_event_waits_for_the_event_then_gives_up_cleanly() {
    let php = Php::start();
    let mut gw = GatewayOptions::to(&php)
        .replay("enabled = false\n")
        .admin()
        .start();
    let admin = gw.admin_port.expect("admin");
    let client = curl_stream(&gw.url("/quiet.php?partial=1&quiet=20"), 30, &[]);
    // The client holds half an event: "id: 1\ndata: first\n\nid: 2\ndata: half".
    assert!(
        wait_for(|| admin_metric(admin, "ssegate_stream_bytes_total") >= 35.0),
        "{}",
        String::from_utf8_lossy(&curl(&[&format!("http://127.0.0.1:{admin}/metrics")]).1)
    );
    gw.signal("TERM");
    // Without replay the client already has half an event: the gateway waits a bounded
    // time for the rest, then ends without appending to the unfinished line.
    let exited = gw.wait_exit(Duration::from_secs(12));
    assert!(exited.is_some(), "gateway still running 12 s after SIGTERM");
    let out = read_all_with_limit(client, Duration::from_secs(5));
    assert_eq!(
        String::from_utf8_lossy(&out),
        "id: 1\ndata: first\n\nid: 2\ndata: half"
    );
}

#[test]
fn sigterm_while_the_upstream_is_mid_event_ends_a_hub_stream_at_once() {
    let php = Php::start();
    let mut gw = GatewayOptions::to(&php).admin().start();
    let admin = gw.admin_port.expect("admin");
    let client = curl_stream(&gw.url("/quiet.php?partial=1&quiet=20"), 30, &[]);
    // The first event is out; the upstream writes the half right after it (if the
    // signal came between the two, the client would see the same).
    assert!(wait_for(
        || admin_metric(admin, "ssegate_events_total") >= 1.0
    ));
    gw.signal("TERM");
    let exited = gw.wait_exit(Duration::from_secs(5));
    assert!(exited.is_some(), "gateway still running 5 s after SIGTERM");
    let out = read_all_with_limit(client, Duration::from_secs(5));
    assert_eq!(
        String::from_utf8_lossy(&out),
        "id: 1\ndata: first\n\n: ssegate shutting down\nretry: 1000\n\n"
    );
}

#[test]
fn gateway_sets_and_overrides_the_reconnection_delay() {
    let php = Php::start();
    let gw = GatewayOptions::to(&php)
        .limits("request_rate = 0\nstream_connect_rate = 0\nretry_jitter = 0\n")
        .extra("[sse]\nretry = \"2s\"\n")
        .start();
    let out = body_of(&[&gw.url("/split.php?at=0&pause=0")]);
    let text = String::from_utf8_lossy(&out);
    // Set at the start (the hub drops the upstream's BOM and its comments between
    // events)...
    assert!(text.starts_with("retry: 2000\n\nid: a1\r\n"), "{text:?}");
    // ...and restated right after the upstream's own `retry: 2500` event.
    assert!(
        text.ends_with("retry: 2500\ndata:  two spaces\n\nretry: 2000\n\n"),
        "{text:?}"
    );
    // Events are untouched.
    let direct = body_of(&[&php.url("/split.php?at=0&pause=0")]);
    assert_eq!(parse_stream(&out).0, parse_stream(&direct).0);
}
