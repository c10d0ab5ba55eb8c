//! The KV cache of a dense part on a device: one pool of blocks per model, laid out as the
//! host's [`crate::kv_cache::KvPool`] numbers its blocks, so a sequence's block table (its
//! [`crate::kv_cache::SequenceCache`]'s blocks) says where its rows are on the device too.
//! Blocks shared between sequences (a cached prompt prefix) are shared here as well, counted
//! once, and never written (a sequence writes only past every sharer's length); which rows are
//! valid is the owning cache's `len`, so a rollback needs nothing here.
//!
//! Per layer, the keys (MLA: `[latent | rope key]` rows) and the values (GQA only) of
//! [`CHUNK_BLOCKS`] blocks are one buffer; chunks are added as block indices grow, never moved
//! or freed while the model lives (the host pool keeps its blocks too). After the chunks, each
//! layer holds one more block, the sink ([`DeviceKvPool::sink_block`]): where the padding rows
//! of a decode step padded to its batch-size bucket write and read, so they touch no
//! sequence's cache.

/// Blocks per device chunk: one allocation per layer (and per keys and values) for this many.
pub const CHUNK_BLOCKS: usize = 64;

/// One layer's chunks.
pub struct PooledLayer<B> {
    /// The chunks, then the sink block.
    pub keys: Vec<B>,
    /// `None` when the values are read from the key rows (MLA).
    pub values: Option<Vec<B>>,
}

pub struct DeviceKvPool<B> {
    pub layers: Vec<PooledLayer<B>>,
    /// Per layer: (key floats, value floats or none) per cached token.
    widths: Vec<(usize, Option<usize>)>,
    block_tokens: usize,
    /// Chunks held per layer.
    chunks: usize,
    /// Whether each layer's sink block is there (after its chunks).
    sink: bool,
    bytes: usize,
}

impl<B> DeviceKvPool<B> {
    pub fn new(widths: Vec<(usize, Option<usize>)>, block_tokens: usize) -> Self {
        Self {
            layers: widths
                .iter()
                .map(|(_, values)| PooledLayer {
                    keys: Vec::new(),
                    values: values.map(|_| Vec::new()),
                })
                .collect(),
            widths,
            block_tokens: block_tokens.max(1),
            chunks: 0,
            sink: false,
            bytes: 0,
        }
    }

    pub fn block_tokens(&self) -> usize {
        self.block_tokens
    }

    /// Chunks held per layer.
    pub fn chunks(&self) -> usize {
        self.chunks
    }

    /// The number by which the kernels find the sink block: the first block of the chunk
    /// after the last (no sequence's block table names it; it moves as chunks are added).
    pub fn sink_block(&self) -> usize {
        self.chunks * CHUNK_BLOCKS
    }

    /// Device bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Makes room for blocks `0..blocks`, allocating whole chunks with `alloc(floats)` (and
    /// each layer's sink block the first time).
    pub fn ensure_blocks<E>(
        &mut self,
        blocks: usize,
        mut alloc: impl FnMut(usize) -> Result<B, E>,
    ) -> Result<(), E> {
        if !self.sink {
            let rows = self.block_tokens;
            for (layer, &(key_width, value_width)) in self.layers.iter_mut().zip(&self.widths) {
                layer.keys.push(alloc(rows * key_width)?);
                self.bytes += rows * key_width * 4;
                if let (Some(values), Some(width)) = (layer.values.as_mut(), value_width) {
                    values.push(alloc(rows * width)?);
                    self.bytes += rows * width * 4;
                }
            }
            self.sink = true;
        }
        let rows = CHUNK_BLOCKS * self.block_tokens;
        while self.chunks * CHUNK_BLOCKS < blocks {
            let at = self.chunks;
            for (layer, &(key_width, value_width)) in self.layers.iter_mut().zip(&self.widths) {
                layer.keys.insert(at, alloc(rows * key_width)?);
                self.bytes += rows * key_width * 4;
                if let (Some(values), Some(width)) = (layer.values.as_mut(), value_width) {
                    values.insert(at, alloc(rows * width)?);
                    self.bytes += rows * width * 4;
                }
            }
            self.chunks += 1;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Chunks come whole, for every layer, keys and values (GQA) or keys only (MLA), and
    /// only when a block index needs one; the sink block stays after them.
    #[test]
    fn chunks_are_added_as_block_indices_grow() {
        let mut pool: DeviceKvPool<Vec<f32>> = DeviceKvPool::new(vec![(4, Some(4)), (6, None)], 2);
        let alloc = |n: usize| Ok::<_, ()>(vec![0.0f32; n]);
        pool.ensure_blocks(1, alloc).unwrap();
        assert_eq!(pool.layers[0].keys.len(), 2, "a chunk and the sink");
        assert_eq!(pool.layers[0].values.as_ref().map(Vec::len), Some(2));
        assert!(pool.layers[1].values.is_none());
        assert_eq!(pool.layers[1].keys[0].len(), CHUNK_BLOCKS * 2 * 6);
        assert_eq!(pool.layers[1].keys[1].len(), 2 * 6, "the sink: one block");
        assert_eq!(pool.sink_block(), CHUNK_BLOCKS);
        pool.ensure_blocks(CHUNK_BLOCKS, alloc).unwrap();
        assert_eq!(pool.layers[0].keys.len(), 2);
        pool.ensure_blocks(CHUNK_BLOCKS + 1, alloc).unwrap();
        assert_eq!(pool.layers[1].keys.len(), 3);
        assert_eq!(pool.layers[1].keys[1].len(), CHUNK_BLOCKS * 2 * 6);
        assert_eq!(pool.layers[1].keys[2].len(), 2 * 6, "the sink stays last");
        assert_eq!(pool.sink_block(), 2 * CHUNK_BLOCKS);
        let sink = 2 * (4 + 4 + 6) * 4;
        assert_eq!(pool.bytes(), 2 * CHUNK_BLOCKS * 2 * (4 + 4 + 6) * 4 + sink);
    }
}
