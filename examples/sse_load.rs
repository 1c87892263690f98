//! SSE load tool: opens N concurrent event streams over HTTP/1.1, h2c or TLS h2 and
//! reports, as one JSON object, per-event latency percentiles (from the send time the
//! `sse_origin` example puts in each event), lost and duplicated events (by the event
//! number), heartbeats, and errors.
//!
//! Usage: cargo run --release --example sse_load -- --url http://127.0.0.1:8080/stream \
//!            --clients 1000 --duration 30 [--proto h1|h2c|h2] [--ca cert.pem]

mod common;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use common::mono_ns;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpSocket;

#[derive(Parser, Debug, Clone)]
struct Args {
    /// Stream URL (http:// for h1 and h2c, https:// for h2).
    #[arg(long)]
    url: String,
    /// Concurrent streams.
    #[arg(long, default_value_t = 100)]
    clients: usize,
    /// Seconds to keep the streams open.
    #[arg(long, default_value_t = 20)]
    duration: u64,
    /// Seconds at the start not counted in the latency figures (connections opening).
    #[arg(long, default_value_t = 5)]
    warmup: u64,
    /// h1, h2c or h2 (TLS).
    #[arg(long, default_value = "h1")]
    proto: String,
    /// CA certificate (PEM) to trust for h2.
    #[arg(long)]
    ca: Option<std::path::PathBuf>,
    /// Spread the connections' source addresses over 127.0.0.1 ..= 127.0.0.N.
    #[arg(long, default_value_t = 16)]
    sources: u8,
    /// Streams per HTTP/2 connection.
    #[arg(long, default_value_t = 100)]
    streams_per_conn: usize,
    /// New connections per second while opening.
    #[arg(long, default_value_t = 2000)]
    ramp: u64,
    /// More ports on the same host (gateway nodes of one cluster): connections go to the
    /// URL's port and these in turn, all with the URL's `Host`, as behind a balancer.
    #[arg(long, value_delimiter = ',')]
    nodes: Vec<u16>,
    /// Give each stream a query of its own (`c=<n>`): one stream key per client.
    #[arg(long)]
    distinct: bool,
}

#[derive(Default)]
struct Totals {
    connected: AtomicU64,
    errors: AtomicU64,
    events: AtomicU64,
    /// Events received after the warm-up.
    measured: AtomicU64,
    lost: AtomicU64,
    duplicated: AtomicU64,
    heartbeats: AtomicU64,
}

struct Shared {
    totals: Totals,
    latency: Mutex<Histogram<u64>>,
    record_from: Instant,
    end: Instant,
}

