//! What every grouped launch (one launch for every expert of a layer: FP8 kept as FP8, or the
//! exact kernels of `--deterministic`) shares: the experts' weights as a table of device
//! addresses ([`GroupedWeights`]), and the row tiles ([`TileTables`]), planned on the host and
//! uploaded ([`UploadedTiles`]) or planned on the device (`plan_routes`, so that no row count
//! goes through the host and the launch can be part of a CUDA graph). The grid is sized for
//! the tiles' bound; blocks past the plan's tiles do nothing.

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::buffer::GpuBuffer;
use super::context::GpuContext;
use super::error::GpuError;
use super::fp8_matrix::DeviceFp8Matrix;
use super::kernels::as_int;
use crate::device::grouped_tiles::GroupedRowTiles;

/// Rows per tile of a grouped FP8 launch's plan ([`GroupedRowTiles::plan`]; `FP8_TILE_ROWS` in
/// kernels.cu).
pub const FP8_TILE_ROWS: usize = 8;

/// What a grouped launch writes: each weight row's product, or (the gate/up pass) SiLU of
/// the gate half times the up half.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum GroupedOutput {
    Products,
    SiluMul,
}

impl GroupedOutput {
    /// Output columns for `n` weight rows; an error where the halves cannot pair.
    pub(crate) fn width(self, n: usize) -> Result<usize, GpuError> {
        match self {
            GroupedOutput::Products => Ok(n),
            GroupedOutput::SiluMul if n.is_multiple_of(2) => Ok(n / 2),
            GroupedOutput::SiluMul => Err(GpuError::Shape(format!(
                "a fused gate/up pass over {n} weight rows (not gate and up halves)"
            ))),
        }
    }
}

/// Outputs per block (`FP8_TILE_N` in kernels.cu).
const TILE_N: usize = 32;
/// A grid's most row tiles (its y dimension).
const MAX_TILES: usize = 65_535;

/// A grouped launch's row tiles on the device: run `e`'s first tile, first slot and length
/// (`first_tile` has `runs + 1` entries), for at most `tiles` tiles of `tile_rows` rows over
/// `slots` slots.
pub(crate) struct TileTables<'a> {
    pub first_tile: &'a CudaSlice<u32>,
    pub run_start: &'a CudaSlice<u32>,
    pub run_len: &'a CudaSlice<u32>,
    pub runs: usize,
    pub tiles: usize,
    pub tile_rows: usize,
    pub slots: usize,
}

impl TileTables<'_> {
    /// The grid's y dimension for a kernel whose tiles are `kernel_rows` rows: an error where
    /// these tables were planned for another size or exceed a grid.
    pub fn grid_tiles(&self, kernel_rows: usize) -> Result<u32, GpuError> {
        if self.tile_rows != kernel_rows {
            return Err(GpuError::Shape(format!(
                "tiles of {} rows for a kernel of {kernel_rows}-row tiles",
                self.tile_rows
            )));
        }
        if self.tiles > MAX_TILES {
            return Err(GpuError::Shape(format!(
                "{} row tiles exceed a grouped GEMM's grid",
                self.tiles
            )));
        }
        Ok(self.tiles as u32)
    }

    /// Pushes the three tables, in the kernels' order (first tile, run start, run length).
    pub fn push<'b>(&'b self, builder: &mut cudarc::driver::LaunchArgs<'b>) {
        builder.arg(self.first_tile);
        builder.arg(self.run_start);
        builder.arg(self.run_len);
    }
}

/// Tiles planned on the host ([`GroupedRowTiles`]), uploaded.
pub(crate) struct UploadedTiles {
    first_tile: CudaSlice<u32>,
    run_start: CudaSlice<u32>,
    run_len: CudaSlice<u32>,
    runs: usize,
    tiles: usize,
    tile_rows: usize,
    slots: usize,
}

impl UploadedTiles {
    pub fn upload(ctx: &GpuContext, tiles: &GroupedRowTiles) -> Result<Self, GpuError> {
        let stream = ctx.stream();
        let upload = |values: &[u32]| match values.is_empty() {
            true => stream.alloc_zeros::<u32>(1),
            false => stream.clone_htod(values),
        };
        Ok(Self {
            first_tile: upload(&tiles.first_tile)?,
            run_start: upload(&tiles.run_start)?,
            run_len: upload(&tiles.run_len)?,
            runs: tiles.run_len.len(),
            tiles: tiles.tiles(),
            tile_rows: tiles.tile_rows as usize,
            slots: tiles.slots(),
        })
    }

