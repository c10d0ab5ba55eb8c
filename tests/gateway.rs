//! `moe-gateway` in front of two routers, with real etcd, routers, nodes and clients: a router
//! SIGKILLed mid-stream or restarted under load costs no stream and changes no token (its
//! streams resume on the other router), prefix-aware routing keeps a shared prefix on one
//! router, and a request a router refuses is refused through the gateway with the same status.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use moe_model::Engine;
use moe_proto::v1::gateway_client::GatewayClient;
use moe_proto::v1::inference_client::InferenceClient;
use moe_proto::v1::{DrainRouterRequest, GenerateRequest, RoutersRequest, RoutersResponse};
use moe_tests::harness::{self, expected_answers, generate, wait_serving};
use moe_tests::{fixture_dir, golden_cases, with_generation_config, FIXTURES};
use moe_tooling::{greedy, GatewayAddrs, GreedyLoad, LocalCluster};
use serde_json::{json, Value};
use tonic::transport::Channel;

const MINUTE: Duration = Duration::from_secs(60);

async fn routers(gateway: &str) -> RoutersResponse {
    let mut client = GatewayClient::connect(format!("http://{gateway}"))
        .await
        .expect("gateway reachable");
    client
        .routers(RoutersRequest {})
        .await
        .expect("Routers")
        .into_inner()
}

