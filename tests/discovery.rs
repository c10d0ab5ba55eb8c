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

/// A router publishes its OpenAI address, model name and load beside its gRPC address (what a
/// gateway routes on), and refreshes the load: once a request has finished, the blocks its
/// prompt left in the prefix cache show.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_publishes_its_http_address_model_and_load() {
    use moe_tests::harness::{self, generate, wait_serving};
    use moe_tests::{fixture_dir, FIXTURES};
    use moe_tooling::{greedy, LocalCluster};

    let mut spec = harness::spec(fixture_dir(FIXTURES[0]), 1);
    spec.router_args
        .extend(["--http-listen", "127.0.0.1:0", "--kv-block-tokens", "4"].map(String::from));
    let name = spec.cluster.clone();
    let cluster = LocalCluster::start(spec).unwrap();
    wait_serving(&cluster, 1).await;
    let discovery = Discovery::etcd(EtcdConnection::plain(vec![cluster.etcd_url.clone()]), &name);
    let record = || async {
        let snapshot = discovery.snapshot().await.unwrap();
        assert_eq!(
            snapshot.members.routers.len(),
            1,
            "{:?}",
            snapshot.members.routers
        );
        snapshot.members.routers.into_values().next().unwrap()
    };
    let idle = record().await;
    assert_eq!(idle.address, cluster.router_addr);
    assert_eq!(Some(&idle.http_address), cluster.router_http_addr.as_ref());
    assert_eq!(idle.model, "deepseek-v3-tiny");
    assert!(idle.load.kv_blocks_total > 0, "{idle:?}");
    assert_eq!(idle.load.kv_blocks_free, idle.load.kv_blocks_total);
    assert_eq!((idle.load.running, idle.load.waiting), (0, 0));

    let mut client = harness::inference(&cluster).await;
    let prompt: Vec<u32> = (0..21).map(|i| (i * 29 + 3) % 500 + 3).collect();
    generate(&mut client, greedy(&prompt, 4)).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let now = record().await;
        if now.load.kv_blocks_cached > 0 {
            assert!(
                now.load.kv_blocks_free < now.load.kv_blocks_total,
                "{now:?}"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the load was not refreshed: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
