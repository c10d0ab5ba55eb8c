//! A GPU buffer as GEMMs see it: weights in the precision the device holds them (bf16, f32,
//! FP8 with scales) and activations in the form a GEMM against them takes (f32, bf16, or a
//! bf16x2 pair), and the bounds check every GEMM launch goes through. Shared by the experts
//! (`expert_ffn`), the dense part (`dense_ops`) and the exact kernels (`exact_gemm`).

use cudarc::cublas::sys::cudaDataType;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, PushKernelArg};

use super::context::GpuContext;
use super::error::GpuError;
use super::fill::fill_uniform_f32;
use super::fp8_matrix::DeviceFp8Matrix;
use super::kernels::grid;
use crate::device::GpuDtype;

/// A device buffer in the GEMM dtype (bf16 held as its bits), or FP8 weights with their
/// scales.
pub enum GpuBuffer {
    Bf16(CudaSlice<u16>),
    F32(CudaSlice<f32>),
    /// Activations in the bf16x2 mode: `x = hi + lo`, each bf16, same layout. Only ever a
    /// GEMM's B (weights are plain bf16).
    Bf16Pair {
        hi: CudaSlice<u16>,
        lo: CudaSlice<u16>,
    },
    /// A weight matrix kept as FP8 (`--gpu-fp8 keep`): only ever a GEMM's A, multiplied by
    /// the FP8 kernel (`gemm_rows_fp8`), never by cuBLAS.
    Fp8(Box<DeviceFp8Matrix>),
}

impl GpuBuffer {
    /// Uninitialised-free: a zeroed buffer of `len` elements.
    pub fn zeros(ctx: &GpuContext, len: usize) -> Result<Self, GpuError> {
        let stream = ctx.stream();
        Ok(match ctx.dtype() {
            GpuDtype::Bf16 | GpuDtype::Bf16x2 => {
                GpuBuffer::Bf16(stream.alloc_zeros::<u16>(len.max(1))?)
            }
            GpuDtype::F32 => GpuBuffer::F32(stream.alloc_zeros::<f32>(len.max(1))?),
        })
    }

    /// Uploads f32 host values, converting to the context's dtype (bf16: round to nearest
    /// even, exact for weights that were bf16 in the checkpoint).
    pub fn upload(ctx: &GpuContext, host: &[f32]) -> Result<Self, GpuError> {
        Self::upload_as(ctx, host, ctx.dtype().bf16_weights())
    }

    /// Uploads f32 host values as bf16 (round to nearest even) or as f32.
    pub fn upload_as(ctx: &GpuContext, host: &[f32], bf16: bool) -> Result<Self, GpuError> {
        let stream = ctx.stream();
        if host.is_empty() {
            return Ok(GpuBuffer::F32(stream.alloc_zeros::<f32>(1)?));
        }
        Ok(match bf16 {
            true => {
                let bits: Vec<u16> = host
                    .iter()
                    .map(|v| half::bf16::from_f32(*v).to_bits())
                    .collect();
                GpuBuffer::Bf16(stream.clone_htod(&bits)?)
            }
            false => GpuBuffer::F32(stream.clone_htod(host)?),
        })
    }

