//! [`ExpertSet`]: the routed experts a process holds, addressed by `(layer, expert)`.
//!
//! The offline engine holds all of them; an expert node will hold a subset. A batch arrives as
//! rows plus [`ExpertRoutes`]; rows are grouped by expert so that each expert runs one GEMM over
//! all its rows, and one weighted output row comes back per (row, expert) pair, in pair order.
//! The weights live where the set's [`ExpertDevice`] says: host memory (the packed CPU GEMM)
//! or, with the `cuda` feature, a GPU (cuBLAS).

use std::collections::BTreeMap;
use std::sync::Arc;

use rayon::prelude::*;

use crate::checkpoint::Checkpoint;
use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::families;
use crate::layers::mlp::Mlp;
use crate::routes::{ExpertRoutes, ExpertRuns};

/// Where an [`ExpertSet`] keeps its weights and runs its GEMMs.
#[derive(Debug, Clone, Default)]
pub enum ExpertDevice {
    #[default]
    Cpu,
    #[cfg(feature = "cuda")]
    Gpu(Arc<crate::gpu::GpuContext>),
}

impl ExpertDevice {
    pub fn device(&self) -> crate::device::Device {
        match self {
            ExpertDevice::Cpu => crate::device::Device::Cpu,
            #[cfg(feature = "cuda")]
            ExpertDevice::Gpu(ctx) => ctx.device(),
        }
    }
}

/// One expert's weights, on the set's device.
enum HeldExpert {
    Cpu(Mlp),
    #[cfg(feature = "cuda")]
    Gpu(crate::gpu::GpuMlp),
}

impl HeldExpert {
    fn bytes(&self) -> usize {
        match self {
            HeldExpert::Cpu(m) => m.bytes(),
            #[cfg(feature = "cuda")]
            HeldExpert::Gpu(m) => m.bytes(),
        }
    }
}

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
    device: ExpertDevice,
    /// Shared so that a new placement epoch can keep the experts it shares with the old one.
    experts: BTreeMap<(usize, usize), Arc<HeldExpert>>,
}

/// Experts read and uploaded at a time: bounds the host copies a GPU load holds at once.
#[cfg(feature = "cuda")]
const GPU_UPLOAD_CHUNK: usize = 16;

impl ExpertSet {
    /// Loads the given `(layer, expert)` pairs on the CPU, reading only their tensors.
    pub fn load(
        ckpt: &Checkpoint,
        config: &ModelConfig,
        which: impl IntoIterator<Item = (usize, usize)>,
    ) -> Result<Self> {
        Self::load_on(ckpt, config, which, &ExpertDevice::Cpu)
    }

    /// Loads the given `(layer, expert)` pairs onto `device`, reading only their tensors.
    pub fn load_on(
        ckpt: &Checkpoint,
        config: &ModelConfig,
        which: impl IntoIterator<Item = (usize, usize)>,
        device: &ExpertDevice,
    ) -> Result<Self> {
        let hidden = config.hidden_size;
        let inter = config.moe.intermediate_size;
        let wanted: Vec<(usize, usize)> = which.into_iter().collect();
        for &(layer, expert) in &wanted {
            if !config.is_moe_layer(layer) || expert >= config.moe.num_experts {
                return Err(ModelError::ExpertNotLoaded { layer, expert });
            }
        }
        let experts = match device {
            ExpertDevice::Cpu => {
                let loaded: Vec<Result<(ExpertKey, Arc<HeldExpert>)>> = wanted
                    .par_iter()
                    .map(|&(layer, expert)| {
                        let names = families::expert_names(config.family, layer, expert);
                        Mlp::load(ckpt, &names, hidden, inter)
                            .map(|m| ((layer, expert), Arc::new(HeldExpert::Cpu(m))))
                    })
                    .collect();
                loaded.into_iter().collect::<Result<BTreeMap<_, _>>>()?
            }
            #[cfg(feature = "cuda")]
            ExpertDevice::Gpu(ctx) => {
                let mut experts = BTreeMap::new();
                for chunk in wanted.chunks(GPU_UPLOAD_CHUNK) {
                    let host: Vec<Result<[Vec<f32>; 3]>> = chunk
                        .par_iter()
                        .map(|&(layer, expert)| {
                            let names = families::expert_names(config.family, layer, expert);
                            Ok([
                                ckpt.load_f32(&names.gate, &[inter, hidden])?,
                                ckpt.load_f32(&names.up, &[inter, hidden])?,
                                ckpt.load_f32(&names.down, &[hidden, inter])?,
                            ])
                        })
                        .collect();
                    for (&(layer, expert), weights) in chunk.iter().zip(host) {
                        let [gate, up, down] = weights?;
                        let names = families::expert_names(config.family, layer, expert);
                        let precision = crate::device_dense::ops::MatrixPrecision::of(
                            ckpt,
                            &[&names.gate, &names.up, &names.down],
                        );
                        let mlp = crate::gpu::GpuMlp::upload(
                            ctx, &gate, &up, &down, hidden, inter, precision,
                        )?;
                        let id = (layer, expert);
                        experts.insert(id, Arc::new(HeldExpert::Gpu(mlp)));
                    }
                }
                experts
            }
        };
        Ok(Self {
            hidden,
            device: device.clone(),
            experts,
        })
    }

