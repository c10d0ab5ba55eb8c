//! A weight matrix in the precision its checkpoint stores it.
//!
//! bf16 checkpoints stay bf16 in host memory: widening a bf16 to f32 is exact (the f32 with the
//! same upper 16 bits), so a GEMM that widens as it loads gets bitwise the products of an f32
//! copy while holding, and streaming from DRAM, half the bytes. FP8 (e4m3) weights stay FP8 with
//! their block scales: the GEMM widens each to `f32(e4m3) * scale`, the very f32 that
//! dequantizing at load computes, so the products are bitwise those of the dequantized copy at a
//! quarter of its bytes. f16 is widened to f32 once, at load.

use super::fp8::e4m3_to_f32;

/// Row-major weight values, as loaded.
#[derive(Debug, Clone, PartialEq)]
pub enum NativeWeight {
    F32(Vec<f32>),
    Bf16(Vec<half::bf16>),
    Fp8(Fp8Matrix),
}

/// A block-scaled FP8 matrix `[rows, cols]`: `value(r, c) = f32(e4m3(values[r * cols + c])) *
/// scale(r, c)`. Each row's scales are kept per column segment (segments start at
/// `segment_starts`, shared by every row: a checkpoint's 128-wide blocks, or the runs a
/// transposed slice inherits), so slicing rows and transposing blocks stay FP8.
#[derive(Debug, Clone, PartialEq)]
pub struct Fp8Matrix {
    pub values: Vec<u8>,
    pub rows: usize,
    pub cols: usize,
    /// First column of each segment; starts with 0, strictly increasing, below `cols`.
    pub segment_starts: Vec<usize>,
    /// `scales[r * segments + s]`: the scale of row r in segment s.
    pub scales: Vec<f32>,
}

impl Fp8Matrix {
    /// A checkpoint's tensor: `block_scales` holds one scale per `block.0 x block.1` tile
    /// (`[ceil(rows / block.0), ceil(cols / block.1)]`, partial edge blocks included).
    pub fn from_blocks(
        values: Vec<u8>,
        rows: usize,
        cols: usize,
        block_scales: &[f32],
        block: (usize, usize),
    ) -> Self {
        let segments = cols.div_ceil(block.1.max(1));
        let segment_starts = (0..segments).map(|s| s * block.1).collect();
        let scales = (0..rows)
            .flat_map(|r| {
                let first = (r / block.0.max(1)) * segments;
                block_scales[first..first + segments].iter().copied()
            })
            .collect();
        Self {
            values,
            rows,
            cols,
            segment_starts,
            scales,
        }
    }

    pub fn segments(&self) -> usize {
        self.segment_starts.len()
    }

    /// `parts` stacked row-wise into one matrix (an expert's gate and up rows), or `None`
    /// unless they share their columns and segments.
    pub fn stacked(parts: &[&Fp8Matrix]) -> Option<Fp8Matrix> {
        let first = parts.first()?;
        if parts
            .iter()
            .any(|p| p.cols != first.cols || p.segment_starts != first.segment_starts)
        {
            return None;
        }
        Some(Fp8Matrix {
            values: parts
                .iter()
                .flat_map(|p| p.values.iter().copied())
                .collect(),
            rows: parts.iter().map(|p| p.rows).sum(),
            cols: first.cols,
            segment_starts: first.segment_starts.clone(),
            scales: parts
                .iter()
                .flat_map(|p| p.scales.iter().copied())
                .collect(),
        })
    }

    /// Segment of column `c`.
    fn segment_of(&self, c: usize) -> usize {
        self.segment_starts.partition_point(|&s| s <= c) - 1
    }

    /// Row r, widened: each value exactly as dequantizing computes it.
    fn widened_row(&self, r: usize, out: &mut Vec<f32>) {
        let row = &self.values[r * self.cols..(r + 1) * self.cols];
        let scales = &self.scales[r * self.segments()..(r + 1) * self.segments()];
        for (s, &start) in self.segment_starts.iter().enumerate() {
            let end = self.segment_starts.get(s + 1).copied().unwrap_or(self.cols);
            out.extend(row[start..end].iter().map(|&b| e4m3_to_f32(b) * scales[s]));
        }
    }

