//! The node's Prometheus metrics (`--metrics-listen`): expert batches run, their rows, pairs
//! and compute time, refused batches, and the experts and epoch it holds.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use moe_cluster::dispatch_rules::Violation;
use moe_cluster::metrics::{family, sample, Histogram, LATENCY_BUCKETS};

use crate::served::ServedExperts;

#[derive(Debug)]
pub struct NodeMetrics {
    pub batches: AtomicU64,
    /// Of those, the batches that came over a collective (TCP or NCCL) instead of gRPC.
    pub collective_batches: AtomicU64,
    pub rows: AtomicU64,
    pub pairs: AtomicU64,
    /// Valid batches refused in-band (epoch not served, expert failure).
    pub refused: AtomicU64,
    /// Frames that broke the rules (malformed, over a bound, an expert not held), by
    /// [`Violation::REASONS`]: each ended its stream with INVALID_ARGUMENT.
    pub invalid_frames: [AtomicU64; Violation::REASONS.len()],
    /// Streams and calls refused for lack of a valid cluster credential.
    pub unauthenticated: AtomicU64,
    pub compute: Histogram,
}

impl NodeMetrics {
    /// Counts a frame refused for `reason` (one of [`Violation::REASONS`]).
    pub fn invalid(&self, reason: &str) {
        if let Some(i) = Violation::REASONS.iter().position(|r| *r == reason) {
            self.invalid_frames[i].fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Default for NodeMetrics {
    fn default() -> Self {
        Self {
            batches: AtomicU64::new(0),
            collective_batches: AtomicU64::new(0),
            rows: AtomicU64::new(0),
            pairs: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            invalid_frames: Default::default(),
            unauthenticated: AtomicU64::new(0),
            compute: Histogram::new(LATENCY_BUCKETS),
        }
    }
}

impl NodeMetrics {
    pub fn render(&self, served: &ServedExperts) -> String {
        let mut out = String::with_capacity(2048);
        for (name, help, v) in [
            (
                "moe_node_expert_batches_total",
                "Dispatch batches computed.",
                &self.batches,
            ),
            (
                "moe_node_collective_batches_total",
                "Dispatch batches that came over a collective (TCP or NCCL) instead of gRPC.",
                &self.collective_batches,
            ),
            (
                "moe_node_expert_rows_total",
                "Token rows received.",
                &self.rows,
            ),
            (
                "moe_node_expert_pairs_total",
                "(token, expert) pairs computed.",
                &self.pairs,
            ),
            (
                "moe_node_refused_batches_total",
                "Valid batches refused in-band (epoch not served, expert failure).",
                &self.refused,
            ),
            (
                "moe_node_unauthenticated_total",
                "Data-plane streams and calls refused for lack of a valid cluster credential.",
                &self.unauthenticated,
            ),
        ] {
            family(&mut out, name, "counter", help);
            sample(&mut out, name, "", v.load(Ordering::Relaxed));
        }
        family(
            &mut out,
            "moe_node_invalid_frames_total",
            "counter",
            "Frames that broke the rules (each ended its stream with INVALID_ARGUMENT), by reason.",
        );
        for (reason, v) in Violation::REASONS.iter().zip(&self.invalid_frames) {
            sample(
                &mut out,
                "moe_node_invalid_frames_total",
                &format!("reason=\"{reason}\""),
                v.load(Ordering::Relaxed),
            );
        }
        family(
            &mut out,
            "moe_node_expert_compute_seconds",
            "histogram",
            "Expert math per batch.",
        );
        self.compute
            .render(&mut out, "moe_node_expert_compute_seconds", "");
        let latest = served.latest();
        family(
            &mut out,
            "moe_node_experts_loaded",
            "gauge",
            "Experts of the newest epoch loaded here.",
        );
        sample(
            &mut out,
            "moe_node_experts_loaded",
            "",
            latest.as_ref().map(|(_, s)| s.len()).unwrap_or(0),
        );
        family(
            &mut out,
            "moe_node_ready_epoch",
            "gauge",
            "Newest placement epoch loaded.",
        );
        sample(
            &mut out,
            "moe_node_ready_epoch",
            "",
            latest.map(|(e, _)| e).unwrap_or(0),
        );
        family(
            &mut out,
            "moe_node_epochs_served",
            "gauge",
            "Placement epochs this node still serves.",
        );
        sample(
            &mut out,
            "moe_node_epochs_served",
            "",
            served.epochs().len(),
        );
        out
    }
}

/// Binds `addr` and serves `/metrics` there until the process ends.
pub async fn start(
    addr: &str,
    metrics: Arc<NodeMetrics>,
    served: Arc<ServedExperts>,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(address = %listener.local_addr()?, "metrics on /metrics");
    tokio::spawn(serve(listener, metrics, served));
    Ok(())
}

async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<NodeMetrics>,
    served: Arc<ServedExperts>,
) {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let body = metrics.render(&served);
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    body,
                )
            }
        }),
    );
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "metrics server stopped");
    }
}
