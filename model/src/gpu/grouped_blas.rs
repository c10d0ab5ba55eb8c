//! A pass's expert GEMMs in one cuBLAS call (`cublasGemmGroupedBatchedEx`, cuBLAS 12.5 and
//! later), `--gpu-expert-gemm grouped`: one launch for every expert of a layer instead of one
//! `GemmEx` per expert spread over streams, which reach about 60% of a dense GEMM at 8192
//! tokens on an H200 (docs/gpu.md). Each expert is a group of one problem (their row counts
//! differ); the operands' addresses go to the device in one small upload. In the bf16x2 mode
//! a second call adds the `lo` term's products (`beta = 1`), as `gemm_f32_out` does per
//! expert. The products are cuBLAS's, as on the lanes: equal within tolerance, not bitwise.

use cudarc::cublas::sys::{cublasComputeType_t, cublasOperation_t, cudaDataType};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};

use super::buffer::{check_gemm_bounds, GpuBuffer};
use super::context::GpuContext;
use super::error::GpuError;
use super::kernels::as_int;
use crate::grouped_ffn::{ExpertGemmCall, ExpertMatrices, FfnPass};

/// cuBLAS's version number (`major * 10000 + minor * 100 + patch`) from which the grouped
/// call exists: calling it through an older library would abort the process.
const FIRST_GROUPED_VERSION: i32 = 12_05_00;

/// Whether this context's cuBLAS has the grouped call.
fn has_grouped_call(ctx: &GpuContext) -> Result<bool, GpuError> {
    let mut version = 0;
    // SAFETY: a live handle, and a valid pointer for the answer.
    let status =
        unsafe { cudarc::cublas::sys::cublasGetVersion_v2(*ctx.blas().handle(), &mut version) };
    status.result()?;
    Ok(version >= FIRST_GROUPED_VERSION)
}

