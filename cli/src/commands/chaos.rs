//! `moe chaos --model DIR`: a bounded chaos soak. It starts a local cluster (etcd, a router, N
//! expert nodes), drives it with greedy requests whose answers the offline engine computed, and
//! meanwhile SIGKILLs, SIGTERMs, drains and restarts nodes at random. It ends by itself and
//! reports requests sent, completed, failed and mismatched (other tokens, or logprobs that
//! differ in any bit); it exits non-zero unless the last two are 0.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use moe_cluster::load::{ExpectedAnswer, GreedyLoad};
use moe_cluster::local::{LocalCluster, LocalClusterSpec};
use moe_model::sampling::Rng;
use moe_model::{Engine, GenerateRequest, SamplingParams};
use moe_proto::v1::admin_client::AdminClient;
use moe_proto::v1::{ClusterStatusRequest, DrainRequest};
use serde_json::json;

use super::remote::endpoint;
use super::up::{find_in_path, sibling};

#[derive(Args)]
pub struct ChaosArgs {
    #[arg(long, env = "MOE_MODEL")]
    model: PathBuf,
    /// Expert nodes to keep running (a removed node is replaced).
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// How long the soak runs.
    #[arg(long, default_value_t = 60)]
    duration_secs: u64,
    /// Mean time between chaos actions.
    #[arg(long, default_value_t = 2_000)]
    interval_ms: u64,
    /// Concurrent request streams.
    #[arg(long, default_value_t = 6)]
    workers: usize,
    /// Distinct prompts (random token ids) and tokens generated for each.
    #[arg(long, default_value_t = 8)]
    prompts: usize,
    #[arg(long, default_value_t = 24)]
    new_tokens: u32,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Math threads per expert node.
    #[arg(long, default_value_t = 1)]
    node_threads: usize,
    /// Show the children's logs.
    #[arg(long)]
    logs: bool,
    /// The router's data plane (`grpc`, or one `tcp` collective per epoch); default: the
    /// router's own (`MOE_TRANSPORT`, else gRPC).
    #[arg(long)]
    transport: Option<moe_cluster::collective::Transport>,
}

/// Random prompts and the offline engine's greedy answers to them (tokens and logprobs, both
/// checked bit for bit).
fn expected_answers(args: &ChaosArgs, rng: &mut Rng) -> anyhow::Result<Vec<ExpectedAnswer>> {
    let engine =
        Engine::load(&args.model).with_context(|| format!("loading {}", args.model.display()))?;
    let vocab = engine.config().vocab_size as u64;
    (0..args.prompts)
        .map(|_| {
            let len = 4 + (rng.next_u64() % 29) as usize;
            let ids: Vec<u32> = (0..len).map(|_| (rng.next_u64() % vocab) as u32).collect();
            let out = engine.generate(&GenerateRequest {
                input_ids: ids.clone(),
                max_new_tokens: args.new_tokens as usize,
                sampling: SamplingParams::default(),
                ignore_eos: true,
                emit_logits: false,
            })?;
            Ok(ExpectedAnswer {
                input_ids: ids,
                max_new_tokens: args.new_tokens,
                output_ids: out.output_ids,
                logprobs: out.logprobs,
            })
        })
        .collect()
}

#[derive(Default)]
struct Actions {
    kills: u32,
    terminations: u32,
    drains: u32,
    joins: u32,
}

