//! `--speculative-config`: vLLM's JSON for speculative decoding, of which two methods are
//! implemented: `ngram` (prompt lookup) and `deepseek_mtp` (DeepSeek-V3's own
//! multi-token-prediction layer drafting, [`crate::mtp::MtpHead`]).
//!
//! Drafts never change a token here: every token is still the sampler's pick from the model's
//! own logits, and a verify step's logits are bitwise a decode's (the math is batch- and
//! chunk-invariant), so speculation only saves steps when drafts agree.

use crate::ngram_draft::NgramDrafter;
use serde_json::{Map, Value};

/// Draft tokens per step at most, and n-gram lengths at most: a step's verify rows and the
/// lookup's work per token stay bounded.
pub const MAX_SPECULATIVE_TOKENS: usize = 64;
pub const MAX_NGRAM: usize = 64;

/// Where drafts come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DraftMethod {
    /// Looked up in the sequence's own tokens.
    Ngram(NgramDrafter),
    /// Guessed by the checkpoint's multi-token-prediction layer, `tokens` a step (the layer
    /// reused on its own output past the first, as vLLM does).
    Mtp { tokens: usize },
}

/// How the scheduler speculates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpeculativeConfig {
    pub method: DraftMethod,
    /// No drafts while more sequences than this run (vLLM's `disable_by_batch_size`): a full
    /// batch is compute-bound and checking drafts costs more than it saves.
    pub disable_by_batch_size: Option<usize>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpeculativeConfigError {
    #[error("--speculative-config is not a JSON object: {0}")]
    NotAnObject(String),
    #[error("--speculative-config: unknown key `{0}` (known: method, num_speculative_tokens, prompt_lookup_min, prompt_lookup_max, disable_by_batch_size)")]
    UnknownKey(String),
    #[error(
        "--speculative-config: method `{0}` is not implemented (`ngram` and `deepseek_mtp` or `mtp` are)"
    )]
    UnsupportedMethod(String),
    #[error("--speculative-config: `method` is required (`ngram`, `deepseek_mtp` or `mtp`)")]
    MissingMethod,
    #[error("--speculative-config: `{0}` is the ngram method's, not deepseek_mtp's")]
    NgramKeyForMtp(String),
    #[error("--speculative-config: `num_speculative_tokens` is required")]
    MissingTokens,
    #[error("--speculative-config: `{key}` must be an integer from {min} to {max}")]
    OutOfRange {
        key: &'static str,
        min: usize,
        max: usize,
    },
    #[error("--speculative-config: prompt_lookup_min ({min}) is above prompt_lookup_max ({max})")]
    MinAboveMax { min: usize, max: usize },
}

