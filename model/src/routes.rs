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
    for (r, row) in out.chunks_exact_mut(hidden).enumerate() {
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
    }
    out
}
