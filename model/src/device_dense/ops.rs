//! The primitive steps the dense part is built from on a device. The GPU implements them with
//! cuBLAS and NVRTC kernels (`gpu::dense_ops`); the tests implement them with plain host loops,
//! so the orchestration in [`super::model`] (shapes, strides, offsets, the order of steps, the
//! cache bookkeeping) is checked against the CPU model on every machine.

use crate::grouped_ffn::ColumnMajorGemm;
use crate::layers::gate::GateRule;

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

/// What a matrix comes from, which decides how the device holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatrixPrecision {
    /// bf16 (or FP8) checkpoint tensors: bf16 in both bf16 modes, f32 in the f32 mode.
    Narrow,
    /// Wider (f16, f32) tensors: f32 except in the plain bf16 mode, which casts them (a bf16
    /// copy would change the model, which bf16x2 promises not to do).
    Wide,
    /// Always f32: the MoE gate, whose top-k choices flip on small errors (transformers
    /// computes DeepSeek's gate in f32 too).
    F32,
}

impl MatrixPrecision {
    /// The precision of a matrix made of these checkpoint tensors.
    pub fn of(ckpt: &crate::checkpoint::Checkpoint, names: &[&str]) -> Self {
        if names.iter().all(|n| ckpt.narrow_as_bf16(n)) {
            MatrixPrecision::Narrow
        } else {
            MatrixPrecision::Wide
        }
    }

    /// Whether the matrix is held in bf16 under `numerics` (else f32).
    pub fn in_bf16(self, numerics: crate::device::GpuDtype) -> bool {
        use crate::device::GpuDtype;
        !matches!(
            (self, numerics),
            (MatrixPrecision::F32, _)
                | (_, GpuDtype::F32)
                | (MatrixPrecision::Wide, GpuDtype::Bf16x2)
        )
    }
}

/// A step's row layout on the device, uploaded once per step.
pub struct DeviceStep<O: DenseOps + ?Sized> {
    pub rows: usize,
    /// Per row, its sequence's index in the step.
    pub row_seq: O::Index,
    /// Per row, its absolute position (its slot in the sequence's cache).
    pub row_pos: O::Index,
    /// `[rows, rope_half]` each.
    pub cos: O::F32,
    pub sin: O::F32,
    pub rope_half: usize,
}

/// The primitive steps. Buffers are element-addressed; a method that is given a view checks
/// nothing but its own launch (the orchestration sizes every buffer).
pub trait DenseOps {
    type F32;
    /// A matrix in its [`MatrixPrecision`], or activations converted for a GEMM with it.
    type Matrix;
    type Index;
    type Error;

