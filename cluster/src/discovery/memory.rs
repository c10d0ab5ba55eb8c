//! An in-memory stand-in for etcd, for unit tests of discovery and of the processes built on
//! it: keys with revisions, leases that expire (after their TTL without keep-alive, or when a
//! test says so) and take their keys with them, the guarded write, the create-if-absent
//! campaign, and wake-ups of the subscribers of each written key's topic. Several
//! [`super::Discovery`] handles over one store are several processes sharing one etcd.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use tokio::time::Instant;

use super::kv::{GuardedPut, Kv, Listing};
use super::watch::{KeyRange, WatchHub};

/// The shared store; clone it to hand it to another "process".
#[derive(Clone, Default)]
pub struct MemoryStore {
    state: Arc<Mutex<State>>,
}

#[derive(Default)]
struct State {
    revision: i64,
    keys: BTreeMap<String, Entry>,
    /// Lease id to its TTL and when it ends without a keep-alive.
    leases: HashMap<i64, (Duration, Instant)>,
    next_lease: i64,
    hubs: Vec<Weak<WatchHub>>,
    /// Keys written since the hubs were last told.
    changed: Vec<String>,
}

struct Entry {
    value: Vec<u8>,
    create_revision: i64,
    mod_revision: i64,
    lease: Option<i64>,
}

impl State {
    fn put(&mut self, key: &str, value: Vec<u8>, lease: Option<i64>) {
        self.revision += 1;
        let create_revision = self
            .keys
            .get(key)
            .map(|e| e.create_revision)
            .unwrap_or(self.revision);
        self.keys.insert(
            key.to_string(),
            Entry {
                value,
                create_revision,
                mod_revision: self.revision,
                lease,
            },
        );
        self.changed.push(key.to_string());
    }

    fn delete(&mut self, key: &str) {
        if self.keys.remove(key).is_some() {
            self.revision += 1;
            self.changed.push(key.to_string());
        }
    }

    fn end_lease(&mut self, lease: i64) {
        self.leases.remove(&lease);
        let held: Vec<String> = self
            .keys
            .iter()
            .filter(|(_, e)| e.lease == Some(lease))
            .map(|(k, _)| k.clone())
            .collect();
        for key in held {
            self.delete(&key);
        }
    }

