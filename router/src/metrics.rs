//! The router's Prometheus page, served at `/metrics` on the HTTP API port and on
//! `--metrics-listen`: at scrape time it reads what the request path recorded
//! ([`RequestMetrics`]) and the gauges the cluster view, scheduler and KV blocks already keep.
//! Every family the page shows is named in this file, in the order it shows them.

use std::fmt::Display;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use moe_cluster::metrics::{escape, family, sample};

use crate::cluster_view::ClusterView;
use crate::kv_blocks::KvBlocks;
use crate::node_link::NodeLink;
use crate::request_metrics::{RequestMetrics, OUTCOMES};
use crate::scheduler::SchedulerStats;

/// Everything `/metrics` shows.
pub struct RouterMetrics {
    pub requests: Arc<RequestMetrics>,
    pub view: Arc<ClusterView>,
    pub stats: Arc<SchedulerStats>,
    pub kv: Arc<KvBlocks>,
}

/// Writes one unlabelled family of `kind` per `(name, help, value)`.
fn scalars<T: Display>(
    out: &mut String,
    kind: &str,
    rows: impl IntoIterator<Item = (&'static str, &'static str, T)>,
) {
    for (name, help, value) in rows {
        family(out, name, kind, help);
        sample(out, name, "", value);
    }
}

