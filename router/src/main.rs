//! `moe-router`: the binary. The pieces live in the `moe_router` library (see its docs).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use moe_model::checkpoint::Checkpoint;
use moe_model::dense::{load_dense, DenseStep};
use moe_model::experts::ExpertSet;
use moe_model::mtp::MtpHead;
use moe_model::tokenizer::Tokenizer;
use moe_model::ModelConfig;
use moe_proto::v1::admin_server::AdminServer;
use moe_proto::v1::inference_server::InferenceServer;
use tonic::server::NamedService;
use tonic_health::pb::health_server::{Health, HealthServer};

use moe_cluster::auth::StreamGate;
use moe_cluster::dispatch_rules::DispatchRules;
use moe_cluster::exposure::MemberCredentials;
use moe_cluster::listener::{accept_bounded, ConnectionLimits};
use moe_cluster::shutdown::Shutdown;
use moe_cluster::tls::PublicTls;
use moe_model::kv_cache::{KvLayout, KvPool};
use moe_openai as http;
use moe_router::cluster_view::ClusterView;
use moe_router::collective::CollectiveSettings;
use moe_router::expert_reach::{ExpertReach, InProcessExperts};
use moe_router::generation_defaults::GenerationDefaults;
use moe_router::inference_access::InferenceAccess;
use moe_router::kv_blocks::KvBlocks;
use moe_router::prefix_cache::PrefixCache;
use moe_router::request_metrics::RequestMetrics;
use moe_router::scheduler::{Scheduler, SchedulerConfig, SchedulerStats};
use moe_router::{admission, api_keys, args, dispatch, metrics, planner, server, validation};

/// `--transport` and where its rank 0 listens; refuses what cannot work before serving.
fn collective_settings(
    args: &args::Args,
    grpc: std::net::SocketAddr,
    mutual_tls: bool,
    config: &ModelConfig,
    token: Option<moe_cluster::auth::ClusterToken>,
) -> anyhow::Result<CollectiveSettings> {
    use moe_cluster::collective::{FrameBounds, RootSettings, Transport};
    if args.transport == Transport::Tcp && mutual_tls {
        anyhow::bail!(
            "--transport tcp carries no TLS; with --cluster-ca/--cluster-cert use the gRPC data plane \
             (--transport grpc)"
        );
    }
    #[cfg(feature = "cuda")]
    let nccl_gpu = if args.transport == Transport::Nccl {
        let gpu = moe_model::gpu::GpuContext::open(
            args.collective_gpu,
            moe_model::device::GpuDtype::default(),
        )
        .with_context(|| format!("opening GPU {} for NCCL", args.collective_gpu))?;
        let stream = gpu.stream().context().new_stream()?;
        Some(moe_cluster::collective::NcclGpu { gpu, stream })
    } else {
        None
    };
    #[cfg(not(feature = "cuda"))]
    if args.transport == Transport::Nccl {
        anyhow::bail!(
            "--transport nccl needs a build with --features cuda (GPU {} asked)",
            args.collective_gpu
        );
    }
    let tcp_bind = args
        .collective_listen
        .clone()
        .unwrap_or_else(|| std::net::SocketAddr::new(grpc.ip(), 0).to_string());
    let wildcard = tcp_bind
        .parse::<std::net::SocketAddr>()
        .is_ok_and(|a| a.ip().is_unspecified());
    if args.transport == Transport::Tcp && wildcard && args.collective_advertise_host.is_none() {
        tracing::warn!(
            %tcp_bind,
            "the TCP collective listens on a wildcard address and will publish it as is; \
             nodes on other hosts need --collective-advertise-host"
        );
    }
    // Outputs of a whole batch (rows ≤ --max-batch-tokens) from one node.
    let max_frame_bytes = FrameBounds::new(
        args.max_batch_tokens.max(1),
        config.hidden_size,
        config.moe.top_k,
    )
    .to_router;
    #[allow(unused_mut)] // set below where CUDA is built in
    let mut root = RootSettings::new(
        tcp_bind,
        args.collective_advertise_host.clone(),
        token,
        max_frame_bytes,
    );
    #[cfg(feature = "cuda")]
    {
        root.nccl_gpu = nccl_gpu;
    }
    Ok(CollectiveSettings {
        transport: args.transport,
        root,
        timeout: Duration::from_millis(args.dispatch_timeout_ms),
    })
}

