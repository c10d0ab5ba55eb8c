//! What a request asks to change in the logits before a token is picked (OpenAI's and vLLM's
//! `logit_bias`, `presence_penalty`, `frequency_penalty`, `repetition_penalty`, `min_tokens`),
//! and the token counts they need. Everything depends only on the request's own prompt and
//! output, so a request's tokens stay independent of its batch-mates.
//!
//! Order, as vLLM applies them: `min_tokens` hides the end tokens, then `logit_bias`, then the
//! repetition penalty (prompt and output tokens, HF's rule: a positive logit divided by it, a
//! negative one multiplied), then frequency and presence penalties (output tokens only, as
//! OpenAI defines them). Logprobs stay those of the model's own logits (vLLM's default).

use std::collections::HashMap;

/// A request's adjustments; the default changes nothing.
#[derive(Debug, Clone, PartialEq)]
pub struct LogitAdjustments {
    /// `(token id, bias)`, sorted by id, ids distinct.
    pub logit_bias: Vec<(u32, f32)>,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// 1.0: off.
    pub repetition_penalty: f32,
    /// End tokens are hidden until this many tokens were generated.
    pub min_tokens: usize,
}

impl Default for LogitAdjustments {
    fn default() -> Self {
        Self {
            logit_bias: Vec::new(),
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            min_tokens: 0,
        }
    }
}

impl LogitAdjustments {
    /// Whether the logits are used as the model computed them (no copy is made then).
    pub fn is_neutral(&self) -> bool {
        self.logit_bias.is_empty()
            && self.presence_penalty == 0.0
            && self.frequency_penalty == 0.0
            && self.repetition_penalty == 1.0
            && self.min_tokens == 0
    }

    fn penalises(&self) -> bool {
        self.presence_penalty != 0.0 || self.frequency_penalty != 0.0
    }
}

/// The tokens a sequence has seen, for the penalties.
#[derive(Debug, Clone, Default)]
pub struct TokenHistory {
    /// Distinct prompt tokens, sorted (the repetition penalty counts them).
    prompt: Vec<u32>,
    /// How often each token was generated.
    generated: HashMap<u32, u32>,
    generated_len: usize,
}

impl TokenHistory {
    pub fn new(prompt: &[u32]) -> Self {
        let mut prompt = prompt.to_vec();
        prompt.sort_unstable();
        prompt.dedup();
        Self {
            prompt,
            ..Self::default()
        }
    }

    pub fn record(&mut self, token: u32) {
        *self.generated.entry(token).or_insert(0) += 1;
        self.generated_len += 1;
    }

    pub fn generated_len(&self) -> usize {
        self.generated_len
    }
}

/// `logits` as `adjust` changes them after `history`; `end_tokens` are what `min_tokens`
/// holds back. Ids beyond the vocabulary are skipped (validated before, never trusted here).
pub fn adjusted(
    logits: &[f32],
    adjust: &LogitAdjustments,
    history: &TokenHistory,
    end_tokens: &[u32],
) -> Vec<f32> {
    let mut out = logits.to_vec();
    let mut at = |id: u32, f: &dyn Fn(f32) -> f32| {
        if let Some(x) = out.get_mut(id as usize) {
            *x = f(*x);
        }
    };
    if history.generated_len < adjust.min_tokens {
        for &id in end_tokens {
            at(id, &|_| f32::NEG_INFINITY);
        }
    }
    for &(id, bias) in &adjust.logit_bias {
        at(id, &|x| x + bias);
    }
    let r = adjust.repetition_penalty;
    if r != 1.0 {
        let repeat = |x: f32| if x > 0.0 { x / r } else { x * r };
        for &id in &history.prompt {
            at(id, &repeat);
        }
        for &id in history.generated.keys() {
            if history.prompt.binary_search(&id).is_err() {
                at(id, &repeat);
            }
        }
    }
    if adjust.penalises() {
        for (&id, &count) in &history.generated {
            let penalty = adjust.frequency_penalty * count as f32 + adjust.presence_penalty;
            at(id, &|x| x - penalty);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn neutral_adjustments_change_nothing() {
        let logits = [1.0, -2.0, 0.5];
        let history = TokenHistory::new(&[0, 1]);
        let adjust = LogitAdjustments::default();
        assert!(adjust.is_neutral());
        assert_eq!(adjusted(&logits, &adjust, &history, &[2]), logits);
    }

    #[test]
    fn each_adjustment_follows_its_definition() {
        let logits = [1.0, -2.0, 0.5, 3.0];
        let mut history = TokenHistory::new(&[0, 0, 1]);
        history.record(3);
        history.record(3);
        history.record(1);
        let bias = LogitAdjustments {
            logit_bias: vec![(2, 5.0), (9, 1.0)],
            ..Default::default()
        };
        assert_eq!(
            adjusted(&logits, &bias, &history, &[]),
            [1.0, -2.0, 5.5, 3.0]
        );
        let repetition = LogitAdjustments {
            repetition_penalty: 2.0,
            ..Default::default()
        };
        // Prompt tokens 0 and 1, generated 3 and 1: each penalised once.
        assert_eq!(
            adjusted(&logits, &repetition, &history, &[]),
            [0.5, -4.0, 0.5, 1.5]
        );
        let penalties = LogitAdjustments {
            presence_penalty: 0.5,
            frequency_penalty: 0.25,
            ..Default::default()
        };
        // Generated only: 3 twice (0.5 + 0.5), 1 once (0.5 + 0.25).
        assert_eq!(
            adjusted(&logits, &penalties, &history, &[]),
            [1.0, -2.75, 0.5, 2.0]
        );
    }

    #[test]
    fn min_tokens_hides_the_end_tokens_until_reached() {
        let logits = [1.0, 9.0, 0.5];
        let adjust = LogitAdjustments {
            min_tokens: 2,
            ..Default::default()
        };
        let mut history = TokenHistory::new(&[]);
        history.record(0);
        assert_eq!(
            adjusted(&logits, &adjust, &history, &[1])[1],
            f32::NEG_INFINITY
        );
        history.record(2);
        assert_eq!(adjusted(&logits, &adjust, &history, &[1])[1], 9.0);
    }
}
