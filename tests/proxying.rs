//! Ordinary reverse proxying: forwarding headers, bodies, hop-by-hop hygiene, upstream
//! failures, server failover. Real PHP backend, real gateway binary, curl.

mod common;

use common::*;
use std::os::unix::process::CommandExt;

fn json(bytes: &[u8]) -> serde_json::Value {
    serde_json::from_slice(bytes)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(bytes)))
}

#[test]
fn forwards_method_body_and_proxy_headers() {
    let php = Php::start();
    let gw = GatewayOptions::to(&php).start();
    let url = gw.url("/echo.php?a=1&b=2");
    let (st, out) = curl(
        &[
            &["-X", "PUT", "--data-binary", "payload-123"],
            &PROXY_HEADERS[..],
            &[&url],
        ]
        .concat(),
    );
    assert!(st.success());
    let v = json(&out);
    assert_eq!(v["method"], "PUT");
    assert_eq!(v["uri"], "/echo.php?a=1&b=2");
    assert_eq!(v["body"], "payload-123");
    assert_forwarded(&v["headers"], gw.port, true);
}

/// Request headers that test forwarding: a forwarded-for chain (from an untrusted
/// client: replaced), a hop-by-hop header nominated by `Connection`, and one to keep.
const PROXY_HEADERS: [&str; 8] = [
    "-H",
    "X-Forwarded-For: 203.0.113.9",
    "-H",
    "Connection: keep-alive, X-Hop",
    "-H",
    "X-Hop: secret",
    "-H",
    "X-Keep: yes",
];

/// What the upstream must have received for `PROXY_HEADERS` (`Connection` only exists
/// in HTTP/1).
fn assert_forwarded(h: &serde_json::Value, gw_port: u16, http1: bool) {
    assert_eq!(h["host"], format!("127.0.0.1:{gw_port}"));
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-keep"], "yes");
    if http1 {
        assert!(
            h.get("x-hop").is_none(),
            "Connection-nominated header leaked: {h}"
        );
    }
}

/// Forwarding headers say who the client is and which site it asked for: believed (and
/// appended to) from a trusted proxy only. From anyone else they would let a client pose
/// as another address, or as another tenant's site to a backend that reads
/// `X-Forwarded-Host`. With and without `Accept: text/event-stream`.
#[test]
fn forwarding_headers_are_believed_only_from_trusted_proxies() {
    let php = Php::start();
    let sent = [
        "-H",
        "X-Forwarded-For: 203.0.113.9",
        "-H",
        "X-Forwarded-For: 198.51.100.7",
        "-H",
        "Forwarded: for=192.0.2.1;host=evil.example",
        "-H",
        "X-Real-IP: 192.0.2.1",
        "-H",
        "X-Forwarded-Host: evil.example",
        "-H",
        "X-Forwarded-Proto: https",
    ];
    for trusted in [false, true] {
        let mut opts = GatewayOptions::to(&php);
        if trusted {
            opts = opts.limits(
                "trusted_proxies = [\"127.0.0.1\"]\nrequest_rate = 0\nstream_connect_rate = 0\n",
            );
        }
        let gw = opts.start();
        for accept in ["*/*", "text/event-stream"] {
            let url = gw.url("/echo.php");
            let (st, out) =
                curl(&[&sent[..], &["-H", &format!("Accept: {accept}"), &url]].concat());
            assert!(st.success());
            let h = &json(&out)["headers"];
            let what = format!("trusted={trusted} accept={accept}: {h}");
            assert_eq!(h["x-forwarded-proto"], "http", "{what}");
            if trusted {
                assert_eq!(
                    h["x-forwarded-for"], "203.0.113.9, 198.51.100.7, 127.0.0.1",
                    "{what}"
                );
                assert_eq!(h["forwarded"], "for=192.0.2.1;host=evil.example", "{what}");
                assert_eq!(h["x-real-ip"], "192.0.2.1", "{what}");
                assert_eq!(h["x-forwarded-host"], "evil.example", "{what}");
            } else {
                assert_eq!(h["x-forwarded-for"], "127.0.0.1", "{what}");
                for gone in ["forwarded", "x-real-ip", "x-forwarded-host"] {
                    assert!(h.get(gone).is_none(), "{gone} passed: {what}");
                }
            }
        }
    }
}

