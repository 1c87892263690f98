//! Rate limits that streams survive: request bursts, stream caps, reconnect damping,
//! trusted forwarding headers, bounded limiter memory, and a real browser EventSource
//! that is refused and comes back by itself.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const SSE: &str = "Accept: text/event-stream";

/// Status codes of `urls` fetched one after another by ONE curl process (so the burst
/// is as fast as the machine allows).
fn statuses(extra: &[&str], urls: &[String]) -> Vec<u16> {
    let mut args: Vec<String> = vec!["-s".into(), "-w".into(), "%{http_code}\\n".into()];
    args.extend(extra.iter().map(|s| s.to_string()));
    for u in urls {
        args.push("-o".into());
        args.push("/dev/null".into());
        args.push(u.clone());
    }
    let out = Command::new("curl").args(&args).output().expect("curl");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

fn head_and_body(args: &[&str]) -> (String, String) {
    let (_, out) = curl(&[&["-i", "-N", "--max-time", "10"], args].concat());
    let text = String::from_utf8_lossy(&out).into_owned();
    let (h, b) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (h.to_ascii_lowercase(), b.to_owned())
}

fn spawn_stream(url: &str) -> std::process::Child {
    curl_stream(url, 30, &["-H", SSE])
}

/// Waits until the gateway reports `n` event streams open.
fn wait_streams(gw: &Gateway, n: f64) {
    let admin = gw.admin_port.expect("admin");
    assert!(
        wait_for(|| admin_metric(admin, "ssegate_streams_open") == n),
        "{} streams open, not {n}",
        admin_metric(admin, "ssegate_streams_open")
    );
}

#[test]
fn request_burst_gets_429_while_an_open_stream_keeps_flowing() {
    let php = Php::start();
    let gw = GatewayOptions::to(&php)
        .limits("request_rate = 5\nrequest_burst = 10\nstream_connect_rate = 0\n")
        .admin()
        .start();
    let stream = spawn_stream(&gw.url("/legacy.php?n=30&interval=0.1"));
    wait_streams(&gw, 1.0);
    let urls: Vec<String> = (0..200)
        .map(|i| gw.url(&format!("/echo.php?i={i}")))
        .collect();
    let started = Instant::now();
    let codes = statuses(&[], &urls);
    let took = started.elapsed().as_secs_f64();
    assert_eq!(codes.len(), 200);
    let ok = codes.iter().filter(|&&c| c == 200).count();
    let limited = codes.iter().filter(|&&c| c == 429).count();
    assert_eq!(ok + limited, 200, "{codes:?}");
    // The burst less the stream's own request, plus what refilled at 5/s meanwhile.
    let most = 10 + (5.0 * took).ceil() as usize;
    assert!(
        (9..=most).contains(&ok),
        "{ok} passed of 200 in {took:.2} s with burst 10 at 5/s"
    );
    // A refusal as a client sees it. The bucket refills one request every 0.2 s, and
    // on a loaded machine a curl may take that long to start: the next few requests
    // (each taking what refilled) meet a 429 soon.
    let (head, body) = (0..20)
        .map(|_| head_and_body(&[&gw.url("/echo.php")]))
        .find(|(head, _)| !head.starts_with("http/1.1 200"))
        .unwrap_or_default();
    assert!(head.starts_with("http/1.1 429"), "{head}");
    let retry_after: u64 = head
        .lines()
        .find_map(|l| l.strip_prefix("retry-after: "))
        .and_then(|v| v.trim().parse().ok())
        .expect("Retry-After in seconds");
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    assert!(body.contains("Too Many Requests"), "{body}");
    // The stream opened before the burst was never cut: all 30 events, in order.
    let out = read_all_with_limit(stream, Duration::from_secs(20));
    let (events, _) = parse_stream(&out);
    let ids: Vec<u32> = events.iter().filter_map(|e| e.0.parse().ok()).collect();
    assert_eq!(ids, (1..=30).collect::<Vec<_>>());
}

#[test]
fn stream_cap_refuses_then_recovers() {
    let php = Php::start();
    let gw = GatewayOptions::to(&php)
        .limits("request_rate = 0\nstream_connect_rate = 0\nmax_streams_per_client = 2\nrefusal_retry = \"1s\"\nretry_jitter = 0.5\n")
        .admin()
        .start();
    let a = spawn_stream(&gw.url("/quiet.php?quiet=30"));
    let b = spawn_stream(&gw.url("/quiet.php?quiet=30"));
    wait_streams(&gw, 2.0);
    // An EventSource-style request is refused with a 200 stream that sets `retry:`.
    let (head, body) = head_and_body(&["-H", SSE, &gw.url("/quiet.php?quiet=0")]);
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("content-type: text/event-stream"), "{head}");
    assert!(head.contains("x-ssegate-refused: client_streams"), "{head}");
    let retry: u64 = body
        .lines()
        .find_map(|l| l.strip_prefix("retry: "))
        .and_then(|v| v.parse().ok())
        .expect("retry field");
    assert!(
        (1000..=1500).contains(&retry),
        "retry {retry} ms is not 1 s + up to 50 %"
    );
    assert!(
        parse_stream(body.as_bytes()).0.is_empty(),
        "a refusal carries no event"
    );
    // A client that did not ask for an event stream learns at response time: 429.
    let (head, _) = head_and_body(&[&gw.url("/quiet.php?quiet=0")]);
    assert!(head.starts_with("http/1.1 429"), "{head}");
    assert!(head.contains("retry-after: "), "{head}");
    // Ordinary requests are not streams and pass.
    let (head, _) = head_and_body(&[&gw.url("/echo.php")]);
    assert!(head.starts_with("http/1.1 200"), "{head}");
    // Once a stream ends, its slot is free again.
    for mut c in [a, b] {
        let _ = c.kill();
        let _ = c.wait();
    }
    wait_streams(&gw, 0.0);
    let (head, body) = head_and_body(&["-H", SSE, &gw.url("/quiet.php?quiet=0.2")]);
    assert!(
        head.starts_with("http/1.1 200") && !head.contains("x-ssegate-refused"),
        "{head}"
    );
    assert_eq!(parse_stream(body.as_bytes()).0.len(), 2, "{body}");
}