fn main() -> anyhow::Result<()> {
    moe_model::backend::keep_freed_memory();
    let args = args::Args::parse();
    if let Some(threads) = args.threads {
        moe_model::backend::set_threads(threads).map_err(anyhow::Error::msg)?;
    }
    // The async runtime is small: the math runs on the scheduler thread and the rayon pool.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(serve(args, runtime.handle().clone()))
}

/// Credentials and TLS, loaded and checked against the listen addresses before anything
/// binds: a router that would expose the cluster unauthenticated refuses to start.
struct Security {
    public_tls: Option<PublicTls>,
    /// The data plane's: mutual TLS and the cluster token.
    members: MemberCredentials,
    /// `--api-key-file` (inference) and `--admin-key-file` (drains).
    access: api_keys::AdminAccess,
}

impl Security {
    fn load(args: &args::Args) -> anyhow::Result<Self> {
        let mut listens = vec![("--grpc-listen", args.grpc_listen.clone())];
        listens.extend(args.http_listen.clone().map(|a| ("--http-listen", a)));
        listens.extend(
            args.collective_listen
                .clone()
                .map(|a| ("--collective-listen", a)),
        );
        // With in-process nodes there are no members to authenticate: no data plane, no etcd.
        let members = if args.in_process_nodes > 0 {
            MemberCredentials {
                tls: None,
                token: None,
            }
        } else {
            MemberCredentials::load(&args.cluster_tls, &args.cluster_auth, &args.etcd, listens)?
        };
        Ok(Self {
            public_tls: args.public_tls.load()?,
            members,
            access: args.keys.load()?,
        })
    }

    fn http_tls(&self) -> anyhow::Result<Option<Arc<tokio_rustls::rustls::ServerConfig>>> {
        Ok(self.public_tls.as_ref().map(|t| t.rustls()).transpose()?)
    }
}

/// What the router computes itself: the dense part of the model, its tokenizer and limits.
struct DenseModel {
    config: ModelConfig,
    /// The checkpoint, kept open while in-process nodes load the routed experts from it.
    checkpoint: Option<Checkpoint>,
    device: moe_model::experts::ExpertDevice,
    tokenizer: Arc<Tokenizer>,
    dense: Arc<dyn DenseStep>,
    /// Identifies the checkpoint: nodes with another one are never placed.
    fingerprint: String,
    eos_ids: Vec<u32>,
    /// One MoE layer's dispatch carries at most a step's tokens: the data plane's message
    /// limits follow from it.
    dispatch_bounds: DispatchRules,
    /// The multi-token-prediction layer, with `--speculative-config` `deepseek_mtp`.
    mtp: Option<Arc<MtpHead>>,
    /// `--generation-config` and `--override-generation-config`: what a request's unset
    /// fields become, and the output cap.
    generation: GenerationDefaults,
}

