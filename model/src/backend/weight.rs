//! A weight matrix in the precision its checkpoint stores it.
//!
//! bf16 checkpoints stay bf16 in host memory: widening a bf16 to f32 is exact (the f32 with the
//! same upper 16 bits), so a GEMM that widens as it loads gets bitwise the products of an f32
//! copy while holding, and streaming from DRAM, half the bytes. Other precisions (f16, FP8 with
//! block scales) are not exact in bf16 and are widened to f32 once, at load.

/// Row-major weight values, as loaded.
#[derive(Debug, Clone, PartialEq)]
pub enum NativeWeight {
    F32(Vec<f32>),
    Bf16(Vec<half::bf16>),
}

impl NativeWeight {
    pub fn len(&self) -> usize {
        match self {
            NativeWeight::F32(v) => v.len(),
            NativeWeight::Bf16(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The values as f32 (exact for both variants).
    pub fn to_f32(&self) -> Vec<f32> {
        match self {
            NativeWeight::F32(v) => v.clone(),
            NativeWeight::Bf16(v) => v.iter().map(|x| x.to_f32()).collect(),
        }
    }

    /// Appends `values[range]` as f32 (an embedding row).
    pub fn extend_widened(&self, range: std::ops::Range<usize>, out: &mut Vec<f32>) {
        match self {
            NativeWeight::F32(v) => out.extend_from_slice(&v[range]),
            NativeWeight::Bf16(v) => out.extend(v[range].iter().map(|x| x.to_f32())),
        }
    }

    /// The `[rows, cols]` block of a row-major `[_, cols]` matrix starting at row `first`,
    /// transposed to `[cols, rows]`, in the same precision (transposing is exact).
    pub fn transposed_rows(&self, first: usize, rows: usize, cols: usize) -> NativeWeight {
        fn transpose<T: Copy>(v: &[T], first: usize, rows: usize, cols: usize) -> Vec<T> {
            let block = &v[first * cols..(first + rows) * cols];
            (0..cols)
                .flat_map(|c| (0..rows).map(move |r| block[r * cols + c]))
                .collect()
        }
        match self {
            NativeWeight::F32(v) => NativeWeight::F32(transpose(v, first, rows, cols)),
            NativeWeight::Bf16(v) => NativeWeight::Bf16(transpose(v, first, rows, cols)),
        }
    }

    /// Rows `first..first + rows` of a row-major `[_, cols]` matrix.
    pub fn row_block(&self, first: usize, rows: usize, cols: usize) -> NativeWeight {
        let range = first * cols..(first + rows) * cols;
        match self {
            NativeWeight::F32(v) => NativeWeight::F32(v[range].to_vec()),
            NativeWeight::Bf16(v) => NativeWeight::Bf16(v[range].to_vec()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_and_transposes_keep_values_and_precision() {
        // [3, 2] matrix: rows (1, 2), (3, 4), (5, 6).
        let wide = NativeWeight::F32(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        assert_eq!(
            wide.transposed_rows(1, 2, 2),
            NativeWeight::F32(vec![3.0, 5.0, 4.0, 6.0])
        );
        assert_eq!(wide.row_block(2, 1, 2), NativeWeight::F32(vec![5.0, 6.0]));
        let narrow = NativeWeight::Bf16(
            wide.to_f32()
                .into_iter()
                .map(half::bf16::from_f32)
                .collect(),
        );
        assert_eq!(
            narrow.transposed_rows(1, 2, 2).to_f32(),
            vec![3.0, 5.0, 4.0, 6.0]
        );
        assert!(matches!(narrow.row_block(0, 1, 2), NativeWeight::Bf16(_)));
    }
}
