//! Prefix caching: the KV rows of full prompt blocks, kept after their request and found again
//! by the hash of their tokens and of everything before them, so a request that shares a
//! prefix (a system prompt, a few-shot header, a conversation so far) prefills only the rest.
//!
//! A hit is copied into the new sequence's own cache (the CPU attention reads one contiguous
//! cache per sequence), as LMCache restores prefixes into an engine's memory. Each cached block
//! holds one block of the router's KV budget (`KvBlocks`), so cached prefixes and running
//! requests share one pool; cached blocks nobody is copying are evicted least recently used
//! when a request needs the room. The rows are the ones the model computed for these tokens at
//! these positions, and the CPU kernels are position- and batch-invariant, so a request's
//! tokens and logprobs are bitwise the same with and without a hit (`tests/prefix_cache.rs`).

use std::collections::HashMap;
use std::hash::{Hash, Hasher};

use moe_model::kv_cache::SequenceCache;

use crate::kv_blocks::{KvBlocks, KvReservation};

/// A block's identity: a 128-bit hash of its tokens chained with its parent's.
type BlockKey = (u64, u64);

const ROOT: BlockKey = (0x6d6f_652d_7072_6566, 0x6978_2d63_6163_6865);

fn chain(parent: BlockKey, tokens: &[u32]) -> BlockKey {
    let half = |salt: u64| {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        salt.hash(&mut h);
        parent.hash(&mut h);
        tokens.hash(&mut h);
        h.finish()
    };
    (half(0x9e37_79b9_7f4a_7c15), half(0xc2b2_ae3d_27d4_eb4f))
}

/// One cached block: its tokens (compared on a hit, so a hash collision is never a wrong
/// answer) and, per layer, its rows of the two cached tensors.
struct CachedBlock {
    parent: BlockKey,
    tokens: Vec<u32>,
    layers: Vec<(Vec<f32>, Vec<f32>)>,
    last_used: u64,
    _budget: KvReservation,
}

/// What a lookup found: the cached prefix, in tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrefixHit {
    pub tokens: usize,
}

pub struct PrefixCache {
    block_tokens: usize,
    blocks: HashMap<BlockKey, CachedBlock>,
    clock: u64,
}

impl PrefixCache {
    pub fn new(block_tokens: usize) -> Self {
        Self {
            block_tokens: block_tokens.max(1),
            blocks: HashMap::new(),
            clock: 0,
        }
    }

    pub fn blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Keys of the full blocks of `prompt` that a new request may take from the cache: never
    /// the block holding the last prompt token (the model must see at least one token to give
    /// the logits of the next).
    fn keys(&self, prompt: &[u32]) -> Vec<(BlockKey, BlockKey, std::ops::Range<usize>)> {
        let usable = prompt.len().saturating_sub(1) / self.block_tokens;
        let mut parent = ROOT;
        (0..usable)
            .map(|i| {
                let range = i * self.block_tokens..(i + 1) * self.block_tokens;
                let key = chain(parent, &prompt[range.clone()]);
                let entry = (parent, key, range);
                parent = key;
                entry
            })
            .collect()
    }

    /// Copies the longest cached prefix of `prompt` into `cache` (empty, on the host) and
    /// returns its length.
    pub fn restore(&mut self, prompt: &[u32], cache: &mut SequenceCache) -> PrefixHit {
        self.clock += 1;
        let mut hit = 0;
        if cache.len != 0 || cache.device.is_some() {
            return PrefixHit { tokens: 0 };
        }
        for (parent, key, range) in self.keys(prompt) {
            let Some(block) = self.blocks.get_mut(&key) else {
                break;
            };
            if block.parent != parent || block.tokens != prompt[range.clone()] {
                break;
            }
            block.last_used = self.clock;
            for (layer, (keys, values)) in cache.layers.iter_mut().zip(&block.layers) {
                layer.keys.extend_from_slice(keys);
                layer.values.extend_from_slice(values);
            }
            hit = range.end;
        }
        cache.len = hit;
        PrefixHit { tokens: hit }
    }

