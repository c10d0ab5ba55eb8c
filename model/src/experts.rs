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

use crate::backend::InputRows;
use crate::checkpoint::Checkpoint;
use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::families;
#[cfg(feature = "cuda")]
use crate::grouped_ffn::GroupedRows;
use crate::layers::mlp::Mlp;
use crate::routes::{ExpertRoutes, ExpertRuns};

/// The crates above name the trait here; it lives in its own module so that the dense parts
/// depend on it alone, not on the expert set.
pub use crate::expert_backend::ExpertBackend;

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

    /// Whether experts loaded here will round their input rows to bf16 (see
    /// [`ExpertBackend::reads_rows_as_bf16`]), as a node tells routers before it holds any:
    /// GPU experts in `bf16` numerics, not `--deterministic`; of a checkpoint whose experts are
    /// FP8 in blocks `fp8_block_cols` wide (`None`: not FP8) held as `fp8` says, those kept as
    /// FP8 only on the tensor-core kernel (the exact FP8 kernel reads f32 rows). A node checks
    /// its held experts again for every layer it is sent in bf16.
    pub fn rounds_expert_rows_to_bf16(
        &self,
        fp8: crate::device::GpuFp8,
        fp8_block_cols: Option<usize>,
    ) -> bool {
        match self {
            ExpertDevice::Cpu => {
                let _ = (fp8, fp8_block_cols);
                false
            }
            #[cfg(feature = "cuda")]
            ExpertDevice::Gpu(ctx) => {
                gpu_numerics_round_rows(ctx)
                    && match (fp8, fp8_block_cols) {
                        (crate::device::GpuFp8::Keep, Some(cols)) => {
                            crate::gpu::tensor_core_gemm::tensor_cores_take_fp8_blocks(ctx, cols)
                        }
                        _ => true,
                    }
            }
        }
    }
}

/// Whether `ctx`'s numerics round expert inputs to plain bf16 (whatever the weights).
#[cfg(feature = "cuda")]
fn gpu_numerics_round_rows(ctx: &crate::gpu::GpuContext) -> bool {
    ctx.dtype() == crate::device::GpuDtype::Bf16 && !ctx.deterministic()
}

/// One expert's weights read for a GPU: widened to f32, or (`--gpu-fp8 keep`, on an FP8
/// checkpoint held as stored) its FP8 matrices, or (the same on a synthetic checkpoint) their
/// keys and scales, the codes to be generated on the device.
#[cfg(feature = "cuda")]
enum GpuUpload {
    Wide([Vec<f32>; 3]),
    Fp8([crate::backend::weight::Fp8Matrix; 3]),
    Generated([(u64, crate::backend::weight::Fp8Matrix); 3]),
}

#[cfg(feature = "cuda")]
impl GpuUpload {
    fn read(
        ckpt: &Checkpoint,
        names: &crate::layers::mlp::MlpNames,
        hidden: usize,
        inter: usize,
        keep_fp8: bool,
    ) -> Result<Self> {
        use crate::backend::NativeWeight;
        let shapes = [[inter, hidden], [inter, hidden], [hidden, inter]];
        let names = [&names.gate, &names.up, &names.down];
        if !keep_fp8 {
            let [gate, up, down] = [0, 1, 2].map(|i| ckpt.load_f32(names[i], &shapes[i]));
            return Ok(Self::Wide([gate?, up?, down?]));
        }
        // A synthetic checkpoint's codes are generated on the device, never on the host.
        if let [Some(gate), Some(up), Some(down)] = [
            ckpt.generated_fp8(names[0], &shapes[0])?,
            ckpt.generated_fp8(names[1], &shapes[1])?,
            ckpt.generated_fp8(names[2], &shapes[2])?,
        ] {
            if gate.1.segment_starts == up.1.segment_starts {
                return Ok(Self::Generated([gate, up, down]));
            }
        }
        let [gate, up, down] = [0, 1, 2].map(|i| ckpt.load_native(names[i], &shapes[i]));
        Ok(match [gate?, up?, down?] {
            [NativeWeight::Fp8(gate), NativeWeight::Fp8(up), NativeWeight::Fp8(down)] => {
                Self::Fp8([gate, up, down])
            }
            natives => Self::Wide(natives.map(|w| w.to_f32())),
        })
    }

