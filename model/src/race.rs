//! Drawing from `softmax(logits / T)` without sorting the vocabulary: the Gumbel-max race
//! (among a top-p nucleus too: `nucleus.rs` finds it without a sort).
//! Each token's score is `logit / T + g`, `g = -ln(-ln(u))` from a uniform `u` of its own, and
//! the draw is the best score: exactly a draw from the softmax, in one pass over the row, with
//! nothing to sum (so no summation order) and the lowest id winning a tie. It is how a draw at
//! a temperature without top-k runs, with or without top-p (the sort it replaces costs
//! milliseconds per token at DeepSeek-V3's 129,280-token vocabulary), and it runs on a GPU as it runs here, bit for
//! bit: `u` comes from an integer hash of (key, id), and `ln` is built from correctly rounded
//! operations only (+, -, *, /, fma), which IEEE 754 defines to the bit on every machine; the
//! kernel (`race_rows` in `gpu/kernels.cu`) spells the same operations with `__dadd_rn` and
//! friends so that its compiler fuses nothing.
//!
//! A min-p draw (llama.cpp's and vLLM's `min_p`, applied before top-p) keeps the tokens at
//! least `min_p` as likely as the likeliest: weight `>= min_p`, that is a logit at least
//! `max + T ln(min_p)`, the **cut**, computed with [`ln`] in correctly rounded operations, so
//! host and kernel keep the same tokens ([`min_p_floor`]). The nucleus is then found among
//! the kept tokens only, and the race runs above both floors.

use crate::counter_hash::mix64 as mix;
use crate::nucleus::{self, LN2_HI, LN2_LO};

/// One draw: at `temperature` (> 0), among the tokens min-p keeps (`min_p`: 0 for every
/// token), then among their top-`top_p` nucleus (`nucleus.rs`; 1 for every token), keyed `key`
/// ([`race_key`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Race {
    pub temperature: f32,
    pub top_p: f32,
    pub min_p: f32,
    pub key: u64,
}

impl Race {
    /// The token this race draws from `logits`.
    pub fn draw(&self, logits: &[f32]) -> u32 {
        let lowest = if self.min_p > 0.0 {
            match min_p_floor(logits, self.temperature, self.min_p) {
                Some(lowest) => lowest,
                None => return 0,
            }
        } else {
            f32::NEG_INFINITY
        };
        let floor = if self.top_p < 1.0 {
            match nucleus::floor(logits, self.temperature, self.top_p, lowest) {
                Some(floor) => floor,
                None => return 0,
            }
        } else {
            lowest
        };
        race_above(logits, self.temperature, self.key, floor)
    }

    /// Whether a device can run it: a positive, finite temperature, `top_p` in (0, 1] and
    /// `min_p` in [0, 1].
    pub fn is_valid(&self) -> bool {
        self.temperature > 0.0
            && self.temperature.is_finite()
            && self.top_p > 0.0
            && self.top_p <= 1.0
            && (0.0..=1.0).contains(&self.min_p)
    }
}

/// The logit below which min-p drops a token, for the largest drawable logit `max`: `max + T
/// ln(min_p)` in f64 (`min_p` in (0, 1]; at 1 it is `max`). Its operations are the kernel's.
pub fn min_p_cut(max: f32, temperature: f32, min_p: f32) -> f64 {
    max as f64 + temperature as f64 * ln(min_p as f64)
}

/// The smallest logit a min-p draw keeps (see the module's text): the tokens at or above it
/// are the ones whose logit reaches [`min_p_cut`]. `None` when no token is drawable.
pub fn min_p_floor(logits: &[f32], temperature: f32, min_p: f32) -> Option<f32> {
    // `f32::max` passes over NaN; a row of -inf and NaN has nothing drawable.
    let max = fold_lanes(logits, f32::NEG_INFINITY, |m, l| m.max(l));
    if max == f32::NEG_INFINITY {
        return None;
    }
    let cut = min_p_cut(max, temperature, min_p);
    // The smallest f32 at least the cut: `l >= above` is `l as f64 >= cut`, in f32.
    let mut above = cut as f32;
    if (above as f64) < cut {
        above = above.next_up();
    }
    let lowest = fold_lanes(
        logits,
        f32::INFINITY,
        |m, l| if l >= above { m.min(l) } else { m },
    );
    Some(lowest)
}

