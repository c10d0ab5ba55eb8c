//! Prefix caching: full KV blocks kept after their request and found again by the hash of their
//! tokens and of everything before them, so a request that shares a prefix (a system prompt, a
//! few-shot header, a conversation so far) prefills only the rest.
//!
//! A hit is shared, not copied: the new sequence's block table starts with the cached blocks
//! themselves (reference-counted; nobody writes a full block again). A block enters the cache
//! when its sequence has filled it, taking one block of that sequence's KV reservation with it,
//! so the router's one pool (`KvBlocks`) counts every block once, however many sequences share
//! it. Cached blocks that no running sequence holds are evicted least recently used when a
//! request needs the room. The rows are the ones the model computed for these tokens at these
//! positions, and the CPU kernels are position- and batch-invariant, so a request's tokens and
//! logprobs are bitwise the same with and without a hit (`tests/prefix_cache.rs`).

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use moe_model::kv_cache::{KvBlock, SequenceCache};

use crate::kv_blocks::{KvBlocks, KvReservation};

/// A block's identity: a 128-bit hash of its tokens chained with its parent's.
type BlockKey = (u64, u64);

const ROOT: BlockKey = (0x6d6f_652d_7072_6566, 0x6978_2d63_6163_6865);

/// Where a salt's chains start (`cache_salt`): the unsalted root, or one of the salt's own, so
/// no block of one salt is ever the prefix of another's.
fn root(salt: &str) -> BlockKey {
    if salt.is_empty() {
        return ROOT;
    }
    let half = |seed: u64| {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        seed.hash(&mut h);
        ROOT.hash(&mut h);
        salt.hash(&mut h);
        h.finish()
    };
    (half(0x2545_f491_4f6c_dd1d), half(0x5851_f42d_4c95_7f2d))
}

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
/// answer), the block (shared with the sequences using it) and its share of the budget.
struct CachedBlock {
    parent: BlockKey,
    tokens: Vec<u32>,
    block: Arc<KvBlock>,
    last_used: u64,
    _budget: KvReservation,
}

impl CachedBlock {
    /// Held by a running sequence too: evicting it would free nothing.
    fn in_use(&self) -> bool {
        Arc::strong_count(&self.block) > 1
    }
}

