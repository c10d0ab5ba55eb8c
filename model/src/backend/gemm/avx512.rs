//! The register tile on AVX-512: a panel's 16 columns are one zmm register, so each k-row is
//! one widening and one FMA per row of A where AVX2 needs two of each. Every output element is
//! the same `fma` chain over k as on AVX2 and in the portable tile, so results are bitwise
//! those paths' (the tests compare against the portable tile on every panel type).

use super::{E4m3, PanelElement, Tile, NR, PREFETCH_AHEAD_BYTES};
use std::arch::x86_64::*;

const _: () = assert!(NR == 16, "a panel row is one zmm register");

/// 16 e4m3 bytes as f32 values 2^8 smaller, exactly: each byte into the high half of a 16-bit
/// lane, an arithmetic shift by one moves exponent and mantissa into an f16's (whose exponent
/// bias is 8 more, subnormals included), the mask clears the sign's copy in the exponent's
/// top bit, and `vcvtph2ps` widens the 16 lanes at once.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
#[inline]
unsafe fn e4m3x16_over_256(b: *const E4m3) -> __m512 {
    let bytes = _mm_loadu_si128(b as *const __m128i);
    let half = _mm256_and_si256(
        _mm256_slli_epi16::<7>(_mm256_cvtepi8_epi16(bytes)),
        _mm256_set1_epi16(0xBFFFu16 as i16),
    );
    _mm512_cvtph_ps(half)
}

/// One k-row of a panel as one 16-lane vector. FP8 rows are multiplied by `scales`, which the
/// caller pre-multiplied by 2^8 (exact), so each value is the one rounding of `e4m3 * scale`.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
#[inline]
unsafe fn load_panel_row<E: PanelElement>(b: *const E, scales: __m512) -> __m512 {
    if E::FP8 {
        _mm512_mul_ps(e4m3x16_over_256(b as *const E4m3), scales)
    } else if E::BF16 {
        // Lane j holds column j in its low half and column j + 8 in its high half.
        let lanes = _mm256_loadu_si256(b as *const __m256i);
        let low = _mm256_castsi256_pd(_mm256_slli_epi32::<16>(lanes));
        let high = _mm256_castsi256_pd(_mm256_and_si256(
            lanes,
            _mm256_set1_epi32(0xFFFF_0000u32 as i32),
        ));
        _mm512_castpd_ps(_mm512_insertf64x4::<1>(_mm512_castpd256_pd512(low), high))
    } else {
        _mm512_loadu_ps(b as *const f32)
    }
}

/// The scales of a 16-column FP8 slice, times 2^8 (zeros for other panels).
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
#[inline]
unsafe fn column_scales<E: PanelElement>(scales: *const f32) -> __m512 {
    if E::FP8 {
        _mm512_mul_ps(_mm512_loadu_ps(scales), _mm512_set1_ps(256.0))
    } else {
        _mm512_setzero_ps()
    }
}

/// [`super::widen_fp8_block`] sixteen lanes at a time.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub(super) unsafe fn widen_fp8_block(
    b: *const E4m3,
    scales: *const f32,
    kc: usize,
    out: &mut [f32],
) {
    debug_assert!(out.len() >= kc * NR);
    let scales = column_scales::<E4m3>(scales);
    let out = out.as_mut_ptr();
    for kk in 0..kc {
        _mm512_storeu_ps(out.add(kk * NR), load_panel_row(b.add(kk * NR), scales));
    }
}

#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub(super) unsafe fn tile<const R: usize, E: PanelElement>(t: &Tile<E>) {
    // Only the panel's valid columns are read from C and written back.
    let mask: __mmask16 = if t.cols >= NR {
        0xFFFF
    } else {
        (1u16 << t.cols) - 1
    };
    let mut acc = [_mm512_setzero_ps(); R];
    if t.accumulate {
        for (r, row) in acc.iter_mut().enumerate() {
            *row = _mm512_maskz_loadu_ps(mask, t.c.add(r * t.ldc));
        }
    }
    let mut a_ptrs = [t.a[0]; R];
    a_ptrs.copy_from_slice(&t.a[..R]);
    let scales = column_scales::<E>(t.scales);
    let mut b = t.b;
    // One k-row: the same FMA chain with or without the prefetch.
    let mut step = |kk: usize, b: *const E| {
        let row = load_panel_row(b, scales);
        for r in 0..R {
            let a = _mm512_set1_ps(*a_ptrs[r].add(kk));
            acc[r] = _mm512_fmadd_ps(a, row, acc[r]);
        }
    };
    // As on AVX2: a lone f32 row runs ahead by itself; the others prefetch on the tile that
    // brings the slice in from memory.
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
        _mm512_mask_storeu_ps(t.c.add(r * t.ldc), mask, *row);
    }
}
