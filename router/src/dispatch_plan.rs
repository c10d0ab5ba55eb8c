//! Planning one MoE layer's dispatch and reading its answers, without any I/O: which node
//! computes each pair and what each node is sent ([`assign_pairs`]); then where each answer
//! goes and which pairs must be sent again ([`settle`]).
//!
//! Each token goes once to each node holding any of its chosen experts, with the CSR list of
//! those experts; with replicated experts a pair goes to the replica on the node with the
//! fewest pairs so far in the layer, avoiding nodes reported failing (ties by node index, so
//! the plan is deterministic). Outputs are written back by global pair index, so the combine
//! order never depends on the plan.

use std::collections::HashMap;

use moe_cluster::collective::exchange::NodeShare;
use moe_cluster::collective::row_plane::RowShare;
use moe_cluster::placement::ExpertId;
use moe_model::routes::ExpertRoutes;

use crate::layer_exchange::NodeReply;

/// What each node of the serving placement is sent for one layer.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LayerAssignment {
    /// Per node (index into the serving placement's links): its rows and local routes.
    pub shares: Vec<NodeShare>,
    /// Per node: the layer's pair index of each of its pairs, in the share's pair order.
    pub global_pairs: Vec<Vec<usize>>,
    /// Pending pairs whose expert no node of the placement holds.
    pub unplaced: Vec<usize>,
    /// Per node: the layer's row index of each of its share's rows (what a device-resident
    /// dispatch gathers, the rows themselves staying where they are).
    pub row_index: Vec<Vec<u32>>,
}

impl LayerAssignment {
    /// Each node's part for [`moe_cluster::collective::row_plane::dispatch_layer_in_place`].
    pub fn row_shares(&self) -> Vec<RowShare> {
        self.shares
            .iter()
            .zip(&self.row_index)
            .zip(&self.global_pairs)
            .map(|((share, rows), pairs)| RowShare {
                rows: rows.clone(),
                routes: share.routes.clone(),
                pairs: pairs.iter().map(|&p| p as u32).collect(),
            })
            .collect()
    }

    /// Writes node `node`'s outputs (`[pairs, hidden]`, in its share's pair order) to their
    /// pairs' rows of the layer's `pair_out`, so the combine sees the layer's pair order.
    pub fn place(&self, node: usize, outputs: &[f32], hidden: usize, pair_out: &mut [f32]) {
        for (i, &p) in self.global_pairs[node].iter().enumerate() {
            pair_out[p * hidden..(p + 1) * hidden]
                .copy_from_slice(&outputs[i * hidden..(i + 1) * hidden]);
        }
    }
}

/// Assigns the `pending` pairs of a layer (rows `[routes.rows(), hidden]`) to the nodes of a
/// placement: `holders` maps `(layer, expert)` to the indices of the nodes holding it, and
/// `suspect[n]` says node `n` was reported failing. Without `rows` (they are on a device) the
/// shares carry only routes and [`LayerAssignment::row_index`] says which rows each takes.
pub fn assign_pairs(
    holders: &HashMap<ExpertId, Vec<usize>>,
    suspect: &[bool],
    layer: u32,
    rows: Option<&[f32]>,
    hidden: usize,
    routes: &ExpertRoutes,
    pending: &[bool],
) -> LayerAssignment {
    let n_nodes = suspect.len();
    let mut out = LayerAssignment {
        shares: (0..n_nodes)
            .map(|_| NodeShare {
                rows: Vec::new(),
                routes: ExpertRoutes::with_capacity(0, 0),
            })
            .collect(),
        global_pairs: vec![Vec::new(); n_nodes],
        unplaced: Vec::new(),
        row_index: vec![Vec::new(); n_nodes],
    };
    let mut node_pairs = vec![0usize; n_nodes];
    let mut choices: Vec<Vec<(u32, f32, usize)>> = vec![Vec::new(); n_nodes];
    for r in 0..routes.rows() {
        for c in choices.iter_mut() {
            c.clear();
        }
        for p in routes.row_pairs(r).filter(|&p| pending[p]) {
            let expert = routes.experts[p];
            let at = holders
                .get(&(layer, expert))
                .map(Vec::as_slice)
                .unwrap_or(&[]);
            let node = match at {
                [only] => Some(*only),
                _ => at
                    .iter()
                    .copied()
                    .filter(|&n| n < n_nodes)
                    .min_by_key(|&n| (suspect[n], node_pairs[n], n)),
            };
            match node.filter(|&n| n < n_nodes) {
                Some(node) => {
                    node_pairs[node] += 1;
                    choices[node].push((expert, routes.weights[p], p));
                }
                None => out.unplaced.push(p),
            }
        }
        for (node, chosen) in choices.iter().enumerate() {
            if chosen.is_empty() {
                continue;
            }
            let share = &mut out.shares[node];
            if let Some(rows) = rows {
                share
                    .rows
                    .extend_from_slice(&rows[r * hidden..(r + 1) * hidden]);
            }
            out.row_index[node].push(r as u32);
            let mut local: Vec<(u32, f32)> = chosen.iter().map(|&(e, w, _)| (e, w)).collect();
            // push_row sorts by expert id; `chosen` is already ascending (routes are), so the
            // global pair indices line up with the share's pairs.
            share.routes.push_row(&mut local);
            out.global_pairs[node].extend(chosen.iter().map(|&(_, _, p)| p));
        }
    }
    out
}

