//! Load measured over windows, for the planner's rebalancing: this router's own dispatches,
//! and, on the elected planner, every other router's (from their `load/<router>` reports).
//!
//! Each router publishes cumulative counts; the planner keeps the last report it read from
//! each and counts the difference. Routers' windows are not aligned, so a peer's share lags by
//! at most one of its windows, but no pair is lost or counted twice. A peer seen for the first
//! time, or restarted (a new instance), only sets a baseline.

use std::collections::{BTreeMap, HashMap};

use moe_cluster::discovery::LoadReport;
use moe_cluster::placement::ExpertId;

/// Most nodes a report may name per layer: far above any cluster, bounds what a hostile
/// report makes the planner hold.
const MAX_NODES_PER_LAYER: usize = 4096;

/// The model's MoE layers and experts: what a report's ids are checked against.
#[derive(Debug, Clone)]
pub struct LoadShape {
    pub moe_layers: Vec<u32>,
    pub num_experts: usize,
}

/// Pairs dispatched per (layer, node) and tokens per (layer, expert), since some start.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DispatchCounts {
    pub node_pairs: BTreeMap<(u32, String), u64>,
    pub expert_tokens: HashMap<ExpertId, u64>,
}

/// Why a peer's report was not counted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReportError {
    #[error("layer {0} is not a MoE layer of this model")]
    UnknownLayer(u32),
    #[error("layer {layer} counts {count} experts, the model has {experts}")]
    TooManyExperts {
        layer: u32,
        count: usize,
        experts: usize,
    },
    #[error("layer {layer} names {count} nodes, over {MAX_NODES_PER_LAYER}")]
    TooManyNodes { layer: u32, count: usize },
}

impl DispatchCounts {
    /// A peer's report, checked against the model's layers and experts.
    pub fn from_report(report: &LoadReport, shape: &LoadShape) -> Result<Self, ReportError> {
        let known = |layer: u32| {
            if shape.moe_layers.contains(&layer) {
                Ok(layer)
            } else {
                Err(ReportError::UnknownLayer(layer))
            }
        };
        let mut counts = DispatchCounts::default();
        for (&layer, nodes) in &report.node_pairs {
            known(layer)?;
            if nodes.len() > MAX_NODES_PER_LAYER {
                let count = nodes.len();
                return Err(ReportError::TooManyNodes { layer, count });
            }
            for (node, &pairs) in nodes {
                counts.node_pairs.insert((layer, node.clone()), pairs);
            }
        }
        for (&layer, tokens) in &report.expert_tokens {
            known(layer)?;
            if tokens.len() > shape.num_experts {
                return Err(ReportError::TooManyExperts {
                    layer,
                    count: tokens.len(),
                    experts: shape.num_experts,
                });
            }
            for (expert, &n) in tokens.iter().enumerate().filter(|(_, n)| **n > 0) {
                counts.expert_tokens.insert((layer, expert as u32), n);
            }
        }
        Ok(counts)
    }

    /// The report this router publishes (`instance`: this process start's id).
    pub fn to_report(&self, instance: &str, num_experts: usize) -> LoadReport {
        let mut report = LoadReport {
            instance: instance.to_string(),
            ..Default::default()
        };
        for ((layer, node), &pairs) in &self.node_pairs {
            report
                .node_pairs
                .entry(*layer)
                .or_default()
                .insert(node.clone(), pairs);
        }
        for (&(layer, expert), &n) in &self.expert_tokens {
            let tokens = report
                .expert_tokens
                .entry(layer)
                .or_insert_with(|| vec![0; num_experts]);
            if let Some(slot) = tokens.get_mut(expert as usize) {
                *slot = n;
            }
        }
        report
    }

    /// What was counted since `earlier` (a counter that went back counts from zero).
    pub fn since(&self, earlier: &DispatchCounts) -> WindowLoad {
        fn delta(now: u64, before: Option<&u64>) -> u64 {
            now.checked_sub(before.copied().unwrap_or(0)).unwrap_or(now)
        }
        WindowLoad {
            node_pairs: self
                .node_pairs
                .iter()
                .map(|(k, &n)| (k.clone(), delta(n, earlier.node_pairs.get(k))))
                .collect(),
            expert_tokens: self
                .expert_tokens
                .iter()
                .map(|(k, &n)| (*k, delta(n, earlier.expert_tokens.get(k))))
                .collect(),
        }
    }
}

