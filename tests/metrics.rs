//! Operations: metrics on the admin listener match a scripted scenario; health checks.

mod common;

use std::time::Duration;

use common::*;

fn events_in(out: &[u8]) -> usize {
    let text = String::from_utf8_lossy(out);
    let body = text.split_once("\r\n\r\n").map_or(&*text, |(_, b)| b);
    parse_stream(body.as_bytes()).0.len()
}

#[test]
fn metrics_match_what_happened() {
    let php = Php::start();
    let gw = GatewayOptions::to(&php)
        .admin()
        .replay("linger = \"30s\"\n")
        .limits("request_rate = 0\nstream_connect_rate = 0.1\nstream_connect_burst = 3\nrefusal_retry = \"1s\"\n")
        .start();
    let admin = format!("http://127.0.0.1:{}", gw.admin_port.expect("admin"));
    let url = gw.url("/broadcast.php?period=0.1");
    let sse = "Accept: text/event-stream";
    // 1. a stream, 2. its resume (hit), 3. a miss, 4. a refused reconnect.
    let (_, a) = curl(&["-i", "-N", "--max-time", "0.6", "-H", sse, &url]);
    let a_text = String::from_utf8_lossy(&a).into_owned();
    let last = a_text
        .lines()
        .filter_map(|l| l.strip_prefix("id: "))
        .next_back()
        .expect("events")
        .to_owned();
    std::thread::sleep(Duration::from_millis(300));
    let (_, b) = curl(&[
        "-i",
        "-N",
        "--max-time",
        "0.4",
        "-H",
        sse,
        "-H",
        &format!("Last-Event-ID: {last}"),
        &url,
    ]);
    assert!(String::from_utf8_lossy(&b).contains("x-ssegate-replay: hit"));
    let (_, c) = curl(&[
        "-i",
        "-N",
        "--max-time",
        "0.4",
        "-H",
        sse,
        "-H",
        "Last-Event-ID: nope",
        &url,
    ]);
    let (_, d) = curl(&["-i", "-N", "--max-time", "0.4", "-H", sse, &url]);
    assert!(String::from_utf8_lossy(&d).contains("x-ssegate-refused: stream_connect_rate"));
    let seen = events_in(&a) + events_in(&b) + events_in(&c);

    // The access lines (and so the request counters) follow the streams' ends.
    assert!(wait_for(|| {
        let (_, m) = curl(&[&format!("{admin}/metrics")]);
        metric_in(
            &String::from_utf8_lossy(&m),
            "ssegate_requests_total{route=\"routes[0]\",status=\"200\"}",
        ) >= 4.0
    }));
    let (_, m) = curl(&[&format!("{admin}/metrics")]);
    let m = String::from_utf8_lossy(&m).into_owned();
    assert_eq!(metric_in(&m, "ssegate_replay_hits_total"), 1.0, "{m}");
    assert_eq!(metric_in(&m, "ssegate_replay_misses_total"), 1.0, "{m}");
    assert!(metric_in(&m, "ssegate_events_replayed_total") >= 1.0, "{m}");
    assert_eq!(
        metric_in(&m, "ssegate_refusals_total{reason=\"stream_connect_rate\"}"),
        1.0,
        "{m}"
    );
    assert_eq!(
        metric_in(
            &m,
            "ssegate_streams_open{protocol=\"h1\",route=\"routes[0]\"}"
        ),
        0.0,
        "{m}"
    );
    let events = metric_in(&m, "ssegate_events_total{route=\"routes[0]\"}") as usize;
    // A stream cut by the client's timer may have had one more event on the wire.
    assert!(
        events >= seen && events <= seen + 3,
        "metrics say {events}, clients saw {seen}"
    );
    assert!(metric_in(&m, "ssegate_hubs") >= 1.0, "{m}");
    // Upstream connections: the first stream and the miss (the hit joined a hub; the
    // refused reconnect never went upstream).
    assert_eq!(
        metric_in(
            &m,
            "ssegate_upstream_connections_total{reused=\"no\",upstream=\"php\"}"
        ),
        2.0,
        "{m}"
    );
    let (_, h) = curl(&[&format!("{admin}/healthz")]);
    assert_eq!(h, b"ok\n");
    let (_, r) = curl(&[&format!("{admin}/readyz")]);
    assert_eq!(r, b"ready\n");
}

#[test]
fn access_log_as_json() {
    let php = Php::start();
    let gw = GatewayOptions::to(&php)
        .server("log_format = \"json\"\n")
        .start();
    let (_, _) = curl(&[&gw.url("/echo.php?x=1")]);
    assert!(wait_for(|| gw.log().contains("ssegate::access")));
    let log = gw.log();
    let line = log
        .lines()
        .find(|l| l.contains("ssegate::access"))
        .expect("access line");
    let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
    assert_eq!(v["status"], 200, "{v}");
    assert_eq!(v["method"], "GET", "{v}");
    assert_eq!(v["path"], "/echo.php?x=1", "{v}");
    assert_eq!(v["kind"], "request", "{v}");
}

#[test]
fn tls_handshakes_are_counted() {
    let php = Php::start();
    let gw = GatewayOptions::to(&php).admin().tls().start();
    let admin = format!("http://127.0.0.1:{}", gw.admin_port.expect("admin"));
    let url = gw.tls_url("/es_page.html");
    let ca = gw.cert.as_ref().expect("cert").cert.display().to_string();
    for _ in 0..2 {
        let (status, _) = curl(&["--cacert", &ca, &url]);
        assert!(status.success());
    }
    let (status, _) = curl(&["--cacert", &ca, "--tls-max", "1.2", &url]);
    assert!(status.success());
    // A client that gives up after its hello: started, never completed.
    let (status, _) = curl(&["--max-time", "2", &url]);
    assert!(!status.success(), "an unknown CA must fail");
    let (_, m) = curl(&[&format!("{admin}/metrics")]);
    let m = String::from_utf8_lossy(&m).into_owned();
    assert_eq!(
        metric_in(&m, "ssegate_tls_handshakes_total{version=\"TLSv1_3\"}"),
        2.0,
        "{m}"
    );
    assert_eq!(
        metric_in(&m, "ssegate_tls_handshakes_total{version=\"TLSv1_2\"}"),
        1.0,
        "{m}"
    );
    assert_eq!(
        metric_in(&m, "ssegate_tls_handshakes_started_total"),
        4.0,
        "{m}"
    );
}
