//! Per-family checkpoint naming and layer construction. Each family file says where its
//! tensors live; the shared layers do the math.
//!
//! GLM-4.5 (`glm4_moe`) has no file of its own: its MoE layers are named as DeepSeek-V3's
//! (`mlp.gate.e_score_correction_bias`, `mlp.shared_experts`), its attention as Qwen3's
//! plus `{q,k,v}_proj.bias`. GLM-4.7-Flash (`glm4_moe_lite`) names everything as
//! DeepSeek-V3 does.

pub mod deepseek_v3;
pub mod minimax_m2;
pub mod mixtral;
pub mod qwen3_moe;

use crate::checkpoint::Checkpoint;
use crate::config::{Family, ModelConfig};
use crate::error::Result;
use crate::layers::attention::Attention;
use crate::layers::mlp::MlpNames;

/// `model.layers.{layer}`.
pub fn layer_prefix(layer: usize) -> String {
    format!("model.layers.{layer}")
}

/// Names of routed expert `expert` of `layer`.
pub fn expert_names(family: Family, layer: usize, expert: usize) -> MlpNames {
    match family {
        Family::DeepseekV3 => deepseek_v3::expert_names(layer, expert),
        Family::Qwen3Moe => qwen3_moe::expert_names(layer, expert),
        Family::Mixtral | Family::MinimaxM2 => mixtral::expert_names(layer, expert),
        Family::Glm4Moe | Family::Glm4MoeLite => deepseek_v3::expert_names(layer, expert),
    }
}

/// Checkpoint names of a MoE layer's router-side parts.
pub struct MoeNames {
    pub gate: String,
    pub correction_bias: Option<String>,
    pub shared: Option<MlpNames>,
}

pub fn moe_names(config: &ModelConfig, layer: usize) -> MoeNames {
    match config.family {
        Family::DeepseekV3 => deepseek_v3::moe_names(config, layer),
        Family::Qwen3Moe => qwen3_moe::moe_names(layer),
        Family::Mixtral => mixtral::moe_names(layer),
        Family::MinimaxM2 => minimax_m2::moe_names(layer),
        Family::Glm4Moe | Family::Glm4MoeLite => deepseek_v3::moe_names(config, layer),
    }
}

/// Names of a dense layer's MLP (every family uses `mlp.{gate,up,down}_proj`).
pub fn dense_mlp_names(layer: usize) -> MlpNames {
    MlpNames::proj(&format!("{}.mlp", layer_prefix(layer)))
}

pub fn load_attention(ckpt: &Checkpoint, config: &ModelConfig, layer: usize) -> Result<Attention> {
    match config.family {
        Family::DeepseekV3 | Family::Glm4MoeLite => {
            deepseek_v3::load_attention(ckpt, config, layer)
        }
        Family::Qwen3Moe | Family::Mixtral | Family::Glm4Moe | Family::MinimaxM2 => {
            qwen3_moe::load_gqa(ckpt, config, layer)
        }
    }
}
