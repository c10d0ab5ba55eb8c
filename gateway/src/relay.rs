//! Carries one request across routers. It opens the request on a router the policy picks and
//! forwards every message, keeping the token ids it sent. When that router dies, drains or
//! stalls mid-stream, it asks another router to resume the request after those ids
//! (`GenerateRequest.resume`): sampling is counter-based and the router replays the
//! detokenizer, stop strings and grammar over the ids, so the rest of the stream is token for
//! token and logprob for logprob what the first router would have sent, and the client sees
//! one stream.

use std::sync::Arc;
use std::time::{Duration, Instant};

use moe_cluster::auth::{ClusterToken, StreamOpening};
use moe_proto::v1::inference_client::InferenceClient;
use moe_proto::v1::{GenerateRequest, GenerateResponse, Resume, Usage};
use tokio::sync::mpsc;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Code, Status};

use crate::metrics::{GatewayMetrics, MigrationReason};
use crate::policy::{Candidate, RouterChooser};
use crate::router_set::{InFlight, RouterEntry, RouterSet};

/// Largest message to or from a router (a long prompt's text).
const MAX_MESSAGE_BYTES: usize = 64 << 20;

pub struct RelaySettings {
    /// `--migration-limit`.
    pub migration_limit: u32,
    /// `--stall-timeout-ms` (`None`: off).
    pub stall_timeout: Option<Duration>,
    /// A stream silent this long when its router fails a health check moves
    /// (`--health-check-timeout-ms`).
    pub hung_after: Duration,
    /// `--recovery-timeout-ms`.
    pub recovery_timeout: Duration,
    /// Proves the cluster token to each router; without it the client's `authorization`
    /// header is passed on.
    pub token: Option<ClusterToken>,
}

pub struct Relay {
    pub routers: Arc<RouterSet>,
    pub chooser: RouterChooser,
    pub settings: RelaySettings,
    pub metrics: Arc<GatewayMetrics>,
}

/// Headers passed on to the routers.
#[derive(Debug, Clone, Default)]
pub struct ForwardHeaders {
    pub authorization: Option<MetadataValue<tonic::metadata::Ascii>>,
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
}

impl ForwardHeaders {
    pub fn from_metadata(metadata: &MetadataMap) -> Self {
        let text = |key| {
            metadata
                .get(key)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        Self {
            authorization: metadata.get("authorization").cloned(),
            traceparent: text("traceparent"),
            tracestate: text("tracestate"),
        }
    }
}

/// One client request and how far it got.
pub struct Journey {
    pub request: GenerateRequest,
    /// The prompt's block hashes (prefix-aware routing).
    pub blocks: Vec<u64>,
    /// The prompt's length in tokens, when the gateway knows it.
    pub prompt_tokens: u32,
    pub forward: ForwardHeaders,
    /// The client's deadline (`grpc-timeout`).
    pub deadline: Option<Instant>,
    /// The request's span: each router's spans are its children, one trace however many
    /// routers served it.
    pub span: tracing::Span,
    /// Token ids sent to the client so far.
    sent_ids: Vec<u32>,
    /// Routers that failed this request (tried again only once no other is left).
    excluded: Vec<String>,
    migrations: u32,
}

impl Journey {
    pub fn new(request: GenerateRequest, forward: ForwardHeaders, span: tracing::Span) -> Self {
        Self {
            request,
            blocks: Vec::new(),
            prompt_tokens: 0,
            forward,
            deadline: None,
            span,
            sent_ids: Vec::new(),
            excluded: Vec::new(),
            migrations: 0,
        }
    }
}

/// How a router's failure is handled.
#[derive(Debug, PartialEq, Eq)]
enum Failure {
    /// Dead, unreachable, draining, not serving yet: another router takes the request.
    RouterGone,
    /// Full (`RESOURCE_EXHAUSTED`): another router may have room.
    Busy,
    /// The request itself was refused (invalid, unauthenticated, past its deadline): the
    /// client gets the router's status as it is.
    Refused,
}

fn failure(status: &Status) -> Failure {
    match status.code() {
        Code::Unavailable | Code::Unknown | Code::Internal | Code::Cancelled | Code::Aborted => {
            Failure::RouterGone
        }
        Code::ResourceExhausted => Failure::Busy,
        _ => Failure::Refused,
    }
}

/// A stream open on a router.
struct Opened {
    router: Arc<RouterEntry>,
    stream: tonic::Streaming<GenerateResponse>,
    _in_flight: InFlight,
}

/// Why a router's stream ended before its answer did.
enum Interrupted {
    Ended,
    Stalled,
    Status(Status),
}

pub type Answers = mpsc::Receiver<Result<GenerateResponse, Status>>;

/// Resolves when `router` fails a health check with nothing heard from it for `after` (since
/// `since`): it is hung, not busy.
fn hung(
    router: &RouterEntry,
    since: Instant,
    after: Duration,
) -> impl std::future::Future<Output = ()> + 'static {
    let counters = Arc::clone(&router.counters);
    async move {
        loop {
            counters.health_failed.notified().await;
            if since.elapsed() >= after {
                return;
            }
        }
    }
}

