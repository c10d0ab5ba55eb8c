//! The status codes the emulated libraries answer, as the CUDA driver and cuBLAS define them.

use std::ffi::c_uint;

pub type CUresult = c_uint;
pub const CUDA_SUCCESS: CUresult = 0;
pub const CUDA_ERROR_INVALID_VALUE: CUresult = 1;
pub const CUDA_ERROR_OUT_OF_MEMORY: CUresult = 2;
pub const CUDA_ERROR_INVALID_DEVICE: CUresult = 101;
pub const CUDA_ERROR_INVALID_IMAGE: CUresult = 200;
pub const CUDA_ERROR_INVALID_PTX: CUresult = 218;
pub const CUDA_ERROR_INVALID_HANDLE: CUresult = 400;
pub const CUDA_ERROR_NOT_FOUND: CUresult = 500;
pub const CUDA_ERROR_NOT_READY: CUresult = 600;
pub const CUDA_ERROR_MISALIGNED_ADDRESS: CUresult = 716;
pub const CUDA_ERROR_LAUNCH_FAILED: CUresult = 719;
pub const CUDA_ERROR_NOT_SUPPORTED: CUresult = 801;

pub type CublasStatus = c_uint;
pub(crate) const CUBLAS_STATUS_SUCCESS: CublasStatus = 0;
pub(crate) const CUBLAS_STATUS_NOT_INITIALIZED: CublasStatus = 1;
pub(crate) const CUBLAS_STATUS_INVALID_VALUE: CublasStatus = 7;
pub(crate) const CUBLAS_STATUS_EXECUTION_FAILED: CublasStatus = 13;
pub(crate) const CUBLAS_STATUS_NOT_SUPPORTED: CublasStatus = 15;
