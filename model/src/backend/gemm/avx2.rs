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
    let scales = column_scales(scales);
    let out = out.as_mut_ptr();
    for kk in 0..kc {
        let (low, high) = load_panel_row(b.add(kk * NR), scales);
        _mm256_storeu_ps(out.add(kk * NR), low);
        _mm256_storeu_ps(out.add(kk * NR + 8), high);
    }
}

/// Half of a group of four k-rows of a grouped FP8 panel (its 32 bytes from `half`, see
/// `fp8_position`: eight 32-bit lanes, each one column's four bytes, the first row lowest) as
/// the f32 bits of those columns in each of the four rows, 2^120 smaller, as the AVX-512 tiles
/// widen a whole group in one zmm: shifts and masks within 32-bit lanes, nine operations per
/// 32 weights (four and a half per 16, where the sign-extend, shift and mask take seven,
/// three of them shuffles). A half at a time, so that a tile holds four widened rows, not
/// eight, beside its sums and scales in AVX2's 16 registers.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn e4m3_half_group_over_2_120(half: *const E4m3) -> [__m256; 4] {
    let mask = _mm256_set1_epi32(E4M3_IN_F32_MASK as i32);
    let lanes = _mm256_loadu_si256(half.cast());
    let odd = _mm256_srai_epi16::<4>(lanes); // rows 3 (top words) and 1 (bottom words)
    let even = _mm256_srai_epi16::<4>(_mm256_slli_epi16::<8>(lanes)); // rows 2 and 0
    [
        _mm256_slli_epi32::<16>(even),
        _mm256_slli_epi32::<16>(odd),
        even,
        odd,
    ]
    .map(|row| _mm256_castsi256_ps(_mm256_and_si256(row, mask)))
}

/// Bytes from a group's start to its half holding columns 8..16.
const SECOND_HALF: usize = 32;

/// [`widen_fp8_block`] for a grouped panel's block: its first `grouped_rows` rows in groups.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn widen_fp8_groups(
    b: *const E4m3,
    scales: *const f32,
    kc: usize,
    grouped_rows: usize,
    out: &mut [f32],
) {
    debug_assert!(out.len() >= kc * NR && grouped_rows.is_multiple_of(4) && grouped_rows <= kc);
    let scales = column_scales(scales);
    let out = out.as_mut_ptr();
    for kk in (0..grouped_rows).step_by(4) {
        let group = b.add(kk * NR);
        for (half, scales, columns) in [(0, scales.0, 0), (SECOND_HALF, scales.1, 8)] {
            for (q, bits) in e4m3_half_group_over_2_120(group.add(half))
                .into_iter()
                .enumerate()
            {
                _mm256_storeu_ps(
                    out.add((kk + q) * NR + columns),
                    _mm256_mul_ps(bits, scales),
                );
            }
        }
    }
    for kk in grouped_rows..kc {
        let (low, high) = load_panel_row(b.add(kk * NR), scales);
        _mm256_storeu_ps(out.add(kk * NR), low);
        _mm256_storeu_ps(out.add(kk * NR + 8), high);
    }
}

/// The scales of a 16-column FP8 slice, times 2^120, as two 8-lane vectors.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn column_scales(scales: *const f32) -> (__m256, __m256) {
    let up = _mm256_set1_ps(FP8_SCALE_UP);
    (
        _mm256_mul_ps(_mm256_loadu_ps(scales), up),
        _mm256_mul_ps(_mm256_loadu_ps(scales.add(8)), up),
    )
}

/// A tile's accumulators: per row of A and panel, columns 0..8 and 8..16.
type Sums<const R: usize, const P: usize> = [[[__m256; 2]; P]; R];

