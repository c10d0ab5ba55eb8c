//! The register tile on AVX2 with FMA: a panel's 16 columns are two 8-lane vectors. Every
//! output element is the same `fma` chain over k as in the portable tile, so results are
//! bitwise that path's.

use super::{E4m3, PanelElement, Tile, NR, PREFETCH_AHEAD_BYTES};
use std::arch::x86_64::*;

/// Eight e4m3 bytes, each in the high byte of a 16-bit lane, as f16 values 2^8 smaller,
/// widened to f32, exactly: an arithmetic shift by one moves the exponent and mantissa
/// into an f16's (whose exponent bias is 8 more, subnormals included) and copies the sign
/// into the f16's top exponent bit, which the mask clears.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn e4m3x8_over_256(high_bytes: __m128i) -> __m256 {
    let half = _mm_and_si128(
        _mm_srai_epi16::<1>(high_bytes),
        _mm_set1_epi16(0xBFFFu16 as i16),
    );
    _mm256_cvtph_ps(half)
}

/// One k-row of a panel as two 8-lane vectors (columns 0..8 and 8..16). FP8 rows are
/// multiplied by `scales`, which the tile pre-multiplied by 2^8: exact, so each product is
/// the one rounding of `e4m3 * scale`, as dequantizing computes it.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn load_panel_row<E: PanelElement>(
    b: *const E,
    scales: (__m256, __m256),
) -> (__m256, __m256) {
    if E::FP8 {
        let bytes = _mm_loadu_si128(b as *const __m128i);
        let zero = _mm_setzero_si128();
        let low = e4m3x8_over_256(_mm_unpacklo_epi8(zero, bytes));
        let high = e4m3x8_over_256(_mm_unpackhi_epi8(zero, bytes));
        (_mm256_mul_ps(low, scales.0), _mm256_mul_ps(high, scales.1))
    } else if E::BF16 {
        // Lane j holds column j in its low half and column j + 8 in its high half.
        let lanes = _mm256_loadu_si256(b as *const __m256i);
        let low = _mm256_slli_epi32::<16>(lanes);
        let high = _mm256_and_si256(lanes, _mm256_set1_epi32(0xFFFF_0000u32 as i32));
        (_mm256_castsi256_ps(low), _mm256_castsi256_ps(high))
    } else {
        let b = b as *const f32;
        (_mm256_loadu_ps(b), _mm256_loadu_ps(b.add(8)))
    }
}

/// [`super::widen_fp8_block`] eight lanes at a time.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn widen_fp8_block(
    b: *const E4m3,
    scales: *const f32,
    kc: usize,
    out: &mut [f32],
) {
    let up = _mm256_set1_ps(256.0);
    let scales = (
        _mm256_mul_ps(_mm256_loadu_ps(scales), up),
        _mm256_mul_ps(_mm256_loadu_ps(scales.add(8)), up),
    );
    let out = out.as_mut_ptr();
    for kk in 0..kc {
        let (low, high) = load_panel_row(b.add(kk * NR), scales);
        _mm256_storeu_ps(out.add(kk * NR), low);
        _mm256_storeu_ps(out.add(kk * NR + 8), high);
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn tile<const R: usize, E: PanelElement>(t: &Tile<E>) {
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
    let mut a_ptrs = [t.a[0]; R];
    a_ptrs.copy_from_slice(&t.a[..R]);
    let mut b = t.b;
    let scales = if E::FP8 {
        let up = _mm256_set1_ps(256.0);
        (
            _mm256_mul_ps(_mm256_loadu_ps(t.scales), up),
            _mm256_mul_ps(_mm256_loadu_ps(t.scales.add(8)), up),
        )
    } else {
        (_mm256_setzero_ps(), _mm256_setzero_ps())
    };
    // One k-row: the same FMA chain with or without the prefetch.
    let mut step = |kk: usize, b: *const E| {
        let (b0, b1) = load_panel_row(b, scales);
        for r in 0..R {
            let a = _mm256_broadcast_ss(&*a_ptrs[r].add(kk));
            acc[r][0] = _mm256_fmadd_ps(a, b0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(a, b1, acc[r][1]);
        }
    };
    // A lone f32 row streams as fast without it (its loop is short enough for the core to
    // run far ahead by itself) and measured ~8% slower with it.
    if (R > 1 || E::BF16 || E::FP8) && t.prefetch {
        for kk in 0..t.kc {
            let ahead = (b as *const i8).wrapping_add(PREFETCH_AHEAD_BYTES);
            _mm_prefetch::<_MM_HINT_T0>(ahead);
            step(kk, b);
            b = b.add(NR);
        }
    } else {
        for kk in 0..t.kc {
            step(kk, b);
            b = b.add(NR);
        }
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