    pub fn tables(&self) -> TileTables<'_> {
        TileTables {
            first_tile: &self.first_tile,
            run_start: &self.run_start,
            run_len: &self.run_len,
            runs: self.runs,
            tiles: self.tiles,
            tile_rows: self.tile_rows,
            slots: self.slots,
        }
    }
}

/// The segment arguments of an FP8 kernel: the segment starts' address and their count.
struct SegmentArgs {
    segment_starts: u64,
    segments: i32,
}

impl SegmentArgs {
    fn of(ctx: &GpuContext, matrix: &DeviceFp8Matrix) -> Result<Self, GpuError> {
        let (segment_starts, segments) = matrix.segments_address(ctx.stream());
        Ok(Self {
            segment_starts,
            segments: as_int(segments, "FP8 segments")?,
        })
    }
}

/// FP8 experts' scales for a grouped launch: a table of each run's scales' address, on the
/// segments every run shares.
pub(crate) struct Fp8ScaleTables {
    scales: CudaSlice<u64>,
    segments: SegmentArgs,
}

impl Fp8ScaleTables {
    /// The scales of `experts`, which the caller has checked share `experts[0]`'s segments.
    pub fn of(ctx: &GpuContext, experts: &[&DeviceFp8Matrix]) -> Result<Self, GpuError> {
        let Some(first) = experts.first() else {
            return Err(GpuError::Shape("the scales of no FP8 experts".into()));
        };
        let stream = ctx.stream();
        let scales: Vec<u64> = experts.iter().map(|e| e.scales_address(stream)).collect();
        Ok(Self {
            scales: stream.clone_htod(&scales)?,
            segments: SegmentArgs::of(ctx, first)?,
        })
    }

    /// Pushes the kernels' three scale arguments (scales, segment starts, segments).
    pub fn push<'b>(&'b self, builder: &mut cudarc::driver::LaunchArgs<'b>) {
        builder.arg(&self.scales);
        builder.arg(&self.segments.segment_starts);
        builder.arg(&self.segments.segments);
    }
}

/// One FP8 matrix's scale arguments for a non-grouped kernel: its scales' address in place of
/// the table.
pub(crate) struct SingleFp8Scales {
    scales: u64,
    segments: SegmentArgs,
}

impl SingleFp8Scales {
    pub fn of(ctx: &GpuContext, matrix: &DeviceFp8Matrix) -> Result<Self, GpuError> {
        Ok(Self {
            scales: matrix.scales_address(ctx.stream()),
            segments: SegmentArgs::of(ctx, matrix)?,
        })
    }

    /// Pushes them in the kernels' order.
    pub fn push<'b>(&'b self, builder: &mut cudarc::driver::LaunchArgs<'b>) {
        builder.arg(&self.scales);
        builder.arg(&self.segments.segment_starts);
        builder.arg(&self.segments.segments);
    }
}

/// How the kernel reads each run's weights.
enum WeightForm {
    /// e4m3 bytes with their scales.
    Fp8(Fp8ScaleTables),
    F32,
    Bf16,
}

/// The experts of a grouped launch, run `e`'s `[n, k]` row-major weights at `weights[e]`.
/// Holds addresses, not the experts: whoever launches keeps them alive.
pub(crate) struct GroupedWeights {
    weights: CudaSlice<u64>,
    form: WeightForm,
    runs: usize,
    n: usize,
    k: usize,
}

impl GroupedWeights {
    /// FP8 experts, all the same shape on the same segments.
    pub fn fp8(ctx: &GpuContext, experts: &[&DeviceFp8Matrix]) -> Result<Self, GpuError> {
        let Some(first) = experts.first() else {
            return Err(GpuError::Shape("a grouped FP8 GEMM of no experts".into()));
        };
        let (n, k) = (first.rows(), first.cols());
        if !experts.iter().all(|e| e.groups_with(first)) {
            return Err(GpuError::Shape(format!(
                "a grouped FP8 GEMM of {} experts not all [{n}, {k}] on the same segments",
                experts.len()
            )));
        }
        let stream = ctx.stream();
        let weights: Vec<u64> = experts.iter().map(|e| e.values_address(stream)).collect();
        Ok(Self {
            weights: stream.clone_htod(&weights)?,
            form: WeightForm::Fp8(Fp8ScaleTables::of(ctx, experts)?),
            runs: experts.len(),
            n,
            k,
        })
    }

