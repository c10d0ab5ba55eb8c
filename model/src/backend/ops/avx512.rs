//! The attention's many-query kernels on AVX-512. A zmm FMA does twice a ymm's multiply-adds
//! on CPUs with 512-bit FMA units (Zen 5, Xeons with two), and a decode step's attention is
//! nothing but these FMAs over the cached rows. Every result is the same FMA chain, in the same
//! order, as the AVX2 kernels' and the portable loops' (the tests compare them bitwise):
//!
//! - a weighted sum is one chain per output element over the rows in ascending order, so a zmm
//!   simply holds 16 elements' chains instead of 8;
//! - a dot product is eight lanes (lane `l` sums elements `l`, `l + 8`, ... of its query) and a
//!   fixed tree, so a zmm holds the eight lanes of **two queries** (one per 256-bit half)
//!   against the same 8 floats of a row broadcast to both halves, and each half is reduced by
//!   the AVX2 tree.

use super::x86::{reduce, tail};
use std::arch::x86_64::*;

/// Queries per pass of [`weighted_sum_rows_many`] and 16-float output blocks per query: four
/// queries over 32 columns keep 8 chains in flight (an FMA's latency times its two pipes) with
/// 6 loads (2 row halves, 4 weights) per 8 FMAs.
const SUM_QUERIES: usize = 4;
const SUM_BLOCKS: usize = 2;

/// Cached rows per pass of [`weighted_sum_rows_many`], as on AVX2: 8 KiB of MLA's latents stay
/// in L1 while every output block passes over them.
const VALUE_ROWS_PER_PASS: usize = 8;

/// Lanes selected by a mask of the first `len` (at most 16) floats.
#[inline(always)]
fn lanes(len: usize) -> __mmask16 {
    ((1u32 << len) - 1) as __mmask16
}

/// For every query i: `out[i * width..][..width] = sum_j weights[i * n + j] * rows[j][offset..]
/// [..width]`, rows in ascending j; `out` is written by the first pass and only then read.
///
/// # Safety
/// AVX-512F, AVX2 and FMA present; `rows[..n]` each hold `offset + width` floats, `weights`
/// `count * n`, `out` `count * width`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx2,fma")]
pub(super) unsafe fn weighted_sum_rows_many(
    weights: &[f32],
    rows: &[&[f32]],
    offset: usize,
    width: usize,
    count: usize,
    n: usize,
    out: &mut [f32],
) {
    let (w, o) = (weights.as_ptr(), out.as_mut_ptr());
    let mut j0 = 0;
    while j0 < n {
        let j1 = (j0 + VALUE_ROWS_PER_PASS).min(n);
        let mut pass = [std::ptr::null::<f32>(); VALUE_ROWS_PER_PASS];
        for (p, j) in pass.iter_mut().zip(j0..j1) {
            *p = rows.get_unchecked(j).as_ptr().add(offset);
        }
        let pass = &pass[..j1 - j0];
        let mut i = 0;
        while i < count {
            let group = (count - i).min(SUM_QUERIES);
            let mut col = 0;
            while col < width {
                let span = (width - col).min(16 * SUM_BLOCKS);
                match (group, span > 16) {
                    (4, true) => sum_block::<4, 2>(w, n, pass, j0, i, col, span, width, o),
                    (4, false) => sum_block::<4, 1>(w, n, pass, j0, i, col, span, width, o),
                    (3, true) => sum_block::<3, 2>(w, n, pass, j0, i, col, span, width, o),
                    (3, false) => sum_block::<3, 1>(w, n, pass, j0, i, col, span, width, o),
                    (2, true) => sum_block::<2, 2>(w, n, pass, j0, i, col, span, width, o),
                    (2, false) => sum_block::<2, 1>(w, n, pass, j0, i, col, span, width, o),
                    (_, true) => sum_block::<1, 2>(w, n, pass, j0, i, col, span, width, o),
                    (_, false) => sum_block::<1, 1>(w, n, pass, j0, i, col, span, width, o),
                }
                col += span;
            }
            i += group;
        }
        j0 = j1;
    }
}

/// Queries `first_query..+Q`, columns `col..col + span` (`span` at most `16 * B`, the last
/// block masked), over this pass's rows (the pass's first row is row `j0`).
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx2,fma")]
#[inline]
unsafe fn sum_block<const Q: usize, const B: usize>(
    w: *const f32,
    n: usize,
    pass: &[*const f32],
    j0: usize,
    first_query: usize,
    col: usize,
    span: usize,
    width: usize,
    o: *mut f32,
) {
    let masks: [__mmask16; B] = std::array::from_fn(|b| lanes(span.saturating_sub(16 * b).min(16)));
    let mut acc = [[_mm512_setzero_ps(); B]; Q];
    if j0 > 0 {
        for (k, a) in acc.iter_mut().enumerate() {
            let dst = o.add((first_query + k) * width + col);
            for (b, v) in a.iter_mut().enumerate() {
                *v = _mm512_maskz_loadu_ps(masks[b], dst.add(16 * b));
            }
        }
    }
    for (p, row) in pass.iter().enumerate() {
        let row = row.add(col);
        let r: [__m512; B] =
            std::array::from_fn(|b| _mm512_maskz_loadu_ps(masks[b], row.add(16 * b)));
        for (k, a) in acc.iter_mut().enumerate() {
            let wk = _mm512_set1_ps(*w.add((first_query + k) * n + j0 + p));
            for (v, r) in a.iter_mut().zip(&r) {
                *v = _mm512_fmadd_ps(wk, *r, *v);
            }
        }
    }
    for (k, a) in acc.iter().enumerate() {
        let dst = o.add((first_query + k) * width + col);
        for (b, v) in a.iter().enumerate() {
            _mm512_mask_storeu_ps(dst.add(16 * b), masks[b], *v);
        }
    }
}

