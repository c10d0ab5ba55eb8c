//! Experts on the tensor cores (`--gpu-expert-gemm tensor-cores`): every expert of a pass in
//! one launch of our own `mma.sync` kernel (`tensor_core_grouped_*` in kernels.cu), over the
//! row tiles every grouped launch shares ([`TileTables`]: planned on the host and uploaded,
//! or by `plan_routes` on the device, so the pass can be part of a decode step's CUDA graph),
//! reading the bf16 or bf16x2 activations where they lie. The weights are bf16, or FP8 kept
//! as FP8: each byte widened to bf16 in registers (exact), each scale block's products
//! summed apart and added in times its scale.
//!
//! Each output is one accumulation over k ascending, whatever the other rows: a token's
//! result does not depend on its batch-mates (unlike cuBLAS, which picks its algorithm by the
//! row count), though it is not the CPU's chain (bf16 products, the tensor core's sums), so
//! `--deterministic` keeps its exact kernels. The gate/up pass fuses SiLU-and-multiply and
//! writes the down pass's activations directly.

use cudarc::driver::{CudaSlice, DevicePtrMut, LaunchConfig, PushKernelArg};

use super::buffer::{ActForm, GpuBuffer};
use super::context::GpuContext;
use super::error::GpuError;
use super::fp8_matrix::DeviceFp8Matrix;
use super::grouped_launch::{Fp8ScaleTables, SingleFp8Scales, TileTables};
use super::kernels::as_int;
use crate::device::row_gemm::RowGemm;
use crate::device::shapes::StridedGemm;
use crate::device::GpuDtype;

/// Outputs per block (`TC_TILE_N` in kernels.cu: 8 warps of 16).
const TILE_N: usize = 128;
/// Threads per block (`TC_WARPS * 32`).
const THREADS: u32 = 256;
/// Rows per tile (`TC_TILE_ROWS`: four of the mma's 8-row N blocks sharing each weight
/// fragment, so the weights are read once per 32 rows of an expert).
pub(crate) const TC_TILE_ROWS: usize = 32;
/// Columns of k per step (`TC_K_STEP`: two mmas); FP8 scale segments must start on a step.
const TC_K_STEP: i32 = 32;

