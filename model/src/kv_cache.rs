//! Per-sequence attention cache in fixed-size blocks. The router owns these; expert nodes hold
//! no request state.
//!
//! For grouped-query attention a layer caches keys and values (`kv_heads * head_dim` each per
//! token). For MLA it caches the rotated shared rope key (as keys) and the normalised latent
//! (as values): 576 floats per token on DeepSeek-V3 instead of 32768.
//!
//! A sequence's cache is a block table: `block_tokens` positions per block, every layer's rows
//! of those positions in one allocation. Full blocks are reference-counted and may be shared
//! between sequences (a cached prompt prefix, the other choices of an `n > 1` request); a block
//! is only ever written at positions past every sharer's length, so shared blocks are never
//! written at all. Attention reads the rows through a per-row table in position order, so its
//! arithmetic is the same whatever the blocks and whoever shares them.

use std::sync::Arc;

use crate::config::ModelConfig;
pub use crate::kv_pool::{KvBlock, KvLayout, KvPool};

pub use crate::config::KV_VALUE_BYTES;

/// Tokens per block where the owner says nothing (the router's `--kv-block-tokens` default).
pub const DEFAULT_BLOCK_TOKENS: usize = 16;

/// A sequence's cache across all layers.
pub struct SequenceCache {
    pool: Arc<KvPool>,
    layout: KvLayout,
    /// The block table: position p lives in `blocks[p / block_tokens]`. May run past `len`
    /// (room taken for a step); rows at or past `len` are not part of the cache.
    blocks: Vec<Arc<KvBlock>>,
    /// Tokens cached so far (the next token's position).
    pub len: usize,
    /// The last step's rows of the model's output (after its final norm), when kept for a
    /// draft head ([`Self::keep_hidden`]): MTP drafts from them.
    kept_hidden: Option<Vec<f32>>,
}

impl std::fmt::Debug for SequenceCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SequenceCache")
            .field("len", &self.len)
            .field("blocks", &self.blocks.len())
            .finish()
    }
}

impl SequenceCache {
    /// An empty cache whose blocks come from `pool`.
    pub fn new(pool: &Arc<KvPool>) -> Self {
        Self {
            pool: Arc::clone(pool),
            layout: *pool.layout(),
            blocks: Vec::new(),
            len: 0,
            kept_hidden: None,
        }
    }

    /// Asks the CPU dense part to keep each step's last hidden rows here
    /// ([`Self::kept_hidden_mut`]), for a draft head.
    pub fn keep_hidden(&mut self) {
        self.kept_hidden.get_or_insert_with(Vec::new);
    }

    /// The rows kept from the last step, `[rows fed, hidden]`; `None` unless asked for.
    pub fn kept_hidden_mut(&mut self) -> Option<&mut Vec<f32>> {
        self.kept_hidden.as_mut()
    }

    /// A cache for `config`'s model in blocks of [`DEFAULT_BLOCK_TOKENS`], from a pool of its
    /// own (owners of many sequences give them one pool: [`Self::new`]).
    pub fn for_config(config: &ModelConfig) -> Self {
        Self::new(&KvPool::new(KvLayout::for_config(
            config,
            DEFAULT_BLOCK_TOKENS,
        )))
    }

    pub fn layout(&self) -> &KvLayout {
        &self.layout
    }

    /// The pool its blocks come from.
    pub fn pool(&self) -> &Arc<KvPool> {
        &self.pool
    }

    /// Whether position `pos` lies in a block another holder shares (a cached prefix's): a
    /// device dense part, which cannot copy a block on write as the host does, refuses to
    /// write there.
    pub fn is_shared_at(&self, pos: usize) -> bool {
        self.blocks
            .get(pos / self.layout.block_tokens)
            .is_some_and(|b| Arc::strong_count(b) > 1)
    }

