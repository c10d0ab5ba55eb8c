//! Prompt-lookup drafts for speculative decoding (vLLM's `ngram` method): the tokens that
//! followed the last time the sequence's latest few tokens appeared earlier in it.
//!
//! A draft only decides how many positions a step computes ahead; the sampler still picks
//! every token from the model's own logits and the draft is kept only as far as it agrees,
//! so drafts change no token (see the router's scheduler).

/// How drafts are looked up: the latest `max_ngram` down to `min_ngram` tokens of a sequence
/// are searched for earlier in it, longest first, and up to `tokens` that followed the most
/// recent match are proposed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NgramDrafter {
    pub min_ngram: usize,
    pub max_ngram: usize,
    /// Tokens proposed at most (vLLM's `num_speculative_tokens`).
    pub tokens: usize,
}

impl NgramDrafter {
    /// Writes into `draft` (emptied first) up to `limit` (and [`Self::tokens`]) tokens that
    /// followed the latest earlier occurrence of the longest matching suffix of `context`;
    /// nothing when no suffix of `min_ngram` tokens or more occurs earlier. What followed
    /// runs on into the suffix itself when the match is recent: the draft then repeats that
    /// stretch, as a loop in the text would (a loop of period 1 drafts `limit` copies, not
    /// one).
    pub fn propose(&self, context: &[u32], limit: usize, draft: &mut Vec<u32>) {
        draft.clear();
        let limit = limit.min(self.tokens);
        let len = context.len();
        if limit == 0 || self.min_ngram == 0 || len < 2 {
            return;
        }
        // One pass from the latest candidate back: `end` is where the token after a candidate
        // occurrence sits, `matched` how many tokens before it equal the context's last ones
        // (at most `max_ngram`). The first full-length match is the answer; otherwise the
        // longest seen, the latest among equals. Each candidate usually fails on its first
        // token, so this is about one comparison per token of context.
        let mut best: Option<(usize, usize)> = None;
        for end in (1..len).rev() {
            let matched = (0..self.max_ngram.min(end))
                .take_while(|&t| context[end - 1 - t] == context[len - 1 - t])
                .count();
            if matched < self.min_ngram || best.is_some_and(|(m, _)| m >= matched) {
                continue;
            }
            best = Some((matched, end));
            if matched == self.max_ngram {
                break;
            }
        }
        if let Some((_, from)) = best {
            let period = len - from;
            draft.extend((0..limit).map(|i| context[from + i % period]));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn propose(
        min_ngram: usize,
        max_ngram: usize,
        tokens: usize,
        context: &[u32],
        limit: usize,
    ) -> Vec<u32> {
        let drafter = NgramDrafter {
            min_ngram,
            max_ngram,
            tokens,
        };
        let mut draft = vec![99];
        drafter.propose(context, limit, &mut draft);
        draft
    }

    #[test]
    fn proposes_what_followed_the_latest_match() {
        // "1 2" occurs at 0 (then 3 4) and at 4 (then 9 8): the latest wins.
        let context = [1, 2, 3, 4, 1, 2, 9, 8, 7, 1, 2];
        assert_eq!(propose(2, 2, 3, &context, 10), [9, 8, 7]);
        // The limit and the drafter's own count both bound it.
        assert_eq!(propose(2, 2, 3, &context, 1), [9]);
        assert_eq!(propose(2, 2, 2, &context, 10), [9, 8]);
    }

    #[test]
    fn the_longest_ngram_wins() {
        // The 1-gram "5" last occurs at 6 (then 6), the 3-gram "3 4 5" at 2 (then 7).
        let context = [1, 3, 3, 4, 5, 7, 5, 6, 3, 4, 5];
        assert_eq!(propose(1, 3, 1, &context, 4), [7]);
        assert_eq!(propose(1, 1, 1, &context, 4), [6]);
        // Capped at max_ngram: "4 5" matches at 2 as well, and the latest full match wins.
        assert_eq!(propose(1, 2, 1, &context, 4), [7]);
    }

    #[test]
    fn a_recent_match_repeats_its_loop() {
        // Period 1: the latest match proposes the one token after it, then again.
        assert_eq!(propose(2, 2, 5, &[4, 7, 7, 7, 7], 5), [7, 7, 7, 7, 7]);
        // Period 3: "a b c a b c a b" goes on "c a b c".
        assert_eq!(propose(2, 3, 4, &[1, 2, 3, 1, 2, 3, 1, 2], 4), [3, 1, 2, 3]);
    }

    #[test]
    fn nothing_without_a_long_enough_match() {
        assert!(propose(2, 3, 4, &[1, 2, 3, 4, 5], 4).is_empty());
        assert!(propose(1, 1, 4, &[1], 4).is_empty());
        assert!(propose(1, 1, 4, &[], 4).is_empty());
        assert!(propose(1, 1, 4, &[1, 1], 0).is_empty());
        // The suffix alone, with nothing after an earlier copy of it, is no match.
        assert!(propose(3, 3, 4, &[1, 2, 3], 4).is_empty());
        // A match shorter than min_ngram is none.
        assert!(propose(3, 4, 4, &[5, 1, 2, 9, 1, 2], 4).is_empty());
    }
}
