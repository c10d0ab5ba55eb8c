//! The CUDA backend (`--features cuda`): routed experts and the router's dense part on a GPU.
//!
//! - [`context`]: one CUDA context, stream and cuBLAS handle per process, with every library
//!   checked before its first call (cudarc panics on a missing library otherwise); [`error`]:
//!   what these calls fail with.
//! - [`kernels`]: the element-wise kernels (`kernels.cu`: gather rows by expert, SiLU-and-
//!   multiply, weighted scatter back to pair order), compiled at start-up with NVRTC.
//! - [`expert_ffn`]: expert weights uploaded once (bf16 or f32) and the grouped FFN: one cuBLAS
//!   GEMM per expert over all its rows, for gate+up and for down.
//! - [`dense_ops`]: the router's dense part on the GPU (attention with its KV cache, norms,
//!   rotary, the gate's top-k, shared experts, lm_head): the steps of
//!   [`crate::device_dense::DeviceDenseModel`] as cuBLAS calls and kernels.
//! - [`fp8_matrix`]: FP8 weights kept as FP8 on the device (bytes and scales);
//!   [`fp8_gemm`]: a GEMM that widens them in the kernel, bitwise the CPU's GEMM and
//!   batch-invariant.
//! - [`tensor_core_gemm`]: bf16 experts on the tensor cores (`--gpu-expert-gemm
//!   tensor-cores`): one launch per pass over the grouped row tiles, batch-invariant.
//! - [`row_moves`]: rows gathered per node and outputs placed back in pair order on the
//!   device (the router's device-resident dispatch).
//! - [`segment_graphs`]: the dense part's decode steps as CUDA graphs (`--cuda-graphs`),
//!   one per segment between the host's reads, captured per batch size and replayed.
//! - [`bench`]: expert-FFN TFLOP/s at DeepSeek-V3 shapes against one large dense GEMM.
//!
//! Numerics: f32 mode uses cuBLAS's true-f32 path (no TF32), so it meets the golden tests at
//! 2e-3; bf16 mode keeps weights and GEMM inputs in bf16 with f32 accumulation and f32 GEMM
//! outputs. cuBLAS may pick a different algorithm for a different row count, so on the GPU a
//! token's result is equal within tolerance, not bitwise, whatever its batch-mates (unlike the
//! CPU GEMM).

pub mod bench;
pub mod buffer;
pub mod context;
pub mod dense_ops;
pub mod device_routes;
pub mod error;
pub mod exact_gemm;
pub mod expert_ffn;
pub mod fill;
pub mod fp8_gemm;
pub mod fp8_matrix;
mod grouped_blas;
pub(crate) mod grouped_launch;
pub mod kernels;
pub mod row_moves;
pub mod segment_graphs;
pub(crate) mod tensor_core_gemm;

pub use context::GpuContext;
pub use dense_ops::GpuDenseModel;
pub use error::GpuError;
pub use expert_ffn::GpuMlp;
