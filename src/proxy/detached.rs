//! An event stream's life after [`super::Gateway::detach`]: outside pingora's request
//! loop, in a task of its own, on what the stream still needs of its client (an
//! HTTP/1.x stream's bare connection, an HTTP/2 stream's body writer), until its
//! access line; then an HTTP/1.x connection goes back to pingora's app.

use std::sync::{Arc, OnceLock, Weak};

use pingora::apps::ServerApp;
use pingora::protocols::http::ServerSession;

use super::{access, App, RequestCtx};
use crate::metrics::Metrics;
use crate::relay;

/// Serves the rest of `stream` to `client`, then logs it. A block rather than an
/// `async fn`: the fn would keep its arguments beside the states they move into, and
/// the task lives as long as the stream (an idle stream measured 15.3 KiB against
/// 14.6).
#[allow(clippy::manual_async_fn)] // see above: the block is smaller
pub(super) fn serve(
    client: Box<ServerSession>,
    stream: Box<relay::Streaming>,
    mut ctx: RequestCtx,
    metrics: Arc<Metrics>,
    app: Arc<OnceLock<Weak<App>>>,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> impl std::future::Future<Output = ()> + Send {
    async move {
        match relay::H1Stream::take(client) {
            Ok(h1) => serve_h1(h1, stream, ctx, &metrics, &app, shutdown).await,
            // HTTP/2: the stream is over (or reset as its writer drops, if it ended
            // early) and the connection goes on.
            Err(client) => match relay::H2Stream::take(client) {
                Ok(mut h2) => {
                    ctx.relay = Some(stream.run_h2(&mut h2).await);
                    access::log(&metrics, &access::Line::from(&h2.exchange), None, &ctx);
                }
                // A session neither could take (pingora's other kinds): as it is.
                Err(mut session) => {
                    ctx.relay = Some(stream.run(&mut session).await);
                    access::log(&metrics, &access::Line::of(&session), None, &ctx);
                }
            },
        }
    }
}

/// An HTTP/1.x stream outside pingora's loop, on its bare connection; then the
/// connection goes back to the app for its next request if it may be kept alive.
async fn serve_h1(
    mut client: relay::H1Stream,
    stream: Box<relay::Streaming>,
    mut ctx: RequestCtx,
    metrics: &Metrics,
    app: &OnceLock<Weak<App>>,
    shutdown: tokio::sync::watch::Receiver<bool>,
) {
    ctx.relay = Some(stream.run_h1(&mut client).await);
    access::log(metrics, &access::Line::from(&client.exchange), None, &ctx);
    drop(ctx); // the request is over, in-flight count included
    let Some(conn) = client.reusable(*shutdown.borrow()) else {
        return;
    };
    let Some(app) = app.get().and_then(Weak::upgrade) else {
        return;
    };
    crate::conn::rearm(&conn);
    // Boxed: pingora's request futures are large and needed only once the stream is
    // over; inline they would size the stream's task for its whole life.
    Box::pin(app.process_new(conn, &shutdown)).await;
}
