//! Incremental detokenization and stop-string search, in time linear in the output's length.
//!
//! Each token is decoded within a short window of the output ids, as text-generation-inference's
//! `decode_token` does: `prefix_offset..read_offset` was decoded before and gives the decoder its
//! context (byte merges, leading spaces), and what `prefix_offset..` adds to that text is the new
//! text once it is whole (it does not end in U+FFFD, an incomplete UTF-8 character). Stop strings
//! are searched only where a new match can be: the new text and the bytes just before it.

use moe_model::tokenizer::Tokenizer;

/// Tokens a character may stay incomplete before what decoding gives (with U+FFFD) is taken as
/// final. A UTF-8 character takes at most 4 byte tokens, so only invalid output waits this
/// long; the bound keeps the decoded window, and so the work per token, small for any output.
pub const MAX_PENDING_TOKENS: usize = 8;

/// Text from token ids: a trait so that tests can count work or make decoding fail.
pub trait Decode {
    /// The text of `ids`, special tokens skipped; `None` when the tokenizer fails.
    fn decode_text(&self, ids: &[u32]) -> Option<String>;
}

impl Decode for Tokenizer {
    fn decode_text(&self, ids: &[u32]) -> Option<String> {
        self.decode(ids).ok()
    }
}

/// The tokenizer writing special tokens' text too (a request's `skip_special_tokens: false`).
pub struct WithSpecialTokens<'a>(pub &'a Tokenizer);

impl Decode for WithSpecialTokens<'_> {
    fn decode_text(&self, ids: &[u32]) -> Option<String> {
        self.0.decode_with_special(ids).ok()
    }
}

/// A sequence's decoded text that is not sent yet, and the decoder's place in its ids.
#[derive(Debug, Default)]
pub struct IncrementalText {
    /// Start of the ids decoded again, as context, with each new token.
    prefix_offset: usize,
    /// End of the ids whose text is final.
    read_offset: usize,
    /// Decoded, not yet sent: what the hold-back kept, then this step's new text.
    unsent: String,
    /// Trailing bytes of `unsent` that end in an incomplete character: searched for stop
    /// strings (a decode of the whole output has them too) but never sent, and replaced by
    /// the next update.
    tentative: usize,
    /// Where this step's new text starts in `unsent`.
    new_from: usize,
    /// Token ids passed to the tokenizer so far (the detokenizer's work).
    pub decoded_tokens: u64,
    /// Bytes of text the stop search has looked at so far (each stop string searches them).
    pub scanned_bytes: u64,
}

impl IncrementalText {
    /// [`Self::update`] with `tokenizer`, special tokens skipped (the default) or written.
    pub fn update_with(&mut self, tokenizer: &Tokenizer, skip_special_tokens: bool, ids: &[u32]) {
        if skip_special_tokens {
            self.update(tokenizer, ids)
        } else {
            self.update(&WithSpecialTokens(tokenizer), ids)
        }
    }

    /// Decodes what the last tokens of `ids` (the whole output so far) add to the text.
    pub fn update<D: Decode + ?Sized>(&mut self, tokenizer: &D, ids: &[u32]) {
        self.unsent.truncate(self.unsent.len() - self.tentative);
        self.tentative = 0;
        self.new_from = self.unsent.len();
        if ids.len() <= self.read_offset {
            return;
        }
        let short = if self.prefix_offset == self.read_offset {
            Some(String::new())
        } else {
            self.decode(tokenizer, &ids[self.prefix_offset..self.read_offset])
        };
        let long = self.decode(tokenizer, &ids[self.prefix_offset..]);
        // A failed decode gives no text, and is waited out like an incomplete character.
        let (new, incomplete) = match (&short, &long) {
            (Some(short), Some(long)) => (added(short, long), long.ends_with('\u{FFFD}')),
            _ => ("", true),
        };
        self.unsent.push_str(new);
        if !new.is_empty() && !incomplete {
            self.prefix_offset = self.read_offset;
            self.read_offset = ids.len();
        } else if ids.len() - self.read_offset >= MAX_PENDING_TOKENS {
            // Waited long enough: the text so far is final. After a broken character the
            // window starts afresh, so its bytes cannot combine with later ones.
            self.prefix_offset = if incomplete {
                ids.len()
            } else {
                self.read_offset
            };
            self.read_offset = ids.len();
        } else if incomplete {
            self.tentative = new.len();
        }
    }

