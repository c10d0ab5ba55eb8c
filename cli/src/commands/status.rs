//! `moe status --router ADDR [--json]`: the Admin ClusterStatus; `moe status --gateway ADDR
//! [--json]`: the routers a gateway sees, their load and what it sent them.

use anyhow::Context;
use clap::Args;
use moe_proto::v1::admin_client::AdminClient;
use moe_proto::v1::gateway_client::GatewayClient;
use moe_proto::v1::{ClusterStatusRequest, ClusterStatusResponse, RoutersRequest};
use serde_json::json;

use crate::router_client::{channel, rpc_error, runtime, with_key};

#[derive(Args)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["router", "gateway"])))]
pub struct StatusArgs {
    /// The router's gRPC address.
    #[arg(long, env = "MOE_ROUTER")]
    router: Option<String>,
    /// A gateway's gRPC address: list the routers behind it.
    #[arg(long, env = "MOE_GATEWAY")]
    gateway: Option<String>,
    #[arg(long)]
    json: bool,
}

pub fn run(args: StatusArgs) -> anyhow::Result<()> {
    let router = match (&args.router, &args.gateway) {
        (Some(router), _) => router.clone(),
        (None, Some(gateway)) => return gateway_status(gateway, args.json),
        (None, None) => anyhow::bail!("give --router or --gateway"),
    };
    let status = runtime()?.block_on(async {
        let mut client = channel(&router)
            .await
            .map(AdminClient::new)
            .with_context(|| format!("connecting to {router}"))?;
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
                    "dispatched_rows": n.dispatched_rows, "dispatched_pairs": n.dispatched_pairs, "rows_on_wire": n.rows_on_wire,
                    "experts": n.experts.iter().map(|e| json!({"layer": e.layer, "expert": e.expert, "tokens": e.tokens, "cluster_tokens": e.cluster_tokens})).collect::<Vec<_>>(),
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
            "cluster_imbalance_ratio": status.cluster_imbalance_ratio,
            "load_reporting_routers": status.load_reporting_routers,
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
    if status.load_reporting_routers > 0 {
        println!(
            "  cluster imbalance {:.3} over {} routers' load (what the planner rebalances on)",
            status.cluster_imbalance_ratio, status.load_reporting_routers
        );
    }
    if status.in_process_nodes > 0 {
        println!(
            "  routed experts on {} in-process nodes (no etcd, no expert-node processes)",
            status.in_process_nodes
        );
    }
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
    print_nodes(&status);
    Ok(())
}

/// One line per node: where it is, its state, experts and the tokens sent to them (on the
/// planner, every router's too).
fn print_nodes(status: &ClusterStatusResponse) {
    for n in &status.nodes {
        let tokens: u64 = n.experts.iter().map(|e| e.tokens).sum();
        let everyones: u64 = n.experts.iter().map(|e| e.cluster_tokens).sum();
        let tokens = if status.is_planner {
            format!("{tokens} ({everyones} by every router)")
        } else {
            tokens.to_string()
        };
        println!(
            "  {:<16} {:<22} {:<9} ready@{}  {} experts  {} tokens dispatched  rows as {}",
            n.node_id,
            n.address,
            n.state,
            n.ready_epoch,
            n.experts.len(),
            tokens,
            if n.rows_on_wire.is_empty() {
                "-"
            } else {
                &n.rows_on_wire
            }
        );
    }
}

/// `moe status --gateway ADDR`: the gateway's Routers call.
fn gateway_status(gateway: &str, as_json: bool) -> anyhow::Result<()> {
    let seen = runtime()?.block_on(async {
        let mut client = channel(gateway)
            .await
            .map(GatewayClient::new)
            .with_context(|| format!("connecting to {gateway}"))?;
        client
            .routers(with_key(RoutersRequest {}))
            .await
            .map(|r| r.into_inner())
            .map_err(rpc_error)
    })?;
    if as_json {
        let routers: Vec<_> = seen
            .routers
            .iter()
            .map(|r| {
                json!({
                    "router_id": r.router_id, "address": r.address, "http_address": r.http_address,
                    "model": r.model, "serving_epoch": r.serving_epoch, "healthy": r.healthy,
                    "running": r.running, "waiting": r.waiting,
                    "kv_blocks_free": r.kv_blocks_free, "kv_blocks_cached": r.kv_blocks_cached,
                    "kv_blocks_total": r.kv_blocks_total, "in_flight": r.in_flight,
                    "requests_total": r.requests_total, "migrations_from": r.migrations_from,
                })
            })
            .collect();
        let out = json!({
            "policy": seen.policy, "migrations_total": seen.migrations_total, "routers": routers,
        });
        println!("{out}");
        return Ok(());
    }
    println!(
        "gateway {gateway}  policy {}  routers {}  streams moved {}",
        seen.policy,
        seen.routers.len(),
        seen.migrations_total
    );
    println!(
        "  {:<20} {:<22} {:>6} {:>8} {:>8} {:>10} {:>9} {:>9} {:>6}",
        "router",
        "address",
        "epoch",
        "running",
        "waiting",
        "kv free",
        "in flight",
        "requests",
        "moved"
    );
    for r in &seen.routers {
        println!(
            "  {:<20} {:<22} {:>6} {:>8} {:>8} {:>10} {:>9} {:>9} {:>6}{}",
            r.router_id,
            r.address,
            r.serving_epoch,
            r.running,
            r.waiting,
            format!("{}/{}", r.kv_blocks_free, r.kv_blocks_total),
            r.in_flight,
            r.requests_total,
            r.migrations_from,
            if r.healthy { "" } else { "  (avoided)" }
        );
    }
    Ok(())
}