    /// Every routed expert of every MoE layer.
    pub fn load_all(ckpt: &Checkpoint, config: &ModelConfig) -> Result<Self> {
        Self::load_all_on(ckpt, config, &ExpertDevice::Cpu)
    }

    /// Every routed expert of every MoE layer, on `device`.
    pub fn load_all_on(
        ckpt: &Checkpoint,
        config: &ModelConfig,
        device: &ExpertDevice,
    ) -> Result<Self> {
        let all: Vec<(usize, usize)> = config
            .moe_layer_indices()
            .flat_map(|l| (0..config.moe.num_experts).map(move |e| (l, e)))
            .collect();
        Self::load_on(ckpt, config, all, device)
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
        let mut loaded = Self::load_on(ckpt, config, missing, &self.device)?;
        for id in wanted {
            if let Some(mlp) = self.experts.get(id) {
                loaded.experts.insert(*id, Arc::clone(mlp));
            }
        }
        Ok(loaded)
    }

    /// An empty set for a model of this hidden size.
    pub fn empty(hidden: usize) -> Self {
        Self::empty_on(hidden, ExpertDevice::Cpu)
    }

    /// An empty set whose experts will live on `device`.
    pub fn empty_on(hidden: usize, device: ExpertDevice) -> Self {
        Self {
            hidden,
            device,
            experts: BTreeMap::new(),
        }
    }

    pub fn device(&self) -> &ExpertDevice {
        &self.device
    }

    /// Adds a CPU expert built in a test.
    #[cfg(test)]
    pub(crate) fn insert_cpu(&mut self, id: ExpertKey, mlp: Mlp) {
        self.experts.insert(id, Arc::new(HeldExpert::Cpu(mlp)));
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

impl ExpertSet {
    /// The held expert serving each run of `plan`, or the first one missing.
    fn experts_for(&self, layer: usize, plan: &ExpertRuns) -> Result<Vec<&HeldExpert>> {
        plan.runs
            .iter()
            .map(|run| {
                let expert = run.expert as usize;
                self.experts
                    .get(&(layer, expert))
                    .map(|held| held.as_ref())
                    .ok_or(ModelError::ExpertNotLoaded { layer, expert })
            })
            .collect()
    }

    fn run_on_cpu(
        &self,
        held: &[&HeldExpert],
        rows: &[f32],
        routes: &ExpertRoutes,
        plan: &ExpertRuns,
    ) -> Result<Vec<f32>> {
        let hidden = self.hidden;
        let mut work = Vec::with_capacity(held.len());
        for (run, expert) in plan.runs.iter().zip(held) {
            match expert {
                HeldExpert::Cpu(mlp) => work.push((mlp, *run)),
                #[cfg(feature = "cuda")]
                HeldExpert::Gpu(_) => {
                    return Err(ModelError::ExpertBackend(
                        "a GPU expert in a CPU expert set".into(),
                    ))
                }
            }
        }
        let outputs: Vec<Vec<f32>> = work
            .into_par_iter()
            .map(|(mlp, run)| {
                let slots = run.start..run.start + run.len;
                let mut gathered = Vec::with_capacity(run.len * hidden);
                for &r in &plan.row_of_slot[slots] {
                    let r = r as usize;
                    gathered.extend_from_slice(&rows[r * hidden..(r + 1) * hidden]);
                }
                mlp.forward(&gathered, run.len)
            })
            .collect();
        let mut pair_out = vec![0.0f32; routes.pairs() * hidden];
        for (run, out) in plan.runs.iter().zip(outputs) {
            let pairs = &plan.pair_of_slot[run.start..run.start + run.len];
            for (&p, row) in pairs.iter().zip(out.chunks_exact(hidden)) {
                let p = p as usize;
                let w = routes.weights[p];
                let dst = &mut pair_out[p * hidden..(p + 1) * hidden];
                for (d, v) in dst.iter_mut().zip(row) {
                    *d = v * w;
                }
            }
        }
        Ok(pair_out)
    }

    #[cfg(feature = "cuda")]
    fn run_on_gpu(
        &self,
        ctx: &crate::gpu::GpuContext,
        held: &[&HeldExpert],
        rows: &[f32],
        routes: &ExpertRoutes,
        plan: &ExpertRuns,
    ) -> Result<Vec<f32>> {
        let mut experts = Vec::with_capacity(held.len());
        for expert in held {
            match expert {
                HeldExpert::Gpu(mlp) => experts.push(mlp),
                HeldExpert::Cpu(_) => {
                    return Err(ModelError::ExpertBackend(
                        "a CPU expert in a GPU expert set".into(),
                    ))
                }
            }
        }
        Ok(crate::gpu::expert_ffn::run_from_host(
            ctx,
            &experts,
            rows,
            plan,
            &routes.weights,
            self.hidden,
        )?)
    }
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
        let plan = ExpertRuns::from_routes(routes);
        let held = self.experts_for(layer, &plan)?;
        if plan.slots() == 0 {
            return Ok(Vec::new());
        }
        match &self.device {
            ExpertDevice::Cpu => self.run_on_cpu(&held, rows, routes, &plan),
            #[cfg(feature = "cuda")]
            ExpertDevice::Gpu(ctx) => self.run_on_gpu(ctx, &held, rows, routes, &plan),
        }
    }
}