    /// Ends the leases whose TTL ran out, as etcd would.
    fn expire_due(&mut self) {
        let now = Instant::now();
        let due: Vec<i64> = self
            .leases
            .iter()
            .filter(|(_, (_, deadline))| *deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for lease in due {
            self.end_lease(lease);
        }
    }

    fn value_of(&self, key: &str) -> Option<&[u8]> {
        self.keys.get(key).map(|e| e.value.as_slice())
    }
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Ends the lease that holds `key` now, as if its keep-alives had stopped past the TTL;
    /// false when no lease holds it.
    pub fn expire_lease_of(&self, key: &str) -> bool {
        self.apply(|state| {
            let lease = state.keys.get(key).and_then(|e| e.lease);
            if let Some(lease) = lease {
                state.end_lease(lease);
            }
            lease.is_some()
        })
    }

    /// The value at `key`, if any.
    pub fn get(&self, key: &str) -> Option<Vec<u8>> {
        self.apply(|state| state.value_of(key).map(<[u8]>::to_vec))
    }

    pub(crate) fn add_hub(&self, hub: Weak<WatchHub>) {
        self.apply(|state| state.hubs.push(hub));
    }

    /// Runs `f` on the state (after ending expired leases), then wakes the subscribers of
    /// every key it changed.
    fn apply<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let (out, changed, hubs) = {
            let mut state = self.lock();
            state.expire_due();
            let out = f(&mut state);
            let changed = std::mem::take(&mut state.changed);
            state.hubs.retain(|h| h.strong_count() > 0);
            let hubs: Vec<Arc<WatchHub>> = state.hubs.iter().filter_map(Weak::upgrade).collect();
            (out, changed, hubs)
        };
        for key in &changed {
            for hub in &hubs {
                hub.key_changed(key);
            }
        }
        out
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn list(&self, prefix: &str) -> Listing {
        self.list_ranges(&[KeyRange {
            key: prefix.to_string(),
            prefix: true,
        }])
    }

    /// Every key in `ranges`, at one revision (as etcd's read-only transaction gives them).
    pub(crate) fn list_ranges(&self, ranges: &[KeyRange]) -> Listing {
        self.apply(|state| Listing {
            kvs: ranges
                .iter()
                .flat_map(|range| {
                    state
                        .keys
                        .range(range.key.clone()..)
                        .take_while(|(k, _)| range.contains(k))
                })
                .map(|(k, e)| Kv {
                    key: k.clone(),
                    value: e.value.clone(),
                    mod_revision: e.mod_revision,
                })
                .collect(),
            revision: state.revision,
        })
    }

    pub(crate) fn put(&self, key: &str, value: Vec<u8>) {
        self.apply(|state| state.put(key, value, None));
    }

    pub(crate) fn delete(&self, key: &str) {
        self.apply(|state| state.delete(key));
    }

    pub(crate) fn put_guarded(&self, put: GuardedPut) -> bool {
        self.apply(|state| {
            let revision = state.keys.get(&put.key).map(|e| e.mod_revision);
            let (holder_key, holder_value) = &put.holder;
            let holds = state.value_of(holder_key) == Some(holder_value.as_bytes());
            let ok = revision.unwrap_or(0) == put.expected_revision && holds;
            if ok {
                state.put(&put.key, put.value, None);
            }
            ok
        })
    }

    pub(crate) fn grant(&self, ttl: Duration) -> i64 {
        self.apply(|state| {
            state.next_lease += 1;
            let ttl = ttl.max(Duration::from_secs(1));
            state
                .leases
                .insert(state.next_lease, (ttl, Instant::now() + ttl));
            state.next_lease
        })
    }

    /// Keeps `lease` alive for another TTL; false when it already ended.
    pub(crate) fn renew(&self, lease: i64) -> bool {
        self.apply(|state| match state.leases.get_mut(&lease) {
            Some((ttl, deadline)) => {
                *deadline = Instant::now() + *ttl;
                true
            }
            None => false,
        })
    }

    /// Puts `key` on `lease`; false (nothing written) when the lease already ended.
    pub(crate) fn put_leased(&self, key: &str, value: Vec<u8>, lease: i64) -> bool {
        self.apply(|state| {
            let live = state.leases.contains_key(&lease);
            if live {
                state.put(key, value, Some(lease));
            }
            live
        })
    }

    pub(crate) fn revoke(&self, lease: i64) {
        self.apply(|state| state.end_lease(lease));
    }

    /// Takes `key` = `id` on `lease` if the key is free, or moves it there if it already
    /// holds `id` (from an older lease of the same process).
    pub(crate) fn campaign(&self, key: &str, id: &str, lease: i64) -> bool {
        self.apply(|state| {
            if !state.leases.contains_key(&lease) {
                return false;
            }
            match state.keys.get(key) {
                None => {
                    state.put(key, id.as_bytes().to_vec(), Some(lease));
                    true
                }
                Some(e) if e.value == id.as_bytes() => {
                    if e.lease != Some(lease) {
                        state.put(key, id.as_bytes().to_vec(), Some(lease));
                    }
                    true
                }
                Some(_) => false,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_lease_not_kept_alive_ends_after_its_ttl_with_its_keys() {
        let store = MemoryStore::new();
        let kept = store.grant(Duration::from_secs(1));
        let dropped = store.grant(Duration::from_secs(1));
        assert!(store.put_leased("/k/kept", b"1".to_vec(), kept));
        assert!(store.put_leased("/k/dropped", b"2".to_vec(), dropped));
        store.put("/k/durable", b"3".to_vec());
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_millis(400)).await;
            assert!(store.renew(kept));
        }
        let keys: Vec<String> = store.list("/k/").kvs.into_iter().map(|kv| kv.key).collect();
        assert_eq!(keys, ["/k/durable", "/k/kept"]);
        assert!(!store.renew(dropped), "an ended lease cannot be renewed");
        assert!(!store.put_leased("/k/late", b"4".to_vec(), dropped));
    }

    #[test]
    fn the_campaign_key_goes_to_the_first_and_follows_it_to_a_new_lease() {
        let store = MemoryStore::new();
        let (a, b) = (
            store.grant(Duration::from_secs(5)),
            store.grant(Duration::from_secs(5)),
        );
        assert!(store.campaign("/planner", "a", a));
        assert!(!store.campaign("/planner", "b", b));
        let renewed = store.grant(Duration::from_secs(5));
        assert!(
            store.campaign("/planner", "a", renewed),
            "moved to a's new lease"
        );
        store.revoke(a);
        assert_eq!(store.get("/planner"), Some(b"a".to_vec()));
        store.revoke(renewed);
        assert!(store.campaign("/planner", "b", b));
    }
}
