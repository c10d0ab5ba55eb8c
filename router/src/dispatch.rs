//! Dispatch and combine over the data plane: the router's [`ExpertBackend`].
//!
//! For one MoE layer, each token goes once to each node that holds any of its chosen experts,
//! with the CSR list of those experts; the nodes answer one weighted row per pair, and the rows
//! are put back in the layer's global pair order, so the dense model combines them exactly as
//! the offline engine does (ascending expert id, then shared experts).
//!
//! When a node fails mid-layer (stream broken, timeout, bad answer) it is reported suspect, the
//! planner makes an epoch without it, and only the pairs that node had are sent again under the
//! new epoch. Expert math is batch-invariant, so the layer's output is the same bit for bit
//! whichever node computed each pair. [`crate::dispatch_plan`] decides which node computes
//! each pair and cuts a node's share to the batch bound it publishes; a node that does not
//! serve the epoch refuses in-band (a typed STALE_EPOCH), which is not a failure of the node.
//!
//! With a cluster token, each stream opens with a proof of the token bound to the node it is
//! meant for, and the node must answer with its own proof before any row is sent to it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use moe_cluster::collective::exchange::{NodeAnswer, NodeShare};
use moe_cluster::collective::EpochLink;
use moe_cluster::frames::{self, CombineFailure, DispatchTag};
use moe_model::experts::ExpertBackend;
use moe_model::routes::ExpertRoutes;
use moe_model::{ModelError, Result};
use moe_proto::v1::expert_data_client::ExpertDataClient;
use moe_proto::v1::{CombineBatch, DispatchBatch};
use tokio::sync::{mpsc, oneshot};

use crate::cluster_view::{ClusterView, ServingPlacement};
use crate::dispatch_plan::{assign_pairs, split_share, LayerAssignment};

/// The answers to a request's batches, in order, or why the link failed.
type Reply = oneshot::Sender<std::result::Result<Vec<CombineBatch>, String>>;

/// How the router reaches expert nodes.
#[derive(Clone, Debug)]
pub struct LinkSettings {
    /// Largest dispatch sent and combine accepted (from the batch bound and the model).
    pub max_dispatch_bytes: usize,
    pub max_combine_bytes: usize,
    /// A round trip (or connecting) longer than this fails and the stream is reopened.
    pub timeout: Duration,
    /// Mutual TLS with the cluster CA; `None` for a plaintext data plane.
    pub tls: Option<tonic::transport::ClientTlsConfig>,
    /// The cluster token: streams prove it, and nodes must prove it back.
    pub token: Option<moe_cluster::auth::ClusterToken>,
}

/// One long-lived `Exchange` stream to a node, owned by a task; requests are answered in order.
pub struct NodeLink {
    pub node_id: String,
    pub address: String,
    /// Most rows the node accepts in one dispatch (its `--max-batch-rows`).
    pub max_rows: usize,
    requests: mpsc::Sender<(Vec<DispatchBatch>, Reply)>,
    /// Bytes sent and received, for status and metrics.
    pub bytes_sent: AtomicU64,
    pub bytes_received: AtomicU64,
    pub rows_sent: AtomicU64,
    pub pairs_sent: AtomicU64,
    /// Dispatch-to-combine time of each round trip.
    pub round_trip: moe_cluster::metrics::Histogram,
    /// Pairs sent per MoE layer (for the per-layer imbalance), updated once per dispatch.
    pairs_per_layer: std::sync::Mutex<BTreeMap<u32, u64>>,
}

impl NodeLink {
    /// A link whose round trips fail after `timeout` (the stream is then reopened), so a hung
    /// node costs one timeout, never a hung step.
    pub fn connect(
        node_id: String,
        address: String,
        max_rows: usize,
        settings: &LinkSettings,
    ) -> Arc<Self> {
        let (tx, rx) = mpsc::channel(16);
        let link = Arc::new(Self {
            node_id: node_id.clone(),
            address: address.clone(),
            max_rows: max_rows.max(1),
            requests: tx,
            bytes_sent: AtomicU64::new(0),
            bytes_received: AtomicU64::new(0),
            rows_sent: AtomicU64::new(0),
            pairs_sent: AtomicU64::new(0),
            pairs_per_layer: Default::default(),
            round_trip: moe_cluster::metrics::Histogram::new(moe_cluster::metrics::LATENCY_BUCKETS),
        });
        let weak = Arc::downgrade(&link);
        tokio::spawn(run_link(node_id, address, rx, settings.clone(), weak));
        link
    }
}

