//! Which experts each token goes to, with what weight: the CSR structure that the gate
//! produces, an [`crate::experts::ExpertSet`] consumes, and the data plane will carry
//! (`pair_offsets`, `pair_experts`, `pair_weights`).

/// Per row, its chosen experts in ascending expert id, and their routing weights.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExpertRoutes {
    /// `offsets[r]..offsets[r + 1]` are row r's pairs; `len == rows + 1`.
    pub offsets: Vec<u32>,
    pub experts: Vec<u32>,
    pub weights: Vec<f32>,
}

impl ExpertRoutes {
    pub fn with_capacity(rows: usize, pairs: usize) -> Self {
        let mut offsets = Vec::with_capacity(rows + 1);
        offsets.push(0);
        Self {
            offsets,
            experts: Vec::with_capacity(pairs),
            weights: Vec::with_capacity(pairs),
        }
    }

    /// Rows exactly as given: each row's pairs in the listed order, neither sorted nor
    /// checked (to build what a careless or hostile peer might send).
    pub fn from_rows_as_given<R: AsRef<[(u32, f32)]>>(rows: &[R]) -> Self {
        let mut routes = Self::with_capacity(rows.len(), rows.len() * 4);
        for row in rows {
            for &(e, w) in row.as_ref() {
                routes.experts.push(e);
                routes.weights.push(w);
            }
            routes.offsets.push(routes.experts.len() as u32);
        }
        routes
    }

    /// Appends one row's choices; they are stored in ascending expert id (the canonical
    /// combine order, whatever order the gate picked them in).
    pub fn push_row(&mut self, choices: &mut [(u32, f32)]) {
        choices.sort_by_key(|c| c.0);
        for &(e, w) in choices.iter() {
            self.experts.push(e);
            self.weights.push(w);
        }
        self.offsets.push(self.experts.len() as u32);
    }

    pub fn rows(&self) -> usize {
        self.offsets.len().saturating_sub(1)
    }

    pub fn pairs(&self) -> usize {
        self.experts.len()
    }

    /// Pair index range of row `r`.
    pub fn row_pairs(&self, r: usize) -> std::ops::Range<usize> {
        self.offsets[r] as usize..self.offsets[r + 1] as usize
    }
}

/// Sums each row's weighted expert outputs in pair order (ascending expert id), starting from
/// zero, then adds the shared experts' output: exactly the order transformers uses, and the one
/// every placement of experts must reproduce.
pub fn combine(
    routes: &ExpertRoutes,
    pair_outputs: &[f32],
    shared: Option<&[f32]>,
    hidden: usize,
) -> Vec<f32> {
    let rows = routes.rows();
    let mut out = vec![0.0f32; rows * hidden];
    let sum_row = |(r, row): (usize, &mut [f32])| {
        for p in routes.row_pairs(r) {
            for (o, v) in row
                .iter_mut()
                .zip(&pair_outputs[p * hidden..(p + 1) * hidden])
            {
                *o += v;
            }
        }
        if let Some(shared) = shared {
            for (o, v) in row.iter_mut().zip(&shared[r * hidden..(r + 1) * hidden]) {
                *o += v;
            }
        }
    };
    // Rows are independent (each keeps its own order), so a prefill's thousands of rows are
    // split over threads; a decode step's few stay on the caller.
    let parallel = rows * hidden >= crate::backend::PARALLEL_MIN_VALUES;
    crate::backend::for_each_row(&mut out, hidden.max(1), parallel, sum_row);
    out
}

/// One expert's contiguous run of slots in an [`ExpertRuns`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExpertRun {
    pub expert: u32,
    pub start: usize,
    pub len: usize,
}

/// A routed batch in expert order: slot `s` carries row `row_of_slot[s]` for pair
/// `pair_of_slot[s]`, and each expert's slots form one run, so each expert runs one GEMM over
/// all its rows (CPU and GPU alike). Within a run, slots follow pair order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExpertRuns {
    pub row_of_slot: Vec<u32>,
    pub pair_of_slot: Vec<u32>,
    pub runs: Vec<ExpertRun>,
}

