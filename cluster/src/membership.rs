//! Node membership in etcd: each node puts its record on a lease that one background task keeps
//! alive (at a third of the TTL); a node that dies disappears when its lease expires.

use std::collections::BTreeMap;
use std::time::Duration;

use etcd_client::{Client, GetOptions};
use serde::{Deserialize, Serialize};

use crate::error::ClusterError;
use crate::keys::ClusterKeys;
use crate::lease::LeasedKeys;

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
    /// Random per process start: a suspect report names the instance it saw fail, so a node
    /// restarted under the same id is not held suspect for its predecessor's crash.
    #[serde(default)]
    pub instance: String,
    /// Collective transports it can join (`tcp`, `nccl`); gRPC always works.
    #[serde(default)]
    pub collectives: Vec<crate::collective::Transport>,
    /// Most token rows one dispatch may bring (`--max-batch-rows`): routers split larger
    /// layers. 0 from nodes that predate it (routers then use their own batch bound).
    #[serde(default)]
    pub max_batch_rows: u32,
}

/// A node's registration: its record and ready epoch on its own lease. Dropping it (or
/// [`NodeRegistration::shutdown`]) revokes the lease so the node's keys vanish at once.
pub struct NodeRegistration {
    leased: LeasedKeys,
    keys: ClusterKeys,
    node_id: String,
    record: std::sync::Mutex<NodeRecord>,
}

impl NodeRegistration {
    /// Registers `record` under `nodes/<node_id>` with a lease of `ttl` and keeps it alive.
    /// If etcd becomes unreachable the task keeps retrying and re-registers when it returns.
    pub async fn start(
        etcd: crate::config::EtcdConnection,
        keys: ClusterKeys,
        node_id: String,
        record: NodeRecord,
        ttl: Duration,
    ) -> Result<Self, ClusterError> {
        let mut initial = BTreeMap::new();
        initial.insert(keys.node(&node_id), encode(&keys.node(&node_id), &record)?);
        let leased = LeasedKeys::start(&etcd, ttl, initial).await?;
        Ok(Self {
            leased,
            keys,
            node_id,
            record: std::sync::Mutex::new(record),
        })
    }

    /// Publishes the node's state. Draining is final: a node that started leaving never
    /// becomes placeable again (it would be re-planned while it is on its way out).
    pub fn set_state(&self, state: NodeState) {
        let Ok(mut record) = self.record.lock() else {
            return;
        };
        if record.state == NodeState::Draining {
            return;
        }
        record.state = state;
        let key = self.keys.node(&self.node_id);
        if let Ok(value) = encode(&key, &*record) {
            self.leased.set(key, value);
        }
    }

    /// Announces that the experts of `epoch` are loaded.
    pub fn set_ready_epoch(&self, epoch: u64) {
        self.leased.set(
            self.keys.ready(&self.node_id),
            epoch.to_string().into_bytes(),
        );
    }

    /// Revokes the lease and waits for the task to end.
    pub async fn shutdown(self) {
        self.leased.shutdown().await;
    }
}

fn encode<T: Serialize>(key: &str, value: &T) -> Result<Vec<u8>, ClusterError> {
    serde_json::to_vec(value).map_err(|e| ClusterError::Record {
        key: key.to_string(),
        message: e.to_string(),
    })
}

/// What a router publishes about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RouterRecord {
    /// Its public gRPC address.
    pub address: String,
    /// The placement epoch it dispatches on (0 before the first).
    pub serving_epoch: u64,
}

/// A router's registration: its record, its suspect reports and its planner campaign, on its
/// own lease.
pub struct RouterRegistration {
    leased: LeasedKeys,
    keys: ClusterKeys,
    router_id: String,
    address: String,
}

impl RouterRegistration {
    pub async fn start(
        etcd: &crate::config::EtcdConnection,
        keys: ClusterKeys,
        router_id: String,
        address: String,
        ttl: Duration,
    ) -> Result<Self, ClusterError> {
        let record = RouterRecord {
            address: address.clone(),
            serving_epoch: 0,
        };
        let mut initial = BTreeMap::new();
        let key = keys.router(&router_id);
        initial.insert(key.clone(), encode(&key, &record)?);
        let leased = LeasedKeys::start(etcd, ttl, initial).await?;
        leased.campaign(keys.planner(), router_id.clone());
        Ok(Self {
            leased,
            keys,
            router_id,
            address,
        })
    }

    pub fn router_id(&self) -> &str {
        &self.router_id
    }

    /// Whether this router holds the planner key.
    pub fn is_planner(&self) -> bool {
        self.leased.is_leader()
    }

    pub fn set_serving_epoch(&self, epoch: u64) {
        let key = self.keys.router(&self.router_id);
        let record = RouterRecord {
            address: self.address.clone(),
            serving_epoch: epoch,
        };
        if let Ok(value) = encode(&key, &record) {
            self.leased.set(key, value);
        }
    }

    /// Publishes where this router's communicator of `epoch` can be joined, and withdraws
    /// the records of older epochs.
    pub fn set_collective(&self, record: &crate::collective::CollectiveRecord) {
        self.retire_collectives_below(record.epoch);
        self.leased.set(
            self.keys.collective(record.epoch, &self.router_id),
            record.encode(),
        );
    }

