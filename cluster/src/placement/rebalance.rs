//! Rebalancing a placement on measured expert load, as DeepSeek's EPLB does: extra copies for
//! the experts with the most load per copy, then exchanges of copies between a layer's busiest
//! node and another, so hot experts that landed on one node stop sharing it. An exchange keeps
//! both nodes' expert counts, so only replicas ever add memory, and an assignment that stays is
//! never reloaded.

use std::collections::{BTreeMap, HashMap};

use super::{imbalance_ratio, ExpertId, NodeAssignment, Placement};

/// How far one rebalance may change a placement, per MoE layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RebalanceBudget {
    /// Extra copies of hot experts.
    pub replicas_per_layer: usize,
    /// Exchanges of two experts' copies between two nodes (each node loads the other's).
    pub swaps_per_layer: usize,
}

/// One MoE layer while it is rebalanced: the copies each node holds and its expected load.
struct LayerLayout {
    copies: BTreeMap<String, Vec<ExpertId>>,
    load: BTreeMap<String, f64>,
}

impl LayerLayout {
    fn new(copies: BTreeMap<String, Vec<ExpertId>>, weight: &dyn Fn(&ExpertId) -> f64) -> Self {
        let load = copies
            .iter()
            .map(|(id, experts)| (id.clone(), experts.iter().map(weight).sum()))
            .collect();
        LayerLayout { copies, load }
    }

    fn holds(&self, node: &str, expert: &ExpertId) -> bool {
        self.copies.get(node).is_some_and(|c| c.contains(expert))
    }

    fn add(&mut self, node: &str, expert: ExpertId, weight: f64) {
        if let (Some(copies), Some(load)) = (self.copies.get_mut(node), self.load.get_mut(node)) {
            copies.push(expert);
            *load += weight;
        }
    }

    /// Places the copies past the first, hottest per copy first, each on the least-loaded
    /// node that lacks the expert.
    fn place_replicas(
        &mut self,
        experts: &[ExpertId],
        copies: &HashMap<ExpertId, usize>,
        weight: &dyn Fn(&ExpertId) -> f64,
    ) {
        let mut extra: Vec<ExpertId> = experts
            .iter()
            .filter(|e| copies.get(e).is_some_and(|&c| c > 1))
            .copied()
            .collect();
        extra.sort_by(|a, b| weight(b).total_cmp(&weight(a)).then(a.cmp(b)));
        for e in extra {
            for _ in 1..copies[&e] {
                let target = self
                    .load
                    .iter()
                    .filter(|(id, _)| !self.holds(id, &e))
                    .min_by(|a, b| a.1.total_cmp(b.1).then(a.0.cmp(b.0)))
                    .map(|(id, _)| id.clone());
                let Some(target) = target else { break };
                self.add(&target, e, weight(&e));
            }
        }
    }

    /// Up to `max_swaps` times: exchanges a copy on the busiest node with a lighter one on
    /// another node, choosing the exchange that leaves the pair's busier node lightest, while
    /// that is lighter than the busiest node was. Returns how many exchanges were made.
    fn swap_toward_even(&mut self, weight: &dyn Fn(&ExpertId) -> f64, max_swaps: usize) -> usize {
        let mut swaps = 0;
        while swaps < max_swaps {
            let Some((busiest, top)) = self
                .load
                .iter()
                .max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(a.0)))
                .map(|(id, load)| (id.clone(), *load))
            else {
                break;
            };
            // (worst of the two after, other node, copy leaving busiest, copy coming back)
            let mut best: Option<(f64, String, usize, usize)> = None;
            let hot_copies = &self.copies[&busiest];
            for (other, cold_copies) in self.copies.iter().filter(|(id, _)| **id != busiest) {
                let other_load = self.load[other];
                for (h, hot) in hot_copies.iter().enumerate() {
                    if cold_copies.contains(hot) {
                        continue;
                    }
                    for (c, cold) in cold_copies.iter().enumerate() {
                        let moved = weight(hot) - weight(cold);
                        if moved <= 0.0 || hot_copies.contains(cold) {
                            continue;
                        }
                        let worst = (top - moved).max(other_load + moved);
                        // Relative margin: float sums must not swap back and forth.
                        let better = worst < top * (1.0 - 1e-9);
                        if better && best.as_ref().is_none_or(|b| worst < b.0) {
                            best = Some((worst, other.clone(), h, c));
                        }
                    }
                }
            }
            let Some((_, other, h, c)) = best else { break };
            let hot = self.copies[&busiest][h];
            let cold = self.copies[&other][c];
            let moved = weight(&hot) - weight(&cold);
            if let Some(copies) = self.copies.get_mut(&busiest) {
                copies[h] = cold;
            }
            if let Some(copies) = self.copies.get_mut(&other) {
                copies[c] = hot;
            }
            *self.load.entry(busiest).or_default() -= moved;
            *self.load.entry(other).or_default() += moved;
            swaps += 1;
        }
        swaps
    }
}

