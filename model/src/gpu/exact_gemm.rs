//! `--deterministic` on a GPU (the arguments' definition: [`crate::device::row_gemm`]): GEMMs whose result for a row does not depend on the rows
//! computed with it. cuBLAS picks its algorithm (tile shape, split of k) by problem size, so a
//! token's logits change with its batch-mates; these kernels (`gemm_rows_exact_f32`,
//! `gemm_rows_exact_bf16` and their grouped forms in kernels.cu) run the CPU GEMM's chain
//! instead: f32 inputs, each held weight widened exactly, one fused multiply-add per k in
//! ascending order from zero, no split of k whatever the row count. So each product is
//! bitwise the CPU's, alone or in any batch. They run on CUDA cores (the tiles of the FP8
//! kernel, `gpu::fp8_gemm`), not tensor cores: what that costs is measured by
//! `ops/gpu-check.sh`, not assumed.

use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};

use super::buffer::{check_gemm_bounds, GpuBuffer};
use super::context::GpuContext;
use super::error::GpuError;
use super::grouped_launch::{GroupedOutput, FP8_TILE_ROWS};
use super::grouped_launch::{GroupedWeights, UploadedTiles};
use super::kernels::as_int;
use crate::device::grouped_tiles::GroupedRowTiles;
use crate::device::row_gemm::RowGemm;
use crate::device::shapes::StridedGemm;

/// Outputs per block (`FP8_TILE_N` in kernels.cu); rows per block are [`FP8_TILE_ROWS`].
const TILE_N: usize = 32;

/// The most row tiles or batches a launch's grid holds (y and z dimensions).
const GRID_LIMIT: usize = 65_535;

