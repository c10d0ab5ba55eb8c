//! Token sampling: greedy, temperature, top-k and top-p, the logit adjustments
//! (`logit_adjust.rs`) first. Draws are counter-based: the k-th token of a request draws a
//! number that depends only on (seed, k), so a request with a seed is reproducible, and one
//! resumed at token k (on another router, after the first died) draws exactly what the
//! uninterrupted run would have. A draw at a temperature without top-k is a race (`race.rs`,
//! among a top-p nucleus `nucleus.rs` finds: no sort of the vocabulary, and the same on a
//! GPU); top-k draws walk the ranked distribution of their k tokens. (Seeded outputs changed
//! twice: when draws became counter-based, and when draws without top-k became races,
//! 2026-12-05.)

use crate::backend::ops;
use crate::counter_hash::mix64;
use crate::error::{ModelError, Result};
use crate::logit_adjust::{adjusted, LogitAdjustments, LogitEdits, TokenHistory};
use crate::race::{self, Race};

/// How to pick the next token. `temperature == 0` means greedy.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    /// Keep only the k most likely tokens (`None` or 0: all).
    pub top_k: Option<usize>,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1.0: all).
    pub top_p: f32,
    /// Keep only tokens at least this fraction as likely as the likeliest (vLLM's and
    /// llama.cpp's `min_p`, applied before top-p as vLLM does; 0: all).
    pub min_p: f32,
    pub seed: Option<u64>,
    /// Bias, penalties and `min_tokens`, applied before any of the above.
    pub adjust: LogitAdjustments,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: None,
            top_p: 1.0,
            min_p: 0.0,
            seed: None,
            adjust: LogitAdjustments::default(),
        }
    }
}

impl SamplingParams {
    pub fn validate(&self) -> Result<()> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(ModelError::InvalidRequest(format!(
                "temperature must be a finite number >= 0, got {}",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(ModelError::InvalidRequest(format!(
                "top_p must be in (0, 1], got {}",
                self.top_p
            )));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(ModelError::InvalidRequest(format!(
                "min_p must be in [0, 1], got {}",
                self.min_p
            )));
        }
        let a = &self.adjust;
        let finite = [
            a.presence_penalty,
            a.frequency_penalty,
            a.repetition_penalty,
        ]
        .into_iter()
        .chain(a.logit_bias.iter().map(|b| b.1))
        .all(f32::is_finite);
        if !finite || a.repetition_penalty <= 0.0 {
            return Err(ModelError::InvalidRequest(
                "penalties and logit biases must be finite, repetition_penalty > 0".into(),
            ));
        }
        Ok(())
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0 || self.top_k == Some(1)
    }
}

/// xoshiro256** seeded through splitmix64: small, fast, and the same on every platform.
#[derive(Debug, Clone)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    pub fn seeded(seed: u64) -> Self {
        let mut x = seed;
        let mut next = || {
            x = x.wrapping_add(0x9e3779b97f4a7c15);
            mix64(x)
        };
        Self {
            s: [next(), next(), next(), next()],
        }
    }

    pub fn from_entropy() -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        Self::seeded(nanos ^ (std::process::id() as u64).rotate_left(32))
    }

    pub fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The uniform number in [0, 1) that draw `counter` of a request keyed `key` uses.
pub fn counter_uniform(key: u64, counter: u64) -> f64 {
    Rng::seeded(key.wrapping_add(counter.wrapping_mul(0xd1b5_4a32_d192_ed03))).next_f64()
}

/// Per-request sampler state.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    /// The request's seed (or one from entropy): the draws' key.
    key: u64,
    /// Tokens picked so far: the next draw's counter.
    position: u64,
    /// The prompt and the tokens picked so far (kept only when an adjustment reads them).
    history: TokenHistory,
    /// What `min_tokens` holds back: the end-of-sequence ids, unless the request ignores them.
    end_tokens: Vec<u32>,
}

impl Sampler {
    /// A sampler without a prompt or end tokens (enough when no adjustment is asked for).
    pub fn new(params: SamplingParams) -> Self {
        Self::for_request(params, &[], &[])
    }