/// Where a grouped pass writes.
pub(crate) enum PassOutput<'a> {
    /// Each weight row's products: f32 `[slots, n]`.
    Products(&'a mut CudaSlice<f32>),
    /// The gate/up pass (weights `[2 * inter, k]`: gate rows, then up rows) with SiLU-and-
    /// multiply fused: `[slots, inter]` in the input's form (bf16, or bf16x2 from bf16x2), the
    /// values `silu_mul_bf16` (`silu_mul_bf16x2`) would write from the unfused products.
    SiluMul(&'a mut GpuBuffer),
}

/// Whether the context runs `weights` on the tensor cores: bf16 matrices, and FP8 ones (one
/// matrix, segments on the kernel's 32-column steps) outside the `f32` mode, whenever it runs
/// experts there.
pub(crate) fn tensor_cores_take(ctx: &GpuContext, weights: &GpuBuffer) -> bool {
    ctx.tensor_core_experts()
        && match weights {
            GpuBuffer::Bf16(_) => true,
            GpuBuffer::Fp8(m) => {
                ctx.dtype() != GpuDtype::F32
                    && m.groups_with(m)
                    && m.segment_starts().iter().all(|&s| s % TC_K_STEP == 0)
            }
            GpuBuffer::F32(_) | GpuBuffer::Bf16Pair { .. } => false,
        }
}

/// Here, beside the kernel whose choice decides it.
impl ActForm {
    /// The activations GEMMs against `weights` take in the context's mode.
    pub fn for_weights(ctx: &GpuContext, weights: &GpuBuffer) -> Self {
        let tensor_cores = tensor_cores_take(ctx, weights);
        match weights {
            // The FP8 kernel and the exact ones take f32 activations, whatever the mode; the
            // tensor-core kernel the mode's bf16 or bf16x2, over FP8 weights too.
            _ if ctx.deterministic() => ActForm::F32,
            GpuBuffer::Fp8(_) if tensor_cores && ctx.dtype() == GpuDtype::Bf16x2 => {
                ActForm::Bf16Pair
            }
            GpuBuffer::Fp8(_) if tensor_cores => ActForm::Bf16,
            GpuBuffer::F32(_) | GpuBuffer::Fp8(_) => ActForm::F32,
            _ if ctx.dtype() == GpuDtype::Bf16x2 => ActForm::Bf16Pair,
            _ => ActForm::Bf16,
        }
    }
}

/// Whether the context runs FP8 experts whose scale blocks are `block_cols` wide on the tensor
/// cores (as [`tensor_cores_take`] will decide once they are loaded).
pub(crate) fn tensor_cores_take_fp8_blocks(ctx: &GpuContext, block_cols: usize) -> bool {
    ctx.tensor_core_experts()
        && ctx.dtype() != GpuDtype::F32
        && block_cols > 0
        && block_cols.is_multiple_of(TC_K_STEP as usize)
}

/// How the kernel reads each run's weights.
enum WeightForm {
    Bf16,
    /// e4m3 bytes with their scales.
    Fp8(Fp8ScaleTables),
}

/// The experts of a tensor-core launch, run `e`'s `[n, k]` row-major weights (bf16, or FP8
/// with its scales) at `weights[e]`. Holds addresses, not the experts: whoever launches keeps
/// them alive.
pub(crate) struct TensorCoreWeights {
    weights: CudaSlice<u64>,
    form: WeightForm,
    runs: usize,
    n: usize,
    k: usize,
}

impl TensorCoreWeights {
    /// `None` unless the context runs these experts on the tensor cores
    /// ([`tensor_cores_take`]) and they are all bf16 matrices of at least `[n, k]`, or all FP8
    /// matrices of exactly `[n, k]` on the same segments.
    pub fn of(
        ctx: &GpuContext,
        experts: &[&GpuBuffer],
        (n, k): (usize, usize),
    ) -> Result<Option<Self>, GpuError> {
        let Some(first) = experts.first() else {
            return Ok(None);
        };
        if !experts.iter().all(|e| tensor_cores_take(ctx, e)) {
            return Ok(None);
        }
        let stream = ctx.stream();
        let form = match first {
            GpuBuffer::Fp8(lead) => {
                let matrices: Option<Vec<_>> = experts
                    .iter()
                    .map(|e| match e {
                        GpuBuffer::Fp8(m) if m.groups_with(lead) => Some(m),
                        _ => None,
                    })
                    .collect();
                let Some(matrices) = matrices else {
                    return Ok(None);
                };
                if (lead.rows(), lead.cols()) != (n, k) {
                    return Ok(None);
                }
                let matrices: Vec<&DeviceFp8Matrix> = matrices.into_iter().map(|m| &**m).collect();
                WeightForm::Fp8(Fp8ScaleTables::of(ctx, &matrices)?)
            }
            _ => {
                let bf16 = |e: &&GpuBuffer| matches!(e, GpuBuffer::Bf16(_)) && e.len() >= n * k;
                if !experts.iter().all(bf16) {
                    return Ok(None);
                }
                WeightForm::Bf16
            }
        };
        let weights: Vec<u64> = experts
            .iter()
            .map(|e| match e {
                GpuBuffer::Fp8(m) => m.values_address(stream),
                other => other.address(stream, 0),
            })
            .collect();
        Ok(Some(Self {
            weights: stream.clone_htod(&weights)?,
            form,
            runs: experts.len(),
            n,
            k,
        }))
    }

    /// Runs the pass over `x` (`[slots, k]`, bf16 or bf16x2) and the tiles' runs, writing
    /// `output`.
    ///
    /// # Safety
    /// The experts these weights were made from are alive until the launch has run.
    pub unsafe fn launch(
        &self,
        ctx: &GpuContext,
        x: &GpuBuffer,
        tiles: &TileTables<'_>,
        output: PassOutput<'_>,
    ) -> Result<(), GpuError> {
        let (n, k, slots) = (self.n, self.k, tiles.slots);
        let (x_hi, x_lo) = match x {
            GpuBuffer::Bf16(hi) => (hi, None),
            GpuBuffer::Bf16Pair { hi, lo } => (hi, Some(lo)),
            _ => {
                return Err(GpuError::Shape(
                    "the tensor-core pass takes bf16 or bf16x2 activations".into(),
                ))
            }
        };
        let width = match &output {
            PassOutput::Products(_) => n,
            PassOutput::SiluMul(_) if n.is_multiple_of(2) => n / 2,
            PassOutput::SiluMul(_) => {
                return Err(GpuError::Shape(format!(
                    "a fused gate/up pass over {n} weight rows (not gate and up halves)"
                )))
            }
        };
        let out_len = match &output {
            PassOutput::Products(out) => out.len(),
            PassOutput::SiluMul(act) => match (x, &**act) {
                (GpuBuffer::Bf16(_), GpuBuffer::Bf16(a)) => a.len(),
                (GpuBuffer::Bf16Pair { .. }, GpuBuffer::Bf16Pair { hi, lo }) => {
                    hi.len().min(lo.len())
                }
                _ => 0,
            },
        };
        let x_len = x_hi.len().min(x_lo.map_or(usize::MAX, |lo| lo.len()));
        if tiles.runs != self.runs || x_len < slots * k || out_len < slots * width {
            return Err(GpuError::Shape(format!(
                "a tensor-core pass of {} experts [{n}, {k}] over {} runs of {slots} slots, \
                 {x_len} input and {out_len} output values (activations in the input's form)",
                self.runs, tiles.runs
            )));
        }
        let grid_tiles = tiles.grid_tiles(TC_TILE_ROWS)?;
        if grid_tiles == 0 || width == 0 {
            return Ok(());
        }
        let config = LaunchConfig {
            grid_dim: (width.div_ceil(TILE_N) as u32, grid_tiles, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let (x_stride, out_stride) = (k as i64, width as i64);
        let runs = as_int(self.runs, "experts")?;
        let (width_i, k_i) = (as_int(width, "outputs")?, as_int(k, "k")?);
        let null: u64 = 0;
        let kernels = ctx.kernels();
        let stream = ctx.stream();
        let silu = matches!(output, PassOutput::SiluMul(_));
        let function = match (&self.form, silu) {
            (WeightForm::Bf16, false) => &kernels.tensor_core_grouped_gemm_rows,
            (WeightForm::Bf16, true) => &kernels.tensor_core_grouped_gate_up_silu,
            (WeightForm::Fp8(_), false) => &kernels.tensor_core_grouped_gemm_rows_fp8,
            (WeightForm::Fp8(_), true) => &kernels.tensor_core_grouped_gate_up_silu_fp8,
        };
        let mut builder = stream.launch_builder(function);
        builder.arg(x_hi);
        match x_lo {
            Some(lo) => builder.arg(lo),
            None => builder.arg(&null),
        };
        builder.arg(&x_stride);
        builder.arg(&self.weights);
        if let WeightForm::Fp8(scales) = &self.form {
            scales.push(&mut builder);
        }
        match output {
            PassOutput::Products(out) => {
                builder.arg(out);
            }
            PassOutput::SiluMul(GpuBuffer::Bf16(act)) => {
                builder.arg(act).arg(&null);
            }
            PassOutput::SiluMul(GpuBuffer::Bf16Pair { hi, lo }) => {
                builder.arg(hi).arg(lo);
            }
            PassOutput::SiluMul(_) => {
                return Err(GpuError::Shape("activations are bf16 or bf16x2".into()))
            }
        }
        builder.arg(&out_stride);
        tiles.push(&mut builder);
        builder.arg(&runs).arg(&width_i).arg(&k_i);
        // SAFETY: every tile's rows lie within `slots` rows of x and the output (the tables'
        // contract, checked above against the buffers), each run's weights are a live bf16
        // [n, k] matrix, or FP8 with its scales on the shared segments (the caller's
        // contract), the tables have `runs` (+ 1) entries, and a null x_lo / act_lo is what
        // the kernel takes for single bf16 activations.
        unsafe { builder.launch(config)? };
        Ok(())
    }
}

/// `out[rows, n] = x[rows, k] Wᵀ` for one FP8 matrix kept as FP8 (a dense projection) on the
/// tensor cores, where [`tensor_cores_take`] it: x rounded to the mode's bf16 (or bf16x2)
/// terms first, as cuBLAS's inputs are in those modes, then tiles of [`TC_TILE_ROWS`] rows.
pub(crate) fn fp8_linear(
    ctx: &GpuContext,
    weights: &DeviceFp8Matrix,
    x: &CudaSlice<f32>,
    rows: usize,
    out: &mut CudaSlice<f32>,
) -> Result<(), GpuError> {
    let (n, k) = (weights.rows(), weights.cols());
    if x.len() < rows * k || out.len() < rows * n {
        return Err(GpuError::Shape(format!(
            "an FP8 linear [{n}, {k}] over {rows} rows from {} input into {} output values",
            x.len(),
            out.len()
        )));
    }
    let row = RowGemm {
        rows,
        n,
        k,
        batch: 1,
        x_stride: k,
        x_batch: 0,
        w_stride: k,
        w_batch: n * k,
        out_stride: n,
        out_batch: 0,
    };
    fp8_rows(ctx, weights, &row, (x, 0), (out, 0))
}

/// Whether the context runs the per-head FP8 matrices `heads` (MLA's absorbed `kv_b` halves,
/// stacked) on the tensor cores: as [`tensor_cores_take`] a single FP8 matrix.
pub(crate) fn tensor_cores_take_heads(ctx: &GpuContext, heads: &DeviceFp8Matrix) -> bool {
    ctx.tensor_core_experts()
        && ctx.dtype() != GpuDtype::F32
        && heads.segment_starts().iter().all(|&s| s % TC_K_STEP == 0)
}

/// A strided-batched GEMM over per-head FP8 matrices (`s` as [`RowGemm::from_strided`] reads
/// it: head b's rows of x from `x_offset + b * x_batch` against the b-th stacked matrix,
/// into `out` from `out_offset + b * out_batch`) on the tensor cores, where
/// [`tensor_cores_take_heads`]: the rows rounded to the mode's terms first, as in
/// [`fp8_linear`], then one launch over every head. Each head's outputs are what
/// [`fp8_linear`] gives for that head alone, bit for bit.
pub(crate) fn fp8_strided(
    ctx: &GpuContext,
    weights: &DeviceFp8Matrix,
    s: &StridedGemm,
    x: (&CudaSlice<f32>, usize),
    out: (&mut CudaSlice<f32>, usize),
) -> Result<(), GpuError> {
    let (n, k) = (weights.rows(), weights.cols());
    let row = RowGemm::from_strided(s).filter(|r| {
        r.n == n
            && r.k == k
            && r.w_stride == k
            && (r.batch <= 1 || (r.w_batch == n * k && r.batch <= weights.heads()))
    });
    let Some(row) = row else {
        return Err(GpuError::Shape(format!(
            "an FP8 GEMM {s:?} over {} stacked [{n}, {k}] matrices",
            weights.heads()
        )));
    };
    fp8_rows(ctx, weights, &row, x, out)
}

/// The values of x a row GEMM reads from its first: its last batch's last row's end.
fn row_gemm_input_len(row: &RowGemm) -> usize {
    if row.rows == 0 || row.batch == 0 {
        return 0;
    }
    (row.batch - 1) * row.x_batch + (row.rows - 1) * row.x_stride + row.k
}

/// The values of out a row GEMM writes from its first.
fn row_gemm_output_len(row: &RowGemm) -> usize {
    if row.rows == 0 || row.batch == 0 {
        return 0;
    }
    (row.batch - 1) * row.out_batch + (row.rows - 1) * row.out_stride + row.n
}

/// [`fp8_linear`] and [`fp8_strided`]: `row` over `weights` (n, k and the heads checked by
/// the callers), x and out from their offsets.
fn fp8_rows(
    ctx: &GpuContext,
    weights: &DeviceFp8Matrix,
    row: &RowGemm,
    (x, x_offset): (&CudaSlice<f32>, usize),
    (out, out_offset): (&mut CudaSlice<f32>, usize),
) -> Result<(), GpuError> {
    let (rows, n, k) = (row.rows, row.n, row.k);
    let (len, out_len) = (row_gemm_input_len(row), row_gemm_output_len(row));
    if x.len() < x_offset + len || out.len() < out_offset + out_len {
        return Err(GpuError::Shape(format!(
            "an FP8 GEMM [{n}, {k}] x {} over {rows} rows reads {len} values from {x_offset} \
             of {} and writes {out_len} from {out_offset} of {}",
            row.batch,
            x.len(),
            out.len()
        )));
    }
    let row_tiles = rows.div_ceil(TC_TILE_ROWS);
    if row_tiles > 65_535 || row.batch > 65_535 {
        return Err(GpuError::Shape(format!(
            "{rows} rows of {} heads exceed a tensor-core GEMM's grid",
            row.batch
        )));
    }
    if len == 0 || n == 0 {
        return Ok(());
    }
    let stream = ctx.stream();
    let kernels = ctx.kernels();
    let len_i = len as i64;
    // SAFETY: the conversion below writes every element before the GEMM reads it.
    let (hi, lo) = unsafe {
        let hi = stream.alloc::<u16>(len)?;
        let lo = match ctx.dtype() {
            GpuDtype::Bf16x2 => Some(stream.alloc::<u16>(len)?),
            _ => None,
        };
        (hi, lo)
    };
    let (mut hi, mut lo) = (hi, lo);
    let x_view = x.slice(x_offset..x_offset + len);
    // SAFETY: x_view holds `len` values, hi and lo as many.
    unsafe {
        match &mut lo {
            Some(lo) => stream
                .launch_builder(&kernels.convert_f32_to_bf16x2)
                .arg(&x_view)
                .arg(&mut hi)
                .arg(lo)
                .arg(&len_i)
                .launch(super::kernels::grid(len))?,
            None => stream
                .launch_builder(&kernels.convert_f32_to_bf16)
                .arg(&x_view)
                .arg(&mut hi)
                .arg(&len_i)
                .launch(super::kernels::grid(len))?,
        };
    }
    let scales = SingleFp8Scales::of(ctx, weights)?;
    let null: u64 = 0;
    let wide = |v: usize| v as i64;
    let (x_stride, x_batch) = (wide(row.x_stride), wide(row.x_batch));
    let (out_stride, out_batch) = (wide(row.out_stride), wide(row.out_batch));
    let (rows_i, n_i, k_i) = (
        as_int(rows, "rows")?,
        as_int(n, "outputs")?,
        as_int(k, "k")?,
    );
    let config = LaunchConfig {
        grid_dim: (
            n.div_ceil(TILE_N) as u32,
            row_tiles as u32,
            row.batch as u32,
        ),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let values = weights.values_address(stream);
    let out_at = out.device_ptr_mut(stream).0 + out_offset as u64 * 4;
    let mut builder = stream.launch_builder(&kernels.tensor_core_gemm_rows_fp8);
    builder.arg(&hi);
    match &lo {
        Some(lo) => builder.arg(lo),
        None => builder.arg(&null),
    };
    builder.arg(&x_stride).arg(&x_batch).arg(&values);
    scales.push(&mut builder);
    builder
        .arg(&out_at)
        .arg(&out_stride)
        .arg(&out_batch)
        .arg(&rows_i)
        .arg(&n_i)
        .arg(&k_i);
    // SAFETY: x's terms hold every value the heads' rows read and out every value they write
    // (both checked above); the weights are `batch` live stacked [n, k] FP8 matrices whose
    // scales and segments `scales` holds, on the kernel's steps (the caller's check); a null
    // x_lo is what the kernel takes for single bf16 activations.
    unsafe { builder.launch(config)? };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::grouped_tiles::GroupedRowTiles;
    use crate::device::{ExpertGemm, GpuDtype};
    use crate::gpu::buffer::ActForm;
    use crate::gpu::expert_ffn::CudaOps;
    use crate::gpu::grouped_launch::UploadedTiles;
    use crate::grouped_ffn::FfnOps;
    use crate::routes::ExpertRun;

    fn bf16(x: f32) -> u16 {
        half::bf16::from_f32(x).to_bits()
    }

    fn widen(b: u16) -> f32 {
        half::bf16::from_bits(b).to_f32()
    }

    /// Values in [-1, 1) from a counter, the same on every run.
    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n as u32)
            .map(|i| {
                let h = (i ^ seed).wrapping_mul(2_654_435_761).rotate_left(13) ^ seed;
                (h % 20_000) as f32 / 10_000.0 - 1.0
            })
            .collect()
    }

    /// Scales in [0.25, 1.25).
    fn values_pos(n: usize, seed: u32) -> Vec<f32> {
        values(n, seed).iter().map(|v| 0.75 + v / 2.0).collect()
    }

    /// Activations as the kernel takes them: bf16, or the bf16x2 pair (hi, x - hi rounded).
    fn activations(x: &[f32], pair: bool) -> (Vec<u16>, Option<Vec<u16>>) {
        let hi: Vec<u16> = x.iter().map(|&v| bf16(v)).collect();
        let lo = pair.then(|| {
            x.iter()
                .zip(&hi)
                .map(|(&v, &h)| bf16(v - widen(h)))
                .collect()
        });
        (hi, lo)
    }

    fn upload(ctx: &GpuContext, hi: &[u16], lo: &Option<Vec<u16>>) -> GpuBuffer {
        let stream = ctx.stream();
        match lo {
            Some(lo) => GpuBuffer::Bf16Pair {
                hi: stream.clone_htod(hi).unwrap(),
                lo: stream.clone_htod(lo).unwrap(),
            },
            None => GpuBuffer::Bf16(stream.clone_htod(hi).unwrap()),
        }
    }

    /// Runs of `lens` slots back to back, their tiles uploaded.
    fn tiles(ctx: &GpuContext, lens: &[usize]) -> UploadedTiles {
        let mut start = 0;
        let runs: Vec<ExpertRun> = lens
            .iter()
            .enumerate()
            .map(|(e, &len)| {
                let run = ExpertRun {
                    expert: e as u32,
                    start,
                    len,
                };
                start += len;
                run
            })
            .collect();
        UploadedTiles::upload(ctx, &GroupedRowTiles::plan(&runs, TC_TILE_ROWS).unwrap()).unwrap()
    }

    /// An FP8 matrix of `[n, k]` with scale blocks of 20 rows (so a fragment's rows col and
    /// col + 8 may take two scales) by `block` columns; no NaN byte.
    fn fp8_matrix(
        n: usize,
        k: usize,
        block: usize,
        seed: u32,
    ) -> crate::backend::weight::Fp8Matrix {
        let values: Vec<u8> = values(n * k, seed)
            .iter()
            .map(|&v| {
                let byte = ((v + 1.0) * 127.9) as u8;
                if byte & 0x7f == 0x7f {
                    0x3c // NaN codes are refused at load
                } else {
                    byte
                }
            })
            .collect();
        let blocks = n.div_ceil(20) * k.div_ceil(block);
        let scales: Vec<f32> = values_pos(blocks, seed);
        crate::backend::weight::Fp8Matrix::from_blocks(values, n, k, &scales, (20, block))
    }

    /// Its values as f64, each byte times its block's scale.
    fn scaled_dense(m: &crate::backend::weight::Fp8Matrix) -> Vec<f64> {
        let (n, k) = (m.rows, m.cols);
        let segments = m.segment_starts.len();
        (0..n * k)
            .map(|i| {
                let (r, c) = (i / k, i % k);
                let s = m
                    .segment_starts
                    .iter()
                    .rposition(|&st| st <= c)
                    .unwrap_or(0);
                crate::backend::fp8::e4m3_to_f32(m.values[i]) as f64
                    * m.scales[r * segments + s] as f64
            })
            .collect()
    }

    /// `got` is row `r` of the activations (`hi`, plus `lo` for bf16x2, rows of
    /// `weights.len()`) times `weights`, within what a tensor core's own order of summation
    /// (and truncation) allows: some f32 ulps of the terms' size per step, where a fragment
    /// read from the wrong place is off by the size itself.
    fn assert_product(
        got: f32,
        weights: &[f64],
        hi: &[u16],
        lo: &Option<Vec<u16>>,
        r: usize,
        what: &str,
    ) {
        let k = weights.len();
        let (mut sum, mut size) = (0.0f64, 0.0f64);
        for (c, w) in weights.iter().enumerate() {
            let mut xv = widen(hi[r * k + c]) as f64;
            if let Some(lo) = lo {
                xv += widen(lo[r * k + c]) as f64;
            }
            sum += w * xv;
            size += (w * xv).abs();
        }
        let g = got as f64;
        assert!(
            (g - sum).abs() <= 1e-5 * size + 1e-6,
            "{what}: {g} against {sum}"
        );
    }

    /// The runs every pass test uses: 45, 0 and 6 slots (a full tile of 32 rows, a tile of
    /// 13: one full block of 8 and one partial, an empty run, a tile of one partial block).
    const RUN_LENS: [usize; 3] = [45, 0, 6];

    /// One launch of `weights` (three experts, `dense[e]` their `[n, k]` values as f64, scales
    /// applied) over the runs of [`RUN_LENS`], bf16 or bf16x2 (`pair`) activations: each
    /// output is the exact sum of the rounded inputs' products within f32 accumulation (a
    /// few ulps of the terms' size per mma step), a
    /// row's outputs are bitwise the same alone as in the batch, and the fused gate/up pass
    /// (the first n / 2 rows gate, the rest up) is bitwise the unfused pass followed by
    /// `silu_mul_bf16(x2)`.
    fn check_pass(
        ctx: &GpuContext,
        case: &str,
        weights: &TensorCoreWeights,
        dense: &[Vec<f64>],
        (n, k): (usize, usize),
        pair: bool,
    ) {
        let stream = ctx.stream();
        let run_of_slot: Vec<usize> = RUN_LENS
            .iter()
            .enumerate()
            .flat_map(|(e, &len)| std::iter::repeat_n(e, len))
            .collect();
        let slots = run_of_slot.len();
        let (hi, lo) = activations(&values(slots * k, 99), pair);
        let x = upload(ctx, &hi, &lo);
        let planned = tiles(ctx, &RUN_LENS);
        let mut out = stream.alloc_zeros::<f32>(slots * n).unwrap();
        unsafe {
            let products = PassOutput::Products(&mut out);
            weights
                .launch(ctx, &x, &planned.tables(), products)
                .unwrap();
        }
        let got = stream.clone_dtoh(&out).unwrap();
        for (s, &e) in run_of_slot.iter().enumerate() {
            for j in 0..n {
                let weights = &dense[e][j * k..(j + 1) * k];
                let what = format!("{case}: slot {s} output {j}");
                assert_product(got[s * n + j], weights, &hi, &lo, s, &what);
            }
        }
        // Slot 40 (in run 0's second tile) alone: bitwise its outputs in the batch.
        let alone = 40;
        let one = |v: &[u16]| v[alone * k..(alone + 1) * k].to_vec();
        let x_one = upload(ctx, &one(&hi), &lo.as_deref().map(one));
        let mut out_one = stream.alloc_zeros::<f32>(n).unwrap();
        unsafe {
            let products = PassOutput::Products(&mut out_one);
            let single = tiles(ctx, &[1, 0, 0]);
            weights
                .launch(ctx, &x_one, &single.tables(), products)
                .unwrap();
        }
        let got_one = stream.clone_dtoh(&out_one).unwrap();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            bits(&got_one),
            bits(&got[alone * n..(alone + 1) * n]),
            "{case}: a row alone"
        );
        let inter = n / 2;
        let form = if pair {
            ActForm::Bf16Pair
        } else {
            ActForm::Bf16
        };
        let ops = CudaOps { ctx, act: form };
        let mut fused = ops.scratch_act(slots * inter).unwrap();
        unsafe {
            let silu = PassOutput::SiluMul(&mut fused);
            weights.launch(ctx, &x, &planned.tables(), silu).unwrap();
        }
        let mut unfused = ops.scratch_act(slots * inter).unwrap();
        ops.silu_mul(&out, &mut unfused, slots, inter).unwrap();
        let download = |b: &GpuBuffer| match b {
            GpuBuffer::Bf16(v) => (stream.clone_dtoh(v).unwrap(), vec![]),
            GpuBuffer::Bf16Pair { hi, lo } => (
                stream.clone_dtoh(hi).unwrap(),
                stream.clone_dtoh(lo).unwrap(),
            ),
            _ => unreachable!("bf16 activations"),
        };
        assert_eq!(download(&fused), download(&unfused), "{case}: fused SiLU");
    }

    /// bf16 experts: output widths and k that are not multiples of the mma's 16 (k odd too:
    /// the unaligned loads), bf16 and bf16x2 activations, through [`check_pass`].
    #[test]
    fn tensor_core_passes_give_the_products_of_the_rounded_inputs() {
        let Some(ctx) = crate::test_support::test_context(GpuDtype::Bf16x2) else {
            return;
        };
        ctx.set_expert_gemm(ExpertGemm::TensorCores);
        let stream = ctx.stream();
        for (n, k, pair) in [(40usize, 50usize, true), (40, 37, false), (144, 64, true)] {
            let w: Vec<Vec<u16>> = (0..RUN_LENS.len())
                .map(|e| {
                    values(n * k, 7 + e as u32)
                        .iter()
                        .map(|&v| bf16(v))
                        .collect()
                })
                .collect();
            let held: Vec<GpuBuffer> = w
                .iter()
                .map(|m| GpuBuffer::Bf16(stream.clone_htod(m).unwrap()))
                .collect();
            let refs: Vec<&GpuBuffer> = held.iter().collect();
            let weights = TensorCoreWeights::of(&ctx, &refs, (n, k)).unwrap().unwrap();
            let dense: Vec<Vec<f64>> = w
                .iter()
                .map(|m| m.iter().map(|&b| widen(b) as f64).collect())
                .collect();
            let case = format!("bf16 [{n}, {k}], bf16x2 {pair}");
            check_pass(&ctx, &case, &weights, &dense, (n, k), pair);
        }
    }

    /// FP8 experts (`--gpu-fp8 keep`) on the tensor cores: each e4m3 byte widened exactly,
    /// each 32-column segment's products scaled by its row's scale, k off the kernel's steps
    /// (the last segment partial, an odd k), through [`check_pass`]; segments off the
    /// 32-column steps are not taken (the FP8 CUDA-core kernel runs them), nor FP8 in the
    /// `f32` mode.
    #[test]
    fn fp8_experts_on_the_tensor_cores_give_the_scaled_products() {
        use crate::gpu::fp8_matrix::DeviceFp8Matrix;
        let Some(ctx) = crate::test_support::test_context(GpuDtype::Bf16x2) else {
            return;
        };
        ctx.set_expert_gemm(ExpertGemm::TensorCores);
        let matrix = fp8_matrix;
        for (n, k, pair) in [(40usize, 80usize, true), (48, 75, false)] {
            let hosts: Vec<crate::backend::weight::Fp8Matrix> = (0..RUN_LENS.len())
                .map(|e| matrix(n, k, 32, 3 + e as u32))
                .collect();
            let held: Vec<GpuBuffer> = hosts
                .iter()
                .map(|m| GpuBuffer::Fp8(Box::new(DeviceFp8Matrix::upload(&ctx, m).unwrap())))
                .collect();
            let refs: Vec<&GpuBuffer> = held.iter().collect();
            let weights = TensorCoreWeights::of(&ctx, &refs, (n, k)).unwrap().unwrap();
            let dense: Vec<Vec<f64>> = hosts.iter().map(scaled_dense).collect();
            let case = format!("FP8 [{n}, {k}], bf16x2 {pair}");
            check_pass(&ctx, &case, &weights, &dense, (n, k), pair);
        }
        for block in [24, 48] {
            let off_steps = GpuBuffer::Fp8(Box::new(
                DeviceFp8Matrix::upload(&ctx, &matrix(40, 80, block, 5)).unwrap(),
            ));
            let why = format!("segments of {block} columns, off the 32-column steps");
            assert!(!tensor_cores_take(&ctx, &off_steps), "{why}");
        }
        let f32_ctx = crate::test_support::test_context(GpuDtype::F32).unwrap();
        f32_ctx.set_expert_gemm(ExpertGemm::TensorCores);
        let fp8 = GpuBuffer::Fp8(Box::new(
            DeviceFp8Matrix::upload(&f32_ctx, &matrix(40, 80, 32, 5)).unwrap(),
        ));
        assert!(!tensor_cores_take(&f32_ctx, &fp8), "FP8 in the f32 mode");
    }

    /// A dense FP8 projection on the tensor cores (`fp8_linear`, the dense part's `linear`
    /// with `--gpu-fp8 keep`): 45 rows (a full tile of 32 and a partial one), in the bf16x2
    /// and bf16 modes: each output the exact sum of the products of x rounded as the mode
    /// rounds it and the scaled weights, within f32 accumulation; a row alone gives its
    /// outputs in the batch, bitwise.
    #[test]
    fn fp8_linear_on_the_tensor_cores_gives_the_scaled_products() {
        use crate::gpu::fp8_matrix::DeviceFp8Matrix;
        for dtype in [GpuDtype::Bf16x2, GpuDtype::Bf16] {
            let Some(ctx) = crate::test_support::test_context(dtype) else {
                return;
            };
            ctx.set_expert_gemm(ExpertGemm::TensorCores);
            let stream = ctx.stream();
            let (rows, n, k) = (45usize, 40usize, 80usize);
            let host = fp8_matrix(n, k, 32, 9);
            let held = GpuBuffer::Fp8(Box::new(DeviceFp8Matrix::upload(&ctx, &host).unwrap()));
            assert!(tensor_cores_take(&ctx, &held), "{dtype:?}");
            let GpuBuffer::Fp8(weights) = &held else {
                unreachable!("held as FP8")
            };
            let x = values(rows * k, 31);
            let mut out = stream.alloc_zeros::<f32>(rows * n).unwrap();
            fp8_linear(
                &ctx,
                weights,
                &stream.clone_htod(&x).unwrap(),
                rows,
                &mut out,
            )
            .unwrap();
            let got = stream.clone_dtoh(&out).unwrap();
            let (hi, lo) = activations(&x, dtype == GpuDtype::Bf16x2);
            let dense = scaled_dense(&host);
            for r in 0..rows {
                for j in 0..n {
                    let weights = &dense[j * k..(j + 1) * k];
                    let what = format!("{dtype:?}: row {r} output {j}");
                    assert_product(got[r * n + j], weights, &hi, &lo, r, &what);
                }
            }
            let alone = 40;
            let one = stream.clone_htod(&x[alone * k..(alone + 1) * k]).unwrap();
            let mut out_one = stream.alloc_zeros::<f32>(n).unwrap();
            fp8_linear(&ctx, weights, &one, 1, &mut out_one).unwrap();
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(
                bits(&stream.clone_dtoh(&out_one).unwrap()),
                bits(&got[alone * n..(alone + 1) * n]),
                "{dtype:?}: a row alone"
            );
        }
    }

    /// MLA's per-head FP8 products on the tensor cores (`fp8_strided`, the dense part's `gemm`
    /// over the absorbed `kv_b` halves with `--gpu-fp8 keep`): three stacked heads read from
    /// strided rows at an offset, written strided at another, in the bf16x2 and bf16 modes:
    /// each head's outputs are that head's `fp8_linear` on its rows alone, bit for bit, and
    /// nothing between the heads' outputs is written; too few stacked heads are refused.
    #[test]
    fn fp8_heads_on_the_tensor_cores_are_each_heads_linear() {
        use crate::device::shapes::StridedGemm;
        use crate::gpu::fp8_matrix::DeviceFp8Matrix;
        for dtype in [GpuDtype::Bf16x2, GpuDtype::Bf16] {
            let Some(ctx) = crate::test_support::test_context(dtype) else {
                return;
            };
            ctx.set_expert_gemm(ExpertGemm::TensorCores);
            let stream = ctx.stream();
            let (rows, heads, n, k) = (37usize, 3usize, 40usize, 48usize);
            let host: Vec<_> = (0..heads)
                .map(|h| fp8_matrix(n, k, 32, 11 + h as u32))
                .collect();
            let stacked = DeviceFp8Matrix::upload_heads(&ctx, &host).unwrap();
            assert!(tensor_cores_take_heads(&ctx, &stacked), "{dtype:?}");
            // x [rows, heads, k + 8] from value 3; out [rows, heads, n + 4] from value 5.
            let (x_head, out_head, x_at, out_at) = (k + 8, n + 4, 3usize, 5usize);
            let x = values(x_at + rows * heads * x_head, 41);
            let out_len = out_at + rows * heads * out_head;
            let mut out = stream.clone_htod(&vec![-7.0f32; out_len]).unwrap();
            let s = StridedGemm::per_head(
                rows,
                heads,
                n,
                k,
                (heads * x_head, x_head),
                (heads * out_head, out_head),
            );
            let x_dev = stream.clone_htod(&x).unwrap();
            fp8_strided(&ctx, &stacked, &s, (&x_dev, x_at), (&mut out, out_at)).unwrap();
            let got = stream.clone_dtoh(&out).unwrap();
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            for (h, matrix) in host.iter().enumerate() {
                let alone = DeviceFp8Matrix::upload(&ctx, matrix).unwrap();
                let head_rows: Vec<f32> = (0..rows)
                    .flat_map(|r| {
                        let at = x_at + (r * heads + h) * x_head;
                        x[at..at + k].to_vec()
                    })
                    .collect();
                let mut want = stream.alloc_zeros::<f32>(rows * n).unwrap();
                let head_x = stream.clone_htod(&head_rows).unwrap();
                fp8_linear(&ctx, &alone, &head_x, rows, &mut want).unwrap();
                let want = stream.clone_dtoh(&want).unwrap();
                for r in 0..rows {
                    let at = out_at + (r * heads + h) * out_head;
                    assert_eq!(
                        bits(&got[at..at + n]),
                        bits(&want[r * n..(r + 1) * n]),
                        "{dtype:?}: head {h} row {r}"
                    );
                    assert!(got[at + n..at + out_head].iter().all(|&v| v == -7.0));
                }
            }
            assert!(got[..out_at].iter().all(|&v| v == -7.0));
            let too_many = StridedGemm::per_head(
                rows,
                heads + 1,
                n,
                k,
                (heads * x_head, x_head),
                (heads * out_head, out_head),
            );
            let refused = fp8_strided(&ctx, &stacked, &too_many, (&x_dev, 0), (&mut out, 0));
            assert!(refused.is_err(), "{dtype:?}: more heads than stacked");
        }
    }

    /// Refused before launching: activations of another form, a fused pass into the wrong
    /// form, buffers shorter than the tiles; f32 experts and a context not asked for tensor
    /// cores make no weights at all.
    #[test]
    fn tensor_core_passes_refuse_what_they_cannot_run() {
        let Some(ctx) = crate::test_support::test_context(GpuDtype::Bf16) else {
            return;
        };
        let stream = ctx.stream();
        let (n, k) = (32usize, 16usize);
        let w = GpuBuffer::Bf16(stream.alloc_zeros::<u16>(n * k).unwrap());
        let wide = GpuBuffer::F32(stream.alloc_zeros::<f32>(n * k).unwrap());
        ctx.set_expert_gemm(ExpertGemm::Lanes);
        assert!(TensorCoreWeights::of(&ctx, &[&w], (n, k))
            .unwrap()
            .is_none());
        ctx.set_expert_gemm(ExpertGemm::TensorCores);
        assert!(TensorCoreWeights::of(&ctx, &[&wide], (n, k))
            .unwrap()
            .is_none());
        assert!(TensorCoreWeights::of(&ctx, &[&w], (n + 1, k))
            .unwrap()
            .is_none());
        ctx.set_deterministic(true);
        assert!(TensorCoreWeights::of(&ctx, &[&w], (n, k))
            .unwrap()
            .is_none());
        ctx.set_deterministic(false);
        let weights = TensorCoreWeights::of(&ctx, &[&w], (n, k)).unwrap().unwrap();
        let planned = tiles(&ctx, &[4]);
        let x = GpuBuffer::Bf16(stream.alloc_zeros::<u16>(4 * k).unwrap());
        let f32_x = GpuBuffer::F32(stream.alloc_zeros::<f32>(4 * k).unwrap());
        let short_x = GpuBuffer::Bf16(stream.alloc_zeros::<u16>(3 * k).unwrap());
        let mut out = stream.alloc_zeros::<f32>(4 * n).unwrap();
        let mut short_out = stream.alloc_zeros::<f32>(4 * n - 1).unwrap();
        let mut pair_act = GpuBuffer::Bf16Pair {
            hi: stream.alloc_zeros::<u16>(4 * n).unwrap(),
            lo: stream.alloc_zeros::<u16>(4 * n).unwrap(),
        };
        let tables = planned.tables();
        unsafe {
            let refused = [
                weights.launch(&ctx, &f32_x, &tables, PassOutput::Products(&mut out)),
                weights.launch(&ctx, &short_x, &tables, PassOutput::Products(&mut out)),
                weights.launch(&ctx, &x, &tables, PassOutput::Products(&mut short_out)),
                weights.launch(&ctx, &x, &tables, PassOutput::SiluMul(&mut pair_act)),
            ];
            for (i, result) in refused.into_iter().enumerate() {
                assert!(
                    matches!(result, Err(GpuError::Shape(_))),
                    "case {i}: {result:?}"
                );
            }
            weights
                .launch(&ctx, &x, &tables, PassOutput::Products(&mut out))
                .unwrap();
        }
    }
}