    pub(crate) fn to_f32(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.rows * self.cols);
        for r in 0..self.rows {
            self.widened_row(r, &mut out);
        }
        out
    }

    fn row_block(&self, first: usize, rows: usize) -> Self {
        let segments = self.segments();
        Self {
            values: self.values[first * self.cols..(first + rows) * self.cols].to_vec(),
            rows,
            cols: self.cols,
            segment_starts: self.segment_starts.clone(),
            scales: self.scales[first * segments..(first + rows) * segments].to_vec(),
        }
    }

    /// Rows `first..first + rows`, transposed to `[cols, rows]`. The new segments run along
    /// the old rows: a new one starts wherever any column's scale changes from one old row to
    /// the next.
    fn transposed_rows(&self, first: usize, rows: usize) -> Self {
        let segments = self.segments();
        let scale = |r: usize, c: usize| self.scales[r * segments + self.segment_of(c)];
        let mut segment_starts = vec![0];
        for r in first + 1..first + rows {
            let old = &self.scales[(r - 1) * segments..r * segments];
            let new = &self.scales[r * segments..(r + 1) * segments];
            if old != new {
                segment_starts.push(r - first);
            }
        }
        let mut values = Vec::with_capacity(rows * self.cols);
        let mut scales = Vec::with_capacity(self.cols * segment_starts.len());
        for c in 0..self.cols {
            values.extend((first..first + rows).map(|r| self.values[r * self.cols + c]));
            scales.extend(segment_starts.iter().map(|&s| scale(first + s, c)));
        }
        Self {
            values,
            rows: self.cols,
            cols: rows,
            segment_starts,
            scales,
        }
    }
}

impl NativeWeight {
    pub fn len(&self) -> usize {
        match self {
            NativeWeight::F32(v) => v.len(),
            NativeWeight::Bf16(v) => v.len(),
            NativeWeight::Fp8(m) => m.values.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The values as f32 (exact for every variant: FP8 as dequantizing computes it).
    pub fn to_f32(&self) -> Vec<f32> {
        match self {
            NativeWeight::F32(v) => v.clone(),
            NativeWeight::Bf16(v) => v.iter().map(|x| x.to_f32()).collect(),
            NativeWeight::Fp8(m) => m.to_f32(),
        }
    }

    /// Appends `values[range]` as f32 (an embedding row).
    pub fn extend_widened(&self, range: std::ops::Range<usize>, out: &mut Vec<f32>) {
        match self {
            NativeWeight::F32(v) => out.extend_from_slice(&v[range]),
            NativeWeight::Bf16(v) => out.extend(v[range].iter().map(|x| x.to_f32())),
            NativeWeight::Fp8(m) => {
                // Embedding rows: whole rows of the matrix.
                let cols = m.cols.max(1);
                let (first, last) = (range.start / cols, range.end.div_ceil(cols));
                let mut rows = Vec::with_capacity((last - first) * cols);
                for r in first..last {
                    m.widened_row(r, &mut rows);
                }
                out.extend_from_slice(&rows[range.start - first * cols..range.end - first * cols]);
            }
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
            NativeWeight::Fp8(m) => NativeWeight::Fp8(m.transposed_rows(first, rows)),
        }
    }

    /// Rows `first..first + rows` of a row-major `[_, cols]` matrix.
    pub fn row_block(&self, first: usize, rows: usize, cols: usize) -> NativeWeight {
        let range = first * cols..(first + rows) * cols;
        match self {
            NativeWeight::F32(v) => NativeWeight::F32(v[range].to_vec()),
            NativeWeight::Bf16(v) => NativeWeight::Bf16(v[range].to_vec()),
            NativeWeight::Fp8(m) => NativeWeight::Fp8(m.row_block(first, rows)),
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

    /// A [5, 6] FP8 matrix in 2 x 4 blocks (partial edge blocks both ways): slicing and
    /// transposing it gives the slices and transposes of its dequantized copy, bitwise, and
    /// the transposed slice starts a segment where it crosses a block boundary (row 4).
    #[test]
    fn fp8_slices_and_transposes_match_the_dequantized_copy() {
        use crate::backend::fp8::dequantize_blocks;
        let (rows, cols, block) = (5, 6, (2, 4));
        let values: Vec<u8> = (0..30usize).map(|i| ((i * 37) % 0x7e) as u8).collect();
        let block_scales = [0.5, 2.0, 0.25, 3.0, 1.5, 0.75];
        let fp8 = NativeWeight::Fp8(Fp8Matrix::from_blocks(
            values.clone(),
            rows,
            cols,
            &block_scales,
            block,
        ));
        let wide = NativeWeight::F32(dequantize_blocks(&values, rows, cols, &block_scales, block));
        assert_eq!(fp8.to_f32(), wide.to_f32());
        assert_eq!(
            fp8.row_block(1, 3, cols).to_f32(),
            wide.row_block(1, 3, cols).to_f32()
        );
        let t = fp8.transposed_rows(1, 4, cols);
        assert_eq!(t.to_f32(), wide.transposed_rows(1, 4, cols).to_f32());
        let NativeWeight::Fp8(t) = t else {
            panic!("transposing keeps FP8")
        };
        // Old rows 1..5: blocks change at rows 2 and 4, i.e. new columns 1 and 3.
        assert_eq!(t.segment_starts, vec![0, 1, 3]);
        let mut row = Vec::new();
        fp8.extend_widened(7..11, &mut row);
        let mut expected = Vec::new();
        wide.extend_widened(7..11, &mut expected);
        assert_eq!(row, expected);
    }
}
