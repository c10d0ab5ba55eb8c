//! `ExpertData.Exchange`: admit the stream (the cluster credential), then for each
//! `DispatchBatch` check it against [`DispatchRules`] before allocating anything for it, run
//! the experts on the math threads, and answer with the `CombineBatch` in the same order.

use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use moe_cluster::auth::{headers, AuthFailure, StreamGate};
use moe_cluster::dispatch_rules::{DispatchRules, Violation};
use moe_cluster::frames::{self, DispatchTag};
use moe_model::experts::ExpertBackend;
use moe_model::routes::ExpertRoutes;
use moe_proto::v1::expert_data_server::ExpertData;
use moe_proto::v1::{CombineBatch, DispatchBatch, Refusal};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::batch::NodeBatch;
use crate::metrics::NodeMetrics;
use crate::served::ServedExperts;

pub struct DataPlane {
    served: Arc<ServedExperts>,
    rules: Arc<DispatchRules>,
    /// Checks each stream's cluster credential when a token is configured.
    gate: Option<Arc<StreamGate>>,
    metrics: Arc<NodeMetrics>,
}

impl DataPlane {
    /// The largest dispatch it accepts and the largest combine it sends, in bytes.
    pub fn message_limits(&self) -> (usize, usize) {
        (
            self.rules.max_dispatch_bytes(),
            self.rules.max_combine_bytes(),
        )
    }

    pub fn new(
        served: Arc<ServedExperts>,
        rules: Arc<DispatchRules>,
        gate: Option<Arc<StreamGate>>,
        metrics: Arc<NodeMetrics>,
    ) -> Self {
        Self {
            served,
            rules,
            gate,
            metrics,
        }
    }
}

type CombineStream = Pin<Box<dyn Stream<Item = Result<CombineBatch, Status>> + Send>>;

/// What a peer without the cluster credential is told: nothing more.
pub fn unauthenticated(metrics: &NodeMetrics, failure: &AuthFailure) -> Status {
    metrics.unauthenticated.fetch_add(1, Ordering::Relaxed);
    tracing::warn!(reason = %failure, "refused a call without a valid cluster credential");
    Status::unauthenticated("a valid cluster credential is required")
}

#[tonic::async_trait]
impl ExpertData for DataPlane {
    type ExchangeStream = CombineStream;

    async fn exchange(
        &self,
        request: Request<Streaming<DispatchBatch>>,
    ) -> Result<Response<Self::ExchangeStream>, Status> {
        let answer = match &self.gate {
            Some(gate) => Some(
                gate.admit(request.metadata())
                    .map_err(|e| unauthenticated(&self.metrics, &e))?,
            ),
            None => None,
        };
        let mut inbound = request.into_inner();
        let served = Arc::clone(&self.served);
        let rules = Arc::clone(&self.rules);
        let metrics = Arc::clone(&self.metrics);
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            while let Some(message) = inbound.next().await {
                let batch = match message {
                    Ok(b) => b,
                    Err(status) => {
                        // A message over the limit, a broken frame or a reset: the peer
                        // learns why (if it is still there) and the stream ends.
                        tracing::debug!(%status, "dispatch stream ended");
                        if status.code() == tonic::Code::OutOfRange {
                            metrics.invalid("message_size");
                        }
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                };
                let reply = run_batch(&served, &rules, batch, &metrics).await;
                let failed = reply.is_err();
                // An error ends the stream: whatever the peer sends next is not read.
                if tx.send(reply).await.is_err() || failed {
                    return;
                }
            }
        });
        let mut response = Response::new(
            Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)) as CombineStream
        );
        if let Some(answer) = answer.and_then(|a| a.parse().ok()) {
            response.metadata_mut().insert(headers::ANSWER, answer);
        }
        Ok(response)
    }
}

/// One batch. A frame that breaks the rules (malformed, over a bound, an expert not held here)
/// ends the stream with INVALID_ARGUMENT before anything is allocated for it; a valid batch
/// for an epoch this node does not serve is refused in-band (STALE_EPOCH), so the router can
/// wait for the placement both agree on.
async fn run_batch(
    served: &Arc<ServedExperts>,
    rules: &DispatchRules,
    batch: DispatchBatch,
    metrics: &Arc<NodeMetrics>,
) -> Result<CombineBatch, Status> {
    let invalid = |v: Violation| {
        metrics.invalid(v.reason());
        tracing::warn!(violation = %v, "refused a dispatch that breaks the rules");
        Status::invalid_argument(v.to_string())
    };
    let checked = rules.check_frame(&batch).map_err(invalid)?;
    let tag: DispatchTag = checked.tag;
    let Some(set) = served.for_epoch(tag.epoch) else {
        metrics.refused.fetch_add(1, Ordering::Relaxed);
        return Ok(frames::combine_refusal(
            tag,
            Refusal::StaleEpoch,
            &format!("epoch {} is not served here", tag.epoch),
        ));
    };
    checked
        .check_experts(rules, |layer, expert| set.contains(layer, expert))
        .map_err(invalid)?;
    let decoded = checked.decode();
    let span = expert_batch_span(&batch.traceparent, tag, &decoded.routes);
    drop(batch);
    let pairs = decoded.routes.pairs();
    let counted = Arc::clone(metrics);
    let (result, micros) = tokio::task::spawn_blocking(move || {
        let _in_batch = span.enter();
        let start = std::time::Instant::now();
        let batch = NodeBatch {
            experts: &set,
            metrics: &counted,
            collective: false,
        };
        let result = batch.run_experts(tag.layer as usize, &decoded.rows, &decoded.routes);
        (result, start.elapsed().as_micros() as u64)
    })
    .await
    .map_err(|e| Status::internal(format!("expert task failed: {e}")))?;
    Ok(match result {
        Ok(outputs) => CombineBatch {
            compute_micros: micros,
            ..frames::encode_combine(tag, pairs, &outputs)
        },
        Err(e) => {
            metrics.refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(error = %e, layer = tag.layer, "experts failed on a valid batch");
            frames::combine_refusal(tag, Refusal::ExpertFailure, &e.to_string())
        }
    })
}

