//! Unbuffered delivery: each event reaches a client through the gateway about as soon as
//! it does directly. Kept in its own test binary so nothing else competes for the CPU.
//! The margins are loose on purpose (noisy 2-core machines); a buffering proxy misses
//! them by seconds. Speed targets live in `benches/`, not here.

mod common;

use common::*;

/// Delay of each event in ms: receive wall-clock time minus the PHP send time in `t`.
fn delays(lines: &[TimedLine]) -> Vec<f64> {
    lines
        .iter()
        .filter_map(|l| {
            let json = l.line.strip_prefix("data: ")?;
            let v: serde_json::Value = serde_json::from_str(json).ok()?;
            let sent = v["t"].as_f64()?;
            let got =
                l.at.duration_since(std::time::UNIX_EPOCH)
                    .ok()?
                    .as_secs_f64();
            Some((got - sent) * 1000.0)
        })
        .collect()
}

#[test]
fn each_event_arrives_as_fast_as_direct() {
    let php = Php::start();
    let gw = GatewayOptions::to(&php).start();
    let path = "/legacy.php?n=150&interval=0.02";
    let direct = delays(&curl_lines(&[&php.url(path)]));
    let through = delays(&curl_lines(&[&gw.url(path)]));
    assert_eq!(direct.len(), 150);
    assert_eq!(through.len(), 150);
    let (d_med, d_max) = median_max(direct);
    let (g_med, g_max) = median_max(through);
    println!("per-event delay over 150 events: direct median {d_med:.2} ms max {d_max:.2} ms; through ssegate median {g_med:.2} ms max {g_max:.2} ms");
    assert!(
        g_med < d_med + 50.0,
        "median {g_med:.1} ms vs direct {d_med:.1} ms"
    );
    assert!(
        g_max < d_max + 750.0,
        "max {g_max:.1} ms vs direct {d_max:.1} ms"
    );
}
