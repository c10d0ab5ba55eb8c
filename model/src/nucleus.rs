//! The nucleus of a top-p draw, found without sorting the vocabulary and the same on a GPU.
//!
//! Each drawable token (not NaN, not -inf) weighs `w = exp((logit - max) / T)`; the nucleus is
//! every token whose logit is at least the **floor**: the largest logit value `x` such that the
//! tokens with logits `>= x` weigh at least `top_p` of all of them. Tokens with equal logits are
//! in or out together. The draw is then the race (`race.rs`) among the nucleus, which draws
//! each member in proportion to its weight, exactly what renormalising the nucleus gives.
//!
//! Every sum runs in one fixed order, which a GPU block of 256 threads follows as well: lane
//! `j` adds the weights of ids `j, j + 256, j + 512, ...` in turn, then lanes are added
//! pairwise (`j += j + 128` for `j < 128`, then 64, ..., 1). `exp` is ours, from correctly
//! rounded operations only, as `race.rs`'s `ln` is. Removing nonnegative terms never makes
//! such a sum larger, so the mass above a threshold falls as the threshold rises and the
//! floor is well defined; the host finds it among the largest logits by bisection, the kernel
//! (`race_rows`) by bisecting f32 values, and both evaluate the same sums at the same
//! thresholds.
//!
//! After a min-p cut (`race.rs`'s `min_p_floor`) the nucleus is found among the kept tokens
//! only: [`floor`] takes the lowest logit it may keep.

/// Lanes of the fixed summation order: the kernel's threads per block.
pub const SUM_LANES: usize = 256;

fn drawable(logit: f32) -> bool {
    !logit.is_nan() && logit != f32::NEG_INFINITY
}

/// ln 2 split in two (fdlibm's): the high part ends in 32 zero bits, so `k * LN2_HI` is
/// exact for every exponent an f64 has (`race.rs`'s `ln` uses them too).
pub(crate) const LN2_HI: f64 = f64::from_bits(0x3fe6_2e42_fee0_0000);
pub(crate) const LN2_LO: f64 = f64::from_bits(0x3dea_39ef_3579_3c76);
/// `1 / ln 2`.
const INV_LN2: f64 = f64::from_bits(0x3ff7_1547_652b_82fe);

/// `1 / n!` for n = 2..=13: Taylor's series of `exp` on `|r| <= ln 2 / 2`, below half an ulp.
const EXP_SERIES: [f64; 12] = [
    1.0 / 2.0,
    1.0 / 6.0,
    1.0 / 24.0,
    1.0 / 120.0,
    1.0 / 720.0,
    1.0 / 5040.0,
    1.0 / 40320.0,
    1.0 / 362880.0,
    1.0 / 3628800.0,
    1.0 / 39916800.0,
    1.0 / 479001600.0,
    1.0 / 6227020800.0,
];

/// Adding and subtracting it rounds an f64 below 2^51 in magnitude to the nearest integer
/// (ties to even), with two correctly rounded operations.
const ROUNDING: f64 = 6_755_399_441_055_744.0;

/// `exp(x)` for `x <= 0`, within a few ulps, from correctly rounded operations only (no fma,
/// no `floor`, a library call on the baseline x86-64 target): the same bits on every machine
/// and in the kernel. `x = k ln 2 + r`, `|r| <= ln 2 / 2`; below -745 (under the smallest
/// subnormal) it is 0.
pub fn exp(x: f64) -> f64 {
    if x.is_nan() || x < -745.0 {
        return 0.0;
    }
    let k = (x * INV_LN2 + ROUNDING) - ROUNDING;
    let r = (x - k * LN2_HI) - k * LN2_LO;
    let mut p = EXP_SERIES[11];
    for c in EXP_SERIES[..11].iter().rev() {
        p = p * r + c;
    }
    let p = (p * r + 1.0) * r + 1.0;
    // 2^k in two normal halves (k may be as low as -1075).
    let k = k as i64;
    let half = k / 2;
    p * pow2(half) * pow2(k - half)
}