#[test]
fn event_stream_requests_are_not_compressed_upstream() {
    let php = Php::start();
    let gw = GatewayOptions::to(&php).start();
    let (_, out) = curl(&[
        "-H",
        "Accept: text/event-stream",
        "-H",
        "Accept-Encoding: gzip, br",
        &gw.url("/echo.php"),
    ]);
    let v = json(&out);
    assert!(v["headers"].get("accept-encoding").is_none(), "{v}");
    // Other requests keep their Accept-Encoding.
    let (_, out) = curl(&["-H", "Accept-Encoding: gzip", &gw.url("/echo.php")]);
    assert_eq!(json(&out)["headers"]["accept-encoding"], "gzip");
}

#[test]
fn large_bodies_pass_both_ways() {
    let php = Php::start();
    let gw = GatewayOptions::to(&php).start();
    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join("big");
    let data: String = (0..200_000)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    std::fs::write(&file, &data).expect("write");
    let (st, out) = curl(&[
        "--data-binary",
        &format!("@{}", file.display()),
        &gw.url("/echo.php"),
    ]);
    assert!(st.success());
    assert_eq!(json(&out)["body"].as_str().map(str::len), Some(200_000));
}

#[test]
fn status_codes_pass_through() {
    let php = Php::start();
    let gw = GatewayOptions::to(&php).start();
    let (_, out) = curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &gw.url("/echo.php?status=422"),
    ]);
    assert_eq!(out, b"422");
    let (_, out) = curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &gw.url("/nope.php"),
    ]);
    assert_eq!(out, b"404");
}

#[test]
fn dead_upstream_is_502_with_a_short_body() {
    let dead = free_port();
    let gw = GatewayOptions::to_servers(vec![format!("127.0.0.1:{dead}")])
        .admin()
        .start();
    let (_, out) = curl(&["-w", "\n%{http_code}", &gw.url("/echo.php")]);
    let text = String::from_utf8_lossy(&out);
    assert!(text.ends_with("\n502"), "{text}");
    assert!(text.contains("Bad Gateway"), "{text}");
    let admin = gw.admin_port.expect("admin");
    let errors = "ssegate_upstream_errors_total{upstream=\"php\"}";
    assert_eq!(
        admin_metric(admin, errors),
        1.0,
        "one server, one failed connect"
    );
}

#[test]
fn slow_upstream_is_504() {
    let php = Php::start();
    let gw = Gateway::start(GatewayOptions {
        upstream_extra: "response_timeout = \"500ms\"".into(),
        ..GatewayOptions::to(&php).admin()
    });
    let (_, out) = curl(&["-w", "\n%{http_code}", &gw.url("/echo.php?sleep=3")]);
    let text = String::from_utf8_lossy(&out);
    assert!(text.ends_with("\n504"), "{text}");
    let admin = gw.admin_port.expect("admin");
    let errors = "ssegate_upstream_errors_total{upstream=\"php\"}";
    assert!(
        wait_for(|| admin_metric(admin, errors) == 1.0),
        "the timeout is an upstream error: {}\n{}",
        admin_metric(admin, errors),
        gw.log()
    );
    // A stream that answers its header in time may then stay quiet far longer.
    let (_, out) = curl(&["-N", &gw.url("/quiet.php?quiet=1.5")]);
    assert!(String::from_utf8_lossy(&out).contains("data: second"));
}

#[test]
fn refusing_server_is_skipped() {
    let php = Php::start();
    let dead = free_port();
    let gw = Gateway::start(GatewayOptions {
        servers: vec![
            format!("127.0.0.1:{dead}"),
            format!("127.0.0.1:{}", php.port),
        ],
        ..GatewayOptions::to(&php)
    });
    for _ in 0..4 {
        let (_, out) = curl(&[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &gw.url("/echo.php"),
        ]);
        assert_eq!(out, b"200");
    }
}

