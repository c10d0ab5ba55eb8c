//! The planner election and the guarded placement write against a real etcd: exactly one
//! campaigner holds the planner key, it passes on when the holder's lease ends, and a
//! placement commits only for the key's holder and only from the revision it planned from.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use moe_cluster::discovery::{Discovery, DiscoveryError, EtcdConnection};
use moe_cluster::placement::Placement;
use moe_tests::harness::etcd_binary;
use moe_tooling::LocalEtcd;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_planner_at_a_time_and_only_it_commits() {
    let etcd = LocalEtcd::start(&etcd_binary()).unwrap();
    let discovery = Discovery::etcd(EtcdConnection::plain(vec![etcd.url()]), "election");
    let ttl = Duration::from_secs(2);
    let a = discovery
        .register_router("router-a", "127.0.0.1:1", ttl)
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(5), a.elected())
        .await
        .expect("a elected");
    let b = discovery
        .register_router("router-b", "127.0.0.1:2", ttl)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(a.is_planner() && !b.is_planner(), "exactly one planner");

    let nodes: BTreeMap<String, String> = [("n1".to_string(), "127.0.0.1:1".to_string())].into();
    let p1 = Placement::plan(1, "f", &[1], 4, &nodes, None).unwrap();
    assert!(
        matches!(
            discovery.write_placement(&p1, 0, "router-b").await,
            Err(DiscoveryError::PlacementConflict(1))
        ),
        "a router that is not the planner cannot commit"
    );
    discovery.write_placement(&p1, 0, "router-a").await.unwrap();
    let read = discovery.snapshot().await.unwrap();
    let revision = read.placement_revision;
    assert_eq!(read.placement.as_ref().map(|p| p.epoch), Some(1));
    let p2 = Placement::plan(2, "f", &[1], 4, &nodes, Some(&p1)).unwrap();
    assert!(
        matches!(
            discovery.write_placement(&p2, 0, "router-a").await,
            Err(DiscoveryError::PlacementConflict(2))
        ),
        "a write planned from a stale revision fails"
    );
    discovery
        .write_placement(&p2, revision, "router-a")
        .await
        .unwrap();

    // The planner goes away: its lease is revoked and the other campaigner takes over.
    let handover = Instant::now();
    a.shutdown().await;
    tokio::time::timeout(Duration::from_secs(5), b.elected())
        .await
        .expect("b elected");
    assert!(handover.elapsed() < ttl * 2);
    let revision = discovery.snapshot().await.unwrap().placement_revision;
    let p3 = Placement::plan(3, "f", &[1], 4, &nodes, Some(&p2)).unwrap();
    assert!(discovery
        .write_placement(&p3, revision, "router-a")
        .await
        .is_err());
    discovery
        .write_placement(&p3, revision, "router-b")
        .await
        .unwrap();
    drop(b);
    drop(etcd);
}
