//! `moe-router`: the binary. The pieces live in the `moe_router` library (see its docs).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use moe_model::checkpoint::Checkpoint;
use moe_model::config::AttentionConfig;
use moe_model::dense::{load_dense, DenseStep};
use moe_model::tokenizer::Tokenizer;
use moe_model::ModelConfig;
use moe_proto::v1::admin_server::AdminServer;
use moe_proto::v1::inference_server::InferenceServer;

use moe_cluster::dispatch_rules::DispatchRules;
use moe_cluster::listener::{accept_bounded, ConnectionLimits};
use moe_router::cluster_view::ClusterView;
use moe_router::collective::CollectiveSettings;
use moe_router::kv_blocks::KvBlocks;
use moe_router::scheduler::{Scheduler, SchedulerConfig, SchedulerStats};
use moe_router::{admission, api_keys, args, dispatch, http, metrics, planner, server, validation};

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
    let nccl_stream = if args.transport == Transport::Nccl {
        let gpu = moe_model::gpu::GpuContext::open(
            args.collective_gpu,
            moe_model::device::GpuDtype::default(),
        )
        .with_context(|| format!("opening GPU {} for NCCL", args.collective_gpu))?;
        Some(gpu.stream().context().new_stream()?)
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
    Ok(CollectiveSettings {
        transport: args.transport,
        root: RootSettings {
            tcp_bind,
            tcp_advertise_host: args.collective_advertise_host.clone(),
            token,
            // Outputs of a whole batch (rows ≤ --max-batch-tokens) from one node.
            max_frame_bytes: FrameBounds::new(
                args.max_batch_tokens.max(1),
                config.hidden_size,
                config.moe.top_k,
            )
            .to_router,
            #[cfg(feature = "cuda")]
            nccl_stream,
        },
        timeout: Duration::from_millis(args.dispatch_timeout_ms),
    })
}