/// How many copies each expert of one layer gets: one each, then `extra` more, each to the
/// expert with the most load per copy (never more copies than nodes, never for a cold expert).
fn copy_counts(
    experts: &[ExpertId],
    heat: &dyn Fn(&ExpertId) -> f64,
    extra: usize,
    node_count: usize,
) -> HashMap<ExpertId, usize> {
    let mut copies: HashMap<ExpertId, usize> = experts.iter().map(|e| (*e, 1)).collect();
    for _ in 0..extra {
        let Some(hottest) = experts
            .iter()
            .filter(|e| copies[e] < node_count && heat(e) > 0.0)
            .max_by(|a, b| {
                (heat(a) / copies[a] as f64)
                    .total_cmp(&(heat(b) / copies[b] as f64))
                    .then(b.cmp(a))
            })
            .copied()
        else {
            break;
        };
        *copies.entry(hottest).or_default() += 1;
    }
    copies
}

impl Placement {
    /// Expected imbalance if every expert's `load` (tokens in a window) is split evenly over its
    /// replicas, as dispatch does: see [`imbalance_ratio`].
    pub fn expected_imbalance(&self, load: &HashMap<ExpertId, u64>) -> f64 {
        let mut per_layer: BTreeMap<u32, BTreeMap<&str, f64>> = BTreeMap::new();
        for (expert, nodes) in self.holders() {
            let share = load.get(&expert).copied().unwrap_or(0) as f64 / nodes.len() as f64;
            let layer = per_layer
                .entry(expert.0)
                .or_insert_with(|| self.nodes.keys().map(|id| (id.as_str(), 0.0)).collect());
            for node in nodes {
                *layer.entry(node).or_default() += share;
            }
        }
        imbalance_ratio(per_layer.values().map(|l| l.values().copied().collect()))
    }

