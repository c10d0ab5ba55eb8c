//! Packed f32 GEMM: `C[m, n] = sum_k A[m, k] * W[n, k]`, with `W` a Hugging Face `Linear` weight
//! (`[out_features, in_features]`, row-major) packed once at load time into column panels.
//!
//! Each output element is a chain of fused multiply-adds over k in ascending order, starting from
//! zero. K blocking stores and reloads the partial sum without changing that chain, and M tiling
//! only decides which rows share a register tile, so the result of a row is bitwise the same
//! whether it is computed alone, in a batch of 256, on one thread or on many. The portable path
//! uses `f32::mul_add` in the same order, so it agrees bitwise with the AVX2/FMA path.

use rayon::prelude::*;

/// Output columns per packed panel (two 8-lane vectors).
pub const NR: usize = 16;
/// Rows per register tile.
const MR: usize = 6;
/// K block: a `KC x NR` slice of a panel (16 KiB) stays in L1 while all row tiles use it.
const KC: usize = 256;
/// Floats of A kept hot per row block (384 KiB of a 512 KiB L2).
const A_SLAB_FLOATS: usize = 96 * 1024;
/// Row blocks never go below this: splitting small batches costs more fork-joins than it saves.
const MIN_ROW_BLOCK: usize = 132;
/// Below this many multiply-adds a GEMM runs on the calling thread (fork-join costs more).
const PARALLEL_MIN_WORK: usize = 1 << 18;

/// A weight matrix `[n, k]` packed as `ceil(n / NR)` panels of `[k][NR]`, zero-padded.
#[derive(Clone)]
pub struct PackedMatrix {
    n: usize,
    k: usize,
    panels: Vec<f32>,
}

impl std::fmt::Debug for PackedMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedMatrix[{} x {}]", self.n, self.k)
    }
}

impl PackedMatrix {
    /// Packs a row-major `[n, k]` weight (`weight.len() == n * k`).
    pub fn from_rows(weight: &[f32], n: usize, k: usize) -> Self {
        assert_eq!(
            weight.len(),
            n * k,
            "weight length does not match its shape"
        );
        let num_panels = n.div_ceil(NR);
        let mut panels = vec![0.0f32; num_panels * k * NR];
        for p in 0..num_panels {
            let panel = &mut panels[p * k * NR..(p + 1) * k * NR];
            for j in 0..NR.min(n - p * NR) {
                let row = &weight[(p * NR + j) * k..(p * NR + j + 1) * k];
                for (kk, &v) in row.iter().enumerate() {
                    panel[kk * NR + j] = v;
                }
            }
        }
        Self { n, k, panels }
    }

    /// Stacks several `[n_i, k]` weights into one `[sum n_i, k]` matrix, so that projections
    /// sharing an input run as one GEMM.
    pub fn from_stacked(parts: &[&[f32]], k: usize) -> Self {
        let rows: Vec<f32> = parts.iter().flat_map(|p| p.iter().copied()).collect();
        let n = rows.len() / k;
        Self::from_rows(&rows, n, k)
    }

    pub fn rows(&self) -> usize {
        self.n
    }

    pub fn cols(&self) -> usize {
        self.k
    }

    /// Bytes held by the packed panels.
    pub fn bytes(&self) -> usize {
        self.panels.len() * 4
    }

    /// `a` is `[m, k]` row-major; returns `[m, n]`.
    pub fn matmul(&self, a: &[f32], m: usize) -> Vec<f32> {
        let mut c = vec![0.0f32; m * self.n];
        self.matmul_into(a, m, &mut c);
        c
    }

    /// Like [`Self::matmul`] but on the calling thread only: for callers that already run many
    /// small GEMMs in parallel (per head, per expert). Bitwise the same result.
    pub fn matmul_serial(&self, a: &[f32], m: usize) -> Vec<f32> {
        let mut c = vec![0.0f32; m * self.n];
        self.product(a, m, &mut c, false);
        c
    }

    /// Writes `a * W^T` into `c` (`[m, n]`), overwriting it.
    pub fn matmul_into(&self, a: &[f32], m: usize, c: &mut [f32]) {
        let parallel = m * self.n * self.k >= PARALLEL_MIN_WORK && rayon::current_num_threads() > 1;
        self.product(a, m, c, parallel);
    }

