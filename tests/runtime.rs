//! The router's async runtime never tokenizes (issue 21): a prompt over `--max-prompt-bytes` is
//! refused before any tokenizer call on every entry point (gRPC Generate and Tokenize, HTTP
//! completions and chat), counted by `moe_router_tokenize_seconds_count`; and a burst of 4 MiB
//! prompts, tokenized on the blocking pool, leaves a concurrent greedy stream completing with
//! the same tokens. The stall is printed, not asserted (docs/performance.md has the figure,
//! measured by `bench/tokenize_stall.sh`).

use std::time::{Duration, Instant};

use moe_proto::v1::inference_client::InferenceClient;
use moe_proto::v1::{GenerateRequest, TokenizeRequest};
use moe_tests::harness::{self, http, metric_value, wait_serving};
use moe_tests::{fixture_dir, golden_cases, FIXTURES};
use moe_tooling::{free_port, greedy, LocalCluster};
use serde_json::{json, Value};
use tokio::sync::oneshot;
use tonic::transport::Channel;
use tonic::Code;

/// (tokenizer calls, prompts refused by the byte limit) from the router's `--metrics-listen`.
async fn counts(metrics: &str) -> (f64, f64) {
    let (status, text) = http(metrics, "GET", "/metrics", None, b"").await;
    assert_eq!(status, 200, "{text}");
    (
        metric_value(&text, "moe_router_tokenize_seconds_count"),
        metric_value(&text, "moe_router_prompt_bytes_refused_total"),
    )
}

/// A cluster of one node with `--max-prompt-bytes` (when given), the HTTP API and a metrics
/// port: (cluster, HTTP address, metrics address).
async fn cluster(max_prompt_bytes: Option<usize>) -> (LocalCluster, String, String) {
    let metrics = format!("127.0.0.1:{}", free_port().unwrap());
    let mut spec = harness::spec(fixture_dir(FIXTURES[0]), 1);
    spec.router_args.extend([
        "--http-listen".into(),
        "127.0.0.1:0".into(),
        "--metrics-listen".into(),
        metrics.clone(),
    ]);
    if let Some(bytes) = max_prompt_bytes {
        spec.router_args
            .extend(["--max-prompt-bytes".into(), bytes.to_string()]);
    }
    let cluster = LocalCluster::start(spec).unwrap();
    wait_serving(&cluster, 1).await;
    let http_addr = cluster.router_http_addr.clone().unwrap();
    (cluster, http_addr, metrics)
}

fn prompt_request(text: String) -> GenerateRequest {
    GenerateRequest {
        prompt: Some(text),
        max_new_tokens: 2,
        temperature: Some(0.0),
        ..Default::default()
    }
}

