//! Discovery: how the cluster's processes find each other, behind one small API.
//!
//! A process builds one [`Discovery`] handle (over etcd, or over a [`MemoryStore`] in unit
//! tests) and does all of its discovery through it:
//! - **register** on a lease that a background task keeps alive ([`registration`] over
//!   [`lease`]): a node its record, ready epoch and state; a router its record, serving epoch,
//!   suspect reports and collective records, and its campaign for the planner key. Keys vanish
//!   with the lease; a lost lease is granted again and every key put again.
//! - **read** a [`Snapshot`]: the live members, the requests about them (drains, suspect
//!   reports) and the placement, at one revision ([`snapshot`]).
//! - **watch** [`Topic`]s (members, routers, placement, collectives, drains): a write wakes
//!   only the subscribers of its topic, through the process's one watch loop ([`watch`]).
//! - **write** a placement in the guarded transaction (the planner key and the placement
//!   revision it planned from), and request and clear drains.
//!
//! The key layout is [`keys`]; the records are [`records`]. Both backends answer the same
//! calls ([`store`]): [`etcd`] for clusters, [`memory`] for tests.

pub mod error;
pub mod etcd;
pub mod keys;
pub(crate) mod kv;
pub(crate) mod lease;
pub mod load_report;
pub mod memory;
pub mod outage;
pub mod records;
pub mod registration;
pub mod snapshot;
pub(crate) mod store;
pub mod watch;

use std::collections::BTreeMap;
use std::sync::{Arc, Once};
use std::time::Duration;

pub use error::DiscoveryError;
pub use etcd::connection::EtcdConnection;
pub use keys::ClusterKeys;
pub use load_report::{LoadReport, LoadReportError};
pub use memory::MemoryStore;
pub use outage::Outage;
pub use records::{
    new_instance_id, NodeRecord, NodeState, PublishedGeneration, RouterLoad, RouterProfile,
    RouterRecord,
};
pub use registration::{NodeRegistration, RouterRegistration};
pub use snapshot::{Membership, Snapshot};
pub use watch::{Changes, Topic};

use crate::placement::Placement;
use kv::GuardedPut;
use store::Store;
use watch::WatchHub;

/// One process's handle on discovery. Cheap to clone; clones share the watch loop.
#[derive(Clone)]
pub struct Discovery {
    store: Store,
    keys: ClusterKeys,
    /// The process's subscribers by topic.
    hub: Arc<WatchHub>,
    /// Starts the etcd watch loop at the first subscription.
    watching: Arc<Once>,
}

impl Discovery {
    /// Discovery over etcd for cluster `cluster` (prefix `/moe/<cluster>/`). Nothing is
    /// connected until the first call, so a process may start before etcd does.
    pub fn etcd(connection: EtcdConnection, cluster: &str) -> Self {
        let store = Store::Etcd(Arc::new(etcd::EtcdStore::new(connection)));
        Self::over(store, cluster)
    }

    /// Discovery over an in-memory store: handles over the same store see each other.
    pub fn in_memory(memory: &MemoryStore, cluster: &str) -> Self {
        let discovery = Self::over(Store::Memory(memory.clone()), cluster);
        memory.add_hub(Arc::downgrade(&discovery.hub));
        discovery
    }

    fn over(store: Store, cluster: &str) -> Self {
        let keys = ClusterKeys::new(cluster);
        Self {
            store,
            hub: Arc::new(WatchHub::new(keys.clone())),
            keys,
            watching: Arc::new(Once::new()),
        }
    }

    pub fn keys(&self) -> &ClusterKeys {
        &self.keys
    }

    /// Registers a node: `record` under `nodes/<node_id>` on a lease of `ttl`.
    pub async fn register_node(
        &self,
        node_id: &str,
        record: NodeRecord,
        ttl: Duration,
    ) -> Result<NodeRegistration, DiscoveryError> {
        let client = self.store.lease_client().await?;
        NodeRegistration::start(client, self.keys.clone(), node_id.into(), record, ttl).await
    }

    /// Registers a router at `address` on a lease of `ttl`; it campaigns for the planner key.
    pub async fn register_router(
        &self,
        router_id: &str,
        address: &str,
        ttl: Duration,
    ) -> Result<RouterRegistration, DiscoveryError> {
        let client = self.store.lease_client().await?;
        let keys = self.keys.clone();
        RouterRegistration::start(client, keys, router_id.into(), address.into(), ttl).await
    }

