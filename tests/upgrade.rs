//! Zero-downtime binary upgrade: a new process takes the listening sockets over
//! (pingora's graceful upgrade) and the recent events of every stream (`handover`), so
//! EventSource clients on a legacy backend that ignores `Last-Event-ID` see every event
//! exactly once, and no connection is refused meanwhile.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;

/// Opens plain requests one after another until `stop`, counting those that failed.
fn probe(port: u16, stop: Arc<AtomicBool>, tries: Arc<AtomicUsize>, failures: Arc<AtomicUsize>) {
    while !stop.load(Ordering::Relaxed) {
        tries.fetch_add(1, Ordering::Relaxed);
        let ok = (|| -> std::io::Result<bool> {
            let mut s = TcpStream::connect(("127.0.0.1", port))?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            s.write_all(b"GET /es_page.html HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")?;
            let mut out = Vec::new();
            s.read_to_end(&mut out)?;
            Ok(out.starts_with(b"HTTP/1.1 200"))
        })();
        if !matches!(ok, Ok(true)) {
            eprintln!("probe failed: {ok:?}");
            failures.fetch_add(1, Ordering::Relaxed);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn upgrade_hands_streams_over_with_no_event_lost_or_repeated() {
    let php = Php::start();
    upgrade_loses_nothing(
        GatewayOptions::to(&php).start(),
        "handover: took a stream over",
    );
}

/// With a cluster, the new process follows the old one's streams through Redis (its
/// clients resume from the shared history), and takes them over when the old one exits
/// and hands off (the two read the upstream side by side for a moment, merged by id).
#[test]
fn upgrade_with_a_cluster_moves_streams_through_redis_with_no_event_lost_or_repeated() {
    let php = Php::start();
    let redis = Redis::start();
    let cluster = format!(
        "[cluster]\nredis = \"{}\"\nkey_secret = \"a test secret of enough bytes\"\nnode_id = \"n\"\nlease = \"3s\"\ntimeout = \"200ms\"\n",
        redis.url()
    );
    let gw = GatewayOptions::to(&php).extra(&cluster).start();
    // Connected before the clients come (otherwise the node serves alone, by design).
    std::thread::sleep(Duration::from_millis(500));
    upgrade_loses_nothing(gw, "cluster: took a stream over");
}

/// Upgrades `gw` under 8 EventSource clients of a legacy broadcast feed and a prober of
/// plain requests: no event lost or repeated, no request failed, and the new process's
/// log says `took` (how it took the streams over).
fn upgrade_loses_nothing(mut gw: Gateway, took: &str) {
    let url = gw.url("/broadcast.php?period=0.05");
    let clients = 8;

    let stop = Arc::new(AtomicBool::new(false));
    let tries = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(AtomicUsize::new(0));
    let prober = std::thread::spawn({
        let (port, stop, tries, failures) =
            (gw.port, stop.clone(), tries.clone(), failures.clone());
        move || probe(port, stop, tries, failures)
    });
    // Long enough for: connect, the upgrade (pingora's 5 s overlap of both processes,
    // then the streams end), the 1 s reconnection delay, and a few seconds on the new
    // process.
    let reader = std::thread::spawn(move || node_clients(&url, clients, 1_000_000, 18_000, None));

    std::thread::sleep(Duration::from_secs(3));
    let mut old = gw.upgrade();
    let started = std::time::Instant::now();
    let mut exited = None;
    while started.elapsed() < Duration::from_secs(25) {
        if let Ok(Some(_)) = old.child.try_wait() {
            exited = Some(started.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let report = reader.join().expect("clients");
    stop.store(true, Ordering::Relaxed);
    prober.join().expect("prober");
    let old_log = gw.log();
    let new_log = gw.new_log();
    let exited = exited.unwrap_or_else(|| panic!("the old process did not exit\n{old_log}"));

    let (mut sent, mut received, mut lost, mut duplicated, mut longest_gap) = (0, 0, 0, 0, 0);
    let mut reconnects = 0;
    for c in report["clients"].as_array().expect("clients") {
        let ids = json_ids(c);
        let times: Vec<u64> = c["times"]
            .as_array()
            .map(|a| a.iter().filter_map(|t| t.as_u64()).collect())
            .unwrap_or_default();
        assert!(ids.len() > 100, "a client got too few events: {c}");
        sent += ids[ids.len() - 1] - ids[0] + 1;
        received += ids.len() as u64;
        for w in ids.windows(2) {
            if w[1] <= w[0] {
                duplicated += 1;
            } else {
                lost += w[1] - w[0] - 1;
            }
        }
        longest_gap = longest_gap.max(times.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0));
        reconnects += c["errors"].as_u64().unwrap_or(0);
    }
    let probes = tries.load(Ordering::Relaxed);
    let refused = failures.load(Ordering::Relaxed);
    eprintln!(
        "upgrade: clients={clients} sent={sent} received={received} lost={lost} \
         duplicated={duplicated} longest_gap_ms={longest_gap} reconnects={reconnects} \
         probes={probes} failed_probes={refused} old_exit_after_quit={exited:?}"
    );
    assert!(
        reconnects >= clients as u64,
        "every client should have been moved to the new process: {reconnects}\n{old_log}"
    );
    assert_eq!(
        (lost, duplicated),
        (0, 0),
        "events lost or repeated across the upgrade\nold:\n{old_log}\nnew:\n{new_log}"
    );
    assert_eq!(
        refused, 0,
        "requests failed during the upgrade ({probes} tried)"
    );
    assert!(probes > 100, "the prober barely ran: {probes}");
    assert!(
        new_log.contains(took),
        "the new process did not log {took:?}:\n{new_log}"
    );
    // The PID file names the new process, which serves on alone.
    let pid = std::fs::read_to_string(gw.dir.path().join("ssegate.pid")).unwrap_or_default();
    assert_eq!(pid.trim(), gw.pid().to_string());
    let (status, body) = curl(&[&gw.url("/es_page.html")]);
    assert!(status.success() && !body.is_empty());
}
