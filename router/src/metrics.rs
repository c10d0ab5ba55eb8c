//! The router's Prometheus metrics: request outcomes and latencies recorded by the scheduler
//! (atomics only), and at scrape time the gauges the cluster view, scheduler and KV blocks
//! already keep. Served at `/metrics` on the HTTP API port and on `--metrics-listen`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use moe_cluster::metrics::{escape, family, sample, Histogram, LATENCY_BUCKETS, SIZE_BUCKETS};

use crate::cluster_view::ClusterView;
use crate::kv_blocks::KvBlocks;
use crate::scheduler::SchedulerStats;

/// Why a request ended, as the `finish_reason` label.
#[derive(Debug, Clone, Copy)]
pub enum Outcome {
    Stop,
    Length,
    Error,
    Cancelled,
    Deadline,
}

const OUTCOMES: [(Outcome, &str); 5] = [
    (Outcome::Stop, "stop"),
    (Outcome::Length, "length"),
    (Outcome::Error, "error"),
    (Outcome::Cancelled, "cancelled"),
    (Outcome::Deadline, "deadline"),
];

#[derive(Debug)]
pub struct RequestMetrics {
    finished: [AtomicU64; 5],
    pub time_to_first_token: Histogram,
    pub inter_token_latency: Histogram,
    pub e2e_latency: Histogram,
    pub step_tokens: Histogram,
    pub prompt_tokens: AtomicU64,
    pub generation_tokens: AtomicU64,
    /// Tokenizer calls on the request path (chat template included), on the blocking pool:
    /// count = calls, sum = time.
    pub tokenize_seconds: Histogram,
    /// Prompts refused by `--max-prompt-bytes` (before any tokenizer call).
    pub prompt_bytes_refused: AtomicU64,
}

impl Default for RequestMetrics {
    fn default() -> Self {
        Self {
            finished: Default::default(),
            time_to_first_token: Histogram::new(LATENCY_BUCKETS),
            inter_token_latency: Histogram::new(LATENCY_BUCKETS),
            e2e_latency: Histogram::new(LATENCY_BUCKETS),
            step_tokens: Histogram::new(SIZE_BUCKETS),
            prompt_tokens: AtomicU64::new(0),
            generation_tokens: AtomicU64::new(0),
            tokenize_seconds: Histogram::new(LATENCY_BUCKETS),
            prompt_bytes_refused: AtomicU64::new(0),
        }
    }
}

impl RequestMetrics {
    pub fn finished(&self, outcome: Outcome) {
        self.finished[outcome as usize].fetch_add(1, Ordering::Relaxed);
    }
}

/// Everything `/metrics` shows.
pub struct RouterMetrics {
    pub requests: Arc<RequestMetrics>,
    pub view: Arc<ClusterView>,
    pub stats: Arc<SchedulerStats>,
    pub kv: Arc<KvBlocks>,
}

