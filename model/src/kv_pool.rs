//! The memory KV blocks live in: one pool per owner (a router, an offline engine), laid out as
//! vLLM lays out its cache (`[blocks, block_tokens, width]` for each layer's keys and for its
//! values), so that the blocks a sequence takes one after another are one run of memory in
//! every layer's keys and values. Attention streams a layer's rows in position order: with
//! each block a heap allocation of its own holding every layer, a 2048-token batch-8 decode ran
//! 18% slower on the small preset than with one contiguous buffer per sequence, the hardware
//! prefetcher starting over at every block (docs/performance.md).
//!
//! The pool grows by chunks (doubling, up to [`MAX_CHUNK_BLOCKS`]) and keeps them: freed blocks
//! go back to a free list, lowest address first out, so runs stay long. How many blocks may be
//! in use is the owner's budget to bound (the router reserves them before it takes them).

use std::collections::BTreeSet;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

use crate::config::{AttentionConfig, ModelConfig, KV_VALUE_BYTES};

/// The most blocks one chunk holds (per layer: one allocation of this many blocks' rows).
pub const MAX_CHUNK_BLOCKS: usize = 256;
const MIN_CHUNK_BLOCKS: usize = 8;

/// The shape of a block: how many positions, layers, and floats per position per layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvLayout {
    pub block_tokens: usize,
    pub num_layers: usize,
    /// GQA: key floats per position. MLA: the rope key's.
    pub key_width: usize,
    /// GQA: value floats per position. MLA: the latent's.
    pub value_width: usize,
}

impl KvLayout {
    pub fn for_config(config: &ModelConfig, block_tokens: usize) -> Self {
        let (key_width, value_width) = match &config.attention {
            AttentionConfig::Gqa {
                num_kv_heads,
                head_dim,
                ..
            } => (num_kv_heads * head_dim, num_kv_heads * head_dim),
            AttentionConfig::Mla {
                kv_lora_rank,
                qk_rope_head_dim,
                ..
            } => (*qk_rope_head_dim, *kv_lora_rank),
        };
        Self {
            block_tokens: block_tokens.max(1),
            num_layers: config.num_layers,
            key_width,
            value_width,
        }
    }

    pub fn block_floats(&self) -> usize {
        self.block_tokens * (self.key_width + self.value_width) * self.num_layers
    }

    pub fn block_bytes(&self) -> usize {
        self.block_floats() * KV_VALUE_BYTES
    }

    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_tokens)
    }
}

/// Where blocks come from; shared by every sequence (and cached prefix) of one owner.
pub struct KvPool {
    layout: KvLayout,
    state: Mutex<PoolState>,
}

/// Per layer, one allocation of `blocks` blocks' keys and one of their values.
struct Chunk {
    blocks: usize,
    /// The pool-wide index of its first block (chunks number their blocks one after another).
    first: u32,
    layers: Vec<(NonNull<f32>, NonNull<f32>)>,
}

struct PoolState {
    /// Floats of one block's keys and of its values in one layer.
    key_floats: usize,
    value_floats: usize,
    chunks: Vec<Chunk>,
    /// Free blocks as (chunk, slot), lowest first.
    free: BTreeSet<(u32, u32)>,
    in_use: usize,
}

// SAFETY: the chunk pointers are allocations this state owns, freed only in its `Drop`, after
// every block (each holds the pool) is gone.
unsafe impl Send for PoolState {}

impl Drop for PoolState {
    fn drop(&mut self) {
        for chunk in &self.chunks {
            for &(keys, values) in &chunk.layers {
                // SAFETY: made by `allocate` for this chunk with these lengths.
                unsafe {
                    free(keys, chunk.blocks * self.key_floats);
                    free(values, chunk.blocks * self.value_floats);
                }
            }
        }
    }
}

/// `len` zeroed floats, owned by the caller until [`free`]. Zeroed pages are mapped lazily: a
/// chunk costs memory as its blocks are written.
fn allocate(len: usize) -> NonNull<f32> {
    let rows = Box::into_raw(vec![0.0f32; len].into_boxed_slice());
    // SAFETY: a box's pointer is never null.
    unsafe { NonNull::new_unchecked(rows.cast::<f32>()) }
}

/// # Safety
/// `rows` came from [`allocate`] with this `len` and is not used again.
unsafe fn free(rows: NonNull<f32>, len: usize) {
    drop(Box::from_raw(std::ptr::slice_from_raw_parts_mut(
        rows.as_ptr(),
        len,
    )));
}

