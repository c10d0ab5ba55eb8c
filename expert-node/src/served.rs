//! The experts this node holds, per placement epoch it serves.
//!
//! A node serves the newest epoch it has loaded and the one before it, so routers still on the
//! previous epoch keep working while they switch; experts shared by both are held once.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use moe_model::experts::ExpertSet;

pub struct ServedExperts {
    /// Epoch to the experts assigned in it (at most two epochs).
    epochs: RwLock<BTreeMap<u64, Arc<ExpertSet>>>,
}

impl ServedExperts {
    pub fn new() -> Self {
        Self {
            epochs: RwLock::new(BTreeMap::new()),
        }
    }

    /// Experts for `epoch`, if this node serves it.
    pub fn for_epoch(&self, epoch: u64) -> Option<Arc<ExpertSet>> {
        self.epochs.read().ok()?.get(&epoch).cloned()
    }

    /// The newest loaded set (to share weights with the next epoch's).
    pub fn latest(&self) -> Option<(u64, Arc<ExpertSet>)> {
        let epochs = self.epochs.read().ok()?;
        epochs.iter().next_back().map(|(e, s)| (*e, Arc::clone(s)))
    }

    /// Starts serving `epoch`; keeps only the previous newest epoch besides it.
    pub fn install(&self, epoch: u64, set: Arc<ExpertSet>) {
        if let Ok(mut epochs) = self.epochs.write() {
            epochs.insert(epoch, set);
            while epochs.len() > 2 {
                let oldest = *epochs.keys().next().expect("non-empty");
                epochs.remove(&oldest);
            }
        }
    }

    pub fn epochs(&self) -> Vec<u64> {
        self.epochs
            .read()
            .map(|e| e.keys().copied().collect())
            .unwrap_or_default()
    }
}
