//! Where an offline engine runs (`moe generate`, `moe bench`): the same two flags on both.

use clap::Args;
use moe_model::device::{Device, GpuDtype};
use moe_model::experts::ExpertDevice;

#[derive(Args, Clone)]
pub struct EngineDeviceArgs {
    /// Where the offline engine runs, dense part and routed experts: `cpu` or `cuda:N` (a
    /// build with `--features cuda`). Ignored with `--router` (the cluster's processes have
    /// their own): not a conflict, because `MOE_DEVICE` is often set for a whole deployment.
    #[arg(long, env = "MOE_DEVICE", default_value = "cpu")]
    pub device: Device,
    /// Numerics on a GPU: `bf16x2` (bf16 weights, activations as two bf16 terms), `bf16` or
    /// `f32` (the MoE gate stays f32).
    #[arg(long, env = "MOE_GPU_DTYPE", default_value = "bf16x2")]
    pub gpu_dtype: GpuDtype,
}

impl EngineDeviceArgs {
    /// Opens the device (a clear error where the GPU, its driver or CUDA support is missing).
    pub fn open(&self) -> anyhow::Result<ExpertDevice> {
        Ok(self.device.open_experts(self.gpu_dtype)?)
    }

    /// `cpu`, or the GPU with its numerics (`cuda:0 (bf16x2)`).
    pub fn describe(&self) -> String {
        match self.device {
            Device::Cpu => "cpu".into(),
            gpu => format!("{gpu} ({})", self.gpu_dtype),
        }
    }
}
