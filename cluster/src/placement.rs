//! Expert placement: which node holds which `(layer, expert)`, under an epoch.
//!
//! The router plans it from the live nodes and writes it through discovery in a transaction
//! guarded by the revision it planned from, so two planners can never both commit. Planning keeps every expert
//! where it already is when that node is still live and under its share, so a membership change
//! moves as few experts as possible; each node gets an even slice of every layer, so every node
//! works on every MoE layer.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::ClusterError;

mod rebalance;

pub use rebalance::RebalanceBudget;

/// An expert address.
pub type ExpertId = (u32, u32);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeAssignment {
    /// The node's data-plane address when the placement was planned.
    pub address: String,
    /// `(layer, expert)` pairs, sorted.
    pub experts: Vec<ExpertId>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Placement {
    pub epoch: u64,
    /// Checkpoint fingerprint (see [`fingerprint`]): nodes of another model are never placed.
    pub fingerprint: String,
    pub nodes: BTreeMap<String, NodeAssignment>,
}

impl Placement {
    /// Plans a placement of every expert of `moe_layers` over `nodes` (id to address).
    pub fn plan(
        epoch: u64,
        fingerprint: &str,
        moe_layers: &[usize],
        num_experts: usize,
        nodes: &BTreeMap<String, String>,
        previous: Option<&Placement>,
    ) -> Result<Placement, ClusterError> {
        if nodes.is_empty() {
            return Err(ClusterError::NoNodes);
        }
        let ids: Vec<&String> = nodes.keys().collect();
        let n = ids.len();
        let mut assigned: BTreeMap<&String, Vec<ExpertId>> =
            ids.iter().map(|id| (*id, Vec::new())).collect();
        // Every node that held the expert before, in id order: the first one with room keeps
        // it; the others keep their replicas.
        let mut previous_holders: HashMap<ExpertId, Vec<&String>> = HashMap::new();
        if let Some(p) = previous {
            for (id, a) in &p.nodes {
                if let Some(live) = ids.iter().find(|n| **n == id) {
                    for e in &a.experts {
                        previous_holders.entry(*e).or_default().push(*live);
                    }
                }
            }
        }
        for &layer in moe_layers {
            // Shares of this layer: the first `extra` nodes (by id) take one more.
            let base = num_experts / n;
            let extra = num_experts % n;
            let quota: BTreeMap<&String, usize> = ids
                .iter()
                .enumerate()
                .map(|(i, id)| (*id, base + usize::from(i < extra)))
                .collect();
            let mut count: BTreeMap<&String, usize> = ids.iter().map(|id| (*id, 0)).collect();
            let mut homeless = Vec::new();
            for expert in 0..num_experts {
                let key = (layer as u32, expert as u32);
                let holders = previous_holders.get(&key).map(Vec::as_slice).unwrap_or(&[]);
                match holders.iter().find(|owner| count[*owner] < quota[*owner]) {
                    Some(owner) => {
                        *count.get_mut(owner).expect("owner is a live node") += 1;
                        assigned
                            .get_mut(owner)
                            .expect("owner is a live node")
                            .push(key);
                    }
                    None => homeless.push(key),
                }
            }
            for key in homeless {
                // The node furthest below its share; ties by id for determinism.
                let target = ids
                    .iter()
                    .copied()
                    .filter(|id| count[id] < quota[id])
                    .min_by_key(|id| (count[id] as isize - quota[id] as isize, (*id).clone()))
                    .expect("quotas add up to the number of experts");
                *count.get_mut(target).expect("live node") += 1;
                assigned.get_mut(target).expect("live node").push(key);
            }
        }
        // Replicas on surviving nodes stay where they are (a rebalance placed them for a reason).
        for (key, holders) in previous_holders.iter().filter(|(_, h)| h.len() > 1) {
            let mut copies = 1;
            for holder in holders {
                let experts = assigned.get_mut(holder).expect("live node");
                if copies < holders.len() && !experts.contains(key) {
                    experts.push(*key);
                    copies += 1;
                }
            }
        }
        let nodes = assigned
            .into_iter()
            .map(|(id, mut experts)| {
                experts.sort_unstable();
                (
                    id.clone(),
                    NodeAssignment {
                        address: nodes[id].clone(),
                        experts,
                    },
                )
            })
            .collect();
        Ok(Placement {
            epoch,
            fingerprint: fingerprint.to_string(),
            nodes,
        })
    }

    /// For each expert, the nodes that hold it, in id order (more than one when replicated).
    pub fn holders(&self) -> HashMap<ExpertId, Vec<&str>> {
        let mut holders: HashMap<ExpertId, Vec<&str>> = HashMap::new();
        for (id, a) in &self.nodes {
            for e in &a.experts {
                holders.entry(*e).or_default().push(id.as_str());
            }
        }
        holders
    }

    /// Number of extra copies of experts, over all layers.
    pub fn replica_count(&self) -> usize {
        self.holders().values().map(|h| h.len() - 1).sum()
    }

    pub fn experts_of(&self, node_id: &str) -> &[ExpertId] {
        self.nodes
            .get(node_id)
            .map(|a| a.experts.as_slice())
            .unwrap_or(&[])
    }

    /// Number of experts that move (are loaded somewhere new) going from `self` to `next`.
    pub fn moves_to(&self, next: &Placement) -> usize {
        next.nodes
            .iter()
            .map(|(id, a)| {
                let before = self.experts_of(id);
                a.experts
                    .iter()
                    .filter(|e| before.binary_search(e).is_err())
                    .count()
            })
            .sum()
    }
}

/// Σ over layers of the busiest node's load / Σ over layers of the mean node load. Every MoE
/// layer waits for its slowest node, so this is how much longer layers take than with a
/// perfect spread (1.0 = even). Each item is one layer's per-node loads; 0 without load.
pub fn imbalance_ratio(layers: impl IntoIterator<Item = Vec<f64>>) -> f64 {
    let (mut busiest, mut mean) = (0.0, 0.0);
    for loads in layers {
        if loads.is_empty() {
            continue;
        }
        busiest += loads.iter().copied().fold(0.0, f64::max);
        mean += loads.iter().sum::<f64>() / loads.len() as f64;
    }
    if mean > 0.0 {
        busiest / mean
    } else {
        0.0
    }
}

/// Identifies a checkpoint: FNV-1a over `config.json`, a synthetic checkpoint's seed file
/// (two seeds are two models with the same names) and the sorted tensor names.
pub fn fingerprint(dir: &Path, tensor_names: &[&str]) -> String {
    let mut hash: u64 = 0xcbf29ce484222325;
    let mut feed = |bytes: &[u8]| {
        for b in bytes {
            hash ^= *b as u64;
            hash = hash.wrapping_mul(0x100000001b3);
        }
    };
    feed(&std::fs::read(dir.join("config.json")).unwrap_or_default());
    let marker = dir.join(moe_model::checkpoint::synthetic::MARKER);
    feed(&std::fs::read(marker).unwrap_or_default());
    let mut names = tensor_names.to_vec();
    names.sort_unstable();
    for n in names {
        feed(n.as_bytes());
        feed(&[0]);
    }
    format!("{hash:016x}")
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Node ids to addresses, as the planner passes live nodes.
    pub(crate) fn nodes(ids: &[&str]) -> BTreeMap<String, String> {
        ids.iter()
            .map(|id| (id.to_string(), format!("{id}:1")))
            .collect()
    }

    /// Two synthetic checkpoints of one config and two seeds hold two models: their
    /// fingerprints differ, so a node generating the other seed's weights is refused.
    #[test]
    fn a_synthetic_checkpoints_seed_is_in_its_fingerprint() {
        use moe_model::generator::{CheckpointPlan, Preset, WeightDtype};
        let root = std::env::temp_dir().join(format!("moe-fingerprint-{}", std::process::id()));
        let print = |seed: u64| {
            let dir = root.join(seed.to_string());
            CheckpointPlan::new(
                moe_model::Family::Mixtral,
                Preset::Tiny,
                WeightDtype::Bf16,
                seed,
            )
            .write_synthetic(&dir)
            .unwrap();
            fingerprint(&dir, &["a", "b"])
        };
        let (one, again, other) = (print(1), print(1), print(2));
        let _ = std::fs::remove_dir_all(&root);
        assert_eq!(one, again);
        assert_ne!(one, other);
    }

    #[test]
    fn every_expert_is_placed_evenly() {
        let p = Placement::plan(1, "f", &[1, 2], 16, &nodes(&["a", "b", "c"]), None).unwrap();
        let owners = p.holders();
        assert_eq!(owners.len(), 32);
        assert_eq!(p.replica_count(), 0);
        for a in p.nodes.values() {
            for layer in [1u32, 2] {
                let n = a.experts.iter().filter(|e| e.0 == layer).count();
                assert!(n == 5 || n == 6, "{n}");
            }
        }
    }

    #[test]
    fn adding_a_node_moves_only_its_share() {
        let before = Placement::plan(1, "f", &[1], 16, &nodes(&["a", "b"]), None).unwrap();
        let after =
            Placement::plan(2, "f", &[1], 16, &nodes(&["a", "b", "c"]), Some(&before)).unwrap();
        assert_eq!(before.moves_to(&after), after.experts_of("c").len());
        assert_eq!(after.holders().len(), 16);
        let removed = Placement::plan(3, "f", &[1], 16, &nodes(&["a", "c"]), Some(&after)).unwrap();
        assert_eq!(after.moves_to(&removed), after.experts_of("b").len());
    }
}