#[test]
fn http2_cleartext_ordinary_request() {
    let php = Php::start();
    let gw = GatewayOptions::to(&php).start();
    let (_, out) = curl(&[
        "--http2-prior-knowledge",
        "-w",
        "\n%{http_version}",
        &gw.url("/echo.php?h2=1"),
    ]);
    let text = String::from_utf8_lossy(&out);
    let (body, version) = text.rsplit_once('\n').expect("version line");
    assert_eq!(version, "2");
    let v = json(body.as_bytes());
    assert_eq!(v["uri"], "/echo.php?h2=1");
    assert_eq!(v["headers"]["host"], format!("127.0.0.1:{}", gw.port));
}

#[test]
fn websocket_upgrade_passes_through() {
    let port = free_port();
    let mut child = std::process::Command::new("node")
        .arg(repo().join("tests/node/ws_echo.mjs"))
        .arg(port.to_string())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("run node (the README's test command installs it)");
    wait_port(port, &mut child, "ws echo backend");
    let _backend = Proc { child };
    let gw = GatewayOptions::to_servers(vec![format!("127.0.0.1:{port}")]).start();
    let out = std::process::Command::new("node")
        .arg(repo().join("tests/node/ws_client.mjs"))
        .args([&format!("ws://127.0.0.1:{}/chat", gw.port), "3"])
        .output()
        .expect("run node");
    assert!(
        out.status.success(),
        "ws client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Vec<String> = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(
        got,
        [
            "hello 127.0.0.1",
            "echo ping 1",
            "echo ping 2",
            "echo ping 3"
        ]
    );
}

/// A GET that asks for an event stream may become a hub; whatever the upstream answers
/// instead, the client must see what an ordinary request gets, over HTTP/1.1 and HTTP/2.
#[test]
fn stream_requests_are_proxied_like_any_other() {
    let php = Php::start();
    let gw = Gateway::start(GatewayOptions {
        admin: true,
        ..GatewayOptions::to(&php)
    });
    let admin = gw.admin_port.expect("admin port");
    let connections = || {
        let series =
            |r| format!("ssegate_upstream_connections_total{{reused=\"{r}\",upstream=\"php\"}}");
        admin_metric(admin, &series("no")) + admin_metric(admin, &series("yes"))
    };
    let before = connections();
    for proto in ["--http1.1", "--http2-prior-knowledge"] {
        let url = gw.url("/echo.php?a=1&b=2");
        let sse = [proto, "-H", "Accept: text/event-stream"];
        let (st, out) = curl(&[&sse[..], &PROXY_HEADERS[..], &[&url]].concat());
        assert!(st.success(), "{proto}");
        let v = json(&out);
        assert_eq!(v["method"], "GET");
        assert_eq!(v["uri"], "/echo.php?a=1&b=2");
        assert_forwarded(&v["headers"], gw.port, proto == "--http1.1");

        for (path, code) in [
            ("/echo.php?status=422", "422"),
            ("/nope.php", "404"),
            ("/echo.php?status=204", "204"),
        ] {
            let out = http_code(&[proto, "-H", "Accept: text/event-stream", &gw.url(path)]);
            assert_eq!(out, code, "{proto} {path}");
        }
    }
    let after = connections();
    assert!(
        after - before >= 8.0,
        "upstream connections not counted: {before} -> {after}"
    );

    // Upstream failures: a refusing server is skipped, a dead upstream is a 502, a slow
    // one a 504.
    let dead = free_port();
    let gw = Gateway::start(GatewayOptions {
        servers: vec![
            format!("127.0.0.1:{dead}"),
            format!("127.0.0.1:{}", php.port),
        ],
        upstream_extra: "response_timeout = \"500ms\"".into(),
        ..GatewayOptions::to(&php)
    });
    let sse = ["-H", "Accept: text/event-stream", "-w", "\n%{http_code}"];
    for _ in 0..4 {
        let (_, out) = curl(&[&sse[..], &[gw.url("/echo.php").as_str()]].concat());
        assert!(String::from_utf8_lossy(&out).ends_with("\n200"));
    }
    let (_, out) = curl(&[&sse[..], &[gw.url("/echo.php?sleep=3").as_str()]].concat());
    assert!(String::from_utf8_lossy(&out).ends_with("\n504"));
    let gw = GatewayOptions::to_servers(vec![format!("127.0.0.1:{dead}")]).start();
    let (_, out) = curl(&[&sse[..], &[gw.url("/echo.php").as_str()]].concat());
    let text = String::from_utf8_lossy(&out);
    assert!(
        text.ends_with("\n502") && text.contains("Bad Gateway"),
        "{text}"
    );
}