/// `values` folded by `f` (an associative and commutative `max` or `min`) in 16 lanes, which
/// the compiler vectorises where one running value would be a chain of dependent operations.
fn fold_lanes(values: &[f32], start: f32, f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut lanes = [start; 16];
    let chunks = values.chunks_exact(16);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane = f(*lane, v);
        }
    }
    let folded = tail.iter().fold(start, |m, &v| f(m, v));
    lanes.into_iter().fold(folded, &f)
}

/// One race over one row of a step's logits, as a device runs it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RowRace {
    /// The logit row (of the step's `[rows, vocab]` logits).
    pub row: u32,
    pub race: Race,
}

/// The key of draw `counter` of a request keyed `key`.
pub fn race_key(key: u64, counter: u64) -> u64 {
    mix(key ^ mix(counter.wrapping_add(0x2545_f491_4f6c_dd1d)))
}

/// Token `id`'s uniform in (0, 1) for the race keyed `race_key`: 52 random bits and a half,
/// exact in f64, never 0 or 1.
fn uniform(race_key: u64, id: u64) -> f64 {
    let bits = mix(race_key.wrapping_add(id.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15)));
    ((bits >> 12) as f64 + 0.5) * (1.0 / (1u64 << 52) as f64)
}

/// The Gumbel noise of a uniform, `-ln(-ln(u))`.
fn gumbel(u: f64) -> f64 {
    -ln(-ln(u))
}

/// Token `id`'s Gumbel noise in the race keyed `race_key`.
pub fn noise(race_key: u64, id: u64) -> f64 {
    gumbel(uniform(race_key, id))
}

/// The race's score of a logit: `logit / T + noise`; a NaN logit never wins.
pub fn score(logit: f32, temperature: f32, noise: f64) -> f64 {
    if logit.is_nan() {
        return f64::NEG_INFINITY;
    }
    logit as f64 / temperature as f64 + noise
}

/// Whether a score takes the lead: a better one, or an equal one of a lower id.
fn leads(score: f64, id: u32, best: (f64, u32)) -> bool {
    score > best.0 || (score == best.0 && id < best.1)
}

/// The token the race keyed `race_key` draws from `logits` at `temperature` (> 0): the best
/// [`score`], the lowest id on a tie; NaN and -inf logits are never drawn (0 when nothing can
/// be). It starts from the largest logit's score, and skips a token whose uniform is too small
/// for any noise it could draw to reach the lead ([`UniformFloor`]): most of a vocabulary
/// sits far below the largest logit, so only a few tokens in a thousand take two logarithms.
/// The skip is conservative, so the draw is the best score over every token, which is what
/// the kernel computes without skipping.
pub fn race(logits: &[f32], temperature: f32, race_key: u64) -> u32 {
    race_above(logits, temperature, race_key, f32::NEG_INFINITY)
}

