//! `moe status --router ADDR [--json]`: the Admin ClusterStatus.

use anyhow::Context;
use clap::Args;
use moe_proto::v1::admin_client::AdminClient;
use moe_proto::v1::ClusterStatusRequest;
use serde_json::json;

use crate::router_client::{channel, rpc_error, runtime, with_key};

#[derive(Args)]
pub struct StatusArgs {
    /// The router's gRPC address.
    #[arg(long, env = "MOE_ROUTER")]
    router: String,
    #[arg(long)]
    json: bool,
}

pub fn run(args: StatusArgs) -> anyhow::Result<()> {
    let status = runtime()?.block_on(async {
        let mut client = channel(&args.router)
            .await
            .map(AdminClient::new)
            .with_context(|| format!("connecting to {}", args.router))?;
        client
            .cluster_status(with_key(ClusterStatusRequest {}))
            .await
            .map(|r| r.into_inner())
            .map_err(rpc_error)
    })?;
    if args.json {
        let nodes: Vec<_> = status
            .nodes
            .iter()
            .map(|n| {
                json!({
                    "node_id": n.node_id, "address": n.address, "state": n.state, "ready_epoch": n.ready_epoch,
                    "dispatched_rows": n.dispatched_rows, "dispatched_pairs": n.dispatched_pairs,
                    "experts": n.experts.iter().map(|e| json!({"layer": e.layer, "expert": e.expert, "tokens": e.tokens})).collect::<Vec<_>>(),
                })
            })
            .collect();
        let out = json!({
            "cluster": status.cluster, "serving_epoch": status.serving_epoch, "latest_epoch": status.latest_epoch,
            "requests_running": status.requests_running, "requests_waiting": status.requests_waiting,
            "kv_blocks_used": status.kv_blocks_used, "kv_blocks_cached": status.kv_blocks_cached, "kv_blocks_total": status.kv_blocks_total, "nodes": nodes,
            "moe_layer_calls": status.moe_layer_calls, "dispatch_encode_seconds": status.dispatch_encode_seconds,
            "dispatch_wait_seconds": status.dispatch_wait_seconds, "expert_compute_seconds": status.expert_compute_seconds,
            "combine_seconds": status.combine_seconds,
            "router_id": status.router_id, "planner_id": status.planner_id, "is_planner": status.is_planner,
            "imbalance_ratio": status.imbalance_ratio, "rebalances": status.rebalances,
            "replicas": status.replicas, "layer_retries": status.layer_retries,
            "serving_transport": status.serving_transport, "collective_layers": status.collective_layers,
            "collective_failures": status.collective_failures, "dense_device": status.dense_device,
            "micro_batched_steps": status.micro_batched_steps,
            "suspect_reports": status.suspect_reports, "suspect_replans": status.suspect_replans,
        });
        println!("{out}");
        return Ok(());
    }
    println!(
        "cluster {}  serving epoch {} (latest {})  requests running {} waiting {}  KV blocks {}/{}",
        status.cluster,
        status.serving_epoch,
        status.latest_epoch,
        status.requests_running,
        status.requests_waiting,
        status.kv_blocks_used,
        status.kv_blocks_total
    );
    println!(
        "  router {}{}  planner {}  imbalance {:.3}  rebalances {}  replicas {}  re-dispatched layers {}  suspect reports {} (re-plans {})",
        status.router_id,
        if status.is_planner { " (planner)" } else { "" },
        if status.planner_id.is_empty() { "-" } else { &status.planner_id },
        status.imbalance_ratio,
        status.rebalances,
        status.replicas,
        status.layer_retries,
        status.suspect_reports,
        status.suspect_replans
    );
    println!(
        "  dense part on {}  data plane {}  collective layers {}  collective failures {}  micro-batched steps {}",
        if status.dense_device.is_empty() {
            "-"
        } else {
            &status.dense_device
        },
        if status.serving_transport.is_empty() {
            "-"
        } else {
            &status.serving_transport
        },
        status.collective_layers,
        status.collective_failures,
        status.micro_batched_steps
    );
    if status.moe_layer_calls > 0 {
        let per = |s: f64| s * 1e3 / status.moe_layer_calls as f64;
        println!(
            "  per MoE layer: encode {:.3} ms, wait {:.3} ms (expert compute {:.3} ms), combine {:.3} ms over {} calls",
            per(status.dispatch_encode_seconds),
            per(status.dispatch_wait_seconds),
            per(status.expert_compute_seconds),
            per(status.combine_seconds),
            status.moe_layer_calls
        );
    }
    for n in &status.nodes {
        let tokens: u64 = n.experts.iter().map(|e| e.tokens).sum();
        println!(
            "  {:<16} {:<22} {:<9} ready@{}  {} experts  {} tokens dispatched",
            n.node_id,
            n.address,
            n.state,
            n.ready_epoch,
            n.experts.len(),
            tokens
        );
    }
    Ok(())
}
