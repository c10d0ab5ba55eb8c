//! DeepSeek's FP8 checkpoints: float8 e4m3fn weights with one f32 `weight_scale_inv` per
//! 128x128 block; the real weight is `fp8 * scale_inv`. Dequantised once at load time.

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

/// Encodes an f32 as the nearest float8 e4m3fn (saturating at ±448); used to write test checkpoints.
pub fn f32_to_e4m3(value: f32) -> u8 {
    if value.is_nan() {
        return 0x7f;
    }
    let mut best = 0u8;
    let mut best_err = f32::INFINITY;
    for byte in 0..=0x7eu8 {
        let err = (e4m3_to_f32(byte) - value.abs()).abs();
        if err < best_err {
            best_err = err;
            best = byte;
        }
    }
    if value.is_sign_negative() && best != 0 {
        best | 0x80
    } else {
        best
    }
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
        }
    }
}