impl RouterMetrics {
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(8192);
        self.render_requests(&mut out);
        self.render_gauges(&mut out);
        self.render_counters(&mut out);
        self.render_expert_tokens(&mut out);
        if let Some(serving) = self.view.serving() {
            render_links(&mut out, &serving.links);
        }
        out
    }

    /// How requests ended, their latencies and token counts.
    fn render_requests(&self, out: &mut String) {
        let r = &self.requests;
        family(
            out,
            "moe_requests_total",
            "counter",
            "Requests ended, by finish reason.",
        );
        for (outcome, label) in OUTCOMES {
            sample(
                out,
                "moe_requests_total",
                &format!("finish_reason=\"{label}\""),
                r.finished_count(outcome),
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
                &*r.tokenize_seconds,
            ),
        ] {
            family(out, name, "histogram", help);
            h.render(out, name, "");
        }
        scalars(
            out,
            "counter",
            [
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
                (
                    "moe_prefix_cache_queried_tokens_total",
                    "Prompt tokens of requests that looked up the prefix cache.",
                    r.prefix_cache_queried_tokens.load(Ordering::Relaxed),
                ),
                (
                    "moe_prefix_cache_hit_tokens_total",
                    "Prompt tokens found in the prefix cache (not prefilled again); over the queried tokens, the hit rate.",
                    r.prefix_cache_hit_tokens.load(Ordering::Relaxed),
                ),
                (
                    "moe_requests_preempted_total",
                    "Running requests put back in the queue for a more urgent one (--scheduling-policy priority); each resumes where it stopped, with the same tokens.",
                    r.preemptions.load(Ordering::Relaxed),
                ),
                (
                    "moe_spec_decode_drafts_total",
                    "Decode steps of a sequence that fed a speculative draft (--speculative-config).",
                    r.spec_drafts.load(Ordering::Relaxed),
                ),
                (
                    "moe_spec_decode_draft_tokens_total",
                    "Draft tokens fed to be checked.",
                    r.spec_draft_tokens.load(Ordering::Relaxed),
                ),
                (
                    "moe_spec_decode_accepted_tokens_total",
                    "Draft tokens the sampler then picked (over the draft tokens, the acceptance rate).",
                    r.spec_accepted_tokens.load(Ordering::Relaxed),
                ),
            ],
        );
        let name = "moe_spec_decode_accepted_tokens_per_position_total";
        family(
            out,
            name,
            "counter",
            "Draft tokens accepted, by their position in the draft (1: a draft's first token), up to the longest draft fed; over moe_spec_decode_drafts_total, how far drafts hold.",
        );
        let longest = r.spec_longest_draft.load(Ordering::Relaxed) as usize;
        for (k, accepted) in r.spec_accepted_at.iter().take(longest).enumerate() {
            let labels = format!("position=\"{}\"", k + 1);
            sample(out, name, &labels, accepted.load(Ordering::Relaxed));
        }
    }

    /// The batch, the KV budget, the placement and the planner, now.
    fn render_gauges(&self, out: &mut String) {
        let (stats, view) = (&self.stats, &self.view);
        let gauges: [(&str, &str, f64); 12] = [
            ("moe_requests_running", "Requests in the running batch.", stats.running.load(Ordering::Relaxed) as f64),
            ("moe_requests_waiting", "Requests waiting for admission.", stats.waiting.load(Ordering::Relaxed) as f64),
            ("moe_kv_cache_blocks_used", "KV-cache blocks reserved.", self.kv.used() as f64),
            ("moe_kv_cache_blocks_total", "KV-cache blocks in the budget.", self.kv.total() as f64),
            ("moe_prefix_cache_blocks", "KV-cache blocks held by the prefix cache (counted in moe_kv_cache_blocks_used; evicted when a request needs them).", stats.prefix_cache_blocks.load(Ordering::Relaxed) as f64),
            ("moe_placement_epoch", "Placement epoch this router dispatches on.", view.serving().map(|s| s.placement.epoch).unwrap_or(0) as f64),
            ("moe_placement_latest_epoch", "Newest placement epoch written to etcd.", view.latest().map(|p| p.epoch).unwrap_or(0) as f64),
            ("moe_live_nodes", "Expert nodes registered in etcd.", view.membership().nodes.len() as f64),
            ("moe_imbalance_ratio", "Sum over MoE layers of the busiest node's pairs / of the mean node's, last window.", view.imbalance()),
            ("moe_cluster_imbalance_ratio", "On the planner: moe_imbalance_ratio over every router's pairs, what it rebalances on; 0 elsewhere.", view.cluster_imbalance()),
            ("moe_is_planner", "1 if this router is the elected planner.", f64::from(u8::from(view.is_planner.load(Ordering::Relaxed)))),
            ("moe_in_process_nodes", "Expert nodes running as threads of this router (--in-process-nodes); 0 on a cluster.", view.in_process_nodes.load(Ordering::Relaxed) as f64),
        ];
        scalars(out, "gauge", gauges);
    }

    /// What the planner and the data plane have done since start.
    fn render_counters(&self, out: &mut String) {
        let view = &self.view;
        let counters: [(&str, &str, &AtomicU64); 9] = [
            (
                "moe_rebalances_total",
                "Placements this router planned to rebalance load.",
                &view.rebalances,
            ),
            (
                "moe_rebalance_expert_loads_total",
                "Expert copies nodes loaded for those rebalances (replicas and exchanges).",
                &view.rebalance_expert_loads,
            ),
            (
                "moe_layer_retries_total",
                "MoE layers re-dispatched after a node failed.",
                &view.layer_retries,
            ),
            (
                "moe_micro_batched_steps_total",
                "Steps run as more than one micro-batch at once (--micro-batches).",
                &self.stats.micro_batched_steps,
            ),
            (
                "moe_collective_layers_total",
                "MoE layers sent over a per-epoch collective (TCP or NCCL) instead of gRPC.",
                &view.collective_layers,
            ),
            (
                "moe_device_resident_layers_total",
                "Collective MoE layers whose rows stayed on the router's GPU (gathered per node and placed back there).",
                &view.device_resident_layers,
            ),
            (
                "moe_collective_failures_total",
                "Collectives that failed mid-layer (the layer then went over gRPC).",
                &view.collective_failures,
            ),
            (
                "moe_router_suspect_reports_total",
                "Nodes this router reported suspect (their data plane failed).",
                &view.suspect_reports,
            ),
            (
                "moe_router_suspect_replans_total",
                "Epochs this router planned to leave out a suspect node before its lease expired.",
                &view.suspect_replans,
            ),
        ];
        scalars(
            out,
            "counter",
            counters.map(|(name, help, n)| (name, help, n.load(Ordering::Relaxed))),
        );
    }

    /// Tokens per (layer, expert), sorted.
    fn render_expert_tokens(&self, out: &mut String) {
        family(
            out,
            "moe_expert_tokens_total",
            "counter",
            "Tokens dispatched per (layer, expert).",
        );
        let mut experts: Vec<_> = self.view.expert_token_counts().into_iter().collect();
        experts.sort_unstable();
        for ((layer, expert), n) in experts {
            sample(
                out,
                "moe_expert_tokens_total",
                &format!("layer=\"{layer}\",expert=\"{expert}\""),
                n,
            );
        }
    }
}

/// Reads one of a node link's traffic counters.
type LinkCounter = fn(&NodeLink) -> u64;