impl PoolState {
    /// Adds a chunk (as many blocks as the pool has, within the bounds) to the free list.
    fn grow(&mut self, num_layers: usize) {
        let held: usize = self.chunks.iter().map(|c| c.blocks).sum();
        let blocks = held.clamp(MIN_CHUNK_BLOCKS, MAX_CHUNK_BLOCKS);
        let layers = (0..num_layers)
            .map(|_| {
                (
                    allocate(blocks * self.key_floats),
                    allocate(blocks * self.value_floats),
                )
            })
            .collect();
        let chunk = self.chunks.len() as u32;
        let first = held as u32;
        self.chunks.push(Chunk {
            blocks,
            first,
            layers,
        });
        self.free
            .extend((0..blocks as u32).map(|slot| (chunk, slot)));
    }
}

impl KvPool {
    pub fn new(layout: KvLayout) -> Arc<Self> {
        Arc::new(Self {
            layout,
            state: Mutex::new(PoolState {
                key_floats: layout.block_tokens * layout.key_width,
                value_floats: layout.block_tokens * layout.value_width,
                chunks: Vec::new(),
                free: BTreeSet::new(),
                in_use: 0,
            }),
        })
    }

    pub fn layout(&self) -> &KvLayout {
        &self.layout
    }

    /// Blocks taken and not yet returned.
    pub fn blocks_in_use(&self) -> usize {
        self.lock().in_use
    }

    /// Blocks the pool holds memory for (in use or free).
    pub fn blocks_held(&self) -> usize {
        self.lock().chunks.iter().map(|c| c.blocks).sum()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PoolState> {
        // A panic elsewhere cannot leave the free list half-updated: every update is one call.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A block (its rows hold whatever they held: positions are written before they are read).
    pub fn take(self: &Arc<Self>) -> KvBlock {
        let mut state = self.lock();
        if state.free.is_empty() {
            state.grow(self.layout.num_layers);
        }
        let (chunk, slot) = state.free.pop_first().expect("grow adds free blocks");
        state.in_use += 1;
        let (k, v) = (
            slot as usize * state.key_floats,
            slot as usize * state.value_floats,
        );
        let layers = state.chunks[chunk as usize]
            .layers
            .iter()
            // SAFETY: `slot < blocks`, so the block's rows lie inside the chunk's allocations.
            .map(|(keys, values)| unsafe {
                (
                    NonNull::new_unchecked(keys.as_ptr().add(k)),
                    NonNull::new_unchecked(values.as_ptr().add(v)),
                )
            })
            .collect();
        KvBlock {
            pool: Arc::clone(self),
            id: (chunk, slot),
            index: state.chunks[chunk as usize].first + slot,
            layers,
        }
    }

    fn give_back(&self, id: (u32, u32)) {
        let mut state = self.lock();
        state.in_use -= 1;
        state.free.insert(id);
    }
}

/// `block_tokens` positions of every layer's cached rows, in its pool; returned on drop.
pub struct KvBlock {
    pool: Arc<KvPool>,
    id: (u32, u32),
    /// Its index among all the pool's blocks: a device dense part keeps the block's rows at
    /// this index of its own pool.
    index: u32,
    /// Per layer, where this block's key rows and value rows start.
    layers: Box<[(NonNull<f32>, NonNull<f32>)]>,
}

// SAFETY: a block's rows are its own (no other block's range overlaps them); they are written
// only through `&mut KvBlock` and read through `&KvBlock`, so the borrow rules keep writers and
// readers apart across threads as for any owned buffer.
unsafe impl Send for KvBlock {}
unsafe impl Sync for KvBlock {}

impl KvBlock {
    pub fn pool(&self) -> &Arc<KvPool> {
        &self.pool
    }

    /// Its index among the pool's blocks (below [`KvPool::blocks_held`]); taken again by
    /// another sequence only after this block is dropped.
    pub fn index(&self) -> usize {
        self.index as usize
    }

    /// One layer's key rows and value rows of this block.
    pub fn layer(&self, layer: usize) -> (&[f32], &[f32]) {
        let layout = &self.pool.layout;
        let (keys, values) = self.layers[layer];
        // SAFETY: the ranges lie in the pool's allocations (see `take`), which outlive `self`;
        // no `&mut` to them exists while `&self` does.
        unsafe {
            (
                std::slice::from_raw_parts(keys.as_ptr(), layout.block_tokens * layout.key_width),
                std::slice::from_raw_parts(
                    values.as_ptr(),
                    layout.block_tokens * layout.value_width,
                ),
            )
        }
    }

    /// One layer's key rows and value rows of this block, to write.
    pub fn layer_mut(&mut self, layer: usize) -> (&mut [f32], &mut [f32]) {
        let layout = &self.pool.layout;
        let (keys, values) = self.layers[layer];
        // SAFETY: as in `layer` (keys and values are apart), and `&mut self` makes this the
        // only access.
        unsafe {
            (
                std::slice::from_raw_parts_mut(
                    keys.as_ptr(),
                    layout.block_tokens * layout.key_width,
                ),
                std::slice::from_raw_parts_mut(
                    values.as_ptr(),
                    layout.block_tokens * layout.value_width,
                ),
            )
        }
    }

    /// A copy in a new block of the same pool.
    pub fn duplicate(&self) -> KvBlock {
        let mut copy = self.pool.take();
        for l in 0..self.layers.len() {
            let ((keys, values), (to_keys, to_values)) = (self.layer(l), copy.layer_mut(l));
            to_keys.copy_from_slice(keys);
            to_values.copy_from_slice(values);
        }
        copy
    }
}

impl Drop for KvBlock {
    fn drop(&mut self) {
        self.pool.give_back(self.id);
    }
}

impl std::fmt::Debug for KvBlock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KvBlock(chunk {}, slot {})", self.id.0, self.id.1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool() -> Arc<KvPool> {
        KvPool::new(KvLayout {
            block_tokens: 4,
            num_layers: 3,
            key_width: 2,
            value_width: 3,
        })
    }