    /// The pool indices of its blocks, in position order (room taken included): a device
    /// dense part keeps each block's rows at that index of its own pool.
    pub fn block_indices(&self) -> impl Iterator<Item = usize> + '_ {
        self.blocks.iter().map(|b| b.index())
    }

    pub fn num_layers(&self) -> usize {
        self.layout.num_layers
    }

    /// Makes room for `tokens` positions, allocating blocks past the table's end.
    pub fn ensure_capacity(&mut self, tokens: usize) {
        let want = self.layout.blocks_for(tokens);
        while self.blocks.len() < want {
            self.blocks.push(Arc::new(self.pool.take()));
        }
    }

    /// One layer's view, to append this step's rows and read the sequence's.
    pub fn layer(&mut self, layer: usize) -> LayerCache<'_> {
        LayerCache {
            layout: self.layout,
            layer,
            blocks: &mut self.blocks,
        }
    }

    /// The blocks every position of which is cached, in order.
    pub fn full_blocks(&self) -> &[Arc<KvBlock>] {
        let full = (self.len / self.layout.block_tokens).min(self.blocks.len());
        &self.blocks[..full]
    }

    /// Starts an empty host cache with `blocks` (full blocks of another sequence, shared, not
    /// copied) as its first positions. False, and nothing changes, when the cache is not
    /// empty or a block has another layout.
    pub fn share_prefix(&mut self, blocks: &[Arc<KvBlock>]) -> bool {
        if self.len != 0 || !blocks.iter().all(|b| b.pool().layout() == &self.layout) {
            return false;
        }
        self.blocks = blocks.to_vec();
        self.len = blocks.len() * self.layout.block_tokens;
        true
    }

    /// Remembers the current size so that a step that fails half-way can be undone.
    pub fn mark(&self) -> CacheMark {
        CacheMark { len: self.len }
    }

    /// Drops whatever was appended after `mark` (its rows are simply no longer part of the
    /// cache; the blocks taken for them go).
    pub fn rollback(&mut self, mark: &CacheMark) {
        self.len = mark.len;
        self.blocks.truncate(self.layout.blocks_for(mark.len));
    }

    /// Keeps only the first `len` positions (at most the current length): a speculative
    /// step's rejected drafts go, with the blocks taken for them, as a rolled-back step's do.
    pub fn truncate(&mut self, len: usize) {
        self.rollback(&CacheMark {
            len: len.min(self.len),
        });
    }

    /// Bytes held, for accounting (shared blocks counted in full); a device dense part holds
    /// as many in its pool for these blocks.
    pub fn bytes(&self) -> usize {
        self.blocks.len() * self.layout.block_bytes()
    }
}

/// Sizes of a [`SequenceCache`] at some point, see [`SequenceCache::mark`].
#[derive(Debug, Clone)]
pub struct CacheMark {
    len: usize,
}

/// One layer of one sequence's cache, for a step.
pub struct LayerCache<'a> {
    layout: KvLayout,
    layer: usize,
    blocks: &'a mut [Arc<KvBlock>],
}

impl LayerCache<'_> {
    /// The key and value rows of position `pos`, to fill. The position must lie within the room
    /// taken ([`SequenceCache::ensure_capacity`]); a shared block is copied first (never the
    /// case when writes go past every sharer's length, as they do).
    pub fn row_mut(&mut self, pos: usize) -> (&mut [f32], &mut [f32]) {
        let layout = self.layout;
        let entry = &mut self.blocks[pos / layout.block_tokens];
        if Arc::get_mut(entry).is_none() {
            *entry = Arc::new(entry.duplicate());
        }
        let block = Arc::get_mut(entry).expect("a block of its own");
        let slot = pos % layout.block_tokens;
        let (keys, values) = block.layer_mut(self.layer);
        (
            &mut keys[slot * layout.key_width..][..layout.key_width],
            &mut values[slot * layout.value_width..][..layout.value_width],
        )
    }

    /// Positions `0..n`'s rows in order, one slice per row.
    pub fn rows(&self, n: usize) -> KvRows<'_> {
        let layout = &self.layout;
        let mut keys = Vec::with_capacity(n);
        let mut values = Vec::with_capacity(n);
        for (b, block) in self.blocks.iter().enumerate() {
            let first = b * layout.block_tokens;
            if first >= n {
                break;
            }
            let (block_keys, block_values) = block.layer(self.layer);
            let count = layout.block_tokens.min(n - first);
            keys.extend(block_keys.chunks_exact(layout.key_width).take(count));
            values.extend(block_values.chunks_exact(layout.value_width).take(count));
        }
        KvRows { keys, values }
    }
}