impl DenseModel {
    fn load(args: &args::Args) -> anyhow::Result<Self> {
        let device = args.device.open()?;
        let mut config = ModelConfig::from_dir(&args.model)
            .with_context(|| format!("reading {}", args.model.display()))?;
        if let Some(len) = args.max_model_len {
            config.cap_context(len).map_err(anyhow::Error::msg)?;
        }
        // A bound the data plane cannot carry is refused here rather than mid-request.
        let dispatch_bounds = DispatchRules::for_model(&config, args.max_batch_tokens);
        dispatch_bounds.check_message_limit("--max-batch-tokens")?;
        let tokenizer = Arc::new(Tokenizer::from_dir(&args.model)?);
        let ckpt = Checkpoint::open(&args.model)?;
        let names: Vec<&str> = ckpt.tensor_names().collect();
        let fingerprint = moe_cluster::placement::fingerprint(&args.model, &names);
        drop(names);
        let dense: Arc<dyn DenseStep> = Arc::from(load_dense(&ckpt, &config, &device)?);
        tracing::info!(device = %dense.placement(), "dense part loaded");
        let mtp = match args.speculative_config {
            Some(spec) if spec.uses_mtp() => Some(load_mtp(&ckpt, &config, &*dense)?),
            _ => None,
        };
        let eos_ids = config.stop_ids(tokenizer.eos_id());
        let generation = GenerationDefaults::resolve(
            &args.generation_config,
            args.override_generation_config.as_deref(),
            &args.model,
        )?;
        if generation != GenerationDefaults::default() {
            // vLLM says so too: answers differ from a server using the API's defaults.
            tracing::info!(?generation, "generation defaults");
        }
        Ok(Self {
            checkpoint: (args.in_process_nodes > 0).then_some(ckpt),
            device,
            config,
            tokenizer,
            dense,
            fingerprint,
            eos_ids,
            dispatch_bounds,
            mtp,
            generation,
        })
    }

    /// The KV layout of every sequence: the model's layers, and the MTP head's after them.
    fn kv_config(&self) -> &ModelConfig {
        self.mtp.as_ref().map_or(&self.config, |head| head.config())
    }
}

/// The checkpoint's MTP layer, for `deepseek_mtp` drafts: on a CPU dense part only (it reads
/// the main model's hidden rows, which a device dense part does not hand back).
fn load_mtp(
    ckpt: &Checkpoint,
    config: &ModelConfig,
    dense: &dyn DenseStep,
) -> anyhow::Result<Arc<MtpHead>> {
    // A CPU dense part is the one that hands its vocabulary weights over.
    let Some(vocab) = dense.vocab_weights() else {
        anyhow::bail!(
            "--speculative-config deepseek_mtp: the MTP head runs beside a CPU dense part only (not with --device cuda)"
        );
    };
    let head =
        MtpHead::load(ckpt, config, Some(&vocab)).context("--speculative-config deepseek_mtp")?;
    let shared = head.shared_vocab();
    tracing::info!(
        layer = head.kv_layer(),
        shares_embedding = shared.embed,
        shares_lm_head = shared.lm_head,
        "MTP draft head loaded"
    );
    Ok(Arc::new(head))
}

/// The state the scheduler thread shares with the request handlers.
struct Running {
    view: Arc<ClusterView>,
    stats: Arc<SchedulerStats>,
    kv: Arc<KvBlocks>,
    requests: Arc<RequestMetrics>,
    metrics: Arc<metrics::RouterMetrics>,
    submissions: tokio::sync::mpsc::Sender<moe_router::scheduler::Submission>,
    /// With `--in-process-nodes`: whether those threads are alive.
    in_process: Option<moe_cluster::collective::in_process::NodeLiveness>,
}

/// The cluster's expert nodes, or (`--in-process-nodes N`) every routed expert loaded here on
/// the dense part's device and dealt over N in-process nodes.
fn expert_reach(
    args: &args::Args,
    model: &mut DenseModel,
    view: &Arc<ClusterView>,
    handle: tokio::runtime::Handle,
) -> anyhow::Result<ExpertReach> {
    let nodes = args.in_process_nodes;
    // Taken: once the experts are loaded nothing reads the checkpoint again.
    let Some(ckpt) = model.checkpoint.take() else {
        return Ok(ExpertReach::Cluster(dispatch::RemoteExperts::new(
            Arc::clone(view),
            handle,
            model.config.hidden_size,
            Duration::from_millis(args.recovery_timeout_ms),
            Duration::from_millis(args.dispatch_timeout_ms),
        )));
    };
    let experts = ExpertSet::load_all_on(&ckpt, &model.config, &model.device)
        .context("loading the routed experts for --in-process-nodes")?;
    let reach =
        moe_cluster::collective::in_process::reach(&model.config, &experts, nodes, &model.device)?;
    view.in_process_nodes
        .store(nodes, std::sync::atomic::Ordering::Relaxed);
    tracing::info!(
        nodes,
        experts = experts.len(),
        "routed experts on in-process nodes"
    );
    Ok(ExpertReach::InProcess(InProcessExperts {
        nodes,
        backend: reach.backend,
        liveness: reach.liveness,
    }))
}

