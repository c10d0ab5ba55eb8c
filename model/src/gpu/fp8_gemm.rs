//! FP8 weights kept as FP8 on the device, and the GEMM that reads them (`gemm_rows_fp8` in
//! kernels.cu): device memory for a matrix is its e4m3 bytes and its scales, never a wider
//! copy. Each weight is widened in the kernel to `f32(e4m3) * scale` (one rounding, what
//! dequantizing at load computes) and each output is a chain of fused multiply-adds over k in
//! ascending order, the CPU GEMM's chain: the product is bitwise the CPU's FP8 (and f32) GEMM,
//! and a row's result is the same whatever rows are computed with it.
//!
//! A first kernel on CUDA cores, written for exactness and batch invariance: it does not use
//! tensor cores, and a one-row product runs one FMA chain per output.

use cudarc::driver::{
    CudaSlice, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg,
};

use super::context::GpuContext;
use super::error::GpuError;
use super::fp8_matrix::DeviceFp8Matrix;
use super::grouped_launch::{GroupedOutput, GroupedWeights, UploadedTiles, FP8_TILE_ROWS};
use super::kernels::as_int;
use crate::device::grouped_tiles::GroupedRowTiles;
use crate::device::row_gemm::RowGemm;
use crate::device::shapes::StridedGemm;

/// Outputs (columns of `out`) and rows per block (`FP8_TILE_N`, `FP8_TILE_ROWS` in kernels.cu).
const TILE_N: usize = 32;
const TILE_ROWS: usize = FP8_TILE_ROWS;

/// The GEMMs over FP8 weights on CUDA cores.
impl DeviceFp8Matrix {
    /// A dense-part GEMM over these weights (`s` as [`RowGemm::from_strided`] reads it, from
    /// element 0 of the weights: one matrix, or one per batch when stacked), f32 rows `x` from
    /// `x_offset` into `out` from `out_offset`, queued on the context's stream. The caller
    /// checked the extents against the buffers.
    pub fn strided_matmul(
        &self,
        ctx: &GpuContext,
        s: &StridedGemm,
        (x, x_offset): (&CudaSlice<f32>, usize),
        (out, out_offset): (&mut CudaSlice<f32>, usize),
    ) -> Result<(), GpuError> {
        let row = RowGemm::from_strided(s);
        let fits = row.is_some_and(|r| {
            r.n == self.n
                && r.k == self.k
                && r.w_stride == self.k
                && (r.batch <= 1 || (r.w_batch == self.n * self.k && r.batch <= self.heads))
        });
        let Some(row) = row.filter(|_| fits) else {
            return Err(GpuError::Shape(format!(
                "an FP8 GEMM {s:?} over {} stacked [{}, {}] matrices",
                self.heads, self.n, self.k
            )));
        };
        if row.rows == 0 || row.n == 0 || row.batch == 0 {
            return Ok(());
        }
        let mut config = launch_shape(row.rows, row.n)?;
        if row.batch > 65_535 {
            return Err(GpuError::Shape(format!("{} FP8 batches", row.batch)));
        }
        config.grid_dim.2 = row.batch as u32;
        let stream = ctx.stream();
        let x_at = x.device_ptr(stream).0 + x_offset as u64 * 4;
        let out_at = out.device_ptr_mut(stream).0 + out_offset as u64 * 4;
        let wide = |v: usize| v as i64;
        let (x_stride, x_batch) = (wide(row.x_stride), wide(row.x_batch));
        let (out_stride, out_batch) = (wide(row.out_stride), wide(row.out_batch));
        let segments = self.host_starts.len() as i32;
        let (rows_i, n, k) = (as_int(row.rows, "rows")?, self.n as i32, self.k as i32);
        // SAFETY: the caller checked x's and out's extents; the kernel reads batch matrices
        // of n * k bytes and n * segments scales, within the `heads` stacked (checked above).
        unsafe {
            let mut builder = stream.launch_builder(&ctx.kernels().gemm_rows_fp8_batched);
            builder.arg(&x_at).arg(&x_stride).arg(&x_batch);
            builder.arg(&self.values).arg(&self.scales);
            builder.arg(&self.segment_starts).arg(&segments);
            builder.arg(&out_at).arg(&out_stride).arg(&out_batch);
            builder.arg(&rows_i).arg(&n).arg(&k);
            builder.launch(config)?;
        }
        Ok(())
    }

