//! The CPU math backend: a packed, batch-invariant GEMM and the element-wise kernels
//! (RMSNorm, SiLU, softmax) the layers need. A CUDA backend will sit beside it behind a feature.
//!
//! Batch invariance is a design rule here: every output element is accumulated over K in the same
//! order whatever the number of rows, so a token's result never depends on its batch-mates.

pub mod fp8;
pub mod gemm;
pub mod ops;
pub mod weight;

pub use gemm::{InputRows, PackedMatrix};
pub use weight::NativeWeight;

/// Runs `work` on a thread of the math (rayon) pool instead of the calling thread. A step is
/// dozens of parallel regions (every GEMM, attention, the experts) with short serial parts
/// between them; called from outside the pool, each region is handed to the pool while the
/// caller sleeps, and both the pool's threads and then the caller must be woken (~100 us per
/// region on this project's VMs: a GEMM after a 300 us pause took that much longer). Inside
/// the pool, the thread that runs `work` runs its share of each region at once and only the
/// other threads are woken. Runs in place when already on a pool thread.
pub fn in_math_pool<R: Send>(work: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| work())
}

/// Sets the number of math threads for the process (call once, before any work).
pub fn set_threads(threads: usize) -> Result<(), String> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .map_err(|e| e.to_string())
}

/// Keeps freed activation buffers in the process, so a step reuses the memory the previous
/// layer freed instead of faulting in fresh pages (on this project's VMs a fault costs ~5 us:
/// a 4096-row prefill, tens of MB per buffer, spent a fifth of its time there). glibc would
/// otherwise give memory back three ways: every allocation above its mmap threshold (at most
/// 32 MiB) is unmapped on free; each thread's arena deletes a heap whose chunks are all free;
/// and the main heap is trimmed. So: no mmap for allocations (large ones come from the main
/// heap, or from mmap only if the heap cannot grow), one arena (small allocations still go
/// through per-thread caches), no trimming. Measured on the small preset, batch-32 prefill:
/// 311 -> 355 tok/s with the threshold and trimming alone, ~390 -> ~490 tok/s with these
/// settings (docs/performance.md, "Prefill memory"). Peak RSS is unchanged: the memory kept is
/// what the largest step needed anyway. Call once at start of a binary, before threads.
/// No-op off glibc.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters (under the allocator's own lock).
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, libc::c_int::MAX);
    }
}

/// Faults in the whole pages under `[start, start + bytes)` in one call (`MADV_POPULATE_WRITE`)
/// instead of one trap per 4 KiB page as a loop first writes them. Loading is mostly writing
/// packed weights to fresh memory: ~15% less load time on this project's VMs. Best effort:
/// kernels before 5.14 refuse it and the pages fault in as before; already-mapped pages cost
/// only a page-table walk. Small ranges are left alone.
pub fn prefault_for_write(start: *mut u8, bytes: usize) {
    const PAGE: usize = 4096;
    if bytes < 256 * PAGE {
        return;
    }
    let first = (start as usize).next_multiple_of(PAGE);
    let end = (start as usize + bytes) & !(PAGE - 1);
    #[cfg(target_os = "linux")]
    if end > first {
        // SAFETY: the range lies inside the caller's allocation; populating pages changes no
        // contents (fresh pages read as zero either way) and failure is harmless.
        unsafe {
            libc::madvise(
                first as *mut libc::c_void,
                end - first,
                libc::MADV_POPULATE_WRITE,
            );
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (first, end);
}

/// Below this many output values, a row-by-row loop (copy, scale, sum) stays on the calling
/// thread: fork-join costs more than it saves on a decode step's few rows.
pub const PARALLEL_MIN_VALUES: usize = 1 << 18;

/// Runs `f((row index, row))` over the `width`-wide rows of `out`, spread over the math pool's
/// threads when `parallel`: each row is computed the same way either way, so the choice is
/// about speed only.
pub fn for_each_row<F>(out: &mut [f32], width: usize, parallel: bool, f: F)
where
    F: Fn((usize, &mut [f32])) + Send + Sync,
{
    use rayon::prelude::*;
    if parallel {
        out.par_chunks_mut(width).enumerate().for_each(f);
    } else {
        out.chunks_mut(width).enumerate().for_each(f);
    }
}

/// Whether this CPU runs the AVX2/FMA kernels (checked once; they also widen FP8 through
/// F16C, which every AVX2 CPU has).
#[cfg(target_arch = "x86_64")]
pub fn has_avx2_fma() -> bool {
    use std::sync::OnceLock;
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    })
}

#[cfg(not(target_arch = "x86_64"))]
pub fn has_avx2_fma() -> bool {
    false
}

/// Which kernels `MOE_CPU_KERNELS` holds the process to, to compare them on one machine:
/// `avx2` (the AVX2 tiles on a CPU that has AVX-512), `avx2-in-order` (the same with FP8
/// panels in k order), `avx512` (the AVX-512 tiles with FP8 panels in k order). Unset (or
/// anything else): the best this CPU runs.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum KernelChoice {
    Best,
    Avx2,
    Avx2InOrder,
    Avx512InOrder,
}

#[cfg(target_arch = "x86_64")]
fn kernel_choice() -> KernelChoice {
    use std::sync::OnceLock;
    static CHOICE: OnceLock<KernelChoice> = OnceLock::new();
    *CHOICE.get_or_init(|| match std::env::var("MOE_CPU_KERNELS").as_deref() {
        Ok("avx2") => KernelChoice::Avx2,
        Ok("avx2-in-order") => KernelChoice::Avx2InOrder,
        Ok("avx512") => KernelChoice::Avx512InOrder,
        _ => KernelChoice::Best,
    })
}

/// Whether this CPU runs the AVX-512 tiles (one zmm per 16-column panel row; the detection
/// includes the AVX2 path's). `MOE_CPU_KERNELS=avx2` turns them off, to compare.
#[cfg(target_arch = "x86_64")]
pub fn has_avx512() -> bool {
    use std::sync::OnceLock;
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        has_avx2_fma()
            && is_x86_feature_detected!("avx512f")
            && !matches!(
                kernel_choice(),
                KernelChoice::Avx2 | KernelChoice::Avx2InOrder
            )
    })
}

#[cfg(not(target_arch = "x86_64"))]
pub fn has_avx512() -> bool {
    false
}

/// Whether FP8 panels are packed in groups of four k-rows (each column's four bytes in one
/// 32-bit lane) that the tiles widen with shifts and masks within lanes: four and a half
/// vector operations per 16 weights on AVX2 where a sign-extend, shift and mask take seven,
/// two and a quarter on AVX-512 (BW: Skylake-SP and later, Zen 4) where they take three.
/// `MOE_CPU_KERNELS=avx512` or `avx2-in-order` keeps the panels in k order and the older
/// widening, to compare.
#[cfg(target_arch = "x86_64")]
pub fn has_fp8_groups() -> bool {
    use std::sync::OnceLock;
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        let in_order = matches!(
            kernel_choice(),
            KernelChoice::Avx2InOrder | KernelChoice::Avx512InOrder
        );
        let tiles_widen_groups = if has_avx512() {
            is_x86_feature_detected!("avx512bw")
        } else {
            has_avx2_fma()
        };
        tiles_widen_groups && !in_order
    })
}

#[cfg(not(target_arch = "x86_64"))]
pub fn has_fp8_groups() -> bool {
    false
}
