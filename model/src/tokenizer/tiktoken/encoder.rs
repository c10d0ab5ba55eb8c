//! Encoding as tiktoken encodes: special tokens found first, the text between them cut by the
//! pattern (with tiktoken's own regex engine), each piece a token whole where it is one, else
//! its bytes merged pair by pair, the pair whose concatenation ranks lowest (the leftmost of
//! equals) first. Straight over the ranks, without the byte-to-character mapping and merge
//! table of the BPE the same ranks make for decoding (twice as fast on 0.5 MB:
//! docs/performance.md).

use ahash::AHashMap;
use aho_corasick::{AhoCorasick, MatchKind};

use crate::error::{ModelError, Result};

pub struct TiktokenEncoder {
    ranks: AHashMap<Vec<u8>, u32>,
    pattern: fancy_regex::Regex,
    specials: AhoCorasick,
    special_ids: Vec<u32>,
}

fn failed(what: impl std::fmt::Display) -> ModelError {
    ModelError::Tokenizer(format!("tiktoken encoder: {what}"))
}

impl TiktokenEncoder {
    /// `ranks` by rank, `pattern` the class's, `specials` (text, id) recognised anywhere.
    pub fn new(ranks: &[Vec<u8>], pattern: &str, specials: &[(String, u32)]) -> Result<Self> {
        let pattern = fancy_regex::Regex::new(pattern).map_err(failed)?;
        let finder = AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostLongest)
            .build(specials.iter().map(|(text, _)| text))
            .map_err(failed)?;
        Ok(Self {
            ranks: ranks
                .iter()
                .enumerate()
                .map(|(rank, bytes)| (bytes.clone(), rank as u32))
                .collect(),
            pattern,
            specials: finder,
            special_ids: specials.iter().map(|&(_, id)| id).collect(),
        })
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = Vec::with_capacity(text.len() / 3);
        let mut from = 0;
        for found in self.specials.find_iter(text) {
            self.encode_ordinary(&text[from..found.start()], &mut ids)?;
            ids.push(self.special_ids[found.pattern().as_usize()]);
            from = found.end();
        }
        self.encode_ordinary(&text[from..], &mut ids)?;
        Ok(ids)
    }

    fn encode_ordinary(&self, text: &str, ids: &mut Vec<u32>) -> Result<()> {
        for piece in self.pattern.find_iter(text) {
            let piece = piece.map_err(failed)?.as_str().as_bytes();
            match self.ranks.get(piece) {
                Some(&rank) => ids.push(rank),
                None => self.merge(piece, ids)?,
            }
        }
        Ok(())
    }

    /// tiktoken's byte-pair merge of one piece: `parts` holds each part's start and the rank
    /// of it joined with the next part (`u32::MAX`: not a token).
    fn merge(&self, piece: &[u8], ids: &mut Vec<u32>) -> Result<()> {
        let joined = |parts: &[(usize, u32)], i: usize| match (parts.get(i), parts.get(i + 2)) {
            (Some(&(start, _)), Some(&(end, _))) => self
                .ranks
                .get(&piece[start..end])
                .copied()
                .unwrap_or(u32::MAX),
            _ => u32::MAX,
        };
        let mut parts: Vec<(usize, u32)> = (0..=piece.len()).map(|at| (at, u32::MAX)).collect();
        for i in 0..parts.len() {
            parts[i].1 = joined(&parts, i);
        }
        while parts.len() > 2 {
            let Some((i, rank)) = parts[..parts.len() - 1]
                .iter()
                .map(|&(_, rank)| rank)
                .enumerate()
                .min_by_key(|&(_, rank)| rank)
            else {
                break;
            };
            if rank == u32::MAX {
                break;
            }
            parts.remove(i + 1);
            parts[i].1 = joined(&parts, i);
            if i > 0 {
                parts[i - 1].1 = joined(&parts, i - 1);
            }
        }
        for pair in parts.windows(2) {
            let part = &piece[pair[0].0..pair[1].0];
            let rank = self.ranks.get(part).copied();
            ids.push(rank.ok_or_else(|| failed(format!("{part:?} is no token")))?);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The merge takes the lowest-ranked pair first, the leftmost of equals, and a piece that
    /// is a token whole stays one; special tokens are cut out first.
    #[test]
    fn pairs_merge_lowest_rank_first_and_specials_come_out_whole() {
        let mut ranks: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
        for token in [&b"ab"[..], b"bc", b"abc", b"aa"] {
            ranks.push(token.to_vec());
        }
        let specials = [("<|x|>".to_string(), 300)];
        let encoder = TiktokenEncoder::new(&ranks, r"\S+|\s+", &specials).unwrap();
        // "abc" is a token whole; "abcd": ab (256) before bc (257), then abc (258).
        assert_eq!(encoder.encode("abc").unwrap(), vec![258]);
        assert_eq!(encoder.encode("abcd").unwrap(), vec![258, u32::from(b'd')]);
        // "aaa": two equal pairs, the leftmost merges.
        assert_eq!(encoder.encode("aaa").unwrap(), vec![259, u32::from(b'a')]);
        assert_eq!(
            encoder.encode("ab<|x|>bc").unwrap(),
            vec![256, 300, 257],
            "the special splits the pieces"
        );
    }
}