/// Runs `calls` (one pass: `experts[call.run]`'s matrix for `pass` times its rows of
/// `input`, into `output`) in one grouped call, two in the bf16x2 mode, on the main stream.
/// An error names why where the library has no grouped call.
pub(crate) fn grouped_pass(
    ctx: &GpuContext,
    experts: &[ExpertMatrices<'_, GpuBuffer>],
    calls: &[ExpertGemmCall],
    pass: FfnPass,
    input: &GpuBuffer,
    output: &mut CudaSlice<f32>,
) -> Result<(), GpuError> {
    if calls.is_empty() {
        return Ok(());
    }
    if !has_grouped_call(ctx)? {
        return Err(GpuError::Shape(
            "--gpu-expert-gemm grouped needs cuBLAS 12.5 or later".into(),
        ));
    }
    let stream = ctx.stream();
    let mut weights_type = None;
    let mut sizes = GroupSizes::default();
    let (mut a_ptrs, mut b_ptrs, mut b_lo_ptrs, mut c_ptrs) = (vec![], vec![], vec![], vec![]);
    let c_base = output.device_ptr_mut(stream).0;
    for call in calls {
        let Some(expert) = experts.get(call.run) else {
            return Err(GpuError::Shape(format!(
                "a GEMM for run {} of {} experts",
                call.run,
                experts.len()
            )));
        };
        let weights = expert.of(pass);
        let g = &call.shape;
        if weights.data_type() != input.data_type()
            || matches!(weights, GpuBuffer::Bf16Pair { .. } | GpuBuffer::Fp8(_))
            || matches!(input, GpuBuffer::Fp8(_))
            || *weights_type.get_or_insert(weights.data_type()) != weights.data_type()
        {
            return Err(GpuError::Shape(
                "a grouped GEMM's weights and inputs of different dtypes".into(),
            ));
        }
        check_gemm_bounds(
            g,
            g.extents(),
            (weights, 0),
            (input, call.input_at),
            (output, call.output_at),
        )?;
        sizes.push(g)?;
        a_ptrs.push(weights.address(stream, 0));
        b_ptrs.push(input.address(stream, call.input_at));
        b_lo_ptrs.extend(input.lo_address(stream, call.input_at));
        c_ptrs.push(c_base + call.output_at as u64 * 4);
    }
    let data_type = weights_type.unwrap_or(cudaDataType::CUDA_R_32F);
    // SAFETY: every operand's extent was checked against its live buffer above; the handle is
    // the main stream's, where the buffers and the addresses' upload are ordered.
    unsafe {
        sizes.call(ctx, data_type, [&a_ptrs, &b_ptrs, &c_ptrs], 0.0)?;
        if !b_lo_ptrs.is_empty() {
            sizes.call(ctx, data_type, [&a_ptrs, &b_lo_ptrs, &c_ptrs], 1.0)?;
        }
    }
    Ok(())
}

/// The per-group arrays cuBLAS reads on the host: one group of one problem per expert.
#[derive(Default)]
struct GroupSizes {
    transa: Vec<cublasOperation_t>,
    transb: Vec<cublasOperation_t>,
    m: Vec<i32>,
    n: Vec<i32>,
    k: Vec<i32>,
    lda: Vec<i32>,
    ldb: Vec<i32>,
    ldc: Vec<i32>,
}

impl GroupSizes {
    fn push(&mut self, g: &crate::device::shapes::ColumnMajorGemm) -> Result<(), GpuError> {
        let op = |t: bool| match t {
            true => cublasOperation_t::CUBLAS_OP_T,
            false => cublasOperation_t::CUBLAS_OP_N,
        };
        self.transa.push(op(g.transpose_a));
        self.transb.push(op(g.transpose_b));
        self.m.push(as_int(g.m, "m")?);
        self.n.push(as_int(g.n, "n")?);
        self.k.push(as_int(g.k, "k")?);
        self.lda.push(as_int(g.lda, "lda")?);
        self.ldb.push(as_int(g.ldb, "ldb")?);
        self.ldc.push(as_int(g.ldc, "ldc")?);
        Ok(())
    }

    /// One grouped call: `C = A·B + beta C` for every group, with A, B and C addressed by
    /// `[a, b, c]` (one address per group), uploaded here.
    ///
    /// # Safety
    /// The addresses point to live device buffers holding each group's extents.
    unsafe fn call(
        &self,
        ctx: &GpuContext,
        data_type: cudaDataType,
        [a, b, c]: [&Vec<u64>; 3],
        beta: f32,
    ) -> Result<(), GpuError> {
        let groups = self.m.len();
        let stream = ctx.stream();
        let addresses: Vec<u64> = a.iter().chain(b).chain(c).copied().collect();
        let on_device: CudaSlice<u64> = stream.clone_htod(&addresses)?;
        let base = on_device.device_ptr(stream).0;
        let (alpha, beta) = (vec![1.0f32; groups], vec![beta; groups]);
        let group_size = vec![1i32; groups];
        // SAFETY: passed on from the caller; the host arrays live through the call (cuBLAS
        // reads them before it returns), the addresses' buffer is freed in stream order after
        // the GEMMs.
        unsafe {
            cudarc::cublas::sys::cublasGemmGroupedBatchedEx(
                *ctx.blas().handle(),
                self.transa.as_ptr(),
                self.transb.as_ptr(),
                self.m.as_ptr(),
                self.n.as_ptr(),
                self.k.as_ptr(),
                alpha.as_ptr().cast(),
                base as *const *const _,
                data_type,
                self.lda.as_ptr(),
                (base + 8 * groups as u64) as *const *const _,
                data_type,
                self.ldb.as_ptr(),
                beta.as_ptr().cast(),
                (base + 16 * groups as u64) as *const *mut _,
                cudaDataType::CUDA_R_32F,
                self.ldc.as_ptr(),
                as_int(groups, "groups")?,
                group_size.as_ptr(),
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
            )
            .result()?;
        }
        drop(on_device);
        Ok(())
    }
}
