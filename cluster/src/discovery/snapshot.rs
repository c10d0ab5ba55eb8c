//! One read of the whole cluster prefix, parsed: the live members, the requests about them,
//! and the placement with the revision a guarded write must name.

use std::collections::BTreeMap;

use super::error::DiscoveryError;
use super::keys::ClusterKeys;
use super::kv::Listing;
use super::records::{NodeRecord, RouterRecord};
use super::watch::{KeyRange, Topic};
use crate::placement::Placement;

/// A snapshot of the cluster's live processes and requests.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Membership {
    pub nodes: BTreeMap<String, NodeRecord>,
    /// Node id to the latest epoch whose experts it has loaded.
    pub ready: BTreeMap<String, u64>,
    pub routers: BTreeMap<String, RouterRecord>,
    /// Router id holding the planner key, if any.
    pub planner: Option<String>,
    /// Nodes an operator asked to drain.
    pub drains: Vec<String>,
    /// Node id to the instances some router reported failing.
    pub suspects: BTreeMap<String, Vec<String>>,
    /// Store revision of the snapshot.
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

/// The members and the placement, read at one revision.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    pub members: Membership,
    pub placement: Option<Placement>,
    /// Mod revision of the placement key (0 when none was written yet): what
    /// [`super::Discovery::write_placement`] must be given to replace this placement.
    pub placement_revision: i64,
}

impl Snapshot {
    /// The key ranges a snapshot reads: what the planner and the followers act on, not the
    /// collective records or the routers' load reports (read on their own, when needed).
    pub(crate) fn ranges(keys: &ClusterKeys) -> Vec<KeyRange> {
        [
            Topic::Members,
            Topic::Routers,
            Topic::Placement,
            Topic::Drains,
        ]
        .into_iter()
        .flat_map(|t| t.ranges(keys))
        .collect()
    }

    /// Parses a listing of the cluster's prefix. Malformed node and router records are skipped
    /// (one bad writer must not blind everyone); a malformed placement is an error.
    pub(crate) fn parse(keys: &ClusterKeys, listing: &Listing) -> Result<Self, DiscoveryError> {
        let mut snapshot = Snapshot::default();
        let members = &mut snapshot.members;
        members.revision = listing.revision;
        let (nodes, ready, routers, drains, suspects) = (
            keys.nodes(),
            keys.ready_prefix(),
            keys.routers(),
            keys.drains(),
            keys.suspects(),
        );
        let (planner, placement) = (keys.planner(), keys.placement());
        for kv in &listing.kvs {
            let key = kv.key.as_str();
            let text = std::str::from_utf8(&kv.value).ok();
            if key == planner {
                members.planner = text.map(str::to_string);
            } else if key == placement {
                let parsed =
                    serde_json::from_slice(&kv.value).map_err(|e| DiscoveryError::Record {
                        key: key.to_string(),
                        message: e.to_string(),
                    })?;
                snapshot.placement = Some(parsed);
                snapshot.placement_revision = kv.mod_revision;
            } else if let Some(id) = keys.id_under(&nodes, key) {
                match serde_json::from_slice::<NodeRecord>(&kv.value) {
                    Ok(record) => {
                        members.nodes.insert(id.to_string(), record);
                    }
                    Err(e) => tracing::warn!(key, error = %e, "ignoring malformed node record"),
                }
            } else if let Some(id) = keys.id_under(&ready, key) {
                if let Some(epoch) = text.and_then(|v| v.parse::<u64>().ok()) {
                    members.ready.insert(id.to_string(), epoch);
                }
            } else if let Some(id) = keys.id_under(&routers, key) {
                match serde_json::from_slice::<RouterRecord>(&kv.value) {
                    Ok(record) => {
                        members.routers.insert(id.to_string(), record);
                    }
                    Err(e) => tracing::warn!(key, error = %e, "ignoring malformed router record"),
                }
            } else if let Some(id) = keys.id_under(&drains, key) {
                members.drains.push(id.to_string());
            } else if let Some(id) = keys.id_under(&suspects, key) {
                if let Some(instance) = text {
                    members
                        .suspects
                        .entry(id.to_string())
                        .or_default()
                        .push(instance.to_string());
                }
            }
        }
        Ok(snapshot)
    }
}