fn kv_bytes_per_token(config: &ModelConfig) -> usize {
    let per_layer = match config.attention {
        AttentionConfig::Gqa {
            num_kv_heads,
            head_dim,
            ..
        } => 2 * num_kv_heads * head_dim,
        AttentionConfig::Mla {
            kv_lora_rank,
            qk_rope_head_dim,
            ..
        } => kv_lora_rank + qk_rope_head_dim,
    };
    per_layer * config.num_layers * 4
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

async fn serve(args: args::Args, handle: tokio::runtime::Handle) -> anyhow::Result<()> {
    let dense_device = args.device.open_experts(args.gpu_dtype)?;
    let public_tls = args.public_tls.load()?;
    let cluster_tls = args.cluster_tls.load()?;
    let cluster_token = args.cluster_auth.token()?;
    let mut listens = vec![("--grpc-listen", args.grpc_listen.clone())];
    listens.extend(args.http_listen.clone().map(|a| ("--http-listen", a)));
    listens.extend(
        args.collective_listen
            .clone()
            .map(|a| ("--collective-listen", a)),
    );
    moe_cluster::exposure::check(&moe_cluster::exposure::Exposure::of(
        listens,
        cluster_tls.is_some(),
        cluster_token.is_some(),
        &args.etcd,
        &args.cluster_auth,
    ))?;
    let etcd = args.etcd.connection()?;
    let http_tls = public_tls.as_ref().map(|t| t.rustls()).transpose()?;
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
    let config = ModelConfig::from_dir(&args.model)
        .with_context(|| format!("reading {}", args.model.display()))?;
    // One MoE layer's dispatch carries at most a step's tokens: the data plane's message
    // limits follow, and a bound they cannot carry is refused here rather than mid-request.
    let dispatch_bounds = DispatchRules::for_model(&config, args.max_batch_tokens);
    dispatch_bounds.check_message_limit("--max-batch-tokens")?;
    let tokenizer = Arc::new(Tokenizer::from_dir(&args.model)?);
    let ckpt = Checkpoint::open(&args.model)?;
    let names: Vec<&str> = ckpt.tensor_names().collect();
    let fingerprint = moe_cluster::placement::fingerprint(&args.model, &names);
    drop(names);
    let dense: Arc<dyn DenseStep> = Arc::from(load_dense(&ckpt, &config, &dense_device)?);
    tracing::info!(device = %dense.placement(), "dense part loaded");
    drop(ckpt);
    let mut eos_ids = config.eos_token_ids.clone();
    if let Some(eos) = tokenizer.eos_id() {
        if !eos_ids.contains(&eos) {
            eos_ids.push(eos);
        }
    }

    let collective_settings = collective_settings(
        &args,
        local,
        cluster_tls.is_some(),
        &config,
        cluster_token.clone(),
    )?;
    let view = Arc::new(ClusterView::new(router_id));
    let stats = Arc::new(SchedulerStats::default());
    let kv = Arc::new(KvBlocks::new(
        args.kv_cache_bytes,
        kv_bytes_per_token(&config),
        args.kv_block_tokens,
    ));
    let request_metrics = Arc::new(metrics::RequestMetrics::default());
    let router_metrics = Arc::new(metrics::RouterMetrics {
        requests: Arc::clone(&request_metrics),
        view: Arc::clone(&view),
        stats: Arc::clone(&stats),
        kv: Arc::clone(&kv),
    });
    let (submit_tx, submit_rx) = tokio::sync::mpsc::channel(args.max_waiting.max(1));
    let scheduler = Scheduler {
        dense: Arc::clone(&dense),
        experts: dispatch::RemoteExperts::new(
            Arc::clone(&view),
            handle.clone(),
            config.hidden_size,
            Duration::from_millis(args.recovery_timeout_ms),
            Duration::from_millis(args.dispatch_timeout_ms),
        ),
        tokenizer: Arc::clone(&tokenizer),
        kv: Arc::clone(&kv),
        stats: Arc::clone(&stats),
        config: SchedulerConfig {
            max_batch_tokens: args.max_batch_tokens,
            max_running: args.max_running,
            micro_batches: args.micro_batches as usize,
            recovery_timeout: Duration::from_millis(args.recovery_timeout_ms),
        },
        eos_ids: eos_ids.clone(),
        stalled_since: Default::default(),
        metrics: Arc::clone(&request_metrics),
    };
    std::thread::Builder::new()
        .name("scheduler".into())
        .spawn(move || scheduler.run(submit_rx))?;

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_not_serving::<InferenceServer<server::inference::InferenceService>>()
        .await;
    health
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(moe_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let api_keys = api_keys::ApiKeys::from_optional_file(args.api_key_file.as_deref())?;
    let admin_keys = api_keys::ApiKeys::from_optional_file(args.admin_key_file.as_deref())?;
    let connection_limits = ConnectionLimits {
        max_connections: args.max_connections,
        max_handshakes: args.max_tls_handshakes,
        ..Default::default()
    };
    let model_name = args.served_model_name.clone().unwrap_or_else(|| {
        args.model
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into())
    });
    let max_prompt_tokens = args
        .max_prompt_tokens
        .unwrap_or(config.max_position_embeddings);
    let max_prompt_bytes = args.max_prompt_bytes.unwrap_or_else(|| {
        validation::default_max_prompt_bytes(&tokenizer, max_prompt_tokens, http::MAX_BODY_BYTES)
    });
    tracing::info!(max_prompt_tokens, max_prompt_bytes, "prompt limits");
    let admission = Arc::new(admission::Admission {
        model_name: model_name.clone(),
        config: config.clone(),
        tokenizing: admission::Tokenizing::new(
            Arc::clone(&tokenizer),
            admission::Tokenizing::default_permits(),
            Arc::clone(&request_metrics),
        ),
        submissions: submit_tx,
        stats: Arc::clone(&stats),
        view: Arc::clone(&view),
        waiting: admission::WaitingLimit::new(args.max_waiting),
        metrics: request_metrics,
        limits: validation::RequestLimits {
            max_prompt_tokens,
            max_prompt_bytes,
            request_timeout: Duration::from_millis(args.request_timeout_ms),
            ..Default::default()
        },
    });
    if let Some(http_addr) = &args.http_listen {
        let chat_template = match tokenizer.chat_template() {
            Some(source) => Some(moe_model::chat_template::ChatTemplate::new(
                source,
                tokenizer.bos_token().as_deref(),
                tokenizer.eos_token().as_deref(),
            )?),
            None => None,
        };
        let state = Arc::new(http::HttpState {
            admission: Arc::clone(&admission),
            tokenizer: Arc::clone(&tokenizer),
            chat_template,
            model_name: model_name.clone(),
            max_model_len: config.max_position_embeddings,
            view: Arc::clone(&view),
            created: http::unix_now(),
            api_keys: api_keys.clone(),
            metrics: Arc::clone(&router_metrics),
            next_id: Default::default(),
        });
        let http_listener = tokio::net::TcpListener::bind(http_addr)
            .await
            .with_context(|| format!("binding {http_addr}"))?;
        // Printed before the gRPC line, which scripts wait for last.
        println!(
            "moe-router http listening on {}",
            http_listener.local_addr()?
        );
        tokio::spawn(serve_http(
            http_listener,
            http::app(state),
            http_tls.clone(),
            connection_limits,
            "HTTP",
        ));
    }
    if let Some(addr) = &args.metrics_listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        tracing::info!(address = %listener.local_addr()?, "metrics on /metrics");
        let app = http::metrics_app(Arc::clone(&router_metrics));
        tokio::spawn(serve_http(
            listener,
            app,
            http_tls.clone(),
            connection_limits,
            "metrics",
        ));
    }
    let inference = server::inference::InferenceService {
        config: config.clone(),
        model_dir: args.model.display().to_string(),
        tokenizer,
        admission,
        eos_ids,
    };
    let admin = server::admin::AdminService {
        cluster: args.etcd.cluster.clone(),
        etcd: etcd.clone(),
        keys: moe_cluster::ClusterKeys::new(&args.etcd.cluster),
        view: Arc::clone(&view),
        stats,
        kv,
        dense_device: dense.placement(),
        access: api_keys::AdminAccess {
            api: api_keys.clone(),
            admin: admin_keys,
        },
    };

    tokio::spawn(planner::run_planner(planner::PlannerContext {
        etcd,
        keys: moe_cluster::ClusterKeys::new(&args.etcd.cluster),
        router_address: local.to_string(),
        fingerprint,
        moe_layers: config.moe_layer_indices().collect(),
        num_experts: config.moe.num_experts,
        view,
        health,
        poll: Duration::from_millis(args.etcd.poll_ms),
        lease_ttl: Duration::from_secs(args.lease_ttl_secs),
        suspect_ttl: Duration::from_secs(args.suspect_ttl_secs),
        membership_grace: Duration::from_millis(args.membership_grace_ms),
        collective: collective_settings,
        max_batch_rows: args.max_batch_tokens,
        links: dispatch::LinkSettings {
            max_dispatch_bytes: dispatch_bounds.max_dispatch_bytes(),
            max_combine_bytes: dispatch_bounds.max_combine_bytes(),
            token: cluster_token.clone(),
            timeout: Duration::from_millis(args.dispatch_timeout_ms),
            tls: cluster_tls.as_ref().map(|t| t.client()),
        },
        rebalance: planner::RebalancePolicy {
            threshold: args.rebalance_threshold,
            window: Duration::from_millis(args.rebalance_window_ms),
            min_pairs: args.rebalance_min_pairs,
            redundant_per_layer: args
                .redundant_experts
                .unwrap_or((config.moe.num_experts / 8).max(1)),
        },
    }));

    // Printed on stdout so that scripts and tests can find a port picked with :0.
    tracing::info!(
        public_tls = public_tls.is_some(),
        data_plane_tls = cluster_tls.is_some(),
        "TLS settings"
    );
    println!("moe-router listening on {local}");
    let inference_keys = api_keys;
    let grpc_tls = public_tls.as_ref().map(|t| t.rustls_grpc()).transpose()?;
    let (connections, _grpc_listener) = accept_bounded(listener, grpc_tls, connection_limits);
    tonic::transport::Server::builder()
        .max_concurrent_streams(Some(args.max_streams_per_connection))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(InferenceServer::with_interceptor(inference, move |r| {
            inference_keys.intercept(r)
        }))
        // Admin checks its callers per method: reading and draining need different keys.
        .add_service(AdminServer::new(admin))
        .serve_with_incoming_shutdown(moe_cluster::listener::incoming(connections), async {
            shutdown_signal().await;
        })
        .await?;
    telemetry.flush();
    Ok(())
}

/// Serves `app` on `listener`, over TLS when `tls` is given, within `limits`.
async fn serve_http(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
    limits: ConnectionLimits,
    what: &'static str,
) {
    let served = match http::listener::BoundedListener::new(listener, tls, limits) {
        Ok(listener) => axum::serve(listener, app).await,
        Err(e) => Err(e),
    };
    if let Err(e) = served {
        tracing::error!(error = %e, server = what, "server stopped");
    }
}

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
