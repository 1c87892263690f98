//! Real clients over every edge protocol: the `h2` crate over cleartext (h2c prior
//! knowledge), curl over TLS with ALPN h2, and the npm `eventsource` package.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use common::*;

/// Opens `n` streams at once on ONE h2c connection and reads each to its end.
async fn h2c_streams(port: u16, path: &str, n: usize) -> Vec<Vec<u8>> {
    let client = h2c_connect(port).await;
    let mut tasks = vec![];
    for _ in 0..n {
        let mut client = client.clone().ready().await.expect("h2 ready");
        let req = http::Request::get(format!("http://127.0.0.1:{port}{path}"))
            .header("accept", "text/event-stream")
            .body(())
            .expect("request");
        let (resp, _) = client.send_request(req, true).expect("send");
        tasks.push(tokio::spawn(async move {
            let resp = resp.await.expect("response");
            assert_eq!(resp.status(), 200);
            assert_eq!(
                resp.headers()["content-type"]
                    .to_str()
                    .ok()
                    .map(|s| s.starts_with("text/event-stream")),
                Some(true)
            );
            assert!(resp.headers().get("content-length").is_none());
            let mut body = resp.into_body();
            let mut out = vec![];
            while let Some(chunk) = body.data().await {
                let chunk: Bytes = chunk.expect("data");
                let _ = body.flow_control().release_capacity(chunk.len());
                out.extend_from_slice(&chunk);
            }
            out
        }));
    }
    let mut outs = vec![];
    for t in tasks {
        outs.push(t.await.expect("stream task"));
    }
    outs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_many_concurrent_streams_on_one_connection() {
    let php = Php::start();
    let gw = GatewayOptions::to(&php)
        .extra("[sse]\nheartbeat_interval = \"300ms\"\n")
        .start();
    let outs = tokio::time::timeout(
        Duration::from_secs(30),
        h2c_streams(gw.port, "/legacy.php?n=5&interval=0.1", 12),
    )
    .await
    .expect("streams finished in time");
    assert_eq!(outs.len(), 12);
    for out in &outs {
        let (events, last) = parse_stream(out);
        let ids: Vec<_> = events.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(ids, ["1", "2", "3", "4", "5"]);
        assert_eq!(last, "5");
    }
    // Heartbeats reach h2 clients too.
    let outs = h2c_streams(gw.port, "/quiet.php?quiet=1.2", 2).await;
    for out in outs {
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains(":heartbeat\n\n"), "{text}");
        assert_eq!(parse_stream(&out).0.len(), 2);
    }
}

#[test]
fn tls_h2_many_streams_on_one_connection_with_curl() {
    let php = Php::start();
    let gw = GatewayOptions::to(&php).tls().start();
    let cert = gw.cert.as_ref().expect("cert");
    let dir = tempfile::tempdir().expect("tmp");
    let n = 12;
    let mut args: Vec<String> = vec![
        "-sS".into(),
        "--http2".into(),
        "--parallel".into(),
        "--parallel-max".into(),
        "20".into(),
        "--cacert".into(),
        cert.cert.display().to_string(),
        "-w".into(),
        "%{http_version} %{num_connects}\\n".into(),
    ];
    for i in 0..n {
        args.push("-o".into());
        args.push(dir.path().join(format!("out{i}")).display().to_string());
        args.push(gw.tls_url("/legacy.php?n=5&interval=0.2"));
    }
    let out = Command::new("curl")
        .args(&args)
        .stderr(Stdio::inherit())
        .output()
        .expect("curl");
    assert!(out.status.success(), "curl failed");
    let report = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<_> = report.lines().collect();
    assert_eq!(lines.len(), n, "{report}");
    // All over HTTP/2, and all but one transfer reused the first connection.
    assert!(lines.iter().all(|l| l.starts_with("2 ")), "{report}");
    let connects: u32 = lines
        .iter()
        .filter_map(|l| l.split(' ').nth(1)?.parse::<u32>().ok())
        .sum();
    assert_eq!(connects, 1, "streams were not multiplexed: {report}");
    for i in 0..n {
        let body = std::fs::read(dir.path().join(format!("out{i}"))).expect("output");
        let (events, _) = parse_stream(&body);
        assert_eq!(
            events.len(),
            5,
            "stream {i}: {}",
            String::from_utf8_lossy(&body)
        );
    }
}

#[test]
fn tls_needs_tls12_plus_and_sets_forwarded_proto() {
    let php = Php::start();
    let gw = GatewayOptions::to(&php).tls().start();
    let cert = gw.cert.as_ref().expect("cert");
    let ca = cert.cert.display().to_string();
    // SECLEVEL=0 lets OpenSSL 3 offer TLS 1.1 at all: without it the client refuses on
    // its own side and the check could not fail. The control server shows it can.
    let tls11 = |url: &str| {
        let flags = ["--tlsv1.1", "--tls-max", "1.1", "--ciphers"];
        let mut args = vec!["--cacert", &ca, "-o", "/dev/null"];
        args.extend_from_slice(&flags);
        args.extend_from_slice(&["DEFAULT:@SECLEVEL=0", url]);
        curl(&args).0.success()
    };
    let (_control, port) = permissive_tls_server(cert);
    assert!(tls11(&format!("https://localhost:{port}/")), "the probe");
    assert!(!tls11(&gw.tls_url("/echo.php")), "TLS 1.1 was accepted");
    let (st, out) = curl(&[
        "--cacert",
        &ca,
        "--http1.1",
        "-w",
        "%{http_version}",
        "-o",
        "/dev/null",
        &gw.tls_url("/echo.php"),
    ]);
    assert!(st.success());
    assert_eq!(out, b"1.1");
    let (_, out) = curl(&["--cacert", &ca, &gw.tls_url("/echo.php")]);
    let v: serde_json::Value = serde_json::from_slice(&out).expect("json");
    assert_eq!(v["headers"]["x-forwarded-proto"], "https");
}