    /// The members and the placement, read at one revision.
    pub async fn snapshot(&self) -> Result<Snapshot, DiscoveryError> {
        let listing = self
            .store
            .list_ranges(&Snapshot::ranges(&self.keys))
            .await?;
        Snapshot::parse(&self.keys, &listing)
    }

    /// Writes `placement` only if the placement key is still at `expected_revision` (0:
    /// absent; see [`Snapshot::placement_revision`]) and `planner_id` holds the planner key,
    /// so a router that lost its lease cannot commit and two planners never both do.
    pub async fn write_placement(
        &self,
        placement: &Placement,
        expected_revision: i64,
        planner_id: &str,
    ) -> Result<(), DiscoveryError> {
        let key = self.keys.placement();
        let put = GuardedPut {
            value: error::encode(&key, placement)?,
            key,
            expected_revision,
            holder: (self.keys.planner(), planner_id.to_string()),
        };
        if self.store.put_guarded(put).await? {
            Ok(())
        } else {
            Err(DiscoveryError::PlacementConflict(placement.epoch))
        }
    }

    /// Asks that `node_id` leave the cluster: the planner places nothing on it and the node
    /// exits once every router has moved past it.
    pub async fn request_drain(&self, node_id: &str) -> Result<(), DiscoveryError> {
        self.store.put(&self.keys.drain(node_id), Vec::new()).await
    }

    /// Forgets the drain request of a node that is gone.
    pub async fn clear_drain(&self, node_id: &str) -> Result<(), DiscoveryError> {
        self.store.delete(&self.keys.drain(node_id)).await
    }

    /// The routers' collective records: key to encoded `CollectiveRecord`.
    pub async fn collective_records(&self) -> Result<BTreeMap<String, Vec<u8>>, DiscoveryError> {
        let listing = self.store.list(&self.keys.collectives()).await?;
        Ok(listing
            .kvs
            .into_iter()
            .map(|kv| (kv.key, kv.value))
            .collect())
    }

    /// The routers' load reports by router id, each with the revision it was written at (a
    /// new revision is a new report). Reports that are too large or malformed are skipped
    /// with a warning: one bad writer must not blind the planner to the others.
    pub async fn load_reports(
        &self,
    ) -> Result<BTreeMap<String, (i64, LoadReport)>, DiscoveryError> {
        let prefix = self.keys.load_reports();
        let listing = self.store.list(&prefix).await?;
        let mut reports = BTreeMap::new();
        for kv in listing.kvs {
            let Some(router) = self.keys.id_under(&prefix, &kv.key) else {
                continue;
            };
            match LoadReport::decode(&kv.value) {
                Ok(report) => {
                    reports.insert(router.to_string(), (kv.mod_revision, report));
                }
                Err(e) => tracing::warn!(key = %kv.key, error = %e, "ignoring a load report"),
            }
        }
        Ok(reports)
    }