/// Waits until the gateway sees exactly the routers at `addrs`, all serving.
async fn wait_gateway_routers(gateway: &str, addrs: &[String]) -> RoutersResponse {
    let want: BTreeSet<&str> = addrs.iter().map(String::as_str).collect();
    let deadline = Instant::now() + MINUTE;
    loop {
        let seen = routers(gateway).await;
        let serving: BTreeSet<&str> = seen
            .routers
            .iter()
            .filter(|r| r.serving_epoch > 0)
            .map(|r| r.address.as_str())
            .collect();
        if serving == want && seen.routers.len() == want.len() {
            return seen;
        }
        assert!(
            Instant::now() < deadline,
            "the gateway never saw routers {want:?} serving: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A cluster of two nodes and two routers on fixture 0, and a gateway (gRPC and OpenAI HTTP)
/// with `gateway_args`.
async fn two_routers(gateway_args: &[&str]) -> (LocalCluster, GatewayAddrs) {
    two_routers_with(&[], gateway_args).await
}

/// [`two_routers`], each router with `router_args` too.
async fn two_routers_with(
    router_args: &[&str],
    gateway_args: &[&str],
) -> (LocalCluster, GatewayAddrs) {
    let mut spec = harness::spec(fixture_dir(FIXTURES[0]), 2);
    spec.router_args
        .extend(["--http-listen".into(), "127.0.0.1:0".into()]);
    spec.router_args
        .extend(router_args.iter().map(|a| a.to_string()));
    let mut cluster = LocalCluster::start(spec).unwrap();
    wait_serving(&cluster, 2).await;
    cluster.add_router(&[]).unwrap();
    let mut args: Vec<String> = ["--poll-ms", "100", "--http-listen", "127.0.0.1:0"]
        .map(String::from)
        .to_vec();
    args.extend(gateway_args.iter().map(|a| a.to_string()));
    let gateway = cluster
        .add_gateway(&harness::binary("moe-gateway"), &args)
        .unwrap();
    wait_gateway_routers(&gateway.grpc, &cluster.router_addrs()).await;
    (cluster, gateway)
}

async fn client(addr: &str) -> InferenceClient<Channel> {
    InferenceClient::connect(format!("http://{addr}"))
        .await
        .expect("reachable")
}

/// The router a stream started on (the gateway's `moe-router` response header).
async fn served_by(gateway: &mut InferenceClient<Channel>, request: GenerateRequest) -> String {
    let response = gateway.generate(request).await.expect("generate");
    let router = response
        .metadata()
        .get("moe-router")
        .and_then(|v| v.to_str().ok())
        .expect("moe-router header")
        .to_string();
    let mut stream = response.into_inner();
    while stream.message().await.expect("stream").is_some() {}
    router
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefix_groups_stay_on_one_router_and_refusals_pass_through() {
    // Routers with a shorter context than the checkpoint's (1024): the gateway, given none,
    // learns theirs.
    let (mut cluster, addrs) = two_routers_with(&["--max-model-len", "128"], &[]).await;
    let cache_aware = addrs.grpc.clone();
    let round_robin = cluster
        .add_gateway(
            &harness::binary("moe-gateway"),
            &["--policy".into(), "round-robin".into()],
        )
        .unwrap()
        .grpc;
    wait_gateway_routers(&round_robin, &cluster.router_addrs()).await;
    // The standard health checker: serving, with routers behind it.
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/grpc_client.py");
    let health = Command::new("python3")
        .args([script, "health", cache_aware.as_str()])
        .output()
        .expect("python3 runs");
    let health: Value = serde_json::from_slice(&health.stdout).expect("health JSON");
    assert_eq!(health["overall"], "SERVING", "{health}");
    assert_eq!(health["inference"], "SERVING", "{health}");
    // Three groups of four prompts: 48 shared tokens (three whole blocks), then their own.
    let prompt = |group: u32, member: u32| -> Vec<u32> {
        let mut ids: Vec<u32> = (0..48).map(|i| 3 + (group * 31 + i * 7) % 200).collect();
        ids.extend([5 + member, 9 + member, 2 + group]);
        ids
    };
    for (gateway, policy) in [(&cache_aware, "cache-aware"), (&round_robin, "round-robin")] {
        let mut inference = client(gateway).await;
        let mut split_groups = 0;
        for group in 0..3 {
            let mut used = BTreeSet::new();
            for member in 0..4 {
                used.insert(served_by(&mut inference, greedy(&prompt(group, member), 2)).await);
            }
            if used.len() > 1 {
                split_groups += 1;
            }
        }
        match policy {
            "cache-aware" => assert_eq!(split_groups, 0, "cache-aware split a prefix group"),
            _ => assert_eq!(split_groups, 3, "round-robin kept a group on one router"),
        }
    }
    // A burst of unrelated prompts spreads over both routers (each choice counts as load
    // at once, not once its stream is open).
    let burst: Vec<_> = (0..8u32)
        .map(|i| {
            let gateway = cache_aware.clone();
            let ids: Vec<u32> = (0..20).map(|k| 3 + (i * 37 + k * 11) % 300).collect();
            tokio::spawn(
                async move { served_by(&mut client(&gateway).await, greedy(&ids, 24)).await },
            )
        })
        .collect();
    let mut spread = BTreeSet::new();
    for request in burst {
        spread.insert(request.await.unwrap());
    }
    assert_eq!(spread.len(), 2, "a burst went to one router: {spread:?}");
    // Requests a router refuses: the same status code and message through the gateway.
    let vocab = harness::inference(&cluster)
        .await
        .model_info(moe_proto::v1::ModelInfoRequest {})
        .await
        .unwrap()
        .into_inner()
        .vocab_size;
    let refused = [
        greedy(&[], 4),
        greedy(&[vocab], 4),
        GenerateRequest {
            temperature: Some(-1.0),
            ..greedy(&[1, 2, 3], 4)
        },
    ];
    let mut direct = harness::inference(&cluster).await;
    let mut through = client(&cache_aware).await;
    for request in refused {
        let want = generate(&mut direct, request.clone()).await.unwrap_err();
        let got = generate(&mut through, request).await.unwrap_err();
        assert_eq!(got.code(), want.code(), "{got:?} vs {want:?}");
        assert_eq!(got.message(), want.message());
    }
    // The same over the OpenAI API: the HTTP status and the message.
    let router_http = cluster.router_http_addr.clone().expect("router HTTP");
    let gateway_http = addrs.http.clone().expect("gateway HTTP");
    let bodies = [
        json!({"model": "deepseek-v3-tiny", "prompt": [vocab], "max_tokens": 4}),
        json!({"prompt": "hello", "max_tokens": 4, "temperature": -1.0}),
        json!({"model": "another-model", "prompt": "hello"}),
        json!({"prompt": "hello", "n": 99}),
        json!({"messages": [], "max_tokens": 4}),
    ];
    for body in bodies {
        let body = body.to_string();
        let path = if body.contains("messages") {
            "/v1/chat/completions"
        } else {
            "/v1/completions"
        };
        let want = harness::http(&router_http, "POST", path, None, body.as_bytes()).await;
        let got = harness::http(&gateway_http, "POST", path, None, body.as_bytes()).await;
        assert!(want.0 >= 400, "{body}: the router took it: {want:?}");
        let message =
            |text: &str| serde_json::from_str::<Value>(text).unwrap()["error"]["message"].clone();
        assert_eq!(
            (got.0, message(&got.1)),
            (want.0, message(&want.1)),
            "{body}"
        );
    }
    // What the gateway answers itself or per prompt is the router's: vLLM's tokenizer
    // endpoints (the routers' context length), a batch of prompts (each its own request, maybe
    // on either router), vLLM's prompt_logprobs (the ranks relayed), a Responses body, and a
    // chat without max_tokens (run up to the routers' context, not the checkpoint's).
    let (status, models) = harness::http(&gateway_http, "GET", "/v1/models", None, b"").await;
    assert_eq!(status, 200, "{models}");
    let models: Value = serde_json::from_str(&models).unwrap();
    assert_eq!(models["data"][0]["max_model_len"], 128, "{models}");
    let answers = [
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "hi"}], "temperature": 0,
                   "ignore_eos": true}),
        ),
        ("/tokenize", json!({"prompt": "hello there"})),
        (
            "/tokenize",
            json!({"messages": [{"role": "user", "content": "hi"}], "return_token_strs": true}),
        ),
        ("/detokenize", json!({"tokens": [5, 6, 7]})),
        (
            "/v1/completions",
            json!({"prompt": ["hello", "the cat"], "n": 2, "max_tokens": 4, "temperature": 0,
                   "ignore_eos": true}),
        ),
        (
            "/v1/completions",
            json!({"prompt": "the cat sat", "max_tokens": 2, "temperature": 0,
                   "prompt_logprobs": 2}),
        ),
        (
            "/v1/responses",
            json!({"input": "hello there", "instructions": "Be brief.", "max_output_tokens": 4,
                   "temperature": 0}),
        ),
    ];
    for (path, body) in answers {
        let body = body.to_string();
        let want = harness::http(&router_http, "POST", path, None, body.as_bytes()).await;
        let got = harness::http(&gateway_http, "POST", path, None, body.as_bytes()).await;
        assert_eq!(want.0, 200, "{path} {body}: {want:?}");
        // The answer's id (which items' ids repeat) and time are each server's own.
        let answer = |text: &str| {
            let v: Value = serde_json::from_str(text).unwrap();
            let id = v["id"].as_str().unwrap_or_default().to_string();
            let text = if id.is_empty() {
                text.to_string()
            } else {
                text.replace(&id, "ID")
            };
            let mut v: Value = serde_json::from_str(&text).unwrap();
            for varying in ["created", "created_at"] {
                v.as_object_mut().unwrap().remove(varying);
            }
            // The second asking finds the first's prompt in the router's prefix cache.
            if let Some(details) = v.pointer_mut("/usage/input_tokens_details") {
                *details = Value::Null;
            }
            v
        };
        assert_eq!(answer(&got.1), answer(&want.1), "{path} {body}");
    }
    // A conversation continued with `previous_response_id` through the gateway (which keeps
    // the responses it served) answers as through a router.
    let mut seconds = Vec::new();
    for http in [&router_http, &gateway_http] {
        let turn = json!({"input": "hello there", "max_output_tokens": 4, "temperature": 0});
        let first = harness::post_json(http, "/v1/responses", &turn).await;
        let turn = json!({"input": "and?", "previous_response_id": first["id"],
                          "max_output_tokens": 4, "temperature": 0});
        let second = harness::post_json(http, "/v1/responses", &turn).await;
        let path = format!("/v1/responses/{}", second["id"].as_str().unwrap());
        let (status, kept) = harness::http(http, "GET", &path, None, b"").await;
        assert_eq!(status, 200, "{kept}");
        let kept: Value = serde_json::from_str(&kept).unwrap();
        assert_eq!(kept["output"], second["output"]);
        // Tokens are the same; the cached part depends on what each asking found.
        let mut usage = second["usage"].clone();
        usage["input_tokens_details"] = Value::Null;
        seconds.push((second["output"][0]["content"][0]["text"].clone(), usage));
    }
    assert_eq!(seconds[0], seconds[1]);
}

