//! What any client can send to the public ports: API keys on gRPC and HTTP, and every limit
//! (prompt length, body size, top_logprobs, deadline) answered with a clear error, the server
//! serving others meanwhile. docs/security.md lists the same cases.

use std::time::Duration;

use moe_cluster::local::LocalCluster;
use moe_proto::v1::admin_client::AdminClient;
use moe_proto::v1::inference_client::InferenceClient;
use moe_proto::v1::ClusterStatusRequest;
use moe_tests::harness::{self, greedy, http};
use moe_tests::{fixture_dir, golden_cases, TempDir, FIXTURES};
use serde_json::{json, Value};
use tonic::Code;

const KEY: &str = "test-key-0123456789";

fn error_type(body: &str) -> String {
    serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v["error"]["type"].as_str().map(str::to_string))
        .unwrap_or_else(|| format!("not an OpenAI error body: {body:?}"))
}

fn authorized<T>(message: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {KEY}").parse().unwrap());
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_and_limits() {
    let fixture = FIXTURES[0];
    let keys = TempDir::new("keys");
    let key_file = keys.path().join("keys.txt");
    std::fs::write(&key_file, format!("# operators\n{KEY}\n\nsecond-key\n")).unwrap();
    let mut spec = harness::spec(fixture_dir(fixture), 1);
    spec.router_args.extend([
        "--http-listen".into(),
        "127.0.0.1:0".into(),
        "--api-key-file".into(),
        key_file.display().to_string(),
        "--max-prompt-tokens".into(),
        "30".into(),
        "--request-timeout-ms".into(),
        "300".into(),
    ]);
    let cluster = LocalCluster::start(spec).unwrap();
    let http_addr = cluster.router_http_addr.clone().unwrap();
    let grpc = format!("http://{}", cluster.router_addr);
    // Health stays open; status needs the key.
    let mut admin = AdminClient::connect(grpc.clone()).await.unwrap();
    let denied = admin
        .cluster_status(ClusterStatusRequest {})
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::Unauthenticated);
    loop {
        let s = admin
            .cluster_status(authorized(ClusterStatusRequest {}))
            .await
            .unwrap()
            .into_inner();
        if s.serving_epoch > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, _) = http(&http_addr, "GET", "/health", None, b"").await;
    assert_eq!(status, 200);

    // gRPC Inference: no key, a wrong key, the right key.
    let ids = golden_cases(fixture)[0].input_ids[..6].to_vec();
    let mut client = InferenceClient::connect(grpc.clone()).await.unwrap();
    let e = client.generate(greedy(&ids, 4)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let mut wrong = tonic::Request::new(greedy(&ids, 4));
    wrong
        .metadata_mut()
        .insert("authorization", "Bearer nope".parse().unwrap());
    assert_eq!(
        client.generate(wrong).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    let mut stream = client
        .generate(authorized(greedy(&ids, 4)))
        .await
        .unwrap()
        .into_inner();
    let mut tokens = 0;
    while let Some(m) = stream.message().await.unwrap() {
        tokens += m.token_ids.len();
    }
    assert_eq!(tokens, 4);

    // HTTP: 401 without or with a wrong key, 200 with either key.
    let body = json!({"prompt": ids, "max_tokens": 3, "temperature": 0}).to_string();
    let (s, b) = http(&http_addr, "POST", "/v1/completions", None, body.as_bytes()).await;
    assert_eq!((s, error_type(&b)), (401, "authentication_error".into()));
    let (s, _) = http(
        &http_addr,
        "POST",
        "/v1/completions",
        Some("nope"),
        body.as_bytes(),
    )
    .await;
    assert_eq!(s, 401);
    let (s, b) = http(&http_addr, "GET", "/v1/models", Some("second-key"), b"").await;
    assert_eq!(s, 200, "{b}");
    let (s, b) = http(
        &http_addr,
        "POST",
        "/v1/completions",
        Some(KEY),
        body.as_bytes(),
    )
    .await;
    assert_eq!(s, 200, "{b}");

    // Limits, each a clear error.
    let long: Vec<u32> = (0..31).collect();
    let (s, b) = http(
        &http_addr,
        "POST",
        "/v1/completions",
        Some(KEY),
        json!({"prompt": long, "max_tokens": 2})
            .to_string()
            .as_bytes(),
    )
    .await;
    assert_eq!((s, error_type(&b)), (400, "invalid_request_error".into()));
    assert!(b.contains("the limit is 30"), "{b}");
    let e = client
        .generate(authorized(greedy(&long, 2)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let (s, b) = http(
        &http_addr,
        "POST",
        "/v1/completions",
        Some(KEY),
        b"{\"prompt\": [1, 2",
    )
    .await;
    assert_eq!((s, error_type(&b)), (400, "invalid_request_error".into()));
    let (s, b) = http(&http_addr, "POST", "/v1/chat/completions", Some(KEY),
        json!({"messages": [{"role": "user", "content": "hi"}], "logprobs": true, "top_logprobs": 21}).to_string().as_bytes()).await;
    assert_eq!(s, 400, "{b}");
    assert!(b.contains("top_logprobs"), "{b}");
    let huge = vec![b' '; 5 << 20];
    let (s, _) = http(&http_addr, "POST", "/v1/completions", Some(KEY), &huge).await;
    assert_eq!(s, 413, "bodies over 4 MiB are refused");
    let (s, b) = http(&http_addr, "GET", "/v2/anything", Some(KEY), b"").await;
    assert_eq!((s, error_type(&b)), (404, "not_found_error".into()));

    // The deadline (300 ms here) ends a long request with DEADLINE_EXCEEDED after some tokens.
    let mut stream = client
        .generate(authorized(greedy(&ids, 1000)))
        .await
        .unwrap()
        .into_inner();
    let mut got = 0;
    let err = loop {
        match stream.message().await {
            Ok(Some(m)) => got += m.token_ids.len(),
            Ok(None) => panic!("finished {got} tokens within the deadline"),
            Err(e) => break e,
        }
    };
    assert_eq!(err.code(), Code::DeadlineExceeded);
    assert!(got > 0 && got < 1000, "{got}");
    // And the server still serves.
    let (s, _) = http(
        &http_addr,
        "POST",
        "/v1/completions",
        Some(KEY),
        body.as_bytes(),
    )
    .await;
    assert_eq!(s, 200);
}
