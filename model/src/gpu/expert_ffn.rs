//! Routed experts on the GPU: weights uploaded once, and the grouped FFN
//! `down(silu(gate(x)) * up(x))` with one cuBLAS GEMM per expert for gate+up and one for down.
//!
//! A batch goes: rows (f32) -> gathered into expert order in the GEMM dtype -> gate+up GEMMs
//! (f32 out) -> SiLU-and-multiply (GEMM dtype) -> down GEMMs (f32 out) -> scattered back to
//! pair order, each row times its routing weight. Everything between upload and download
//! stays on the device.

use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut, PushKernelArg};

use super::context::{GpuContext, GpuError};
use super::kernels::{as_int, grid};
use crate::device::GpuDtype;
use crate::routes::ExpertRuns;

/// A device buffer in the GEMM dtype (bf16 held as its bits).
pub enum GpuBuffer {
    Bf16(CudaSlice<u16>),
    F32(CudaSlice<f32>),
}

impl GpuBuffer {
    /// Uninitialised-free: a zeroed buffer of `len` elements.
    pub fn zeros(ctx: &GpuContext, len: usize) -> Result<Self, GpuError> {
        let stream = ctx.stream();
        Ok(match ctx.dtype() {
            GpuDtype::Bf16 => GpuBuffer::Bf16(stream.alloc_zeros::<u16>(len.max(1))?),
            GpuDtype::F32 => GpuBuffer::F32(stream.alloc_zeros::<f32>(len.max(1))?),
        })
    }

    /// Uploads f32 host values, converting to the context's dtype (bf16: round to nearest
    /// even, exact for weights that were bf16 in the checkpoint).
    pub fn upload(ctx: &GpuContext, host: &[f32]) -> Result<Self, GpuError> {
        let stream = ctx.stream();
        Ok(match ctx.dtype() {
            GpuDtype::Bf16 => {
                let bits: Vec<u16> = host
                    .iter()
                    .map(|v| half::bf16::from_f32(*v).to_bits())
                    .collect();
                GpuBuffer::Bf16(stream.clone_htod(&bits)?)
            }
            GpuDtype::F32 => GpuBuffer::F32(stream.clone_htod(host)?),
        })
    }

    pub fn len(&self) -> usize {
        match self {
            GpuBuffer::Bf16(s) => s.len(),
            GpuBuffer::F32(s) => s.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn bytes(&self) -> usize {
        match self {
            GpuBuffer::Bf16(s) => s.len() * 2,
            GpuBuffer::F32(s) => s.len() * 4,
        }
    }

    fn data_type(&self) -> cudaDataType {
        match self {
            GpuBuffer::Bf16(_) => cudaDataType::CUDA_R_16BF,
            GpuBuffer::F32(_) => cudaDataType::CUDA_R_32F,
        }
    }

    fn element_bytes(&self) -> u64 {
        match self {
            GpuBuffer::Bf16(_) => 2,
            GpuBuffer::F32(_) => 4,
        }
    }

    /// Device address of element `offset` (valid while `self` lives and for work queued on
    /// `stream`).
    fn address(&self, stream: &CudaStream, offset: usize) -> u64 {
        let base = match self {
            GpuBuffer::Bf16(s) => s.device_ptr(stream).0,
            GpuBuffer::F32(s) => s.device_ptr(stream).0,
        };
        base + offset as u64 * self.element_bytes()
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
                GpuBuffer::Bf16(s) => stream
                    .launch_builder(&ctx.kernels().fill_uniform_bf16)
                    .arg(s)
                    .arg(&n)
                    .arg(&seed)
                    .arg(&scale)
                    .launch(cfg)?,
                GpuBuffer::F32(s) => return fill_uniform_f32(ctx, s, seed, scale),
            };
        }
        Ok(())
    }
}

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
    pub fn upload(
        ctx: &GpuContext,
        gate: &[f32],
        up: &[f32],
        down: &[f32],
        hidden: usize,
        intermediate: usize,
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
        Ok(Self {
            gate_up: GpuBuffer::upload(ctx, &gate_up)?,
            down: GpuBuffer::upload(ctx, down)?,
            hidden,
            intermediate,
        })
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

    pub fn bytes(&self) -> usize {
        self.gate_up.bytes() + self.down.bytes()
    }
}

