//! A cluster whose expert nodes run their experts on a GPU (`--device cuda:0`, f32, or the
//! numerics `MOE_TEST_GPU_DTYPE` names) answers with transformers' golden tokens, as the CPU
//! cluster does. The router's dense part runs on
//! the same device unless `MOE_TEST_ROUTER_DEVICE` says otherwise; the rows reach the nodes
//! over the gRPC data plane, or with `MOE_TEST_TRANSPORT=tcp` over the per-epoch TCP
//! collective (the nodes then run their GPU experts on the collective's thread).
//!
//! Needs an NVIDIA GPU and a `--features cuda` build of `moe-expert-node`, so it is ignored by
//! default; `ops/gpu-check.sh` runs it (`MOE_BIN_DIR` points at the binaries it carries).

use std::time::Duration;

use moe_tests::harness::{self, wait_serving, wait_status};
use moe_tests::{fixture_dir, golden_cases, steps_to_compare_at, FIXTURES};
use moe_tooling::{greedy, LocalCluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs an NVIDIA GPU and a cuda build of moe-expert-node (ops/gpu-check.sh runs it)"]
async fn gpu_expert_nodes_give_the_golden_tokens() {
    // `MOE_TEST_DEVICE=cpu` runs the same test on CPU nodes (to check the test itself).
    let device = std::env::var("MOE_TEST_DEVICE").unwrap_or_else(|_| "cuda:0".into());
    let router_device = std::env::var("MOE_TEST_ROUTER_DEVICE").unwrap_or_else(|_| device.clone());
    // `f32` unless told (`bf16x2` meets the golden tolerance too); the processes read the rest
    // of their device flags (`MOE_GPU_EXPERT_GEMM`, ...) from the environment they inherit.
    let dtype = std::env::var("MOE_TEST_GPU_DTYPE").unwrap_or_else(|_| "f32".into());
    for fixture in FIXTURES {
        let mut spec = harness::spec(fixture_dir(fixture), 2);
        spec.node_args.extend([
            "--device".into(),
            device.clone(),
            "--gpu-dtype".into(),
            dtype.clone(),
        ]);
        spec.router_args.extend([
            "--device".into(),
            router_device.clone(),
            "--gpu-dtype".into(),
            dtype.clone(),
        ]);
        let transport = std::env::var("MOE_TEST_TRANSPORT").ok();
        if let Some(t) = &transport {
            spec.router_args.extend(["--transport".into(), t.clone()]);
        }
        let cluster = LocalCluster::start(spec).expect("cluster with GPU nodes starts");
        wait_serving(&cluster, 2).await;
        if let Some(t) = &transport {
            wait_status(
                &cluster.router_addr,
                Duration::from_secs(30),
                "collective",
                |s| &s.serving_transport == t,
            )
            .await;
        }
        let mut client = harness::inference(&cluster).await;
        for (i, case) in golden_cases(fixture).iter().enumerate() {
            let n = case.output_ids.len();
            let got = harness::generate(&mut client, greedy(&case.input_ids, n as u32))
                .await
                .unwrap_or_else(|e| panic!("{fixture} case {i}: {e}"));
            // f32 and bf16x2 on the GPU are held to the CPU's 2e-3; tokens must agree up to the
            // first step whose top-2 margin is within twice that.
            let agree = steps_to_compare_at(&case.step_top2_margin, 4e-3);
            assert_eq!(
                got.ids[..agree],
                case.output_ids[..agree],
                "{fixture} case {i}: GPU nodes' tokens differ within the first {agree} steps"
            );
        }
        let s = harness::status(&cluster).await;
        assert!(
            s.dense_device.starts_with(&router_device),
            "{fixture}: the router's dense part runs on {router_device}: {s:?}"
        );
        if transport.is_some() {
            assert!(s.collective_layers > 0, "{fixture}: {s:?}");
        }
        println!(
            "{fixture}: router on {}, expert nodes on {device} ({dtype}): golden tokens over {}",
            s.dense_device,
            transport.as_deref().unwrap_or("grpc")
        );
    }
}
