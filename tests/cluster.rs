//! The cluster with real processes (etcd, router, expert nodes) answers exactly like the offline
//! engine, whatever the number of nodes and whatever else is in the batch.

use moe_model::Engine;
use moe_tests::harness::{self, generate, offline_greedy, wait_serving};
use moe_tests::{fixture_dir, golden_cases, FIXTURES, KIMI_FIXTURE, KIMI_INT4_FIXTURE};
use moe_tooling::{greedy, LocalCluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_fixture_on_one_two_and_three_nodes_matches_offline() {
    for fixture in FIXTURES
        .into_iter()
        .chain([KIMI_FIXTURE, KIMI_INT4_FIXTURE])
    {
        let engine = Engine::load(&fixture_dir(fixture)).unwrap();
        let cases = golden_cases(fixture);
        let expected: Vec<_> = cases
            .iter()
            .map(|c| offline_greedy(&engine, &c.input_ids, 24))
            .collect();
        for nodes in 1..=3 {
            let cluster = LocalCluster::start(harness::spec(fixture_dir(fixture), nodes)).unwrap();
            let status = wait_serving(&cluster, nodes).await;
            let placed: usize = status.nodes.iter().map(|n| n.experts.len()).sum();
            let cfg = engine.config();
            assert_eq!(
                placed,
                cfg.moe_layer_indices().count() * cfg.moe.num_experts,
                "{fixture}: every expert placed once"
            );
            let mut client = harness::inference(&cluster).await;
            for (i, case) in cases.iter().enumerate() {
                let got = generate(&mut client, greedy(&case.input_ids, 24))
                    .await
                    .unwrap();
                assert_eq!(
                    got.ids, expected[i].output_ids,
                    "{fixture} on {nodes} nodes, case {i}"
                );
                assert_eq!(
                    got.logprobs, expected[i].logprobs,
                    "{fixture} on {nodes} nodes, case {i}: logprobs not bitwise equal"
                );
                assert_eq!(got.finish_reason, "length");
                assert_eq!(
                    (got.prompt_tokens, got.completion_tokens),
                    (case.input_ids.len() as u32, 24)
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_concurrent_streams_equal_each_alone() {
    concurrent_streams_equal_each_alone(1).await;
}

/// The same streams with every step split into two micro-batches run at once (two-batch
/// overlap): the same tokens and logprobs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_concurrent_streams_in_two_micro_batches_equal_each_alone() {
    concurrent_streams_equal_each_alone(2).await;
}

async fn concurrent_streams_equal_each_alone(micro_batches: u32) {
    let fixture = FIXTURES[1];
    let batches = micro_batches.to_string();
    let status = harness::cluster_matches_offline(
        fixture_dir(fixture),
        &golden_cases(fixture),
        &["--micro-batches", &batches],
    )
    .await;
    if micro_batches > 1 {
        assert!(status.micro_batched_steps > 0, "no step was split");
    } else {
        assert_eq!(status.micro_batched_steps, 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_prefill_beside_running_decodes_is_exact() {
    // A 7-token step budget: every prompt is split over several steps, next to other
    // sequences' decode tokens, and still gives exactly the offline tokens.
    let fixture = FIXTURES[0];
    let engine = Engine::load(&fixture_dir(fixture)).unwrap();
    let cases = golden_cases(fixture);
    let mut spec = harness::spec(fixture_dir(fixture), 2);
    spec.router_args
        .extend(["--max-batch-tokens", "7"].map(String::from));
    let cluster = LocalCluster::start(spec).unwrap();
    wait_serving(&cluster, 2).await;
    let mut tasks = Vec::new();
    for case in &cases {
        let mut client = harness::inference(&cluster).await;
        let ids = case.input_ids.clone();
        tasks.push(tokio::spawn(async move {
            generate(&mut client, greedy(&ids, 12)).await.unwrap()
        }));
    }
    for (task, case) in tasks.into_iter().zip(&cases) {
        let got = task.await.unwrap();
        let alone = offline_greedy(&engine, &case.input_ids, 12);
        assert_eq!(got.ids, alone.output_ids);
        assert_eq!(got.logprobs, alone.logprobs);
    }
}

/// Nodes that accept only 3 rows per dispatch (`--max-batch-rows 3`, published in etcd) get
/// each prefill layer in several batches, over gRPC and over the TCP collective (which falls
/// back to gRPC for a layer over a node's bound): the same tokens and logprobs as offline, and
/// no node ever refuses a batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_with_a_small_batch_bound_get_layers_in_pieces() {
    let fixture = FIXTURES[0];
    let engine = Engine::load(&fixture_dir(fixture)).unwrap();
    let cases = golden_cases(fixture);
    for transport in ["grpc", "tcp"] {
        let mut spec = harness::spec(fixture_dir(fixture), 2);
        spec.node_args
            .extend(["--max-batch-rows".into(), "3".into()]);
        spec.router_args
            .extend(["--transport".into(), transport.into()]);
        let cluster = LocalCluster::start(spec).unwrap();
        wait_serving(&cluster, 2).await;
        let mut client = harness::inference(&cluster).await;
        for (i, case) in cases.iter().enumerate() {
            assert!(case.input_ids.len() > 3, "the prompt spans several batches");
            let expected = offline_greedy(&engine, &case.input_ids, 8);
            let got = generate(&mut client, greedy(&case.input_ids, 8))
                .await
                .unwrap_or_else(|e| panic!("{transport} case {i}: {e}"));
            assert_eq!(got.ids, expected.output_ids, "{transport} case {i}");
            assert_eq!(got.logprobs, expected.logprobs, "{transport} case {i}");
        }
        let status = harness::status(&cluster).await;
        assert_eq!(
            status.layer_retries, 0,
            "{transport}: no batch was refused: {status:?}"
        );
    }
}
