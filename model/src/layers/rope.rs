//! Rotary position embeddings (default, linear and YaRN), as transformers computes them:
//! inverse frequencies in f32, angles `pos * inv_freq` in f32, rotate-half convention.

use crate::config::{yarn_get_mscale, RopeConfig, RopeScaling};

#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f32>,
    /// YaRN's attention factor, multiplied into cos and sin.
    attention_scaling: f32,
}

/// cos and sin of every row's position: `[rows, dim / 2]` each.
#[derive(Debug, Clone, Default)]
pub struct RopeTable {
    pub half: usize,
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
}

impl RopeTable {
    pub fn row(&self, r: usize) -> (&[f32], &[f32]) {
        (
            &self.cos[r * self.half..(r + 1) * self.half],
            &self.sin[r * self.half..(r + 1) * self.half],
        )
    }
}

impl Rope {
    pub fn new(cfg: &RopeConfig) -> Self {
        let dim = cfg.dim;
        let base = cfg.theta;
        let pos_freqs: Vec<f64> = (0..dim / 2)
            .map(|i| base.powf((2 * i) as f64 / dim as f64))
            .collect();
        let (inv_freq, attention_scaling): (Vec<f64>, f64) = match &cfg.scaling {
            RopeScaling::None => (pos_freqs.iter().map(|f| 1.0 / f).collect(), 1.0),
            RopeScaling::Linear { factor } => {
                (pos_freqs.iter().map(|f| 1.0 / (f * factor)).collect(), 1.0)
            }
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                beta_fast,
                beta_slow,
                mscale,
                mscale_all_dim,
                attention_factor,
                truncate,
            } => {
                let attention =
                    attention_factor.unwrap_or_else(|| match (mscale, mscale_all_dim) {
                        (Some(m), Some(a)) if *m != 0.0 && *a != 0.0 => {
                            yarn_get_mscale(*factor, *m) / yarn_get_mscale(*factor, *a)
                        }
                        _ => yarn_get_mscale(*factor, 1.0),
                    });
                let correction_dim = |rotations: f64| {
                    (dim as f64
                        * (*original_max_position_embeddings as f64
                            / (rotations * 2.0 * std::f64::consts::PI))
                            .ln())
                        / (2.0 * base.ln())
                };
                let (mut low, mut high) = (correction_dim(*beta_fast), correction_dim(*beta_slow));
                if *truncate {
                    low = low.floor();
                    high = high.ceil();
                }
                let low = low.max(0.0);
                let high = high.min(dim as f64 - 1.0);
                let span = if low == high { 0.001 } else { high - low };
                let inv = pos_freqs
                    .iter()
                    .enumerate()
                    .map(|(i, f)| {
                        // Computed in f32 like transformers' ramp.
                        let ramp = (((i as f32) - low as f32) / span as f32).clamp(0.0, 1.0);
                        let extrapolation = 1.0 - ramp;
                        let inv_extra = (1.0 / f) as f32;
                        let inv_inter = (1.0 / (factor * f)) as f32;
                        (inv_inter * (1.0 - extrapolation) + inv_extra * extrapolation) as f64
                    })
                    .collect();
                (inv, attention)
            }
        };
        Self {
            inv_freq: inv_freq.into_iter().map(|v| v as f32).collect(),
            attention_scaling: attention_scaling as f32,
        }
    }

    /// cos/sin for each position.
    pub fn table(&self, positions: &[usize]) -> RopeTable {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &pos in positions {
            for &f in &self.inv_freq {
                let angle = (pos as f32 * f) as f64;
                cos.push((angle.cos() as f32) * self.attention_scaling);
                sin.push((angle.sin() as f32) * self.attention_scaling);
            }
        }
        RopeTable { half, cos, sin }
    }
}

/// Rotates one head vector in place. With `interleaved`, pairs `(2i, 2i+1)` are first gathered
/// into halves (DeepSeek's layout); the result is always in rotate-half layout.
pub fn apply_rope(x: &mut [f32], cos: &[f32], sin: &[f32], interleaved: bool) {
    let half = cos.len();
    debug_assert_eq!(x.len(), 2 * half);
    if interleaved {
        for i in 0..half {
            let (x1, x2) = (x[2 * i], x[2 * i + 1]);
            // Stage the rotated pair in place of the interleaved one, then unshuffle below.
            x[2 * i] = x1 * cos[i] - x2 * sin[i];
            x[2 * i + 1] = x2 * cos[i] + x1 * sin[i];
        }
        deinterleave(x);
        return;
    }
    for i in 0..half {
        let (x1, x2) = (x[i], x[half + i]);
        x[i] = x1 * cos[i] - x2 * sin[i];
        x[half + i] = x2 * cos[i] + x1 * sin[i];
    }
}

/// `[a0, b0, a1, b1, ...]` to `[a0, a1, ..., b0, b1, ...]`.
fn deinterleave(x: &mut [f32]) {
    let half = x.len() / 2;
    let mut stack = [0.0f32; 256];
    let mut heap = Vec::new();
    let tmp: &mut [f32] = if x.len() <= stack.len() {
        &mut stack[..x.len()]
    } else {
        heap.resize(x.len(), 0.0);
        &mut heap
    };
    for i in 0..half {
        tmp[i] = x[2 * i];
        tmp[half + i] = x[2 * i + 1];
    }
    x.copy_from_slice(tmp);
}
