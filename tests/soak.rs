//! Soak: constant reconnect churn, slow readers and clients that never read, for
//! SOAK_SECS seconds (default 600), while the gateway's memory is sampled. Its memory
//! must be flat: after the warm-up, the last samples stay within a margin of the first.
//! Not part of CI (it takes minutes): run it with `scripts/soak`.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[test]
#[ignore = "minutes long: run it with scripts/soak"]
fn soak_memory_stays_flat_under_churn_and_slow_clients() {
    let secs: u64 = std::env::var("SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(600);
    let php = Php::start();
    let gw = GatewayOptions::to(&php)
        .admin()
        .replay("linger = \"3s\"\nmax_events = 500\n")
        .extra("[routes.sse]\nwrite_timeout = \"2s\"\nheartbeat_interval = \"1s\"\n")
        .start();
    let admin = gw.admin_port.expect("admin");
    let end = Instant::now() + Duration::from_secs(secs);
    let stop = Arc::new(AtomicBool::new(false));
    let events = Arc::new(AtomicU64::new(0));
    let mut workers = vec![];

    // Churn: streams of random length, half of them resuming with Last-Event-ID.
    for w in 0..8 {
        let (url, stop, events) = (
            gw.url("/broadcast.php?period=0.02"),
            stop.clone(),
            events.clone(),
        );
        workers.push(std::thread::spawn(move || {
            let mut last = String::new();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let secs = format!("{:.2}", 0.2 + ((i * 7 + w) % 13) as f64 / 10.0);
                let header = format!("Last-Event-ID: {last}");
                let mut args = vec!["-s", "-N", "--max-time", &secs];
                if i.is_multiple_of(2) && !last.is_empty() {
                    args.extend(["-H", &header]);
                }
                args.push(&url);
                let (_, out) = curl(&args);
                let (seen, id) = parse_stream(&out);
                events.fetch_add(seen.len() as u64, Ordering::Relaxed);
                if !id.is_empty() {
                    last = id;
                }
            }
        }));
    }
    // Slow readers and clients that never read, on a fast, fat stream.
    for w in 0..4 {
        let (port, stop) = (gw.port, stop.clone());
        workers.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
                    continue;
                };
                let _ = s.write_all(
                    b"GET /big.php?size=20000&n=2000 HTTP/1.1\r\nHost: a\r\nAccept: text/event-stream\r\n\r\n",
                );
                let until = Instant::now() + Duration::from_secs(4);
                let mut b = [0u8; 64];
                while Instant::now() < until {
                    if w % 2 == 0 {
                        // A trickle: 64 bytes every 50 ms.
                        if matches!(s.read(&mut b), Ok(0) | Err(_)) {
                            break;
                        }
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }));
    }

    let mut samples = vec![];
    let started = Instant::now();
    while Instant::now() < end {
        std::thread::sleep(
            Duration::from_secs(10).min(end.saturating_duration_since(Instant::now())),
        );
        let s = (
            started.elapsed().as_secs(),
            rss_kib(gw.pid()),
            admin_metric(admin, "ssegate_hubs"),
            admin_metric(admin, "ssegate_connections_open"),
        );
        eprintln!(
            "soak t={}s rss={} KiB hubs={} connections={}",
            s.0, s.1, s.2, s.3
        );
        samples.push(s);
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.join();
    }
    let delivered = events.load(Ordering::Relaxed);
    let requests = admin_metric(admin, "ssegate_requests_total");
    // Warm-up: the first minute (allocator pools, limiter and hub tables reach size).
    let warm: Vec<_> = samples.iter().filter(|s| s.0 >= 60).collect();
    assert!(
        warm.len() >= 2,
        "too short a soak: set SOAK_SECS to 120 or more"
    );
    let first = warm[0].1;
    let last = warm[warm.len() - 1].1;
    let max = warm.iter().map(|s| s.1).max().unwrap_or(0);
    eprintln!(
        "soak result: {secs}s, {requests} requests, {delivered} events read by the churn clients; \
         RSS after warm-up {first} KiB, at the end {last} KiB, max {max} KiB"
    );
    assert!(delivered > 0 && requests > 100.0);
    assert!(
        last <= first + first / 4 + 8 * 1024,
        "memory grew: {first} KiB -> {last} KiB"
    );
}