/// Eight greedy and eight seeded sampled streams (temperature 0.9, top_p 0.95), 400 tokens each.
fn failover_streams() -> Value {
    let cases = golden_cases(FIXTURES[0]);
    let streams: Vec<Value> = (0..16)
        .map(|i| {
            let case = &cases[i % cases.len()];
            let len = case.input_ids.len().saturating_sub(i / cases.len()).max(1);
            let mut s = json!({
                "input_ids": &case.input_ids[..len],
                "max_new_tokens": 400,
                "temperature": 0.0,
            });
            if i % 2 == 1 {
                s["temperature"] = json!(0.9);
                s["top_p"] = json!(0.95);
                s["seed"] = json!(1000 + i);
            }
            s
        })
        .collect();
    json!({"model": "deepseek-v3-tiny", "streams": streams, "ready_after": 40})
}

/// Which client drives the streams.
#[derive(Clone, Copy)]
enum Client {
    /// Python grpcio on the gateway's gRPC port (`python/gateway_streams.py`).
    Grpcio,
    /// The official `openai` package on its OpenAI HTTP port (`python/gateway_openai.py`).
    OpenAi,
}

impl Client {
    fn script(self) -> &'static str {
        match self {
            Client::Grpcio => concat!(env!("CARGO_MANIFEST_DIR"), "/python/gateway_streams.py"),
            Client::OpenAi => concat!(env!("CARGO_MANIFEST_DIR"), "/python/gateway_openai.py"),
        }
    }

    fn address(self, gateway: &GatewayAddrs) -> String {
        match self {
            Client::Grpcio => gateway.grpc.clone(),
            Client::OpenAi => gateway.http.clone().expect("the gateway serves HTTP"),
        }
    }

    /// What holds a stream's generated tokens in its result.
    fn tokens_key(self) -> &'static str {
        match self {
            Client::Grpcio => "ids",
            Client::OpenAi => "tokens",
        }
    }
}

