//! The dense part's primitive steps on CUDA ([`DenseOps`]): cuBLAS (strided-batched) GEMMs and
//! the NVRTC kernels of `kernels.cu`, all on the context's main stream. The orchestration is
//! [`crate::device_dense::DeviceDenseModel`], tested through a host reference; only these
//! launches need a GPU to be checked (`ops/gpu-check.sh`).
//!
//! Each step takes the context's lock for its own calls only: the lock must not be held while
//! the routed experts run (a GPU expert set on the same context takes it too).

use std::sync::Arc;

use cudarc::driver::{CudaFunction, CudaSlice, DevicePtr, LaunchArgs, LaunchConfig, PushKernelArg};

use super::buffer::{check_gemm_bounds, GpuBuffer};
use super::context::GpuContext;
use super::error::GpuError;
use super::expert_ffn::gemm_at;
use super::fp8_matrix::DeviceFp8Matrix;
use super::kernels::{as_int, grid, row_grid};
use super::segment_graphs::SegmentGraphs;
use crate::backend::weight::Fp8Matrix;
use crate::checkpoint::Checkpoint;
use crate::config::{Gating, ModelConfig};
use crate::dense_step::{DenseStep, StepSequence};
use crate::device::shapes::{AttentionSpec, HeadView, StridedGemm};
use crate::device::GpuDtype;
use crate::device::MatrixPrecision;
use crate::device_dense::ops::{linear_by_gemm, DenseOps, DeviceStep, SegmentKey};
use crate::device_dense::DeviceDenseModel;
use crate::expert_backend::ExpertBackend;
use crate::layers::gate::GateRule;
use crate::logit_adjust::{flatten_row_edits, RowEdits};
use crate::race::RowRace;
use crate::token_mask::RowMask;

/// Threads of the attention kernel's blocks and the widest output it handles.
const ATTENTION_THREADS: u32 = 128;
const ATTENTION_MAX_DV: usize = 128 * 8;
const NORM_THREADS: u32 = 256;

pub struct CudaDenseOps {
    ctx: Arc<GpuContext>,
    /// `--gpu-fp8 keep`: FP8 checkpoint matrices stay FP8 on the device.
    keep_fp8: bool,
    /// Decode segments as CUDA graphs (`--cuda-graphs`).
    graphs: SegmentGraphs,
    /// Device tables of KV pool chunk addresses, by their contents: uploaded once, so a
    /// captured launch finds its table at the same place at every replay (a pool that grows
    /// gets a new table, and its decode segments a new generation).
    chunk_tables: std::sync::Mutex<std::collections::HashMap<Vec<u64>, Arc<CudaSlice<u64>>>>,
}

impl CudaDenseOps {
    /// Holds FP8 matrices as the process's `--gpu-fp8` says.
    pub fn new(ctx: Arc<GpuContext>) -> Self {
        let keep_fp8 = crate::device::process_gpu_fp8() == crate::device::GpuFp8::Keep;
        Self::holding_fp8(ctx, keep_fp8)
    }

    /// FP8 matrices kept as FP8 (`keep_fp8`) or widened at load.
    pub fn holding_fp8(ctx: Arc<GpuContext>, keep_fp8: bool) -> Self {
        Self {
            ctx,
            keep_fp8,
            graphs: SegmentGraphs::default(),
            chunk_tables: Default::default(),
        }
    }

    /// The decode segments' graphs (counters for tests and benchmarks).
    pub fn graphs(&self) -> &SegmentGraphs {
        &self.graphs
    }
}

fn int(value: usize, what: &str) -> Result<i32, GpuError> {
    as_int(value, what)
}

fn long(value: usize) -> i64 {
    value as i64
}