#[test]
fn reconnect_limit_refuses_then_recovers() {
    let php = Php::start();
    let gw = GatewayOptions::to(&php)
        .limits("request_rate = 0\nstream_connect_rate = 1\nstream_connect_burst = 3\nrefusal_retry = \"1s\"\n")
        .start();
    let url = gw.url("/legacy.php?n=1");
    for i in 0..3 {
        let (head, body) = head_and_body(&["-H", SSE, &url]);
        assert!(!head.contains("x-ssegate-refused"), "connect {i}: {head}");
        assert_eq!(parse_stream(body.as_bytes()).0.len(), 1);
    }
    let (head, body) = head_and_body(&["-H", SSE, &url]);
    assert!(
        head.contains("x-ssegate-refused: stream_connect_rate"),
        "{head}"
    );
    assert!(body.contains("retry: "), "{body}");
    std::thread::sleep(Duration::from_millis(1300));
    let (head, body) = head_and_body(&["-H", SSE, &url]);
    assert!(!head.contains("x-ssegate-refused"), "{head}");
    assert_eq!(parse_stream(body.as_bytes()).0.len(), 1);
}

#[test]
fn forwarded_for_is_believed_only_from_trusted_proxies() {
    let php = Php::start();
    let gw = GatewayOptions::to(&php)
        .limits("trusted_proxies = [\"127.0.0.2\"]\nrequest_rate = 0.1\nrequest_burst = 2\nstream_connect_rate = 0\n")
        .start();
    let url = gw.url("/echo.php");
    let from = |iface: &str, xff: &str| {
        statuses(
            &[
                "--interface",
                iface,
                "-H",
                &format!("X-Forwarded-For: {xff}"),
            ],
            std::slice::from_ref(&url),
        )[0]
    };
    // Untrusted peer 127.0.0.1: a spoofed header does not give it a fresh bucket.
    assert_eq!(from("127.0.0.1", "198.51.100.1"), 200);
    assert_eq!(from("127.0.0.1", "198.51.100.2"), 200);
    assert_eq!(from("127.0.0.1", "198.51.100.3"), 429);
    // Trusted peer 127.0.0.2: each forwarded client has its own bucket.
    assert_eq!(from("127.0.0.2", "198.51.100.1"), 200);
    assert_eq!(from("127.0.0.2", "198.51.100.1"), 200);
    assert_eq!(from("127.0.0.2", "198.51.100.1"), 429);
    assert_eq!(from("127.0.0.2", "198.51.100.2"), 200);
    // The access line is written just after the response: give it a moment.
    assert!(
        wait_for(|| gw.log().contains("client=\"198.51.100.2\"")),
        "access log names the forwarded client"
    );
}

