//! Hostile clients and upstreams: malformed and smuggling requests, slow and idle
//! connections, oversized and unfinished events, a non-stream answer to an EventSource.
//! The gateway must answer with a 4xx or close the one connection, and keep serving.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;

/// Sends `req` on a new connection and reads until the gateway closes it, which it
/// must do within `limit` (each request here is refused or asks for the close).
fn raw(port: u16, req: &[u8], limit: Duration) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(limit)).expect("timeout");
    s.write_all(req).expect("write");
    let mut out = Vec::new();
    let closed = match s.read_to_end(&mut out) {
        Ok(_) => true,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    };
    let resp = String::from_utf8_lossy(&out).into_owned();
    assert!(
        closed,
        "the connection was still open after {limit:?}: {:?} -> {resp:?}",
        String::from_utf8_lossy(req)
    );
    resp
}

fn status(resp: &str) -> &str {
    resp.split(' ').nth(1).unwrap_or("")
}

#[test]
fn malformed_requests_get_400() {
    let php = Php::start();
    let gw = GatewayOptions::to(&php).start();
    let cases: &[&[u8]] = &[
        b"GARBAGE\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nNo colon here\r\n\r\n",
        b"GET / HTTP/7.1\r\nHost: a\r\n\r\n",
        b"GET /\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        b"GET http://user@a/ HTTP/1.1\r\nHost: a\r\n\r\n",
        // A Content-Length list, even of equal values: refused, not half-forwarded.
        b"POST /echo.php HTTP/1.1\r\nHost: a\r\nContent-Length: 3, 3\r\n\r\nabc",
        b"POST /echo.php HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
        // 300 headers: past pingora's 256.
        &[
            b"GET / HTTP/1.1\r\nHost: a\r\n".as_slice(),
            &b"X-A: b\r\n".repeat(300),
            b"\r\n",
        ]
        .concat(),
    ];
    for req in cases {
        let resp = raw(gw.port, req, Duration::from_secs(5));
        assert_eq!(
            status(&resp),
            "400",
            "{:?} -> {resp:?}",
            String::from_utf8_lossy(req)
        );
        // Refused at the edge, not passed on for the backend to judge.
        assert!(!resp.contains("Apache"), "{resp}");
    }
    // And the gateway serves on.
    let (ok, body) = curl(&[&gw.url("/es_page.html")]);
    assert!(ok.success() && !body.is_empty());
}

#[test]
fn smuggling_attempts_are_refused_or_neutralized() {
    let php = Php::start();
    let gw = GatewayOptions::to(&php).start();
    let log = php.dir.path().join("smuggled.log");
    let smuggled = format!(
        "GET /broadcast.php?n=1&log={} HTTP/1.1\r\nHost: a\r\n\r\n",
        log.display()
    );
    // Framing the backend could read two ways: refused outright.
    for framing in [
        "Content-Length: 5\r\nContent-Length: 6\r\n",
        "Transfer-Encoding: xchunked\r\n",
        "Transfer-Encoding: chunked, identity\r\n",
        "Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n",
    ] {
        let req = format!("POST /echo.php HTTP/1.1\r\nHost: a\r\n{framing}\r\n0\r\n\r\n{smuggled}");
        let resp = raw(gw.port, req.as_bytes(), Duration::from_secs(5));
        assert_eq!(status(&resp), "400", "{framing:?} -> {resp:?}");
    }
    let req = format!("POST /echo.php HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}");
    assert_eq!(
        status(&raw(gw.port, req.as_bytes(), Duration::from_secs(5))),
        "400"
    );
    // Content-Length with chunked: the chunked framing wins (RFC 9112 6.3), the length
    // is dropped, and the connection is closed after the response (`raw` requires the
    // close), so the bytes after the last chunk are never read as a request.
    let req = format!(
        "POST /echo.php HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n{smuggled}"
    );
    let resp = raw(gw.port, req.as_bytes(), Duration::from_secs(5));
    assert_eq!(resp.matches("HTTP/1.1 ").count(), 1, "{resp}");
    assert_eq!(status(&resp), "200", "{resp}");
    let (_, json) = resp.split_once("\r\n\r\n").expect("a body");
    let seen: serde_json::Value = serde_json::from_str(json).expect("echo.php's JSON");
    assert_eq!(seen["body"], "hello", "{seen}");
    assert!(
        seen["headers"]
            .get("content-length")
            .is_none_or(|v| v != "4"),
        "{seen}"
    );
    // A bad chunk size: the body cannot be read, so the request is refused (or, once
    // the upstream has answered, the connection is cut).
    let req = b"POST /echo.php HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n";
    let resp = raw(gw.port, req, Duration::from_secs(5));
    assert!(!resp.contains("HTTP/1.1 200"), "{resp}");
    // A control request through the gateway reaches the backend; the smuggled one, whose
    // bytes came earlier, never did.
    let control = php.file("control.log");
    let (ok, _) = curl(&[&gw.url(&format!("/broadcast.php?n=1&log={}", control.display()))]);
    assert!(ok.success() && control.exists());
    assert!(!log.exists(), "a smuggled request reached the backend");
}

