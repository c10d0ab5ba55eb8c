//! Every check on a Generate request, before anything is queued. Each failure names the field.

use moe_model::generation_config::SamplingDefaults;
use moe_model::token_mask::TokenMask;
use moe_model::tokenizer::Tokenizer;
use moe_model::{LogitAdjustments, ModelConfig, SamplingParams};

use crate::structured::{PendingConstraint, TokenConstraint};
use std::time::{Duration, Instant};

use moe_proto::v1::GenerateRequest;

use crate::error::RouterError;

/// Limits that bound what one request may cost.
#[derive(Debug, Clone)]
pub struct RequestLimits {
    pub max_stop_strings: usize,
    pub max_stop_len: usize,
    /// Longest prompt, in tokens.
    pub max_prompt_tokens: usize,
    /// Longest prompt text (or chat messages, together), in bytes: checked before any
    /// tokenizer call (`--max-prompt-bytes`).
    pub max_prompt_bytes: usize,
    /// Admission to last token.
    pub request_timeout: Duration,
    /// `--scheduling-policy priority`: requests' `priority` orders the waiting queue.
    pub priority_scheduling: bool,
    /// `--generation-config`: sampling for the fields a request leaves unset.
    pub sampling_defaults: SamplingDefaults,
    /// No request generates more tokens (`generation_defaults.rs`): a larger
    /// `max_new_tokens` is cut to it, as vLLM's `override_max_tokens`.
    pub max_tokens_cap: Option<u32>,
}

impl Default for RequestLimits {
    fn default() -> Self {
        Self {
            max_stop_strings: 16,
            max_stop_len: 256,
            max_prompt_tokens: usize::MAX,
            max_prompt_bytes: usize::MAX,
            request_timeout: Duration::from_secs(600),
            priority_scheduling: false,
            sampling_defaults: SamplingDefaults::default(),
            max_tokens_cap: None,
        }
    }
}

/// A request that passed validation.
#[derive(Debug, Clone)]
pub struct ValidRequest {
    pub input_ids: Vec<u32>,
    /// Ids generated before this request was moved here (`resume`): fed after the prompt,
    /// counted as generated, not sent again.
    pub resumed_ids: Vec<u32>,
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    /// Ids that end the answer (vLLM's `stop_token_ids`), kept in it.
    pub stop_token_ids: Vec<u32>,
    /// vLLM's `include_stop_str_in_output`: the stop string, or the text of the end token,
    /// that ended the answer stays in its text.
    pub include_stop_text: bool,
    /// vLLM's `skip_special_tokens` (true unless the request says false).
    pub skip_special_tokens: bool,
    /// vLLM's `allowed_token_ids`, one flag per vocabulary row (`None`: every id).
    pub allowed_tokens: Option<Vec<bool>>,
    /// The same as bits, made once: what a device masks the row it keeps with.
    pub allowed_mask: Option<TokenMask>,
    /// vLLM's `bad_words`, as token sequences (tokenized at admission).
    pub bad_words: Vec<Vec<u32>>,
    pub ignore_eos: bool,
    pub logprobs: bool,
    /// Alternatives returned per token (0: none).
    pub top_logprobs: usize,
    /// Score the prompt too, with this many alternatives per token.
    pub prompt_logprobs: Option<usize>,
    /// The structured-output grammar's state (compiled at admission).
    pub constraint: Option<TokenConstraint>,
    /// A grammar waiting for its start text (`structured_output_after`): it becomes
    /// `constraint` once the answer has written it.
    pub pending_constraint: Option<PendingConstraint>,
    /// Choices of one request (`n`): how they share the prompt's prefill.
    pub sibling: Option<SiblingPrefill>,
    /// vLLM's `cache_salt`: prefix-cache blocks are shared only under the same salt.
    pub cache_salt: String,
    /// When it was accepted, and past when it ends with DEADLINE_EXCEEDED.
    pub received: Instant,
    pub deadline: Instant,
    /// Its place in the waiting queue: lower first (vLLM's `priority`; 0 unless
    /// `--scheduling-policy priority`).
    pub priority: i32,
}

/// Most `bad_words` a request may give, and their longest (each is matched at every token).
pub const MAX_BAD_WORDS: usize = 64;
pub const MAX_BAD_WORD_BYTES: usize = 256;
/// Longest `cache_salt` (a tenant id or a random secret fits).
pub const MAX_CACHE_SALT_BYTES: usize = 256;

