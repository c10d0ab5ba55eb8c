//! Self-attention over a batched step: grouped-query attention (Qwen3-MoE, Mixtral) and
//! DeepSeek's Multi-head Latent Attention. Both append the step's keys to each sequence's cache,
//! then let every row attend to its own sequence up to its own position, in a fixed order.

mod gqa;
pub mod mla;

pub use gqa::GqaAttention;
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
        caches: &mut [&mut LayerCache],
    ) -> Vec<f32> {
        match self {
            Attention::Gqa(a) => a.forward(x, layout, rope, caches),
            Attention::Mla(a) => a.forward(x, layout, rope, caches),
        }
    }
}

/// Enough work to be worth spreading rows over threads.
pub(crate) fn parallel_rows(layout: &BatchLayout) -> bool {
    let work: usize = layout
        .seqs
        .iter()
        .map(|s| s.len * (s.start_pos + s.len))
        .sum();
    work >= 4096 && rayon::current_num_threads() > 1
}