/// What a lookup found: the cached prefix, in tokens and blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrefixHit {
    pub tokens: usize,
    pub blocks: usize,
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

    /// Keys of the first `count` full blocks of `tokens` under `salt`: (parent, key, token
    /// range).
    fn keys(
        &self,
        tokens: &[u32],
        salt: &str,
        count: usize,
    ) -> Vec<(BlockKey, BlockKey, std::ops::Range<usize>)> {
        let mut parent = root(salt);
        (0..count.min(tokens.len() / self.block_tokens))
            .map(|i| {
                let range = i * self.block_tokens..(i + 1) * self.block_tokens;
                let key = chain(parent, &tokens[range.clone()]);
                let entry = (parent, key, range);
                parent = key;
                entry
            })
            .collect()
    }

    /// Starts `cache` (empty, on the host, in this cache's block size) with the blocks of the
    /// longest cached prefix of `prompt`, shared. Never the block holding the last prompt token:
    /// the model must see at least one token to give the logits of the next. Only blocks
    /// cached under the same `salt` count.
    pub fn restore(&mut self, prompt: &[u32], salt: &str, cache: &mut SequenceCache) -> PrefixHit {
        self.clock += 1;
        let miss = PrefixHit {
            tokens: 0,
            blocks: 0,
        };
        if cache.len != 0 || cache.layout().block_tokens != self.block_tokens {
            return miss;
        }
        let usable = prompt.len().saturating_sub(1) / self.block_tokens;
        let mut found = Vec::new();
        for (parent, key, range) in self.keys(prompt, salt, usable) {
            let Some(cached) = self.blocks.get_mut(&key) else {
                break;
            };
            if cached.parent != parent || cached.tokens != prompt[range] {
                break;
            }
            cached.last_used = self.clock;
            found.push(Arc::clone(&cached.block));
        }
        if !cache.share_prefix(&found) {
            return miss;
        }
        PrefixHit {
            tokens: cache.len,
            blocks: found.len(),
        }
    }

    /// Keeps the full blocks of `cache` whose tokens (`tokens`, the ids the cache holds rows
    /// for, from position 0) the cache does not have yet. Each new entry takes one block of
    /// `owner` (the sequence's reservation, which counted it), or of `kv` when the owner has
    /// none left, evicting older unused entries for room; stops when there is none.
    pub fn insert(
        &mut self,
        tokens: &[u32],
        salt: &str,
        cache: &SequenceCache,
        owner: &mut KvReservation,
        kv: &KvBlocks,
    ) {
        if cache.layout().block_tokens != self.block_tokens {
            return;
        }
        self.clock += 1;
        let full = cache.full_blocks();
        let keys = self.keys(tokens, salt, full.len());
        for ((parent, key, range), block) in keys.into_iter().zip(full) {
            if let Some(cached) = self.blocks.get_mut(&key) {
                cached.last_used = self.clock;
                continue;
            }
            let Some(budget) = owner.split_off(1).or_else(|| self.reserve_one(kv)) else {
                return;
            };
            self.blocks.insert(
                key,
                CachedBlock {
                    parent,
                    tokens: tokens[range].to_vec(),
                    block: Arc::clone(block),
                    last_used: self.clock,
                    _budget: budget,
                },
            );
        }
    }

    /// One block of `kv`, evicting the least recently used unused block while there is none.
    fn reserve_one(&mut self, kv: &KvBlocks) -> Option<KvReservation> {
        loop {
            if let Some(r) = kv.reserve_blocks(1) {
                return Some(r);
            }
            if !self.evict_unused_before(self.clock) {
                return None;
            }
        }
    }

    /// Drops the least recently used block no running sequence holds (its memory and budget
    /// block return to the pool); false when there is none. A child outliving its parent is
    /// harmless: lookups walk from the root, so it is simply never reached, and ages out in
    /// turn.
    pub fn evict_one(&mut self) -> bool {
        self.evict_unused_before(u64::MAX)
    }

    /// [`Self::evict_one`] among the blocks last used before `clock`.
    fn evict_unused_before(&mut self, clock: u64) -> bool {
        let Some(&key) = self
            .blocks
            .iter()
            .filter(|(_, b)| !b.in_use() && b.last_used < clock)
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
    use moe_model::kv_cache::{KvLayout, KvPool};

    /// One pool for the tests' caches, as a router has.
    fn pool() -> &'static Arc<KvPool> {
        static POOL: std::sync::OnceLock<Arc<KvPool>> = std::sync::OnceLock::new();
        POOL.get_or_init(|| {
            KvPool::new(KvLayout {
                block_tokens: 4,
                num_layers: 2,
                key_width: 2,
                value_width: 3,
            })
        })
    }

    /// A cache of `tokens` positions whose rows encode (layer, position).
    fn filled(tokens: usize) -> SequenceCache {
        let mut cache = SequenceCache::new(pool());
        cache.ensure_capacity(tokens);
        for l in 0..2 {
            let mut layer = cache.layer(l);
            for p in 0..tokens {
                let (k, v) = layer.row_mut(p);
                k.fill((l * 1000 + p) as f32);
                v.fill((l * 1000 + p) as f32 + 0.5);
            }
        }
        cache.len = tokens;
        cache
    }

    fn empty() -> SequenceCache {
        SequenceCache::new(pool())
    }

    /// `cache_salt`: blocks cached under one salt are found only under the same salt; the
    /// unsalted requests share among themselves.
    #[test]
    fn blocks_are_shared_only_under_the_same_salt() {
        let kv = KvBlocks::new(1 << 20, 1, 4);
        let mut owner = kv.reserve_blocks(3).unwrap();
        let mut pc = PrefixCache::new(4);
        let prompt: Vec<u32> = (0..11).collect();
        pc.insert(&prompt, "tenant-a", &filled(11), &mut owner, &kv);
        let hit = |pc: &mut PrefixCache, salt: &str| pc.restore(&prompt, salt, &mut empty()).tokens;
        assert_eq!(hit(&mut pc, ""), 0);
        assert_eq!(hit(&mut pc, "tenant-b"), 0);
        assert_eq!(hit(&mut pc, "tenant-a"), 8);
        let mut other_owner = kv.reserve_blocks(3).unwrap();
        pc.insert(&prompt, "", &filled(11), &mut other_owner, &kv);
        assert_eq!(pc.blocks(), 4, "the same tokens, cached once per salt");
        assert_eq!(hit(&mut pc, ""), 8);
    }

    #[test]
    fn a_shared_prefix_is_restored_row_for_row_without_a_copy() {
        let kv = KvBlocks::new(1 << 20, 1, 4);
        let mut owner = kv.reserve_blocks(3).unwrap();
        let mut pc = PrefixCache::new(4);
        let prompt: Vec<u32> = (0..11).collect();
        let source = filled(11);
        pc.insert(&prompt, "", &source, &mut owner, &kv);
        // 11 tokens: blocks [0, 4) and [4, 8) are full; [8, 11) is not. The two cached blocks
        // came out of the owner's reservation: the pool counts each block once.
        assert_eq!(pc.blocks(), 2);
        assert_eq!((owner.blocks(), kv.used()), (1, 3));

        let mut other: Vec<u32> = (0..9).collect();
        other.push(99);
        let mut cache = empty();
        assert_eq!(
            pc.restore(&other, "", &mut cache),
            PrefixHit {
                tokens: 8,
                blocks: 2
            }
        );
        assert_eq!(cache.len, 8);
        assert!(Arc::ptr_eq(
            &cache.full_blocks()[1],
            &source.full_blocks()[1]
        ));
        let mut reference = filled(8);
        for l in 0..2 {
            let (got, want) = (cache.layer(l), reference.layer(l));
            let (got, want) = (got.rows(8), want.rows(8));
            assert_eq!((got.keys, got.values), (want.keys, want.values));
        }

        // Another first block: nothing is shared, even where later blocks match.
        let mut differs = prompt.clone();
        differs[0] = 7;
        assert_eq!(pc.restore(&differs, "", &mut empty()).tokens, 0);
        // The whole prompt cached: its last block is still left to compute.
        let eight: Vec<u32> = (0..8).collect();
        assert_eq!(pc.restore(&eight, "", &mut empty()).tokens, 4);
    }

    #[test]
    fn blocks_in_use_stay_and_unused_ones_go_least_recently_used_first() {
        // Room for three blocks.
        let kv = KvBlocks::new(3 * 4, 1, 4);
        let mut pc = PrefixCache::new(4);
        let a: Vec<u32> = (0..9).collect();
        let b: Vec<u32> = (100..109).collect();
        {
            let mut none = kv.reserve_blocks(0).unwrap();
            pc.insert(&a, "", &filled(9), &mut none, &kv);
        }
        assert_eq!(kv.used(), 2);
        // A sequence holds a's first block.
        let mut holder = empty();
        assert_eq!(pc.restore(&a, "", &mut holder).tokens, 8);
        // b needs two more: only one is free, a's blocks are in use and b's first is not given
        // up for its second, so one is cached.
        let mut none = kv.reserve_blocks(0).unwrap();
        pc.insert(&b, "", &filled(9), &mut none, &kv);
        assert_eq!((pc.blocks(), kv.used()), (3, 3));
        assert!(pc.evict_one());
        assert!(!pc.evict_one(), "a's blocks are in use");
        assert_eq!((pc.blocks(), kv.used()), (2, 2));
        drop(holder);
        // Nobody holds a's blocks now: they can go.
        while pc.evict_one() {}
        assert_eq!((pc.blocks(), kv.used()), (0, 0));
    }
}
