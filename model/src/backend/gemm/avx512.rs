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
    store_sums(t, &acc);
}

/// `gf2p8affineqb` matrices (row `7 - i` of a qword picks the source bits of result bit i)
/// that turn an e4m3 byte `s eeee mmm` into the top two bytes of its f32 bits (2^120 smaller,
/// as [`e4m3x16_over_2_120`] makes them): `s 0000 eee` and `e mmm 0000`.
const E4M3_TOP_BYTE: i64 = 0x1020_4000_0000_0080;
const E4M3_SECOND_BYTE: i64 = 0x0000_0000_0102_0408;

/// Bytes 2 and 3 of every 32-bit lane (the rest become zero).
const TOP_TWO_BYTES: __mmask64 = 0xCCCC_CCCC_CCCC_CCCC;

/// The `vpermt2b` indices that put k-row `q` of four (64 bytes: 16 columns each) into 16 lanes:
/// byte 3 of lane i from the first table's byte `16q + i`, byte 2 from the second's.
static KROW_INDICES: [[u8; 64]; 4] = {
    let mut all = [[0u8; 64]; 4];
    let mut q = 0;
    while q < 4 {
        let mut lane = 0;
        while lane < NR {
            let byte = (16 * q + lane) as u8;
            all[q][4 * lane + 3] = byte;
            all[q][4 * lane + 2] = 64 + byte;
            lane += 1;
        }
        q += 1;
    }
    all
};

#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn krow_indices(q: usize) -> __m512i {
    _mm512_loadu_si512(KROW_INDICES[q].as_ptr().cast())
}

/// [`tile`] for FP8 panels, widening four k-rows (one 64-byte load) of a panel at a time: two
/// `gf2p8affineqb` make each byte's two f32 bytes for all 64 weights, then one `vpermt2b` per
/// k-row places them in its lanes with zeros below: the same bits as the sign-extend, shift
/// and mask, so the same products. A one-row FP8 tile is bound by its vector operations, not
/// by memory, on CPUs that split 512-bit operations in two (Zen 4: 17 G weights/s on one core
/// from L2, bf16 29); this saves about 5% of it there (docs/performance.md). Byte permutes
/// cost more than their count says on Zen 4: `vpermb` over pairs of k-rows, and `vpermt2q`
/// then `vpshufb`, measured slower than this.
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi,gfni,avx2,fma,f16c")]
pub(super) unsafe fn tile_fp8_shuffled<const R: usize, const P: usize>(t: &Tile<E4m3>) {
    debug_assert_eq!(t.panels, P);
    let mut acc = start_sums::<R, P, E4m3>(t);
    let mut a_ptrs = [t.a[0]; R];
    a_ptrs.copy_from_slice(&t.a[..R]);
    let mut scales = [_mm512_setzero_ps(); P];
    for (j, s) in scales.iter_mut().enumerate() {
        *s = column_scales::<E4m3>(t.scales.add(j * t.scales_stride));
    }
    let top = _mm512_set1_epi64(E4M3_TOP_BYTE);
    let second = _mm512_set1_epi64(E4M3_SECOND_BYTE);
    let indices = [
        krow_indices(0),
        krow_indices(1),
        krow_indices(2),
        krow_indices(3),
    ];
    let b = t.b;
    let lines = PanelLines::new(b, P, t.panel_stride);
    if t.prefetch && !t.accumulate {
        lines.prefetch_starts();
    }
    let whole = t.kc / 4 * 4;
    let mut kk = 0;
    while kk < whole {
        if t.prefetch {
            lines.prefetch_ahead_of(kk);
        }
        for j in 0..P {
            let raw = _mm512_loadu_si512(b.add(j * t.panel_stride + kk * NR).cast());
            let high = _mm512_gf2p8affine_epi64_epi8::<0>(raw, top);
            let low = _mm512_gf2p8affine_epi64_epi8::<0>(raw, second);
            for (q, idx) in indices.iter().enumerate() {
                let bits = _mm512_maskz_permutex2var_epi8(TOP_TWO_BYTES, high, *idx, low);
                let row = _mm512_mul_ps(_mm512_castsi512_ps(bits), scales[j]);
                for r in 0..R {
                    let a = _mm512_set1_ps(*a_ptrs[r].add(kk + q));
                    acc[r][j] = _mm512_fmadd_ps(a, row, acc[r][j]);
                }
            }
        }
        kk += 4;
    }
    // The last k-rows of a block that is not a multiple of four, one at a time.
    for kk in whole..t.kc {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The two shuffle matrices and the lane indices give, for every byte, the bits the
    /// shift-and-mask widening gives.
    #[test]
    fn shuffled_widening_is_the_shift_and_mask_one_for_every_byte() {
        if !crate::backend::has_avx512_byte_shuffles() {
            eprintln!("skipped: no GFNI and AVX-512 VBMI here");
            return;
        }
        #[target_feature(enable = "avx512f,avx512bw,avx512vbmi,gfni,avx2,fma,f16c")]
        unsafe fn both(bytes: &[u8; 64]) -> ([u32; 64], [u32; 64]) {
            let raw = _mm512_loadu_si512(bytes.as_ptr().cast());
            let high = _mm512_gf2p8affine_epi64_epi8::<0>(raw, _mm512_set1_epi64(E4M3_TOP_BYTE));
            let low = _mm512_gf2p8affine_epi64_epi8::<0>(raw, _mm512_set1_epi64(E4M3_SECOND_BYTE));
            let (mut shuffled, mut shifted) = ([0u32; 64], [0u32; 64]);
            for q in 0..4 {
                let bits =
                    _mm512_maskz_permutex2var_epi8(TOP_TWO_BYTES, high, krow_indices(q), low);
                _mm512_storeu_si512(shuffled[16 * q..].as_mut_ptr().cast(), bits);
                let widened = e4m3x16_over_2_120(bytes[16 * q..].as_ptr().cast());
                _mm512_storeu_ps(shifted[16 * q..].as_mut_ptr().cast(), widened);
            }
            (shuffled, shifted)
        }
        for start in (0..256).step_by(64) {
            let bytes: [u8; 64] = std::array::from_fn(|i| (start + i) as u8);
            // SAFETY: the CPU has the features (checked above).
            let (shuffled, shifted) = unsafe { both(&bytes) };
            assert_eq!(shuffled, shifted, "bytes {start}..{}", start + 64);
        }
    }
}