/// Starts the scheduler on its own thread (the math never runs on the async runtime).
fn start_scheduler(
    args: &args::Args,
    model: &mut DenseModel,
    router_id: String,
    handle: tokio::runtime::Handle,
) -> anyhow::Result<Running> {
    let view = Arc::new(ClusterView::new(router_id));
    let stats = Arc::new(SchedulerStats::default());
    let kv = Arc::new(KvBlocks::new(
        args.kv_cache_bytes,
        model.kv_config().kv_cache_bytes_per_token(),
        args.kv_block_tokens,
    ));
    let requests = Arc::new(RequestMetrics::default());
    let (submissions, submit_rx) = tokio::sync::mpsc::channel(args.max_waiting.max(1));
    let recovery_timeout = Duration::from_millis(args.recovery_timeout_ms);
    let experts = expert_reach(args, model, &view, handle)?;
    let in_process = match &experts {
        ExpertReach::InProcess(local) => Some(local.liveness.clone()),
        ExpertReach::Cluster(_) => None,
    };
    let scheduler = Scheduler {
        dense: Arc::clone(&model.dense),
        experts,
        tokenizer: Arc::clone(&model.tokenizer),
        kv: Arc::clone(&kv),
        // One pool for every sequence's blocks and the cached ones, in `--kv-block-tokens`.
        kv_pool: KvPool::new(KvLayout::for_config(
            model.kv_config(),
            args.kv_block_tokens,
        )),
        stats: Arc::clone(&stats),
        config: SchedulerConfig {
            max_batch_tokens: args.max_batch_tokens,
            max_running: args.max_running,
            micro_batches: args.micro_batches as usize,
            recovery_timeout,
            speculation: args.speculative_config,
            preemption: args.scheduling_policy == args::SchedulingPolicy::Priority,
        },
        eos_ids: model.eos_ids.clone(),
        stalled_since: Default::default(),
        metrics: Arc::clone(&requests),
        // On a device too: its KV pool numbers blocks as the host pool does, so a shared
        // block's rows are shared there as well.
        prefix_cache: args
            .prefix_caching
            .then(|| std::cell::RefCell::new(PrefixCache::new(args.kv_block_tokens))),
        mtp: model.mtp.clone(),
    };
    std::thread::Builder::new()
        .name("scheduler".into())
        .spawn(move || scheduler.run(submit_rx))?;
    let metrics = Arc::new(metrics::RouterMetrics {
        requests: Arc::clone(&requests),
        view: Arc::clone(&view),
        stats: Arc::clone(&stats),
        kv: Arc::clone(&kv),
    });
    Ok(Running {
        view,
        stats,
        kv,
        requests,
        metrics,
        submissions,
        in_process,
    })
}

