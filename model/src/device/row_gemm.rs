//! The exact, batch-invariant GEMM of `--deterministic` on a GPU, in row terms: what the
//! kernels `gemm_rows_exact_*` (kernels.cu) take, made from the cuBLAS-shaped [`StridedGemm`]
//! the dense part calls, and its definition on the host ([`RowGemm::run_host`]): per output one
//! chain of fused multiply-adds over k in ascending order from zero, the CPU GEMM's chain. The
//! tests check the translation against the host reference's cuBLAS semantics and the chain
//! against the CPU GEMM, bit for bit; the GPU check runs the kernels against both.

use super::shapes::StridedGemm;

/// `out_b[r, j] = Σ_k x_b[r, k] · w_b[j, k]` for `batch` batches: element `(r, k)` of x at
/// `b * x_batch + r * x_stride + k` from x's offset, `(j, k)` of w at
/// `b * w_batch + j * w_stride + k`, `(r, j)` of out at `b * out_batch + r * out_stride + j`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowGemm {
    pub rows: usize,
    pub n: usize,
    pub k: usize,
    pub batch: usize,
    pub x_stride: usize,
    pub x_batch: usize,
    pub w_stride: usize,
    pub w_batch: usize,
    pub out_stride: usize,
    pub out_batch: usize,
}

impl RowGemm {
    /// The row form of `s`, whose A is the weights (transposed: row-major `[n, k]`) and B the
    /// activations (row-major `[rows, k]`), as every dense-part GEMM is; `None` for other
    /// shapes.
    pub fn from_strided(s: &StridedGemm) -> Option<Self> {
        let g = &s.gemm;
        if !g.transpose_a || g.transpose_b {
            return None;
        }
        Some(Self {
            rows: g.n,
            n: g.m,
            k: g.k,
            batch: s.batch,
            x_stride: g.ldb,
            x_batch: s.stride_b,
            w_stride: g.lda,
            w_batch: s.stride_a,
            out_stride: g.ldc,
            out_batch: s.stride_c,
        })
    }

    /// The kernels' arithmetic on the host (the caller sizes the slices: this is a
    /// definition, not a checked step).
    pub fn run_host(&self, x: &[f32], w: &[f32], out: &mut [f32]) {
        for b in 0..self.batch {
            for r in 0..self.rows {
                for j in 0..self.n {
                    let x_row = b * self.x_batch + r * self.x_stride;
                    let w_row = b * self.w_batch + j * self.w_stride;
                    let mut acc = 0.0f32;
                    for kk in 0..self.k {
                        acc = x[x_row + kk].mul_add(w[w_row + kk], acc);
                    }
                    out[b * self.out_batch + r * self.out_stride + j] = acc;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::PackedMatrix;
    use crate::device::shapes::ColumnMajorGemm;
    use crate::device::MatrixPrecision;
    use crate::device_dense::reference::HostDenseOps;
    use crate::device_dense::DenseOps;
    use crate::test_support::pseudo_random;

    /// The row form computes what cuBLAS's call computes (the host reference's definition of
    /// it) for a plain linear and for MLA's per-head absorption and value expansion, with
    /// their wider row strides and batch strides, from non-zero offsets.
    #[test]
    fn row_form_matches_the_cublas_call() {
        let ops = HostDenseOps::exact();
        let (rows, heads, nope, rope, lora, v) = (5usize, 3, 4, 2, 6, 3);
        let q_head = nope + rope;
        let plain = StridedGemm::single(ColumnMajorGemm::rows_times_weights(rows, 7, 9));
        let absorb = StridedGemm::per_head(
            rows,
            heads,
            lora,
            nope,
            (heads * q_head, q_head),
            (heads * (lora + rope), lora + rope),
        );
        let expand =
            StridedGemm::per_head(rows, heads, v, lora, (heads * lora, lora), (heads * v, v));
        for (name, s) in [("linear", plain), ("absorb", absorb), ("expand", expand)] {
            let (a_end, b_end, c_end) = s.extents();
            let (a_off, b_off, c_off) = (3, 5, 2);
            let a = pseudo_random(a_off + a_end, 11);
            let b = pseudo_random(b_off + b_end, 12);
            let wide = |v: &[f32]| ops.upload_matrix(v, MatrixPrecision::F32).unwrap();
            let mut expected = vec![0.0f32; c_off + c_end];
            ops.gemm(&s, &wide(&a), a_off, &wide(&b), b_off, &mut expected, c_off)
                .unwrap();
            let row = RowGemm::from_strided(&s).unwrap();
            let mut got = vec![0.0f32; c_off + c_end];
            row.run_host(&b[b_off..], &a[a_off..], &mut got[c_off..]);
            let worst = crate::compare::max_abs_diff(&got, &expected);
            assert!(worst < 1e-5, "{name}: differs by {worst}");
        }
        let mut untransposed = plain;
        untransposed.gemm.transpose_a = false;
        assert_eq!(RowGemm::from_strided(&untransposed), None);
    }

    /// The chain is the CPU GEMM's: bitwise its products, for one row and for a batch (where
    /// the CPU tiles rows six at a time), at k not a multiple of any block.
    #[test]
    fn the_chain_is_bitwise_the_cpu_gemm() {
        let (n, k) = (37usize, 301);
        let w = pseudo_random(n * k, 3);
        let packed = PackedMatrix::from_rows(&w, n, k);
        for rows in [1usize, 13] {
            let x = pseudo_random(rows * k, 4 + rows as u64);
            let shape = StridedGemm::single(ColumnMajorGemm::rows_times_weights(rows, n, k));
            let row = RowGemm::from_strided(&shape).unwrap();
            let mut got = vec![0.0f32; rows * n];
            row.run_host(&x, &w, &mut got);
            assert_eq!(got, packed.matmul(&x, rows), "{rows} rows");
        }
    }
}