pub fn run(args: ChaosArgs) -> anyhow::Result<()> {
    if args.nodes < 2 {
        bail!("--nodes must be at least 2: one node must survive every action");
    }
    let mut rng = Rng::seeded(args.seed);
    let answers = Arc::new(expected_answers(&args, &mut rng)?);
    let mut cluster = LocalCluster::start(LocalClusterSpec {
        etcd_bin: find_in_path("etcd")?,
        router_bin: sibling("moe-router")?,
        node_bin: sibling("moe-expert-node")?,
        model: args.model.clone(),
        nodes: args.nodes,
        cluster: "chaos".into(),
        router_args: [
            vec!["--poll-ms".to_string(), "100".to_string()],
            args.transport
                .map(|t| vec!["--transport".to_string(), t.to_string()])
                .unwrap_or_default(),
        ]
        .concat(),
        node_args: vec![
            "--poll-ms".into(),
            "100".into(),
            "--threads".into(),
            args.node_threads.to_string(),
        ],
        show_logs: args.logs,
        etcd_tls: None,
    })
    .context("starting the local cluster")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let router = cluster.router_addr.clone();
    rt.block_on(wait_serving(&router))?;

    let started = Instant::now();
    let duration = Duration::from_secs(args.duration_secs);
    let mut actions = Actions::default();
    let (report, longest_stall) = rt.block_on(async {
        let load = GreedyLoad::start(
            vec![router.clone()],
            Arc::clone(&answers),
            args.workers,
            None,
        );
        while started.elapsed() < duration {
            let pause = args.interval_ms / 2 + rng.next_u64() % args.interval_ms.max(1);
            tokio::time::sleep(Duration::from_millis(pause)).await;
            for gone in cluster.reap_nodes() {
                eprintln!("[{:>6.1}s] {gone} exited", started.elapsed().as_secs_f64());
            }
            let live = cluster.node_ids();
            if live.len() < args.nodes {
                let id = cluster.add_node()?;
                actions.joins += 1;
                eprintln!("[{:>6.1}s] started {id}", started.elapsed().as_secs_f64());
                continue;
            }
            let victim = live[(rng.next_u64() % live.len() as u64) as usize].clone();
            match rng.next_u64() % 3 {
                0 => {
                    cluster.kill_node(&victim);
                    actions.kills += 1;
                    eprintln!(
                        "[{:>6.1}s] SIGKILL {victim}",
                        started.elapsed().as_secs_f64()
                    );
                }
                1 => {
                    cluster.terminate_node(&victim);
                    actions.terminations += 1;
                    eprintln!(
                        "[{:>6.1}s] SIGTERM {victim}",
                        started.elapsed().as_secs_f64()
                    );
                }
                _ => {
                    let mut admin = AdminClient::connect(endpoint(&router)).await?;
                    let epoch = admin
                        .drain(DrainRequest {
                            node_id: victim.clone(),
                        })
                        .await
                        .map(|r| r.into_inner().epoch);
                    actions.drains += 1;
                    eprintln!(
                        "[{:>6.1}s] drain {victim}: {}",
                        started.elapsed().as_secs_f64(),
                        match epoch {
                            Ok(e) => format!("epoch {e}"),
                            Err(s) => format!("{}: {}", s.code(), s.message()),
                        }
                    );
                }
            }
        }
        let progress = Arc::clone(&load.progress);
        let report = load.stop().await;
        let stall = progress.longest_stall(started, Instant::now());
        anyhow::Ok((report, stall))
    })?;
    let status = rt.block_on(async {
        let mut admin = AdminClient::connect(endpoint(&router)).await.ok()?;
        admin
            .cluster_status(ClusterStatusRequest {})
            .await
            .ok()
            .map(|r| r.into_inner())
    });
    let out = json!({
        "duration_secs": started.elapsed().as_secs_f64(),
        "sent": report.sent,
        "completed": report.completed,
        "failed": report.failed,
        "mismatched": report.mismatched,
        "tokens": report.tokens,
        "kills": actions.kills,
        "terminations": actions.terminations,
        "drains": actions.drains,
        "joins": actions.joins,
        "final_epoch": status.as_ref().map(|s| s.serving_epoch),
        "layer_retries": status.as_ref().map(|s| s.layer_retries),
        "serving_transport": status.as_ref().map(|s| s.serving_transport.clone()),
        "collective_layers": status.as_ref().map(|s| s.collective_layers),
        "collective_failures": status.as_ref().map(|s| s.collective_failures),
        "longest_stall_ms": longest_stall.map(|d| d.as_secs_f64() * 1e3),
        "problems": report.problems,
    });
    println!("{out}");
    drop(cluster);
    if report.failed > 0 || report.mismatched > 0 {
        bail!(
            "{} failed and {} mismatched requests",
            report.failed,
            report.mismatched
        );
    }
    Ok(())
}

async fn wait_serving(router: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        if let Ok(mut client) = AdminClient::connect(endpoint(router)).await {
            if let Ok(s) = client.cluster_status(ClusterStatusRequest {}).await {
                if s.into_inner().serving_epoch > 0 {
                    return Ok(());
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("the cluster did not become ready within 120 s")
}
