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
    /// OpenAI-compatible HTTP address (`/v1/completions`, `/v1/chat/completions`, `/v1/models`,
    /// `/health`); off unless given. Port 0 picks a free port.
    #[arg(long, env = "MOE_HTTP_LISTEN")]
    pub http_listen: Option<String>,
    /// Prometheus `/metrics` on its own address (it is also on the HTTP API port).
    #[arg(long, env = "MOE_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    /// `--served-model-name`, `--chat-template`, `--reasoning-parser`, `--tool-call-parser`,
    /// `--responses-store-bytes`, `--enable-prompt-tokens-details`.
    #[command(flatten)]
    pub openai: moe_openai::serving_flags::OpenAiFlags,
    /// `--api-key-file`, `--admin-key-file`.
    #[command(flatten)]
    pub keys: moe_cluster::api_keys::KeyFileArgs,
    /// `--max-connections`, `--max-tls-handshakes`, `--max-streams-per-connection`.
    #[command(flatten)]
    pub ports: moe_cluster::listener::PublicPortArgs,
    /// The context a request may use, prompt and answer together, as vLLM's `--max-model-len`
    /// (default and most: the checkpoint's `max_position_embeddings`): longer requests are
    /// refused, a chat or completion without `max_tokens` may run up to it, and `/v1/models`
    /// and `/tokenize` report it.
    #[arg(long, env = "MOE_MAX_MODEL_LEN")]
    pub max_model_len: Option<usize>,
    /// Longest prompt accepted, in tokens (default: the model's context length).
    #[arg(long, env = "MOE_MAX_PROMPT_TOKENS")]
    pub max_prompt_tokens: Option<usize>,
    /// Longest prompt accepted, in bytes, checked before any tokenizer call: the gRPC `prompt`,
    /// the Tokenize RPC's text, the completions prompt, and a chat request's messages together
    /// (roles and contents, before templating); over it: INVALID_ARGUMENT / HTTP 400. Default:
    /// `--max-prompt-tokens` x (the vocabulary's longest token in bytes + 1), so that no
    /// ordinary text the token limit accepts is refused, capped at the 4 MiB HTTP body limit.
    #[arg(long, env = "MOE_MAX_PROMPT_BYTES")]
    pub max_prompt_bytes: Option<usize>,
    /// Deadline for one request from admission to its last token; past it the request ends
    /// with DEADLINE_EXCEEDED (HTTP 504) and frees its KV cache.
    #[arg(long, env = "MOE_REQUEST_TIMEOUT_MS", default_value_t = 600_000)]
    pub request_timeout_ms: u64,
    /// Once the router drains (SIGTERM, `moe drain-router`), how long a gateway's stream may
    /// go on before it ends with the draining status for the gateway to resume elsewhere: a
    /// request about to finish ends here instead of being prefilled again. Direct clients'
    /// streams always run to their end.
    #[arg(long, env = "MOE_DRAIN_GRACE_MS", default_value_t = 500)]
    pub drain_grace_ms: u64,
    /// Where the dense part runs (attention and its KV cache, norms, gate, shared experts,
    /// lm_head): `--device`, `--gpu-dtype`.
    #[command(flatten)]
    pub device: moe_cluster::DeviceArgs,
    /// Serve the whole model from this process: the routed experts run on this many expert
    /// nodes that are threads of it (experts dealt round-robin), reached over the in-process
    /// layer exchange, on `--device` beside the dense part (on a GPU a layer's rows never
    /// leave it). No etcd, placement or data plane then: the etcd, cluster-credential and
    /// `--transport` flags do not apply. 0 (the default) serves the cluster's expert nodes.
    #[arg(long, env = "MOE_IN_PROCESS_NODES", default_value_t = 0,
          conflicts_with_all = ["transport", "collective_listen", "collective_advertise_host"],
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(0..=64))]
    pub in_process_nodes: usize,
    #[command(flatten)]
    pub etcd: moe_cluster::EtcdArgs,
    #[command(flatten)]
    pub telemetry: moe_cluster::telemetry::TelemetryArgs,
    #[command(flatten)]
    pub public_tls: moe_cluster::tls::PublicTlsArgs,
    #[command(flatten)]
    pub cluster_tls: moe_cluster::tls::ClusterTlsArgs,
    #[command(flatten)]
    pub cluster_auth: moe_cluster::exposure::ClusterAuthArgs,
    /// Tokens processed per step (decodes first, then prefill chunks). It bounds the rows of
    /// one MoE layer's dispatch, so the data plane's message limits follow from it and the
    /// model's hidden size (a value whose messages would pass 1 GiB is refused at start);
    /// nodes that publish a smaller `--max-batch-rows` get a layer in several batches.
    #[arg(long, env = "MOE_MAX_BATCH_TOKENS", default_value_t = 512,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub max_batch_tokens: usize,
    /// Sequences decoded together at most.
    #[arg(long, env = "MOE_MAX_RUNNING", default_value_t = 64)]
    pub max_running: usize,
    /// Micro-batches a step is split into and run at once, so that while one's MoE layer is
    /// at the expert nodes the others' attention runs here (two-batch overlap, as SGLang's
    /// `--enable-two-batch-overlap`); 1 runs each step as one batch. Tokens are the same
    /// either way.
    #[arg(long, env = "MOE_MICRO_BATCHES", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=4))]
    pub micro_batches: u32,
    /// Requests waiting for admission at most; more are refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "MOE_MAX_WAITING", default_value_t = 256)]
    pub max_waiting: usize,
    /// The waiting queue's order, as vLLM's `--scheduling-policy`: `fcfs` (arrival order; a
    /// request's non-zero `priority` is refused) or `priority` (lowest `priority` first, equal
    /// ones in arrival order; a request that does not fit preempts less urgent running ones,
    /// which resume where they stopped with the same tokens).
    #[arg(long, env = "MOE_SCHEDULING_POLICY", value_enum, default_value_t = SchedulingPolicy::Fcfs)]
    pub scheduling_policy: SchedulingPolicy,
    /// Speculative decoding, as vLLM's `--speculative-config` JSON: `{"method": "ngram",
    /// "num_speculative_tokens": K, "prompt_lookup_min": A, "prompt_lookup_max": B,
    /// "disable_by_batch_size": N}` (prompt lookup: each decoding sequence feeds up to K draft
    /// tokens that followed its latest A- to B-token suffix earlier in it, checked in the same
    /// step). Tokens and logprobs are bitwise those without it, greedy or sampled; steps are
    /// saved when drafts agree. Off unless given.
    #[arg(long, env = "MOE_SPECULATIVE_CONFIG")]
    pub speculative_config: Option<crate::speculative::SpeculativeConfig>,
    /// KV-cache memory budget in bytes.
    #[arg(long, env = "MOE_KV_CACHE_BYTES", default_value_t = 1 << 30)]
    pub kv_cache_bytes: u64,
    /// Default sampling for the fields a request leaves unset, as vLLM's
    /// `--generation-config`: `auto` (the checkpoint's `generation_config.json`: its
    /// temperature, top_p, top_k, min_p and repetition_penalty, as its creators recommend, and
    /// its max_new_tokens as chat's default max_tokens), `vllm` (none: the API's own defaults,
    /// temperature 1), or a folder holding a `generation_config.json` (its max_new_tokens
    /// then also caps every request, as vLLM's).
    #[arg(long, env = "MOE_GENERATION_CONFIG", default_value = "auto")]
    pub generation_config: String,
    /// JSON fields set over `--generation-config`'s, as vLLM's flag: `temperature`,
    /// `top_p`, `top_k`, `min_p`, `repetition_penalty`, and `max_new_tokens` (the default
    /// `max_tokens` of a chat request that gives none, and a cap on every request's output).
    #[arg(long, env = "MOE_OVERRIDE_GENERATION_CONFIG")]
    pub override_generation_config: Option<String>,
    /// Tokens per KV-cache block.
    #[arg(long, env = "MOE_KV_BLOCK_TOKENS", default_value_t = 16)]
    pub kv_block_tokens: usize,
    /// Keep full prompt blocks' KV after their request, so later requests that share the
    /// prefix prefill only the rest (the dense part on the CPU or a GPU;
    /// `--prefix-caching=false` to turn it off).
    #[arg(
        long,
        env = "MOE_PREFIX_CACHING",
        default_value_t = true,
        action = clap::ArgAction::Set,
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    pub prefix_caching: bool,
    /// Deadline for one dispatch round trip to a node; a miss makes the node suspect.
    #[arg(long, env = "MOE_DISPATCH_TIMEOUT_MS", default_value_t = 10_000)]
    pub dispatch_timeout_ms: u64,
    /// How long requests wait for the cluster to recover (a new placement after a node
    /// failed, or a first placement) before they fail with UNAVAILABLE.
    #[arg(long, env = "MOE_RECOVERY_TIMEOUT_MS", default_value_t = 60_000)]
    pub recovery_timeout_ms: u64,
    /// Unique id of this router among the routers sharing the nodes (default: `router-<port>`).
    #[arg(long, env = "MOE_ROUTER_ID")]
    pub router_id: Option<String>,
    /// TTL of the router's lease, which also holds the planner election.
    #[arg(long, env = "MOE_LEASE_TTL_SECS", default_value_t = 3)]
    pub lease_ttl_secs: u64,
    /// How long a node whose dispatch failed is kept out of placements (unless it restarts or
    /// its lease ends first).
    #[arg(long, env = "MOE_SUSPECT_TTL_SECS", default_value_t = 30)]
    pub suspect_ttl_secs: u64,
    /// After reconnecting to etcd, nodes missing from it keep their experts this long (they
    /// are re-registering).
    #[arg(long, env = "MOE_MEMBERSHIP_GRACE_MS", default_value_t = 5_000)]
    pub membership_grace_ms: u64,
    /// Rebalance when max node load / mean node load over a window exceeds this (0: never).
    #[arg(long, env = "MOE_REBALANCE_THRESHOLD", default_value_t = 1.5)]
    pub rebalance_threshold: f64,
    /// Load window over which the imbalance is measured.
    #[arg(long, env = "MOE_REBALANCE_WINDOW_MS", default_value_t = 30_000)]
    pub rebalance_window_ms: u64,
    /// Fewest (token, expert) pairs in a window for it to count.
    #[arg(long, env = "MOE_REBALANCE_MIN_PAIRS", default_value_t = 2_000)]
    pub rebalance_min_pairs: u64,
    /// Extra copies of hot experts per MoE layer a rebalance may place (default: experts / 8).
    #[arg(long, env = "MOE_REDUNDANT_EXPERTS")]
    pub redundant_experts: Option<usize>,
    /// Exchanges per MoE layer a rebalance may make between a layer's busiest node and
    /// another, each moving a hot expert's copy for a colder one, so even unreplicated experts
    /// move off a node that holds several (default: experts / 8; 0: replicas only).
    #[arg(long, env = "MOE_REBALANCE_MAX_SWAPS")]
    pub rebalance_max_swaps: Option<usize>,
    /// Data plane to the expert nodes: `grpc` (a stream per node), or one collective per
    /// placement epoch over `tcp` (CPU clusters; no TLS) or `nccl` (GPUs). An epoch uses the
    /// collective once every node of it has joined, and gRPC before that, when some node
    /// cannot join, and after a failure.
    #[arg(long, env = "MOE_TRANSPORT", default_value = "grpc")]
    pub transport: moe_cluster::collective::Transport,
    /// Where the TCP collective listens (port 0: one free port per epoch). Default: the IP of
    /// `--grpc-listen`.
    #[arg(long, env = "MOE_COLLECTIVE_LISTEN")]
    pub collective_listen: Option<String>,
    /// Host published for the TCP collective instead of the bound IP (wildcard bind, NAT).
    #[arg(long, env = "MOE_COLLECTIVE_ADVERTISE_HOST")]
    pub collective_advertise_host: Option<String>,
    /// GPU of the router's NCCL rank (`--transport nccl`).
    #[arg(long, env = "MOE_COLLECTIVE_GPU", default_value_t = 0)]
    pub collective_gpu: usize,
    /// Math threads (default: all cores).
    #[arg(long, env = "MOE_THREADS")]
    pub threads: Option<usize>,
}

/// How waiting requests are ordered (`--scheduling-policy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SchedulingPolicy {
    Fcfs,
    Priority,
}