impl Relay {
    /// Opens `journey` on a router and relays its answers on the returned channel. A request
    /// no router would take fails here, with the router's own status.
    pub async fn start(
        self: &Arc<Self>,
        mut journey: Journey,
    ) -> Result<(String, Answers), Status> {
        let opened = self.open(&mut journey).await?;
        let first = opened.router.id.clone();
        let (tx, rx) = mpsc::channel(16);
        let relay = Arc::clone(self);
        tokio::spawn(async move { relay.follow(journey, opened, tx).await });
        Ok((first, rx))
    }

    /// The routers to try for `journey` now (sorted by id), as policy candidates.
    fn pick(&self, journey: &mut Journey) -> Option<Arc<RouterEntry>> {
        let available = self.routers.available();
        let fresh: Vec<&Arc<RouterEntry>> = available
            .iter()
            .filter(|r| !journey.excluded.contains(&r.id))
            .collect();
        let candidates: Vec<Candidate<'_>> = fresh
            .iter()
            .map(|r| Candidate {
                id: &r.id,
                load: r.load(),
            })
            .collect();
        let i = self.chooser.choose(&candidates, &journey.blocks)?;
        Some(Arc::clone(fresh[i]))
    }

    /// Opens the request (resumed after the ids already sent) on some router, waiting up to
    /// the recovery timeout for one to take it.
    async fn open(&self, journey: &mut Journey) -> Result<Opened, Status> {
        let give_up = Instant::now() + self.settings.recovery_timeout;
        let mut changes = self.routers.changes();
        let mut last: Option<Status> = None;
        loop {
            if journey.deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(Status::deadline_exceeded("the request's deadline passed"));
            }
            let Some(router) = self.pick(journey) else {
                // Every router left has failed this request: a full cluster is the client's
                // answer; otherwise wait for one to come back or register.
                if let Some(status) = last.take_if(|s| failure(s) == Failure::Busy) {
                    return Err(status);
                }
                if Instant::now() >= give_up {
                    let why = last
                        .map(|s| format!(": {}", s.message()))
                        .unwrap_or_default();
                    return Err(Status::unavailable(format!(
                        "no router could take the request within {:?} (--recovery-timeout-ms){why}",
                        self.settings.recovery_timeout
                    )));
                }
                journey.excluded.clear();
                tokio::select! {
                    _ = changes.changed() => {}
                    () = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
                continue;
            };
            // Counted from the choice on, so a burst of requests spreads over the routers
            // instead of all seeing the same loads.
            let in_flight = InFlight::on(&router);
            // A router that hangs never answers the call's headers: once it fails a health
            // check, the request goes elsewhere.
            let called = tokio::select! {
                biased;
                called = self.call(&router, journey) => called,
                () = hung(&router, Instant::now(), self.settings.hung_after) => {
                    Err(Status::unavailable("the router failed its health check"))
                }
            };
            match called {
                Ok(stream) => {
                    journey.span.record("router", router.id.as_str());
                    return Ok(Opened {
                        _in_flight: in_flight,
                        router,
                        stream,
                    });
                }
                Err(status) => {
                    match failure(&status) {
                        Failure::Refused => return Err(status),
                        Failure::RouterGone => self.routers.avoid(&router.id),
                        Failure::Busy => {}
                    }
                    tracing::info!(router_id = router.id, %status, "router did not take the request");
                    journey.excluded.push(router.id.clone());
                    last = Some(status);
                }
            }
        }
    }

