//! OpenTelemetry traces from a real router and two real nodes into an OTLP receiver running in
//! the test: one Generate call is one trace, with spans from both services; the nodes' spans are
//! children of the router's dispatch spans; an incoming `traceparent` is the root's parent.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use moe_tests::harness::{self, wait_serving};
use moe_tests::otlp::{start_receiver, ReceivedSpan, SpanSink};
use moe_tests::{fixture_dir, golden_cases, FIXTURES};
use moe_tooling::{greedy, LocalCluster};

const CLIENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

/// Waits until the request span of `trace` (it closes last on the router) and node spans of
/// that trace have arrived.
async fn wait_for_trace(sink: &SpanSink, trace: impl Fn(&str) -> bool) -> Vec<ReceivedSpan> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let spans: Vec<ReceivedSpan> = sink
            .spans()
            .into_iter()
            .filter(|s| trace(&s.trace_id))
            .collect();
        let has_request = spans
            .iter()
            .any(|s| s.attributes.contains_key("gen_ai.operation.name"));
        let has_node = spans.iter().any(|s| s.service == "moe-expert-node");
        if has_request && has_node {
            // Let the last batches of the other process land too.
            tokio::time::sleep(Duration::from_millis(600)).await;
            return sink
                .spans()
                .into_iter()
                .filter(|s| trace(&s.trace_id))
                .collect();
        }
        assert!(
            Instant::now() < deadline,
            "trace not received in time; got {} spans: {:?}",
            spans.len(),
            spans.iter().map(|s| &s.name).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn named<'a>(spans: &'a [ReceivedSpan], name: &str) -> Vec<&'a ReceivedSpan> {
    spans.iter().filter(|s| s.name == name).collect()
}