/// Validation and the waiting queue in front of the scheduler, shared by both APIs.
fn admission(
    args: &args::Args,
    model: &DenseModel,
    running: &Running,
    model_name: String,
) -> Arc<admission::Admission> {
    let max_prompt_tokens = args
        .max_prompt_tokens
        .unwrap_or(model.config.max_position_embeddings);
    let max_prompt_bytes = args.max_prompt_bytes.unwrap_or_else(|| {
        validation::default_max_prompt_bytes(
            &model.tokenizer,
            max_prompt_tokens,
            http::MAX_BODY_BYTES,
        )
    });
    tracing::info!(max_prompt_tokens, max_prompt_bytes, "prompt limits");
    Arc::new(admission::Admission {
        grammar: grammar_compiler(model),
        model_name,
        config: model.config.clone(),
        tokenizing: admission::Tokenizing::new(
            Arc::clone(&model.tokenizer),
            admission::Tokenizing::default_permits(),
            Arc::clone(&running.requests.tokenize_seconds),
        ),
        submissions: running.submissions.clone(),
        stats: Arc::clone(&running.stats),
        view: Arc::clone(&running.view),
        waiting: admission::WaitingLimit::new(args.max_waiting),
        metrics: Arc::clone(&running.requests),
        limits: validation::RequestLimits {
            max_prompt_tokens,
            max_prompt_bytes,
            request_timeout: Duration::from_millis(args.request_timeout_ms),
            priority_scheduling: args.scheduling_policy == args::SchedulingPolicy::Priority,
            sampling_defaults: model.generation.sampling,
            max_tokens_cap: model.generation.max_tokens_cap,
            ..Default::default()
        },
    })
}

/// The structured-output compiler over the checkpoint's vocabulary; without one (a tokenizer
/// llguidance cannot read) such requests are refused with a clear error.
fn grammar_compiler(model: &DenseModel) -> Option<Arc<moe_router::structured::GrammarCompiler>> {
    let eos = model.eos_ids.first().copied().unwrap_or(0);
    let compiled = model
        .tokenizer
        .hub_json()
        .map_err(|e| e.to_string())
        .and_then(|json| moe_router::structured::GrammarCompiler::from_tokenizer_json(&json, eos));
    match compiled {
        Ok(c) => Some(Arc::new(c)),
        Err(e) => {
            tracing::warn!(error = %e, "structured outputs are off: the tokenizer's vocabulary cannot be read");
            None
        }
    }
}

fn served_model_name(args: &args::Args) -> String {
    http::ServedModel::name_for(args.openai.served_model_name.as_deref(), &args.model)
}