#[test]
fn a_2mb_event_line_closes_that_stream_and_nothing_else() {
    let php = Php::start();
    let gw = GatewayOptions::to(&php).start();
    let other = curl_stream(&gw.url("/broadcast.php?period=0.05"), 3, &[]);
    let started = Instant::now();
    let (_, body) = curl(&[
        "-N",
        "--max-time",
        "20",
        &gw.url("/big.php?size=2100000&n=1"),
    ]);
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "the stream was not closed"
    );
    let (events, _) = parse_stream(&body);
    assert!(events.is_empty(), "an oversized event got through");
    assert!(
        body.len() < 4096,
        "{} bytes of the event were relayed",
        body.len()
    );
    assert!(
        wait_for(|| gw.log().contains("event larger than")),
        "{}",
        gw.log()
    );
    let ids = parse_stream(&read_all_with_limit(other, Duration::from_secs(5))).0;
    assert!(
        ids.len() > 20,
        "the other stream suffered: {} events",
        ids.len()
    );
}

#[test]
fn a_line_that_never_ends_is_closed_at_the_event_cap_with_heartbeats_until_then() {
    let php = Php::start();
    let gw = GatewayOptions::to(&php)
        .extra("[routes.sse]\nmax_event_bytes = 204800\nheartbeat_interval = \"200ms\"\n")
        .start();
    let started = Instant::now();
    // 10 KB every 100 ms: the cap is passed after about 2 s.
    let (_, body) = curl(&[
        "-N",
        "--max-time",
        "20",
        &gw.url("/never_ends.php?every=0.1"),
    ]);
    let took = started.elapsed();
    let text = String::from_utf8_lossy(&body);
    assert!(took < Duration::from_secs(12), "not closed: {took:?}");
    assert!(text.contains("data: first"), "{text}");
    assert!(
        text.matches(":heartbeat").count() >= 3,
        "no heartbeats meanwhile: {text}"
    );
    assert!(
        !text.contains("xxxxxxxxxx"),
        "part of the unfinished event was relayed"
    );
}

#[test]
fn a_non_stream_200_to_an_eventsource_is_passed_on_and_the_client_gives_up() {
    let php = Php::start();
    let gw = GatewayOptions::to(&php).start();
    let (ok, body) = curl(&["-H", "Accept: text/event-stream", &gw.url("/es_page.html")]);
    assert!(ok.success());
    assert_eq!(
        body,
        std::fs::read(repo().join("tests/php/es_page.html")).expect("page")
    );
    let v = node_clients(&gw.url("/es_page.html"), 1, 1, 3000, None);
    let c = &v["clients"][0];
    assert_eq!(c["ids"].as_array().map(Vec::len), Some(0), "{c}");
    assert!(c["errors"].as_u64() >= Some(1), "{c}");
}