/// `2^k` for `-1022 <= k <= 1023`.
fn pow2(k: i64) -> f64 {
    f64::from_bits(((k + 1023) as u64) << 52)
}

/// The drawable tokens' weights at `temperature`, relative to the largest drawable logit
/// `max` (0 for the others).
pub fn weights(logits: &[f32], max: f32, temperature: f32) -> Vec<f64> {
    logits
        .iter()
        .map(|&l| {
            if drawable(l) {
                exp((l as f64 - max as f64) / temperature as f64)
            } else {
                0.0
            }
        })
        .collect()
}

/// The weight of the drawable tokens whose logit is `>= threshold`, summed in the fixed order
/// (`weights` as [`weights`] gives them: 0 for the tokens that are not drawable).
pub fn mass(logits: &[f32], weights: &[f64], threshold: f32) -> f64 {
    let mut lanes = [0.0f64; SUM_LANES];
    // Adding 0 leaves a lane as it is (lanes are never -0), so the tokens left out add 0: a
    // loop without branches, which the compiler vectorises.
    for (l, w) in logits.chunks(SUM_LANES).zip(weights.chunks(SUM_LANES)) {
        for ((lane, &l), &w) in lanes.iter_mut().zip(l).zip(w) {
            *lane += if l >= threshold { w } else { 0.0 };
        }
    }
    let mut half = SUM_LANES / 2;
    while half > 0 {
        for j in 0..half {
            lanes[j] += lanes[j + half];
        }
        half /= 2;
    }
    lanes[0]
}

/// The floor of the top-`top_p` nucleus of `logits` at `temperature` (see the module's text),
/// among the tokens whose logit is at least `lowest` (a min-p floor; -inf for every token);
/// `None` when no such token is drawable. `top_p` in (0, 1].
///
/// The weights are first summed roughly per band of logit values (2048 bands between the
/// smallest and the largest), which says in which band the floor lies; the floor is then
/// found among that band's values and its neighbours' by exact sums, once two more exact sums
/// confirm it lies there (otherwise, and always in theory, [`floor_among_largest`] finds it).
pub fn floor(logits: &[f32], temperature: f32, top_p: f32, lowest: f32) -> Option<f32> {
    let kept = |l: f32| drawable(l) && l >= lowest;
    let (mut min, mut max) = (f32::INFINITY, f32::NEG_INFINITY);
    for &l in logits.iter().filter(|&&l| kept(l)) {
        min = min.min(l);
        max = max.max(l);
    }
    if max == f32::NEG_INFINITY {
        return None;
    }
    let weights = weights(logits, max, temperature);
    let target = top_p as f64 * mass(logits, &weights, lowest);
    let reaches = |x: f32| mass(logits, &weights, x) >= target;
    const BANDS: usize = 2048;
    let scale = BANDS as f64 / (max as f64 - min as f64);
    let band = |l: f32| (((max as f64 - l as f64) * scale) as usize).min(BANDS - 1);
    if scale.is_finite() && scale > 0.0 {
        let mut sums = vec![0.0f64; BANDS];
        for (&l, &w) in logits.iter().zip(&weights) {
            if kept(l) {
                sums[band(l)] += w;
            }
        }
        let mut cumulative = 0.0;
        let crossing = sums
            .iter()
            .position(|s| {
                cumulative += s;
                cumulative >= target
            })
            .unwrap_or(BANDS - 1);
        let (first, last) = (crossing.saturating_sub(1), (crossing + 1).min(BANDS - 1));
        let mut candidates = Vec::new();
        // The smallest value above the candidates' bands.
        let mut guard: Option<f32> = None;
        for &l in logits.iter().filter(|&&l| kept(l)) {
            let b = band(l);
            if b < first {
                guard = Some(guard.map_or(l, |g| g.min(l)));
            } else if b <= last {
                candidates.push(l);
            }
        }
        candidates.sort_unstable_by(|a, b| b.total_cmp(a));
        candidates.dedup_by(|a, b| a.to_bits() == b.to_bits());
        let bounded = candidates.last().is_some_and(|&lowest| reaches(lowest))
            && guard.is_none_or(|g| !reaches(g));
        if bounded {
            return Some(first_reaching(&candidates, reaches));
        }
    }
    Some(floor_among_largest(logits, lowest, &reaches))
}

