//! Routed experts on the GPU: weights uploaded once, and the primitive steps of the grouped
//! FFN (`crate::grouped_ffn`) on the device: one cuBLAS GEMM per expert for gate+up and one
//! for down, the NVRTC kernels for the rest. Everything between upload and download stays on
//! the device.

use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtrMut, PushKernelArg};

use super::buffer::{check_gemm_bounds, ActForm, GpuBuffer};
use super::context::GpuContext;
use super::error::GpuError;
use super::fp8_gemm::{grouped_fp8, grouped_matmul};
use super::fp8_matrix::DeviceFp8Matrix;
use super::grouped_launch::UploadedTiles;
use super::grouped_launch::{GroupedOutput, FP8_TILE_ROWS};
use super::kernels::{as_int, row_grid};
use super::tensor_core_gemm::{PassOutput, TensorCoreWeights, TC_TILE_ROWS};
use crate::backend::weight::Fp8Matrix;
use crate::device::grouped_tiles::GroupedRowTiles;
use crate::device::shapes::{ColumnMajorGemm, StridedGemm};
use crate::device::MatrixPrecision;
use crate::grouped_ffn::{
    expert_gemm_calls, expert_gemms, run_grouped, ExpertMatrices, FfnOps, FfnPass, GroupedRows,
    GroupedShapeError,
};
use crate::routes::ExpertRuns;

/// One routed expert's weights on the GPU.
pub struct GpuMlp {
    /// `[2 * intermediate, hidden]`: gate rows then up rows.
    gate_up: GpuBuffer,
    /// `[hidden, intermediate]`.
    down: GpuBuffer,
    hidden: usize,
    intermediate: usize,
}

impl GpuMlp {
    /// Uploads one expert; `precision` (from the checkpoint's dtypes) and the context's mode
    /// decide between bf16 and f32 (see [`MatrixPrecision::in_bf16`]).
    pub fn upload(
        ctx: &GpuContext,
        gate: &[f32],
        up: &[f32],
        down: &[f32],
        hidden: usize,
        intermediate: usize,
        precision: MatrixPrecision,
    ) -> Result<Self, GpuError> {
        let (gu_len, down_len) = (intermediate * hidden, hidden * intermediate);
        if gate.len() != gu_len || up.len() != gu_len || down.len() != down_len {
            return Err(GpuError::Shape(format!(
                "expert weights of {}/{}/{} values for hidden {hidden}, intermediate {intermediate}",
                gate.len(),
                up.len(),
                down.len()
            )));
        }
        let mut gate_up = Vec::with_capacity(2 * gu_len);
        gate_up.extend_from_slice(gate);
        gate_up.extend_from_slice(up);
        let bf16 = precision.in_bf16(ctx.dtype());
        Ok(Self {
            gate_up: GpuBuffer::upload_as(ctx, &gate_up, bf16)?,
            down: GpuBuffer::upload_as(ctx, down, bf16)?,
            hidden,
            intermediate,
        })
    }

    /// Uploads one expert of an FP8 checkpoint as FP8 (`--gpu-fp8 keep`): bytes and scales,
    /// gate and up stacked; `None` when gate and up do not share their column segments.
    pub fn upload_fp8(
        ctx: &GpuContext,
        [gate, up, down]: [&Fp8Matrix; 3],
        hidden: usize,
        intermediate: usize,
    ) -> Result<Option<Self>, GpuError> {
        let shapes_ok = gate.rows == intermediate
            && up.rows == intermediate
            && gate.cols == hidden
            && down.rows == hidden
            && down.cols == intermediate;
        if !shapes_ok {
            return Err(GpuError::Shape(format!(
                "FP8 expert weights [{}, {}] / [{}, {}] / [{}, {}] for hidden {hidden}, \
                 intermediate {intermediate}",
                gate.rows, gate.cols, up.rows, up.cols, down.rows, down.cols
            )));
        }
        let Some(gate_up) = Fp8Matrix::stacked(&[gate, up]) else {
            return Ok(None);
        };
        Ok(Some(Self {
            gate_up: GpuBuffer::Fp8(Box::new(DeviceFp8Matrix::upload(ctx, &gate_up)?)),
            down: GpuBuffer::Fp8(Box::new(DeviceFp8Matrix::upload(ctx, down)?)),
            hidden,
            intermediate,
        }))
    }

