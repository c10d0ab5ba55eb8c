//! What a node and a router keep in the store while they live, each on its own lease: a node
//! its record and ready epoch; a router its record and serving epoch, its suspect reports, its
//! collective records and its campaign for the planner key. A process that dies disappears
//! when its lease expires; one that shuts down revokes it, so its keys vanish at once.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use super::error::{encode, Result};
use super::keys::ClusterKeys;
use super::lease::LeasedKeys;
use super::load_report::LoadReport;
use super::records::{NodeRecord, NodeState, RouterLoad, RouterProfile, RouterRecord};
use super::store::LeaseClient;
use crate::collective::CollectiveRecord;

/// A node's registration. Dropping it (or [`NodeRegistration::shutdown`]) revokes the lease.
pub struct NodeRegistration {
    leased: LeasedKeys,
    keys: ClusterKeys,
    node_id: String,
    /// The record as last published (its state changes).
    record: Mutex<NodeRecord>,
}

impl NodeRegistration {
    /// Registers `record` under `nodes/<node_id>` with a lease of `ttl` and keeps it alive.
    /// If etcd becomes unreachable the task keeps retrying and re-registers when it returns.
    pub(crate) async fn start(
        client: LeaseClient,
        keys: ClusterKeys,
        node_id: String,
        record: NodeRecord,
        ttl: Duration,
    ) -> Result<Self> {
        let key = keys.node(&node_id);
        let initial = BTreeMap::from([(key.clone(), encode(&key, &record)?)]);
        let leased = LeasedKeys::start(client, ttl, initial, None).await?;
        Ok(Self {
            leased,
            keys,
            node_id,
            record: Mutex::new(record),
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

/// A router's registration; it campaigns for the planner key from the start.
pub struct RouterRegistration {
    leased: LeasedKeys,
    keys: ClusterKeys,
    router_id: String,
    /// What it publishes under `routers/<id>`, changed a field at a time.
    record: std::sync::Mutex<RouterRecord>,
}

impl RouterRegistration {
    pub(crate) async fn start(
        client: LeaseClient,
        keys: ClusterKeys,
        router_id: String,
        address: String,
        ttl: Duration,
    ) -> Result<Self> {
        let record = RouterRecord {
            address,
            serving_epoch: 0,
            http_address: String::new(),
            model: String::new(),
            max_model_len: 0,
            load: RouterLoad::default(),
            generation: None,
        };
        let key = keys.router(&router_id);
        let initial = BTreeMap::from([(key.clone(), encode(&key, &record)?)]);
        let campaign = Some((keys.planner(), router_id.clone()));
        let leased = LeasedKeys::start(client, ttl, initial, campaign).await?;
        Ok(Self {
            leased,
            keys,
            router_id,
            record: std::sync::Mutex::new(record),
        })
    }

    pub fn router_id(&self) -> &str {
        &self.router_id
    }

    /// Whether this router holds the planner key.
    pub fn is_planner(&self) -> bool {
        self.leased.is_leader()
    }

    /// Campaigns for the planner key now: call it on seeing the key free (its holder stopped),
    /// so planning moves within a round instead of at the next keep-alive.
    pub fn campaign_soon(&self) {
        self.leased.campaign_soon();
    }

    /// Returns once this router holds the planner key: the campaign runs at each keep-alive,
    /// so a router is elected at its first one when the key is free.
    pub async fn elected(&self) {
        self.leased.leading().await;
    }

    pub fn set_serving_epoch(&self, epoch: u64) {
        self.publish(|r| r.serving_epoch = epoch);
    }

    /// What it serves: its OpenAI address, model name and context.
    pub fn set_profile(&self, profile: &RouterProfile) {
        self.publish(|r| {
            r.http_address = profile.http_address.clone();
            r.model = profile.model.clone();
            r.max_model_len = profile.max_model_len;
            r.generation = Some(profile.generation);
        });
    }

    pub fn set_load(&self, load: RouterLoad) {
        self.publish(|r| r.load = load);
    }

    /// Publishes what this router dispatched since it started, for the planner.
    pub fn set_load_report(&self, report: &LoadReport) {
        match report.encode() {
            Ok(value) => self
                .leased
                .set(self.keys.load_report(&self.router_id), value),
            Err(e) => tracing::warn!(error = %e, "load report not published"),
        }
    }

    /// Changes the record and republishes it (written at once when it differs).
    fn publish(&self, change: impl FnOnce(&mut RouterRecord)) {
        let key = self.keys.router(&self.router_id);
        let mut record = self.record.lock().unwrap_or_else(|e| e.into_inner());
        change(&mut record);
        if let Ok(value) = encode(&key, &*record) {
            self.leased.set(key, value);
        }
    }

    /// Publishes where this router's communicator of `epoch` can be joined, and withdraws
    /// the records of older epochs.
    pub fn set_collective(&self, record: &CollectiveRecord) {
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