/// nginx serving the files of a directory (a static origin: it sends a whole 1 MB
/// body at once, so the gateway's inner pass is still handing over its last task when
/// the client's copy is complete). Stopped when dropped.
struct StaticOrigin(
    std::process::Child,
    u16,
    #[allow(dead_code)] tempfile::TempDir,
);

impl StaticOrigin {
    fn serving(files: &[(&str, Vec<u8>)]) -> StaticOrigin {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        std::fs::create_dir(d.join("www")).expect("mkdir");
        for (name, body) in files {
            std::fs::write(d.join("www").join(name), body).expect("write");
        }
        let port = free_port();
        let conf = format!(
            "daemon off; worker_processes 1; pid {d}/nginx.pid; error_log {d}/error.log warn;\n\
             events {{ worker_connections 64; }}\n\
             http {{ access_log off; client_body_temp_path {d}/t1; proxy_temp_path {d}/t2;\n\
             fastcgi_temp_path {d}/t3; uwsgi_temp_path {d}/t4; scgi_temp_path {d}/t5;\n\
             server {{ listen 127.0.0.1:{port}; root {d}/www; }} }}\n",
            d = d.display()
        );
        std::fs::write(d.join("nginx.conf"), conf).expect("write");
        // Its own process group, so its worker goes with it.
        let mut child = std::process::Command::new("nginx")
            .process_group(0)
            .arg("-p")
            .arg(d)
            .arg("-c")
            .arg(d.join("nginx.conf"))
            .arg("-e")
            .arg(d.join("error.log"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("nginx (the README's test command installs it)");
        wait_port(port, &mut child, "nginx");
        StaticOrigin(child, port, dir)
    }
}

impl Drop for StaticOrigin {
    fn drop(&mut self) {
        kill_group(&mut self.0);
    }
}

/// Ordinary responses of any size go back over pooled upstream connections: a client
/// fetching 100 KB and 200 KB files sixty times in turn costs the gateway one or two
/// upstream connections. (Such a body ends with a separate last task; the gateway once
/// dropped its inner pass before that task was handed over, and about half of these
/// responses closed their upstream connection.)
#[test]
fn large_ordinary_responses_keep_their_upstream_connection() {
    let origin = StaticOrigin::serving(&[
        ("a.bin", vec![b'x'; 100 << 10]),
        ("b.bin", vec![b'y'; 200 << 10]),
    ]);
    let gw = Gateway::start(GatewayOptions {
        admin: true,
        ..GatewayOptions::to_servers(vec![format!("127.0.0.1:{}", origin.1)])
    });
    let admin = gw.admin_port.expect("admin port");
    let urls = [gw.url("/a.bin"), gw.url("/b.bin")];
    let mut args = vec!["-s", "-w", "%{size_download} "];
    for i in 0..60 {
        args.extend(["-o", "/dev/null", urls[i % 2].as_str()]);
    }
    let (st, out) = curl(&args);
    assert!(st.success());
    let sizes = String::from_utf8_lossy(&out).into_owned();
    let whole = sizes
        .split_whitespace()
        .filter(|s| ["102400", "204800"].contains(s))
        .count();
    assert_eq!(whole, 60, "{sizes}");
    let series =
        |r: &str| format!("ssegate_upstream_connections_total{{reused=\"{r}\",upstream=\"php\"}}");
    let (new, reused) = (
        admin_metric(admin, &series("no")),
        admin_metric(admin, &series("yes")),
    );
    assert!(
        new <= 2.0 && new + reused >= 60.0,
        "upstream connections for 60 responses: {new} new, {reused} reused"
    );
}

/// A backend that closes a kept-alive connection just as the next request arrives (an
/// idle timeout meeting a request in flight): the request, which has no body, goes
/// again on another connection instead of failing with 502; an `EventSource` GET too,
/// as streams take the same pool. A raw TCP backend of the
/// test's own: Apache closes idle connections on a timer, so the race cannot be made
/// to happen on demand with it.
#[test]
fn a_request_on_a_pooled_connection_the_backend_just_closed_goes_again() {
    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let connections = Arc::new(AtomicUsize::new(0));
    let counted = connections.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            counted.fetch_add(1, Ordering::SeqCst);
            std::thread::spawn(move || {
                // Answers the connection's first request; at the next one, closes.
                let Some(head) = read_request_head(&mut conn) else {
                    return;
                };
                let head = head.to_ascii_lowercase();
                let reply: &[u8] = if head.contains("accept: text/event-stream") {
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: 16\r\n\r\nid: 1\ndata: hi\n\n"
                } else {
                    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
                };
                let _ = conn.write_all(reply);
                let _ = conn.read(&mut [0u8; 4096]);
            });
        }
    });
    let gw = Gateway::start(GatewayOptions {
        admin: true,
        ..GatewayOptions::to_servers(vec![format!("127.0.0.1:{port}")])
    });
    let url = gw.url("/page");
    let mut codes = String::new();
    for _ in 0..5 {
        let (_, out) = curl(&["-s", "-o", "/dev/null", "-w", "%{http_code} ", &url]);
        codes.push_str(&String::from_utf8_lossy(&out));
        // Time for the connection to go back to the pool before the next request.
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(codes.trim(), "200 200 200 200 200", "{}", gw.log());
    // The last connection is back in the pool: a stream request takes it.
    let (_, out) = curl(&["-s", "-H", "Accept: text/event-stream", &url]);
    assert_eq!(
        String::from_utf8_lossy(&out),
        "id: 1\ndata: hi\n\n",
        "{}",
        gw.log()
    );
    let reused = admin_metric(
        gw.admin_port.expect("admin"),
        "ssegate_upstream_connections_total{reused=\"yes\",upstream=\"php\"}",
    );
    assert!(
        reused >= 5.0,
        "the pooled connections were not taken: {reused}"
    );
    assert!(connections.load(Ordering::SeqCst) >= 6);
}