/// `out[i * n + j] = dot(query i, rows[j][offset..][..width])`, for `count` of at least 2.
///
/// # Safety
/// AVX-512F, AVX2 and FMA present; `rows[..n]` each hold `offset + width` floats, `queries`
/// `count * width`, `out` `count * n`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx2,fma")]
pub(super) unsafe fn dot_rows_many(
    queries: &[f32],
    width: usize,
    count: usize,
    rows: &[&[f32]],
    offset: usize,
    n: usize,
    out: &mut [f32],
) {
    let chunks = width / 8;
    let pairs = count.div_ceil(2);
    // Queries two by two, chunk by chunk: pair p's chunk c is [query 2p's 8 floats, query
    // 2p + 1's] (an odd last query paired with itself), one aligned-free zmm load each.
    let mut paired = Vec::with_capacity(pairs * chunks * 16);
    for p in 0..pairs {
        let (a, b) = (2 * p, (2 * p + 1).min(count - 1));
        for c in 0..chunks {
            paired.extend_from_slice(&queries[a * width + c * 8..a * width + c * 8 + 8]);
            paired.extend_from_slice(&queries[b * width + c * 8..b * width + c * 8 + 8]);
        }
    }
    let q = queries.as_ptr();
    // Rows per block so that a block keeps 8 chains in flight however few the pairs: a batch-1
    // decode's task has 4 heads (2 pairs) on 2 threads.
    let rows_per_block = match pairs {
        1 => 8,
        2 => 4,
        3 => 2,
        _ => 4,
    };
    let mut j = 0;
    while j < n {
        let block_rows = if j + rows_per_block <= n {
            rows_per_block
        } else {
            1
        };
        let mut p = 0;
        while p < pairs {
            let group = (pairs - p).min(4);
            let block = DotBlock {
                paired: paired.as_ptr().add(p * chunks * 16),
                queries: q,
                width,
                count,
                first_pair: p,
                first_row: j,
                n,
                out: out.as_mut_ptr(),
            };
            match (block_rows, group) {
                // Eight rows come with one pair only, four with two.
                (8, _) => block.run::<8, 1>(rows_from(rows, offset, j)),
                (4, 4) => block.run::<4, 4>(rows_from(rows, offset, j)),
                (4, 3) => block.run::<4, 3>(rows_from(rows, offset, j)),
                (4, 2) => block.run::<4, 2>(rows_from(rows, offset, j)),
                (4, _) => block.run::<4, 1>(rows_from(rows, offset, j)),
                (2, 4) => block.run::<2, 4>(rows_from(rows, offset, j)),
                (2, 3) => block.run::<2, 3>(rows_from(rows, offset, j)),
                (2, 2) => block.run::<2, 2>(rows_from(rows, offset, j)),
                (2, _) => block.run::<2, 1>(rows_from(rows, offset, j)),
                (_, 4) => block.run::<1, 4>(rows_from(rows, offset, j)),
                (_, 3) => block.run::<1, 3>(rows_from(rows, offset, j)),
                (_, 2) => block.run::<1, 2>(rows_from(rows, offset, j)),
                _ => block.run::<1, 1>(rows_from(rows, offset, j)),
            }
            p += group;
        }
        j += block_rows;
    }
}

/// Where rows `j..j + R` start.
///
/// # Safety
/// `rows` holds rows `j..j + R`, each at least `offset` floats.
#[inline(always)]
unsafe fn rows_from<const R: usize>(rows: &[&[f32]], offset: usize, j: usize) -> [*const f32; R] {
    std::array::from_fn(|r| rows.get_unchecked(j + r).as_ptr().add(offset))
}

/// `G` query pairs from `first_pair` against `R` rows from `first_row`.
struct DotBlock {
    paired: *const f32,
    queries: *const f32,
    width: usize,
    count: usize,
    first_pair: usize,
    first_row: usize,
    n: usize,
    out: *mut f32,
}

impl DotBlock {
    #[target_feature(enable = "avx512f,avx2,fma")]
    #[inline]
    unsafe fn run<const R: usize, const G: usize>(&self, rows: [*const f32; R]) {
        let chunks = self.width / 8;
        let mut acc = [[_mm512_setzero_ps(); G]; R];
        for c in 0..chunks {
            let qv: [__m512; G] =
                std::array::from_fn(|g| _mm512_loadu_ps(self.paired.add((g * chunks + c) * 16)));
            for (acc_r, row) in acc.iter_mut().zip(&rows) {
                let r = _mm512_castpd_ps(_mm512_broadcast_f64x4(_mm256_castps_pd(
                    _mm256_loadu_ps(row.add(c * 8)),
                )));
                for (a, q) in acc_r.iter_mut().zip(&qv) {
                    *a = _mm512_fmadd_ps(*q, r, *a);
                }
            }
        }
        for (r, (acc_r, row)) in acc.iter().zip(&rows).enumerate() {
            for (g, a) in acc_r.iter().enumerate() {
                let halves = [
                    _mm512_castps512_ps256(*a),
                    _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(*a))),
                ];
                for (h, half) in halves.into_iter().enumerate() {
                    let query = 2 * (self.first_pair + g) + h;
                    if query >= self.count {
                        break;
                    }
                    let qp = self.queries.add(query * self.width);
                    let value = reduce(half, tail(qp, *row, chunks * 8, self.width));
                    *self.out.add(query * self.n + self.first_row + r) = value;
                }
            }
        }
    }
}