/// A number field `"name":123` in the event's data.
fn field(data: &str, name: &str) -> Option<u64> {
    let at = data.find(name)? + name.len();
    let rest = &data[at..];
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// Reads one stream's body until the end of the run.
async fn read_stream(
    body: hyper::body::Incoming,
    shared: &Shared,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let mut body = body;
    let mut parser = ssegate::sse::Parser::new(1 << 20);
    let mut last: Option<u64> = None;
    let mut lat = Vec::with_capacity(64);
    let mut at_line_start = true;
    loop {
        let frame = tokio::select! {
            f = body.frame() => f,
            _ = tokio::time::sleep_until(shared.end.into()) => return Ok(()),
        };
        let Some(frame) = frame else {
            return Err("stream ended".into());
        };
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        let now = mono_ns();
        // Heartbeats are comment lines; count lines that start with ':'.
        for &b in data.iter() {
            if at_line_start && b == b':' {
                shared.totals.heartbeats.fetch_add(1, Ordering::Relaxed);
            }
            at_line_start = b == b'\n' || b == b'\r';
        }
        parser.push(&data);
        while let Some(ev) = parser.next_event()? {
            let (Some(n), Some(t)) = (field(&ev.data, "\"n\":"), field(&ev.data, "\"t\":")) else {
                continue;
            };
            shared.totals.events.fetch_add(1, Ordering::Relaxed);
            match last {
                Some(l) if n == l + 1 => {}
                Some(l) if n > l => {
                    shared.totals.lost.fetch_add(n - l - 1, Ordering::Relaxed);
                }
                Some(_) => {
                    shared.totals.duplicated.fetch_add(1, Ordering::Relaxed);
                }
                None => {}
            }
            last = Some(last.map_or(n, |l| l.max(n)));
            if Instant::now() >= shared.record_from {
                shared.totals.measured.fetch_add(1, Ordering::Relaxed);
                lat.push(now.saturating_sub(t) / 1000);
            }
        }
        if !lat.is_empty() {
            if let Ok(mut h) = shared.latency.lock() {
                for v in lat.drain(..) {
                    let _ = h.record(v.max(1));
                }
            }
        }
    }
}

/// Counts a failure (and prints the first few).
fn fail(shared: &Shared, e: &dyn std::fmt::Display) {
    if shared.totals.errors.fetch_add(1, Ordering::Relaxed) < 5 {
        eprintln!("sse_load: {e}");
    }
}

/// Sends one stream request and reads the stream until the end of the run.
async fn follow(
    sent: impl std::future::Future<Output = hyper::Result<hyper::Response<hyper::body::Incoming>>>,
    shared: &Shared,
) {
    match sent.await {
        Ok(resp) if resp.status() == 200 => {
            shared.totals.connected.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = read_stream(resp.into_body(), shared).await {
                fail(shared, &e);
            }
        }
        Ok(resp) => fail(shared, &format!("status {}", resp.status())),
        Err(e) => fail(shared, &e),
    }
}

type Conn = Box<dyn IoStream>;
trait IoStream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> IoStream for T {}

async fn connect(
    addr: SocketAddr,
    source: IpAddr,
    tls: Option<&(
        tokio_rustls::TlsConnector,
        rustls_pki_types::ServerName<'static>,
    )>,
) -> std::io::Result<Conn> {
    let sock = TcpSocket::new_v4()?;
    sock.bind(SocketAddr::new(source, 0))?;
    let tcp = sock.connect(addr).await?;
    tcp.set_nodelay(true)?;
    match tls {
        None => Ok(Box::new(tcp)),
        Some((c, name)) => Ok(Box::new(c.connect(name.clone(), tcp).await?)),
    }
}

fn request(uri: &hyper::Uri, authority: &str, client: Option<usize>) -> Request<Empty<Bytes>> {
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let path = match client {
        Some(c) if path.contains('?') => format!("{path}&c={c}"),
        Some(c) => format!("{path}?c={c}"),
        None => path.to_owned(),
    };
    let mut b = Request::get(path);
    if uri.scheme_str() == Some("https") || uri.scheme_str() == Some("http") {
        b = b.header("host", authority);
    }
    b.header("accept", "text/event-stream")
        .body(Empty::new())
        .unwrap_or_default()
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let uri: hyper::Uri = args.url.parse()?;
    let host = uri.host().ok_or("no host in --url")?.to_owned();
    let port = uri.port_u16().unwrap_or(80);
    let authority = format!("{host}:{port}");
    let addr: SocketAddr = tokio::net::lookup_host(&authority)
        .await?
        .next()
        .ok_or("cannot resolve the host")?;
    let mut addrs = vec![addr];
    addrs.extend(args.nodes.iter().map(|p| SocketAddr::new(addr.ip(), *p)));
    let tls = if args.proto == "h2" {
        let mut roots = rustls::RootCertStore::empty();
        let ca = args.ca.as_ref().ok_or("--proto h2 needs --ca")?;
        use rustls_pki_types::pem::PemObject;
        for c in rustls_pki_types::CertificateDer::pem_file_iter(ca)? {
            roots.add(c?)?;
        }
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec()];
        let name = rustls_pki_types::ServerName::try_from(host.clone())?;
        Some((tokio_rustls::TlsConnector::from(Arc::new(config)), name))
    } else {
        None
    };
    let tls = Arc::new(tls);
    let start = Instant::now();
    let shared = Arc::new(Shared {
        totals: Totals::default(),
        latency: Mutex::new(Histogram::new_with_bounds(1, 60_000_000, 3)?),
        record_from: start + Duration::from_secs(args.warmup),
        end: start + Duration::from_secs(args.duration),
    });
    let per_conn = if args.proto == "h1" {
        1
    } else {
        args.streams_per_conn.max(1)
    };
    let conns = args.clients.div_ceil(per_conn);
    let gap = Duration::from_secs_f64(per_conn as f64 / args.ramp.max(1) as f64);
    let mut tasks = vec![];
    for i in 0..conns {
        let streams = per_conn.min(args.clients - i * per_conn);
        let source = IpAddr::V4(Ipv4Addr::new(
            127,
            0,
            0,
            1 + (i % args.sources.max(1) as usize) as u8,
        ));
        let (shared, tls, uri, authority, proto) = (
            shared.clone(),
            tls.clone(),
            uri.clone(),
            authority.clone(),
            args.proto.clone(),
        );
        let addr = addrs[i % addrs.len()];
        let distinct = args.distinct.then_some(i * per_conn);
        tasks.push(tokio::spawn(async move {
            let io = match connect(addr, source, (*tls).as_ref()).await {
                Ok(io) => TokioIo::new(io),
                Err(e) => return fail(&shared, &e),
            };
            if proto == "h1" {
                let (mut sender, conn) = match hyper::client::conn::http1::handshake(io).await {
                    Ok(x) => x,
                    Err(e) => return fail(&shared, &e),
                };
                tokio::spawn(conn);
                let req = request(&uri, &authority, distinct);
                follow(sender.send_request(req), &shared).await;
            } else {
                let (sender, conn) =
                    match hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await {
                        Ok(x) => x,
                        Err(e) => return fail(&shared, &e),
                    };
                tokio::spawn(conn);
                let mut handles = vec![];
                for j in 0..streams {
                    let req = request(&uri, &authority, distinct.map(|d| d + j));
                    let (mut sender, shared) = (sender.clone(), shared.clone());
                    handles.push(tokio::spawn(async move {
                        follow(sender.send_request(req), &shared).await
                    }));
                }
                for h in handles {
                    let _ = h.await;
                }
            }
        }));
        tokio::time::sleep(gap).await;
    }
    for t in tasks {
        let _ = t.await;
    }
    let t = &shared.totals;
    let h = shared.latency.lock().map_err(|_| "histogram lock")?;
    let report = serde_json::json!({
        "proto": args.proto,
        "clients": args.clients,
        "connected": t.connected.load(Ordering::Relaxed),
        "errors": t.errors.load(Ordering::Relaxed),
        "events": t.events.load(Ordering::Relaxed),
        "measured": t.measured.load(Ordering::Relaxed),
        "measured_secs": args.duration.saturating_sub(args.warmup),
        "lost": t.lost.load(Ordering::Relaxed),
        "duplicated": t.duplicated.load(Ordering::Relaxed),
        "heartbeats": t.heartbeats.load(Ordering::Relaxed),
        "latency_us": {
            "samples": h.len(),
            "p50": h.value_at_quantile(0.5),
            "p90": h.value_at_quantile(0.9),
            "p99": h.value_at_quantile(0.99),
            "max": h.max(),
        },
    });
    println!("{report}");
    Ok(())
}