fn check_bad_words(words: &[String]) -> Result<(), RouterError> {
    if words.len() > MAX_BAD_WORDS {
        return Err(RouterError::invalid(
            "bad_words",
            format!("bad_words: at most {MAX_BAD_WORDS} words"),
        ));
    }
    if words
        .iter()
        .any(|w| w.trim_start().is_empty() || w.len() > MAX_BAD_WORD_BYTES)
    {
        return Err(RouterError::invalid(
            "bad_words",
            format!(
                "bad_words: each word must be 1 to {MAX_BAD_WORD_BYTES} bytes, not only spaces"
            ),
        ));
    }
    Ok(())
}

/// `bad_words` as the token sequences vLLM bans: each word as written and after a space (the
/// latter only when the space makes a new first token and no more tokens).
pub fn bad_word_ids(
    words: &[String],
    encode: impl Fn(&str) -> Result<Vec<u32>, RouterError>,
) -> Result<Vec<Vec<u32>>, RouterError> {
    let mut sequences: Vec<Vec<u32>> = Vec::new();
    for word in words {
        let bare = encode(word.trim_start())?;
        let spaced = encode(&format!(" {}", word.trim_start()))?;
        if spaced.len() == bare.len() && spaced.first() != bare.first() {
            sequences.push(spaced);
        }
        sequences.push(bare);
    }
    sequences.retain(|ids| !ids.is_empty());
    sequences.sort();
    sequences.dedup();
    Ok(sequences)
}

impl ValidRequest {
    /// The ids `bad_words` bans as this answer's next token, after `output`.
    pub fn banned_next(&self, output: &[u32]) -> Vec<u32> {
        self.bad_words
            .iter()
            .filter_map(|word| {
                let (last, before) = word.split_last()?;
                output.ends_with(before).then_some(*last)
            })
            .collect()
    }
}

/// `allowed_token_ids` as flags over the vocabulary, each id checked.
fn allowed_tokens(ids: &[u32], vocab: usize) -> Result<Option<Vec<bool>>, RouterError> {
    if ids.is_empty() {
        return Ok(None);
    }
    let mut allowed = vec![false; vocab];
    for &id in ids {
        let Some(flag) = allowed.get_mut(id as usize) else {
            return Err(RouterError::invalid(
                "allowed_token_ids",
                format!("allowed_token_ids: token id {id} is out of range (vocab_size {vocab})"),
            ));
        };
        *flag = true;
    }
    Ok(Some(allowed))
}

impl ValidRequest {
    /// The ids that end this answer: the model's end-of-sequence ids (`eos`) unless it
    /// ignores them, and its own `stop_token_ids` (what `min_tokens` holds back).
    pub fn end_tokens(&self, eos: &[u32]) -> Vec<u32> {
        let eos = if self.ignore_eos { &[][..] } else { eos };
        eos.iter().chain(&self.stop_token_ids).copied().collect()
    }

    /// Whether `token` ends this answer.
    pub fn ends_at(&self, token: u32, eos: &[u32]) -> bool {
        (!self.ignore_eos && eos.contains(&token)) || self.stop_token_ids.contains(&token)
    }
}

pub use moe_openai::prompt_bytes::check_prompt_bytes;
pub use moe_openai::sibling::SiblingPrefill;

pub use moe_openai::prompt_logprobs::MAX_TOP_LOGPROBS;

/// Most `stop_token_ids` a request may give (each is checked at every token).
pub const MAX_STOP_TOKEN_IDS: usize = 64;

/// Every check of [`validate`], tokenization included: pure, so it can be fuzzed. The servers
/// run the same three parts with the tokenizer call on a blocking pool: [`check_prompt`],
/// `Tokenizer::encode_prompt`, [`validate_ids`].
pub fn validate(
    mut req: GenerateRequest,
    config: &ModelConfig,
    tokenizer: &Tokenizer,
    limits: &RequestLimits,
) -> Result<ValidRequest, RouterError> {
    check_prompt(&req, limits)?;
    let input_ids = match req.prompt.take() {
        Some(text) => tokenizer
            .encode_prompt(&text)
            .map_err(|e| RouterError::invalid("prompt", e.to_string()))?,
        None => std::mem::take(&mut req.input_ids),
    };
    validate_ids(req, input_ids, config, limits)
}