async fn serve(args: args::Args, handle: tokio::runtime::Handle) -> anyhow::Result<()> {
    let security = Security::load(&args)?;
    let in_process = args.in_process_nodes > 0;
    if in_process && args.micro_batches > 1 {
        // Micro-batches overlap one batch's exchange with another's attention; in-process
        // nodes exchange nothing, and their one router rank takes a layer at a time.
        anyhow::bail!(
            "--micro-batches {} has nothing to overlap with --in-process-nodes (no data plane): \
             leave it at 1",
            args.micro_batches
        );
    }
    let discovery = (!in_process).then(|| args.etcd.discovery()).transpose()?;
    // Bound first: the router id (a trace resource attribute) may come from the port.
    let listener = tokio::net::TcpListener::bind(&args.grpc_listen)
        .await
        .with_context(|| format!("binding {}", args.grpc_listen))?;
    let local = listener.local_addr()?;
    let router_id = args
        .router_id
        .clone()
        .unwrap_or_else(|| format!("router-{}", local.port()));
    let telemetry =
        moe_cluster::telemetry::init("moe-router", &router_id, &args.telemetry, "info")?;
    tracing::info!(
        public_tls = security.public_tls.is_some(),
        data_plane_tls = security.members.tls.is_some(),
        "TLS settings"
    );
    let mut model = DenseModel::load(&args)?;
    let collective = (!in_process)
        .then(|| {
            collective_settings(
                &args,
                local,
                security.members.tls.is_some(),
                &model.config,
                security.members.token.clone(),
            )
        })
        .transpose()?;
    let running = start_scheduler(&args, &mut model, router_id, handle)?;
    let model_name = served_model_name(&args);
    let admission = admission(&args, &model, &running, model_name.clone());
    let (stopper, shutdown) = Shutdown::new();
    let stopper = Arc::new(stopper);
    let limits = args.ports.limits();
    let http = HttpParts {
        model: &model,
        running: &running,
        admission: &admission,
        security: &security,
        model_name,
        chat_template: args.openai.chat_template.clone(),
        reasoning_parser: args.openai.reasoning_parser,
        tool_call_parser: args.openai.tool_call_parser,
        responses_store_bytes: args.openai.responses_store_bytes,
        prompt_tokens_details: args.openai.enable_prompt_tokens_details,
    };
    let (servers, http_address) = spawn_http_servers(&args, http, limits, &shutdown).await?;
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_not_serving::<InferenceServer<server::inference::InferenceService>>()
        .await;
    health
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    let planner = match (discovery.clone(), collective) {
        (Some(discovery), Some(collective)) => Some(tokio::spawn(planner::run_planner(
            planner_context(
                &args,
                &model,
                &running,
                &security,
                discovery,
                local,
                health,
                collective,
                http_address,
            ),
            shutdown.clone(),
        ))),
        // The experts are loaded already: serving from the start, with nothing to plan.
        _ => {
            health
                .set_serving::<InferenceServer<server::inference::InferenceService>>()
                .await;
            health
                .set_service_status("", tonic_health::ServingStatus::Serving)
                .await;
            if let Some(liveness) = running.in_process.clone() {
                tokio::spawn(moe_router::expert_reach::stop_when_a_node_ends(
                    move || liveness.stopped(),
                    Arc::clone(&running.view),
                    health,
                    <InferenceServer<server::inference::InferenceService> as NamedService>::NAME,
                    Arc::clone(&stopper),
                    shutdown.clone(),
                    Duration::from_millis(200),
                ));
            }
            None
        }
    };
    let grpc = GrpcServices {
        health: health_service,
        inference: server::inference::InferenceService {
            config: model.config.clone(),
            model_dir: args.model.display().to_string(),
            tokenizer: Arc::clone(&model.tokenizer),
            admission,
            eos_ids: model.eos_ids.clone(),
            draining: shutdown.clone(),
            drain_grace: Duration::from_millis(args.drain_grace_ms),
        },
        admin: server::admin::AdminService {
            cluster: args.etcd.cluster.clone(),
            discovery,
            view: Arc::clone(&running.view),
            stats: Arc::clone(&running.stats),
            kv: Arc::clone(&running.kv),
            dense_device: model.dense.placement(),
            access: security.access.clone(),
            stopper: Arc::clone(&stopper),
        },
        access: inference_access(&security, &running.view.router_id),
    };
    let tls = security
        .public_tls
        .as_ref()
        .map(|t| t.rustls_grpc())
        .transpose()?;
    // Printed on stdout so that scripts and tests can find a port picked with :0.
    println!("moe-router listening on {local}");
    let grpc = serve_grpc(
        listener,
        grpc,
        tls,
        limits,
        args.ports.max_streams_per_connection,
        shutdown,
    );
    // On a signal the open calls finish (a gateway's streams move at once).
    let served = moe_cluster::shutdown::serve_until_signal(grpc, &stopper, None)
        .await
        .unwrap_or(Ok(()));
    // The servers finish their open connections; the planner gives up its registration.
    let finished = async move {
        let mut servers = servers;
        while servers.join_next().await.is_some() {}
        if let Some(planner) = planner {
            let _ = planner.await;
        }
    };
    if tokio::time::timeout(STOP_DEADLINE, finished).await.is_err() {
        tracing::warn!(deadline = ?STOP_DEADLINE, "stopping took too long: leaving anyway");
    }
    telemetry.flush();
    // Stopped because an in-process node ended: a failure, for a supervisor to see.
    if let Some(ended) = running
        .in_process
        .as_ref()
        .map(|l| l.stopped())
        .filter(|&n| n > 0)
    {
        anyhow::bail!(
            "{ended} in-process expert node(s) stopped; this router could no longer serve"
        );
    }
    served
}