impl std::str::FromStr for SpeculativeConfig {
    type Err = SpeculativeConfigError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let object: Map<String, Value> = match serde_json::from_str(text) {
            Ok(Value::Object(object)) => object,
            Ok(other) => return Err(SpeculativeConfigError::NotAnObject(other.to_string())),
            Err(e) => return Err(SpeculativeConfigError::NotAnObject(e.to_string())),
        };
        const KNOWN: [&str; 6] = [
            "method",
            "model",
            "num_speculative_tokens",
            "prompt_lookup_min",
            "prompt_lookup_max",
            "disable_by_batch_size",
        ];
        if let Some(key) = object.keys().find(|k| !KNOWN.contains(&k.as_str())) {
            return Err(SpeculativeConfigError::UnknownKey(key.clone()));
        }
        // vLLM names the method, or (its older form) gives `[ngram]` as the draft model.
        let method = match (object.get("method"), object.get("model")) {
            (Some(m), _) | (None, Some(m)) => m.as_str().unwrap_or_default().to_string(),
            (None, None) => return Err(SpeculativeConfigError::MissingMethod),
        };
        let tokens = |object: &Map<String, Value>| {
            integer(object, "num_speculative_tokens", MAX_SPECULATIVE_TOKENS)?
                .ok_or(SpeculativeConfigError::MissingTokens)
        };
        let disable_by_batch_size = integer(&object, "disable_by_batch_size", usize::MAX)?;
        match method.as_str() {
            "ngram" | "[ngram]" => {}
            // vLLM's names (GLM-4.5's too), and the shorter one its newer releases take for
            // every MTP model.
            "deepseek_mtp" | "glm4_moe_mtp" | "mtp" => {
                let key = ["prompt_lookup_min", "prompt_lookup_max"]
                    .into_iter()
                    .find(|k| object.contains_key(*k));
                if let Some(key) = key {
                    return Err(SpeculativeConfigError::NgramKeyForMtp(key.into()));
                }
                return Ok(Self {
                    method: DraftMethod::Mtp {
                        tokens: tokens(&object)?,
                    },
                    disable_by_batch_size,
                });
            }
            _ => return Err(SpeculativeConfigError::UnsupportedMethod(method)),
        }
        let tokens = tokens(&object)?;
        let min = integer(&object, "prompt_lookup_min", MAX_NGRAM)?;
        let max = integer(&object, "prompt_lookup_max", MAX_NGRAM)?;
        // vLLM's defaults: both 5, or the one given for both.
        let (min_ngram, max_ngram) = match (min, max) {
            (None, None) => (5, 5),
            (Some(n), None) | (None, Some(n)) => (n, n),
            (Some(min), Some(max)) => (min, max),
        };
        if min_ngram > max_ngram {
            return Err(SpeculativeConfigError::MinAboveMax {
                min: min_ngram,
                max: max_ngram,
            });
        }
        Ok(Self {
            method: DraftMethod::Ngram(NgramDrafter {
                min_ngram,
                max_ngram,
                tokens,
            }),
            disable_by_batch_size,
        })
    }
}

/// `key`'s value as an integer in 1..=`max`, if given.
fn integer(
    object: &Map<String, Value>,
    key: &'static str,
    max: usize,
) -> Result<Option<usize>, SpeculativeConfigError> {
    let Some(value) = object.get(key) else {
        return Ok(None);
    };
    value
        .as_u64()
        .and_then(|n| usize::try_from(n).ok())
        .filter(|n| (1..=max).contains(n))
        .map(Some)
        .ok_or(SpeculativeConfigError::OutOfRange { key, min: 1, max })
}

impl SpeculativeConfig {
    /// Whether drafts come from the checkpoint's MTP layer.
    pub fn uses_mtp(&self) -> bool {
        matches!(self.method, DraftMethod::Mtp { .. })
    }

    /// Whether a batch of `running` sequences drafts.
    pub fn drafts_at(&self, running: usize) -> bool {
        self.disable_by_batch_size.is_none_or(|n| running <= n)
    }
}

/// Drafts that keep missing cost a wider step each time and save nothing (text that does not
/// repeat itself): after a draft of which no token agreed, a sequence drafts again only after
/// 1, 2, 4, ... steps (up to [`MAX_DRAFT_BACKOFF`]); a draft that agrees at all resets it.
/// It decides only when a step drafts, never a token.
#[derive(Debug, Default, Clone, Copy)]
pub struct DraftBackoff {
    misses: u32,
    skip: u32,
}

/// Steps a sequence whose drafts keep missing waits at most before drafting again.
const MAX_DRAFT_BACKOFF: u32 = 16;

impl DraftBackoff {
    /// Whether this step may draft (counting down a wait).
    pub fn may_draft(&mut self) -> bool {
        if self.skip == 0 {
            return true;
        }
        self.skip -= 1;
        false
    }

    /// Whether the next step's [`Self::may_draft`] says yes.
    pub fn drafts_next(&self) -> bool {
        self.skip == 0
    }

