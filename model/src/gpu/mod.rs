//! The CUDA backend (`--features cuda`): routed experts and the router's dense part on a GPU.
//!
//! - [`context`]: one CUDA context, stream and cuBLAS handle per process, with every library
//!   checked before its first call (cudarc panics on a missing library otherwise).
//! - [`kernels`]: the element-wise kernels (`kernels.cu`: gather rows by expert, SiLU-and-
//!   multiply, weighted scatter back to pair order), compiled at start-up with NVRTC.
//! - [`expert_ffn`]: expert weights uploaded once (bf16 or f32) and the grouped FFN: one cuBLAS
//!   GEMM per expert over all its rows, for gate+up and for down.
//! - [`dense_ops`]: the router's dense part on the GPU (attention with its KV cache, norms,
//!   rotary, the gate's top-k, shared experts, lm_head): the steps of
//!   [`crate::device_dense::DeviceDenseModel`] as cuBLAS calls and kernels.
//! - [`bench`]: expert-FFN TFLOP/s at DeepSeek-V3 shapes against one large dense GEMM.
//!
//! Numerics: f32 mode uses cuBLAS's true-f32 path (no TF32), so it meets the golden tests at
//! 2e-3; bf16 mode keeps weights and GEMM inputs in bf16 with f32 accumulation and f32 GEMM
//! outputs. cuBLAS may pick a different algorithm for a different row count, so on the GPU a
//! token's result is equal within tolerance, not bitwise, whatever its batch-mates (unlike the
//! CPU GEMM).

pub mod bench;
pub mod context;
pub mod dense_ops;
pub mod expert_ffn;
pub mod kernels;

pub use context::{GpuContext, GpuError};
pub use dense_ops::GpuDenseModel;
pub use expert_ffn::GpuMlp;

/// cuda:0 for a GPU test, or `None` (the test passes, with a `SKIPPED` line) where none can be
/// opened, unless `MOE_REQUIRE_GPU=1` (set by `ops/gpu-check.sh`) makes that a failure.
#[cfg(test)]
pub(crate) fn test_context(dtype: crate::device::GpuDtype) -> Option<std::sync::Arc<GpuContext>> {
    match GpuContext::open(0, dtype) {
        Ok(ctx) => Some(ctx),
        Err(e) if std::env::var_os("MOE_REQUIRE_GPU").is_some() => {
            panic!("MOE_REQUIRE_GPU is set and cuda:0 cannot be opened: {e}")
        }
        Err(e) => {
            report_skip(&format!(
                "no usable GPU: cuda:0 cannot be opened ({e}); MOE_REQUIRE_GPU=1 makes this a failure"
            ));
            None
        }
    }
}

/// Prints `SKIPPED <test>: <why>` once per test, where it is seen: straight to stderr, since
/// libtest captures `eprintln!` (and shows it only for failed tests) but not writes to the
/// stderr handle. The test is named by its thread, which libtest names after it.
#[cfg(test)]
pub(crate) fn report_skip(why: &str) {
    use std::io::Write;
    static REPORTED: std::sync::Mutex<std::collections::BTreeSet<String>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    let test = std::thread::current()
        .name()
        .unwrap_or("a GPU test")
        .to_string();
    let first = REPORTED
        .lock()
        .map(|mut r| r.insert(test.clone()))
        .unwrap_or(true);
    if first {
        let line = format!("SKIPPED {test}: {why}\n");
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }
}
