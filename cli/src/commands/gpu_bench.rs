//! `moe gpu-bench`: expert-FFN TFLOP/s on a GPU at DeepSeek-V3 shapes, against one large
//! dense GEMM measured in the same run (the roofline). Needs a build with `--features cuda`.

use clap::Args;
use moe_model::device::{Device, ExpertGemm, GpuDtype};

#[derive(Args, Clone)]
pub struct GpuBenchArgs {
    /// The GPU to measure.
    #[arg(long, env = "MOE_DEVICE", default_value = "cuda:0")]
    pub device: Device,
    /// Numerics measured: `bf16` (the benchmark, against the bf16 GEMM roofline),
    /// `bf16x2` (two tensor-core GEMMs per expert GEMM) or `f32`.
    #[arg(long, env = "MOE_GPU_DTYPE", default_value = "bf16")]
    pub gpu_dtype: GpuDtype,
    /// Token counts to measure (each routed to top-k of the experts).
    #[arg(long, value_delimiter = ',', default_value = "128,1024,8192")]
    pub tokens: Vec<usize>,
    #[arg(long, default_value_t = 7168)]
    pub hidden: usize,
    #[arg(long, default_value_t = 2048)]
    pub intermediate: usize,
    #[arg(long, default_value_t = 256)]
    pub experts: usize,
    #[arg(long, default_value_t = 8)]
    pub top_k: usize,
    /// Streams the per-expert GEMMs are spread over: each count is measured at the largest
    /// token count, the default one at every token count.
    #[arg(long, value_delimiter = ',', default_value = "1,4,8,16")]
    pub lanes: Vec<usize>,
    /// Side of the square dense GEMM that gives the roofline.
    #[arg(long, default_value_t = 8192)]
    pub roofline_size: usize,
    /// Timed runs per figure (after one warm-up).
    #[arg(long, default_value_t = 10)]
    pub iters: usize,
    /// Experts' weights kept as FP8 (random e4m3 bytes, a scale per 128x128 block), run by
    /// the grouped FP8 kernel (`--gpu-fp8 keep`'s form) instead of held in `--gpu-dtype`.
    #[arg(long)]
    pub fp8: bool,
    /// GEMMs through the exact, batch-invariant kernels (`--deterministic`'s).
    #[arg(long)]
    pub deterministic: bool,
    /// The experts' GEMMs: `lanes` (one cuBLAS GEMM per expert, over `--lanes` streams),
    /// `grouped` (one `cublasGemmGroupedBatchedEx` call per pass) or `tensor-cores` (our
    /// tensor-core kernel, one launch per pass); lanes apply to `lanes` only.
    #[arg(long, env = "MOE_GPU_EXPERT_GEMM", default_value = "lanes")]
    pub expert_gemm: ExpertGemm,
    /// Where our own grouped kernels run the gate/up pass (`--fp8`, `--deterministic`,
    /// `--expert-gemm tensor-cores`), fuse
    /// SiLU-and-multiply into it; `--fused-silu=false` runs the two apart, to compare.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub fused_silu: bool,
    /// Instead of the expert FFN, what launching many small kernels costs one by one against
    /// replaying them as one captured CUDA graph (`--launches N`: N element-wise kernels over
    /// `--hidden` values, a decode step's typical kernel): what graphs would save a decode step.
    #[arg(long)]
    pub launches: Option<usize>,
    /// Instead of the expert FFN, what planning a MoE layer's routes on the device costs
    /// (`plan_routes`, at each `--tokens` count, top-k of `--experts`): microseconds a plan,
    /// each plan first checked against the host's.
    #[arg(long)]
    pub plan_routes: bool,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[cfg(not(feature = "cuda"))]
pub fn run(_args: GpuBenchArgs) -> anyhow::Result<()> {
    anyhow::bail!("moe gpu-bench needs a build with --features cuda")
}

#[cfg(feature = "cuda")]
pub fn run(args: GpuBenchArgs) -> anyhow::Result<()> {
    use moe_model::experts::ExpertDevice;
    use moe_model::gpu::bench::{dense_gemm, expert_ffn, BenchWeights, FfnShape};

    let Device::Cuda(_) = args.device else {
        anyhow::bail!("--device must be a GPU (cuda:N)")
    };
    let ExpertDevice::Gpu(ctx) = args.device.open_experts(args.gpu_dtype)? else {
        anyhow::bail!("{} did not open as a GPU", args.device)
    };
    if let Some(kernels) = args.launches {
        let figure =
            moe_model::gpu::bench::launch_overhead(&ctx, kernels, args.hidden, args.iters)?;
        if args.json {
            let json = serde_json::json!({
                "device": args.device.to_string(),
                "name": ctx.name(),
                "launches": figure,
            });
            println!("{json}");
        } else {
            println!(
                "{} ({}): {} kernels over {} values: launched one by one {:.2} us a kernel, \
                 replayed as one CUDA graph {:.2} us a kernel",
                args.device,
                ctx.name(),
                figure.kernels,
                figure.width,
                figure.eager_us_per_kernel,
                figure.graph_us_per_kernel
            );
        }
        return Ok(());
    }
    let shape = FfnShape {
        hidden: args.hidden,
        intermediate: args.intermediate,
        experts: args.experts,
        top_k: args.top_k,
    };
    if args.plan_routes {
        let figures =
            moe_model::gpu::bench::route_planning(&ctx, &shape, &args.tokens, args.iters)?;
        if args.json {
            let json = serde_json::json!({
                "device": args.device.to_string(),
                "name": ctx.name(),
                "plans": figures,
            });
            println!("{json}");
        } else {
            println!(
                "{} ({}): routes planned on the device, top-{} of {} experts",
                args.device,
                ctx.name(),
                args.top_k,
                args.experts
            );
            for f in &figures {
                println!(
                    "{:>6} tokens ({:>6} pairs): {:8.2} us a plan",
                    f.tokens, f.pairs, f.us_per_plan
                );
            }
        }
        return Ok(());
    }
    let roofline = dense_gemm(&ctx, args.roofline_size, args.iters)?;
    let default_lanes = moe_model::gpu::context::GEMM_LANES;
    let mut cases: Vec<(usize, usize)> = args.tokens.iter().map(|&t| (default_lanes, t)).collect();
    if let Some(&largest) = args.tokens.iter().max() {
        cases.extend(
            args.lanes
                .iter()
                .filter(|&&l| l != default_lanes)
                .map(|&l| (l, largest)),
        );
    }
    // The roofline stays cuBLAS's dense GEMM: what the experts are measured against.
    ctx.set_deterministic(args.deterministic);
    ctx.set_fused_silu(args.fused_silu);
    let grouped = args.expert_gemm == ExpertGemm::Grouped;
    ctx.set_expert_gemm(args.expert_gemm);
    if args.expert_gemm != ExpertGemm::Lanes {
        // One call per pass: the lanes are not used, so one case per token count.
        cases.retain(|&(lanes, _)| lanes == default_lanes);
    }
    let weights = match args.fp8 {
        true => BenchWeights::Fp8,
        false => BenchWeights::Held,
    };
    let report = expert_ffn(&ctx, shape, weights, &cases, args.iters, roofline.tflops)?;
    let figures = &report.figures;
    if args.json {
        let json = serde_json::json!({
            "device": args.device.to_string(),
            "name": ctx.name(),
            "dtype": args.gpu_dtype.to_string(),
            "weights": weights,
            "deterministic": args.deterministic,
            "expert_gemm": args.expert_gemm.to_string(),
            "fused_silu": args.fused_silu,
            "weight_bytes": report.weight_bytes,
            "shape": shape,
            "roofline": roofline,
            "expert_ffn": figures,
        });
        println!("{json}");
        return Ok(());
    }
    println!(
        "{} ({}), {}: dense GEMM {n}x{n}x{n}: {:.1} TFLOP/s ({:.2} ms)",
        args.device,
        ctx.name(),
        args.gpu_dtype,
        roofline.tflops,
        roofline.ms,
        n = roofline.m
    );
    println!(
        "expert FFN, hidden {} x intermediate {}, {} experts, top-{}, weights {} ({:.2} GB on \
         the device){}:",
        shape.hidden,
        shape.intermediate,
        shape.experts,
        shape.top_k,
        if args.fp8 {
            "FP8".to_string()
        } else {
            args.gpu_dtype.to_string()
        },
        report.weight_bytes as f64 / 1e9,
        if args.deterministic {
            ", exact kernels"
        } else if grouped {
            ", one grouped cuBLAS call per pass"
        } else if args.expert_gemm == ExpertGemm::TensorCores {
            ", our tensor-core kernel, one launch per pass"
        } else {
            ""
        }
    );
    println!(
        "{:>6} {:>8} {:>8} {:>10} {:>10} {:>12} {:>16}",
        "lanes", "tokens", "pairs", "ms", "TFLOP/s", "of roofline", "GEMMs alone"
    );
    for f in figures {
        println!(
            "{:>6} {:>8} {:>8} {:>10.3} {:>10.1} {:>11.0}% {:>7.3} ms {:>5.0}",
            f.lanes,
            f.tokens,
            f.pairs,
            f.ms,
            f.tflops,
            f.of_roofline * 100.0,
            f.gemm_ms,
            f.gemm_tflops
        );
    }
    Ok(())
}