/// Runs `client`'s streams against `address`; calls `at_ready` once every stream has its first
/// tokens. Returns the streams' results.
fn python_streams(
    client: Client,
    address: &str,
    spec: &Value,
    at_ready: impl FnOnce(),
) -> Vec<Value> {
    let script = client.script();
    let gateway = address;
    let mut child = Command::new("python3")
        .arg(script)
        .arg(gateway)
        .arg(spec.to_string())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 runs");
    let stdout = child.stdout.take().unwrap();
    let mut at_ready = Some(at_ready);
    let mut last = String::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap();
        if line.trim() == "READY" {
            if let Some(f) = at_ready.take() {
                f();
            }
        } else {
            last = line;
        }
    }
    assert!(child.wait().unwrap().success(), "the python client failed");
    serde_json::from_str::<Vec<Value>>(&last).expect("results JSON")
}

/// Where two stream results first differ, briefly.
fn divergence(got: &Value, want: &Value) -> String {
    for key in ["ids", "tokens", "logprobs"] {
        let (Some(g), Some(w)) = (got[key].as_array(), want[key].as_array()) else {
            continue;
        };
        if let Some(at) = (0..g.len().max(w.len())).find(|&k| g.get(k) != w.get(k)) {
            return format!(
                "{key} from {at} of {}/{}: {:?} vs {:?}",
                g.len(),
                w.len(),
                g.get(at),
                w.get(at)
            );
        }
    }
    for key in ["text", "finish_reason", "usage"] {
        if got[key] != want[key] {
            return format!("{key}: {} vs {}", got[key], want[key]);
        }
    }
    "nothing".into()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_killed_mid_stream_loses_no_grpc_stream_and_changes_no_token() {
    kill_mid_stream(Client::Grpcio).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_killed_mid_stream_loses_no_openai_stream_and_changes_no_token() {
    kill_mid_stream(Client::OpenAi).await;
}

/// Sixteen streams (`failover_streams`) through the gateway with `client`, then the same with
/// the router holding most of them SIGKILLed once each has 40 tokens: every stream ends
/// without an error and equals its uninterrupted run (tokens, logprobs, text, usage).
async fn kill_mid_stream(client: Client) {
    let (mut cluster, addrs) = two_routers(&[]).await;
    let gateway = addrs.grpc.clone();
    let address = client.address(&addrs);
    let spec = failover_streams();
    let reference = tokio::task::block_in_place(|| python_streams(client, &address, &spec, || {}));
    for (i, r) in reference.iter().enumerate() {
        assert!(
            r.get("error").is_none(),
            "stream {i} failed without a kill: {r}"
        );
        assert_eq!(r[client.tokens_key()].as_array().unwrap().len(), 400);
    }
    let handle = tokio::runtime::Handle::current();
    let killed = std::sync::Mutex::new(None);
    let after_kill = tokio::task::block_in_place(|| {
        python_streams(client, &address, &spec, || {
            // The router holding most streams now.
            let seen = handle.block_on(routers(&gateway));
            let busiest = seen
                .routers
                .iter()
                .max_by_key(|r| r.in_flight)
                .expect("routers")
                .clone();
            assert!(busiest.in_flight > 0, "{seen:?}");
            cluster.kill_router(&busiest.address);
            *killed.lock().unwrap() = Some((busiest.router_id, busiest.in_flight));
        })
    });
    let (killed, held) = killed.into_inner().unwrap().expect("a router was killed");
    for (i, (got, want)) in after_kill.iter().zip(&reference).enumerate() {
        assert!(got.get("error").is_none(), "stream {i} failed: {got}");
        if got != want {
            panic!(
                "stream {i} differs after the kill: {}",
                divergence(got, want)
            );
        }
    }
    let seen = routers(&gateway).await;
    let from: BTreeMap<&str, u64> = seen
        .routers
        .iter()
        .map(|r| (r.router_id.as_str(), r.migrations_from))
        .collect();
    assert!(
        seen.migrations_total >= u64::from(held),
        "{held} streams on {killed}, {} moved: {seen:?}",
        seen.migrations_total
    );
    // The killed router may have left etcd already (its lease), taking its counters' row.
    if let Some(&moved) = from.get(killed.as_str()) {
        assert!(moved >= u64::from(held), "{seen:?}");
    }
}

/// Both routers restarted one after the other (DrainRouter through the gateway, then SIGTERM)
/// under a checking greedy load of long answers: nothing fails or differs from the offline
/// engine, each router exits 0, and streams were moved (the longer ones outlast the drain's
/// grace, set short here: with the default 500 ms a fast machine finished every answer of the
/// tiny fixture inside it, and nothing was left to move).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_behind_the_gateway_fails_nothing_and_changes_no_token() {
    let fixture = FIXTURES[0];
    let engine = Engine::load(&fixture_dir(fixture)).unwrap();
    let cases = golden_cases(fixture);
    let requests: Vec<(Vec<u32>, u32)> = (0..8)
        .map(|i| {
            (
                cases[i % cases.len()].input_ids.clone(),
                600 + 20 * i as u32,
            )
        })
        .collect();
    let answers = Arc::new(expected_answers(&engine, &requests));
    let (mut cluster, addrs) = two_routers_with(&["--drain-grace-ms", "50"], &[]).await;
    let gateway = addrs.grpc;
    let load = GreedyLoad::start(vec![gateway.clone()], answers, 4, None);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let original = cluster.router_addrs();
    for (turn, leaving) in original.iter().enumerate() {
        // Both ways a router is restarted: the admin call through the gateway, then SIGTERM.
        if turn == 0 {
            let id = routers(&gateway)
                .await
                .routers
                .into_iter()
                .find(|r| &r.address == leaving)
                .expect("registered")
                .router_id;
            let mut admin = GatewayClient::connect(format!("http://{gateway}"))
                .await
                .unwrap();
            admin
                .drain_router(DrainRouterRequest { router_id: id })
                .await
                .expect("DrainRouter");
        } else {
            cluster.terminate_router(leaving);
        }
        let code = tokio::task::block_in_place(|| cluster.wait_router_exit(leaving, MINUTE));
        assert_eq!(code, Some(0), "router {leaving} did not exit cleanly");
        cluster.add_router(&[]).unwrap();
        wait_gateway_routers(&gateway, &cluster.router_addrs()).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let report = load.stop().await;
    assert_eq!(
        (report.failed, report.mismatched),
        (0, 0),
        "{:?}",
        report.problems
    );
    assert!(report.completed >= 4, "{report:?}");
    let seen = routers(&gateway).await;
    assert!(seen.migrations_total >= 1, "no stream moved: {seen:?}");
}

/// A moved request is one trace: the gateway's span, the first router's spans (those that
/// ended before it was killed) and the second router's request span all carry the client's
/// trace id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moved_request_is_one_trace_across_both_routers() {
    use moe_tests::otlp::start_receiver;
    const CLIENT_TRACE: &str = "5bf92f3577b34da6a3ce929d0e0e4737";
    let (collector, sink) = start_receiver().await.unwrap();
    let endpoint = format!("http://{collector}");
    let tracing_flags = ["--otlp-endpoint", &endpoint, "--trace-step-ratio", "1"].map(String::from);
    // Export every 100 ms instead of every 5 s (the SDK reads this from the environment).
    std::env::set_var("OTEL_BSP_SCHEDULE_DELAY", "100");
    let mut spec = harness::spec(fixture_dir(FIXTURES[0]), 2);
    spec.router_args.extend(tracing_flags.iter().cloned());
    let mut cluster = LocalCluster::start(spec).unwrap();
    wait_serving(&cluster, 2).await;
    cluster.add_router(&[]).unwrap();
    let gateway = cluster
        .add_gateway(&harness::binary("moe-gateway"), &tracing_flags)
        .unwrap()
        .grpc;
    wait_gateway_routers(&gateway, &cluster.router_addrs()).await;

    let case = &golden_cases(FIXTURES[0])[0];
    let new_tokens = 900;
    let mut request = tonic::Request::new(greedy(&case.input_ids, new_tokens));
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{CLIENT_TRACE}-00f067aa0ba902b8-01")
            .parse()
            .unwrap(),
    );
    let response = client(&gateway).await.generate(request).await.unwrap();
    let first = response
        .metadata()
        .get("moe-router")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    let mut stream = response.into_inner();
    let mut tokens = 0;
    let mut killed = false;
    while let Some(answer) = stream.message().await.expect("the stream survives") {
        tokens += answer.token_ids.len();
        // Once the first router's finished spans (queue, prefill, some steps) were exported.
        let exported = || {
            sink.spans()
                .iter()
                .any(|s| s.instance == first && s.name == "step" && s.trace_id == CLIENT_TRACE)
        };
        if !killed && exported() {
            let address = routers(&gateway)
                .await
                .routers
                .into_iter()
                .find(|r| r.router_id == first)
                .unwrap()
                .address;
            cluster.kill_router(&address);
            killed = true;
        }
    }
    assert!(killed, "the first router's spans never arrived");
    assert_eq!(tokens, new_tokens as usize);
    let deadline = Instant::now() + MINUTE;
    loop {
        let spans: Vec<_> = sink
            .spans()
            .into_iter()
            .filter(|s| s.trace_id == CLIENT_TRACE)
            .collect();
        let routers_seen: BTreeSet<&str> = spans
            .iter()
            .filter(|s| s.service == "moe-router")
            .map(|s| s.instance.as_str())
            .collect();
        let second_request = spans.iter().any(|s| {
            s.service == "moe-router"
                && s.instance != first
                && s.attributes.contains_key("gen_ai.operation.name")
        });
        let gateway_span = spans
            .iter()
            .any(|s| s.service == "moe-gateway" && s.name == "gateway.generate");
        if routers_seen.len() == 2 && second_request && gateway_span {
            break;
        }
        if Instant::now() >= deadline {
            let mut seen: BTreeMap<(String, String, String), usize> = BTreeMap::new();
            for s in sink.spans() {
                let key = (s.trace_id.clone(), s.instance.clone(), s.name.clone());
                *seen.entry(key).or_default() += 1;
            }
            panic!(
                "one trace over both routers (first {first}): routers {routers_seen:?}, the \
                 second's request span {second_request}, the gateway's {gateway_span}; \
                 received {seen:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The gateway's span is the client's child, and the routers' request spans its children.
    let spans = sink.spans();
    let gateway_span = spans
        .iter()
        .find(|s| s.trace_id == CLIENT_TRACE && s.name == "gateway.generate")
        .unwrap();
    assert_eq!(gateway_span.parent_span_id, "00f067aa0ba902b8");
    let second = spans
        .iter()
        .find(|s| {
            s.trace_id == CLIENT_TRACE
                && s.instance != first
                && s.attributes.contains_key("gen_ai.operation.name")
        })
        .unwrap();
    assert_eq!(second.parent_span_id, gateway_span.span_id);
}

/// The token ids of one stream through the gateway, or why it failed.
async fn stream_ids(gateway: String, request: GenerateRequest) -> Result<Vec<u32>, String> {
    let mut client = client(&gateway).await;
    let mut stream = client
        .generate(request)
        .await
        .map_err(|s| s.to_string())?
        .into_inner();
    let mut ids = Vec::new();
    while let Some(message) = stream.message().await.map_err(|s| s.to_string())? {
        ids.extend(message.token_ids);
    }
    Ok(ids)
}

/// A hung router (SIGSTOPped: its sockets accept, nothing answers) that etcd still lists (a
/// 30 s lease): the request sent to it just after it hung, waiting for the call's answer
/// (where the stall timeout does not reach), goes to the other router once the hung one fails
/// a health check, and ends as its twin there does; after that the hung router gets no new
/// request: with round-robin every one is served, and by the other router. Without the
/// checks these requests would wait on the hung router until their deadline. (A stream that
/// goes silent mid-answer moves the same way: `gateway/tests/relay_moves.rs`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_router_fails_its_health_checks_and_gets_no_new_request() {
    let (cluster, addrs) = two_routers_with(
        &["--lease-ttl-secs", "30"],
        &[
            "--policy",
            "round-robin",
            "--stall-timeout-ms",
            "60000",
            "--health-check-interval-ms",
            "2000",
            "--health-check-timeout-ms",
            "1000",
        ],
    )
    .await;
    let router_addrs = cluster.router_addrs();
    let hung = router_addrs[1].clone();
    let listed = routers(&addrs.grpc).await;
    let id_of = |address: &str| {
        listed
            .routers
            .iter()
            .find(|r| r.address == address)
            .map(|r| r.router_id.clone())
            .expect("listed")
    };
    let (hung_id, live_id) = (id_of(&hung), id_of(&router_addrs[0]));
    cluster.pause_router(&hung, true);
    // Twins sent at once, before a health check can fail: round-robin puts one on each router.
    let twins: Vec<_> = (0..2)
        .map(|_| tokio::spawn(stream_ids(addrs.grpc.clone(), greedy(&[3, 17, 29, 4], 24))))
        .collect();
    let mut answers = Vec::new();
    for twin in twins {
        let answer = tokio::time::timeout(Duration::from_secs(20), twin)
            .await
            .expect("a request stayed on the hung router")
            .unwrap()
            .expect("the stream ends whole");
        answers.push(answer);
    }
    assert_eq!(answers[0].len(), 24, "{answers:?}");
    assert_eq!(answers[0], answers[1], "the moved twin differs");
    let http = addrs.http.clone().expect("the gateway serves HTTP");
    let (_, metrics) = harness::http(&http, "GET", "/metrics", None, b"").await;
    let sent_to = |id: &str| {
        let line = format!("moe_gateway_requests_total{{router=\"{id}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(line.as_str()))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    assert_eq!(
        (sent_to(&hung_id), sent_to(&live_id)),
        (1, 2),
        "one twin should have been sent to the hung router, then to the live one:\n{metrics}"
    );
    let deadline = Instant::now() + MINUTE;
    loop {
        let seen = routers(&addrs.grpc).await;
        let find = |address: &str| seen.routers.iter().find(|r| r.address == address).cloned();
        if let (Some(h), Some(l)) = (find(&hung), find(&router_addrs[0])) {
            if !h.healthy && l.healthy {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the hung router was never avoided: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut gateway = client(&addrs.grpc).await;
    for i in 0..6u32 {
        let request = greedy(&[3 + i, 17, 29, 4], 4);
        let served =
            tokio::time::timeout(Duration::from_secs(30), served_by(&mut gateway, request))
                .await
                .unwrap_or_else(|_| panic!("request {i} hung"));
        assert_eq!(
            served, live_id,
            "request {i} went to {served}, not avoiding {hung_id}"
        );
    }
    let (_, metrics) = harness::http(&http, "GET", "/metrics", None, b"").await;
    let failures = metrics
        .lines()
        .find(|l| l.starts_with("moe_gateway_health_check_failures_total") && l.contains(&hung_id))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    assert!(
        failures >= 1,
        "no failed health check counted for {hung_id}:\n{metrics}"
    );
    cluster.pause_router(&hung, false);
}

/// A chat without `max_tokens` is sized by the routers' generation defaults, not by the
/// gateway's copy of the checkpoint: with `--generation-config vllm` on the router, the
/// checkpoint's `max_new_tokens` (5) is no default there, and the gateway's answer is the
/// router's own, run to the end of the context.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_without_max_tokens_is_sized_by_the_routers_defaults() {
    let model = with_generation_config(
        &fixture_dir(FIXTURES[0]),
        "gateway-generation",
        &json!({"max_new_tokens": 5}),
    );
    let mut spec = harness::spec(model.path().to_path_buf(), 1);
    spec.router_args.extend(
        [
            "--http-listen",
            "127.0.0.1:0",
            "--generation-config",
            "vllm",
            "--max-model-len",
            "48",
        ]
        .map(String::from),
    );
    let mut cluster = LocalCluster::start(spec).unwrap();
    wait_serving(&cluster, 1).await;
    let args = ["--poll-ms", "100", "--http-listen", "127.0.0.1:0"].map(String::from);
    let gateway = cluster
        .add_gateway(&harness::binary("moe-gateway"), &args)
        .unwrap();
    wait_gateway_routers(&gateway.grpc, &cluster.router_addrs()).await;
    let chat = json!({
        "model": model.path().file_name().unwrap().to_str().unwrap(),
        "messages": [{"role": "user", "content": "The software is provided as is"}],
        "temperature": 0,
    });
    let router_http = cluster
        .router_http_addr
        .clone()
        .expect("the router serves HTTP");
    let direct = harness::post_json(&router_http, "/v1/chat/completions", &chat).await;
    let gateway_http = gateway.http.clone().expect("gateway HTTP");
    let through = harness::post_json(&gateway_http, "/v1/chat/completions", &chat).await;
    let tokens = |answer: &Value| answer["usage"]["completion_tokens"].as_u64().unwrap();
    assert!(tokens(&direct) > 5, "the router has no default: {direct}");
    assert_eq!(tokens(&through), tokens(&direct), "{through} vs {direct}");
    assert_eq!(
        through["choices"][0]["message"]["content"],
        direct["choices"][0]["message"]["content"]
    );
}
