//! Operations: metrics on the admin listener match a scripted scenario; health checks.

mod common;

use common::*;

fn body(out: &[u8]) -> &[u8] {
    out.windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(out, |i| &out[i + 4..])
}

fn events_in(out: &[u8]) -> usize {
    parse_stream(body(out)).0.len()
}

fn heartbeats_in(out: &[u8]) -> usize {
    String::from_utf8_lossy(body(out))
        .lines()
        .filter(|l| *l == ":hb")
        .count()
}

#[test]
fn metrics_match_what_happened() {
    let php = Php::start();
    let gw = GatewayOptions::to(&php)
        .admin()
        .replay("linger = \"30s\"\n")
        .limits("request_rate = 0\nstream_connect_rate = 0.1\nstream_connect_burst = 4\nrefusal_retry = \"1s\"\n")
        // Events every 0.1 s never leave 0.3 s of silence: heartbeats go only to the
        // quiet stream.
        .extra("[sse]\nheartbeat_interval = \"300ms\"\nheartbeat_comment = \"hb\"\n")
        .start();
    let admin = format!("http://127.0.0.1:{}", gw.admin_port.expect("admin"));
    let url = gw.url("/broadcast.php?period=0.1");
    let sse = "Accept: text/event-stream";
    // 1. a stream, 2. its resume (hit), 3. a miss, 4. a quiet stream with heartbeats,
    // 5. a refused reconnect.
    let (_, a) = curl(&["-i", "-N", "--max-time", "0.6", "-H", sse, &url]);
    let a_text = String::from_utf8_lossy(&a).into_owned();
    let last = a_text
        .lines()
        .filter_map(|l| l.strip_prefix("id: "))
        .next_back()
        .expect("events")
        .to_owned();
    // Away while the hub lingers and records at least one more event.
    let port = gw.admin_port.expect("admin");
    assert!(wait_for(
        || admin_metric(port, "ssegate_hubs_lingering") == 1.0
    ));
    let stored = admin_metric(port, "ssegate_replay_bytes");
    assert!(wait_for(
        || admin_metric(port, "ssegate_replay_bytes") > stored
    ));
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
    let replayed: f64 = String::from_utf8_lossy(&b)
        .lines()
        .find_map(|l| l.strip_prefix("x-ssegate-replay: hit; events="))
        .and_then(|n| n.trim().parse().ok())
        .expect("a hit");
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
    let (_, q) = curl(&["-i", "-N", "-H", sse, &gw.url("/quiet.php?quiet=1.2")]);
    assert_eq!(events_in(&q), 2);
    let (_, d) = curl(&["-i", "-N", "--max-time", "0.4", "-H", sse, &url]);
    assert!(String::from_utf8_lossy(&d).contains("x-ssegate-refused: stream_connect_rate"));
    let seen = events_in(&a) + events_in(&b) + events_in(&c) + events_in(&q);
    let bytes: usize = [&a, &b, &c, &q].iter().map(|o| body(o).len()).sum();

    // The access lines (and so the request counters) follow the streams' ends.
    assert!(wait_for(|| {
        let (_, m) = curl(&[&format!("{admin}/metrics")]);
        metric_in(
            &String::from_utf8_lossy(&m),
            "ssegate_requests_total{route=\"routes[0]\",status=\"200\"}",
        ) >= 5.0
    }));
    let (_, m) = curl(&[&format!("{admin}/metrics")]);
    let m = String::from_utf8_lossy(&m).into_owned();
    assert_eq!(metric_in(&m, "ssegate_replay_hits_total"), 1.0, "{m}");
    assert_eq!(metric_in(&m, "ssegate_replay_misses_total"), 1.0, "{m}");
    assert!(replayed >= 1.0);
    assert_eq!(
        metric_in(&m, "ssegate_events_replayed_total"),
        replayed,
        "{m}"
    );
    // The hit is an upstream request saved.
    assert_eq!(
        metric_in(&m, "ssegate_upstream_requests_saved_total"),
        1.0,
        "{m}"
    );
    // 1.2 s of silence at 0.3 s: the clients saw each heartbeat the metric counts.
    let beats = heartbeats_in(&q);
    assert!((2..=4).contains(&beats), "{beats} heartbeats");
    assert_eq!(
        metric_in(&m, "ssegate_heartbeats_total") as usize,
        [&a, &b, &c, &q]
            .iter()
            .map(|o| heartbeats_in(o))
            .sum::<usize>(),
        "{m}"
    );
    // Every byte a client read was counted; a stream cut by the client's timer may
    // have had a little more on the wire (at most one event each).
    let counted = metric_in(&m, "ssegate_stream_bytes_total") as usize;
    assert!(
        (bytes..=bytes + 3 * 200).contains(&counted),
        "metrics say {counted} bytes, clients read {bytes}"
    );
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
    // Every client has gone: the GET streams' hubs all linger (30 s); the quiet one's
    // upstream ended, so its hub is gone.
    assert!(metric_in(&m, "ssegate_hubs") >= 1.0, "{m}");
    assert_eq!(
        metric_in(&m, "ssegate_hubs_lingering"),
        metric_in(&m, "ssegate_hubs"),
        "{m}"
    );
    assert_eq!(metric_in(&m, "ssegate_upstream_errors_total"), 0.0, "{m}");
    // Upstream connections: the first stream, the miss and the quiet stream (the hit
    // joined a hub; the refused reconnect never went upstream).
    assert_eq!(
        metric_in(
            &m,
            "ssegate_upstream_connections_total{reused=\"no\",upstream=\"php\"}"
        ),
        3.0,
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

/// A stream's access line, written when the stream ends, reports what its client was
/// sent: over HTTP/1.1 (where the stream ends on the bare connection, its pingora
/// session let go once the head was out) and over h2c.
#[test]
fn a_streams_access_line_counts_what_its_client_got() {
    let php = Php::start();
    let gw = GatewayOptions::to(&php)
        .server("log_format = \"json\"\n")
        .start();
    for (i, proto) in ["--http1.1", "--http2-prior-knowledge"].iter().enumerate() {
        // Three events, then only comment lines (which end no event): nothing more is
        // written until the client leaves.
        let path = format!("/big.php?size=10&n=3&c={i}");
        let accept = "Accept: text/event-stream";
        let (_, body) = curl(&["--max-time", "2", "-H", accept, proto, &gw.url(&path)]);
        let text = String::from_utf8_lossy(&body).into_owned();
        assert!(text.contains("id: 3\n"), "{proto}: {text}");
        let line = || {
            gw.log()
                .lines()
                .find(|l| l.contains("ssegate::access") && l.contains(&path))
                .map(str::to_owned)
        };
        assert!(wait_for(|| line().is_some()), "{proto}: no access line");
        let line = line().unwrap_or_default();
        let v: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert_eq!(v["kind"], "stream", "{proto}: {v}");
        assert_eq!(v["status"], 200, "{proto}: {v}");
        assert_eq!(v["method"], "GET", "{proto}: {v}");
        assert_eq!(v["events"], 3, "{proto}: {v}");
        assert_eq!(v["bytes"], body.len(), "{proto}: {v}");
    }
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

/// Once SIGTERM came, `/readyz` says 503 so load balancers stop sending new clients,
/// while the requests in flight finish. pingora stops accepting at the signal, so the
/// probe comes on an admin connection kept alive from before.
#[test]
fn readyz_is_503_during_a_graceful_shutdown() {
    use std::io::{BufReader, Write};
    let php = Php::start();
    let gw = GatewayOptions::to(&php).admin().start();
    let admin = gw.admin_port.expect("admin");
    let mut probe = std::net::TcpStream::connect(("127.0.0.1", admin)).expect("connect");
    probe
        .set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .expect("timeout");
    let ask = |probe: &mut std::net::TcpStream| {
        probe
            .write_all(b"GET /readyz HTTP/1.1\r\nHost: admin\r\n\r\n")
            .expect("probe");
        let (head, body) = read_response(&mut BufReader::new(probe));
        (head, String::from_utf8_lossy(&body).into_owned())
    };
    let (head, body) = ask(&mut probe);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(body, "ready\n");
    // A slow request keeps the process in its shutdown for a few seconds.
    let slow = curl_stream(&gw.url("/echo.php?sleep=4"), 20, &[]);
    assert!(wait_for(
        || admin_metric(admin, "ssegate_connections_open") >= 1.0
    ));
    gw.signal("TERM");
    // ssegate's own line: pingora's "Broadcasting graceful shutdown" comes before the
    // gateway has begun its shutdown.
    assert!(
        wait_for(|| gw.log().contains("graceful shutdown: ending streams")),
        "{}",
        gw.log()
    );
    let (head, body) = ask(&mut probe);
    assert!(head.starts_with("HTTP/1.1 503"), "{head}");
    assert_eq!(body, "shutting down\n");
    let out = read_all_with_limit(slow, std::time::Duration::from_secs(10));
    assert!(
        out.starts_with(b"{"),
        "the request in flight was cut: {out:?}"
    );
}

/// At start the log says what is served where: one line per listener (address,
/// protocols, TLS names), the admin address and the route table.
#[test]
fn the_start_up_lines_say_what_is_served_where() {
    let php = Php::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let api = TestCert::for_names(dir.path(), "api", &["api.test"]);
    let gw = GatewayOptions::to(&php)
        .admin()
        .tls_with(&format!(
            ", sni = [{{ names = [\"api.test\"], cert = \"{}\", key = \"{}\" }}]",
            api.cert.display(),
            api.key.display()
        ))
        .extra("token_param = \"t\"\n")
        .start();
    let log = gw.log();
    let line = |needle: &str| {
        log.lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no line with {needle}:\n{log}"))
            .to_owned()
    };
    let plain = line(&format!("listening address=127.0.0.1:{} ", gw.port));
    assert!(plain.contains("protocols=\"HTTP/1.1, h2c\""), "{plain}");
    let tls = line(&format!(
        "listening address=127.0.0.1:{} ",
        gw.tls_port.expect("tls")
    ));
    assert!(
        tls.contains("h2, HTTP/1.1") && tls.contains("sni_names=[\"api.test\"]"),
        "{tls}"
    );
    let admin = line("admin listening");
    assert!(
        admin.contains(&format!("127.0.0.1:{}", gw.admin_port.expect("admin"))),
        "{admin}"
    );
    let route = line("route route=routes[0]");
    assert!(
        route.contains("upstream=php") && route.contains(&php.port.to_string()),
        "{route}"
    );
    assert!(route.contains("token_param=\"t\""), "{route}");
}
