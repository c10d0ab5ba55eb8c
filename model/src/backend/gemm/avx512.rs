//! The register tile on AVX-512: a panel's 16 columns are one zmm register, so each k-row is
//! one widening and one FMA per row of A where AVX2 needs two of each. Every output element is
//! the same `fma` chain over k as on AVX2 and in the portable tile, so results are bitwise
//! those paths' (the tests compare against the portable tile on every panel type).

use super::{E4m3, PanelElement, PanelLines, Tile, E4M3_IN_F32_MASK, FP8_SCALE_UP, NR};
use std::arch::x86_64::*;

const _: () = assert!(NR == 16, "a panel row is one zmm register");

/// 16 e4m3 bytes as f32 values 2^120 smaller, exactly: each byte sign-extended into a 32-bit
/// lane and shifted so that its exponent and mantissa land in the low bits of an f32's (whose
/// exponent bias is 120 more; e4m3 subnormals become f32 subnormals, exactly) and its sign in
/// the sign bit; the mask clears the sign's other copies. Three integer operations and no
/// conversion instruction.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
#[inline]
unsafe fn e4m3x16_over_2_120(b: *const E4m3) -> __m512 {
    let lanes = _mm512_cvtepi8_epi32(_mm_loadu_si128(b as *const __m128i));
    _mm512_castsi512_ps(_mm512_and_si512(
        _mm512_slli_epi32::<20>(lanes),
        _mm512_set1_epi32(E4M3_IN_F32_MASK as i32),
    ))
}

/// One k-row of a panel as one 16-lane vector. FP8 rows are multiplied by `scales`, which the
/// caller pre-multiplied by 2^120 (exact), so each value is the one rounding of `e4m3 * scale`.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
#[inline]
unsafe fn load_panel_row<E: PanelElement>(b: *const E, scales: __m512) -> __m512 {
    if E::FP8 {
        _mm512_mul_ps(e4m3x16_over_2_120(b as *const E4m3), scales)
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

/// The scales of a 16-column FP8 slice, times 2^120 (zeros for other panels).
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
#[inline]
unsafe fn column_scales<E: PanelElement>(scales: *const f32) -> __m512 {
    if E::FP8 {
        _mm512_mul_ps(_mm512_loadu_ps(scales), _mm512_set1_ps(FP8_SCALE_UP))
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

/// R rows of A times P adjacent panels (`Tile::panels == P`): R * P independent chains.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub(super) unsafe fn tile<const R: usize, const P: usize, E: PanelElement>(t: &Tile<E>) {
    debug_assert_eq!(t.panels, P);
    // Only the last panel's valid columns are read from C and written back.
    let last_mask: __mmask16 = if t.cols >= NR {
        0xFFFF
    } else {
        (1u16 << t.cols) - 1
    };
    let mask = |j: usize| if j + 1 == P { last_mask } else { 0xFFFF };
    let c = |r: usize, j: usize| t.c.add(r * t.ldc + j * NR);
    let mut acc = [[_mm512_setzero_ps(); P]; R];
    if t.accumulate {
        for (r, row) in acc.iter_mut().enumerate() {
            for (j, v) in row.iter_mut().enumerate() {
                *v = _mm512_maskz_loadu_ps(mask(j), c(r, j));
            }
        }
    }
    let mut a_ptrs = [t.a[0]; R];
    a_ptrs.copy_from_slice(&t.a[..R]);
    let mut scales = [_mm512_setzero_ps(); P];
    for (j, s) in scales.iter_mut().enumerate() {
        if E::FP8 {
            *s = column_scales::<E>(t.scales.add(j * t.scales_stride));
        }
    }
    let b = t.b;
    // One k-row of every panel: the same FMA chains with or without the prefetch.
    let step = |acc: &mut [[__m512; P]; R], kk: usize| {
        for j in 0..P {
            let row = load_panel_row(b.add(j * t.panel_stride + kk * NR), scales[j]);
            for r in 0..R {
                let a = _mm512_set1_ps(*a_ptrs[r].add(kk));
                acc[r][j] = _mm512_fmadd_ps(a, row, acc[r][j]);
            }
        }
    };
    // As on AVX2: a lone f32 row runs ahead by itself; the others prefetch on the tile that
    // brings the slice in from memory, once per cache line of each panel.
    if (R > 1 || E::BF16 || E::FP8) && t.prefetch {
        let lines = PanelLines::new(b, P, t.panel_stride);
        if !t.accumulate {
            lines.prefetch_starts();
        }
        for kk in 0..t.kc {
            lines.prefetch_ahead_of(kk);
            step(&mut acc, kk);
        }
    } else {
        for kk in 0..t.kc {
            step(&mut acc, kk);
        }
    }
    for (r, row) in acc.iter().enumerate() {
        for (j, v) in row.iter().enumerate() {
            _mm512_mask_storeu_ps(c(r, j), mask(j), *v);
        }
    }
}
