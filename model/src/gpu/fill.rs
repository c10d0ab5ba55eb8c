//! Benchmark buffers filled on the device (DeepSeek-V3's experts of one layer are 11 to 22 GB:
//! generating them on the host and uploading would take longer than the measurement).

use cudarc::driver::{CudaSlice, PushKernelArg};

use super::context::GpuContext;
use super::error::GpuError;
use super::kernels::grid;

/// Fills an f32 buffer with reproducible pseudo-random values in `[-scale, scale]`.
pub fn fill_uniform_f32(
    ctx: &GpuContext,
    buffer: &mut CudaSlice<f32>,
    seed: u32,
    scale: f32,
) -> Result<(), GpuError> {
    let n = buffer.len() as i64;
    let cfg = grid(buffer.len());
    // SAFETY: the kernel writes exactly `n` elements of `buffer`.
    unsafe {
        ctx.stream()
            .launch_builder(&ctx.kernels().fill_uniform_f32)
            .arg(buffer)
            .arg(&n)
            .arg(&seed)
            .arg(&scale)
            .launch(cfg)?;
    }
    Ok(())
}