/// `c[rows, n_out] = x[rows, k] · w[n_out, k]ᵀ`, all row-major, `c` in f32, from element
/// offsets into the three buffers. In cuBLAS's column-major terms that is
/// `cᵀ[n_out, rows] = op_T(w as [k, n_out]) · xᵀ[k, rows]`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_rows(
    ctx: &GpuContext,
    w: &GpuBuffer,
    x: &GpuBuffer,
    x_offset: usize,
    c: &mut CudaSlice<f32>,
    c_offset: usize,
    rows: usize,
    n_out: usize,
    k: usize,
) -> Result<(), GpuError> {
    if rows == 0 {
        return Ok(());
    }
    let stream = ctx.stream();
    let (m, n, k) = (as_int(n_out, "n")?, as_int(rows, "rows")?, as_int(k, "k")?);
    let (alpha, beta) = (1.0f32, 0.0f32);
    let w_ptr = w.address(stream, 0);
    let x_ptr = x.address(stream, x_offset);
    let c_ptr = c.device_ptr_mut(stream).0 + c_offset as u64 * 4;
    // Inputs and output must agree on the compute type: f32 accumulation either way; f32
    // inputs keep COMPUTE_32F (no TF32), bf16 inputs use the tensor cores.
    // SAFETY: the three addresses point into live buffers large enough for the shapes above
    // (checked by the callers), and the work is queued on the handle's own stream.
    unsafe {
        cudarc::cublas::result::gemm_ex(
            *ctx.blas().handle(),
            cublasOperation_t::CUBLAS_OP_T,
            cublasOperation_t::CUBLAS_OP_N,
            m,
            n,
            k,
            (&alpha) as *const f32 as *const _,
            w_ptr as *const _,
            w.data_type(),
            k,
            x_ptr as *const _,
            x.data_type(),
            k,
            (&beta) as *const f32 as *const _,
            c_ptr as *mut _,
            cudaDataType::CUDA_R_32F,
            m,
            cublasComputeType_t::CUBLAS_COMPUTE_32F,
            cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )?;
    }
    Ok(())
}

