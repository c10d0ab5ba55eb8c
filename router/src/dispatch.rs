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
//! Each node is reached over its [`crate::node_link::NodeLink`] stream, or over the epoch's
//! collective ([`crate::layer_exchange`]); retry and fallback are here, in one place.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use moe_cluster::frames::DispatchTag;
use moe_model::experts::ExpertBackend;
use moe_model::routes::ExpertRoutes;
use moe_model::{ModelError, Result};

use crate::cluster_view::{ClusterView, ServingPlacement};
use crate::dispatch_plan::{assign_pairs, settle};
use crate::layer_exchange::{
    with_fallback, CollectiveExchange, Exchanged, GrpcExchange, LayerCall, LayerExchange, NodeReply,
};

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
        let suspect: Vec<bool> = serving
            .links
            .iter()
            .map(|l| self.view.is_suspect(&l.node_id))
            .collect();
        let assignment = assign_pairs(
            &serving.holders,
            &suspect,
            input.layer as u32,
            Some(input.rows),
            self.hidden,
            input.routes,
            pending,
        );
        let call = LayerCall {
            tag: DispatchTag {
                epoch: serving.placement.epoch,
                step: self.step.load(Ordering::Relaxed),
                layer: input.layer as u32,
                micro_batch: input.micro_batch,
            },
            hidden: self.hidden,
            shares: &assignment.shares,
            span: input.span,
        };
        let exchanged = self.exchange(serving, &call);
        let settled = settle(&assignment, &exchanged.replies, self.hidden, pair_out);
        for (node, why) in &settled.failed_nodes {
            self.view.suspect(&serving.links[*node].node_id, why);
        }
        for (node, reply) in exchanged.replies.iter().enumerate() {
            if let NodeReply::StaleEpoch(why) | NodeReply::Failed(why) = reply {
                tracing::warn!(node_id = %serving.links[node].node_id, epoch = call.tag.epoch, layer = input.layer, error = %why, "dispatch failed");
            }
        }
        Attempt {
            failed: settled.retry_pairs,
            slowest_compute: settled.slowest_compute_micros.saturating_mul(1000),
            encoded: exchanged.sent,
            answered: exchanged.answered,
            placed: Instant::now(),
        }
    }

    /// One layer over the epoch's collective when it is live and every share is within its
    /// node's bound, else (and after the collective fails) over the nodes' gRPC streams.
    fn exchange(&self, serving: &ServingPlacement, call: &LayerCall<'_>) -> Exchanged {
        let within_bounds = call
            .shares
            .iter()
            .zip(&serving.links)
            .all(|(share, link)| share.routes.rows() <= link.max_rows);
        let live = serving.live_collective().filter(|_| within_bounds);
        let collective = live.as_ref().map(|c| CollectiveExchange {
            collective: c,
            links: &serving.links,
            timeout: self.collective_timeout,
        });
        let streams = GrpcExchange {
            links: &serving.links,
            runtime: &self.runtime,
            guard: self.recovery_timeout,
        };
        let over = collective.as_ref().map(|c| c as &dyn LayerExchange);
        let fell_back = std::cell::Cell::new(false);
        let exchanged = with_fallback(over, &streams, call, |e| {
            fell_back.set(true);
            // Which node failed is not known here; the gRPC streams will tell (a dead node's
            // stream breaks), and the epoch stays on them until the planner forms a new
            // collective for it (if it still has every node by then).
            let retry = serving.collective.fail(Instant::now());
            self.view
                .collective_failures
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(epoch = serving.placement.epoch, layer = call.tag.layer, error = %e, ?retry, "collective failed; gRPC until it is re-formed");
        });
        if over.is_some() && !fell_back.get() {
            self.view.collective_layers.fetch_add(1, Ordering::Relaxed);
        }
        exchanged
    }
}

impl ExpertBackend for RemoteExperts {
    fn run_experts(&self, layer: usize, rows: &[f32], routes: &ExpertRoutes) -> Result<Vec<f32>> {
        self.run_layer(layer, 0, rows, routes)
    }