impl RouterMetrics {
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(8192);
        let r = &self.requests;
        family(
            &mut out,
            "moe_requests_total",
            "counter",
            "Requests ended, by finish reason.",
        );
        for (outcome, label) in OUTCOMES {
            let n = r.finished[outcome as usize].load(Ordering::Relaxed);
            sample(
                &mut out,
                "moe_requests_total",
                &format!("finish_reason=\"{label}\""),
                n,
            );
        }
        for (name, help, h) in [
            (
                "moe_time_to_first_token_seconds",
                "Admission to first token.",
                &r.time_to_first_token,
            ),
            (
                "moe_inter_token_latency_seconds",
                "Between consecutive tokens of a request.",
                &r.inter_token_latency,
            ),
            (
                "moe_e2e_request_latency_seconds",
                "Admission to last token.",
                &r.e2e_latency,
            ),
            (
                "moe_step_tokens",
                "Tokens per model step (decodes plus prefill chunks).",
                &r.step_tokens,
            ),
            (
                "moe_router_tokenize_seconds",
                "Tokenizer calls on the request path (chat template included), run on the blocking pool.",
                &r.tokenize_seconds,
            ),
        ] {
            family(&mut out, name, "histogram", help);
            h.render(&mut out, name, "");
        }
        for (name, help, v) in [
            (
                "moe_prompt_tokens_total",
                "Prompt tokens admitted.",
                r.prompt_tokens.load(Ordering::Relaxed),
            ),
            (
                "moe_generation_tokens_total",
                "Tokens generated.",
                r.generation_tokens.load(Ordering::Relaxed),
            ),
            (
                "moe_router_prompt_bytes_refused_total",
                "Prompts refused by --max-prompt-bytes, before tokenizing.",
                r.prompt_bytes_refused.load(Ordering::Relaxed),
            ),
        ] {
            family(&mut out, name, "counter", help);
            sample(&mut out, name, "", v);
        }
        let gauges: [(&str, &str, f64); 9] = [
            ("moe_requests_running", "Requests in the running batch.", self.stats.running.load(Ordering::Relaxed) as f64),
            ("moe_requests_waiting", "Requests waiting for admission.", self.stats.waiting.load(Ordering::Relaxed) as f64),
            ("moe_kv_cache_blocks_used", "KV-cache blocks reserved.", self.kv.used() as f64),
            ("moe_kv_cache_blocks_total", "KV-cache blocks in the budget.", self.kv.total() as f64),
            ("moe_placement_epoch", "Placement epoch this router dispatches on.", self.view.serving().map(|s| s.placement.epoch).unwrap_or(0) as f64),
            ("moe_placement_latest_epoch", "Newest placement epoch written to etcd.", self.view.latest().map(|p| p.epoch).unwrap_or(0) as f64),
            ("moe_live_nodes", "Expert nodes registered in etcd.", self.view.membership().nodes.len() as f64),
            ("moe_imbalance_ratio", "Sum over MoE layers of the busiest node's pairs / of the mean node's, last window.", self.view.imbalance()),
            ("moe_is_planner", "1 if this router is the elected planner.", f64::from(u8::from(self.view.is_planner.load(Ordering::Relaxed)))),
        ];
        for (name, help, v) in gauges {
            family(&mut out, name, "gauge", help);
            sample(&mut out, name, "", v);
        }
        for (name, help, v) in [
            (
                "moe_rebalances_total",
                "Placements this router planned to rebalance load.",
                self.view.rebalances.load(Ordering::Relaxed),
            ),
            (
                "moe_layer_retries_total",
                "MoE layers re-dispatched after a node failed.",
                self.view.layer_retries.load(Ordering::Relaxed),
            ),
            (
                "moe_micro_batched_steps_total",
                "Steps run as more than one micro-batch at once (--micro-batches).",
                self.stats.micro_batched_steps.load(Ordering::Relaxed),
            ),
            (
                "moe_collective_layers_total",
                "MoE layers sent over a per-epoch collective (TCP or NCCL) instead of gRPC.",
                self.view.collective_layers.load(Ordering::Relaxed),
            ),
            (
                "moe_collective_failures_total",
                "Collectives that failed mid-layer (the layer then went over gRPC).",
                self.view.collective_failures.load(Ordering::Relaxed),
            ),
            (
                "moe_router_suspect_reports_total",
                "Nodes this router reported suspect (their data plane failed).",
                self.view.suspect_reports.load(Ordering::Relaxed),
            ),
            (
                "moe_router_suspect_replans_total",
                "Epochs this router planned to leave out a suspect node before its lease expired.",
                self.view.suspect_replans.load(Ordering::Relaxed),
            ),
        ] {
            family(&mut out, name, "counter", help);
            sample(&mut out, name, "", v);
        }
        family(
            &mut out,
            "moe_expert_tokens_total",
            "counter",
            "Tokens dispatched per (layer, expert).",
        );
        let mut experts: Vec<_> = self.view.expert_token_counts().into_iter().collect();
        experts.sort_unstable();
        for ((layer, expert), n) in experts {
            sample(
                &mut out,
                "moe_expert_tokens_total",
                &format!("layer=\"{layer}\",expert=\"{expert}\""),
                n,
            );
        }
        if let Some(serving) = self.view.serving() {
            family(
                &mut out,
                "moe_dispatch_round_trip_seconds",
                "histogram",
                "Dispatch to combine, per node.",
            );
            for link in &serving.links {
                link.round_trip.render(
                    &mut out,
                    "moe_dispatch_round_trip_seconds",
                    &format!("node=\"{}\"", escape(&link.node_id)),
                );
            }
            for (name, help, f) in [
                (
                    "moe_node_bytes_sent_total",
                    "Data-plane bytes sent to the node.",
                    (|l: &crate::dispatch::NodeLink| l.bytes_sent.load(Ordering::Relaxed))
                        as fn(&crate::dispatch::NodeLink) -> u64,
                ),
                (
                    "moe_node_bytes_received_total",
                    "Data-plane bytes received from the node.",
                    |l| l.bytes_received.load(Ordering::Relaxed),
                ),
                (
                    "moe_node_rows_total",
                    "Token rows dispatched to the node.",
                    |l| l.rows_sent.load(Ordering::Relaxed),
                ),
                (
                    "moe_node_pairs_total",
                    "(token, expert) pairs dispatched to the node.",
                    |l| l.pairs_sent.load(Ordering::Relaxed),
                ),
            ] {
                family(&mut out, name, "counter", help);
                for link in &serving.links {
                    sample(
                        &mut out,
                        name,
                        &format!("node=\"{}\"", escape(&link.node_id)),
                        f(link),
                    );
                }
            }
        }
        out
    }
}
