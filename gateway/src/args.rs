//! `moe-gateway`'s command line (env `MOE_*`).

use std::path::PathBuf;

use clap::Parser;

use crate::policy::RoutingPolicy;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "moe-gateway",
    about = "One front door for the cluster's routers: routes each request, and moves a stream \
             to another router, token for token, when its router dies, drains or stalls"
)]
pub struct GatewayArgs {
    /// Checkpoint directory: the gateway reads only its tokenizer (prefix-aware routing
    /// hashes token ids), never the weights.
    #[arg(long, env = "MOE_MODEL")]
    pub model: PathBuf,
    /// Public gRPC address (the same `moe.v1.Inference` service a router serves, and
    /// `moe.v1.Gateway`).
    #[arg(long, env = "MOE_GRPC_LISTEN", default_value = "127.0.0.1:50060")]
    pub grpc_listen: String,
    /// The OpenAI-compatible HTTP API (`/v1/models`, `/v1/completions`,
    /// `/v1/chat/completions`, `/health`, `/metrics`), as a router serves it.
    #[arg(long, env = "MOE_HTTP_LISTEN")]
    pub http_listen: Option<String>,
    /// The context a request may use, prompt and answer together, as vLLM's `--max-model-len`
    /// (default and most: the checkpoint's `max_position_embeddings`): longer requests are
    /// refused, a chat or completion without `max_tokens` may run up to it, and `/v1/models`
    /// and `/tokenize` report it.
    #[arg(long, env = "MOE_MAX_MODEL_LEN")]
    pub max_model_len: Option<usize>,
    /// Prometheus `/metrics` on its own port.
    #[arg(long, env = "MOE_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    /// `--served-model-name`, `--chat-template`, `--reasoning-parser`, `--tool-call-parser`,
    /// `--responses-store-bytes`, `--enable-prompt-tokens-details`.
    #[command(flatten)]
    pub openai: moe_openai::serving_flags::OpenAiFlags,
    /// Which router gets a new request. `cache-aware`: the router that last served the
    /// longest prefix of its prompt (its KV blocks are likely still cached there), unless
    /// that router is loaded well above the least loaded one; `least-load`: the router with
    /// the fewest running and waiting requests; `round-robin`: each in turn.
    #[arg(long, env = "MOE_POLICY", value_enum, default_value_t = RoutingPolicy::CacheAware)]
    pub policy: RoutingPolicy,
    /// With `cache-aware`: how many more requests than the least loaded router the prefix's
    /// router may hold and still be chosen.
    #[arg(long, env = "MOE_CACHE_IMBALANCE", default_value_t = 8)]
    pub cache_imbalance: u32,
    /// A stream whose router sends nothing for this long after its first token moves to
    /// another router (0: never; a router that dies or drains is noticed at once anyway).
    #[arg(long, env = "MOE_STALL_TIMEOUT_MS", default_value_t = 30_000)]
    pub stall_timeout_ms: u64,
    /// Times one stream may move to another router before it fails.
    #[arg(long, env = "MOE_MIGRATION_LIMIT", default_value_t = 3)]
    pub migration_limit: u32,
    /// How long a request waits for a router to be available (none registered, or all
    /// failing) before it fails with UNAVAILABLE.
    #[arg(long, env = "MOE_RECOVERY_TIMEOUT_MS", default_value_t = 30_000)]
    pub recovery_timeout_ms: u64,
    /// A router whose call failed is avoided this long (or until it registers anew).
    #[arg(long, env = "MOE_ROUTER_BACKOFF_MS", default_value_t = 5_000)]
    pub router_backoff_ms: u64,
    /// Each router's `grpc.health.v1` is checked this often; one that errs or hangs is
    /// avoided as a failed call is (0: no checks, failed calls only).
    #[arg(long, env = "MOE_HEALTH_CHECK_INTERVAL_MS", default_value_t = 2_000)]
    pub health_check_interval_ms: u64,
    /// How long a router may take to answer its health check.
    #[arg(long, env = "MOE_HEALTH_CHECK_TIMEOUT_MS", default_value_t = 1_000)]
    pub health_check_timeout_ms: u64,
    /// Largest prompt accepted, in bytes (text, before tokenization).
    #[arg(long, env = "MOE_MAX_PROMPT_BYTES", default_value_t = 1 << 20)]
    pub max_prompt_bytes: usize,
    /// `--api-key-file` (clients), `--admin-key-file` (`DrainRouter`; the key is passed on to
    /// the router, which checks its own).
    #[command(flatten)]
    pub keys: moe_cluster::api_keys::KeyFileArgs,
    /// `--max-connections`, `--max-tls-handshakes`, `--max-streams-per-connection`.
    #[command(flatten)]
    pub ports: moe_cluster::listener::PublicPortArgs,
    /// Gateway id (logs, traces); defaults to `gateway-<grpc port>`.
    #[arg(long, env = "MOE_GATEWAY_ID")]
    pub gateway_id: Option<String>,
    #[command(flatten)]
    pub etcd: moe_cluster::EtcdArgs,
    #[command(flatten)]
    pub telemetry: moe_cluster::telemetry::TelemetryArgs,
    /// TLS on the gateway's own public port.
    #[command(flatten)]
    pub public_tls: moe_cluster::tls::PublicTlsArgs,
    /// CA (PEM) that signed the routers' public certificates (their `--tls-cert`): reach
    /// them over TLS.
    #[arg(long, env = "MOE_ROUTER_TLS_CA")]
    pub router_tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for routers that require one (their `--tls-client-ca`).
    #[arg(long, env = "MOE_ROUTER_TLS_CERT")]
    pub router_tls_cert: Option<PathBuf>,
    /// Private key (PEM) of `--router-tls-cert`.
    #[arg(long, env = "MOE_ROUTER_TLS_KEY")]
    pub router_tls_key: Option<PathBuf>,
    /// The cluster token: the gateway proves it to each router (routers need no API key
    /// from it).
    #[command(flatten)]
    pub cluster_auth: moe_cluster::exposure::ClusterAuthArgs,
}
