//! A MoE layer's routed experts run from the gate's choices where they lie: the `plan_routes`
//! kernel turns the choices into runs, slots and row tiles on the device
//! ([`crate::device::route_plan`], step for step), and the grouped launches read them there
//! ([`super::grouped_launch`]), so from the gate to the combine nothing crosses to the host
//! and a decode step with its experts can be one CUDA graph. Every launch is sized for the
//! step's rows, never for the routes: a graph captured at one step replays at the next,
//! whatever experts its rows chose.
//!
//! Only for experts whose grouped launch is row-independent (FP8 kept as FP8, the exact
//! kernels of `--deterministic`, or bf16 experts on our tensor-core kernel): a replayed step
//! also runs its padding rows through the experts, which must change no other row's result.
//! cuBLAS's grouped call takes its problem sizes on the host, so cuBLAS experts keep the
//! host's routes.

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::buffer::{ActForm, GpuBuffer};
use super::context::GpuContext;
use super::error::GpuError;
use super::expert_ffn::{CudaOps, GpuMlp};
use super::grouped_launch::{GroupedOutput, FP8_TILE_ROWS};
use super::grouped_launch::{GroupedWeights, TileTables};
use super::kernels::as_int;
use super::tensor_core_gemm::{PassOutput, TensorCoreWeights, TC_TILE_ROWS};
use crate::device::route_plan::{tile_bound, MAX_PLANNED_EXPERTS, MAX_PLANNED_TOP_K};
use crate::grouped_ffn::{FfnOps, FfnPass};

/// The gate's choices on the device: row r's `top_k` experts and weights at
/// `experts[r * top_k..]`, `weights[r * top_k..]`, in the order the gate picked them.
pub struct DeviceChoices<'a> {
    pub experts: &'a CudaSlice<u32>,
    pub weights: &'a CudaSlice<f32>,
    pub rows: usize,
    pub top_k: usize,
}

/// Which kernels run the experts' two passes.
enum FollowingLaunches {
    /// FP8 kept as FP8, or the exact kernels (`exact`: usable while the context stays
    /// `--deterministic`), over f32 activations.
    Grouped {
        gate_up: GroupedWeights,
        down: GroupedWeights,
        exact: bool,
    },
    /// bf16 experts on the tensor cores, over activations in `act`'s form (bf16 or bf16x2).
    TensorCores {
        gate_up: TensorCoreWeights,
        down: TensorCoreWeights,
        act: ActForm,
    },
}

impl FollowingLaunches {
    /// The rows of the tiles these launches read.
    fn tile_rows(&self) -> usize {
        match self {
            FollowingLaunches::Grouped { .. } => FP8_TILE_ROWS,
            FollowingLaunches::TensorCores { .. } => TC_TILE_ROWS,
        }
    }

    /// The activations' form these launches take.
    fn act(&self) -> ActForm {
        match self {
            FollowingLaunches::Grouped { .. } => ActForm::F32,
            FollowingLaunches::TensorCores { act, .. } => *act,
        }
    }

    /// One pass over `x` (in [`Self::act`]'s form) and the tiles, writing `output`.
    ///
    /// # Safety
    /// The experts these launches were made from are alive until the work has run.
    unsafe fn run(
        &self,
        ctx: &GpuContext,
        pass: FfnPass,
        x: &GpuBuffer,
        tiles: &TileTables<'_>,
        output: PassOutput<'_>,
    ) -> Result<(), GpuError> {
        match self {
            FollowingLaunches::TensorCores { gate_up, down, .. } => {
                let weights = match pass {
                    FfnPass::GateUp => gate_up,
                    FfnPass::Down => down,
                };
                // SAFETY: the caller's contract.
                unsafe { weights.launch(ctx, x, tiles, output) }
            }
            FollowingLaunches::Grouped { gate_up, down, .. } => {
                let weights = match pass {
                    FfnPass::GateUp => gate_up,
                    FfnPass::Down => down,
                };
                let GpuBuffer::F32(x) = x else {
                    return Err(GpuError::Shape(
                        "these grouped launches take f32 rows".into(),
                    ));
                };
                // SAFETY (both): the caller's contract.
                match output {
                    PassOutput::Products(out) => unsafe {
                        weights.launch(ctx, x, tiles, out, GroupedOutput::Products)
                    },
                    PassOutput::SiluMul(GpuBuffer::F32(act)) => unsafe {
                        weights.launch(ctx, x, tiles, act, GroupedOutput::SiluMul)
                    },
                    PassOutput::SiluMul(_) => {
                        Err(GpuError::Shape("these grouped launches write f32".into()))
                    }
                }
            }
        }
    }
}

