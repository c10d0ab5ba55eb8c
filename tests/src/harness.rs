//! Starts real clusters for the process-level tests: etcd from PATH, and the `moe-router` and
//! `moe-expert-node` binaries cargo built next to the test executables.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use moe_proto::v1::admin_client::AdminClient;
use moe_proto::v1::inference_client::InferenceClient;
use moe_proto::v1::{ClusterStatusRequest, ClusterStatusResponse, GenerateRequest};
use moe_tooling::{find_in_path, ExpectedAnswer, LocalCluster, LocalClusterSpec};
use tonic::transport::Channel;

/// `target/<profile>/` of the running test.
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent()
        .and_then(|deps| deps.parent())
        .expect("target dir")
        .to_path_buf()
}

/// A workspace binary: next to the test executable, or in `MOE_BIN_DIR` (binaries built on
/// one machine and run on another, as `ops/gpu-check.sh` does).
pub fn binary(name: &str) -> PathBuf {
    let dir = std::env::var_os("MOE_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(target_dir);
    let path = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.exists(),
        "{} is missing: build the binaries first (`cargo build --workspace --bins`, as the README's test command does)",
        path.display()
    );
    path
}

pub fn etcd_binary() -> PathBuf {
    find_in_path("etcd")
        .expect("etcd is not on PATH (apt-get install etcd-server; .ci/run does it)")
}

pub fn spec(model: PathBuf, nodes: usize) -> LocalClusterSpec {
    LocalClusterSpec {
        etcd_bin: etcd_binary(),
        router_bin: binary("moe-router"),
        node_bin: binary("moe-expert-node"),
        model,
        nodes,
        cluster: "test".into(),
        router_args: vec!["--poll-ms".into(), "100".into()],
        node_args: vec![
            "--poll-ms".into(),
            "100".into(),
            "--threads".into(),
            "1".into(),
        ],
        show_logs: std::env::var_os("MOE_TEST_LOGS").is_some(),
        etcd_tls: None,
    }
}

pub async fn inference(cluster: &LocalCluster) -> InferenceClient<Channel> {
    InferenceClient::connect(format!("http://{}", cluster.router_addr))
        .await
        .expect("router reachable")
}

pub async fn status(cluster: &LocalCluster) -> ClusterStatusResponse {
    status_at(&cluster.router_addr).await
}

pub async fn status_at(router_addr: &str) -> ClusterStatusResponse {
    let mut admin = AdminClient::connect(format!("http://{router_addr}"))
        .await
        .expect("router reachable");
    admin
        .cluster_status(ClusterStatusRequest {})
        .await
        .expect("status")
        .into_inner()
}