/// The first of `values` (descending, the last of which reaches) whose mass reaches the
/// target: the mass rises along them.
fn first_reaching(values: &[f32], reaches: impl Fn(f32) -> bool) -> f32 {
    let (mut lo, mut hi) = (0usize, values.len() - 1);
    while lo < hi {
        let mid = (lo + hi) / 2;
        if reaches(values[mid]) {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    values[lo]
}

/// The floor among the m largest values at least `lowest`, m growing fourfold until the m-th
/// largest reaches the target (the smallest value always does: the kept tokens weigh at least
/// top_p of themselves).
fn floor_among_largest(logits: &[f32], lowest: f32, reaches: &impl Fn(f32) -> bool) -> f32 {
    let mut values: Vec<f32> = logits
        .iter()
        .copied()
        .filter(|&l| drawable(l) && l >= lowest)
        .collect();
    let mut m = 64usize;
    loop {
        let top: Vec<f32> = if m >= values.len() {
            let mut all = values.clone();
            all.sort_unstable_by(|a, b| b.total_cmp(a));
            all
        } else {
            values.select_nth_unstable_by(m - 1, |a, b| b.total_cmp(a));
            let mut top = values[..m].to_vec();
            top.sort_unstable_by(|a, b| b.total_cmp(a));
            top
        };
        let last = top[top.len() - 1];
        if top.len() == values.len() || reaches(last) {
            return first_reaching(&top, reaches);
        }
        m = m.saturating_mul(4);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel's constants (written as bits in `nucleus_exp`) are these.
    #[test]
    fn the_kernels_constants_are_these_bits() {
        let mut constants = EXP_SERIES.to_vec();
        constants.extend([INV_LN2, LN2_HI, LN2_LO]);
        crate::test_support::assert_kernel_constants("NUCLEUS_CONSTANTS", &constants);
    }

    /// A top-p draw takes only the nucleus's tokens, each in proportion to its weight
    /// (a chi-square test over 40,000 draws).
    #[test]
    fn a_top_p_draw_takes_the_nucleus_in_proportion() {
        let logits = crate::test_support::DRAW_LOGITS;
        let (t, top_p) = (0.8f32, 0.8f32);
        let floor = floor(&logits, t, top_p, f32::NEG_INFINITY).unwrap();
        let exps: Vec<f64> = logits
            .iter()
            .map(|&l| {
                if l >= floor {
                    ((l - 3.0) as f64 / t as f64).exp()
                } else {
                    0.0
                }
            })
            .collect();
        let inside: Vec<usize> = (0..8).filter(|&i| exps[i] > 0.0).collect();
        assert_eq!(
            inside,
            [1, 4, 6],
            "3.0, 2.5 and 2.0 weigh 0.8 of the row at T 0.8"
        );
        let n = 40_000;
        let mut counts = [0usize; 8];
        for draw in 0..n {
            let race = crate::race::Race {
                temperature: t,
                top_p,
                min_p: 0.0,
                key: crate::race::race_key(2, draw),
            };
            counts[race.draw(&logits) as usize] += 1;
        }
        let z: f64 = exps.iter().sum();
        let mut chi2 = 0.0;
        for (i, &c) in counts.iter().enumerate() {
            if exps[i] == 0.0 {
                assert_eq!(c, 0, "token {i} is outside the nucleus");
                continue;
            }
            let expected = n as f64 * exps[i] / z;
            chi2 += (c as f64 - expected).powi(2) / expected;
        }
        // 2 degrees of freedom: p = 0.001 at 13.8.
        assert!(chi2 < 13.8, "chi2 {chi2}, counts {counts:?}");
    }

    #[test]
    fn exp_is_within_a_few_ulps_of_libms() {
        let mut worst = 0.0f64;
        for i in 0..200_000u64 {
            let x = -(i as f64) * 0.003_7;
            let (ours, libm) = (exp(x), x.exp());
            if libm < f64::MIN_POSITIVE {
                assert!((ours - libm).abs() <= 2.0 * f64::from_bits(1), "{x}");
                continue;
            }
            worst = worst.max((ours - libm).abs() / (libm * f64::EPSILON));
        }
        assert!(worst < 4.0, "{worst} ulps");
        assert_eq!(
            (exp(0.0), exp(-800.0), exp(f64::NEG_INFINITY)),
            (1.0, 0.0, 0.0)
        );
    }

    /// The floor as the definition states it, over every distinct logit value at least
    /// `lowest`.
    fn floor_by_definition(
        logits: &[f32],
        temperature: f32,
        top_p: f32,
        lowest: f32,
    ) -> Option<f32> {
        let max = logits
            .iter()
            .copied()
            .filter(|&l| drawable(l) && l >= lowest)
            .max_by(f32::total_cmp)?;
        let w = weights(logits, max, temperature);
        let target = top_p as f64 * mass(logits, &w, lowest);
        logits
            .iter()
            .copied()
            .filter(|&l| drawable(l) && l >= lowest && mass(logits, &w, l) >= target)
            .max_by(f32::total_cmp)
    }

    #[test]
    fn the_floor_is_the_definitions_on_rows_with_ties_and_gaps() {
        let mut rng = crate::sampling::Rng::seeded(9);
        for case in 0..40 {
            let n = [7usize, 300, 2000][case % 3];
            let spread = [0.5f64, 5.0, 40.0][case % 3];
            let mut logits: Vec<f32> = (0..n)
                .map(|_| ((rng.next_f64() * 2.0 - 1.0) * spread) as f32)
                .collect();
            if case % 4 == 0 {
                // Ties, infinities and NaNs.
                for i in (0..n).step_by(3) {
                    logits[i] = logits[0];
                }
                logits[n - 1] = f32::NAN;
                logits[1] = f32::NEG_INFINITY;
            }
            for top_p in [0.05f32, 0.5, 0.9, 0.95, 1.0] {
                for t in [0.3f32, 1.0] {
                    // Among every token, and among those a min-p draw keeps.
                    for min_p in [0.0f32, 0.01, 0.2] {
                        let lowest = if min_p > 0.0 {
                            crate::race::min_p_floor(&logits, t, min_p).unwrap()
                        } else {
                            f32::NEG_INFINITY
                        };
                        let expected =
                            floor_by_definition(&logits, t, top_p, lowest).map(f32::to_bits);
                        assert_eq!(
                            floor(&logits, t, top_p, lowest).map(f32::to_bits),
                            expected,
                            "case {case}, top_p {top_p}, T {t}, min_p {min_p}"
                        );
                        // The fallback on its own, as the banded search's safety net.
                        let max = logits
                            .iter()
                            .copied()
                            .filter(|&l| drawable(l))
                            .max_by(f32::total_cmp);
                        if let Some(max) = max {
                            let w = weights(&logits, max, t);
                            let target = top_p as f64 * mass(&logits, &w, lowest);
                            let reaches = |x: f32| mass(&logits, &w, x) >= target;
                            assert_eq!(
                                Some(floor_among_largest(&logits, lowest, &reaches).to_bits()),
                                expected
                            );
                        }
                    }
                }
            }
        }
        let all = f32::NEG_INFINITY;
        assert_eq!(floor(&[f32::NAN, f32::NEG_INFINITY], 1.0, 0.9, all), None);
        // top_p 1 keeps every drawable token: the floor is the smallest logit.
        assert_eq!(floor(&[3.0, -2.0, 1.0], 1.0, 1.0, all), Some(-2.0));
        // ... or the smallest kept one.
        assert_eq!(floor(&[3.0, -2.0, 1.0], 1.0, 1.0, 0.5), Some(1.0));
        // One dominant token: the nucleus of 0.9 is that token alone.
        assert_eq!(floor(&[0.0, 20.0, 1.0, 2.0], 1.0, 0.9, all), Some(20.0));
    }
}
