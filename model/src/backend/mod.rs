//! The CPU math backend: a packed, batch-invariant GEMM and the element-wise kernels
//! (RMSNorm, SiLU, softmax) the layers need. A CUDA backend will sit beside it behind a feature.
//!
//! Batch invariance is a design rule here: every output element is accumulated over K in the same
//! order whatever the number of rows, so a token's result never depends on its batch-mates.

pub mod gemm;
pub mod ops;

pub use gemm::PackedMatrix;

/// Sets the number of math threads for the process (call once, before any work).
pub fn set_threads(threads: usize) -> Result<(), String> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .map_err(|e| e.to_string())
}

/// Whether this CPU runs the AVX2/FMA kernels (checked once).
#[cfg(target_arch = "x86_64")]
pub fn has_avx2_fma() -> bool {
    use std::sync::OnceLock;
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
}

#[cfg(not(target_arch = "x86_64"))]
pub fn has_avx2_fma() -> bool {
    false
}
