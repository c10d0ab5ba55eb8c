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

/// Which of a tile's C values are read and written: only the last panel's valid columns.
#[inline(always)]
fn column_mask<E>(t: &Tile<E>, panels: usize, j: usize) -> __mmask16 {
    if j + 1 < panels || t.cols >= NR {
        0xFFFF
    } else {
        (1u16 << t.cols) - 1
    }
}

/// The tile's accumulators: zeros, or C's partial sums from the previous K blocks.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
#[inline]
unsafe fn start_sums<const R: usize, const P: usize, E>(t: &Tile<E>) -> [[__m512; P]; R] {
    let mut acc = [[_mm512_setzero_ps(); P]; R];
    if t.accumulate {
        for (r, row) in acc.iter_mut().enumerate() {
            for (j, v) in row.iter_mut().enumerate() {
                *v = _mm512_maskz_loadu_ps(column_mask(t, P, j), t.c.add(r * t.ldc + j * NR));
            }
        }
    }
    acc
}

#[target_feature(enable = "avx512f,avx2,fma,f16c")]
#[inline]
unsafe fn store_sums<const R: usize, const P: usize, E>(t: &Tile<E>, acc: &[[__m512; P]; R]) {
    for (r, row) in acc.iter().enumerate() {
        for (j, v) in row.iter().enumerate() {
            _mm512_mask_storeu_ps(t.c.add(r * t.ldc + j * NR), column_mask(t, P, j), *v);
        }
    }
}

/// R rows of A times P adjacent panels (`Tile::panels == P`): R * P independent chains.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub(super) unsafe fn tile<const R: usize, const P: usize, E: PanelElement>(t: &Tile<E>) {
    debug_assert_eq!(t.panels, P);
    let mut acc = start_sums::<R, P, E>(t);
    let a_ptrs = t.a_rows::<R>();
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

/// One group of four k-rows of a grouped FP8 panel (64 bytes, see `fp8_position`: each
/// 32-bit lane one column's four bytes, the first row lowest) as the f32 bits of its rows,
/// 2^120 smaller, as [`e4m3x16_over_2_120`] makes them. A 16-bit arithmetic shift by four of
/// a byte that sits in a word's top half gives that byte's f32 top half (the sign copied down
/// to bit 11, which the mask clears with the neighbour's bits); a word's bottom byte gets there
/// by a shift by eight first, and a low word's result moves to the top half by a 32-bit shift.
/// Nine operations per 64 weights (two and a quarter per 16, where the sign-extend, shift and
/// mask take three), all within lanes: as fast on Zen 4 as two `gf2p8affineqb` making each
/// byte's two f32 bytes and six byte and word unpacks, and no GFNI needed.
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
unsafe fn e4m3_group_over_2_120(group: *const E4m3) -> [__m512; 4] {
    let lanes = _mm512_loadu_si512(group.cast());
    let mask = _mm512_set1_epi32(E4M3_IN_F32_MASK as i32);
    let odd = _mm512_srai_epi16::<4>(lanes); // rows 3 (top words) and 1 (bottom words)
    let even = _mm512_srai_epi16::<4>(_mm512_slli_epi16::<8>(lanes)); // rows 2 and 0
    [
        _mm512_slli_epi32::<16>(even),
        _mm512_slli_epi32::<16>(odd),
        even,
        odd,
    ]
    .map(|row| _mm512_castsi512_ps(_mm512_and_si512(row, mask)))
}

/// [`tile`] for grouped FP8 panels (`Tile::grouped_rows` > 0): each group of four k-rows
/// widened at once ([`e4m3_group_over_2_120`]), the rows after the groups one at a time; the
/// same FMA chains in the same order as [`tile`], so the same results.
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
pub(super) unsafe fn tile_fp8_groups<const R: usize, const P: usize>(t: &Tile<E4m3>) {
    debug_assert_eq!(t.panels, P);
    debug_assert!(t.grouped_rows.is_multiple_of(4) && t.grouped_rows <= t.kc);
    let mut acc = start_sums::<R, P, E4m3>(t);
    let a_ptrs = t.a_rows::<R>();
    let mut scales = [_mm512_setzero_ps(); P];
    for (j, s) in scales.iter_mut().enumerate() {
        *s = column_scales::<E4m3>(t.scales.add(j * t.scales_stride));
    }
    let b = t.b;
    let lines = PanelLines::of_tile(t, P);
    let mut kk = 0;
    while kk < t.grouped_rows {
        if t.prefetch {
            lines.prefetch_ahead_of(kk);
        }
        for j in 0..P {
            let rows = e4m3_group_over_2_120(b.add(j * t.panel_stride + kk * NR));
            for (q, bits) in rows.iter().enumerate() {
                let row = _mm512_mul_ps(*bits, scales[j]);
                for r in 0..R {
                    let a = _mm512_set1_ps(*a_ptrs[r].add(kk + q));
                    acc[r][j] = _mm512_fmadd_ps(a, row, acc[r][j]);
                }
            }
        }
        kk += 4;
    }
    for kk in t.grouped_rows..t.kc {
        if t.prefetch {
            lines.prefetch_ahead_of(kk);
        }
        for j in 0..P {
            let row = load_panel_row(b.add(j * t.panel_stride + kk * NR), scales[j]);
            for r in 0..R {
                let a = _mm512_set1_ps(*a_ptrs[r].add(kk));
                acc[r][j] = _mm512_fmadd_ps(a, row, acc[r][j]);
            }
        }
    }
    store_sums(t, &acc);
}