    /// A sampler for a request with this prompt, whose generation ends at `end_tokens`.
    pub fn for_request(params: SamplingParams, prompt: &[u32], end_tokens: &[u32]) -> Self {
        let key = params
            .seed
            .unwrap_or_else(|| Rng::from_entropy().next_u64());
        let history = if params.adjust.is_neutral() {
            TokenHistory::default()
        } else {
            TokenHistory::new(prompt)
        };
        Self {
            params,
            key,
            position: 0,
            history,
            end_tokens: end_tokens.to_vec(),
        }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Tokens picked so far.
    pub fn position(&self) -> u64 {
        self.position
    }

    /// This sampler as it is after `generated` (ids already picked, by this request before it
    /// was moved): its next draw is the one the uninterrupted run's next draw was, and the
    /// adjustments see those ids.
    pub fn resumed_after(mut self, generated: &[u32]) -> Self {
        self.position = generated.len() as u64;
        if !self.params.adjust.is_neutral() {
            for &t in generated {
                self.history.record(t);
            }
        }
        self
    }

    /// Picks a token from the model's logits (adjusted first when the request asks).
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.params.adjust.is_neutral() {
            return self.pick(logits);
        }
        let logits = adjusted(logits, &self.params.adjust, &self.history, &self.end_tokens);
        let token = self.pick(&logits);
        self.history.record(token);
        token
    }

    /// A greedy pick made elsewhere (the argmax a GPU dense part found on the device, where
    /// [`Self::sample`] would have taken the same argmax of the same logits, edited by
    /// [`Self::logit_edits`] first): counted as this sampler's next draw, so a later draw, the
    /// penalties and a resumed sampler stay where they would be.
    pub fn take_argmax(&mut self, id: u32) -> u32 {
        debug_assert!(self.params.is_greedy());
        self.take(id)
    }

    /// Counts `id`, picked elsewhere, as this sampler's next draw.
    fn take(&mut self, id: u32) -> u32 {
        self.position += 1;
        if !self.params.adjust.is_neutral() {
            self.history.record(id);
        }
        id
    }

    /// What this request's adjustments do to the logits of its next pick, token by token
    /// (`None` when it asks for none): a device that applies them to the row it keeps picks
    /// what [`Self::sample`] picks from the whole row.
    pub fn logit_edits(&self) -> Option<LogitEdits> {
        self.logit_edits_at_most(usize::MAX)
    }

    /// [`Self::logit_edits`] when they could be more than `max` is `None`, without building
    /// them (a repetition penalty over a long prompt edits as many logits as it has tokens).
    pub fn logit_edits_at_most(&self, max: usize) -> Option<LogitEdits> {
        let adjust = &self.params.adjust;
        let bound = LogitEdits::bound(adjust, &self.history, self.end_tokens.len());
        (!adjust.is_neutral() && bound <= max)
            .then(|| LogitEdits::of(adjust, &self.history, &self.end_tokens))
    }

    /// As [`Self::sample`], over the tokens `allowed` flags only (a grammar's mask; ids past
    /// its end are not allowed). At least one token must be allowed.
    pub fn sample_allowed(&mut self, logits: &[f32], allowed: &[bool]) -> u32 {
        let masked: Vec<f32> = logits
            .iter()
            .enumerate()
            .map(|(i, &x)| {
                if allowed.get(i).copied().unwrap_or(false) {
                    x
                } else {
                    f32::NEG_INFINITY
                }
            })
            .collect();
        self.sample(&masked)
    }

    fn pick(&mut self, logits: &[f32]) -> u32 {
        if self.params.is_greedy() {
            self.position += 1;
            return ops::argmax(logits) as u32;
        }
        if let Some(race) = self.next_race() {
            self.position += 1;
            return race.draw(logits);
        }
        let probs = self.filtered_probs(logits);
        self.draw(&probs)
    }

