//! Command line of `moe-expert-node`.

use std::path::PathBuf;

use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    name = "moe-expert-node",
    version,
    about = "Serves a subset of a MoE model's experts"
)]
pub struct Args {
    /// Checkpoint directory (Hugging Face layout); only assigned experts are read.
    #[arg(long, env = "MOE_MODEL")]
    pub model: PathBuf,
    /// Data-plane listen address; port 0 picks a free port (the real one is advertised).
    #[arg(long, env = "MOE_LISTEN", default_value = "127.0.0.1:0")]
    pub listen: String,
    /// Address to advertise instead of the bound one (behind NAT or in containers).
    #[arg(long, env = "MOE_ADVERTISE")]
    pub advertise: Option<String>,
    #[command(flatten)]
    pub etcd: moe_cluster::EtcdArgs,
    #[command(flatten)]
    pub telemetry: moe_cluster::telemetry::TelemetryArgs,
    #[command(flatten)]
    pub cluster_tls: moe_cluster::tls::ClusterTlsArgs,
    #[command(flatten)]
    pub cluster_auth: moe_cluster::exposure::ClusterAuthArgs,
    /// Unique id of this node (default: `node-<port>`).
    #[arg(long, env = "MOE_NODE_ID")]
    pub node_id: Option<String>,
    /// TTL of the membership lease: a dead node disappears this long after its last keep-alive.
    #[arg(long, env = "MOE_LEASE_TTL_SECS", default_value_t = 3)]
    pub lease_ttl_secs: u64,
    /// Prometheus `/metrics` address (off unless given).
    #[arg(long, env = "MOE_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    /// Memory offered for experts, in bytes (advertised to the planner).
    #[arg(long, env = "MOE_MEMORY_BYTES", default_value_t = 0)]
    pub memory_bytes: u64,
    /// Token rows one dispatch may bring (per MoE layer, per router): published in etcd so
    /// routers never send more, and the bound every frame is checked against before anything
    /// is allocated for it. The data plane's message limits follow from it and the model's
    /// hidden size. The default matches the router's default `--max-batch-tokens`.
    #[arg(long, env = "MOE_MAX_BATCH_ROWS", default_value_t = 512,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_batch_rows: u32,
    /// Data-plane connections open at once at most (routers hold one each); more are closed
    /// as soon as they are accepted.
    #[arg(long, env = "MOE_MAX_CONNECTIONS", default_value_t = 64)]
    pub max_connections: usize,
    /// Concurrent streams per data-plane connection (a router opens one per node).
    #[arg(long, env = "MOE_MAX_STREAMS_PER_CONNECTION", default_value_t = 8)]
    pub max_streams_per_connection: u32,
    /// On SIGTERM or a drain request, how long to wait for the routers to move off this node
    /// before leaving anyway.
    #[arg(long, env = "MOE_DRAIN_TIMEOUT_SECS", default_value_t = 60)]
    pub drain_timeout_secs: u64,
    /// Where the experts' math runs (`--device`, `--gpu-dtype`).
    #[command(flatten)]
    pub device: moe_cluster::DeviceArgs,
    /// Math threads (default: all cores).
    #[arg(long, env = "MOE_THREADS")]
    pub threads: Option<usize>,
}