/// A sequence's cached rows of one layer, position by position.
pub struct KvRows<'a> {
    pub keys: Vec<&'a [f32]>,
    pub values: Vec<&'a [f32]>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool() -> Arc<KvPool> {
        KvPool::new(KvLayout {
            block_tokens: 4,
            num_layers: 2,
            key_width: 2,
            value_width: 3,
        })
    }

    /// Writes (layer, position)-coded rows for positions `from..to`.
    fn fill(cache: &mut SequenceCache, from: usize, to: usize) {
        cache.ensure_capacity(to);
        for l in 0..2 {
            let mut layer = cache.layer(l);
            for p in from..to {
                let (k, v) = layer.row_mut(p);
                k.fill((l * 1000 + p) as f32);
                v.fill((l * 1000 + p) as f32 + 0.5);
            }
        }
        cache.len = to;
    }

    #[test]
    fn rows_come_back_in_position_order_across_blocks() {
        let pool = pool();
        let mut cache = SequenceCache::new(&pool);
        fill(&mut cache, 0, 6);
        fill(&mut cache, 6, 11);
        assert_eq!(cache.blocks.len(), 3);
        assert_eq!(cache.full_blocks().len(), 2);
        let layer = cache.layer(1);
        let rows = layer.rows(11);
        assert_eq!(rows.keys.len(), 11);
        for p in 0..11 {
            assert_eq!(rows.keys[p], [(1000 + p) as f32; 2]);
            assert_eq!(rows.values[p], [(1000 + p) as f32 + 0.5; 3]);
        }
    }

    #[test]
    fn a_shared_prefix_is_the_same_memory_and_is_never_written() {
        let pool = pool();
        let mut first = SequenceCache::new(&pool);
        fill(&mut first, 0, 10);
        let mut second = SequenceCache::new(&pool);
        assert!(second.share_prefix(first.full_blocks()));
        assert_eq!(second.len, 8);
        assert!(Arc::ptr_eq(&first.blocks[1], &second.blocks[1]));
        // The second sequence goes on past the shared blocks: its own block, first unchanged.
        fill(&mut second, 8, 12);
        assert!(!Arc::ptr_eq(&first.blocks[2], &second.blocks[2]));
        assert_eq!(first.layer(0).rows(10).keys[8], [8.0; 2].as_slice());
        assert_eq!(Arc::strong_count(&first.blocks[0]), 2);
        // Not on a cache that holds rows already.
        assert!(!second.share_prefix(first.full_blocks()));
        // Were a shared block written, it would be copied first.
        second.blocks.truncate(2);
        second.len = 4;
        assert_eq!(Arc::strong_count(&first.blocks[1]), 2);
        fill(&mut second, 4, 8);
        assert!(!Arc::ptr_eq(&first.blocks[1], &second.blocks[1]));
        assert_eq!(Arc::strong_count(&first.blocks[1]), 1);
    }

    #[test]
    fn rollback_forgets_the_step_and_its_blocks() {
        let pool = pool();
        let mut cache = SequenceCache::new(&pool);
        fill(&mut cache, 0, 3);
        let mark = cache.mark();
        fill(&mut cache, 3, 9);
        cache.rollback(&mark);
        assert_eq!((cache.len, cache.blocks.len()), (3, 1));
        fill(&mut cache, 3, 5);
        assert_eq!(cache.layer(0).rows(5).keys[4], [4.0; 2].as_slice());
    }
}