#[test]
fn a_client_trickling_its_header_is_cut_while_others_are_served() {
    let php = Php::start();
    let gw = GatewayOptions::to(&php)
        .server("request_header_timeout = \"2s\"\n")
        .admin()
        .start();
    let port = gw.port;
    let slow = std::thread::spawn(move || {
        let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        let started = Instant::now();
        for b in b"GET /es_page.html HTTP/1.1\r\nHost: a\r\nX-Slow: yes\r\n\r\n" {
            if s.write_all(&[*b]).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(300));
            if started.elapsed() > Duration::from_secs(20) {
                break;
            }
        }
        let mut out = Vec::new();
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let _ = s.read_to_end(&mut out);
        (started.elapsed(), out)
    });
    // Others are served meanwhile.
    for _ in 0..10 {
        let (ok, _) = curl(&["--max-time", "2", &gw.url("/es_page.html")]);
        assert!(ok.success());
        std::thread::sleep(Duration::from_millis(100));
    }
    let (took, out) = slow.join().expect("slow client");
    assert!(out.is_empty() || !String::from_utf8_lossy(&out).starts_with("HTTP/1.1 200"));
    assert!(
        took < Duration::from_secs(8),
        "the trickling client was allowed {took:?}"
    );
    let admin = gw.admin_port.expect("admin");
    assert!(admin_metric(admin, "ssegate_request_header_timeouts_total") >= 1.0);
}

#[test]
fn connections_past_max_connections_are_closed_at_once() {
    let php = Php::start();
    let gw = GatewayOptions::to(&php)
        .server("max_connections = 50\n")
        .admin()
        .start();
    let admin = gw.admin_port.expect("admin");
    let mut conns: Vec<TcpStream> = (0..60)
        .map(|_| TcpStream::connect(("127.0.0.1", gw.port)).expect("connect"))
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let mut closed = 0;
    for s in &mut conns {
        s.set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        if is_closed(s) {
            closed += 1;
        }
    }
    assert!((10..=12).contains(&closed), "{closed} closed");
    assert_eq!(
        admin_metric(admin, "ssegate_refusals_total{reason=\"max_connections\"}"),
        10.0
    );
    drop(conns);
    assert!(wait_for(|| curl(&[
        "--max-time",
        "2",
        &gw.url("/es_page.html")
    ])
    .0
    .success()));
}

/// A stream goes on in a task of its own once its head is out (pingora's request task
/// ends), but its connection still counts against `max_connections` until the stream
/// ends: with five streams open a sixth connection is closed at once, and the count
/// goes back to zero when the streams' clients leave.
#[test]
fn open_streams_count_against_max_connections() {
    let php = Php::start();
    let gw = GatewayOptions::to(&php)
        .server("max_connections = 5\n")
        .limits("request_rate = 0\nstream_connect_rate = 0\nmax_streams_per_client = 0\n")
        .admin()
        .start();
    let admin = gw.admin_port.expect("admin");
    let sse = ["-H", "Accept: text/event-stream"];
    let mut streams: Vec<_> = (0..5)
        .map(|i| curl_stream(&gw.url(&format!("/ticks.php?c={i}")), 30, &sse))
        .collect();
    assert!(wait_for(
        || admin_metric(admin, "ssegate_streams_open") == 5.0
    ));
    assert_eq!(admin_metric(admin, "ssegate_connections_open"), 5.0);
    let mut sixth = TcpStream::connect(("127.0.0.1", gw.port)).expect("connect");
    sixth
        .set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    assert!(is_closed(&mut sixth), "a sixth connection was let in");
    assert_eq!(
        admin_metric(admin, "ssegate_refusals_total{reason=\"max_connections\"}"),
        1.0
    );
    // The streams went on meanwhile.
    assert_eq!(admin_metric(admin, "ssegate_streams_open"), 5.0);
    for s in &mut streams {
        let _ = s.kill();
        let _ = s.wait();
    }
    assert!(
        wait_for(|| admin_metric(admin, "ssegate_connections_open") == 0.0),
        "the streams' connections are still counted"
    );
    assert_eq!(admin_metric(admin, "ssegate_streams_open"), 0.0);
}

