//! Which communicator serves which placement epoch. A new epoch (a node joined, left or died)
//! gets a new communicator, because NCCL's membership is fixed at creation; older ones stay
//! usable while dispatches of their epoch may still be in flight, and are aborted once the
//! router serves a newer epoch and nothing holds them.

use std::collections::btree_map::Entry;
use std::collections::BTreeMap;

use super::communicator::Communicator;

/// Rank layout of one epoch: the router is rank 0, the nodes follow in node-id order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EpochRanks {
    pub epoch: u64,
    pub nodes: Vec<String>,
}

impl EpochRanks {
    pub fn new(epoch: u64, mut nodes: Vec<String>) -> Self {
        nodes.sort();
        nodes.dedup();
        Self { epoch, nodes }
    }

    pub fn size(&self) -> usize {
        self.nodes.len() + 1
    }

    /// A node's rank in this epoch's communicator.
    pub fn rank_of(&self, node_id: &str) -> Option<usize> {
        self.nodes
            .binary_search_by(|n| n.as_str().cmp(node_id))
            .ok()
            .map(|i| i + 1)
    }
}

/// The router's communicators, by epoch.
pub struct EpochCommunicators<C: Communicator> {
    live: BTreeMap<u64, (EpochRanks, C)>,
    /// Most epochs kept at once (the serving one and those still draining).
    keep: usize,
}

impl<C: Communicator> EpochCommunicators<C> {
    pub fn new(keep: usize) -> Self {
        Self {
            live: BTreeMap::new(),
            keep: keep.max(1),
        }
    }

    /// The communicator of `ranks.epoch`, created with `create` the first time it is asked for.
    /// Creating one aborts the oldest so that at most `keep` remain.
    pub fn get_or_create<E>(
        &mut self,
        ranks: &EpochRanks,
        create: impl FnOnce(&EpochRanks) -> Result<C, E>,
    ) -> Result<&mut C, E> {
        if !self.live.contains_key(&ranks.epoch) {
            // Make room first: abort the oldest beyond the `keep` newest.
            while self.live.len() >= self.keep {
                match self.live.pop_first() {
                    Some((_, (_, mut old))) => old.abort(),
                    None => break,
                }
            }
        }
        let (_, comm) = match self.live.entry(ranks.epoch) {
            Entry::Occupied(o) => o.into_mut(),
            Entry::Vacant(v) => v.insert((ranks.clone(), create(ranks)?)),
        };
        Ok(comm)
    }

    /// Aborts every communicator older than `epoch` (the router serves `epoch` and no dispatch
    /// of an older one is in flight).
    pub fn retire_below(&mut self, epoch: u64) {
        let newer = self.live.split_off(&epoch);
        for (_, (_, mut old)) in std::mem::replace(&mut self.live, newer) {
            old.abort();
        }
    }

    /// A communicator failed (timeout, peer died): drop it, so the next dispatch of a (new)
    /// epoch builds a fresh one.
    pub fn discard(&mut self, epoch: u64) {
        if let Some((_, mut comm)) = self.live.remove(&epoch) {
            comm.abort();
        }
    }

    pub fn epochs(&self) -> Vec<u64> {
        self.live.keys().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::super::communicator::fake::{group, FakeComm};
    use super::*;

    fn make(ranks: &EpochRanks) -> Result<FakeComm, String> {
        let (mut comms, _) = group(ranks.size());
        Ok(comms.swap_remove(0))
    }

    #[test]
    fn ranks_follow_node_id_order() {
        let r = EpochRanks::new(3, vec!["node-b".into(), "node-a".into(), "node-c".into()]);
        assert_eq!(r.size(), 4);
        assert_eq!(r.rank_of("node-a"), Some(1));
        assert_eq!(r.rank_of("node-c"), Some(3));
        assert_eq!(r.rank_of("node-x"), None);
    }

    #[test]
    fn one_communicator_per_epoch_and_old_ones_retired() {
        let mut comms: EpochCommunicators<FakeComm> = EpochCommunicators::new(2);
        let e1 = EpochRanks::new(1, vec!["a".into(), "b".into()]);
        let e2 = EpochRanks::new(2, vec!["a".into()]);
        let e3 = EpochRanks::new(3, vec!["a".into(), "c".into()]);
        assert_eq!(comms.get_or_create(&e1, make).unwrap().size(), 3);
        // Asking again reuses it: the factory is not called.
        comms
            .get_or_create(&e1, |_| {
                Err::<FakeComm, _>("must not be created twice".to_string())
            })
            .unwrap();
        assert_eq!(comms.get_or_create(&e2, make).unwrap().size(), 2);
        comms.get_or_create(&e3, make).unwrap();
        assert_eq!(comms.epochs(), vec![2, 3], "keeps the two newest");
        comms.retire_below(3);
        assert_eq!(comms.epochs(), vec![3]);
        comms.discard(3);
        assert!(comms.epochs().is_empty());
        // A failed creation leaves nothing behind and reports the error.
        let failed = comms.get_or_create(&e3, |_| Err::<FakeComm, _>("no GPU".to_string()));
        assert_eq!(failed.err(), Some("no GPU".to_string()));
        assert!(comms.epochs().is_empty());
    }
}
