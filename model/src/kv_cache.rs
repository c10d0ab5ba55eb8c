//! Per-sequence attention cache. The router owns these; expert nodes hold no request state.
//!
//! For grouped-query attention a layer caches keys and values (`[len, kv_heads * head_dim]`
//! each). For MLA it caches the normalised latent (`[len, kv_lora_rank]`) and the rotated shared
//! key (`[len, qk_rope_head_dim]`): 576 floats per token on DeepSeek-V3 instead of 32768.

/// One layer's cache for one sequence.
#[derive(Debug, Clone, Default)]
pub struct LayerCache {
    /// GQA: keys. MLA: rotated rope keys.
    pub keys: Vec<f32>,
    /// GQA: values. MLA: normalised latents.
    pub values: Vec<f32>,
}

/// A sequence's cache across all layers.
#[derive(Debug, Clone, Default)]
pub struct SequenceCache {
    pub layers: Vec<LayerCache>,
    /// Tokens cached so far (the next token's position).
    pub len: usize,
}

impl SequenceCache {
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: vec![LayerCache::default(); num_layers],
            len: 0,
        }
    }

    /// Remembers the current size so that a step that fails half-way can be undone.
    pub fn mark(&self) -> CacheMark {
        CacheMark {
            len: self.len,
            sizes: self
                .layers
                .iter()
                .map(|l| (l.keys.len(), l.values.len()))
                .collect(),
        }
    }

    /// Drops whatever was appended after `mark`.
    pub fn rollback(&mut self, mark: &CacheMark) {
        for (layer, &(k, v)) in self.layers.iter_mut().zip(&mark.sizes) {
            layer.keys.truncate(k);
            layer.values.truncate(v);
        }
        self.len = mark.len;
    }

    /// Bytes held, for accounting.
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| (l.keys.capacity() + l.values.capacity()) * 4)
            .sum()
    }
}

/// Sizes of a [`SequenceCache`] at some point, see [`SequenceCache::mark`].
#[derive(Debug, Clone)]
pub struct CacheMark {
    len: usize,
    sizes: Vec<(usize, usize)>,
}