/// The nodes' `expert_batch` spans with their router-side parents (named `parent_name`, a
/// child of the `moe_layer` span of the same layer); both nodes must be among them.
fn node_batches<'a>(
    spans: &'a [ReceivedSpan],
    by_id: &BTreeMap<&str, &'a ReceivedSpan>,
    parent_name: &str,
) -> Vec<(&'a ReceivedSpan, &'a ReceivedSpan)> {
    let batches = named(spans, "expert_batch");
    assert!(!batches.is_empty());
    let mut nodes = BTreeSet::new();
    let mut pairs = Vec::with_capacity(batches.len());
    for b in batches {
        assert_eq!(b.service, "moe-expert-node");
        let parent = *by_id
            .get(b.parent_span_id.as_str())
            .unwrap_or_else(|| panic!("expert_batch parent {} not received", b.parent_span_id));
        assert_eq!(parent.name, parent_name);
        assert_eq!(parent.service, "moe-router");
        let layer_span = by_id[parent.parent_span_id.as_str()];
        assert_eq!(layer_span.name, "moe_layer");
        assert_eq!(
            b.attributes.get("layer"),
            layer_span.attributes.get("layer")
        );
        nodes.insert(b.instance.clone());
        pairs.push((b, parent));
    }
    assert_eq!(
        nodes,
        BTreeSet::from(["node-0".to_string(), "node-1".to_string()])
    );
    pairs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_request_is_one_trace_across_router_and_nodes() {
    let (collector, sink) = start_receiver().await.unwrap();
    let endpoint = format!("http://{collector}");
    let mut spec = harness::spec(fixture_dir(FIXTURES[0]), 2);
    let tracing_flags = ["--otlp-endpoint", &endpoint, "--trace-step-ratio", "1"].map(String::from);
    spec.router_args.extend(tracing_flags.iter().cloned());
    spec.router_args.extend(
        [
            "--served-model-name",
            "tiny-ds",
            "--http-listen",
            "127.0.0.1:0",
        ]
        .map(String::from),
    );
    spec.node_args.extend(tracing_flags.iter().cloned());
    // Export every 100 ms instead of every 5 s (the SDK reads this from the environment).
    std::env::set_var("OTEL_BSP_SCHEDULE_DELAY", "100");
    let cluster = LocalCluster::start(spec).unwrap();
    wait_serving(&cluster, 2).await;

    let case = &golden_cases(FIXTURES[0])[0];
    let new_tokens = 6;
    let mut client = harness::inference(&cluster).await;
    let mut request = tonic::Request::new(greedy(&case.input_ids, new_tokens));
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01")
            .parse()
            .unwrap(),
    );
    let mut stream = client.generate(request).await.unwrap().into_inner();
    let mut tokens = 0;
    while let Some(answer) = stream.message().await.unwrap() {
        tokens += answer.token_ids.len();
    }
    assert_eq!(tokens, new_tokens as usize);

    let spans = wait_for_trace(&sink, |t| t == CLIENT_TRACE).await;
    // Nothing of this request went to another trace: every span received so far is in it.
    let traces: BTreeSet<String> = sink.spans().iter().map(|s| s.trace_id.clone()).collect();
    assert_eq!(traces, BTreeSet::from([CLIENT_TRACE.to_string()]));

    let mut counts: BTreeMap<(&str, &str), usize> = BTreeMap::new();
    for s in &spans {
        *counts
            .entry((s.service.as_str(), s.name.as_str()))
            .or_default() += 1;
    }
    eprintln!("spans of the traced request: {counts:?}");
    let by_id: BTreeMap<&str, &ReceivedSpan> =
        spans.iter().map(|s| (s.span_id.as_str(), s)).collect();

    // The root: the client's span is its parent; gen_ai attributes.
    let roots: Vec<&ReceivedSpan> = spans
        .iter()
        .filter(|s| s.attributes.contains_key("gen_ai.operation.name"))
        .collect();
    assert_eq!(roots.len(), 1, "one request span");
    let root = roots[0];
    assert_eq!(root.parent_span_id, CLIENT_SPAN);
    assert_eq!(root.service, "moe-router");
    assert_eq!(root.name, "text_completion tiny-ds");
    let attr = |k: &str| root.attributes.get(k).cloned().unwrap_or_default();
    assert_eq!(attr("gen_ai.request.model"), "tiny-ds");
    assert_eq!(attr("gen_ai.request.max_tokens"), new_tokens.to_string());
    assert_eq!(
        attr("gen_ai.usage.input_tokens"),
        case.input_ids.len().to_string()
    );
    assert_eq!(attr("gen_ai.usage.output_tokens"), new_tokens.to_string());
    assert_eq!(attr("gen_ai.response.finish_reasons"), "[\"length\"]");

    // Every router span descends from the root.
    let descends = |start: &ReceivedSpan| {
        let mut id = start.span_id.as_str();
        loop {
            if id == root.span_id {
                return true;
            }
            match by_id.get(id) {
                Some(span) if !span.parent_span_id.is_empty() => id = &span.parent_span_id,
                _ => return false,
            }
        }
    };
    for s in &spans {
        assert!(
            descends(s),
            "{} ({}) is not under the request span",
            s.name,
            s.service
        );
    }
    for phase in ["queue", "prefill"] {
        let phase_spans: Vec<_> = named(&spans, phase);
        assert_eq!(phase_spans.len(), 1, "one {phase} span");
        assert_eq!(phase_spans[0].parent_span_id, root.span_id);
    }
    // One step per new token (prefill step included), each with its batch size, layers under it.
    let steps: Vec<_> = named(&spans, "step");
    assert_eq!(
        steps.len(),
        new_tokens as usize,
        "every step traced at ratio 1"
    );
    assert!(steps
        .iter()
        .all(|s| s.attributes.get("batch_size").map(String::as_str) == Some("1")));
    let layers: Vec<_> = named(&spans, "moe_layer");
    assert!(!layers.is_empty());
    assert!(layers
        .iter()
        .all(|l| by_id[l.parent_span_id.as_str()].name == "step"));

    // Node spans: children of the router's dispatch spans, from both nodes.
    for (batch, parent) in node_batches(&spans, &by_id, "dispatch") {
        assert_eq!(parent.attributes.get("node_id"), Some(&batch.instance));
    }

    // Without a traceparent the request span is a root of a new trace.
    let before: BTreeSet<String> = sink.spans().iter().map(|s| s.span_id.clone()).collect();
    harness::generate(&mut client, greedy(&case.input_ids, 2))
        .await
        .unwrap();
    let fresh = wait_for_trace(&sink, |t| t != CLIENT_TRACE).await;
    let root = fresh
        .iter()
        .find(|s| {
            s.attributes.contains_key("gen_ai.operation.name") && !before.contains(&s.span_id)
        })
        .expect("a second request span");
    assert!(
        root.parent_span_id.is_empty(),
        "no traceparent: a root span"
    );

    // The OpenAI HTTP API takes the traceparent header the same way.
    let http_trace = "0af7651916cd43dd8448eb211c80319c";
    let http_parent = "b7ad6b7169203331";
    let http = cluster.router_http_addr.clone().expect("HTTP address");
    let body = r#"{"model":"tiny-ds","prompt":"hello","max_tokens":2}"#;
    let head = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\ntraceparent: 00-{http_trace}-{http_parent}-01\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut conn = tokio::net::TcpStream::connect(&http).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut conn, head.as_bytes())
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut conn, &mut answer)
        .await
        .unwrap();
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"));
    let spans = wait_for_trace(&sink, |t| t == http_trace).await;
    let root = spans
        .iter()
        .find(|s| s.attributes.contains_key("gen_ai.operation.name"))
        .expect("the HTTP request's span");
    assert_eq!(root.parent_span_id, http_parent);
    assert_eq!(root.name, "text_completion tiny-ds");
    drop(cluster);
}