    /// Keeps the full blocks of `prompt` that `cache` (whose first tokens are the prompt's)
    /// holds and the cache does not: each takes one block of `kv`, evicting older cached
    /// blocks for room; stops when the budget has none left.
    pub fn insert(&mut self, prompt: &[u32], cache: &SequenceCache, kv: &KvBlocks) {
        if cache.device.is_some() || cache.len < prompt.len() {
            return;
        }
        self.clock += 1;
        let widths: Vec<(usize, usize)> = cache
            .layers
            .iter()
            .map(|l| {
                (
                    l.keys.len() / cache.len.max(1),
                    l.values.len() / cache.len.max(1),
                )
            })
            .collect();
        for (parent, key, range) in self.keys(prompt) {
            if let Some(block) = self.blocks.get_mut(&key) {
                block.last_used = self.clock;
                continue;
            }
            let Some(budget) = self.reserve_one(kv) else {
                return;
            };
            let layers = cache
                .layers
                .iter()
                .zip(&widths)
                .map(|(l, &(kw, vw))| {
                    (
                        l.keys[range.start * kw..range.end * kw].to_vec(),
                        l.values[range.start * vw..range.end * vw].to_vec(),
                    )
                })
                .collect();
            self.blocks.insert(
                key,
                CachedBlock {
                    parent,
                    tokens: prompt[range].to_vec(),
                    layers,
                    last_used: self.clock,
                    _budget: budget,
                },
            );
        }
    }

    /// One block of `kv`, evicting the least recently used cached block while there is none.
    fn reserve_one(&mut self, kv: &KvBlocks) -> Option<KvReservation> {
        loop {
            if let Some(r) = kv.reserve_blocks(1) {
                return Some(r);
            }
            if !self.evict_one() {
                return None;
            }
        }
    }

    /// Drops the least recently used block (its budget block returns to the pool); false when
    /// the cache is empty. A child outliving its parent is harmless: lookups walk from the
    /// root, so it is simply never reached, and ages out in turn.
    pub fn evict_one(&mut self) -> bool {
        let Some(&key) = self
            .blocks
            .iter()
            .min_by_key(|(_, b)| b.last_used)
            .map(|(k, _)| k)
        else {
            return false;
        };
        self.blocks.remove(&key);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use moe_model::kv_cache::LayerCache;

    /// A two-layer cache whose rows encode (layer, position), widths 2 and 3.
    fn filled(tokens: usize) -> SequenceCache {
        let mut cache = SequenceCache::new(2);
        for (l, layer) in cache.layers.iter_mut().enumerate() {
            *layer = LayerCache {
                keys: (0..tokens * 2).map(|i| (l * 1000 + i / 2) as f32).collect(),
                values: (0..tokens * 3)
                    .map(|i| (l * 1000 + i / 3) as f32 + 0.5)
                    .collect(),
            };
        }
        cache.len = tokens;
        cache
    }

    #[test]
    fn a_shared_prefix_is_restored_row_for_row() {
        let kv = KvBlocks::new(1 << 20, 1, 4);
        let mut pc = PrefixCache::new(4);
        let prompt: Vec<u32> = (0..11).collect();
        pc.insert(&prompt, &filled(11), &kv);
        // 11 tokens: blocks [0, 4) and [4, 8) are full and usable; [8, 11) is not full.
        assert_eq!(pc.blocks(), 2);
        assert_eq!(kv.used(), 2);

        let mut other: Vec<u32> = (0..9).collect();
        other.push(99);
        let mut cache = SequenceCache::new(2);
        assert_eq!(pc.restore(&other, &mut cache), PrefixHit { tokens: 8 });
        let reference = filled(8);
        for (got, want) in cache.layers.iter().zip(&reference.layers) {
            assert_eq!(got.keys, want.keys);
            assert_eq!(got.values, want.values);
        }
        assert_eq!(cache.len, 8);

        // Another first block: nothing is shared, even where later blocks match.
        let mut differs = prompt.clone();
        differs[0] = 7;
        assert_eq!(pc.restore(&differs, &mut SequenceCache::new(2)).tokens, 0);
        // The whole prompt cached: its last block is still left to compute.
        let eight: Vec<u32> = (0..8).collect();
        assert_eq!(pc.restore(&eight, &mut SequenceCache::new(2)).tokens, 4);
    }

    #[test]
    fn cached_blocks_share_the_budget_and_go_least_recently_used_first() {
        // Room for three blocks.
        let kv = KvBlocks::new(3 * 4, 1, 4);
        let mut pc = PrefixCache::new(4);
        let a: Vec<u32> = (0..9).collect();
        let b: Vec<u32> = (100..109).collect();
        pc.insert(&a, &filled(9), &kv);
        assert_eq!(kv.used(), 2);
        // b needs two more: the oldest of a's goes.
        pc.insert(&b, &filled(9), &kv);
        assert_eq!((pc.blocks(), kv.used()), (3, 3));
        assert_eq!(pc.restore(&b, &mut SequenceCache::new(2)).tokens, 8);
        // A running request takes the pool: the cache gives back what it holds.
        while kv.reserve_blocks(1).map(std::mem::forget).is_none() {
            assert!(pc.evict_one());
        }
        assert!(pc.blocks() < 3);
    }
}