    /// The next piece to send and whether a stop string ended the text there (anything after
    /// it is dropped, and the stop string too unless `keep_stop`). `last` sends everything
    /// left. Otherwise the last (longest stop − 1) bytes are kept back, as they may still
    /// begin a stop string, and nothing is sent while a character is incomplete.
    pub fn next_piece(&mut self, stops: &[String], last: bool, keep_stop: bool) -> (String, bool) {
        if let Some((at, len)) = self.find_stop(stops) {
            let end = if keep_stop { at + len } else { at };
            return (self.take(end), true);
        }
        if last {
            return (self.take(self.unsent.len()), false);
        }
        if self.tentative > 0 {
            return (String::new(), false);
        }
        let hold = stops.iter().map(String::len).max().unwrap_or(1) - 1;
        let mut end = self.unsent.len().saturating_sub(hold);
        while !self.unsent.is_char_boundary(end) {
            end -= 1;
        }
        (self.take(end), false)
    }

    /// Byte offset in `unsent` of the earliest stop string, and its length (the first listed
    /// of those matching there). A match not found before must end in the new text, so it
    /// starts at most (longest − 1) bytes before it: only that tail is searched, and the
    /// hold-back has kept it unsent.
    fn find_stop(&mut self, stops: &[String]) -> Option<(usize, usize)> {
        let longest = stops.iter().map(String::len).max()?;
        let mut from = self.new_from.saturating_sub(longest.saturating_sub(1));
        while !self.unsent.is_char_boundary(from) {
            from += 1;
        }
        let tail = &self.unsent[from..];
        self.scanned_bytes += tail.len() as u64;
        stops
            .iter()
            .filter_map(|s| tail.find(s.as_str()).map(|at| (at, s.len())))
            .min_by_key(|&(at, _)| at)
            .map(|(at, len)| (from + at, len))
    }

    fn take(&mut self, end: usize) -> String {
        self.tentative = self.tentative.min(self.unsent.len() - end);
        self.new_from = self.new_from.saturating_sub(end);
        self.unsent.drain(..end).collect()
    }

    fn decode<D: Decode + ?Sized>(&mut self, tokenizer: &D, ids: &[u32]) -> Option<String> {
        self.decoded_tokens += ids.len() as u64;
        tokenizer.decode_text(ids)
    }
}