/// The default `--max-prompt-bytes`: `max_prompt_tokens` x (the longest token of the
/// vocabulary in bytes + 1), capped at `cap`. A token stands for at most its own text (the + 1
/// covers a decoder that drops a leading space, as sentencepiece's does), so text that fits
/// the token limit fits this one unless a normalizer removes characters.
pub fn default_max_prompt_bytes(
    tokenizer: &Tokenizer,
    max_prompt_tokens: usize,
    cap: usize,
) -> usize {
    let mut longest = 0;
    for id in 0..tokenizer.vocab_size() as u32 {
        if max_prompt_tokens.saturating_mul(longest + 1) >= cap {
            break;
        }
        longest = longest.max(tokenizer.token_text(id).len());
    }
    max_prompt_tokens.saturating_mul(longest + 1).min(cap)
}

/// The checks before tokenizing: exactly one of prompt and input_ids, a prompt neither empty
/// nor over `max_prompt_bytes`.
pub fn check_prompt(req: &GenerateRequest, limits: &RequestLimits) -> Result<(), RouterError> {
    match (&req.prompt, req.input_ids.is_empty()) {
        (Some(_), false) => Err(RouterError::unnamed(
            "give exactly one of prompt or input_ids, not both",
        )),
        (None, true) => Err(RouterError::unnamed(
            "give exactly one of prompt or input_ids",
        )),
        (Some(text), true) => {
            if text.is_empty() {
                return Err(RouterError::invalid("prompt", "prompt is empty"));
            }
            check_prompt_bytes(text.len(), limits.max_prompt_bytes, "prompt")
        }
        (None, false) => Ok(()),
    }
}

