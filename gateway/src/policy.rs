//! Which router gets a new request ([`RoutingPolicy`]), and the prefix index behind
//! `cache-aware`: hashes of a prompt's whole 16-token blocks, each chained to the one before
//! (as a paged KV cache names its blocks), mapped to the router that last served them.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// Tokens per hashed block: the routers' default KV block, so a match is whole cached blocks.
pub const PREFIX_BLOCK_TOKENS: usize = 16;
/// Blocks the index remembers at most (about 4M prompt tokens); the least recently used half
/// is forgotten when it is full.
const MAX_INDEXED_BLOCKS: usize = 1 << 18;

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum RoutingPolicy {
    CacheAware,
    LeastLoad,
    RoundRobin,
}

impl RoutingPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::CacheAware => "cache-aware",
            Self::LeastLoad => "least-load",
            Self::RoundRobin => "round-robin",
        }
    }
}

/// The chained hashes of `ids`' whole blocks: block i's hash covers blocks 0..=i, and the
/// request's `cache_salt` (routers share cached blocks only under the same salt, so a salted
/// prompt's affinity is its salt's).
pub fn prefix_blocks(ids: &[u32], salt: &str) -> Vec<u64> {
    let mut previous = if salt.is_empty() {
        0u64
    } else {
        let mut hasher = DefaultHasher::new();
        salt.hash(&mut hasher);
        hasher.finish()
    };
    ids.chunks_exact(PREFIX_BLOCK_TOKENS)
        .map(|block| {
            let mut hasher = DefaultHasher::new();
            previous.hash(&mut hasher);
            block.hash(&mut hasher);
            previous = hasher.finish();
            previous
        })
        .collect()
}

/// A router the policy may choose, with its load (running and waiting requests).
#[derive(Debug, Clone, Copy)]
pub struct Candidate<'a> {
    pub id: &'a str,
    pub load: u32,
}

/// Block hash to the router that last served it, with a use stamp for eviction.
#[derive(Default)]
struct PrefixIndex {
    owners: HashMap<u64, (String, u64)>,
    clock: u64,
}

impl PrefixIndex {
    /// The router of the longest indexed prefix of `blocks`.
    fn owner(&self, blocks: &[u64]) -> Option<&str> {
        let mut owner = None;
        for block in blocks {
            match self.owners.get(block) {
                Some((router, _)) => owner = Some(router.as_str()),
                None => break,
            }
        }
        owner
    }

    fn record(&mut self, blocks: &[u64], router: &str) {
        self.clock += 1;
        for &block in blocks {
            match self.owners.get_mut(&block) {
                Some(entry) if entry.0 == router => entry.1 = self.clock,
                _ => {
                    self.owners.insert(block, (router.to_string(), self.clock));
                }
            }
        }
        if self.owners.len() > MAX_INDEXED_BLOCKS {
            let mut stamps: Vec<u64> = self.owners.values().map(|(_, s)| *s).collect();
            let middle = stamps.len() / 2;
            let (_, &mut median, _) = stamps.select_nth_unstable(middle);
            self.owners.retain(|_, (_, stamp)| *stamp > median);
        }
    }
}

/// Chooses routers by the policy; shared by every request.
pub struct RouterChooser {
    policy: RoutingPolicy,
    /// `--cache-imbalance`.
    imbalance: u32,
    prefixes: Mutex<PrefixIndex>,
    turn: AtomicUsize,
}

impl RouterChooser {
    pub fn new(policy: RoutingPolicy, imbalance: u32) -> Self {
        Self {
            policy,
            imbalance,
            prefixes: Mutex::default(),
            turn: AtomicUsize::new(0),
        }
    }

    pub fn policy(&self) -> RoutingPolicy {
        self.policy
    }