    #[cfg(feature = "cuda")]
    fn run_experts_on_device(
        &self,
        layer: usize,
        rows: &moe_model::cudarc::driver::CudaSlice<f32>,
        routes: &ExpertRoutes,
    ) -> Option<Result<moe_model::cudarc::driver::CudaSlice<f32>>> {
        self.run_layer_on_device(layer, 0, rows, routes)
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

    #[cfg(feature = "cuda")]
    fn run_experts_on_device(
        &self,
        layer: usize,
        rows: &moe_model::cudarc::driver::CudaSlice<f32>,
        routes: &ExpertRoutes,
    ) -> Option<Result<moe_model::cudarc::driver::CudaSlice<f32>>> {
        self.experts
            .run_layer_on_device(layer, self.micro_batch, rows, routes)
    }
}

impl RemoteExperts {
    /// The span of one MoE layer, under the step's (disabled when the step is not traced).
    fn layer_span(&self, layer: usize, micro_batch: u32, routes: &ExpertRoutes) -> tracing::Span {
        let step_span = self.step_span();
        if step_span.is_none() {
            return tracing::Span::none();
        }
        tracing::info_span!(
            target: "moe_router",
            parent: &step_span,
            "moe_layer",
            layer = layer as u64,
            micro_batch = micro_batch as u64,
            tokens = routes.rows() as u64,
            pairs = routes.pairs() as u64,
            retries = tracing::field::Empty,
            device_resident = tracing::field::Empty,
        )
    }

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
        let layer_span = self.layer_span(layer, micro_batch, routes);
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

#[cfg(feature = "cuda")]
impl RemoteExperts {
    /// One MoE layer on rows in the dense part's GPU memory, over the epoch's NCCL
    /// communicator on the same GPU: each node's rows gathered there, sent from there, the
    /// outputs placed in pair order there. `None` (the caller then goes through host memory,
    /// where [`Self::run_layer`] retries and falls back node by node) when no such
    /// communicator is live, a pair has no node, a share is over its node's bound, or the
    /// exchange fails (the collective is then retired, as on the host path).
    fn run_layer_on_device(
        &self,
        layer: usize,
        micro_batch: u32,
        rows: &moe_model::cudarc::driver::CudaSlice<f32>,
        routes: &ExpertRoutes,
    ) -> Option<Result<moe_model::cudarc::driver::CudaSlice<f32>>> {
        let serving = self.view.serving()?;
        let live = serving.live_collective()?;
        let suspect: Vec<bool> = serving
            .links
            .iter()
            .map(|l| self.view.is_suspect(&l.node_id))
            .collect();
        let max_rows: Vec<usize> = serving.links.iter().map(|l| l.max_rows).collect();
        let rows_on_wire: Vec<moe_cluster::collective::RowEncoding> =
            serving.links.iter().map(|l| l.rows_on_wire).collect();
        let shares = crate::dispatch_plan::in_place_shares(
            &serving.holders,
            &suspect,
            &max_rows,
            layer as u32,
            self.hidden,
            routes,
        )?;
        let started = Instant::now();
        let span = self.layer_span(layer, micro_batch, routes);
        span.record("device_resident", true);
        // The nodes' spans of this layer are its children, as over the host path.
        let traceparent = moe_cluster::telemetry::traceparent(&span);
        let placed = {
            let _in_span = span.enter();
            let mut link = live.lock().ok()?;
            link.dispatch_layer_on_device(
                layer as u32,
                rows,
                &shares,
                &rows_on_wire,
                routes.pairs(),
                self.hidden,
                self.collective_timeout,
                traceparent.as_deref(),
            )?
        };
        match placed {
            Ok(placed) => {
                let mut per_expert: BTreeMap<u32, u64> = BTreeMap::new();
                for &expert in &routes.experts {
                    *per_expert.entry(expert).or_default() += 1;
                }
                for (expert, tokens) in per_expert {
                    self.view.count_tokens((layer as u32, expert), tokens);
                }
                for (node, share) in serving.links.iter().zip(&shares) {
                    if share.rows.is_empty() {
                        continue;
                    }
                    let h = self.hidden as u64;
                    let elem_bytes = node.rows_on_wire.elem_bytes() as u64;
                    node.bytes_sent
                        .fetch_add(elem_bytes * h * share.rows.len() as u64, Ordering::Relaxed);
                    node.bytes_received
                        .fetch_add(4 * h * share.pairs.len() as u64, Ordering::Relaxed);
                    node.rows_sent
                        .fetch_add(share.rows.len() as u64, Ordering::Relaxed);
                    node.count_pairs(layer as u32, share.pairs.len() as u64);
                }
                let times = &self.view.layer_times;
                let waited = started.elapsed().as_nanos() as u64;
                times.wait_nanos.fetch_add(waited, Ordering::Relaxed);
                times.compute_nanos.fetch_add(
                    placed.slowest_compute_micros.saturating_mul(1000),
                    Ordering::Relaxed,
                );
                times.calls.fetch_add(1, Ordering::Relaxed);
                self.view.collective_layers.fetch_add(1, Ordering::Relaxed);
                self.view
                    .device_resident_layers
                    .fetch_add(1, Ordering::Relaxed);
                Some(Ok(placed.pair_out))
            }
            Err(e) => {
                let retry = serving.collective.fail(Instant::now());
                self.view
                    .collective_failures
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(epoch = serving.placement.epoch, layer, error = %e, ?retry, "device-resident collective failed; the layer goes through host memory and gRPC");
                None
            }
        }
    }
}
