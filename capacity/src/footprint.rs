//! What a checkpoint weighs: parameters by part (dense part, routed experts, MTP layers), the
//! bytes they take in a weight format, and the work one token costs each part. Read from the
//! same [`ModelConfig`] the engine loads, so the planner counts the model the cluster runs.

use moe_model::config::{AttentionConfig, ModelConfig, QkNorm};
use serde::Serialize;

/// How the weights are stored on the GPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightFormat {
    /// DeepSeek's checkpoints: every projection in e4m3 with one f32 scale per 128x128 block;
    /// norms, the MoE gate, embeddings and lm_head stay bf16.
    Fp8,
    /// Everything in bf16.
    Bf16,
}

/// Side of the square FP8 scale blocks (`quantization_config.weight_block_size`).
const FP8_BLOCK: usize = 128;

impl WeightFormat {
    /// Bytes of an `rows x cols` projection, block scales included.
    fn matrix_bytes(self, rows: usize, cols: usize) -> f64 {
        match self {
            WeightFormat::Bf16 => (rows * cols * 2) as f64,
            WeightFormat::Fp8 => {
                let blocks = rows.div_ceil(FP8_BLOCK) * cols.div_ceil(FP8_BLOCK);
                (rows * cols + blocks * 4) as f64
            }
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            WeightFormat::Fp8 => "fp8",
            WeightFormat::Bf16 => "bf16",
        }
    }

    /// Peak rate of a GEMM over these weights: FP8 tensor cores, or bf16.
    pub fn uses_fp8_math(self) -> bool {
        self == WeightFormat::Fp8
    }
}

/// Parameters and bytes of one part of the model.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Weights {
    pub params: f64,
    pub bytes: f64,
}

impl Weights {
    fn matrix(format: WeightFormat, rows: usize, cols: usize) -> Self {
        Self {
            params: (rows * cols) as f64,
            bytes: format.matrix_bytes(rows, cols),
        }
    }

    /// A vector or table kept in bf16 whatever the format (norms, gate, embeddings).
    fn bf16(params: usize) -> Self {
        Self {
            params: params as f64,
            bytes: (params * 2) as f64,
        }
    }

    pub fn times(self, n: f64) -> Self {
        Self {
            params: self.params * n,
            bytes: self.bytes * n,
        }
    }
}

impl std::ops::Add for Weights {
    type Output = Weights;
    fn add(self, o: Weights) -> Weights {
        Weights {
            params: self.params + o.params,
            bytes: self.bytes + o.bytes,
        }
    }
}

impl std::iter::Sum for Weights {
    fn sum<I: Iterator<Item = Weights>>(iter: I) -> Weights {
        iter.fold(Weights::default(), |a, b| a + b)
    }
}

/// The model's weights by where they live: the dense part runs on every attention GPU (a
/// router, or every GPU when colocated); routed experts are spread over the expert GPUs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Footprint {
    pub format: WeightFormat,
    /// Attention, norms, MoE gates, shared experts, dense MLP layers, embeddings and lm_head
    /// of the main layers.
    pub dense: Weights,
    /// One routed expert (gate, up and down projections).
    pub expert: Weights,
    /// Routed experts of one MoE layer.
    pub experts_per_layer: usize,
    /// MoE layers holding routed experts (MTP layers included).
    pub moe_layers: usize,
    /// The MTP layers' dense part (their attention, shared experts, projections, and the
    /// embeddings and head the checkpoint stores again for them).
    pub mtp_dense: Weights,
    /// Attention projections of one layer.
    pub attention_per_layer: Weights,
    /// Shared experts of one MoE layer.
    pub shared_per_layer: Weights,
    /// One dense MLP layer.
    pub dense_mlp_per_layer: Weights,
    /// lm_head.
    pub head: Weights,
}

