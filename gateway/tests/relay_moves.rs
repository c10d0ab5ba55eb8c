//! The relay's moves against in-process gRPC routers that misbehave on purpose (the process-
//! level tests in `tests/gateway.rs` cover real routers): a router that stalls past
//! `--stall-timeout-ms`, or ends a stream without finishing it, hands the request to another
//! router resumed after exactly the ids already sent, and the client sees one whole stream.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use moe_cluster::discovery::{RouterLoad, RouterRecord};
use moe_gateway::metrics::GatewayMetrics;
use moe_gateway::policy::{RouterChooser, RoutingPolicy};
use moe_gateway::relay::{ForwardHeaders, Journey, Relay, RelaySettings};
use moe_gateway::router_set::RouterSet;
use moe_proto::v1::inference_server::{Inference, InferenceServer};
use moe_proto::v1::{
    GenerateRequest, GenerateResponse, ModelInfoRequest, ModelInfoResponse, TokenizeRequest,
    TokenizeResponse, Usage,
};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

/// What a fake router does with a request after sending `after` tokens.
#[derive(Clone, Copy)]
enum Misbehaves {
    /// Sends nothing more, keeping the stream open.
    Stalls,
    /// Ends the stream without a finish reason (as a crashed process's does).
    Ends,
    /// Nothing: it answers to the end.
    Never,
}

struct FakeRouter {
    after: usize,
    misbehaves: Misbehaves,
    seen: Arc<Mutex<Vec<GenerateRequest>>>,
}

type Answers = Pin<Box<dyn Stream<Item = Result<GenerateResponse, Status>> + Send>>;

/// Token i of every answer is `100 + i`, so a resumed answer is checkable.
fn token(i: usize) -> GenerateResponse {
    GenerateResponse {
        token_ids: vec![100 + i as u32],
        text: format!("<{i}>"),
        logprobs: vec![-(i as f32)],
        ..Default::default()
    }
}

#[tonic::async_trait]
impl Inference for FakeRouter {
    type GenerateStream = Answers;