    fn upload(
        self,
        ctx: &crate::gpu::GpuContext,
        hidden: usize,
        inter: usize,
        precision: crate::device::MatrixPrecision,
    ) -> Result<crate::gpu::GpuMlp> {
        use crate::backend::NativeWeight;
        let [gate, up, down] = match self {
            Self::Wide(weights) => weights,
            Self::Generated([(gk, gate), (uk, up), (dk, down)]) => {
                let parts = [(gk, &gate), (uk, &up), (dk, &down)];
                // `read` checked that gate and up share their column segments.
                return crate::gpu::GpuMlp::generate_fp8(ctx, parts, hidden, inter)?.ok_or_else(
                    || ModelError::InvalidRequest("synthetic FP8 gate and up apart".into()),
                );
            }
            Self::Fp8([gate, up, down]) => {
                if let Some(mlp) =
                    crate::gpu::GpuMlp::upload_fp8(ctx, [&gate, &up, &down], hidden, inter)?
                {
                    return Ok(mlp);
                }
                // Gate and up on other column segments: widened, as `--gpu-fp8 widen` does.
                [gate, up, down].map(|m| NativeWeight::Fp8(m).to_f32())
            }
        };
        Ok(crate::gpu::GpuMlp::upload(
            ctx, &gate, &up, &down, hidden, inter, precision,
        )?)
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

/// `(layer, expert)`.
pub type ExpertKey = (usize, usize);

pub struct ExpertSet {
    hidden: usize,
    device: ExpertDevice,
    /// Shared so that a new placement epoch can keep the experts it shares with the old one.
    experts: BTreeMap<(usize, usize), Arc<HeldExpert>>,
    /// Per MoE layer, its experts' tables for running from the gate's choices on the GPU
    /// ([`ExpertBackend::prepare_choices_on_device`]), made at the first step that asks.
    #[cfg(feature = "cuda")]
    following: std::sync::Mutex<std::collections::HashMap<usize, FollowingChoices>>,
    /// [`ExpertBackend::reads_rows_as_bf16`], worked out once per mode of the context (a node
    /// asks at every layer that comes in bf16, and may hold thousands of experts).
    #[cfg(feature = "cuda")]
    reads_bf16: std::sync::Mutex<Option<(GpuExpertMode, bool)>>,
}

/// What decides the activations a GPU set's GEMMs take, besides the context's numerics (fixed
/// when it opens): `--deterministic` and the expert GEMM choice.
#[cfg(feature = "cuda")]
type GpuExpertMode = (bool, crate::device::ExpertGemm);

/// A layer's answer to [`ExpertBackend::prepare_choices_on_device`].
#[cfg(feature = "cuda")]
enum FollowingChoices {
    Ready(Arc<crate::gpu::device_routes::ChoiceFollowingExperts>),
    /// Not possible while the context's `--deterministic` and tensor-core experts stay as
    /// they were when asked.
    Declined {
        deterministic: bool,
        tensor_cores: bool,
    },
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

    /// Loads the given `(layer, expert)` pairs onto `device`, reading only their tensors; a
    /// GPU holds FP8 experts as the process's `--gpu-fp8` says.
    pub fn load_on(
        ckpt: &Checkpoint,
        config: &ModelConfig,
        which: impl IntoIterator<Item = (usize, usize)>,
        device: &ExpertDevice,
    ) -> Result<Self> {
        let fp8 = crate::device::process_gpu_fp8();
        Self::load_holding_fp8(ckpt, config, which, device, fp8)
    }

    /// [`Self::load_on`] with FP8 experts on a GPU held as `fp8` says.
    pub fn load_holding_fp8(
        ckpt: &Checkpoint,
        config: &ModelConfig,
        which: impl IntoIterator<Item = (usize, usize)>,
        device: &ExpertDevice,
        fp8: crate::device::GpuFp8,
    ) -> Result<Self> {
        // A CPU set holds FP8 as its panels do, whatever `fp8` says.
        #[cfg(not(feature = "cuda"))]
        let _ = fp8;
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
                let keep_fp8 = fp8 == crate::device::GpuFp8::Keep;
                for chunk in wanted.chunks(GPU_UPLOAD_CHUNK) {
                    let host: Vec<Result<GpuUpload>> = chunk
                        .par_iter()
                        .map(|&(layer, expert)| {
                            let names = families::expert_names(config.family, layer, expert);
                            GpuUpload::read(ckpt, &names, hidden, inter, keep_fp8)
                        })
                        .collect();
                    for (&(layer, expert), weights) in chunk.iter().zip(host) {
                        let names = families::expert_names(config.family, layer, expert);
                        let precision = crate::device::MatrixPrecision::of(
                            ckpt,
                            &[&names.gate, &names.up, &names.down],
                        );
                        let mlp = weights?.upload(ctx, hidden, inter, precision)?;
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
            #[cfg(feature = "cuda")]
            following: Default::default(),
            #[cfg(feature = "cuda")]
            reads_bf16: Default::default(),
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

    /// The experts `keep(layer, expert)` picks, sharing their weights with this set.
    pub fn subset(&self, keep: impl Fn(usize, usize) -> bool) -> Self {
        Self {
            hidden: self.hidden,
            device: self.device.clone(),
            experts: self
                .experts
                .iter()
                .filter(|(&(layer, expert), _)| keep(layer, expert))
                .map(|(&id, held)| (id, Arc::clone(held)))
                .collect(),
            #[cfg(feature = "cuda")]
            following: Default::default(),
            #[cfg(feature = "cuda")]
            reads_bf16: Default::default(),
        }
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
            #[cfg(feature = "cuda")]
            following: Default::default(),
            #[cfg(feature = "cuda")]
            reads_bf16: Default::default(),
        }
    }

    pub fn device(&self) -> &ExpertDevice {
        &self.device
    }

    /// Adds a CPU expert built in a test.
    #[cfg(test)]
    pub(crate) fn insert_cpu(&mut self, id: ExpertKey, mlp: Mlp) {
        self.experts.insert(id, Arc::new(HeldExpert::Cpu(mlp)));
        #[cfg(feature = "cuda")]
        {
            *self.reads_bf16.get_mut().unwrap_or_else(|p| p.into_inner()) = None;
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

    /// Checks that `values` floats of rows fit `routes`, and groups the batch by expert.
    fn plan_batch(
        &self,
        layer: usize,
        values: usize,
        routes: &ExpertRoutes,
    ) -> Result<(ExpertRuns, Vec<&HeldExpert>)> {
        let hidden = self.hidden;
        if values != routes.rows() * hidden {
            return Err(ModelError::InvalidRequest(format!(
                "{values} floats of rows for {} routed rows of width {hidden}",
                routes.rows()
            )));
        }
        let plan = ExpertRuns::from_routes(routes);
        let held = self.experts_for(layer, &plan)?;
        Ok((plan, held))
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
                let own_rows = InputRows::gathered(rows, hidden, &plan.row_of_slot[slots]);
                mlp.forward_rows(own_rows, run.len)
            })
            .collect();
        // Each pair's output row, found through its slot, times the pair's weight. Written
        // pair by pair (in parallel for a prefill's tens of MB), so every page of the fresh
        // buffer is first touched by a write on the thread that fills it.
        let mut slot_rows: Vec<Option<&[f32]>> = vec![None; routes.pairs()];
        for (run, out) in plan.runs.iter().zip(&outputs) {
            let pairs = &plan.pair_of_slot[run.start..run.start + run.len];
            for (&p, row) in pairs.iter().zip(out.chunks_exact(hidden)) {
                slot_rows[p as usize] = Some(row);
            }
        }
        let mut pair_out = vec![0.0f32; routes.pairs() * hidden];
        let scale_row = |(p, dst): (usize, &mut [f32])| {
            if let Some(row) = slot_rows[p] {
                let w = routes.weights[p];
                for (d, v) in dst.iter_mut().zip(row) {
                    *d = v * w;
                }
            }
        };
        let parallel = pair_out.len() >= crate::backend::PARALLEL_MIN_VALUES;
        crate::backend::for_each_row(&mut pair_out, hidden.max(1), parallel, scale_row);
        Ok(pair_out)
    }

    #[cfg(feature = "cuda")]
    fn run_on_gpu(
        &self,
        ctx: &crate::gpu::GpuContext,
        held: &[&HeldExpert],
        rows: GroupedRows<'_, [f32]>,
        routes: &ExpertRoutes,
        plan: &ExpertRuns,
    ) -> Result<Vec<f32>> {
        Ok(crate::gpu::expert_ffn::run_from_host(
            ctx,
            &gpu_experts(held)?,
            rows,
            plan,
            &routes.weights,
            self.hidden,
        )?)
    }

    /// The rows must be `[routes.rows(), hidden]` on `ctx`'s device, f32 or already in bf16.
    #[cfg(feature = "cuda")]
    fn run_device_rows(
        &self,
        ctx: &crate::gpu::GpuContext,
        layer: usize,
        rows: GroupedRows<'_, cudarc::driver::CudaSlice<f32>>,
        routes: &ExpertRoutes,
    ) -> Result<cudarc::driver::CudaSlice<f32>> {
        let values = match rows {
            GroupedRows::F32(rows) => rows.len(),
            GroupedRows::Bf16 { values, .. } => values,
        };
        let (plan, held) = self.plan_batch(layer, values, routes)?;
        let experts = gpu_experts(&held)?;
        // The rows came on another stream of this context (the data plane's); waiting here
        // makes the outputs complete for whichever stream sends them next.
        let _serial = ctx.lock()?;
        let out = crate::gpu::expert_ffn::run_grouped_on_device(
            ctx,
            &experts,
            rows,
            &plan,
            &routes.weights,
        )?;
        ctx.synchronize()?;
        Ok(out)
    }
}

#[cfg(feature = "cuda")]
impl ExpertSet {
    /// `layer`'s tables for running from the gate's choices on `ctx`, made once (uploads:
    /// never inside a capture); `None` where this set cannot.
    fn choice_tables(
        &self,
        layer: usize,
        num_experts: usize,
        ctx: &crate::gpu::GpuContext,
    ) -> Result<Option<Arc<crate::gpu::device_routes::ChoiceFollowingExperts>>> {
        use crate::gpu::device_routes::ChoiceFollowingExperts;
        let ExpertDevice::Gpu(own) = &self.device else {
            return Ok(None);
        };
        if !std::ptr::eq(own.as_ref(), ctx) {
            return Ok(None);
        }
        let (deterministic, tensor_cores) = (ctx.deterministic(), ctx.tensor_core_experts());
        let mut cache = self.following.lock().unwrap_or_else(|p| p.into_inner());
        match cache.get(&layer) {
            Some(FollowingChoices::Ready(tables)) => {
                let fits = tables.experts() == num_experts && tables.usable(ctx);
                return Ok(fits.then(|| Arc::clone(tables)));
            }
            Some(FollowingChoices::Declined {
                deterministic: d,
                tensor_cores: t,
            }) if (*d, *t) == (deterministic, tensor_cores) => {
                return Ok(None);
            }
            _ => {}
        }
        // Every expert of the layer, in expert order, on this GPU.
        let held: Option<Vec<&crate::gpu::GpuMlp>> = (0..num_experts)
            .map(|e| match self.experts.get(&(layer, e)).map(|h| &**h) {
                Some(HeldExpert::Gpu(mlp)) => Some(mlp),
                _ => None,
            })
            .collect();
        let tables = match held {
            Some(held) => ChoiceFollowingExperts::of(ctx, &held)?.map(Arc::new),
            None => None,
        };
        let entry = match &tables {
            Some(t) => {
                tracing::debug!(
                    layer,
                    experts = num_experts,
                    "routed experts follow the gate's choices on the GPU (routes planned there)"
                );
                FollowingChoices::Ready(Arc::clone(t))
            }
            None => FollowingChoices::Declined {
                deterministic,
                tensor_cores,
            },
        };
        cache.insert(layer, entry);
        Ok(tables)
    }
}

#[cfg(feature = "cuda")]
fn gpu_experts<'a>(held: &[&'a HeldExpert]) -> Result<Vec<&'a crate::gpu::GpuMlp>> {
    held.iter()
        .map(|expert| match expert {
            HeldExpert::Gpu(mlp) => Ok(mlp),
            HeldExpert::Cpu(_) => Err(ModelError::ExpertBackend(
                "a CPU expert in a GPU expert set".into(),
            )),
        })
        .collect()
}

impl ExpertBackend for ExpertSet {
    fn holds(&self, layer: usize, expert: usize) -> bool {
        self.contains(layer, expert)
    }

