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

#[test]
fn client_disconnect_closes_the_upstream() {
    let php = Php::start();
    let gw = GatewayOptions::to(&php).start();
    // Without and with `Accept: text/event-stream` (pingora's path and the stream client).
    for (i, extra) in [&[][..], &["-H", "Accept: text/event-stream"][..]]
        .into_iter()
        .enumerate()
    {
        let log = php.file(&format!("abort{i}.log"));
        let url = gw.url(&format!("/ticks.php?interval=0.1&log={}", log.display()));
        let mut child = curl_stream(&url, 30, extra);
        std::thread::sleep(Duration::from_millis(800));
        let _ = child.kill();
        let _ = child.wait();
        let closed_at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs_f64();
        // PHP notices a closed connection on its second write after the close (~0.2 s).
        let deadline = Instant::now() + Duration::from_secs(5);
        let noticed = loop {
            // The file may be seen before PHP has written its line: read it again then.
            if let Some(t) = std::fs::read_to_string(&log)
                .ok()
                .and_then(|s| s.trim().parse::<f64>().ok())
            {
                break t;
            }
            assert!(
                Instant::now() < deadline,
                "the backend never saw the client leave ({extra:?})"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let delay = noticed - closed_at;
        assert!(
            delay < 1.0,
            "upstream noticed {delay:.3}s after the client left ({extra:?})"
        );
    }
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

#[test]
fn sigterm_ends_streams_with_retry_and_exits_promptly() {
    let php = Php::start();
    let mut gw = GatewayOptions::to(&php)
        .extra("[sse]\nshutdown_retry = \"750ms\"\n")
        .start();
    let clients: Vec<_> = (0..3)
        .map(|_| curl_stream(&gw.url("/broadcast.php?period=0.2"), 20, &[]))
        .collect();
    std::thread::sleep(Duration::from_millis(1200));
    gw.signal("TERM");
    let exited = gw.wait_exit(Duration::from_secs(8));
    assert!(exited.is_some(), "gateway still running 8 s after SIGTERM");
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
    let mut gw = GatewayOptions::to(&php).replay("enabled = false\n").start();
    let client = curl_stream(&gw.url("/quiet.php?partial=1&quiet=20"), 30, &[]);
    std::thread::sleep(Duration::from_millis(800));
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
    let mut gw = GatewayOptions::to(&php).start();
    let client = curl_stream(&gw.url("/quiet.php?partial=1&quiet=20"), 30, &[]);
    std::thread::sleep(Duration::from_millis(800));
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