#[test]
fn browser_eventsource_refused_by_stream_cap_comes_back_by_itself() {
    let php = Php::start();
    let gw = GatewayOptions::to(&php)
        .limits("request_rate = 0\nstream_connect_rate = 0\nmax_streams_per_client = 1\nrefusal_retry = \"300ms\"\n")
        .admin()
        .start();
    let admin = gw.admin_port.expect("admin");
    assert!(
        repo()
            .join("tests/node/node_modules/playwright-core")
            .exists(),
        "tests/node/node_modules is missing: run scripts/test, which installs it"
    );
    // Another stream of the same client holds the only slot.
    let mut holder = spawn_stream(&gw.url("/broadcast.php?period=0.5"));
    wait_streams(&gw, 1.0);
    let browser = Command::new("node")
        .arg(repo().join("tests/node/browser_es.mjs"))
        .args([&gw.url("/es_page.html"), "5", "25000"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("run node");
    // Let the browser be refused a few times, then free the slot.
    let refused = "ssegate_refusals_total{reason=\"client_streams\"}";
    let deadline = Instant::now() + Duration::from_secs(20);
    while admin_metric(admin, refused) < 2.0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = holder.kill();
    let _ = holder.wait();
    let out = read_all_with_limit(browser, Duration::from_secs(40));
    let stats: serde_json::Value = serde_json::from_slice(&out)
        .unwrap_or_else(|e| panic!("browser output ({e}): {}", String::from_utf8_lossy(&out)));
    assert_eq!(stats["closedForGood"], false, "{stats}");
    assert!(
        stats["errors"].as_u64().unwrap_or(0) >= 2,
        "never refused? {stats}"
    );
    assert!(
        stats["events"].as_u64().unwrap_or(0) >= 5,
        "never got through: {stats}"
    );
    assert!(
        wait_for(|| gw.log().matches("refused=\"client_streams\"").count() >= 2),
        "gateway logged fewer than 2 refusals"
    );
}

/// `routes[].limits` rates apply on their route only, on top of the global one.
#[test]
fn a_route_limit_applies_on_its_route_only() {
    let php = Php::start();
    let gw = GatewayOptions::to(&php)
        .extra("limits = { request_rate = 0.1, request_burst = 3 }\n\n[[routes]]\nname = \"page\"\npath_prefix = \"/es_page.html\"\nupstream = \"php\"\n")
        .start();
    let echo: Vec<String> = (0..6)
        .map(|i| gw.url(&format!("/echo.php?i={i}")))
        .collect();
    assert_eq!(statuses(&[], &echo), [200, 200, 200, 429, 429, 429]);
    let page: Vec<String> = (0..10).map(|_| gw.url("/es_page.html")).collect();
    assert_eq!(
        statuses(&[], &page),
        [200; 10],
        "another route has no such limit"
    );
    let (head, _) = head_and_body(&[&gw.url("/echo.php")]);
    assert!(head.contains("x-ssegate-refused: request_rate"), "{head}");
}

/// With `refuse_streams_with = "429"` a refused EventSource request gets a 429 with
/// `Retry-After`, not the 200 stream carrying `retry:`.
#[test]
fn refuse_streams_with_429() {
    let php = Php::start();
    let gw = GatewayOptions::to(&php)
        .limits("request_rate = 0\nstream_connect_rate = 0\nmax_streams_per_client = 1\nrefuse_streams_with = \"429\"\n")
        .admin()
        .start();
    let mut holder = spawn_stream(&gw.url("/quiet.php?quiet=30"));
    wait_streams(&gw, 1.0);
    let (head, body) = head_and_body(&["-H", SSE, &gw.url("/quiet.php?quiet=0")]);
    assert!(head.starts_with("http/1.1 429"), "{head}");
    assert!(head.contains("x-ssegate-refused: client_streams"), "{head}");
    assert!(head.contains("retry-after: "), "{head}");
    assert!(!head.contains("text/event-stream"), "{head}");
    assert!(!body.contains("retry: "), "{body}");
    let _ = holder.kill();
    let _ = holder.wait();
}

/// `max_streams` caps the streams of all clients together.
#[test]
fn the_total_stream_cap_refuses_a_new_client() {
    let php = Php::start();
    let gw = GatewayOptions::to(&php)
        .limits("request_rate = 0\nstream_connect_rate = 0\nmax_streams = 2\n")
        .admin()
        .start();
    let url = gw.url("/quiet.php?quiet=30");
    let from = |iface: &str| {
        Command::new("curl")
            .args(["-s", "-N", "--max-time", "30", "--interface", iface])
            .args(["-H", SSE, &url])
            .stdout(Stdio::null())
            .spawn()
            .expect("curl")
    };
    let holders = [from("127.0.0.2"), from("127.0.0.3")];
    wait_streams(&gw, 2.0);
    let (head, _) = head_and_body(&["--interface", "127.0.0.4", "-H", SSE, &url]);
    assert!(head.contains("x-ssegate-refused: total_streams"), "{head}");
    for mut h in holders {
        let _ = h.kill();
        let _ = h.wait();
    }
    wait_streams(&gw, 0.0);
    let (head, _) = head_and_body(&[
        "--interface",
        "127.0.0.4",
        "-H",
        SSE,
        &gw.url("/quiet.php?quiet=0"),
    ]);
    assert!(!head.contains("x-ssegate-refused"), "{head}");
}