    /// `out[rows, n] = x[rows, k] · selfᵀ`, both row-major and contiguous, queued on the
    /// context's stream.
    pub fn matmul(
        &self,
        ctx: &GpuContext,
        x: &CudaSlice<f32>,
        rows: usize,
        out: &mut CudaSlice<f32>,
    ) -> Result<(), GpuError> {
        self.matmul_views(ctx, &x.as_view(), rows, &mut out.as_view_mut())
    }

    /// [`Self::matmul`] on views: rows of a larger buffer (an expert's slots of a batch).
    pub fn matmul_views(
        &self,
        ctx: &GpuContext,
        x: &CudaView<'_, f32>,
        rows: usize,
        out: &mut CudaViewMut<'_, f32>,
    ) -> Result<(), GpuError> {
        if self.heads != 1 || x.len() < rows * self.k || out.len() < rows * self.n {
            return Err(GpuError::Shape(format!(
                "an FP8 GEMM of {rows} rows over {} stacked [{}, {}] with {} input and {} output \
                 values",
                self.heads,
                self.n,
                self.k,
                x.len(),
                out.len()
            )));
        }
        if rows == 0 || self.n == 0 {
            return Ok(());
        }
        let config = launch_shape(rows, self.n)?;
        let (x_stride, out_stride) = (self.k as i64, self.n as i64);
        let segments = self.host_starts.len() as i32;
        let (rows_i, n, k) = (as_int(rows, "rows")?, self.n as i32, self.k as i32);
        // SAFETY: the kernel reads rows * k values of x and writes rows * n of out (checked
        // above), reads n * k bytes, n * segments scales and the segment starts it was given.
        unsafe {
            ctx.stream()
                .launch_builder(&ctx.kernels().gemm_rows_fp8)
                .arg(x)
                .arg(&x_stride)
                .arg(&self.values)
                .arg(&self.scales)
                .arg(&self.segment_starts)
                .arg(&segments)
                .arg(out)
                .arg(&out_stride)
                .arg(&rows_i)
                .arg(&n)
                .arg(&k)
                .launch(config)?;
        }
        Ok(())
    }
}

/// `out[slots, n]`: each run of `tiles` (one per expert, slots in expert order) times its
/// expert, `experts[i]` serving run i, in one launch. Every expert has the same shape and
/// segments; each output is the same chain as in [`DeviceFp8Matrix::matmul`], so a slot's
/// result is bitwise its expert's CPU GEMM whatever the other runs.
pub fn grouped_matmul(
    ctx: &GpuContext,
    experts: &[&DeviceFp8Matrix],
    x: &CudaSlice<f32>,
    tiles: &GroupedRowTiles,
    out: &mut CudaSlice<f32>,
) -> Result<(), GpuError> {
    grouped_fp8(ctx, experts, x, tiles, out, GroupedOutput::Products)
}

/// [`grouped_matmul`] writing `output`: with [`GroupedOutput::SiluMul`], the gate/up pass of
/// `experts` (each `[2 * inter, k]`: gate rows, then up rows) with SiLU-and-multiply fused,
/// `out[slots, inter]`, bitwise [`grouped_matmul`] followed by the `silu_mul_f32` kernel,
/// without their `[slots, 2 * inter]` intermediate.
pub(crate) fn grouped_fp8(
    ctx: &GpuContext,
    experts: &[&DeviceFp8Matrix],
    x: &CudaSlice<f32>,
    tiles: &GroupedRowTiles,
    out: &mut CudaSlice<f32>,
    output: GroupedOutput,
) -> Result<(), GpuError> {
    if experts.is_empty() {
        return Ok(());
    }
    let weights = GroupedWeights::fp8(ctx, experts)?;
    let tiles = UploadedTiles::upload(ctx, tiles)?;
    // SAFETY: `experts` keeps the weights alive while the work is queued on this stream.
    unsafe { weights.launch(ctx, x, &tiles.tables(), out, output) }
}