/// Threads of the `plan_routes` block (`PLAN_WARPS` warps in kernels.cu).
const PLAN_THREADS: u32 = 512;

/// Every expert of a MoE layer (expert `e` serving run `e`), ready for grouped launches whose
/// tiles are planned on the device. Holds the experts' addresses: the expert set that made it
/// keeps them alive.
pub struct ChoiceFollowingExperts {
    launches: FollowingLaunches,
    experts: usize,
    hidden: usize,
    inter: usize,
}

impl ChoiceFollowingExperts {
    /// `None` where these experts' grouped launch is not row-independent (cuBLAS experts:
    /// neither FP8 kept as FP8 nor `--deterministic`), or where their precisions differ.
    pub fn of(ctx: &GpuContext, experts: &[&GpuMlp]) -> Result<Option<Self>, GpuError> {
        let Some(first) = experts.first() else {
            return Ok(None);
        };
        if experts.len() > MAX_PLANNED_EXPERTS {
            return Ok(None);
        }
        let (hidden, inter) = (first.hidden(), first.intermediate());
        if experts
            .iter()
            .any(|e| e.hidden() != hidden || e.intermediate() != inter)
        {
            return Ok(None);
        }
        let gate_up: Vec<&GpuBuffer> = experts.iter().map(|e| e.gate_up()).collect();
        let down: Vec<&GpuBuffer> = experts.iter().map(|e| e.down()).collect();
        // bf16 or FP8 experts on the tensor cores, where the context runs them there.
        if let (Some(gate_up_tc), Some(down_tc)) = (
            TensorCoreWeights::of(ctx, &gate_up, (2 * inter, hidden))?,
            TensorCoreWeights::of(ctx, &down, (hidden, inter))?,
        ) {
            let launches = FollowingLaunches::TensorCores {
                gate_up: gate_up_tc,
                down: down_tc,
                act: ActForm::for_weights(ctx, gate_up[0]),
            };
            return Ok(Some(Self {
                launches,
                experts: experts.len(),
                hidden,
                inter,
            }));
        }
        let fp8: Option<Vec<_>> = experts
            .iter()
            .map(|e| match (e.gate_up(), e.down()) {
                (GpuBuffer::Fp8(g), GpuBuffer::Fp8(d)) => Some((&**g, &**d)),
                _ => None,
            })
            .collect();
        if let Some(pairs) = fp8 {
            let (gate_up, down): (Vec<_>, Vec<_>) = pairs.into_iter().unzip();
            let alike = |ms: &[&super::fp8_matrix::DeviceFp8Matrix]| {
                ms.iter().all(|m| m.groups_with(ms[0]))
            };
            if !alike(&gate_up) || !alike(&down) {
                return Ok(None);
            }
            let launches = FollowingLaunches::Grouped {
                gate_up: GroupedWeights::fp8(ctx, &gate_up)?,
                down: GroupedWeights::fp8(ctx, &down)?,
                exact: false,
            };
            return Ok(Some(Self {
                launches,
                experts: experts.len(),
                hidden,
                inter,
            }));
        }
        if !ctx.deterministic() {
            return Ok(None);
        }
        let wide = |b: &GpuBuffer| matches!(b, GpuBuffer::F32(_) | GpuBuffer::Bf16(_));
        if !experts.iter().all(|e| wide(e.gate_up()) && wide(e.down())) {
            return Ok(None);
        }
        let (Ok(gate_up), Ok(down)) = (
            GroupedWeights::exact(ctx, &gate_up, (2 * inter, hidden)),
            GroupedWeights::exact(ctx, &down, (hidden, inter)),
        ) else {
            // Mixed f32 and bf16 experts: one launch cannot read both.
            return Ok(None);
        };
        Ok(Some(Self {
            launches: FollowingLaunches::Grouped {
                gate_up,
                down,
                exact: true,
            },
            experts: experts.len(),
            hidden,
            inter,
        }))
    }