/// One strided-batched GEMM of the form every dense-part GEMM has (cuBLAS's A the weights,
/// transposed; B the activations): in row terms `out_b[r, j] = Σ_k x_b[r, k] · w_b[j, k]`,
/// with `x` = B (f32), `w` = A (f32 or bf16), `out` = C, from their offsets.
pub fn strided(
    ctx: &GpuContext,
    s: &StridedGemm,
    (a, a_offset): (&GpuBuffer, usize),
    (b, b_offset): (&GpuBuffer, usize),
    (c, c_offset): (&mut CudaSlice<f32>, usize),
) -> Result<(), GpuError> {
    let Some(row) = RowGemm::from_strided(s) else {
        return Err(GpuError::Shape(format!(
            "an exact GEMM takes weights transposed and activations as they are: {s:?}"
        )));
    };
    check_gemm_bounds(s, s.extents(), (a, a_offset), (b, b_offset), (c, c_offset))?;
    let GpuBuffer::F32(x) = b else {
        return Err(GpuError::Shape(
            "an exact GEMM takes f32 activations".into(),
        ));
    };
    if row.rows == 0 || row.n == 0 || row.batch == 0 {
        return Ok(());
    }
    let row_tiles = row.rows.div_ceil(FP8_TILE_ROWS);
    if row_tiles > GRID_LIMIT || row.batch > GRID_LIMIT {
        return Err(GpuError::Shape(format!(
            "{} rows in {} batches exceed an exact GEMM's grid",
            row.rows, row.batch
        )));
    }
    let config = LaunchConfig {
        grid_dim: (
            row.n.div_ceil(TILE_N) as u32,
            row_tiles as u32,
            row.batch as u32,
        ),
        block_dim: ((TILE_N * FP8_TILE_ROWS) as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    let wide = |v: usize| v as i64;
    let (x_stride, x_batch) = (wide(row.x_stride), wide(row.x_batch));
    let (w_stride, w_batch) = (wide(row.w_stride), wide(row.w_batch));
    let (out_stride, out_batch) = (wide(row.out_stride), wide(row.out_batch));
    let rows_i = as_int(row.rows, "rows")?;
    let (n_i, k_i) = (as_int(row.n, "outputs")?, as_int(row.k, "k")?);
    let stream = ctx.stream();
    let kernels = ctx.kernels();
    let x_at = x.device_ptr(stream).0 + b_offset as u64 * 4;
    let out_at = c.device_ptr_mut(stream).0 + c_offset as u64 * 4;
    let (function, w_at) = match a {
        GpuBuffer::F32(w) => (
            &kernels.gemm_rows_exact_f32,
            w.device_ptr(stream).0 + a_offset as u64 * 4,
        ),
        GpuBuffer::Bf16(w) => (
            &kernels.gemm_rows_exact_bf16,
            w.device_ptr(stream).0 + a_offset as u64 * 2,
        ),
        GpuBuffer::Bf16Pair { .. } | GpuBuffer::Fp8(_) => {
            return Err(GpuError::Shape(
                "an exact GEMM's weights are f32 or bf16 (FP8 has its own kernel)".into(),
            ))
        }
    };
    // SAFETY: every element a batch's tiles read or write lies within the extents checked
    // against the live buffers above; the buffers outlive the work queued on this stream,
    // where they are used.
    unsafe {
        stream
            .launch_builder(function)
            .arg(&x_at)
            .arg(&x_stride)
            .arg(&x_batch)
            .arg(&w_at)
            .arg(&w_stride)
            .arg(&w_batch)
            .arg(&out_at)
            .arg(&out_stride)
            .arg(&out_batch)
            .arg(&rows_i)
            .arg(&n_i)
            .arg(&k_i)
            .launch(config)?;
    }
    Ok(())
}

/// `out[slots, n]`: each run of `tiles` (one per expert, slots in expert order) times its
/// expert's `[n, k]` matrix (`experts[i]` serving run i, all f32 or all bf16), in one launch;
/// a slot's result is bitwise its expert's CPU GEMM whatever the other runs.
pub fn grouped(
    ctx: &GpuContext,
    experts: &[&GpuBuffer],
    (n, k): (usize, usize),
    x: &CudaSlice<f32>,
    tiles: &GroupedRowTiles,
    out: &mut CudaSlice<f32>,
) -> Result<(), GpuError> {
    grouped_writing(ctx, experts, (n, k), x, tiles, out, GroupedOutput::Products)
}

/// [`grouped`] writing `output`: each weight row's products, or the gate/up pass with
/// SiLU-and-multiply fused (experts `[2 * inter, k]`, gate rows then up rows; `out` is
/// `[slots, inter]`), bitwise [`grouped`] followed by `silu_mul_f32`.
pub(crate) fn grouped_writing(
    ctx: &GpuContext,
    experts: &[&GpuBuffer],
    (n, k): (usize, usize),
    x: &CudaSlice<f32>,
    tiles: &GroupedRowTiles,
    out: &mut CudaSlice<f32>,
    output: GroupedOutput,
) -> Result<(), GpuError> {
    if experts.is_empty() {
        return Ok(());
    }
    let weights = GroupedWeights::exact(ctx, experts, (n, k))?;
    let tiles = UploadedTiles::upload(ctx, tiles)?;
    // SAFETY: `experts` keeps the weights alive while the work is queued on this stream.
    unsafe { weights.launch(ctx, x, &tiles.tables(), out, output) }
}

/// The kernels against their host definition ([`RowGemm::run_host`]) and the CPU GEMM, bit
/// for bit. They need a GPU: without one they pass with a `SKIPPED` line, unless
/// `MOE_REQUIRE_GPU=1`.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::PackedMatrix;
    use crate::device::GpuDtype;
    use crate::test_support::pseudo_random;

    fn bf16_rounded(values: &[f32]) -> Vec<f32> {
        values
            .iter()
            .map(|&v| half::bf16::from_f32(v).to_f32())
            .collect()
    }

    /// A batched product with wider row strides, batch strides and offsets (MLA's absorption
    /// shape), over f32 and over bf16 weights: bitwise the host definition.
    #[test]
    fn a_strided_exact_gemm_is_bitwise_its_host_definition() {
        let Some(ctx) = crate::test_support::test_context(GpuDtype::F32) else {
            return;
        };
        let _serial = ctx.lock().unwrap();
        let (rows, heads, nope, rope, lora) = (11usize, 3, 20, 6, 70);
        let s = StridedGemm::per_head(
            rows,
            heads,
            lora,
            nope,
            (heads * (nope + rope), nope + rope),
            (heads * (lora + rope), lora + rope),
        );
        let (a_end, b_end, c_end) = s.extents();
        let (a_off, b_off, c_off) = (5, 7, 3);
        let x = pseudo_random(b_off + b_end, 21);
        let stream = ctx.stream();
        for bf16 in [false, true] {
            let mut w = pseudo_random(a_off + a_end, 22);
            if bf16 {
                w = bf16_rounded(&w);
            }
            let a = GpuBuffer::upload_as(&ctx, &w, bf16).unwrap();
            let b = GpuBuffer::F32(stream.clone_htod(&x).unwrap());
            let mut c = stream.alloc_zeros::<f32>(c_off + c_end).unwrap();
            strided(&ctx, &s, (&a, a_off), (&b, b_off), (&mut c, c_off)).unwrap();
            let got = stream.clone_dtoh(&c).unwrap();
            let mut want = vec![0.0f32; c_off + c_end];
            let row = RowGemm::from_strided(&s).unwrap();
            row.run_host(&x[b_off..], &w[a_off..], &mut want[c_off..]);
            let same = got
                .iter()
                .zip(&want)
                .all(|(g, w)| g.to_bits() == w.to_bits());
            assert!(same, "bf16 weights: {bf16}");
        }
    }

    /// Three f32 experts in one grouped launch (runs of 5, 0 and 13 slots), then three bf16
    /// ones: each slot's output bitwise its expert's CPU GEMM over that expert's rows alone.
    #[test]
    fn a_grouped_exact_gemm_is_bitwise_each_experts_cpu_gemm() {
        let Some(ctx) = crate::test_support::test_context(GpuDtype::F32) else {
            return;
        };
        let _serial = ctx.lock().unwrap();
        let (n, k) = (72usize, 260);
        let runs = crate::test_support::expert_runs(&[5, 0, 13]);
        let slots: usize = runs.iter().map(|r| r.len).sum();
        let tiles = GroupedRowTiles::plan(&runs, FP8_TILE_ROWS).unwrap();
        let x = pseudo_random(slots * k, 30);
        let stream = ctx.stream();
        let x_dev = stream.clone_htod(&x).unwrap();
        for bf16 in [false, true] {
            let weights: Vec<Vec<f32>> = (0..3)
                .map(|e| pseudo_random(n * k, 31 + e))
                .map(|w| if bf16 { bf16_rounded(&w) } else { w })
                .collect();
            let device: Vec<GpuBuffer> = weights
                .iter()
                .map(|w| GpuBuffer::upload_as(&ctx, w, bf16).unwrap())
                .collect();
            let experts: Vec<&GpuBuffer> = device.iter().collect();
            let mut out = stream.alloc_zeros::<f32>(slots * n).unwrap();
            grouped(&ctx, &experts, (n, k), &x_dev, &tiles, &mut out).unwrap();
            let got = stream.clone_dtoh(&out).unwrap();
            for (run, w) in runs.iter().zip(&weights) {
                let want = PackedMatrix::from_rows(w, n, k)
                    .matmul(&x[run.start * k..(run.start + run.len) * k], run.len);
                let got = &got[run.start * n..(run.start + run.len) * n];
                let same = got
                    .iter()
                    .zip(&want)
                    .all(|(g, w)| g.to_bits() == w.to_bits());
                assert!(same, "expert {} (bf16 weights: {bf16})", run.expert);
            }
        }
    }
}