    fn reads_rows_as_bf16(&self) -> bool {
        match &self.device {
            ExpertDevice::Cpu => false,
            #[cfg(feature = "cuda")]
            ExpertDevice::Gpu(ctx) => {
                use crate::gpu::buffer::ActForm;
                let mode = (ctx.deterministic(), ctx.expert_gemm());
                let mut known = self.reads_bf16.lock().unwrap_or_else(|p| p.into_inner());
                if let Some((m, reads)) = *known {
                    if m == mode {
                        return reads;
                    }
                }
                let reads = gpu_numerics_round_rows(ctx)
                    && self.experts.values().all(|held| match &**held {
                        HeldExpert::Gpu(mlp) => {
                            ActForm::for_weights(ctx, mlp.gate_up()) == ActForm::Bf16
                        }
                        HeldExpert::Cpu(_) => false,
                    });
                *known = Some((mode, reads));
                reads
            }
        }
    }

    #[cfg(feature = "cuda")]
    fn run_bf16_host_rows(
        &self,
        layer: usize,
        bytes: &[u8],
        routes: &ExpertRoutes,
    ) -> Option<Result<Vec<f32>>> {
        let ExpertDevice::Gpu(ctx) = &self.device else {
            return None;
        };
        // An odd byte count is not bf16 rows: the caller's decoding refuses it.
        if !bytes.len().is_multiple_of(2) || !self.reads_rows_as_bf16() {
            return None;
        }
        let values = bytes.len() / 2;
        // Two values to a word as they came (little-endian halves, the lower first).
        let words: Vec<f32> = bytes
            .chunks(4)
            .map(|w| {
                let mut word = [0u8; 4];
                word[..w.len()].copy_from_slice(w);
                f32::from_le_bytes(word)
            })
            .collect();
        let run = || {
            let (plan, held) = self.plan_batch(layer, values, routes)?;
            if plan.slots() == 0 {
                return Ok(Vec::new());
            }
            let rows = GroupedRows::Bf16 {
                words: words.as_slice(),
                values,
            };
            self.run_on_gpu(ctx, &held, rows, routes, &plan)
        };
        Some(run())
    }

