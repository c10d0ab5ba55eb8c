//! The register tile on AVX2 with FMA: a panel's 16 columns are two 8-lane vectors. Every
//! output element is the same `fma` chain over k as in the portable tile, so results are
//! bitwise that path's.

use super::{E4m3, PanelElement, PanelLines, Tile, E4M3_IN_F32_MASK, FP8_SCALE_UP, NR};
use std::arch::x86_64::*;

/// Eight e4m3 bytes (the low half of `bytes`) as f32 values 2^120 smaller, exactly, as the
/// AVX-512 path widens them: sign-extended into 32-bit lanes, exponent and mantissa shifted into
/// the low bits of an f32's (subnormals included), the sign's other copies masked off.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn e4m3x8_over_2_120(bytes: __m128i) -> __m256 {
    _mm256_castsi256_ps(_mm256_and_si256(
        _mm256_slli_epi32::<20>(_mm256_cvtepi8_epi32(bytes)),
        _mm256_set1_epi32(E4M3_IN_F32_MASK as i32),
    ))
}

/// One k-row of a panel as two 8-lane vectors (columns 0..8 and 8..16). FP8 rows are
/// multiplied by `scales`, which the tile pre-multiplied by 2^120: exact, so each product is
/// the one rounding of `e4m3 * scale`, as dequantizing computes it.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn load_panel_row<E: PanelElement>(
    b: *const E,
    scales: (__m256, __m256),
) -> (__m256, __m256) {
    if E::FP8 {
        let bytes = _mm_loadu_si128(b as *const __m128i);
        let low = e4m3x8_over_2_120(bytes);
        let high = e4m3x8_over_2_120(_mm_unpackhi_epi64(bytes, bytes));
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
    let up = _mm256_set1_ps(FP8_SCALE_UP);
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

/// R rows of A times P adjacent panels (`Tile::panels == P`): 2 * R * P independent chains.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn tile<const R: usize, const P: usize, E: PanelElement>(t: &Tile<E>) {
    debug_assert_eq!(t.panels, P);
    let mut acc = [[[_mm256_setzero_ps(); 2]; P]; R];
    // Only the last panel may be partial: its values go through a staging row.
    let mut staging = [[0.0f32; NR]; R];
    let full = t.cols == NR;
    let c = |r: usize, j: usize| t.c.add(r * t.ldc + j * NR);
    if t.accumulate {
        for (r, row) in acc.iter_mut().enumerate() {
            for (j, v) in row.iter_mut().enumerate() {
                let mut from = c(r, j) as *const f32;
                if j + 1 == P && !full {
                    std::ptr::copy_nonoverlapping(from, staging[r].as_mut_ptr(), t.cols);
                    from = staging[r].as_ptr();
                }
                v[0] = _mm256_loadu_ps(from);
                v[1] = _mm256_loadu_ps(from.add(8));
            }
        }
    }
    let mut a_ptrs = [t.a[0]; R];
    a_ptrs.copy_from_slice(&t.a[..R]);
    let mut scales = [(_mm256_setzero_ps(), _mm256_setzero_ps()); P];
    if E::FP8 {
        let up = _mm256_set1_ps(FP8_SCALE_UP);
        for (j, s) in scales.iter_mut().enumerate() {
            let column = t.scales.add(j * t.scales_stride);
            *s = (
                _mm256_mul_ps(_mm256_loadu_ps(column), up),
                _mm256_mul_ps(_mm256_loadu_ps(column.add(8)), up),
            );
        }
    }
    let b = t.b;
    // One k-row of every panel: the same FMA chains with or without the prefetch.
    let step = |acc: &mut [[[__m256; 2]; P]; R], kk: usize| {
        for j in 0..P {
            let (b0, b1) = load_panel_row(b.add(j * t.panel_stride + kk * NR), scales[j]);
            for r in 0..R {
                let a = _mm256_broadcast_ss(&*a_ptrs[r].add(kk));
                acc[r][j][0] = _mm256_fmadd_ps(a, b0, acc[r][j][0]);
                acc[r][j][1] = _mm256_fmadd_ps(a, b1, acc[r][j][1]);
            }
        }
    };
    // A lone f32 row streams as fast without it (its loop is short enough for the core to
    // run far ahead by itself) and measured ~8% slower with it. The others prefetch once per
    // cache line of each panel.
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
            if j + 1 == P && !full {
                _mm256_storeu_ps(staging[r].as_mut_ptr(), v[0]);
                _mm256_storeu_ps(staging[r].as_mut_ptr().add(8), v[1]);
                std::ptr::copy_nonoverlapping(staging[r].as_ptr(), c(r, j), t.cols);
            } else {
                _mm256_storeu_ps(c(r, j), v[0]);
                _mm256_storeu_ps(c(r, j).add(8), v[1]);
            }
        }
    }
}