impl NodeLink {
    pub fn pairs_by_layer(&self) -> BTreeMap<u32, u64> {
        self.pairs_per_layer
            .lock()
            .map(|m| m.clone())
            .unwrap_or_default()
    }

    fn count_pairs(&self, layer: u32, pairs: u64) {
        self.pairs_sent.fetch_add(pairs, Ordering::Relaxed);
        if let Ok(mut m) = self.pairs_per_layer.lock() {
            *m.entry(layer).or_default() += pairs;
        }
    }
}

/// One stream for the node, opened on first use and again after any failure. Each request
/// is a node's share for a layer, cut to its batch bound: its batches go one at a time, each
/// answered before the next is sent.
async fn run_link(
    node_id: String,
    address: String,
    mut requests: mpsc::Receiver<(Vec<DispatchBatch>, Reply)>,
    settings: LinkSettings,
    link: std::sync::Weak<NodeLink>,
) {
    let scheme = if settings.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let uri = format!("{scheme}://{address}");
    let mut stream: Option<(mpsc::Sender<DispatchBatch>, tonic::Streaming<CombineBatch>)> = None;
    while let Some((batches, reply)) = requests.recv().await {
        let mut answers = Vec::with_capacity(batches.len());
        let mut failure = None;
        for batch in batches {
            match round_trip(&mut stream, batch, &uri, &node_id, &address, &settings).await {
                Ok(combine) => {
                    if let Some(link) = link.upgrade() {
                        link.round_trip.observe(combine.1.as_secs_f64());
                    }
                    answers.push(combine.0);
                }
                Err(e) => {
                    // The stream is dropped: a fresh one keeps later answers in order.
                    stream = None;
                    failure = Some(e);
                    break;
                }
            }
        }
        let _ = reply.send(match failure {
            Some(e) => Err(e),
            None => Ok(answers),
        });
    }
}

type LinkStream = (mpsc::Sender<DispatchBatch>, tonic::Streaming<CombineBatch>);

/// One batch and its answer on `stream` (opened first if there is none), with its time.
async fn round_trip(
    stream: &mut Option<LinkStream>,
    batch: DispatchBatch,
    uri: &str,
    node_id: &str,
    address: &str,
    settings: &LinkSettings,
) -> std::result::Result<(CombineBatch, Duration), String> {
    let timeout = settings.timeout;
    if stream.is_none() {
        match tokio::time::timeout(timeout, open(uri, node_id, settings)).await {
            Ok(Ok(s)) => *stream = Some(s),
            Err(_) => return Err(format!("cannot reach {address} within {timeout:?}")),
            Ok(Err(e)) => return Err(format!("cannot reach {address}: {e}")),
        }
    }
    let Some((out, inbound)) = stream.as_mut() else {
        return Err(format!("no stream to {address}"));
    };
    let sent_at = Instant::now();
    if out.send(batch).await.is_err() {
        return Err(format!("stream to {address} closed"));
    }
    match tokio::time::timeout(timeout, inbound.message()).await {
        Ok(Ok(Some(combine))) => Ok((combine, sent_at.elapsed())),
        Ok(Ok(None)) => Err(format!("{address} closed the stream")),
        Ok(Err(status)) => Err(format!("{address}: {status}")),
        Err(_) => Err(format!("{address}: no answer within {timeout:?}")),
    }
}

async fn open(
    uri: &str,
    node_id: &str,
    settings: &LinkSettings,
) -> std::result::Result<(mpsc::Sender<DispatchBatch>, tonic::Streaming<CombineBatch>), String> {
    let mut endpoint = tonic::transport::Endpoint::from_shared(uri.to_string())
        .map_err(|e| e.to_string())?
        .tcp_nodelay(true);
    if let Some(tls) = &settings.tls {
        endpoint = endpoint
            .tls_config(tls.clone())
            .map_err(|e| e.to_string())?;
    }
    let channel = endpoint.connect().await.map_err(|e| e.to_string())?;
    let mut client = ExpertDataClient::new(channel)
        .max_decoding_message_size(settings.max_combine_bytes)
        .max_encoding_message_size(settings.max_dispatch_bytes);
    let (tx, rx) = mpsc::channel(4);
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    let opening = settings
        .token
        .as_ref()
        .map(|token| moe_cluster::auth::StreamOpening::new(token, node_id));
    if let Some(opening) = &opening {
        opening.apply(request.metadata_mut());
    }
    let response = client.exchange(request).await.map_err(|s| s.to_string())?;
    // No row goes to a process that cannot prove the token, whatever it registered as.
    if let (Some(opening), Some(token)) = (&opening, &settings.token) {
        opening
            .check_answer(token, response.metadata())
            .map_err(|e| format!("{node_id} did not prove cluster membership: {e}"))?;
    }
    Ok((tx, response.into_inner()))
}