    #[cfg(feature = "cuda")]
    fn run_bf16_rows_on_device(
        &self,
        layer: usize,
        rows: &cudarc::driver::CudaSlice<f32>,
        values: usize,
        routes: &ExpertRoutes,
    ) -> Option<Result<cudarc::driver::CudaSlice<f32>>> {
        let ExpertDevice::Gpu(ctx) = &self.device else {
            return None;
        };
        if rows.context().cu_ctx() != ctx.stream().context().cu_ctx() || !self.reads_rows_as_bf16()
        {
            return None;
        }
        // Gathered as they are into the experts' bf16 input (the values their f32 rows would
        // round to), after the receive on the stream that made it.
        if let Err(e) = ctx.stream().join(rows.stream()) {
            return Some(Err(crate::gpu::GpuError::from(e).into()));
        }
        let rows = GroupedRows::Bf16 {
            words: rows,
            values,
        };
        Some(self.run_device_rows(ctx, layer, rows, routes))
    }

    fn run_experts(&self, layer: usize, rows: &[f32], routes: &ExpertRoutes) -> Result<Vec<f32>> {
        let (plan, held) = self.plan_batch(layer, rows.len(), routes)?;
        if plan.slots() == 0 {
            return Ok(Vec::new());
        }
        match &self.device {
            ExpertDevice::Cpu => self.run_on_cpu(&held, rows, routes, &plan),
            #[cfg(feature = "cuda")]
            ExpertDevice::Gpu(ctx) => {
                self.run_on_gpu(ctx, &held, GroupedRows::F32(rows), routes, &plan)
            }
        }
    }

    #[cfg(feature = "cuda")]
    fn run_experts_on_device(
        &self,
        layer: usize,
        rows: &cudarc::driver::CudaSlice<f32>,
        routes: &ExpertRoutes,
    ) -> Option<Result<cudarc::driver::CudaSlice<f32>>> {
        let ExpertDevice::Gpu(ctx) = &self.device else {
            return None;
        };
        if rows.context().cu_ctx() != ctx.stream().context().cu_ctx() {
            return None;
        }
        Some(self.run_device_rows(ctx, layer, GroupedRows::F32(rows), routes))
    }

    #[cfg(feature = "cuda")]
    fn prepare_choices_on_device(
        &self,
        layer: usize,
        num_experts: usize,
        ctx: &crate::gpu::GpuContext,
    ) -> Result<bool> {
        Ok(self.choice_tables(layer, num_experts, ctx)?.is_some())
    }

    #[cfg(feature = "cuda")]
    fn run_choices_on_device(
        &self,
        layer: usize,
        rows: &cudarc::driver::CudaSlice<f32>,
        choices: &crate::gpu::device_routes::DeviceChoices<'_>,
        pair_out: &mut cudarc::driver::CudaSlice<f32>,
    ) -> Result<()> {
        let ExpertDevice::Gpu(ctx) = &self.device else {
            return Err(ModelError::ExpertBackend(
                "CPU experts do not run from choices on a device".into(),
            ));
        };
        let ready = self
            .following
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&layer)
            .and_then(|entry| match entry {
                FollowingChoices::Ready(tables) if tables.usable(ctx) => Some(Arc::clone(tables)),
                _ => None,
            });
        let Some(tables) = ready else {
            return Err(ModelError::ExpertBackend(format!(
                "layer {layer}'s experts were not prepared to run from the gate's choices"
            )));
        };
        let _serial = ctx.lock()?;
        // SAFETY: this set holds the experts the tables point at, and frees nothing before
        // the queued work (cudarc frees in stream order).
        unsafe { tables.run(ctx, rows, choices, pair_out)? };
        Ok(())
    }
}

#[cfg(all(test, feature = "cuda"))]
mod gpu_tests {
    use super::*;
    use crate::device::GpuDtype;
    use crate::test_support::fixture_dir;

    /// A fixture's first MoE layer, with `n` rows of pseudo-random inputs in [-1, 1).
    struct LayerRows {
        ckpt: Checkpoint,
        config: ModelConfig,
        layer: usize,
        hidden: usize,
        experts: u32,
        rows: Vec<f32>,
    }