    /// One Generate call on `router`: the request, resumed after the ids already sent, with
    /// the cluster proof, the trace context and the remaining deadline.
    async fn call(
        &self,
        router: &RouterEntry,
        journey: &Journey,
    ) -> Result<tonic::Streaming<GenerateResponse>, Status> {
        let mut request = journey.request.clone();
        if !journey.sent_ids.is_empty() {
            request.resume = Some(Resume {
                generated_ids: journey.sent_ids.clone(),
            });
            // Sent with the first message already.
            request.prompt_logprobs = None;
        }
        let mut call = tonic::Request::new(request);
        self.authorize(router, &mut call, &journey.forward);
        let metadata = call.metadata_mut();
        let traceparent = moe_cluster::telemetry::traceparent(&journey.span)
            .or_else(|| journey.forward.traceparent.clone());
        let trace = [
            ("traceparent", traceparent),
            ("tracestate", journey.forward.tracestate.clone()),
        ];
        for (key, value) in trace {
            if let Some(value) = value.and_then(|v| v.parse().ok()) {
                metadata.insert(key, value);
            }
        }
        if let Some(deadline) = journey.deadline {
            call.set_timeout(deadline.saturating_duration_since(Instant::now()));
        }
        let mut client = InferenceClient::new(router.channel.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        Ok(client.generate(call).await?.into_inner())
    }

    /// The router's next message. A stream silent past the stall timeout after its first
    /// token counts as interrupted, and so does one silent for `hung_after` (since
    /// `last_message`, or its opening) when its router fails a health check.
    async fn next(
        &self,
        opened: &mut Opened,
        started: bool,
        last_message: Instant,
    ) -> Result<GenerateResponse, Interrupted> {
        let hung = hung(&opened.router, last_message, self.settings.hung_after);
        let stall = self.settings.stall_timeout.filter(|_| started);
        let message = async {
            match stall {
                Some(limit) => tokio::time::timeout(limit, opened.stream.message())
                    .await
                    .map_err(|_| Interrupted::Stalled),
                None => Ok(opened.stream.message().await),
            }
        };
        let message = tokio::select! {
            biased;
            message = message => message?,
            () = hung => return Err(Interrupted::Stalled),
        };
        match message {
            Ok(Some(message)) => Ok(message),
            Ok(None) => Err(Interrupted::Ended),
            Err(status) => Err(Interrupted::Status(status)),
        }
    }

    /// Relays `opened`'s answers to `tx`, moving the request to another router whenever its
    /// router goes, until the answer ends, fails or the client leaves.
    async fn follow(
        &self,
        mut journey: Journey,
        mut opened: Opened,
        tx: mpsc::Sender<Result<GenerateResponse, Status>>,
    ) {
        let mut moved_at: Option<Instant> = None;
        let mut last_message = Instant::now();
        loop {
            let started = !journey.sent_ids.is_empty();
            let reason = match self.next(&mut opened, started, last_message).await {
                Ok(message) => {
                    last_message = Instant::now();
                    if let Some(at) = moved_at.take() {
                        self.metrics.migrated(at.elapsed());
                    }
                    let finished = !message.finish_reason.is_empty();
                    journey.sent_ids.extend_from_slice(&message.token_ids);
                    // The client left: dropping the stream cancels the request upstream.
                    if tx.send(Ok(message)).await.is_err() || finished {
                        return;
                    }
                    continue;
                }
                Err(Interrupted::Ended) => MigrationReason::Died,
                Err(Interrupted::Stalled) => MigrationReason::Stalled,
                Err(Interrupted::Status(status)) => match failure(&status) {
                    Failure::Refused => {
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                    _ if status.message() == moe_proto::ROUTER_DRAINING => MigrationReason::Drained,
                    _ => MigrationReason::Died,
                },
            };
            let from = opened.router.id.clone();
            opened
                .router
                .counters
                .migrations_from
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.routers.avoid(&from);
            drop(opened);
            journey.excluded.push(from.clone());
            journey.migrations += 1;
            self.metrics.migration_started(reason);
            tracing::warn!(
                parent: &journey.span,
                router_id = from,
                reason = reason.as_str(),
                sent = journey.sent_ids.len(),
                "moving a stream to another router"
            );
            if journey.migrations > self.settings.migration_limit {
                let _ = tx
                    .send(Err(Status::unavailable(format!(
                        "the stream lost its router {} times (--migration-limit {})",
                        journey.migrations, self.settings.migration_limit
                    ))))
                    .await;
                return;
            }
            if journey.sent_ids.len() >= journey.request.max_new_tokens as usize {
                // Every token was sent; only the closing message was lost.
                let _ = tx.send(Ok(self.closing(&journey))).await;
                return;
            }
            moved_at = Some(Instant::now());
            opened = match self.open(&mut journey).await {
                Ok(next) => {
                    last_message = Instant::now();
                    next
                }
                Err(status) => {
                    let _ = tx.send(Err(status)).await;
                    return;
                }
            };
        }
    }

    /// The last message of an answer whose router died after sending its last token.
    fn closing(&self, journey: &Journey) -> GenerateResponse {
        GenerateResponse {
            finish_reason: "length".into(),
            prompt_tokens: journey.prompt_tokens,
            usage: Some(Usage {
                prompt_tokens: journey.prompt_tokens,
                completion_tokens: journey.sent_ids.len() as u32,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// A router for a one-off call (Tokenize, ModelInfo): the least loaded available one.
    pub fn any_router(&self) -> Result<Arc<RouterEntry>, Status> {
        self.routers
            .available()
            .into_iter()
            .min_by_key(|r| (r.load(), r.id.clone()))
            .ok_or_else(|| Status::unavailable("no router is registered"))
    }

    /// The headers a one-off call to `router` carries.
    pub fn authorize<T>(
        &self,
        router: &RouterEntry,
        call: &mut tonic::Request<T>,
        forward: &ForwardHeaders,
    ) {
        match (&self.settings.token, &forward.authorization) {
            (Some(token), _) => StreamOpening::new(token, &router.id).apply(call.metadata_mut()),
            (None, Some(key)) => {
                call.metadata_mut().insert("authorization", key.clone());
            }
            (None, None) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn router_failures_move_the_request_and_refusals_reach_the_client() {
        for code in [
            Code::Unavailable,
            Code::Unknown,
            Code::Internal,
            Code::Cancelled,
        ] {
            assert_eq!(
                failure(&Status::new(code, "x")),
                Failure::RouterGone,
                "{code:?}"
            );
        }
        assert_eq!(failure(&Status::resource_exhausted("full")), Failure::Busy);
        for code in [
            Code::InvalidArgument,
            Code::Unauthenticated,
            Code::PermissionDenied,
            Code::DeadlineExceeded,
            Code::NotFound,
            Code::OutOfRange,
        ] {
            assert_eq!(
                failure(&Status::new(code, "x")),
                Failure::Refused,
                "{code:?}"
            );
        }
    }
}
