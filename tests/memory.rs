//! An expert node loads only the experts the placement assigned it: on the `small` preset with
//! four nodes, each holds a quarter of the experts and uses well under half the resident memory
//! of the offline engine.

use moe_model::generator::{write_checkpoint, Preset, WeightDtype};
use moe_model::{Engine, Family};
use moe_tests::harness::{self, wait_serving};
use moe_tests::TempDir;
use moe_tooling::LocalCluster;

fn rss_bytes(pid: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quarter_of_the_experts_takes_well_under_half_the_memory() {
    let tmp = TempDir::new("small");
    let dir = tmp.path().join("ds-small");
    write_checkpoint(Family::DeepseekV3, Preset::Small, &dir, 0, WeightDtype::F32).unwrap();

    let before = rss_bytes("self");
    let engine = Engine::load(&dir).unwrap();
    let offline = rss_bytes("self").saturating_sub(before);
    let total_experts = engine.experts().len();
    drop(engine);

    let cluster = LocalCluster::start(harness::spec(dir.clone(), 4)).unwrap();
    let status = wait_serving(&cluster, 4).await;
    for node in &status.nodes {
        assert_eq!(node.experts.len(), total_experts / 4, "{}", node.node_id);
        let pid = cluster.node_pid(&node.node_id).unwrap();
        let rss = rss_bytes(&pid.to_string());
        eprintln!(
            "{}: {} experts, RSS {} MiB (offline engine {} MiB)",
            node.node_id,
            node.experts.len(),
            rss >> 20,
            offline >> 20
        );
        assert!(
            (rss as f64) < 0.4 * offline as f64,
            "node {} uses {rss} bytes, offline engine {offline}",
            node.node_id
        );
    }
}