    /// One expert of a synthetic FP8 checkpoint (`--gpu-fp8 keep`), its codes generated on
    /// the device from their keys (`(key, matrix)` as
    /// [`crate::checkpoint::Checkpoint::generated_fp8`] gives them: scales, no codes), gate and
    /// up stacked: what [`Self::upload_fp8`] uploads from the same checkpoint, bitwise.
    /// `None` when gate and up do not share their column segments.
    pub fn generate_fp8(
        ctx: &GpuContext,
        [gate, up, down]: [(u64, &Fp8Matrix); 3],
        hidden: usize,
        intermediate: usize,
    ) -> Result<Option<Self>, GpuError> {
        let shapes_ok = gate.1.rows == intermediate
            && up.1.rows == intermediate
            && gate.1.cols == hidden
            && down.1.rows == hidden
            && down.1.cols == intermediate;
        if !shapes_ok {
            return Err(GpuError::Shape(format!(
                "generated FP8 expert weights for hidden {hidden}, intermediate {intermediate}"
            )));
        }
        if up.1.cols != gate.1.cols || up.1.segment_starts != gate.1.segment_starts {
            return Ok(None);
        }
        Ok(Some(Self {
            gate_up: GpuBuffer::Fp8(Box::new(DeviceFp8Matrix::generated(ctx, &[gate, up])?)),
            down: GpuBuffer::Fp8(Box::new(DeviceFp8Matrix::generated(ctx, &[down])?)),
            hidden,
            intermediate,
        }))
    }

    /// Random weights generated on the device (benchmarks: no host copy of 22 GB).
    pub fn random(
        ctx: &GpuContext,
        hidden: usize,
        intermediate: usize,
        seed: u32,
    ) -> Result<Self, GpuError> {
        let mut gate_up = GpuBuffer::zeros(ctx, 2 * intermediate * hidden)?;
        let mut down = GpuBuffer::zeros(ctx, hidden * intermediate)?;
        let scale = 1.0 / (hidden as f32).sqrt();
        gate_up.fill_uniform(ctx, seed.wrapping_mul(2), scale)?;
        down.fill_uniform(ctx, seed.wrapping_mul(2) + 1, scale)?;
        Ok(Self {
            gate_up,
            down,
            hidden,
            intermediate,
        })
    }

    /// Random weights kept as FP8 (`--gpu-fp8 keep`'s form), filled on the device.
    pub fn random_fp8(
        ctx: &GpuContext,
        hidden: usize,
        intermediate: usize,
        seed: u32,
    ) -> Result<Self, GpuError> {
        let gate_up = DeviceFp8Matrix::random(ctx, 2 * intermediate, hidden, seed.wrapping_mul(2))?;
        let down = DeviceFp8Matrix::random(ctx, hidden, intermediate, seed.wrapping_mul(2) + 1)?;
        Ok(Self {
            gate_up: GpuBuffer::Fp8(Box::new(gate_up)),
            down: GpuBuffer::Fp8(Box::new(down)),
            hidden,
            intermediate,
        })
    }

    pub fn hidden(&self) -> usize {
        self.hidden
    }

    pub fn intermediate(&self) -> usize {
        self.intermediate
    }

    pub(crate) fn gate_up(&self) -> &GpuBuffer {
        &self.gate_up
    }

    pub(crate) fn down(&self) -> &GpuBuffer {
        &self.down
    }

    pub fn bytes(&self) -> usize {
        self.gate_up.bytes() + self.down.bytes()
    }
}

/// The grouped FFN's primitive steps on this GPU: cuBLAS for the GEMMs, the NVRTC kernels
/// for the rest. The orchestration is [`crate::grouped_ffn::run_grouped`], shared with (and
/// tested through) a host reference.
pub struct CudaOps<'a> {
    pub ctx: &'a GpuContext,
    /// The activations' form, which must match the weights': f32 against f32 weights; bf16,
    /// or a `hi + lo` pair in the bf16x2 mode, against bf16 ones.
    pub act: ActForm,
}

