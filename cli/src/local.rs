//! The local clusters `moe up` and `moe chaos` start: etcd from `PATH`, the router and node
//! programs from beside `moe`, and the wait until the cluster serves.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use moe_proto::v1::admin_client::AdminClient;
use moe_proto::v1::ClusterStatusRequest;
use moe_tooling::{find_in_path, LocalClusterSpec};

use crate::router_client::endpoint;

/// A local cluster of `nodes` nodes on `model`: etcd from `PATH`, the router and node
/// programs from beside `moe`; no extra flags, no logs.
pub fn local_spec(model: PathBuf, nodes: usize, cluster: &str) -> anyhow::Result<LocalClusterSpec> {
    Ok(LocalClusterSpec {
        etcd_bin: find_in_path("etcd")
            .context("etcd is not on PATH (Debian: apt-get install etcd-server)")?,
        router_bin: sibling("moe-router")?,
        node_bin: sibling("moe-expert-node")?,
        model,
        nodes,
        cluster: cluster.into(),
        router_args: vec![],
        node_args: vec![],
        show_logs: false,
        etcd_tls: None,
    })
}

/// `name value` for a member's command line, or nothing without a value (the member's own
/// default then holds).
pub fn optional_flag(name: &str, value: Option<impl ToString>) -> Vec<String> {
    value
        .map(|v| vec![name.to_string(), v.to_string()])
        .unwrap_or_default()
}

/// The workspace program `name`, next to the running `moe`.
pub fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe.with_file_name(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    if !path.exists() {
        bail!(
            "{} not found next to moe; build the workspace binaries (cargo build --release --bins)",
            path.display()
        );
    }
    Ok(path)
}

/// How long a fresh local cluster may take to serve its first placement.
const SERVING_TIMEOUT: Duration = Duration::from_secs(120);

/// Waits until the router of a cluster this command started (plain HTTP/2 on loopback) serves
/// a placement; returns that placement's epoch.
pub async fn wait_serving(router: &str) -> anyhow::Result<u64> {
    let deadline = Instant::now() + SERVING_TIMEOUT;
    while Instant::now() < deadline {
        if let Ok(mut client) = AdminClient::connect(endpoint(router)).await {
            if let Ok(status) = client.cluster_status(ClusterStatusRequest {}).await {
                let epoch = status.into_inner().serving_epoch;
                if epoch > 0 {
                    return Ok(epoch);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!(
        "the cluster did not become ready within {} s",
        SERVING_TIMEOUT.as_secs()
    )
}