/// [`race`] among the tokens whose logit is at least `floor` (a nucleus's or min-p's).
fn race_above(logits: &[f32], temperature: f32, race_key: u64, floor: f32) -> u32 {
    let drawable = |logit: f32| !logit.is_nan() && logit != f32::NEG_INFINITY && logit >= floor;
    let Some(first) = logits
        .iter()
        .enumerate()
        .filter(|(_, l)| drawable(**l))
        .max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(&a.0)))
        .map(|(id, _)| id)
    else {
        return 0;
    };
    let uniform_floor = UniformFloor::get();
    let lead_score = score(logits[first], temperature, noise(race_key, first as u64));
    let mut best = (lead_score, first as u32);
    for (id, &logit) in logits.iter().enumerate() {
        if id == first || !drawable(logit) {
            continue;
        }
        let u = uniform(race_key, id as u64);
        // The noise this token needs to tie the lead; a uniform below the floor for it
        // draws less.
        // (Far from f64's rounding only: below 1e6, a score's rounding is under 1e-10.)
        let base = logit as f64 / temperature as f64;
        let modest = best.0.abs() < 1e6 && base.abs() < 1e6;
        if modest && uniform_floor.rules_out(u, best.0 - base) {
            continue;
        }
        let s = base + gumbel(u);
        if s > f64::NEG_INFINITY && leads(s, id as u32, best) {
            best = (s, id as u32);
        }
    }
    if best.0 == f64::NEG_INFINITY {
        // Every score is -inf (logit / T fell below f64's range): nothing can be drawn, as
        // the kernel finds.
        return 0;
    }
    best.1
}

/// For noise thresholds `d` in steps of 1/8 up to 40, a uniform below which the noise is
/// below `d` for sure: `exp(-exp(-d))` (where the Gumbel CDF reaches `d`) less a margin of
/// 1e-6 that covers the rounding of both `exp`s and of [`ln`]. Only speed depends on it.
struct UniformFloor {
    below: Vec<f64>,
}

impl UniformFloor {
    const STEPS_PER_UNIT: f64 = 8.0;
    const MAX_NOISE: f64 = 40.0;

    fn get() -> &'static Self {
        static FLOOR: std::sync::OnceLock<UniformFloor> = std::sync::OnceLock::new();
        FLOOR.get_or_init(|| {
            let steps = (Self::MAX_NOISE * Self::STEPS_PER_UNIT) as usize;
            let below = (0..=steps)
                .map(|k| {
                    let d = k as f64 / Self::STEPS_PER_UNIT;
                    (-(-d).exp()).exp() * (1.0 - 1e-6)
                })
                .collect();
            UniformFloor { below }
        })
    }

    /// Whether a token with uniform `u` surely draws a noise below `need` (NaN: never).
    fn rules_out(&self, u: f64, need: f64) -> bool {
        if need.is_nan() || need <= 0.0 {
            return false;
        }
        let step = (need * Self::STEPS_PER_UNIT).min((self.below.len() - 1) as f64) as usize;
        u < self.below[step]
    }
}

/// `1 / (2k + 1)` for k = 1..=11: the series of `atanh`, `ln m = 2 atanh((m - 1) / (m + 1))`.
const ATANH_SERIES: [f64; 11] = [
    1.0 / 3.0,
    1.0 / 5.0,
    1.0 / 7.0,
    1.0 / 9.0,
    1.0 / 11.0,
    1.0 / 13.0,
    1.0 / 15.0,
    1.0 / 17.0,
    1.0 / 19.0,
    1.0 / 21.0,
    1.0 / 23.0,
];