/// The request's host is normalised once, for routing, the stream key and the upstream:
/// case, a trailing dot or a default port cannot skip a host's route (and its limits),
/// and a request whose host is ambiguous is refused.
#[test]
fn hosts_are_normalised_once_and_ambiguous_ones_refused() {
    let php = Php::start();
    // The only route is for a.test: a request that escapes it gets 404.
    let gw = GatewayOptions::to(&php)
        .extra("host = \"a.test\"\n")
        .start();
    let get = |head: &str| {
        raw(
            gw.port,
            format!("GET /echo.php HTTP/1.1\r\n{head}Connection: close\r\n\r\n").as_bytes(),
            Duration::from_secs(5),
        )
    };
    for host in ["a.test", "A.TEST", "a.test.", "a.test.:80", "a.test:"] {
        let resp = get(&format!("Host: {host}\r\n"));
        assert_eq!(status(&resp), "200", "Host: {host}\n{resp}");
        // The upstream gets the one normalised host.
        assert!(resp.contains("\"host\":\"a.test\""), "Host: {host}\n{resp}");
    }
    // No route: ssegate answers itself (Apache would serve /echo.php).
    let resp = get("Host: b.test\r\n");
    assert_eq!(status(&resp), "404", "{resp}");
    assert!(resp.contains("no route for this request"), "{resp}");
    assert!(!resp.contains("Apache"), "{resp}");
    assert_eq!(status(&get("Host: a.test:8080\r\n")), "200");
    for bad in [
        "Host: a.test\r\nHost: a.test\r\n",
        "Host: a.test\r\nHost: b.test\r\n",
        "Host: user@a.test\r\n",
        "",
    ] {
        let resp = get(bad);
        assert_eq!(status(&resp), "400", "{bad:?}\n{resp}");
    }
    // An absolute-form target names the host: routed by it, sent upstream in origin
    // form with that Host; one that contradicts Host is refused.
    let abs = |head: &str| {
        raw(
            gw.port,
            format!("GET http://A.test/echo.php?x=1 HTTP/1.1\r\n{head}Connection: close\r\n\r\n")
                .as_bytes(),
            Duration::from_secs(5),
        )
    };
    let resp = abs("");
    assert_eq!(status(&resp), "200", "{resp}");
    assert!(resp.contains("\"host\":\"a.test\""), "{resp}");
    assert!(resp.contains("\"uri\":\"\\/echo.php?x=1\""), "{resp}");
    assert_eq!(status(&abs("Host: A.test\r\n")), "200");
    assert_eq!(status(&abs("Host: b.test\r\n")), "400");
}

/// HTTP/2 lets a client split `Cookie` into one field per pair; the upstream (which
/// would join them with `, `) and the stream key get one `; `-joined line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_cookie_crumbs_reach_the_upstream_as_one_cookie() {
    let php = Php::start();
    let gw = GatewayOptions::to(&php).start();
    let client = h2c_connect(gw.port).await;
    for accept in ["*/*", "text/event-stream"] {
        let mut client = client.clone().ready().await.expect("h2 ready");
        let req = http::Request::get(format!("http://127.0.0.1:{}/echo.php", gw.port))
            .header("accept", accept)
            .header("cookie", "a=1")
            .header("cookie", "b=2")
            .body(())
            .expect("request");
        let (resp, _) = client.send_request(req, true).expect("send");
        let resp = resp.await.expect("response");
        assert_eq!(resp.status(), 200);
        let mut body = resp.into_body();
        let mut out = vec![];
        while let Some(chunk) = body.data().await {
            let chunk = chunk.expect("data");
            let _ = body.flow_control().release_capacity(chunk.len());
            out.extend_from_slice(&chunk);
        }
        let v: serde_json::Value = serde_json::from_slice(&out).expect("json");
        assert_eq!(v["headers"]["cookie"], "a=1; b=2", "{accept}: {v}");
    }
}

