//! Planning one MoE layer's dispatch, without any I/O: which node computes each pair, what each
//! node is sent, and how a node's share is cut to the node's batch bound.
//!
//! Each token goes once to each node holding any of its chosen experts, with the CSR list of
//! those experts; with replicated experts a pair goes to the replica on the node with the
//! fewest pairs so far in the layer, avoiding nodes reported failing (ties by node index, so
//! the plan is deterministic). Outputs are written back by global pair index, so the combine
//! order never depends on the plan.

use std::borrow::Cow;
use std::collections::HashMap;

use moe_cluster::collective::exchange::NodeShare;
use moe_cluster::placement::ExpertId;
use moe_model::routes::ExpertRoutes;

/// What each node of the serving placement is sent for one layer.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LayerAssignment {
    /// Per node (index into the serving placement's links): its rows and local routes.
    pub shares: Vec<NodeShare>,
    /// Per node: the layer's pair index of each of its pairs, in the share's pair order.
    pub global_pairs: Vec<Vec<usize>>,
    /// Pending pairs whose expert no node of the placement holds.
    pub unplaced: Vec<usize>,
}

/// Assigns the `pending` pairs of a layer (rows `[routes.rows(), hidden]`) to the nodes of a
/// placement: `holders` maps `(layer, expert)` to the indices of the nodes holding it, and
/// `suspect[n]` says node `n` was reported failing.
pub fn assign_pairs(
    holders: &HashMap<ExpertId, Vec<usize>>,
    suspect: &[bool],
    layer: u32,
    rows: &[f32],
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
            share
                .rows
                .extend_from_slice(&rows[r * hidden..(r + 1) * hidden]);
            let mut local: Vec<(u32, f32)> = chosen.iter().map(|&(e, w, _)| (e, w)).collect();
            // push_row sorts by expert id; `chosen` is already ascending (routes are), so the
            // global pair indices line up with the share's pairs.
            share.routes.push_row(&mut local);
            out.global_pairs[node].extend(chosen.iter().map(|&(_, _, p)| p));
        }
    }
    out
}

/// A node's share cut into pieces of at most `max_rows` rows (the node's batch bound), in
/// order: their pairs, concatenated, are the share's pairs. A share within the bound is
/// borrowed as it is (the usual case: no copy).
pub fn split_share(share: &NodeShare, hidden: usize, max_rows: usize) -> Vec<Cow<'_, NodeShare>> {
    let rows = share.routes.rows();
    let max_rows = max_rows.max(1);
    if rows <= max_rows {
        return vec![Cow::Borrowed(share)];
    }
    let mut pieces = Vec::with_capacity(rows.div_ceil(max_rows));
    for start in (0..rows).step_by(max_rows) {
        let end = (start + max_rows).min(rows);
        let first = share.routes.offsets[start] as usize;
        let last = share.routes.offsets[end] as usize;
        pieces.push(Cow::Owned(NodeShare {
            rows: share.rows[start * hidden..end * hidden].to_vec(),
            routes: ExpertRoutes {
                offsets: share.routes.offsets[start..=end]
                    .iter()
                    .map(|&o| o - first as u32)
                    .collect(),
                experts: share.routes.experts[first..last].to_vec(),
                weights: share.routes.weights[first..last].to_vec(),
            },
        }));
    }
    pieces
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let a = assign_pairs(&h, &[false, false], 1, &rows, HIDDEN, &routes, &[true; 6]);
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
    #[test]
    fn replicas_balance_suspects_are_avoided_and_gaps_reported() {
        let (rows, routes) = layer();
        let h = holders(&[(0, &[0, 1]), (1, &[0, 1]), (2, &[0, 1]), (3, &[0, 1])]);
        let a = assign_pairs(&h, &[false, false], 1, &rows, HIDDEN, &routes, &[true; 6]);
        assert_eq!(a.global_pairs[0].len(), 3);
        assert_eq!(a.global_pairs[1].len(), 3);
        let a = assign_pairs(&h, &[true, false], 1, &rows, HIDDEN, &routes, &[true; 6]);
        assert!(a.global_pairs[0].is_empty());
        assert_eq!(a.global_pairs[1].len(), 6);
        let pending = [false, false, true, false, false, true];
        let a = assign_pairs(&h, &[false, false], 1, &rows, HIDDEN, &routes, &pending);
        let mut sent = a.global_pairs.concat();
        sent.sort_unstable();
        assert_eq!(sent, [2, 5]);
        let h = holders(&[(0, &[0]), (1, &[0]), (2, &[0])]);
        let a = assign_pairs(&h, &[false], 1, &rows, HIDDEN, &routes, &[true; 6]);
        assert_eq!(a.unplaced, [1, 5]);
        // A holder index past the placement's nodes (a stale map) is never chosen.
        let h = holders(&[(0, &[5]), (1, &[0]), (2, &[0]), (3, &[0])]);
        let a = assign_pairs(&h, &[false], 1, &rows, HIDDEN, &routes, &[true; 6]);
        assert_eq!(a.unplaced, [0]);
    }

    /// A share over the node's bound is cut into pieces whose pairs, concatenated, are the
    /// share's, each with offsets from 0.
    #[test]
    fn shares_are_split_to_the_node_bound() {
        let (rows, routes) = layer();
        let share = NodeShare { rows, routes };
        assert!(matches!(split_share(&share, HIDDEN, 3)[..], [Cow::Borrowed(s)] if *s == share));
        let pieces = split_share(&share, HIDDEN, 2);
        assert_eq!(pieces.len(), 2);
        assert_eq!(pieces[0].routes.offsets, [0, 2, 4]);
        assert_eq!(pieces[1].routes.offsets, [0, 2]);
        assert_eq!(pieces[1].routes.experts, [2, 3]);
        assert_eq!(pieces[1].rows, [4.0, 5.0]);
        let experts: Vec<u32> = pieces
            .iter()
            .flat_map(|p| p.routes.experts.clone())
            .collect();
        assert_eq!(experts, share.routes.experts);
        let ones = split_share(&share, HIDDEN, 1);
        assert_eq!(ones.len(), 3);
        assert!(ones.iter().all(|p| p.routes.rows() == 1));
    }
}
