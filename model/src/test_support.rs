//! What the unit tests share (compiled for tests only): where the bundled fixtures are,
//! reproducible values and FP8 matrices, and, with the `cuda` feature, a GPU to test on or a
//! visible `SKIPPED` line where there is none.

/// Consecutive runs of slots of these lengths, expert i serving run i (a grouped GEMM's plan).
pub(crate) fn expert_runs(lens: &[usize]) -> Vec<crate::routes::ExpertRun> {
    let mut start = 0;
    lens.iter()
        .enumerate()
        .map(|(e, &len)| {
            let run = crate::routes::ExpertRun {
                expert: e as u32,
                start,
                len,
            };
            start += len;
            run
        })
        .collect()
}

/// `len` reproducible values in [-0.5, 0.5).
pub(crate) fn pseudo_random(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..len)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        })
        .collect()
}

/// A reproducible FP8 matrix `[n, k]` in `block` tiles with partial edge blocks.
pub(crate) fn fp8_matrix(
    n: usize,
    k: usize,
    block: (usize, usize),
    seed: u64,
) -> crate::backend::weight::Fp8Matrix {
    let values: Vec<u8> = pseudo_random(n * k, seed)
        .iter()
        .map(|&x| crate::backend::fp8::f32_to_e4m3(x * 600.0))
        .collect();
    let blocks = n.div_ceil(block.0) * k.div_ceil(block.1);
    let scales: Vec<f32> = pseudo_random(blocks, seed + 1)
        .iter()
        .map(|&x| (x + 0.75) / 300.0)
        .collect();
    crate::backend::weight::Fp8Matrix::from_blocks(values, n, k, &scales, block)
}

/// An `[n, k]` INT4 matrix as compressed-tensors stores one (random integers in [-8, 7], a
/// random scale per `group` columns of each row), unpacked as the loader holds it.
pub(crate) fn int4_matrix(
    n: usize,
    k: usize,
    group: usize,
    seed: u64,
) -> crate::backend::weight::Fp8Matrix {
    use crate::checkpoint::packed_int4;
    let q: Vec<i8> = pseudo_random(n * k, seed)
        .iter()
        .map(|&x| ((x + 0.5) * 16.0).floor().clamp(0.0, 15.0) as i8 - 8)
        .collect();
    let values = packed_int4::unpack_to_e4m3(&packed_int4::pack(&q, n, k), n, k);
    let scales: Vec<f32> = pseudo_random(n * k.div_ceil(group), seed + 1)
        .iter()
        .map(|&x| (x + 0.75) / 300.0)
        .collect();
    crate::backend::weight::Fp8Matrix::from_blocks(values, n, k, &scales, (1, group))
}

/// A bundled fixture: under `MOE_FIXTURES_DIR` when set (a test executable carried to another
/// machine, as `ops/gpu-check.sh` does), else in this repository.
pub(crate) fn fixture_dir(name: &str) -> std::path::PathBuf {
    std::env::var_os("MOE_FIXTURES_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
        })
        .join(name)
}

/// cuda:0 for a GPU test, or `None` (the test passes, with a `SKIPPED` line) where none can be
/// opened, unless `MOE_REQUIRE_GPU=1` (set by `ops/gpu-check.sh`) makes that a failure.
#[cfg(feature = "cuda")]
pub(crate) fn test_context(
    dtype: crate::device::GpuDtype,
) -> Option<std::sync::Arc<crate::gpu::GpuContext>> {
    match crate::gpu::GpuContext::open(0, dtype) {
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
#[cfg(feature = "cuda")]
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

/// Asserts that the kernel source writes each of `constants` as its bits (`0x...` literals)
/// after `marker` and before the next kernel section (the top-k ranking's): what the host
/// computes with and what the device computes with are the same numbers.
pub(crate) fn assert_kernel_constants(marker: &str, constants: &[f64]) {
    let source = include_str!("gpu/kernels.cu");
    let at = source.find(marker).expect("the kernel's constants");
    let end = source[at..]
        .find("The k best-ranked values")
        .map_or(source.len(), |e| at + e);
    for bits in constants.iter().map(|c| c.to_bits()) {
        assert!(
            source[at..end].contains(&format!("0x{bits:016x}")),
            "{marker}: 0x{bits:016x}"
        );
    }
}

/// A row for sampling tests: distinct logits, one -inf and one NaN (never drawn).
pub(crate) const DRAW_LOGITS: [f32; 8] =
    [1.0, 2.0, 0.5, -1.0, 3.0, f32::NEG_INFINITY, 2.5, f32::NAN];
