//! Node membership in etcd: each node puts its record on a lease that one background task keeps
//! alive (at a third of the TTL); a node that dies disappears when its lease expires.

use std::collections::BTreeMap;
use std::time::Duration;

use etcd_client::{Client, GetOptions, PutOptions};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::error::ClusterError;
use crate::keys::ClusterKeys;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    Joining,
    Ready,
    Draining,
}

impl NodeState {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Joining => "joining",
            NodeState::Ready => "ready",
            NodeState::Draining => "draining",
        }
    }
}

/// What a node publishes about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// `host:port` of its data-plane gRPC server.
    pub address: String,
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// Bytes of memory it offers for expert weights.
    pub memory_bytes: u64,
    pub state: NodeState,
    /// Fingerprint of the checkpoint it serves; nodes of another model are not placed.
    pub fingerprint: String,
}

/// What the registration task publishes: the record and the ready epoch.
#[derive(Debug, Clone, PartialEq)]
struct Published {
    record: NodeRecord,
    ready_epoch: Option<u64>,
}

/// A live registration: dropping it (or calling [`NodeRegistration::shutdown`]) revokes the
/// lease so the node's keys vanish at once.
pub struct NodeRegistration {
    updates: watch::Sender<Published>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl NodeRegistration {
    /// Registers `record` under `nodes/<node_id>` with a lease of `ttl` and keeps it alive.
    /// If etcd becomes unreachable the task keeps retrying and re-registers when it returns.
    pub async fn start(
        endpoints: Vec<String>,
        keys: ClusterKeys,
        node_id: String,
        record: NodeRecord,
        ttl: Duration,
    ) -> Result<Self, ClusterError> {
        let mut client = Client::connect(&endpoints, None).await?;
        let published = Published {
            record,
            ready_epoch: None,
        };
        // The first registration happens before returning, so callers know they are visible.
        let lease = grant_and_put(&mut client, &keys, &node_id, &published, ttl).await?;
        let (updates, rx) = watch::channel(published);
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(keep_registered(
            client, keys, node_id, ttl, lease, rx, stop_rx,
        ));
        Ok(Self {
            updates,
            stop: Some(stop_tx),
            task: Some(task),
        })
    }

    pub fn set_state(&self, state: NodeState) {
        self.updates.send_modify(|p| p.record.state = state);
    }

    /// Announces that the experts of `epoch` are loaded.
    pub fn set_ready_epoch(&self, epoch: u64) {
        self.updates.send_modify(|p| p.ready_epoch = Some(epoch));
    }

    /// Revokes the lease and waits for the task to end.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for NodeRegistration {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

async fn grant_and_put(
    client: &mut Client,
    keys: &ClusterKeys,
    node_id: &str,
    published: &Published,
    ttl: Duration,
) -> Result<i64, ClusterError> {
    let lease = client
        .lease_grant(ttl.as_secs().max(1) as i64, None)
        .await?
        .id();
    put_published(client, keys, node_id, published, lease).await?;
    Ok(lease)
}

async fn put_published(
    client: &mut Client,
    keys: &ClusterKeys,
    node_id: &str,
    published: &Published,
    lease: i64,
) -> Result<(), ClusterError> {
    let value = serde_json::to_vec(&published.record).map_err(|e| ClusterError::Record {
        key: keys.node(node_id),
        message: e.to_string(),
    })?;
    client
        .put(
            keys.node(node_id),
            value,
            Some(PutOptions::new().with_lease(lease)),
        )
        .await?;
    if let Some(epoch) = published.ready_epoch {
        client
            .put(
                keys.ready(node_id),
                epoch.to_string(),
                Some(PutOptions::new().with_lease(lease)),
            )
            .await?;
    }
    Ok(())
}

/// Owns the lease: keep-alives every TTL/3, re-puts on change, re-registers after expiry.
async fn keep_registered(
    mut client: Client,
    keys: ClusterKeys,
    node_id: String,
    ttl: Duration,
    mut lease: i64,
    mut updates: watch::Receiver<Published>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    let interval = (ttl / 3).max(Duration::from_millis(100));
    let mut keeper = client.lease_keep_alive(lease).await.ok();
    loop {
        tokio::select! {
            _ = &mut stop => {
                let _ = client.lease_revoke(lease).await;
                return;
            }
            changed = updates.changed() => {
                if changed.is_err() {
                    let _ = client.lease_revoke(lease).await;
                    return;
                }
                let published = updates.borrow_and_update().clone();
                if let Err(e) = put_published(&mut client, &keys, &node_id, &published, lease).await {
                    tracing::warn!(error = %e, "could not update node record; will retry");
                    keeper = None;
                }
            }
            _ = tokio::time::sleep(interval) => {
                let alive = match keeper.as_mut() {
                    Some((k, stream)) => match k.keep_alive().await {
                        Ok(()) => matches!(stream.message().await, Ok(Some(r)) if r.ttl() > 0),
                        Err(_) => false,
                    },
                    None => false,
                };
                if !alive {
                    // Lease lost (expired or etcd restarted): register again with a new one.
                    let published = updates.borrow().clone();
                    match grant_and_put(&mut client, &keys, &node_id, &published, ttl).await {
                        Ok(new_lease) => {
                            lease = new_lease;
                            keeper = client.lease_keep_alive(lease).await.ok();
                            tracing::info!(node_id, "re-registered in etcd");
                        }
                        Err(e) => tracing::warn!(error = %e, "etcd unreachable; retrying"),
                    }
                }
            }
        }
    }
}

/// A snapshot of the registered nodes and their ready epochs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Membership {
    pub nodes: BTreeMap<String, NodeRecord>,
    pub ready: BTreeMap<String, u64>,
    /// etcd revision of the snapshot.
    pub revision: i64,
}

/// Reads every node record and ready key.
pub async fn list_nodes(
    client: &mut Client,
    keys: &ClusterKeys,
) -> Result<Membership, ClusterError> {
    let mut membership = Membership::default();
    let resp = client
        .get(keys.nodes(), Some(GetOptions::new().with_prefix()))
        .await?;
    membership.revision = resp.header().map(|h| h.revision()).unwrap_or(0);
    for kv in resp.kvs() {
        let key = kv.key_str().unwrap_or_default();
        let Some(id) = keys.node_id_of(key) else {
            continue;
        };
        match serde_json::from_slice::<NodeRecord>(kv.value()) {
            Ok(record) => {
                membership.nodes.insert(id.to_string(), record);
            }
            Err(e) => tracing::warn!(key, error = %e, "ignoring malformed node record"),
        }
    }
    let resp = client
        .get(keys.ready_prefix(), Some(GetOptions::new().with_prefix()))
        .await?;
    for kv in resp.kvs() {
        let key = kv.key_str().unwrap_or_default();
        let (Some(id), Some(epoch)) = (
            keys.node_id_of(key),
            kv.value_str().ok().and_then(|v| v.parse::<u64>().ok()),
        ) else {
            continue;
        };
        membership.ready.insert(id.to_string(), epoch);
    }
    Ok(membership)
}