    fn layer_rows(fixture: &str, n: usize) -> LayerRows {
        let dir = fixture_dir(fixture);
        let (ckpt, config) = (
            Checkpoint::open(&dir).unwrap(),
            ModelConfig::from_dir(&dir).unwrap(),
        );
        let layer = config.moe_layer_indices().next().unwrap();
        let hidden = config.hidden_size;
        let rows = (0..n * hidden)
            .map(|i| ((i as u32).wrapping_mul(2_654_435_761) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        let experts = config.moe.num_experts as u32;
        LayerRows {
            ckpt,
            config,
            layer,
            hidden,
            experts,
            rows,
        }
    }

    /// Rows already on the device (as the NCCL data plane leaves them) give the outputs of the
    /// same experts run from host rows, for bf16 and f32 weights; rows on another context's
    /// memory, or a CPU set, decline.
    #[test]
    fn gpu_experts_run_on_device_rows_like_host_rows() {
        let LayerRows {
            ckpt,
            config,
            layer,
            hidden,
            experts: e,
            rows,
        } = layer_rows("qwen3-moe-tiny", 7);
        let n = 7usize;
        let mut routes = ExpertRoutes::with_capacity(n, 2 * n);
        for r in 0..n as u32 {
            routes.push_row(&mut [(r % e, 0.6), ((r + 2) % e, 0.4)]);
        }
        for dtype in [GpuDtype::F32, GpuDtype::Bf16x2, GpuDtype::Bf16] {
            let Some(ctx) = crate::test_support::test_context(dtype) else {
                return;
            };
            let set = ExpertSet::load_on(
                &ckpt,
                &config,
                (0..e as usize).map(|x| (layer, x)),
                &ExpertDevice::Gpu(Arc::clone(&ctx)),
            )
            .unwrap();
            let host = set.run_experts(layer, &rows, &routes).unwrap();
            // Another stream of the same context, as the NCCL communicator uses.
            let other = ctx.stream().context().new_stream().unwrap();
            let device_rows = other.clone_htod(&rows).unwrap();
            other.synchronize().unwrap();
            let out = set
                .run_experts_on_device(layer, &device_rows, &routes)
                .expect("a GPU set takes rows on its device")
                .unwrap();
            let device = other.clone_dtoh(&out).unwrap();
            other.synchronize().unwrap();
            // The same kernels and GEMM shapes: equal up to cuBLAS's choice of algorithm.
            let worst = crate::compare::max_abs_diff(&device, &host);
            assert!(worst <= 1e-5, "{dtype:?}: device rows differ by {worst}");
            eprintln!("{dtype:?}: device rows vs host rows: max difference {worst:e}");

            let short = other.clone_htod(&rows[..hidden]).unwrap();
            assert!(set
                .run_experts_on_device(layer, &short, &routes)
                .unwrap()
                .is_err());
            let cpu = ExpertSet::load(&ckpt, &config, [(layer, 0)]).unwrap();
            assert!(cpu
                .run_experts_on_device(layer, &device_rows, &routes)
                .is_none());
        }
    }

    /// Rows received in bf16 (gathered so by a router: the rounding the experts' own gather
    /// makes) go into the experts' bf16 GEMM input as they are and give the outputs of the
    /// f32 rows, bit for bit, on cuBLAS's lanes and on our tensor-core kernel; a set that
    /// reads f32 rows declines them, and bf16 values beyond their buffer are refused.
    #[test]
    fn bf16_rows_feed_the_experts_gemm_as_they_are() {
        use crate::device::ExpertGemm;
        use crate::gpu::row_moves::{gather_rows, GatheredAs};
        let LayerRows {
            ckpt,
            config,
            layer,
            hidden,
            experts: e,
            rows,
        } = layer_rows("qwen3-moe-tiny", 9);
        let n = 9usize;
        let mut routes = ExpertRoutes::with_capacity(n, 2 * n);
        for r in 0..n as u32 {
            routes.push_row(&mut [(r % e, 0.7), ((r * 3 + 1) % e, 0.3)]);
        }
        let load = |ctx: &Arc<crate::gpu::GpuContext>| {
            let device = ExpertDevice::Gpu(Arc::clone(ctx));
            let held = (0..e as usize).map(|x| (layer, x));
            ExpertSet::load_on(&ckpt, &config, held, &device).unwrap()
        };
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for gemm in [ExpertGemm::Lanes, ExpertGemm::TensorCores] {
            let Some(ctx) = crate::test_support::test_context(GpuDtype::Bf16) else {
                return;
            };
            ctx.set_expert_gemm(gemm);
            let set = load(&ctx);
            assert!(set.reads_rows_as_bf16(), "{gemm:?}");
            let stream = ctx.stream();
            let device_rows = stream.clone_htod(&rows).unwrap();
            let all: Vec<u32> = (0..n as u32).collect();
            let words =
                gather_rows(&ctx, stream, &device_rows, &all, hidden, GatheredAs::Bf16).unwrap();
            let from_f32 = set
                .run_experts_on_device(layer, &device_rows, &routes)
                .unwrap()
                .unwrap();
            let from_bf16 = set
                .run_bf16_rows_on_device(layer, &words, n * hidden, &routes)
                .expect("bf16 experts take bf16 rows")
                .unwrap();
            assert_eq!(
                bits(&stream.clone_dtoh(&from_bf16).unwrap()),
                bits(&stream.clone_dtoh(&from_f32).unwrap()),
                "{gemm:?}"
            );
            assert!(set
                .run_bf16_rows_on_device(layer, &words, (n + 2) * hidden, &routes)
                .expect("bf16 experts take bf16 rows")
                .is_err());
        }
        let Some(ctx) = crate::test_support::test_context(GpuDtype::Bf16x2) else {
            return;
        };
        let set = load(&ctx);
        let words = ctx.stream().clone_htod(&rows).unwrap();
        assert!(set
            .run_bf16_rows_on_device(layer, &words, n * hidden, &routes)
            .is_none());
    }

    /// Rows received in host memory as bf16 (a TCP collective's bytes) go up to a GPU set as
    /// they came and give the outputs of the f32 rows from the host, bit for bit; an odd
    /// byte count, a set that reads f32 rows and a CPU set leave them to the host's widening.
    #[test]
    fn bf16_host_rows_go_up_as_they_came() {
        let LayerRows {
            ckpt,
            config,
            layer,
            experts: e,
            rows,
            ..
        } = layer_rows("qwen3-moe-tiny", 5);
        let n = 5usize;
        let mut routes = ExpertRoutes::with_capacity(n, 2 * n);
        for r in 0..n as u32 {
            routes.push_row(&mut [(r % e, 0.5), ((r + 1) % e, 0.5)]);
        }
        let bytes: Vec<u8> = rows
            .iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
            .collect();
        let held = || (0..e as usize).map(|x| (layer, x));
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for (dtype, takes) in [(GpuDtype::Bf16, true), (GpuDtype::Bf16x2, false)] {
            let Some(ctx) = crate::test_support::test_context(dtype) else {
                return;
            };
            let device = ExpertDevice::Gpu(Arc::clone(&ctx));
            let set = ExpertSet::load_on(&ckpt, &config, held(), &device).unwrap();
            let ran = set.run_bf16_host_rows(layer, &bytes, &routes);
            assert_eq!(ran.is_some(), takes, "{dtype:?}");
            if let Some(ran) = ran {
                let want = set.run_experts(layer, &rows, &routes).unwrap();
                assert_eq!(bits(&ran.unwrap()), bits(&want), "{dtype:?}");
                let odd = set.run_bf16_host_rows(layer, &bytes[1..], &routes);
                assert!(odd.is_none(), "an odd byte count");
                let short = set.run_bf16_host_rows(layer, &bytes[2..], &routes);
                assert!(short.expect("even").is_err(), "a value short");
            }
        }
        let cpu = ExpertSet::load(&ckpt, &config, held()).unwrap();
        assert!(cpu.run_bf16_host_rows(layer, &bytes, &routes).is_none());
    }

    /// `--gpu-expert-gemm grouped` and `tensor-cores`: a pass's expert GEMMs in one grouped
    /// cuBLAS call, or one launch of our tensor-core kernel, give the outputs of one call per
    /// expert on the lanes (within cuBLAS's tolerance: the sums' order differs), in every mode
    /// (Mixtral's bf16 weights take the bf16x2 mode's two products), with experts of 1 to 13
    /// rows and from device rows.
    #[test]
    fn grouped_expert_gemms_give_the_per_expert_outputs() {
        for fixture in ["qwen3-moe-tiny", "mixtral-tiny"] {
            grouped_gemms_match_on(fixture);
        }
    }

    fn grouped_gemms_match_on(fixture: &str) {
        let LayerRows {
            ckpt,
            config,
            layer,
            hidden: _,
            experts: e,
            rows,
        } = layer_rows(fixture, 13);
        let n = 13usize;
        // Expert 1 takes every row, the others one or two each.
        let mut routes = ExpertRoutes::with_capacity(n, 2 * n);
        for r in 0..n as u32 {
            let other = 2 + (r * 5) % (e - 2);
            routes.push_row(&mut [(1, 0.7), (other, 0.3)]);
        }
        for dtype in [GpuDtype::F32, GpuDtype::Bf16x2, GpuDtype::Bf16] {
            let Some(ctx) = crate::test_support::test_context(dtype) else {
                return;
            };
            let set = ExpertSet::load_on(
                &ckpt,
                &config,
                (0..e as usize).map(|x| (layer, x)),
                &ExpertDevice::Gpu(Arc::clone(&ctx)),
            )
            .unwrap();
            use crate::device::ExpertGemm;
            ctx.set_expert_gemm(ExpertGemm::Lanes);
            let lanes = set.run_experts(layer, &rows, &routes).unwrap();
            // Our tensor-core kernel (bf16 experts; f32 ones stay on the lanes) sums in
            // another order than cuBLAS, as the grouped call may.
            for mode in [ExpertGemm::Grouped, ExpertGemm::TensorCores] {
                ctx.set_expert_gemm(mode);
                let grouped = set.run_experts(layer, &rows, &routes).unwrap();
                let worst = crate::compare::max_abs_diff(&grouped, &lanes);
                assert!(
                    worst <= 1e-5,
                    "{fixture} {dtype:?}: {mode} differs by {worst}"
                );
                let device_rows = ctx.stream().clone_htod(&rows).unwrap();
                let out = set
                    .run_experts_on_device(layer, &device_rows, &routes)
                    .expect("a GPU set takes rows on its device")
                    .unwrap();
                let on_device = ctx.stream().clone_dtoh(&out).unwrap();
                let worst = crate::compare::max_abs_diff(&on_device, &lanes);
                let why = "device rows differ by";
                assert!(worst <= 1e-5, "{fixture} {dtype:?}: {mode}, {why} {worst}");
                eprintln!(
                    "{fixture} {dtype:?}: {mode} vs per-expert GEMMs: max difference {worst:e}"
                );
            }
        }
    }

    /// The gate/up pass with SiLU-and-multiply fused into it (our grouped kernels: FP8 kept
    /// as FP8, and the exact kernels of `--deterministic` over f32 and bf16 weights) gives the
    /// unfused pass's outputs bit for bit, from host and device rows.
    #[test]
    fn fused_silu_gives_the_unfused_outputs_bitwise() {
        let keep = crate::device::GpuFp8::Keep;
        let cases = [
            ("deepseek-v3-fp8-tiny", GpuDtype::F32, false),
            ("deepseek-v3-fp8-tiny", GpuDtype::Bf16x2, true),
            ("qwen3-moe-tiny", GpuDtype::F32, true),
            ("mixtral-tiny", GpuDtype::Bf16x2, true),
        ];
        for (fixture, dtype, deterministic) in cases {
            let LayerRows {
                ckpt,
                config,
                layer,
                hidden: _,
                experts: e,
                rows,
            } = layer_rows(fixture, 21);
            let n = 21usize;
            let mut routes = ExpertRoutes::with_capacity(n, 2 * n);
            for r in 0..n as u32 {
                routes.push_row(&mut [(r % e, 0.6), ((r * 7 + 3) % e, 0.4)]);
            }
            let Some(ctx) = crate::test_support::test_context(dtype) else {
                return;
            };
            ctx.set_deterministic(deterministic);
            let device = ExpertDevice::Gpu(Arc::clone(&ctx));
            let all = (0..e as usize).map(|x| (layer, x));
            let set = ExpertSet::load_holding_fp8(&ckpt, &config, all, &device, keep).unwrap();
            let device_rows = ctx.stream().clone_htod(&rows).unwrap();
            let run = |fused: bool| {
                ctx.set_fused_silu(fused);
                let host = set.run_experts(layer, &rows, &routes).unwrap();
                let out = set
                    .run_experts_on_device(layer, &device_rows, &routes)
                    .expect("a GPU set takes rows on its device")
                    .unwrap();
                (host, ctx.stream().clone_dtoh(&out).unwrap())
            };
            let (apart, fused) = (run(false), run(true));
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            let case = format!("{fixture} {dtype:?} deterministic {deterministic}");
            assert_eq!(bits(&fused.0), bits(&apart.0), "{case}: host rows");
            assert_eq!(bits(&fused.1), bits(&apart.1), "{case}: device rows");
            assert_eq!(
                bits(&fused.0),
                bits(&fused.1),
                "{case}: host against device rows"
            );
        }
    }

    /// The routes planned on the device from the gate's choices (`plan_routes`): the host's
    /// plan ([`crate::device::route_plan::plan_choices`]) exactly, from one row to a prefill
    /// of 3001 rows of top-8 over 256 experts, and over 512 experts.
    #[test]
    fn routes_planned_on_the_device_are_the_hosts() {
        use crate::device::route_plan::plan_choices;
        let Some(ctx) = crate::test_support::test_context(GpuDtype::F32) else {
            return;
        };
        // Pairs short of one per warp, ranges ending inside a warp's last 32, a prefill of
        // thousands of rows, and the most experts the kernel's counters hold.
        for (rows, top_k, experts) in [
            (1, 8, 256),
            (5, 2, 8),
            (37, 6, 64),
            (512, 8, 256),
            (3001, 8, 256),
            (700, 6, 512),
            (1200, 1, 2),
        ] {
            let mut chosen = Vec::new();
            for r in 0..rows {
                // Distinct per row, neither sorted nor in one pattern.
                chosen
                    .extend((0..top_k).map(|j| ((r * 37 + j * 101 + r * j * 7) % experts) as u32));
                let row = &mut chosen[r * top_k..];
                let mut seen = std::collections::BTreeSet::new();
                for e in row.iter_mut() {
                    while !seen.insert(*e) {
                        *e = (*e + 1) % experts as u32;
                    }
                }
            }
            let weights: Vec<f32> = (0..chosen.len()).map(|p| (p % 17) as f32 * 0.125).collect();
            // The grouped FP8 and exact kernels' tiles, and the tensor-core kernel's.
            for tile_rows in [8, 32] {
                let host =
                    plan_choices(&chosen, &weights, rows, top_k, experts, tile_rows).unwrap();
                let device = crate::gpu::device_routes::plan_on_device(
                    &ctx, &chosen, &weights, top_k, experts, tile_rows,
                )
                .unwrap();
                let case =
                    format!("{rows} rows of top-{top_k} over {experts}, tiles of {tile_rows}");
                assert_eq!(device, host, "{case}");
            }
        }
    }

    /// A layer's experts run from the gate's choices on the device (planned there, grouped
    /// launches sized for the rows, not the routes) give the outputs of the same choices
    /// routed on the host, bit for bit, pair for pair: FP8 kept as FP8 and the exact kernels
    /// of `--deterministic` over f32 and bf16 weights, bf16 experts on the tensor-core kernel
    /// (bf16 and bf16x2), SiLU fused and not; cuBLAS experts (neither) decline, and so does a
    /// set missing one expert of the layer.
    #[test]
    fn experts_following_choices_give_the_host_routed_outputs() {
        use crate::gpu::device_routes::DeviceChoices;
        let keep = crate::device::GpuFp8::Keep;
        use crate::device::ExpertGemm;
        // (fixture, numerics, --deterministic, --gpu-expert-gemm)
        let cases = [
            (
                "deepseek-v3-fp8-tiny",
                GpuDtype::F32,
                false,
                ExpertGemm::Lanes,
            ),
            (
                "deepseek-v3-fp8-tiny",
                GpuDtype::Bf16x2,
                true,
                ExpertGemm::Lanes,
            ),
            ("qwen3-moe-tiny", GpuDtype::F32, true, ExpertGemm::Lanes),
            ("mixtral-tiny", GpuDtype::Bf16x2, true, ExpertGemm::Lanes),
            ("qwen3-moe-tiny", GpuDtype::F32, false, ExpertGemm::Lanes),
            (
                "mixtral-tiny",
                GpuDtype::Bf16x2,
                false,
                ExpertGemm::TensorCores,
            ),
            (
                "mixtral-tiny",
                GpuDtype::Bf16,
                false,
                ExpertGemm::TensorCores,
            ),
            ("mixtral-tiny", GpuDtype::Bf16x2, false, ExpertGemm::Grouped),
            (
                "qwen3-moe-tiny",
                GpuDtype::Bf16x2,
                false,
                ExpertGemm::TensorCores,
            ),
        ];
        for (fixture, dtype, deterministic, expert_gemm) in cases {
            let n = 21usize;
            let LayerRows {
                ckpt,
                config,
                layer,
                hidden,
                experts: e,
                rows,
            } = layer_rows(fixture, n);
            let top_k = config.moe.top_k;
            // The gate's order: neither sorted nor the same pattern in every row.
            let mut chosen = Vec::new();
            for r in 0..n as u32 {
                let mut row: Vec<u32> = Vec::new();
                let mut x = (r * 5 + 3) % e;
                while row.len() < top_k {
                    if !row.contains(&x) {
                        row.push(x);
                    }
                    x = (x + 2 * r + 1) % e;
                }
                chosen.extend(row);
            }
            let weights: Vec<f32> = (0..chosen.len())
                .map(|p| 0.1 + (p % 7) as f32 * 0.05)
                .collect();
            let mut routes = ExpertRoutes::with_capacity(n, chosen.len());
            for r in 0..n {
                let mut row: Vec<(u32, f32)> = (r * top_k..(r + 1) * top_k)
                    .map(|p| (chosen[p], weights[p]))
                    .collect();
                routes.push_row(&mut row);
            }
            let Some(ctx) = crate::test_support::test_context(dtype) else {
                return;
            };
            ctx.set_deterministic(deterministic);
            ctx.set_expert_gemm(expert_gemm);
            let device = ExpertDevice::Gpu(Arc::clone(&ctx));
            let all = (0..e as usize).map(|x| (layer, x));
            let set = ExpertSet::load_holding_fp8(&ckpt, &config, all, &device, keep).unwrap();
            let case = format!("{fixture} {dtype:?} deterministic {deterministic} {expert_gemm}");
            let fp8 = fixture.contains("fp8");
            // Only bf16 experts run on the tensor cores (the Qwen3 fixture is f32).
            let tensor_cores = expert_gemm == ExpertGemm::TensorCores && fixture == "mixtral-tiny";
            let prepared = set
                .prepare_choices_on_device(layer, e as usize, &ctx)
                .unwrap();
            assert_eq!(
                prepared,
                fp8 || deterministic || tensor_cores,
                "{case}: prepared"
            );
            let partial = set.subset(|_, x| x != 1);
            assert!(
                !partial
                    .prepare_choices_on_device(layer, e as usize, &ctx)
                    .unwrap(),
                "{case}: a set missing an expert declines"
            );
            if !prepared {
                continue;
            }
            let stream = ctx.stream();
            let device_rows = stream.clone_htod(&rows).unwrap();
            let (d_chosen, d_weights) = (
                stream.clone_htod(&chosen).unwrap(),
                stream.clone_htod(&weights).unwrap(),
            );
            let choices = DeviceChoices {
                experts: &d_chosen,
                weights: &d_weights,
                rows: n,
                top_k,
            };
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            for fused in [true, false] {
                ctx.set_fused_silu(fused);
                let want = set.run_experts(layer, &rows, &routes).unwrap();
                let mut pair_out = stream.alloc_zeros::<f32>(n * top_k * hidden).unwrap();
                set.run_choices_on_device(layer, &device_rows, &choices, &mut pair_out)
                    .unwrap();
                let got = stream.clone_dtoh(&pair_out).unwrap();
                assert_eq!(bits(&got), bits(&want), "{case} (fused SiLU {fused})");
            }
            ctx.set_fused_silu(true);
        }
    }

    /// `--gpu-fp8 keep` on the FP8 fixture: the experts hold FP8 bytes and scales (under a
    /// third of their f32 widening) in every mode, and give the CPU set's outputs (the FP8
    /// GEMM is bitwise the CPU's; SiLU's `expf` may differ in the last bit), from host rows
    /// and from rows already on the device.
    #[test]
    fn fp8_experts_kept_as_fp8_on_the_gpu_give_the_cpu_outputs() {
        let LayerRows {
            ckpt,
            config,
            layer,
            hidden: _,
            experts: e,
            rows,
        } = layer_rows("deepseek-v3-fp8-tiny", 19);
        let n = 19usize;
        let mut routes = ExpertRoutes::with_capacity(n, 2 * n);
        for r in 0..n as u32 {
            routes.push_row(&mut [(r % e, 0.6), ((r * 7 + 3) % e, 0.4)]);
        }
        let all = || (0..e as usize).map(|x| (layer, x));
        let cpu = ExpertSet::load(&ckpt, &config, all()).unwrap();
        let want = cpu.run_experts(layer, &rows, &routes).unwrap();
        for dtype in [GpuDtype::F32, GpuDtype::Bf16x2] {
            let Some(ctx) = crate::test_support::test_context(dtype) else {
                return;
            };
            let device = ExpertDevice::Gpu(Arc::clone(&ctx));
            let keep = crate::device::GpuFp8::Keep;
            let set = ExpertSet::load_holding_fp8(&ckpt, &config, all(), &device, keep).unwrap();
            let widened = ExpertSet::load_holding_fp8(
                &ckpt,
                &config,
                all(),
                &device,
                crate::device::GpuFp8::Widen,
            )
            .unwrap();
            assert!(
                set.bytes() * 3 < widened.bytes(),
                "{dtype:?}: {} bytes kept against {} widened",
                set.bytes(),
                widened.bytes()
            );
            let host = set.run_experts(layer, &rows, &routes).unwrap();
            let worst = crate::compare::max_abs_diff(&host, &want);
            assert!(
                worst <= 1e-5,
                "{dtype:?}: FP8 on the GPU differs by {worst}"
            );
            let device_rows = ctx.stream().clone_htod(&rows).unwrap();
            let out = set
                .run_experts_on_device(layer, &device_rows, &routes)
                .expect("a GPU set takes rows on its device")
                .unwrap();
            let on_device = ctx.stream().clone_dtoh(&out).unwrap();
            ctx.synchronize().unwrap();
            assert_eq!(
                &on_device[..host.len()],
                &host[..],
                "{dtype:?}: device rows"
            );
        }
    }

    /// What a node publishes before it loads anything
    /// ([`ExpertDevice::rounds_expert_rows_to_bf16`]) is what its experts read once loaded
    /// ([`ExpertBackend::reads_rows_as_bf16`]), in every mode: bf16 rows are asked for only
    /// where the GEMMs round to bf16 anyway, and never refused where they were asked for.
    #[test]
    fn the_published_row_encoding_is_what_the_loaded_experts_read() {
        use crate::device::{ExpertGemm, GpuFp8};
        let mut promised_bf16 = 0;
        // One context per numerics mode (opening one is the slow part on the emulator); the
        // GEMM choice and `--deterministic` are switched on it between loads.
        for dtype in [GpuDtype::Bf16, GpuDtype::Bf16x2, GpuDtype::F32] {
            let Some(ctx) = crate::test_support::test_context(dtype) else {
                return;
            };
            let device = ExpertDevice::Gpu(Arc::clone(&ctx));
            for fixture in ["deepseek-v3-fp8-tiny", "mixtral-tiny", "qwen3-moe-tiny"] {
                let dir = fixture_dir(fixture);
                let (ckpt, config) = (
                    Checkpoint::open(&dir).unwrap(),
                    ModelConfig::from_dir(&dir).unwrap(),
                );
                let layer = config.moe_layer_indices().next().unwrap();
                let block_cols = crate::checkpoint::fp8_block_of(&dir).map(|(_, cols)| cols);
                assert_eq!(block_cols.is_some(), fixture.contains("fp8"), "{fixture}");
                for fp8 in [GpuFp8::Widen, GpuFp8::Keep] {
                    for (gemm, deterministic) in [
                        (ExpertGemm::Lanes, false),
                        (ExpertGemm::TensorCores, false),
                        (ExpertGemm::TensorCores, true),
                    ] {
                        ctx.set_deterministic(deterministic);
                        ctx.set_expert_gemm(gemm);
                        let two = [(layer, 0), (layer, 1)];
                        let set =
                            ExpertSet::load_holding_fp8(&ckpt, &config, two, &device, fp8).unwrap();
                        let promised = device.rounds_expert_rows_to_bf16(fp8, block_cols);
                        assert_eq!(
                            promised,
                            set.reads_rows_as_bf16(),
                            "{fixture} {dtype:?} {fp8:?} {gemm} deterministic {deterministic}"
                        );
                        promised_bf16 += usize::from(promised);
                        // The answer follows the context when its mode changes under the set.
                        ctx.set_deterministic(!deterministic);
                        assert_eq!(
                            device.rounds_expert_rows_to_bf16(fp8, block_cols),
                            set.reads_rows_as_bf16(),
                            "{fixture} {dtype:?} {fp8:?} {gemm} deterministic flipped"
                        );
                    }
                }
            }
        }
        // Only `bf16` without `--deterministic`: both GEMM modes and both FP8 flags for the
        // two fixtures that are not FP8 (8), widened FP8 in both GEMM modes (2), FP8 kept as
        // FP8 on the tensor cores (1).
        assert_eq!(promised_bf16, 11);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routes::combine;
    use crate::test_support::fixture_dir;

    /// A prefill-sized batch (enough values that scaling and combining run on several threads)
    /// gives every row bitwise what that row gets alone.
    #[test]
    fn a_prefill_sized_batch_combines_each_row_as_alone() {
        let dir = fixture_dir("qwen3-moe-tiny");
        let (ckpt, config) = (
            Checkpoint::open(&dir).unwrap(),
            ModelConfig::from_dir(&dir).unwrap(),
        );
        let layer = config.moe_layer_indices().next().unwrap();
        let (hidden, experts) = (config.hidden_size, config.moe.num_experts as u32);
        let set =
            ExpertSet::load(&ckpt, &config, (0..experts as usize).map(|e| (layer, e))).unwrap();
        let n = 4 * crate::backend::PARALLEL_MIN_VALUES / hidden;
        let value = |i: usize| ((i as u32).wrapping_mul(2_654_435_761) % 1000) as f32 / 500.0 - 1.0;
        let rows: Vec<f32> = (0..n * hidden).map(value).collect();
        let route = |r: usize| {
            [
                ((r as u32 * 7) % experts, 0.25 + (r % 5) as f32 / 10.0),
                ((r as u32 * 7 + 3) % experts, 0.5),
            ]
        };
        let mut routes = ExpertRoutes::with_capacity(n, 2 * n);
        for r in 0..n {
            routes.push_row(&mut route(r));
        }
        let pairs = set.run_experts(layer, &rows, &routes).unwrap();
        let batch = combine(&routes, &pairs, Some(&rows), hidden);
        for r in (0..n).step_by(97) {
            let mut alone = ExpertRoutes::with_capacity(1, 2);
            alone.push_row(&mut route(r));
            let row = &rows[r * hidden..(r + 1) * hidden];
            let pairs = set.run_experts(layer, row, &alone).unwrap();
            let expected = combine(&alone, &pairs, Some(row), hidden);
            assert_eq!(
                &batch[r * hidden..(r + 1) * hidden],
                expected.as_slice(),
                "row {r}"
            );
        }
    }
}