    /// Whether these launches may run now: exact kernels only while the context is
    /// `--deterministic`, the tensor-core kernel only while it runs bf16 experts there
    /// (cuBLAS experts are not row-independent).
    pub fn usable(&self, ctx: &GpuContext) -> bool {
        match &self.launches {
            FollowingLaunches::Grouped { exact, .. } => !exact || ctx.deterministic(),
            FollowingLaunches::TensorCores { .. } => ctx.tensor_core_experts(),
        }
    }

    pub fn experts(&self) -> usize {
        self.experts
    }

    /// `pair_out[r * top_k + j]` (`[rows * top_k, hidden]`): row r's j-th choice in
    /// ascending expert id, that expert's output on `rows[r]` times its weight, on the
    /// context's stream; launches only (temporaries in stream order, so a capture owns them).
    ///
    /// # Safety
    /// The experts these tables were made from are alive until the work has run.
    pub unsafe fn run(
        &self,
        ctx: &GpuContext,
        rows: &CudaSlice<f32>,
        choices: &DeviceChoices<'_>,
        pair_out: &mut CudaSlice<f32>,
    ) -> Result<(), GpuError> {
        let (hidden, inter, experts) = (self.hidden, self.inter, self.experts);
        let (n, top_k) = (choices.rows, choices.top_k);
        let pairs = n * top_k;
        if pairs == 0 {
            return Ok(());
        }
        if top_k > MAX_PLANNED_TOP_K
            || choices.experts.len() < pairs
            || choices.weights.len() < pairs
            || rows.len() < n * hidden
            || pair_out.len() < pairs * hidden
        {
            return Err(GpuError::Shape(format!(
                "{n} rows of top-{top_k} choices (at most top-{MAX_PLANNED_TOP_K}) over {} \
                 choices, {} row values and {} output values, {hidden} wide",
                choices.experts.len(),
                rows.len(),
                pair_out.len()
            )));
        }
        let stream = ctx.stream();
        as_int(pairs, "pairs")?;
        // SAFETY: the choices hold `pairs` values (checked), every id below `experts` (the
        // gate's own top-k over the layer's experts).
        let tile_rows = self.launches.tile_rows();
        let plan = unsafe { RoutePlanBuffers::plan(ctx, choices, experts, tile_rows)? };
        let tiles = TileTables {
            first_tile: &plan.first_tile,
            run_start: &plan.run_start,
            run_len: &plan.run_len,
            runs: experts,
            tiles: tile_bound(pairs, experts, tile_rows),
            tile_rows,
            slots: pairs,
        };
        let ops = CudaOps {
            ctx,
            act: self.launches.act(),
        };
        // SAFETY: x, act and out are written in full (gather, gate/up pass, down pass) before
        // they are read.
        let mut x = ops.scratch_act(pairs * hidden)?;
        let rows = crate::grouped_ffn::GroupedRows::F32(rows);
        ops.gather(rows, &plan.row_of_slot, &mut x, pairs, hidden)?;
        let mut act = ops.scratch_act(pairs * inter)?;
        let launches = &self.launches;
        // SAFETY (both passes): the caller keeps the experts alive.
        unsafe {
            if ctx.fused_silu() {
                let silu = PassOutput::SiluMul(&mut act);
                launches.run(ctx, FfnPass::GateUp, &x, &tiles, silu)?;
            } else {
                let mut gate_up = stream.alloc::<f32>(pairs * 2 * inter)?;
                let products = PassOutput::Products(&mut gate_up);
                launches.run(ctx, FfnPass::GateUp, &x, &tiles, products)?;
                ops.silu_mul(&gate_up, &mut act, pairs, inter)?;
            }
        }
        let mut out = unsafe { stream.alloc::<f32>(pairs * hidden)? };
        unsafe {
            let products = PassOutput::Products(&mut out);
            launches.run(ctx, FfnPass::Down, &act, &tiles, products)?;
        }
        let (pair_of_slot, pair_weight) = (&plan.pair_of_slot, &plan.pair_weight);
        ops.scatter_weighted(&out, pair_of_slot, pair_weight, pair_out, pairs, hidden)
    }
}