impl CudaOps<'_> {
    /// An expert's GEMM over FP8 weights: `g` must be the whole matrix times rows
    /// (`ColumnMajorGemm::rows_times_weights`), with f32 activations. Queued on the main
    /// stream, which the lanes' fork and join order around it.
    #[allow(clippy::too_many_arguments)]
    fn fp8_gemm(
        &self,
        g: &ColumnMajorGemm,
        weights: &DeviceFp8Matrix,
        a_offset: usize,
        b: &GpuBuffer,
        b_offset: usize,
        c: &mut CudaSlice<f32>,
        c_offset: usize,
    ) -> Result<(), GpuError> {
        let (n, k, rows) = (weights.rows(), weights.cols(), g.n);
        let whole = ColumnMajorGemm::rows_times_weights(rows, n, k);
        let GpuBuffer::F32(x) = b else {
            return Err(GpuError::Shape("FP8 weights take f32 activations".into()));
        };
        if *g != whole
            || a_offset != 0
            || b_offset + rows * k > x.len()
            || c_offset + rows * n > c.len()
        {
            return Err(GpuError::Shape(format!(
                "an FP8 GEMM {g:?} from offsets {a_offset}/{b_offset}/{c_offset} over [{n}, {k}] \
                 weights, {} input and {} output values",
                x.len(),
                c.len()
            )));
        }
        let x = x.slice(b_offset..b_offset + rows * k);
        let mut out = c.slice_mut(c_offset..c_offset + rows * n);
        weights.matmul_views(self.ctx, &x, rows, &mut out)
    }
}

impl From<GroupedShapeError> for GpuError {
    fn from(e: GroupedShapeError) -> Self {
        GpuError::Shape(e.to_string())
    }
}

impl CudaOps<'_> {
    /// `pass` of `experts` on the tensor cores, where the context runs bf16 experts there and
    /// these are (false: they are not, nothing ran).
    #[allow(clippy::too_many_arguments)]
    fn tensor_core_pass(
        &self,
        experts: &[ExpertMatrices<'_, GpuBuffer>],
        plan: &ExpertRuns,
        pass: FfnPass,
        input: &GpuBuffer,
        output: PassOutput<'_>,
        hidden: usize,
        inter: usize,
    ) -> Result<bool, GpuError> {
        if !self.ctx.tensor_core_experts()
            || !matches!(input, GpuBuffer::Bf16(_) | GpuBuffer::Bf16Pair { .. })
        {
            return Ok(false);
        }
        let matrices: Vec<&GpuBuffer> = experts.iter().map(|e| e.of(pass)).collect();
        let shape = match pass {
            FfnPass::GateUp => (2 * inter, hidden),
            FfnPass::Down => (hidden, inter),
        };
        let Some(weights) = TensorCoreWeights::of(self.ctx, &matrices, shape)? else {
            return Ok(false);
        };
        let tiles = GroupedRowTiles::plan(&plan.runs, TC_TILE_ROWS)
            .map_err(|e| GpuError::Shape(e.to_string()))?;
        let tiles = UploadedTiles::upload(self.ctx, &tiles)?;
        // SAFETY: `experts` keeps the weights alive while the work is queued on this stream.
        unsafe { weights.launch(self.ctx, input, &tiles.tables(), output)? };
        Ok(true)
    }
}