/// What was dispatched over one window, by one router or by all of them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WindowLoad {
    pub node_pairs: BTreeMap<(u32, String), u64>,
    pub expert_tokens: HashMap<ExpertId, u64>,
}

impl WindowLoad {
    pub fn add(&mut self, other: &WindowLoad) {
        for (k, n) in &other.node_pairs {
            *self.node_pairs.entry(k.clone()).or_default() += n;
        }
        for (k, n) in &other.expert_tokens {
            *self.expert_tokens.entry(*k).or_default() += n;
        }
    }

    /// The imbalance ratio over `nodes` (the serving epoch's), 0 below `min_pairs` pairs.
    pub fn imbalance(&self, nodes: &[String], min_pairs: u64) -> f64 {
        let mut per_layer: BTreeMap<u32, Vec<f64>> = BTreeMap::new();
        let mut total = 0u64;
        for (layer, _) in self.node_pairs.keys() {
            per_layer.entry(*layer).or_insert_with(|| {
                nodes
                    .iter()
                    .map(|id| {
                        let n = self
                            .node_pairs
                            .get(&(*layer, id.clone()))
                            .copied()
                            .unwrap_or(0);
                        total += n;
                        n as f64
                    })
                    .collect()
            });
        }
        if total >= min_pairs.max(1) {
            moe_cluster::placement::imbalance_ratio(per_layer.into_values())
        } else {
            0.0
        }
    }
}

/// The planner's memory of each peer router's last report.
#[derive(Debug, Default)]
pub struct PeerLoads {
    last: HashMap<String, PeerReport>,
}

#[derive(Debug)]
struct PeerReport {
    instance: String,
    revision: i64,
    counts: DispatchCounts,
}

/// The peers' share of a window.
#[derive(Debug, Default, PartialEq)]
pub struct PeerWindow {
    pub load: WindowLoad,
    /// Peers whose new report counted.
    pub counted: usize,
    /// Peers whose report could not be read (named with why).
    pub refused: Vec<(String, ReportError)>,
}

impl PeerLoads {
    /// The peers' tokens per expert as of their last reports.
    pub fn expert_totals(&self) -> HashMap<ExpertId, u64> {
        let mut totals = HashMap::new();
        for peer in self.last.values() {
            for (e, n) in &peer.counts.expert_tokens {
                *totals.entry(*e).or_default() += n;
            }
        }
        totals
    }

