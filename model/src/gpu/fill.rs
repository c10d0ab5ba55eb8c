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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::GpuDtype;
    use crate::gpu::buffer::GpuBuffer;

    /// The benchmarks' device fills: within their scale, the same for a seed and different for
    /// another, and FP8 bytes never a NaN code (x111 1111).
    #[test]
    fn benchmark_fills_are_bounded_reproducible_and_finite() {
        let Some(ctx) = crate::test_support::test_context(GpuDtype::F32) else {
            return;
        };
        let stream = ctx.stream();
        let n = 3000;
        let f32_fill = |seed: u32| {
            let mut out = stream.alloc_zeros::<f32>(n).unwrap();
            fill_uniform_f32(&ctx, &mut out, seed, 0.5).unwrap();
            stream.clone_dtoh(&out).unwrap()
        };
        let (a, b, c) = (f32_fill(7), f32_fill(7), f32_fill(8));
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(a.iter().all(|v| v.abs() <= 0.5), "outside [-0.5, 0.5]");
        assert!(a.iter().any(|&v| v > 0.25) && a.iter().any(|&v| v < -0.25));

        let mut bf16 = GpuBuffer::Bf16(stream.alloc_zeros::<u16>(n).unwrap());
        bf16.fill_uniform(&ctx, 7, 2.0).unwrap();
        let GpuBuffer::Bf16(bits) = &bf16 else {
            unreachable!()
        };
        let values: Vec<f32> = stream
            .clone_dtoh(bits)
            .unwrap()
            .into_iter()
            .map(|b| half::bf16::from_bits(b).to_f32())
            .collect();
        assert!(values.iter().all(|v| v.abs() <= 2.0 && v.is_finite()));
        assert!(values.iter().any(|&v| v > 1.0) && values.iter().any(|&v| v < -1.0));

        let fp8 = crate::gpu::fp8_matrix::DeviceFp8Matrix::random(&ctx, 40, 300, 3).unwrap();
        let bytes = stream.clone_dtoh(fp8.values()).unwrap();
        assert!(bytes.iter().all(|&b| b & 0x7f != 0x7f), "an e4m3 NaN code");
        assert!(bytes.iter().any(|&b| b & 0x80 != 0) && bytes.iter().any(|&b| b & 0x80 == 0));
    }
}