/// Over the per-epoch TCP collective the trace is the same shape: the nodes' `expert_batch`
/// spans are children of the router's `collective_exchange` span of their layer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collective_layers_are_traced_into_the_nodes() {
    let (collector, sink) = start_receiver().await.unwrap();
    let endpoint = format!("http://{collector}");
    let mut spec = harness::spec(fixture_dir(FIXTURES[0]), 2);
    let tracing_flags = ["--otlp-endpoint", &endpoint, "--trace-step-ratio", "1"].map(String::from);
    spec.router_args.extend(tracing_flags.iter().cloned());
    spec.router_args
        .extend(["--transport", "tcp"].map(String::from));
    spec.node_args.extend(tracing_flags.iter().cloned());
    std::env::set_var("OTEL_BSP_SCHEDULE_DELAY", "100");
    let cluster = LocalCluster::start(spec).unwrap();
    wait_serving(&cluster, 2).await;
    harness::wait_status(
        &cluster.router_addr,
        Duration::from_secs(60),
        "collective formed",
        |s| s.serving_transport == "tcp",
    )
    .await;

    let trace = "5bf92f3577b34da6a3ce929d0e0e4737";
    let case = &golden_cases(FIXTURES[0])[0];
    let mut client = harness::inference(&cluster).await;
    let mut request = tonic::Request::new(greedy(&case.input_ids, 3));
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace}-{CLIENT_SPAN}-01").parse().unwrap(),
    );
    let mut stream = client.generate(request).await.unwrap().into_inner();
    while stream.message().await.unwrap().is_some() {}

    let spans = wait_for_trace(&sink, |t| t == trace).await;
    let by_id: BTreeMap<&str, &ReceivedSpan> =
        spans.iter().map(|s| (s.span_id.as_str(), s)).collect();
    assert!(
        named(&spans, "dispatch").is_empty(),
        "no gRPC dispatch once the collective serves"
    );
    let exchanges = named(&spans, "collective_exchange");
    assert!(!exchanges.is_empty());
    for x in &exchanges {
        assert_eq!(
            x.attributes.get("transport").map(String::as_str),
            Some("tcp")
        );
        assert_eq!(by_id[x.parent_span_id.as_str()].name, "moe_layer");
    }
    node_batches(&spans, &by_id, "collective_exchange");
}
