//! FP8 weights kept as FP8 on the device: a matrix's e4m3 bytes and its scales per k segment,
//! never a wider copy. How they are uploaded, generated and addressed; the GEMMs that read
//! them are `fp8_gemm` (CUDA cores), `grouped_launch` and `tensor_core_gemm`.

use cudarc::driver::{CudaSlice, DevicePtr, PushKernelArg};

use super::context::GpuContext;
use super::error::GpuError;
use super::kernels::as_int;
use crate::backend::weight::Fp8Matrix;

/// An `[n, k]` FP8 matrix on the device: row-major e4m3 bytes, and each row's scale per k
/// segment; or `heads` such matrices on the same segments, stacked (MLA's per-head halves of
/// `kv_b`).
pub struct DeviceFp8Matrix {
    pub(super) values: CudaSlice<u8>,
    pub(super) scales: CudaSlice<f32>,
    pub(super) segment_starts: CudaSlice<i32>,
    /// The same starts on the host: a grouped GEMM's experts must share them.
    pub(super) host_starts: Vec<i32>,
    pub(super) n: usize,
    pub(super) k: usize,
    pub(super) heads: usize,
}

impl DeviceFp8Matrix {
    /// Uploads `matrix` as it is held on the host (bytes and scales, no widening).
    pub fn upload(ctx: &GpuContext, matrix: &Fp8Matrix) -> Result<Self, GpuError> {
        Self::upload_heads(ctx, std::slice::from_ref(matrix))
    }

    /// Uploads per-head matrices stacked, each as it is held on the host: all the same shape
    /// and segments (else a shape error: the caller widens them instead).
    pub fn upload_heads(ctx: &GpuContext, heads: &[Fp8Matrix]) -> Result<Self, GpuError> {
        let Some(matrix) = heads.first() else {
            return Err(GpuError::Shape("no FP8 matrix to upload".into()));
        };
        let alike = heads.iter().all(|h| {
            h.rows == matrix.rows
                && h.cols == matrix.cols
                && h.segment_starts == matrix.segment_starts
        });
        if !alike {
            return Err(GpuError::Shape(
                "per-head FP8 matrices of other shapes or segments".into(),
            ));
        }
        let (n, k) = (matrix.rows, matrix.cols);
        let segments = matrix.segments();
        let starts_ok = matrix.segment_starts.first() == Some(&0)
            && matrix.segment_starts.windows(2).all(|w| w[0] < w[1])
            && matrix.segment_starts.last().is_some_and(|&s| s < k.max(1));
        let sized = heads
            .iter()
            .all(|h| h.values.len() == n * k && h.scales.len() == n * segments);
        if !sized || !starts_ok {
            return Err(GpuError::Shape(format!(
                "an FP8 matrix [{n}, {k}] with {} bytes, {} scales and segments {:?}",
                matrix.values.len(),
                matrix.scales.len(),
                matrix.segment_starts
            )));
        }
        as_int(n, "FP8 rows")?;
        as_int(k, "FP8 columns")?;
        let starts = matrix
            .segment_starts
            .iter()
            .map(|&s| as_int(s, "FP8 segment start"))
            .collect::<Result<Vec<i32>, _>>()?;
        let stream = ctx.stream();
        let values: Vec<u8> = heads
            .iter()
            .flat_map(|h| h.values.iter().copied())
            .collect();
        let scales: Vec<f32> = heads
            .iter()
            .flat_map(|h| h.scales.iter().copied())
            .collect();
        let values = match values.is_empty() {
            true => stream.alloc_zeros::<u8>(1)?,
            false => stream.clone_htod(&values)?,
        };
        Ok(Self {
            values,
            scales: stream.clone_htod(&scales)?,
            segment_starts: stream.clone_htod(&starts)?,
            host_starts: starts,
            n,
            k,
            heads: heads.len(),
        })
    }