/// The tile's accumulators: zeros, or C's partial sums from the previous K blocks (only the
/// last panel may be partial: its values go through a staging row).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn start_sums<const R: usize, const P: usize, E>(t: &Tile<E>) -> Sums<R, P> {
    let mut acc = [[[_mm256_setzero_ps(); 2]; P]; R];
    if t.accumulate {
        let mut staging = [0.0f32; NR];
        for (r, row) in acc.iter_mut().enumerate() {
            for (j, v) in row.iter_mut().enumerate() {
                let mut from = t.c.add(r * t.ldc + j * NR) as *const f32;
                if j + 1 == P && t.cols < NR {
                    std::ptr::copy_nonoverlapping(from, staging.as_mut_ptr(), t.cols);
                    from = staging.as_ptr();
                }
                v[0] = _mm256_loadu_ps(from);
                v[1] = _mm256_loadu_ps(from.add(8));
            }
        }
    }
    acc
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn store_sums<const R: usize, const P: usize, E>(t: &Tile<E>, acc: &Sums<R, P>) {
    let mut staging = [0.0f32; NR];
    for (r, row) in acc.iter().enumerate() {
        for (j, v) in row.iter().enumerate() {
            let to = t.c.add(r * t.ldc + j * NR);
            if j + 1 == P && t.cols < NR {
                _mm256_storeu_ps(staging.as_mut_ptr(), v[0]);
                _mm256_storeu_ps(staging.as_mut_ptr().add(8), v[1]);
                std::ptr::copy_nonoverlapping(staging.as_ptr(), to, t.cols);
            } else {
                _mm256_storeu_ps(to, v[0]);
                _mm256_storeu_ps(to.add(8), v[1]);
            }
        }
    }
}

/// Adds each row of A's value at k-row `kk` times panel `j`'s k-row (two halves) to its sums.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn add_row_products<const R: usize, const P: usize>(
    acc: &mut Sums<R, P>,
    a_rows: &[*const f32; R],
    kk: usize,
    j: usize,
    (low, high): (__m256, __m256),
) {
    for r in 0..R {
        let a = _mm256_broadcast_ss(&*a_rows[r].add(kk));
        acc[r][j][0] = _mm256_fmadd_ps(a, low, acc[r][j][0]);
        acc[r][j][1] = _mm256_fmadd_ps(a, high, acc[r][j][1]);
    }
}

/// R rows of A times P adjacent panels (`Tile::panels == P`): 2 * R * P independent chains.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn tile<const R: usize, const P: usize, E: PanelElement>(t: &Tile<E>) {
    debug_assert_eq!(t.panels, P);
    let mut acc = start_sums::<R, P, E>(t);
    let a_ptrs = t.a_rows::<R>();
    let mut scales = [(_mm256_setzero_ps(), _mm256_setzero_ps()); P];
    if E::FP8 {
        for (j, s) in scales.iter_mut().enumerate() {
            *s = column_scales(t.scales.add(j * t.scales_stride));
        }
    }
    let b = t.b;
    // One k-row of every panel: the same FMA chains with or without the prefetch.
    let step = |acc: &mut Sums<R, P>, kk: usize| {
        for (j, scales) in scales.iter().enumerate() {
            let row = load_panel_row(b.add(j * t.panel_stride + kk * NR), *scales);
            add_row_products(acc, &a_ptrs, kk, j, row);
        }
    };
    // A lone f32 row streams as fast without it (its loop is short enough for the core to
    // run far ahead by itself) and measured ~8% slower with it. The others prefetch once per
    // cache line of each panel.
    if (R > 1 || E::BF16 || E::FP8) && t.prefetch {
        let lines = PanelLines::of_tile(t, P);
        for kk in 0..t.kc {
            lines.prefetch_ahead_of(kk);
            step(&mut acc, kk);
        }
    } else {
        for kk in 0..t.kc {
            step(&mut acc, kk);
        }
    }
    store_sums(t, &acc);
}