impl Footprint {
    pub fn of(config: &ModelConfig, format: WeightFormat) -> Self {
        let h = config.hidden_size;
        let attention_per_layer = attention_weights(config, format);
        let norms = Weights::bf16(2 * h);
        let moe = &config.moe;
        let ffn = |inter: usize| {
            Weights::matrix(format, inter, h).times(2.0) + Weights::matrix(format, h, inter)
        };
        let expert = ffn(moe.intermediate_size);
        let shared_per_layer = ffn(moe.intermediate_size * moe.n_shared_experts);
        let gate = Weights::bf16(moe.num_experts * h + moe.num_experts);
        let dense_mlp_per_layer = ffn(config.dense_intermediate_size);
        let moe_count = config.moe_layers.iter().filter(|&&m| m).count();
        let dense_count = config.num_layers - moe_count;
        let embed = Weights::bf16(config.vocab_size * h);
        let head = if config.tie_word_embeddings {
            Weights::default()
        } else {
            Weights::bf16(config.vocab_size * h)
        };
        let per_moe_layer = attention_per_layer + norms + gate + shared_per_layer;
        let per_dense_layer = attention_per_layer + norms + dense_mlp_per_layer;
        let dense = per_moe_layer.times(moe_count as f64)
            + per_dense_layer.times(dense_count as f64)
            + embed
            + head
            + Weights::bf16(h);
        // DeepSeek's MTP module: two norms and a [2h -> h] projection before one MoE decoder
        // layer, its own final norm, and copies of the embeddings and head.
        let mtp_one =
            per_moe_layer + Weights::bf16(3 * h) + Weights::matrix(format, h, 2 * h) + embed + head;
        let mtp_dense = mtp_one.times(config.mtp_layers as f64);
        Self {
            format,
            dense,
            expert,
            experts_per_layer: moe.num_experts,
            moe_layers: moe_count + config.mtp_layers,
            mtp_dense,
            attention_per_layer,
            shared_per_layer,
            dense_mlp_per_layer,
            head,
        }
    }

    /// Routed experts of every MoE layer.
    pub fn routed(&self) -> Weights {
        self.expert
            .times((self.experts_per_layer * self.moe_layers) as f64)
    }

    /// Everything the checkpoint holds.
    pub fn total(&self) -> Weights {
        self.dense + self.mtp_dense + self.routed()
    }

    /// The main model without its MTP layers (what "671B" counts).
    pub fn main_params(&self, config: &ModelConfig) -> f64 {
        let main_moe = self.moe_layers - config.mtp_layers;
        self.dense.params + self.expert.params * (self.experts_per_layer * main_moe) as f64
    }

    /// Parameters one token of the main model touches: every dense weight (its embedding row
    /// looked up, the table counted whole, as DeepSeek counts its "37B") and top-k routed
    /// experts per MoE layer.
    pub fn active_params(&self, config: &ModelConfig) -> f64 {
        let main_moe = self.moe_layers - config.mtp_layers;
        self.dense.params + self.expert.params * (config.moe.top_k * main_moe) as f64
    }
}

/// One layer's attention projections.
fn attention_weights(config: &ModelConfig, format: WeightFormat) -> Weights {
    let h = config.hidden_size;
    match config.attention {
        AttentionConfig::Mla {
            num_heads,
            q_lora_rank,
            kv_lora_rank,
            qk_nope_head_dim,
            qk_rope_head_dim,
            v_head_dim,
            ..
        } => {
            let q_head = qk_nope_head_dim + qk_rope_head_dim;
            let q = match q_lora_rank {
                Some(r) => {
                    Weights::matrix(format, r, h)
                        + Weights::bf16(r)
                        + Weights::matrix(format, num_heads * q_head, r)
                }
                None => Weights::matrix(format, num_heads * q_head, h),
            };
            q + Weights::matrix(format, kv_lora_rank + qk_rope_head_dim, h)
                + Weights::bf16(kv_lora_rank)
                + Weights::matrix(
                    format,
                    num_heads * (qk_nope_head_dim + v_head_dim),
                    kv_lora_rank,
                )
                + Weights::matrix(format, h, num_heads * v_head_dim)
        }
        AttentionConfig::Gqa {
            num_heads,
            num_kv_heads,
            head_dim,
            qk_norm,
            bias,
        } => {
            let norms = match qk_norm {
                QkNorm::None => 0,
                QkNorm::PerHead => 2 * head_dim,
                QkNorm::AllHeads => (num_heads + num_kv_heads) * head_dim,
            };
            let biases = if bias {
                (num_heads + 2 * num_kv_heads) * head_dim
            } else {
                0
            };
            Weights::matrix(format, num_heads * head_dim, h)
                + Weights::matrix(format, num_kv_heads * head_dim, h).times(2.0)
                + Weights::matrix(format, h, num_heads * head_dim)
                + Weights::bf16(norms + biases)
        }
    }
}

