//! Tokenizers shipped as tiktoken ranks (`tiktoken.model`) with a Python class instead of a
//! `tokenizer.json`: Kimi-K2's `TikTokenTokenizer`. Text is encoded as tiktoken encodes it
//! ([`TiktokenEncoder`]: the class's pattern, its special tokens numbered after the ranks, the
//! ranks merged by tiktoken's rule), so a prompt gets tiktoken's ids; the ranks also become a
//! byte-level BPE vocabulary (no merges: it never encodes) for decoding, token pieces and
//! llguidance, as a `tokenizer.json` would give them.

use std::collections::BTreeMap;
use std::path::Path;

use base64::Engine as _;
use serde_json::Value;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::AddedToken;

use crate::error::{ModelError, Result};

mod encoder;
pub use encoder::TiktokenEncoder;

/// The rank file's name, as Kimi's class names it.
pub const RANKS_FILE: &str = "tiktoken.model";

/// Kimi-K2's `pat_str` (`tokenization_kimi.py`): Han runs apart, words with their cased
/// letters and contractions, numbers in threes, punctuation runs, newlines, spaces.
const KIMI_PATTERN: &str = concat!(
    r"[\p{Han}]+",
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"|\p{N}{1,3}",
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*",
    r"|\s*[\r\n]+",
    r"|\s+(?!\S)",
    r"|\s+",
);

/// Special tokens Kimi-K2's class numbers after the ranks (`num_reserved_special_tokens`:
/// 163,584 ranks and 256 specials make its 163,840-row vocabulary; Kimi-Linear's copy of the
/// class numbers two more).
const KIMI_SPECIAL_SLOTS: usize = 256;

/// The `additional_special_tokens` Kimi's class uses when the config names none: with BOS,
/// EOS, UNK and PAD, the tokens a decode skips.
const KIMI_ADDITIONAL_SPECIAL: [&str; 8] = [
    "<|im_end|>",
    "<|im_user|>",
    "<|im_assistant|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "[EOT]",
    "<|im_system|>",
    "<|im_middle|>",
];

/// The longest rank file read (Kimi's is 2.8 MB; a larger one is not a tokenizer).
const MAX_RANKS_BYTES: u64 = 64 << 20;

/// Kimi's class encodes text in pieces of at most this many characters...
const MAX_ENCODE_CHARS: usize = 400_000;
/// ...each cut again where a run of whitespace or of anything else grows past this.
const MAX_RUN_CHARS: usize = 25_000;

fn invalid(what: impl std::fmt::Display) -> ModelError {
    ModelError::Tokenizer(format!("{RANKS_FILE}: {what}"))
}

/// Whether `dir` holds a tokenizer this module reads: ranks and a class that names them.
pub fn present(dir: &Path) -> bool {
    dir.join(RANKS_FILE).is_file()
}

/// The ranks' byte strings, index = rank: every line `BASE64 RANK`, the ranks 0..n once each.
fn read_ranks(path: &Path) -> Result<Vec<Vec<u8>>> {
    let size = std::fs::metadata(path)
        .map_err(|e| invalid(format!("cannot read: {e}")))?
        .len();
    if size > MAX_RANKS_BYTES {
        return Err(invalid(format!(
            "{size} bytes, more than {MAX_RANKS_BYTES}"
        )));
    }
    let text = std::fs::read_to_string(path).map_err(|e| invalid(format!("cannot read: {e}")))?;
    let mut by_rank: Vec<Option<Vec<u8>>> = Vec::new();
    for (line_no, line) in text.lines().enumerate().filter(|(_, l)| !l.is_empty()) {
        let bad = |why: &str| invalid(format!("line {}: {why}", line_no + 1));
        let (encoded, rank) = line
            .split_once(' ')
            .ok_or_else(|| bad("not `BASE64 RANK`"))?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .map_err(|_| bad("not base64"))?;
        let rank: usize = rank.trim().parse().map_err(|_| bad("rank not a number"))?;
        if bytes.is_empty() || rank >= text.len() {
            return Err(bad("empty token or rank out of range"));
        }
        if by_rank.len() <= rank {
            by_rank.resize(rank + 1, None);
        }
        if by_rank[rank].replace(bytes).is_some() {
            return Err(bad("rank given twice"));
        }
    }
    by_rank
        .into_iter()
        .enumerate()
        .map(|(rank, bytes)| bytes.ok_or_else(|| invalid(format!("rank {rank} missing"))))
        .collect()
}

