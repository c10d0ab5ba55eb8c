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
    /// The model name `/v1/models` lists and requests must name (default: the checkpoint
    /// directory's name, as routers do).
    #[arg(long, env = "MOE_SERVED_MODEL_NAME")]
    pub served_model_name: Option<String>,
    /// The context a request may use, prompt and answer together, as vLLM's `--max-model-len`
    /// (default and most: the checkpoint's `max_position_embeddings`): longer requests are
    /// refused, a chat or completion without `max_tokens` may run up to it, and `/v1/models`
    /// and `/tokenize` report it.
    #[arg(long, env = "MOE_MAX_MODEL_LEN")]
    pub max_model_len: Option<usize>,
    /// Memory for stored Responses API answers (`store`, `previous_response_id`,
    /// `GET`/`DELETE /v1/responses/{id}`), in bytes: the least recently used go first when it
    /// is full; 0 stores none. Requests sent through the gateway are stored here.
    #[arg(long, env = "MOE_RESPONSES_STORE_BYTES", default_value_t = 64 << 20)]
    pub responses_store_bytes: usize,
    /// vLLM's `--enable-prompt-tokens-details`: OpenAI usage shows
    /// `prompt_tokens_details.cached_tokens`, the prompt tokens served from the prefix cache
    /// (the Responses API's `input_tokens_details` always does).
    #[arg(
        long,
        env = "MOE_ENABLE_PROMPT_TOKENS_DETAILS",
        default_value_t = false,
        action = clap::ArgAction::Set,
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    pub enable_prompt_tokens_details: bool,
    /// A Jinja chat template replacing the checkpoint's (as the routers' flag).
    #[arg(long, env = "MOE_CHAT_TEMPLATE")]
    pub chat_template: Option<PathBuf>,
    /// Send chat answers' reasoning (`<think>...</think>`) apart from their content, as
    /// `reasoning_content` (vLLM's and SGLang's `--reasoning-parser`): `deepseek-r1`
    /// (DeepSeek-R1, QwQ), `qwen3` (`glm45` too: GLM-4.5 follows Qwen3's rule), or
    /// `deepseek-v3` (DeepSeek-V3.1 when a request sets `chat_template_kwargs.thinking`). Off
    /// by default: answers are returned whole.
    #[arg(long, env = "MOE_REASONING_PARSER")]
    pub reasoning_parser: Option<moe_openai::reasoning::ReasoningParser>,
    /// The tool-call syntax answers are read in and forced calls are written in (vLLM's
    /// `--tool-call-parser`): `hermes` (Qwen3), `deepseek-v3`, `deepseek-v31`, `qwen3-coder`
    /// (`qwen3_xml` too), `glm45`, `glm47`. Default: the model's family, DeepSeek-V3.1 told
    /// from V3, Qwen3-Coder from Qwen3 and GLM-4.7 from GLM-4.5 by their chat templates.
    #[arg(long, env = "MOE_TOOL_CALL_PARSER")]
    pub tool_call_parser: Option<moe_openai::tool_calls::ToolCallFormat>,
    /// Prometheus `/metrics` on its own port.
    #[arg(long, env = "MOE_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
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
