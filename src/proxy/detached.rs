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
/// `async fn`, and one block rather than a call per protocol: an `async fn` keeps its
/// arguments beside the copies it moves them into, and the task lives as long as the
/// stream (an idle stream's task measured 3.4 KiB with a call per protocol).
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
        if client.is_http2() {
            return serve_h2(client, stream, &mut ctx, &metrics).await;
        }
        let mut h1 = match relay::H1Stream::take(client) {
            Ok(h1) => h1,
            // Boxed, as rare (see `serve_h2`): inline, this state would size the task.
            Err(client) => return Box::pin(serve_h2(client, stream, &mut ctx, &metrics)).await,
        };
        ctx.relay = Some(stream.run_h1(&mut h1).await);
        access::log(&metrics, &access::Line::from(&h1.exchange), None, &ctx);
        drop(ctx); // the request is over, in-flight count included
                   // Then the connection goes back to the app for its next request, if it may be
                   // kept alive.
        let Some(conn) = h1.reusable(*shutdown.borrow()) else {
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
}

/// An HTTP/2 stream on its body writer: the stream is over (or reset as its writer
/// drops, if it ended early) and the connection goes on. The context is borrowed, not
/// moved: see [`serve`].
async fn serve_h2(
    client: Box<ServerSession>,
    stream: Box<relay::Streaming>,
    ctx: &mut RequestCtx,
    metrics: &Metrics,
) {
    let mut h2 = match relay::H2Stream::take(client) {
        Ok(h2) => h2,
        // A session neither could take (pingora's other kinds): as it is. Boxed, as
        // rare: inline it would size every stream's task.
        Err(mut session) => {
            ctx.relay = Some(Box::pin(stream.run(&mut session)).await);
            access::log(metrics, &access::Line::of(&session), None, ctx);
            return;
        }
    };
    ctx.relay = Some(stream.run_h2(&mut h2).await);
    access::log(metrics, &access::Line::from(&h2.exchange), None, ctx);
}