/// Per node of the serving placement: round trips and data-plane traffic.
fn render_links(out: &mut String, links: &[Arc<NodeLink>]) {
    let node = |link: &NodeLink| format!("node=\"{}\"", escape(&link.node_id));
    family(
        out,
        "moe_dispatch_round_trip_seconds",
        "histogram",
        "Dispatch to combine, per node.",
    );
    for link in links {
        link.round_trip
            .render(out, "moe_dispatch_round_trip_seconds", &node(link));
    }
    let traffic: [(&str, &str, LinkCounter); 4] = [
        (
            "moe_node_bytes_sent_total",
            "Data-plane bytes sent to the node.",
            |l| l.bytes_sent.load(Ordering::Relaxed),
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
    ];
    for (name, help, count) in traffic {
        family(out, name, "counter", help);
        for link in links {
            sample(out, name, &node(link), count(link));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use moe_cluster::placement::Placement;

    use super::*;
    use crate::cluster_view::ServingPlacement;
    use crate::request_metrics::Outcome;

    #[test]
    fn the_page_lists_every_family_once_in_order() {
        let view = Arc::new(ClusterView::new("r".into()));
        view.set_serving(ServingPlacement::new(
            Placement {
                epoch: 3,
                fingerprint: String::new(),
                nodes: BTreeMap::new(),
            },
            vec![],
        ));
        view.count_tokens((1, 2), 7);
        let requests = Arc::new(RequestMetrics::default());
        requests.finished(Outcome::Deadline);
        let stats = Arc::new(SchedulerStats::default());
        stats.micro_batched_steps.store(5, Ordering::Relaxed);
        let page = RouterMetrics {
            requests,
            view,
            stats,
            kv: Arc::new(KvBlocks::new(1 << 20, 64, 16)),
        }
        .render();
        let families: Vec<&str> = page
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .collect();
        assert_eq!(
            families,
            [
                "moe_requests_total counter",
                "moe_time_to_first_token_seconds histogram",
                "moe_inter_token_latency_seconds histogram",
                "moe_e2e_request_latency_seconds histogram",
                "moe_step_tokens histogram",
                "moe_router_tokenize_seconds histogram",
                "moe_prompt_tokens_total counter",
                "moe_generation_tokens_total counter",
                "moe_router_prompt_bytes_refused_total counter",
                "moe_prefix_cache_queried_tokens_total counter",
                "moe_prefix_cache_hit_tokens_total counter",
                "moe_requests_preempted_total counter",
                "moe_spec_decode_drafts_total counter",
                "moe_spec_decode_draft_tokens_total counter",
                "moe_spec_decode_accepted_tokens_total counter",
                "moe_spec_decode_accepted_tokens_per_position_total counter",
                "moe_requests_running gauge",
                "moe_requests_waiting gauge",
                "moe_kv_cache_blocks_used gauge",
                "moe_kv_cache_blocks_total gauge",
                "moe_prefix_cache_blocks gauge",
                "moe_placement_epoch gauge",
                "moe_placement_latest_epoch gauge",
                "moe_live_nodes gauge",
                "moe_imbalance_ratio gauge",
                "moe_cluster_imbalance_ratio gauge",
                "moe_is_planner gauge",
                "moe_in_process_nodes gauge",
                "moe_rebalances_total counter",
                "moe_rebalance_expert_loads_total counter",
                "moe_layer_retries_total counter",
                "moe_micro_batched_steps_total counter",
                "moe_collective_layers_total counter",
                "moe_device_resident_layers_total counter",
                "moe_collective_failures_total counter",
                "moe_router_suspect_reports_total counter",
                "moe_router_suspect_replans_total counter",
                "moe_expert_tokens_total counter",
                "moe_dispatch_round_trip_seconds histogram",
                "moe_node_bytes_sent_total counter",
                "moe_node_bytes_received_total counter",
                "moe_node_rows_total counter",
                "moe_node_pairs_total counter",
            ]
        );
        for line in [
            "moe_requests_total{finish_reason=\"deadline\"} 1\n",
            "moe_kv_cache_blocks_total 1024\n",
            "moe_placement_epoch 3\n",
            "moe_micro_batched_steps_total 5\n",
            "moe_expert_tokens_total{layer=\"1\",expert=\"2\"} 7\n",
        ] {
            assert!(page.contains(line), "{line:?} in:\n{page}");
        }
    }
}
