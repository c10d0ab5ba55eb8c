//! DeepSeek-V3 / R1: MLA attention, dense MLP in the first `first_k_dense_replace` layers, then
//! sigmoid-gated group-limited MoE with shared experts.

use super::{layer_prefix, MoeNames};
use crate::checkpoint::Checkpoint;
use crate::config::{AttentionConfig, ModelConfig};
use crate::error::{ModelError, Result};
use crate::layers::attention::{Attention, MlaAttention};
use crate::layers::attention_shapes::mla_shape;
use crate::layers::mlp::MlpNames;

pub fn expert_names(layer: usize, expert: usize) -> MlpNames {
    MlpNames::proj(&format!("{}.mlp.experts.{expert}", layer_prefix(layer)))
}

pub fn moe_names(config: &ModelConfig, layer: usize) -> MoeNames {
    let p = layer_prefix(layer);
    MoeNames {
        gate: format!("{p}.mlp.gate.weight"),
        correction_bias: Some(format!("{p}.mlp.gate.e_score_correction_bias")),
        shared: (config.moe.n_shared_experts > 0)
            .then(|| MlpNames::proj(&format!("{p}.mlp.shared_experts"))),
    }
}

pub fn load_attention(ckpt: &Checkpoint, config: &ModelConfig, layer: usize) -> Result<Attention> {
    let AttentionConfig::Mla {
        rope_interleave, ..
    } = config.attention
    else {
        return Err(ModelError::Config {
            path: ckpt.dir().join("config.json"),
            message: "deepseek_v3 needs MLA attention settings".into(),
        });
    };
    let shape = mla_shape(config).ok_or_else(|| ModelError::Config {
        path: ckpt.dir().join("config.json"),
        message: "deepseek_v3 needs MLA attention settings".into(),
    })?;
    Ok(Attention::Mla(MlaAttention::load(
        ckpt,
        &format!("{}.self_attn", layer_prefix(layer)),
        shape,
        rope_interleave,
        config.softmax_scale(),
        config.rms_norm_eps,
    )?))
}
