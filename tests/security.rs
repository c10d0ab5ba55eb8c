//! What any client can send to the public ports: API keys on gRPC and HTTP, and every limit
//! (prompt length, body size, top_logprobs, deadline) answered with a clear error, the server
//! serving others meanwhile. docs/security.md lists the same cases.

use std::time::Duration;

use moe_proto::v1::admin_client::AdminClient;
use moe_proto::v1::inference_client::InferenceClient;
use moe_proto::v1::ClusterStatusRequest;
use moe_tests::harness::{self, http};
use moe_tests::{fixture_dir, golden_cases, TempDir, FIXTURES};
use moe_tooling::{greedy, LocalCluster};
use serde_json::{json, Value};
use tonic::Code;

const KEY: &str = "test-key-0123456789";
const ADMIN_KEY: &str = "admin-key-9876543210";

fn error_type(body: &str) -> String {
    serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v["error"]["type"].as_str().map(str::to_string))
        .unwrap_or_else(|| format!("not an OpenAI error body: {body:?}"))
}

fn authorized<T>(message: T) -> tonic::Request<T> {
    bearer(message, KEY)
}

fn bearer<T>(message: T, key: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_and_limits() {
    let fixture = FIXTURES[0];
    let keys = TempDir::new("keys");
    let key_file = keys.path().join("keys.txt");
    std::fs::write(&key_file, format!("# operators\n{KEY}\n\nsecond-key\n")).unwrap();
    let admin_key_file = keys.path().join("admin-keys.txt");
    std::fs::write(&admin_key_file, format!("{ADMIN_KEY}\n")).unwrap();
    let metrics_addr = format!("127.0.0.1:{}", moe_tooling::free_port().unwrap());
    let mut spec = harness::spec(fixture_dir(fixture), 1);
    spec.router_args.extend([
        "--http-listen".into(),
        "127.0.0.1:0".into(),
        "--metrics-listen".into(),
        metrics_addr.clone(),
        "--api-key-file".into(),
        key_file.display().to_string(),
        "--admin-key-file".into(),
        admin_key_file.display().to_string(),
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
    // vLLM's `/ping` too, GET or POST; its tokenizer endpoints and `/version` need the key
    // (vLLM leaves its routes outside `/v1` open).
    for method in ["GET", "POST"] {
        assert_eq!(http(&http_addr, method, "/ping", None, b"").await.0, 200);
    }
    for (method, path, body) in [
        ("POST", "/tokenize", r#"{"prompt": "hi"}"#),
        ("POST", "/detokenize", r#"{"tokens": [1]}"#),
        ("GET", "/version", ""),
        ("GET", "/v1/models/x", ""),
        ("POST", "/v1/responses", r#"{"input": "hi"}"#),
        ("GET", "/v1/responses/resp_x", ""),
        ("DELETE", "/v1/responses/resp_x", ""),
        ("GET", "/v1/responses/resp_x/input_items", ""),
        ("POST", "/invocations", r#"{"prompt": "hi"}"#),
    ] {
        let (s, b) = http(&http_addr, method, path, None, body.as_bytes()).await;
        assert_eq!(
            (s, error_type(&b)),
            (401, "authentication_error".into()),
            "{path}"
        );
        let (s, _) = http(&http_addr, method, path, Some(KEY), body.as_bytes()).await;
        assert_ne!(s, 401, "{path}");
    }

    // Admin apart from inference: an inference key reads status but cannot drain; the admin
    // key does both (an unknown node is NOT_FOUND: past the check); no key, neither.
    let drain = |key: Option<&str>| {
        let message = moe_proto::v1::DrainRequest {
            node_id: "no-such-node".into(),
        };
        match key {
            Some(k) => bearer(message, k),
            None => tonic::Request::new(message),
        }
    };
    let err = admin.drain(drain(Some(KEY))).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let err = admin.drain(drain(None)).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let err = admin.drain(drain(Some(ADMIN_KEY))).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    admin
        .cluster_status(bearer(ClusterStatusRequest {}, ADMIN_KEY))
        .await
        .expect("the admin key reads status too");
    // `moe drain` sends MOE_ADMIN_KEY.
    let moe = harness::binary("moe");
    let out = std::process::Command::new(&moe)
        .args(["drain", "--router", &cluster.router_addr, "no-such-node"])
        .env("MOE_API_KEY", KEY)
        .env_remove("MOE_ADMIN_KEY")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("an admin key is required"),
        "{stderr}"
    );
    let out = std::process::Command::new(&moe)
        .args(["drain", "--router", &cluster.router_addr, "no-such-node"])
        .env("MOE_ADMIN_KEY", ADMIN_KEY)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no live node"), "{stderr}");

    // `/metrics` on the public port needs the key like every route but `/health`; the
    // private `--metrics-listen` port serves it without one.
    let (s, b) = http(&http_addr, "GET", "/metrics", None, b"").await;
    assert_eq!((s, error_type(&b)), (401, "authentication_error".into()));
    let (s, b) = http(&http_addr, "GET", "/metrics", Some(KEY), b"").await;
    assert_eq!(s, 200);
    assert!(b.contains("moe_requests_total"), "{b}");
    let (s, b) = http(&metrics_addr, "GET", "/metrics", None, b"").await;
    assert_eq!(s, 200);
    assert!(b.contains("moe_requests_total"), "{b}");

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

/// A copy of `fixture` whose chat template refuses a system message with `raise_exception`,
/// as Mistral's and Gemma's templates do.
fn fixture_with_raising_template(fixture: &str) -> TempDir {
    let dir = TempDir::new("raising-template");
    for entry in std::fs::read_dir(fixture_dir(fixture)).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
    }
    let config_path = dir.path().join("tokenizer_config.json");
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config["chat_template"] = json!(
        "{% for m in messages %}{% if m['role'] == 'system' %}\
         {{ raise_exception('System role not supported') }}{% endif %}\
         <|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}\
         {% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    );
    std::fs::write(&config_path, config.to_string()).unwrap();
    dir
}

/// The gRPC message limit, the per-connection stream limit and a raising chat template over
/// HTTP: each refused or queued as docs/security.md says, the server serving others after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_size_stream_limit_and_raising_template() {
    let fixture = FIXTURES[0];
    let checkpoint = fixture_with_raising_template(fixture);
    let mut spec = harness::spec(checkpoint.path().to_path_buf(), 1);
    spec.router_args.extend([
        "--http-listen".into(),
        "127.0.0.1:0".into(),
        "--max-streams-per-connection".into(),
        "1".into(),
        "--served-model-name".into(),
        "deepseek-v3-tiny".into(),
    ]);
    let cluster = LocalCluster::start(spec).unwrap();
    harness::wait_serving(&cluster, 1).await;
    let http_addr = cluster.router_http_addr.clone().unwrap();

    // A template that raises: 400 with its message; the same chat without the system message
    // is served.
    let chat = |messages: Value| {
        json!({"model": "deepseek-v3-tiny", "messages": messages, "max_tokens": 3}).to_string()
    };
    let refused = chat(json!([
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello"}
    ]));
    let (s, b) = http(
        &http_addr,
        "POST",
        "/v1/chat/completions",
        None,
        refused.as_bytes(),
    )
    .await;
    assert_eq!(s, 400, "{b}");
    assert_eq!(error_type(&b), "invalid_request_error");
    assert!(b.contains("System role not supported"), "{b}");
    let served = chat(json!([{"role": "user", "content": "hello"}]));
    let (s, b) = http(
        &http_addr,
        "POST",
        "/v1/chat/completions",
        None,
        served.as_bytes(),
    )
    .await;
    assert_eq!(s, 200, "{b}");

    // gRPC messages above tonic's 4 MiB default are refused before any work (tonic answers
    // OUT_OF_RANGE where gRPC's C core says RESOURCE_EXHAUSTED).
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", cluster.router_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = InferenceClient::new(channel.clone());
    let mut huge = greedy(&[], 1);
    huge.prompt = Some("x".repeat(5 << 20));
    let err = client.generate(huge).await.unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    assert!(
        err.message().contains("decoded message length too large"),
        "{err:?}"
    );

    // One stream per connection: a second Generate on the same connection waits while the
    // first is open (HTTP/2 flow control) instead of failing, and runs once it closes; a
    // second connection is not held up meanwhile.
    let ids = golden_cases(fixture)[0].input_ids[..6].to_vec();
    let mut first = client
        .generate(greedy(&ids, 1000))
        .await
        .unwrap()
        .into_inner();
    assert!(first.message().await.unwrap().is_some());
    let mut queued = InferenceClient::new(channel.clone());
    let queued_ids = ids.clone();
    let second =
        tokio::spawn(async move { harness::generate(&mut queued, greedy(&queued_ids, 2)).await });
    let mut other_connection = harness::inference(&cluster).await;
    let elsewhere = harness::generate(&mut other_connection, greedy(&ids, 2))
        .await
        .unwrap();
    assert_eq!(elsewhere.ids.len(), 2);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !second.is_finished(),
        "a second stream ran while the connection's only stream was open"
    );
    drop(first);
    let queued = tokio::time::timeout(Duration::from_secs(30), second)
        .await
        .expect("the queued stream ran once the first closed")
        .unwrap()
        .unwrap();
    assert_eq!(queued.ids, elsewhere.ids);
}

/// A router or node asked to listen beyond loopback without cluster credentials, or to reach
/// an etcd on another host without etcd credentials, refuses to start and names the flags;
/// `--insecure-cluster` opts out, the token (or mutual TLS) satisfies it.
#[test]
fn exposed_without_credentials_refuses_to_start() {
    let model = fixture_dir(FIXTURES[0]);
    let token_dir = TempDir::new("exposure-token");
    let token = token_dir.path().join("token");
    std::fs::write(&token, "0123456789abcdef0123456789abcdef\n").unwrap();
    let run = |bin: &str, args: &[&str]| {
        let mut child = std::process::Command::new(harness::binary(bin))
            .arg("--model")
            .arg(&model)
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // A process that passes the check keeps running (etcd is unreachable here): give it
        // two seconds, then stop it.
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        let exited = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break Some(status);
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let out = child.wait_with_output().unwrap();
        (exited, String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let etcd = ["--etcd", "http://127.0.0.1:1"];
    let node = |extra: &[&str]| {
        let mut args = vec!["--listen", "0.0.0.0:0", "--node-id", "exposed"];
        args.extend_from_slice(&etcd);
        args.extend_from_slice(extra);
        run("moe-expert-node", &args)
    };
    let router = |extra: &[&str]| {
        let mut args = vec!["--grpc-listen", "0.0.0.0:0"];
        args.extend_from_slice(&etcd);
        args.extend_from_slice(extra);
        run("moe-router", &args)
    };
    for (what, (exited, stderr)) in [("node", node(&[])), ("router", router(&[]))] {
        assert!(exited.is_some_and(|s| !s.success()), "{what}: {stderr}");
        for flag in [
            "0.0.0.0:0",
            "--cluster-token-file",
            "--cluster-ca",
            "--insecure-cluster",
        ] {
            assert!(
                stderr.contains(flag),
                "{what} does not name {flag}: {stderr}"
            );
        }
    }
    let token_flag = ["--cluster-token-file", token.to_str().unwrap()];
    let (exited, stderr) = node(&token_flag);
    assert!(exited.is_none(), "a node with the token starts: {stderr}");
    let (exited, stderr) = router(&["--insecure-cluster"]);
    assert!(exited.is_none(), "--insecure-cluster starts: {stderr}");
    // etcd on another host needs its own credentials, token or not.
    let (exited, stderr) = run(
        "moe-expert-node",
        &[
            "--listen",
            "127.0.0.1:0",
            "--etcd",
            "http://etcd.example:2379",
            "--cluster-token-file",
            token.to_str().unwrap(),
        ],
    );
    assert!(exited.is_some_and(|s| !s.success()), "{stderr}");
    assert!(
        stderr.contains("--etcd-user") && stderr.contains("--etcd-cert"),
        "{stderr}"
    );
}
