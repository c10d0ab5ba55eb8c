//! A sequence's KV cache on a device: one buffer per layer for keys (MLA: `[latent | rope
//! key]` rows) and one for values (GQA only), grown by doubling. Which rows are valid is the
//! owning [`crate::kv_cache::SequenceCache`]'s `len`, so a rollback needs nothing here.

use std::any::Any;

use crate::kv_cache::DeviceCacheSlot;

pub struct DeviceLayerCache<B> {
    pub keys: B,
    /// `None` when the values are read from the key rows (MLA).
    pub values: Option<B>,
}

pub struct DeviceSequenceCache<B> {
    pub layers: Vec<DeviceLayerCache<B>>,
    /// Tokens every layer's buffers hold room for.
    pub capacity: usize,
    pub bytes: usize,
}

impl<B> Default for DeviceSequenceCache<B> {
    fn default() -> Self {
        Self {
            layers: Vec::new(),
            capacity: 0,
            bytes: 0,
        }
    }
}

impl<B: Send + 'static> DeviceCacheSlot for DeviceSequenceCache<B> {
    fn bytes(&self) -> usize {
        self.bytes
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}