/// The admin listener has the public listeners' guard with a small cap of its own:
/// idle connections past 64 are closed at once, the rest when their header is late,
/// and none of them counts as the gateway's traffic.
#[test]
fn admin_listener_caps_idle_connections_and_closes_them_when_late() {
    let php = Php::start();
    let gw = GatewayOptions::to(&php)
        .server("request_header_timeout = \"2s\"\n")
        .admin()
        .start();
    let admin = gw.admin_port.expect("admin");
    let mut conns: Vec<TcpStream> = (0..150)
        .map(|_| TcpStream::connect(("127.0.0.1", admin)).expect("connect"))
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let count_closed = |conns: &mut Vec<TcpStream>| {
        let mut closed = 0;
        for s in conns.iter_mut() {
            // Non-blocking: an open connection answers WouldBlock at once.
            s.set_nonblocking(true).expect("nonblocking");
            closed += usize::from(is_closed(s));
        }
        closed
    };
    let at_once = count_closed(&mut conns);
    assert!((80..=90).contains(&at_once), "{at_once} closed at once");
    // Past the header deadline, every one of them is gone.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(count_closed(&mut conns), 150);
    drop(conns);
    assert_eq!(admin_metric(admin, "ssegate_connections_open"), 0.0);
    assert_eq!(
        admin_metric(admin, "ssegate_refusals_total{reason=\"max_connections\"}"),
        0.0
    );
}