fn error_param(body: &str) -> Value {
    serde_json::from_str::<Value>(body).unwrap_or_else(|_| panic!("not JSON: {body}"))["error"]
        ["param"]
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_long_prompts_are_refused_before_the_tokenizer() {
    const LIMIT: usize = 1000;
    let (cluster, http_addr, metrics) = cluster(Some(LIMIT)).await;
    let mut client = harness::inference(&cluster).await;
    let long = "ab ".repeat(LIMIT / 3 + 1);
    assert!(long.len() > LIMIT);
    let (calls, refused) = counts(&metrics).await;

    // Every entry point refuses it by name, and the tokenizer is not called.
    let e = client
        .generate(prompt_request(long.clone()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains(&format!(
            "prompt is {} bytes; the limit is {LIMIT} bytes (--max-prompt-bytes)",
            long.len()
        )),
        "{e:?}"
    );
    let e = client
        .tokenize(TokenizeRequest { text: long.clone() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("text is"), "{e:?}");
    let body = json!({"prompt": long, "max_tokens": 2}).to_string();
    let (status, b) = http(&http_addr, "POST", "/v1/completions", None, body.as_bytes()).await;
    assert_eq!((status, error_param(&b)), (400, json!("prompt")), "{b}");
    assert!(b.contains("--max-prompt-bytes"), "{b}");
    // Chat: the messages together (each under the limit), before the template.
    let half = "cd ".repeat(LIMIT / 6 + 1);
    let body = json!({"messages": [
        {"role": "user", "content": half},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": half},
    ], "max_tokens": 2})
    .to_string();
    let (status, b) = http(
        &http_addr,
        "POST",
        "/v1/chat/completions",
        None,
        body.as_bytes(),
    )
    .await;
    assert_eq!((status, error_param(&b)), (400, json!("messages")), "{b}");
    assert!(b.contains("messages is"), "{b}");
    assert_eq!(counts(&metrics).await, (calls, refused + 4.0));

    // Under the limit, each is one tokenizer call (the chat one renders the template first).
    let short = "Hello, world".to_string();
    let out = harness::generate(&mut client, prompt_request(short.clone()))
        .await
        .unwrap();
    assert_eq!(out.ids.len(), 2);
    assert_eq!(counts(&metrics).await, (calls + 1.0, refused + 4.0));
    let ids = client
        .tokenize(TokenizeRequest {
            text: short.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .input_ids;
    assert!(!ids.is_empty());
    assert_eq!(counts(&metrics).await, (calls + 2.0, refused + 4.0));
    let body = json!({"prompt": short, "max_tokens": 2, "temperature": 0}).to_string();
    let (status, b) = http(&http_addr, "POST", "/v1/completions", None, body.as_bytes()).await;
    assert_eq!(status, 200, "{b}");
    assert_eq!(counts(&metrics).await, (calls + 3.0, refused + 4.0));
    let body =
        json!({"messages": [{"role": "user", "content": short}], "max_tokens": 2}).to_string();
    let (status, b) = http(
        &http_addr,
        "POST",
        "/v1/chat/completions",
        None,
        body.as_bytes(),
    )
    .await;
    assert_eq!(status, 200, "{b}");
    assert_eq!(counts(&metrics).await, (calls + 4.0, refused + 4.0));
}

/// `bytes` of ordinary-looking text: words from a small PRNG, so that no tokenizer cache
/// makes it cheap.
fn text(bytes: usize, seed: u64) -> String {
    const WORDS: [&str; 16] = [
        "the", "cluster", "routes", "tokens", "to", "experts", "while", "a", "stream", "decodes",
        "quickly,", "and", "every", "node", "answers.", "Mixture",
    ];
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut out = String::with_capacity(bytes + 16);
    while out.len() < bytes {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        out.push_str(WORDS[(state >> 60) as usize]);
        if (state >> 40) & 7 == 0 {
            out.push_str(&format!(" {}", (state >> 20) & 0xffff));
        }
        out.push(' ');
    }
    out.truncate(bytes);
    out
}

/// A greedy stream's tokens and the gaps between its messages as the client saw them; after
/// its `at`-th message it fires `go` (where the burst starts).
async fn timed_stream(
    client: &mut InferenceClient<Channel>,
    ids: &[u32],
    tokens: u32,
    mut go: Option<(usize, oneshot::Sender<()>)>,
) -> (Vec<u32>, Vec<Duration>) {
    let mut stream = client
        .generate(greedy(ids, tokens))
        .await
        .unwrap()
        .into_inner();
    let (mut out, mut gaps) = (vec![], vec![]);
    let mut last = None;
    while let Some(m) = stream.message().await.unwrap() {
        let now = Instant::now();
        if let Some(last) = last {
            gaps.push(now - last);
        }
        last = Some(now);
        out.extend(m.token_ids);
        if go.as_ref().is_some_and(|(at, _)| out.len() >= *at) {
            let _ = go.take().unwrap().1.send(());
        }
    }
    (out, gaps)
}

/// Sends `prompts` at once when `go` fires, alternately over gRPC Generate and HTTP
/// completions; each must reach the tokenizer and be refused by the token limit. Returns when
/// every one is answered, with the time each took from `go`.
fn burst(
    cluster: &LocalCluster,
    prompts: Vec<String>,
    go: oneshot::Receiver<()>,
) -> tokio::task::JoinHandle<Vec<Duration>> {
    let (grpc, http_addr) = (
        format!("http://{}", cluster.router_addr),
        cluster.router_http_addr.clone().unwrap(),
    );
    tokio::spawn(async move {
        let mut clients = vec![];
        for _ in 0..prompts.len() {
            clients.push(InferenceClient::connect(grpc.clone()).await.unwrap());
        }
        go.await.unwrap();
        let started = Instant::now();
        let sent: Vec<_> = prompts
            .into_iter()
            .zip(clients)
            .enumerate()
            .map(|(i, (prompt, mut c))| {
                let http_addr = http_addr.clone();
                tokio::spawn(async move {
                    if i % 2 == 0 {
                        let e = c.generate(prompt_request(prompt)).await.unwrap_err();
                        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
                        assert!(e.message().contains("tokens; the limit is"), "{e:?}");
                    } else {
                        let body = json!({"prompt": prompt, "max_tokens": 2}).to_string();
                        let (status, b) =
                            http(&http_addr, "POST", "/v1/completions", None, body.as_bytes())
                                .await;
                        assert_eq!(status, 400, "{b}");
                        assert!(b.contains("tokens; the limit is"), "{b}");
                    }
                    started.elapsed()
                })
            })
            .collect();
        let mut times = vec![];
        for s in sent {
            times.push(s.await.unwrap());
        }
        times
    })
}

/// Under the gRPC (4 MiB message) and HTTP (4 MiB body) limits.
const PROMPT_BYTES: usize = (4 << 20) - 1024;

fn longest(gaps: &[Duration]) -> Duration {
    gaps.iter().copied().max().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_4_mib_prompts_leaves_a_stream_running() {
    const BURST: usize = 4;
    const TOKENS: u32 = 64;
    let (cluster, _, metrics) = cluster(Some(4 << 20)).await;
    let mut client = harness::inference(&cluster).await;
    let ids = golden_cases(FIXTURES[0])[0].input_ids.clone();
    let (reference, quiet_gaps) = timed_stream(&mut client, &ids, TOKENS, None).await;
    assert_eq!(reference.len(), TOKENS as usize);
    let (calls, refused) = counts(&metrics).await;

    // The stream runs; after its 4th token, the burst.
    let prompts = (0..BURST).map(|i| text(PROMPT_BYTES, i as u64)).collect();
    let (go, start) = oneshot::channel();
    let burst = burst(&cluster, prompts, start);
    let (during, burst_gaps) = timed_stream(&mut client, &ids, TOKENS, Some((4, go))).await;
    let burst_times = burst.await.unwrap();
    assert_eq!(during, reference, "the burst changed the stream's tokens");
    assert_eq!(
        counts(&metrics).await,
        (calls + BURST as f64, refused),
        "each prompt of the burst is one tokenizer call"
    );
    println!(
        "stream of {TOKENS} tokens: longest gap {:?} alone, {:?} during a burst of {BURST} 4 MiB \
         prompts (stream {:?}; the burst's answers came after {burst_times:?})",
        longest(&quiet_gaps),
        longest(&burst_gaps),
        burst_gaps.iter().sum::<Duration>(),
    );
}

/// `p`-th percentile (0..=100) of `v`, nearest rank.
fn percentile(v: &[Duration], p: usize) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    v.get((v.len() * p / 100).min(v.len().saturating_sub(1)))
        .copied()
        .unwrap_or_default()
}

/// The figure of docs/performance.md: inter-token gaps of a greedy stream alone and beside a
/// burst of 4 MiB prompts, over several rounds. Run by `bench/tokenize_stall.sh` (release
/// binaries through `MOE_BIN_DIR`; a router without `--max-prompt-bytes`, from before it
/// existed, is measured as it is).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: bench/tokenize_stall.sh"]
async fn tokenize_stall_benchmark() {
    let env = |name: &str, default: usize| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let (rounds, burst_size, tokens) =
        (env("ROUNDS", 5), env("BURST", 4), env("TOKENS", 64) as u32);
    let help = std::process::Command::new(harness::binary("moe-router"))
        .arg("--help")
        .output()
        .unwrap();
    let has_limit = String::from_utf8_lossy(&help.stdout).contains("--max-prompt-bytes");
    let (cluster, _, _) = cluster(has_limit.then_some(4 << 20)).await;
    let mut client = harness::inference(&cluster).await;
    let ids = golden_cases(FIXTURES[0])[0].input_ids.clone();
    let (reference, _) = timed_stream(&mut client, &ids, tokens, None).await;
    let (mut quiet, mut busy) = (vec![], vec![]);
    let (mut quiet_max, mut busy_max, mut burst_max) = (vec![], vec![], vec![]);
    for round in 0..rounds {
        let (out, gaps) = timed_stream(&mut client, &ids, tokens, None).await;
        assert_eq!(out, reference);
        quiet_max.push(longest(&gaps));
        quiet.extend(gaps);
        let prompts = (0..burst_size)
            .map(|i| text(PROMPT_BYTES, (round * burst_size + i) as u64))
            .collect();
        let (go, start) = oneshot::channel();
        let answered = burst(&cluster, prompts, start);
        let (out, gaps) = timed_stream(&mut client, &ids, tokens, Some((4, go))).await;
        assert_eq!(out, reference);
        busy_max.push(longest(&gaps));
        busy.extend(gaps);
        burst_max.push(longest(&answered.await.unwrap()));
    }
    let ms = |d: Duration| format!("{:.1}", d.as_secs_f64() * 1e3);
    let all = |v: &[Duration]| v.iter().map(|&d| ms(d)).collect::<Vec<_>>().join(",");
    println!(
        "router {}: {rounds} rounds, stream of {tokens} tokens, burst of {burst_size} prompts \
         of {PROMPT_BYTES} bytes after its 4th token",
        if has_limit {
            "with the blocking pool"
        } else {
            "tokenizing on the runtime"
        },
    );
    println!(
        "alone:      gap p50 {} ms, p99 {} ms, max {} ms; per-round max [{}] ms",
        ms(percentile(&quiet, 50)),
        ms(percentile(&quiet, 99)),
        ms(longest(&quiet)),
        all(&quiet_max)
    );
    println!(
        "with burst: gap p50 {} ms, p99 {} ms, max {} ms; per-round max [{}] ms; burst answered \
         after [{}] ms",
        ms(percentile(&busy, 50)),
        ms(percentile(&busy, 99)),
        ms(longest(&busy)),
        all(&busy_max),
        all(&burst_max)
    );
}
