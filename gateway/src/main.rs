use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use moe_cluster::listener::{accept_bounded, ConnectionLimits};
use moe_cluster::metrics::{Histogram, LATENCY_BUCKETS};
use moe_cluster::shutdown::Shutdown;
use moe_gateway::args::GatewayArgs;
use moe_gateway::intake::Intake;
use moe_gateway::metrics::GatewayMetrics;
use moe_gateway::openai::GatewayGenerator;
use moe_gateway::policy::RouterChooser;
use moe_gateway::probes::{probe_routers, ProbeTiming};
use moe_gateway::published_limits::{follow_published_limits, OwnLimits, ServedLimits};
use moe_gateway::relay::{Relay, RelaySettings};
use moe_gateway::router_set::{follow_routers, RouterSet};
use moe_gateway::service::{GatewayService, InferenceGateway};
use moe_model::tokenizer::Tokenizer;
use moe_model::ModelConfig;
use moe_openai as http;
use moe_openai::tokenizing::Tokenizing;
use moe_proto::v1::gateway_server::GatewayServer;
use moe_proto::v1::inference_server::InferenceServer;
use tokio_rustls::rustls::ServerConfig;

fn main() -> anyhow::Result<()> {
    let args = GatewayArgs::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(serve(args))
}

/// How long the gateway waits, once stopping, for its open streams.
const STOP_DEADLINE: Duration = Duration::from_secs(10);

async fn serve(args: GatewayArgs) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(&args.grpc_listen)
        .await
        .with_context(|| format!("binding {}", args.grpc_listen))?;
    let local = listener.local_addr()?;
    let gateway_id = args
        .gateway_id
        .clone()
        .unwrap_or_else(|| format!("gateway-{}", local.port()));
    let telemetry =
        moe_cluster::telemetry::init("moe-gateway", &gateway_id, &args.telemetry, "info")?;
    let tokenizer = Arc::new(
        Tokenizer::from_dir(&args.model)
            .with_context(|| format!("reading the tokenizer of {}", args.model.display()))?,
    );
    let public_tls = args.public_tls.load()?;
    let access = args.keys.load()?;
    let (stopper, shutdown) = Shutdown::new();
    let router_identity = moe_cluster::tls::identity_from_flags(
        args.router_tls_cert.as_deref(),
        args.router_tls_key.as_deref(),
        ("--router-tls-cert", "--router-tls-key"),
    )?;
    let router_tls = moe_cluster::tls::client_tls(args.router_tls_ca.as_deref(), router_identity)?;
    let routers = Arc::new(RouterSet::new(
        Duration::from_millis(args.router_backoff_ms),
        router_tls,
    ));
    let follower = tokio::spawn(follow_routers(
        Arc::clone(&routers),
        args.etcd.discovery()?,
        Duration::from_millis(args.etcd.poll_ms.max(100) * 5),
        shutdown.clone(),
    ));
    tokio::spawn(probe_routers(
        Arc::clone(&routers),
        ProbeTiming {
            interval: Duration::from_millis(args.health_check_interval_ms),
            timeout: Duration::from_millis(args.health_check_timeout_ms),
        },
        shutdown.clone(),
    ));
    let metrics = Arc::new(GatewayMetrics::default());
    let intake = Arc::new(Intake {
        relay: relay(&args, Arc::clone(&routers), Arc::clone(&metrics))?,
        tokenizer: Arc::clone(&tokenizer),
        max_prompt_bytes: args.max_prompt_bytes,
    });
    let limits = args.ports.limits();
    if let Some(addr) = &args.metrics_listen {
        let app = metrics_app(Arc::clone(&metrics), Arc::clone(&routers));
        spawn_http(addr, "metrics", app, None, limits, shutdown.clone()).await?;
    }
    if let Some(addr) = &args.http_listen {
        let (app, own, served) =
            openai_app(&args, &intake, tokenizer, &metrics, access.api.clone())?;
        tokio::spawn(follow_published_limits(
            own,
            Arc::clone(&routers),
            served,
            shutdown.clone(),
        ));
        let tls = public_tls.as_ref().map(|t| t.rustls()).transpose()?;
        spawn_http(addr, "http", app, tls, limits, shutdown.clone()).await?;
    }
    let (health, health_service) = tonic_health::server::health_reporter();
    tokio::spawn(report_health(
        health,
        Arc::clone(&routers),
        shutdown.clone(),
    ));
    let api_keys = access.api.clone();
    let inference = InferenceServer::with_interceptor(
        InferenceGateway {
            intake: Arc::clone(&intake),
        },
        move |r| api_keys.intercept(r),
    );
    let gateway = GatewayServer::new(GatewayService {
        relay: Arc::clone(&intake.relay),
        access,
    });
    // Printed on stdout so that scripts and tests can find a port picked with :0.
    println!("moe-gateway listening on {local}");
    tracing::info!(%local, policy = args.policy.as_str(), "gateway serving");
    let tls = public_tls.map(|t| t.rustls_grpc()).transpose()?;
    let (connections, _stats) = accept_bounded(listener, tls, limits);
    let mut stopping = shutdown.clone();
    let grpc = tonic::transport::Server::builder()
        .max_concurrent_streams(Some(args.ports.max_streams_per_connection))
        .add_service(health_service)
        .add_service(inference)
        .add_service(gateway)
        .serve_with_incoming_shutdown(moe_cluster::listener::incoming(connections), async move {
            stopping.wait().await
        });
    let served = moe_cluster::shutdown::serve_until_signal(grpc, &stopper, Some(STOP_DEADLINE))
        .await
        .unwrap_or(Ok(()));
    let _ = tokio::time::timeout(STOP_DEADLINE, follower).await;
    telemetry.flush();
    Ok(served?)
}

