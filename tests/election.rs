//! The planner election and the guarded placement write against a real etcd: exactly one
//! campaigner holds the planner key, it passes on when the holder's lease ends, and a
//! placement commits only for the key's holder and only from the revision it planned from.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use moe_cluster::lease::LeasedKeys;
use moe_cluster::local::LocalEtcd;
use moe_cluster::placement::{Placement, PlacementStore};
use moe_cluster::{ClusterError, ClusterKeys};
use moe_tests::harness::etcd_binary;

async fn wait_for(what: &str, timeout: Duration, check: impl Fn() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(
            Instant::now() < deadline,
            "{what} not reached in {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_planner_at_a_time_and_only_it_commits() {
    let etcd = LocalEtcd::start(&etcd_binary()).unwrap();
    let endpoints = moe_cluster::EtcdConnection::plain(vec![etcd.url()]);
    let keys = ClusterKeys::new("election");
    let ttl = Duration::from_secs(2);
    let a = LeasedKeys::start(&endpoints, ttl, BTreeMap::new())
        .await
        .unwrap();
    let b = LeasedKeys::start(&endpoints, ttl, BTreeMap::new())
        .await
        .unwrap();
    a.campaign(keys.planner(), "router-a".into());
    wait_for("a elected", Duration::from_secs(5), || a.is_leader()).await;
    b.campaign(keys.planner(), "router-b".into());
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(a.is_leader() && !b.is_leader(), "exactly one planner");

    let nodes: BTreeMap<String, String> = [("n1".to_string(), "127.0.0.1:1".to_string())].into();
    let client = endpoints.connect().await.unwrap();
    let mut store = PlacementStore::new(client, keys.clone());
    let p1 = Placement::plan(1, "f", &[1], 4, &nodes, None).unwrap();
    assert!(
        matches!(
            store.write(&p1, 0, Some("router-b")).await,
            Err(ClusterError::PlacementConflict(1))
        ),
        "a router that is not the planner cannot commit"
    );
    store.write(&p1, 0, Some("router-a")).await.unwrap();
    let (read, revision) = store.read().await.unwrap();
    assert_eq!(read.as_ref().map(|p| p.epoch), Some(1));
    let p2 = Placement::plan(2, "f", &[1], 4, &nodes, Some(&p1)).unwrap();
    assert!(
        matches!(
            store.write(&p2, 0, Some("router-a")).await,
            Err(ClusterError::PlacementConflict(2))
        ),
        "a write planned from a stale revision fails"
    );
    store.write(&p2, revision, Some("router-a")).await.unwrap();

    // The planner goes away: its lease is revoked and the other campaigner takes over.
    let handover = Instant::now();
    a.shutdown().await;
    wait_for("b elected", Duration::from_secs(5), || b.is_leader()).await;
    assert!(handover.elapsed() < ttl * 2);
    let (_, revision) = store.read().await.unwrap();
    let p3 = Placement::plan(3, "f", &[1], 4, &nodes, Some(&p2)).unwrap();
    assert!(store.write(&p3, revision, Some("router-a")).await.is_err());
    store.write(&p3, revision, Some("router-b")).await.unwrap();
    drop(b);
    drop(etcd);
}