/// The checks after tokenizing: `input_ids` are the prompt's tokens (or the request's own ids);
/// `req.prompt` and `req.input_ids` are not looked at. Errors name as `param` only the fields
/// that the OpenAI API spells the same (a chat's prompt tokens come from `messages`, its
/// `max_new_tokens` from `max_tokens`).
pub fn validate_ids(
    mut req: GenerateRequest,
    input_ids: Vec<u32>,
    config: &ModelConfig,
    limits: &RequestLimits,
) -> Result<ValidRequest, RouterError> {
    // The checkpoint's recommended sampling where the request gives none, as vLLM's.
    let defaults = &limits.sampling_defaults;
    req.temperature = req.temperature.or(defaults.temperature);
    req.top_p = req.top_p.or(defaults.top_p);
    req.top_k = req.top_k.or(defaults.top_k);
    req.min_p = req.min_p.or(defaults.min_p);
    req.repetition_penalty = req.repetition_penalty.or(defaults.repetition_penalty);
    if let Some(cap) = limits.max_tokens_cap {
        req.max_new_tokens = req.max_new_tokens.min(cap);
    }
    // vLLM's left truncation, before any bound is checked.
    let mut input_ids = input_ids;
    if let Some(keep) = req.truncate_prompt_tokens.filter(|&k| k > 0) {
        let keep = (keep as usize).min(config.max_position_embeddings);
        if input_ids.len() > keep {
            input_ids.drain(..input_ids.len() - keep);
        }
    }
    if input_ids.len() > limits.max_prompt_tokens {
        return Err(RouterError::unnamed(format!(
            "prompt has {} tokens; the limit is {}",
            input_ids.len(),
            limits.max_prompt_tokens
        )));
    }
    if let Some(&id) = input_ids.iter().find(|&&t| t as usize >= config.vocab_size) {
        return Err(RouterError::unnamed(format!(
            "input_ids: token id {id} is out of range (vocab_size {})",
            config.vocab_size
        )));
    }
    let max_new = req.max_new_tokens as usize;
    let prompt_logprobs = req.prompt_logprobs;
    if prompt_logprobs.is_some_and(|k| k > MAX_TOP_LOGPROBS) {
        return Err(RouterError::unnamed(format!(
            "prompt_logprobs must be 0 to {MAX_TOP_LOGPROBS}"
        )));
    }
    if max_new == 0 && prompt_logprobs.is_none() {
        return Err(RouterError::unnamed(
            "max_new_tokens must be at least 1 (0 only to score the prompt: prompt_logprobs)",
        ));
    }
    // vLLM's words for it.
    let max_pos = config.max_position_embeddings;
    if input_ids.len() + max_new > max_pos {
        return Err(RouterError::unnamed(format!(
            "this model's maximum context length is {max_pos} tokens, but {} were asked for: {} in the prompt and {max_new} to generate",
            input_ids.len() + max_new,
            input_ids.len()
        )));
    }
    let resumed_ids = resumed_ids(&mut req, max_new, config.vocab_size)?;
    let temperature = req.temperature.unwrap_or(1.0);
    if !temperature.is_finite() || temperature < 0.0 {
        return Err(RouterError::invalid(
            "temperature",
            format!("temperature must be >= 0, got {temperature}"),
        ));
    }
    let top_p = req.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(RouterError::invalid(
            "top_p",
            format!("top_p must be in (0, 1], got {top_p}"),
        ));
    }
    let min_p = req.min_p.unwrap_or(0.0);
    if !(0.0..=1.0).contains(&min_p) {
        return Err(RouterError::invalid(
            "min_p",
            format!("min_p must be in [0, 1], got {min_p}"),
        ));
    }
    if req.stop.len() > limits.max_stop_strings {
        return Err(RouterError::invalid(
            "stop",
            format!("at most {} stop strings", limits.max_stop_strings),
        ));
    }
    if let Some(s) = req
        .stop
        .iter()
        .find(|s| s.is_empty() || s.len() > limits.max_stop_len)
    {
        return Err(RouterError::invalid(
            "stop",
            format!(
                "stop strings must be 1 to {} bytes, got {} bytes",
                limits.max_stop_len,
                s.len()
            ),
        ));
    }
    if req.stop_token_ids.len() > MAX_STOP_TOKEN_IDS {
        return Err(RouterError::invalid(
            "stop_token_ids",
            format!("stop_token_ids: at most {MAX_STOP_TOKEN_IDS} ids"),
        ));
    }
    if let Some(&id) = req
        .stop_token_ids
        .iter()
        .find(|&&t| t as usize >= config.vocab_size)
    {
        return Err(RouterError::invalid(
            "stop_token_ids",
            format!(
                "stop_token_ids: token id {id} is out of range (vocab_size {})",
                config.vocab_size
            ),
        ));
    }
    let allowed_tokens = allowed_tokens(&req.allowed_token_ids, config.vocab_size)?;
    check_bad_words(&req.bad_words)?;
    let top_logprobs = req.top_logprobs.unwrap_or(0);
    if top_logprobs > MAX_TOP_LOGPROBS {
        return Err(RouterError::unnamed(format!(
            "top_logprobs must be 0 to {MAX_TOP_LOGPROBS}, got {top_logprobs}"
        )));
    }
    let adjust = logit_adjustments(&req, config.vocab_size, max_new)?;
    if req.cache_salt.len() > MAX_CACHE_SALT_BYTES {
        return Err(RouterError::invalid(
            "cache_salt",
            format!("cache_salt must be at most {MAX_CACHE_SALT_BYTES} bytes"),
        ));
    }
    if req.priority != 0 && !limits.priority_scheduling {
        return Err(RouterError::invalid(
            "priority",
            format!(
                "priority {} needs priority scheduling: start the router with \
                 --scheduling-policy priority",
                req.priority
            ),
        ));
    }
    Ok(ValidRequest {
        input_ids,
        resumed_ids,
        max_new_tokens: max_new,
        sampling: SamplingParams {
            temperature,
            top_k: req.top_k.map(|k| k as usize).filter(|&k| k > 0),
            top_p,
            min_p,
            seed: req.seed,
            adjust,
        },
        stop: req.stop,
        stop_token_ids: req.stop_token_ids,
        include_stop_text: req.include_stop_str_in_output,
        skip_special_tokens: req.skip_special_tokens.unwrap_or(true),
        allowed_mask: allowed_tokens.as_deref().map(TokenMask::from_allowed),
        allowed_tokens,
        bad_words: Vec::new(),
        ignore_eos: req.ignore_eos,
        logprobs: req.logprobs || top_logprobs > 0,
        top_logprobs: top_logprobs as usize,
        prompt_logprobs: prompt_logprobs.map(|k| k as usize),
        constraint: None,
        pending_constraint: None,
        sibling: None,
        cache_salt: req.cache_salt,
        received: Instant::now(),
        deadline: Instant::now() + limits.request_timeout,
        priority: req.priority,
    })
}