    async fn generate(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<Answers>, Status> {
        let request = request.into_inner();
        self.seen.lock().unwrap().push(request.clone());
        let start = request.resume.as_ref().map_or(0, |r| r.generated_ids.len());
        let total = request.max_new_tokens as usize;
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let (after, misbehaves) = (self.after, self.misbehaves);
        tokio::spawn(async move {
            for i in start..total {
                if i == start + after {
                    match misbehaves {
                        Misbehaves::Stalls => {
                            tokio::time::sleep(Duration::from_secs(3600)).await;
                            return;
                        }
                        Misbehaves::Ends => return,
                        Misbehaves::Never => {}
                    }
                }
                let mut message = token(i);
                if i + 1 == total {
                    message.finish_reason = "length".into();
                    message.usage = Some(Usage {
                        prompt_tokens: request.input_ids.len() as u32,
                        completion_tokens: total as u32,
                        cached_tokens: 0,
                    });
                }
                if tx.send(Ok(message)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn tokenize(
        &self,
        _: Request<TokenizeRequest>,
    ) -> Result<Response<TokenizeResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn model_info(
        &self,
        _: Request<ModelInfoRequest>,
    ) -> Result<Response<ModelInfoResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
}

/// Serves `router` on a free loopback port; returns its address and what it was sent.
async fn serve(after: usize, misbehaves: Misbehaves) -> (String, Arc<Mutex<Vec<GenerateRequest>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let router = FakeRouter {
        after,
        misbehaves,
        seen: Arc::clone(&seen),
    };
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(InferenceServer::new(router))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (address, seen)
}

fn record(address: &str) -> RouterRecord {
    RouterRecord {
        address: address.to_string(),
        serving_epoch: 1,
        http_address: String::new(),
        model: "fake".into(),
        max_model_len: 0,
        load: RouterLoad::default(),
        generation: None,
    }
}

/// How the relay learns that router "a" went wrong.
#[derive(Clone, Copy)]
enum Noticed {
    /// By itself: the stream ends, or stalls past a 300 ms stall timeout.
    ByTheStream,
    /// By a failed health check 500 ms in (as `probes` reports one), with a stall timeout of
    /// a minute.
    ByAHealthCheck,
}

/// Router "a" misbehaves after 5 tokens, router "b" serves; round-robin picks "a" first.
async fn moved_once(misbehaves: Misbehaves, noticed: Noticed, reason: &str) {
    let (a, seen_a) = serve(5, misbehaves).await;
    let (b, seen_b) = serve(0, Misbehaves::Never).await;
    let routers = Arc::new(RouterSet::new(Duration::from_secs(5), None));
    routers.replace(BTreeMap::from([
        ("a".to_string(), record(&a)),
        ("b".to_string(), record(&b)),
    ]));
    let metrics = Arc::new(GatewayMetrics::default());
    let relay = Arc::new(Relay {
        routers: Arc::clone(&routers),
        chooser: RouterChooser::new(RoutingPolicy::RoundRobin, 0),
        settings: RelaySettings {
            migration_limit: 3,
            stall_timeout: Some(match noticed {
                Noticed::ByTheStream => Duration::from_millis(300),
                Noticed::ByAHealthCheck => Duration::from_secs(60),
            }),
            recovery_timeout: Duration::from_secs(5),
            hung_after: Duration::from_millis(200),
            token: None,
        },
        metrics: Arc::clone(&metrics),
    });
    let request = GenerateRequest {
        input_ids: vec![1, 2, 3],
        max_new_tokens: 12,
        temperature: Some(0.0),
        ..Default::default()
    };
    let journey = Journey::new(request, ForwardHeaders::default(), tracing::Span::none());
    let (first, mut answers) = relay.start(journey).await.expect("opened");
    assert_eq!(first, "a");
    if let Noticed::ByAHealthCheck = noticed {
        let a = Arc::clone(&routers.all()["a"]);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            a.counters.health_failed.notify_waiters();
        });
    }
    let started = std::time::Instant::now();
    let mut ids = Vec::new();
    let mut text = String::new();
    let mut finish = String::new();
    while let Some(answer) = answers.recv().await {
        let answer = answer.expect("no error reaches the client");
        ids.extend(answer.token_ids);
        text.push_str(&answer.text);
        if !answer.finish_reason.is_empty() {
            finish = answer.finish_reason;
            assert_eq!(answer.usage.unwrap().completion_tokens, 12);
        }
    }
    assert_eq!(ids, (100..112).collect::<Vec<u32>>(), "one whole stream");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "moved only late"
    );
    assert_eq!(text, (0..12).map(|i| format!("<{i}>")).collect::<String>());
    assert_eq!(finish, "length");
    // "b" was asked to resume after exactly what "a" had sent.
    let resumed = seen_b.lock().unwrap().clone();
    assert_eq!(resumed.len(), 1);
    let sent: Vec<u32> = (100..105).collect();
    assert_eq!(resumed[0].resume.as_ref().unwrap().generated_ids, sent);
    assert_eq!(resumed[0].input_ids, [1, 2, 3]);
    assert!(seen_a.lock().unwrap()[0].resume.is_none());
    let page = metrics.render(&routers);
    assert!(
        page.contains(&format!(
            "moe_gateway_migrations_total{{reason=\"{reason}\"}} 1"
        )),
        "{page}"
    );
    assert!(
        page.contains("moe_gateway_migration_seconds_count 1"),
        "{page}"
    );
}

#[tokio::test]
async fn a_stalled_router_hands_the_stream_on_after_the_stall_timeout() {
    moved_once(Misbehaves::Stalls, Noticed::ByTheStream, "stalled").await;
}

/// A router that stops answering mid-stream and then fails a health check loses the stream
/// at once, not after the (here one-minute) stall timeout.
#[tokio::test]
async fn a_silent_router_that_fails_a_health_check_hands_the_stream_on_at_once() {
    moved_once(Misbehaves::Stalls, Noticed::ByAHealthCheck, "stalled").await;
}

#[tokio::test]
async fn a_stream_that_ends_unfinished_is_resumed_elsewhere() {
    moved_once(Misbehaves::Ends, Noticed::ByTheStream, "died").await;
}