/// Response heads as pingora reads them, since the gateway builds a patched pingora-core
/// (`vendor/README.md`: a response keeps an exact-size copy of what was read with its
/// head): an informational head, the final head and the first event arriving in one
/// read; and a head larger than the 4 KiB first read. A raw TCP backend of the test's
/// own: how a backend's bytes fall into reads cannot be chosen with Apache.
#[test]
fn heads_read_together_with_a_1xx_or_larger_than_one_read_are_parsed_whole() {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            std::thread::spawn(move || {
                let Some(head) = read_request_head(&mut conn) else {
                    return;
                };
                let stream_head =
                    "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n";
                let first: Vec<u8> = if head.starts_with("GET /early") {
                    // 103, then the stream's head and its first event: one write.
                    format!(
                        "HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n\
                         {stream_head}\r\n11\r\nid: 1\ndata: one\n\n\r\n"
                    )
                    .into_bytes()
                } else {
                    // A 6 KB header: more than pingora's first 4 KiB read.
                    format!(
                        "{stream_head}X-Big: {}\r\n\r\n11\r\nid: 1\ndata: one\n\n\r\n",
                        "b".repeat(6000)
                    )
                    .into_bytes()
                };
                if conn.write_all(&first).is_err() {
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(200));
                let _ = conn.write_all(b"11\r\nid: 2\ndata: two\n\n\r\n0\r\n\r\n");
                let _ = conn.read(&mut [0u8; 4096]);
            });
        }
    });
    let gw = Gateway::start(GatewayOptions::to_servers(vec![format!(
        "127.0.0.1:{port}"
    )]));
    for path in ["/early", "/big"] {
        let seen = sse(&gw.url(path), &[], 5.0);
        assert_eq!(seen.ids(), vec![1, 2], "{path}: {}", gw.log());
        if path == "/big" {
            // The large header reached the client whole.
            let big = format!("x-big: {}", "b".repeat(6000));
            assert!(
                seen.head.to_ascii_lowercase().contains(&big),
                "{}",
                seen.head
            );
        }
    }
}