    fn upload_f32(&self, values: &[f32]) -> Result<Self::F32, Self::Error>;
    fn upload_index(&self, values: &[u32]) -> Result<Self::Index, Self::Error>;
    fn upload_matrix(
        &self,
        values: &[f32],
        precision: MatrixPrecision,
    ) -> Result<Self::Matrix, Self::Error>;
    /// The first `len` values.
    fn download(&self, buffer: &Self::F32, len: usize) -> Result<Vec<f32>, Self::Error>;
    /// A buffer the next step writes in full before anything reads it (contents unspecified:
    /// uninitialised on a GPU, NaN in the host reference).
    fn scratch(&self, len: usize) -> Result<Self::F32, Self::Error>;
    /// `dst[..len] = src[..len]` (growing a cache).
    fn copy_prefix(
        &self,
        src: &Self::F32,
        dst: &mut Self::F32,
        len: usize,
    ) -> Result<(), Self::Error>;
    /// The first `len` values of `x` in the dtype of `like`, ready to be a GEMM's B.
    fn gemm_input(
        &self,
        x: &Self::F32,
        len: usize,
        like: &Self::Matrix,
    ) -> Result<Self::Matrix, Self::Error>;
    /// `C = op(A) · op(B)` (alpha 1, beta 0), batched by strides, f32 out.
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        shape: &StridedGemm,
        a: &Self::Matrix,
        a_offset: usize,
        b: &Self::Matrix,
        b_offset: usize,
        c: &mut Self::F32,
        c_offset: usize,
    ) -> Result<(), Self::Error>;
    /// RMSNorm of every `(row, head)` vector of `width`: `x * rsqrt(mean(x²) + eps) * weight`.
    #[allow(clippy::too_many_arguments)]
    fn rms_norm(
        &self,
        x: &Self::F32,
        x_view: HeadView,
        weight: &Self::F32,
        out: &mut Self::F32,
        out_view: HeadView,
        rows: usize,
        heads: usize,
        width: usize,
        eps: f32,
    ) -> Result<(), Self::Error>;
    /// Rotary embedding of every `(row, head)` vector of `2 * step.rope_half`, out of place
    /// (the interleaved layout is read as pairs and written as halves).
    #[allow(clippy::too_many_arguments)]
    fn rope(
        &self,
        x: &Self::F32,
        x_view: HeadView,
        out: &mut Self::F32,
        out_view: HeadView,
        heads: usize,
        interleaved: bool,
        step: &DeviceStep<Self>,
    ) -> Result<(), Self::Error>;
    /// `out[r, j] = silu(gate_up[r, j]) * gate_up[r, inter + j]`.
    fn silu_mul(
        &self,
        gate_up: &Self::F32,
        out: &mut Self::F32,
        rows: usize,
        inter: usize,
    ) -> Result<(), Self::Error>;
    /// `acc[..len] += x[..len]`.
    fn add(&self, acc: &mut Self::F32, x: &Self::F32, len: usize) -> Result<(), Self::Error>;
    /// Writes row `r` of `src` (`width` values) into `caches[row_seq[r]]` at
    /// `row_pos[r] * cache_stride + cache_offset`.
    #[allow(clippy::too_many_arguments)]
    fn append_rows(
        &self,
        src: &Self::F32,
        src_view: HeadView,
        width: usize,
        caches: &mut [&mut Self::F32],
        cache_stride: usize,
        cache_offset: usize,
        step: &DeviceStep<Self>,
    ) -> Result<(), Self::Error>;
    /// Causal attention of every row over its own sequence's cache up to its own position:
    /// `q` is `[rows, heads, dk]`, `out` `[rows, heads, dv]`.
    fn attention(
        &self,
        q: &Self::F32,
        spec: &AttentionSpec,
        keys: &[&Self::F32],
        values: &[&Self::F32],
        out: &mut Self::F32,
        step: &DeviceStep<Self>,
    ) -> Result<(), Self::Error>;
    /// The gate's top-k from `[rows, num_experts]` logits: per row, `rule.top_k` (expert,
    /// weight) pairs in the order the rule picks them.
    fn top_k(
        &self,
        logits: &Self::F32,
        correction_bias: Option<&Self::F32>,
        rule: &GateRule,
        rows: usize,
    ) -> Result<(Vec<u32>, Vec<f32>), Self::Error>;
    /// `hidden[r] += (Σ_{p in row r} pair_out[p]) + shared[r]`, pairs in order, from zero:
    /// the combine order of [`crate::routes::combine`].
    #[allow(clippy::too_many_arguments)]
    fn combine_add(
        &self,
        hidden: &mut Self::F32,
        pair_out: &Self::F32,
        row_offsets: &Self::Index,
        shared: Option<&Self::F32>,
        rows: usize,
        width: usize,
    ) -> Result<(), Self::Error>;
    /// `out[r] = table[ids[r]]` in f32 for `[*, width]` rows of a matrix: the embedding
    /// lookup, from the table the device holds (tied to lm_head where the model ties them).
    fn embed_rows(
        &self,
        table: &Self::Matrix,
        ids: &Self::Index,
        out: &mut Self::F32,
        n: usize,
        width: usize,
    ) -> Result<(), Self::Error>;
    /// `out[i] = x[index[i]]` for `[*, width]` rows.
    fn gather_rows(
        &self,
        x: &Self::F32,
        index: &Self::Index,
        out: &mut Self::F32,
        n: usize,
        width: usize,
    ) -> Result<(), Self::Error>;
}