    /// `parts` of a synthetic checkpoint stacked row-wise (an expert's gate and up rows), each
    /// `(key, matrix)` as [`crate::checkpoint::Checkpoint::generated_fp8`] gives it: the codes
    /// generated here, bitwise the bytes the checkpoint would give, the scales uploaded. No
    /// host copy of the codes is ever made.
    pub fn generated(ctx: &GpuContext, parts: &[(u64, &Fp8Matrix)]) -> Result<Self, GpuError> {
        let Some(&(_, first)) = parts.first() else {
            return Err(GpuError::Shape("no FP8 matrix to generate".into()));
        };
        let k = first.cols;
        let fits = parts.iter().all(|(_, p)| {
            p.cols == k
                && p.segment_starts == first.segment_starts
                && p.scales.len() == p.rows * p.segments()
        });
        if !fits || first.segment_starts.first() != Some(&0) {
            return Err(GpuError::Shape(
                "generated FP8 parts of other columns or segments".into(),
            ));
        }
        let n: usize = parts.iter().map(|(_, p)| p.rows).sum();
        as_int(n, "FP8 rows")?;
        as_int(k, "FP8 columns")?;
        let starts = first
            .segment_starts
            .iter()
            .map(|&s| as_int(s, "FP8 segment start"))
            .collect::<Result<Vec<i32>, _>>()?;
        let stream = ctx.stream();
        // SAFETY: filled in full below, part after part.
        let mut values = unsafe { stream.alloc::<u8>((n * k).max(1))? };
        let mut row = 0;
        for &(key, part) in parts {
            let len = part.rows * k;
            if len > 0 {
                let mut slice = values.slice_mut(row * k..row * k + len);
                let count = len as i64;
                // SAFETY: the kernel writes exactly `count` bytes of this part's rows.
                unsafe {
                    stream
                        .launch_builder(&ctx.kernels().synthetic_e4m3)
                        .arg(&mut slice)
                        .arg(&count)
                        .arg(&key)
                        .launch(super::kernels::grid(len))?;
                }
            }
            row += part.rows;
        }
        let scales: Vec<f32> = parts
            .iter()
            .flat_map(|(_, p)| p.scales.iter().copied())
            .collect();
        Ok(Self {
            values,
            scales: stream.clone_htod(&scales)?,
            segment_starts: stream.clone_htod(&starts)?,
            host_starts: starts,
            n,
            k,
            heads: 1,
        })
    }

    /// An `[n, k]` matrix of random finite e4m3 bytes with random scales per 128 x 128 block
    /// (benchmarks: DeepSeek-V3's 256 experts of a layer are 11 GB in FP8), filled on the
    /// device.
    pub fn random(ctx: &GpuContext, n: usize, k: usize, seed: u32) -> Result<Self, GpuError> {
        const BLOCK: usize = 128;
        let segments = k.div_ceil(BLOCK).max(1);
        let starts: Vec<i32> = (0..segments)
            .map(|s| as_int(s * BLOCK, "FP8 segment start"))
            .collect::<Result<_, _>>()?;
        let stream = ctx.stream();
        let mut values = stream.alloc_zeros::<u8>((n * k).max(1))?;
        let mut scales = stream.alloc_zeros::<f32>((n * segments).max(1))?;
        let len = (n * k) as i64;
        // SAFETY: the kernel writes exactly `len` bytes of `values`.
        unsafe {
            stream
                .launch_builder(&ctx.kernels().fill_e4m3)
                .arg(&mut values)
                .arg(&len)
                .arg(&seed)
                .launch(super::kernels::grid(n * k))?;
        }
        super::fill::fill_uniform_f32(ctx, &mut scales, seed ^ 0x5ca1e, 1e-3)?;
        Ok(Self {
            values,
            scales,
            segment_starts: stream.clone_htod(&starts)?,
            host_starts: starts,
            n,
            k,
            heads: 1,
        })
    }

    pub fn rows(&self) -> usize {
        self.n
    }

    pub fn cols(&self) -> usize {
        self.k
    }

    /// Matrices stacked (1 for a plain matrix).
    pub fn heads(&self) -> usize {
        self.heads
    }

    /// Device address of the e4m3 bytes (valid while `self` lives, for work on `stream`).
    /// The e4m3 bytes, row-major.
    #[cfg(test)]
    pub(crate) fn values(&self) -> &CudaSlice<u8> {
        &self.values
    }

    pub(crate) fn values_address(&self, stream: &cudarc::driver::CudaStream) -> u64 {
        self.values.device_ptr(stream).0
    }

    pub(crate) fn scales_address(&self, stream: &cudarc::driver::CudaStream) -> u64 {
        self.scales.device_ptr(stream).0
    }

    /// The segment starts' address and count.
    pub(crate) fn segments_address(&self, stream: &cudarc::driver::CudaStream) -> (u64, usize) {
        (
            self.segment_starts.device_ptr(stream).0,
            self.host_starts.len(),
        )
    }

    /// Where each scale segment of a row starts (ascending, the first 0), on the host.
    pub(crate) fn segment_starts(&self) -> &[i32] {
        &self.host_starts
    }

    /// Whether `self` can share a grouped launch with `other`: one matrix of the same shape
    /// on the same segments.
    pub(crate) fn groups_with(&self, other: &Self) -> bool {
        self.n == other.n
            && self.k == other.k
            && self.heads == 1
            && other.heads == 1
            && self.host_starts == other.host_starts
    }

    /// Device bytes held: the e4m3 bytes, the scales and the segment starts.
    pub fn bytes(&self) -> usize {
        self.values.len() + self.scales.len() * 4 + self.segment_starts.len() * 4
    }
}
