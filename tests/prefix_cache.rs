//! Prefix caching: requests that share a prompt prefix reuse its KV rows, and their tokens and
//! logprobs are bitwise those computed without the cache (the offline engine's), alone and in
//! a batch; `--prefix-caching=false` turns it off.

use moe_model::{Engine, GenerateOutput};
use moe_tests::harness::{self, generate, wait_serving};
use moe_tests::{fixture_dir, FIXTURES};
use moe_tooling::{greedy, LocalCluster};

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no sample {name} in:\n{text}"))
}

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

fn offline(engine: &Engine, prompt: &[u32], n: usize) -> GenerateOutput {
    engine
        .generate(&moe_model::GenerateRequest {
            input_ids: prompt.to_vec(),
            max_new_tokens: n,
            sampling: Default::default(),
            ignore_eos: true,
            emit_logits: false,
        })
        .unwrap()
}

/// Runs the prompts on a router with `--kv-block-tokens 4` and `caching` (first one alone,
/// then the rest at once); checks every answer bit for bit and returns the hit tokens counted.
async fn run(caching: bool) -> (f64, f64) {
    let dir = fixture_dir(FIXTURES[0]);
    let engine = Engine::load(&dir).unwrap();
    let n = 8;
    let prompts = prompts();
    let expected: Vec<GenerateOutput> = prompts.iter().map(|p| offline(&engine, p, n)).collect();

    let mut spec = harness::spec(dir, 1);
    spec.router_args.extend(
        [
            "--kv-block-tokens",
            "4",
            "--http-listen",
            "127.0.0.1:0",
            &format!("--prefix-caching={caching}"),
        ]
        .map(String::from),
    );
    let cluster = LocalCluster::start(spec).unwrap();
    wait_serving(&cluster, 1).await;
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
            metric(&text, "moe_prefix_cache_queried_tokens_total"),
            queried as f64
        );
    }
    (
        metric(&text, "moe_prefix_cache_hit_tokens_total"),
        metric(&text, "moe_prefix_cache_blocks"),
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
/// and the others copy them (here 2 x 20 hit tokens), with the same tokens as alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n_choices_prefill_their_prompt_once() {
    let dir = fixture_dir(FIXTURES[0]);
    let engine = Engine::load(&dir).unwrap();
    let prompt = &prompts()[0];
    let want = offline(&engine, prompt, 6);
    let text = engine.tokenizer().decode(&want.output_ids).unwrap();
    let mut spec = harness::spec(dir, 1);
    spec.router_args
        .extend(["--kv-block-tokens", "4", "--http-listen", "127.0.0.1:0"].map(String::from));
    let cluster = LocalCluster::start(spec).unwrap();
    wait_serving(&cluster, 1).await;
    let http = cluster.router_http_addr.clone().unwrap();
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
    assert_eq!(metric(&metrics, "moe_prefix_cache_hit_tokens_total"), 40.0);
}