/// The routed experts, reached through the expert nodes of the serving placement.
pub struct RemoteExperts {
    pub view: Arc<ClusterView>,
    pub runtime: tokio::runtime::Handle,
    pub hidden: usize,
    /// How long one layer may wait for a placement that works before failing the step.
    pub recovery_timeout: Duration,
    /// Bound on each step of a layer's exchange over an epoch's collective.
    pub collective_timeout: Duration,
    step: AtomicU64,
    /// The current step's span; MoE layers run on the math threads, so it is passed, not
    /// inherited.
    step_span: std::sync::Mutex<tracing::Span>,
}

impl RemoteExperts {
    pub fn new(
        view: Arc<ClusterView>,
        runtime: tokio::runtime::Handle,
        hidden: usize,
        recovery_timeout: Duration,
        collective_timeout: Duration,
    ) -> Self {
        Self {
            view,
            runtime,
            hidden,
            recovery_timeout,
            collective_timeout,
            step: AtomicU64::new(0),
            step_span: std::sync::Mutex::new(tracing::Span::none()),
        }
    }

    /// Called once per model step, so dispatches carry the step number; `span` is the step's
    /// (disabled when the step is not traced).
    pub fn next_step(&self, span: tracing::Span) {
        self.step.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut current) = self.step_span.lock() {
            *current = span;
        }
    }

    /// The step's forward is done: its span may close.
    pub fn end_step(&self) {
        if let Ok(mut current) = self.step_span.lock() {
            *current = tracing::Span::none();
        }
    }

    fn step_span(&self) -> tracing::Span {
        self.step_span
            .lock()
            .map(|s| s.clone())
            .unwrap_or_else(|_| tracing::Span::none())
    }

    /// The serving placement, newer than `after` when given; waits for it until `deadline`.
    fn wait_serving(&self, after: Option<u64>, deadline: Instant) -> Result<Arc<ServingPlacement>> {
        loop {
            if let Some(s) = self.view.serving() {
                if after.is_none_or(|e| s.placement.epoch > e) {
                    return Ok(s);
                }
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(ModelError::ExpertBackend(match after {
                    Some(e) => format!(
                        "no placement replaced epoch {e} within {:?}",
                        self.recovery_timeout
                    ),
                    None => "no placement is ready yet".into(),
                }));
            }
            let wait = (deadline - now).min(Duration::from_millis(20));
            let changed = &self.view.epoch_changed;
            self.runtime.block_on(async {
                let _ = tokio::time::timeout(wait, changed.notified()).await;
            });
        }
    }
}

/// One MoE layer's tokens, their routes and the layer's span.
struct LayerInput<'a> {
    layer: usize,
    /// Which of the step's micro-batches these tokens are (0 when it is not split).
    micro_batch: u32,
    rows: &'a [f32],
    routes: &'a ExpertRoutes,
    span: &'a tracing::Span,
}

/// What one dispatch round left undone.
struct Attempt {
    /// Global pair indices whose node failed (to send again under a newer epoch).
    failed: Vec<usize>,
    /// The slowest node's own expert compute, in nanoseconds.
    slowest_compute: u64,
    encoded: Instant,
    answered: Instant,
    placed: Instant,
}