    /// The index in `candidates` (sorted by id) of the router for a prompt of `blocks`, and
    /// remembers that router as the prefix's owner.
    pub fn choose(&self, candidates: &[Candidate<'_>], blocks: &[u64]) -> Option<usize> {
        if candidates.is_empty() {
            return None;
        }
        let least = || {
            candidates
                .iter()
                .enumerate()
                .min_by_key(|(_, c)| (c.load, c.id))
                .map(|(i, _)| i)
        };
        let chosen = match self.policy {
            RoutingPolicy::RoundRobin => {
                Some(self.turn.fetch_add(1, Ordering::Relaxed) % candidates.len())
            }
            RoutingPolicy::LeastLoad => least(),
            RoutingPolicy::CacheAware => {
                let mut index = self.prefixes.lock().unwrap_or_else(|p| p.into_inner());
                let min_load = candidates.iter().map(|c| c.load).min().unwrap_or(0);
                let owner = index.owner(blocks).and_then(|owner| {
                    candidates.iter().position(|c| {
                        c.id == owner && c.load <= min_load.saturating_add(self.imbalance)
                    })
                });
                let chosen = owner.or_else(least);
                if let Some(i) = chosen {
                    index.record(blocks, candidates[i].id);
                }
                chosen
            }
        };
        chosen
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(prefix: u32, len: usize) -> Vec<u32> {
        (0..len as u32).map(|i| prefix * 1000 + i).collect()
    }

    #[test]
    fn blocks_are_chained_whole_blocks() {
        let a = prefix_blocks(&ids(1, 40), "");
        assert_eq!(a.len(), 2);
        let mut b_ids = ids(1, 40);
        b_ids[20] = 7;
        let b = prefix_blocks(&b_ids, "");
        assert_eq!(a[0], b[0]);
        assert_ne!(a[1], b[1]);
        // The same block after another prefix hashes differently.
        let mut c_ids = ids(1, 32);
        c_ids[0] = 9;
        assert_ne!(prefix_blocks(&c_ids, "")[1], a[1]);
        assert!(prefix_blocks(&ids(1, 15), "").is_empty());
        // A salt starts chains of its own.
        let salted = prefix_blocks(&ids(1, 40), "tenant");
        assert_eq!(salted.len(), a.len());
        assert!(salted.iter().all(|h| !a.contains(h)));
        assert_eq!(salted, prefix_blocks(&ids(1, 40), "tenant"));
    }

    #[test]
    fn cache_aware_keeps_a_prefix_on_its_router_until_it_is_overloaded() {
        let chooser = RouterChooser::new(RoutingPolicy::CacheAware, 2);
        let group_a = prefix_blocks(&ids(1, 64), "");
        let group_b = prefix_blocks(&ids(2, 64), "");
        let at = |loads: [u32; 2]| {
            [
                Candidate {
                    id: "r1",
                    load: loads[0],
                },
                Candidate {
                    id: "r2",
                    load: loads[1],
                },
            ]
        };
        assert_eq!(chooser.choose(&at([0, 0]), &group_a), Some(0));
        assert_eq!(chooser.choose(&at([1, 0]), &group_a), Some(0));
        assert_eq!(chooser.choose(&at([2, 0]), &group_b), Some(1));
        assert_eq!(chooser.choose(&at([2, 1]), &group_a[..2]), Some(0));
        // Past the imbalance, the least loaded router takes it and becomes the owner.
        assert_eq!(chooser.choose(&at([3, 0]), &group_a), Some(1));
        assert_eq!(chooser.choose(&at([0, 0]), &group_a), Some(1));
        // Without the prefix's router, the least loaded.
        let only = [Candidate { id: "r1", load: 5 }];
        assert_eq!(chooser.choose(&only, &group_b), Some(0));
    }

    #[test]
    fn round_robin_and_least_load() {
        let rr = RouterChooser::new(RoutingPolicy::RoundRobin, 0);
        let c = [
            Candidate { id: "r1", load: 0 },
            Candidate { id: "r2", load: 9 },
        ];
        let picks: Vec<_> = (0..4).map(|_| rr.choose(&c, &[]).unwrap()).collect();
        assert_eq!(picks, [0, 1, 0, 1]);
        let ll = RouterChooser::new(RoutingPolicy::LeastLoad, 0);
        assert_eq!(ll.choose(&c, &[]), Some(0));
        assert_eq!(ll.choose(&[], &[]), None);
    }

    #[test]
    fn the_index_forgets_the_least_recently_used_half_when_full() {
        let mut index = PrefixIndex::default();
        for group in 0..(MAX_INDEXED_BLOCKS as u64 + 10) {
            index.record(&[group], "r");
        }
        assert!(index.owners.len() <= MAX_INDEXED_BLOCKS / 2 + 10);
        let newest = MAX_INDEXED_BLOCKS as u64 + 9;
        assert_eq!(index.owner(&[newest]), Some("r"));
        assert_eq!(index.owner(&[0]), None);
    }
}
