//! KV-cache memory in fixed-size blocks, as vLLM's paged cache counts it. A request reserves the
//! blocks for its prompt plus its token budget when admitted; the reservation returns them when
//! dropped, so a cancelled or finished request can never leak cache.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

#[derive(Debug)]
pub struct KvBlocks {
    total: usize,
    used: Arc<AtomicUsize>,
    block_tokens: usize,
}

impl KvBlocks {
    pub fn new(budget_bytes: u64, bytes_per_token: usize, block_tokens: usize) -> Self {
        let block_bytes = (bytes_per_token * block_tokens).max(1) as u64;
        Self {
            total: (budget_bytes / block_bytes) as usize,
            used: Arc::new(AtomicUsize::new(0)),
            block_tokens: block_tokens.max(1),
        }
    }

    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_tokens)
    }

    /// Reserves blocks for `tokens`, or `None` when the budget cannot hold them now.
    pub fn reserve(&self, tokens: usize) -> Option<KvReservation> {
        self.reserve_blocks(self.blocks_for(tokens))
    }

    /// Reserves `want` blocks, or `None` when the budget cannot hold them now.
    pub fn reserve_blocks(&self, want: usize) -> Option<KvReservation> {
        let mut used = self.used.load(Ordering::Acquire);
        loop {
            if used + want > self.total {
                return None;
            }
            match self
                .used
                .compare_exchange(used, used + want, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    return Some(KvReservation {
                        blocks: want,
                        used: Arc::clone(&self.used),
                    })
                }
                Err(now) => used = now,
            }
        }
    }

    pub fn block_tokens(&self) -> usize {
        self.block_tokens
    }

    pub fn total(&self) -> usize {
        self.total
    }

    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }
}

#[derive(Debug)]
pub struct KvReservation {
    blocks: usize,
    used: Arc<AtomicUsize>,
}

impl KvReservation {
    pub fn blocks(&self) -> usize {
        self.blocks
    }

    /// Moves `n` of these blocks into a reservation of their own (a block that outlives its
    /// sequence, shared through the prefix cache, keeps its budget); `None` when fewer are held.
    pub fn split_off(&mut self, n: usize) -> Option<KvReservation> {
        self.blocks = self.blocks.checked_sub(n)?;
        Some(KvReservation {
            blocks: n,
            used: Arc::clone(&self.used),
        })
    }
}

impl Drop for KvReservation {
    fn drop(&mut self) {
        self.used.fetch_sub(self.blocks, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_return_their_blocks() {
        let kv = KvBlocks::new(64 * 16 * 10, 64, 16);
        assert_eq!(kv.total(), 10);
        let a = kv.reserve(100).unwrap();
        assert_eq!(kv.used(), 7);
        assert!(kv.reserve(64).is_none());
        drop(a);
        assert_eq!(kv.used(), 0);
        assert!(kv.reserve(160).is_some());
    }

    #[test]
    fn a_split_reservation_counts_its_blocks_once() {
        let kv = KvBlocks::new(64 * 16 * 10, 64, 16);
        let mut a = kv.reserve_blocks(4).unwrap();
        let one = a.split_off(1).unwrap();
        assert_eq!((a.blocks(), one.blocks(), kv.used()), (3, 1, 4));
        assert!(a.split_off(4).is_none());
        drop(a);
        assert_eq!(kv.used(), 1);
        drop(one);
        assert_eq!(kv.used(), 0);
    }
}