    pub fn len(&self) -> usize {
        match self {
            GpuBuffer::Bf16(s) | GpuBuffer::Bf16Pair { hi: s, .. } => s.len(),
            GpuBuffer::F32(s) => s.len(),
            GpuBuffer::Fp8(m) => m.heads() * m.rows() * m.cols(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn bytes(&self) -> usize {
        match self {
            GpuBuffer::Bf16(s) => s.len() * 2,
            GpuBuffer::F32(s) => s.len() * 4,
            GpuBuffer::Bf16Pair { hi, lo } => (hi.len() + lo.len()) * 2,
            GpuBuffer::Fp8(m) => m.bytes(),
        }
    }

    pub(crate) fn data_type(&self) -> cudaDataType {
        match self {
            GpuBuffer::Bf16(_) | GpuBuffer::Bf16Pair { .. } => cudaDataType::CUDA_R_16BF,
            GpuBuffer::F32(_) => cudaDataType::CUDA_R_32F,
            // Refused by `gemm_f32_out` before cuBLAS sees it.
            GpuBuffer::Fp8(_) => cudaDataType::CUDA_R_8U,
        }
    }

    fn element_bytes(&self) -> u64 {
        match self {
            GpuBuffer::Bf16(_) | GpuBuffer::Bf16Pair { .. } => 2,
            GpuBuffer::F32(_) => 4,
            GpuBuffer::Fp8(_) => 1,
        }
    }

    /// Device address of element `offset` (valid while `self` lives and for work queued on
    /// `stream`); of the `hi` term for a pair.
    pub(crate) fn address(&self, stream: &CudaStream, offset: usize) -> u64 {
        let base = match self {
            GpuBuffer::Bf16(s) | GpuBuffer::Bf16Pair { hi: s, .. } => s.device_ptr(stream).0,
            GpuBuffer::F32(s) => s.device_ptr(stream).0,
            GpuBuffer::Fp8(m) => m.values_address(stream),
        };
        base + offset as u64 * self.element_bytes()
    }

    /// Address of element `offset` of the `lo` term, for a pair.
    pub(crate) fn lo_address(&self, stream: &CudaStream, offset: usize) -> Option<u64> {
        match self {
            GpuBuffer::Bf16Pair { lo, .. } => Some(lo.device_ptr(stream).0 + offset as u64 * 2),
            _ => None,
        }
    }

    /// An activation buffer of `len` elements in `form`, contents unspecified.
    ///
    /// # Safety
    /// The caller writes every element before a GEMM reads it.
    pub(crate) unsafe fn scratch(
        ctx: &GpuContext,
        len: usize,
        form: ActForm,
    ) -> Result<Self, GpuError> {
        let stream = ctx.stream();
        let len = len.max(1);
        // SAFETY: as the caller promises.
        Ok(unsafe {
            match form {
                ActForm::Bf16Pair => GpuBuffer::Bf16Pair {
                    hi: stream.alloc::<u16>(len)?,
                    lo: stream.alloc::<u16>(len)?,
                },
                ActForm::Bf16 => GpuBuffer::Bf16(stream.alloc::<u16>(len)?),
                ActForm::F32 => GpuBuffer::F32(stream.alloc::<f32>(len)?),
            }
        })
    }

    /// Fills with reproducible pseudo-random values in `[-scale, scale]` (benchmarks).
    pub fn fill_uniform(
        &mut self,
        ctx: &GpuContext,
        seed: u32,
        scale: f32,
    ) -> Result<(), GpuError> {
        let stream = ctx.stream();
        let n = self.len() as i64;
        let cfg = grid(self.len());
        // SAFETY: the kernel writes exactly `n` elements of the buffer it is given.
        unsafe {
            match self {
                GpuBuffer::Bf16(s) => {
                    stream
                        .launch_builder(&ctx.kernels().fill_uniform_bf16)
                        .arg(s)
                        .arg(&n)
                        .arg(&seed)
                        .arg(&scale)
                        .launch(cfg)?;
                }
                GpuBuffer::F32(s) => return fill_uniform_f32(ctx, s, seed, scale),
                GpuBuffer::Fp8(_) => {
                    return Err(GpuError::Shape(
                        "FP8 matrices are not filled at random".into(),
                    ))
                }
                GpuBuffer::Bf16Pair { hi, lo } => {
                    // A value's two terms: `lo` is within bf16's rounding step of `hi`.
                    for (part, seed, scale) in [(hi, seed, scale), (lo, seed ^ 1, scale / 256.0)] {
                        stream
                            .launch_builder(&ctx.kernels().fill_uniform_bf16)
                            .arg(part)
                            .arg(&n)
                            .arg(&seed)
                            .arg(&scale)
                            .launch(cfg)?;
                    }
                }
            };
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActForm {
    F32,
    Bf16,
    Bf16Pair,
}

/// Refuses a GEMM (`shape`, touching `extents` elements from its offsets into A, B and C)
/// that would overrun a buffer.
pub(crate) fn check_gemm_bounds(
    shape: &dyn std::fmt::Debug,
    (a_end, b_end, c_end): (usize, usize, usize),
    (a, a_offset): (&GpuBuffer, usize),
    (b, b_offset): (&GpuBuffer, usize),
    (c, c_offset): (&CudaSlice<f32>, usize),
) -> Result<(), GpuError> {
    if a_offset + a_end > a.len() || b_offset + b_end > b.len() || c_offset + c_end > c.len() {
        return Err(GpuError::Shape(format!(
            "GEMM {shape:?} from offsets {a_offset}/{b_offset}/{c_offset} overruns buffers of \
             {}/{}/{}",
            a.len(),
            b.len(),
            c.len()
        )));
    }
    Ok(())
}
