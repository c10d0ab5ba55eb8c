//! `ExpertData.Exchange`: for each `DispatchBatch` on the stream, validate it, run the experts
//! on the math threads, and answer with the `CombineBatch` in the same order.

use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use moe_cluster::frames::{self, DispatchTag};
use moe_model::experts::ExpertBackend;
use moe_model::routes::ExpertRoutes;
use moe_proto::v1::expert_data_server::ExpertData;
use moe_proto::v1::{CombineBatch, DispatchBatch};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::metrics::NodeMetrics;
use crate::served::ServedExperts;

pub struct DataPlane {
    served: Arc<ServedExperts>,
    hidden: usize,
    metrics: Arc<NodeMetrics>,
}

impl DataPlane {
    pub fn new(served: Arc<ServedExperts>, hidden: usize, metrics: Arc<NodeMetrics>) -> Self {
        Self {
            served,
            hidden,
            metrics,
        }
    }
}

type CombineStream = Pin<Box<dyn Stream<Item = Result<CombineBatch, Status>> + Send>>;

#[tonic::async_trait]
impl ExpertData for DataPlane {
    type ExchangeStream = CombineStream;

    async fn exchange(
        &self,
        request: Request<Streaming<DispatchBatch>>,
    ) -> Result<Response<Self::ExchangeStream>, Status> {
        let mut inbound = request.into_inner();
        let served = Arc::clone(&self.served);
        let metrics = Arc::clone(&self.metrics);
        let hidden = self.hidden;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            while let Some(message) = inbound.next().await {
                let batch = match message {
                    Ok(b) => b,
                    Err(status) => {
                        tracing::debug!(%status, "dispatch stream ended");
                        return;
                    }
                };
                let reply = run_batch(&served, hidden, batch, &metrics).await;
                if tx.send(reply).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

/// One batch: a malformed frame fails the stream (the peer is broken); a batch for an epoch or
/// expert this node does not hold is answered with an error so the router can re-plan.
async fn run_batch(
    served: &Arc<ServedExperts>,
    hidden: usize,
    batch: DispatchBatch,
    metrics: &NodeMetrics,
) -> Result<CombineBatch, Status> {
    let decoded = frames::decode_dispatch(&batch, hidden).map_err(|e| {
        metrics.refused.fetch_add(1, Ordering::Relaxed);
        Status::invalid_argument(e.to_string())
    })?;
    if decoded.hidden != hidden {
        return Err(Status::invalid_argument(format!(
            "hidden {} but this model has {hidden}",
            decoded.hidden
        )));
    }
    let tag: DispatchTag = decoded.tag;
    let Some(set) = served.for_epoch(tag.epoch) else {
        metrics.refused.fetch_add(1, Ordering::Relaxed);
        return Ok(frames::combine_error(
            tag,
            format!(
                "FAILED_PRECONDITION: epoch {} is not served here (serving {:?})",
                tag.epoch,
                served.epochs()
            ),
        ));
    };
    let pairs = decoded.routes.pairs();
    let decoded_rows = decoded.routes.rows();
    let span = expert_batch_span(&batch.traceparent, tag, &decoded.routes);
    let (result, micros) = tokio::task::spawn_blocking(move || {
        let _in_batch = span.enter();
        let start = std::time::Instant::now();
        let result = moe_model::backend::in_math_pool(|| {
            set.run_experts(tag.layer as usize, &decoded.rows, &decoded.routes)
        });
        (result, start.elapsed().as_micros() as u64)
    })
    .await
    .map_err(|e| Status::internal(format!("expert task failed: {e}")))?;
    metrics.batches.fetch_add(1, Ordering::Relaxed);
    metrics
        .rows
        .fetch_add(decoded_rows as u64, Ordering::Relaxed);
    metrics.pairs.fetch_add(pairs as u64, Ordering::Relaxed);
    metrics.compute.observe(micros as f64 / 1e6);
    Ok(match result {
        Ok(outputs) => CombineBatch {
            compute_micros: micros,
            ..frames::encode_combine(tag, pairs, &outputs)
        },
        Err(e) => {
            metrics.refused.fetch_add(1, Ordering::Relaxed);
            frames::combine_error(tag, e.to_string())
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
