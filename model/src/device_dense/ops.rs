//! The primitive steps the dense part is built from on a device. The GPU implements them with
//! cuBLAS and NVRTC kernels (`gpu::dense_ops`); the tests implement them with plain host loops,
//! so the orchestration in [`super::model`] (shapes, strides, offsets, the order of steps, the
//! cache bookkeeping) is checked against the CPU model on every machine.

use crate::backend::weight::Fp8Matrix;
use crate::device::shapes::{AttentionSpec, ColumnMajorGemm, HeadView, StridedGemm};
use crate::device::MatrixPrecision;
use crate::expert_backend::ExpertBackend;
use crate::layers::gate::GateRule;
use crate::logit_adjust::RowEdits;
use crate::race::RowRace;
use crate::routes::ExpertRoutes;
use crate::token_mask::RowMask;

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
    /// Where each sequence's cached positions live ([`CacheBlocks`]).
    pub blocks: CacheBlocks<O>,
}

/// The step's block tables: position `p` of sequence `s` is row `p % block_tokens` of pool
/// block `table[table_start[s] + p / block_tokens]`, and block `b` is block
/// `b % chunk_blocks` of the pool's chunk `b / chunk_blocks` (every layer's pool chunks are
/// laid out alike: [`super::pool::DeviceKvPool`]).
pub struct CacheBlocks<O: DenseOps + ?Sized> {
    pub table: O::Index,
    /// Per sequence, where its blocks start in `table`.
    pub table_start: O::Index,
    pub block_tokens: usize,
    pub chunk_blocks: usize,
}

impl<O: DenseOps + ?Sized> CacheBlocks<O> {
    /// Where position `pos` of a sequence whose blocks start at `table[start]` lies: its chunk
    /// and the element offset of its row there, for rows of `row_width` values (the
    /// definition the kernels follow).
    pub fn locate(
        &self,
        table: &[u32],
        start: usize,
        pos: usize,
        row_width: usize,
    ) -> (usize, usize) {
        let block = table[start + pos / self.block_tokens] as usize;
        let in_chunk = (block % self.chunk_blocks) * self.block_tokens + pos % self.block_tokens;
        (block / self.chunk_blocks, in_chunk * row_width)
    }
}

