//! Wakes the planner and the followers as soon as anything under the cluster's prefix changes,
//! so a join, a ready epoch or a new placement is acted on at once instead of at the next poll.
//! The watch is only a wake-up: every round re-reads the whole state, so a lost or compacted
//! watch costs nothing but latency, and the poll interval remains the fallback.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::WatchOptions;
use tokio::sync::Notify;
use tokio_stream::StreamExt;

/// Starts a task that watches `prefix` and notifies the returned handle on every change. It
/// re-creates the watch (after a second) whenever etcd goes away.
pub fn spawn_change_waker(etcd: crate::config::EtcdConnection, prefix: String) -> Arc<Notify> {
    let changes = Arc::new(Notify::new());
    let notify = Arc::clone(&changes);
    tokio::spawn(async move {
        loop {
            watch_until_broken(&etcd, &prefix, &notify).await;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    changes
}

async fn watch_until_broken(etcd: &crate::config::EtcdConnection, prefix: &str, notify: &Notify) {
    // No request timeout on this client: it would cut the watch stream.
    let Ok(mut client) = etcd.connect_for_streams().await else {
        return;
    };
    let Ok(mut stream) = client
        .watch(prefix, Some(WatchOptions::new().with_prefix()))
        .await
    else {
        return;
    };
    // Whatever changed while no watch was open.
    notify.notify_one();
    while let Some(Ok(response)) = stream.next().await {
        if response.canceled() {
            return;
        }
        if !response.events().is_empty() {
            notify.notify_one();
        }
    }
}
