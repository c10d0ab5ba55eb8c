//! The shapes that device steps are called with, whatever runs them: a GEMM in cuBLAS's
//! column-major terms (alone or strided-batched), a view of `[rows, heads, width]` values in a
//! wider buffer, and what attention reads from a sequence's cache. The host references, the
//! orchestrations written over `DenseOps` and `FfnOps`, and the CUDA launches share them.

/// One GEMM in cuBLAS's terms: column-major `C[m, n] = op(A)[m, k] · op(B)[k, n]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ColumnMajorGemm {
    pub transpose_a: bool,
    pub transpose_b: bool,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub lda: usize,
    pub ldb: usize,
    pub ldc: usize,
}

impl ColumnMajorGemm {
    /// `c[rows, n_out] = x[rows, k] · w[n_out, k]ᵀ` with all three row-major (A = w, B = x):
    /// a row-major matrix is its transpose in column-major, so this is
    /// `cᵀ[n_out, rows] = op_T(w stored as [k, n_out]) · xᵀ[k, rows]`.
    pub fn rows_times_weights(rows: usize, n_out: usize, k: usize) -> Self {
        Self {
            transpose_a: true,
            transpose_b: false,
            m: n_out,
            n: rows,
            k,
            lda: k,
            ldb: k,
            ldc: n_out,
        }
    }

    /// Elements of A, B and C the call touches from their offsets.
    pub fn extents(&self) -> (usize, usize, usize) {
        let a_cols = if self.transpose_a { self.m } else { self.k };
        let b_cols = if self.transpose_b { self.k } else { self.n };
        (self.lda * a_cols, self.ldb * b_cols, self.ldc * self.n)
    }
}

/// Where a `[rows, heads, width]` block lives in a buffer: element `(r, h, c)` is at
/// `offset + r * row_stride + h * head_stride + c`. A plain `[rows, width]` matrix is one
/// head; a slice of columns of a wider matrix is a view with `row_stride` the wider width.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadView {
    pub offset: usize,
    pub row_stride: usize,
    pub head_stride: usize,
}

impl HeadView {
    /// A contiguous `[rows, heads, width]` block from `offset`.
    pub fn packed(offset: usize, heads: usize, width: usize) -> Self {
        Self {
            offset,
            row_stride: heads * width,
            head_stride: width,
        }
    }

    /// Columns `offset..` of a `[rows, row_stride]` matrix, as one head.
    pub fn columns(offset: usize, row_stride: usize) -> Self {
        Self {
            offset,
            row_stride,
            head_stride: 0,
        }
    }

    /// One past the last element a `[rows, heads, width]` block touches.
    pub fn end(&self, rows: usize, heads: usize, width: usize) -> usize {
        if rows == 0 || heads == 0 || width == 0 {
            return self.offset;
        }
        self.offset + (rows - 1) * self.row_stride + (heads - 1) * self.head_stride + width
    }
}

/// `batch` GEMMs `C_i = op(A_i) · op(B_i)` with `X_i` at `X + i * stride_x` (cuBLAS's
/// strided-batched call); `batch == 1` is a plain GEMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StridedGemm {
    pub gemm: ColumnMajorGemm,
    pub batch: usize,
    pub stride_a: usize,
    pub stride_b: usize,
    pub stride_c: usize,
}

impl StridedGemm {
    /// One product per head (`heads` batches, MLA's absorption and value expansion):
    /// `out[r, h, ..n_out] = x[r, h, ..k] · w_h[n_out, k]ᵀ`, the `w_h` stacked row-major;
    /// x's rows `x.0` apart and its heads `x.1`, out's rows `out.0` apart and its heads `out.1`.
    pub fn per_head(
        rows: usize,
        heads: usize,
        n_out: usize,
        k: usize,
        x: (usize, usize),
        out: (usize, usize),
    ) -> Self {
        let mut gemm = ColumnMajorGemm::rows_times_weights(rows, n_out, k);
        gemm.ldb = x.0;
        gemm.ldc = out.0;
        Self {
            gemm,
            batch: heads,
            stride_a: n_out * k,
            stride_b: x.1,
            stride_c: out.1,
        }
    }

    pub fn single(gemm: ColumnMajorGemm) -> Self {
        Self {
            gemm,
            batch: 1,
            stride_a: 0,
            stride_b: 0,
            stride_c: 0,
        }
    }

    /// One past the last element of A, B and C the call touches from their offsets
    /// (exact: a view into a wider matrix may end before `ld * columns`).
    pub fn extents(&self) -> (usize, usize, usize) {
        let g = &self.gemm;
        let span = |rows: usize, cols: usize, ld: usize| {
            if rows == 0 || cols == 0 {
                0
            } else {
                (cols - 1) * ld + rows
            }
        };
        let (a_rows, a_cols) = if g.transpose_a {
            (g.k, g.m)
        } else {
            (g.m, g.k)
        };
        let (b_rows, b_cols) = if g.transpose_b {
            (g.n, g.k)
        } else {
            (g.k, g.n)
        };
        let last = self.batch.saturating_sub(1);
        (
            span(a_rows, a_cols, g.lda) + last * self.stride_a,
            span(b_rows, b_cols, g.ldb) + last * self.stride_b,
            span(g.m, g.n, g.ldc) + last * self.stride_c,
        )
    }
}

/// What attention reads from a sequence's cache: per cached token one key row of
/// `key_stride` values and one value row of `value_stride` (MLA: the same row, the latent
/// being both key prefix and value). Query head `h` uses kv head `h / (heads / kv_heads)`,
/// at `kv_head * key_head_stride` in the key row (and likewise for values).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttentionSpec {
    pub heads: usize,
    pub kv_heads: usize,
    /// Query/key width per head.
    pub dk: usize,
    /// Value (and output) width per head.
    pub dv: usize,
    pub key_stride: usize,
    pub value_stride: usize,
    pub key_head_stride: usize,
    pub value_head_stride: usize,
    pub scale: f32,
}
