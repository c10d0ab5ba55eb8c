//! Prefix caching: requests that share a prompt prefix reuse its KV rows, and their tokens and
//! logprobs are bitwise those computed without the cache (the offline engine's), alone and in
//! a batch; `--prefix-caching=false` turns it off.

use moe_model::{Engine, GenerateOutput};
use moe_tests::harness::{self, generate, metric_value, offline_greedy, wait_serving};
use moe_tests::{fixture_dir, FIXTURES};
use moe_tooling::{greedy, LocalCluster};

/// Prompts that share their first 22 tokens (five full 4-token blocks, then part of a sixth).
fn prompts() -> Vec<Vec<u32>> {
    let shared: Vec<u32> = (0..22).map(|i| (i * 37 + 11) % 500 + 3).collect();
    (0..6u32)
        .map(|k| {
            let mut p = shared.clone();
            p.extend((0..=k).map(|i| (i * 53 + k * 7 + 5) % 500 + 3));
            p
        })
        .collect()
}

/// A router (one node) on the first fixture with 4-token KV blocks and an HTTP port, serving:
/// the cluster and its HTTP address.
async fn serving_in_small_blocks(extra: &[&str]) -> (LocalCluster, String) {
    let mut spec = harness::spec(fixture_dir(FIXTURES[0]), 1);
    spec.router_args
        .extend(["--kv-block-tokens", "4", "--http-listen", "127.0.0.1:0"].map(String::from));
    spec.router_args.extend(extra.iter().map(|a| a.to_string()));
    let cluster = LocalCluster::start(spec).unwrap();
    wait_serving(&cluster, 1).await;
    let http = cluster.router_http_addr.clone().unwrap();
    (cluster, http)
}