    fn product(&self, a: &[f32], m: usize, c: &mut [f32], parallel: bool) {
        assert_eq!(a.len(), m * self.k, "input length does not match [m, k]");
        assert_eq!(c.len(), m * self.n, "output length does not match [m, n]");
        if m == 0 || self.n == 0 {
            return;
        }
        let num_panels = self.n.div_ceil(NR);
        let out = OutPtr(c.as_mut_ptr());
        // Row blocks small enough that their [rows, k] slab of A stays in L2 while every panel
        // passes over it.
        let block = (A_SLAB_FLOATS / self.k.max(1)).max(MIN_ROW_BLOCK) / MR * MR;
        let mut m0 = 0;
        while m0 < m {
            let rows = block.min(m - m0);
            let run = |p: usize| {
                // SAFETY: panel p writes only columns [p*NR, p*NR+NR) of rows m0..m0+rows of c,
                // disjoint across panels.
                unsafe { self.panel_product(p, a, m0, rows, out) }
            };
            if parallel {
                (0..num_panels)
                    .into_par_iter()
                    .with_min_len(2)
                    .for_each(run);
            } else {
                (0..num_panels).for_each(run);
            }
            m0 += rows;
        }
    }

    /// Computes columns of panel `p` for rows `first..first + rows`.
    unsafe fn panel_product(&self, p: usize, a: &[f32], first: usize, rows: usize, c: OutPtr) {
        let k = self.k;
        let n = self.n;
        let cols = NR.min(n - p * NR);
        let panel = &self.panels[p * k * NR..(p + 1) * k * NR];
        let mut k0 = 0;
        while k0 < k {
            let kc = KC.min(k - k0);
            let accumulate = k0 > 0;
            let mut m0 = first;
            while m0 < first + rows {
                let mr = MR.min(first + rows - m0);
                let tile = Tile {
                    a: a.as_ptr().add(m0 * k + k0),
                    lda: k,
                    b: panel.as_ptr().add(k0 * NR),
                    c: c.0.add(m0 * n + p * NR),
                    ldc: n,
                    kc,
                    cols,
                    accumulate,
                };
                micro_tile(mr, &tile);
                m0 += mr;
            }
            k0 += kc;
        }
    }
}

#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: used only to write disjoint column ranges from different threads.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// One register tile: up to MR rows of A times one NR-wide slice of a panel.
struct Tile {
    a: *const f32,
    lda: usize,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    kc: usize,
    /// Valid columns in this panel (the rest is padding and is not stored).
    cols: usize,
    /// Add to the partial sums already in C (a later K block) instead of starting from zero.
    accumulate: bool,
}

unsafe fn micro_tile(mr: usize, t: &Tile) {
    #[cfg(target_arch = "x86_64")]
    {
        if super::has_avx2_fma() {
            match mr {
                6 => return x86::tile::<6>(t),
                5 => return x86::tile::<5>(t),
                4 => return x86::tile::<4>(t),
                3 => return x86::tile::<3>(t),
                2 => return x86::tile::<2>(t),
                _ => return x86::tile::<1>(t),
            }
        }
    }
    portable_tile(mr, t)
}