    /// Withdraws the collective records of epochs before `epoch`.
    pub fn retire_collectives_below(&self, epoch: u64) {
        let prefix = self.keys.collectives();
        for key in self.leased.keys() {
            let older = key
                .strip_prefix(&prefix)
                .and_then(|rest| rest.split('/').next())
                .and_then(|e| e.parse::<u64>().ok())
                .is_some_and(|e| e < epoch);
            if older {
                self.leased.remove(&key);
            }
        }
    }

    /// Publishes exactly these suspect reports: `(node id, node instance)`.
    pub fn set_suspects(&self, suspects: &[(String, String)]) {
        let prefix = self.keys.suspects();
        let wanted: BTreeMap<String, Vec<u8>> = suspects
            .iter()
            .map(|(node, instance)| {
                (
                    self.keys.suspect(node, &self.router_id),
                    instance.clone().into_bytes(),
                )
            })
            .collect();
        for key in self.leased.keys() {
            if key.starts_with(&prefix) && !wanted.contains_key(&key) {
                self.leased.remove(&key);
            }
        }
        for (key, value) in wanted {
            self.leased.set(key, value);
        }
    }

    pub async fn shutdown(self) {
        self.leased.shutdown().await;
    }
}

/// A snapshot of the cluster's live processes and requests.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Membership {
    pub nodes: BTreeMap<String, NodeRecord>,
    pub ready: BTreeMap<String, u64>,
    pub routers: BTreeMap<String, RouterRecord>,
    /// Router id holding the planner key, if any.
    pub planner: Option<String>,
    /// Nodes an operator asked to drain.
    pub drains: Vec<String>,
    /// Node id to the instances some router reported failing.
    pub suspects: BTreeMap<String, Vec<String>>,
    /// etcd revision of the snapshot.
    pub revision: i64,
}

impl Membership {
    /// Whether some router reported this node's current instance failing.
    pub fn is_suspect(&self, node_id: &str) -> bool {
        let instance = self.nodes.get(node_id).map(|r| r.instance.as_str());
        self.suspects
            .get(node_id)
            .is_some_and(|reported| reported.iter().any(|i| Some(i.as_str()) == instance))
    }

    /// The lowest epoch any live router still dispatches on (None without routers).
    pub fn min_router_epoch(&self) -> Option<u64> {
        self.routers.values().map(|r| r.serving_epoch).min()
    }
}

/// Reads every node, router, readiness, drain and suspect key in one snapshot.
pub async fn list_nodes(
    client: &mut Client,
    keys: &ClusterKeys,
) -> Result<Membership, ClusterError> {
    let mut membership = Membership::default();
    let resp = client
        .get(keys.root(), Some(GetOptions::new().with_prefix()))
        .await?;
    membership.revision = resp.header().map(|h| h.revision()).unwrap_or(0);
    let (nodes, ready, routers, drains, suspects, planner) = (
        keys.nodes(),
        keys.ready_prefix(),
        keys.routers(),
        keys.drains(),
        keys.suspects(),
        keys.planner(),
    );
    for kv in resp.kvs() {
        let key = kv.key_str().unwrap_or_default();
        if key == planner {
            membership.planner = kv.value_str().ok().map(str::to_string);
        } else if let Some(id) = keys.id_under(&nodes, key) {
            match serde_json::from_slice::<NodeRecord>(kv.value()) {
                Ok(record) => {
                    membership.nodes.insert(id.to_string(), record);
                }
                Err(e) => tracing::warn!(key, error = %e, "ignoring malformed node record"),
            }
        } else if let Some(id) = keys.id_under(&ready, key) {
            if let Some(epoch) = kv.value_str().ok().and_then(|v| v.parse::<u64>().ok()) {
                membership.ready.insert(id.to_string(), epoch);
            }
        } else if let Some(id) = keys.id_under(&routers, key) {
            match serde_json::from_slice::<RouterRecord>(kv.value()) {
                Ok(record) => {
                    membership.routers.insert(id.to_string(), record);
                }
                Err(e) => tracing::warn!(key, error = %e, "ignoring malformed router record"),
            }
        } else if let Some(id) = keys.id_under(&drains, key) {
            membership.drains.push(id.to_string());
        } else if let Some(id) = keys.id_under(&suspects, key) {
            if let Ok(instance) = kv.value_str() {
                membership
                    .suspects
                    .entry(id.to_string())
                    .or_default()
                    .push(instance.to_string());
            }
        }
    }
    Ok(membership)
}

/// Asks that `node_id` leave the cluster: the planner places nothing on it and the node exits
/// once every router has moved past it.
pub async fn request_drain(
    client: &mut Client,
    keys: &ClusterKeys,
    node_id: &str,
) -> Result<(), ClusterError> {
    client.put(keys.drain(node_id), "", None).await?;
    Ok(())
}

/// Forgets drain requests for nodes that are gone.
pub async fn clear_drain(
    client: &mut Client,
    keys: &ClusterKeys,
    node_id: &str,
) -> Result<(), ClusterError> {
    client.delete(keys.drain(node_id), None).await?;
    Ok(())
}