impl FfnOps for CudaOps<'_> {
    type Act = GpuBuffer;
    type F32 = CudaSlice<f32>;
    type Index = CudaSlice<u32>;
    type Error = GpuError;

    fn f32_len(&self, buffer: &CudaSlice<f32>) -> usize {
        buffer.len()
    }

    fn upload_index(&self, values: &[u32]) -> Result<CudaSlice<u32>, GpuError> {
        if values.is_empty() {
            return Ok(self.ctx.stream().alloc_zeros::<u32>(1)?);
        }
        Ok(self.ctx.stream().clone_htod(values)?)
    }

    fn upload_f32(&self, values: &[f32]) -> Result<CudaSlice<f32>, GpuError> {
        if values.is_empty() {
            return Ok(self.ctx.stream().alloc_zeros::<f32>(1)?);
        }
        Ok(self.ctx.stream().clone_htod(values)?)
    }

    fn scratch_act(&self, len: usize) -> Result<GpuBuffer, GpuError> {
        // SAFETY: run_grouped writes every element before reading it (the host reference
        // fills scratch with NaN to prove it).
        unsafe { GpuBuffer::scratch(self.ctx, len, self.act) }
    }

    fn scratch_f32(&self, len: usize) -> Result<CudaSlice<f32>, GpuError> {
        // SAFETY: as for scratch_act.
        Ok(unsafe { self.ctx.stream().alloc::<f32>(len.max(1))? })
    }

    fn gather(
        &self,
        rows: GroupedRows<'_, CudaSlice<f32>>,
        index: &CudaSlice<u32>,
        out: &mut GpuBuffer,
        slots: usize,
        hidden: usize,
    ) -> Result<(), GpuError> {
        let (stream, kernels) = (self.ctx.stream(), self.ctx.kernels());
        let (slots_i, hidden_i) = (as_int(slots, "slots")?, as_int(hidden, "hidden")?);
        if slots * hidden == 0 {
            return Ok(());
        }
        let rows = match rows {
            GroupedRows::F32(rows) => rows,
            GroupedRows::Bf16 { words, values } => {
                let GpuBuffer::Bf16(out) = out else {
                    return Err(GpuError::Shape(
                        "rows in bf16 feed only a bf16 GEMM input".into(),
                    ));
                };
                // SAFETY: read only, as bf16 bit patterns (any is one); `None` if `words`
                // holds fewer than `values` halves (run_grouped checked it does not).
                let halves = unsafe { words.transmute::<u16>(values) }
                    .ok_or_else(|| GpuError::Shape("bf16 rows beyond their buffer".into()))?;
                // SAFETY: run_grouped checked every index against the `values / hidden`
                // rows; `out` holds slots * hidden.
                unsafe {
                    stream
                        .launch_builder(&kernels.gather_bf16_rows)
                        .arg(&halves)
                        .arg(index)
                        .arg(out)
                        .arg(&slots_i)
                        .arg(&hidden_i)
                        .launch(row_grid(slots))?;
                }
                return Ok(());
            }
        };
        // SAFETY: run_grouped checked every index against `rows`; `out` holds slots * hidden.
        unsafe {
            match out {
                GpuBuffer::Bf16(out) => stream
                    .launch_builder(&kernels.gather_rows_bf16)
                    .arg(rows)
                    .arg(index)
                    .arg(out)
                    .arg(&slots_i)
                    .arg(&hidden_i)
                    .launch(row_grid(slots))?,
                GpuBuffer::F32(out) => stream
                    .launch_builder(&kernels.gather_rows_f32)
                    .arg(rows)
                    .arg(index)
                    .arg(out)
                    .arg(&slots_i)
                    .arg(&hidden_i)
                    .launch(row_grid(slots))?,
                GpuBuffer::Bf16Pair { hi, lo } => stream
                    .launch_builder(&kernels.gather_rows_bf16x2)
                    .arg(rows)
                    .arg(index)
                    .arg(hi)
                    .arg(lo)
                    .arg(&slots_i)
                    .arg(&hidden_i)
                    .launch(row_grid(slots))?,
                GpuBuffer::Fp8(_) => {
                    return Err(GpuError::Shape("activations are never FP8".into()))
                }
            };
        }
        Ok(())
    }

    fn fork(&self) -> Result<(), GpuError> {
        self.ctx.fork_lanes()
    }

    /// Our own grouped kernels (FP8 kept as FP8, or `--deterministic`) fuse SiLU-and-multiply
    /// into the gate/up pass; cuBLAS's GEMMs do not.
    fn fused_gate_up_silu(
        &self,
        experts: &[ExpertMatrices<'_, GpuBuffer>],
        plan: &ExpertRuns,
        input: &GpuBuffer,
        act: &mut GpuBuffer,
        hidden: usize,
        inter: usize,
    ) -> Result<bool, GpuError> {
        if !self.ctx.fused_silu() || experts.is_empty() {
            return Ok(false);
        }
        let silu = PassOutput::SiluMul(act);
        if self.tensor_core_pass(experts, plan, FfnPass::GateUp, input, silu, hidden, inter)? {
            return Ok(true);
        }
        let (GpuBuffer::F32(x), GpuBuffer::F32(act)) = (input, act) else {
            return Ok(false);
        };
        let tiles = || {
            GroupedRowTiles::plan(&plan.runs, FP8_TILE_ROWS)
                .map_err(|e| GpuError::Shape(e.to_string()))
        };
        let fp8: Option<Vec<&DeviceFp8Matrix>> = experts
            .iter()
            .map(|e| match e.gate_up {
                GpuBuffer::Fp8(m) => Some(&**m),
                _ => None,
            })
            .collect();
        if let Some(matrices) = fp8 {
            grouped_fp8(
                self.ctx,
                &matrices,
                x,
                &tiles()?,
                act,
                GroupedOutput::SiluMul,
            )?;
            return Ok(true);
        }
        let wide = |e: &ExpertMatrices<'_, GpuBuffer>| {
            matches!(e.gate_up, GpuBuffer::F32(_) | GpuBuffer::Bf16(_))
        };
        if self.ctx.deterministic() && experts.iter().all(wide) {
            let matrices: Vec<&GpuBuffer> = experts.iter().map(|e| e.gate_up).collect();
            let shape = (2 * inter, hidden);
            let silu = GroupedOutput::SiluMul;
            super::exact_gemm::grouped_writing(
                self.ctx,
                &matrices,
                shape,
                x,
                &tiles()?,
                act,
                silu,
            )?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Experts held as FP8 run in one launch per pass (`grouped_gemm_rows_fp8`: each output
    /// the same chain as one expert's own GEMM), bf16 experts on our tensor-core kernel
    /// (`--gpu-expert-gemm tensor-cores`); the others one cuBLAS GEMM each, or all in one
    /// grouped cuBLAS call (`--gpu-expert-gemm grouped`).
    fn expert_pass(
        &self,
        experts: &[ExpertMatrices<'_, GpuBuffer>],
        plan: &ExpertRuns,
        pass: FfnPass,
        input: &GpuBuffer,
        output: &mut CudaSlice<f32>,
        hidden: usize,
        inter: usize,
    ) -> Result<(), GpuError> {
        let fp8: Option<Vec<&DeviceFp8Matrix>> = experts
            .iter()
            .map(|e| match (pass, e.gate_up, e.down) {
                (FfnPass::GateUp, GpuBuffer::Fp8(m), _) | (FfnPass::Down, _, GpuBuffer::Fp8(m)) => {
                    Some(&**m)
                }
                _ => None,
            })
            .collect();
        let tiles = || {
            GroupedRowTiles::plan(&plan.runs, FP8_TILE_ROWS)
                .map_err(|e| GpuError::Shape(e.to_string()))
        };
        let products = PassOutput::Products(&mut *output);
        if self.tensor_core_pass(experts, plan, pass, input, products, hidden, inter)? {
            return Ok(());
        }
        match (fp8, input) {
            (Some(matrices), GpuBuffer::F32(x)) if !matrices.is_empty() => {
                grouped_matmul(self.ctx, &matrices, x, &tiles()?, output)
            }
            (_, GpuBuffer::F32(x)) if self.ctx.deterministic() && !experts.is_empty() => {
                let (matrices, shape): (Vec<&GpuBuffer>, _) = match pass {
                    FfnPass::GateUp => (
                        experts.iter().map(|e| e.gate_up).collect(),
                        (2 * inter, hidden),
                    ),
                    FfnPass::Down => (experts.iter().map(|e| e.down).collect(), (hidden, inter)),
                };
                super::exact_gemm::grouped(self.ctx, &matrices, shape, x, &tiles()?, output)
            }
            _ if self.ctx.grouped_expert_gemm()
                && !self.ctx.deterministic()
                && !experts
                    .iter()
                    .any(|e| matches!(e.of(pass), GpuBuffer::Fp8(_))) =>
            {
                let calls = expert_gemm_calls(plan, pass, hidden, inter);
                super::grouped_blas::grouped_pass(self.ctx, experts, &calls, pass, input, output)
            }
            _ => expert_gemms(self, experts, plan, pass, input, output, hidden, inter),
        }
    }

    fn join(&self) -> Result<(), GpuError> {
        self.ctx.join_lanes()
    }

    fn gemm(
        &self,
        lane: usize,
        g: &ColumnMajorGemm,
        a: &GpuBuffer,
        a_offset: usize,
        b: &GpuBuffer,
        b_offset: usize,
        c: &mut CudaSlice<f32>,
        c_offset: usize,
    ) -> Result<(), GpuError> {
        if let GpuBuffer::Fp8(weights) = a {
            return self.fp8_gemm(g, weights, a_offset, b, b_offset, c, c_offset);
        }
        if self.ctx.deterministic() {
            // On the main stream, which the lanes' fork and join order around it.
            let shape = StridedGemm::single(*g);
            let (a, b, c) = ((a, a_offset), (b, b_offset), (c, c_offset));
            return super::exact_gemm::strided(self.ctx, &shape, a, b, c);
        }
        check_gemm_bounds(g, g.extents(), (a, a_offset), (b, b_offset), (c, c_offset))?;
        // Pointers are taken on the main stream (where the buffers live); the lane's stream
        // is ordered after it by `fork` and before its later work by `join`.
        let stream = self.ctx.stream();
        let lanes = self.ctx.lanes();
        let handle = match lanes.get(lane % lanes.len().max(1)) {
            Some(l) => *l.blas.handle(),
            None => *self.ctx.blas().handle(),
        };
        let shape = StridedGemm::single(*g);
        // SAFETY: the extents were checked against the live buffers above, and the work is
        // queued on the handle's own stream.
        unsafe {
            gemm_at(
                handle,
                stream,
                &shape,
                (a, a_offset),
                (b, b_offset),
                (c, c_offset),
            )
        }
    }

    fn silu_mul(
        &self,
        gate_up: &CudaSlice<f32>,
        act: &mut GpuBuffer,
        slots: usize,
        inter: usize,
    ) -> Result<(), GpuError> {
        let (stream, kernels) = (self.ctx.stream(), self.ctx.kernels());
        let (slots_i, inter_i) = (as_int(slots, "slots")?, as_int(inter, "intermediate")?);
        if slots * inter == 0 {
            return Ok(());
        }
        // SAFETY: `gate_up` holds slots * 2 * inter, `act` slots * inter (run_grouped).
        unsafe {
            match act {
                GpuBuffer::Bf16(out) => stream
                    .launch_builder(&kernels.silu_mul_bf16)
                    .arg(gate_up)
                    .arg(out)
                    .arg(&slots_i)
                    .arg(&inter_i)
                    .launch(row_grid(slots))?,
                GpuBuffer::F32(out) => stream
                    .launch_builder(&kernels.silu_mul_f32)
                    .arg(gate_up)
                    .arg(out)
                    .arg(&slots_i)
                    .arg(&inter_i)
                    .launch(row_grid(slots))?,
                GpuBuffer::Bf16Pair { hi, lo } => stream
                    .launch_builder(&kernels.silu_mul_bf16x2)
                    .arg(gate_up)
                    .arg(hi)
                    .arg(lo)
                    .arg(&slots_i)
                    .arg(&inter_i)
                    .launch(row_grid(slots))?,
                GpuBuffer::Fp8(_) => {
                    return Err(GpuError::Shape("activations are never FP8".into()))
                }
            };
        }
        Ok(())
    }

    fn scatter_weighted(
        &self,
        out: &CudaSlice<f32>,
        pair: &CudaSlice<u32>,
        weight: &CudaSlice<f32>,
        pair_out: &mut CudaSlice<f32>,
        slots: usize,
        hidden: usize,
    ) -> Result<(), GpuError> {
        let (slots_i, hidden_i) = (as_int(slots, "slots")?, as_int(hidden, "hidden")?);
        if slots * hidden == 0 {
            return Ok(());
        }
        // SAFETY: run_grouped checked every pair index against the pair count.
        unsafe {
            self.ctx
                .stream()
                .launch_builder(&self.ctx.kernels().scatter_weighted)
                .arg(out)
                .arg(pair)
                .arg(weight)
                .arg(pair_out)
                .arg(&slots_i)
                .arg(&hidden_i)
                .launch(row_grid(slots))?;
        }
        Ok(())
    }
}

/// [`gemm_f32_out`] from element offsets into A, B and C, addressed on `stream` (where the
/// buffers live).
///
/// # Safety
/// The offsets were checked with [`check_gemm_bounds`], and the handle's stream is ordered
/// after the work that writes A and B and before the work that reads C.
pub(crate) unsafe fn gemm_at(
    handle: cudarc::cublas::sys::cublasHandle_t,
    stream: &CudaStream,
    shape: &StridedGemm,
    (a, a_offset): (&GpuBuffer, usize),
    (b, b_offset): (&GpuBuffer, usize),
    (c, c_offset): (&mut CudaSlice<f32>, usize),
) -> Result<(), GpuError> {
    let c_ptr = c.device_ptr_mut(stream).0 + c_offset as u64 * 4;
    // SAFETY: passed on from the caller.
    unsafe {
        gemm_f32_out(
            handle,
            shape,
            (a, a.address(stream, a_offset)),
            (
                b,
                b.address(stream, b_offset),
                b.lo_address(stream, b_offset),
            ),
            c_ptr,
        )
    }
}

/// `C = op(A) · op(B)` in cuBLAS (f32 out, alpha 1, beta 0), strided-batched when
/// `shape.batch > 1`. f32 inputs keep `COMPUTE_32F` (no TF32); bf16 inputs run on the tensor
/// cores with f32 accumulation.
///
/// # Safety
/// The pointers must address live device buffers holding `shape.extents()` from them, usable
/// on the handle's stream.
pub(crate) unsafe fn gemm_f32_out(
    handle: cudarc::cublas::sys::cublasHandle_t,
    shape: &StridedGemm,
    (a, a_ptr): (&GpuBuffer, u64),
    (b, b_ptr, b_lo_ptr): (&GpuBuffer, u64, Option<u64>),
    c_ptr: u64,
) -> Result<(), GpuError> {
    if a.data_type() != b.data_type()
        || matches!(a, GpuBuffer::Bf16Pair { .. } | GpuBuffer::Fp8(_))
        || matches!(b, GpuBuffer::Fp8(_))
    {
        return Err(GpuError::Shape("GEMM inputs of different dtypes".into()));
    }
    // SAFETY: passed on from the caller; `C = A·hi`, then `C += A·lo` for a pair.
    unsafe {
        one_gemm(handle, shape, (a, a_ptr), (b, b_ptr), c_ptr, 0.0)?;
        if let Some(lo) = b_lo_ptr {
            one_gemm(handle, shape, (a, a_ptr), (b, lo), c_ptr, 1.0)?;
        }
    }
    Ok(())
}

/// One cuBLAS call of [`gemm_f32_out`], with `beta` (0: overwrite C, 1: add to it).
///
/// # Safety
/// As for [`gemm_f32_out`].
unsafe fn one_gemm(
    handle: cudarc::cublas::sys::cublasHandle_t,
    shape: &StridedGemm,
    (a, a_ptr): (&GpuBuffer, u64),
    (b, b_ptr): (&GpuBuffer, u64),
    c_ptr: u64,
    beta: f32,
) -> Result<(), GpuError> {
    let g = &shape.gemm;
    let op = |t: bool| {
        if t {
            cublasOperation_t::CUBLAS_OP_T
        } else {
            cublasOperation_t::CUBLAS_OP_N
        }
    };
    let alpha = 1.0f32;
    let (m, n, k) = (as_int(g.m, "m")?, as_int(g.n, "n")?, as_int(g.k, "k")?);
    let (lda, ldb, ldc) = (
        as_int(g.lda, "lda")?,
        as_int(g.ldb, "ldb")?,
        as_int(g.ldc, "ldc")?,
    );
    let alpha = (&alpha) as *const f32 as *const _;
    let beta = (&beta) as *const f32 as *const _;
    let compute = cublasComputeType_t::CUBLAS_COMPUTE_32F;
    let algo = cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT;
    let f32_out = cudaDataType::CUDA_R_32F;
    // SAFETY: the caller vouches for the buffers.
    unsafe {
        if shape.batch <= 1 {
            cudarc::cublas::result::gemm_ex(
                handle,
                op(g.transpose_a),
                op(g.transpose_b),
                m,
                n,
                k,
                alpha,
                a_ptr as *const _,
                a.data_type(),
                lda,
                b_ptr as *const _,
                b.data_type(),
                ldb,
                beta,
                c_ptr as *mut _,
                f32_out,
                ldc,
                compute,
                algo,
            )?;
        } else {
            cudarc::cublas::result::gemm_strided_batched_ex(
                handle,
                op(g.transpose_a),
                op(g.transpose_b),
                m,
                n,
                k,
                alpha,
                a_ptr as *const _,
                a.data_type(),
                lda,
                shape.stride_a as i64,
                b_ptr as *const _,
                b.data_type(),
                ldb,
                shape.stride_b as i64,
                beta,
                c_ptr as *mut _,
                f32_out,
                ldc,
                shape.stride_c as i64,
                as_int(shape.batch, "batch")?,
                compute,
                algo,
            )?;
        }
    }
    Ok(())
}

/// Runs a routed batch whose rows are already on the device (see
/// [`crate::grouped_ffn::run_grouped`]); `experts[i]` serves `plan.runs[i]`.
pub fn run_grouped_on_device(
    ctx: &GpuContext,
    experts: &[&GpuMlp],
    rows: GroupedRows<'_, CudaSlice<f32>>,
    plan: &ExpertRuns,
    weights: &[f32],
) -> Result<CudaSlice<f32>, GpuError> {
    let Some(batch) = ExpertBatch::of(ctx, experts)? else {
        return Ok(ctx.stream().alloc_zeros::<f32>(1)?);
    };
    run_grouped(
        &CudaOps {
            ctx,
            act: batch.act,
        },
        &batch.matrices,
        rows,
        plan,
        weights,
        batch.hidden,
        batch.inter,
    )
}

/// The experts of one batch, checked to share a shape and a precision.
pub(crate) struct ExpertBatch<'a> {
    pub matrices: Vec<ExpertMatrices<'a, GpuBuffer>>,
    pub act: ActForm,
    pub hidden: usize,
    pub inter: usize,
}

impl<'a> ExpertBatch<'a> {
    /// `None` for no experts.
    pub fn of(ctx: &GpuContext, experts: &[&'a GpuMlp]) -> Result<Option<Self>, GpuError> {
        let Some(first) = experts.first() else {
            return Ok(None);
        };
        let (hidden, inter) = (first.hidden, first.intermediate);
        let act = ActForm::for_weights(ctx, &first.gate_up);
        if experts.iter().any(|e| {
            e.hidden != hidden
                || e.intermediate != inter
                || ActForm::for_weights(ctx, &e.gate_up) != act
                || ActForm::for_weights(ctx, &e.down) != act
        }) {
            return Err(GpuError::Shape(
                "experts of different shapes or precisions in one batch".into(),
            ));
        }
        let matrices = experts
            .iter()
            .map(|e| ExpertMatrices {
                gate_up: &e.gate_up,
                down: &e.down,
            })
            .collect();
        Ok(Some(Self {
            matrices,
            act,
            hidden,
            inter,
        }))
    }
}

/// Host-side entry: uploads `rows`, runs the batch, downloads `[pairs, hidden]`.
pub fn run_from_host(
    ctx: &GpuContext,
    experts: &[&GpuMlp],
    rows: GroupedRows<'_, [f32]>,
    plan: &ExpertRuns,
    weights: &[f32],
    hidden: usize,
) -> Result<Vec<f32>, GpuError> {
    let _serial = ctx.lock()?;
    let stream = ctx.stream();
    let device_rows = match rows {
        GroupedRows::F32(rows) | GroupedRows::Bf16 { words: rows, .. } => {
            stream.clone_htod(rows)?
        }
    };
    let rows = match rows {
        GroupedRows::F32(_) => GroupedRows::F32(&device_rows),
        GroupedRows::Bf16 { values, .. } => GroupedRows::Bf16 {
            words: &device_rows,
            values,
        },
    };
    let pair_out = run_grouped_on_device(ctx, experts, rows, plan, weights)?;
    let mut host = stream.clone_dtoh(&pair_out)?;
    stream.synchronize()?;
    host.truncate(weights.len() * hidden);
    Ok(host)
}