    /// What the peers dispatched since their reports this was last given; `own_id`'s report is
    /// skipped (the planner counts its own dispatches directly). Peers that left are forgotten.
    pub fn window(
        &mut self,
        reports: &BTreeMap<String, (i64, LoadReport)>,
        own_id: &str,
        shape: &LoadShape,
    ) -> PeerWindow {
        self.last.retain(|id, _| reports.contains_key(id));
        let mut window = PeerWindow::default();
        for (id, (revision, report)) in reports {
            if id == own_id {
                continue;
            }
            let counts = match DispatchCounts::from_report(report, shape) {
                Ok(counts) => counts,
                Err(e) => {
                    window.refused.push((id.clone(), e));
                    continue;
                }
            };
            match self.last.get(id) {
                Some(last) if last.revision == *revision => continue,
                Some(last) if last.instance == report.instance => {
                    window.load.add(&counts.since(&last.counts));
                    window.counted += 1;
                }
                // First seen, or restarted: a baseline only.
                _ => {}
            }
            let peer = PeerReport {
                instance: report.instance.clone(),
                revision: *revision,
                counts,
            };
            self.last.insert(id.clone(), peer);
        }
        window
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape() -> LoadShape {
        LoadShape {
            moe_layers: vec![1, 2],
            num_experts: 4,
        }
    }

    fn counts(pairs: &[(u32, &str, u64)], tokens: &[(u32, u32, u64)]) -> DispatchCounts {
        DispatchCounts {
            node_pairs: pairs
                .iter()
                .map(|(l, n, c)| ((*l, n.to_string()), *c))
                .collect(),
            expert_tokens: tokens.iter().map(|(l, e, c)| ((*l, *e), *c)).collect(),
        }
    }

    fn reports(
        entries: &[(&str, i64, &str, &DispatchCounts)],
    ) -> BTreeMap<String, (i64, LoadReport)> {
        entries
            .iter()
            .map(|(id, rev, instance, c)| (id.to_string(), (*rev, c.to_report(instance, 4))))
            .collect()
    }

    #[test]
    fn a_report_round_trips_and_ids_outside_the_model_are_refused() {
        let c = counts(&[(1, "a", 5), (2, "b", 7)], &[(1, 3, 9), (2, 0, 4)]);
        let report = c.to_report("i", 4);
        assert_eq!(report.expert_tokens[&1], vec![0, 0, 0, 9]);
        assert_eq!(DispatchCounts::from_report(&report, &shape()), Ok(c));
        let mut bad = report.clone();
        bad.expert_tokens.insert(2, vec![0; 5]);
        assert_eq!(
            DispatchCounts::from_report(&bad, &shape()),
            Err(ReportError::TooManyExperts {
                layer: 2,
                count: 5,
                experts: 4
            })
        );
        let mut bad = report.clone();
        bad.node_pairs.insert(9, BTreeMap::new());
        assert_eq!(
            DispatchCounts::from_report(&bad, &shape()),
            Err(ReportError::UnknownLayer(9))
        );
        let mut bad = report;
        bad.node_pairs.insert(
            1,
            (0..=MAX_NODES_PER_LAYER)
                .map(|n| (n.to_string(), 1))
                .collect(),
        );
        assert!(matches!(
            DispatchCounts::from_report(&bad, &shape()),
            Err(ReportError::TooManyNodes { layer: 1, .. })
        ));
    }

    #[test]
    fn the_imbalance_counts_the_serving_nodes_of_every_layer() {
        let window = counts(
            &[(1, "a", 30), (1, "b", 10), (2, "a", 20), (2, "gone", 99)],
            &[],
        )
        .since(&DispatchCounts::default());
        // Layer 1: busiest 30, mean 20; layer 2: busiest 20, mean 10 (b sent nothing).
        let nodes = ["a".to_string(), "b".to_string()];
        let ratio = window.imbalance(&nodes, 1);
        assert!((ratio - 50.0 / 30.0).abs() < 1e-12, "{ratio}");
        assert_eq!(window.imbalance(&nodes, 61), 0.0, "under min_pairs");
    }

    #[test]
    fn peers_count_once_from_their_second_report_and_restarts_set_a_baseline() {
        let mut peers = PeerLoads::default();
        let shape = shape();
        let first = counts(&[(1, "a", 10)], &[(1, 0, 10)]);
        let mine = counts(&[(1, "a", 1000)], &[]);
        let w = peers.window(
            &reports(&[("p", 5, "i1", &first), ("me", 6, "m", &mine)]),
            "me",
            &shape,
        );
        assert_eq!(
            (w.counted, w.load),
            (0, WindowLoad::default()),
            "a baseline"
        );

        let second = counts(&[(1, "a", 25), (1, "b", 4)], &[(1, 0, 25), (1, 2, 4)]);
        let w = peers.window(&reports(&[("p", 9, "i1", &second)]), "me", &shape);
        assert_eq!(w.counted, 1);
        assert_eq!(
            w.load,
            counts(&[(1, "a", 15), (1, "b", 4)], &[(1, 0, 15), (1, 2, 4)])
                .since(&DispatchCounts::default())
        );

        // The same revision again counts nothing.
        let w = peers.window(&reports(&[("p", 9, "i1", &second)]), "me", &shape);
        assert_eq!(w.counted, 0);

        // Restarted: lower counts under a new instance are a new baseline, not a window.
        let restarted = counts(&[(1, "a", 3)], &[(1, 0, 3)]);
        let w = peers.window(&reports(&[("p", 12, "i2", &restarted)]), "me", &shape);
        assert_eq!((w.counted, w.load), (0, WindowLoad::default()));
        let later = counts(&[(1, "a", 8)], &[(1, 0, 8)]);
        let w = peers.window(&reports(&[("p", 14, "i2", &later)]), "me", &shape);
        assert_eq!(w.load.node_pairs[&(1, "a".to_string())], 5);

        // A refused report is named and counts nothing; a peer gone is forgotten.
        let mut bad = later.to_report("i2", 4);
        bad.node_pairs.insert(7, BTreeMap::new());
        let w = peers.window(&[("p".to_string(), (20, bad))].into(), "me", &shape);
        assert_eq!(
            w.refused,
            vec![("p".to_string(), ReportError::UnknownLayer(7))]
        );
        assert_eq!(peers.expert_totals()[&(1, 0)], 8, "the last report read");
        peers.window(&BTreeMap::new(), "me", &shape);
        assert!(peers.last.is_empty());
    }
}
