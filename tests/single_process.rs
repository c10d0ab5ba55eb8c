//! A router that serves the whole model by itself (`moe-router --in-process-nodes N`): its
//! routed experts on expert nodes that are threads of it, reached over the in-process layer
//! exchange, with no etcd and no expert-node process. It answers exactly like the offline
//! engine, alone or in a batch, split into micro-batches or not, over gRPC and HTTP.

use std::process::Command;

use moe_model::Engine;
use moe_proto::v1::admin_client::AdminClient;
use moe_proto::v1::inference_client::InferenceClient;
use moe_proto::v1::DrainRequest;
use moe_tests::harness::{self, generate, offline_greedy, python_grpc_client};
use moe_tests::{fixture_dir, golden_cases, FIXTURES, FP8_FIXTURE};
use moe_tooling::{free_port, greedy, SingleProcessRouter};
use serde_json::Value;

/// What a router serving `model` with `extra` flags says as it refuses to start (it must).
fn refused_at_start(model: &std::path::Path, extra: &[&str]) -> String {
    let out = Command::new(harness::binary("moe-router"))
        .args(["--model", &model.display().to_string()])
        .args(["--in-process-nodes", "1", "--grpc-listen", "127.0.0.1:0"])
        .args(extra)
        .args(no_etcd())
        .output()
        .unwrap();
    assert!(!out.status.success(), "{extra:?} started");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// etcd flags that point at a port nobody listens on: the router must not need them.
fn no_etcd() -> Vec<String> {
    vec![
        "--etcd".into(),
        format!("http://127.0.0.1:{}", free_port().expect("a free port")),
    ]
}

fn start(fixture: &str, nodes: usize, extra: &[&str]) -> SingleProcessRouter {
    let mut args = no_etcd();
    args.extend(extra.iter().map(|s| s.to_string()));
    SingleProcessRouter::start(
        &harness::binary("moe-router"),
        &fixture_dir(fixture),
        nodes,
        &args,
        std::env::var_os("MOE_TEST_LOGS").is_some(),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_fixture_served_by_one_process_matches_offline_without_etcd() {
    let fixtures = FIXTURES.iter().chain([&FP8_FIXTURE]);
    for (k, fixture) in fixtures.enumerate() {
        let engine = Engine::load(&fixture_dir(fixture)).unwrap();
        let cases = golden_cases(fixture);
        // 1, 2 and 3 nodes over the fixtures: the experts dealt differently each time.
        let nodes = 1 + k % 3;
        let router = start(fixture, nodes, &["--http-listen", "127.0.0.1:0"]);
        let health = python_grpc_client(&["health", &router.grpc_addr]);
        assert_eq!(health["overall"], "SERVING", "{fixture}: serving at once");
        assert_eq!(health["inference"], "SERVING");
        let mut client = InferenceClient::connect(format!("http://{}", router.grpc_addr))
            .await
            .unwrap();
        for (i, case) in cases.iter().enumerate() {
            let expected = offline_greedy(&engine, &case.input_ids, 24);
            let got = generate(&mut client, greedy(&case.input_ids, 24))
                .await
                .unwrap();
            assert_eq!(
                got.ids, expected.output_ids,
                "{fixture} on {nodes} in-process nodes, case {i}"
            );
            assert_eq!(
                got.logprobs, expected.logprobs,
                "{fixture} on {nodes} in-process nodes, case {i}: logprobs not bitwise equal"
            );
            assert_eq!(got.finish_reason, "length");
        }
        // The OpenAI-compatible API of the same process: the same tokens.
        let case = &cases[0];
        let expected = offline_greedy(&engine, &case.input_ids, 8);
        let body = serde_json::json!({
            "model": fixture,
            "prompt": case.input_ids,
            "max_tokens": 8,
            "temperature": 0,
            "logprobs": 0,
            "ignore_eos": true,
        });
        let http = router.http_addr.as_deref().expect("--http-listen");
        let (status, text) = harness::http(
            http,
            "POST",
            "/v1/completions",
            None,
            body.to_string().as_bytes(),
        )
        .await;
        assert_eq!(status, 200, "{fixture}: {text}");
        let answer: Value = serde_json::from_str(&text).unwrap();
        let logprobs: Vec<f32> = answer["choices"][0]["logprobs"]["token_logprobs"]
            .as_array()
            .unwrap_or_else(|| panic!("{fixture}: no logprobs in {text}"))
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(logprobs, expected.logprobs, "{fixture}: HTTP logprobs");
    }
}

/// Sixteen streams at once: every answer equals the request's alone, and the status, health
/// and metrics say where the experts are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_streams_on_in_process_nodes_equal_each_alone() {
    let fixture = FIXTURES[1];
    let engine = Engine::load(&fixture_dir(fixture)).unwrap();
    let cases = golden_cases(fixture);
    let router = start(fixture, 3, &["--http-listen", "127.0.0.1:0"]);
    let requests = harness::mixed_requests(&cases);
    harness::concurrent_greedy_matches_offline(&router.grpc_addr, &engine, requests).await;

    let status = harness::settled_status(&router.grpc_addr).await;
    let mut admin = AdminClient::connect(format!("http://{}", router.grpc_addr))
        .await
        .unwrap();
    assert_eq!(status.in_process_nodes, 3);
    assert_eq!(status.serving_transport, "in-process");
    assert!(
        status.nodes.is_empty(),
        "no expert-node process: {status:?}"
    );
    assert_eq!(status.requests_running, 0);
    assert_eq!(status.micro_batched_steps, 0);
    assert_eq!(status.kv_blocks_used, status.kv_blocks_cached);
    // There is no node to drain.
    let drained = admin
        .drain(DrainRequest {
            node_id: "in-process-node-1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(drained.code(), tonic::Code::NotFound, "{drained:?}");

    let http = router.http_addr.as_deref().expect("--http-listen");
    let (code, metrics) = harness::http(http, "GET", "/metrics", None, b"").await;
    assert_eq!(code, 200);
    assert!(
        metrics.lines().any(|l| l == "moe_in_process_nodes 3"),
        "metrics: {metrics}"
    );
    let (code, _) = harness::http(http, "GET", "/health", None, b"").await;
    assert_eq!(code, 200);
}

/// The in-process exchange has no transport to choose and no exchange to overlap: asking for
/// either is a clear error at start, not a router that ignores it.
#[test]
fn in_process_nodes_with_a_transport_are_refused() {
    let out = Command::new(harness::binary("moe-router"))
        .args(["--model", &fixture_dir(FIXTURES[0]).display().to_string()])
        .args(["--in-process-nodes", "2", "--transport", "tcp"])
        .args(["--grpc-listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--in-process-nodes") && stderr.contains("--transport"),
        "{stderr}"
    );
    let out = Command::new(harness::binary("moe-router"))
        .args(["--model", &fixture_dir(FIXTURES[0]).display().to_string()])
        .args(["--in-process-nodes", "2", "--micro-batches", "2"])
        .args(["--grpc-listen", "127.0.0.1:0"])
        .args(no_etcd())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--micro-batches 2"), "{stderr}");
    let out = Command::new(harness::binary("moe-router"))
        .args(["--model", &fixture_dir(FIXTURES[0]).display().to_string()])
        .args(["--in-process-nodes", "65", "--grpc-listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("65"));
}

/// `--max-model-len` (vLLM's): a shorter context than the checkpoint's, reported by
/// `/v1/models` and `/tokenize`, bounding every request (in vLLM's words), and how long a chat
/// without `max_tokens` may run; one longer than the checkpoint's stops the router by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_model_len_bounds_requests_and_is_reported() {
    use serde_json::json;
    let fixture = FIXTURES[0];
    let router = start(
        fixture,
        1,
        &["--http-listen", "127.0.0.1:0", "--max-model-len", "40"],
    );
    let http = router.http_addr.clone().expect("--http-listen");
    let (status, models) = harness::http(&http, "GET", "/v1/models", None, b"").await;
    assert_eq!(status, 200, "{models}");
    let models: Value = serde_json::from_str(&models).unwrap();
    assert_eq!(models["data"][0]["max_model_len"], 40);
    let tokenized = harness::post_json(&http, "/tokenize", &json!({"prompt": "hi"})).await;
    assert_eq!(tokenized["max_model_len"], 40);

    let prompt: Vec<u32> = (5..15).collect();
    let completion = |max_tokens: u32| {
        json!({"model": fixture, "prompt": prompt, "max_tokens": max_tokens,
               "temperature": 0, "ignore_eos": true})
    };
    let fits = harness::post_json(&http, "/v1/completions", &completion(30)).await;
    assert_eq!(fits["usage"]["completion_tokens"], 30);
    let body = completion(31).to_string();
    let (status, text) =
        harness::http(&http, "POST", "/v1/completions", None, body.as_bytes()).await;
    assert_eq!(status, 400, "{text}");
    assert!(
        text.contains("maximum context length is 40 tokens, but 41 were asked for"),
        "{text}"
    );
    let chat = json!({"model": fixture, "messages": [{"role": "user", "content": "hi"}],
                      "temperature": 0, "ignore_eos": true});
    let answer = harness::post_json(&http, "/v1/chat/completions", &chat).await;
    let usage = &answer["usage"];
    let used =
        usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap();
    assert_eq!(used, 40, "{answer}");
    drop(router);

    let stderr = refused_at_start(&fixture_dir(fixture), &["--max-model-len", "5000"]);
    assert!(
        stderr.contains("--max-model-len 5000") && stderr.contains("(1024)"),
        "{stderr}"
    );
}

/// The generation config's `max_new_tokens`, as vLLM serves it: with `auto` the checkpoint's
/// is the `max_tokens` of a chat request that gives none, not a cap; a folder's
/// (`--generation-config DIR`) and `--override-generation-config`'s also cap every request,
/// chat or completion; an override of a field that cannot be overridden stops the router by
/// name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_new_tokens_is_chats_default_and_a_folders_or_an_overrides_caps_every_request() {
    use serde_json::json;
    let fixture = FIXTURES[0];
    let source = fixture_dir(fixture);
    let dir = moe_tests::with_generation_config(
        &source,
        "generation-max-new-tokens",
        &json!({"max_new_tokens": 5}),
    );
    let start_on = |extra: &[&str]| {
        let mut args = no_etcd();
        args.extend(["--http-listen", "127.0.0.1:0"].map(String::from));
        args.extend(extra.iter().map(|s| s.to_string()));
        SingleProcessRouter::start(&harness::binary("moe-router"), &dir.0, 1, &args, false).unwrap()
    };
    // Completion tokens of a chat (max_tokens: None = unset) and of a completion.
    let lengths = |http: String| async move {
        let chat = |max_tokens: Option<u32>| {
            let mut body = json!({"messages": [{"role": "user", "content": "hi"}],
                                  "temperature": 0, "ignore_eos": true});
            if let Some(n) = max_tokens {
                body["max_tokens"] = n.into();
            }
            body
        };
        let used = |answer: Value| answer["usage"]["completion_tokens"].as_u64().unwrap();
        let unset = used(harness::post_json(&http, "/v1/chat/completions", &chat(None)).await);
        let nine = used(harness::post_json(&http, "/v1/chat/completions", &chat(Some(9))).await);
        let completion = json!({"prompt": "hello", "max_tokens": 9, "temperature": 0,
                                "ignore_eos": true});
        let completed = used(harness::post_json(&http, "/v1/completions", &completion).await);
        (unset, nine, completed)
    };
    let auto = start_on(&[]);
    let got = lengths(auto.http_addr.clone().unwrap()).await;
    assert_eq!(got, (5, 9, 9), "auto: the checkpoint's default, no cap");
    drop(auto);
    let folder = dir.0.to_str().unwrap().to_string();
    let capped = start_on(&["--generation-config", &folder]);
    let got = lengths(capped.http_addr.clone().unwrap()).await;
    assert_eq!(got, (5, 5, 5), "a folder's: default and cap");
    drop(capped);
    let overridden = start_on(&["--override-generation-config", r#"{"max_new_tokens": 3}"#]);
    let got = lengths(overridden.http_addr.clone().unwrap()).await;
    assert_eq!(got, (3, 3, 3), "an override's: default and cap");
    drop(overridden);
    let stderr = refused_at_start(
        &dir.0,
        &["--override-generation-config", r#"{"stop": ["x"]}"#],
    );
    assert!(
        stderr.contains("--override-generation-config: `stop` cannot be overridden"),
        "{stderr}"
    );
}

/// `--generation-config` (vLLM's, `auto` by default): the checkpoint's
/// `generation_config.json` gives the sampling of the fields a request leaves unset (the
/// same answer as a request that asks for them, seeded), never of those it sets (an explicit
/// `top_k: -1` stays off), and its `eos_token_id` list ends answers as config.json's does, the
/// same in the offline engine; `vllm` ignores the sampling; a folder without the file stops
/// the router by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checkpoints_generation_config_fills_unset_sampling_and_ends_answers() {
    use serde_json::json;
    let fixture = FIXTURES[0];
    let source = fixture_dir(fixture);
    let prompt: Vec<u32> = golden_cases(fixture)[0].input_ids.clone();
    // An extra end token: the fourth token greedy decoding gives.
    let plain = Engine::load(&source).unwrap();
    let greedy_ids = offline_greedy(&plain, &prompt, 8).output_ids;
    let end = greedy_ids[3];
    let stop_at = greedy_ids.iter().position(|&t| t == end).unwrap();
    let generation = json!({"do_sample": true, "temperature": 0.7, "top_p": 0.9, "top_k": 5,
                            "eos_token_id": [1, end]});
    let dir = moe_tests::with_generation_config(&source, "generation-config", &generation);
    // The offline engine stops there too.
    let offline = Engine::load(&dir.0).unwrap();
    let stopped = offline
        .generate(&moe_model::GenerateRequest {
            input_ids: prompt.clone(),
            max_new_tokens: 8,
            sampling: Default::default(),
            ignore_eos: false,
            emit_logits: false,
        })
        .unwrap();
    assert_eq!(stopped.output_ids, greedy_ids[..=stop_at]);

    let start_on = |extra: &[&str]| {
        let mut args = no_etcd();
        args.extend(["--http-listen", "127.0.0.1:0"].map(String::from));
        args.extend(extra.iter().map(|s| s.to_string()));
        SingleProcessRouter::start(&harness::binary("moe-router"), &dir.0, 1, &args, false).unwrap()
    };
    let completion = |extra: Value| {
        let mut body = json!({"prompt": prompt, "max_tokens": 16, "seed": 5, "logprobs": 1,
                              "ignore_eos": true});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };
    let text_of = |answer: &Value| answer["choices"][0]["logprobs"]["tokens"].clone();
    let auto = start_on(&[]);
    let http = auto.http_addr.clone().expect("--http-listen");
    let unset = harness::post_json(&http, "/v1/completions", &completion(json!({}))).await;
    let asked = json!({"temperature": 0.7, "top_p": 0.9, "top_k": 5});
    let explicit = harness::post_json(&http, "/v1/completions", &completion(asked)).await;
    assert_eq!(text_of(&unset), text_of(&explicit), "{unset}\n{explicit}");
    let off = json!({"temperature": 0.7, "top_p": 0.9, "top_k": -1});
    let top_k_off = harness::post_json(&http, "/v1/completions", &completion(off)).await;
    let api_defaults = json!({"temperature": 1.0, "top_p": 1.0, "top_k": -1});
    let at_one = harness::post_json(&http, "/v1/completions", &completion(api_defaults)).await;
    // The end token ends a greedy answer here as offline.
    let greedy = json!({"temperature": 0, "ignore_eos": false, "max_tokens": 8});
    let ended = harness::post_json(&http, "/v1/completions", &completion(greedy)).await;
    assert_eq!(ended["choices"][0]["finish_reason"], "stop", "{ended}");
    assert_eq!(
        ended["usage"]["completion_tokens"].as_u64(),
        Some(stop_at as u64 + 1),
        "the end token counted, as vLLM counts it: {ended}"
    );
    drop(auto);

    let vllm = start_on(&["--generation-config", "vllm"]);
    let http = vllm.http_addr.clone().expect("--http-listen");
    let unset_vllm = harness::post_json(&http, "/v1/completions", &completion(json!({}))).await;
    assert_eq!(
        text_of(&unset_vllm),
        text_of(&at_one),
        "vllm: the API's defaults"
    );
    // Seeded draws at other settings differ somewhere over 16 tokens on this model.
    assert_ne!(text_of(&unset), text_of(&unset_vllm));
    assert_ne!(
        text_of(&explicit),
        text_of(&top_k_off),
        "top_k -1 stayed off"
    );
    drop(vllm);

    let stderr = refused_at_start(&dir.0, &["--generation-config", "/nonexistent-folder"]);
    assert!(
        stderr.contains("--generation-config /nonexistent-folder"),
        "{stderr}"
    );
}
