//! The MoE gate: router logits, then the family's top-k rule, producing [`ExpertRoutes`].

use crate::backend::{ops, PackedMatrix};
use crate::checkpoint::Checkpoint;
use crate::config::{Gating, MoeConfig};
use crate::error::Result;
use crate::routes::ExpertRoutes;

#[derive(Debug)]
pub struct MoeGate {
    /// `[num_experts, hidden]`.
    weight: PackedMatrix,
    /// DeepSeek's `e_score_correction_bias`: shifts selection, never the weights.
    correction_bias: Option<Vec<f32>>,
    gating: Gating,
    top_k: usize,
    num_experts: usize,
}

impl MoeGate {
    pub fn load(
        ckpt: &Checkpoint,
        weight_name: &str,
        bias_name: Option<&str>,
        moe: &MoeConfig,
        hidden: usize,
    ) -> Result<Self> {
        let weight = ckpt.load_f32(weight_name, &[moe.num_experts, hidden])?;
        let correction_bias = match bias_name {
            Some(name) => Some(ckpt.load_f32(name, &[moe.num_experts])?),
            None => None,
        };
        Ok(Self {
            weight: PackedMatrix::from_rows(&weight, moe.num_experts, hidden),
            correction_bias,
            gating: moe.gating.clone(),
            top_k: moe.top_k,
            num_experts: moe.num_experts,
        })
    }

    /// `x` is `[rows, hidden]` (the post-attention normalised hidden states).
    pub fn route(&self, x: &[f32], rows: usize) -> ExpertRoutes {
        let logits = self.weight.matmul(x, rows);
        self.rule().select(&logits, self.correction_bias.as_deref())
    }

    fn rule(&self) -> GateRule {
        GateRule {
            gating: self.gating.clone(),
            top_k: self.top_k,
            num_experts: self.num_experts,
        }
    }
}

/// The family's top-k rule, apart from the logits GEMM: what any device that computes the
/// router logits itself (the GPU dense part) applies the same way.
#[derive(Debug, Clone)]
pub struct GateRule {
    pub gating: Gating,
    pub top_k: usize,
    pub num_experts: usize,
}

impl GateRule {
    pub fn new(moe: &MoeConfig) -> Self {
        Self {
            gating: moe.gating.clone(),
            top_k: moe.top_k,
            num_experts: moe.num_experts,
        }
    }

    /// `logits` is `[rows, num_experts]`; `correction_bias` DeepSeek's selection bias.
    pub fn select(&self, logits: &[f32], correction_bias: Option<&[f32]>) -> ExpertRoutes {
        let rows = logits.len() / self.num_experts.max(1);
        let mut routes = ExpertRoutes::with_capacity(rows, rows * self.top_k);
        let mut choices = Vec::with_capacity(self.top_k);
        for row in logits.chunks_exact(self.num_experts) {
            choices.clear();
            match &self.gating {
                Gating::SoftmaxTopK { norm_topk_prob } => {
                    let mut probs = row.to_vec();
                    ops::softmax_in_place(&mut probs);
                    for e in top_k_indices(&probs, self.top_k) {
                        choices.push((e as u32, probs[e]));
                    }
                    if *norm_topk_prob {
                        normalise(&mut choices, 0.0);
                    }
                }
                Gating::SigmoidGroupLimited {
                    n_group,
                    topk_group,
                    norm_topk_prob,
                    routed_scaling_factor,
                } => {
                    let scores: Vec<f32> = row.iter().map(|&l| 1.0 / (1.0 + (-l).exp())).collect();
                    let mut choice: Vec<f32> = match correction_bias {
                        Some(bias) => scores.iter().zip(bias).map(|(s, b)| s + b).collect(),
                        None => scores.clone(),
                    };
                    let group_size = self.num_experts / n_group;
                    let group_scores: Vec<f32> = choice
                        .chunks_exact(group_size)
                        .map(|g| top_k_indices(g, 2).iter().map(|&i| g[i]).sum())
                        .collect();
                    let kept = top_k_indices(&group_scores, *topk_group);
                    for (g, chunk) in choice.chunks_exact_mut(group_size).enumerate() {
                        if !kept.contains(&g) {
                            // transformers masks with 0.0, not -inf; keep that exactly.
                            chunk.iter_mut().for_each(|v| *v = 0.0);
                        }
                    }
                    for e in top_k_indices(&choice, self.top_k) {
                        choices.push((e as u32, scores[e]));
                    }
                    if *norm_topk_prob {
                        normalise(&mut choices, 1e-20);
                    }
                    for c in choices.iter_mut() {
                        c.1 *= routed_scaling_factor;
                    }
                }
            }
            routes.push_row(&mut choices);
        }
        routes
    }
}

fn normalise(choices: &mut [(u32, f32)], epsilon: f32) {
    let sum: f32 = choices.iter().map(|c| c.1).sum::<f32>() + epsilon;
    for c in choices.iter_mut() {
        c.1 /= sum;
    }
}

/// Indices of the `k` largest values, largest first; ties go to the lower index.
pub fn top_k_indices(values: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..values.len()).collect();
    idx.sort_by(|&a, &b| values[b].total_cmp(&values[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}