/// The natural logarithm of a positive normal f64, within a few ulps, from correctly rounded
/// operations only (no fma): the same bits on every machine and on the GPU (unlike a libm's `ln`).
/// `x = m * 2^e` with `m` in [sqrt(1/2), sqrt(2)); `ln m = 2 atanh(s)`, `s = (m - 1) / (m + 1)`,
/// `|s| < 0.172`, whose series to `s^23` is below half an ulp.
pub fn ln(x: f64) -> f64 {
    let bits = x.to_bits();
    let mut e = ((bits >> 52) & 0x7ff) as i64 - 1023;
    let mut m = f64::from_bits((bits & 0x000f_ffff_ffff_ffff) | 0x3ff0_0000_0000_0000);
    if m > std::f64::consts::SQRT_2 {
        m *= 0.5;
        e += 1;
    }
    let s = (m - 1.0) / (m + 1.0);
    let z = s * s;
    let mut series = ATANH_SERIES[10];
    for c in ATANH_SERIES[..10].iter().rev() {
        series = series * z + c;
    }
    // 2 atanh(s) = 2s + 2s * z * series.
    let two_s = 2.0 * s;
    let ln_m = two_s * z * series + two_s;
    let e = e as f64;
    e * LN2_HI + (e * LN2_LO + ln_m)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// min-p keeps the tokens whose weight is at least `min_p` of the likeliest's: its floor
    /// is the smallest logit within `T ln(1 / min_p)` of the largest.
    #[test]
    fn the_min_p_floor_keeps_the_tokens_near_the_likeliest() {
        let logits = [1.0f32, 3.0, f32::NAN, 2.0, f32::NEG_INFINITY, 2.5, -4.0];
        // At T 1, min_p 0.5 keeps logits >= 3 - ln 2 = 2.307: 3.0 and 2.5.
        assert_eq!(min_p_floor(&logits, 1.0, 0.5), Some(2.5));
        // At T 2 the cut is 3 - 2 ln 2 = 1.61: 2.0 joins.
        assert_eq!(min_p_floor(&logits, 2.0, 0.5), Some(2.0));
        // min_p 1 keeps the likeliest (and its ties) only; a tiny one, every drawable token.
        assert_eq!(min_p_floor(&logits, 1.0, 1.0), Some(3.0));
        assert_eq!(min_p_floor(&logits, 1.0, 1e-30), Some(-4.0));
        assert_eq!(min_p_floor(&[f32::NAN, f32::NEG_INFINITY], 1.0, 0.1), None);
        // Against libm's weights, on random rows: a token is kept exactly when its weight
        // reaches min_p, except within rounding of the cut.
        let mut rng = crate::sampling::Rng::seeded(4);
        for _ in 0..200 {
            let row: Vec<f32> = (0..50)
                .map(|_| (rng.next_f64() * 20.0 - 10.0) as f32)
                .collect();
            let (t, min_p) = (0.2 + rng.next_f64() as f32, rng.next_f64() as f32);
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let floor = min_p_floor(&row, t, min_p).unwrap();
            for &l in &row {
                let weight = ((l as f64 - max as f64) / t as f64).exp();
                if (weight / min_p as f64 - 1.0).abs() > 1e-12 {
                    assert_eq!(l >= floor, weight >= min_p as f64, "{l} {t} {min_p}");
                }
            }
        }
    }

    /// The kernel's constants (written as bits in `race_rows`'s `race_ln`) are these.
    #[test]
    fn the_kernels_constants_are_these_bits() {
        let mut constants = ATANH_SERIES.to_vec();
        let unit = 1.0f64 / (1u64 << 52) as f64;
        constants.extend([std::f64::consts::SQRT_2, LN2_HI, LN2_LO, unit]);
        crate::test_support::assert_kernel_constants("RACE_CONSTANTS", &constants);
    }

    #[test]
    fn ln_is_within_a_few_ulps_of_libms() {
        let mut worst = 0.0f64;
        for i in 1..20_000u64 {
            for x in [
                i as f64 / 20_000.0,
                (i as f64).powi(3) * 1e-9,
                f64::from_bits(0x3ff0_0000_0000_0000 + i * 0x1_0000_0001),
                1e-300 * i as f64,
            ] {
                let (ours, libm) = (ln(x), x.ln());
                let ulps = (ours - libm).abs() / (libm.abs() * f64::EPSILON).max(f64::MIN_POSITIVE);
                worst = worst.max(if libm == 0.0 { ours.abs() } else { ulps });
            }
        }
        assert!(worst < 4.0, "{worst} ulps");
        assert_eq!(ln(1.0), 0.0);
    }

    /// Frequencies follow the softmax (a chi-square test over 40,000 races, each its own key).
    #[test]
    fn races_draw_from_the_softmax() {
        let logits = crate::test_support::DRAW_LOGITS;
        let t = 0.8f32;
        let n = 40_000;
        let mut counts = [0usize; 8];
        for draw in 0..n {
            counts[race(&logits, t, race_key(7, draw)) as usize] += 1;
        }
        assert_eq!(
            (counts[5], counts[7]),
            (0, 0),
            "-inf and NaN are never drawn"
        );
        let exps: Vec<f64> = logits
            .iter()
            .map(|&l| {
                if l.is_nan() {
                    0.0
                } else {
                    (l as f64 / t as f64).exp()
                }
            })
            .collect();
        let z: f64 = exps.iter().sum();
        let chi2: f64 = exps
            .iter()
            .zip(counts)
            .filter(|(e, _)| **e > 0.0)
            .map(|(e, c)| {
                let expected = n as f64 * e / z;
                (c as f64 - expected).powi(2) / expected
            })
            .sum();
        // 5 degrees of freedom: p = 0.001 at 20.5.
        assert!(chi2 < 20.5, "chi2 {chi2}, counts {counts:?}");
    }

    /// The race over every token's score, as the kernel computes it.
    fn race_unpruned(logits: &[f32], temperature: f32, key: u64) -> u32 {
        let mut best: Option<(f64, u32)> = None;
        for (id, &logit) in logits.iter().enumerate() {
            if logit.is_nan() || logit == f32::NEG_INFINITY {
                continue;
            }
            let s = score(logit, temperature, noise(key, id as u64));
            if s > f64::NEG_INFINITY && best.is_none_or(|b| leads(s, id as u32, b)) {
                best = Some((s, id as u32));
            }
        }
        best.map_or(0, |b| b.1)
    }

    /// Skipping tokens whose uniform rules them out changes no draw: random rows of several
    /// spreads and temperatures, ties, infinities and NaNs, many keys.
    #[test]
    fn skipping_changes_no_draw() {
        let mut rng = crate::sampling::Rng::seeded(5);
        for case in 0..60u64 {
            let spread = [0.1f64, 1.0, 4.0, 30.0][case as usize % 4];
            let mut logits: Vec<f32> = (0..3000)
                .map(|_| ((rng.next_f64() * 2.0 - 1.0) * spread) as f32)
                .collect();
            if case % 5 == 0 {
                logits[17] = f32::NAN;
                logits[40] = f32::NEG_INFINITY;
                logits[2999] = logits[3];
            }
            if case % 7 == 0 {
                logits[100] = f32::INFINITY;
                logits[50] = f32::INFINITY;
            }
            let t = [0.05f32, 0.7, 1.0, 2.5][case as usize % 4];
            for draw in 0..20 {
                let key = race_key(case, draw);
                assert_eq!(
                    race(&logits, t, key),
                    race_unpruned(&logits, t, key),
                    "case {case}"
                );
            }
        }
        // Scores below f64's range, and a temperature small enough to make them large.
        let tiny = [f32::MIN, f32::MIN, -1.0];
        assert_eq!(race(&tiny, 1e-30, 1), race_unpruned(&tiny, 1e-30, 1));
        assert_eq!(race(&[f32::MIN, f32::MIN], 1e-30, 1), 0);
    }

    #[test]
    fn ties_go_to_the_lower_id_and_nothing_drawable_gives_zero() {
        let inf = [1.0f32, f32::INFINITY, 0.0, f32::INFINITY];
        for k in 0..20 {
            assert_eq!(race(&inf, 1.0, race_key(k, 0)), 1);
        }
        assert_eq!(race(&[f32::NEG_INFINITY, f32::NAN], 1.0, 3), 0);
        assert_eq!(race(&[], 1.0, 3), 0);
        // A different key is a different draw; the same key the same one.
        let flat = [0.0f32; 1000];
        let draws: std::collections::BTreeSet<u32> =
            (0..50).map(|k| race(&flat, 1.0, race_key(1, k))).collect();
        assert!(draws.len() > 40, "{draws:?}");
        assert_eq!(
            race(&flat, 1.0, race_key(1, 9)),
            race(&flat, 1.0, race_key(1, 9))
        );
    }
}