/// [`tile`] for grouped FP8 panels (`Tile::grouped_rows` > 0): each group of four k-rows
/// widened at once ([`e4m3_group_over_2_120`]), the rows after the groups one at a time; the
/// same FMA chains in the same order as [`tile`], so the same results.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn tile_fp8_groups<const R: usize, const P: usize>(t: &Tile<E4m3>) {
    debug_assert_eq!(t.panels, P);
    debug_assert!(t.grouped_rows.is_multiple_of(4) && t.grouped_rows <= t.kc);
    let mut acc = start_sums::<R, P, E4m3>(t);
    let a_ptrs = t.a_rows::<R>();
    let mut scales = [(_mm256_setzero_ps(), _mm256_setzero_ps()); P];
    for (j, s) in scales.iter_mut().enumerate() {
        *s = column_scales(t.scales.add(j * t.scales_stride));
    }
    let b = t.b;
    let lines = PanelLines::of_tile(t, P);
    let mut kk = 0;
    while kk < t.grouped_rows {
        if t.prefetch {
            lines.prefetch_ahead_of(kk);
        }
        for j in 0..P {
            let group = b.add(j * t.panel_stride + kk * NR);
            for (h, (half, scales)) in [(0, scales[j].0), (SECOND_HALF, scales[j].1)]
                .into_iter()
                .enumerate()
            {
                for (q, bits) in e4m3_half_group_over_2_120(group.add(half))
                    .into_iter()
                    .enumerate()
                {
                    let row = _mm256_mul_ps(bits, scales);
                    for r in 0..R {
                        let a = _mm256_broadcast_ss(&*a_ptrs[r].add(kk + q));
                        acc[r][j][h] = _mm256_fmadd_ps(a, row, acc[r][j][h]);
                    }
                }
            }
        }
        kk += 4;
    }
    for kk in t.grouped_rows..t.kc {
        if t.prefetch {
            lines.prefetch_ahead_of(kk);
        }
        for (j, scales) in scales.iter().enumerate() {
            let row = load_panel_row(b.add(j * t.panel_stride + kk * NR), *scales);
            add_row_products(&mut acc, &a_ptrs, kk, j, row);
        }
    }
    store_sums(t, &acc);
}

/// A pair of k-rows of a nibble panel as two rows of `q * scale`, each as two 8-lane halves
/// (columns 0..8 and 8..16), as the AVX-512 tiles make them.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn int4_pair_rows(b: *const u8, scales: (__m256, __m256)) -> [(__m256, __m256); 2] {
    let bytes = _mm_loadu_si128(b as *const __m128i);
    let halves = [
        _mm256_cvtepu8_epi32(bytes),
        _mm256_cvtepu8_epi32(_mm_unpackhi_epi64(bytes, bytes)),
    ];
    let eight = _mm256_set1_epi32(8);
    let mask = _mm256_set1_epi32(0xf);
    let mut rows = [(_mm256_setzero_ps(), _mm256_setzero_ps()); 2];
    for (q, row) in rows.iter_mut().enumerate() {
        let [low, high] = halves.map(|lanes| {
            if q == 0 {
                _mm256_sub_epi32(_mm256_and_si256(lanes, mask), eight)
            } else {
                _mm256_sub_epi32(_mm256_srli_epi32::<4>(lanes), eight)
            }
        });
        *row = (
            _mm256_mul_ps(_mm256_cvtepi32_ps(low), scales.0),
            _mm256_mul_ps(_mm256_cvtepi32_ps(high), scales.1),
        );
    }
    rows
}