impl RemoteExperts {
    /// Sends the `pending` pairs of a layer to the nodes of `serving`, writes the answers into
    /// `pair_out`, and returns the pairs whose node failed.
    fn dispatch_once(
        &self,
        serving: &ServingPlacement,
        input: &LayerInput<'_>,
        pending: &[bool],
        pair_out: &mut [f32],
    ) -> Attempt {
        let &LayerInput {
            layer,
            micro_batch,
            rows,
            routes,
            span: layer_span,
        } = input;
        let hidden = self.hidden;
        let suspect: Vec<bool> = serving
            .links
            .iter()
            .map(|l| self.view.is_suspect(&l.node_id))
            .collect();
        let LayerAssignment {
            shares,
            global_pairs,
            unplaced: mut failed,
        } = assign_pairs(
            &serving.holders,
            &suspect,
            layer as u32,
            rows,
            hidden,
            routes,
            pending,
        );
        let place = |pair_out: &mut [f32], node: usize, outputs: &[f32]| {
            for (i, &p) in global_pairs[node].iter().enumerate() {
                pair_out[p * hidden..(p + 1) * hidden]
                    .copy_from_slice(&outputs[i * hidden..(i + 1) * hidden]);
            }
        };
        // The collective carries a layer only when every share is within its node's bound.
        let within_bounds = shares
            .iter()
            .zip(&serving.links)
            .all(|(share, link)| share.routes.rows() <= link.max_rows);
        if let Some(collective) = serving.live_collective().filter(|_| within_bounds) {
            let started = Instant::now();
            match self.exchange_collective(serving, &collective, layer, &shares, layer_span) {
                Ok(answers) => {
                    let answered = Instant::now();
                    let mut slowest_compute = 0;
                    for (node, answer) in answers.iter().enumerate() {
                        slowest_compute =
                            slowest_compute.max(answer.compute_micros.saturating_mul(1000));
                        place(pair_out, node, &answer.outputs);
                    }
                    return Attempt {
                        failed,
                        slowest_compute,
                        encoded: started,
                        answered,
                        placed: Instant::now(),
                    };
                }
                Err(e) => {
                    // Which node failed is not known here; the gRPC streams will tell (a dead
                    // node's stream breaks), so this attempt goes over them, and so does the
                    // epoch until the planner forms a new collective for it (if it still has
                    // every node by then).
                    drop(collective);
                    let retry = serving.collective.fail(Instant::now());
                    self.view
                        .collective_failures
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(epoch = serving.placement.epoch, layer, error = %e, ?retry, "collective failed; gRPC until it is re-formed");
                }
            }
        }
        let tag = DispatchTag {
            epoch: serving.placement.epoch,
            step: self.step.load(Ordering::Relaxed),
            layer: layer as u32,
            micro_batch,
        };
        let mut waits = Vec::new();
        let mut node_spans: Vec<tracing::Span> = vec![tracing::Span::none(); shares.len()];
        for (node, share) in shares.iter().enumerate() {
            if share.routes.rows() == 0 {
                continue;
            }
            let link = Arc::clone(&serving.links[node]);
            let mut traceparent = String::new();
            if !layer_span.is_none() {
                let span = tracing::info_span!(
                    target: "moe_router",
                    parent: layer_span,
                    "dispatch",
                    otel.kind = "client",
                    otel.status_code = tracing::field::Empty,
                    node_compute_us = tracing::field::Empty,
                    node_id = %link.node_id,
                    epoch = tag.epoch,
                    rows = share.routes.rows() as u64,
                    pairs = share.routes.pairs() as u64,
                );
                traceparent = moe_cluster::telemetry::traceparent(&span).unwrap_or_default();
                node_spans[node] = span;
            }
            // Within the node's bound: one batch, or several in order on the same stream.
            let batches: Vec<(DispatchBatch, usize)> = split_share(share, hidden, link.max_rows)
                .iter()
                .map(|piece| {
                    let mut batch =
                        frames::encode_dispatch(tag, hidden, &piece.rows, &piece.routes);
                    batch.traceparent = traceparent.clone();
                    (batch, piece.routes.pairs())
                })
                .collect();
            let bytes: usize = batches
                .iter()
                .map(|(b, _)| {
                    b.hidden_states.len()
                        + b.pair_offsets.len()
                        + b.pair_experts.len()
                        + b.pair_weights.len()
                })
                .sum();
            link.bytes_sent.fetch_add(bytes as u64, Ordering::Relaxed);
            link.rows_sent
                .fetch_add(share.routes.rows() as u64, Ordering::Relaxed);
            link.count_pairs(layer as u32, share.routes.pairs() as u64);
            let (batches, pairs): (Vec<DispatchBatch>, Vec<usize>) = batches.into_iter().unzip();
            let (tx, rx) = oneshot::channel();
            match link.requests.try_send((batches, tx)) {
                Ok(()) => waits.push((node, rx, pairs)),
                Err(e) => {
                    self.view
                        .suspect(&link.node_id, &format!("link not accepting: {e}"));
                    failed.extend_from_slice(&global_pairs[node]);
                }
            }
        }
        let encoded = Instant::now();
        // The link bounds each round trip; this outer bound only guards a vanished link task.
        let guard = self.recovery_timeout;
        let replies = self.runtime.block_on(async move {
            let mut replies = Vec::with_capacity(waits.len());
            for (node, rx, pairs) in waits {
                let reply = match tokio::time::timeout(guard, rx).await {
                    Ok(Ok(r)) => r,
                    Ok(Err(_)) => Err("link task ended".to_string()),
                    Err(_) => Err(format!("no answer within {guard:?}")),
                };
                replies.push((node, reply, pairs));
            }
            replies
        });
        let answered = Instant::now();
        let mut slowest_compute = 0u64;
        for (node, reply, pairs) in replies {
            let link = &serving.links[node];
            let mut outputs = Vec::with_capacity(global_pairs[node].len() * hidden);
            let mut compute = 0u64;
            // (whether the node only refused a stale epoch, why)
            let mut outcome: std::result::Result<(), (bool, String)> = Ok(());
            match reply {
                Err(e) => outcome = Err((false, e)),
                Ok(combines) => {
                    for (combine, &pairs) in combines.iter().zip(&pairs) {
                        link.bytes_received
                            .fetch_add(combine.outputs.len() as u64, Ordering::Relaxed);
                        compute = compute.saturating_add(combine.compute_micros);
                        match frames::decode_combine(combine, tag, pairs, hidden) {
                            Ok(values) => outputs.extend_from_slice(&values),
                            Err(e) => {
                                let stale = matches!(e, CombineFailure::StaleEpoch(_));
                                outcome = Err((stale, e.to_string()));
                                break;
                            }
                        }
                    }
                    if outcome.is_ok() && combines.len() != pairs.len() {
                        outcome = Err((false, "fewer answers than batches".into()));
                    }
                }
            }
            slowest_compute = slowest_compute.max(compute.saturating_mul(1000));
            node_spans[node].record("node_compute_us", compute);
            match outcome {
                Ok(()) => place(pair_out, node, &outputs),
                Err((stale, e)) => {
                    node_spans[node].record("otel.status_code", "ERROR");
                    // A node that no longer serves this epoch is not broken: this router is
                    // behind and will find the newer epoch. Anything else is a failed node.
                    if !stale {
                        self.view.suspect(&link.node_id, &e);
                    }
                    tracing::warn!(node_id = %link.node_id, epoch = tag.epoch, layer, error = %e, "dispatch failed");
                    failed.extend_from_slice(&global_pairs[node]);
                }
            }
        }
        Attempt {
            failed,
            slowest_compute,
            encoded,
            answered,
            placed: Instant::now(),
        }
    }
}