fn assert_consecutive(v: &serde_json::Value, n: usize, want: usize) {
    let clients = v["clients"].as_array().expect("clients");
    assert_eq!(clients.len(), n);
    for c in clients {
        let ids = json_ids(c);
        assert_eq!(ids.len(), want, "{c}");
        assert!(
            ids.windows(2).all(|w| w[1] == w[0] + 1),
            "gap or duplicate: {ids:?}"
        );
        assert_eq!(c["errors"], 0, "{c}");
    }
}

#[test]
fn npm_eventsource_clients_over_http1_and_tls() {
    let php = Php::start();
    let gw = GatewayOptions::to(&php).tls().start();
    let v = node_clients(&gw.url("/broadcast.php?period=0.1"), 10, 8, 20_000, None);
    assert_consecutive(&v, 10, 8);
    let ca = gw.cert.as_ref().expect("cert").cert.clone();
    let v = node_clients(
        &gw.tls_url("/broadcast.php?period=0.1"),
        10,
        8,
        20_000,
        Some(&ca),
    );
    assert_consecutive(&v, 10, 8);
}

#[test]
fn tls_chooses_the_certificate_by_sni_and_refuses_old_suites() {
    let php = Php::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let api = TestCert::for_names(dir.path(), "api", &["api.test", "*.feeds.test"]);
    let gw = GatewayOptions::to(&php)
        .tls_with(&format!(
            ", sni = [{{ names = [\"api.test\", \"Live.Feeds.test\"], cert = \"{}\", key = \"{}\" }}]",
            api.cert.display(),
            api.key.display()
        ))
        .start();
    let port = gw.tls_port.expect("tls");
    let default_ca = gw.cert.as_ref().expect("cert").cert.display().to_string();
    let api_ca = api.cert.display().to_string();
    let get = |host: &str, ca: &str, extra: &[&str]| {
        let resolve = format!("{host}:{port}:127.0.0.1");
        let url = format!("https://{host}:{port}/es_page.html");
        let mut args = vec!["--resolve", &resolve, "--cacert", ca, "-o", "/dev/null"];
        args.extend_from_slice(extra);
        args.push(&url);
        curl(&args).0.success()
    };
    // Each name gets its own certificate (verified against its own CA).
    assert!(get("api.test", &api_ca, &[]));
    assert!(get("live.feeds.test", &api_ca, &[]));
    assert!(get("localhost", &default_ca, &[]));
    // The default is not served for a listed name, nor the SNI one for another name.
    assert!(!get("api.test", &default_ca, &[]));
    assert!(!get("localhost", &api_ca, &[]));
    // Modern suites only: a TLS 1.2 CBC suite is refused, an AEAD one accepted. The CBC
    // suite is an ECDHE-ECDSA one, which the ECDSA test certificate could serve: the
    // control server shows the probe succeeds where the suite is allowed.
    let cbc = ["--tls-max", "1.2", "--ciphers", "ECDHE-ECDSA-AES128-SHA"];
    let (_control, control_port) = permissive_tls_server(gw.cert.as_ref().expect("cert"));
    let control = format!("https://localhost:{control_port}/");
    let mut args = vec!["--cacert", &default_ca, "-o", "/dev/null"];
    args.extend_from_slice(&cbc);
    args.push(&control);
    assert!(curl(&args).0.success(), "the probe");
    assert!(
        !get("localhost", &default_ca, &cbc),
        "a CBC suite was accepted"
    );
    assert!(get(
        "localhost",
        &default_ca,
        &[
            "--tls-max",
            "1.2",
            "--ciphers",
            "ECDHE-ECDSA-AES128-GCM-SHA256"
        ]
    ));
}

#[test]
fn an_sni_certificate_that_does_not_cover_its_name_is_a_config_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = TestCert::for_names(dir.path(), "a", &["localhost"]);
    let b = TestCert::for_names(dir.path(), "b", &["api.test"]);
    let conf = dir.path().join("ssegate.toml");
    std::fs::write(
        &conf,
        format!(
            "[[listeners]]\naddress = \"127.0.0.1:0\"\ntls = {{ cert = \"{}\", key = \"{}\", sni = [{{ names = [\"other.test\"], cert = \"{}\", key = \"{}\" }}] }}\n\n[[upstreams]]\nname = \"php\"\nservers = [\"127.0.0.1:1\"]\n\n[[routes]]\nupstream = \"php\"\n",
            a.cert.display(),
            a.key.display(),
            b.cert.display(),
            b.key.display()
        ),
    )
    .expect("write");
    let out = std::process::Command::new(bin())
        .args(["-t", "-c"])
        .arg(&conf)
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("ssegate.toml:3:")
            && err.contains("listeners[0].tls.sni[0].names")
            && err.contains("other.test"),
        "{err}"
    );
}
