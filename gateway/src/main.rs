use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use moe_cluster::listener::accept_bounded;
use moe_cluster::shutdown::{Shutdown, Stopper};
use moe_gateway::args::GatewayArgs;
use moe_gateway::metrics::GatewayMetrics;
use moe_gateway::policy::RouterChooser;
use moe_gateway::relay::{Relay, RelaySettings};
use moe_gateway::router_set::{follow_routers, RouterSet};
use moe_gateway::service::{GatewayService, InferenceGateway};
use moe_model::tokenizer::Tokenizer;
use moe_proto::v1::gateway_server::GatewayServer;
use moe_proto::v1::inference_server::InferenceServer;

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
    let token = args.cluster_auth.token()?;
    if token.is_none() {
        tracing::warn!(
            "no --cluster-token-file: clients' API keys are passed on to the routers instead"
        );
    }
    let tls = args
        .public_tls
        .load()?
        .map(|t| t.rustls_grpc())
        .transpose()?;
    let access = args.keys.load()?;
    let api_keys = access.api.clone();
    let discovery = args.etcd.discovery()?;
    let (stopper, shutdown) = Shutdown::new();

    let routers = Arc::new(RouterSet::new(Duration::from_millis(
        args.router_backoff_ms,
    )));
    let follower = tokio::spawn(follow_routers(
        Arc::clone(&routers),
        discovery,
        Duration::from_millis(args.etcd.poll_ms.max(100) * 5),
        shutdown.clone(),
    ));
    let metrics = Arc::new(GatewayMetrics::default());
    let relay = Arc::new(Relay {
        routers: Arc::clone(&routers),
        chooser: RouterChooser::new(args.policy, args.cache_imbalance),
        settings: RelaySettings {
            migration_limit: args.migration_limit,
            stall_timeout: (args.stall_timeout_ms > 0)
                .then(|| Duration::from_millis(args.stall_timeout_ms)),
            recovery_timeout: Duration::from_millis(args.recovery_timeout_ms),
            token,
        },
        metrics: Arc::clone(&metrics),
    });
    if let Some(addr) = &args.metrics_listen {
        spawn_metrics(
            addr,
            Arc::clone(&metrics),
            Arc::clone(&routers),
            shutdown.clone(),
        )
        .await?;
    }
    let inference = InferenceGateway {
        relay: Arc::clone(&relay),
        tokenizer,
        max_prompt_bytes: args.max_prompt_bytes,
    };
    let gateway = GatewayService { relay, access };
    let limits = args.ports.limits();
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<InferenceServer<InferenceGateway>>()
        .await;
    // Printed on stdout so that scripts and tests can find a port picked with :0.
    println!("moe-gateway listening on {local}");
    tracing::info!(%local, policy = args.policy.as_str(), "gateway serving");
    let (connections, _stats) = accept_bounded(listener, tls, limits);
    let mut stopping = shutdown.clone();
    let grpc = tonic::transport::Server::builder()
        .max_concurrent_streams(Some(args.ports.max_streams_per_connection))
        .add_service(health_service)
        .add_service(InferenceServer::with_interceptor(inference, move |r| {
            api_keys.intercept(r)
        }))
        .add_service(GatewayServer::new(gateway))
        .serve_with_incoming_shutdown(moe_cluster::listener::incoming(connections), async move {
            stopping.wait().await
        });
    let served = until_signal(grpc, &stopper).await;
    let _ = tokio::time::timeout(STOP_DEADLINE, follower).await;
    telemetry.flush();
    served
}

async fn until_signal(
    grpc: impl std::future::Future<Output = Result<(), tonic::transport::Error>>,
    stopper: &Stopper,
) -> anyhow::Result<()> {
    tokio::pin!(grpc);
    let served = tokio::select! {
        served = &mut grpc => served,
        () = moe_cluster::shutdown::signal() => {
            tracing::info!("signal received: stopping");
            stopper.stop();
            match tokio::time::timeout(STOP_DEADLINE, &mut grpc).await {
                Ok(served) => served,
                Err(_) => Ok(()),
            }
        }
    };
    stopper.stop();
    Ok(served?)
}

/// `/metrics` on `--metrics-listen`.
async fn spawn_metrics(
    addr: &str,
    metrics: Arc<GatewayMetrics>,
    routers: Arc<RouterSet>,
    mut shutdown: Shutdown,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding --metrics-listen {addr}"))?;
    println!(
        "moe-gateway metrics listening on {}",
        listener.local_addr()?
    );
    let app = axum::Router::new().route(
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
    );
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.wait().await })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "metrics server stopped");
        }
    });
    Ok(())
}
