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

/// What the adjustments do to one token's logit, in their order: hidden (`min_tokens`), then
/// biased, then the repetition penalty, then the frequency and presence penalties. Each
/// adjustment touches a token at most once, so a token's result depends on its own logit only:
/// a device can apply the edits of a row in parallel and get what [`adjusted`] gets.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenEdit {
    pub id: u32,
    /// `min_tokens` holds it back: its logit becomes -inf before anything else.
    pub hide: bool,
    /// Added (`logit_bias`).
    pub bias: Option<f32>,
    /// Divided by the repetition penalty when positive, multiplied by it otherwise.
    pub repeat: bool,
    /// Subtracted: `frequency_penalty * count + presence_penalty`, computed once in f32.
    pub penalty: Option<f32>,
}

impl TokenEdit {
    /// Bits of [`Self::flags`], as the device's `edit_logit_rows` kernel reads them.
    pub const HIDE: u32 = 1;
    pub const BIAS: u32 = 2;
    pub const REPEAT: u32 = 4;
    pub const PENALTY: u32 = 8;

    fn at(id: u32) -> Self {
        Self {
            id,
            hide: false,
            bias: None,
            repeat: false,
            penalty: None,
        }
    }

    fn repeated(id: u32) -> Self {
        Self {
            repeat: true,
            ..Self::at(id)
        }
    }

    /// `x` edited, each step one f32 operation rounded once (the kernel spells the same).
    pub fn apply(&self, x: f32, repetition: f32) -> f32 {
        let mut x = if self.hide { f32::NEG_INFINITY } else { x };
        if let Some(bias) = self.bias {
            x += bias;
        }
        if self.repeat {
            x = if x > 0.0 {
                x / repetition
            } else {
                x * repetition
            };
        }
        if let Some(penalty) = self.penalty {
            x -= penalty;
        }
        x
    }

    /// Which steps apply ([`Self::HIDE`] ...).
    pub fn flags(&self) -> u32 {
        (self.hide as u32 * Self::HIDE)
            | (self.bias.is_some() as u32 * Self::BIAS)
            | (self.repeat as u32 * Self::REPEAT)
            | (self.penalty.is_some() as u32 * Self::PENALTY)
    }
}

/// A request's adjustments for its next pick, token by token: what a device applies to the
/// logit row it keeps, so that only the picked id comes back.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LogitEdits {
    /// The repetition penalty ([`TokenEdit::repeat`]).
    pub repetition: f32,
    /// Sorted by id, ids distinct.
    pub tokens: Vec<TokenEdit>,
}

impl LogitEdits {
    /// The edits `adjust` makes after `history`; `end_tokens` are what `min_tokens` holds back.
    /// Linear in the prompt's distinct tokens (kept sorted), which a long prompt makes the
    /// most: the other adjustments' tokens are merged into them.
    pub fn of(adjust: &LogitAdjustments, history: &TokenHistory, end_tokens: &[u32]) -> Self {
        type Edits = std::collections::BTreeMap<u32, TokenEdit>;
        fn edit(tokens: &mut Edits, id: u32) -> &mut TokenEdit {
            tokens.entry(id).or_insert_with(|| TokenEdit::at(id))
        }
        let repeat = adjust.repetition_penalty != 1.0;
        // Everything but the prompt's repetition edits: end tokens, biases, generated tokens.
        let mut others = Edits::new();
        if history.generated_len < adjust.min_tokens {
            for &id in end_tokens {
                edit(&mut others, id).hide = true;
            }
        }
        for &(id, bias) in &adjust.logit_bias {
            edit(&mut others, id).bias = Some(bias);
        }
        for (&id, &count) in &history.generated {
            if repeat {
                edit(&mut others, id).repeat = true;
            }
            if adjust.penalises() {
                let penalty = adjust.frequency_penalty * count as f32 + adjust.presence_penalty;
                edit(&mut others, id).penalty = Some(penalty);
            }
        }
        let prompt: &[u32] = if repeat { &history.prompt } else { &[] };
        let mut tokens = Vec::with_capacity(others.len() + prompt.len());
        let mut prompt = prompt.iter().copied().peekable();
        for (id, mut edit) in others {
            while let Some(p) = prompt.next_if(|&p| p < id) {
                tokens.push(TokenEdit::repeated(p));
            }
            if prompt.next_if_eq(&id).is_some() {
                edit.repeat = true;
            }
            tokens.push(edit);
        }
        tokens.extend(prompt.map(TokenEdit::repeated));
        Self {
            repetition: adjust.repetition_penalty,
            tokens,
        }
    }

