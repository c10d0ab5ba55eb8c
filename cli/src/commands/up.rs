//! `moe up --model DIR --nodes N [--routers R]`: etcd (from PATH), R routers and N expert
//! nodes as child processes on free loopback ports, and with R > 1 a `moe-gateway` in front of
//! the routers; prints the gRPC and OpenAI HTTP endpoints; stops them all on Ctrl-C.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use moe_tooling::{LocalCluster, LocalClusterSpec};

use crate::local::{local_spec, optional_flag, sibling, wait_serving};
use crate::router_client::runtime;

#[derive(Args)]
pub struct UpArgs {
    #[arg(long, env = "MOE_MODEL")]
    model: PathBuf,
    #[arg(long, default_value_t = 2)]
    nodes: usize,
    /// Routers; more than one start a gateway in front of them (the address to use then).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=16))]
    routers: u32,
    #[arg(long, env = "MOE_CLUSTER", default_value = "local")]
    cluster: String,
    /// Show the children's logs.
    #[arg(long)]
    logs: bool,
    /// Math threads per expert node (co-located nodes share the machine's cores).
    #[arg(long)]
    node_threads: Option<usize>,
    /// The router's data plane (`grpc`, or one `tcp` collective per epoch); default: the
    /// router's own (`MOE_TRANSPORT`, else gRPC).
    #[arg(long)]
    transport: Option<moe_cluster::collective::Transport>,
    /// Where the router's dense part and the nodes' experts run (`cpu`, `cuda:N`; a build with
    /// `--features cuda`); default: each binary's own (`MOE_DEVICE`, else the CPU).
    #[arg(long)]
    device: Option<moe_model::device::Device>,
    /// Numerics on a GPU (`bf16x2`, `bf16`, `f32`); default: each binary's own
    /// (`MOE_GPU_DTYPE`, else bf16x2).
    #[arg(long)]
    gpu_dtype: Option<moe_model::device::GpuDtype>,
    /// The routers' speculative decoding (vLLM's JSON, `{"method": "ngram", ...}`); default:
    /// each router's own (`MOE_SPECULATIVE_CONFIG`, else none).
    #[arg(long)]
    speculative_config: Option<String>,
    /// Where the router serves the OpenAI-compatible HTTP API (port 0: a free one).
    #[arg(long, env = "MOE_HTTP_LISTEN", default_value = "127.0.0.1:0")]
    http_listen: String,
}

impl UpArgs {
    /// Flags every process of the cluster gets (device choice).
    fn device_args(&self) -> Vec<String> {
        [
            optional_flag("--device", self.device),
            optional_flag("--gpu-dtype", self.gpu_dtype),
        ]
        .concat()
    }
}

pub fn run(args: UpArgs) -> anyhow::Result<()> {
    let cluster = LocalCluster::start(LocalClusterSpec {
        router_args: [
            optional_flag("--transport", args.transport),
            optional_flag("--speculative-config", args.speculative_config.as_deref()),
            vec!["--http-listen".to_string(), args.http_listen.clone()],
            args.device_args(),
        ]
        .concat(),
        node_args: [
            optional_flag("--threads", args.node_threads),
            args.device_args(),
        ]
        .concat(),
        show_logs: args.logs,
        ..local_spec(args.model.clone(), args.nodes, &args.cluster)?
    })
    .context("starting the local cluster")?;
    let rt = runtime()?;
    let addr = cluster.router_addr.clone();
    let epoch = rt.block_on(wait_serving(&addr))?;
    println!(
        "router {addr} (etcd {}, {} nodes, placement epoch {epoch})",
        cluster.etcd_url, args.nodes
    );
    println!("try: moe generate --router {addr} --prompt \"Hello\" --max-new-tokens 16");
    let mut cluster = cluster;
    if args.routers > 1 {
        // Each router gets the same flags (a fixed --http-listen port would collide).
        for _ in 1..args.routers {
            let more = cluster.add_router(&[]).context("starting a router")?;
            let epoch = rt.block_on(wait_serving(&more))?;
            println!("router {more} (placement epoch {epoch})");
        }
        let gateway_args = ["--http-listen".to_string(), "127.0.0.1:0".to_string()];
        let addrs = cluster
            .add_gateway(&sibling("moe-gateway")?, &gateway_args)
            .context("starting the gateway")?;
        let gateway = addrs.grpc;
        println!(
            "gateway {gateway} in front of {} routers: send requests here",
            args.routers
        );
        if let Some(http) = addrs.http {
            println!("gateway openai http://{http}/v1 (a stream moves on if its router dies)");
        }
        println!("try: moe generate --router {gateway} --prompt \"Hello\" --max-new-tokens 16");
        println!("     moe status --gateway {gateway}");
    }
    if let Some(http) = &cluster.router_http_addr {
        println!("openai http://{http}/v1 (models, completions, chat/completions)");
        println!(
            "try: curl -s http://{http}/v1/completions -H 'Content-Type: application/json' \\\n  -d '{{\"prompt\": \"Hello\", \"max_tokens\": 16}}'"
        );
    }
    println!(
        "members share the cluster token in {} (more nodes: moe-expert-node ... --cluster-token-file <it>)",
        cluster.token_file().path().display()
    );
    println!("Ctrl-C (or SIGTERM) stops everything.");
    // Ctrl-C or SIGTERM: stop every child (dropping the cluster), never leave them behind.
    rt.block_on(moe_cluster::shutdown::signal());
    drop(cluster);
    Ok(())
}
