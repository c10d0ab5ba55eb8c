//! `moe gen-checkpoint`: a random checkpoint of a preset shape, for tests and benchmarks;
//! `--synthetic` writes only its config and seed, and whoever opens it generates the weights.

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use moe_model::generator::{self, Preset, WeightDtype};
use moe_model::Family;

#[derive(Clone, Copy, ValueEnum)]
enum Arch {
    #[value(name = "deepseek_v3")]
    DeepseekV3,
    #[value(name = "qwen3_moe")]
    Qwen3Moe,
    #[value(name = "mixtral")]
    Mixtral,
    /// GLM-4.5 (`full`: GLM-4.5-Air's dimensions).
    #[value(name = "glm4_moe")]
    Glm4Moe,
    /// GLM-4.7-Flash (`full`: its dimensions).
    #[value(name = "glm4_moe_lite")]
    Glm4MoeLite,
    /// MiniMax-M2 (`full`: its dimensions).
    #[value(name = "minimax_m2")]
    MinimaxM2,
}

#[derive(Clone, Copy, ValueEnum)]
enum PresetArg {
    Tiny,
    Small,
    Medium,
    /// The family's published dimensions (DeepSeek-V3 671B, Qwen3-30B-A3B, Mixtral-8x7B).
    Full,
}

#[derive(Clone, Copy, ValueEnum)]
enum DtypeArg {
    F32,
    Bf16,
    /// DeepSeek's FP8 layout: projections in e4m3 with 128x128 block scales, the rest bf16.
    Fp8,
    /// Kimi-K2-Thinking's layout: routed experts in compressed-tensors' INT4 (a bf16 scale per
    /// 32 columns), the rest bf16.
    Int4,
}

#[derive(Args)]
pub struct GenCheckpointArgs {
    #[arg(long, value_enum)]
    arch: Arch,
    #[arg(long, value_enum, default_value = "tiny")]
    preset: PresetArg,
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, value_enum, default_value = "f32")]
    dtype: DtypeArg,
    /// Layers instead of the preset's (DeepSeek-V3's first three are dense, so more than 3).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1024))]
    layers: Option<u64>,
    /// The multi-token-prediction layer of DeepSeek-V3 or GLM-4.5 (`num_nextn_predict_layers`,
    /// 0 or 1; the published models have 1), written after the main layers as their
    /// checkpoints hold it: what `--speculative-config '{"method": "mtp", ...}'` drafts with.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=1))]
    mtp_layers: u64,
    /// Write no weights: config, tokenizer and `synthetic_weights.json` (seed and dtype), from
    /// which every process that opens the directory generates the same weights a written
    /// checkpoint of this seed holds. For models larger than the disk.
    #[arg(long, env = "MOE_SYNTHETIC", default_value_t = false)]
    synthetic: bool,
}

pub fn run(args: GenCheckpointArgs) -> anyhow::Result<()> {
    let family = match args.arch {
        Arch::DeepseekV3 => Family::DeepseekV3,
        Arch::Qwen3Moe => Family::Qwen3Moe,
        Arch::Mixtral => Family::Mixtral,
        Arch::Glm4Moe => Family::Glm4Moe,
        Arch::Glm4MoeLite => Family::Glm4MoeLite,
        Arch::MinimaxM2 => Family::MinimaxM2,
    };
    let preset = match args.preset {
        PresetArg::Tiny => Preset::Tiny,
        PresetArg::Small => Preset::Small,
        PresetArg::Medium => Preset::Medium,
        PresetArg::Full => Preset::Full,
    };
    let dtype = match args.dtype {
        DtypeArg::F32 => WeightDtype::F32,
        DtypeArg::Bf16 => WeightDtype::Bf16,
        DtypeArg::Fp8 => WeightDtype::Fp8,
        DtypeArg::Int4 => WeightDtype::Int4,
    };
    let mut plan = generator::CheckpointPlan::new(family, preset, dtype, args.seed);
    plan.layers = args.layers.map(|l| l as usize);
    plan.mtp_layers = args.mtp_layers as usize;
    let (params, what) = if args.synthetic {
        (plan.write_synthetic(&args.out)?, "a synthetic ")
    } else {
        (plan.write(&args.out)?, "")
    };
    eprintln!(
        "wrote {what}{} ({} parameters) to {}",
        family.model_type(),
        params,
        args.out.display()
    );
    Ok(())
}
