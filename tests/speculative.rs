//! Speculative decoding (`moe-router --speculative-config`, vLLM's `ngram` prompt-lookup
//! drafts and DeepSeek-V3's `deepseek_mtp`): every answer is bitwise the one a router without
//! it gives (tokens, logprobs, texts, finish reasons), greedy or sampled, with penalties, stop
//! strings, grammars and `n`, alone or in a batch, in one process or across expert nodes; and
//! drafts that agree save steps.

use moe_model::config::Family;
use moe_tests::harness::{self, metric_value};
use moe_tests::{fixture_dir, golden_cases, FIXTURES};
use moe_tooling::{free_port, SingleProcessRouter};
use serde_json::{json, Value};

const SPECULATIVE_CONFIG: &str = r#"{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3}"#;

fn start(fixture: &str, speculate: bool) -> SingleProcessRouter {
    let config = speculate.then_some(SPECULATIVE_CONFIG);
    start_at(&fixture_dir(fixture), config)
}

fn start_at(model: &std::path::Path, speculative_config: Option<&str>) -> SingleProcessRouter {
    let mut args: Vec<String> = vec![
        "--etcd".into(),
        format!("http://127.0.0.1:{}", free_port().expect("a free port")),
        "--http-listen".into(),
        "127.0.0.1:0".into(),
    ];
    if let Some(config) = speculative_config {
        args.extend(["--speculative-config".into(), config.into()]);
    }
    SingleProcessRouter::start(
        &harness::binary("moe-router"),
        model,
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

/// `moe_spec_decode_accepted_tokens_per_position_total`'s samples, position 1 first.
fn accepted_per_position(page: &str) -> Vec<f64> {
    let prefix = "moe_spec_decode_accepted_tokens_per_position_total{position=\"";
    let mut samples: Vec<(usize, f64)> = page
        .lines()
        .filter_map(|l| {
            let (position, value) = l.strip_prefix(prefix)?.split_once("\"} ")?;
            Some((position.parse().ok()?, value.parse().ok()?))
        })
        .collect();
    samples.sort_by_key(|&(position, _)| position);
    assert!(samples.iter().enumerate().all(|(k, &(p, _))| p == k + 1));
    samples.into_iter().map(|(_, v)| v).collect()
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
        // By place in the draft: they add up, and a later place holds no more often.
        let per_position = accepted_per_position(&page);
        assert!(!per_position.is_empty() && per_position.len() <= 4);
        assert_eq!(per_position.iter().sum::<f64>(), accepted);
        assert!(
            per_position.windows(2).all(|w| w[0] >= w[1]),
            "{per_position:?}"
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
    // chunks) and two micro-batches: the offline engine's tokens, bit for bit, and every
    // block back, rejected drafts' included.
    let fixture = FIXTURES[0];
    let cases = golden_cases(fixture);
    harness::cluster_matches_offline(fixture_dir(fixture), &cases, &tight(SPECULATIVE_CONFIG))
        .await;
}

/// `--speculative-config CONFIG` with a 12-token step budget and two micro-batches.
fn tight(config: &str) -> [&str; 6] {
    [
        "--speculative-config",
        config,
        "--max-batch-tokens",
        "12",
        "--micro-batches",
        "2",
    ]
}

/// A tiny DeepSeek-V3 (or `family`) with its multi-token-prediction layer (`moe
/// gen-checkpoint --mtp-layers 1`'s), in a directory of this test process's.
fn checkpoint_with_mtp(name: &str) -> std::path::PathBuf {
    checkpoint_of_family_with_mtp(name, Family::DeepseekV3)
}

fn checkpoint_of_family_with_mtp(name: &str, family: Family) -> std::path::PathBuf {
    use moe_model::generator::{CheckpointPlan, Preset, WeightDtype};
    let dir = std::env::temp_dir().join(format!(
        "moe-mtp-{}-{name}-{}",
        std::process::id(),
        family.model_type()
    ));
    let mut plan = CheckpointPlan::new(family, Preset::Tiny, WeightDtype::Bf16, 17);
    plan.mtp_layers = 1;
    plan.write(&dir).unwrap();
    dir
}

const MTP_CONFIG: &str = r#"{"method": "deepseek_mtp", "num_speculative_tokens": 2}"#;

/// DeepSeek-V3's own draft head, and GLM-4.5's (`mtp`): the same answers, one at a time and
/// all at once, and it drafts (a random checkpoint's head seldom guesses right; what it saves
/// on a trained model is docs/performance.md's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtp_drafts_change_no_answer() {
    mtp_answers_unchanged(Family::DeepseekV3, MTP_CONFIG).await;
    let glm = r#"{"method": "mtp", "num_speculative_tokens": 2}"#;
    mtp_answers_unchanged(Family::Glm4Moe, glm).await;
}

async fn mtp_answers_unchanged(family: Family, config: &str) {
    let dir = checkpoint_of_family_with_mtp("answers", family);
    let model = dir.file_name().unwrap().to_str().unwrap().to_string();
    let plain = start_at(&dir, None);
    let drafting = start_at(&dir, Some(config));
    let plain_http = plain.http_addr.clone().expect("--http-listen");
    let mtp_http = drafting.http_addr.clone().expect("--http-listen");
    let prompt: Vec<u32> = golden_cases(FIXTURES[0])[0].input_ids.clone();
    let bodies = bodies(&model, &prompt, "e");
    let mut expected = Vec::new();
    for body in &bodies {
        let want = complete(plain_http.clone(), body.clone()).await;
        assert!(want.get("choices").is_some(), "{want}");
        let got = complete(mtp_http.clone(), body.clone()).await;
        assert_eq!(got, want, "{body}");
        expected.push(want);
    }
    let tasks: Vec<_> = bodies
        .iter()
        .map(|body| tokio::spawn(complete(mtp_http.clone(), body.clone())))
        .collect();
    for ((task, want), body) in tasks.into_iter().zip(&expected).zip(&bodies) {
        assert_eq!(&task.await.unwrap(), want, "in a batch: {body}");
    }
    let page = harness::scrape(&mtp_http).await;
    let drafted = metric_value(&page, "moe_spec_decode_draft_tokens_total");
    let accepted = metric_value(&page, "moe_spec_decode_accepted_tokens_total");
    assert!(drafted > 0.0, "{family:?}: the MTP head drafted nothing");
    assert!(accepted <= drafted, "{accepted} of {drafted}");
    drop((plain, drafting));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The head beside a cluster: its experts on the router, the main layers' on two expert-node
/// processes, a tight step budget and two micro-batches: the offline engine's tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mtp_drafting_cluster_gives_the_offline_tokens_in_a_batch() {
    let dir = checkpoint_with_mtp("cluster");
    let cases = golden_cases(FIXTURES[0]);
    harness::cluster_matches_offline(dir.clone(), &cases, &tight(MTP_CONFIG)).await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// Refusals at start, by name: a method not implemented, and `deepseek_mtp` on checkpoints
/// without the layer (the bundled DeepSeek-V3 fixture names one in its config but, written by
/// transformers, holds none of its tensors; Qwen3-MoE has none).
#[test]
fn a_config_it_cannot_honour_stops_the_router_by_name() {
    let refusal = |fixture: &str, config: &str| {
        let out = std::process::Command::new(harness::binary("moe-router"))
            .args(["--model", fixture_dir(fixture).to_str().unwrap()])
            .args(["--speculative-config", config])
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let stderr = refusal(
        FIXTURES[0],
        r#"{"method": "eagle", "num_speculative_tokens": 1}"#,
    );
    assert!(
        stderr.contains("method `eagle` is not implemented"),
        "{stderr}"
    );
    let stderr = refusal(FIXTURES[0], MTP_CONFIG);
    assert!(stderr.contains("model.layers.3.eh_proj.weight"), "{stderr}");
    let stderr = refusal(FIXTURES[1], MTP_CONFIG);
    assert!(stderr.contains("DeepSeek-V3's"), "{stderr}");
}
