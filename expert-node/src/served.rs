//! The experts this node holds, per placement epoch it serves.
//!
//! A node serves the newest epoch it has loaded and older ones some router may still dispatch
//! on, so routers keep working while they switch; experts shared by epochs are held once.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use moe_model::experts::ExpertSet;

/// Epochs held at most: bounds memory if a router lags far behind.
const MAX_EPOCHS: usize = 4;

pub struct ServedExperts {
    /// Epoch to the experts assigned in it.
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

    /// Starts serving `epoch`, besides at most [`MAX_EPOCHS`] - 1 older ones.
    pub fn install(&self, epoch: u64, set: Arc<ExpertSet>) {
        if let Ok(mut epochs) = self.epochs.write() {
            epochs.insert(epoch, set);
            while epochs.len() > MAX_EPOCHS {
                let oldest = *epochs.keys().next().expect("non-empty");
                epochs.remove(&oldest);
            }
        }
    }

    /// Drops epochs older than `epoch` (no router serves them any more), keeping the newest.
    pub fn release_before(&self, epoch: u64) {
        if let Ok(mut epochs) = self.epochs.write() {
            let newest = epochs.keys().next_back().copied();
            epochs.retain(|e, _| *e >= epoch || Some(*e) == newest);
        }
    }

    pub fn epochs(&self) -> Vec<u64> {
        self.epochs
            .read()
            .map(|e| e.keys().copied().collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set() -> Arc<ExpertSet> {
        Arc::new(ExpertSet::empty(4))
    }

    /// At most [`MAX_EPOCHS`] are held, the oldest going first; releasing keeps the newest
    /// even when asked to release past it.
    #[test]
    fn epochs_are_bounded_and_the_newest_always_kept() {
        let served = ServedExperts::new();
        assert!(served.latest().is_none());
        for epoch in 1..=6 {
            served.install(epoch, set());
        }
        assert_eq!(served.epochs(), [3, 4, 5, 6]);
        assert!(served.for_epoch(2).is_none());
        assert!(served.for_epoch(5).is_some());
        served.release_before(5);
        assert_eq!(served.epochs(), [5, 6]);
        served.release_before(100);
        assert_eq!(served.epochs(), [6]);
        assert_eq!(served.latest().map(|(e, _)| e), Some(6));
    }
}
