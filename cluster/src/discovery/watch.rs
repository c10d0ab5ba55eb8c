//! Wake-ups by topic. A process subscribes to the topics it acts on and re-reads what it
//! needs when woken; a write wakes only the subscribers of its key's topic (a router's serving
//! epoch does not wake the planners, a node's ready key does not wake the followers).
//!
//! The wake-up is not the state: subscribers re-read a [`super::Snapshot`] (or the records
//! they follow), so a lost or coalesced wake-up costs latency, never correctness, and the
//! poll interval remains the fallback. The etcd backend feeds the hub from the process's one
//! watch stream (see `etcd/watch.rs`); the in-memory store feeds it on each write.

use std::sync::{Arc, Mutex, Weak};

use tokio::sync::{watch, Notify};

use super::keys::ClusterKeys;

/// A group of keys that change together and that some process acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Topic {
    /// Node records, ready epochs, suspect reports and the planner key: what the planner
    /// plans from.
    Members,
    /// Router records (their serving epochs): when a node may release old experts.
    Routers,
    /// The placement key.
    Placement,
    /// The routers' collective records.
    Collectives,
    /// Operators' drain requests.
    Drains,
}

impl Topic {
    pub const ALL: [Topic; 5] = [
        Topic::Members,
        Topic::Routers,
        Topic::Placement,
        Topic::Collectives,
        Topic::Drains,
    ];

    /// The key ranges of this topic (disjoint across topics).
    pub(crate) fn ranges(self, keys: &ClusterKeys) -> Vec<KeyRange> {
        let prefix = |key| KeyRange { key, prefix: true };
        let exact = |key| KeyRange { key, prefix: false };
        match self {
            Topic::Members => vec![
                prefix(keys.nodes()),
                prefix(keys.ready_prefix()),
                prefix(keys.suspects()),
                exact(keys.planner()),
            ],
            Topic::Routers => vec![prefix(keys.routers())],
            Topic::Placement => vec![exact(keys.placement())],
            Topic::Collectives => vec![prefix(keys.collectives())],
            Topic::Drains => vec![prefix(keys.drains())],
        }
    }

    /// The topic `key` belongs to, if any.
    pub(crate) fn of_key(keys: &ClusterKeys, key: &str) -> Option<Topic> {
        Topic::ALL
            .into_iter()
            .find(|t| t.ranges(keys).iter().any(|r| r.contains(key)))
    }

    fn bit(self) -> u8 {
        1 << self as u8
    }
}

/// One key, or every key under a prefix.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct KeyRange {
    pub key: String,
    pub prefix: bool,
}

impl KeyRange {
    pub(crate) fn contains(&self, key: &str) -> bool {
        if self.prefix {
            key.starts_with(&self.key)
        } else {
            key == self.key
        }
    }
}

/// A set of topics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Topics(u8);

impl Topics {
    pub(crate) fn of(topics: &[Topic]) -> Self {
        Self(topics.iter().fold(0, |bits, t| bits | t.bit()))
    }

    pub(crate) fn contains(self, topic: Topic) -> bool {
        self.0 & topic.bit() != 0
    }

    pub(crate) fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub(crate) fn iter(self) -> impl Iterator<Item = Topic> {
        Topic::ALL.into_iter().filter(move |t| self.contains(*t))
    }

    /// The key ranges of every topic in the set.
    pub(crate) fn ranges(self, keys: &ClusterKeys) -> Vec<(Topic, KeyRange)> {
        self.iter()
            .flat_map(|t| t.ranges(keys).into_iter().map(move |r| (t, r)))
            .collect()
    }
}

/// Wakes a subscriber whenever one of its topics changed.
pub struct Changes {
    notify: Arc<Notify>,
}

impl Changes {
    /// Returns once something under the subscribed topics changed since the last call (a
    /// change while nobody waited is kept, so none is missed between two reads).
    pub async fn changed(&self) {
        self.notify.notified().await;
    }
}

struct Subscriber {
    topics: Topics,
    notify: Weak<Notify>,
}

/// The process's subscribers, by topic, and the topics someone wants (what the etcd watch
/// loop must watch).
pub(crate) struct WatchHub {
    keys: ClusterKeys,
    subscribers: Mutex<Vec<Subscriber>>,
    wanted: watch::Sender<Topics>,
}

impl WatchHub {
    pub(crate) fn new(keys: ClusterKeys) -> Self {
        Self {
            keys,
            subscribers: Mutex::new(Vec::new()),
            wanted: watch::channel(Topics::default()).0,
        }
    }

    pub(crate) fn keys(&self) -> &ClusterKeys {
        &self.keys
    }

    /// Topics subscribed so far, as they grow.
    pub(crate) fn wanted(&self) -> watch::Receiver<Topics> {
        self.wanted.subscribe()
    }

    pub(crate) fn subscribe(&self, topics: &[Topic]) -> Changes {
        let topics = Topics::of(topics);
        let notify = Arc::new(Notify::new());
        if let Ok(mut subscribers) = self.subscribers.lock() {
            subscribers.push(Subscriber {
                topics,
                notify: Arc::downgrade(&notify),
            });
        }
        self.wanted.send_if_modified(|wanted| {
            let grown = Topics(wanted.0 | topics.0);
            let changed = grown != *wanted;
            *wanted = grown;
            changed
        });
        Changes { notify }
    }

    /// Wakes the subscribers of `topic`, forgetting those that are gone.
    pub(crate) fn changed(&self, topic: Topic) {
        if let Ok(mut subscribers) = self.subscribers.lock() {
            subscribers.retain(|s| match s.notify.upgrade() {
                Some(notify) => {
                    if s.topics.contains(topic) {
                        notify.notify_one();
                    }
                    true
                }
                None => false,
            });
        }
    }

    /// Wakes the subscribers of `key`'s topic (keys of other clusters wake nobody).
    pub(crate) fn key_changed(&self, key: &str) {
        if let Some(topic) = Topic::of_key(&self.keys, key) {
            self.changed(topic);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_belongs_to_at_most_one_topic() {
        let keys = ClusterKeys::new("c");
        let of = |key: &str| Topic::of_key(&keys, key);
        assert_eq!(of(&keys.node("n1")), Some(Topic::Members));
        assert_eq!(of(&keys.ready("n1")), Some(Topic::Members));
        assert_eq!(of(&keys.suspect("n1", "r1")), Some(Topic::Members));
        assert_eq!(of(&keys.planner()), Some(Topic::Members));
        assert_eq!(of(&keys.router("r1")), Some(Topic::Routers));
        assert_eq!(of(&keys.placement()), Some(Topic::Placement));
        assert_eq!(of(&keys.collective(3, "r1")), Some(Topic::Collectives));
        assert_eq!(of(&keys.drain("n1")), Some(Topic::Drains));
        assert_eq!(of(&ClusterKeys::new("other").placement()), None);
        for a in Topic::ALL {
            for b in Topic::ALL.into_iter().filter(|b| *b != a) {
                for ra in a.ranges(&keys) {
                    assert!(b.ranges(&keys).iter().all(|rb| !rb.contains(&ra.key)));
                }
            }
        }
    }
}