/// Runs the prompts on a router with `--kv-block-tokens 4` and `caching` (first one alone,
/// then the rest at once); checks every answer bit for bit and returns the hit tokens counted.
async fn run(caching: bool) -> (f64, f64) {
    let dir = fixture_dir(FIXTURES[0]);
    let engine = Engine::load(&dir).unwrap();
    let n = 8;
    let prompts = prompts();
    let expected: Vec<GenerateOutput> = prompts
        .iter()
        .map(|p| offline_greedy(&engine, p, n))
        .collect();

    let (cluster, _) = serving_in_small_blocks(&[&format!("--prefix-caching={caching}")]).await;
    let mut client = harness::inference(&cluster).await;

    // The first fills the cache; the same prompt again then hits all but its last block.
    for prompt in [&prompts[0], &prompts[0]] {
        let got = generate(&mut client, greedy(prompt, n as u32))
            .await
            .unwrap();
        assert_eq!(got.ids, expected[0].output_ids, "caching {caching}");
        assert_eq!(got.logprobs, expected[0].logprobs, "caching {caching}");
    }
    // The others together: hits in one batch, beside each other's prefills.
    let mut tasks = Vec::new();
    for (prompt, want) in prompts.iter().zip(&expected).skip(1) {
        let mut client = client.clone();
        let (prompt, want) = (prompt.clone(), want.clone());
        tasks.push(tokio::spawn(async move {
            let got = generate(&mut client, greedy(&prompt, n as u32))
                .await
                .unwrap();
            assert_eq!(got.ids, want.output_ids, "caching {caching}");
            assert_eq!(got.logprobs, want.logprobs, "caching {caching}: logprobs");
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let http = cluster.router_http_addr.clone().unwrap();
    let (status, text) = harness::http(&http, "GET", "/metrics", None, b"").await;
    assert_eq!(status, 200);
    let queried: usize = prompts.iter().map(Vec::len).sum::<usize>() + prompts[0].len();
    if caching {
        assert_eq!(
            metric_value(&text, "moe_prefix_cache_queried_tokens_total"),
            queried as f64
        );
    }
    (
        metric_value(&text, "moe_prefix_cache_hit_tokens_total"),
        metric_value(&text, "moe_prefix_cache_blocks"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_hits_give_the_uncached_tokens_bitwise_alone_and_in_a_batch() {
    let (hits, blocks) = run(true).await;
    // The repeat hits 20 of its 23 tokens (five blocks); each of the five others at least the
    // shared 20 once the first has finished.
    assert!(hits >= 20.0 * 6.0, "hit tokens {hits}");
    assert!(blocks >= 5.0, "cached blocks {blocks}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefix_caching_false_turns_it_off() {
    let (hits, blocks) = run(false).await;
    assert_eq!((hits, blocks), (0.0, 0.0));
}

/// A request's `n` choices prefill its prompt once: the first choice's blocks go to the cache
/// and the others share them (here 2 x 20 hit tokens), with the same tokens as alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n_choices_prefill_their_prompt_once() {
    let dir = fixture_dir(FIXTURES[0]);
    let engine = Engine::load(&dir).unwrap();
    let prompt = &prompts()[0];
    let want = offline_greedy(&engine, prompt, 6);
    let text = engine.tokenizer().decode(&want.output_ids).unwrap();
    let (_cluster, http) = serving_in_small_blocks(&[]).await;
    let body = serde_json::json!({
        "prompt": prompt, "max_tokens": 6, "n": 3, "temperature": 0, "ignore_eos": true,
    });
    let (status, answer) = harness::http(
        &http,
        "POST",
        "/v1/completions",
        None,
        body.to_string().as_bytes(),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let answer: serde_json::Value = serde_json::from_str(&answer).unwrap();
    let texts: Vec<&str> = answer["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, [text.as_str(); 3]);
    let (_, metrics) = harness::http(&http, "GET", "/metrics", None, b"").await;
    // 23 prompt tokens: five full 4-token blocks usable; choice 0 computes them.
    assert_eq!(
        metric_value(&metrics, "moe_prefix_cache_hit_tokens_total"),
        40.0
    );
}

/// Shared blocks are counted once: with a KV budget that holds a long request (whose prompt
/// blocks go to the cache) plus only the blocks a second request adds past the shared prefix,
/// the second runs beside the first and finishes long before it. Were the prefix copied (or
/// counted twice), the second would wait for the first's blocks and finish after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_blocks_count_once_in_the_kv_budget() {
    let dir = fixture_dir(FIXTURES[0]);
    let engine = Engine::load(&dir).unwrap();
    let per_token = engine.config().kv_cache_bytes_per_token();
    let block = 4;
    let prefix: Vec<u32> = (0..36).map(|i| (i * 41 + 7) % 500 + 3).collect();
    let long = (prefix.clone(), 600usize);
    let mut short_prompt = prefix.clone();
    short_prompt.extend([17, 29, 31, 43]);
    let short = (short_prompt, 4usize);
    let blocks_for = |tokens: usize| tokens.div_ceil(block);
    // All of the long one, and the short one's blocks past the 9 it shares.
    let budget_blocks = blocks_for(long.0.len() + long.1) + blocks_for(short.0.len() + short.1) - 9;
    let want = offline_greedy(&engine, &short.0, short.1);

    let mut spec = harness::spec(dir, 1);
    spec.router_args.extend([
        "--kv-block-tokens".to_string(),
        block.to_string(),
        "--kv-cache-bytes".to_string(),
        (budget_blocks * block * per_token).to_string(),
        "--http-listen".to_string(),
        "127.0.0.1:0".to_string(),
    ]);
    let cluster = LocalCluster::start(spec).unwrap();
    wait_serving(&cluster, 1).await;
    let http = cluster.router_http_addr.clone().unwrap();
    let client = harness::inference(&cluster).await;

    let long_task = {
        let mut client = client.clone();
        let (prompt, n) = long.clone();
        tokio::spawn(async move {
            let got = generate(&mut client, greedy(&prompt, n as u32))
                .await
                .unwrap();
            assert_eq!(got.ids.len(), n);
            std::time::Instant::now()
        })
    };
    // The long one's prompt blocks are in the cache once its prefill is done.
    loop {
        let (_, text) = harness::http(&http, "GET", "/metrics", None, b"").await;
        if metric_value(&text, "moe_prefix_cache_blocks") >= 9.0 {
            break;
        }
        assert!(
            !long_task.is_finished(),
            "the long request ended before the check"
        );
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    let mut c = client.clone();
    let got = generate(&mut c, greedy(&short.0, short.1 as u32))
        .await
        .unwrap();
    let short_done = std::time::Instant::now();
    assert_eq!(got.ids, want.output_ids);
    assert_eq!(got.logprobs, want.logprobs);
    let long_done = long_task.await.unwrap();
    assert!(
        short_done < long_done,
        "the short request waited for the long one's blocks"
    );
}

/// The next turn of a conversation (the last prompt, its answer, a new message) reuses the
/// answer's blocks too: rows computed while decoding, one token per step, are bitwise those a
/// prefill of the same tokens computes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_next_turn_reuses_the_answer_blocks_bitwise() {
    let dir = fixture_dir(FIXTURES[0]);
    let engine = Engine::load(&dir).unwrap();
    let first = &prompts()[0];
    let answer = offline_greedy(&engine, first, 14).output_ids;
    let mut second = first.clone();
    second.extend(&answer);
    second.extend([19, 23, 5]);
    let want = offline_greedy(&engine, &second, 8);

    let (cluster, http) = serving_in_small_blocks(&[]).await;
    let mut client = harness::inference(&cluster).await;
    let got = generate(&mut client, greedy(first, 14)).await.unwrap();
    assert_eq!(got.ids, answer);
    let got = generate(&mut client, greedy(&second, 8)).await.unwrap();
    assert_eq!(got.ids, want.output_ids);
    assert_eq!(got.logprobs, want.logprobs);
    let (_, metrics) = harness::http(&http, "GET", "/metrics", None, b"").await;
    // 23 + 14 tokens went through the first request, 36 of them fed (its last token was
    // sampled, not fed): nine full blocks, all of which the second turn takes.
    assert_eq!(
        metric_value(&metrics, "moe_prefix_cache_hit_tokens_total"),
        36.0
    );
}

/// vLLM's `cache_salt`: a salted request hits only blocks cached under its own salt (never an
/// unsalted or another tenant's prompt), with the same tokens and logprobs as without the
/// cache; an empty salt over HTTP and one over 256 bytes are refused by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_salted_request_shares_blocks_only_with_its_own_salt() {
    let dir = fixture_dir(FIXTURES[0]);
    let engine = Engine::load(&dir).unwrap();
    let prompt = &prompts()[0];
    let want = offline_greedy(&engine, prompt, 6);
    let (cluster, http) = serving_in_small_blocks(&[]).await;
    let mut client = harness::inference(&cluster).await;
    let hits = || async {
        let (_, metrics) = harness::http(&http, "GET", "/metrics", None, b"").await;
        metric_value(&metrics, "moe_prefix_cache_hit_tokens_total")
    };
    let mut hit_after = Vec::new();
    let mut cached = Vec::new();
    for salt in ["", "tenant-a", "tenant-b", "tenant-a", ""] {
        let mut request = greedy(prompt, 6);
        request.cache_salt = salt.to_string();
        let got = generate(&mut client, request).await.unwrap();
        assert_eq!(got.ids, want.output_ids, "salt {salt:?}");
        assert_eq!(got.logprobs, want.logprobs, "salt {salt:?}");
        hit_after.push(hits().await);
        cached.push(got.cached_tokens);
    }
    // 23 tokens: five full blocks (20 tokens) are hits for a repeat under the same salt, and
    // each answer's usage says so.
    assert_eq!(hit_after, [0.0, 0.0, 0.0, 20.0, 40.0], "per salt only");
    assert_eq!(cached, [0, 0, 0, 20, 20]);

    let body = serde_json::json!({"prompt": prompt, "max_tokens": 2, "cache_salt": ""});
    let (status, text) = harness::http(
        &http,
        "POST",
        "/v1/completions",
        None,
        body.to_string().as_bytes(),
    )
    .await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("cache_salt"), "{text}");
    let mut long = greedy(prompt, 2);
    long.cache_salt = "s".repeat(257);
    let err = generate(&mut client, long).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    assert!(err.message().contains("cache_salt"), "{err}");
}

/// vLLM's `--enable-prompt-tokens-details`: a repeated chat's usage says how many of its prompt
/// tokens the prefix cache held (`prompt_tokens_details.cached_tokens`), and so does a
/// repeated Responses call (`input_tokens_details`, always there); without the flag chat and
/// completion usage have no details.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_reports_the_cached_prompt_tokens() {
    use serde_json::json;
    let start = |details: bool| async move {
        serving_in_small_blocks(&[&format!("--enable-prompt-tokens-details={details}")]).await
    };
    let chat = json!({"messages": [{"role": "user", "content": "Tell me about the cache, twice over."}],
                      "max_tokens": 3, "temperature": 0});
    let (cluster, http) = start(true).await;
    let first = harness::post_json(&http, "/v1/chat/completions", &chat).await;
    let again = harness::post_json(&http, "/v1/chat/completions", &chat).await;
    let cached =
        |a: &serde_json::Value| a["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64();
    assert_eq!(cached(&first), Some(0), "{first}");
    let prompt = again["usage"]["prompt_tokens"].as_u64().unwrap();
    let hit = cached(&again).unwrap();
    assert!(hit > 0 && hit % 4 == 0 && hit < prompt, "{again}");
    let responses = json!({"input": "Tell me about the cache, twice over.", "max_output_tokens": 3,
                           "temperature": 0});
    harness::post_json(&http, "/v1/responses", &responses).await;
    let repeat = harness::post_json(&http, "/v1/responses", &responses).await;
    let details = &repeat["usage"]["input_tokens_details"]["cached_tokens"];
    assert!(details.as_u64() > Some(0), "{repeat}");
    drop(cluster);

    let (_plain, http) = start(false).await;
    harness::post_json(&http, "/v1/chat/completions", &chat).await;
    let again = harness::post_json(&http, "/v1/chat/completions", &chat).await;
    assert!(
        again["usage"].get("prompt_tokens_details").is_none(),
        "{again}"
    );
    let completion = json!({"prompt": "Tell me about the cache", "max_tokens": 2});
    let answer = harness::post_json(&http, "/v1/completions", &completion).await;
    assert!(
        answer["usage"].get("prompt_tokens_details").is_none(),
        "{answer}"
    );
}