    #[test]
    fn blocks_taken_in_turn_are_one_run_per_layer() {
        let pool = pool();
        let blocks: Vec<KvBlock> = (0..5).map(|_| pool.take()).collect();
        let layout = *pool.layout();
        for l in 0..3 {
            for pair in blocks.windows(2) {
                let (a, b) = (pair[0].layer(l), pair[1].layer(l));
                let keys = layout.block_tokens * layout.key_width;
                let values = layout.block_tokens * layout.value_width;
                assert_eq!(unsafe { a.0.as_ptr().add(keys) }, b.0.as_ptr(), "layer {l}");
                assert_eq!(
                    unsafe { a.1.as_ptr().add(values) },
                    b.1.as_ptr(),
                    "layer {l}"
                );
            }
        }
        assert_eq!((pool.blocks_in_use(), pool.blocks_held()), (5, 8));
    }

    #[test]
    fn returned_blocks_are_reused_lowest_first_and_the_pool_grows_by_doubling() {
        let pool = pool();
        let mut blocks: Vec<KvBlock> = (0..8).map(|_| pool.take()).collect();
        let second = blocks[1].layer(0).0.as_ptr();
        blocks.remove(1);
        blocks.remove(4);
        assert_eq!(pool.blocks_in_use(), 6);
        let again = pool.take();
        assert_eq!(again.layer(0).0.as_ptr(), second);
        blocks.push(again);
        blocks.extend((0..3).map(|_| pool.take()));
        // 8, then another 8 (as many as it held).
        assert_eq!(pool.blocks_held(), 16);
        // Indices number every held block once, across chunks.
        let mut indices: Vec<usize> = blocks.iter().map(KvBlock::index).collect();
        indices.sort_unstable();
        indices.dedup();
        assert_eq!(indices.len(), blocks.len());
        assert!(indices.iter().all(|&i| i < pool.blocks_held()));
        assert!(
            indices.iter().any(|&i| i >= 8),
            "the second chunk's blocks follow the first's"
        );
        drop(blocks);
        assert_eq!(pool.blocks_in_use(), 0);
    }

    #[test]
    fn a_duplicate_has_the_rows_in_its_own_memory() {
        let pool = pool();
        let mut a = pool.take();
        for l in 0..3 {
            let (keys, values) = a.layer_mut(l);
            keys.fill(l as f32 + 0.5);
            values.fill(l as f32 + 0.25);
        }
        let b = a.duplicate();
        a.layer_mut(1).1.fill(9.0);
        assert!(b.layer(1).0.iter().all(|&v| v == 1.5));
        assert!(b.layer(1).1.iter().all(|&v| v == 1.25));
        assert_ne!(a.layer(1).1.as_ptr(), b.layer(1).1.as_ptr());
    }
}
