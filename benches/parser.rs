//! SSE parser throughput (MB/s) on realistic events and adversarial input, and a hub's
//! fan-out (events per second to N in-process subscribers).
//!
//! `cargo bench --bench parser`

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ssegate::hub::{HubMsg, NewHub, Registry, Start, StreamKey, Viewer};
use ssegate::replay::{Budget, MemoryRing, RingBounds};
use ssegate::sse::Parser;

/// 1 MiB of typical notification events (~120 bytes each).
fn typical() -> Vec<u8> {
    let mut out = Vec::new();
    let mut i = 0u64;
    while out.len() < 1 << 20 {
        i += 1;
        out.extend_from_slice(format!("id: {i}\nevent: notification\ndata: {{\"user\":42,\"kind\":\"comment\",\"text\":\"new reply on your post\",\"n\":{i}}}\n\n").as_bytes());
    }
    out
}

/// Token-stream style events: many tiny `data:` events (LLM output).
fn tokens() -> Vec<u8> {
    let mut out = Vec::new();
    while out.len() < 1 << 20 {
        out.extend_from_slice(b"data: {\"t\":\" the\"}\n\n");
    }
    out
}

/// CRLF line endings everywhere.
fn crlf() -> Vec<u8> {
    String::from_utf8_lossy(&typical())
        .replace('\n', "\r\n")
        .into_bytes()
}

/// One 1 MB event (a single data line).
fn huge() -> Vec<u8> {
    let mut out = b"id: 1\ndata: ".to_vec();
    out.extend(std::iter::repeat_n(b'x', 1 << 20));
    out.extend_from_slice(b"\n\n");
    out
}

fn parse_all(input: &[u8], chunk: usize, payload: bool) -> usize {
    let mut p = if payload {
        Parser::new(4 << 20)
    } else {
        Parser::boundaries_only(4 << 20)
    };
    let mut n = 0;
    for c in input.chunks(chunk) {
        p.push(c);
        while let Ok(Some(ev)) = p.next_block() {
            n += ev.raw.len();
        }
    }
    n
}

fn parser(c: &mut Criterion) {
    let mut g = c.benchmark_group("parser");
    g.measurement_time(Duration::from_secs(3));
    let inputs = [
        ("typical", typical(), 16 * 1024),
        ("tokens", tokens(), 16 * 1024),
        ("crlf", crlf(), 16 * 1024),
        ("1MB event", huge(), 16 * 1024),
        ("typical, 1-byte chunks", typical()[..64 * 1024].to_vec(), 1),
    ];
    for (name, input, chunk) in &inputs {
        g.throughput(Throughput::Bytes(input.len() as u64));
        // What a client sees (data and type decoded) and what the gateway uses (blocks).
        g.bench_with_input(BenchmarkId::new("events", name), input, |b, i| {
            b.iter(|| black_box(parse_all(i, *chunk, true)))
        });
        g.bench_with_input(BenchmarkId::new("blocks", name), input, |b, i| {
            b.iter(|| black_box(parse_all(i, *chunk, false)))
        });
    }
    g.finish();
}

fn fan_out(c: &mut Criterion) {
    let mut g = c.benchmark_group("hub fan-out");
    g.measurement_time(Duration::from_secs(3));
    let events: Vec<u8> = typical()[..100 * 118].to_vec();
    for subscribers in [1usize, 100, 1000] {
        g.throughput(Throughput::Elements(100 * subscribers as u64));
        g.bench_function(BenchmarkId::from_parameter(subscribers), |b| {
            let registry = Registry::new(4096, 10);
            let bounds = RingBounds {
                max_events: 1000,
                max_bytes: 1 << 30,
                max_age: Duration::from_secs(3600),
            };
            let (hub, first, _) = registry.create(
                NewHub::open(
                    StreamKey::new([&b"bench"[..]]),
                    true,
                    http::Response::new(()).into_parts().0,
                    Box::new(MemoryRing::new(bounds, Budget::new(1 << 30))),
                    1 << 20,
                ),
                Viewer {
                    headers: &http::HeaderMap::new(),
                    has_identity: false,
                },
            );
            let mut subs = vec![first];
            for _ in 1..subscribers {
                subs.extend(hub.subscribe(Start::Live));
            }
            b.iter(|| {
                // Feed ~100 events, then every subscriber takes them.
                hub.feed(&events).ok();
                let mut got = 0;
                for s in &mut subs {
                    while let Ok(HubMsg::Block(b)) = s.rx.try_recv() {
                        got += b.raw.len();
                    }
                }
                black_box(got)
            })
        });
    }
    g.finish();
}

criterion_group!(benches, parser, fan_out);
criterion_main!(benches);