/// GPT-2's byte-to-character map (transformers' `bytes_to_unicode`): printable bytes stand
/// for themselves, the rest for characters from U+0100 on, so a BPE over text can hold bytes.
fn byte_chars() -> [char; 256] {
    let mut map = ['\0'; 256];
    let mut next = 256u32;
    for (byte, slot) in map.iter_mut().enumerate() {
        let printable = matches!(byte, 0x21..=0x7e | 0xa1..=0xac | 0xae..=0xff);
        let code = if printable {
            byte as u32
        } else {
            next += 1;
            next - 1
        };
        *slot = char::from_u32(code).unwrap_or('\u{fffd}');
    }
    map
}

fn piece_of(bytes: &[u8], chars: &[char; 256]) -> String {
    bytes.iter().map(|&b| chars[b as usize]).collect()
}

/// The special tokens after the ranks, by id: the config's `added_tokens_decoder` names
/// where it has them, `<|reserved_token_{id}|>` elsewhere, and whether a decode skips each.
fn special_tokens(config: &Value, first_id: usize) -> Result<Vec<AddedToken>> {
    let named: BTreeMap<usize, String> = match config.get("added_tokens_decoder") {
        Some(Value::Object(map)) => map
            .iter()
            .filter_map(|(id, token)| {
                let content = token.get("content")?.as_str()?;
                Some((id.parse().ok()?, content.to_string()))
            })
            .collect(),
        _ => BTreeMap::new(),
    };
    let mut skipped: Vec<String> = ["bos_token", "eos_token", "unk_token", "pad_token"]
        .iter()
        .filter_map(|key| super::special_token_content(config, key))
        .collect();
    match config.get("additional_special_tokens") {
        Some(Value::Array(names)) => skipped.extend(
            names
                .iter()
                .filter_map(|n| n.as_str().or_else(|| n.get("content")?.as_str()))
                .map(str::to_string),
        ),
        _ => skipped.extend(KIMI_ADDITIONAL_SPECIAL.iter().map(|s| s.to_string())),
    }
    let tokens: Vec<AddedToken> = (first_id..first_id + KIMI_SPECIAL_SLOTS)
        .map(|id| {
            let content = named
                .get(&id)
                .cloned()
                .unwrap_or_else(|| format!("<|reserved_token_{id}|>"));
            let special = skipped.contains(&content);
            AddedToken::from(content, special).normalized(false)
        })
        .collect();
    let mut seen = std::collections::HashSet::new();
    if let Some(twice) = tokens.iter().find(|t| !seen.insert(t.content.as_str())) {
        return Err(invalid(format!(
            "special token `{}` named twice",
            twice.content
        )));
    }
    Ok(tokens)
}

/// Builds the tokenizer from `dir`'s ranks and its `tokenizer_config.json` (`config`): the
/// byte-level BPE that decodes (and that llguidance reads), and the encoder that encodes as
/// tiktoken does.
pub fn load(dir: &Path, config: &Value) -> Result<(tokenizers::Tokenizer, TiktokenEncoder)> {
    match config.get("tokenizer_class").and_then(Value::as_str) {
        Some("TikTokenTokenizer") => {}
        other => {
            return Err(invalid(format!(
                "tokenizer class {other:?}: only Kimi's `TikTokenTokenizer` is known (its \
                 pattern lives in its Python code)"
            )))
        }
    }
    let ranks = read_ranks(&dir.join(RANKS_FILE))?;
    let chars = byte_chars();
    if !(0..=255u8).all(|b| ranks.iter().any(|t| t.as_slice() == [b])) {
        return Err(invalid("not every byte is a token"));
    }
    let vocab: ahash::AHashMap<String, u32> = ranks
        .iter()
        .enumerate()
        .map(|(rank, bytes)| (piece_of(bytes, &chars), rank as u32))
        .collect();
    if vocab.len() != ranks.len() {
        return Err(invalid("two ranks hold the same bytes"));
    }
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, Vec::new())
        .build()
        .map_err(|e| invalid(format!("cannot build the BPE: {e}")))?;
    let mut tokenizer = tokenizers::Tokenizer::new(bpe);
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    // Added in id order from the first id after the ranks, each takes the next id.
    let specials = special_tokens(config, ranks.len())?;
    let by_id: Vec<(String, u32)> = specials
        .iter()
        .zip(ranks.len() as u32..)
        .map(|(token, id)| (token.content.clone(), id))
        .collect();
    for token in specials {
        if token.special {
            tokenizer.add_special_tokens(&[token]);
        } else {
            tokenizer.add_tokens(&[token]);
        }
    }
    let encoder = TiktokenEncoder::new(&ranks, KIMI_PATTERN, &by_id)?;
    Ok((tokenizer, encoder))
}

