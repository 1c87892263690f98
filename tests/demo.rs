//! The demo page (demo/index.html) in headless Chromium, served as scripts/demo serves
//! it: the legacy feed on Apache + mod_php, ssegate in front. Both columns lose their
//! connection at once; the direct one shows the gap, the one through ssegate none, its
//! replayed events marked, and the gateway's own metrics panel shows the replay hit.

mod common;

use std::process::Command;

use common::*;

#[test]
fn the_demo_page_shows_the_gap_without_ssegate_and_none_through_it() {
    let php = Php::serving(&repo().join("demo"));
    let gw = GatewayOptions::to(&php)
        .replay("linger = \"30s\"\n")
        .admin()
        .extra("replay = { shared = true, last_event_id_param = \"lastEventId\" }\n\n[sse]\nheartbeat_interval = \"1s\"\n")
        .start();
    let page = format!(
        "{}?every=0.2&away=2&direct=http://127.0.0.1:{}&admin_port={}",
        gw.url("/index.html"),
        php.port,
        gw.admin_port.expect("admin")
    );
    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("demo.png");
    let out = Command::new("node")
        .arg(repo().join("tests/node/demo_page.mjs"))
        .args([page.as_str(), &shot.display().to_string(), "30000"])
        .output()
        .expect("run node");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "browser output ({e}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let after = &v["after"];
    // Away for 2 s at 5 events a second: about ten events happen meanwhile.
    assert!(after["direct"]["reconnects"].as_u64() >= Some(1), "{v}");
    assert!(
        after["direct"]["missing"].as_u64() >= Some(3),
        "the direct column shows no gap: {v}"
    );
    assert!(after["gateway"]["reconnects"].as_u64() >= Some(1), "{v}");
    assert_eq!(after["gateway"]["missing"], 0, "a gap through ssegate: {v}");
    assert!(
        after["gateway"]["replayed"].as_u64() >= Some(1),
        "nothing marked replayed: {v}"
    );
    assert!(
        after["panel"]["hits"].as_u64() >= Some(1),
        "the panel shows no hit: {v}"
    );
    assert!(after["panel"]["replayed"].as_u64() >= Some(1), "{v}");
    assert!(
        shot.metadata().map(|m| m.len() > 10_000).unwrap_or(false),
        "no screenshot"
    );
    eprintln!("demo page: {v}\nscreenshot: {}", shot.display());
}