    /// The race ([`crate::race`]) this sampler's next draw runs: a draw at a temperature
    /// without top-k (with or without min-p and top-p), which reads the whole row but needs no
    /// ranking of it. `None` for greedy and top-k draws.
    pub fn next_race(&self) -> Option<Race> {
        let p = &self.params;
        let whole_row = p.top_k.filter(|&k| k > 0).is_none();
        (!p.is_greedy() && whole_row).then(|| Race {
            temperature: p.temperature,
            top_p: p.top_p.min(1.0),
            min_p: p.min_p,
            key: race::race_key(self.key, self.position),
        })
    }

    /// A race run elsewhere (on the device, from [`Self::next_race`] over the same logits,
    /// edited by [`Self::logit_edits`] first, as [`Self::sample`] would have run it): counted
    /// as this sampler's next draw.
    pub fn take_draw(&mut self, id: u32) -> u32 {
        debug_assert!(self.next_race().is_some());
        self.take(id)
    }

    /// The next draw over `probs` (as [`Self::filtered_probs`] gives them).
    fn draw(&mut self, probs: &[(usize, f64)]) -> u32 {
        let counter = self.position;
        self.position += 1;
        let u = counter_uniform(self.key, counter);
        let mut cumulative = 0.0f64;
        for &(id, p) in probs {
            cumulative += p;
            if u < cumulative {
                return id as u32;
            }
        }
        probs.last().map(|&(id, _)| id as u32).unwrap_or(0)
    }

    /// The `k` of a top-k draw that reads only the `k` best-ranked logits ([`ranked_top_k`],
    /// of the logits as [`Self::logit_edits`] edits them), so a device can send those instead
    /// of the vocabulary: a sampler at a temperature with `top_k` in `1..=max`.
    pub fn ranked_draw_k(&self, max: usize) -> Option<usize> {
        let p = &self.params;
        let k = p.top_k.filter(|&k| k > 0 && k <= max)?;
        (!p.is_greedy()).then_some(k)
    }

    /// [`Self::sample`] from only the best-ranked logits, `ranked_top_k(edited, k)` for this
    /// sampler's `top_k` (see [`Self::ranked_draw_k`]): the same token, bit for bit, since a
    /// top-k draw reads nothing else.
    pub fn sample_ranked(&mut self, ranked: &[(u32, f32)]) -> u32 {
        debug_assert!(self.ranked_draw_k(usize::MAX).is_some());
        let probs = self.probs_of_ranked(ranked);
        let token = self.draw(&probs);
        if !self.params.adjust.is_neutral() {
            self.history.record(token);
        }
        token
    }

    /// The distribution actually sampled from: temperature, then top-k, then min-p, then
    /// top-p, then renormalised; sorted by probability, most likely first.
    pub fn filtered_probs(&self, logits: &[f32]) -> Vec<(usize, f64)> {
        let p = &self.params;
        let k = p.top_k.filter(|&k| k > 0).unwrap_or(logits.len());
        if p.min_p > 0.0 && k >= logits.len() {
            // Only the tokens min-p keeps are ranked, not the vocabulary.
            let lowest = crate::race::min_p_floor(logits, p.temperature, p.min_p);
            let mut kept: Vec<(u32, f32)> = logits
                .iter()
                .enumerate()
                .filter(|&(_, &x)| lowest.is_some_and(|lowest| x >= lowest))
                .map(|(i, &x)| (i as u32, x))
                .collect();
            kept.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            return self.probs_of_ranked(&kept);
        }
        self.probs_of_ranked(&ranked_top_k(logits, k))
    }