    pub fn record(&mut self, accepted: usize) {
        if accepted > 0 {
            *self = Self::default();
        } else {
            self.skip = (1u32 << self.misses.min(8)).min(MAX_DRAFT_BACKOFF);
            self.misses = self.misses.saturating_add(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<SpeculativeConfig, SpeculativeConfigError> {
        text.parse()
    }

    #[test]
    fn reads_vllms_ngram_config_with_its_defaults() {
        let c = parse(r#"{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 2}"#).unwrap();
        assert_eq!(
            c.method,
            DraftMethod::Ngram(NgramDrafter {
                min_ngram: 2,
                max_ngram: 3,
                tokens: 4
            })
        );
        assert_eq!(c.disable_by_batch_size, None);
        assert!(c.drafts_at(1000));
        let lookup = |c: SpeculativeConfig| match c.method {
            DraftMethod::Ngram(d) => (d.min_ngram, d.max_ngram),
            DraftMethod::Mtp { .. } => panic!("not ngram"),
        };
        let c = parse(r#"{"method": "ngram", "num_speculative_tokens": 5}"#).unwrap();
        assert_eq!(lookup(c), (5, 5));
        let c = parse(r#"{"model": "[ngram]", "num_speculative_tokens": 5, "prompt_lookup_max": 3, "disable_by_batch_size": 8}"#).unwrap();
        assert_eq!(lookup(c), (3, 3));
        assert!(c.drafts_at(8) && !c.drafts_at(9));
        assert!(!c.uses_mtp());
    }

    #[test]
    fn reads_vllms_deepseek_mtp_config() {
        let c = parse(r#"{"method": "deepseek_mtp", "num_speculative_tokens": 1}"#).unwrap();
        assert_eq!(c.method, DraftMethod::Mtp { tokens: 1 });
        assert!(c.uses_mtp());
        let c =
            parse(r#"{"method": "mtp", "num_speculative_tokens": 3, "disable_by_batch_size": 4}"#)
                .unwrap();
        assert_eq!(c.method, DraftMethod::Mtp { tokens: 3 });
        assert_eq!(c.disable_by_batch_size, Some(4));
        assert_eq!(
            parse(
                r#"{"method": "deepseek_mtp", "num_speculative_tokens": 1, "prompt_lookup_max": 3}"#
            ),
            Err(SpeculativeConfigError::NgramKeyForMtp(
                "prompt_lookup_max".into()
            ))
        );
        assert_eq!(
            parse(r#"{"method": "deepseek_mtp"}"#),
            Err(SpeculativeConfigError::MissingTokens)
        );
    }

    #[test]
    fn refuses_what_it_cannot_honour_by_name() {
        use SpeculativeConfigError::*;
        assert!(matches!(parse("[1]"), Err(NotAnObject(_))));
        assert!(matches!(parse("{"), Err(NotAnObject(_))));
        assert_eq!(
            parse(r#"{"method": "eagle", "num_speculative_tokens": 1}"#),
            Err(UnsupportedMethod("eagle".into()))
        );
        assert_eq!(
            parse(r#"{"num_speculative_tokens": 1}"#),
            Err(MissingMethod)
        );
        assert_eq!(parse(r#"{"method": "ngram"}"#), Err(MissingTokens));
        assert_eq!(
            parse(
                r#"{"method": "ngram", "num_speculative_tokens": 1, "draft_tensor_parallel_size": 1}"#
            ),
            Err(UnknownKey("draft_tensor_parallel_size".into()))
        );
        for bad in ["0", "65", "-1", "2.5", "\"3\""] {
            let text = format!(r#"{{"method": "ngram", "num_speculative_tokens": {bad}}}"#);
            assert!(
                matches!(
                    parse(&text),
                    Err(OutOfRange {
                        key: "num_speculative_tokens",
                        ..
                    })
                ),
                "{bad}"
            );
        }
        assert_eq!(
            parse(
                r#"{"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4, "prompt_lookup_max": 3}"#
            ),
            Err(MinAboveMax { min: 4, max: 3 })
        );
    }

    /// Drafts that miss wait 1, 2, 4, ... steps (at most 16) before the next; one that agrees
    /// resets the wait.
    #[test]
    fn missing_drafts_back_off_and_an_agreeing_one_resets() {
        let mut backoff = DraftBackoff::default();
        let mut waits = Vec::new();
        for _ in 0..7 {
            assert!(backoff.may_draft());
            backoff.record(0);
            let mut wait = 0;
            while !backoff.may_draft() {
                wait += 1;
            }
            waits.push(wait);
        }
        assert_eq!(waits, [1, 2, 4, 8, 16, 16, 16]);
        backoff.record(0);
        backoff.record(2);
        assert!(backoff.may_draft());
        backoff.record(0);
        assert!(!backoff.may_draft());
    }
}
