//! `moe-expert-node`: holds the routed experts the placement assigns to it and runs them for
//! the routers over the data plane.
//!
//! - [`args`]: the command line (every flag also a `MOE_*` variable).
//! - [`served`]: the experts loaded for the epochs this node serves.
//! - [`batch`]: the one place a batch is computed, whichever transport brought it.
//! - [`follower`]: follows the placement in etcd, loads exactly the assigned experts, reports
//!   readiness.
//! - [`data_plane`]: the `ExpertData.Exchange` stream handler.
//! - [`collective_member`]: joins the routers' per-epoch collectives (TCP or NCCL) and answers
//!   their layers there.

mod args;
mod batch;
mod collective_member;
mod data_plane;
mod follower;
mod metrics;
mod served;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use moe_cluster::auth::StreamGate;
use moe_cluster::discovery::NodeRegistration;
use moe_cluster::dispatch_rules::DispatchRules;
use moe_cluster::exposure::MemberCredentials;
use moe_cluster::shutdown::{within_deadline, Shutdown, Waited};
use moe_cluster::{NodeRecord, NodeState};
use moe_model::checkpoint::Checkpoint;
use moe_model::ModelConfig;
use moe_proto::v1::expert_data_server::ExpertDataServer;
use tonic_health::pb::health_server::{Health, HealthServer};

fn main() -> anyhow::Result<()> {
    // Before any thread exists: it sets how many malloc arenas there are.
    moe_model::backend::keep_freed_memory();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(serve())
}

/// The checkpoint as the node sees it before any expert is loaded.
struct Checkpointed {
    config: ModelConfig,
    /// What a batch may bring, from the model and `--max-batch-rows`.
    rules: Arc<DispatchRules>,
    /// Identifies the checkpoint: a router with another one never places experts here.
    fingerprint: String,
}

impl Checkpointed {
    fn read(args: &args::Args) -> anyhow::Result<Self> {
        let config = ModelConfig::from_dir(&args.model)
            .with_context(|| format!("reading {}", args.model.display()))?;
        let rules = DispatchRules::for_model(&config, args.max_batch_rows as usize);
        rules.check_message_limit("--max-batch-rows")?;
        let ckpt = Checkpoint::open(&args.model)?;
        let names: Vec<&str> = ckpt.tensor_names().collect();
        let fingerprint = moe_cluster::placement::fingerprint(&args.model, &names);
        Ok(Self {
            config,
            rules: Arc::new(rules),
            fingerprint,
        })
    }
}