/// The same FMA chain as the SIMD path, one element at a time.
unsafe fn portable_tile(mr: usize, t: &Tile) {
    for r in 0..mr {
        for j in 0..t.cols {
            let c = t.c.add(r * t.ldc + j);
            let mut acc = if t.accumulate { *c } else { 0.0 };
            for kk in 0..t.kc {
                acc = (*t.a.add(r * t.lda + kk)).mul_add(*t.b.add(kk * NR + j), acc);
            }
            *c = acc;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Tile, NR};
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tile<const R: usize>(t: &Tile) {
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        let mut staging = [[0.0f32; NR]; R];
        let full = t.cols == NR;
        if t.accumulate {
            for (r, row) in acc.iter_mut().enumerate() {
                let c = t.c.add(r * t.ldc);
                if full {
                    row[0] = _mm256_loadu_ps(c);
                    row[1] = _mm256_loadu_ps(c.add(8));
                } else {
                    std::ptr::copy_nonoverlapping(c, staging[r].as_mut_ptr(), t.cols);
                    row[0] = _mm256_loadu_ps(staging[r].as_ptr());
                    row[1] = _mm256_loadu_ps(staging[r].as_ptr().add(8));
                }
            }
        }
        let mut a_ptrs = [t.a; R];
        for (r, p) in a_ptrs.iter_mut().enumerate() {
            *p = t.a.add(r * t.lda);
        }
        let mut b = t.b;
        for kk in 0..t.kc {
            let b0 = _mm256_loadu_ps(b);
            let b1 = _mm256_loadu_ps(b.add(8));
            for r in 0..R {
                let a = _mm256_broadcast_ss(&*a_ptrs[r].add(kk));
                acc[r][0] = _mm256_fmadd_ps(a, b0, acc[r][0]);
                acc[r][1] = _mm256_fmadd_ps(a, b1, acc[r][1]);
            }
            b = b.add(NR);
        }
        for (r, row) in acc.iter().enumerate() {
            let c = t.c.add(r * t.ldc);
            if full {
                _mm256_storeu_ps(c, row[0]);
                _mm256_storeu_ps(c.add(8), row[1]);
            } else {
                _mm256_storeu_ps(staging[r].as_mut_ptr(), row[0]);
                _mm256_storeu_ps(staging[r].as_mut_ptr().add(8), row[1]);
                std::ptr::copy_nonoverlapping(staging[r].as_ptr(), c, t.cols);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pseudo_random(len: usize, seed: u64) -> Vec<f32> {
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

    fn reference(a: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
        let mut c = vec![0.0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k)
                    .map(|kk| a[i * k + kk] as f64 * w[j * k + kk] as f64)
                    .sum::<f64>() as f32;
            }
        }
        c
    }

    #[test]
    fn matches_reference_on_ragged_shapes() {
        for &(m, n, k) in &[
            (1, 1, 1),
            (7, 17, 5),
            (13, 33, 300),
            (6, 16, 256),
            (1, 40, 513),
        ] {
            let a = pseudo_random(m * k, 1);
            let w = pseudo_random(n * k, 2);
            let c = PackedMatrix::from_rows(&w, n, k).matmul(&a, m);
            let r = reference(&a, &w, m, n, k);
            for (x, y) in c.iter().zip(&r) {
                assert!((x - y).abs() < 1e-4, "{m}x{n}x{k}: {x} vs {y}");
            }
        }
    }

    #[test]
    fn rows_are_batch_invariant_bitwise() {
        let (n, k) = (70, 600);
        let w = PackedMatrix::from_rows(&pseudo_random(n * k, 3), n, k);
        let a = pseudo_random(37 * k, 4);
        let batched = w.matmul(&a, 37);
        for row in [0, 5, 6, 36] {
            let alone = w.matmul(&a[row * k..(row + 1) * k], 1);
            assert_eq!(alone, batched[row * n..(row + 1) * n].to_vec(), "row {row}");
        }
    }

    #[test]
    fn simd_and_portable_paths_agree_bitwise() {
        let (m, n, k) = (9, 20, 300);
        let a = pseudo_random(m * k, 5);
        let w = PackedMatrix::from_rows(&pseudo_random(n * k, 6), n, k);
        let fast = w.matmul(&a, m);
        let mut slow = vec![0.0f32; m * n];
        let panels = n.div_ceil(NR);
        for p in 0..panels {
            let cols = NR.min(n - p * NR);
            let mut k0 = 0;
            while k0 < k {
                let kc = KC.min(k - k0);
                for m0 in (0..m).step_by(MR) {
                    let t = Tile {
                        a: a[m0 * k + k0..].as_ptr(),
                        lda: k,
                        b: w.panels[p * k * NR + k0 * NR..].as_ptr(),
                        c: slow[m0 * n + p * NR..].as_mut_ptr(),
                        ldc: n,
                        kc,
                        cols,
                        accumulate: k0 > 0,
                    };
                    unsafe { portable_tile(MR.min(m - m0), &t) };
                }
                k0 += kc;
            }
        }
        assert_eq!(fast, slow);
    }
}
