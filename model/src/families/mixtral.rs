//! Mixtral: grouped-query attention, softmax top-k renormalised, experts named
//! `block_sparse_moe.experts.N.w1/w2/w3` (gate, down, up).

use super::{layer_prefix, MoeNames};
use crate::layers::mlp::MlpNames;

pub fn expert_names(layer: usize, expert: usize) -> MlpNames {
    MlpNames::mixtral(&format!(
        "{}.block_sparse_moe.experts.{expert}",
        layer_prefix(layer)
    ))
}

pub fn moe_names(layer: usize) -> MoeNames {
    MoeNames {
        gate: format!("{}.block_sparse_moe.gate.weight", layer_prefix(layer)),
        correction_bias: None,
        shared: None,
    }
}