/// The ids a resumed request (`resume`) generated before, checked: fewer than
/// `max_new_tokens`, in the vocabulary, and not with `prompt_logprobs` (the first router
/// sent those).
fn resumed_ids(
    req: &mut GenerateRequest,
    max_new: usize,
    vocab_size: usize,
) -> Result<Vec<u32>, RouterError> {
    let ids = req
        .resume
        .as_mut()
        .map(|r| std::mem::take(&mut r.generated_ids))
        .unwrap_or_default();
    if ids.is_empty() {
        return Ok(ids);
    }
    if ids.len() >= max_new {
        return Err(RouterError::unnamed(format!(
            "resume: {} generated ids leave nothing of max_new_tokens ({max_new})",
            ids.len()
        )));
    }
    if let Some(&id) = ids.iter().find(|&&t| t as usize >= vocab_size) {
        return Err(RouterError::unnamed(format!(
            "resume: token id {id} is out of range (vocab_size {vocab_size})"
        )));
    }
    if req.prompt_logprobs.is_some() {
        return Err(RouterError::unnamed(
            "resume: the prompt's logprobs went with the first part of the answer",
        ));
    }
    Ok(ids)
}

/// Most `logit_bias` entries a request may carry.
pub const MAX_LOGIT_BIAS: usize = 1024;