/// Where Kimi's class cuts a text before encoding each piece on its own: every
/// [`MAX_ENCODE_CHARS`] characters, then wherever a run of whitespace (Python's `isspace`) or
/// of other characters passes [`MAX_RUN_CHARS`]. Only texts that long are cut at all.
pub fn encode_pieces(text: &str) -> Vec<&str> {
    if text.len() <= MAX_RUN_CHARS {
        return vec![text];
    }
    let mut pieces = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let end = rest
            .char_indices()
            .nth(MAX_ENCODE_CHARS)
            .map_or(rest.len(), |(at, _)| at);
        let (chunk, after) = rest.split_at(end);
        cut_runs(chunk, &mut pieces);
        rest = after;
    }
    pieces
}

/// Python's `str.isspace`: Unicode's white space plus the four information separators.
fn python_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

fn cut_runs<'a>(chunk: &'a str, pieces: &mut Vec<&'a str>) {
    let mut start = 0;
    let mut run = 0usize;
    let mut run_is_space = chunk.chars().next().is_some_and(python_space);
    for (at, c) in chunk.char_indices() {
        let space = python_space(c);
        if space != run_is_space {
            run = 1;
            run_is_space = space;
        } else {
            run += 1;
            if run > MAX_RUN_CHARS {
                pieces.push(&chunk[start..at]);
                start = at;
                run = 1;
            }
        }
    }
    pieces.push(&chunk[start..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_texts_are_one_piece_and_long_runs_are_cut_as_kimis_class_cuts_them() {
        assert_eq!(encode_pieces("a b"), vec!["a b"]);
        let long = "x".repeat(MAX_RUN_CHARS + 10);
        let pieces = encode_pieces(&long);
        assert_eq!(pieces.len(), 2);
        assert_eq!(pieces[0].len(), MAX_RUN_CHARS);
        let mixed = format!("{} {}", "y".repeat(MAX_RUN_CHARS), "z".repeat(10));
        assert_eq!(
            encode_pieces(&mixed),
            vec![mixed.as_str()],
            "no run too long"
        );
        let spaces = format!("a{}b", "\u{1c}".repeat(MAX_RUN_CHARS + 1));
        assert_eq!(encode_pieces(&spaces).len(), 2, "Python's isspace");
        let huge = "ab ".repeat(MAX_ENCODE_CHARS / 3 + 5);
        let pieces = encode_pieces(&huge);
        assert_eq!(pieces.len(), 2);
        assert_eq!(pieces[0].chars().count(), MAX_ENCODE_CHARS);
        assert_eq!(pieces.concat(), huge);
    }

    #[test]
    fn the_byte_map_is_gpt2s() {
        let chars = byte_chars();
        assert_eq!(chars[b'a' as usize], 'a');
        assert_eq!(chars[b' ' as usize], 'Ġ');
        assert_eq!(chars[b'\n' as usize], 'Ċ');
        let mut sorted = chars.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 256, "one character per byte");
    }

    /// A benchmark, not a test: `bench/tiktoken_at_scale.sh` makes a vocabulary of Kimi's
    /// size and a text in `MOE_TIKTOKEN_AT_SCALE`, this loads and encodes it (times printed,
    /// ids written for the script to compare with tiktoken's).
    #[test]
    #[ignore]
    fn tiktoken_at_scale() {
        let Some(dir) = std::env::var_os("MOE_TIKTOKEN_AT_SCALE") else {
            return;
        };
        let dir = std::path::PathBuf::from(dir);
        let start = std::time::Instant::now();
        let tokenizer = crate::tokenizer::Tokenizer::from_dir(&dir).expect("loads");
        println!(
            "loaded {} tokens in {:.0} ms",
            tokenizer.vocab_size(),
            start.elapsed().as_secs_f64() * 1e3
        );
        let text = std::fs::read_to_string(dir.join("text.txt")).expect("text");
        let start = std::time::Instant::now();
        let ids = tokenizer.encode_raw(&text).expect("encodes");
        println!(
            "encoded {} bytes -> {} ids in {:.0} ms",
            text.len(),
            ids.len(),
            start.elapsed().as_secs_f64() * 1e3
        );
        let json = serde_json::to_string(&ids).expect("ids");
        std::fs::write(dir.join("ids.json"), json).expect("written");
        assert_eq!(tokenizer.decode_with_special(&ids).expect("decodes"), text);
    }

    #[test]
    fn malformed_rank_files_are_refused_by_line() {
        let dir = std::env::temp_dir().join(format!("moe-tiktoken-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(RANKS_FILE);
        for (text, want) in [
            ("YQ== 0\nYg== 0\n", "line 2: rank given twice"),
            ("YQ== 0\n!!! 1\n", "line 2: not base64"),
            ("YQ== 1\n", "rank 0 missing"),
            ("YQ==\n", "line 1: not `BASE64 RANK`"),
        ] {
            std::fs::write(&path, text).unwrap();
            let err = read_ranks(&path).unwrap_err().to_string();
            assert!(err.contains(want), "{text:?}: {err}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