/// [`tile`] over nibble panels (`int4.rs`): a pair of k-rows at a time, the same FMA chains.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn tile_int4<const R: usize, const P: usize>(t: &Tile<u8>) {
    debug_assert_eq!(t.panels, P);
    let mut acc = start_sums::<R, P, u8>(t);
    let a_ptrs = t.a_rows::<R>();
    let load = |j: usize, segment: usize| {
        let at = t.scales.add(j * t.scales_stride + segment * NR);
        (_mm256_loadu_ps(at), _mm256_loadu_ps(at.add(8)))
    };
    let mut scales: [(__m256, __m256); P] = std::array::from_fn(|j| load(j, 0));
    let lines = PanelLines::of_tile(t, P);
    let pairs = t.kc / 2;
    let pairs_per_segment = (t.scale_rows / 2).max(1);
    for pair in 0..pairs {
        if t.prefetch {
            lines.prefetch_ahead_of(pair);
        }
        if t.scale_rows > 0 && pair > 0 && pair.is_multiple_of(pairs_per_segment) {
            let segment = pair / pairs_per_segment;
            for (j, s) in scales.iter_mut().enumerate() {
                *s = load(j, segment);
            }
        }
        for (j, scales) in scales.iter().enumerate() {
            let rows = int4_pair_rows(t.b.add(j * t.panel_stride + pair * NR), *scales);
            for (q, row) in rows.into_iter().enumerate() {
                add_row_products(&mut acc, &a_ptrs, 2 * pair + q, j, row);
            }
        }
    }
    if t.kc % 2 == 1 {
        // The last row may start a segment of its own.
        if t.scale_rows > 0 && pairs > 0 && pairs.is_multiple_of(pairs_per_segment) {
            let segment = pairs / pairs_per_segment;
            for (j, s) in scales.iter_mut().enumerate() {
                *s = load(j, segment);
            }
        }
        for (j, scales) in scales.iter().enumerate() {
            let [row, _] = int4_pair_rows(t.b.add(j * t.panel_stride + pairs * NR), *scales);
            add_row_products(&mut acc, &a_ptrs, 2 * pairs, j, row);
        }
    }
    store_sums(t, &acc);
}

/// `int4::widen_int4_block` eight lanes at a time.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn widen_int4_block(
    b: *const u8,
    scales: *const f32,
    kc: usize,
    out: &mut [f32],
) {
    debug_assert!(out.len() >= kc * NR);
    let scales = (_mm256_loadu_ps(scales), _mm256_loadu_ps(scales.add(8)));
    let out = out.as_mut_ptr();
    for pair in 0..kc.div_ceil(2) {
        let rows = int4_pair_rows(b.add(pair * NR), scales);
        for (q, (low, high)) in rows.into_iter().enumerate().take(kc - 2 * pair) {
            _mm256_storeu_ps(out.add((2 * pair + q) * NR), low);
            _mm256_storeu_ps(out.add((2 * pair + q) * NR + 8), high);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A grouped panel's group widens, row by row, to the bits the sign-extend, shift and
    /// mask widening gives its rows in k order, for every byte in every position.
    #[test]
    fn grouped_widening_is_the_shift_and_mask_one_for_every_byte() {
        if !crate::backend::has_avx2_fma() {
            eprintln!("skipped: no AVX2 here");
            return;
        }
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn both(rows: &[u8; 64]) -> ([u32; 64], [u32; 64]) {
            let mut group = [E4m3(0); 64];
            for (i, byte) in rows.iter().enumerate() {
                group[super::super::fp8_position(i / NR, i % NR, 4)] = E4m3(*byte);
            }
            let (mut grouped, mut in_order) = ([0u32; 64], [0u32; 64]);
            for (half, columns) in [(0, 0), (SECOND_HALF, 8)] {
                let rows = e4m3_half_group_over_2_120(group.as_ptr().add(half));
                for (q, bits) in rows.into_iter().enumerate() {
                    _mm256_storeu_ps(grouped[16 * q + columns..].as_mut_ptr().cast(), bits);
                }
            }
            for q in 0..4 {
                let bytes = _mm_loadu_si128(rows[16 * q..].as_ptr().cast());
                let low = e4m3x8_over_2_120(bytes);
                let high = e4m3x8_over_2_120(_mm_unpackhi_epi64(bytes, bytes));
                _mm256_storeu_ps(in_order[16 * q..].as_mut_ptr().cast(), low);
                _mm256_storeu_ps(in_order[16 * q + 8..].as_mut_ptr().cast(), high);
            }
            (grouped, in_order)
        }
        for shift in [0, 1, 17] {
            for start in (0..256).step_by(64) {
                let rows: [u8; 64] = std::array::from_fn(|i| ((start + i * shift + i) % 256) as u8);
                // SAFETY: the CPU has the features (checked above).
                let (grouped, in_order) = unsafe { both(&rows) };
                assert_eq!(grouped, in_order, "bytes from {start}, step {}", shift + 1);
            }
        }
    }
}