    /// Plans the next epoch on the measured `load`: per layer, the budget's extra copies of
    /// the hottest experts, placed to even out the expected load, then up to its swaps of
    /// copies between the busiest node and another. Each expert keeps its first copy (by node
    /// id) unless a swap moves it; earlier replicas are planned anew.
    pub fn rebalance(
        &self,
        epoch: u64,
        load: &HashMap<ExpertId, u64>,
        budget: RebalanceBudget,
    ) -> Placement {
        // Start from one copy of each expert: its first holder by id.
        let empty = || -> BTreeMap<String, Vec<ExpertId>> {
            self.nodes
                .keys()
                .map(|id| (id.clone(), Vec::new()))
                .collect()
        };
        let mut layers: BTreeMap<u32, BTreeMap<String, Vec<ExpertId>>> = BTreeMap::new();
        for (expert, holders) in self.holders() {
            if let Some(first) = holders.first() {
                let layer = layers.entry(expert.0).or_insert_with(empty);
                layer.entry(first.to_string()).or_default().push(expert);
            }
        }
        let mut nodes: BTreeMap<String, NodeAssignment> = self
            .nodes
            .iter()
            .map(|(id, a)| {
                let experts = Vec::new();
                let address = a.address.clone();
                (id.clone(), NodeAssignment { address, experts })
            })
            .collect();
        let heat = |e: &ExpertId| load.get(e).copied().unwrap_or(0) as f64;
        for (_, mut first_copies) in layers {
            for copies in first_copies.values_mut() {
                copies.sort_unstable();
            }
            let mut experts: Vec<ExpertId> = first_copies.values().flatten().copied().collect();
            experts.sort_unstable();
            let copies = copy_counts(&experts, &heat, budget.replicas_per_layer, nodes.len());
            let weight = |e: &ExpertId| heat(e) / copies.get(e).copied().unwrap_or(1) as f64;
            let mut layout = LayerLayout::new(first_copies, &weight);
            layout.place_replicas(&experts, &copies, &weight);
            layout.swap_toward_even(&weight, budget.swaps_per_layer);
            for (id, copies) in layout.copies {
                if let Some(a) = nodes.get_mut(&id) {
                    a.experts.extend(copies);
                }
            }
        }
        for a in nodes.values_mut() {
            a.experts.sort_unstable();
        }
        Placement {
            epoch,
            fingerprint: self.fingerprint.clone(),
            nodes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::tests::nodes;

    fn budget(replicas_per_layer: usize, swaps_per_layer: usize) -> RebalanceBudget {
        RebalanceBudget {
            replicas_per_layer,
            swaps_per_layer,
        }
    }

    /// Experts 0 and 2 of 8 (both on node a of two) take almost all the tokens.
    fn two_hot_experts_on_one_node() -> (Placement, HashMap<ExpertId, u64>) {
        let before = Placement::plan(1, "f", &[1], 8, &nodes(&["a", "b"]), None).unwrap();
        assert!(
            before.experts_of("a").contains(&(1, 0)) && before.experts_of("a").contains(&(1, 2))
        );
        let load = (0..8u32)
            .map(|e| ((1, e), if e == 0 || e == 2 { 1000 } else { 10 }))
            .collect();
        (before, load)
    }

    #[test]
    fn rebalance_replicates_hot_experts_and_evens_the_load() {
        let (before, load) = two_hot_experts_on_one_node();
        let imbalance = |p: &Placement| p.expected_imbalance(&load);
        let after = before.rebalance(2, &load, budget(2, 0));
        assert_eq!(after.replica_count(), 2);
        assert!(after.experts_of("b").contains(&(1, 0)) && after.experts_of("b").contains(&(1, 2)));
        assert!(imbalance(&before) > 1.9, "{}", imbalance(&before));
        assert!(imbalance(&after) < 1.1, "{}", imbalance(&after));
        assert_eq!(
            before.moves_to(&after),
            2,
            "only the new replicas are loaded"
        );
        // A membership change keeps the replicas of surviving nodes.
        let grown =
            Placement::plan(3, "f", &[1], 8, &nodes(&["a", "b", "c"]), Some(&after)).unwrap();
        assert_eq!(grown.holders().len(), 8);
        assert!(grown.replica_count() >= 1);
    }

    /// Without replicas, one exchange moves a hot expert's only copy: each node then holds one
    /// hot expert and as many experts as before.
    #[test]
    fn a_swap_moves_a_hot_experts_first_copy_to_another_node() {
        let (before, load) = two_hot_experts_on_one_node();
        let imbalance = |p: &Placement| p.expected_imbalance(&load);
        assert_eq!(before.rebalance(2, &load, budget(0, 0)), {
            let mut same = before.clone();
            same.epoch = 2;
            same
        });
        let after = before.rebalance(2, &load, budget(0, 4));
        assert_eq!(after.replica_count(), 0);
        let hot_on = |node: &str| {
            let experts = after.experts_of(node);
            [(1, 0), (1, 2)]
                .iter()
                .filter(|e| experts.contains(e))
                .count()
        };
        assert_eq!((hot_on("a"), hot_on("b")), (1, 1));
        for id in ["a", "b"] {
            assert_eq!(after.experts_of(id).len(), before.experts_of(id).len());
        }
        assert_eq!(before.moves_to(&after), 2, "one exchange: two loads");
        assert!(imbalance(&before) > 1.9, "{}", imbalance(&before));
        assert!(imbalance(&after) < 1.01, "{}", imbalance(&after));
        assert_eq!(after.holders().len(), 8, "every expert still placed");
    }

    /// Exchanges stop when no exchange lightens the busiest node, whatever the budget, and
    /// the result depends only on the input.
    #[test]
    fn swaps_stop_once_the_busiest_node_cannot_get_lighter() {
        let before = Placement::plan(1, "f", &[1, 3], 12, &nodes(&["a", "b", "c"]), None).unwrap();
        let load: HashMap<ExpertId, u64> = (0..12u32)
            .flat_map(|e| [((1, e), u64::from(e * e)), ((3, e), u64::from(e % 4 * 7))])
            .collect();
        let after = before.rebalance(2, &load, budget(0, 100));
        assert_eq!(after, before.rebalance(2, &load, budget(0, 100)));
        assert!(after.expected_imbalance(&load) < before.expected_imbalance(&load));
        assert!(
            before.moves_to(&after) < 2 * 100,
            "{}",
            before.moves_to(&after)
        );
        let again = after.rebalance(3, &load, budget(0, 100));
        assert_eq!(
            after.moves_to(&again),
            0,
            "already as even as swaps make it"
        );
        for id in ["a", "b", "c"] {
            assert_eq!(after.experts_of(id).len(), before.experts_of(id).len());
        }
    }
}
