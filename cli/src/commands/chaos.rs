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
use moe_model::sampling::Rng;
use moe_model::Engine;
use moe_proto::v1::admin_client::AdminClient;
use moe_proto::v1::{ClusterStatusRequest, ClusterStatusResponse, DrainRequest};
use moe_tooling::{ExpectedAnswer, GreedyLoad, LoadReport, LocalCluster, LocalClusterSpec};
use serde_json::json;

use crate::local::{local_spec, optional_flag, wait_serving};
use crate::router_client::endpoint;

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
            Ok(ExpectedAnswer::from_engine(&engine, ids, args.new_tokens)?)
        })
        .collect()
}

/// How many of each chaos action the soak took.
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
    let cluster = start_cluster(&args)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let router = cluster.router_addr.clone();
    rt.block_on(wait_serving(&router))?;
    let mut soak = Soak {
        cluster,
        rng,
        router,
        started: Instant::now(),
        actions: Actions::default(),
    };
    let (report, longest_stall) = rt.block_on(soak.run(&args, answers))?;
    let status = rt.block_on(final_status(&soak.router));
    println!(
        "{}",
        summary(&soak, &report, longest_stall, status.as_ref())
    );
    drop(soak);
    if report.failed > 0 || report.mismatched > 0 {
        bail!(
            "{} failed and {} mismatched requests",
            report.failed,
            report.mismatched
        );
    }
    Ok(())
}

/// etcd, a router and `--nodes` nodes, polling etcd often so that changes show quickly.
fn start_cluster(args: &ChaosArgs) -> anyhow::Result<LocalCluster> {
    LocalCluster::start(LocalClusterSpec {
        router_args: [
            vec!["--poll-ms".to_string(), "100".to_string()],
            optional_flag("--transport", args.transport),
        ]
        .concat(),
        node_args: vec![
            "--poll-ms".into(),
            "100".into(),
            "--threads".into(),
            args.node_threads.to_string(),
        ],
        show_logs: args.logs,
        ..local_spec(args.model.clone(), args.nodes, "chaos")?
    })
    .context("starting the local cluster")
}

/// The cluster under chaos, and what was done to it.
struct Soak {
    cluster: LocalCluster,
    /// Picks the pauses, the victims and the actions (seeded by `--seed`).
    rng: Rng,
    /// The router's gRPC address (the load's target, and where drains go).
    router: String,
    started: Instant,
    actions: Actions,
}

impl Soak {
    /// Runs checked load for `--duration-secs` while acting on the cluster every
    /// `--interval-ms` or so; returns the load's report and the longest wait for a token.
    async fn run(
        &mut self,
        args: &ChaosArgs,
        answers: Arc<Vec<ExpectedAnswer>>,
    ) -> anyhow::Result<(LoadReport, Option<Duration>)> {
        let load = GreedyLoad::start(vec![self.router.clone()], answers, args.workers, None);
        let duration = Duration::from_secs(args.duration_secs);
        while self.started.elapsed() < duration {
            let pause = args.interval_ms / 2 + self.rng.next_u64() % args.interval_ms.max(1);
            tokio::time::sleep(Duration::from_millis(pause)).await;
            self.act(args.nodes).await?;
        }
        let progress = Arc::clone(&load.progress);
        let report = load.stop().await;
        let stall = progress.longest_stall(self.started, Instant::now());
        Ok((report, stall))
    }

    /// One chaos action: replace a missing node, else SIGKILL, SIGTERM or drain a random one.
    async fn act(&mut self, nodes: usize) -> anyhow::Result<()> {
        for gone in self.cluster.reap_nodes() {
            self.log(format!("{gone} exited"));
        }
        let live = self.cluster.node_ids();
        if live.len() < nodes {
            let id = self.cluster.add_node()?;
            self.actions.joins += 1;
            self.log(format!("started {id}"));
            return Ok(());
        }
        let victim = live[(self.rng.next_u64() % live.len() as u64) as usize].clone();
        match self.rng.next_u64() % 3 {
            0 => {
                self.cluster.kill_node(&victim);
                self.actions.kills += 1;
                self.log(format!("SIGKILL {victim}"));
            }
            1 => {
                self.cluster.terminate_node(&victim);
                self.actions.terminations += 1;
                self.log(format!("SIGTERM {victim}"));
            }
            _ => {
                let mut admin = AdminClient::connect(endpoint(&self.router)).await?;
                let epoch = admin
                    .drain(DrainRequest {
                        node_id: victim.clone(),
                    })
                    .await
                    .map(|r| r.into_inner().epoch);
                self.actions.drains += 1;
                self.log(format!(
                    "drain {victim}: {}",
                    match epoch {
                        Ok(e) => format!("epoch {e}"),
                        Err(s) => format!("{}: {}", s.code(), s.message()),
                    }
                ));
            }
        }
        Ok(())
    }

    /// A line on stderr, stamped with the seconds since the soak began.
    fn log(&self, what: String) {
        eprintln!("[{:>6.1}s] {what}", self.started.elapsed().as_secs_f64());
    }
}

/// The router's status after the soak (`None` if it cannot be read).
async fn final_status(router: &str) -> Option<ClusterStatusResponse> {
    let mut admin = AdminClient::connect(endpoint(router)).await.ok()?;
    admin
        .cluster_status(ClusterStatusRequest {})
        .await
        .ok()
        .map(|r| r.into_inner())
}

/// The one JSON line the soak prints.
fn summary(
    soak: &Soak,
    report: &LoadReport,
    longest_stall: Option<Duration>,
    status: Option<&ClusterStatusResponse>,
) -> serde_json::Value {
    json!({
        "duration_secs": soak.started.elapsed().as_secs_f64(),
        "sent": report.sent,
        "completed": report.completed,
        "failed": report.failed,
        "mismatched": report.mismatched,
        "tokens": report.tokens,
        "kills": soak.actions.kills,
        "terminations": soak.actions.terminations,
        "drains": soak.actions.drains,
        "joins": soak.actions.joins,
        "final_epoch": status.map(|s| s.serving_epoch),
        "layer_retries": status.map(|s| s.layer_retries),
        "serving_transport": status.map(|s| s.serving_transport.clone()),
        "collective_layers": status.map(|s| s.collective_layers),
        "collective_failures": status.map(|s| s.collective_failures),
        "longest_stall_ms": longest_stall.map(|d| d.as_secs_f64() * 1e3),
        "problems": report.problems,
    })
}