/// Runs a routed batch on the device. `rows` is `[n_rows, hidden]` f32 on the device,
/// `plan` the batch in expert order with `experts[i]` serving `plan.runs[i]`, `weights` one
/// routing weight per pair. Returns `[pairs, hidden]` f32: each pair's output times its weight.
pub fn run_grouped(
    ctx: &GpuContext,
    experts: &[&GpuMlp],
    rows: &CudaSlice<f32>,
    plan: &ExpertRuns,
    weights: &[f32],
) -> Result<CudaSlice<f32>, GpuError> {
    let stream = ctx.stream();
    let kernels = ctx.kernels();
    let Some(first) = experts.first() else {
        return Ok(stream.alloc_zeros::<f32>(1)?);
    };
    let (hidden, inter) = (first.hidden, first.intermediate);
    if experts.len() != plan.runs.len()
        || experts
            .iter()
            .any(|e| e.hidden != hidden || e.intermediate != inter)
    {
        return Err(GpuError::Shape(format!(
            "{} experts for {} runs, or experts of different shapes",
            experts.len(),
            plan.runs.len()
        )));
    }
    let slots = plan.slots();
    let pairs = weights.len();
    if plan.pair_of_slot.len() != slots
        || plan.pair_of_slot.iter().any(|&p| p as usize >= pairs)
        || rows.len() < hidden
        || plan
            .row_of_slot
            .iter()
            .any(|&r| (r as usize + 1) * hidden > rows.len())
    {
        return Err(GpuError::Shape(format!(
            "batch plan of {slots} slots does not fit {} rows and {pairs} pairs",
            rows.len() / hidden.max(1)
        )));
    }
    let (slots_i, hidden_i, inter_i) = (
        as_int(slots, "slots")?,
        as_int(hidden, "hidden")?,
        as_int(inter, "intermediate")?,
    );
    let row_of_slot = stream.clone_htod(&plan.row_of_slot)?;
    let pair_of_slot = stream.clone_htod(&plan.pair_of_slot)?;
    let pair_weights = stream.clone_htod(weights)?;

    // 1. Rows into expert order, in the GEMM dtype.
    let mut x = GpuBuffer::zeros(ctx, slots * hidden)?;
    // SAFETY: every index was checked against `rows` above; `x` holds `slots * hidden`.
    unsafe {
        match &mut x {
            GpuBuffer::Bf16(out) => stream
                .launch_builder(&kernels.gather_rows_bf16)
                .arg(rows)
                .arg(&row_of_slot)
                .arg(out)
                .arg(&slots_i)
                .arg(&hidden_i)
                .launch(grid(slots * hidden))?,
            GpuBuffer::F32(out) => stream
                .launch_builder(&kernels.gather_rows_f32)
                .arg(rows)
                .arg(&row_of_slot)
                .arg(out)
                .arg(&slots_i)
                .arg(&hidden_i)
                .launch(grid(slots * hidden))?,
        };
    }

    // 2. gate+up: one GEMM per expert over its run of slots.
    let mut gate_up = stream.alloc_zeros::<f32>((slots * 2 * inter).max(1))?;
    for (run, expert) in plan.runs.iter().zip(experts) {
        gemm_rows(
            ctx,
            &expert.gate_up,
            &x,
            run.start * hidden,
            &mut gate_up,
            run.start * 2 * inter,
            run.len,
            2 * inter,
            hidden,
        )?;
    }

    // 3. SiLU(gate) * up, back in the GEMM dtype.
    let mut act = GpuBuffer::zeros(ctx, slots * inter)?;
    // SAFETY: `gate_up` holds `slots * 2 * inter`, `act` `slots * inter`.
    unsafe {
        match &mut act {
            GpuBuffer::Bf16(out) => stream
                .launch_builder(&kernels.silu_mul_bf16)
                .arg(&gate_up)
                .arg(out)
                .arg(&slots_i)
                .arg(&inter_i)
                .launch(grid(slots * inter))?,
            GpuBuffer::F32(out) => stream
                .launch_builder(&kernels.silu_mul_f32)
                .arg(&gate_up)
                .arg(out)
                .arg(&slots_i)
                .arg(&inter_i)
                .launch(grid(slots * inter))?,
        };
    }

    // 4. down: one GEMM per expert.
    let mut out = stream.alloc_zeros::<f32>((slots * hidden).max(1))?;
    for (run, expert) in plan.runs.iter().zip(experts) {
        gemm_rows(
            ctx,
            &expert.down,
            &act,
            run.start * inter,
            &mut out,
            run.start * hidden,
            run.len,
            hidden,
            inter,
        )?;
    }

    // 5. Back to pair order, times the routing weights.
    let mut pair_out = stream.alloc_zeros::<f32>((pairs * hidden).max(1))?;
    // SAFETY: every pair index was checked against `pairs` above.
    unsafe {
        stream
            .launch_builder(&kernels.scatter_weighted)
            .arg(&out)
            .arg(&pair_of_slot)
            .arg(&pair_weights)
            .arg(&mut pair_out)
            .arg(&slots_i)
            .arg(&hidden_i)
            .launch(grid(slots * hidden))?;
    }
    Ok(pair_out)
}

/// Host-side entry: uploads `rows`, runs the batch, downloads `[pairs, hidden]`.
pub fn run_from_host(
    ctx: &GpuContext,
    experts: &[&GpuMlp],
    rows: &[f32],
    plan: &ExpertRuns,
    weights: &[f32],
    hidden: usize,
) -> Result<Vec<f32>, GpuError> {
    let _serial = ctx.lock()?;
    let stream = ctx.stream();
    let device_rows = stream.clone_htod(rows)?;
    let pair_out = run_grouped(ctx, experts, &device_rows, plan, weights)?;
    let mut host = stream.clone_dtoh(&pair_out)?;
    stream.synchronize()?;
    host.truncate(weights.len() * hidden);
    Ok(host)
}
