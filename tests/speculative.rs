//! Speculative decoding (`moe-router --speculative-config`, vLLM's `ngram` prompt-lookup
//! drafts): every answer is bitwise the one a router without it gives (tokens, logprobs,
//! texts, finish reasons), greedy or sampled, with penalties, stop strings, grammars and `n`,
//! alone or in a batch, in one process or across expert nodes; and drafts that agree save
//! steps.

use moe_model::Engine;
use moe_tests::harness::{self, metric_value, wait_serving};
use moe_tests::{fixture_dir, golden_cases, FIXTURES};
use moe_tooling::{free_port, LocalCluster, SingleProcessRouter};
use serde_json::{json, Value};

const SPECULATIVE_CONFIG: &str = r#"{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3}"#;

fn start(fixture: &str, speculate: bool) -> SingleProcessRouter {
    let mut args: Vec<String> = vec![
        "--etcd".into(),
        format!("http://127.0.0.1:{}", free_port().expect("a free port")),
        "--http-listen".into(),
        "127.0.0.1:0".into(),
    ];
    if speculate {
        args.extend(["--speculative-config".into(), SPECULATIVE_CONFIG.into()]);
    }
    SingleProcessRouter::start(
        &harness::binary("moe-router"),
        &fixture_dir(fixture),
        2,
        &args,
        std::env::var_os("MOE_TEST_LOGS").is_some(),
    )
    .unwrap()
}

/// The completion for `body` from the router's HTTP API at `http`, without what differs
/// between any two answers (id, time).
async fn complete(http: String, body: Value) -> Value {
    let mut answer = harness::post_json(&http, "/v1/completions", &body).await;
    let object = answer.as_object_mut().unwrap();
    object.remove("id");
    object.remove("created");
    answer
}

/// Requests that sample every way a step can: greedy, seeded draws (top-p, top-k, min-p),
/// penalties, a stop string inside the answer (so a step's picks stop part-way through its
/// draft), a grammar, allowed tokens (loops the drafts catch), `n` choices, a budget shorter
/// than a draft, and logprobs throughout.
fn bodies(model: &str, prompt: &[u32], stop: &str) -> Vec<Value> {
    let base = json!({"model": model, "prompt": prompt, "logprobs": 2, "ignore_eos": true});
    let with = |extra: Value| {
        let mut body = base.clone();
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };
    vec![
        with(json!({"max_tokens": 48, "temperature": 0})),
        with(json!({"max_tokens": 40, "temperature": 0.8, "top_p": 0.9, "seed": 7})),
        with(
            json!({"max_tokens": 40, "temperature": 1.0, "top_k": 5, "seed": 3,
                    "repetition_penalty": 1.3, "frequency_penalty": 0.5, "presence_penalty": 0.3}),
        ),
        with(json!({"max_tokens": 32, "temperature": 0.7, "min_p": 0.05, "seed": 11})),
        with(json!({"max_tokens": 48, "temperature": 0, "stop": [stop]})),
        with(json!({"max_tokens": 30, "temperature": 0, "guided_regex": "(ab|cd)+e"})),
        with(json!({"max_tokens": 40, "temperature": 0, "allowed_token_ids": [5, 6, 7, 8, 9]})),
        with(json!({"max_tokens": 24, "temperature": 1.0, "n": 3, "seed": 5})),
        with(json!({"max_tokens": 2, "temperature": 0})),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drafts_change_no_answer_and_save_steps() {
    for fixture in [FIXTURES[0], FIXTURES[1]] {
        let plain = start(fixture, false);
        let speculating = start(fixture, true);
        let plain_http = plain.http_addr.clone().expect("--http-listen");
        let spec_http = speculating.http_addr.clone().expect("--http-listen");
        let prompt: Vec<u32> = golden_cases(fixture)[0].input_ids.clone();
        // A stop string from the middle of the greedy answer.
        let greedy_text = complete(
            plain_http.clone(),
            json!({"model": fixture, "prompt": prompt, "max_tokens": 48, "temperature": 0, "ignore_eos": true}),
        )
        .await["choices"][0]["text"]
            .as_str()
            .unwrap()
            .to_string();
        let middle: String = greedy_text.chars().skip(20).take(3).collect();
        let bodies = bodies(fixture, &prompt, &middle);
        let steps_before =
            metric_value(&harness::scrape(&plain_http).await, "moe_step_tokens_count");

        // One at a time: the same answers, in fewer steps.
        let mut expected = Vec::new();
        for body in &bodies {
            let want = complete(plain_http.clone(), body.clone()).await;
            let got = complete(spec_http.clone(), body.clone()).await;
            assert_eq!(got, want, "{fixture}: {body}");
            expected.push(want);
        }
        let plain_page = harness::scrape(&plain_http).await;
        let page = harness::scrape(&spec_http).await;
        let drafted = metric_value(&page, "moe_spec_decode_draft_tokens_total");
        let accepted = metric_value(&page, "moe_spec_decode_accepted_tokens_total");
        assert!(
            accepted > 0.0 && accepted <= drafted,
            "{fixture}: {accepted} of {drafted} draft tokens accepted"
        );
        assert_eq!(
            metric_value(&plain_page, "moe_spec_decode_drafts_total"),
            0.0
        );
        let plain_steps = metric_value(&plain_page, "moe_step_tokens_count") - steps_before;
        let spec_steps = metric_value(&page, "moe_step_tokens_count");
        assert!(
            spec_steps < plain_steps,
            "{fixture}: {spec_steps} steps with drafts, {plain_steps} without"
        );

        // All at once: drafts checked beside other sequences' decodes and prefills.
        let tasks: Vec<_> = bodies
            .iter()
            .map(|body| tokio::spawn(complete(spec_http.clone(), body.clone())))
            .collect();
        for ((task, want), body) in tasks.into_iter().zip(&expected).zip(&bodies) {
            assert_eq!(&task.await.unwrap(), want, "{fixture} in a batch: {body}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_speculating_cluster_gives_the_offline_tokens_in_a_batch() {
    // Two expert-node processes, a tight step budget (drafts cut to fit beside prefill
    // chunks) and two micro-batches: the offline engine's tokens, bit for bit.
    let fixture = FIXTURES[0];
    let engine = Engine::load(&fixture_dir(fixture)).unwrap();
    let cases = golden_cases(fixture);
    let mut spec = harness::spec(fixture_dir(fixture), 2);
    spec.router_args.extend(
        [
            "--speculative-config",
            SPECULATIVE_CONFIG,
            "--max-batch-tokens",
            "12",
            "--micro-batches",
            "2",
        ]
        .map(String::from),
    );
    let cluster = LocalCluster::start(spec).unwrap();
    wait_serving(&cluster, 2).await;
    let requests = harness::mixed_requests(&cases);
    harness::concurrent_greedy_matches_offline(&cluster.router_addr, &engine, requests).await;
    let status = harness::status(&cluster).await;
    assert_eq!(status.requests_running, 0);
    assert_eq!(
        status.kv_blocks_used, status.kv_blocks_cached,
        "finished requests free their KV blocks, rejected drafts' included"
    );
}

#[test]
fn a_config_it_cannot_honour_stops_the_router_by_name() {
    let out = std::process::Command::new(harness::binary("moe-router"))
        .args(["--model", fixture_dir(FIXTURES[0]).to_str().unwrap()])
        .args([
            "--speculative-config",
            r#"{"method": "deepseek_mtp", "num_speculative_tokens": 1}"#,
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("method `deepseek_mtp` is not implemented"),
        "{stderr}"
    );
}