/// One block per item (rows x heads), up to the grid's x limit.
fn blocks(items: usize, threads: u32) -> Result<LaunchConfig, GpuError> {
    let n = u32::try_from(items.max(1))
        .ok()
        .filter(|&n| n < i32::MAX as u32)
        .ok_or_else(|| GpuError::Shape(format!("{items} blocks exceed the grid")))?;
    Ok(LaunchConfig {
        grid_dim: (n, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// A [`HeadView`] as the kernels take it: three parameters, the offset (64-bit), the row
/// stride and the head stride.
struct ViewArgs {
    offset: i64,
    row_stride: i32,
    head_stride: i32,
}

impl ViewArgs {
    fn of(view: HeadView) -> Result<Self, GpuError> {
        Ok(Self {
            offset: long(view.offset),
            row_stride: int(view.row_stride, "row stride")?,
            head_stride: int(view.head_stride, "head stride")?,
        })
    }
}

// SAFETY: pushes the three fields, in the kernels' parameter order, as the plain scalars that
// cudarc's own impls push; they live as long as the borrow the launch holds.
unsafe impl<'a, 'b: 'a> PushKernelArg<&'b ViewArgs> for LaunchArgs<'a> {
    fn arg(&mut self, view: &'b ViewArgs) -> &mut Self {
        self.arg(&view.offset)
            .arg(&view.row_stride)
            .arg(&view.head_stride)
    }
}

fn shape_error(what: &str) -> GpuError {
    GpuError::Shape(format!("dense step out of bounds: {what}"))
}

impl CudaDenseOps {
    /// A copy of `x[..len]` as an f32 GEMM input. Called with the context locked.
    fn f32_input(&self, x: &CudaSlice<f32>, len: usize) -> Result<GpuBuffer, GpuError> {
        let stream = self.ctx.stream();
        // SAFETY: filled in full by the copy below.
        let mut out = unsafe { stream.alloc::<f32>(len.max(1))? };
        if len > 0 {
            stream.memcpy_dtod(&x.slice(..len), &mut out.slice_mut(..len))?;
        }
        Ok(GpuBuffer::F32(out))
    }

    /// `dst[..values.len()] = values`, from host memory.
    fn write_prefix<T: cudarc::driver::DeviceRepr>(
        &self,
        values: &[T],
        dst: &mut CudaSlice<T>,
    ) -> Result<(), GpuError> {
        let _serial = self.ctx.lock()?;
        if values.len() > dst.len() {
            return Err(shape_error("write"));
        }
        if !values.is_empty() {
            let stream = self.ctx.stream();
            stream.memcpy_htod(values, &mut dst.slice_mut(..values.len()))?;
        }
        Ok(())
    }

    /// The device table of `buffers`' addresses (KV pool chunks), made once per contents.
    fn pointers(&self, buffers: &[&CudaSlice<f32>]) -> Result<Arc<CudaSlice<u64>>, GpuError> {
        let stream = self.ctx.stream();
        let mut ptrs: Vec<u64> = buffers.iter().map(|b| b.device_ptr(stream).0).collect();
        if ptrs.is_empty() {
            ptrs.push(0);
        }
        let mut tables = self.chunk_tables.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(table) = tables.get(&ptrs) {
            return Ok(Arc::clone(table));
        }
        let table = Arc::new(stream.clone_htod(&ptrs)?);
        tables.insert(ptrs, Arc::clone(&table));
        Ok(table)
    }
}

impl DenseOps for CudaDenseOps {
    type F32 = CudaSlice<f32>;
    type Matrix = GpuBuffer;
    type Index = CudaSlice<u32>;
    type Error = GpuError;

    fn len_of(&self, buffer: &CudaSlice<f32>) -> usize {
        buffer.len()
    }

    fn keeps_fp8(&self) -> bool {
        self.keep_fp8
    }

    fn upload_fp8(&self, matrix: &Fp8Matrix) -> Result<GpuBuffer, GpuError> {
        self.upload_fp8_heads(std::slice::from_ref(matrix))
    }

    fn upload_fp8_heads(&self, heads: &[Fp8Matrix]) -> Result<GpuBuffer, GpuError> {
        let _serial = self.ctx.lock()?;
        let held = DeviceFp8Matrix::upload_heads(&self.ctx, heads)?;
        Ok(GpuBuffer::Fp8(Box::new(held)))
    }

    /// FP8 matrices through the FP8 kernel (f32 inputs, each weight widened in the kernel),
    /// or on the tensor cores where the context runs them there (the mode's bf16 inputs); the
    /// others as cuBLAS GEMMs.
    fn linear(
        &self,
        x: &CudaSlice<f32>,
        rows: usize,
        k: usize,
        w: &GpuBuffer,
        n_out: usize,
    ) -> Result<CudaSlice<f32>, GpuError> {
        let GpuBuffer::Fp8(weights) = w else {
            return linear_by_gemm(self, x, rows, k, w, n_out);
        };
        if weights.cols() != k || weights.rows() != n_out {
            return Err(shape_error("FP8 linear"));
        }
        let mut out = self.scratch(rows * n_out)?;
        let _serial = self.ctx.lock()?;
        if super::tensor_core_gemm::tensor_cores_take(&self.ctx, w) {
            super::tensor_core_gemm::fp8_linear(&self.ctx, weights, x, rows, &mut out)?;
        } else {
            weights.matmul(&self.ctx, x, rows, &mut out)?;
        }
        Ok(out)
    }

    /// An expert set on this GPU's context runs the rows where the dense part left them, and
    /// its outputs stay there for the combine. The rows are complete before it reads them
    /// (it may queue on a stream of its own: the wait is the one a download made), and it
    /// returns once its outputs are.
    fn experts_in_place(
        &self,
        experts: &dyn crate::expert_backend::ExpertBackend,
        layer: usize,
        rows: &CudaSlice<f32>,
        routes: &crate::routes::ExpertRoutes,
    ) -> Option<crate::error::Result<CudaSlice<f32>>> {
        if let Err(e) = self.ctx.synchronize() {
            return Some(Err(e.into()));
        }
        experts.run_experts_on_device(layer, rows, routes)
    }

    fn experts_follow_choices(
        &self,
        experts: &dyn crate::expert_backend::ExpertBackend,
        layer: usize,
        num_experts: usize,
    ) -> crate::error::Result<bool> {
        experts.prepare_choices_on_device(layer, num_experts, &self.ctx)
    }

    fn run_chosen_experts(
        &self,
        experts: &dyn crate::expert_backend::ExpertBackend,
        layer: usize,
        normed: &CudaSlice<f32>,
        chosen: &CudaSlice<u32>,
        chosen_weights: &CudaSlice<f32>,
        rows: usize,
        top_k: usize,
        _hidden: usize,
        pair_out: &mut CudaSlice<f32>,
    ) -> crate::error::Result<()> {
        let choices = super::device_routes::DeviceChoices {
            experts: chosen,
            weights: chosen_weights,
            rows,
            top_k,
        };
        experts.run_choices_on_device(layer, normed, &choices, pair_out)
    }

    fn upload_f32(&self, values: &[f32]) -> Result<CudaSlice<f32>, GpuError> {
        let _serial = self.ctx.lock()?;
        if values.is_empty() {
            return Ok(self.ctx.stream().alloc_zeros::<f32>(1)?);
        }
        Ok(self.ctx.stream().clone_htod(values)?)
    }

    fn upload_index(&self, values: &[u32]) -> Result<CudaSlice<u32>, GpuError> {
        let _serial = self.ctx.lock()?;
        if values.is_empty() {
            return Ok(self.ctx.stream().alloc_zeros::<u32>(1)?);
        }
        Ok(self.ctx.stream().clone_htod(values)?)
    }

    fn upload_matrix(
        &self,
        values: &[f32],
        precision: MatrixPrecision,
    ) -> Result<GpuBuffer, GpuError> {
        let _serial = self.ctx.lock()?;
        GpuBuffer::upload_as(&self.ctx, values, precision.in_bf16(self.ctx.dtype()))
    }

    fn download(&self, buffer: &CudaSlice<f32>, len: usize) -> Result<Vec<f32>, GpuError> {
        let _serial = self.ctx.lock()?;
        if len > buffer.len() {
            return Err(shape_error("download"));
        }
        if len == 0 {
            return Ok(Vec::new());
        }
        let stream = self.ctx.stream();
        let host = stream.clone_dtoh(&buffer.slice(..len))?;
        stream.synchronize()?;
        Ok(host)
    }

    fn scratch(&self, len: usize) -> Result<CudaSlice<f32>, GpuError> {
        let _serial = self.ctx.lock()?;
        // SAFETY: the orchestration writes every element before reading it (the host
        // reference fills scratch with NaN to prove it).
        Ok(unsafe { self.ctx.stream().alloc::<f32>(len.max(1))? })
    }

    fn copy_prefix(
        &self,
        src: &CudaSlice<f32>,
        dst: &mut CudaSlice<f32>,
        len: usize,
    ) -> Result<(), GpuError> {
        let _serial = self.ctx.lock()?;
        if len > src.len() || len > dst.len() {
            return Err(shape_error("copy"));
        }
        if len > 0 {
            self.ctx
                .stream()
                .memcpy_dtod(&src.slice(..len), &mut dst.slice_mut(..len))?;
        }
        Ok(())
    }

    fn gemm_input(
        &self,
        x: &CudaSlice<f32>,
        len: usize,
        like: &GpuBuffer,
    ) -> Result<GpuBuffer, GpuError> {
        let _serial = self.ctx.lock()?;
        if len > x.len() {
            return Err(shape_error("GEMM input"));
        }
        let stream = self.ctx.stream();
        // The exact GEMMs take f32 activations against every weight type.
        match like {
            _ if self.ctx.deterministic() => self.f32_input(x, len),
            GpuBuffer::F32(_) => self.f32_input(x, len),
            GpuBuffer::Bf16(_) if self.ctx.dtype() == GpuDtype::Bf16x2 => {
                // SAFETY: the kernel writes all `len` elements of both terms.
                let (mut hi, mut lo) = unsafe {
                    (
                        stream.alloc::<u16>(len.max(1))?,
                        stream.alloc::<u16>(len.max(1))?,
                    )
                };
                if len > 0 {
                    let n = long(len);
                    // SAFETY: `x` holds at least `len` values, `hi` and `lo` exactly `len`.
                    unsafe {
                        stream
                            .launch_builder(&self.ctx.kernels().convert_f32_to_bf16x2)
                            .arg(x)
                            .arg(&mut hi)
                            .arg(&mut lo)
                            .arg(&n)
                            .launch(grid(len))?;
                    }
                }
                Ok(GpuBuffer::Bf16Pair { hi, lo })
            }
            GpuBuffer::Bf16(_) => {
                // SAFETY: the kernel writes all `len` elements.
                let mut out = unsafe { stream.alloc::<u16>(len.max(1))? };
                if len > 0 {
                    let n = long(len);
                    // SAFETY: `x` holds at least `len` values, `out` exactly `len`.
                    unsafe {
                        stream
                            .launch_builder(&self.ctx.kernels().convert_f32_to_bf16)
                            .arg(x)
                            .arg(&mut out)
                            .arg(&n)
                            .launch(grid(len))?;
                    }
                }
                Ok(GpuBuffer::Bf16(out))
            }
            GpuBuffer::Bf16Pair { .. } => Err(GpuError::Shape(
                "a GEMM input cannot be shaped like an activation pair".into(),
            )),
            // The FP8 kernels take f32 inputs.
            GpuBuffer::Fp8(_) => self.f32_input(x, len),
        }
    }

    fn gemm(
        &self,
        s: &StridedGemm,
        a: &GpuBuffer,
        a_offset: usize,
        b: &GpuBuffer,
        b_offset: usize,
        c: &mut CudaSlice<f32>,
        c_offset: usize,
    ) -> Result<(), GpuError> {
        let _serial = self.ctx.lock()?;
        check_gemm_bounds(s, s.extents(), (a, a_offset), (b, b_offset), (c, c_offset))?;
        if let GpuBuffer::Fp8(weights) = a {
            // FP8 weights (MLA's per-head kv_b halves) on the tensor cores where the context
            // runs FP8 there, through their own exact kernel otherwise.
            let GpuBuffer::F32(x) = b else {
                return Err(shape_error("FP8 GEMM input"));
            };
            if a_offset != 0 {
                return Err(shape_error("FP8 GEMM from an offset into the weights"));
            }
            if super::tensor_core_gemm::tensor_cores_take_heads(&self.ctx, weights) {
                let (x, c) = ((x, b_offset), (c, c_offset));
                return super::tensor_core_gemm::fp8_strided(&self.ctx, weights, s, x, c);
            }
            return weights.strided_matmul(&self.ctx, s, (x, b_offset), (c, c_offset));
        }
        let g = &s.gemm;
        if g.m == 0 || g.n == 0 || s.batch == 0 {
            return Ok(());
        }
        if self.ctx.deterministic() {
            let (a, b, c) = ((a, a_offset), (b, b_offset), (c, c_offset));
            return super::exact_gemm::strided(&self.ctx, s, a, b, c);
        }
        let stream = self.ctx.stream();
        let handle = *self.ctx.blas().handle();
        // SAFETY: the extents were checked against the live buffers above; the handle is
        // bound to the main stream, where every buffer here is used.
        unsafe {
            gemm_at(
                handle,
                stream,
                s,
                (a, a_offset),
                (b, b_offset),
                (c, c_offset),
            )
        }
    }

    fn rms_norm(
        &self,
        x: &CudaSlice<f32>,
        x_view: HeadView,
        weight: &CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
        out_view: HeadView,
        rows: usize,
        heads: usize,
        width: usize,
        eps: f32,
    ) -> Result<(), GpuError> {
        let _serial = self.ctx.lock()?;
        if x_view.end(rows, heads, width) > x.len()
            || out_view.end(rows, heads, width) > out.len()
            || weight.len() < width
        {
            return Err(shape_error("RMSNorm"));
        }
        if rows * heads * width == 0 {
            return Ok(());
        }
        let (x_at, out_at) = (ViewArgs::of(x_view)?, ViewArgs::of(out_view)?);
        let args = (
            int(rows, "rows")?,
            int(heads, "heads")?,
            int(width, "width")?,
        );
        // SAFETY: both views were checked against their buffers above.
        unsafe {
            self.ctx
                .stream()
                .launch_builder(&self.ctx.kernels().rms_norm_heads)
                .arg(x)
                .arg(&x_at)
                .arg(weight)
                .arg(out)
                .arg(&out_at)
                .arg(&args.0)
                .arg(&args.1)
                .arg(&args.2)
                .arg(&eps)
                .launch(blocks(rows * heads, NORM_THREADS)?)?;
        }
        Ok(())
    }

    fn rope(
        &self,
        x: &CudaSlice<f32>,
        x_view: HeadView,
        out: &mut CudaSlice<f32>,
        out_view: HeadView,
        heads: usize,
        width: usize,
        interleaved: bool,
        step: &DeviceStep<Self>,
    ) -> Result<(), GpuError> {
        let _serial = self.ctx.lock()?;
        let (rows, half) = (step.rows, step.rope_half);
        if 2 * half > width
            || x_view.end(rows, heads, width) > x.len()
            || out_view.end(rows, heads, width) > out.len()
            || step.cos.len() < rows * half
        {
            return Err(shape_error("rotary"));
        }
        // A thread per turned pair and per copied value.
        let per_head = width - half;
        if rows * heads * per_head == 0 {
            return Ok(());
        }
        let (x_at, out_at) = (ViewArgs::of(x_view)?, ViewArgs::of(out_view)?);
        let args = (
            int(rows, "rows")?,
            int(heads, "heads")?,
            int(half, "rope half")?,
            i32::from(interleaved),
            int(width, "rope width")?,
        );
        // SAFETY: both views were checked against their buffers, the table against the rows.
        unsafe {
            self.ctx
                .stream()
                .launch_builder(&self.ctx.kernels().rope_heads)
                .arg(x)
                .arg(&x_at)
                .arg(out)
                .arg(&out_at)
                .arg(&step.cos)
                .arg(&step.sin)
                .arg(&args.0)
                .arg(&args.1)
                .arg(&args.2)
                .arg(&args.3)
                .arg(&args.4)
                .launch(grid(rows * heads * per_head))?;
        }
        Ok(())
    }

    fn silu_mul(
        &self,
        gate_up: &CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
        rows: usize,
        inter: usize,
    ) -> Result<(), GpuError> {
        let _serial = self.ctx.lock()?;
        if gate_up.len() < rows * 2 * inter || out.len() < rows * inter {
            return Err(shape_error("SiLU"));
        }
        if rows * inter == 0 {
            return Ok(());
        }
        let (rows_i, inter_i) = (int(rows, "rows")?, int(inter, "intermediate")?);
        // SAFETY: sizes checked above.
        unsafe {
            self.ctx
                .stream()
                .launch_builder(&self.ctx.kernels().silu_mul_f32)
                .arg(gate_up)
                .arg(out)
                .arg(&rows_i)
                .arg(&inter_i)
                .launch(row_grid(rows))?;
        }
        Ok(())
    }

    fn add(
        &self,
        acc: &mut CudaSlice<f32>,
        x: &CudaSlice<f32>,
        len: usize,
    ) -> Result<(), GpuError> {
        let _serial = self.ctx.lock()?;
        if acc.len() < len || x.len() < len {
            return Err(shape_error("add"));
        }
        if len == 0 {
            return Ok(());
        }
        let n = long(len);
        // SAFETY: sizes checked above.
        unsafe {
            self.ctx
                .stream()
                .launch_builder(&self.ctx.kernels().add_f32)
                .arg(acc)
                .arg(x)
                .arg(&n)
                .launch(grid(len))?;
        }
        Ok(())
    }

    fn add_bias(
        &self,
        acc: &mut CudaSlice<f32>,
        bias: &CudaSlice<f32>,
        rows: usize,
        width: usize,
    ) -> Result<(), GpuError> {
        let _serial = self.ctx.lock()?;
        if acc.len() < rows * width || bias.len() < width {
            return Err(shape_error("bias"));
        }
        if rows * width == 0 {
            return Ok(());
        }
        let (n, w) = (long(rows * width), int(width, "bias width")?);
        // SAFETY: sizes checked above.
        unsafe {
            self.ctx
                .stream()
                .launch_builder(&self.ctx.kernels().add_bias_rows)
                .arg(acc)
                .arg(bias)
                .arg(&n)
                .arg(&w)
                .launch(grid(rows * width))?;
        }
        Ok(())
    }

    fn append_rows(
        &self,
        src: &CudaSlice<f32>,
        src_view: HeadView,
        width: usize,
        chunks: &mut [CudaSlice<f32>],
        cache_stride: usize,
        cache_offset: usize,
        step: &DeviceStep<Self>,
    ) -> Result<(), GpuError> {
        let rows = step.rows;
        if src_view.end(rows, 1, width) > src.len() || cache_offset + width > cache_stride {
            return Err(shape_error("append"));
        }
        // The orchestration took blocks for every sequence's new length and grew the pool to
        // hold them; the kernel trusts the block tables that far.
        let shared: Vec<&CudaSlice<f32>> = chunks.iter().collect();
        let ptrs = self.pointers(&shared)?;
        let _serial = self.ctx.lock()?;
        if rows * width == 0 {
            return Ok(());
        }
        let blocks = &step.blocks;
        let args = (
            long(src_view.offset),
            int(src_view.row_stride, "row stride")?,
            int(width, "width")?,
            int(cache_stride, "cache stride")?,
            int(cache_offset, "cache offset")?,
            int(rows, "rows")?,
            int(blocks.block_tokens, "block tokens")?,
            int(blocks.chunk_blocks, "chunk blocks")?,
        );
        // SAFETY: every chunk pointer is a live pool buffer; every row's block lies in a chunk
        // of it, with room for the row.
        unsafe {
            self.ctx
                .stream()
                .launch_builder(&self.ctx.kernels().append_rows)
                .arg(src)
                .arg(&args.0)
                .arg(&args.1)
                .arg(&args.2)
                .arg(&*ptrs)
                .arg(&blocks.table)
                .arg(&blocks.table_start)
                .arg(&args.6)
                .arg(&args.7)
                .arg(&args.3)
                .arg(&args.4)
                .arg(&step.row_seq)
                .arg(&step.row_pos)
                .arg(&args.5)
                .launch(grid(rows * width))?;
        }
        Ok(())
    }

    fn attention(
        &self,
        q: &CudaSlice<f32>,
        spec: &AttentionSpec,
        key_chunks: &[CudaSlice<f32>],
        value_chunks: &[CudaSlice<f32>],
        out: &mut CudaSlice<f32>,
        step: &DeviceStep<Self>,
    ) -> Result<(), GpuError> {
        let rows = step.rows;
        if spec.dv > ATTENTION_MAX_DV
            || spec.kv_heads == 0
            || !spec.heads.is_multiple_of(spec.kv_heads)
            || q.len() < rows * spec.heads * spec.dk
            || out.len() < rows * spec.heads * spec.dv
        {
            return Err(GpuError::Shape(format!(
                "attention of {} heads x {}/{} over {} kv heads (at most {ATTENTION_MAX_DV} \
                 values per head)",
                spec.heads, spec.dk, spec.dv, spec.kv_heads
            )));
        }
        let key_ptrs = self.pointers(&key_chunks.iter().collect::<Vec<_>>())?;
        let value_ptrs = self.pointers(&value_chunks.iter().collect::<Vec<_>>())?;
        let _serial = self.ctx.lock()?;
        if rows * spec.heads == 0 {
            return Ok(());
        }
        let paged = &step.blocks;
        let paging = (
            int(paged.block_tokens, "block tokens")?,
            int(paged.chunk_blocks, "chunk blocks")?,
        );
        let args = (
            int(rows, "rows")?,
            int(spec.heads, "heads")?,
            int(spec.kv_heads, "kv heads")?,
            int(spec.dk, "dk")?,
            int(spec.dv, "dv")?,
            int(spec.key_stride, "key stride")?,
            int(spec.value_stride, "value stride")?,
            int(spec.key_head_stride, "key head stride")?,
            int(spec.value_head_stride, "value head stride")?,
        );
        // SAFETY: q and out were sized above; every sequence's blocks hold its rows up to the
        // last position of the step (appended just before), in chunks of the pool given.
        unsafe {
            self.ctx
                .stream()
                .launch_builder(&self.ctx.kernels().attention_rows)
                .arg(q)
                .arg(&*key_ptrs)
                .arg(&*value_ptrs)
                .arg(&paged.table)
                .arg(&paged.table_start)
                .arg(&paging.0)
                .arg(&paging.1)
                .arg(&step.row_seq)
                .arg(&step.row_pos)
                .arg(out)
                .arg(&args.0)
                .arg(&args.1)
                .arg(&args.2)
                .arg(&args.3)
                .arg(&args.4)
                .arg(&args.5)
                .arg(&args.6)
                .arg(&args.7)
                .arg(&args.8)
                .arg(&spec.scale)
                .launch(blocks(rows * spec.heads, ATTENTION_THREADS)?)?;
        }
        Ok(())
    }

    fn top_k(
        &self,
        logits: &CudaSlice<f32>,
        correction_bias: Option<&CudaSlice<f32>>,
        rule: &GateRule,
        rows: usize,
    ) -> Result<(Vec<u32>, Vec<f32>), GpuError> {
        let len = rows * rule.top_k;
        if len == 0 {
            return Ok((Vec::new(), Vec::new()));
        }
        // SAFETY: written in full by the gate kernel before being read.
        let (mut experts, mut weights) = {
            let _serial = self.ctx.lock()?;
            let stream = self.ctx.stream();
            unsafe { (stream.alloc::<u32>(len)?, stream.alloc::<f32>(len)?) }
        };
        self.top_k_into(
            logits,
            correction_bias,
            rule,
            rows,
            &mut experts,
            &mut weights,
        )?;
        self.read_choices(&experts, &weights, len)
    }

    fn top_k_into(
        &self,
        logits: &CudaSlice<f32>,
        correction_bias: Option<&CudaSlice<f32>>,
        rule: &GateRule,
        rows: usize,
        experts: &mut CudaSlice<u32>,
        weights: &mut CudaSlice<f32>,
    ) -> Result<(), GpuError> {
        let _serial = self.ctx.lock()?;
        let (e, k) = (rule.num_experts, rule.top_k);
        if logits.len() < rows * e
            || k > e
            || correction_bias.is_some_and(|b| b.len() < e)
            || experts.len() < rows * k
            || weights.len() < rows * k
        {
            return Err(shape_error("gate"));
        }
        if rows * k == 0 {
            return Ok(());
        }
        let (mode, n_group, topk_group, norm, scaling) = match &rule.gating {
            Gating::SoftmaxTopK { norm_topk_prob } => (0, 1, 1, *norm_topk_prob, 1.0f32),
            Gating::SigmoidGroupLimited {
                n_group,
                topk_group,
                norm_topk_prob,
                routed_scaling_factor,
            } => (
                1,
                *n_group,
                *topk_group,
                *norm_topk_prob,
                *routed_scaling_factor,
            ),
        };
        if n_group == 0 || e % n_group != 0 || topk_group > n_group {
            return Err(shape_error("gate groups"));
        }
        let stream = self.ctx.stream();
        // SAFETY: scratch and outputs are written in full by the kernel before being read.
        let (mut scratch, mut flags) = unsafe {
            (
                stream.alloc::<f32>(rows * 2 * e)?,
                stream.alloc::<u8>(rows * (e + n_group))?,
            )
        };
        let args = (
            i32::from(correction_bias.is_some()),
            int(rows, "rows")?,
            int(e, "experts")?,
            int(k, "top_k")?,
            mode,
            int(n_group, "groups")?,
            int(topk_group, "top groups")?,
            i32::from(norm),
        );
        let bias = correction_bias.unwrap_or(logits);
        // SAFETY: logits hold rows x experts values; the bias (when flagged) experts values.
        unsafe {
            stream
                .launch_builder(&self.ctx.kernels().moe_gate_topk)
                .arg(logits)
                .arg(bias)
                .arg(&args.0)
                .arg(&mut scratch)
                .arg(&mut flags)
                .arg(experts)
                .arg(weights)
                .arg(&args.1)
                .arg(&args.2)
                .arg(&args.3)
                .arg(&args.4)
                .arg(&args.5)
                .arg(&args.6)
                .arg(&args.7)
                .arg(&scaling)
                .launch(grid(rows))?;
        }
        Ok(())
    }

    fn read_choices(
        &self,
        experts: &CudaSlice<u32>,
        weights: &CudaSlice<f32>,
        len: usize,
    ) -> Result<(Vec<u32>, Vec<f32>), GpuError> {
        let _serial = self.ctx.lock()?;
        if len > experts.len() || len > weights.len() {
            return Err(shape_error("choices"));
        }
        if len == 0 {
            return Ok((Vec::new(), Vec::new()));
        }
        let stream = self.ctx.stream();
        let experts = stream.clone_dtoh(&experts.slice(..len))?;
        let weights = stream.clone_dtoh(&weights.slice(..len))?;
        stream.synchronize()?;
        Ok((experts, weights))
    }

    fn write_f32(&self, values: &[f32], dst: &mut CudaSlice<f32>) -> Result<(), GpuError> {
        self.write_prefix(values, dst)
    }

    fn write_index(&self, values: &[u32], dst: &mut CudaSlice<u32>) -> Result<(), GpuError> {
        self.write_prefix(values, dst)
    }

    fn replays_segments(&self) -> bool {
        self.ctx.cuda_graphs()
    }

    fn will_capture(&self, key: SegmentKey) -> bool {
        self.ctx.cuda_graphs() && self.graphs.will_capture(key)
    }

    fn run_segment(
        &self,
        key: SegmentKey,
        work: &mut dyn FnMut() -> crate::error::Result<()>,
    ) -> crate::error::Result<()> {
        if !self.ctx.cuda_graphs() {
            return work();
        }
        self.graphs.run(&self.ctx, key, work)
    }

    fn combine_add(
        &self,
        hidden: &mut CudaSlice<f32>,
        pair_out: &CudaSlice<f32>,
        row_offsets: &CudaSlice<u32>,
        shared: Option<&CudaSlice<f32>>,
        rows: usize,
        width: usize,
    ) -> Result<(), GpuError> {
        let _serial = self.ctx.lock()?;
        if hidden.len() < rows * width
            || row_offsets.len() < rows + 1
            || shared.is_some_and(|s| s.len() < rows * width)
        {
            return Err(shape_error("combine"));
        }
        if rows * width == 0 {
            return Ok(());
        }
        let args = (
            i32::from(shared.is_some()),
            int(rows, "rows")?,
            int(width, "width")?,
        );
        let shared = shared.unwrap_or(pair_out);
        // SAFETY: the offsets came from the routes the pair outputs were computed for (the
        // orchestration checked their count against the pairs).
        unsafe {
            self.ctx
                .stream()
                .launch_builder(&self.ctx.kernels().combine_add)
                .arg(hidden)
                .arg(pair_out)
                .arg(row_offsets)
                .arg(shared)
                .arg(&args.0)
                .arg(&args.1)
                .arg(&args.2)
                .launch(grid(rows * width))?;
        }
        Ok(())
    }

    fn embed_rows(
        &self,
        table: &GpuBuffer,
        ids: &CudaSlice<u32>,
        out: &mut CudaSlice<f32>,
        n: usize,
        width: usize,
    ) -> Result<(), GpuError> {
        let kernels = self.ctx.kernels();
        match table {
            GpuBuffer::F32(t) => self.row_gather(&kernels.gather_rows_f32, t, ids, out, n, width),
            GpuBuffer::Bf16(t) => self.row_gather(&kernels.embed_rows_bf16, t, ids, out, n, width),
            GpuBuffer::Bf16Pair { .. } => Err(shape_error("embedding table held as a bf16 pair")),
            GpuBuffer::Fp8(_) => Err(shape_error("embedding table held as FP8")),
        }
    }

    fn gather_rows(
        &self,
        x: &CudaSlice<f32>,
        index: &CudaSlice<u32>,
        out: &mut CudaSlice<f32>,
        n: usize,
        width: usize,
    ) -> Result<(), GpuError> {
        self.row_gather(&self.ctx.kernels().gather_rows_f32, x, index, out, n, width)
    }

    fn ranked_top_k_rows(
        &self,
        x: &CudaSlice<f32>,
        rows: usize,
        width: usize,
        k: usize,
    ) -> Result<Vec<(u32, f32)>, GpuError> {
        let _serial = self.ctx.lock()?;
        if x.len() < rows * width || k > width {
            return Err(shape_error("ranked top-k"));
        }
        if rows * k == 0 {
            return Ok(Vec::new());
        }
        let stream = self.ctx.stream();
        let mut ids = stream.alloc_zeros::<u32>(rows * k)?;
        let mut values = stream.alloc_zeros::<f32>(rows * k)?;
        let (rows_i, width_i, k_i) = (int(rows, "rows")?, int(width, "width")?, int(k, "k")?);
        // SAFETY: `x` holds `rows` rows of `width` and `k <= width` (checked above), so every
        // pass finds a column; `ids` and `values` hold `k` per row.
        unsafe {
            stream
                .launch_builder(&self.ctx.kernels().ranked_top_k_rows)
                .arg(x)
                .arg(&rows_i)
                .arg(&width_i)
                .arg(&k_i)
                .arg(&mut ids)
                .arg(&mut values)
                .launch(row_grid(rows))?;
        }
        let ids = stream.clone_dtoh(&ids)?;
        let values = stream.clone_dtoh(&values)?;
        stream.synchronize()?;
        Ok(ids.into_iter().zip(values).collect())
    }

    fn race_rows(
        &self,
        x: &CudaSlice<f32>,
        rows: usize,
        width: usize,
        races: &[RowRace],
    ) -> Result<Vec<u32>, GpuError> {
        let _serial = self.ctx.lock()?;
        let fits = races
            .iter()
            .all(|r| (r.row as usize) < rows && r.race.is_valid());
        if x.len() < rows * width || width == 0 || !fits {
            return Err(shape_error("race"));
        }
        if races.is_empty() {
            return Ok(Vec::new());
        }
        let stream = self.ctx.stream();
        let row_ids: Vec<u32> = races.iter().map(|r| r.row).collect();
        let temperatures: Vec<f32> = races.iter().map(|r| r.race.temperature).collect();
        let top_ps: Vec<f32> = races.iter().map(|r| r.race.top_p).collect();
        let min_ps: Vec<f32> = races.iter().map(|r| r.race.min_p).collect();
        let keys: Vec<u64> = races.iter().map(|r| r.race.key).collect();
        let row_ids = stream.clone_htod(&row_ids)?;
        let temperatures = stream.clone_htod(&temperatures)?;
        let top_ps = stream.clone_htod(&top_ps)?;
        let min_ps = stream.clone_htod(&min_ps)?;
        let keys = stream.clone_htod(&keys)?;
        let mut ids = stream.alloc_zeros::<u32>(races.len())?;
        let (width_i, races_i) = (int(width, "width")?, int(races.len(), "races")?);
        // SAFETY: `x` holds `rows` rows of `width` and every race's row is below `rows`
        // (checked above); `row_ids`, `temperatures`, `top_ps`, `min_ps`, `keys` and `ids` hold one per
        // race; `row_grid` launches the 256 threads the kernel's summation order needs.
        unsafe {
            stream
                .launch_builder(&self.ctx.kernels().race_rows)
                .arg(x)
                .arg(&width_i)
                .arg(&races_i)
                .arg(&row_ids)
                .arg(&temperatures)
                .arg(&top_ps)
                .arg(&min_ps)
                .arg(&keys)
                .arg(&mut ids)
                .launch(row_grid(races.len()))?;
        }
        let host = stream.clone_dtoh(&ids)?;
        stream.synchronize()?;
        Ok(host)
    }

    fn mask_rows(
        &self,
        x: &mut CudaSlice<f32>,
        rows: usize,
        width: usize,
        masks: &[RowMask<'_>],
    ) -> Result<(), GpuError> {
        let _serial = self.ctx.lock()?;
        if x.len() < rows * width || masks.iter().any(|m| m.row as usize >= rows) {
            return Err(shape_error("grammar masks"));
        }
        if masks.is_empty() || width == 0 {
            return Ok(());
        }
        // Each mask's words, cut or padded with clear bits to the row.
        let per_row = width.div_ceil(32);
        let mut words = vec![0u32; masks.len() * per_row];
        for (out, m) in words.chunks_exact_mut(per_row).zip(masks) {
            let have = m.mask.words().len().min(per_row);
            out[..have].copy_from_slice(&m.mask.words()[..have]);
        }
        let row_ids: Vec<u32> = masks.iter().map(|m| m.row).collect();
        let stream = self.ctx.stream();
        let (row_ids, words) = (stream.clone_htod(&row_ids)?, stream.clone_htod(&words)?);
        let width_i = int(width, "width")?;
        let (count, per_row_i) = (int(masks.len(), "masks")?, int(per_row, "mask words")?);
        // SAFETY: every masked row is below `rows` (checked above), so the kernel writes
        // within `x`; `words` holds `per_row` words (one bit per column) for each mask.
        unsafe {
            stream
                .launch_builder(&self.ctx.kernels().mask_logit_rows)
                .arg(x)
                .arg(&width_i)
                .arg(&count)
                .arg(&row_ids)
                .arg(&words)
                .arg(&per_row_i)
                .launch(row_grid(masks.len()))?;
        }
        Ok(())
    }

    fn edit_rows(
        &self,
        x: &mut CudaSlice<f32>,
        rows: usize,
        width: usize,
        edits: &[RowEdits<'_>],
    ) -> Result<(), GpuError> {
        let _serial = self.ctx.lock()?;
        if x.len() < rows * width || edits.iter().any(|e| e.row as usize >= rows) {
            return Err(shape_error("logit edits"));
        }
        let (index, values) = flatten_row_edits(edits, width);
        let count = index.len() / 3;
        if count == 0 {
            return Ok(());
        }
        let stream = self.ctx.stream();
        let index = stream.clone_htod(&index)?;
        let values = stream.clone_htod(&values)?;
        let (width_i, count_i) = (int(width, "width")?, int(count, "logit edits")?);
        // SAFETY: each edit's row is below `rows` (checked above) and its id below `width`
        // (`flatten_row_edits` keeps only those), so every write lies in `x`; `index` and
        // `values` hold three entries per edit.
        unsafe {
            stream
                .launch_builder(&self.ctx.kernels().edit_logit_rows)
                .arg(x)
                .arg(&width_i)
                .arg(&count_i)
                .arg(&index)
                .arg(&values)
                .launch(grid(count))?;
        }
        Ok(())
    }

    fn argmax_rows(
        &self,
        x: &CudaSlice<f32>,
        rows: usize,
        width: usize,
    ) -> Result<Vec<u32>, GpuError> {
        let _serial = self.ctx.lock()?;
        if x.len() < rows * width || width == 0 {
            return Err(shape_error("argmax"));
        }
        if rows == 0 {
            return Ok(Vec::new());
        }
        let stream = self.ctx.stream();
        let mut ids = stream.alloc_zeros::<u32>(rows)?;
        let (rows_i, width_i) = (int(rows, "rows")?, int(width, "width")?);
        // SAFETY: `x` holds `rows` rows of `width` (checked above) and `ids` one per row.
        unsafe {
            stream
                .launch_builder(&self.ctx.kernels().argmax_rows)
                .arg(x)
                .arg(&rows_i)
                .arg(&width_i)
                .arg(&mut ids)
                .launch(row_grid(rows))?;
        }
        let host = stream.clone_dtoh(&ids)?;
        stream.synchronize()?;
        Ok(host)
    }
}

impl CudaDenseOps {
    /// `out[i] = src[index[i]]` for `[*, width]` rows, by `kernel` (which converts to f32).
    fn row_gather<T>(
        &self,
        kernel: &CudaFunction,
        src: &CudaSlice<T>,
        index: &CudaSlice<u32>,
        out: &mut CudaSlice<f32>,
        n: usize,
        width: usize,
    ) -> Result<(), GpuError> {
        let _serial = self.ctx.lock()?;
        if out.len() < n * width || index.len() < n {
            return Err(shape_error("gather"));
        }
        if n * width == 0 {
            return Ok(());
        }
        let (n_i, width_i) = (int(n, "rows")?, int(width, "width")?);
        // SAFETY: the indices are rows of `src` (the orchestration built them, or checked the
        // token ids against the vocabulary).
        unsafe {
            self.ctx
                .stream()
                .launch_builder(kernel)
                .arg(src)
                .arg(index)
                .arg(out)
                .arg(&n_i)
                .arg(&width_i)
                .launch(row_grid(n))?;
        }
        Ok(())
    }
}

/// The dense part on a GPU, as the router and the offline engine step it.
pub struct GpuDenseModel {
    inner: DeviceDenseModel<CudaDenseOps>,
    ctx: Arc<GpuContext>,
}

impl GpuDenseModel {
    pub fn load(
        ctx: Arc<GpuContext>,
        ckpt: &Checkpoint,
        config: &ModelConfig,
    ) -> crate::error::Result<Self> {
        let inner = DeviceDenseModel::load(CudaDenseOps::new(Arc::clone(&ctx)), ckpt, config)?;
        ctx.synchronize()?;
        Ok(Self { inner, ctx })
    }
}

impl DenseStep for GpuDenseModel {
    fn config(&self) -> &ModelConfig {
        self.inner.config()
    }

    fn forward(
        &self,
        seqs: &mut [StepSequence<'_>],
        experts: &dyn ExpertBackend,
    ) -> crate::error::Result<Vec<Vec<f32>>> {
        self.inner.forward(seqs, experts)
    }

    fn forward_picking(
        &self,
        seqs: &mut [StepSequence<'_>],
        experts: &dyn ExpertBackend,
        picks: &[crate::dense_step::Pick],
    ) -> crate::error::Result<Vec<crate::dense_step::StepOutput>> {
        self.inner.forward_picking(seqs, experts, picks)
    }

    /// From the pool the device cache follows (its blocks' numbers name device rows).
    fn new_cache(&self) -> crate::kv_cache::SequenceCache {
        self.inner.new_cache()
    }

    fn placement(&self) -> String {
        format!(
            "{} ({}, {})",
            self.ctx.device(),
            self.ctx.name(),
            self.ctx.dtype()
        )
    }
}

/// Each CUDA step against the host reference on the same inputs, then the whole dense model
/// on the fixtures. They need a GPU: without one they pass with a `SKIPPED` line, unless
/// `MOE_REQUIRE_GPU=1` (set by `ops/gpu-check.sh`) makes a missing GPU a failure.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::shapes::ColumnMajorGemm;
    use crate::device_dense::ops::CacheBlocks;
    use crate::device_dense::reference::{step_inputs, HostDenseOps};
    use crate::kv_cache::SequenceCache;

    use crate::test_support::test_context as gpu;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let x = (i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed);
                ((x >> 8) as f32 / (1 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn close(what: &str, gpu: &[f32], host: &[f32], tolerance: f32) {
        assert_eq!(gpu.len(), host.len(), "{what}: lengths");
        let worst = crate::compare::max_abs_diff(gpu, host);
        assert!(
            worst <= tolerance,
            "{what}: differs by {worst} (> {tolerance})"
        );
        eprintln!("{what}: max difference {worst:e}");
    }

    #[test]
    fn gpu_dense_steps_match_the_host_reference() {
        let Some(ctx) = gpu(GpuDtype::F32) else {
            return;
        };
        let (cuda, host) = (CudaDenseOps::new(Arc::clone(&ctx)), HostDenseOps::exact());
        let down = |b: &CudaSlice<f32>| cuda.download(b, b.len()).unwrap();

        // A step of two sequences: 3 rows of seq 0 at positions 4..7, 2 rows of seq 1 at 0..2.
        // Blocks of 4 positions, 3 per pool chunk: seq 0 in blocks 5 then 1 (a chunk apart,
        // out of order), seq 1 in block 3.
        let (rows, half) = (5usize, 8usize);
        let row_seq = [0u32, 0, 0, 1, 1];
        let row_pos = [4u32, 5, 6, 0, 1];
        let (table, table_start, block_tokens, chunk_blocks) = ([5u32, 1, 3], [0u32, 2], 4, 3);
        let (cos, sin) = (values(rows * half, 1), values(rows * half, 2));
        let step_c = DeviceStep::<CudaDenseOps> {
            rows,
            row_seq: cuda.upload_index(&row_seq).unwrap(),
            row_pos: cuda.upload_index(&row_pos).unwrap(),
            cos: cuda.upload_f32(&cos).unwrap(),
            sin: cuda.upload_f32(&sin).unwrap(),
            rope_half: half,
            blocks: CacheBlocks {
                table: cuda.upload_index(&table).unwrap(),
                table_start: cuda.upload_index(&table_start).unwrap(),
                block_tokens,
                chunk_blocks,
            },
        };
        let step_h = DeviceStep::<HostDenseOps> {
            rows,
            row_seq: row_seq.to_vec(),
            row_pos: row_pos.to_vec(),
            cos,
            sin,
            rope_half: half,
            blocks: CacheBlocks {
                table: table.to_vec(),
                table_start: table_start.to_vec(),
                block_tokens,
                chunk_blocks,
            },
        };

        // Strided-batched GEMM over a view (the MLA absorption's shape).
        let (heads, k, m, width) = (3usize, 16usize, 24usize, 3 * 20);
        let w = values(heads * m * k, 3);
        let x = values(rows * width, 4);
        let mut g = ColumnMajorGemm::rows_times_weights(rows, m, k);
        g.ldb = width;
        g.ldc = heads * m;
        let shape = StridedGemm {
            gemm: g,
            batch: heads,
            stride_a: m * k,
            stride_b: 20,
            stride_c: m,
        };
        let (wc, xc) = (
            cuda.upload_matrix(&w, MatrixPrecision::Narrow).unwrap(),
            cuda.upload_f32(&x).unwrap(),
        );
        let xc = cuda.gemm_input(&xc, x.len(), &wc).unwrap();
        let mut cc = cuda.scratch(rows * heads * m).unwrap();
        cuda.gemm(&shape, &wc, 0, &xc, 0, &mut cc, 0).unwrap();
        let mut ch = vec![0.0; rows * heads * m];
        let wh = host.upload_matrix(&w, MatrixPrecision::Narrow).unwrap();
        let xh = host.gemm_input(&x, x.len(), &wh).unwrap();
        host.gemm(&shape, &wh, 0, &xh, 0, &mut ch, 0).unwrap();
        close("strided-batched GEMM", &down(&cc), &ch, 1e-4);

        // RMSNorm of heads inside a wider row, rotary both layouts, out of place.
        let view = HeadView {
            offset: 2,
            row_stride: width,
            head_stride: 20,
        };
        let packed = HeadView::packed(0, heads, 2 * half);
        let nw = values(2 * half, 5);
        let mut nc = cuda.scratch(rows * heads * 2 * half).unwrap();
        let mut nh = vec![0.0; rows * heads * 2 * half];
        let xf = cuda.upload_f32(&x).unwrap();
        let nwc = cuda.upload_f32(&nw).unwrap();
        cuda.rms_norm(
            &xf,
            view,
            &nwc,
            &mut nc,
            packed,
            rows,
            heads,
            2 * half,
            1e-6,
        )
        .unwrap();
        host.rms_norm(&x, view, &nw, &mut nh, packed, rows, heads, 2 * half, 1e-6)
            .unwrap();
        close("RMSNorm", &down(&nc), &nh, 1e-5);
        for interleaved in [false, true] {
            let mut rc = cuda.scratch(rows * heads * 2 * half).unwrap();
            let mut rh = vec![0.0; rows * heads * 2 * half];
            cuda.rope(
                &xf,
                view,
                &mut rc,
                packed,
                heads,
                2 * half,
                interleaved,
                &step_c,
            )
            .unwrap();
            host.rope(
                &x,
                view,
                &mut rh,
                packed,
                heads,
                2 * half,
                interleaved,
                &step_h,
            )
            .unwrap();
            close(
                &format!("rotary (interleaved {interleaved})"),
                &down(&rc),
                &rh,
                1e-5,
            );
        }
        // GLM's partial rotary: values past the turned ones are copied as they are.
        let wide = 2 * half + 2;
        let packed_wide = HeadView::packed(0, heads, wide);
        let mut rc = cuda.scratch(rows * heads * wide).unwrap();
        let mut rh = vec![0.0; rows * heads * wide];
        cuda.rope(&xf, view, &mut rc, packed_wide, heads, wide, false, &step_c)
            .unwrap();
        host.rope(&x, view, &mut rh, packed_wide, heads, wide, false, &step_h)
            .unwrap();
        close("partial rotary", &down(&rc), &rh, 1e-5);
        for (r, h) in [(0, 0), (rows - 1, heads - 1)] {
            let at = (r * heads + h) * wide + 2 * half;
            let from = view.offset + r * view.row_stride + h * view.head_stride + 2 * half;
            assert_eq!(rh[at..at + 2], x[from..from + 2], "the pass-through values");
        }
        // A projection's bias on every row.
        let bias = values(width, 6);
        let mut bc = cuda.upload_f32(&x).unwrap();
        let mut bh = x.clone();
        cuda.add_bias(&mut bc, &cuda.upload_f32(&bias).unwrap(), rows, width)
            .unwrap();
        host.add_bias(&mut bh, &bias, rows, width).unwrap();
        assert_eq!(down(&bc), bh, "bias rows, bitwise");
        assert!(host.add_bias(&mut bh, &bias, rows + 1, width).is_err());

        // Append to the pool's two chunks (seq 0's first 4 positions already cached in block
        // 5), then GQA attention (4 query heads over 2 kv heads) through the block tables.
        let (qh, kvh, d) = (4usize, 2usize, 16usize);
        let kvw = kvh * d;
        let new_rows = values(rows * kvw, 6);
        let chunk_floats = chunk_blocks * block_tokens * kvw;
        let mut host_chunks = vec![values(chunk_floats, 7), values(chunk_floats, 17)];
        let mut cuda_chunks: Vec<CudaSlice<f32>> = host_chunks
            .iter()
            .map(|c| cuda.upload_f32(c).unwrap())
            .collect();
        let src_c = cuda.upload_f32(&new_rows).unwrap();
        let packed_rows = HeadView::packed(0, 1, kvw);
        cuda.append_rows(&src_c, packed_rows, kvw, &mut cuda_chunks, kvw, 0, &step_c)
            .unwrap();
        host.append_rows(
            &new_rows,
            packed_rows,
            kvw,
            &mut host_chunks,
            kvw,
            0,
            &step_h,
        )
        .unwrap();
        for (c, (dev, hostc)) in cuda_chunks.iter().zip(&host_chunks).enumerate() {
            close(&format!("append (chunk {c})"), &down(dev), hostc, 0.0);
        }
        let q = values(rows * qh * d, 8);
        let spec = AttentionSpec {
            heads: qh,
            kv_heads: kvh,
            dk: d,
            dv: d,
            key_stride: kvw,
            value_stride: kvw,
            key_head_stride: d,
            value_head_stride: d,
            scale: 0.25,
        };
        let qc = cuda.upload_f32(&q).unwrap();
        let mut oc = cuda.scratch(rows * qh * d).unwrap();
        let mut oh = vec![0.0; rows * qh * d];
        cuda.attention(&qc, &spec, &cuda_chunks, &cuda_chunks, &mut oc, &step_c)
            .unwrap();
        host.attention(&q, &spec, &host_chunks, &host_chunks, &mut oh, &step_h)
            .unwrap();
        close("attention", &down(&oc), &oh, 1e-5);

        // Gate top-k, both rules, on logits with a planted tie.
        let experts = 16;
        let mut logits = values(rows * experts, 9);
        logits[3] = logits[5];
        let lc = cuda.upload_f32(&logits).unwrap();
        let bias = values(experts, 10);
        let bc = cuda.upload_f32(&bias).unwrap();
        for gating in [
            Gating::SoftmaxTopK {
                norm_topk_prob: true,
            },
            Gating::SigmoidGroupLimited {
                n_group: 4,
                topk_group: 2,
                norm_topk_prob: true,
                routed_scaling_factor: 2.5,
            },
        ] {
            let rule = GateRule {
                gating,
                top_k: 4,
                num_experts: experts,
            };
            let (ec, wc) = cuda.top_k(&lc, Some(&bc), &rule, rows).unwrap();
            let routes_c =
                crate::device_dense::model::routes_from_choices(&ec, &wc, 4, rows).unwrap();
            let routes_h = rule.select(&logits, Some(&bias));
            assert_eq!(routes_c.experts, routes_h.experts, "{:?}", rule.gating);
            close("gate weights", &routes_c.weights, &routes_h.weights, 1e-6);
        }

        // Combine in pair order plus shared experts; gather rows.
        let width = 12;
        let offsets = [0u32, 2, 3, 3, 5, 6];
        let pairs = values(6 * width, 11);
        let shared = values(rows * width, 12);
        let hidden = values(rows * width, 13);
        let mut hc = cuda.upload_f32(&hidden).unwrap();
        let mut hh = hidden.clone();
        cuda.combine_add(
            &mut hc,
            &cuda.upload_f32(&pairs).unwrap(),
            &cuda.upload_index(&offsets).unwrap(),
            Some(&cuda.upload_f32(&shared).unwrap()),
            rows,
            width,
        )
        .unwrap();
        host.combine_add(
            &mut hh,
            &pairs,
            &offsets.to_vec(),
            Some(&shared),
            rows,
            width,
        )
        .unwrap();
        close("combine", &down(&hc), &hh, 0.0);
        let index = [4u32, 0, 2];
        let mut gc = cuda.scratch(3 * width).unwrap();
        let mut gh = vec![0.0; 3 * width];
        cuda.gather_rows(&hc, &cuda.upload_index(&index).unwrap(), &mut gc, 3, width)
            .unwrap();
        host.gather_rows(&hh, &index.to_vec(), &mut gh, 3, width)
            .unwrap();
        close("gather", &down(&gc), &gh, 0.0);
        // The argmax of rows wider than a block: a tie across threads (the lower wins), a NaN
        // first value (it wins), later NaNs (never), -0 against +0 (the earlier), all -inf.
        let wide = 1000;
        let mut logits = values(6 * wide, 15);
        logits[7] = 5.0;
        logits[700] = 5.0;
        logits[wide] = f32::NAN;
        logits[wide + 3] = 9.0;
        logits[2 * wide + 1] = f32::NAN;
        logits[2 * wide + 900] = 7.0;
        for v in &mut logits[3 * wide..4 * wide] {
            *v = -1.0;
        }
        logits[3 * wide + 300] = -0.0;
        logits[3 * wide + 301] = 0.0;
        for v in &mut logits[4 * wide..5 * wide] {
            *v = f32::NEG_INFINITY;
        }
        let on_gpu = cuda
            .argmax_rows(&cuda.upload_f32(&logits).unwrap(), 6, wide)
            .unwrap();
        let on_host = host.argmax_rows(&logits, 6, wide).unwrap();
        assert_eq!(on_gpu, on_host, "argmax rows");
        assert_eq!(&on_host[..5], &[7, 0, 900, 300, 0]);
        // The ranked top-k of the same rows: total order (NaN above all, -0 below +0), ties
        // to the lower index, k across threads' columns.
        let on_gpu = cuda
            .ranked_top_k_rows(&cuda.upload_f32(&logits).unwrap(), 6, wide, 20)
            .unwrap();
        let on_host = host.ranked_top_k_rows(&logits, 6, wide, 20).unwrap();
        let bits = |v: &[(u32, f32)]| v.iter().map(|&(i, x)| (i, x.to_bits())).collect::<Vec<_>>();
        assert_eq!(bits(&on_gpu), bits(&on_host), "ranked top-k rows");
        // Races over the same rows (NaNs, -inf, ties at +inf added) and over a row of a
        // DeepSeek-V3-sized vocabulary, with and without min-p and top-p: the device's draws
        // are the host's, each of many keys.
        let mut raced = logits.clone();
        raced[5 * wide + 10] = f32::INFINITY;
        raced[5 * wide + 999] = f32::INFINITY;
        let races: Vec<RowRace> = (0..60u64)
            .map(|k| RowRace {
                row: (k % 6) as u32,
                race: crate::race::Race {
                    temperature: [0.3f32, 1.0, 1.7][k as usize % 3],
                    top_p: [1.0f32, 0.9, 0.5, 0.95][k as usize % 4],
                    min_p: [0.0f32, 0.05, 0.0, 0.3, 1.0][k as usize % 5],
                    key: crate::race::race_key(11, k),
                },
            })
            .collect();
        let on_gpu = cuda
            .race_rows(&cuda.upload_f32(&raced).unwrap(), 6, wide, &races)
            .unwrap();
        assert_eq!(
            on_gpu,
            host.race_rows(&raced, 6, wide, &races).unwrap(),
            "races"
        );
        let vocab = 129_280;
        let big = values(2 * vocab, 16);
        let races: Vec<RowRace> = (0..16u64)
            .map(|k| RowRace {
                row: (k % 2) as u32,
                race: crate::race::Race {
                    temperature: 0.6,
                    top_p: if k % 2 == 0 { 0.95 } else { 1.0 },
                    min_p: [0.0f32, 0.02, 0.1, 0.0][k as usize % 4],
                    key: crate::race::race_key(3, k),
                },
            })
            .collect();
        let on_gpu = cuda
            .race_rows(&cuda.upload_f32(&big).unwrap(), 2, vocab, &races)
            .unwrap();
        assert_eq!(
            on_gpu,
            host.race_rows(&big, 2, vocab, &races).unwrap(),
            "races, 129,280 tokens"
        );
        // Logit edits (penalties, biases, hidden end tokens) on rows of the same logits with
        // their NaNs, infinities and signed zeros: bitwise the host's, ids past the row
        // skipped, unedited rows untouched.
        let adjust = crate::logit_adjust::LogitAdjustments {
            logit_bias: vec![(0, 2.5), (7, -1.25), (300, 0.1), (u32::MAX, 1.0)],
            presence_penalty: 0.4,
            frequency_penalty: 0.3,
            repetition_penalty: 1.3,
            min_tokens: 4,
        };
        let mut history = crate::logit_adjust::TokenHistory::new(&[0, 5, 9, 900, 1001]);
        for t in [7, 7, 300, 5, 2000] {
            history.record(t);
        }
        let edits = crate::logit_adjust::LogitEdits::of(&adjust, &history, &[1, 900]);
        let other = crate::logit_adjust::LogitEdits::of(
            &crate::logit_adjust::LogitAdjustments {
                repetition_penalty: 0.8,
                ..Default::default()
            },
            &history,
            &[],
        );
        let rows = [
            RowEdits {
                row: 0,
                edits: &edits,
            },
            RowEdits {
                row: 2,
                edits: &other,
            },
            RowEdits {
                row: 5,
                edits: &edits,
            },
        ];
        let mut on_gpu = cuda.upload_f32(&raced).unwrap();
        cuda.edit_rows(&mut on_gpu, 6, wide, &rows).unwrap();
        let mut on_host = raced.clone();
        host.edit_rows(&mut on_host, 6, wide, &rows).unwrap();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&down(&on_gpu)), bits(&on_host), "logit edits");
        assert_ne!(bits(&on_host), bits(&raced), "the edits change the rows");
        assert!(
            cuda.edit_rows(&mut on_gpu, 5, wide, &rows).is_err(),
            "a row past the step"
        );

        // Grammar masks on two rows (one shorter than the row: the rest is not allowed),
        // then the edits on one of them: bitwise the host's.
        let allowed: Vec<bool> = (0..wide).map(|i| i % 7 == 3 || i == 999).collect();
        let short: Vec<bool> = (0..40).map(|i| i % 2 == 0).collect();
        let (long_mask, short_mask) = (
            crate::token_mask::TokenMask::from_allowed(&allowed),
            crate::token_mask::TokenMask::from_allowed(&short),
        );
        let masks = [
            RowMask {
                row: 1,
                mask: &long_mask,
            },
            RowMask {
                row: 4,
                mask: &short_mask,
            },
        ];
        let mut on_gpu = cuda.upload_f32(&raced).unwrap();
        cuda.mask_rows(&mut on_gpu, 6, wide, &masks).unwrap();
        cuda.edit_rows(&mut on_gpu, 6, wide, &rows[1..2]).unwrap();
        let mut on_host = raced.clone();
        host.mask_rows(&mut on_host, 6, wide, &masks).unwrap();
        host.edit_rows(&mut on_host, 6, wide, &rows[1..2]).unwrap();
        assert_eq!(bits(&down(&on_gpu)), bits(&on_host), "grammar masks");
        let kept = on_host[4 * wide..5 * wide].iter().filter(|x| x.is_finite());
        assert!(
            kept.count() <= 20,
            "the short mask allows 20 tokens at most"
        );
        assert!(
            cuda.mask_rows(&mut on_gpu, 4, wide, &masks).is_err(),
            "a row past the step"
        );

        // The embedding lookup from an f32 table.
        let table = values(9 * width, 14);
        let (tc, th) = (
            cuda.upload_matrix(&table, MatrixPrecision::F32).unwrap(),
            host.upload_matrix(&table, MatrixPrecision::F32).unwrap(),
        );
        let ids = [8u32, 1, 1, 5];
        let mut ec = cuda.scratch(4 * width).unwrap();
        let mut eh = vec![0.0; 4 * width];
        cuda.embed_rows(&tc, &cuda.upload_index(&ids).unwrap(), &mut ec, 4, width)
            .unwrap();
        host.embed_rows(&th, &ids.to_vec(), &mut eh, 4, width)
            .unwrap();
        close("embedding lookup", &down(&ec), &eh, 0.0);
    }

    /// GEMMs in the bf16 modes (conversion kernels, the pair's two cuBLAS calls into one
    /// output) against the host reference with the same rounding.
    #[test]
    fn gpu_bf16_gemms_match_the_host_reference_with_the_same_rounding() {
        for numerics in [GpuDtype::Bf16, GpuDtype::Bf16x2] {
            let Some(ctx) = gpu(numerics) else { return };
            let cuda = CudaDenseOps::new(Arc::clone(&ctx));
            let host = HostDenseOps::with_numerics(numerics);
            let (rows, n_out, k) = (7usize, 40usize, 96usize);
            let w = values(n_out * k, 21);
            let x: Vec<f32> = values(rows * k, 22).iter().map(|v| v * 3.7).collect();
            let shape = StridedGemm::single(ColumnMajorGemm::rows_times_weights(rows, n_out, k));
            let wc = cuda.upload_matrix(&w, MatrixPrecision::Narrow).unwrap();
            let xc = cuda
                .gemm_input(&cuda.upload_f32(&x).unwrap(), x.len(), &wc)
                .unwrap();
            assert_eq!(
                matches!(xc, GpuBuffer::Bf16Pair { .. }),
                numerics == GpuDtype::Bf16x2
            );
            let mut cc = cuda.scratch(rows * n_out).unwrap();
            cuda.gemm(&shape, &wc, 0, &xc, 0, &mut cc, 0).unwrap();
            let wh = host.upload_matrix(&w, MatrixPrecision::Narrow).unwrap();
            // The same bf16 matrix as an embedding table: rows looked up exactly.
            let ids = [3u32, 0, 39, 3];
            let mut ec = cuda.scratch(ids.len() * k).unwrap();
            let mut eh = vec![0.0; ids.len() * k];
            let ids_c = cuda.upload_index(&ids).unwrap();
            cuda.embed_rows(&wc, &ids_c, &mut ec, ids.len(), k).unwrap();
            host.embed_rows(&wh, &ids.to_vec(), &mut eh, ids.len(), k)
                .unwrap();
            close(
                &format!("{numerics} embedding lookup"),
                &cuda.download(&ec, ids.len() * k).unwrap(),
                &eh,
                0.0,
            );
            let xh = host.gemm_input(&x, x.len(), &wh).unwrap();
            let mut ch = vec![0.0; rows * n_out];
            host.gemm(&shape, &wh, 0, &xh, 0, &mut ch, 0).unwrap();
            close(
                &format!("{numerics} GEMM"),
                &cuda.download(&cc, rows * n_out).unwrap(),
                &ch,
                1e-4,
            );
            // A wide (f32 checkpoint) matrix stays f32 in bf16x2, and so does its input.
            let wide = cuda.upload_matrix(&w, MatrixPrecision::Wide).unwrap();
            assert_eq!(
                matches!(wide, GpuBuffer::F32(_)),
                numerics == GpuDtype::Bf16x2
            );
        }
    }

    /// The whole dense part on the GPU (f32) against the same orchestration on the host, step
    /// by step, on every fixture.
    #[test]
    fn gpu_dense_model_matches_the_host_reference_on_the_fixtures() {
        use crate::checkpoint::Checkpoint;
        use crate::experts::ExpertSet;
        let Some(ctx) = gpu(GpuDtype::F32) else {
            return;
        };
        for name in [
            "deepseek-v3-tiny",
            "qwen3-moe-tiny",
            "mixtral-tiny",
            "glm4-moe-tiny",
            "glm4-moe-lite-tiny",
            "minimax-m2-tiny",
        ] {
            let dir = crate::test_support::fixture_dir(name);
            let config = ModelConfig::from_dir(&dir).unwrap();
            let ckpt = Checkpoint::open(&dir).unwrap();
            let on_gpu = GpuDenseModel::load(Arc::clone(&ctx), &ckpt, &config).unwrap();
            let on_host = DeviceDenseModel::load(HostDenseOps::exact(), &ckpt, &config).unwrap();
            let experts = ExpertSet::load_all_on(&ckpt, &config, &Default::default()).unwrap();
            let (mut gc, mut hc) = (on_gpu.new_cache(), on_host.new_cache());
            let mut tokens: Vec<u32> = vec![1, 5, 9, 14, 2];
            for step in 0..6 {
                let run = |cache: &mut SequenceCache, gpu: bool| {
                    let mut seqs = [StepSequence {
                        cache,
                        tokens: &tokens,
                        all_logits: true,
                    }];
                    if gpu {
                        on_gpu.forward(&mut seqs, &experts).unwrap()
                    } else {
                        on_host.forward(&mut seqs, &experts).unwrap()
                    }
                };
                let (g, h) = (run(&mut gc, true), run(&mut hc, false));
                close(&format!("{name} step {step}"), &g[0], &h[0], 2e-3);
                tokens = vec![(step * 13 + 7) % config.vocab_size as u32];
            }
        }
    }

    /// `--gpu-fp8 keep` on the whole model: the FP8 fixture's dense matrices through the FP8
    /// kernel, its experts held as FP8 on the same GPU and given the dense part's rows in
    /// place: the host reference's logits (FP8 matrices exactly dequantized) within 2e-3, at
    /// prefill and decode.
    #[test]
    fn gpu_fp8_kept_model_with_experts_in_place_matches_the_host_reference() {
        use crate::checkpoint::Checkpoint;
        use crate::device::GpuFp8;
        use crate::experts::{ExpertDevice, ExpertSet};
        let Some(ctx) = gpu(GpuDtype::F32) else {
            return;
        };
        let dir = crate::test_support::fixture_dir("deepseek-v3-fp8-tiny");
        let config = ModelConfig::from_dir(&dir).unwrap();
        let ckpt = Checkpoint::open(&dir).unwrap();
        let ops = CudaDenseOps::holding_fp8(Arc::clone(&ctx), true);
        let on_gpu = DeviceDenseModel::load(ops, &ckpt, &config).unwrap();
        let host_ops = HostDenseOps::exact().with_fp8_kept();
        let on_host = DeviceDenseModel::load(host_ops, &ckpt, &config).unwrap();
        let all: Vec<(usize, usize)> = config
            .moe_layer_indices()
            .flat_map(|l| (0..config.moe.num_experts).map(move |e| (l, e)))
            .collect();
        let device = ExpertDevice::Gpu(Arc::clone(&ctx));
        let gpu_experts =
            ExpertSet::load_holding_fp8(&ckpt, &config, all, &device, GpuFp8::Keep).unwrap();
        let host_experts = ExpertSet::load_all_on(&ckpt, &config, &Default::default()).unwrap();
        let (mut gc, mut hc) = (on_gpu.new_cache(), on_host.new_cache());
        let mut tokens: Vec<u32> = vec![3, 8, 1, 12, 40, 7];
        for step in 0..6 {
            let mut seqs = [StepSequence {
                cache: &mut gc,
                tokens: &tokens,
                all_logits: true,
            }];
            let g = on_gpu.forward(&mut seqs, &gpu_experts).unwrap();
            let mut seqs = [StepSequence {
                cache: &mut hc,
                tokens: &tokens,
                all_logits: true,
            }];
            let h = on_host.forward(&mut seqs, &host_experts).unwrap();
            close(&format!("FP8 kept, step {step}"), &g[0], &h[0], 2e-3);
            tokens = vec![(step * 17 + 5) % config.vocab_size as u32];
        }
    }

    /// `--cuda-graphs`: decode steps captured per batch-size bucket and replayed give the
    /// logits of launching them, bit for bit, with cuBLAS and with `--deterministic`, with the
    /// experts on the same GPU (rows in place) and through host copies, FP8 matrices kept as
    /// FP8 (`--gpu-fp8 keep`) and widened, bf16 experts on our tensor-core kernel (in place:
    /// inside the step's graph), at batch sizes that pad (3 to 4, 5 to 8) and that do not. A
    /// bucket's segments run as launched at its first step, are captured at its second and
    /// replayed after; no capture fails.
    #[test]
    fn gpu_decode_graphs_give_the_launched_logits() {
        let Some(ctx) = gpu(GpuDtype::F32) else {
            return;
        };
        for deterministic in [false, true] {
            ctx.set_deterministic(deterministic);
            let cases = [
                ("deepseek-v3-tiny", true, false),
                ("qwen3-moe-tiny", false, false),
                ("deepseek-v3-fp8-tiny", false, true),
                ("deepseek-v3-fp8-tiny", true, true),
            ];
            for (name, in_place, keep_fp8) in cases {
                // The routed experts follow the gate's choices on the device (a step is one
                // graph) where they are on this GPU and run row-independent grouped kernels.
                let following = in_place && (keep_fp8 || deterministic);
                graphs_give_the_launched_logits(&ctx, name, in_place, keep_fp8, following);
            }
        }
        // bf16 experts, and FP8 ones kept as FP8, on our tensor-core kernel follow the
        // choices too (bf16x2 and bf16).
        for dtype in [GpuDtype::Bf16x2, GpuDtype::Bf16] {
            let Some(ctx) = gpu(dtype) else {
                return;
            };
            ctx.set_expert_gemm(crate::device::ExpertGemm::TensorCores);
            graphs_give_the_launched_logits(&ctx, "mixtral-tiny", true, false, true);
            graphs_give_the_launched_logits(&ctx, "deepseek-v3-fp8-tiny", true, true, true);
        }
    }

    /// One case of [`gpu_decode_graphs_give_the_launched_logits`] on `ctx` as it is set.
    fn graphs_give_the_launched_logits(
        ctx: &Arc<GpuContext>,
        name: &str,
        in_place: bool,
        keep_fp8: bool,
        following: bool,
    ) {
        use crate::checkpoint::Checkpoint;
        use crate::experts::{ExpertDevice, ExpertSet};
        let dir = crate::test_support::fixture_dir(name);
        let config = ModelConfig::from_dir(&dir).unwrap();
        let ckpt = Checkpoint::open(&dir).unwrap();
        let device = match in_place {
            true => ExpertDevice::Gpu(Arc::clone(ctx)),
            false => ExpertDevice::Cpu,
        };
        let fp8 = match keep_fp8 {
            true => crate::device::GpuFp8::Keep,
            false => crate::device::GpuFp8::Widen,
        };
        let all = config
            .moe_layer_indices()
            .flat_map(|l| (0..config.moe.num_experts).map(move |e| (l, e)));
        let experts = ExpertSet::load_holding_fp8(&ckpt, &config, all, &device, fp8).unwrap();
        let load = || {
            let ops = CudaDenseOps::holding_fp8(Arc::clone(ctx), keep_fp8);
            DeviceDenseModel::load(ops, &ckpt, &config).unwrap()
        };
        let (launched, graphed) = (load(), load());
        let models = [&launched, &graphed];
        let mut caches: Vec<Vec<SequenceCache>> = models
            .iter()
            .map(|m| (0..5).map(|_| m.new_cache()).collect())
            .collect();
        let vocab = config.vocab_size as u32;
        let mut next: Vec<u32> = (0..5).map(|i| (i * 19 + 2) % vocab).collect();
        let prompts: Vec<Vec<u32>> = (0..5u32)
            .map(|i| (0..2 + i).map(|t| (t * 23 + i * 7 + 1) % vocab).collect())
            .collect();
        let batches = [0usize, 5, 5, 5, 3, 3, 3, 1, 1, 1, 5];
        for (step, batch) in batches.into_iter().enumerate() {
            let inputs: Vec<Vec<u32>> = match batch {
                0 => prompts.clone(),
                n => next[..n].iter().map(|&t| vec![t]).collect(),
            };
            let mut logits = Vec::new();
            for (i, (model, caches)) in models.iter().zip(caches.iter_mut()).enumerate() {
                ctx.set_cuda_graphs(i == 1);
                logits.push(step_inputs(model, caches, &inputs, &experts));
                ctx.set_cuda_graphs(false);
            }
            let what = format!(
                "{name} ({}, deterministic: {}, {}, experts in place: {in_place}, FP8 kept: \
             {keep_fp8}) step {step}, batch {batch}",
                ctx.dtype(),
                ctx.deterministic(),
                ctx.expert_gemm()
            );
            assert!(logits[0] == logits[1], "{what}: the same logits bitwise");
            for (i, row) in logits[1].iter().enumerate() {
                next[i] = crate::backend::ops::argmax(row) as u32;
            }
        }
        let shared = usize::from(config.moe.n_shared_experts > 0);
        let per_step = match following {
            true => 1,
            false => 1 + config.moe_layer_indices().count() * (1 + shared),
        };
        let graphs = graphed.ops().graphs();
        assert_eq!(graphs.failed(), 0, "{name}: captures that failed");
        // Three buckets (8, 4, 1: the buffers sized for 8 from the start), each
        // captured at its second step and replayed at its third; 8 once more.
        assert_eq!(graphs.captured(), 3 * per_step, "{name}: graphs captured");
        assert_eq!(graphs.replayed(), 7 * per_step, "{name}: graph launches");
        assert_eq!(graphs.held(), 3 * per_step, "{name}: graphs held");
    }

    /// With `--cuda-graphs`, one thread's decode steps (batch sizes 1, 2, 3 and 5: buckets 1,
    /// 2, 4 and 8, each captured at its second step) while another thread prefills on the
    /// same model without pause (as two micro-batches do), the experts on the same GPU: a
    /// capture has the device to itself (no other step's launch or free joins it, or breaks
    /// it), neither thread waits on the other for ever, and both get the logits of running
    /// alone without graphs, bit for bit (`--deterministic`, so padding changes nothing).
    #[test]
    fn gpu_captures_while_another_thread_steps_give_the_launched_logits() {
        use crate::checkpoint::Checkpoint;
        use crate::experts::{ExpertDevice, ExpertSet};
        use std::sync::atomic::{AtomicBool, Ordering};
        let Some(ctx) = gpu(GpuDtype::F32) else {
            return;
        };
        ctx.set_deterministic(true);
        let dir = crate::test_support::fixture_dir("deepseek-v3-tiny");
        let config = ModelConfig::from_dir(&dir).unwrap();
        let ckpt = Checkpoint::open(&dir).unwrap();
        let device = ExpertDevice::Gpu(Arc::clone(&ctx));
        let experts = ExpertSet::load_all_on(&ckpt, &config, &device).unwrap();
        let load = || {
            let ops = CudaDenseOps::new(Arc::clone(&ctx));
            DeviceDenseModel::load(ops, &ckpt, &config).unwrap()
        };
        let vocab = config.vocab_size as u32;
        let forward =
            |model: &DeviceDenseModel<CudaDenseOps>,
             caches: &mut [SequenceCache],
             inputs: &[Vec<u32>]| { step_inputs(model, caches, inputs, &experts) };
        // Decode: five sequences prefilled, then three steps at each batch size.
        let decode = |model: &DeviceDenseModel<CudaDenseOps>| {
            let mut caches: Vec<SequenceCache> = (0..5).map(|_| model.new_cache()).collect();
            let prompts: Vec<Vec<u32>> = (0..5u32)
                .map(|i| (0..2 + i).map(|t| (t * 29 + i * 5 + 1) % vocab).collect())
                .collect();
            let mut out = vec![forward(model, &mut caches, &prompts)];
            for (step, batch) in [1usize, 1, 1, 2, 2, 2, 3, 3, 3, 5, 5, 5].iter().enumerate() {
                let inputs: Vec<Vec<u32>> = (0..*batch as u32)
                    .map(|i| vec![(i * 7 + step as u32 * 11 + 3) % vocab])
                    .collect();
                out.push(forward(model, &mut caches[..*batch], &inputs));
            }
            out
        };
        // Prefill: two fresh prompts of four tokens.
        let prompts: Vec<Vec<u32>> = (0..2u32)
            .map(|i| (0..4).map(|t| (t * 17 + i * 3 + 2) % vocab).collect())
            .collect();
        let prefill = |model: &DeviceDenseModel<CudaDenseOps>| {
            let mut caches: Vec<SequenceCache> = (0..2).map(|_| model.new_cache()).collect();
            forward(model, &mut caches, &prompts)
        };
        ctx.set_cuda_graphs(false);
        let launched = load();
        let started = std::time::Instant::now();
        let decoded_alone = decode(&launched);
        let decode_took = started.elapsed();
        let prefilled_alone = prefill(&launched);
        eprintln!(
            "alone: decode steps {decode_took:?}, a prefill {:?}",
            started.elapsed() - decode_took
        );
        ctx.set_cuda_graphs(true);
        let graphed = load();
        let done = AtomicBool::new(false);
        let (decoded, prefills) = std::thread::scope(|scope| {
            let prefilling = scope.spawn(|| {
                let mut prefills = 0;
                while !done.load(Ordering::Relaxed) || prefills == 0 {
                    assert!(prefill(&graphed) == prefilled_alone, "prefill {prefills}");
                    prefills += 1;
                    // A pause between steps, as a server's has: the locks are not fair, and
                    // steps back to back would starve the other thread on the emulator (whose
                    // launches run while the device's lock is held).
                    std::thread::sleep(std::time::Duration::from_millis(3));
                }
                prefills
            });
            let started = std::time::Instant::now();
            let decoded = decode(&graphed);
            eprintln!("beside the prefills: decode steps {:?}", started.elapsed());
            done.store(true, Ordering::Relaxed);
            (decoded, prefilling.join().unwrap())
        });
        ctx.set_cuda_graphs(false);
        for (step, (a, g)) in decoded_alone.iter().zip(&decoded).enumerate() {
            assert!(a == g, "decode step {step}: the logits of stepping alone");
        }
        let graphs = graphed.ops().graphs();
        assert_eq!(graphs.failed(), 0, "captures that failed");
        // The experts, on this GPU and `--deterministic`, follow the gate's choices there: a
        // step is one graph.
        assert_eq!(graphs.captured(), 4, "four buckets captured");
        assert_eq!(graphs.held(), 4);
        eprintln!("{prefills} prefills beside the decode steps");
    }

    /// `--deterministic` on the GPU (dense part and experts): one sequence's logits are bitwise
    /// the same alone and inside a batch of 64 others, at prefill and at each decode step, a
    /// prefill's logits bitwise those of its tokens decoded one by one, and a prefix taken
    /// from the paged pool (blocks shared with another sequence) bitwise computing it; in f32
    /// and bf16x2.
    #[test]
    fn gpu_deterministic_logits_do_not_depend_on_the_batch() {
        use crate::checkpoint::Checkpoint;
        use crate::experts::{ExpertDevice, ExpertSet};
        for dtype in [GpuDtype::F32, GpuDtype::Bf16x2] {
            let Some(ctx) = gpu(dtype) else {
                return;
            };
            ctx.set_deterministic(true);
            for name in ["deepseek-v3-tiny", "qwen3-moe-tiny"] {
                let dir = crate::test_support::fixture_dir(name);
                let config = ModelConfig::from_dir(&dir).unwrap();
                let ckpt = Checkpoint::open(&dir).unwrap();
                let model = GpuDenseModel::load(Arc::clone(&ctx), &ckpt, &config).unwrap();
                let device = ExpertDevice::Gpu(Arc::clone(&ctx));
                let experts = ExpertSet::load_all_on(&ckpt, &config, &device).unwrap();
                let vocab = config.vocab_size as u32;
                let prompt = |i: u32| -> Vec<u32> {
                    (0..3 + i % 9)
                        .map(|t| (t * 31 + i * 17 + 1) % vocab)
                        .collect()
                };
                let ours = prompt(1000);
                let what = format!("{name} ({dtype})");
                // Alone: the prefill's logits at every position, then three decode steps.
                let mut alone = model.new_cache();
                let mut seqs = [StepSequence {
                    cache: &mut alone,
                    tokens: &ours,
                    all_logits: true,
                }];
                let prefill_alone = model.forward(&mut seqs, &experts).unwrap().remove(0);
                let decode_tokens: Vec<u32> = vec![5, 77 % vocab, 130 % vocab];
                let mut decode_alone = Vec::new();
                for t in &decode_tokens {
                    let mut seqs = [StepSequence {
                        cache: &mut alone,
                        tokens: std::slice::from_ref(t),
                        all_logits: false,
                    }];
                    decode_alone.push(model.forward(&mut seqs, &experts).unwrap().remove(0));
                }
                // Inside a batch of 64 others (ours in the middle), prefill and decode.
                let others: Vec<Vec<u32>> = (0..64).map(prompt).collect();
                let mut caches: Vec<SequenceCache> = (0..65).map(|_| model.new_cache()).collect();
                let mut inputs: Vec<Vec<u32>> = others.clone();
                inputs.insert(32, ours.clone());
                let mut seqs: Vec<StepSequence<'_>> = caches
                    .iter_mut()
                    .zip(&inputs)
                    .map(|(cache, tokens)| StepSequence {
                        cache,
                        tokens,
                        all_logits: true,
                    })
                    .collect();
                let batched = model.forward(&mut seqs, &experts).unwrap();
                assert!(batched[32] == prefill_alone, "{what}: prefill in a batch");
                for (step, t) in decode_tokens.iter().enumerate() {
                    let tokens: Vec<[u32; 1]> = (0..65u32)
                        .map(|i| [(i * 7 + step as u32) % vocab])
                        .collect();
                    let mut seqs: Vec<StepSequence<'_>> = caches
                        .iter_mut()
                        .zip(&tokens)
                        .enumerate()
                        .map(|(i, (cache, own))| StepSequence {
                            cache,
                            tokens: if i == 32 {
                                std::slice::from_ref(t)
                            } else {
                                own
                            },
                            all_logits: false,
                        })
                        .collect();
                    let out = model.forward(&mut seqs, &experts).unwrap();
                    assert!(
                        out[32] == decode_alone[step],
                        "{what}: decode {step} in a batch"
                    );
                }
                // The prompt decoded one token at a time: each step's row = the prefill's.
                let mut one_by_one = model.new_cache();
                let v = config.vocab_size;
                for (p, t) in ours.iter().enumerate() {
                    let mut seqs = [StepSequence {
                        cache: &mut one_by_one,
                        tokens: std::slice::from_ref(t),
                        all_logits: false,
                    }];
                    let row = model.forward(&mut seqs, &experts).unwrap().remove(0);
                    assert!(
                        row[..] == prefill_alone[p * v..(p + 1) * v],
                        "{what}: position {p} decoded alone differs from the prefill"
                    );
                }
                // A prefix from the paged pool (another sequence's full blocks, shared): the
                // logits of computing it, bitwise.
                let long: Vec<u32> = (0..2 * 16 + 3).map(|t| (t * 11 + 4) % vocab).collect();
                let mut owner = model.new_cache();
                let mut seqs = [StepSequence {
                    cache: &mut owner,
                    tokens: &long[..32],
                    all_logits: false,
                }];
                model.forward(&mut seqs, &experts).unwrap();
                let mut hit = model.new_cache();
                assert!(hit.share_prefix(owner.full_blocks()) && hit.len == 32);
                let mut seqs = [StepSequence {
                    cache: &mut hit,
                    tokens: &long[32..],
                    all_logits: false,
                }];
                let from_cache = model.forward(&mut seqs, &experts).unwrap();
                let mut fresh = model.new_cache();
                let mut seqs = [StepSequence {
                    cache: &mut fresh,
                    tokens: &long,
                    all_logits: false,
                }];
                let computed = model.forward(&mut seqs, &experts).unwrap();
                assert!(
                    from_cache == computed,
                    "{what}: a shared prefix = computing it"
                );
                eprintln!(
                    "{what}: batch-invariant, prefill = decode, prefix hit = computed, bitwise"
                );
            }
        }
    }
}
