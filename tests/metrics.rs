//! `/metrics` on the router (HTTP API port and `--metrics-listen`) and on a node count exactly
//! the traffic sent.

use moe_tests::harness::{self, generate, http, metric_value, wait_serving};
use moe_tests::{fixture_dir, golden_cases, FIXTURES};
use moe_tooling::{free_port, greedy, LocalCluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_and_node_metrics_count_the_requests() {
    let fixture = FIXTURES[1];
    let router_metrics = format!("127.0.0.1:{}", free_port().unwrap());
    let node_metrics = format!("127.0.0.1:{}", free_port().unwrap());
    let mut spec = harness::spec(fixture_dir(fixture), 1);
    spec.router_args.extend(
        [
            "--http-listen",
            "127.0.0.1:0",
            "--metrics-listen",
            &router_metrics,
        ]
        .map(String::from),
    );
    spec.node_args
        .extend(["--metrics-listen", &node_metrics].map(String::from));
    let cluster = LocalCluster::start(spec).unwrap();
    wait_serving(&cluster, 1).await;
    let http_addr = cluster.router_http_addr.clone().unwrap();

    let cases = golden_cases(fixture);
    let mut client = harness::inference(&cluster).await;
    let mut prompt_tokens = 0;
    for case in &cases[..3] {
        prompt_tokens += case.input_ids.len();
        let out = generate(&mut client, greedy(&case.input_ids, 5))
            .await
            .unwrap();
        assert_eq!(out.ids.len(), 5);
    }

    // The running gauge is a sample the scheduler takes each round: it may still count the
    // last request for the moment between its final message and the next round.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let text = loop {
        let (status, text) = http(&http_addr, "GET", "/metrics", None, b"").await;
        assert_eq!(status, 200);
        if metric_value(&text, "moe_requests_running") == 0.0
            || std::time::Instant::now() > deadline
        {
            break text;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    let (status, separate) = http(&router_metrics, "GET", "/metrics", None, b"").await;
    assert_eq!(status, 200);
    assert!(separate.contains("# TYPE moe_requests_total counter"));
    assert_eq!(
        metric_value(&text, "moe_requests_total{finish_reason=\"length\"}"),
        3.0
    );
    assert_eq!(
        metric_value(&text, "moe_requests_total{finish_reason=\"error\"}"),
        0.0
    );
    assert_eq!(metric_value(&text, "moe_generation_tokens_total"), 15.0);
    assert_eq!(
        metric_value(&text, "moe_prompt_tokens_total"),
        prompt_tokens as f64
    );
    assert_eq!(
        metric_value(&text, "moe_time_to_first_token_seconds_count"),
        3.0
    );
    assert_eq!(
        metric_value(&text, "moe_inter_token_latency_seconds_count"),
        12.0
    );
    assert_eq!(
        metric_value(&text, "moe_e2e_request_latency_seconds_count"),
        3.0
    );
    assert_eq!(metric_value(&text, "moe_requests_running"), 0.0);
    // With the requests done, only the prefix cache holds blocks.
    assert_eq!(
        metric_value(&text, "moe_kv_cache_blocks_used"),
        metric_value(&text, "moe_prefix_cache_blocks")
    );
    assert_eq!(
        metric_value(&text, "moe_prefix_cache_queried_tokens_total"),
        prompt_tokens as f64
    );
    assert!(metric_value(&text, "moe_placement_epoch") >= 1.0);
    assert_eq!(metric_value(&text, "moe_live_nodes"), 1.0);
    assert_eq!(metric_value(&text, "moe_is_planner"), 1.0);
    let node = &cluster.node_ids()[0];
    let pairs = metric_value(&text, &format!("moe_node_pairs_total{{node=\"{node}\"}}"));
    assert!(pairs > 0.0);
    assert!(
        metric_value(
            &text,
            &format!("moe_dispatch_round_trip_seconds_count{{node=\"{node}\"}}")
        ) > 0.0
    );
    let expert_tokens: f64 = text
        .lines()
        .filter(|l| l.starts_with("moe_expert_tokens_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(
        expert_tokens, pairs,
        "every dispatched pair is counted once per expert"
    );

    let (status, node_text) = http(&node_metrics, "GET", "/metrics", None, b"").await;
    assert_eq!(status, 200);
    assert_eq!(
        metric_value(&node_text, "moe_node_expert_pairs_total"),
        pairs,
        "the node saw what the router sent"
    );
    assert!(metric_value(&node_text, "moe_node_expert_batches_total") > 0.0);
    assert_eq!(
        metric_value(&node_text, "moe_node_refused_batches_total"),
        0.0
    );
    assert!(metric_value(&node_text, "moe_node_ready_epoch") >= 1.0);

    // Every metric the Grafana dashboard queries is one the router or a node exports.
    let dashboard = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../ops/grafana/dashboard.json"
    ))
    .unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&dashboard).expect("valid JSON");
    let exported = format!("{text}{node_text}");
    let mut queried = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if !word.starts_with("moe_") {
                    continue;
                }
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| word.strip_suffix(s))
                    .unwrap_or(word);
                assert!(
                    exported.contains(&format!("# TYPE {family} ")),
                    "the dashboard queries {word}, which nothing exports"
                );
                queried += 1;
            }
        }
    }
    assert!(queried >= 20, "{queried}");
}