impl RemoteExperts {
    /// One layer over the epoch's collective: every node gets its header, the busy ones
    /// their rows; returns each node's outputs in `serving.links` order.
    fn exchange_collective(
        &self,
        serving: &ServingPlacement,
        collective: &std::sync::Mutex<EpochLink>,
        layer: usize,
        shares: &[NodeShare],
        layer_span: &tracing::Span,
    ) -> std::result::Result<Vec<NodeAnswer>, String> {
        let span = if layer_span.is_none() {
            tracing::Span::none()
        } else {
            tracing::info_span!(
                target: "moe_router",
                parent: layer_span,
                "collective_exchange",
                otel.kind = "client",
                otel.status_code = tracing::field::Empty,
                transport = tracing::field::Empty,
                epoch = serving.placement.epoch,
                nodes = shares.len() as u64,
                busy_nodes = shares.iter().filter(|s| s.routes.rows() > 0).count() as u64,
            )
        };
        let _in_span = span.enter();
        let mut link = collective
            .lock()
            .map_err(|_| "collective lock poisoned".to_string())?;
        span.record("transport", link.transport().as_str());
        let traceparent = moe_cluster::telemetry::traceparent(&span);
        let outputs = link
            .dispatch_layer(
                layer as u32,
                shares,
                self.hidden,
                self.collective_timeout,
                traceparent.as_deref(),
            )
            .map_err(|e| {
                span.record("otel.status_code", "ERROR");
                e.to_string()
            })?;
        drop(link);
        self.view.collective_layers.fetch_add(1, Ordering::Relaxed);
        for ((node, share), answer) in serving.links.iter().zip(shares).zip(&outputs) {
            if share.routes.rows() == 0 {
                continue;
            }
            node.bytes_sent
                .fetch_add(4 * share.rows.len() as u64, Ordering::Relaxed);
            node.bytes_received
                .fetch_add(4 * answer.outputs.len() as u64, Ordering::Relaxed);
            node.rows_sent
                .fetch_add(share.routes.rows() as u64, Ordering::Relaxed);
            node.count_pairs(layer as u32, share.routes.pairs() as u64);
        }
        Ok(outputs)
    }
}

