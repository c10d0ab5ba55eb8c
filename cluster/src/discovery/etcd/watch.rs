//! The process's one etcd watch stream: a watch per key range of the topics its subscribers
//! want, feeding the [`WatchHub`]. When the stream breaks it reconnects with a growing
//! backoff and resumes each range from the first revision it has not delivered, so nothing
//! written meanwhile is missed. After a compaction (the resume point is gone), or when etcd's
//! revision went back (a new data directory), it re-lists instead: every subscriber is woken
//! to re-read, and the watches start from the current revision.

use std::collections::HashMap;
use std::sync::Weak;
use std::time::Duration;

use etcd_client::{GetOptions, WatchOptions};
use tokio::sync::watch;

use super::connection::EtcdConnection;
use crate::discovery::watch::{KeyRange, Topic, Topics, WatchHub};

const FIRST_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Where each range's watch resumes after the stream broke.
#[derive(Default)]
struct Resume {
    /// Range key to the first revision not yet delivered for it.
    next: HashMap<String, i64>,
    /// etcd's revision when the stream was last opened or last answered (0: never).
    seen: i64,
}

enum Ended {
    /// Every discovery handle of the process is gone.
    HubGone,
    /// Someone subscribed to a topic not watched yet.
    TopicsChanged,
    /// The resume point was compacted away.
    Compacted,
    Broken(String),
}

/// Starts the loop; it ends when the hub is dropped.
pub(crate) fn spawn(
    connection: EtcdConnection,
    hub: Weak<WatchHub>,
    wanted: watch::Receiver<Topics>,
) {
    tokio::spawn(run(connection, hub, wanted));
}

async fn run(connection: EtcdConnection, hub: Weak<WatchHub>, mut wanted: watch::Receiver<Topics>) {
    let mut resume = Resume::default();
    let mut backoff = FIRST_BACKOFF;
    loop {
        let topics = *wanted.borrow_and_update();
        if topics.is_empty() {
            if wanted.changed().await.is_err() {
                return;
            }
            continue;
        }
        let stream = Stream {
            connection: &connection,
            hub: &hub,
            topics,
        };
        match stream.run(&mut wanted, &mut resume, &mut backoff).await {
            Ended::HubGone => return,
            Ended::TopicsChanged => {}
            Ended::Compacted => {
                tracing::info!("etcd compacted past the watch: re-listing");
                resume = Resume::default();
            }
            Ended::Broken(error) => {
                tracing::debug!(%error, ?backoff, "etcd watch broken; reconnecting");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// One watch stream over the ranges of `topics`.
struct Stream<'a> {
    connection: &'a EtcdConnection,
    hub: &'a Weak<WatchHub>,
    topics: Topics,
}

impl Stream<'_> {
    async fn run(
        &self,
        wanted: &mut watch::Receiver<Topics>,
        resume: &mut Resume,
        backoff: &mut Duration,
    ) -> Ended {
        let Some(keys) = self.hub.upgrade().map(|h| h.keys().clone()) else {
            return Ended::HubGone;
        };
        let ranges = self.topics.ranges(&keys);
        let (mut stream, fresh) = match self.open(keys.root(), &ranges, resume).await {
            Ok(opened) => opened,
            Err(e) => return Ended::Broken(e.to_string()),
        };
        *backoff = FIRST_BACKOFF;
        let Some(hub) = self.hub.upgrade() else {
            return Ended::HubGone;
        };
        for topic in fresh {
            hub.changed(topic);
        }
        drop(hub);
        loop {
            tokio::select! {
                changed = wanted.changed() => {
                    if changed.is_err() {
                        return Ended::HubGone;
                    }
                    if *wanted.borrow() != self.topics {
                        return Ended::TopicsChanged;
                    }
                }
                message = stream.message() => {
                    let response = match message {
                        Ok(Some(response)) => response,
                        Ok(None) => return Ended::Broken("stream closed".into()),
                        Err(e) => return Ended::Broken(e.to_string()),
                    };
                    if response.compact_revision() > 0 {
                        return Ended::Compacted;
                    }
                    if response.canceled() {
                        return Ended::Broken(format!("canceled: {}", response.cancel_reason()));
                    }
                    let Some(hub) = self.hub.upgrade() else {
                        return Ended::HubGone;
                    };
                    if let Some(header) = response.header() {
                        resume.seen = resume.seen.max(header.revision());
                    }
                    for kv in response.events().iter().filter_map(|e| e.kv()) {
                        let key = String::from_utf8_lossy(kv.key());
                        if let Some((_, range)) = ranges.iter().find(|(_, r)| r.contains(&key)) {
                            resume.next.insert(range.key.clone(), kv.mod_revision() + 1);
                        }
                        hub.key_changed(&key);
                    }
                }
            }
        }
    }

    /// Connects and opens a watch per range, each from its resume point (ranges without one
    /// start after the current revision). Returns the stream and the topics whose
    /// subscribers must re-read because their ranges had no resume point.
    async fn open(
        &self,
        root: &str,
        ranges: &[(Topic, KeyRange)],
        resume: &mut Resume,
    ) -> Result<(etcd_client::WatchStream, Vec<Topic>), etcd_client::Error> {
        // No request timeout on this client: it would cut the watch stream.
        let mut client = self.connection.connect_for_streams().await?;
        let options = GetOptions::new().with_prefix().with_count_only();
        let now = tokio::time::timeout(
            crate::discovery::kv::CALL_TIMEOUT,
            client.get(root, Some(options)),
        )
        .await
        .map_err(|_| etcd_client::Error::InvalidArgs("etcd did not answer in time".into()))??
        .header()
        .map(|h| h.revision())
        .unwrap_or(0);
        if resume.seen == 0 || now < resume.seen {
            // First open, compacted, or etcd's history went back: re-list.
            resume.next.clear();
        }
        resume.seen = now;
        let mut fresh = Vec::new();
        let mut requests = Vec::with_capacity(ranges.len());
        for (topic, range) in ranges {
            let start = *resume.next.entry(range.key.clone()).or_insert_with(|| {
                if !fresh.contains(topic) {
                    fresh.push(*topic);
                }
                now + 1
            });
            let mut options = WatchOptions::new().with_start_revision(start);
            if range.prefix {
                options = options.with_prefix();
            }
            requests.push((range.key.clone(), options));
        }
        let mut requests = requests.into_iter();
        let Some((key, options)) = requests.next() else {
            return Err(etcd_client::Error::InvalidArgs("nothing to watch".into()));
        };
        let mut stream = client.watch(key, Some(options)).await?;
        for (key, options) in requests {
            stream.watch(key, Some(options)).await?;
        }
        Ok((stream, fresh))
    }
}
