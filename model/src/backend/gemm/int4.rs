//! INT4 panels: a matrix whose values are all integers in [-8, 7] times a scale per column
//! segment (compressed-tensors' INT4, Kimi-K2-Thinking's experts) held as nibbles, the half
//! byte a weight its checkpoint stores, and widened in registers to `q * scale`: the f32 that
//! dequantizing computes (one rounding of the exact product, as the FP8 path's `e4m3 * scale`),
//! so products are bitwise those of the f32 copy.
//!
//! A panel holds its k-rows in pairs: byte `j` of pair `i` (16 bytes) holds column `j` of
//! k-row `2i` in its low nibble and of k-row `2i + 1` in its high one, each stored plus 8.

use crate::backend::fp8::E4M3_OF_STORED_INT4;

use super::{
    Fp8Matrix, InputRows, KBlocks, OutPtr, PackedMatrix, PanelRange, Panels, Scaled, Tile, MR, NR,
};

/// Which e4m3 bytes are integers in [-8, 7], and their stored nibble (`q + 8`).
const NIBBLE_OF_E4M3: [Option<u8>; 256] = {
    let mut table = [None; 256];
    let mut nibble = 0;
    while nibble < 16 {
        table[E4M3_OF_STORED_INT4[nibble] as usize] = Some(nibble as u8);
        nibble += 1;
    }
    // Negative zero is zero too.
    table[0x80] = Some(8);
    table
};

/// Whether `m` can be held as nibbles: every value an integer in [-8, 7] and every scale
/// segment starting on a pair of k-rows. A real FP8 checkpoint's matrix fails at its first
/// other value, so the scan costs nothing there.
pub(super) fn holds_only_int4(m: &Fp8Matrix) -> bool {
    m.segment_starts.iter().all(|s| s % 2 == 0)
        && m.values
            .iter()
            .all(|&b| NIBBLE_OF_E4M3[b as usize].is_some())
}

/// Bytes of one panel: `ceil(k / 2)` pairs of 16.
fn panel_bytes(k: usize) -> usize {
    k.div_ceil(2) * NR
}

/// The nibble of each value, every value of each part already checked by [`holds_only_int4`].
fn nibble(byte: u8) -> u8 {
    NIBBLE_OF_E4M3[byte as usize].unwrap_or(8)
}

impl PackedMatrix {
    /// Parts that [`holds_only_int4`] accepts, with the same segments, stacked into one matrix
    /// of nibble panels; padding rows and the odd k-row past the last hold 0.
    pub(super) fn from_int4(parts: &[&Fp8Matrix], k: usize) -> Self {
        let n: usize = parts.iter().map(|m| m.rows).sum();
        let num_panels = n.div_ceil(NR);
        let mut values = vec![0x88u8; num_panels * panel_bytes(k)];
        let rows = parts
            .iter()
            .flat_map(|m| m.values.chunks_exact(k.max(1)).take(m.rows));
        for (row, source) in rows.enumerate() {
            let (panel, column) = (row / NR, row % NR);
            let out = &mut values[panel * panel_bytes(k)..(panel + 1) * panel_bytes(k)];
            for (pair, two) in source.chunks(2).enumerate() {
                let high = two.get(1).map_or(8, |&b| nibble(b));
                out[pair * NR + column] = nibble(two[0]) | (high << 4);
            }
        }
        let segment_starts = parts[0].segment_starts.clone();
        let scales = super::panel_scales(parts, segment_starts.len());
        Self {
            n,
            k,
            panels: Panels::Int4 {
                values,
                segment_starts,
                scales,
            },
        }
    }

    /// SAFETY: as `product_at`.
    pub(super) unsafe fn int4_product(
        &self,
        values: &[u8],
        scaled: &Scaled<'_>,
        a: InputRows<'_>,
        m: usize,
        out: OutPtr,
        parallel: bool,
    ) {
        self.row_blocks(m, true, parallel, |panels_here, m0, rows| {
            // SAFETY: as in `product_of`: disjoint columns per group, rows checked.
            unsafe { self.int4_panel_product(values, scaled, panels_here, &a, m0, rows, out) }
        });
    }

    /// Columns of `panels_here` for rows `first..first + rows`: under several row tiles each
    /// K block is widened once (as FP8 panels are), else the nibble tiles run over K blocks
    /// cut at the scale segments.
    #[allow(clippy::too_many_arguments)]
    unsafe fn int4_panel_product(
        &self,
        values: &[u8],
        scaled: &Scaled<'_>,
        panels_here: PanelRange,
        a: &InputRows<'_>,
        first: usize,
        rows: usize,
        c: OutPtr,
    ) {
        let p = panels_here.first;
        let stride = panel_bytes(self.k);
        let panel = values[p * stride..(p + panels_here.count) * stride].as_ptr();
        if rows > MR {
            let widen =
                |j: usize, piece: usize, kc: usize, scales: *const f32, into: &mut [f32]| {
                    // SAFETY: segments start on pairs, so the piece's first k-row starts a pair.
                    unsafe {
                        widen_int4_block(panel.add(j * stride + piece / 2 * NR), scales, kc, into)
                    }
                };
            return self.widened_product(scaled, panels_here, widen, a, first, rows, c);
        }
        let last = p + panels_here.count - 1;
        // Groups of one even width that divides KC (Kimi's 32): the tiles reload scales at each
        // group inside a K block. Otherwise the blocks are cut at every segment.
        let group = uniform_group(scaled.segment_starts, self.k);
        let blocks = KBlocks::new(self.k, if group.is_some() { None } else { Some(scaled) });
        for kb in blocks {
            let (segment, scale_rows) = match group {
                Some(g) => (kb.k0 / g, g),
                None => (kb.segment, 0),
            };
            let block_rows = super::BlockRows {
                k0: kb.k0,
                kc: kb.kc,
                grouped_rows: 0,
                cols: NR.min(self.n - last * NR),
                accumulate: kb.k0 > 0,
                panels: panels_here.count,
                panel_stride: stride,
                scales_stride: scaled.segment_starts.len() * NR,
                scale_rows,
            };
            let block = panel.add(kb.k0 / 2 * NR);
            let scales = scaled.panel_scales(p, segment);
            self.row_tiles(block, scales, &block_rows, a, first, rows, p, c, int4_tile);
        }
    }
}