    /// [`Self::filtered_probs`] after the ranking and the top-k cut.
    fn probs_of_ranked(&self, ranked: &[(u32, f32)]) -> Vec<(usize, f64)> {
        let t = self.params.temperature as f64;
        let Some(&(_, best)) = ranked.first() else {
            return Vec::new();
        };
        let max = best as f64;
        let mut probs: Vec<(usize, f64)> = ranked
            .iter()
            .map(|&(i, logit)| (i as usize, ((logit as f64 - max) / t).exp()))
            .collect();
        // min-p keeps the tokens whose weight (over the likeliest's) reaches `min_p`, by the
        // race's rule (`race::min_p_cut`): a prefix of the ranking.
        if self.params.min_p > 0.0 {
            let cut = crate::race::min_p_cut(best, self.params.temperature, self.params.min_p);
            let keep = ranked
                .iter()
                .take_while(|&&(_, logit)| logit as f64 >= cut)
                .count()
                .max(1);
            probs.truncate(keep);
        }
        let total: f64 = probs.iter().map(|p| p.1).sum();
        for p in probs.iter_mut() {
            p.1 /= total;
        }
        if self.params.top_p < 1.0 {
            let mut cumulative = 0.0;
            let mut keep = probs.len();
            for (i, p) in probs.iter().enumerate() {
                cumulative += p.1;
                if cumulative >= self.params.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
            let total: f64 = probs.iter().map(|p| p.1).sum();
            for p in probs.iter_mut() {
                p.1 /= total;
            }
        }
        probs
    }
}

/// The `k` largest logits and their ids, ranked as the sampler ranks them: by f32's total
/// order, largest first, the lower id first on a tie.
pub fn ranked_top_k(logits: &[f32], k: usize) -> Vec<(u32, f32)> {
    let ranks = |&a: &usize, &b: &usize| logits[b].total_cmp(&logits[a]).then(a.cmp(&b));
    let mut order: Vec<usize> = (0..logits.len()).collect();
    // A strict total order: the k first are the same set whatever the selection, then sorted.
    if k < order.len() {
        order.select_nth_unstable_by(k, ranks);
        order.truncate(k);
    }
    order.sort_unstable_by(ranks);
    order.into_iter().map(|i| (i as u32, logits[i])).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_k: Option<usize>, top_p: f32, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature,
            top_k,
            top_p,
            seed: Some(seed),
            ..Default::default()
        }
    }

    const LOGITS: [f32; 6] = [2.0, 1.0, 0.5, 0.0, -1.0, 1.5];

    /// min-p keeps the tokens at least `min_p` as likely as the likeliest (before top-p, as
    /// vLLM orders them); without top-k such a draw is a race among them.
    #[test]
    fn min_p_keeps_tokens_near_the_likeliest() {
        // At temperature 1, ids 0 (2.0) and 5 (1.5) are within ln 2 of the best; 1 (1.0) is not.
        let mut p = params(1.0, None, 1.0, 9);
        p.min_p = 0.5;
        let mut sampler = Sampler::new(p.clone());
        assert_eq!(sampler.next_race().map(|r| r.min_p), Some(0.5));
        let kept: Vec<usize> = sampler
            .filtered_probs(&LOGITS)
            .iter()
            .map(|x| x.0)
            .collect();
        assert_eq!(kept, [0, 5]);
        let draws: std::collections::BTreeSet<u32> =
            (0..200).map(|_| sampler.sample(&LOGITS)).collect();
        assert_eq!(draws.into_iter().collect::<Vec<_>>(), [0, 5]);
        // min-p first: top-p then reaches 0.6 of what is left with the best alone.
        p.top_p = 0.6;
        assert_eq!(Sampler::new(p.clone()).filtered_probs(&LOGITS), [(0, 1.0)]);
        // 1.0 keeps the best alone (ties too); with top-k the ranked draw applies it as well.
        p.min_p = 1.0;
        p.top_p = 1.0;
        p.top_k = Some(3);
        let mut ranked = Sampler::new(p.clone());
        assert_eq!(ranked.sample_ranked(&ranked_top_k(&LOGITS, 3)), 0);
        p.min_p = 1.5;
        assert!(p.validate().is_err());
        // Ranking only the tokens near the best gives the distribution of ranking them all.
        let mut rng = Rng::seeded(5);
        for min_p in [1e-6, 0.01, 0.3, 0.9, 1.0] {
            for temperature in [0.05, 0.7, 1.0, 3.0] {
                let logits: Vec<f32> = (0..4000)
                    .map(|_| (rng.next_f64() * 20.0 - 10.0) as f32)
                    .collect();
                let mut p = params(temperature, None, 0.95, 1);
                p.min_p = min_p;
                let sampler = Sampler::new(p);
                let all = sampler.probs_of_ranked(&ranked_top_k(&logits, logits.len()));
                assert_eq!(
                    sampler.filtered_probs(&logits),
                    all,
                    "min_p {min_p} T {temperature}"
                );
            }
        }
    }

    /// A min-p race (with top-p after it) draws the tokens `filtered_probs` keeps, each in
    /// proportion to its probability there (a chi-square test over 40,000 draws).
    #[test]
    fn a_min_p_race_draws_what_min_p_then_top_p_keep() {
        let logits = crate::test_support::DRAW_LOGITS;
        for (min_p, top_p) in [(0.3f32, 1.0f32), (0.05, 0.9)] {
            let mut p = params(0.8, None, top_p, 21);
            p.min_p = min_p;
            let mut sampler = Sampler::new(p);
            let probs = sampler.filtered_probs(&logits);
            assert!(probs.len() >= 2, "{probs:?}");
            let n = 40_000;
            let mut counts = vec![0usize; logits.len()];
            for _ in 0..n {
                counts[sampler.sample(&logits) as usize] += 1;
            }
            let mut chi2 = 0.0;
            for (id, &c) in counts.iter().enumerate() {
                match probs.iter().find(|p| p.0 == id) {
                    Some(&(_, prob)) => {
                        let expected = n as f64 * prob;
                        chi2 += (c as f64 - expected).powi(2) / expected;
                    }
                    None => assert_eq!(c, 0, "token {id} is cut (min_p {min_p})"),
                }
            }
            // At most 7 degrees of freedom: p = 0.001 at 24.3.
            assert!(
                chi2 < 24.3,
                "chi2 {chi2}, counts {counts:?}, probs {probs:?}"
            );
        }
    }

    #[test]
    fn seeded_sampling_is_reproducible() {
        let draw = |seed| {
            let mut s = Sampler::new(params(1.0, None, 1.0, seed));
            (0..64).map(|_| s.sample(&LOGITS)).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
    }

    /// A sampler resumed after the first k tokens (a stream moved to another router) picks the
    /// rest exactly as the uninterrupted one, penalties included.
    #[test]
    fn a_resumed_sampler_continues_the_uninterrupted_draws() {
        let mut p = params(0.9, None, 0.95, 42);
        p.adjust.frequency_penalty = 0.4;
        p.adjust.presence_penalty = 0.2;
        let prompt = [3u32, 1, 1];
        let logits = |k: usize| -> Vec<f32> {
            (0..LOGITS.len())
                .map(|i| LOGITS[(i + k) % LOGITS.len()])
                .collect()
        };
        let mut whole = Sampler::for_request(p.clone(), &prompt, &[]);
        let straight: Vec<u32> = (0..40).map(|k| whole.sample(&logits(k))).collect();
        for cut in [0, 1, 17, 39] {
            let mut resumed =
                Sampler::for_request(p.clone(), &prompt, &[]).resumed_after(&straight[..cut]);
            let rest: Vec<u32> = (cut..40).map(|k| resumed.sample(&logits(k))).collect();
            assert_eq!(rest, straight[cut..], "resumed after {cut}");
        }
        assert_eq!(whole.position(), 40);
    }

    /// A sampler whose picks are made elsewhere from its edited logits (a device's argmax,
    /// race or ranking after [`Sampler::logit_edits`], and a grammar's mask before them,
    /// counted with `take_argmax`, `take_draw`, `sample_ranked`) picks what
    /// [`Sampler::sample`] and [`Sampler::sample_allowed`] pick from the whole row, step after
    /// step: its penalties see the same tokens.
    #[test]
    fn picks_from_edited_logits_are_the_samplers_own() {
        let logits = |k: usize| -> Vec<f32> {
            (0..40)
                .map(|i| ((i * 7 + k * 3) % 11) as f32 * 0.35 - (i % 3) as f32)
                .collect()
        };
        let cases = [
            params(0.0, None, 1.0, 1),
            params(0.9, None, 0.9, 2),
            params(1.1, Some(5), 1.0, 3),
        ];
        for mut p in cases {
            p.adjust = LogitAdjustments {
                logit_bias: vec![(2, 1.5), (9, -2.0)],
                presence_penalty: 0.6,
                frequency_penalty: 0.9,
                repetition_penalty: 1.4,
                min_tokens: 3,
            };
            let prompt = [4u32, 9, 9, 30];
            let mut whole = Sampler::for_request(p.clone(), &prompt, &[0]);
            let mut elsewhere = Sampler::for_request(p.clone(), &prompt, &[0]);
            let mut changed = 0;
            for k in 0..30 {
                let row = logits(k);
                // Every third step under a grammar's mask (the mask first, then the edits).
                let allowed: Vec<bool> = (0..row.len()).map(|i| (i + k) % 4 != 0).collect();
                let masked = k % 3 == 0;
                let want = if masked {
                    whole.sample_allowed(&row, &allowed)
                } else {
                    whole.sample(&row)
                };
                let edits = elsewhere.logit_edits().expect("adjustments give edits");
                let mut edited = row.clone();
                if masked {
                    crate::token_mask::TokenMask::from_allowed(&allowed).apply(&mut edited);
                }
                edits.apply(&mut edited);
                let got = if p.is_greedy() {
                    elsewhere.take_argmax(ops::argmax(&edited) as u32)
                } else if let Some(race) = elsewhere.next_race() {
                    elsewhere.take_draw(race.draw(&edited))
                } else {
                    let k = elsewhere.ranked_draw_k(64).expect("a top-k draw");
                    elsewhere.sample_ranked(&ranked_top_k(&edited, k))
                };
                assert_eq!(got, want, "{p:?} step {k}");
                changed += (got as usize != ops::argmax(&row)) as usize;
            }
            assert!(changed > 0, "the adjustments change picks");
            assert_eq!(elsewhere.position(), whole.position());
        }
        assert!(Sampler::new(params(0.0, None, 1.0, 1))
            .logit_edits()
            .is_none());
    }

    #[test]
    fn only_allowed_tokens_are_sampled() {
        let allowed = [false, true, false, true, false, false];
        for seed in 0..32 {
            let mut s = Sampler::new(params(1.5, None, 1.0, seed));
            let t = s.sample_allowed(&LOGITS, &allowed) as usize;
            assert!(allowed[t], "sampled {t}");
        }
        let mut greedy = Sampler::new(SamplingParams::default());
        assert_eq!(greedy.sample_allowed(&LOGITS, &allowed), 1);
    }

    /// A pick taken from elsewhere is the draw `sample` would have made, and the sampler
    /// moves on as if it had sampled.
    #[test]
    fn an_argmax_taken_from_elsewhere_counts_as_the_draw() {
        let logits = [0.5f32, 2.0, 2.0, -1.0];
        let mut sampled = Sampler::new(params(0.0, None, 1.0, 3));
        let mut taken = Sampler::new(params(0.0, None, 1.0, 3));
        let id = ops::argmax(&logits) as u32;
        assert_eq!(taken.take_argmax(id), sampled.sample(&logits));
        assert_eq!(taken.position(), sampled.position());
    }

    /// A race run elsewhere from `next_race` (the device's) is the draw `sample` makes, with
    /// and without top-p, and counts as it: every later draw, and a resumed sampler, stay where
    /// they would be. Top-k draws run no race.
    #[test]
    fn a_race_taken_from_elsewhere_is_and_counts_as_the_draw() {
        let logits: Vec<f32> = (0..300).map(|i| ((i * 37) % 101) as f32 / 25.0).collect();
        for top_p in [1.0, 0.9] {
            let mut sampled = Sampler::new(params(0.9, None, top_p, 5));
            let mut raced = Sampler::new(params(0.9, None, top_p, 5));
            for _ in 0..50 {
                let race = raced.next_race().unwrap();
                let id = raced.take_draw(race.draw(&logits));
                assert_eq!(id, sampled.sample(&logits));
                assert_eq!(raced.position(), sampled.position());
            }
        }
        for no_race in [params(0.9, Some(5), 1.0, 5), params(0.0, None, 1.0, 5)] {
            assert!(Sampler::new(no_race).next_race().is_none());
        }
        assert!(Sampler::new(params(0.9, Some(0), 1.0, 5))
            .next_race()
            .is_some());
    }

    /// A top-k draw from only the k best-ranked logits is the draw from all of them, token
    /// for token, over many seeds, temperatures, k, top-p and logits with ties.
    #[test]
    fn a_draw_from_the_ranked_top_k_is_the_draw_from_all_logits() {
        let logits: Vec<f32> = (0..300u32)
            .map(|i| ((i.wrapping_mul(2_654_435_761) >> 20) % 97) as f32 / 13.0 - 3.0)
            .collect();
        for seed in 0..40 {
            for (t, k, top_p) in [(0.7, 20, 1.0), (1.0, 5, 0.9), (1.3, 64, 0.5), (0.2, 2, 1.0)] {
                let p = params(t, Some(k), top_p, seed);
                let mut whole = Sampler::new(p.clone());
                let mut ranked = Sampler::new(p);
                assert_eq!(ranked.ranked_draw_k(64), Some(k));
                for _ in 0..5 {
                    let want = whole.sample(&logits);
                    assert_eq!(ranked.sample_ranked(&ranked_top_k(&logits, k)), want);
                }
            }
        }
        assert_eq!(
            Sampler::new(params(0.0, Some(5), 1.0, 1)).ranked_draw_k(64),
            None
        );
        assert_eq!(
            Sampler::new(params(1.0, None, 1.0, 1)).ranked_draw_k(64),
            None
        );
        assert_eq!(
            Sampler::new(params(1.0, Some(65), 1.0, 1)).ranked_draw_k(64),
            None
        );
    }

    #[test]
    fn ranking_is_total_order_then_lower_id() {
        let logits = [1.0, f32::NAN, 3.0, 3.0, -0.0, 0.0, f32::NEG_INFINITY];
        let ids: Vec<u32> = ranked_top_k(&logits, 7).iter().map(|p| p.0).collect();
        assert_eq!(ids, [1, 2, 3, 0, 5, 4, 6]);
    }

    #[test]
    fn top_k_one_is_greedy() {
        let mut s = Sampler::new(params(1.3, Some(1), 1.0, 3));
        for _ in 0..32 {
            assert_eq!(s.sample(&LOGITS), 0);
        }
    }

    #[test]
    fn top_p_keeps_the_nucleus() {
        let s = Sampler::new(params(1.0, None, 0.5, 1));
        let probs = s.filtered_probs(&LOGITS);
        assert_eq!(probs.iter().map(|p| p.0).collect::<Vec<_>>(), vec![0, 5]);
    }

    /// Chi-square goodness of fit of temperature sampling against softmax(logits / T).
    #[test]
    fn temperature_sampling_follows_softmax() {
        let t = 0.8f64;
        let mut s = Sampler::new(params(t as f32, None, 1.0, 12345));
        let n = 60_000usize;
        let mut counts = [0usize; 6];
        for _ in 0..n {
            counts[s.sample(&LOGITS) as usize] += 1;
        }
        let exps: Vec<f64> = LOGITS.iter().map(|&l| (l as f64 / t).exp()).collect();
        let z: f64 = exps.iter().sum();
        let chi2: f64 = exps
            .iter()
            .zip(counts)
            .map(|(e, c)| {
                let expected = n as f64 * e / z;
                (c as f64 - expected).powi(2) / expected
            })
            .sum();
        // 5 degrees of freedom: the 99.9th percentile is 20.5.
        assert!(chi2 < 20.5, "chi-square {chi2} with counts {counts:?}");
    }
}