impl ExpertRuns {
    pub fn from_routes(routes: &ExpertRoutes) -> Self {
        let mut slots: Vec<(u32, u32, u32)> = Vec::with_capacity(routes.pairs());
        for r in 0..routes.rows() {
            for p in routes.row_pairs(r) {
                slots.push((routes.experts[p], p as u32, r as u32));
            }
        }
        // Pairs are already in row order; a stable sort by expert keeps pair order in a run.
        slots.sort_by_key(|&(expert, _, _)| expert);
        let mut runs: Vec<ExpertRun> = Vec::new();
        for (s, &(expert, _, _)) in slots.iter().enumerate() {
            match runs.last_mut() {
                Some(run) if run.expert == expert => run.len += 1,
                _ => runs.push(ExpertRun {
                    expert,
                    start: s,
                    len: 1,
                }),
            }
        }
        Self {
            row_of_slot: slots.iter().map(|s| s.2).collect(),
            pair_of_slot: slots.iter().map(|s| s.1).collect(),
            runs,
        }
    }

    pub fn slots(&self) -> usize {
        self.row_of_slot.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_group_each_expert_once_in_pair_order() {
        let mut routes = ExpertRoutes::with_capacity(3, 6);
        routes.push_row(&mut [(5, 0.5), (1, 0.5)]);
        routes.push_row(&mut [(1, 0.3), (2, 0.7)]);
        routes.push_row(&mut [(5, 1.0)]);
        let plan = ExpertRuns::from_routes(&routes);
        let experts: Vec<u32> = plan.runs.iter().map(|r| r.expert).collect();
        assert_eq!(experts, [1, 2, 5]);
        assert_eq!(
            plan.runs[0],
            ExpertRun {
                expert: 1,
                start: 0,
                len: 2
            }
        );
        assert_eq!(
            plan.runs[2],
            ExpertRun {
                expert: 5,
                start: 3,
                len: 2
            }
        );
        // Expert 1 serves pair 0 (row 0) then pair 2 (row 1); expert 5 pairs 1 (row 0), 4 (row 2).
        assert_eq!(plan.pair_of_slot, [0, 2, 3, 1, 4]);
        assert_eq!(plan.row_of_slot, [0, 1, 1, 0, 2]);
        assert_eq!(plan.slots(), routes.pairs());
    }

    /// The order is the contract: pairs in ascending expert id from zero, then the shared
    /// output. Values where float addition shows its order: 1e8 + 1 rounds back to 1e8.
    #[test]
    fn combine_sums_pairs_in_expert_order_then_the_shared_output() {
        let mut routes = ExpertRoutes::with_capacity(2, 3);
        routes.push_row(&mut [(7, 0.5), (2, 0.5)]);
        routes.push_row(&mut [(3, 1.0)]);
        // Pair 0 is row 0's expert 2, pair 1 its expert 7, pair 2 row 1's expert 3.
        let pair_outputs = [1e8f32, 1.0, 5.0];
        let shared = [-1e8f32, 2.0];
        let out = combine(&routes, &pair_outputs, Some(&shared), 1);
        // ((0 + 1e8) + 1) - 1e8 = 0; adding the shared output first would give 1.
        assert_eq!(out, [0.0, 7.0]);
        assert_eq!(combine(&routes, &pair_outputs, None, 1), [1e8, 5.0]);
        // A row's sum does not depend on its batch-mates, however many rows are split over
        // threads.
        let hidden = 64;
        let rows = 4096;
        let mut big = ExpertRoutes::with_capacity(rows, rows * 2);
        for r in 0..rows as u32 {
            big.push_row(&mut [(r % 5, 1.0), (5 + r % 3, 1.0)]);
        }
        let values: Vec<f32> = (0..big.pairs() * hidden)
            .map(|i| ((i * 7919) % 1000) as f32 * 1e-3 + 1e4 * ((i % 3) as f32))
            .collect();
        let all = combine(&big, &values, None, hidden);
        for r in [0usize, 1, 2047, 4095] {
            let mut alone = ExpertRoutes::with_capacity(1, 2);
            let pairs = big.row_pairs(r);
            let mut row: Vec<(u32, f32)> = pairs.clone().map(|p| (big.experts[p], 1.0)).collect();
            alone.push_row(&mut row);
            let own = &values[pairs.start * hidden..pairs.end * hidden];
            assert_eq!(
                combine(&alone, own, None, hidden),
                &all[r * hidden..(r + 1) * hidden]
            );
        }
    }

    #[test]
    fn an_empty_batch_has_no_runs() {
        let plan = ExpertRuns::from_routes(&ExpertRoutes::with_capacity(0, 0));
        assert!(plan.runs.is_empty());
        assert_eq!(plan.slots(), 0);
    }
}
