//! Replay store and hub: memory per cached event, and the cost of feeding a hub.
//!
//! `cargo bench --bench replay` prints the bytes held per cached event (counting
//! allocator), then criterion's timings for feeding events through a hub.

use std::hint::black_box;
use std::time::Duration;

mod common;

use criterion::{criterion_group, Criterion, Throughput};
use ssegate::hub::{NewHub, Registry, StreamKey, Viewer};
use ssegate::replay::{Budget, MemoryRing, RingBounds};

#[global_allocator]
static ALLOC: common::Counting = common::Counting;

fn bounds(max_events: usize) -> RingBounds {
    RingBounds {
        max_events,
        max_bytes: usize::MAX / 2,
        max_age: Duration::from_secs(3600),
    }
}

/// A typical notification event: id, type and a small JSON payload (~120 bytes).
fn event(i: u64) -> Vec<u8> {
    format!("id: {i}\nevent: notification\ndata: {{\"user\":42,\"kind\":\"comment\",\"text\":\"new reply on your post\",\"n\":{i}}}\n\n")
        .into_bytes()
}

fn memory_per_event() {
    let n = 10_000u64;
    let registry = Registry::new(1024, 10_000);
    let budget = Budget::new(usize::MAX / 2);
    let head = http::Response::new(()).into_parts().0;
    let before = common::live();
    let (hub, sub, _) = registry.create(
        NewHub::open(
            StreamKey::new([&b"bench"[..]]),
            false,
            head,
            Box::new(MemoryRing::new(bounds(n as usize), budget.clone())),
            1 << 20,
        ),
        Viewer {
            headers: &http::HeaderMap::new(),
            has_identity: false,
        },
    );
    drop(sub); // no subscriber: the hub only records
    let mut raw_bytes = 0;
    for i in 0..n {
        let e = event(i);
        raw_bytes += e.len();
        let _ = hub.feed(&e);
    }
    let after = common::live();
    let per = (after - before) as f64 / n as f64;
    println!(
        "replay memory: {per:.0} bytes per cached event of {:.0} raw bytes ({:.0} bytes of overhead); store reports {} bytes",
        raw_bytes as f64 / n as f64,
        per - raw_bytes as f64 / n as f64,
        budget.used()
    );
}

fn bench(c: &mut Criterion) {
    let registry = Registry::new(1024, 10_000);
    let budget = Budget::new(usize::MAX / 2);
    let head = http::Response::new(()).into_parts().0;
    let (hub, sub, _) = registry.create(
        NewHub::open(
            StreamKey::new([&b"bench"[..]]),
            false,
            head,
            Box::new(MemoryRing::new(bounds(1000), budget)),
            1 << 20,
        ),
        Viewer {
            headers: &http::HeaderMap::new(),
            has_identity: false,
        },
    );
    let chunk: Vec<u8> = (0..100).flat_map(event).collect();
    let mut g = c.benchmark_group("hub");
    g.throughput(Throughput::Bytes(chunk.len() as u64));
    g.bench_function("feed 100 events (parse, store, broadcast)", |b| {
        b.iter(|| black_box(hub.feed(black_box(&chunk))))
    });
    g.finish();
    drop(sub);
}

criterion_group!(benches, bench);

fn main() {
    memory_per_event();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