/// The router's status once its finished requests are gone: a stream's last message leaves
/// before the scheduler drops the request and hands its KV blocks back, so a status read the
/// moment an answer ends may still count them. Waits up to 10 s for no request running and
/// every block back but the cached ones; returns the last status either way (callers assert).
pub async fn settled_status(router_addr: &str) -> ClusterStatusResponse {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = status_at(router_addr).await;
        let settled = s.requests_running == 0 && s.kv_blocks_used == s.kv_blocks_cached;
        if settled || Instant::now() >= deadline {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the router serves an epoch with `nodes` nodes; returns that status.
pub async fn wait_serving(cluster: &LocalCluster, nodes: usize) -> ClusterStatusResponse {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = status(cluster).await;
        let placed = s.nodes.iter().filter(|n| !n.experts.is_empty()).count();
        if s.serving_epoch > 0 && s.serving_epoch == s.latest_epoch && placed == nodes {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "cluster not serving on {nodes} nodes in time: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What a Generate stream returned.
#[derive(Debug, Clone, PartialEq)]
pub struct Streamed {
    pub ids: Vec<u32>,
    pub logprobs: Vec<f32>,
    pub pieces: Vec<String>,
    pub finish_reason: String,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    /// Of the prompt's tokens, those the router's prefix cache held.
    pub cached_tokens: u32,
}

pub async fn generate(
    client: &mut InferenceClient<Channel>,
    req: GenerateRequest,
) -> Result<Streamed, tonic::Status> {
    let mut stream = client.generate(req).await?.into_inner();
    let mut out = Streamed {
        ids: vec![],
        logprobs: vec![],
        pieces: vec![],
        finish_reason: String::new(),
        prompt_tokens: 0,
        completion_tokens: 0,
        cached_tokens: 0,
    };
    while let Some(msg) = stream.message().await? {
        out.ids.extend(&msg.token_ids);
        out.logprobs.extend(&msg.logprobs);
        out.pieces.push(msg.text);
        if !msg.finish_reason.is_empty() {
            out.finish_reason = msg.finish_reason;
        }
        if let Some(u) = msg.usage {
            out.prompt_tokens = u.prompt_tokens;
            out.completion_tokens = u.completion_tokens;
            out.cached_tokens = u.cached_tokens;
        }
    }
    Ok(out)
}

/// Greedy answers of the offline engine for `requests` (prompt, new tokens): the tokens and
/// their logprobs, which the load generator holds the cluster to bit for bit.
pub fn expected_answers(
    engine: &moe_model::Engine,
    requests: &[(Vec<u32>, u32)],
) -> Vec<ExpectedAnswer> {
    requests
        .iter()
        .map(|(ids, n)| {
            ExpectedAnswer::from_engine(engine, ids.clone(), *n).expect("offline generation")
        })
        .collect()
}

/// Polls the router at `addr` until `ready` holds for its status, or panics after `timeout`.
pub async fn wait_status(
    addr: &str,
    timeout: Duration,
    what: &str,
    ready: impl Fn(&ClusterStatusResponse) -> bool,
) -> ClusterStatusResponse {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(mut admin) = AdminClient::connect(format!("http://{addr}")).await {
            if let Ok(s) = admin.cluster_status(ClusterStatusRequest {}).await {
                let s = s.into_inner();
                if ready(&s) {
                    return s;
                }
                assert!(
                    Instant::now() < deadline,
                    "{what}: not reached in {timeout:?}: {s:?}"
                );
            }
        }
        assert!(
            Instant::now() < deadline,
            "{what}: router {addr} unreachable"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Node ids holding experts in the serving placement of `s` (which equals the latest).
pub fn serving_nodes(s: &ClusterStatusResponse) -> Vec<String> {
    if s.serving_epoch == 0 || s.serving_epoch != s.latest_epoch {
        return vec![];
    }
    s.nodes
        .iter()
        .filter(|n| !n.experts.is_empty())
        .map(|n| n.node_id.clone())
        .collect()
}

/// One HTTP/1.1 request over a fresh connection: (status, body).
pub async fn http(
    addr: &str,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: &[u8],
) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let auth = key
        .map(|k| format!("Authorization: Bearer {k}\r\n"))
        .unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    tokio::io::AsyncWriteExt::write_all(&mut stream, head.as_bytes())
        .await
        .unwrap();
    // A server may answer (and close) before reading a body it refuses.
    let _ = tokio::io::AsyncWriteExt::write_all(&mut stream, body).await;
    let mut out = Vec::new();
    let _ = tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut out).await;
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// The offline engine's greedy answer to `ids`: `n` tokens, past any EOS. Every path through
/// the system must give its tokens and logprobs bit for bit (on the CPU).
pub fn offline_greedy(
    engine: &moe_model::Engine,
    ids: &[u32],
    n: usize,
) -> moe_model::GenerateOutput {
    engine
        .generate(&moe_model::GenerateRequest {
            input_ids: ids.to_vec(),
            max_new_tokens: n,
            sampling: Default::default(),
            ignore_eos: true,
            emit_logits: false,
        })
        .expect("offline generation")
}

/// Runs the Python grpcio client (`tests/python/grpc_client.py`) with `args`; its last line of
/// output, as JSON.
pub fn python_grpc_client(args: &[&str]) -> serde_json::Value {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/grpc_client.py");
    let out = std::process::Command::new("python3")
        .arg(script)
        .args(args)
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "python client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).expect("utf-8 output");
    serde_json::from_str(stdout.lines().last().expect("output")).expect("JSON output")
}

/// Sixteen requests over the golden `cases`: prompts cut shorter as they repeat, each asking
/// for more tokens than the one before, so a batch of them mixes prefills and decodes of
/// every length.
pub fn mixed_requests(cases: &[crate::GoldenCase]) -> Vec<(Vec<u32>, usize)> {
    (0..16)
        .map(|i| {
            let case = &cases[i % cases.len()];
            let prompt_len = case.input_ids.len() - (i / cases.len());
            (case.input_ids[..prompt_len].to_vec(), 8 + 3 * i)
        })
        .collect()
}

/// A cluster of two expert-node processes serving `model` (prompts from `cases`) with
/// `router_args`: [`mixed_requests`] sent at once give the offline engine's tokens bit for
/// bit, and once they end every KV block is back (the prefix cache keeps its own). Its
/// status then, for more checks.
pub async fn cluster_matches_offline(
    model: PathBuf,
    cases: &[crate::GoldenCase],
    router_args: &[&str],
) -> ClusterStatusResponse {
    let engine = moe_model::Engine::load(&model).unwrap();
    let mut spec = spec(model, 2);
    spec.router_args
        .extend(router_args.iter().map(|a| a.to_string()));
    let cluster = LocalCluster::start(spec).unwrap();
    wait_serving(&cluster, 2).await;
    concurrent_greedy_matches_offline(&cluster.router_addr, &engine, mixed_requests(cases)).await;
    let status = settled_status(&cluster.router_addr).await;
    assert_eq!(status.requests_running, 0);
    assert_eq!(
        status.kv_blocks_used, status.kv_blocks_cached,
        "finished requests free their KV blocks (the prefix cache keeps its own)"
    );
    status
}

/// Sends `requests` (greedy, prompt and new tokens) to the router at `grpc_addr` all at once
/// and checks every answer against the offline engine's alone: tokens and logprobs, bit for
/// bit.
pub async fn concurrent_greedy_matches_offline(
    grpc_addr: &str,
    engine: &moe_model::Engine,
    requests: Vec<(Vec<u32>, usize)>,
) {
    let mut tasks = Vec::new();
    for (ids, n) in requests.clone() {
        let addr = format!("http://{grpc_addr}");
        tasks.push(tokio::spawn(async move {
            let mut client = InferenceClient::connect(addr).await.unwrap();
            generate(&mut client, moe_tooling::greedy(&ids, n as u32))
                .await
                .unwrap()
        }));
    }
    for (task, (ids, n)) in tasks.into_iter().zip(requests) {
        let got = task.await.unwrap();
        let alone = offline_greedy(engine, &ids, n);
        assert_eq!(got.ids, alone.output_ids, "{ids:?}");
        assert_eq!(got.logprobs, alone.logprobs, "{ids:?}: logprobs");
    }
}

/// POSTs `body` to `path` at the HTTP API `addr` (no key) and returns the 200 answer's JSON.
pub async fn post_json(addr: &str, path: &str, body: &serde_json::Value) -> serde_json::Value {
    let (status, text) = http(addr, "POST", path, None, body.to_string().as_bytes()).await;
    assert_eq!(status, 200, "{path} {body}: {text}");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}: {text}"))
}

/// The value of the sample `name` (with its labels, exactly as exposed) in a Prometheus text
/// exposition.
pub fn metric_value(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no sample {name} in:\n{text}"))
}

/// The `/metrics` page at `addr` (an HTTP API or `--metrics-listen` address, no key).
pub async fn scrape(addr: &str) -> String {
    let (status, page) = http(addr, "GET", "/metrics", None, b"").await;
    assert_eq!(status, 200, "{page}");
    page
}
