//! `moe-expert-node`: holds the routed experts the placement assigns to it and runs them for
//! the routers over the data plane.
//!
//! - [`args`]: the command line (every flag also a `MOE_*` variable).
//! - [`served`]: the experts loaded for the epochs this node serves.
//! - [`follower`]: follows the placement in etcd, loads exactly the assigned experts, reports
//!   readiness.
//! - [`data_plane`]: the `ExpertData.Exchange` stream handler.
//! - [`collective_member`]: joins the routers' per-epoch collectives (TCP or NCCL) and answers
//!   their layers there.

mod args;
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
use moe_cluster::dispatch_rules::DispatchRules;
use moe_cluster::{ClusterKeys, NodeRecord, NodeRegistration, NodeState};
use moe_model::checkpoint::Checkpoint;
use moe_model::ModelConfig;
use moe_proto::v1::expert_data_server::ExpertDataServer;

fn main() -> anyhow::Result<()> {
    // Before any thread exists: it sets how many malloc arenas there are.
    moe_model::backend::keep_freed_memory();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(serve())
}

async fn serve() -> anyhow::Result<()> {
    let args = args::Args::parse();
    if let Some(threads) = args.threads {
        moe_model::backend::set_threads(threads).map_err(anyhow::Error::msg)?;
    }
    let expert_device = args.device.open_experts(args.gpu_dtype)?;
    let cluster_tls = args.cluster_tls.load()?;
    let cluster_token = args.cluster_auth.token()?;
    moe_cluster::exposure::check(&moe_cluster::exposure::Exposure::of(
        vec![("--listen", args.listen.clone())],
        cluster_tls.is_some(),
        cluster_token.is_some(),
        &args.etcd,
        &args.cluster_auth,
    ))?;
    let etcd = args.etcd.connection()?;
    let config = ModelConfig::from_dir(&args.model)
        .with_context(|| format!("reading {}", args.model.display()))?;
    let rules = DispatchRules::for_model(&config, args.max_batch_rows as usize);
    rules.check_message_limit("--max-batch-rows")?;
    let rules = Arc::new(rules);
    let ckpt = Checkpoint::open(&args.model)?;
    let names: Vec<&str> = ckpt.tensor_names().collect();
    let fingerprint = moe_cluster::placement::fingerprint(&args.model, &names);
    drop(names);

    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let local = listener.local_addr()?;
    let address = args.advertise.clone().unwrap_or_else(|| local.to_string());
    let node_id = args
        .node_id
        .clone()
        .unwrap_or_else(|| format!("node-{}", local.port()));
    let gate = cluster_token
        .clone()
        .map(|token| Arc::new(StreamGate::new(token, node_id.clone())));
    let telemetry =
        moe_cluster::telemetry::init("moe-expert-node", &node_id, &args.telemetry, "info")?;

    let served = Arc::new(served::ServedExperts::new());
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_not_serving::<ExpertDataServer<data_plane::DataPlane>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(moe_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let node_metrics = Arc::new(metrics::NodeMetrics::default());
    if let Some(addr) = &args.metrics_listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        tracing::info!(address = %listener.local_addr()?, "metrics on /metrics");
        tokio::spawn(metrics::serve(
            listener,
            Arc::clone(&node_metrics),
            Arc::clone(&served),
        ));
    }
    let data_plane = data_plane::DataPlane::new(
        Arc::clone(&served),
        Arc::clone(&rules),
        gate.clone(),
        Arc::clone(&node_metrics),
    );
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let mut server_shutdown = shutdown_rx.clone();
    // Only holders of a cluster-CA certificate get past the handshake (with mutual TLS);
    // handshakes and connections are bounded either way.
    let tls = cluster_tls
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
        data_plane_tls = cluster_tls.is_some(),
        cluster_token = cluster_token.is_some(),
        max_batch_rows = args.max_batch_rows,
        "data-plane security and bounds"
    );
    let reflection_gate = gate.clone();
    let reflection_metrics = Arc::clone(&node_metrics);
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .max_concurrent_streams(Some(args.max_streams_per_connection))
            .add_service(health_service)
            .add_service(tonic::service::interceptor::InterceptedService::new(
                reflection,
                move |request: tonic::Request<()>| match &reflection_gate {
                    Some(gate) => gate
                        .admit(request.metadata())
                        .map(|_| request)
                        .map_err(|e| data_plane::unauthenticated(&reflection_metrics, &e)),
                    None => Ok(request),
                },
            ))
            .add_service(
                ExpertDataServer::new(data_plane)
                    .max_decoding_message_size(rules.max_dispatch_bytes())
                    .max_encoding_message_size(rules.max_combine_bytes()),
            )
            .serve_with_incoming_shutdown(
                moe_cluster::listener::incoming(connections),
                async move {
                    let _ = server_shutdown.wait_for(|s| *s).await;
                },
            ),
    );
    tracing::info!(%node_id, %address, "data plane listening");

    let keys = ClusterKeys::new(&args.etcd.cluster);
    let record = NodeRecord {
        address: address.clone(),
        device: args.device.to_string(),
        memory_bytes: args.memory_bytes,
        state: NodeState::Joining,
        fingerprint: fingerprint.clone(),
        instance: instance_id(),
        collectives: joinable_collectives(&expert_device, cluster_tls.is_some()),
        max_batch_rows: args.max_batch_rows,
    };
    // etcd may not be up yet (containers start in any order) or be briefly overloaded: keep
    // trying, logging the outage once, until it answers or the process is told to stop.
    let mut outage = moe_cluster::config::EtcdOutage::default();
    let registration = loop {
        let attempt = NodeRegistration::start(
            etcd.clone(),
            keys.clone(),
            node_id.clone(),
            record.clone(),
            Duration::from_secs(args.lease_ttl_secs),
        );
        tokio::select! {
            registered = attempt => match registered {
                Ok(r) => {
                    outage.ok("registration");
                    break r;
                }
                Err(e) => outage.failed("registration", &e),
            },
            _ = shutdown_signal() => {
                tracing::info!(%node_id, "signal received before registering: leaving");
                let _ = shutdown_tx.send(true);
                let _ = server.await;
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let registration = Arc::new(registration);

    let stopping = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let members = tokio::spawn(collective_member::follow_collectives(
        collective_member::MemberContext {
            etcd: etcd.clone(),
            keys: keys.clone(),
            node_id: node_id.clone(),
            served: Arc::clone(&served),
            device: expert_device.clone(),
            rules: Arc::clone(&rules),
            token: cluster_token.clone(),
            metrics: node_metrics,
            poll: Duration::from_millis(args.etcd.poll_ms),
            stopping: Arc::clone(&stopping),
        },
    ));
    let (progress_tx, mut progress) =
        tokio::sync::watch::channel(follower::NodeProgress::default());
    let follower = tokio::spawn(follower::follow_placement(follower::FollowerContext {
        etcd,
        keys,
        node_id: node_id.clone(),
        fingerprint,
        model_dir: args.model.clone(),
        config,
        device: expert_device,
        served,
        registration: Arc::clone(&registration),
        health,
        poll: Duration::from_millis(args.etcd.poll_ms),
        progress: progress_tx,
    }));

    // SIGTERM or an operator's drain: leave only once no router can send work here any more.
    tokio::select! {
        _ = shutdown_signal() => tracing::info!(%node_id, "signal received: draining"),
        _ = progress.wait_for(|p| p.drain_requested) => tracing::info!(%node_id, "drain requested: draining"),
    }
    registration.set_state(NodeState::Draining);
    let drain_timeout = Duration::from_secs(args.drain_timeout_secs);
    let started = std::time::Instant::now();
    tokio::select! {
        done = tokio::time::timeout(drain_timeout, progress.wait_for(|p| p.can_leave())) => match done {
            Ok(Ok(p)) => tracing::info!(%node_id, epoch = p.latest_epoch, took = ?started.elapsed(), "drained: no router dispatches here any more"),
            _ => tracing::warn!(%node_id, timeout = ?drain_timeout, "drain did not complete in time (last node, or etcd down); leaving anyway"),
        },
        _ = shutdown_signal() => tracing::warn!(%node_id, "second signal: leaving without waiting"),
    }
    follower.abort();
    stopping.store(true, std::sync::atomic::Ordering::Relaxed);
    members.abort();
    let _ = shutdown_tx.send(true);
    if let Ok(registration) = Arc::try_unwrap(registration) {
        registration.shutdown().await;
    }
    let _ = server.await;
    telemetry.flush();
    Ok(())
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

/// A random id for this process start (see `NodeRecord::instance`).
fn instance_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.write_u32(std::process::id());
    format!("{:016x}", h.finish())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
