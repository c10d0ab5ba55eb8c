//! `moe gen-checkpoint`: a random checkpoint of a preset shape, for tests and benchmarks.

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
}

#[derive(Clone, Copy, ValueEnum)]
enum PresetArg {
    Tiny,
    Small,
    Medium,
}

#[derive(Clone, Copy, ValueEnum)]
enum DtypeArg {
    F32,
    Bf16,
    /// DeepSeek's FP8 layout: projections in e4m3 with 128x128 block scales, the rest bf16.
    Fp8,
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
}

pub fn run(args: GenCheckpointArgs) -> anyhow::Result<()> {
    let family = match args.arch {
        Arch::DeepseekV3 => Family::DeepseekV3,
        Arch::Qwen3Moe => Family::Qwen3Moe,
        Arch::Mixtral => Family::Mixtral,
    };
    let preset = match args.preset {
        PresetArg::Tiny => Preset::Tiny,
        PresetArg::Small => Preset::Small,
        PresetArg::Medium => Preset::Medium,
    };
    let dtype = match args.dtype {
        DtypeArg::F32 => WeightDtype::F32,
        DtypeArg::Bf16 => WeightDtype::Bf16,
        DtypeArg::Fp8 => WeightDtype::Fp8,
    };
    let params = generator::write_checkpoint(family, preset, &args.out, args.seed, dtype)?;
    eprintln!(
        "wrote {} ({} parameters) to {}",
        family.model_type(),
        params,
        args.out.display()
    );
    Ok(())
}