/// What `long` adds to `short`, which it starts with. Should a decoder ever rewrite the earlier
/// text, it is cut at the same length (on a character boundary) rather than failing.
fn added<'a>(short: &str, long: &'a str) -> &'a str {
    if long.len() <= short.len() {
        return "";
    }
    let mut at = short.len();
    while !long.is_char_boundary(at) {
        at += 1;
    }
    &long[at..]
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::*;

    const FIXTURES: [&str; 3] = ["deepseek-v3-tiny", "qwen3-moe-tiny", "mixtral-tiny"];

    fn fixture(name: &str) -> Tokenizer {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
        Tokenizer::from_dir(&dir.join(name)).unwrap()
    }

    /// xorshift64*: deterministic random-ish numbers without a dependency.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: usize) -> usize {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) as usize % n
        }
    }

    /// Ids of a plausible output of at least `n` tokens: random vocabulary tokens that decode
    /// to whole characters, text with multi-byte characters (split into byte tokens by these
    /// fixtures' 512-token vocabulary) and, if `specials`, special tokens (decode skips them).
    /// Tokens that are bare bytes of a multi-byte character are drawn only in order (through
    /// the encoded text): random ones would make invalid UTF-8, whose lossy U+FFFD rendering
    /// depends on where it is cut (see `invalid_utf8_output_stays_bounded`).
    fn normal_output(tok: &Tokenizer, rng: &mut Rng, n: usize, specials: bool) -> Vec<u32> {
        let vocab = tok.vocab_size() as u32;
        let mut whole = Vec::new();
        let mut special = Vec::new();
        for id in 0..vocab {
            let text = tok.decode(&[id]).unwrap();
            if text.is_empty() {
                special.push(id);
            } else if !text.contains('\u{FFFD}') {
                whole.push(id);
            }
        }
        assert!(!special.is_empty() && whole.len() > 100);
        let snippets = [
            "é",
            "딥",
            "€",
            "🦀",
            " 中文",
            " naïve",
            "ß\n",
            "😀!",
            "ü",
            " Ωμέγα",
            "\n\n",
            "—",
        ];
        let mut ids = Vec::new();
        while ids.len() < n {
            match rng.below(10) {
                0..=6 => ids.push(whole[rng.below(whole.len())]),
                7 | 8 => {
                    let text = snippets[rng.below(snippets.len())];
                    ids.extend(tok.encode_raw(text).unwrap());
                }
                _ if specials => ids.push(special[rng.below(special.len())]),
                _ => ids.push(whole[rng.below(whole.len())]),
            }
        }
        ids
    }

    /// Streams `ids` as the scheduler does: the pieces, and the step a stop string ended at.
    fn stream(
        tok: &dyn Decode,
        ids: &[u32],
        stops: &[String],
    ) -> (Vec<String>, Option<usize>, IncrementalText) {
        let mut text = IncrementalText::default();
        let mut pieces = Vec::new();
        for n in 1..=ids.len() {
            text.update(tok, &ids[..n]);
            let (piece, stopped) = text.next_piece(stops, n == ids.len(), false);
            pieces.push(piece);
            if stopped {
                return (pieces, Some(n), text);
            }
        }
        (pieces, None, text)
    }

    /// The algorithm this module replaced (whole-output re-decode and search), as the oracle.
    fn re_decoding_stream(
        tok: &Tokenizer,
        ids: &[u32],
        stops: &[String],
    ) -> (Vec<String>, Option<usize>) {
        let mut emitted = 0;
        let mut pieces = Vec::new();
        for n in 1..=ids.len() {
            let text = tok.decode(&ids[..n]).unwrap_or_default();
            let mut take = |end: usize| {
                if end <= emitted || !text.is_char_boundary(end) {
                    return String::new();
                }
                let piece = text[emitted..end].to_string();
                emitted = end;
                piece
            };
            if let Some(at) = stops.iter().filter_map(|s| text.find(s.as_str())).min() {
                pieces.push(take(at));
                return (pieces, Some(n));
            }
            if n == ids.len() {
                pieces.push(take(text.len()));
            } else if text.ends_with('\u{FFFD}') {
                pieces.push(String::new());
            } else {
                let hold = stops.iter().map(|x| x.len()).max().unwrap_or(1) - 1;
                let mut end = text.len().saturating_sub(hold);
                while !text.is_char_boundary(end) {
                    end -= 1;
                }
                pieces.push(take(end));
            }
        }
        (pieces, None)
    }

    #[test]
    fn holds_back_and_never_splits_characters() {
        let mut t = IncrementalText {
            unsent: "abc딥".into(),
            new_from: 0,
            ..Default::default()
        };
        let stops = ["xyz".to_string()];
        // Two bytes are kept back; "딥" is three bytes, so it waits whole.
        assert_eq!(t.next_piece(&stops, false, false), ("abc".into(), false));
        t.unsent.push_str("x\u{FFFD}");
        t.tentative = "\u{FFFD}".len();
        t.new_from = "딥".len();
        assert_eq!(t.next_piece(&stops, false, false), (String::new(), false));
        assert_eq!(
            t.next_piece(&[], true, false),
            ("딥x\u{FFFD}".into(), false)
        );
    }

    #[test]
    fn pieces_add_up_to_a_decode_of_the_whole_output() {
        for name in FIXTURES {
            let tok = fixture(name);
            let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
            let ids = normal_output(&tok, &mut rng, 5000, true);
            let full = tok.decode(&ids).unwrap();
            assert!(full.contains('🦀') && full.contains('딥'));
            for stops in [vec![], vec!["\u{0}never".to_string(), "#".repeat(9)]] {
                let (pieces, stopped, _) = stream(&tok, &ids, &stops);
                assert_eq!(stopped, None);
                assert_eq!(pieces.concat(), full, "{name}, stops {stops:?}");
                assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')), "{name}");
            }
        }
    }

    #[test]
    fn characters_split_across_byte_tokens_come_out_whole() {
        let tok = fixture("deepseek-v3-tiny");
        let text = "a€b🦀 딥c";
        let ids = tok.encode_raw(text).unwrap();
        let crab = tok.encode_raw("🦀").unwrap();
        assert_eq!(crab.len(), 4, "the emoji is four byte tokens");
        assert!(tok.decode(&crab[..2]).unwrap().ends_with('\u{FFFD}'));
        let (pieces, _, _) = stream(&tok, &ids, &[]);
        assert_eq!(pieces.concat(), text);
        assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')));
        // Nothing is sent while the emoji's first three bytes are in.
        let at = ids.windows(4).position(|w| w == crab).unwrap();
        assert_eq!(pieces[at..at + 3], ["", "", ""]);
        assert!(pieces[at + 3].ends_with('🦀'), "{pieces:?}");
    }

    /// A SentencePiece-like tokenizer as Mixtral's real one is (the fixture's is byte-level
    /// BPE like the others): Metaspace `▁` for spaces, byte fallback tokens, and a decoder
    /// that strips the leading space of the text it decodes.
    fn sentencepiece_like() -> (Tokenizer, PathBuf) {
        let mut vocab = serde_json::Map::new();
        for (id, t) in ["<unk>", "<s>", "</s>"].iter().enumerate() {
            vocab.insert(t.to_string(), id.into());
        }
        for b in 0..=255u32 {
            vocab.insert(format!("<0x{b:02X}>"), (3 + b).into());
        }
        let words = [
            "▁", "▁Hello", "▁world", "Hello", "!", "▁the", "a", "b", ",", "▁▁", "▁a", "ing",
        ];
        for (k, w) in words.iter().enumerate() {
            vocab.insert(w.to_string(), (259 + k).into());
        }
        let special = |id: u32, content: &str| {
            serde_json::json!({"id": id, "content": content, "single_word": false,
                "lstrip": false, "rstrip": false, "normalized": false, "special": true})
        };
        let json = serde_json::json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": [special(0, "<unk>"), special(1, "<s>"), special(2, "</s>")],
            "normalizer": {"type": "Sequence", "normalizers": [
                {"type": "Prepend", "prepend": "▁"},
                {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
            "pre_tokenizer": null,
            "post_processor": null,
            "decoder": {"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
            "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>",
                "continuing_subword_prefix": null, "end_of_word_suffix": null,
                "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                "vocab": vocab, "merges": []}
        });
        let dir = std::env::temp_dir().join(format!("moe-detokenize-sp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("tokenizer.json"), json.to_string()).unwrap();
        (Tokenizer::from_dir(&dir).unwrap(), dir)
    }

    #[test]
    fn sentencepiece_leading_spaces_and_byte_fallback() {
        let (tok, dir) = sentencepiece_like();
        let (hello, world) = (260, 261);
        assert_eq!(tok.decode(&[hello, world]).unwrap(), "Hello world");
        let (pieces, _, _) = stream(&tok, &[1, hello, world, 2, world], &[]);
        assert_eq!(pieces, ["", "Hello", " world", "", " world"]);

        let bytes = |c: char| -> Vec<u32> { c.to_string().bytes().map(|b| 3 + b as u32).collect() };
        let mut rng = Rng(7);
        let mut ids = Vec::new();
        while ids.len() < 4000 {
            match rng.below(8) {
                0..=4 => ids.push(259 + rng.below(12) as u32),
                5 => ids.push(3 + b'a' as u32 + rng.below(26) as u32),
                6 => ids.extend(bytes(['€', '딥', '🦀', 'é'][rng.below(4)])),
                _ => ids.push(1 + rng.below(2) as u32),
            }
        }
        let full = tok.decode(&ids).unwrap();
        assert!(full.contains(" world") && full.contains('🦀'));
        for stops in [vec![], vec!["never!".to_string()]] {
            let (pieces, stopped, _) = stream(&tok, &ids, &stops);
            assert_eq!(stopped, None);
            assert_eq!(pieces.concat(), full);
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn same_pieces_and_stops_as_re_decoding_the_whole_output() {
        let tok = fixture("deepseek-v3-tiny");
        let mut rng = Rng(42);
        let mut stopped_runs = 0;
        for run in 0..40 {
            let ids = normal_output(&tok, &mut rng, 200, run % 2 == 0);
            let full = tok.decode(&ids).unwrap();
            let chars: Vec<usize> = full.char_indices().map(|(i, _)| i).collect();
            // Stop strings cut from the text itself (some span tokens or multi-byte
            // characters, some overlap), plus one that never matches.
            let mut stops = vec!["never-in-output".to_string()];
            for _ in 0..rng.below(4) {
                let a = rng.below(chars.len() - 1);
                let b = (a + 1 + rng.below(6)).min(chars.len() - 1);
                stops.push(full[chars[a]..chars[b]].to_string());
            }
            let (pieces, stopped, _) = stream(&tok, &ids, &stops);
            let (want, want_stopped) = re_decoding_stream(&tok, &ids, &stops);
            assert_eq!(stopped, want_stopped, "run {run}, stops {stops:?}");
            assert_eq!(pieces, want, "run {run}, stops {stops:?}");
            stopped_runs += stopped.is_some() as usize;
            // Without stop strings nothing is held back (but incomplete characters).
            let (pieces, _, _) = stream(&tok, &ids, &[]);
            assert_eq!(pieces, re_decoding_stream(&tok, &ids, &[]).0, "run {run}");
        }
        assert!(stopped_runs > 20, "{stopped_runs}");
    }

    /// vLLM's `include_stop_str_in_output`: the text ends after the earliest stop string
    /// instead of before it (the first listed of those starting there), as found while the
    /// text streams.
    #[test]
    fn a_kept_stop_string_ends_the_text() {
        let tok = fixture("deepseek-v3-tiny");
        let ids = tok.encode_raw("the cat sat on the mat, then ran").unwrap();
        for (stops, want) in [
            (vec!["mat", "sat on", "ran"], "the cat sat on"),
            (vec!["sat", "sat on the"], "the cat sat"),
            // Streamed: "sat" is whole before "sat on the" could be.
            (vec!["sat on the", "sat"], "the cat sat"),
            // Both whole at once: the earlier start wins, whatever the order.
            (vec!["mat", "the mat"], "the cat sat on the mat"),
        ] {
            let stops: Vec<String> = stops.into_iter().map(String::from).collect();
            let mut text = IncrementalText::default();
            let mut out = String::new();
            for n in 1..=ids.len() {
                text.update(&tok, &ids[..n]);
                let (piece, stopped) = text.next_piece(&stops, n == ids.len(), true);
                out.push_str(&piece);
                if stopped {
                    break;
                }
            }
            assert_eq!(out, want, "{stops:?}");
        }
    }

    /// `skip_special_tokens: false` writes the special tokens' text.
    #[test]
    fn special_tokens_write_their_text_on_request() {
        let tok = fixture("deepseek-v3-tiny");
        let mut ids = tok.encode_prompt("Hi").unwrap();
        ids.push(tok.eos_id().unwrap());
        let eos = tok.eos_token().unwrap();
        let decoded = |skip: bool| {
            let mut text = IncrementalText::default();
            (1..=ids.len())
                .map(|n| {
                    text.update_with(&tok, skip, &ids[..n]);
                    text.next_piece(&[], n == ids.len(), false).0
                })
                .collect::<String>()
        };
        let (with, without) = (decoded(false), decoded(true));
        assert!(with.ends_with(&eos) && with.contains("Hi"), "{with:?}");
        assert_eq!(without, "Hi");
    }

    #[test]
    fn earliest_stop_string_wins_across_tokens() {
        let tok = fixture("deepseek-v3-tiny");
        let ids = tok.encode_raw("the cat sat on the mat, then ran").unwrap();
        let stops = ["mat".to_string(), "sat on".to_string(), "ran".to_string()];
        let (pieces, stopped, _) = stream(&tok, &ids, &stops);
        assert_eq!(pieces.concat(), "the cat ");
        assert!(stopped.is_some());
        // A stop string over a split character.
        let ids = tok.encode_raw("ab🦀cd").unwrap();
        let (pieces, stopped, _) = stream(&tok, &ids, &["🦀c".to_string()]);
        assert_eq!((pieces.concat().as_str(), stopped.is_some()), ("ab", true));
    }

    /// Over a 4,000-token output with stop strings, the work per token is bounded. Decoded
    /// tokens: the window is the tokens since `prefix_offset`, plus the same less the newest
    /// ones; for valid UTF-8 without special tokens a character spans at most 4 tokens, so the
    /// windows hold at most 8 and 4 tokens: 12 per token at worst, 3 in steady state (2 + 1).
    /// This output, a fifth of it multi-byte text in byte tokens, averages 4.2: at most 6 is
    /// asserted. Scanned bytes: longest stop − 1 + the step's new text.
    #[test]
    fn work_per_token_is_bounded_over_4000_tokens() {
        let tok = fixture("deepseek-v3-tiny");
        let mut rng = Rng(2026);
        let mut ids = normal_output(&tok, &mut rng, 4000, false);
        ids.truncate(4000);
        let stops = [
            "<|im_end|>".to_string(),
            "\n\nUser:".to_string(),
            "#".repeat(5),
        ];
        let longest = 10u64;
        let mut text = IncrementalText::default();
        let (mut decoded, mut scanned) = (0, 0);
        for n in 1..=ids.len() {
            text.update(&tok, &ids[..n]);
            let new = (text.unsent.len() - text.new_from) as u64;
            let (_, stopped) = text.next_piece(&stops, n == ids.len(), false);
            assert!(!stopped);
            let step_decoded = text.decoded_tokens - decoded;
            let step_scanned = text.scanned_bytes - scanned;
            assert!(step_decoded <= 12, "token {n}: {step_decoded} decoded");
            assert!(
                step_scanned < longest + new,
                "token {n}: {step_scanned} scanned"
            );
            (decoded, scanned) = (text.decoded_tokens, text.scanned_bytes);
        }
        let per_token = decoded as f64 / ids.len() as f64;
        eprintln!("decoded tokens per output token {per_token:.2}");
        assert!(per_token <= 6.0, "{per_token}");
        // Text held as tentative (an incomplete character) is searched again once whole, so
        // the total is bounded per step (above) rather than by the text's length.
        eprintln!(
            "scanned bytes per output token {:.2} (text {:.2} bytes per token)",
            scanned as f64 / ids.len() as f64,
            tok.decode(&ids).unwrap().len() as f64 / ids.len() as f64
        );
    }

    /// Random ids over the whole vocabulary make invalid UTF-8 (lone continuation bytes, cut
    /// characters): the look-back bound still keeps the work and the delay per token small.
    #[test]
    fn invalid_utf8_output_stays_bounded() {
        let tok = fixture("qwen3-moe-tiny");
        let mut rng = Rng(99);
        let ids: Vec<u32> = (0..4000)
            .map(|_| rng.below(tok.vocab_size()) as u32)
            .collect();
        let mut text = IncrementalText::default();
        let mut decoded = 0;
        let mut since_text = 0;
        let mut sent = String::new();
        for n in 1..=ids.len() {
            text.update(&tok, &ids[..n]);
            let step = text.decoded_tokens - decoded;
            decoded = text.decoded_tokens;
            assert!(step <= 3 * MAX_PENDING_TOKENS as u64, "{step}");
            let (piece, _) = text.next_piece(&[], n == ids.len(), false);
            since_text = if piece.is_empty() { since_text + 1 } else { 0 };
            assert!(since_text <= MAX_PENDING_TOKENS, "token {n}");
            sent.push_str(&piece);
        }
        assert!(decoded <= 12 * ids.len() as u64);
        // Only the U+FFFD renderings of broken characters may differ from a whole decode.
        let full = tok.decode(&ids).unwrap();
        let clean = |s: &str| s.replace('\u{FFFD}', "");
        assert!(clean(&full).len().abs_diff(clean(&sent).len()) < full.len() / 20);
    }

    struct Failing;

    impl Decode for Failing {
        fn decode_text(&self, _: &[u32]) -> Option<String> {
            None
        }
    }

    #[test]
    fn tokenizer_failures_give_no_text_and_never_panic() {
        let ids: Vec<u32> = (0..100).collect();
        let (pieces, stopped, text) = stream(&Failing, &ids, &["x".to_string()]);
        assert_eq!((pieces.concat(), stopped), (String::new(), None));
        assert!(text.decoded_tokens <= 24 * 100);
    }
}
