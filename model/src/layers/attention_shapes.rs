//! Shapes derived from the config, shared by loaders and the checkpoint generator.

use crate::config::{AttentionConfig, ModelConfig};
use crate::layers::attention::mla::MlaShape;
use crate::layers::attention::GqaShape;

pub fn gqa_shape(config: &ModelConfig) -> Option<GqaShape> {
    match config.attention {
        AttentionConfig::Gqa {
            num_heads,
            num_kv_heads,
            head_dim,
            qk_norm,
            bias,
        } => Some(GqaShape {
            hidden: config.hidden_size,
            heads: num_heads,
            kv_heads: num_kv_heads,
            head_dim,
            qk_norm,
            bias,
        }),
        AttentionConfig::Mla { .. } => None,
    }
}

pub fn mla_shape(config: &ModelConfig) -> Option<MlaShape> {
    match config.attention {
        AttentionConfig::Mla {
            num_heads,
            q_lora_rank,
            kv_lora_rank,
            qk_nope_head_dim,
            qk_rope_head_dim,
            v_head_dim,
            ..
        } => Some(MlaShape {
            hidden: config.hidden_size,
            heads: num_heads,
            q_lora_rank,
            kv_lora_rank,
            nope: qk_nope_head_dim,
            rope: qk_rope_head_dim,
            v: v_head_dim,
        }),
        AttentionConfig::Gqa { .. } => None,
    }
}
