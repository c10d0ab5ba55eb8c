//! The CPU math backend: a packed, batch-invariant GEMM and the element-wise kernels
//! (RMSNorm, SiLU, softmax) the layers need. A CUDA backend will sit beside it behind a feature.
//!
//! Batch invariance is a design rule here: every output element is accumulated over K in the same
//! order whatever the number of rows, so a token's result never depends on its batch-mates.

pub mod gemm;
pub mod ops;
pub mod weight;

pub use gemm::PackedMatrix;
pub use weight::NativeWeight;

/// Sets the number of math threads for the process (call once, before any work).
pub fn set_threads(threads: usize) -> Result<(), String> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .map_err(|e| e.to_string())
}

/// Keeps freed activation buffers in the process. glibc hands every allocation above its
/// mmap threshold back to the kernel on free, so each step's large activations (a 4096-row
/// prefill allocates tens of MB per layer) cost fresh page faults; this raises the threshold
/// to glibc's maximum (32 MiB) and stops trimming the heap. Measured on the small preset:
/// batch-32 prefill 311 -> 355 tok/s, a third less system time (docs/performance.md). Call
/// once at start of a binary. No-op off glibc.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters (under the allocator's own lock).
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, libc::c_int::MAX);
    }
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