async fn serve() -> anyhow::Result<()> {
    let args = args::Args::parse();
    if let Some(threads) = args.threads {
        moe_model::backend::set_threads(threads).map_err(anyhow::Error::msg)?;
    }
    let expert_device = args.device.open()?;
    let security = MemberCredentials::load(
        &args.cluster_tls,
        &args.cluster_auth,
        &args.etcd,
        vec![("--listen", args.listen.clone())],
    )?;
    let discovery = args.etcd.discovery()?;
    let model = Checkpointed::read(&args)?;

    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let local = listener.local_addr()?;
    let address = args.advertise.clone().unwrap_or_else(|| local.to_string());
    let node_id = args
        .node_id
        .clone()
        .unwrap_or_else(|| format!("node-{}", local.port()));
    let gate = security
        .token
        .clone()
        .map(|token| Arc::new(StreamGate::new(token, node_id.clone())));
    let telemetry =
        moe_cluster::telemetry::init("moe-expert-node", &node_id, &args.telemetry, "info")?;

    let served = Arc::new(served::ServedExperts::new());
    let node_metrics = Arc::new(metrics::NodeMetrics::default());
    if let Some(addr) = &args.metrics_listen {
        metrics::start(addr, Arc::clone(&node_metrics), Arc::clone(&served))
            .await
            .with_context(|| format!("binding {addr}"))?;
    }
    let (stopper, shutdown) = Shutdown::new();
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_not_serving::<ExpertDataServer<data_plane::DataPlane>>()
        .await;
    let services = DataPlaneServices {
        health: health_service,
        data_plane: data_plane::DataPlane::new(
            Arc::clone(&served),
            Arc::clone(&model.rules),
            gate.clone(),
            Arc::clone(&node_metrics),
        ),
        gate,
        metrics: Arc::clone(&node_metrics),
    };
    let server = serve_data_plane(&args, listener, &security, services, shutdown.clone())?;
    let server = tokio::spawn(server);
    tracing::info!(%node_id, %address, "data plane listening");

    let record = node_record(&args, address, &model, &expert_device, &security);
    let ttl = Duration::from_secs(args.lease_ttl_secs);
    let Some(registration) = register(&discovery, &node_id, record, ttl).await else {
        tracing::info!(%node_id, "signal received before registering: leaving");
        stopper.stop();
        let _ = server.await;
        return Ok(());
    };
    let registration = Arc::new(registration);

    let members = tokio::spawn(collective_member::follow_collectives(
        collective_member::MemberContext {
            discovery: discovery.clone(),
            node_id: node_id.clone(),
            served: Arc::clone(&served),
            device: expert_device.clone(),
            rules: Arc::clone(&model.rules),
            token: security.token.clone(),
            metrics: node_metrics,
            poll: Duration::from_millis(args.etcd.poll_ms),
            shutdown: shutdown.clone(),
        },
    ));
    let (progress_tx, progress) = tokio::sync::watch::channel(follower::NodeProgress::default());
    let follower = tokio::spawn(follower::follow_placement(follower::FollowerContext {
        discovery,
        node_id: node_id.clone(),
        fingerprint: model.fingerprint,
        model_dir: args.model.clone(),
        config: model.config,
        device: expert_device,
        served,
        registration: Arc::clone(&registration),
        health,
        poll: Duration::from_millis(args.etcd.poll_ms),
        progress: progress_tx,
    }));

    drain(
        &node_id,
        &registration,
        progress,
        Duration::from_secs(args.drain_timeout_secs),
    )
    .await;
    follower.abort();
    stopper.stop();
    members.abort();
    if let Ok(registration) = Arc::try_unwrap(registration) {
        registration.shutdown().await;
    }
    let _ = server.await;
    telemetry.flush();
    Ok(())
}

/// What the node publishes about itself; it joins as `Joining`.
fn node_record(
    args: &args::Args,
    address: String,
    model: &Checkpointed,
    device: &moe_model::experts::ExpertDevice,
    security: &MemberCredentials,
) -> NodeRecord {
    NodeRecord {
        address,
        device: args.device.device.to_string(),
        memory_bytes: args.memory_bytes,
        state: NodeState::Joining,
        fingerprint: model.fingerprint.clone(),
        instance: moe_cluster::discovery::new_instance_id(),
        collectives: joinable_collectives(device, security.tls.is_some()),
        max_batch_rows: args.max_batch_rows,
        rows_on_wire: moe_cluster::collective::RowEncoding::for_device(
            device,
            args.device.gpu_fp8,
            &args.model,
        ),
    }
}