/// What a replayed segment of a decode step is recorded under: the step's row count (its
/// batch-size bucket), the segment's place in the step, and the generation of the buffers it
/// reads (a step buffer grown or a KV pool chunk added makes a new one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SegmentKey {
    pub rows: usize,
    pub segment: usize,
    pub generation: u64,
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
    /// Whether FP8 checkpoint matrices are held as FP8 ([`Self::upload_fp8`]) instead of
    /// widened at load (`--gpu-fp8 keep`).
    fn keeps_fp8(&self) -> bool {
        false
    }
    /// An FP8 matrix held as its bytes and scales; [`Self::linear`] is its only use, and its
    /// product is the f32 product of the dequantized matrix (each weight widened to
    /// `f32(e4m3) * scale`, f32 inputs, whatever the GPU numerics mode). By default it is
    /// widened exactly.
    fn upload_fp8(&self, matrix: &Fp8Matrix) -> Result<Self::Matrix, Self::Error> {
        self.upload_matrix(&matrix.to_f32(), MatrixPrecision::F32)
    }
    /// Per-head FP8 matrices of one shape and segments, stacked, for a strided-batched
    /// [`Self::gemm`] with one head per batch (MLA's absorbed `kv_b` halves); by default
    /// widened exactly.
    fn upload_fp8_heads(&self, heads: &[Fp8Matrix]) -> Result<Self::Matrix, Self::Error> {
        let values: Vec<f32> = heads.iter().flat_map(Fp8Matrix::to_f32).collect();
        self.upload_matrix(&values, MatrixPrecision::F32)
    }
    /// How many values `buffer` holds.
    fn len_of(&self, buffer: &Self::F32) -> usize;
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
    /// `out[rows, n_out] = x[rows, k] · w[n_out, k]ᵀ`, all row-major and packed: `x` converted
    /// for `w`, then one GEMM (made of the steps above, not a step of its own).
    fn linear(
        &self,
        x: &Self::F32,
        rows: usize,
        k: usize,
        w: &Self::Matrix,
        n_out: usize,
    ) -> Result<Self::F32, Self::Error> {
        linear_by_gemm(self, x, rows, k, w, n_out)
    }
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
    /// Rotary embedding of every `(row, head)` vector of `width`, out of place: its first
    /// `2 * step.rope_half` values turn (the interleaved layout is read as pairs and written
    /// as halves), the rest are copied (GLM turns half of each head).
    #[allow(clippy::too_many_arguments)]
    fn rope(
        &self,
        x: &Self::F32,
        x_view: HeadView,
        out: &mut Self::F32,
        out_view: HeadView,
        heads: usize,
        width: usize,
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
    /// `acc[r * width + c] += bias[c]` for `rows` rows: a projection's bias.
    fn add_bias(
        &self,
        acc: &mut Self::F32,
        bias: &Self::F32,
        rows: usize,
        width: usize,
    ) -> Result<(), Self::Error>;
    /// Writes row `r` of `src` (`width` values) into the pool `chunks` at `cache_offset` of
    /// the cache row (`cache_stride` values) of its sequence's position `row_pos[r]`
    /// ([`CacheBlocks`]).
    #[allow(clippy::too_many_arguments)]
    fn append_rows(
        &self,
        src: &Self::F32,
        src_view: HeadView,
        width: usize,
        chunks: &mut [Self::F32],
        cache_stride: usize,
        cache_offset: usize,
        step: &DeviceStep<Self>,
    ) -> Result<(), Self::Error>;
    /// Causal attention of every row over its own sequence's cache up to its own position,
    /// key rows in `key_chunks` and value rows in `value_chunks` of the pool
    /// ([`CacheBlocks`]): `q` is `[rows, heads, dk]`, `out` `[rows, heads, dv]`.
    fn attention(
        &self,
        q: &Self::F32,
        spec: &AttentionSpec,
        key_chunks: &[Self::F32],
        value_chunks: &[Self::F32],
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
    /// [`Self::top_k`] left on the device: row `r`'s choices at `experts[r * top_k..]` and
    /// `weights[r * top_k..]`, read back by [`Self::read_choices`] (so the launch can be part
    /// of a replayed segment and the read come after it).
    #[allow(clippy::too_many_arguments)]
    fn top_k_into(
        &self,
        logits: &Self::F32,
        correction_bias: Option<&Self::F32>,
        rule: &GateRule,
        rows: usize,
        experts: &mut Self::Index,
        weights: &mut Self::F32,
    ) -> Result<(), Self::Error>;
    /// The first `len` choices [`Self::top_k_into`] wrote, downloaded.
    fn read_choices(
        &self,
        experts: &Self::Index,
        weights: &Self::F32,
        len: usize,
    ) -> Result<(Vec<u32>, Vec<f32>), Self::Error>;
    /// `dst[..values.len()] = values`: a decode step's inputs written where its replayed
    /// segments read them (buffers that keep their place from step to step).
    fn write_f32(&self, values: &[f32], dst: &mut Self::F32) -> Result<(), Self::Error>;
    /// [`Self::write_f32`] for indices.
    fn write_index(&self, values: &[u32], dst: &mut Self::Index) -> Result<(), Self::Error>;
    /// Whether decode steps run as replayed segments ([`Self::run_segment`]): CUDA graphs.
    fn replays_segments(&self) -> bool {
        false
    }
    /// Whether [`Self::run_segment`] would capture a segment of the step `key` names (its
    /// batch size and generation; the segment's place is ignored) rather than run it as is
    /// or replay it: the step must then be the only one using the device.
    fn will_capture(&self, key: SegmentKey) -> bool {
        let _ = key;
        false
    }
    /// Runs `work`, the launches of a decode step between two reads by the host. A device that
    /// replays segments may record it under `key` (once it has run once as is) and replay the
    /// recording at later steps instead of calling `work`: `work` then launches only, reads
    /// and writes only buffers that are the same at every step of `key` (or that it allocates
    /// and frees itself), and copies nothing to or from the host. By default it just runs.
    fn run_segment(
        &self,
        key: SegmentKey,
        work: &mut dyn FnMut() -> crate::error::Result<()>,
    ) -> crate::error::Result<()> {
        let _ = key;
        work()
    }
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
    /// For each of `rows` rows of `[rows, width]` logits, the index of its largest value, the
    /// lowest on a tie, as [`crate::backend::ops::argmax`] scans (a NaN first value wins,
    /// later NaNs never do): downloaded, `rows` ids.
    fn argmax_rows(
        &self,
        x: &Self::F32,
        rows: usize,
        width: usize,
    ) -> Result<Vec<u32>, Self::Error>;
    /// For each of `rows` rows of `[rows, width]` logits, its `k` best-ranked `(index,
    /// value)` pairs, ranked as [`crate::sampling::ranked_top_k`] ranks them (`k <= width`):
    /// downloaded, `rows * k` pairs, row by row.
    fn ranked_top_k_rows(
        &self,
        x: &Self::F32,
        rows: usize,
        width: usize,
        k: usize,
    ) -> Result<Vec<(u32, f32)>, Self::Error>;
    /// For each race, the token [`crate::race::Race::draw`] draws from its row of `[rows,
    /// width]` logits (rows below `rows`, races valid): downloaded, one id per race.
    fn race_rows(
        &self,
        x: &Self::F32,
        rows: usize,
        width: usize,
        races: &[RowRace],
    ) -> Result<Vec<u32>, Self::Error>;
    /// Sets every token a row's mask does not allow to -inf in its row of `[rows, width]`
    /// logits ([`crate::token_mask::TokenMask::apply`]; rows below `rows`, each named once).
    fn mask_rows(
        &self,
        x: &mut Self::F32,
        rows: usize,
        width: usize,
        masks: &[RowMask<'_>],
    ) -> Result<(), Self::Error>;
    /// Applies each request's logit edits to its row of `[rows, width]` logits in place
    /// ([`crate::logit_adjust::LogitEdits::apply`]; rows below `rows`, each edited row named
    /// once, ids past `width` skipped).
    fn edit_rows(
        &self,
        x: &mut Self::F32,
        rows: usize,
        width: usize,
        edits: &[RowEdits<'_>],
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
    /// The routed experts of `layer` run on `rows` (`[routes.rows(), hidden]`) where they lie,
    /// when `experts` reaches this device's memory (an expert set on the same GPU, in this
    /// process): `[routes.pairs(), hidden]` weighted outputs, on this device. `None` (the
    /// default, and any backend elsewhere) sends the rows through host memory instead.
    fn experts_in_place(
        &self,
        _experts: &dyn ExpertBackend,
        _layer: usize,
        _rows: &Self::F32,
        _routes: &ExpertRoutes,
    ) -> Option<crate::error::Result<Self::F32>> {
        None
    }
    /// Whether `layer`'s routed experts can run from the gate's choices where they lie
    /// ([`Self::run_chosen_experts`]), with no routes read on the host (so inside a replayed
    /// segment too): every one of the layer's
    /// `num_experts` experts reachable on this device in a form whose grouped launch reads its
    /// row counts from device memory (and whose rows do not change each other's results, so
    /// padding rows may run too). Called before a step's segments or MoE layer (a device may
    /// upload tables here, never inside a segment). `false` by default: the routes are read on
    /// the host.
    fn experts_follow_choices(
        &self,
        _experts: &dyn ExpertBackend,
        _layer: usize,
        _num_experts: usize,
    ) -> crate::error::Result<bool> {
        Ok(false)
    }
    /// `layer`'s routed experts on the first `rows` rows of `normed`, from the gate's
    /// choices as [`Self::top_k_into`] left them (`top_k` per row; rows `hidden` wide),
    /// planned on the device:
    /// `pair_out[r * top_k + j]` is row r's j-th expert in ascending id, its output times its
    /// weight (the pair order of [`ExpertRoutes`]). Only where [`Self::experts_follow_choices`]
    /// said so; launches only.
    #[allow(clippy::too_many_arguments)]
    fn run_chosen_experts(
        &self,
        _experts: &dyn ExpertBackend,
        _layer: usize,
        _normed: &Self::F32,
        _chosen: &Self::Index,
        _chosen_weights: &Self::F32,
        _rows: usize,
        _top_k: usize,
        _hidden: usize,
        _pair_out: &mut Self::F32,
    ) -> crate::error::Result<()> {
        Err(crate::error::ModelError::ExpertBackend(
            "this device does not run routed experts from the gate's choices".into(),
        ))
    }
}

/// [`DenseOps::linear`] as the steps above make it (what a device that overrides it for some
/// matrices does for the others).
pub fn linear_by_gemm<O: DenseOps + ?Sized>(
    ops: &O,
    x: &O::F32,
    rows: usize,
    k: usize,
    w: &O::Matrix,
    n_out: usize,
) -> Result<O::F32, O::Error> {
    let input = ops.gemm_input(x, rows * k, w)?;
    let mut out = ops.scratch(rows * n_out)?;
    let shape = StridedGemm::single(ColumnMajorGemm::rows_times_weights(rows, n_out, k));
    ops.gemm(&shape, w, 0, &input, 0, &mut out, 0)?;
    Ok(out)
}
