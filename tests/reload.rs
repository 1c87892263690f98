//! Reload on SIGHUP: a changed route takes effect for new requests while an open stream
//! keeps flowing; a broken file is rejected and the old config keeps serving.

mod common;

use std::time::Duration;

use common::*;

fn status(url: &str) -> String {
    let (_, out) = curl(&["-s", "-o", "/dev/null", "-w", "%{http_code}", url]);
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn reload_changes_routes_for_new_requests_and_keeps_open_streams() {
    let php = Php::start();
    let gw = GatewayOptions::to(&php).admin().start();
    let conf = gw.dir.path().join("ssegate.toml");
    let original = std::fs::read_to_string(&conf).expect("config");
    let stream = curl_stream(&gw.url("/legacy.php?n=40&interval=0.1"), 20, &[]);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(status(&gw.url("/echo.php")), "200");

    // A new route sends /echo.php to a dead upstream.
    let dead = free_port();
    let changed = format!(
        "{original}\n[[upstreams]]\nname = \"dead\"\nservers = [\"127.0.0.1:{dead}\"]\n\n[[routes]]\nname = \"echo\"\npath_prefix = \"/echo.php\"\nupstream = \"dead\"\n"
    );
    std::fs::write(&conf, &changed).expect("write");
    gw.signal("HUP");
    assert!(
        wait_for(|| gw.log().contains("configuration reloaded")),
        "{}",
        gw.log()
    );
    assert_eq!(
        status(&gw.url("/echo.php")),
        "502",
        "the new route is in force"
    );

    // A broken file is rejected, with its place named; the last good config stays.
    std::fs::write(
        &conf,
        format!("{changed}\n[[routes]]\nupstream = \"nope\"\n"),
    )
    .expect("write");
    gw.signal("HUP");
    assert!(
        wait_for(|| gw.log().contains("reload rejected")),
        "{}",
        gw.log()
    );
    assert!(gw.log().contains("routes[2].upstream"), "{}", gw.log());
    assert_eq!(status(&gw.url("/echo.php")), "502");
    assert_eq!(status(&gw.url("/quiet.php?quiet=0")), "200");

    // The stream opened before both reloads got all of its events.
    let out = read_all_with_limit(stream, Duration::from_secs(20));
    let (events, _) = parse_stream(&out);
    let ids: Vec<u32> = events.iter().filter_map(|e| e.0.parse().ok()).collect();
    assert_eq!(ids, (1..=40).collect::<Vec<_>>());

    let admin = format!("http://127.0.0.1:{}/metrics", gw.admin_port.expect("admin"));
    let (_, m) = curl(&[&admin]);
    let m = String::from_utf8_lossy(&m);
    assert!(
        m.contains("ssegate_config_reloads_total{result=\"ok\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("ssegate_config_reloads_total{result=\"error\"} 1"),
        "{m}"
    );
}

#[test]
fn reload_replaces_the_tls_certificate_for_new_handshakes() {
    let php = Php::start();
    let gw = GatewayOptions::to(&php).tls().start();
    let cert = gw.cert.as_ref().expect("cert");
    // Keep a copy of the old certificate: its file is overwritten below.
    let keep = tempfile::tempdir().expect("tmp");
    let old_copy = keep.path().join("old.pem");
    std::fs::copy(&cert.cert, &old_copy).expect("copy");
    let ca_old = old_copy.display().to_string();
    let (st, _) = curl(&["--cacert", &ca_old, &gw.tls_url("/echo.php")]);
    assert!(st.success());
    // Same file names, new key pair: after SIGHUP only the new certificate is trusted.
    let fresh = tempfile::tempdir().expect("tmp");
    let new = TestCert::generate(fresh.path());
    let ca_new = fresh.path().join("ca.pem");
    std::fs::copy(&new.cert, &ca_new).expect("copy");
    std::fs::copy(&new.cert, &cert.cert).expect("install cert");
    std::fs::copy(&new.key, &cert.key).expect("install key");
    gw.signal("HUP");
    assert!(
        wait_for(|| gw.log().contains("configuration reloaded")),
        "{}",
        gw.log()
    );
    let (st, _) = curl(&[
        "--cacert",
        &ca_new.display().to_string(),
        &gw.tls_url("/echo.php"),
    ]);
    assert!(st.success(), "the new certificate is served");
    let (st, _) = curl(&["--cacert", &ca_old, &gw.tls_url("/echo.php")]);
    assert!(!st.success(), "the old certificate is still served");
}

/// A reload that leaves the limits as they were keeps their state: a client that used
/// its burst does not get a fresh one, globally or on a route.
#[test]
fn a_reload_keeps_the_limiters_state() {
    let php = Php::start();
    let gw = GatewayOptions::to(&php)
        .limits("request_rate = 0.05\nrequest_burst = 4\nstream_connect_rate = 0\n")
        .extra("\n[[routes]]\nname = \"page\"\npath_prefix = \"/es_page.html\"\nupstream = \"php\"\nlimits = { request_rate = 0.05, request_burst = 1 }\n")
        .start();
    let conf = gw.dir.path().join("ssegate.toml");
    let from = |iface: &str, path: &str| {
        let url = gw.url(path);
        let (_, out) = curl(&[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--interface",
            iface,
            &url,
        ]);
        String::from_utf8_lossy(&out).into_owned()
    };
    // Client 1 uses the global burst (4); client 2 the route's (1), and at most 2 of
    // its global 4, so a refusal of client 2 after the reload is the route's.
    for _ in 0..4 {
        assert_eq!(from("127.0.0.1", "/echo.php"), "200");
    }
    assert_eq!(from("127.0.0.1", "/echo.php"), "429");
    assert_eq!(from("127.0.0.2", "/es_page.html"), "200");
    assert_eq!(from("127.0.0.2", "/es_page.html"), "429");
    let text = std::fs::read_to_string(&conf).expect("config");
    std::fs::write(&conf, format!("{text}\n# touched\n")).expect("write");
    gw.signal("HUP");
    assert!(
        wait_for(|| gw.log().contains("configuration reloaded")),
        "{}",
        gw.log()
    );
    assert_eq!(
        from("127.0.0.1", "/echo.php"),
        "429",
        "global burst renewed"
    );
    assert_eq!(
        from("127.0.0.2", "/es_page.html"),
        "429",
        "route burst renewed"
    );
}
