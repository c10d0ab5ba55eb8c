//! Joins the routers' collective communicators for the epochs this node serves: for each
//! `collective/<epoch>/<router>` record in etcd that names this node, one thread joins (TCP or
//! NCCL) and answers that router's MoE layers until the epoch is released here, the node
//! stops, or the router goes away (its side closes or aborts). The gRPC stream keeps serving
//! meanwhile, so a router can fall back to it at any time.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use moe_cluster::auth::ClusterToken;
use moe_cluster::collective::exchange::{ExchangeError, LayerHeader, Served};
use moe_cluster::collective::CommError;
use moe_cluster::collective::{
    join_member, CollectiveRecord, FrameBounds, MemberSettings, Transport,
};
use moe_cluster::discovery::{Discovery, Topic};
use moe_cluster::dispatch_rules::DispatchRules;
use moe_cluster::shutdown::Shutdown;
use moe_model::experts::ExpertDevice;

use crate::batch::NodeBatch;
use crate::metrics::NodeMetrics;
use crate::served::ServedExperts;

pub struct MemberContext {
    /// Where the routers' collective records are read.
    pub discovery: Discovery,
    pub node_id: String,
    pub served: Arc<ServedExperts>,
    pub device: ExpertDevice,
    /// What a layer may bring (batch bound, top-k, MoE layers), as on the gRPC stream; with
    /// the hidden size they also bound the frames the router may send.
    pub rules: Arc<DispatchRules>,
    /// Proved to the router's rank 0, which proves it back; `None` checks the nonce only.
    pub token: Option<ClusterToken>,
    pub metrics: Arc<NodeMetrics>,
    pub poll: Duration,
    /// Set when the node leaves: every serving thread stops waiting.
    pub shutdown: Shutdown,
}

pub async fn follow_collectives(ctx: MemberContext) {
    let ctx = Arc::new(ctx);
    let changes = ctx.discovery.watch(&[Topic::Collectives]);
    // Records already acted on (joined, or not for this node), by key, with the value seen.
    let mut handled: HashMap<String, Vec<u8>> = HashMap::new();
    while !ctx.shutdown.is_shutdown() {
        match ctx.discovery.collective_records().await {
            Ok(records) => {
                for (key, value) in &records {
                    if handled.get(key) == Some(value) {
                        continue;
                    }
                    if consider(&ctx, key, value) {
                        handled.insert(key.clone(), value.clone());
                    }
                }
                handled.retain(|k, _| records.contains_key(k));
            }
            Err(e) => tracing::debug!(error = %e, "listing collective records failed"),
        }
        let mut shutdown = ctx.shutdown.clone();
        tokio::select! {
            _ = tokio::time::sleep(ctx.poll) => {}
            _ = changes.changed() => {}
            _ = shutdown.wait() => {}
        }
    }
}

/// Acts on one record; false when it should be looked at again (its epoch is not loaded yet).
fn consider(ctx: &Arc<MemberContext>, key: &str, value: &[u8]) -> bool {
    let record = match CollectiveRecord::decode(value) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(%key, error = %e, "ignoring a malformed collective record");
            return true;
        }
    };
    if record.rank_of(&ctx.node_id).is_none() {
        return true;
    }
    if ctx.served.for_epoch(record.epoch).is_none() {
        // The router switched to an epoch this node has not installed yet (or released).
        return record.epoch < ctx.served.epochs().first().copied().unwrap_or(0);
    }
    let ctx = Arc::clone(ctx);
    let key = key.to_string();
    let spawned = std::thread::Builder::new()
        .name(format!("collective-{}", record.epoch))
        .spawn(move || serve_collective(&ctx, &key, &record));
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start a collective thread");
    }
    true
}

/// Joins and answers layers until the epoch ends here or the communicator fails.
fn serve_collective(ctx: &MemberContext, key: &str, record: &CollectiveRecord) {
    let epoch = record.epoch;
    let timeout = record.timeout();
    #[cfg(feature = "cuda")]
    let gpu = match &ctx.device {
        ExpertDevice::Gpu(gpu) => gpu.stream().context().new_stream().ok(),
        ExpertDevice::Cpu => None,
    };
    #[cfg(not(feature = "cuda"))]
    let gpu = {
        let _ = &ctx.device;
        None
    };
    let settings = MemberSettings {
        token: ctx.token.clone(),
        max_frame_bytes: FrameBounds::new(
            ctx.rules.max_rows(),
            ctx.rules.hidden(),
            ctx.rules.top_k(),
        )
        .to_node,
    };
    let joined = join_member(record, &ctx.node_id, &settings, gpu, timeout);
    let mut link = match joined {
        Ok(link) => link,
        Err(e) => {
            tracing::warn!(%key, epoch, error = %e, "could not join the router's collective");
            return;
        }
    };
    tracing::info!(%key, epoch, transport = %link.transport(), "joined the router's collective");
    let served = &ctx.served;
    let live = || !ctx.shutdown.is_shutdown() && served.for_epoch(epoch).is_some();
    let transport = link.transport();
    let batch_span = |header: &LayerHeader| batch_span(header, epoch, transport);
    let mut layers = 0u64;
    while let Some(experts) = served.for_epoch(epoch) {
        let batch = NodeBatch {
            experts: &experts,
            metrics: &ctx.metrics,
            collective: true,
        };
        match link.serve_layer(&batch, &ctx.rules, live, batch_span, timeout) {
            Ok(Served::Idle { .. } | Served::Ran { .. }) => layers += 1,
            Err(ExchangeError::Stopped) => {
                tracing::info!(epoch, layers, "epoch released here: left the collective");
                return;
            }
            Err(ExchangeError::Comm(CommError::FrameTooLarge { len, max, .. })) => {
                // Cut off before the payload was read: a broken or hostile rank 0.
                ctx.metrics.invalid("message_size");
                tracing::warn!(
                    epoch,
                    layers,
                    len,
                    max,
                    "the router's rank announced a frame over the bound; left the collective"
                );
                return;
            }
            Err(ExchangeError::Refused(violation)) => {
                // A layer that breaks the rules: the node leaves this collective (the router
                // falls back to gRPC) and keeps serving everything else.
                ctx.metrics.invalid(violation.reason());
                tracing::warn!(epoch, layers, %violation, "refused a collective layer that breaks the rules");
                return;
            }
            Err(e) => {
                // The router went away or aborted (it falls back to gRPC); nothing to answer.
                tracing::info!(epoch, layers, error = %e, "collective ended");
                if !matches!(e, ExchangeError::Comm(_)) {
                    ctx.metrics.refused.fetch_add(1, Ordering::Relaxed);
                }
                return;
            }
        }
    }
    link.abort();
}

/// The span of a traced layer's expert batch: a child of the router's exchange span, as a
/// gRPC batch's is of its dispatch span.
fn batch_span(header: &LayerHeader, epoch: u64, transport: Transport) -> tracing::Span {
    let Some(traceparent) = header.traceparent() else {
        return tracing::Span::none();
    };
    if !moe_cluster::telemetry::enabled() {
        return tracing::Span::none();
    }
    let span = tracing::info_span!(
        target: "moe_expert_node",
        "expert_batch",
        otel.kind = "server",
        layer = header.layer as u64,
        epoch,
        rows = header.counts.rows as u64,
        pairs = header.counts.pairs as u64,
        transport = transport.as_str(),
    );
    moe_cluster::telemetry::set_remote_parent(&span, Some(traceparent), None);
    span
}
