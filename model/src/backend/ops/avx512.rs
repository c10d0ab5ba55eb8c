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

/// glibc's `expf` (2.27 on: the one `f32::exp` calls), 16 lanes at a time, operation for
/// operation as its FMA build (the one x86-64 CPUs with FMA run) computes it: in f64, `x / ln2`
/// times 32 split into an integer `k` and a remainder `r`, `2^(k/32)` from a 32-entry table,
/// a cubic in `r`, one rounding to f32 at the end. So a softmax's exponentials are the scalar
/// loop's, bit for bit (a test compares them over a sweep of every float's bit patterns).
/// Lanes beyond glibc's fast path (`|x| >= 88`, infinities, NaNs) are left to the scalar call.
mod glibc_expf {
    /// `tab[i] = bits(2^(i/32)) - (i << 47)`.
    pub(super) const TABLE: [u64; 32] = [
        0x3ff0000000000000,
        0x3fefd9b0d3158574,
        0x3fefb5586cf9890f,
        0x3fef9301d0125b51,
        0x3fef72b83c7d517b,
        0x3fef54873168b9aa,
        0x3fef387a6e756238,
        0x3fef1e9df51fdee1,
        0x3fef06fe0a31b715,
        0x3feef1a7373aa9cb,
        0x3feedea64c123422,
        0x3feece086061892d,
        0x3feebfdad5362a27,
        0x3feeb42b569d4f82,
        0x3feeab07dd485429,
        0x3feea47eb03a5585,
        0x3feea09e667f3bcd,
        0x3fee9f75e8ec5f74,
        0x3feea11473eb0187,
        0x3feea589994cce13,
        0x3feeace5422aa0db,
        0x3feeb737b0cdc5e5,
        0x3feec49182a3f090,
        0x3feed503b23e255d,
        0x3feee89f995ad3ad,
        0x3feeff76f2fb5e47,
        0x3fef199bdd85529c,
        0x3fef3720dcef9069,
        0x3fef5818dcfba487,
        0x3fef7c97337b9b5f,
        0x3fefa4afa2a490da,
        0x3fefd0765b6e4540,
    ];
    /// `32 / ln 2` (0x1.71547652b82fep+5).
    pub(super) const INV_LN2_N: u64 = 0x40471547652b82fe;
    /// 0x1.8p+52: adding it rounds to an integer, which lands in the low mantissa bits.
    pub(super) const SHIFT: u64 = 0x4338000000000000;
    /// The cubic's coefficients, for `r` scaled by 32: C0 r^3 + C1 r^2 + C2 r + 1.
    pub(super) const C0: u64 = 0x3ebc6af84b912394;
    pub(super) const C1: u64 = 0x3f2ebfce50fac4f3;
    pub(super) const C2: u64 = 0x3f962e42ff0c52d6;
    /// `top12(88.0)`, less one: the fast path takes `(bits >> 20) & 0x7ff` up to this.
    pub(super) const FAST_ABSTOP_MAX: i32 = 0x42a;
}

/// Eight `expf`s of `x` in glibc's fast path.
#[target_feature(enable = "avx512f,avx2,fma")]
#[inline]
unsafe fn expf8(x: __m256) -> __m256 {
    use glibc_expf::*;
    let table = |at: usize| _mm512_loadu_si512(TABLE.as_ptr().add(at).cast());
    let pd = |bits: u64| _mm512_set1_pd(f64::from_bits(bits));
    let (inv, shift) = (pd(INV_LN2_N), pd(SHIFT));
    let xd = _mm512_cvtps_pd(x);
    // k = round(x * 32 / ln2), exactly as glibc: the product fused with the shift's add.
    let shifted = _mm512_fmadd_pd(inv, xd, shift);
    let ki = _mm512_castpd_si512(shifted);
    let kd = _mm512_sub_pd(shifted, shift);
    let r = _mm512_fmsub_pd(inv, xd, kd);
    // s = 2^(k/32): the table's entry for k mod 32, k / 32 added to its exponent.
    let index = _mm512_and_si512(ki, _mm512_set1_epi64(31));
    let low = _mm512_permutex2var_epi64(table(0), index, table(8));
    let high = _mm512_permutex2var_epi64(table(16), index, table(24));
    let upper = _mm512_test_epi64_mask(index, _mm512_set1_epi64(16));
    let t = _mm512_mask_blend_epi64(upper, low, high);
    let s = _mm512_castsi512_pd(_mm512_add_epi64(t, _mm512_slli_epi64::<47>(ki)));
    let z = _mm512_fmadd_pd(r, pd(C0), pd(C1));
    let r2 = _mm512_mul_pd(r, r);
    let y = _mm512_fmadd_pd(r, pd(C2), _mm512_set1_pd(1.0));
    let y = _mm512_fmadd_pd(z, r2, y);
    _mm512_cvtpd_ps(_mm512_mul_pd(y, s))
}

/// `x[i] = (x[i] - max).exp()` for every i, bitwise (see [`glibc_expf`]).
///
/// # Safety
/// AVX-512F, AVX2 and FMA present.
#[target_feature(enable = "avx512f,avx2,fma")]
pub(super) unsafe fn exp_minus_max(x: &mut [f32], max: f32) {
    let m = _mm512_set1_ps(max);
    let mut i = 0;
    while i < x.len() {
        let lanes_here = lanes((x.len() - i).min(16));
        let p = x.as_mut_ptr().add(i);
        let d = _mm512_sub_ps(_mm512_maskz_loadu_ps(lanes_here, p), m);
        let abstop = _mm512_and_si512(
            _mm512_srli_epi32::<20>(_mm512_castps_si512(d)),
            _mm512_set1_epi32(0x7ff),
        );
        let slow = lanes_here
            & _mm512_cmpgt_epi32_mask(abstop, _mm512_set1_epi32(glibc_expf::FAST_ABSTOP_MAX));
        let low = expf8(_mm512_castps512_ps256(d));
        let high = expf8(_mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(
            _mm512_castps_pd(d),
        )));
        let both = _mm512_insertf64x4::<1>(
            _mm512_castpd256_pd512(_mm256_castps_pd(low)),
            _mm256_castps_pd(high),
        );
        if slow != 0 {
            let mut differences = [0.0f32; 16];
            _mm512_storeu_ps(differences.as_mut_ptr(), d);
            _mm512_mask_storeu_ps(p, lanes_here & !slow, _mm512_castpd_ps(both));
            for (l, difference) in differences.iter().enumerate() {
                if slow & (1 << l) != 0 {
                    *p.add(l) = difference.exp();
                }
            }
        } else {
            _mm512_mask_storeu_ps(p, lanes_here, _mm512_castpd_ps(both));
        }
        i += 16;
    }
}
