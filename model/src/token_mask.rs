//! A grammar's allowed tokens for one pick, as bits: what a device applies to the logit row it
//! keeps (a constrained request then sends back its pick, not its row). The router computes a
//! mask on another thread while the step runs, so the step waits for it only when it picks
//! ([`MaskSlot`]).

use std::sync::OnceLock;

/// Bit `i` of word `i / 32` says whether token `i` is allowed; ids past the mask are not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenMask {
    words: Vec<u32>,
    len: usize,
}

impl TokenMask {
    pub fn from_allowed(allowed: &[bool]) -> Self {
        let mut words = vec![0u32; allowed.len().div_ceil(32)];
        for (i, _) in allowed.iter().enumerate().filter(|(_, &a)| a) {
            words[i / 32] |= 1 << (i % 32);
        }
        Self {
            words,
            len: allowed.len(),
        }
    }

    /// Every one of `len` tokens allowed (the bits past `len` clear, as the device reads them).
    pub fn all(len: usize) -> Self {
        let mut words = vec![u32::MAX; len.div_ceil(32)];
        if let Some(last) = words.last_mut() {
            let used = len % 32;
            if used > 0 {
                *last = (1u32 << used) - 1;
            }
        }
        Self { words, len }
    }

    /// Token `id` no longer allowed (nothing when it is past the mask).
    pub fn forbid(&mut self, id: usize) {
        if id < self.len {
            self.words[id / 32] &= !(1 << (id % 32));
        }
    }

    /// Only the tokens both masks allow (`other`'s ids past its end are not allowed: its bits
    /// there are clear).
    pub fn and_with(&mut self, other: &TokenMask) {
        for (i, word) in self.words.iter_mut().enumerate() {
            *word &= other.words.get(i).copied().unwrap_or(0);
        }
    }

    pub fn allows(&self, id: usize) -> bool {
        id < self.len && self.words[id / 32] >> (id % 32) & 1 == 1
    }

    /// Whether any token is allowed (a pick needs one).
    pub fn any(&self) -> bool {
        self.words.iter().any(|&w| w != 0)
    }

    /// The bits, as the device takes them (`len().div_ceil(32)` words).
    pub fn words(&self) -> &[u32] {
        &self.words
    }

    /// Tokens the mask covers.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// `row` with every token the mask does not allow at -inf, as
    /// [`crate::sampling::Sampler::sample_allowed`] masks it.
    pub fn apply(&self, row: &mut [f32]) {
        for (i, x) in row.iter_mut().enumerate() {
            if !self.allows(i) {
                *x = f32::NEG_INFINITY;
            }
        }
    }
}

/// A mask that another thread fills while the step runs: `None` when the grammar could not
/// give one (an error, or no token allowed), and the pick is then made from the row on the
/// host, where the sampler reports it.
#[derive(Debug, Default)]
pub struct MaskSlot(OnceLock<Option<TokenMask>>);

impl MaskSlot {
    pub fn new() -> Self {
        Self::default()
    }

    /// Fills the slot once (a later fill is ignored); a mask allowing nothing fills it with
    /// `None`.
    pub fn fill(&self, mask: Option<TokenMask>) {
        let _ = self.0.set(mask.filter(TokenMask::any));
    }

    /// The mask, once filled (blocks until then).
    pub fn wait(&self) -> Option<&TokenMask> {
        self.0.wait().as_ref()
    }
}

/// Slots are compared by identity: two picks are the same when they wait for the same mask.
impl PartialEq for MaskSlot {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::eq(self, other)
    }
}

/// Fills every slot it holds that is still empty with `None` when dropped: the thread that
/// computes masks holds one, so a step never waits for a mask that a panic left unmade.
pub struct FillOnDrop<'a>(pub &'a [Option<MaskSlot>]);

impl Drop for FillOnDrop<'_> {
    fn drop(&mut self) {
        for slot in self.0.iter().flatten() {
            slot.fill(None);
        }
    }
}

/// The mask of one logit row of a step.
#[derive(Debug, Clone, Copy)]
pub struct RowMask<'a> {
    pub row: u32,
    pub mask: &'a TokenMask,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `all`, `forbid` and `and_with` are the flag operations they stand for, tail bits clear.
    #[test]
    fn mask_operations_are_the_flags_ones() {
        for len in [0usize, 1, 31, 32, 33, 100] {
            let all = TokenMask::all(len);
            assert_eq!(all, TokenMask::from_allowed(&vec![true; len]), "{len}");
            let mut a = all.clone();
            let mut flags = vec![true; len];
            for id in (0..len + 3).step_by(3) {
                a.forbid(id);
                if let Some(f) = flags.get_mut(id) {
                    *f = false;
                }
            }
            assert_eq!(a, TokenMask::from_allowed(&flags), "{len}");
            let other: Vec<bool> = (0..len / 2).map(|i| i % 2 == 0).collect();
            a.and_with(&TokenMask::from_allowed(&other));
            let both: Vec<bool> = (0..len)
                .map(|i| flags[i] && other.get(i).copied().unwrap_or(false))
                .collect();
            assert_eq!(a, TokenMask::from_allowed(&both), "{len}");
        }
    }

    #[test]
    fn a_mask_allows_its_tokens_only() {
        let allowed: Vec<bool> = (0..70).map(|i| i % 3 == 0 || i == 69).collect();
        let mask = TokenMask::from_allowed(&allowed);
        assert_eq!(mask.words().len(), 3);
        for (i, &a) in allowed.iter().enumerate() {
            assert_eq!(mask.allows(i), a, "token {i}");
        }
        assert!(!mask.allows(70) && !mask.allows(1000), "past the mask");
        assert!(mask.any());
        assert!(!TokenMask::from_allowed(&[false; 40]).any());
        let mut row: Vec<f32> = (0..72).map(|i| i as f32).collect();
        mask.apply(&mut row);
        for (i, x) in row.iter().enumerate() {
            let kept = i < 70 && allowed[i];
            assert_eq!(*x, if kept { i as f32 } else { f32::NEG_INFINITY }, "{i}");
        }
    }

    /// A slot is waited for across threads, filled once, and one that a panicking filler left
    /// empty is filled with `None` by its guard; a mask allowing nothing fills it with `None`.
    #[test]
    fn slots_are_filled_once_and_never_left_empty() {
        let slots = vec![Some(MaskSlot::new()), None, Some(MaskSlot::new())];
        std::thread::scope(|scope| {
            let filler = scope.spawn(|| {
                let _guard = FillOnDrop(&slots);
                let first = slots[0].as_ref().unwrap();
                first.fill(Some(TokenMask::from_allowed(&[false, true])));
                first.fill(None);
                panic!("the grammar failed");
            });
            let first = slots[0].as_ref().unwrap().wait();
            assert!(first.is_some_and(|m| m.allows(1)));
            assert_eq!(slots[2].as_ref().unwrap().wait(), None);
            assert!(filler.join().is_err());
        });
        let nothing = MaskSlot::new();
        nothing.fill(Some(TokenMask::from_allowed(&[false; 3])));
        assert_eq!(nothing.wait(), None);
    }
}
