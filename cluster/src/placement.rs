//! Expert placement: which node holds which `(layer, expert)`, under an epoch.
//!
//! The router plans it from the live nodes and writes it to etcd in a transaction guarded by the
//! revision it planned from, so two planners can never both commit. Planning keeps every expert
//! where it already is when that node is still live and under its share, so a membership change
//! moves as few experts as possible; each node gets an even slice of every layer, so every node
//! works on every MoE layer.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use etcd_client::{Client, Compare, CompareOp, Txn, TxnOp};
use serde::{Deserialize, Serialize};

use crate::error::ClusterError;
use crate::keys::ClusterKeys;

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
        let previous_owner: HashMap<ExpertId, &String> = previous
            .map(|p| {
                p.nodes
                    .iter()
                    .flat_map(|(id, a)| a.experts.iter().map(move |e| (*e, id)))
                    .collect()
            })
            .unwrap_or_default();
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
                match previous_owner
                    .get(&key)
                    .and_then(|owner| ids.iter().find(|id| **id == *owner))
                {
                    Some(owner) if count[owner] < quota[owner] => {
                        *count.get_mut(owner).expect("owner is a live node") += 1;
                        assigned
                            .get_mut(owner)
                            .expect("owner is a live node")
                            .push(key);
                    }
                    _ => homeless.push(key),
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

    /// For each expert, the node that serves it (the first, by id, when replicated).
    pub fn owners(&self) -> HashMap<ExpertId, &str> {
        let mut owners = HashMap::new();
        for (id, a) in &self.nodes {
            for e in &a.experts {
                owners.entry(*e).or_insert(id.as_str());
            }
        }
        owners
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

/// Identifies a checkpoint: FNV-1a over `config.json` and the sorted tensor names.
pub fn fingerprint(dir: &Path, tensor_names: &[&str]) -> String {
    let mut hash: u64 = 0xcbf29ce484222325;
    let mut feed = |bytes: &[u8]| {
        for b in bytes {
            hash ^= *b as u64;
            hash = hash.wrapping_mul(0x100000001b3);
        }
    };
    feed(&std::fs::read(dir.join("config.json")).unwrap_or_default());
    let mut names = tensor_names.to_vec();
    names.sort_unstable();
    for n in names {
        feed(n.as_bytes());
        feed(&[0]);
    }
    format!("{hash:016x}")
}

/// Reads and writes the placement key.
pub struct PlacementStore {
    client: Client,
    keys: ClusterKeys,
}

impl PlacementStore {
    pub fn new(client: Client, keys: ClusterKeys) -> Self {
        Self { client, keys }
    }

    /// The current placement and its mod revision (0 when none was written yet).
    pub async fn read(&mut self) -> Result<(Option<Placement>, i64), ClusterError> {
        let key = self.keys.placement();
        let resp = self.client.get(key.clone(), None).await?;
        match resp.kvs().first() {
            None => Ok((None, 0)),
            Some(kv) => {
                let placement =
                    serde_json::from_slice(kv.value()).map_err(|e| ClusterError::Record {
                        key,
                        message: e.to_string(),
                    })?;
                Ok((Some(placement), kv.mod_revision()))
            }
        }
    }

    /// Writes `placement` only if the key is still at `expected_revision` (0: absent).
    pub async fn write(
        &mut self,
        placement: &Placement,
        expected_revision: i64,
    ) -> Result<(), ClusterError> {
        let key = self.keys.placement();
        let value = serde_json::to_vec(placement).map_err(|e| ClusterError::Record {
            key: key.clone(),
            message: e.to_string(),
        })?;
        let txn = Txn::new()
            .when([Compare::mod_revision(
                key.clone(),
                CompareOp::Equal,
                expected_revision,
            )])
            .and_then([TxnOp::put(key, value, None)]);
        let resp = self.client.txn(txn).await?;
        if resp.succeeded() {
            Ok(())
        } else {
            Err(ClusterError::PlacementConflict(placement.epoch))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(ids: &[&str]) -> BTreeMap<String, String> {
        ids.iter()
            .map(|id| (id.to_string(), format!("{id}:1")))
            .collect()
    }

    #[test]
    fn every_expert_is_placed_evenly() {
        let p = Placement::plan(1, "f", &[1, 2], 16, &nodes(&["a", "b", "c"]), None).unwrap();
        let owners = p.owners();
        assert_eq!(owners.len(), 32);
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
        assert_eq!(after.owners().len(), 16);
        let removed = Placement::plan(3, "f", &[1], 16, &nodes(&["a", "c"]), Some(&after)).unwrap();
        assert_eq!(after.moves_to(&removed), after.experts_of("b").len());
    }
}