/// What `plan_routes` writes ([`crate::device::route_plan::PlannedChoices`], on the device).
struct RoutePlanBuffers {
    pair_expert: CudaSlice<u32>,
    pair_weight: CudaSlice<f32>,
    row_of_slot: CudaSlice<u32>,
    pair_of_slot: CudaSlice<u32>,
    first_tile: CudaSlice<u32>,
    run_start: CudaSlice<u32>,
    run_len: CudaSlice<u32>,
}

impl RoutePlanBuffers {
    /// Plans `choices` over `experts` runs, in tiles of `tile_rows` rows, on the context's
    /// stream.
    ///
    /// # Safety
    /// The choices hold `rows * top_k` values, every expert id below `experts`.
    unsafe fn plan(
        ctx: &GpuContext,
        choices: &DeviceChoices<'_>,
        experts: usize,
        tile_rows: usize,
    ) -> Result<Self, GpuError> {
        if experts > MAX_PLANNED_EXPERTS || choices.top_k > MAX_PLANNED_TOP_K {
            return Err(GpuError::Shape(format!(
                "top-{} choices over {experts} experts (the plan takes at most top-\
                 {MAX_PLANNED_TOP_K} over {MAX_PLANNED_EXPERTS})",
                choices.top_k
            )));
        }
        let stream = ctx.stream();
        let pairs = (choices.rows * choices.top_k).max(1);
        let (rows, top_k) = (
            as_int(choices.rows, "rows")?,
            as_int(choices.top_k, "top-k")?,
        );
        let experts_i = as_int(experts, "experts")?;
        let tile_rows_i = as_int(tile_rows.max(1), "tile rows")?;
        // SAFETY: `plan_routes` writes every pair, run and tile entry before anything reads
        // them.
        let mut plan = unsafe {
            Self {
                pair_expert: stream.alloc::<u32>(pairs)?,
                pair_weight: stream.alloc::<f32>(pairs)?,
                row_of_slot: stream.alloc::<u32>(pairs)?,
                pair_of_slot: stream.alloc::<u32>(pairs)?,
                first_tile: stream.alloc::<u32>(experts + 1)?,
                run_start: stream.alloc::<u32>(experts.max(1))?,
                run_len: stream.alloc::<u32>(experts.max(1))?,
            }
        };
        let one_block = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (PLAN_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the caller's contract; the outputs are sized above.
        unsafe {
            stream
                .launch_builder(&ctx.kernels().plan_routes)
                .arg(choices.experts)
                .arg(choices.weights)
                .arg(&rows)
                .arg(&top_k)
                .arg(&experts_i)
                .arg(&tile_rows_i)
                .arg(&mut plan.pair_expert)
                .arg(&mut plan.pair_weight)
                .arg(&mut plan.row_of_slot)
                .arg(&mut plan.pair_of_slot)
                .arg(&mut plan.first_tile)
                .arg(&mut plan.run_start)
                .arg(&mut plan.run_len)
                .launch(one_block)?;
        }
        Ok(plan)
    }
}

/// Plans `choices` over `experts` runs on the context's stream and drops the plan: what a MoE
/// layer's planning costs (`moe gpu-bench --plan-routes`). Every id is checked below
/// `experts` on the host first.
pub(crate) fn plan_only(
    ctx: &GpuContext,
    chosen: &[u32],
    choices: &DeviceChoices<'_>,
    experts: usize,
    tile_rows: usize,
) -> Result<(), GpuError> {
    if chosen.len() != choices.rows * choices.top_k
        || choices.experts.len() < chosen.len()
        || chosen.iter().any(|&e| e as usize >= experts)
    {
        return Err(GpuError::Shape(format!(
            "{} choices to plan over {experts} experts",
            chosen.len()
        )));
    }
    // SAFETY: `choices` holds the checked ids (the caller uploaded `chosen` there).
    unsafe { RoutePlanBuffers::plan(ctx, choices, experts, tile_rows).map(drop) }
}

/// The plan `plan_routes` writes, downloaded (tests, and the benchmark's check, compare it
/// with the host's).
pub(crate) fn plan_on_device(
    ctx: &GpuContext,
    chosen: &[u32],
    weights: &[f32],
    top_k: usize,
    experts: usize,
    tile_rows: usize,
) -> Result<crate::device::route_plan::PlannedChoices, GpuError> {
    let stream = ctx.stream();
    let pairs = chosen.len();
    let (chosen, weights) = (stream.clone_htod(chosen)?, stream.clone_htod(weights)?);
    let choices = DeviceChoices {
        experts: &chosen,
        weights: &weights,
        rows: pairs / top_k,
        top_k,
    };
    // SAFETY: the tests' choices are rows of top-k ids below `experts`.
    let plan = unsafe { RoutePlanBuffers::plan(ctx, &choices, experts, tile_rows)? };
    let download = |b: &CudaSlice<u32>, n: usize| -> Result<Vec<u32>, GpuError> {
        let mut v = stream.clone_dtoh(b)?;
        v.truncate(n);
        Ok(v)
    };
    let mut pair_weight = stream.clone_dtoh(&plan.pair_weight)?;
    pair_weight.truncate(pairs);
    Ok(crate::device::route_plan::PlannedChoices {
        pair_expert: download(&plan.pair_expert, pairs)?,
        pair_weight,
        row_of_slot: download(&plan.row_of_slot, pairs)?,
        pair_of_slot: download(&plan.pair_of_slot, pairs)?,
        tiles: crate::device::grouped_tiles::GroupedRowTiles {
            tile_rows: tile_rows as u32,
            first_tile: download(&plan.first_tile, experts + 1)?,
            run_start: download(&plan.run_start, experts)?,
            run_len: download(&plan.run_len, experts)?,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `#define name value` in kernels.cu.
    fn kernel_define(name: &str) -> usize {
        let prefix = format!("#define {name} ");
        let line = super::super::kernels::SOURCE
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("{name} is not defined in kernels.cu"));
        line.trim()
            .parse()
            .unwrap_or_else(|e| panic!("{name} {line}: {e}"))
    }

    /// The host's limits and launch are the kernel's: a layer of more experts than its shared
    /// counters hold, or a launch of other warps than it divides the pairs among, would plan
    /// wrong without an error.
    #[test]
    fn the_plan_kernels_limits_are_the_hosts() {
        assert_eq!(kernel_define("PLAN_MAX_TOP_K"), MAX_PLANNED_TOP_K);
        assert_eq!(kernel_define("PLAN_MAX_EXPERTS"), MAX_PLANNED_EXPERTS);
        assert_eq!(kernel_define("PLAN_WARPS") * 32, PLAN_THREADS as usize);
    }
}