/// What a layer's replies left: pairs to send again (under a newer placement) and the nodes
/// that failed (to report suspect); a node that only refused a stale epoch is not failed.
/// Each node's part of a whole layer sent from where its rows lie (the device-resident
/// dispatch), or `None` when the layer must go the host way, which settles node by node: a
/// node is reported failing, a pair has no node, or a share is over its node's batch bound
/// (`max_rows[n]`; the host path cuts shares to it).
pub fn in_place_shares(
    holders: &HashMap<ExpertId, Vec<usize>>,
    suspect: &[bool],
    max_rows: &[usize],
    layer: u32,
    hidden: usize,
    routes: &ExpertRoutes,
) -> Option<Vec<RowShare>> {
    if suspect.iter().any(|&s| s) {
        return None;
    }
    let pending = vec![true; routes.pairs()];
    let assignment = assign_pairs(holders, suspect, layer, None, hidden, routes, &pending);
    let within_bounds = assignment
        .shares
        .iter()
        .zip(max_rows)
        .all(|(share, &bound)| share.routes.rows() <= bound);
    (assignment.unplaced.is_empty() && within_bounds).then(|| assignment.row_shares())
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Settled {
    pub retry_pairs: Vec<usize>,
    pub failed_nodes: Vec<(usize, String)>,
    /// The slowest node's own expert compute.
    pub slowest_compute_micros: u64,
}

/// Writes each answering node's outputs into the layer's `pair_out` (in the layer's pair
/// order, whatever node computed a pair) and collects what is left to do.
pub fn settle(
    assignment: &LayerAssignment,
    replies: &[NodeReply],
    hidden: usize,
    pair_out: &mut [f32],
) -> Settled {
    let mut settled = Settled {
        retry_pairs: assignment.unplaced.clone(),
        ..Default::default()
    };
    for (node, reply) in replies.iter().enumerate() {
        match reply {
            NodeReply::Idle => {}
            NodeReply::Outputs {
                values,
                compute_micros,
            } => {
                settled.slowest_compute_micros =
                    settled.slowest_compute_micros.max(*compute_micros);
                assignment.place(node, values, hidden, pair_out);
            }
            NodeReply::StaleEpoch(_) => {
                settled
                    .retry_pairs
                    .extend_from_slice(&assignment.global_pairs[node]);
            }
            NodeReply::Failed(why) => {
                settled
                    .retry_pairs
                    .extend_from_slice(&assignment.global_pairs[node]);
                settled.failed_nodes.push((node, why.clone()));
            }
        }
    }
    settled
}

#[cfg(test)]
mod tests {
    use super::*;
    use moe_cluster::collective::RowEncoding;

    const HIDDEN: usize = 2;

    /// Three rows choosing two experts each, over experts 0..4 of layer 1.
    fn layer() -> (Vec<f32>, ExpertRoutes) {
        let mut routes = ExpertRoutes::with_capacity(3, 6);
        routes.push_row(&mut [(0, 0.5), (3, 0.5)]);
        routes.push_row(&mut [(1, 0.25), (2, 0.75)]);
        routes.push_row(&mut [(3, 0.9), (2, 0.1)]);
        ((0..3 * HIDDEN).map(|v| v as f32).collect(), routes)
    }

    fn holders(map: &[(u32, &[usize])]) -> HashMap<ExpertId, Vec<usize>> {
        map.iter().map(|&(e, n)| ((1, e), n.to_vec())).collect()
    }

    /// A token crosses to a node once, however many of its experts the node holds, and every
    /// pair comes back to its global index.
    #[test]
    fn each_token_goes_once_per_node_with_its_experts() {
        let (rows, routes) = layer();
        let h = holders(&[(0, &[0]), (1, &[1]), (2, &[1]), (3, &[0])]);
        let a = assign_pairs(
            &h,
            &[false, false],
            1,
            Some(&rows),
            HIDDEN,
            &routes,
            &[true; 6],
        );
        assert_eq!(a.shares[0].routes.offsets, [0, 2, 3]);
        assert_eq!(a.shares[0].routes.experts, [0, 3, 3]);
        assert_eq!(a.shares[0].rows, [0.0, 1.0, 4.0, 5.0]);
        assert_eq!(a.global_pairs[0], [0, 1, 5]);
        assert_eq!(a.shares[1].routes.experts, [1, 2, 2]);
        assert_eq!(a.global_pairs[1], [2, 3, 4]);
        assert!(a.unplaced.is_empty());
        let mut all: Vec<usize> = a.global_pairs.concat();
        all.sort_unstable();
        assert_eq!(all, (0..6).collect::<Vec<_>>());
    }

    /// Replicas: the least-loaded holder takes the pair, a suspect one only when it must;
    /// only pending pairs are sent; an expert held nowhere is reported.
    /// Without the rows, the plan is the same and each node's row indices gather, where the
    /// rows lie, exactly the rows its host share carries.
    #[test]
    fn row_indices_gather_what_the_host_shares_carry() {
        use moe_cluster::collective::row_plane::{HostRows, RowPlane};
        let (rows, routes) = layer();
        let h = holders(&[(0, &[0]), (1, &[1]), (2, &[1]), (3, &[0])]);
        let host = assign_pairs(
            &h,
            &[false, false],
            1,
            Some(&rows),
            HIDDEN,
            &routes,
            &[true; 6],
        );
        let device = assign_pairs(&h, &[false, false], 1, None, HIDDEN, &routes, &[true; 6]);
        assert_eq!(host.global_pairs, device.global_pairs);
        assert_eq!(host.row_index, [vec![0, 2], vec![1, 2]]);
        for (node, share) in device.row_shares().iter().enumerate() {
            assert!(device.shares[node].rows.is_empty());
            assert_eq!(share.routes, host.shares[node].routes);
            let gathered = HostRows
                .gather(&rows, &share.rows, HIDDEN, RowEncoding::F32)
                .unwrap();
            let values: Vec<f32> = gathered
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            assert_eq!(values, host.shares[node].rows);
            let pairs: Vec<usize> = share.pairs.iter().map(|&p| p as usize).collect();
            assert_eq!(pairs, host.global_pairs[node]);
        }
    }

    /// A layer goes in place only whole: with a node reported failing, a pair without a node
    /// or a share over its node's bound it goes the host way.
    #[test]
    fn in_place_shares_are_whole_layers_or_none() {
        let (rows, routes) = layer();
        let h = holders(&[(0, &[0]), (1, &[1]), (2, &[1]), (3, &[0])]);
        let shares = in_place_shares(&h, &[false, false], &[8, 8], 1, HIDDEN, &routes).unwrap();
        let host = assign_pairs(
            &h,
            &[false, false],
            1,
            Some(&rows),
            HIDDEN,
            &routes,
            &[true; 6],
        );
        assert_eq!(shares, host.row_shares());
        assert_eq!(
            in_place_shares(&h, &[true, false], &[8, 8], 1, HIDDEN, &routes),
            None
        );
        assert_eq!(
            in_place_shares(&h, &[false, false], &[1, 8], 1, HIDDEN, &routes),
            None
        );
        let missing = holders(&[(0, &[0]), (1, &[1]), (2, &[1])]);
        assert_eq!(
            in_place_shares(&missing, &[false, false], &[8, 8], 1, HIDDEN, &routes),
            None
        );
    }

    #[test]
    fn replicas_balance_suspects_are_avoided_and_gaps_reported() {
        let (rows, routes) = layer();
        let h = holders(&[(0, &[0, 1]), (1, &[0, 1]), (2, &[0, 1]), (3, &[0, 1])]);
        let a = assign_pairs(
            &h,
            &[false, false],
            1,
            Some(&rows),
            HIDDEN,
            &routes,
            &[true; 6],
        );
        assert_eq!(a.global_pairs[0].len(), 3);
        assert_eq!(a.global_pairs[1].len(), 3);
        let a = assign_pairs(
            &h,
            &[true, false],
            1,
            Some(&rows),
            HIDDEN,
            &routes,
            &[true; 6],
        );
        assert!(a.global_pairs[0].is_empty());
        assert_eq!(a.global_pairs[1].len(), 6);
        let pending = [false, false, true, false, false, true];
        let a = assign_pairs(
            &h,
            &[false, false],
            1,
            Some(&rows),
            HIDDEN,
            &routes,
            &pending,
        );
        let mut sent = a.global_pairs.concat();
        sent.sort_unstable();
        assert_eq!(sent, [2, 5]);
        let h = holders(&[(0, &[0]), (1, &[0]), (2, &[0])]);
        let a = assign_pairs(&h, &[false], 1, Some(&rows), HIDDEN, &routes, &[true; 6]);
        assert_eq!(a.unplaced, [1, 5]);
        // A holder index past the placement's nodes (a stale map) is never chosen.
        let h = holders(&[(0, &[5]), (1, &[0]), (2, &[0]), (3, &[0])]);
        let a = assign_pairs(&h, &[false], 1, Some(&rows), HIDDEN, &routes, &[true; 6]);
        assert_eq!(a.unplaced, [0]);
    }

    /// Answers land at their layer pair indices; a failed node's pairs are retried and the
    /// node reported; a stale-epoch refusal retries without blaming the node.
    #[test]
    fn replies_settle_into_pair_order_retries_and_failures() {
        let (rows, routes) = layer();
        let h = holders(&[(0, &[0]), (1, &[1]), (2, &[1]), (3, &[0])]);
        let a = assign_pairs(
            &h,
            &[false, false],
            1,
            Some(&rows),
            HIDDEN,
            &routes,
            &[true; 6],
        );
        let outputs = |n: usize, base: f32| NodeReply::Outputs {
            values: (0..n * HIDDEN).map(|i| base + i as f32).collect(),
            compute_micros: base as u64,
        };
        let mut out = vec![0.0f32; 6 * HIDDEN];
        let s = settle(
            &a,
            &[outputs(3, 100.0), outputs(3, 200.0)],
            HIDDEN,
            &mut out,
        );
        assert_eq!(
            s,
            Settled {
                retry_pairs: vec![],
                failed_nodes: vec![],
                slowest_compute_micros: 200
            }
        );
        // Node 0's third pair is the layer's pair 5; node 1's first is pair 2.
        assert_eq!(&out[5 * HIDDEN..6 * HIDDEN], &[104.0, 105.0]);
        assert_eq!(&out[2 * HIDDEN..3 * HIDDEN], &[200.0, 201.0]);
        let mut out = vec![0.0f32; 6 * HIDDEN];
        let s = settle(
            &a,
            &[
                NodeReply::Failed("gone".into()),
                NodeReply::StaleEpoch("behind".into()),
            ],
            HIDDEN,
            &mut out,
        );
        assert_eq!(s.retry_pairs, [0, 1, 5, 2, 3, 4]);
        assert_eq!(s.failed_nodes, [(0, "gone".to_string())]);
    }
}