/// What the OpenAI-compatible API is built from.
struct HttpParts<'a> {
    model: &'a DenseModel,
    running: &'a Running,
    admission: &'a Arc<admission::Admission>,
    security: &'a Security,
    model_name: String,
    chat_template: Option<std::path::PathBuf>,
    reasoning_parser: Option<moe_openai::reasoning::ReasoningParser>,
    tool_call_parser: Option<moe_openai::tool_calls::ToolCallFormat>,
    responses_store_bytes: usize,
    prompt_tokens_details: bool,
}

/// Binds and starts `--http-listen` and `--metrics-listen`, if given, until `shutdown`.
async fn spawn_http_servers(
    args: &args::Args,
    parts: HttpParts<'_>,
    limits: ConnectionLimits,
    shutdown: &Shutdown,
) -> anyhow::Result<(tokio::task::JoinSet<()>, Option<std::net::SocketAddr>)> {
    let mut servers = tokio::task::JoinSet::new();
    let tls = parts.security.http_tls()?;
    let mut openai = None;
    if let Some(addr) = &args.http_listen {
        let app = http::app(http_state(&parts)?);
        let listener = bind_http(addr, "moe-router http listening on").await?;
        openai = Some(listener.local_addr()?);
        let serve = serve_http(listener, app, tls.clone(), limits, "HTTP", shutdown.clone());
        servers.spawn(serve);
    }
    if let Some(addr) = &args.metrics_listen {
        let metrics = Arc::clone(&parts.running.metrics);
        let app = http::metrics_app(move || metrics.render());
        let listener = bind_http(addr, "").await?;
        servers.spawn(serve_http(
            listener,
            app,
            tls,
            limits,
            "metrics",
            shutdown.clone(),
        ));
    }
    Ok((servers, openai))
}

/// How long the router waits, once stopping, for open connections and its registration.
const STOP_DEADLINE: Duration = Duration::from_secs(10);

fn http_state(parts: &HttpParts<'_>) -> anyhow::Result<Arc<http::HttpState>> {
    let generator = server::openai::RouterGenerator {
        admission: Arc::clone(parts.admission),
        view: Arc::clone(&parts.running.view),
        metrics: Arc::clone(&parts.running.metrics),
    };
    let model = http::ServedModel {
        tokenizer: Arc::clone(&parts.model.tokenizer),
        config: &parts.model.config,
        name: parts.model_name.clone(),
        chat_template: parts.chat_template.as_deref(),
        reasoning_parser: parts.reasoning_parser,
        tool_call_parser: parts.tool_call_parser,
        default_max_tokens: parts.model.generation.default_max_tokens,
        prompt_tokens_details: parts.prompt_tokens_details,
    };
    Ok(Arc::new(
        http::HttpState::new(
            model,
            Arc::new(generator),
            parts.security.access.api.clone(),
        )?
        .storing_responses(parts.responses_store_bytes),
    ))
}

/// Binds an HTTP listener; `announce`, if not empty, is printed with its address on stdout
/// (before the gRPC line, which scripts wait for last).
async fn bind_http(addr: &str, announce: &str) -> anyhow::Result<tokio::net::TcpListener> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    if announce.is_empty() {
        tracing::info!(address = %listener.local_addr()?, "metrics on /metrics");
    } else {
        println!("{announce} {}", listener.local_addr()?);
    }
    Ok(listener)
}