/// The width of `segment_starts`' segments when they all start at multiples of one even width
/// that divides `KC` (so every K block starts a segment and the tiles can step through them).
fn uniform_group(segment_starts: &[usize], k: usize) -> Option<usize> {
    let g = *segment_starts.get(1)?;
    let uniform = segment_starts.len() == k.div_ceil(g)
        && segment_starts.iter().enumerate().all(|(i, &s)| s == i * g);
    (g.is_multiple_of(2) && super::KC.is_multiple_of(g) && uniform).then_some(g)
}

/// The f32 each stored nibble stands for before its scale.
fn nibble_value(nibble: u8) -> f32 {
    (nibble as i32 - 8) as f32
}

/// Widens `kc` k-rows of a nibble panel (from a pair's start) into `out`, `q * scale` of each
/// column, as the tiles would.
///
/// SAFETY: `b` points to `ceil(kc / 2) * NR` bytes and `scales` to NR values.
unsafe fn widen_int4_block(b: *const u8, scales: *const f32, kc: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::backend::has_avx512() {
            return super::avx512::widen_int4_block(b, scales, kc, out);
        }
        if crate::backend::has_avx2_fma() {
            return super::avx2::widen_int4_block(b, scales, kc, out);
        }
    }
    for kk in 0..kc {
        for j in 0..NR {
            let byte = *b.add(kk / 2 * NR + j);
            let stored = if kk % 2 == 0 { byte & 0xf } else { byte >> 4 };
            out[kk * NR + j] = nibble_value(stored) * *scales.add(j);
        }
    }
}

/// One register tile over nibble panels: the SIMD tile of this CPU, else the portable one
/// (the same FMA chains).
unsafe fn int4_tile(mr: usize, t: &Tile<u8>) {
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! dispatch {
            ($isa:ident) => {
                match (mr, t.panels) {
                    (1, 4) => return super::$isa::tile_int4::<1, 4>(t),
                    (1, 3) => return super::$isa::tile_int4::<1, 3>(t),
                    (1, 2) => return super::$isa::tile_int4::<1, 2>(t),
                    (1, 1) => return super::$isa::tile_int4::<1, 1>(t),
                    (2, 2) => return super::$isa::tile_int4::<2, 2>(t),
                    (2, 1) => return super::$isa::tile_int4::<2, 1>(t),
                    (3, 2) => return super::$isa::tile_int4::<3, 2>(t),
                    (3, 1) => return super::$isa::tile_int4::<3, 1>(t),
                    (4, 2) => return super::$isa::tile_int4::<4, 2>(t),
                    (4, 1) => return super::$isa::tile_int4::<4, 1>(t),
                    (5, 2) => return super::$isa::tile_int4::<5, 2>(t),
                    (5, 1) => return super::$isa::tile_int4::<5, 1>(t),
                    (6, 2) => return super::$isa::tile_int4::<6, 2>(t),
                    (6, 1) => return super::$isa::tile_int4::<6, 1>(t),
                    _ => {}
                }
            };
        }
        if crate::backend::has_avx512() {
            dispatch!(avx512);
        } else if crate::backend::has_avx2_fma() {
            dispatch!(avx2);
        }
    }
    for j in 0..t.panels {
        portable_int4_tile(mr, &t.panel(j));
    }
}

/// The SIMD tiles' FMA chain, one element at a time.
pub(super) unsafe fn portable_int4_tile(mr: usize, t: &Tile<u8>) {
    for r in 0..mr {
        for j in 0..t.cols {
            let c = t.c.add(r * t.ldc + j);
            let mut acc = if t.accumulate { *c } else { 0.0 };
            for kk in 0..t.kc {
                let segment = kk.checked_div(t.scale_rows).unwrap_or(0);
                let scale = *t.scales.add(segment * NR + j);
                let byte = *t.b.add(kk / 2 * NR + j);
                let stored = if kk % 2 == 0 { byte & 0xf } else { byte >> 4 };
                let w = nibble_value(stored) * scale;
                acc = (*t.a[r].add(kk)).mul_add(w, acc);
            }
            *c = acc;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::fp8::e4m3_to_f32;

    #[test]
    fn the_nibble_table_holds_the_sixteen_integers() {
        let held: Vec<(u8, u8)> = (0..=255u8)
            .filter_map(|b| NIBBLE_OF_E4M3[b as usize].map(|n| (b, n)))
            .collect();
        assert_eq!(held.len(), 17, "sixteen integers and negative zero");
        for (byte, nibble) in held {
            assert_eq!(e4m3_to_f32(byte), nibble_value(nibble), "{byte:#x}");
        }
    }
}
