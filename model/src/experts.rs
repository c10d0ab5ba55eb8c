//! [`ExpertSet`]: the routed experts a process holds, addressed by `(layer, expert)`.
//!
//! The offline engine holds all of them; an expert node will hold a subset. A batch arrives as
//! rows plus [`ExpertRoutes`]; rows are grouped by expert so that each expert runs one GEMM over
//! all its rows, and one weighted output row comes back per (row, expert) pair, in pair order.

use std::collections::BTreeMap;
use std::sync::Arc;

use rayon::prelude::*;

use crate::checkpoint::Checkpoint;
use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::families;
use crate::layers::mlp::Mlp;
use crate::routes::ExpertRoutes;

/// Runs routed experts for a MoE layer. The offline engine's [`ExpertSet`] implements it; the
/// router will implement it by dispatching to expert nodes.
pub trait ExpertBackend: Sync {
    /// Returns `[routes.pairs(), hidden]`: each pair's expert output times its weight.
    fn run_experts(&self, layer: usize, rows: &[f32], routes: &ExpertRoutes) -> Result<Vec<f32>>;
}

/// `(layer, expert)`.
pub type ExpertKey = (usize, usize);

pub struct ExpertSet {
    hidden: usize,
    /// Shared so that a new placement epoch can keep the experts it shares with the old one.
    experts: BTreeMap<(usize, usize), Arc<Mlp>>,
}

impl ExpertSet {
    /// Loads the given `(layer, expert)` pairs, reading only their tensors.
    pub fn load(
        ckpt: &Checkpoint,
        config: &ModelConfig,
        which: impl IntoIterator<Item = (usize, usize)>,
    ) -> Result<Self> {
        let hidden = config.hidden_size;
        let inter = config.moe.intermediate_size;
        let wanted: Vec<(usize, usize)> = which.into_iter().collect();
        for &(layer, expert) in &wanted {
            if !config.is_moe_layer(layer) || expert >= config.moe.num_experts {
                return Err(ModelError::ExpertNotLoaded { layer, expert });
            }
        }
        let loaded: Vec<Result<(ExpertKey, Arc<Mlp>)>> = wanted
            .par_iter()
            .map(|&(layer, expert)| {
                let names = families::expert_names(config.family, layer, expert);
                Mlp::load(ckpt, &names, hidden, inter).map(|m| ((layer, expert), Arc::new(m)))
            })
            .collect();
        let experts = loaded.into_iter().collect::<Result<BTreeMap<_, _>>>()?;
        Ok(Self { hidden, experts })
    }

    /// Every routed expert of every MoE layer.
    pub fn load_all(ckpt: &Checkpoint, config: &ModelConfig) -> Result<Self> {
        let all: Vec<(usize, usize)> = config
            .moe_layer_indices()
            .flat_map(|l| (0..config.moe.num_experts).map(move |e| (l, e)))
            .collect();
        Self::load(ckpt, config, all)
    }

    /// A set holding exactly `wanted`: experts already held here are shared, the others are
    /// read from the checkpoint.
    pub fn with_experts(
        &self,
        ckpt: &Checkpoint,
        config: &ModelConfig,
        wanted: &[(usize, usize)],
    ) -> Result<Self> {
        let missing: Vec<(usize, usize)> = wanted
            .iter()
            .copied()
            .filter(|id| !self.experts.contains_key(id))
            .collect();
        let mut loaded = Self::load(ckpt, config, missing)?;
        for id in wanted {
            if let Some(mlp) = self.experts.get(id) {
                loaded.experts.insert(*id, Arc::clone(mlp));
            }
        }
        Ok(loaded)
    }

    /// An empty set for a model of this hidden size.
    pub fn empty(hidden: usize) -> Self {
        Self {
            hidden,
            experts: BTreeMap::new(),
        }
    }

    pub fn contains(&self, layer: usize, expert: usize) -> bool {
        self.experts.contains_key(&(layer, expert))
    }

    pub fn len(&self) -> usize {
        self.experts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.experts.is_empty()
    }

    pub fn bytes(&self) -> usize {
        self.experts.values().map(|m| m.bytes()).sum()
    }

    pub fn ids(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.experts.keys().copied()
    }
}

/// One expert's rows: `(pair index, row index)` of each, and the expert's output rows.
struct GroupOutput {
    members: Vec<(usize, usize)>,
    out: Vec<f32>,
}

impl ExpertBackend for ExpertSet {
    fn run_experts(&self, layer: usize, rows: &[f32], routes: &ExpertRoutes) -> Result<Vec<f32>> {
        let hidden = self.hidden;
        if rows.len() != routes.rows() * hidden {
            return Err(ModelError::InvalidRequest(format!(
                "{} floats of rows for {} routed rows of width {hidden}",
                rows.len(),
                routes.rows()
            )));
        }
        // Group pairs by expert: expert -> [(pair, row)].
        let mut groups: BTreeMap<u32, Vec<(usize, usize)>> = BTreeMap::new();
        for r in 0..routes.rows() {
            for p in routes.row_pairs(r) {
                groups.entry(routes.experts[p]).or_default().push((p, r));
            }
        }
        let mut work = Vec::with_capacity(groups.len());
        for (expert, members) in groups {
            let mlp =
                self.experts
                    .get(&(layer, expert as usize))
                    .ok_or(ModelError::ExpertNotLoaded {
                        layer,
                        expert: expert as usize,
                    })?;
            work.push((mlp, members));
        }
        let results: Vec<GroupOutput> = work
            .into_par_iter()
            .map(|(mlp, members)| {
                let mut gathered = Vec::with_capacity(members.len() * hidden);
                for &(_, r) in &members {
                    gathered.extend_from_slice(&rows[r * hidden..(r + 1) * hidden]);
                }
                let out = mlp.forward(&gathered, members.len());
                GroupOutput { members, out }
            })
            .collect();
        let mut pair_out = vec![0.0f32; routes.pairs() * hidden];
        for GroupOutput { members, out } in results {
            for (i, &(p, _)) in members.iter().enumerate() {
                let w = routes.weights[p];
                let dst = &mut pair_out[p * hidden..(p + 1) * hidden];
                for (d, v) in dst.iter_mut().zip(&out[i * hidden..(i + 1) * hidden]) {
                    *d = v * w;
                }
            }
        }
        Ok(pair_out)
    }
}
