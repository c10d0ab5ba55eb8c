//! Command line of `moe-router`: one typed struct, every flag also a `MOE_*` variable.

use std::path::PathBuf;

use clap::Parser;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "moe-router",
    version,
    about = "Serves a MoE model: dense part here, experts on expert nodes"
)]
pub struct Args {
    /// Checkpoint directory (Hugging Face layout); the router loads everything but the routed experts.
    #[arg(long, env = "MOE_MODEL")]
    pub model: PathBuf,
    /// Public gRPC address (Inference, Admin, health, reflection); port 0 picks a free port.
    #[arg(long, env = "MOE_GRPC_LISTEN", default_value = "127.0.0.1:50051")]
    pub grpc_listen: String,
    #[command(flatten)]
    pub etcd: moe_cluster::EtcdArgs,
    /// Tokens processed per step (decodes first, then prefill chunks).
    #[arg(long, env = "MOE_MAX_BATCH_TOKENS", default_value_t = 512)]
    pub max_batch_tokens: usize,
    /// Sequences decoded together at most.
    #[arg(long, env = "MOE_MAX_RUNNING", default_value_t = 64)]
    pub max_running: usize,
    /// Requests waiting for admission at most; more are refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "MOE_MAX_WAITING", default_value_t = 256)]
    pub max_waiting: usize,
    /// KV-cache memory budget in bytes.
    #[arg(long, env = "MOE_KV_CACHE_BYTES", default_value_t = 1 << 30)]
    pub kv_cache_bytes: u64,
    /// Tokens per KV-cache block.
    #[arg(long, env = "MOE_KV_BLOCK_TOKENS", default_value_t = 16)]
    pub kv_block_tokens: usize,
    /// Deadline for one dispatch round trip to the expert nodes.
    #[arg(long, env = "MOE_DISPATCH_TIMEOUT_MS", default_value_t = 30_000)]
    pub dispatch_timeout_ms: u64,
    /// Math threads (default: all cores).
    #[arg(long, env = "MOE_THREADS")]
    pub threads: Option<usize>,
}