/// The span of a traced dispatch: a child of the router's dispatch span named in the batch.
fn expert_batch_span(traceparent: &str, tag: DispatchTag, routes: &ExpertRoutes) -> tracing::Span {
    if traceparent.is_empty() || !moe_cluster::telemetry::enabled() {
        return tracing::Span::none();
    }
    let mut experts = routes.experts.clone();
    experts.sort_unstable();
    experts.dedup();
    let span = tracing::info_span!(
        target: "moe_expert_node",
        "expert_batch",
        otel.kind = "server",
        layer = tag.layer as u64,
        epoch = tag.epoch,
        step = tag.step,
        rows = routes.rows() as u64,
        pairs = routes.pairs() as u64,
        experts = experts.len() as u64,
    );
    moe_cluster::telemetry::set_remote_parent(&span, Some(traceparent), None);
    span
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use moe_cluster::frames::{decode_combine, encode_dispatch};
    use moe_model::checkpoint::Checkpoint;
    use moe_model::experts::ExpertSet;
    use moe_model::ModelConfig;

    use super::*;

    /// A node serving epoch 3 with experts 0..4 of the fixture's first MoE layer.
    fn node() -> (Arc<ServedExperts>, DispatchRules, ExpertSet, usize, usize) {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/qwen3-moe-tiny");
        let (ckpt, config) = (
            Checkpoint::open(&dir).unwrap(),
            ModelConfig::from_dir(&dir).unwrap(),
        );
        let layer = config.moe_layer_indices().next().unwrap();
        let held = ExpertSet::load(&ckpt, &config, (0..4).map(|e| (layer, e))).unwrap();
        let all = ExpertSet::load(&ckpt, &config, (0..4).map(|e| (layer, e))).unwrap();
        let served = Arc::new(ServedExperts::new());
        served.install(3, Arc::new(held));
        let rules = DispatchRules::for_model(&config, 8);
        (served, rules, all, layer, config.hidden_size)
    }

    fn dispatch(epoch: u64, layer: usize, hidden: usize, rows: &[&[(u32, f32)]]) -> DispatchBatch {
        let routes = ExpertRoutes::from_rows_as_given(rows);
        let values: Vec<f32> = (0..rows.len() * hidden).map(|i| i as f32 / 100.0).collect();
        let tag = DispatchTag {
            epoch,
            step: 7,
            layer: layer as u32,
            micro_batch: 1,
        };
        encode_dispatch(tag, hidden, &values, &routes)
    }

    /// A valid batch is computed exactly as the experts compute it alone; a stale epoch is
    /// refused in-band with its typed code; a batch that breaks a rule is INVALID_ARGUMENT,
    /// counted under its reason, and runs nothing.
    #[tokio::test]
    async fn batches_are_run_refused_or_rejected() {
        let (served, rules, all, layer, hidden) = node();
        let metrics = Arc::new(NodeMetrics::default());
        let rows: &[&[(u32, f32)]] = &[&[(0, 0.75), (3, 0.25)], &[(2, 1.0)]];
        let valid = dispatch(3, layer, hidden, rows);
        let combine = run_batch(&served, &rules, valid.clone(), &metrics)
            .await
            .unwrap();
        let tag = DispatchTag {
            epoch: 3,
            step: 7,
            layer: layer as u32,
            micro_batch: 1,
        };
        let outputs = decode_combine(&combine, tag, 3, hidden).unwrap();
        let checked = rules.check_frame(&valid).unwrap().decode();
        let alone = all
            .run_experts(layer, &checked.rows, &checked.routes)
            .unwrap();
        assert_eq!(outputs, alone);
        assert_eq!(metrics.batches.load(Ordering::Relaxed), 1);
        assert_eq!(metrics.pairs.load(Ordering::Relaxed), 3);

        let stale = run_batch(&served, &rules, dispatch(2, layer, hidden, rows), &metrics)
            .await
            .unwrap();
        assert_eq!(stale.refusal, Refusal::StaleEpoch as i32);
        assert_eq!(metrics.refused.load(Ordering::Relaxed), 1);

        for (rows, reason) in [
            (&[&[(5u32, 1.0f32)] as &[(u32, f32)]][..], "expert_not_held"),
            (&[&[(1, 0.5), (1, 0.5)]], "duplicate_expert"),
            (&[&[(1, f32::NAN)]], "weight"),
        ] {
            let err = run_batch(&served, &rules, dispatch(3, layer, hidden, rows), &metrics)
                .await
                .unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument, "{reason}");
            let at = Violation::REASONS
                .iter()
                .position(|r| *r == reason)
                .unwrap();
            assert_eq!(
                metrics.invalid_frames[at].load(Ordering::Relaxed),
                1,
                "{reason}"
            );
        }
        assert_eq!(
            metrics.batches.load(Ordering::Relaxed),
            1,
            "nothing else ran"
        );
        let page = metrics.render(&served);
        assert!(
            page.contains("moe_node_invalid_frames_total{reason=\"weight\"} 1"),
            "{page}"
        );
    }
}
