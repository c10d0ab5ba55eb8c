//! The CPU math backend: a packed, batch-invariant GEMM and the element-wise kernels
//! (RMSNorm, SiLU, softmax) the layers need. A CUDA backend will sit beside it behind a feature.
//!
//! Batch invariance is a design rule here: every output element is accumulated over K in the same
//! order whatever the number of rows, so a token's result never depends on its batch-mates.

pub mod gemm;
pub mod ops;

pub use gemm::PackedMatrix;