    /// f32 or bf16 experts (the exact kernels), each holding at least `[n, k]`.
    pub fn exact(
        ctx: &GpuContext,
        experts: &[&GpuBuffer],
        (n, k): (usize, usize),
    ) -> Result<Self, GpuError> {
        let all_f32 = experts.iter().all(|e| matches!(e, GpuBuffer::F32(_)));
        let all_bf16 = experts.iter().all(|e| matches!(e, GpuBuffer::Bf16(_)));
        let sized = experts.iter().all(|e| e.len() >= n * k);
        if experts.is_empty() || !(all_f32 || all_bf16) || !sized {
            return Err(GpuError::Shape(format!(
                "a grouped exact GEMM of {} experts [{n}, {k}] (one type: {}, sized: {sized})",
                experts.len(),
                all_f32 || all_bf16,
            )));
        }
        let stream = ctx.stream();
        let weights: Vec<u64> = experts.iter().map(|e| e.address(stream, 0)).collect();
        Ok(Self {
            weights: stream.clone_htod(&weights)?,
            form: match all_f32 {
                true => WeightForm::F32,
                false => WeightForm::Bf16,
            },
            runs: experts.len(),
            n,
            k,
        })
    }

    /// `out[slots, width]` from `x[slots, k]`: each tile's rows times its run's weights, one
    /// FMA chain per output (bitwise each expert's CPU GEMM), writing `output`.
    ///
    /// # Safety
    /// The experts these weights were made from are alive until the launch has run.
    pub unsafe fn launch(
        &self,
        ctx: &GpuContext,
        x: &CudaSlice<f32>,
        tiles: &TileTables<'_>,
        out: &mut CudaSlice<f32>,
        output: GroupedOutput,
    ) -> Result<(), GpuError> {
        let (n, k) = (self.n, self.k);
        let width = output.width(n)?;
        let slots = tiles.slots;
        if tiles.runs != self.runs || x.len() < slots * k || out.len() < slots * width {
            return Err(GpuError::Shape(format!(
                "a grouped GEMM of {} experts [{n}, {k}] over {} runs of {slots} slots, {} \
                 input and {} output values",
                self.runs,
                tiles.runs,
                x.len(),
                out.len()
            )));
        }
        let grid_tiles = tiles.grid_tiles(FP8_TILE_ROWS)?;
        if grid_tiles == 0 || width == 0 {
            return Ok(());
        }
        let config = LaunchConfig {
            grid_dim: (width.div_ceil(TILE_N) as u32, grid_tiles, 1),
            block_dim: ((TILE_N * FP8_TILE_ROWS) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let (x_stride, out_stride) = (k as i64, width as i64);
        let runs = as_int(self.runs, "experts")?;
        let (width_i, k_i) = (as_int(width, "outputs")?, as_int(k, "k")?);
        let kernels = ctx.kernels();
        let silu = output == GroupedOutput::SiluMul;
        let function = match (&self.form, silu) {
            (WeightForm::Fp8(_), false) => &kernels.grouped_gemm_rows_fp8,
            (WeightForm::Fp8(_), true) => &kernels.grouped_gate_up_silu_fp8,
            (WeightForm::F32, false) => &kernels.grouped_gemm_rows_exact_f32,
            (WeightForm::F32, true) => &kernels.grouped_gate_up_silu_exact_f32,
            (WeightForm::Bf16, false) => &kernels.grouped_gemm_rows_exact_bf16,
            (WeightForm::Bf16, true) => &kernels.grouped_gate_up_silu_exact_bf16,
        };
        let stream = ctx.stream();
        let mut builder = stream.launch_builder(function);
        builder.arg(x);
        builder.arg(&x_stride);
        builder.arg(&self.weights);
        if let WeightForm::Fp8(scales) = &self.form {
            scales.push(&mut builder);
        }
        builder.arg(out);
        builder.arg(&out_stride);
        tiles.push(&mut builder);
        builder.arg(&runs).arg(&width_i).arg(&k_i);
        // SAFETY: every tile's rows lie within `slots` rows of x and out (the tables' contract,
        // checked above against the buffers), each run's weights are a live [n, k] matrix (the
        // caller's contract), the tables have `runs` (+ 1) entries.
        unsafe { builder.launch(config)? };
        Ok(())
    }
}