/// Bias, penalties and `min_tokens`, checked: ids in the vocabulary, values in OpenAI's (and
/// vLLM's) ranges.
fn logit_adjustments(
    req: &GenerateRequest,
    vocab_size: usize,
    max_new: usize,
) -> Result<LogitAdjustments, RouterError> {
    if req.logit_bias.len() > MAX_LOGIT_BIAS {
        return Err(RouterError::invalid(
            "logit_bias",
            format!("at most {MAX_LOGIT_BIAS} logit_bias entries"),
        ));
    }
    let mut logit_bias = Vec::with_capacity(req.logit_bias.len());
    for (&id, &bias) in &req.logit_bias {
        if id as usize >= vocab_size || !(-100.0..=100.0).contains(&bias) {
            return Err(RouterError::invalid(
                "logit_bias",
                format!(
                    "logit_bias maps token ids below {vocab_size} to -100..100, got {id}: {bias}"
                ),
            ));
        }
        logit_bias.push((id, bias));
    }
    logit_bias.sort_unstable_by_key(|b| b.0);
    let penalty = |value: Option<f32>, name: &'static str| match value {
        None => Ok(0.0),
        Some(p) if (-2.0..=2.0).contains(&p) => Ok(p),
        Some(p) => Err(RouterError::invalid(
            name,
            format!("{name} must be in -2..2, got {p}"),
        )),
    };
    let repetition_penalty = match req.repetition_penalty {
        None => 1.0,
        Some(r) if r > 0.0 && r <= 10.0 => r,
        Some(r) => {
            return Err(RouterError::invalid(
                "repetition_penalty",
                format!("repetition_penalty must be in (0, 10], got {r}"),
            ))
        }
    };
    let min_tokens = req.min_tokens as usize;
    if min_tokens > max_new {
        return Err(RouterError::invalid(
            "min_tokens",
            format!("min_tokens ({min_tokens}) is more than max_tokens ({max_new})"),
        ));
    }
    Ok(LogitAdjustments {
        logit_bias,
        presence_penalty: penalty(req.presence_penalty, "presence_penalty")?,
        frequency_penalty: penalty(req.frequency_penalty, "frequency_penalty")?,
        repetition_penalty,
        min_tokens,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> (ModelConfig, Tokenizer) {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/deepseek-v3-tiny");
        (
            ModelConfig::from_dir(&dir).expect("fixture config"),
            Tokenizer::from_dir(&dir).expect("fixture tokenizer"),
        )
    }

    fn request(stop: Vec<String>) -> GenerateRequest {
        GenerateRequest {
            input_ids: vec![0, 5, 7],
            max_new_tokens: 4,
            stop,
            ..Default::default()
        }
    }

    #[test]
    fn a_priority_needs_the_priority_policy() {
        let (config, tokenizer) = fixture();
        let urgent = GenerateRequest {
            priority: -3,
            ..request(vec![])
        };
        let fcfs = RequestLimits::default();
        match validate(urgent.clone(), &config, &tokenizer, &fcfs) {
            Err(RouterError::Invalid {
                param: Some("priority"),
                ..
            }) => {}
            other => panic!("{other:?}"),
        }
        let by_priority = RequestLimits {
            priority_scheduling: true,
            ..RequestLimits::default()
        };
        let valid = validate(urgent, &config, &tokenizer, &by_priority).unwrap();
        assert_eq!(valid.priority, -3);
        assert_eq!(
            validate(request(vec![]), &config, &tokenizer, &fcfs)
                .unwrap()
                .priority,
            0
        );
    }

    #[test]
    fn bias_and_penalties_are_checked_by_name_and_sorted() {
        let (config, tokenizer) = fixture();
        let limits = RequestLimits::default();
        let param = |req: GenerateRequest| match validate(req, &config, &tokenizer, &limits) {
            Err(RouterError::Invalid { param, .. }) => param,
            other => panic!("accepted: {other:?}"),
        };
        let with = |f: &dyn Fn(&mut GenerateRequest)| {
            let mut req = request(vec![]);
            f(&mut req);
            req
        };
        let vocab = config.vocab_size as u32;
        assert_eq!(
            param(with(&|r| {
                r.logit_bias.insert(vocab, 1.0);
            })),
            Some("logit_bias")
        );
        assert_eq!(
            param(with(&|r| {
                r.logit_bias.insert(3, 101.0);
            })),
            Some("logit_bias")
        );
        assert_eq!(
            param(with(&|r| r.frequency_penalty = Some(-2.5))),
            Some("frequency_penalty")
        );
        assert_eq!(
            param(with(&|r| r.repetition_penalty = Some(0.0))),
            Some("repetition_penalty")
        );
        assert_eq!(param(with(&|r| r.min_tokens = 5)), Some("min_tokens"));
        let ok = validate(
            with(&|r| {
                r.logit_bias.extend([(9, -1.0), (2, 4.0)]);
                r.presence_penalty = Some(2.0);
                r.min_tokens = 4;
            }),
            &config,
            &tokenizer,
            &limits,
        )
        .unwrap();
        assert_eq!(ok.sampling.adjust.logit_bias, vec![(2, 4.0), (9, -1.0)]);
        assert_eq!(ok.sampling.adjust.presence_penalty, 2.0);
        assert_eq!(ok.sampling.adjust.min_tokens, 4);
    }

    #[test]
    fn stop_string_limits_are_enforced_by_name() {
        let (config, tokenizer) = fixture();
        let limits = RequestLimits::default();
        let check =
            |stop: Vec<String>| validate(request(stop), &config, &tokenizer, &limits).map(|_| ());
        assert!(check(vec!["a".into(); 16]).is_ok());
        let err = check(vec!["a".into(); 17]).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(
            err.to_string().contains("at most 16 stop strings"),
            "{err:?}"
        );
        assert!(check(vec!["x".repeat(256)]).is_ok());
        let err = check(vec!["x".repeat(257)]).unwrap_err();
        assert!(
            err.to_string().contains("1 to 256 bytes, got 257"),
            "{err:?}"
        );
        let err = check(vec![String::new()]).unwrap_err();
        assert!(err.to_string().contains("got 0 bytes"), "{err:?}");
    }

    #[test]
    fn prompt_bytes_are_bounded_and_the_default_fits_the_token_limit() {
        let (config, tokenizer) = fixture();
        let limits = RequestLimits {
            max_prompt_bytes: 10,
            ..Default::default()
        };
        let prompt = |text: &str| GenerateRequest {
            prompt: Some(text.into()),
            max_new_tokens: 4,
            ..Default::default()
        };
        assert!(validate(prompt("0123456789"), &config, &tokenizer, &limits).is_ok());
        let err = validate(prompt("0123456789a"), &config, &tokenizer, &limits).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(
            err.to_string()
                .contains("prompt is 11 bytes; the limit is 10 bytes (--max-prompt-bytes)"),
            "{err:?}"
        );
        // The default: tokens x (longest token + 1), capped.
        let longest = (0..tokenizer.vocab_size() as u32)
            .map(|id| tokenizer.token_text(id).len())
            .max()
            .unwrap();
        assert_eq!(
            default_max_prompt_bytes(&tokenizer, 100, usize::MAX),
            100 * (longest + 1)
        );
        assert_eq!(
            default_max_prompt_bytes(&tokenizer, 1 << 30, 4 << 20),
            4 << 20
        );
        // Text at the token limit is under the byte limit: the longest tokens repeated.
        let text = (0..tokenizer.vocab_size() as u32)
            .map(|id| tokenizer.token_text(id))
            .max_by_key(|t| t.len())
            .unwrap()
            .repeat(50);
        let tokens = tokenizer.encode_prompt(&text).unwrap().len();
        assert!(text.len() <= default_max_prompt_bytes(&tokenizer, tokens, usize::MAX));
    }
}