/// `grpc.health.v1`: SERVING while some router can take a request (a load balancer in front of
/// several gateways then skips one that sees none).
async fn report_health(
    health: tonic_health::server::HealthReporter,
    routers: Arc<RouterSet>,
    mut shutdown: Shutdown,
) {
    let mut changes = routers.changes();
    loop {
        if routers.available().is_empty() {
            health
                .set_not_serving::<InferenceServer<InferenceGateway>>()
                .await;
            health
                .set_service_status("", tonic_health::ServingStatus::NotServing)
                .await;
        } else {
            health
                .set_serving::<InferenceServer<InferenceGateway>>()
                .await;
            health
                .set_service_status("", tonic_health::ServingStatus::Serving)
                .await;
        }
        tokio::select! {
            _ = changes.changed() => {}
            () = shutdown.wait() => return,
        }
    }
}

/// The relay over `routers`, from the flags.
fn relay(
    args: &GatewayArgs,
    routers: Arc<RouterSet>,
    metrics: Arc<GatewayMetrics>,
) -> anyhow::Result<Arc<Relay>> {
    let token = args.cluster_auth.token()?;
    if token.is_none() {
        tracing::warn!(
            "no --cluster-token-file: clients' API keys are passed on to the routers instead"
        );
    }
    Ok(Arc::new(Relay {
        routers,
        chooser: RouterChooser::new(args.policy, args.cache_imbalance),
        settings: RelaySettings {
            migration_limit: args.migration_limit,
            stall_timeout: (args.stall_timeout_ms > 0)
                .then(|| Duration::from_millis(args.stall_timeout_ms)),
            recovery_timeout: Duration::from_millis(args.recovery_timeout_ms),
            hung_after: Duration::from_millis(args.health_check_timeout_ms),
            token,
        },
        metrics,
    }))
}

/// The OpenAI API, as routers serve it, over the intake; with the gateway's own limits and
/// where it reads those that follow the routers'.
fn openai_app(
    args: &GatewayArgs,
    intake: &Arc<Intake>,
    tokenizer: Arc<Tokenizer>,
    metrics: &Arc<GatewayMetrics>,
    api_keys: moe_cluster::api_keys::ApiKeys,
) -> anyhow::Result<(axum::Router, OwnLimits, ServedLimits)> {
    let mut config = ModelConfig::from_dir(&args.model)
        .with_context(|| format!("reading {}", args.model.display()))?;
    if let Some(len) = args.max_model_len {
        config.cap_context(len).map_err(anyhow::Error::msg)?;
    }
    let generator = GatewayGenerator {
        intake: Arc::clone(intake),
        tokenizing: Tokenizing::new(
            Arc::clone(&tokenizer),
            Tokenizing::default_permits(),
            Arc::new(Histogram::new(LATENCY_BUCKETS)),
        ),
        metrics: Arc::clone(metrics),
    };
    let model = http::ServedModel {
        tokenizer,
        config: &config,
        name: http::ServedModel::name_for(args.openai.served_model_name.as_deref(), &args.model),
        chat_template: args.openai.chat_template.as_deref(),
        reasoning_parser: args.openai.reasoning_parser,
        tool_call_parser: args.openai.tool_call_parser,
        // The checkpoint's default, as routers' `--generation-config auto` has it, until
        // routers publish theirs.
        default_max_tokens: moe_model::generation_config::GenerationConfig::from_dir(&args.model)
            .with_context(|| format!("reading {}", args.model.display()))?
            .max_new_tokens,
        prompt_tokens_details: args.openai.enable_prompt_tokens_details,
    };
    let state = http::HttpState::new(model, Arc::new(generator), api_keys)?
        .storing_responses(args.openai.responses_store_bytes);
    let own = OwnLimits {
        context: config.max_position_embeddings,
        default_max_tokens: state.default_max_tokens.get(),
    };
    let served = ServedLimits {
        context: state.max_model_len.clone(),
        default_max_tokens: state.default_max_tokens.clone(),
    };
    Ok((http::app(Arc::new(state)), own, served))
}

fn metrics_app(metrics: Arc<GatewayMetrics>, routers: Arc<RouterSet>) -> axum::Router {
    axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let body = metrics.render(&routers);
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    body,
                )
            }
        }),
    )
}

/// Binds `addr` and serves `app` on it until `shutdown`; prints `moe-gateway WHAT listening
/// on ADDR` (before the gRPC line, which scripts wait for last).
async fn spawn_http(
    addr: &str,
    what: &'static str,
    app: axum::Router,
    tls: Option<Arc<ServerConfig>>,
    limits: ConnectionLimits,
    mut shutdown: Shutdown,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr} ({what})"))?;
    println!("moe-gateway {what} listening on {}", listener.local_addr()?);
    let listener = http::listener::BoundedListener::new(listener, tls, limits)?;
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.wait().await })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, server = what, "server stopped");
        }
    });
    Ok(())
}
