//! The float8 e4m3fn format of DeepSeek's FP8 checkpoints: each weight is `e4m3 * scale`, one
//! f32 `weight_scale_inv` per 128x128 block. The codec and block (de)quantization; the GEMM
//! widens FP8 panels with the same values (`gemm.rs`).

/// Decodes one float8 e4m3fn byte (no infinities; 0x7f/0xff are NaN).
pub fn e4m3_to_f32(byte: u8) -> f32 {
    let sign = if byte & 0x80 != 0 { -1.0f32 } else { 1.0 };
    let exp = ((byte >> 3) & 0x0f) as i32;
    let mant = (byte & 0x07) as f32;
    if exp == 0x0f && byte & 0x07 == 0x07 {
        return f32::NAN;
    }
    if exp == 0 {
        sign * mant / 8.0 * 2f32.powi(-6)
    } else {
        sign * (1.0 + mant / 8.0) * 2f32.powi(exp - 7)
    }
}

/// The e4m3 byte of each stored INT4 nibble (`q + 8`, q in [-8, 7]): every such integer is
/// exactly an e4m3 value (1.mmm x 2^(e - 7)).
pub const E4M3_OF_STORED_INT4: [u8; 16] = {
    let mut table = [0u8; 16];
    let mut stored = 0;
    while stored < 16 {
        let q = stored as i32 - 8;
        let magnitude = q.unsigned_abs();
        let byte = if magnitude == 0 {
            0
        } else {
            let p = 31 - magnitude.leading_zeros();
            let fraction = ((magnitude << 3) >> p) & 0x7;
            (((p + 7) << 3) | fraction) as u8
        };
        table[stored] = if q < 0 { byte | 0x80 } else { byte };
        stored += 1;
    }
    table
};

/// Encodes an f32 as the nearest float8 e4m3fn, ties to even (saturating at ±448); used to
/// write FP8 checkpoints.
pub fn f32_to_e4m3(value: f32) -> u8 {
    if value.is_nan() {
        return 0x7f;
    }
    let sign = if value.is_sign_negative() { 0x80 } else { 0 };
    let a = value.abs().min(448.0);
    // Below 2^-6 the grid is the subnormals', 2^-9 apart (8 x 2^-9 is the first normal).
    if a < 2f32.powi(-6) {
        let q = (a * 512.0).round_ties_even() as u8;
        return if q == 0 { 0 } else { sign | q };
    }
    let exp = ((a.to_bits() >> 23) & 0xff) as i32 - 127;
    // 8 + mantissa steps of 2^(exp - 3) in [2^exp, 2^(exp + 1)].
    let q = (a / 2f32.powi(exp - 3)).round_ties_even() as i32;
    let (exp, q) = if q == 16 { (exp + 1, 8) } else { (exp, q) };
    sign | (((exp + 7) as u8) << 3) | (q - 8) as u8
}

/// Quantizes a row-major `[rows, cols]` matrix as DeepSeek's checkpoints hold it: per
/// `block` tile a scale (the tile's largest magnitude over 448, 1 for an all-zero tile) and
/// each value's nearest e4m3 of `value / scale`. Returns the bytes and the
/// `[ceil(rows / block.0), ceil(cols / block.1)]` scales (`weight_scale_inv`).
pub fn quantize_blocks(
    values: &[f32],
    rows: usize,
    cols: usize,
    block: (usize, usize),
) -> (Vec<u8>, Vec<f32>) {
    let (block_rows, block_cols) = (rows.div_ceil(block.0), cols.div_ceil(block.1));
    let mut scales = vec![1.0f32; block_rows * block_cols];
    for (b, scale) in scales.iter_mut().enumerate() {
        let (br, bc) = (b / block_cols, b % block_cols);
        let mut largest = 0.0f32;
        for r in br * block.0..((br + 1) * block.0).min(rows) {
            for c in bc * block.1..((bc + 1) * block.1).min(cols) {
                largest = largest.max(values[r * cols + c].abs());
            }
        }
        if largest > 0.0 {
            *scale = largest / 448.0;
        }
    }
    let bytes = values
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            let (r, c) = (i / cols, i % cols);
            f32_to_e4m3(v / scales[(r / block.0) * block_cols + c / block.1])
        })
        .collect();
    (bytes, scales)
}

/// Multiplies each `block`-sized tile of the [rows, cols] fp8 matrix by its scale.
pub fn dequantize_blocks(
    bytes: &[u8],
    rows: usize,
    cols: usize,
    scales: &[f32],
    block: (usize, usize),
) -> Vec<f32> {
    let lut: Vec<f32> = (0..=255u8).map(e4m3_to_f32).collect();
    let scale_cols = cols.div_ceil(block.1);
    let mut out = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        let scale_row = &scales[(r / block.0) * scale_cols..][..scale_cols];
        for (c, &b) in bytes[r * cols..(r + 1) * cols].iter().enumerate() {
            out.push(lut[b as usize] * scale_row[c / block.1]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values() {
        assert_eq!(e4m3_to_f32(0x00), 0.0);
        assert_eq!(e4m3_to_f32(0x38), 1.0);
        assert_eq!(e4m3_to_f32(0x7e), 448.0);
        assert_eq!(e4m3_to_f32(0xb8), -1.0);
        assert_eq!(e4m3_to_f32(0x01), 2f32.powi(-9));
        assert!(e4m3_to_f32(0x7f).is_nan());
        for b in 0..=0x7eu8 {
            assert_eq!(f32_to_e4m3(e4m3_to_f32(b)), b);
            assert_eq!(
                f32_to_e4m3(-e4m3_to_f32(b)),
                if b == 0 { 0 } else { b | 0x80 }
            );
        }
    }

    /// The encoder picks the nearest e4m3 (ties to the even byte), as a search over all of
    /// them would.
    #[test]
    fn encoding_is_round_to_nearest_even() {
        let finite: Vec<(u8, f32)> = (0..=0x7eu8).map(|b| (b, e4m3_to_f32(b))).collect();
        for i in 0..200_000u32 {
            let x = (i as f32 / 200_000.0).powi(3) * 500.0;
            let best = finite
                .iter()
                .min_by(|a, b| {
                    let (da, db) = ((a.1 - x.min(448.0)).abs(), (b.1 - x.min(448.0)).abs());
                    da.total_cmp(&db).then((a.0 & 1).cmp(&(b.0 & 1)))
                })
                .unwrap();
            assert_eq!(f32_to_e4m3(x), best.0, "{x}");
        }
    }

    #[test]
    fn block_quantization_round_trips_within_half_a_step() {
        let (rows, cols) = (5, 300);
        let values: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919) % 1000) as f32 / 997.0 - 0.5)
            .collect();
        let (bytes, scales) = quantize_blocks(&values, rows, cols, (128, 128));
        assert_eq!(scales.len(), 3);
        let back = dequantize_blocks(&bytes, rows, cols, &scales, (128, 128));
        for (x, y) in values.iter().zip(&back) {
            assert!((x - y).abs() <= x.abs() / 16.0 + 1e-3, "{x} vs {y}");
        }
    }
}
