//! A synthetic SSE origin for benchmarks (HTTP/1.1, hyper).
//!
//! `GET .../stream`: every client gets the same numbered events, `--rate` per second of
//! about `--size` bytes each, carrying the send time (CLOCK_MONOTONIC, ns) so a client on
//! the same machine can measure the latency. `GET /idle`: the stream's header, then
//! nothing (for memory per open stream). Anything else: 404.
//!
//! Usage: cargo run --release --example sse_origin -- --port 9000 --rate 10 --size 200

mod common;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use common::mono_ns;
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::Frame;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::sync::broadcast;

#[derive(Parser, Debug)]
struct Args {
    /// Port on 127.0.0.1.
    #[arg(long, default_value_t = 9000)]
    port: u16,
    /// Events per second, to every client at once.
    #[arg(long, default_value_t = 10.0)]
    rate: f64,
    /// Approximate event size in bytes (the data is padded).
    #[arg(long, default_value_t = 200)]
    size: usize,
}

type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, Infallible>;

fn stream_response(rx: broadcast::Receiver<Bytes>) -> Response<Body> {
    let events = futures::stream::unfold(rx, |mut rx| async move {
        loop {
            match rx.recv().await {
                Ok(b) => return Some((Ok::<_, Infallible>(Frame::data(b)), rx)),
                // A client this far behind loses events; the load tool counts them.
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    Response::builder()
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(StreamBody::new(events).boxed_unsync())
        .unwrap_or_default()
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let (tx, _) = broadcast::channel::<Bytes>(4096);
    let clients = Arc::new(AtomicUsize::new(0));
    {
        let tx = tx.clone();
        let pad = "x".repeat(args.size.saturating_sub(60));
        let period = Duration::from_secs_f64(1.0 / args.rate.max(0.001));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            for n in 1u64.. {
                tick.tick().await;
                let ev = format!(
                    "id: {n}\ndata: {{\"n\":{n},\"t\":{},\"p\":\"{pad}\"}}\n\n",
                    mono_ns()
                );
                let _ = tx.send(Bytes::from(ev));
            }
        });
    }
    let addr = SocketAddr::from(([127, 0, 0, 1], args.port));
    let listener = tokio::net::TcpListener::bind(addr).await?;
    eprintln!(
        "sse_origin: listening on {addr}, {} events/s of ~{} bytes",
        args.rate, args.size
    );
    loop {
        let (sock, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = sock.set_nodelay(true);
        let tx = tx.clone();
        let clients = clients.clone();
        tokio::spawn(async move {
            clients.fetch_add(1, Ordering::Relaxed);
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let tx = tx.clone();
                async move {
                    let path = req.uri().path();
                    // Any prefix: a gateway route may keep its own (`/shared/stream`).
                    let resp = match path.rsplit('/').next().unwrap_or("") {
                        "stream" => stream_response(tx.subscribe()),
                        "idle" => Response::builder()
                            .header("content-type", "text/event-stream")
                            .body(
                                StreamBody::new(futures::stream::pending::<
                                    Result<Frame<Bytes>, Infallible>,
                                >())
                                .boxed_unsync(),
                            )
                            .unwrap_or_default(),
                        _ => Response::builder()
                            .status(404)
                            .body(Empty::new().boxed_unsync())
                            .unwrap_or_default(),
                    };
                    Ok::<_, Infallible>(resp)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(sock), service)
                .await;
            clients.fetch_sub(1, Ordering::Relaxed);
        });
    }
}