/// A block per `TILE_N` outputs x `TILE_ROWS` rows, 256 threads.
fn launch_shape(rows: usize, n: usize) -> Result<LaunchConfig, GpuError> {
    let row_tiles = rows.div_ceil(TILE_ROWS);
    if row_tiles > 65_535 {
        return Err(GpuError::Shape(format!(
            "{rows} rows exceed an FP8 GEMM's grid"
        )));
    }
    Ok(LaunchConfig {
        grid_dim: (n.div_ceil(TILE_N) as u32, row_tiles as u32, 1),
        block_dim: ((TILE_N * TILE_ROWS) as u32, 1, 1),
        shared_mem_bytes: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::fp8::e4m3_to_f32;
    use crate::backend::weight::Fp8Matrix;
    use crate::backend::{NativeWeight, PackedMatrix};
    use crate::device::GpuDtype;
    use crate::test_support::{fp8_matrix, pseudo_random};

    /// The kernel's widening (`e4m3_to_f32` in kernels.cu), step for step on the host: every
    /// finite byte gives the host table's value, signed zeros included.
    #[test]
    fn the_kernels_e4m3_widening_is_exact() {
        for b in (0..=255u8).filter(|b| b & 0x7f != 0x7f) {
            let sign = (u32::from(b) & 0x80) << 24;
            let exponent = (u32::from(b) >> 3) & 0xf;
            let mantissa = u32::from(b) & 0x7;
            let magnitude = if exponent == 0 {
                mantissa as f32 * 0.001953125
            } else {
                f32::from_bits(((exponent + 120) << 23) | (mantissa << 20))
            };
            let kernel = f32::from_bits(magnitude.to_bits() | sign);
            assert_eq!(kernel.to_bits(), e4m3_to_f32(b).to_bits(), "byte {b:#04x}");
        }
    }

    /// A synthetic checkpoint's FP8 weights generated on the device (two parts stacked, as an
    /// expert's gate and up; partial 128-blocks both ways) are bitwise the bytes and scales the
    /// checkpoint gives on the host, uploaded; only code tensors of a synthetic checkpoint are
    /// generated.
    #[test]
    fn generated_fp8_weights_are_the_checkpoints_bytes() {
        use crate::checkpoint::synthetic::{Init, SyntheticWeights};
        use crate::checkpoint::{Checkpoint, Dtype};
        let Some(ctx) = crate::test_support::test_context(GpuDtype::F32) else {
            return;
        };
        let (rows, cols) = (200, 300);
        let mut specs = Vec::new();
        for name in ["a.weight", "b.weight"] {
            let codes = (
                name.to_string(),
                vec![rows, cols],
                Dtype::F8E4M3,
                Init::Fp8Codes,
            );
            let scales = Init::Fp8Scales {
                gain: 1.0,
                fan_in: cols,
            };
            let blocks = vec![rows.div_ceil(128), cols.div_ceil(128)];
            specs.push(codes);
            specs.push((format!("{name}_scale_inv"), blocks, Dtype::F32, scales));
        }
        let dir = std::path::Path::new("/nonexistent/synthetic-fp8");
        let ckpt = Checkpoint::synthetic(dir, SyntheticWeights::new(5, specs));
        let generated = |name: &str| ckpt.generated_fp8(name, &[rows, cols]).unwrap().unwrap();
        let ((ka, a), (kb, b)) = (generated("a.weight"), generated("b.weight"));
        assert!(
            a.values.is_empty() && b.values.is_empty(),
            "no codes on the host"
        );
        assert_ne!(ka, kb);
        let on_device = DeviceFp8Matrix::generated(&ctx, &[(ka, &a), (kb, &b)]).unwrap();
        let host = |name: &str| match ckpt.load_native(name, &[rows, cols]).unwrap() {
            NativeWeight::Fp8(m) => m,
            _ => panic!("an FP8 weight"),
        };
        let stacked = Fp8Matrix::stacked(&[&host("a.weight"), &host("b.weight")]).unwrap();
        let uploaded = DeviceFp8Matrix::upload(&ctx, &stacked).unwrap();
        let stream = ctx.stream();
        let bytes = |m: &DeviceFp8Matrix| stream.clone_dtoh(&m.values).unwrap();
        let scales = |m: &DeviceFp8Matrix| stream.clone_dtoh(&m.scales).unwrap();
        assert_eq!(bytes(&on_device), bytes(&uploaded), "codes");
        assert_eq!(scales(&on_device), scales(&uploaded), "scales");
        assert_eq!(
            (on_device.n, on_device.k, &on_device.host_starts),
            (uploaded.n, uploaded.k, &uploaded.host_starts)
        );
        assert!(ckpt
            .generated_fp8("a.weight_scale_inv", &[2, 3])
            .unwrap()
            .is_none());
        assert!(ckpt
            .generated_fp8("a.weight", &[cols, rows])
            .unwrap()
            .is_none());
    }

    #[test]
    fn the_launch_covers_every_output() {
        let c = launch_shape(37, 200).unwrap();
        assert_eq!(c.grid_dim, (7, 5, 1));
        assert_eq!(c.block_dim, (256, 1, 1));
        assert_eq!(launch_shape(1, 1).unwrap().grid_dim, (1, 1, 1));
        assert!(launch_shape(8 * 65_536, 32).is_err());
    }

    /// Three experts in one launch (runs of 5, 0 and 13 slots): each slot's output is bitwise
    /// its expert's CPU GEMM over that expert's rows alone. Needs a GPU.
    #[test]
    fn a_grouped_fp8_gemm_is_bitwise_each_experts_cpu_gemm() {
        let Some(ctx) = crate::test_support::test_context(GpuDtype::F32) else {
            return;
        };
        let _serial = ctx.lock().unwrap();
        let (n, k) = (72, 260);
        let matrices: Vec<Fp8Matrix> = (0..3)
            .map(|e| fp8_matrix(n, k, (128, 128), 40 + e))
            .collect();
        let device: Vec<DeviceFp8Matrix> = matrices
            .iter()
            .map(|m| DeviceFp8Matrix::upload(&ctx, m).unwrap())
            .collect();
        let runs = crate::test_support::expert_runs(&[5, 0, 13]);
        let slots: usize = runs.iter().map(|r| r.len).sum();
        let tiles = GroupedRowTiles::plan(&runs, TILE_ROWS).unwrap();
        let x = pseudo_random(slots * k, 50);
        let stream = ctx.stream();
        let x_dev = stream.clone_htod(&x).unwrap();
        let mut out = stream.alloc_zeros::<f32>(slots * n).unwrap();
        let experts: Vec<&DeviceFp8Matrix> = device.iter().collect();
        grouped_matmul(&ctx, &experts, &x_dev, &tiles, &mut out).unwrap();
        let got = stream.clone_dtoh(&out).unwrap();
        ctx.synchronize().unwrap();
        for (run, matrix) in runs.iter().zip(&matrices) {
            let host = PackedMatrix::from_native(&[&NativeWeight::Fp8(matrix.clone())], k);
            let rows = &x[run.start * k..(run.start + run.len) * k];
            let want = host.matmul(rows, run.len);
            let got = &got[run.start * n..(run.start + run.len) * n];
            assert!(
                got.iter()
                    .zip(&want)
                    .all(|(g, w)| g.to_bits() == w.to_bits()),
                "expert {}: {got:?} vs {want:?}",
                run.expert
            );
        }
    }

    /// The device product is bitwise the CPU GEMM's, for one row, a row tile and a batch, on
    /// partial tiles and 128-blocks, and on a transposed MLA slice whose segments start
    /// mid-block. Needs a GPU (skipped without one; `MOE_REQUIRE_GPU=1` fails instead).
    #[test]
    fn the_fp8_device_gemm_is_bitwise_the_cpu_gemm() {
        let Some(ctx) = crate::test_support::test_context(GpuDtype::F32) else {
            return;
        };
        let _serial = ctx.lock().unwrap();
        let kv_b = NativeWeight::Fp8(fp8_matrix(384, 48, (128, 128), 26));
        let NativeWeight::Fp8(slice) = kv_b.transposed_rows(96, 192, 48) else {
            panic!("an FP8 slice stays FP8")
        };
        for matrix in [
            fp8_matrix(200, 300, (128, 128), 21),
            fp8_matrix(33, 129, (128, 128), 23),
            slice,
        ] {
            let (n, k) = (matrix.rows, matrix.cols);
            let device = DeviceFp8Matrix::upload(&ctx, &matrix).unwrap();
            assert!(
                device.bytes() < n * k * 2,
                "{} bytes for [{n}, {k}]",
                device.bytes()
            );
            let host = PackedMatrix::from_native(&[&NativeWeight::Fp8(matrix)], k);
            for rows in [1usize, 8, 37] {
                let x = pseudo_random(rows * k, 7 + rows as u64);
                let stream = ctx.stream();
                let x_dev = stream.clone_htod(&x).unwrap();
                let mut out = stream.alloc_zeros::<f32>(rows * n).unwrap();
                device.matmul(&ctx, &x_dev, rows, &mut out).unwrap();
                let got = stream.clone_dtoh(&out).unwrap();
                ctx.synchronize().unwrap();
                let want = host.matmul(&x, rows);
                let mismatch = got
                    .iter()
                    .zip(&want)
                    .position(|(g, w)| g.to_bits() != w.to_bits());
                assert_eq!(
                    mismatch, None,
                    "[{n}, {k}] x {rows} rows: {got:?} vs {want:?}"
                );
            }
        }
    }

    /// Three heads' FP8 matrices stacked and run as one strided-batched product (MLA's
    /// absorption shape: rows of x a head apart, outputs a head apart): each head's outputs
    /// bitwise its own matrix's CPU GEMM. Needs a GPU.
    #[test]
    fn stacked_fp8_heads_in_one_batched_launch_are_bitwise_each_heads_cpu_gemm() {
        let Some(ctx) = crate::test_support::test_context(GpuDtype::F32) else {
            return;
        };
        let _serial = ctx.lock().unwrap();
        let (heads, rows, n, k, pad) = (3usize, 9, 40, 150, 6);
        let matrices: Vec<Fp8Matrix> = (0..heads)
            .map(|h| fp8_matrix(n, k, (128, 128), 60 + h as u64))
            .collect();
        let stacked = DeviceFp8Matrix::upload_heads(&ctx, &matrices).unwrap();
        let s = StridedGemm::per_head(
            rows,
            heads,
            n,
            k,
            (heads * (k + pad), k + pad),
            (heads * n, n),
        );
        let (_, x_end, out_end) = s.extents();
        let x = pseudo_random(x_end, 61);
        let stream = ctx.stream();
        let x_dev = stream.clone_htod(&x).unwrap();
        let mut out = stream.alloc_zeros::<f32>(out_end).unwrap();
        stacked
            .strided_matmul(&ctx, &s, (&x_dev, 0), (&mut out, 0))
            .unwrap();
        let got = stream.clone_dtoh(&out).unwrap();
        for (h, matrix) in matrices.iter().enumerate() {
            let host = PackedMatrix::from_native(&[&NativeWeight::Fp8(matrix.clone())], k);
            let rows_of_head: Vec<f32> = (0..rows)
                .flat_map(|r| {
                    let at = r * heads * (k + pad) + h * (k + pad);
                    x[at..at + k].to_vec()
                })
                .collect();
            let want = host.matmul(&rows_of_head, rows);
            for r in 0..rows {
                let at = r * heads * n + h * n;
                let same = got[at..at + n]
                    .iter()
                    .zip(&want[r * n..(r + 1) * n])
                    .all(|(g, w)| g.to_bits() == w.to_bits());
                assert!(same, "head {h}, row {r}");
            }
        }
    }
}