    /// At most how many logits [`Self::of`] would edit, found without building the edits
    /// (a caller that would not send more than some number of them asks this first).
    pub fn bound(adjust: &LogitAdjustments, history: &TokenHistory, end_tokens: usize) -> usize {
        let hidden = if history.generated_len < adjust.min_tokens {
            end_tokens
        } else {
            0
        };
        let prompt = if adjust.repetition_penalty != 1.0 {
            history.prompt.len()
        } else {
            0
        };
        hidden + adjust.logit_bias.len() + prompt + history.generated.len()
    }

    /// How many logits the edits change.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Applies the edits to `row`; ids beyond it are skipped (validated before, never trusted
    /// here).
    pub fn apply(&self, row: &mut [f32]) {
        for edit in &self.tokens {
            if let Some(x) = row.get_mut(edit.id as usize) {
                *x = edit.apply(*x, self.repetition);
            }
        }
    }
}

/// The edits of one logit row of a step (the row of the sequence they belong to).
#[derive(Debug, Clone, Copy)]
pub struct RowEdits<'a> {
    pub row: u32,
    pub edits: &'a LogitEdits,
}

/// Row edits as the device kernel takes them, one entry per edited logit whose id lies below
/// `width`: `(row, id, flags)` and `(bias, penalty, repetition)` (zeros where a flag is off).
pub fn flatten_row_edits(rows: &[RowEdits<'_>], width: usize) -> (Vec<u32>, Vec<f32>) {
    let mut index = Vec::new();
    let mut values = Vec::new();
    for r in rows {
        for edit in r.edits.tokens.iter().filter(|e| (e.id as usize) < width) {
            index.extend([r.row, edit.id, edit.flags()]);
            values.extend([
                edit.bias.unwrap_or(0.0),
                edit.penalty.unwrap_or(0.0),
                r.edits.repetition,
            ]);
        }
    }
    (index, values)
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
    LogitEdits::of(adjust, history, end_tokens).apply(&mut out);
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

    /// The adjustments as they were first written, one pass over the row per adjustment: what
    /// the token-by-token edits must reproduce bit for bit.
    fn phase_by_phase(
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

    /// Random adjustments over random histories (tokens in several adjustments at once, ids
    /// past the row, repeated end tokens, logits of both signs, zeros of both signs, -inf):
    /// the edits give the pass-by-pass result bit for bit, and their flattened form names
    /// every edit below the width once.
    #[test]
    fn token_edits_give_the_pass_by_pass_result() {
        let mut rng = crate::sampling::Rng::seeded(11);
        let mut below = |n: u64| (rng.next_u64() % n) as u32;
        for case in 0..300 {
            let width = 1 + below(40) as usize;
            let logits: Vec<f32> = (0..width)
                .map(|_| match below(10) {
                    0 => 0.0,
                    1 => -0.0,
                    2 => f32::NEG_INFINITY,
                    _ => (below(2000) as f32 - 1000.0) / 97.0,
                })
                .collect();
            let prompt: Vec<u32> = (0..below(12)).map(|_| below(48)).collect();
            let mut history = TokenHistory::new(&prompt);
            for _ in 0..below(12) {
                history.record(below(48));
            }
            let mut bias: Vec<(u32, f32)> = (0..below(6))
                .map(|_| (below(48), (below(400) as f32 - 200.0) / 13.0))
                .collect();
            bias.sort_by_key(|b| b.0);
            bias.dedup_by_key(|b| b.0);
            let pick = |on: bool, v: f32| if on { v } else { 0.0 };
            let adjust = LogitAdjustments {
                logit_bias: bias,
                presence_penalty: pick(case % 3 == 0, 0.3),
                frequency_penalty: pick(case % 4 == 0, -0.7),
                repetition_penalty: if case % 2 == 0 { 1.3 } else { 1.0 },
                min_tokens: below(16) as usize,
            };
            let end_tokens: Vec<u32> = (0..below(3)).map(|_| below(48)).collect();
            let want = phase_by_phase(&logits, &adjust, &history, &end_tokens);
            let edits = LogitEdits::of(&adjust, &history, &end_tokens);
            let mut got = logits.clone();
            edits.apply(&mut got);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "case {case}");
            assert!(edits.tokens.windows(2).all(|p| p[0].id < p[1].id));
            let bound = LogitEdits::bound(&adjust, &history, end_tokens.len());
            assert!(
                edits.len() <= bound,
                "case {case}: {} > {bound}",
                edits.len()
            );

            let rows = [RowEdits {
                row: 3,
                edits: &edits,
            }];
            let (index, values) = flatten_row_edits(&rows, width);
            let inside = edits.tokens.iter().filter(|e| (e.id as usize) < width);
            assert_eq!(index.len(), 3 * inside.clone().count());
            assert_eq!(values.len(), index.len());
            for (edit, (ix, v)) in inside.zip(index.chunks(3).zip(values.chunks(3))) {
                assert_eq!(ix, [3, edit.id, edit.flags()]);
                assert_eq!(v[2], edits.repetition);
            }
        }
    }
}
