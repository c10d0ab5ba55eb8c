//! Qwen3-MoE: grouped-query attention with per-head q/k RMSNorm, softmax top-k gating,
//! `decoder_sparse_step` and `mlp_only_layers` choosing which layers are sparse.

use super::{layer_prefix, MoeNames};
use crate::checkpoint::Checkpoint;
use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::layers::attention::{Attention, GqaAttention};
use crate::layers::attention_shapes::gqa_shape;
use crate::layers::mlp::MlpNames;

pub fn expert_names(layer: usize, expert: usize) -> MlpNames {
    MlpNames::proj(&format!("{}.mlp.experts.{expert}", layer_prefix(layer)))
}

pub fn moe_names(layer: usize) -> MoeNames {
    MoeNames {
        gate: format!("{}.mlp.gate.weight", layer_prefix(layer)),
        correction_bias: None,
        shared: None,
    }
}

/// GQA attention as Qwen3-MoE, Mixtral and GLM-4.5 name it (`q_proj`, `k_proj`, `v_proj`,
/// `o_proj`, plus Qwen3's `q_norm` / `k_norm` and GLM's `*_proj.bias`).
pub fn load_gqa(ckpt: &Checkpoint, config: &ModelConfig, layer: usize) -> Result<Attention> {
    let shape = gqa_shape(config).ok_or_else(|| ModelError::Config {
        path: ckpt.dir().join("config.json"),
        message: "grouped-query attention settings expected".into(),
    })?;
    Ok(Attention::Gqa(GqaAttention::load(
        ckpt,
        &format!("{}.self_attn", layer_prefix(layer)),
        shape,
        config.softmax_scale(),
        config.rms_norm_eps,
    )?))
}
