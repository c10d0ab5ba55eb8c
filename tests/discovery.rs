//! Discovery over a real etcd: the process's one watch stream wakes only the subscribers of a
//! written key's topic, and it survives an etcd restart, resuming where it stopped so that a
//! write made while it reconnects still wakes its subscribers.

use std::collections::BTreeMap;
use std::time::Duration;

use moe_cluster::discovery::{Changes, Discovery, EtcdConnection, NodeRecord, Topic};
use moe_cluster::placement::Placement;
use moe_tests::harness::etcd_binary;
use moe_tooling::LocalEtcd;

/// Whether `changes` wakes within `within`.
async fn woken(changes: &Changes, within: Duration) -> bool {
    tokio::time::timeout(within, changes.changed())
        .await
        .is_ok()
}

/// Forgets wake-ups already pending.
async fn settle(all: &[&Changes]) {
    tokio::time::sleep(Duration::from_millis(300)).await;
    for changes in all {
        woken(changes, Duration::from_millis(10)).await;
    }
}

fn placement(epoch: u64) -> Placement {
    let nodes = BTreeMap::from([("n1".to_string(), "127.0.0.1:1".to_string())]);
    Placement::plan(epoch, "f", &[1], 4, &nodes, None).unwrap()
}

const QUIET: Duration = Duration::from_millis(300);
const SOON: Duration = Duration::from_secs(5);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_wake_by_topic_and_resume_after_an_etcd_restart() {
    let mut etcd = LocalEtcd::start(&etcd_binary()).unwrap();
    let connection = EtcdConnection::plain(vec![etcd.url()]);
    let planner_side = Discovery::etcd(connection.clone(), "watch");
    let node_side = Discovery::etcd(connection, "watch");
    let members = planner_side.watch(&[Topic::Members]);
    let placements = node_side.watch(&[Topic::Placement]);
    let routers = node_side.watch(&[Topic::Routers]);
    let all = [&members, &placements, &routers];
    // A watch loop's first stream wakes its subscribers, who then read what is there.
    for changes in all {
        assert!(woken(changes, SOON).await);
    }

    let ttl = Duration::from_secs(3);
    let router = planner_side
        .register_router("r1", "127.0.0.1:2", ttl)
        .await
        .unwrap();
    assert!(woken(&routers, SOON).await, "a router registered");
    assert!(woken(&members, SOON).await, "the planner key was taken");
    settle(&all).await;

    let record = NodeRecord {
        fingerprint: "f".into(),
        ..NodeRecord::default()
    };
    let node = node_side.register_node("n1", record, ttl).await.unwrap();
    node.set_ready_epoch(1);
    assert!(woken(&members, SOON).await);
    assert!(!woken(&placements, QUIET).await && !woken(&routers, QUIET).await);
    settle(&all).await;

    router.set_serving_epoch(1);
    assert!(woken(&routers, SOON).await);
    assert!(!woken(&members, QUIET).await && !woken(&placements, QUIET).await);

    planner_side
        .write_placement(&placement(1), 0, "r1")
        .await
        .unwrap();
    assert!(woken(&placements, SOON).await);
    assert!(!woken(&routers, QUIET).await);
    settle(&all).await;

    // etcd restarts: the streams break. A placement written at once, while they reconnect,
    // is delivered when they resume.
    etcd.restart(&etcd_binary()).unwrap();
    let revision = loop {
        match planner_side.snapshot().await {
            Ok(snapshot) => break snapshot.placement_revision,
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    let mut written = false;
    for _ in 0..100 {
        // The planner key comes back with the router's lease.
        if planner_side
            .write_placement(&placement(2), revision, "r1")
            .await
            .is_ok()
        {
            written = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(written, "the placement is written after the restart");
    let mut delivered = false;
    for _ in 0..10 {
        if !woken(&placements, SOON).await {
            break;
        }
        let snapshot = node_side.snapshot().await.unwrap();
        delivered = snapshot.placement.map(|p| p.epoch) == Some(2);
        if delivered {
            break;
        }
    }
    assert!(
        delivered,
        "the write made during the restart woke the placement's watcher"
    );
    node.shutdown().await;
    router.shutdown().await;
    drop(etcd);
}