impl ExpertBackend for RemoteExperts {
    fn run_experts(&self, layer: usize, rows: &[f32], routes: &ExpertRoutes) -> Result<Vec<f32>> {
        self.run_layer(layer, 0, rows, routes)
    }
}

/// One micro-batch's view of [`RemoteExperts`]: its dispatches carry its number, so the
/// nodes' answers and the traces tell the step's micro-batches apart.
pub struct MicroBatchExperts<'a> {
    experts: &'a RemoteExperts,
    micro_batch: u32,
}

impl ExpertBackend for MicroBatchExperts<'_> {
    fn run_experts(&self, layer: usize, rows: &[f32], routes: &ExpertRoutes) -> Result<Vec<f32>> {
        self.experts
            .run_layer(layer, self.micro_batch, rows, routes)
    }
}

impl RemoteExperts {
    pub fn micro_batch(&self, micro_batch: u32) -> MicroBatchExperts<'_> {
        MicroBatchExperts {
            experts: self,
            micro_batch,
        }
    }

    /// One MoE layer of one micro-batch: dispatched under the serving epoch, the pairs of a
    /// failed node sent again under the next one until `recovery_timeout`.
    fn run_layer(
        &self,
        layer: usize,
        micro_batch: u32,
        rows: &[f32],
        routes: &ExpertRoutes,
    ) -> Result<Vec<f32>> {
        let hidden = self.hidden;
        let started = Instant::now();
        let deadline = started + self.recovery_timeout;
        let mut per_expert: BTreeMap<u32, u64> = BTreeMap::new();
        for &expert in &routes.experts {
            *per_expert.entry(expert).or_default() += 1;
        }
        for (expert, tokens) in per_expert {
            self.view.count_tokens((layer as u32, expert), tokens);
        }
        let step_span = self.step_span();
        let layer_span = if step_span.is_none() {
            tracing::Span::none()
        } else {
            tracing::info_span!(
                target: "moe_router",
                parent: &step_span,
                "moe_layer",
                layer = layer as u64,
                micro_batch = micro_batch as u64,
                tokens = routes.rows() as u64,
                pairs = routes.pairs() as u64,
                retries = tracing::field::Empty,
            )
        };
        let mut retries = 0u64;
        let mut pair_out = vec![0.0f32; routes.pairs() * hidden];
        let mut pending = vec![true; routes.pairs()];
        let mut failed_epoch: Option<u64> = None;
        let times = &self.view.layer_times;
        let nanos = |a: Instant, b: Instant| b.duration_since(a).as_nanos() as u64;
        loop {
            let serving = self.wait_serving(failed_epoch, deadline)?;
            let attempt_start = Instant::now();
            let input = LayerInput {
                layer,
                micro_batch,
                rows,
                routes,
                span: &layer_span,
            };
            let attempt = self.dispatch_once(&serving, &input, &pending, &mut pair_out);
            times
                .encode_nanos
                .fetch_add(nanos(attempt_start, attempt.encoded), Ordering::Relaxed);
            times
                .wait_nanos
                .fetch_add(nanos(attempt.encoded, attempt.answered), Ordering::Relaxed);
            times
                .compute_nanos
                .fetch_add(attempt.slowest_compute, Ordering::Relaxed);
            times
                .combine_nanos
                .fetch_add(nanos(attempt.answered, attempt.placed), Ordering::Relaxed);
            if attempt.failed.is_empty() {
                break;
            }
            pending.iter_mut().for_each(|p| *p = false);
            for &p in &attempt.failed {
                pending[p] = true;
            }
            let epoch = serving.placement.epoch;
            tracing::warn!(
                layer,
                epoch,
                pairs = attempt.failed.len(),
                "layer interrupted; re-dispatching the failed pairs on the next epoch"
            );
            self.view.layer_retries.fetch_add(1, Ordering::Relaxed);
            retries += 1;
            layer_span.record("retries", retries);
            failed_epoch = Some(epoch);
        }
        times.calls.fetch_add(1, Ordering::Relaxed);
        Ok(pair_out)
    }
}
