//! A hub's pump: feeds it from its upstream until the upstream ends or nobody (here or,
//! in a cluster, on another node) has read it for its linger window.

use std::sync::Arc;
use std::time::Duration;

use pingora::protocols::http::HttpTask;

use super::pooled::Pooled;
use crate::cluster::{Cluster, Tag};
use crate::hub::{Hub, Registry};

/// Feeds a hub from its upstream until the upstream ends or the hub has had no
/// subscriber for its linger window (nor, with `watch`, any other node's client); then
/// closes the upstream (by dropping the feed) and unregisters.
pub(super) async fn pump(
    hub: Arc<Hub>,
    registry: Arc<Registry>,
    mut feed: Box<Pooled>,
    linger: Duration,
    watch: Option<(Arc<Cluster>, Tag)>,
) {
    let mut alive = true;
    let idle = hub.idle_for(linger);
    tokio::pin!(idle);
    while alive {
        tokio::select! {
            t = feed.next_task() => alive = t.is_some_and(|t| feed_task(&hub, t)),
            _ = &mut idle => {
                let watched = match &watch {
                    // Boxed: asked once per linger window, and inline it would size the
                    // task of every stream, clustered or not.
                    Some((cluster, tag)) => Box::pin(cluster.watched(tag)).await,
                    None => false,
                };
                if !watched && hub.end_if_idle() {
                    tracing::debug!("stream without clients for its linger window: closing upstream");
                    alive = false;
                } else {
                    // Someone attached just now, or follows from another node: wait
                    // for the next idle window.
                    idle.set(hub.idle_for(linger));
                }
            }
        }
    }
    hub.end();
    registry.remove(&hub);
}

/// Feeds one upstream task to a hub; `false` when the upstream stream is over.
pub(super) fn feed_task(hub: &Hub, t: HttpTask) -> bool {
    match t {
        HttpTask::Body(Some(b), end) => match hub.feed(&b) {
            Ok(_) => !end,
            Err(e) => {
                tracing::warn!("closing stream: upstream sent an {e}");
                false
            }
        },
        HttpTask::Body(None, end) | HttpTask::UpgradedBody(_, end) => !end,
        HttpTask::Header(..) => true,
        HttpTask::Trailer(_) | HttpTask::Done | HttpTask::Failed(_) => false,
    }
}