#[allow(clippy::too_many_arguments)]
fn planner_context(
    args: &args::Args,
    model: &DenseModel,
    running: &Running,
    security: &Security,
    discovery: moe_cluster::discovery::Discovery,
    local: std::net::SocketAddr,
    health: tonic_health::server::HealthReporter,
    collective: CollectiveSettings,
    http_address: Option<std::net::SocketAddr>,
) -> planner::PlannerContext {
    let config = &model.config;
    // Of each layer, the extra copies and the exchanges a rebalance may make by default.
    let an_eighth = (config.moe.num_experts / 8).max(1);
    planner::PlannerContext {
        profile: moe_router::published_load::PublishedProfile::new(
            moe_cluster::discovery::RouterProfile {
                http_address: http_address.map(|a| a.to_string()).unwrap_or_default(),
                model: served_model_name(args),
                max_model_len: config.max_position_embeddings as u64,
                generation: moe_cluster::discovery::PublishedGeneration {
                    default_max_tokens: model.generation.default_max_tokens,
                },
            },
            Arc::clone(&running.stats),
            Arc::clone(&running.kv),
        ),
        discovery,
        router_address: local.to_string(),
        fingerprint: model.fingerprint.clone(),
        moe_layers: config.moe_layer_indices().collect(),
        num_experts: config.moe.num_experts,
        view: Arc::clone(&running.view),
        health,
        poll: Duration::from_millis(args.etcd.poll_ms),
        lease_ttl: Duration::from_secs(args.lease_ttl_secs),
        suspect_ttl: Duration::from_secs(args.suspect_ttl_secs),
        membership_grace: Duration::from_millis(args.membership_grace_ms),
        collective,
        max_batch_rows: args.max_batch_tokens,
        links: moe_router::node_link::LinkSettings {
            max_dispatch_bytes: model.dispatch_bounds.max_dispatch_bytes(),
            max_combine_bytes: model.dispatch_bounds.max_combine_bytes(),
            token: security.members.token.clone(),
            timeout: Duration::from_millis(args.dispatch_timeout_ms),
            tls: security.members.tls.as_ref().map(|t| t.client()),
        },
        rebalance: planner::RebalancePolicy {
            threshold: args.rebalance_threshold,
            window: Duration::from_millis(args.rebalance_window_ms),
            min_pairs: args.rebalance_min_pairs,
            budget: moe_cluster::placement::RebalanceBudget {
                replicas_per_layer: args.redundant_experts.unwrap_or(an_eighth),
                swaps_per_layer: args.rebalance_max_swaps.unwrap_or(an_eighth),
            },
        },
    }
}

/// API keys, or a gateway's proof of the cluster token for this router.
fn inference_access(security: &Security, router_id: &str) -> InferenceAccess {
    let gate = security
        .members
        .token
        .clone()
        .map(|token| StreamGate::new(token, router_id.to_string()));
    InferenceAccess::new(security.access.api.clone(), gate)
}

/// The services on the public gRPC port.
struct GrpcServices<H> {
    health: HealthServer<H>,
    inference: server::inference::InferenceService,
    admin: server::admin::AdminService,
    access: InferenceAccess,
}

/// Serves the public gRPC API on `listener` until `shutdown`, finishing open calls.
async fn serve_grpc<H: Health>(
    listener: tokio::net::TcpListener,
    services: GrpcServices<H>,
    tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
    limits: ConnectionLimits,
    max_streams_per_connection: u32,
    mut shutdown: Shutdown,
) -> anyhow::Result<()> {
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(moe_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let inference_access = services.access;
    let (connections, _stats) = accept_bounded(listener, tls, limits);
    tonic::transport::Server::builder()
        .max_concurrent_streams(Some(max_streams_per_connection))
        .add_service(services.health)
        .add_service(reflection)
        .add_service(InferenceServer::with_interceptor(
            services.inference,
            move |r| inference_access.intercept(r),
        ))
        // Admin checks its callers per method: reading and draining need different keys.
        .add_service(AdminServer::new(services.admin))
        .serve_with_incoming_shutdown(moe_cluster::listener::incoming(connections), async move {
            shutdown.wait().await
        })
        .await?;
    Ok(())
}

/// Serves `app` on `listener`, over TLS when `tls` is given, within `limits`, until
/// `shutdown`.
async fn serve_http(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
    limits: ConnectionLimits,
    what: &'static str,
    mut shutdown: Shutdown,
) {
    let served = match http::listener::BoundedListener::new(listener, tls, limits) {
        Ok(listener) => {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move { shutdown.wait().await })
                .await
        }
        Err(e) => Err(e),
    };
    if let Err(e) = served {
        tracing::error!(error = %e, server = what, "server stopped");
    }
}
