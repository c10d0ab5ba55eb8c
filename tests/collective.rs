//! The per-epoch collective data plane (`--transport tcp`) with real processes: the router
//! opens a communicator per placement epoch, publishes it in etcd, every node joins, and the
//! MoE layers go over it with bitwise the offline engine's results. A node killed mid-stream
//! fails the collective; the layer goes over gRPC (which names the dead node), the planner
//! makes an epoch without it, and that epoch gets a new collective. This is the path NCCL
//! takes on GPUs, with sockets instead of NVLink/InfiniBand. A node that only stalls breaks the
//! collective too; the epoch stays and gets a new communicator.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use moe_model::Engine;
use moe_tests::harness::{
    self, expected_answers, generate, offline_greedy, serving_nodes, wait_serving, wait_status,
};
use moe_tests::{fixture_dir, golden_cases, FIXTURES};
use moe_tooling::{greedy, GreedyLoad, LocalCluster};

const MINUTE: Duration = Duration::from_secs(60);

fn tcp_spec(fixture: &str, nodes: usize) -> moe_tooling::LocalClusterSpec {
    let mut spec = harness::spec(fixture_dir(fixture), nodes);
    spec.router_args
        .extend(["--transport".into(), "tcp".into()]);
    spec
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_collective_matches_offline_and_survives_a_sigkill() {
    let fixture = FIXTURES[0];
    let engine = Engine::load(&fixture_dir(fixture)).unwrap();
    let mut cluster = LocalCluster::start(tcp_spec(fixture, 3)).unwrap();
    wait_serving(&cluster, 3).await;
    let before = wait_status(&cluster.router_addr, MINUTE, "collective formed", |s| {
        s.serving_transport == "tcp"
    })
    .await;

    // Golden prompts over the collective: tokens and logprobs bitwise the offline engine's.
    let mut client = harness::inference(&cluster).await;
    for (i, case) in golden_cases(fixture).iter().enumerate() {
        let want = offline_greedy(&engine, &case.input_ids, 24);
        let got = generate(&mut client, greedy(&case.input_ids, 24))
            .await
            .unwrap();
        assert_eq!(got.ids, want.output_ids, "case {i}");
        assert_eq!(
            got.logprobs, want.logprobs,
            "case {i}: logprobs not bitwise equal"
        );
    }
    let s = harness::status(&cluster).await;
    assert_eq!(s.serving_transport, "tcp");
    assert!(
        s.collective_layers > 0,
        "the layers went over the collective: {s:?}"
    );
    assert_eq!(s.collective_failures, 0);
    let dispatched: u64 = s.nodes.iter().map(|n| n.dispatched_pairs).sum();
    assert!(dispatched > 0, "collective dispatches are counted per node");

    // SIGKILL a node while 12 streams run.
    let answers = Arc::new(expected_answers(
        &engine,
        &golden_cases(fixture)
            .iter()
            .cycle()
            .take(12)
            .enumerate()
            .map(|(i, c)| (c.input_ids[..c.input_ids.len() - i % 3].to_vec(), 48))
            .collect::<Vec<_>>(),
    ));
    let victim = serving_nodes(&before)[1].clone();
    let load = GreedyLoad::start(vec![cluster.router_addr.clone()], answers, 12, Some(1));
    let deadline = Instant::now() + MINUTE;
    while load.progress.tokens.load(Ordering::Relaxed) < 12 * 4 {
        assert!(Instant::now() < deadline, "streams did not start");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let killed_at = Instant::now();
    cluster.kill_node(&victim);
    let completed_at_kill = load.progress.completed.load(Ordering::Relaxed);
    let progress = Arc::clone(&load.progress);
    let report = tokio::time::timeout(2 * MINUTE, load.finish())
        .await
        .expect("requests finish");
    assert_eq!(report.failed, 0, "{:?}", report.problems);
    assert_eq!(report.mismatched, 0, "{:?}", report.problems);
    assert_eq!(report.completed, 12);
    assert!(completed_at_kill < 12, "the kill happened mid-stream");

    // The new epoch (without the victim) gets its own collective.
    let after = wait_status(
        &cluster.router_addr,
        MINUTE,
        "new epoch on a new collective",
        |s| {
            let nodes = serving_nodes(s);
            !nodes.is_empty() && !nodes.contains(&victim) && s.serving_transport == "tcp"
        },
    )
    .await;
    assert!(after.serving_epoch > before.serving_epoch);
    assert!(
        after.collective_failures >= 1,
        "the kill broke the old epoch's collective: {after:?}"
    );
    // The gRPC retry named the dead node: the epoch without it was planned on the suspect
    // report, while the node's lease still lived.
    assert!(
        after.suspect_replans >= 1,
        "recovery went through the suspect path: {after:?}"
    );
    let layers_before = after.collective_layers;
    let case = &golden_cases(fixture)[0];
    let want = offline_greedy(&engine, &case.input_ids, 24);
    let mut client = harness::inference(&cluster).await;
    let got = generate(&mut client, greedy(&case.input_ids, 24))
        .await
        .unwrap();
    assert_eq!(got.ids, want.output_ids);
    assert_eq!(got.logprobs, want.logprobs);
    let end = harness::status(&cluster).await;
    assert!(
        end.collective_layers > layers_before,
        "the new epoch's layers go over its collective: {end:?}"
    );
    eprintln!(
        "tcp collective: SIGKILL -> epoch {} on {:?} over {}; first token after the kill {:?} later; collective layers {}, failures {}",
        after.serving_epoch,
        serving_nodes(&after),
        after.serving_transport,
        progress.first_token_after(killed_at).map(|t| t - killed_at),
        end.collective_layers,
        end.collective_failures,
    );
}

/// Several routers share the nodes: each router has its own collective per epoch, and the
/// nodes answer both at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_routers_each_get_their_own_collective() {
    let fixture = FIXTURES[1];
    let engine = Arc::new(Engine::load(&fixture_dir(fixture)).unwrap());
    let mut cluster = LocalCluster::start(tcp_spec(fixture, 2)).unwrap();
    wait_serving(&cluster, 2).await;
    let second = cluster.add_router(&[]).unwrap();
    let routers = [cluster.router_addr.clone(), second];
    for addr in &routers {
        wait_status(addr, MINUTE, "collective formed", |s| {
            s.serving_transport == "tcp"
        })
        .await;
    }
    let tasks: Vec<_> = routers
        .iter()
        .map(|addr| {
            let addr = addr.clone();
            let engine = Arc::clone(&engine);
            tokio::spawn(async move {
                let mut client = moe_proto::v1::inference_client::InferenceClient::connect(
                    format!("http://{addr}"),
                )
                .await
                .unwrap();
                for (i, case) in golden_cases(fixture).iter().enumerate() {
                    let want = offline_greedy(&engine, &case.input_ids, 24);
                    let got = generate(&mut client, greedy(&case.input_ids, 24))
                        .await
                        .unwrap();
                    assert_eq!(got.ids, want.output_ids, "{addr} case {i}");
                    assert_eq!(got.logprobs, want.logprobs, "{addr} case {i}");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    for addr in &routers {
        let s = wait_status(addr, MINUTE, "status", |_| true).await;
        assert_eq!(s.serving_transport, "tcp", "{addr}");
        assert!(s.collective_layers > 0, "{addr}: {s:?}");
        assert_eq!(s.collective_failures, 0, "{addr}: {s:?}");
    }
}

/// A node that stalls past the dispatch timeout (SIGSTOP: a GC pause, a noisy neighbour)
/// breaks the collective without being dead: the layer is redone over gRPC, which the node
/// answers once it resumes, so the epoch stays; the planner then forms a new communicator for
/// the same epoch and the layers go back over it. Nothing is lost or changed on the way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_node_breaks_the_collective_and_the_same_epoch_re_forms_it() {
    let fixture = FIXTURES[0];
    let engine = Engine::load(&fixture_dir(fixture)).unwrap();
    let mut spec = tcp_spec(fixture, 2);
    spec.router_args
        .extend(["--dispatch-timeout-ms".into(), "1500".into()]);
    let cluster = LocalCluster::start(spec).unwrap();
    wait_serving(&cluster, 2).await;
    let before = wait_status(&cluster.router_addr, MINUTE, "collective formed", |s| {
        s.serving_transport == "tcp"
    })
    .await;

    let answers = Arc::new(expected_answers(
        &engine,
        &golden_cases(fixture)
            .iter()
            .cycle()
            .take(6)
            .map(|c| (c.input_ids.clone(), 96))
            .collect::<Vec<_>>(),
    ));
    let load = GreedyLoad::start(vec![cluster.router_addr.clone()], answers, 6, Some(1));
    let deadline = Instant::now() + MINUTE;
    while load.progress.tokens.load(Ordering::Relaxed) < 6 * 4 {
        assert!(Instant::now() < deadline, "streams did not start");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let victim = serving_nodes(&before)[0].clone();
    let pid = cluster.node_pid(&victim).expect("victim runs").to_string();
    let signal = |sig: &str| {
        let ok = std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill {sig} {pid}");
    };
    signal("-STOP");
    // Resume as soon as the collective has failed, well inside the gRPC retry's deadline.
    let broken = async {
        loop {
            let s = harness::status(&cluster).await;
            if s.collective_failures >= 1 {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let broken = tokio::time::timeout(MINUTE, broken).await;
    signal("-CONT");
    let broken = broken.expect("the pause broke the collective");
    assert_eq!(broken.serving_epoch, before.serving_epoch);

    let report = tokio::time::timeout(2 * MINUTE, load.finish())
        .await
        .expect("requests finish");
    assert_eq!(report.failed, 0, "{:?}", report.problems);
    assert_eq!(report.mismatched, 0, "{:?}", report.problems);
    assert_eq!(report.completed, 6);

    let reformed = wait_status(
        &cluster.router_addr,
        MINUTE,
        "the epoch's collective re-formed",
        |s| s.serving_transport == "tcp",
    )
    .await;
    assert_eq!(
        reformed.serving_epoch, before.serving_epoch,
        "the same epoch, not a re-plan: {reformed:?}"
    );
    assert_eq!(reformed.suspect_replans, 0, "{reformed:?}");
    assert_eq!(serving_nodes(&reformed), serving_nodes(&before));
    let case = &golden_cases(fixture)[0];
    let want = offline_greedy(&engine, &case.input_ids, 24);
    let mut client = harness::inference(&cluster).await;
    let got = generate(&mut client, greedy(&case.input_ids, 24))
        .await
        .unwrap();
    assert_eq!(got.ids, want.output_ids);
    assert_eq!(got.logprobs, want.logprobs);
    let end = harness::status(&cluster).await;
    assert!(
        end.collective_layers > reformed.collective_layers,
        "layers go over the new communicator: {end:?}"
    );
    eprintln!(
        "paused node: collective failures {}, re-formed on epoch {}; collective layers {} -> {}",
        end.collective_failures,
        end.serving_epoch,
        reformed.collective_layers,
        end.collective_layers
    );
}
