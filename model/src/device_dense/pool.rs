//! The KV cache of a dense part on a device: one pool of blocks per model, laid out as the
//! host's [`crate::kv_cache::KvPool`] numbers its blocks, so a sequence's block table (its
//! [`crate::kv_cache::SequenceCache`]'s blocks) says where its rows are on the device too.
//! Blocks shared between sequences (a cached prompt prefix) are shared here as well, counted
//! once, and never written (a sequence writes only past every sharer's length); which rows are
//! valid is the owning cache's `len`, so a rollback needs nothing here.
//!
//! Per layer, the keys (MLA: `[latent | rope key]` rows) and the values (GQA only) of
//! [`CHUNK_BLOCKS`] blocks are one buffer; chunks are added as block indices grow, never moved
//! or freed while the model lives (the host pool keeps its blocks too).

/// Blocks per device chunk: one allocation per layer (and per keys and values) for this many.
pub const CHUNK_BLOCKS: usize = 64;

/// One layer's chunks.
pub struct PooledLayer<B> {
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
            bytes: 0,
        }
    }

    pub fn block_tokens(&self) -> usize {
        self.block_tokens
    }

    /// Device bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Makes room for blocks `0..blocks`, allocating whole chunks with `alloc(floats)`.
    pub fn ensure_blocks<E>(
        &mut self,
        blocks: usize,
        mut alloc: impl FnMut(usize) -> Result<B, E>,
    ) -> Result<(), E> {
        let rows = CHUNK_BLOCKS * self.block_tokens;
        while self.chunks * CHUNK_BLOCKS < blocks {
            for (layer, &(key_width, value_width)) in self.layers.iter_mut().zip(&self.widths) {
                layer.keys.push(alloc(rows * key_width)?);
                self.bytes += rows * key_width * 4;
                if let (Some(values), Some(width)) = (layer.values.as_mut(), value_width) {
                    values.push(alloc(rows * width)?);
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
    /// only when a block index needs one.
    #[test]
    fn chunks_are_added_as_block_indices_grow() {
        let mut pool: DeviceKvPool<Vec<f32>> = DeviceKvPool::new(vec![(4, Some(4)), (6, None)], 2);
        let alloc = |n: usize| Ok::<_, ()>(vec![0.0f32; n]);
        pool.ensure_blocks(1, alloc).unwrap();
        assert_eq!(pool.layers[0].keys.len(), 1);
        assert_eq!(pool.layers[0].values.as_ref().map(Vec::len), Some(1));
        assert!(pool.layers[1].values.is_none());
        assert_eq!(pool.layers[1].keys[0].len(), CHUNK_BLOCKS * 2 * 6);
        pool.ensure_blocks(CHUNK_BLOCKS, alloc).unwrap();
        assert_eq!(pool.layers[0].keys.len(), 1);
        pool.ensure_blocks(CHUNK_BLOCKS + 1, alloc).unwrap();
        assert_eq!(pool.layers[1].keys.len(), 2);
        assert_eq!(pool.bytes(), 2 * CHUNK_BLOCKS * 2 * (4 + 4 + 6) * 4);
    }
}
