//! MiniMax-M2: Mixtral's names for the MoE block (`block_sparse_moe.gate`,
//! `block_sparse_moe.experts.N.w1/w2/w3`) plus the gate's correction bias beside it
//! (`block_sparse_moe.e_score_correction_bias`); attention as Qwen3's, its q/k norms one
//! weight per element of all heads.

use super::{layer_prefix, MoeNames};

pub fn moe_names(layer: usize) -> MoeNames {
    let p = format!("{}.block_sparse_moe", layer_prefix(layer));
    MoeNames {
        gate: format!("{p}.gate.weight"),
        correction_bias: Some(format!("{p}.e_score_correction_bias")),
        shared: None,
    }
}
