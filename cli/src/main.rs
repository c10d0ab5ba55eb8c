//! `moe`: the command line of the MoE serving cluster. Each subcommand lives in its own module
//! under `commands/`; those that talk to a router share `router_client`, those that start a
//! local cluster share `local`.

mod commands;
mod local;
mod router_client;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "moe",
    version,
    about = "Mixture-of-Experts inference: offline engine and tools"
)]
struct Cli {
    /// Worker threads for the math (default: all cores).
    #[arg(long, global = true, env = "MOE_THREADS")]
    threads: Option<usize>,
    #[command(flatten)]
    tls: router_client::RouterTls,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate tokens from a prompt with the offline engine.
    Generate(commands::generate::GenerateArgs),
    /// Write a random checkpoint in the Hugging Face hub layout.
    GenCheckpoint(commands::gen_checkpoint::GenCheckpointArgs),
    /// Measure offline prefill and decode throughput and latency.
    Bench(commands::bench::BenchArgs),
    /// Show a router's cluster status (placement, nodes, experts), or a gateway's routers.
    Status(commands::status::StatusArgs),
    /// Start etcd, a router and N expert nodes locally; stop them all on Ctrl-C.
    Up(commands::up::UpArgs),
    /// Drain an expert node: re-place its experts, then let it exit.
    Drain(commands::drain::DrainArgs),
    /// Drain a router: its streams move to other routers behind the gateway, then it exits.
    DrainRouter(commands::drain_router::DrainRouterArgs),
    /// Kill, restart and drain nodes of a local cluster under checked load; report losses.
    Chaos(commands::chaos::ChaosArgs),
    /// Measure expert-FFN TFLOP/s on a GPU (DeepSeek-V3 shapes) against a dense GEMM.
    GpuBench(commands::gpu_bench::GpuBenchArgs),
    /// Write a deployment's secrets (cluster token, admin key, API key, etcd password).
    GenSecrets(commands::gen_secrets::GenSecretsArgs),
    /// Lay a checkpoint out on GPU machines and project its decode and prefill speed.
    Plan(commands::plan::PlanArgs),
}

fn main() -> anyhow::Result<()> {
    moe_model::backend::keep_freed_memory();
    moe_cluster::config::init_logging("warn");
    let cli = Cli::parse();
    router_client::set_tls(cli.tls);
    if let Some(threads) = cli.threads {
        rayon_threads(threads)?;
    }
    match cli.command {
        Command::Generate(args) => commands::generate::run(args),
        Command::GenCheckpoint(args) => commands::gen_checkpoint::run(args),
        Command::Bench(args) => commands::bench::run(args),
        Command::Status(args) => commands::status::run(args),
        Command::Up(args) => commands::up::run(args),
        Command::Drain(args) => commands::drain::run(args),
        Command::DrainRouter(args) => commands::drain_router::run(args),
        Command::Chaos(args) => commands::chaos::run(args),
        Command::GpuBench(args) => commands::gpu_bench::run(args),
        Command::GenSecrets(args) => commands::gen_secrets::run(args),
        Command::Plan(args) => commands::plan::run(args),
    }
}

fn rayon_threads(threads: usize) -> anyhow::Result<()> {
    moe_model::backend::set_threads(threads)
        .map_err(|e| anyhow::anyhow!("cannot set {threads} threads: {e}"))
}