/// Registers the node, retrying while etcd does not answer (containers start in any order,
/// or etcd is briefly overloaded), logging the outage once; `None` if a signal comes first.
async fn register(
    discovery: &moe_cluster::discovery::Discovery,
    node_id: &str,
    record: NodeRecord,
    ttl: Duration,
) -> Option<NodeRegistration> {
    let mut outage = moe_cluster::discovery::Outage::default();
    loop {
        tokio::select! {
            registered = discovery.register_node(node_id, record.clone(), ttl) => match registered {
                Ok(r) => {
                    outage.ok("registration");
                    return Some(r);
                }
                Err(e) => outage.failed("registration", &e),
            },
            _ = moe_cluster::shutdown::signal() => return None,
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Waits for SIGTERM or an operator's drain, then drains: the node leaves only once no
/// router can send work here any more, or after `timeout`, or at a second signal.
async fn drain(
    node_id: &str,
    registration: &NodeRegistration,
    mut progress: tokio::sync::watch::Receiver<follower::NodeProgress>,
    timeout: Duration,
) {
    tokio::select! {
        _ = moe_cluster::shutdown::signal() => tracing::info!(%node_id, "signal received: draining"),
        _ = progress.wait_for(|p| p.drain_requested) => tracing::info!(%node_id, "drain requested: draining"),
    }
    registration.set_state(NodeState::Draining);
    let started = std::time::Instant::now();
    match within_deadline(progress.wait_for(|p| p.can_leave()), timeout).await {
        Waited::Done(Ok(p)) => tracing::info!(
            %node_id,
            epoch = p.latest_epoch,
            took = ?started.elapsed(),
            "drained: no router dispatches here any more"
        ),
        Waited::Done(Err(_)) | Waited::TimedOut => tracing::warn!(
            %node_id,
            ?timeout,
            "drain did not complete in time (last node, or etcd down); leaving anyway"
        ),
        Waited::Interrupted => tracing::warn!(%node_id, "second signal: leaving without waiting"),
    }
}

/// What the data-plane port serves.
struct DataPlaneServices<H> {
    health: HealthServer<H>,
    data_plane: data_plane::DataPlane,
    /// Checks the cluster token on reflection too: nothing on this port answers strangers.
    gate: Option<Arc<StreamGate>>,
    metrics: Arc<metrics::NodeMetrics>,
}

/// The data-plane server on `listener`, until `shutdown`. Only holders of a cluster-CA
/// certificate get past the handshake (with mutual TLS); handshakes and connections are
/// bounded either way.
fn serve_data_plane<H: Health>(
    args: &args::Args,
    listener: tokio::net::TcpListener,
    security: &MemberCredentials,
    services: DataPlaneServices<H>,
    mut shutdown: Shutdown,
) -> anyhow::Result<impl std::future::Future<Output = Result<(), tonic::transport::Error>>> {
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(moe_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let tls = security
        .tls
        .as_ref()
        .map(|t| t.server_rustls())
        .transpose()?;
    let (connections, _listener_stats) = moe_cluster::listener::accept_bounded(
        listener,
        tls,
        moe_cluster::listener::ConnectionLimits {
            max_connections: args.max_connections,
            ..Default::default()
        },
    );
    tracing::info!(
        data_plane_tls = security.tls.is_some(),
        cluster_token = security.token.is_some(),
        max_batch_rows = args.max_batch_rows,
        "data-plane security and bounds"
    );
    let DataPlaneServices {
        health,
        data_plane,
        gate,
        metrics,
    } = services;
    let (max_dispatch_bytes, max_combine_bytes) = data_plane.message_limits();
    Ok(tonic::transport::Server::builder()
        .max_concurrent_streams(Some(args.max_streams_per_connection))
        .add_service(health)
        .add_service(tonic::service::interceptor::InterceptedService::new(
            reflection,
            move |request: tonic::Request<()>| match &gate {
                Some(gate) => gate
                    .admit(request.metadata())
                    .map(|_| request)
                    .map_err(|e| data_plane::unauthenticated(&metrics, &e)),
                None => Ok(request),
            },
        ))
        .add_service(
            ExpertDataServer::new(data_plane)
                .max_decoding_message_size(max_dispatch_bytes)
                .max_encoding_message_size(max_combine_bytes),
        )
        .serve_with_incoming_shutdown(moe_cluster::listener::incoming(connections), async move {
            shutdown.wait().await
        }))
}

/// The collectives this node can join: TCP unless the data plane is under mutual TLS (the TCP
/// collective carries none), NCCL when its experts are on a GPU of a CUDA build.
fn joinable_collectives(
    device: &moe_model::experts::ExpertDevice,
    mutual_tls: bool,
) -> Vec<moe_cluster::collective::Transport> {
    use moe_cluster::collective::Transport;
    let mut out = Vec::new();
    if !mutual_tls {
        out.push(Transport::Tcp);
    }
    #[cfg(feature = "cuda")]
    if matches!(device, moe_model::experts::ExpertDevice::Gpu(_)) {
        out.push(Transport::Nccl);
    }
    #[cfg(not(feature = "cuda"))]
    let _ = device;
    out
}
