//! `moe up --model DIR --nodes N`: etcd (from PATH), a router and N expert nodes as child
//! processes on free loopback ports; prints the endpoint; stops them all on Ctrl-C.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use moe_cluster::local::{LocalCluster, LocalClusterSpec};
use moe_proto::v1::admin_client::AdminClient;
use moe_proto::v1::ClusterStatusRequest;

use super::remote::{endpoint, runtime};

#[derive(Args)]
pub struct UpArgs {
    #[arg(long, env = "MOE_MODEL")]
    model: PathBuf,
    #[arg(long, default_value_t = 2)]
    nodes: usize,
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
}

impl UpArgs {
    /// Flags every process of the cluster gets (device choice).
    fn device_args(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(d) = self.device {
            out.extend(["--device".to_string(), d.to_string()]);
        }
        if let Some(t) = self.gpu_dtype {
            out.extend(["--gpu-dtype".to_string(), t.to_string()]);
        }
        out
    }
}

pub fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe.with_file_name(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    if !path.exists() {
        bail!(
            "{} not found next to moe; build the workspace binaries (cargo build --release --bins)",
            path.display()
        );
    }
    Ok(path)
}

pub fn find_in_path(name: &str) -> anyhow::Result<PathBuf> {
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|p| p.join(name))
                .find(|p| p.exists())
        })
        .with_context(|| format!("{name} is not on PATH (Debian: apt-get install etcd-server)"))
}

pub fn run(args: UpArgs) -> anyhow::Result<()> {
    let cluster = LocalCluster::start(LocalClusterSpec {
        etcd_bin: find_in_path("etcd")?,
        router_bin: sibling("moe-router")?,
        node_bin: sibling("moe-expert-node")?,
        model: args.model.clone(),
        nodes: args.nodes,
        cluster: args.cluster.clone(),
        router_args: args
            .transport
            .map(|t| vec!["--transport".to_string(), t.to_string()])
            .unwrap_or_default()
            .into_iter()
            .chain(args.device_args())
            .collect(),
        node_args: args
            .node_threads
            .map(|t| vec!["--threads".to_string(), t.to_string()])
            .unwrap_or_default()
            .into_iter()
            .chain(args.device_args())
            .collect(),
        show_logs: args.logs,
        etcd_tls: None,
    })
    .context("starting the local cluster")?;
    let rt = runtime()?;
    let addr = cluster.router_addr.clone();
    let epoch = rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            if let Ok(mut client) = AdminClient::connect(endpoint(&addr)).await {
                if let Ok(status) = client.cluster_status(ClusterStatusRequest {}).await {
                    let epoch = status.into_inner().serving_epoch;
                    if epoch > 0 {
                        return Ok(epoch);
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("the cluster did not become ready within 120 s")
    })?;
    println!(
        "router {addr} (etcd {}, {} nodes, placement epoch {epoch})",
        cluster.etcd_url, args.nodes
    );
    println!("try: moe generate --router {addr} --prompt \"Hello\" --max-new-tokens 16");
    println!(
        "members share the cluster token in {} (more nodes: moe-expert-node ... --cluster-token-file <it>)",
        cluster.token_file().path().display()
    );
    println!("Ctrl-C (or SIGTERM) stops everything.");
    // Ctrl-C or SIGTERM: stop every child (dropping the cluster), never leave them behind.
    rt.block_on(async {
        #[cfg(unix)]
        if let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
        let _ = tokio::signal::ctrl_c().await;
    });
    drop(cluster);
    Ok(())
}
