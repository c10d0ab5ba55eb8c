//! Expert-FFN throughput on the GPU, against one large dense GEMM measured in the same run
//! (the roofline: about 790 TFLOP/s bf16 on an H200).

use std::time::Instant;

use serde::Serialize;

use super::buffer::{ActForm, GpuBuffer};
use super::context::GpuContext;
use super::error::GpuError;
use super::expert_ffn::{run_grouped_on_device, CudaOps, ExpertBatch, GpuMlp};
use super::fill::fill_uniform_f32;
use crate::device::shapes::ColumnMajorGemm;
use crate::grouped_ffn::{FfnOps, FfnPass};
use crate::routes::{ExpertRoutes, ExpertRuns};

/// The MoE layer shape being measured.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct FfnShape {
    pub hidden: usize,
    pub intermediate: usize,
    pub experts: usize,
    pub top_k: usize,
}

impl FfnShape {
    /// DeepSeek-V3/R1: hidden 7168, moe_intermediate 2048, 256 routed experts, top-8.
    pub const DEEPSEEK_V3: FfnShape = FfnShape {
        hidden: 7168,
        intermediate: 2048,
        experts: 256,
        top_k: 8,
    };

    /// Floating-point operations of one routed (token, expert) pair: gate+up and down.
    pub fn flops_per_pair(&self) -> f64 {
        6.0 * self.hidden as f64 * self.intermediate as f64
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct FfnFigure {
    /// Streams the per-expert GEMMs were spread over.
    pub lanes: usize,
    pub tokens: usize,
    pub pairs: usize,
    pub ms: f64,
    pub tflops: f64,
    /// `tflops` over the dense GEMM's.
    pub of_roofline: f64,
    /// The same batch's two GEMM passes alone (no gather, SiLU-and-multiply or scatter): what
    /// the per-expert GEMMs reach, and so what the element-wise kernels cost.
    pub gemm_ms: f64,
    pub gemm_tflops: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct GemmFigure {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub ms: f64,
    pub tflops: f64,
}

/// Times `f` (which queues GPU work) over `iters` runs after one warm-up; milliseconds per run.
fn time_ms(
    ctx: &GpuContext,
    iters: usize,
    mut f: impl FnMut() -> Result<(), GpuError>,
) -> Result<f64, GpuError> {
    f()?;
    ctx.synchronize()?;
    let start = Instant::now();
    for _ in 0..iters {
        f()?;
    }
    ctx.synchronize()?;
    Ok(start.elapsed().as_secs_f64() * 1e3 / iters.max(1) as f64)
}

/// What launching a decode step's many small kernels costs, launched one by one against the
/// same kernels captured once in a CUDA graph and replayed: what graphs would save a decode
/// step (none is captured yet; docs/gpu.md).
#[derive(Debug, Clone, Serialize)]
pub struct LaunchFigure {
    /// Kernels in the sequence (each an element-wise add over `width` values, a decode step's
    /// typical small kernel).
    pub kernels: usize,
    pub width: usize,
    /// Wall time per kernel, the sequence launched kernel by kernel (then one synchronise).
    pub eager_us_per_kernel: f64,
    /// Wall time per kernel, the sequence replayed as one captured graph.
    pub graph_us_per_kernel: f64,
}

/// [`LaunchFigure`] for `kernels` adds over `width` values, each way timed over `iters`
/// sequences after one warm-up.
pub fn launch_overhead(
    ctx: &GpuContext,
    kernels: usize,
    width: usize,
    iters: usize,
) -> Result<LaunchFigure, GpuError> {
    use cudarc::driver::PushKernelArg;
    let _serial = ctx.lock()?;
    let stream = ctx.stream();
    let width = width.max(1);
    let mut acc = stream.alloc_zeros::<f32>(width)?;
    let x = stream.clone_htod(&vec![1.0f32; width])?;
    let n = width as i64;
    let config = super::kernels::grid(width);
    let sequence = |acc: &mut cudarc::driver::CudaSlice<f32>| -> Result<(), GpuError> {
        for _ in 0..kernels {
            // SAFETY: `acc` and `x` hold `width` values each.
            unsafe {
                stream
                    .launch_builder(&ctx.kernels().add_f32)
                    .arg(&mut *acc)
                    .arg(&x)
                    .arg(&n)
                    .launch(config)?;
            }
        }
        Ok(())
    };
    let per_kernel = |ms: f64| ms * 1e3 / kernels.max(1) as f64;
    let eager = time_ms(ctx, iters, || sequence(&mut acc))?;
    let graph = ctx.capture_graph(|| sequence(&mut acc))?;
    let replayed = time_ms(ctx, iters, || Ok(graph.launch()?))?;
    // Each way ran its warm-up and `iters` sequences of adds of 1 (exact in f32 this far).
    let want = (2 * (iters + 1) * kernels) as f32;
    let got = stream.clone_dtoh(&acc.slice(..1))?[0];
    if got != want {
        return Err(GpuError::Shape(format!(
            "the launches added {got}, not {want}: a sequence did not run"
        )));
    }
    Ok(LaunchFigure {
        kernels,
        width,
        eager_us_per_kernel: per_kernel(eager),
        graph_us_per_kernel: per_kernel(replayed),
    })
}

/// What planning one MoE layer's routes on the device costs (`plan_routes`: a decode step's
/// routed experts inside its CUDA graph, and every launched step's).
#[derive(Debug, Clone, Serialize)]
pub struct PlanFigure {
    pub tokens: usize,
    pub pairs: usize,
    pub experts: usize,
    /// Wall time per plan, launched back to back.
    pub us_per_plan: f64,
}

/// [`PlanFigure`] for each token count, random top-k choices over `shape.experts`, in the
/// tensor-core kernel's tiles of 32 rows; each plan first checked against the host's.
pub fn route_planning(
    ctx: &GpuContext,
    shape: &FfnShape,
    tokens: &[usize],
    iters: usize,
) -> Result<Vec<PlanFigure>, GpuError> {
    use super::device_routes::{plan_on_device, plan_only, DeviceChoices};
    let _serial = ctx.lock()?;
    let stream = ctx.stream();
    let tile_rows = 32;
    let mut figures = Vec::with_capacity(tokens.len());
    for &n in tokens {
        let routes = random_routes(n, shape, 7 + n as u64);
        let top_k = shape.top_k.min(shape.experts);
        let (chosen, weights) = (&routes.experts, &routes.weights);
        let host = crate::device::route_plan::plan_choices(
            chosen,
            weights,
            n,
            top_k,
            shape.experts,
            tile_rows,
        )
        .map_err(|e| GpuError::Shape(e.to_string()))?;
        let device = plan_on_device(ctx, chosen, weights, top_k, shape.experts, tile_rows)?;
        if device != host {
            return Err(GpuError::Shape(format!(
                "the device's plan of {n} tokens is not the host's"
            )));
        }
        let (chosen_dev, weights_dev) = (stream.clone_htod(chosen)?, stream.clone_htod(weights)?);
        let choices = DeviceChoices {
            experts: &chosen_dev,
            weights: &weights_dev,
            rows: n,
            top_k,
        };
        let ms = time_ms(ctx, iters, || {
            plan_only(ctx, chosen, &choices, shape.experts, tile_rows)
        })?;
        figures.push(PlanFigure {
            tokens: n,
            pairs: chosen.len(),
            experts: shape.experts,
            us_per_plan: ms * 1e3,
        });
    }
    Ok(figures)
}

/// One `[m, k] x [k, n]` GEMM in the context's dtype with f32 output.
pub fn dense_gemm(ctx: &GpuContext, size: usize, iters: usize) -> Result<GemmFigure, GpuError> {
    let _serial = ctx.lock()?;
    let mut w = GpuBuffer::zeros(ctx, size * size)?;
    let mut x = GpuBuffer::zeros(ctx, size * size)?;
    w.fill_uniform(ctx, 1, 0.01)?;
    x.fill_uniform(ctx, 2, 0.01)?;
    let mut c = ctx.stream().alloc_zeros::<f32>(size * size)?;
    let ops = CudaOps {
        ctx,
        act: ActForm::for_weights(ctx, &w),
    };
    let shape = ColumnMajorGemm::rows_times_weights(size, size, size);
    let ms = time_ms(ctx, iters, || {
        ops.fork()?;
        ops.gemm(0, &shape, &w, 0, &x, 0, &mut c, 0)?;
        ops.join()
    })?;
    let flops = 2.0 * (size as f64).powi(3);
    Ok(GemmFigure {
        m: size,
        n: size,
        k: size,
        ms,
        tflops: flops / (ms * 1e-3) / 1e12,
    })
}

/// Uniform random top-k routing (distinct experts per token), reproducible from `seed`.
pub fn random_routes(tokens: usize, shape: &FfnShape, seed: u64) -> ExpertRoutes {
    let mut state = seed.max(1);
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let k = shape.top_k.min(shape.experts);
    let mut routes = ExpertRoutes::with_capacity(tokens, tokens * k);
    let mut choices = Vec::with_capacity(k);
    for _ in 0..tokens {
        choices.clear();
        while choices.len() < k {
            let e = (next() % shape.experts as u64) as u32;
            if !choices.iter().any(|&(c, _)| c == e) {
                choices.push((e, 1.0 / k as f32));
            }
        }
        routes.push_row(&mut choices);
    }
    routes
}

/// The experts' weights as measured: in the context's dtype, or kept as FP8.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BenchWeights {
    Held,
    Fp8,
}

/// One MoE layer's figures, and the device memory its experts' weights take.
#[derive(Debug, Clone, Serialize)]
pub struct ExpertFfnReport {
    pub weight_bytes: usize,
    pub figures: Vec<FfnFigure>,
}

/// Expert-FFN TFLOP/s of one MoE layer (all `shape.experts` experts on this GPU, random
/// weights held as `weights` says) at each token count, rows already on the device (the data
/// plane delivers them there), routing and weights uploaded in the timed region; through the
/// exact kernels when the context is deterministic. Each `(lanes, tokens)` in `cases` is
/// measured once, in order.
pub fn expert_ffn(
    ctx: &GpuContext,
    shape: FfnShape,
    weights: BenchWeights,
    cases: &[(usize, usize)],
    iters: usize,
    roofline_tflops: f64,
) -> Result<ExpertFfnReport, GpuError> {
    let _serial = ctx.lock()?;
    let (hidden, inter) = (shape.hidden, shape.intermediate);
    let experts: Vec<GpuMlp> = (0..shape.experts)
        .map(|e| match weights {
            BenchWeights::Held => GpuMlp::random(ctx, hidden, inter, e as u32 + 7),
            BenchWeights::Fp8 => GpuMlp::random_fp8(ctx, hidden, inter, e as u32 + 7),
        })
        .collect::<Result<_, _>>()?;
    let weight_bytes = experts.iter().map(GpuMlp::bytes).sum();
    let mut figures = Vec::new();
    for &(lanes, tokens) in cases {
        ctx.set_gemm_lanes(lanes);
        let routes = random_routes(tokens, &shape, 0x5eed + tokens as u64);
        let plan = ExpertRuns::from_routes(&routes);
        let held: Vec<&GpuMlp> = plan
            .runs
            .iter()
            .map(|r| &experts[r.expert as usize])
            .collect();
        let mut device_rows = ctx.stream().alloc_zeros::<f32>(tokens * shape.hidden)?;
        fill_uniform_f32(ctx, &mut device_rows, 3, 1.0)?;
        let rows = crate::grouped_ffn::GroupedRows::F32(&device_rows);
        let ms = time_ms(ctx, iters, || {
            run_grouped_on_device(ctx, &held, rows, &plan, &routes.weights).map(drop)
        })?;
        let gemm_ms = gemms_only_ms(ctx, &held, &plan, iters)?;
        let flops = routes.pairs() as f64 * shape.flops_per_pair();
        let tflops = flops / (ms * 1e-3) / 1e12;
        figures.push(FfnFigure {
            lanes,
            tokens,
            pairs: routes.pairs(),
            ms,
            tflops,
            of_roofline: tflops / roofline_tflops,
            gemm_ms,
            gemm_tflops: flops / (gemm_ms * 1e-3) / 1e12,
        });
    }
    ctx.set_gemm_lanes(super::context::GEMM_LANES);
    Ok(ExpertFfnReport {
        weight_bytes,
        figures,
    })
}

/// Milliseconds of the batch's gate+up and down passes alone, on random inputs of the
/// batch's activation form (real values: a GEMM over zeros runs faster).
fn gemms_only_ms(
    ctx: &GpuContext,
    held: &[&GpuMlp],
    plan: &ExpertRuns,
    iters: usize,
) -> Result<f64, GpuError> {
    let Some(batch) = ExpertBatch::of(ctx, held)? else {
        return Ok(0.0);
    };
    let (hidden, inter, slots) = (batch.hidden, batch.inter, plan.slots());
    let ops = CudaOps {
        ctx,
        act: batch.act,
    };
    let mut x = ops.scratch_act(slots * hidden)?;
    x.fill_uniform(ctx, 5, 1.0)?;
    let mut act = ops.scratch_act(slots * inter)?;
    act.fill_uniform(ctx, 6, 1.0)?;
    let mut gate_up = ops.scratch_f32(slots * 2 * inter)?;
    let mut out = ops.scratch_f32(slots * hidden)?;
    let m = &batch.matrices;
    // A pass as the FFN runs it: one grouped launch for FP8 or exact kernels, else a
    // cuBLAS GEMM per expert.
    time_ms(ctx, iters, || {
        let up = FfnPass::GateUp;
        ops.expert_pass(m, plan, up, &x, &mut gate_up, hidden, inter)?;
        ops.expert_pass(m, plan, FfnPass::Down, &act, &mut out, hidden, inter)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_routes_pick_distinct_experts_with_equal_weights() {
        let shape = FfnShape::DEEPSEEK_V3;
        let routes = random_routes(100, &shape, 1);
        assert_eq!(routes.rows(), 100);
        assert_eq!(routes.pairs(), 800);
        for r in 0..routes.rows() {
            let experts = &routes.experts[routes.row_pairs(r)];
            assert!(experts.windows(2).all(|w| w[0] < w[1]), "{experts:?}");
            assert!(experts.iter().all(|&e| (e as usize) < shape.experts));
        }
        assert!(routes.weights.iter().all(|&w| w == 0.125));
        assert_eq!(random_routes(100, &shape, 1), routes);
    }

    /// The launch-overhead figure: both ways run every kernel (checked inside), figures
    /// positive.
    #[test]
    fn launch_overhead_runs_every_kernel_both_ways() {
        let Some(ctx) = crate::test_support::test_context(crate::device::GpuDtype::F32) else {
            return;
        };
        let figure = launch_overhead(&ctx, 40, 1000, 3).unwrap();
        assert_eq!((figure.kernels, figure.width), (40, 1000));
        assert!(figure.eager_us_per_kernel > 0.0 && figure.graph_us_per_kernel > 0.0);
    }

    #[test]
    fn deepseek_pair_flops() {
        // 2 * 7168 * 4096 (gate+up) + 2 * 2048 * 7168 (down)
        assert_eq!(FfnShape::DEEPSEEK_V3.flops_per_pair(), 88_080_384.0);
    }
}