/// [`widen_fp8_block`] for a grouped panel's block: its first `grouped_rows` rows in groups.
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
pub(super) unsafe fn widen_fp8_groups(
    b: *const E4m3,
    scales: *const f32,
    kc: usize,
    grouped_rows: usize,
    out: &mut [f32],
) {
    debug_assert!(out.len() >= kc * NR && grouped_rows.is_multiple_of(4) && grouped_rows <= kc);
    let scales = column_scales::<E4m3>(scales);
    let out = out.as_mut_ptr();
    for kk in (0..grouped_rows).step_by(4) {
        for (q, bits) in e4m3_group_over_2_120(b.add(kk * NR)).iter().enumerate() {
            _mm512_storeu_ps(out.add((kk + q) * NR), _mm512_mul_ps(*bits, scales));
        }
    }
    for kk in grouped_rows..kc {
        _mm512_storeu_ps(out.add(kk * NR), load_panel_row(b.add(kk * NR), scales));
    }
}

/// A pair of k-rows of a nibble panel (16 bytes: column j's low nibble in row 2i, high in
/// 2i + 1, each stored plus 8) as two rows of `q * scale`: zero-extended into 32-bit lanes,
/// looked up (exact) and scaled (one rounding, as dequantizing).
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
#[inline]
unsafe fn int4_pair_rows(b: *const u8, scales: __m512) -> [__m512; 2] {
    // The sixteen values a nibble stands for; a permute reads only each lane's low four bits,
    // so the low nibble needs no mask.
    let values = _mm512_setr_ps(
        -8.0, -7.0, -6.0, -5.0, -4.0, -3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0,
    );
    let lanes = _mm512_cvtepu8_epi32(_mm_loadu_si128(b as *const __m128i));
    let low = _mm512_permutexvar_ps(lanes, values);
    let high = _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(lanes), values);
    [_mm512_mul_ps(low, scales), _mm512_mul_ps(high, scales)]
}

/// [`tile`] over nibble panels (`int4.rs`): the k-rows a pair at a time, the same FMA chains in
/// k order, so the same results as the f32 widening's.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub(super) unsafe fn tile_int4<const R: usize, const P: usize>(t: &Tile<u8>) {
    debug_assert_eq!(t.panels, P);
    let mut acc = start_sums::<R, P, u8>(t);
    let a_ptrs = t.a_rows::<R>();
    let mut scales: [__m512; P] =
        std::array::from_fn(|j| _mm512_loadu_ps(t.scales.add(j * t.scales_stride)));
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
                *s = _mm512_loadu_ps(t.scales.add(j * t.scales_stride + segment * NR));
            }
        }
        for j in 0..P {
            let rows = int4_pair_rows(t.b.add(j * t.panel_stride + pair * NR), scales[j]);
            for (q, row) in rows.into_iter().enumerate() {
                for r in 0..R {
                    let a = _mm512_set1_ps(*a_ptrs[r].add(2 * pair + q));
                    acc[r][j] = _mm512_fmadd_ps(a, row, acc[r][j]);
                }
            }
        }
    }
    if t.kc % 2 == 1 {
        // The last row may start a segment of its own.
        if t.scale_rows > 0 && pairs > 0 && pairs.is_multiple_of(pairs_per_segment) {
            let segment = pairs / pairs_per_segment;
            for (j, s) in scales.iter_mut().enumerate() {
                *s = _mm512_loadu_ps(t.scales.add(j * t.scales_stride + segment * NR));
            }
        }
        for j in 0..P {
            let [row, _] = int4_pair_rows(t.b.add(j * t.panel_stride + pairs * NR), scales[j]);
            for r in 0..R {
                let a = _mm512_set1_ps(*a_ptrs[r].add(2 * pairs));
                acc[r][j] = _mm512_fmadd_ps(a, row, acc[r][j]);
            }
        }
    }
    store_sums(t, &acc);
}

/// `int4::widen_int4_block` sixteen lanes at a time.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub(super) unsafe fn widen_int4_block(
    b: *const u8,
    scales: *const f32,
    kc: usize,
    out: &mut [f32],
) {
    debug_assert!(out.len() >= kc * NR);
    let scales = _mm512_loadu_ps(scales);
    let out = out.as_mut_ptr();
    for pair in 0..kc.div_ceil(2) {
        let rows = int4_pair_rows(b.add(pair * NR), scales);
        for (q, row) in rows.into_iter().enumerate().take(kc - 2 * pair) {
            _mm512_storeu_ps(out.add((2 * pair + q) * NR), row);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A grouped panel's group widens, row by row, to the bits the shift-and-mask widening
    /// gives its rows in k order, for every byte in every position.
    #[test]
    fn grouped_widening_is_the_shift_and_mask_one_for_every_byte() {
        if !crate::backend::has_avx512() || !is_x86_feature_detected!("avx512bw") {
            eprintln!("skipped: no AVX-512 BW here");
            return;
        }
        #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
        unsafe fn both(rows: &[u8; 64]) -> ([u32; 64], [u32; 64]) {
            let mut group = [E4m3(0); 64];
            for (i, byte) in rows.iter().enumerate() {
                group[super::super::fp8_position(i / NR, i % NR, 4)] = E4m3(*byte);
            }
            let (mut grouped, mut in_order) = ([0u32; 64], [0u32; 64]);
            for (q, bits) in e4m3_group_over_2_120(group.as_ptr()).iter().enumerate() {
                _mm512_storeu_ps(grouped[16 * q..].as_mut_ptr().cast(), *bits);
                let widened = e4m3x16_over_2_120(rows[16 * q..].as_ptr().cast());
                _mm512_storeu_ps(in_order[16 * q..].as_mut_ptr().cast(), widened);
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
