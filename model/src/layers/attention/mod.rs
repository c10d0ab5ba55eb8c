//! Self-attention over a batched step: grouped-query attention (Qwen3-MoE, Mixtral) and
//! DeepSeek's Multi-head Latent Attention. Both append the step's keys to each sequence's cache,
//! then let every row attend to its own sequence up to its own position, in a fixed order.

mod gqa;
pub mod mla;

pub use gqa::{GqaAttention, GqaShape};
pub use mla::MlaAttention;

use crate::batch::BatchLayout;
use crate::kv_cache::LayerCache;
use crate::layers::rope::RopeTable;

#[derive(Debug)]
pub enum Attention {
    Gqa(GqaAttention),
    Mla(MlaAttention),
}

impl Attention {
    /// `x` is `[rows, hidden]` (already normalised); `caches[s]` is sequence `s`'s cache for
    /// this layer. Returns `[rows, hidden]`.
    pub fn forward(
        &self,
        x: &[f32],
        layout: &BatchLayout,
        rope: &RopeTable,
        caches: &mut [LayerCache<'_>],
    ) -> Vec<f32> {
        match self {
            Attention::Gqa(a) => a.forward(x, layout, rope, caches),
            Attention::Mla(a) => a.forward(x, layout, rope, caches),
        }
    }
}

/// (head, visible position) pairs below which attention stays on one thread: about 0.5 M
/// multiply-adds on DeepSeek's latent width, some 20 us. It was 64 Ki pairs for MLA, which left
/// a decode's attention on one thread up to contexts of 4096 (batch 1) or ~128 (batch 32):
/// both decode steps ran ~5% faster once it was lowered.
const PARALLEL_MIN_HEAD_POSITIONS: usize = 1024;

/// Whether a step's attention is worth spreading over threads (tasks of one row's heads).
pub(crate) fn parallel_heads(layout: &BatchLayout, heads: usize) -> bool {
    let pairs: usize = layout
        .seqs
        .iter()
        .map(|s| s.len * (s.start_pos + s.len))
        .sum();
    pairs * heads >= PARALLEL_MIN_HEAD_POSITIONS && rayon::current_num_threads() > 1
}

/// How MLA's latent attention splits its work: tasks of `heads_per_task` heads of one row, run in
/// parallel or not. A decode step has a row or a few per sequence, so with one task per row
/// (as before) a batch-1 decode ran all its heads on one thread; splitting heads gives every
/// thread a share. One share per thread, not two: the kernels keep more FMA chains in flight
/// over more heads at once (on AVX-512, 8 heads' scores at 170 GFLOP/s against 4 heads' at
/// 140), which beat the finer balance (a batch-1 step of the `small` preset 2% faster). Each
/// head's arithmetic is the same whatever the split.
pub(crate) fn head_tasks(layout: &BatchLayout, heads: usize) -> (usize, bool) {
    let threads = rayon::current_num_threads();
    let rows = layout.num_rows().max(1);
    let groups_per_row = threads.div_ceil(rows).clamp(1, heads.max(1));
    let target = heads.max(1) / groups_per_row;
    let heads_per_task = (1..=target.max(1))
        .rev()
        .find(|d| heads.is_multiple_of(*d))
        .unwrap_or(1);
    (heads_per_task, parallel_heads(layout, heads))
}