    /// Wakes the returned handle whenever something under `topics` changes. Over etcd the
    /// first subscription starts the process's watch loop.
    pub fn watch(&self, topics: &[Topic]) -> Changes {
        let changes = self.hub.subscribe(topics);
        if let Store::Etcd(etcd) = &self.store {
            self.watching.call_once(|| {
                etcd::watch::spawn(
                    etcd.connection().clone(),
                    Arc::downgrade(&self.hub),
                    self.hub.wanted(),
                );
            });
        }
        changes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collective::CollectiveRecord;

    const TTL: Duration = Duration::from_secs(3);

    fn node(instance: &str) -> NodeRecord {
        NodeRecord {
            address: "127.0.0.1:1".into(),
            fingerprint: "f".into(),
            instance: instance.into(),
            ..NodeRecord::default()
        }
    }

    fn placement(epoch: u64) -> Placement {
        let nodes = BTreeMap::from([("n1".to_string(), "127.0.0.1:1".to_string())]);
        Placement::plan(epoch, "f", &[1], 4, &nodes, None).unwrap()
    }

    /// Waits (five seconds at most) until the snapshot satisfies `check`: what a
    /// registration publishes goes through its lease task.
    async fn eventually(discovery: &Discovery, what: &str, check: impl Fn(&Snapshot) -> bool) {
        for _ in 0..500 {
            if check(&discovery.snapshot().await.unwrap()) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{what}: not reached");
    }

    async fn elected(discovery: &Discovery, id: &str) -> RouterRegistration {
        let router = discovery
            .register_router(id, "127.0.0.1:2", TTL)
            .await
            .unwrap();
        let elected = tokio::time::timeout(Duration::from_secs(5), router.elected());
        elected.await.expect("elected at the first keep-alive");
        router
    }

    /// Whether `changes` was woken (waits briefly).
    async fn woken(changes: &Changes) -> bool {
        tokio::time::timeout(Duration::from_millis(50), changes.changed())
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn registrations_show_in_snapshots_and_vanish_with_their_lease() {
        let store = MemoryStore::new();
        let discovery = Discovery::in_memory(&store, "c");
        let n1 = discovery.register_node("n1", node("a"), TTL).await.unwrap();
        let router = elected(&discovery, "r1").await;
        let snapshot = discovery.snapshot().await.unwrap();
        assert_eq!(snapshot.members.nodes["n1"], node("a"));
        assert_eq!(snapshot.members.planner.as_deref(), Some("r1"));
        assert_eq!(snapshot.members.min_router_epoch(), Some(0));
        assert_eq!(snapshot.placement, None);

        n1.set_ready_epoch(3);
        n1.set_state(NodeState::Draining);
        n1.set_state(NodeState::Ready);
        router.set_serving_epoch(3);
        router.set_suspects(&[("n1".into(), "a".into())]);
        router.set_collective(&CollectiveRecord::tcp(
            3,
            vec!["n1".into()],
            &crate::collective::tcp::TcpRendezvous {
                address: "127.0.0.1:9".into(),
                nonce: Default::default(),
            },
            Duration::from_secs(1),
        ));
        eventually(&discovery, "published", |s| {
            let m = &s.members;
            m.ready.get("n1") == Some(&3)
                && m.nodes["n1"].state == NodeState::Draining
                && m.min_router_epoch() == Some(3)
                && m.is_suspect("n1")
        })
        .await;
        let records = discovery.collective_records().await.unwrap();
        assert_eq!(
            records.keys().collect::<Vec<_>>(),
            [&discovery.keys().collective(3, "r1")]
        );
        router.retire_collectives_below(4);
        router.set_suspects(&[]);
        eventually(&discovery, "withdrawn", |s| !s.members.is_suspect("n1")).await;
        assert!(discovery.collective_records().await.unwrap().is_empty());

        // The node's lease ends: its keys go at once; its task registers it again.
        assert!(store.expire_lease_of(&discovery.keys().node("n1")));
        let gone = discovery.snapshot().await.unwrap();
        assert!(!gone.members.nodes.contains_key("n1") && !gone.members.ready.contains_key("n1"));
        eventually(&discovery, "registered again", |s| {
            s.members.nodes.contains_key("n1") && s.members.ready.get("n1") == Some(&3)
        })
        .await;
        // Shutting down revokes the lease: the keys go without waiting for the TTL.
        n1.shutdown().await;
        router.shutdown().await;
        let empty = discovery.snapshot().await.unwrap();
        assert!(empty.members.nodes.is_empty() && empty.members.routers.is_empty());
        assert_eq!(empty.members.planner, None);
    }

    #[tokio::test]
    async fn the_guarded_write_refuses_a_stale_revision_and_a_router_not_planner() {
        let store = MemoryStore::new();
        let discovery = Discovery::in_memory(&store, "c");
        let _a = elected(&discovery, "r1").await;
        let b = discovery
            .register_router("r2", "127.0.0.1:3", TTL)
            .await
            .unwrap();
        assert!(!b.is_planner());
        let refused = discovery.write_placement(&placement(1), 0, "r2").await;
        assert!(
            matches!(refused, Err(DiscoveryError::PlacementConflict(1))),
            "{refused:?}"
        );
        discovery
            .write_placement(&placement(1), 0, "r1")
            .await
            .unwrap();
        let snapshot = discovery.snapshot().await.unwrap();
        assert_eq!(snapshot.placement, Some(placement(1)));
        assert!(snapshot.placement_revision > 0);
        let stale = discovery.write_placement(&placement(2), 0, "r1").await;
        assert!(
            matches!(stale, Err(DiscoveryError::PlacementConflict(2))),
            "{stale:?}"
        );
        discovery
            .write_placement(&placement(2), snapshot.placement_revision, "r1")
            .await
            .unwrap();
        assert_eq!(
            discovery.snapshot().await.unwrap().placement,
            Some(placement(2))
        );
    }

    #[tokio::test]
    async fn a_write_wakes_only_the_watchers_of_its_topic() {
        let store = MemoryStore::new();
        let planner_side = Discovery::in_memory(&store, "c");
        let node_side = Discovery::in_memory(&store, "c");
        let other_cluster = Discovery::in_memory(&store, "other");
        let router = elected(&planner_side, "r1").await;
        let n1 = node_side.register_node("n1", node("a"), TTL).await.unwrap();
        let members = planner_side.watch(&[Topic::Members]);
        let placements = node_side.watch(&[Topic::Placement]);
        let routers = node_side.watch(&[Topic::Routers]);
        let drains = node_side.watch(&[Topic::Drains, Topic::Placement]);
        let collectives = node_side.watch(&[Topic::Collectives]);
        let elsewhere = other_cluster.watch(&Topic::ALL);
        let all = [
            &members,
            &placements,
            &routers,
            &drains,
            &collectives,
            &elsewhere,
        ];
        // Forget what registering woke.
        for changes in all {
            woken(changes).await;
        }

        n1.set_ready_epoch(1);
        assert!(woken(&members).await);
        router.set_serving_epoch(1);
        assert!(woken(&routers).await);
        for changes in [&placements, &drains, &collectives, &elsewhere] {
            assert!(
                !woken(changes).await,
                "woken by a ready key or a serving epoch"
            );
        }
        planner_side
            .write_placement(&placement(1), 0, "r1")
            .await
            .unwrap();
        assert!(woken(&placements).await && woken(&drains).await);
        assert!(!woken(&members).await && !woken(&routers).await);
        planner_side.request_drain("n1").await.unwrap();
        assert!(woken(&drains).await);
        assert!(!woken(&placements).await && !woken(&collectives).await);
        assert!(
            !woken(&elsewhere).await,
            "another cluster's keys wake nobody here"
        );
    }

    #[tokio::test]
    async fn drains_are_requested_and_cleared() {
        let discovery = Discovery::in_memory(&MemoryStore::new(), "c");
        discovery.request_drain("n1").await.unwrap();
        discovery.request_drain("n2").await.unwrap();
        let snapshot = discovery.snapshot().await.unwrap();
        assert_eq!(snapshot.members.drains, ["n1", "n2"]);
        discovery.clear_drain("n1").await.unwrap();
        assert_eq!(discovery.snapshot().await.unwrap().members.drains, ["n2"]);
    }

    #[tokio::test]
    async fn a_malformed_placement_fails_the_snapshot_and_a_malformed_record_is_skipped() {
        let store = MemoryStore::new();
        let discovery = Discovery::in_memory(&store, "c");
        store.put(&discovery.keys().node("bad"), b"{".to_vec());
        assert!(discovery.snapshot().await.unwrap().members.nodes.is_empty());
        store.put(&discovery.keys().placement(), b"not json".to_vec());
        let err = discovery.snapshot().await.unwrap_err();
        assert!(matches!(err, DiscoveryError::Record { .. }), "{err}");
    }

    #[tokio::test]
    async fn load_reports_stay_out_of_snapshots_are_read_apart_and_vanish_with_their_lease() {
        let store = MemoryStore::new();
        let discovery = Discovery::in_memory(&store, "c");
        let router = elected(&discovery, "r1").await;
        let report = LoadReport {
            instance: "i".into(),
            expert_tokens: [(1, vec![3, 0, 2, 1])].into(),
            ..Default::default()
        };
        router.set_load_report(&report);
        store.put(&discovery.keys().load_report("bad"), b"[1, 2]".to_vec());
        let mut read = BTreeMap::new();
        for _ in 0..500 {
            read = discovery.load_reports().await.unwrap();
            if !read.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            read.keys().collect::<Vec<_>>(),
            ["r1"],
            "the malformed one skipped"
        );
        assert_eq!(read["r1"].1, report);
        // Not part of a snapshot: the same snapshot as one read with no report written.
        let with_reports = discovery.snapshot().await.unwrap();
        let listed = store.list(discovery.keys().root());
        assert!(listed.kvs.iter().any(|kv| kv.key.contains("/load/")));
        let snapshot_keys = store.list_ranges(&Snapshot::ranges(discovery.keys()));
        assert!(snapshot_keys
            .kvs
            .iter()
            .all(|kv| !kv.key.contains("/load/")));
        assert_eq!(with_reports.members.routers.len(), 1);

        assert!(store.expire_lease_of(&discovery.keys().load_report("r1")));
        let read = discovery.load_reports().await.unwrap();
        assert!(read.is_empty(), "{read:?}");
    }
}
