//! A real Prometheus server (Debian's `prometheus`, installed by `.ci/run`) scrapes a test
//! cluster's router and node on loopback; after traffic, its query API shows the requests sent.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use moe_tests::harness::{self, generate, http, wait_serving};
use moe_tests::{fixture_dir, golden_cases, FIXTURES};
use moe_tooling::{free_port, greedy, LocalCluster};
use serde_json::Value;

fn prometheus_binary() -> PathBuf {
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|p| p.join("prometheus"))
                .find(|p| p.exists())
        })
        .expect("prometheus is not on PATH (apt-get install prometheus; .ci/run does it)")
}

struct Prometheus {
    child: Child,
    dir: PathBuf,
    addr: String,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start_prometheus(router: &str, node: &str) -> Prometheus {
    let dir = std::env::temp_dir().join(format!("moe-prometheus-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  \
             - job_name: moe-router\n    static_configs:\n      - targets: ['{router}']\n  \
             - job_name: moe-expert-node\n    static_configs:\n      - targets: ['{node}']\n"
        ),
    )
    .unwrap();
    let addr = format!("127.0.0.1:{}", free_port().unwrap());
    let child = Command::new(prometheus_binary())
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address={addr}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("prometheus starts");
    Prometheus { child, dir, addr }
}

fn encode(query: &str) -> String {
    query
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'.' | b'-' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The value of an instant query that returns one sample; `None` while it returns none.
async fn query(prometheus: &str, promql: &str) -> Option<f64> {
    let (status, body) = http(
        prometheus,
        "GET",
        &format!("/api/v1/query?query={}", encode(promql)),
        None,
        b"",
    )
    .await;
    if status != 200 {
        return None;
    }
    let json = &body[body.find('{')?..=body.rfind('}')?];
    let answer: Value = serde_json::from_str(json).ok()?;
    answer["data"]["result"][0]["value"][1]
        .as_str()
        .and_then(|v| v.parse().ok())
}

/// Polls until every query returns its expected value (counters reach them after a scrape).
async fn wait_for(prometheus: &str, expected: &[(String, f64)]) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut got = Vec::new();
        for (promql, _) in expected {
            got.push(query(prometheus, promql).await);
        }
        if expected
            .iter()
            .zip(&got)
            .all(|((_, want), got)| *got == Some(*want))
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus did not report the traffic: expected {expected:?}, got {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_sees_the_requests_sent() {
    let fixture = FIXTURES[0];
    let router_metrics = format!("127.0.0.1:{}", free_port().unwrap());
    let node_metrics = format!("127.0.0.1:{}", free_port().unwrap());
    let mut spec = harness::spec(fixture_dir(fixture), 1);
    spec.router_args
        .extend(["--metrics-listen", &router_metrics].map(String::from));
    spec.node_args
        .extend(["--metrics-listen", &node_metrics].map(String::from));
    let cluster = LocalCluster::start(spec).unwrap();
    let prometheus = start_prometheus(&router_metrics, &node_metrics);
    wait_serving(&cluster, 1).await;

    let cases = golden_cases(fixture);
    let mut client = harness::inference(&cluster).await;
    let (requests, new_tokens) = (4usize, 5u32);
    let mut prompt_tokens = 0;
    for case in cases.iter().cycle().take(requests) {
        prompt_tokens += case.input_ids.len();
        let out = generate(&mut client, greedy(&case.input_ids, new_tokens))
            .await
            .unwrap();
        assert_eq!(out.ids.len(), new_tokens as usize);
    }

    let expected = [
        ("up{job=\"moe-router\"}".to_string(), 1.0),
        ("up{job=\"moe-expert-node\"}".to_string(), 1.0),
        (
            "sum(moe_requests_total{finish_reason=\"length\"})".to_string(),
            requests as f64,
        ),
        ("sum(moe_requests_total)".to_string(), requests as f64),
        ("moe_prompt_tokens_total".to_string(), prompt_tokens as f64),
        (
            "moe_generation_tokens_total".to_string(),
            (requests * new_tokens as usize) as f64,
        ),
        (
            "moe_time_to_first_token_seconds_count".to_string(),
            requests as f64,
        ),
        ("moe_live_nodes".to_string(), 1.0),
        // What the router sent the node is what the node ran.
        (
            "sum(moe_node_pairs_total) - sum(moe_node_expert_pairs_total)".to_string(),
            0.0,
        ),
    ];
    wait_for(&prometheus.addr, &expected).await;
    let pairs = query(&prometheus.addr, "sum(moe_node_expert_pairs_total)")
        .await
        .unwrap_or(0.0);
    assert!(pairs > 0.0, "the node ran experts");
    drop(cluster);
}
