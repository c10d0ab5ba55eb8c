//! Per-sequence attention cache. The router owns these; expert nodes hold no request state.
//!
//! For grouped-query attention a layer caches keys and values (`[len, kv_heads * head_dim]`
//! each). For MLA it caches the normalised latent (`[len, kv_lora_rank]`) and the rotated shared
//! key (`[len, qk_rope_head_dim]`): 576 floats per token on DeepSeek-V3 instead of 32768.

/// Bytes of one cached value: the cache holds f32 (the router's KV budget counts it so, and
/// the capacity planner sizes a router's cache with it).
pub const KV_VALUE_BYTES: usize = 4;

/// One layer's cache for one sequence.
#[derive(Debug, Clone, Default)]
pub struct LayerCache {
    /// GQA: keys. MLA: rotated rope keys.
    pub keys: Vec<f32>,
    /// GQA: values. MLA: normalised latents.
    pub values: Vec<f32>,
}

/// A sequence's cache across all layers.
#[derive(Default)]
pub struct SequenceCache {
    /// The host cache (the CPU dense model).
    pub layers: Vec<LayerCache>,
    /// Tokens cached so far (the next token's position).
    pub len: usize,
    /// The device cache, when the dense part runs on a device (created by its first step).
    pub device: Option<Box<dyn DeviceCacheSlot>>,
    /// Tokens the owner has reserved for this sequence (prompt + most new tokens), 0 when
    /// unknown: a device cache takes that room at its first step instead of growing by
    /// doubling (no copies, and never more than the owner's KV budget counted).
    pub reserved: usize,
}

/// A cache held on a device for one sequence; its valid rows are the owner's `len`.
pub trait DeviceCacheSlot: Send {
    fn bytes(&self) -> usize;
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any;
}

impl std::fmt::Debug for SequenceCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SequenceCache")
            .field("len", &self.len)
            .field("layers", &self.layers.len())
            .field("device_bytes", &self.device.as_ref().map(|d| d.bytes()))
            .finish()
    }
}

impl SequenceCache {
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: vec![LayerCache::default(); num_layers],
            len: 0,
            device: None,
            reserved: 0,
        }
    }

    /// This cache, for a sequence that will hold at most `tokens` tokens.
    pub fn reserving(mut self, tokens: usize) -> Self {
        self.reserved = tokens;
        self
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
            .sum::<usize>()
            + self.device.as_ref().map_or(0, |d| d.bytes())
    }
}

/// Sizes of a [`SequenceCache`] at some point, see [`SequenceCache::mark`].
#[derive(Debug, Clone)]
pub struct CacheMark {
    len: usize,
    sizes: Vec<(usize, usize)>,
}
