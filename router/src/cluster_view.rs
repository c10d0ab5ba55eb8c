//! The router's view of the cluster: the placement it serves on, a link to each of its nodes,
//! the latest membership, and per-expert dispatch counters. The planner task writes it; the step
//! loop and the Admin service read it.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use moe_cluster::membership::Membership;
use moe_cluster::placement::{ExpertId, Placement};

use crate::dispatch::NodeLink;

/// A placement ready to dispatch on.
pub struct ServingPlacement {
    pub placement: Placement,
    /// Expert to the index of its node in `links`.
    pub owners: HashMap<ExpertId, usize>,
    pub links: Vec<Arc<NodeLink>>,
}

impl ServingPlacement {
    pub fn new(placement: Placement, links: Vec<Arc<NodeLink>>) -> Self {
        let index: HashMap<&str, usize> = links
            .iter()
            .enumerate()
            .map(|(i, l)| (l.node_id.as_str(), i))
            .collect();
        let owners = placement
            .owners()
            .into_iter()
            .filter_map(|(e, node)| index.get(node).map(|&i| (e, i)))
            .collect();
        Self {
            placement,
            owners,
            links,
        }
    }
}

/// Where MoE-layer time goes, in nanoseconds (see the Admin proto).
#[derive(Default, Debug)]
pub struct LayerTimes {
    pub calls: AtomicU64,
    pub encode_nanos: AtomicU64,
    pub wait_nanos: AtomicU64,
    /// The slowest node's compute per layer call (what the wait could not be shorter than).
    pub compute_nanos: AtomicU64,
    pub combine_nanos: AtomicU64,
}

#[derive(Default)]
pub struct ClusterView {
    pub layer_times: LayerTimes,
    serving: RwLock<Option<Arc<ServingPlacement>>>,
    latest: RwLock<Option<Placement>>,
    membership: RwLock<Membership>,
    /// Tokens dispatched per `(layer, expert)` since start.
    expert_tokens: RwLock<BTreeMap<ExpertId, Arc<AtomicU64>>>,
    /// Nodes an operator asked to drain.
    drained: RwLock<Vec<String>>,
}

impl ClusterView {
    pub fn serving(&self) -> Option<Arc<ServingPlacement>> {
        self.serving.read().ok()?.clone()
    }

    pub fn set_serving(&self, serving: ServingPlacement) {
        if let Ok(mut s) = self.serving.write() {
            *s = Some(Arc::new(serving));
        }
    }

    pub fn latest(&self) -> Option<Placement> {
        self.latest.read().ok()?.clone()
    }

    pub fn set_latest(&self, placement: Placement) {
        if let Ok(mut l) = self.latest.write() {
            *l = Some(placement);
        }
    }

    pub fn membership(&self) -> Membership {
        self.membership
            .read()
            .map(|m| m.clone())
            .unwrap_or_default()
    }

    pub fn set_membership(&self, membership: Membership) {
        if let Ok(mut m) = self.membership.write() {
            *m = membership;
        }
    }

    pub fn count_tokens(&self, expert: ExpertId, tokens: u64) {
        if let Some(counter) = self
            .expert_tokens
            .read()
            .ok()
            .and_then(|m| m.get(&expert).cloned())
        {
            counter.fetch_add(tokens, Ordering::Relaxed);
            return;
        }
        if let Ok(mut m) = self.expert_tokens.write() {
            m.entry(expert)
                .or_default()
                .fetch_add(tokens, Ordering::Relaxed);
        }
    }

    pub fn expert_tokens(&self, expert: ExpertId) -> u64 {
        self.expert_tokens
            .read()
            .ok()
            .and_then(|m| m.get(&expert).map(|c| c.load(Ordering::Relaxed)))
            .unwrap_or(0)
    }

    pub fn drain(&self, node_id: &str) {
        if let Ok(mut d) = self.drained.write() {
            if !d.iter().any(|n| n == node_id) {
                d.push(node_id.to_string());
            }
        }
    }

    pub fn drained(&self) -> Vec<String> {
        self.drained.read().map(|d| d.clone()).unwrap_or_default()
    }
}