/// Bytes one token leaves in the attention cache of every layer it runs through (the MTP
/// layers' too when they draft), at `value_bytes` per value.
pub fn kv_bytes_per_token(config: &ModelConfig, value_bytes: usize, with_mtp: bool) -> f64 {
    let layers = config.num_layers + if with_mtp { config.mtp_layers } else { 0 };
    (config.kv_values_per_token_per_layer() * layers * value_bytes) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::deepseek_v3;

    /// Worked by hand from DeepSeek-V3's config.json. Attention per layer: q_a 7168x1536 =
    /// 11,010,048; q_b 1536x(128x192) = 37,748,736; kv_a 7168x576 = 4,128,768; kv_b
    /// 512x(128x256) = 16,777,216; o 7168x16384 = 117,440,512; norms 1536 + 512: 187,107,328
    /// in all. One expert: 3 x 7168 x 2048 = 44,040,192. Main model: 61 x 187.1M (11.413B) +
    /// 3 dense MLPs of 3 x 7168 x 18432 (1.189B) + 58 x (256 routed + 1 shared) experts
    /// (653.93B + 2.554B) + 58 gates of 256 x 7168 + 256 (0.106B) + embeddings and head
    /// 2 x 129280 x 7168 (1.853B) + norms: 671.03B. Active: 37.5B (the report's "37B").
    #[test]
    fn deepseek_v3_parameters_are_671b_with_37b_active() {
        let config = deepseek_v3();
        let f = Footprint::of(&config, WeightFormat::Fp8);
        assert_eq!(f.attention_per_layer.params, 187_107_328.0);
        assert_eq!(f.expert.params, 44_040_192.0);
        let main = f.main_params(&config);
        assert!((main / 1e9 - 671.03).abs() < 0.01, "{main}");
        let active = f.active_params(&config);
        assert!((active / 1e9 - 37.55).abs() < 0.05, "{active}");
        // The MTP layer: one more MoE layer (11.5B) + eh_proj 2 x 7168^2 + embeddings and head
        // again: 685B in the checkpoint, as DeepSeek states.
        let total = f.total().params / 1e9;
        assert!((total - 684.5).abs() < 1.0, "{total}");
    }

    /// FP8: one byte per projection weight plus an f32 per 128x128 block (1/4096 more); the
    /// bf16 parts (embeddings, head, gates, norms: about 2.1B of 685B) take two.
    #[test]
    fn fp8_bytes_are_about_one_per_weight_and_bf16_two() {
        let config = deepseek_v3();
        let fp8 = Footprint::of(&config, WeightFormat::Fp8).total();
        let bf16 = Footprint::of(&config, WeightFormat::Bf16).total();
        assert_eq!(bf16.bytes, 2.0 * bf16.params);
        let ratio = fp8.bytes / fp8.params;
        assert!(ratio > 1.0 && ratio < 1.01, "{ratio}");
        let expert = Footprint::of(&config, WeightFormat::Fp8).expert;
        // gate/up: 16 x 56 blocks each, down: 56 x 16: 2688 scales of 4 bytes.
        assert_eq!(expert.bytes, 44_040_192.0 + 2688.0 * 4.0);
    }

    /// MLA caches the latent (512) and the rope key (64) per layer: 576 values, against
    /// 2 x 128 heads x 128 = 32,768 for the same model with full multi-head keys and values.
    #[test]
    fn mla_kv_is_the_latent_plus_the_rope_key_per_layer() {
        let config = deepseek_v3();
        assert_eq!(config.kv_values_per_token_per_layer(), 576);
        // 61 layers x 576 x 4 bytes: our router's f32 cache.
        assert_eq!(kv_bytes_per_token(&config, 4, false), 140_544.0);
        // 62 layers (61 + MTP) x 576 x 2 bytes: DeepSeek's bf16 cache, drafting with MTP.
        assert_eq!(kv_bytes_per_token(&config, 2, true), 71_424.0);
    }
}