/// A kept-alive HTTP/1.1 connection gets a new header deadline for each request, and
/// an HTTP/2 connection with no stream open is closed after the same time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_at_the_header_deadline() {
    let php = Php::start();
    let gw = GatewayOptions::to(&php)
        .server("request_header_timeout = \"2s\"\n")
        .admin()
        .start();
    let admin = gw.admin_port.expect("admin");
    let port = gw.port;
    let h1 = tokio::task::spawn_blocking(move || {
        let s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut w = s.try_clone().expect("clone");
        let mut r = std::io::BufReader::new(s);
        // Two requests, each well inside the deadline counted from its own start.
        for _ in 0..2 {
            std::thread::sleep(Duration::from_millis(1200));
            w.write_all(b"GET /es_page.html HTTP/1.1\r\nHost: a\r\n\r\n")
                .expect("request");
            let (head, _) = read_response(&mut r);
            assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        }
        let idle = Instant::now();
        let mut b = [0u8; 1];
        let n = r.get_mut().read(&mut b);
        // The next header on a kept-alive connection gets the same deadline: trickled
        // byte by byte, it is cut (and counted as late).
        let s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        let mut w = s.try_clone().expect("clone");
        let mut r2 = std::io::BufReader::new(s);
        w.write_all(b"GET /es_page.html HTTP/1.1\r\nHost: a\r\n\r\n")
            .expect("request");
        assert!(read_response(&mut r2).0.starts_with("HTTP/1.1 200"));
        let trickle = Instant::now();
        for b in b"GET /es_page.html HTTP/1.1\r\nHost: a\r\nX-Slow: yes\r\n\r\n" {
            if w.write_all(&[*b]).is_err() || trickle.elapsed() > Duration::from_secs(10) {
                break;
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        let cut = trickle.elapsed();
        assert!(
            cut < Duration::from_secs(6),
            "a trickled second header ran {cut:?}"
        );
        assert!(
            matches!(n, Ok(0))
                || matches!(&n, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
            "{n:?} after {:?}",
            idle.elapsed()
        );
        idle.elapsed()
    });
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let (client, conn) = h2::client::handshake(tcp).await.expect("h2 handshake");
    let h2 = tokio::spawn(async move {
        let _ = conn.await;
        Instant::now()
    });
    let req = http::Request::get(gw.url("/es_page.html"))
        .body(())
        .expect("request");
    let mut client = client.ready().await.expect("ready");
    let (resp, _) = client.send_request(req, true).expect("send");
    let mut body = resp.await.expect("response").into_body();
    while let Some(chunk) = body.data().await {
        let n = chunk.expect("data").len();
        let _ = body.flow_control().release_capacity(n);
    }
    let idle = Instant::now();
    let closed = tokio::time::timeout(Duration::from_secs(10), h2)
        .await
        .expect("the idle HTTP/2 connection was not closed")
        .expect("join");
    let h2_idle = closed - idle;
    let h1_idle = h1.await.expect("h1");
    for (what, t) in [("HTTP/1.1", h1_idle), ("HTTP/2", h2_idle)] {
        assert!(
            (Duration::from_millis(1500)..Duration::from_secs(6)).contains(&t),
            "{what}: closed after {t:?} idle"
        );
    }
    // The two idle closes are not late headers; the trickled one is.
    assert_eq!(
        admin_metric(admin, "ssegate_request_header_timeouts_total"),
        1.0
    );
}

/// A request header past pingora's 1 MiB gets a 400 (when the client can still read
/// it) and the connection closes; the gateway serves on.
#[test]
fn a_request_header_over_1_mib_closes_the_connection() {
    let php = Php::start();
    let gw = GatewayOptions::to(&php).start();
    let mut s = TcpStream::connect(("127.0.0.1", gw.port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let _ = s.write_all(b"GET /es_page.html HTTP/1.1\r\nHost: a\r\n");
    // 200 headers of 6 kB, in separate writes (the size is checked between reads).
    let line = format!("X-Big: {}\r\n", "b".repeat(6000));
    for _ in 0..200 {
        if s.write_all(line.as_bytes()).is_err() {
            break;
        }
    }
    let _ = s.write_all(b"\r\n");
    let mut out = Vec::new();
    let closed = match s.read_to_end(&mut out) {
        Ok(_) => true,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    };
    let resp = String::from_utf8_lossy(&out);
    assert!(closed, "still open: {resp}");
    assert!(out.is_empty() || resp.starts_with("HTTP/1.1 400"), "{resp}");
    let (ok, _) = curl(&[&gw.url("/es_page.html")]);
    assert!(ok.success());
}

/// HTTP/2: at most 100 streams at once per connection, and a header list past 64 KiB
/// is refused, on a connection that serves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_caps_streams_and_header_lists() {
    let php = Php::start();
    let gw = GatewayOptions::to(&php).start();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", gw.port))
        .await
        .expect("connect");
    let (client, conn) = h2::client::handshake(tcp).await.expect("h2 handshake");
    let mut conn = Box::pin(conn);
    let get = |extra: Option<String>| {
        let mut b = http::Request::get(gw.url("/echo.php"));
        if let Some(v) = extra {
            b = b.header("x-big", v);
        }
        b.body(()).expect("request")
    };
    let mut client = client.ready().await.expect("ready");
    // The server's settings arrive with the first exchange.
    let (resp, _) = client.send_request(get(None), true).expect("send");
    let resp = tokio::select! {
        r = resp => r.expect("response"),
        _ = &mut conn => panic!("connection ended"),
    };
    assert_eq!(resp.status(), 200);
    assert_eq!(conn.max_concurrent_send_streams(), 100);
    let _drive = tokio::spawn(conn);
    let mut client = client.ready().await.expect("ready");
    let (resp, _) = client
        .send_request(get(Some("h".repeat(70_000))), true)
        .expect("send");
    match resp.await {
        Ok(r) => assert_eq!(r.status(), 431),
        Err(e) => assert!(e.is_reset() || e.is_remote(), "{e}"),
    }
    let mut client = client.ready().await.expect("ready");
    let (resp, _) = client.send_request(get(None), true).expect("send");
    assert_eq!(resp.await.expect("response").status(), 200);
}
