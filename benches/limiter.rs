//! The limiter's cost per check, and its memory per tracked client.
//!
//! `cargo bench --bench limiter` prints criterion's timings, then a line with the bytes
//! the limiter's state takes per tracked client (measured with a counting allocator).

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::num::NonZeroU32;

mod common;

use criterion::{criterion_group, Criterion};
use ssegate::limit::{ClientKey, Decision, LimitSettings, Limiter, Rate, RouteLimiter};

#[global_allocator]
static ALLOC: common::Counting = common::Counting;

fn settings(max_tracked_clients: usize) -> LimitSettings {
    LimitSettings {
        request_rate: Some(Rate {
            per_second: 1e6,
            burst: NonZeroU32::new(1_000_000).expect("nonzero"),
        }),
        stream_connect_rate: Some(Rate {
            per_second: 1e6,
            burst: NonZeroU32::new(1_000_000).expect("nonzero"),
        }),
        max_streams_per_client: 0,
        max_streams: 0,
        max_tracked_clients,
    }
}

fn key(i: u32) -> ClientKey {
    ClientKey(IpAddr::V4(Ipv4Addr::from(0x0A00_0000 + i)))
}

fn bench(c: &mut Criterion) {
    let limits = Limiter::new(settings(1_000_000));
    let route = RouteLimiter::default();
    let hot = key(1);
    c.bench_function("check_request, one client", |b| {
        b.iter(|| {
            black_box(matches!(
                limits.check_request(black_box(&hot), &route),
                Decision::Allow(())
            ))
        })
    });
    let mut i = 0u32;
    c.bench_function("check_request, 100k clients round robin", |b| {
        b.iter(|| {
            i = (i + 1) % 100_000;
            black_box(matches!(
                limits.check_request(&key(i), &route),
                Decision::Allow(())
            ))
        })
    });
    c.bench_function("open_stream + release", |b| {
        b.iter(|| black_box(limits.open_stream(black_box(&hot))))
    });
}

fn memory_per_client() {
    let n = 100_000u32;
    let before = common::live();
    let limits = Limiter::new(settings(1_000_000));
    let route = RouteLimiter::default();
    for i in 0..n {
        let _ = limits.check_request(&key(i), &route);
    }
    let after = common::live();
    println!(
        "limiter memory: {:.1} bytes per tracked client ({} clients, {} bytes, request limiter only)",
        (after - before) as f64 / f64::from(n),
        n,
        after - before
    );
    drop(limits);
}

criterion_group!(benches, bench);

fn main() {
    memory_per_client();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
