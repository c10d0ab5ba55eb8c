//! Typed model configuration, read from a Hugging Face `config.json`.
//!
//! The hub files differ per family (`num_experts` vs `n_routed_experts` vs `num_local_experts`,
//! `rope_scaling` vs the newer `rope_parameters`); everything is normalised here into one
//! [`ModelConfig`] so that the layers never look at raw JSON.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{ModelError, Result};

/// The model families the engine implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    DeepseekV3,
    Qwen3Moe,
    Mixtral,
    /// GLM-4.5 / 4.6 and GLM-4.5-Air: GQA with q/k/v biases and half-rotary heads, then
    /// DeepSeek-V3's MoE block (sigmoid gate, correction bias, shared expert).
    Glm4Moe,
    /// GLM-4.7-Flash (`glm4_moe_lite`): DeepSeek-V3's Multi-head Latent Attention and MoE
    /// block under GLM's names for its config (a dense first layer by default, optional
    /// `mlp_layer_types`); the tensors are named as DeepSeek-V3's.
    Glm4MoeLite,
    /// MiniMax-M2: GQA with one RMSNorm over all query (and all key) heads and rotary
    /// embeddings on part of each head, then every layer a MoE of Mixtral's names with
    /// DeepSeek-V3's sigmoid gate (a correction bias for the choice, no groups, no shared
    /// expert).
    MinimaxM2,
}

impl Family {
    pub fn from_model_type(model_type: &str) -> Result<Self> {
        match model_type {
            // Kimi-K2 is DeepSeek-V3's architecture under Moonshot's name (its config's
            // `architectures` says `DeepseekV3ForCausalLM`).
            "deepseek_v3" | "kimi_k2" => Ok(Family::DeepseekV3),
            "qwen3_moe" => Ok(Family::Qwen3Moe),
            "mixtral" => Ok(Family::Mixtral),
            "glm4_moe" => Ok(Family::Glm4Moe),
            "glm4_moe_lite" => Ok(Family::Glm4MoeLite),
            "minimax_m2" => Ok(Family::MinimaxM2),
            other => Err(ModelError::UnsupportedModelType(other.to_string())),
        }
    }

    /// Whether the family's checkpoints ship multi-token-prediction layers of DeepSeek-V3's
    /// design (`eh_proj`, `enorm`, `hnorm`, `shared_head` and a decoder layer after the main
    /// ones): DeepSeek-V3's, GLM-4.5's and GLM-4.7-Flash's do.
    pub fn ships_mtp_layers(self) -> bool {
        matches!(
            self,
            Family::DeepseekV3 | Family::Glm4Moe | Family::Glm4MoeLite
        )
    }

    /// Whether attention is DeepSeek's Multi-head Latent Attention (tensors named as
    /// DeepSeek-V3's), not grouped-query attention.
    pub fn latent_attention(self) -> bool {
        matches!(self, Family::DeepseekV3 | Family::Glm4MoeLite)
    }

    pub fn model_type(self) -> &'static str {
        match self {
            Family::DeepseekV3 => "deepseek_v3",
            Family::Qwen3Moe => "qwen3_moe",
            Family::Mixtral => "mixtral",
            Family::Glm4Moe => "glm4_moe",
            Family::Glm4MoeLite => "glm4_moe_lite",
            Family::MinimaxM2 => "minimax_m2",
        }
    }
}

/// Which RMSNorm queries and keys get before the rotary embedding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QkNorm {
    None,
    /// Qwen3's: each head on its own, one weight of `head_dim` shared by the heads.
    PerHead,
    /// MiniMax-M2's (`qk_norm_type: "per_layer"`): all heads of a row at once, one weight per
    /// element (`heads * head_dim` for queries, `kv_heads * head_dim` for keys).
    AllHeads,
}

/// Attention flavour of a family.
#[derive(Debug, Clone, PartialEq)]
pub enum AttentionConfig {
    /// Grouped-query attention (Qwen3-MoE, Mixtral, GLM-4.5, MiniMax-M2); `qk_norm` is Qwen3's
    /// per-head or MiniMax-M2's all-heads RMSNorm, `bias` GLM's q/k/v biases. The rotated dimensions per head are the rope's
    /// (`RopeConfig::dim`: GLM rotates the first half of each head).
    Gqa {
        num_heads: usize,
        num_kv_heads: usize,
        head_dim: usize,
        qk_norm: QkNorm,
        bias: bool,
    },
    /// DeepSeek's Multi-head Latent Attention.
    Mla {
        num_heads: usize,
        q_lora_rank: Option<usize>,
        kv_lora_rank: usize,
        qk_nope_head_dim: usize,
        qk_rope_head_dim: usize,
        v_head_dim: usize,
        /// Rotary dims are stored interleaved (pairs `2i, 2i+1`) and must be de-interleaved first.
        rope_interleave: bool,
    },
}

impl AttentionConfig {
    pub fn num_heads(&self) -> usize {
        match self {
            AttentionConfig::Gqa { num_heads, .. } | AttentionConfig::Mla { num_heads, .. } => {
                *num_heads
            }
        }
    }
}

/// Rotary position embedding scaling.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    Linear {
        factor: f64,
    },
    Yarn {
        factor: f64,
        original_max_position_embeddings: usize,
        beta_fast: f64,
        beta_slow: f64,
        mscale: Option<f64>,
        mscale_all_dim: Option<f64>,
        attention_factor: Option<f64>,
        truncate: bool,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct RopeConfig {
    pub theta: f64,
    /// Number of rotated dimensions per head.
    pub dim: usize,
    pub scaling: RopeScaling,
}

/// How a MoE gate turns router logits into (expert, weight) choices.
#[derive(Debug, Clone, PartialEq)]
pub enum Gating {
    /// Softmax over all experts, top-k, optionally renormalised (Qwen3-MoE, Mixtral).
    SoftmaxTopK { norm_topk_prob: bool },
    /// DeepSeek-V3: sigmoid scores, `e_score_correction_bias` for selection only,
    /// group-limited top-k, optional renormalisation, then `routed_scaling_factor`.
    SigmoidGroupLimited {
        n_group: usize,
        topk_group: usize,
        norm_topk_prob: bool,
        routed_scaling_factor: f32,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct MoeConfig {
    pub num_experts: usize,
    pub top_k: usize,
    pub intermediate_size: usize,
    pub n_shared_experts: usize,
    pub gating: Gating,
}

/// Bytes of one cached value: the KV cache holds f32 (the router's KV budget counts it so,
/// and the capacity planner sizes a router's cache with it).
pub const KV_VALUE_BYTES: usize = 4;

/// Everything the engine needs to know about a checkpoint's architecture.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub family: Family,
    pub hidden_size: usize,
    pub vocab_size: usize,
    pub num_layers: usize,
    pub rms_norm_eps: f32,
    pub max_position_embeddings: usize,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub tie_word_embeddings: bool,
    pub attention: AttentionConfig,
    pub rope: RopeConfig,
    /// Intermediate size of the dense MLP layers.
    pub dense_intermediate_size: usize,
    pub moe: MoeConfig,
    /// `moe_layers[i]` is true when layer `i` is a MoE layer, false when it is a dense MLP.
    pub moe_layers: Vec<bool>,
    /// Multi-token-prediction layers the checkpoint ships after the main ones
    /// (`num_nextn_predict_layers`; DeepSeek-V3 has one). The offline engine does not run
    /// them; a router drafts with the first (`--speculative-config` `deepseek_mtp`,
    /// [`crate::mtp::MtpHead`]); they count in the weights a deployment loads.
    pub mtp_layers: usize,
}

/// Fields as they appear in hub `config.json` files; every family-specific key is optional.
#[derive(Debug, Deserialize)]
struct RawConfig {
    hidden_size: usize,
    vocab_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    intermediate_size: Option<usize>,
    moe_intermediate_size: Option<usize>,
    rms_norm_eps: Option<f64>,
    max_position_embeddings: Option<usize>,
    bos_token_id: Option<Value>,
    eos_token_id: Option<Value>,
    tie_word_embeddings: Option<bool>,
    hidden_act: Option<String>,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    rope_parameters: Option<Value>,
    /// GLM's share of each head that is rotated (top level in its hub files, inside
    /// `rope_parameters` in transformers 5's).
    partial_rotary_factor: Option<f64>,
    attention_bias: Option<bool>,
    use_qk_norm: Option<bool>,
    // MoE, by family
    num_experts: Option<usize>,
    num_local_experts: Option<usize>,
    n_routed_experts: Option<usize>,
    num_experts_per_tok: Option<usize>,
    norm_topk_prob: Option<bool>,
    decoder_sparse_step: Option<usize>,
    mlp_only_layers: Option<Vec<usize>>,
    n_shared_experts: Option<usize>,
    n_group: Option<usize>,
    topk_group: Option<usize>,
    routed_scaling_factor: Option<f64>,
    first_k_dense_replace: Option<usize>,
    /// GLM-4.7-Flash's per-layer `"dense"` / `"sparse"` list (transformers 5 writes it).
    mlp_layer_types: Option<Vec<String>>,
    // MiniMax-M2's names: rotated dimensions per head, where its q/k norm applies, whether
    // the gate has a correction bias, its shared expert's width, each layer's attention kind.
    rotary_dim: Option<usize>,
    qk_norm_type: Option<String>,
    use_routing_bias: Option<bool>,
    shared_intermediate_size: Option<usize>,
    attn_type_list: Option<Vec<u32>>,
    num_nextn_predict_layers: Option<usize>,
    moe_layer_freq: Option<usize>,
    scoring_func: Option<String>,
    topk_method: Option<String>,
    // MLA
    q_lora_rank: Option<usize>,
    kv_lora_rank: Option<usize>,
    qk_nope_head_dim: Option<usize>,
    qk_rope_head_dim: Option<usize>,
    v_head_dim: Option<usize>,
    rope_interleave: Option<bool>,
}

impl ModelConfig {
    /// The ids that end a generation: the config's, and the tokenizer's end-of-sequence token
    /// when the config does not list it (checkpoints disagree on which file names it).
    pub fn stop_ids(&self, tokenizer_eos: Option<u32>) -> Vec<u32> {
        let mut ids = self.eos_token_ids.clone();
        if let Some(eos) = tokenizer_eos {
            if !ids.contains(&eos) {
                ids.push(eos);
            }
        }
        ids
    }

    /// Reads `dir/config.json`, and the end-of-sequence ids `dir/generation_config.json`
    /// adds (transformers' `generate` stops at those too).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
        let mut config = Self::from_json_str(&text, &path)?;
        for id in crate::generation_config::GenerationConfig::from_dir(dir)?.eos_token_ids {
            if !config.eos_token_ids.contains(&id) {
                config.eos_token_ids.push(id);
            }
        }
        Ok(config)
    }

    pub fn from_json_str(text: &str, path: &Path) -> Result<Self> {
        let bad = |message: String| ModelError::Config {
            path: path.to_path_buf(),
            message,
        };
        let value: Value = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        // Check model_type first so that an unknown family is reported as such, not as a missing key.
        let model_type = value
            .get("model_type")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("missing \"model_type\"".into()))?;
        let family = Family::from_model_type(model_type)?;
        // Weights quantized otherwise (GPTQ, AWQ, compressed-tensors schemes other than
        // Kimi-K2-Thinking's INT4) are stored under other tensor names: refused here by name,
        // not at a missing tensor.
        let quantization = value.get("quantization_config");
        match quantization
            .and_then(|q| q.get("quant_method"))
            .and_then(Value::as_str)
        {
            None | Some("fp8") => {}
            Some("compressed-tensors") => {
                let q = quantization.unwrap_or(&Value::Null);
                crate::checkpoint::packed_int4::Int4Scheme::from_quantization_config(q)
                    .map_err(|e| bad(format!("quantization_config: {e}")))?;
            }
            Some(other) => {
                return Err(bad(format!(
                    "quantization_config.quant_method {other:?} is not supported: only \
                     DeepSeek's block-scaled \"fp8\", compressed-tensors' INT4 \
                     \"pack-quantized\" (and unquantized bf16, f16 or f32 weights)"
                )))
            }
        }
        let raw: RawConfig = serde_json::from_value(value).map_err(|e| bad(e.to_string()))?;
        raw.into_config(family).map_err(bad)
    }
}

/// GLM-4.7-Flash's `mlp_layer_types`: one `"dense"` or `"sparse"` per layer.
fn sparse_layers(types: &[String], num_layers: usize) -> std::result::Result<Vec<bool>, String> {
    if types.len() != num_layers {
        return Err(format!(
            "mlp_layer_types names {} layers, the model has {num_layers}",
            types.len()
        ));
    }
    types
        .iter()
        .map(|t| match t.as_str() {
            "sparse" => Ok(true),
            "dense" => Ok(false),
            other => Err(format!(
                "mlp_layer_types holds {other:?}: only \"dense\" and \"sparse\""
            )),
        })
        .collect()
}

fn require<T>(value: Option<T>, key: &str) -> std::result::Result<T, String> {
    value.ok_or_else(|| format!("missing \"{key}\""))
}

fn token_ids(value: &Option<Value>) -> std::result::Result<Vec<u32>, String> {
    match value {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Number(n)) => n
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .map(|n| vec![n])
            .ok_or_else(|| format!("bad token id {n}")),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| {
                v.as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(|| format!("bad token id {v}"))
            })
            .collect(),
        Some(other) => Err(format!("bad token id {other}")),
    }
}

impl RawConfig {
    fn into_config(self, family: Family) -> std::result::Result<ModelConfig, String> {
        if let Some(act) = &self.hidden_act {
            if act != "silu" {
                return Err(format!(
                    "hidden_act {act:?} is not supported (only \"silu\")"
                ));
            }
        }
        if self.num_attention_heads == 0 || self.hidden_size == 0 || self.vocab_size == 0 {
            return Err("hidden_size, vocab_size and num_attention_heads must be positive".into());
        }
        let (attention, rope_dim) = self.attention_config(family)?;
        let max_position_embeddings = self.max_position_embeddings.unwrap_or(4096);
        let rope = self.rope_config(rope_dim, max_position_embeddings)?;
        let (num_experts, top_k) = self.routed_experts(family)?;
        let dense_intermediate_size = require(self.intermediate_size, "intermediate_size")?;
        let (moe, moe_layers) =
            self.moe_config(family, num_experts, top_k, dense_intermediate_size)?;
        Ok(ModelConfig {
            family,
            hidden_size: self.hidden_size,
            vocab_size: self.vocab_size,
            num_layers: self.num_hidden_layers,
            rms_norm_eps: self.rms_norm_eps.unwrap_or(1e-6) as f32,
            max_position_embeddings,
            bos_token_id: token_ids(&self.bos_token_id)?.first().copied(),
            eos_token_ids: token_ids(&self.eos_token_id)?,
            tie_word_embeddings: self.tie_word_embeddings.unwrap_or(false),
            attention,
            rope,
            dense_intermediate_size,
            moe,
            moe_layers,
            mtp_layers: self.num_nextn_predict_layers.unwrap_or(0),
        })
    }

    /// The family's attention, and the number of rotated dimensions per head.
    fn attention_config(
        &self,
        family: Family,
    ) -> std::result::Result<(AttentionConfig, usize), String> {
        let num_heads = self.num_attention_heads;
        match family {
            Family::DeepseekV3 | Family::Glm4MoeLite => {
                let qk_rope = require(self.qk_rope_head_dim, "qk_rope_head_dim")?;
                if !qk_rope.is_multiple_of(2) {
                    return Err("qk_rope_head_dim must be even".into());
                }
                // GLM-4.7-Flash's file says 1.0; a part of the rope dims is not implemented.
                let rotated = self.rotary_dim(qk_rope)?;
                if rotated != qk_rope {
                    return Err(format!(
                        "partial_rotary_factor rotates {rotated} of {qk_rope} qk_rope_head_dim \
                         dimensions: latent attention rotates all of them"
                    ));
                }
                let mla = AttentionConfig::Mla {
                    num_heads,
                    q_lora_rank: self.q_lora_rank,
                    kv_lora_rank: require(self.kv_lora_rank, "kv_lora_rank")?,
                    qk_nope_head_dim: require(self.qk_nope_head_dim, "qk_nope_head_dim")?,
                    qk_rope_head_dim: qk_rope,
                    v_head_dim: require(self.v_head_dim, "v_head_dim")?,
                    rope_interleave: self.rope_interleave.unwrap_or(true),
                };
                Ok((mla, qk_rope))
            }
            Family::Qwen3Moe | Family::Mixtral | Family::Glm4Moe | Family::MinimaxM2 => {
                let head_dim = self.head_dim.unwrap_or(self.hidden_size / num_heads);
                let num_kv_heads = self.num_key_value_heads.unwrap_or(num_heads);
                if num_kv_heads == 0 || !num_heads.is_multiple_of(num_kv_heads) {
                    return Err(format!(
                        "num_attention_heads {num_heads} is not a multiple of num_key_value_heads {num_kv_heads}"
                    ));
                }
                if !head_dim.is_multiple_of(2) {
                    return Err("head_dim must be even".into());
                }
                let glm = family == Family::Glm4Moe;
                let gqa = AttentionConfig::Gqa {
                    num_heads,
                    num_kv_heads,
                    head_dim,
                    qk_norm: self.qk_norm(family)?,
                    bias: glm && self.attention_bias.unwrap_or(false),
                };
                Ok((gqa, self.rotary_dim(head_dim)?))
            }
        }
    }

    /// The family's q/k norm: Qwen3's always, GLM's when `use_qk_norm`, MiniMax-M2's over all
    /// heads unless `use_qk_norm` is false.
    fn qk_norm(&self, family: Family) -> std::result::Result<QkNorm, String> {
        Ok(match family {
            Family::Qwen3Moe => QkNorm::PerHead,
            Family::Glm4Moe if self.use_qk_norm == Some(true) => QkNorm::PerHead,
            Family::MinimaxM2 if self.use_qk_norm != Some(false) => {
                match self.qk_norm_type.as_deref() {
                    None | Some("per_layer") => QkNorm::AllHeads,
                    Some(other) => {
                        return Err(format!(
                            "qk_norm_type {other:?} is not supported (only \"per_layer\")"
                        ))
                    }
                }
            }
            _ => QkNorm::None,
        })
    }

    /// Rotated dimensions per head: all of them, MiniMax-M2's `rotary_dim`, or
    /// `partial_rotary_factor` of them (as transformers computes it: `int(head_dim * factor)`),
    /// an even count.
    fn rotary_dim(&self, head_dim: usize) -> std::result::Result<usize, String> {
        if let Some(dim) = self.rotary_dim {
            if dim == 0 || dim > head_dim || !dim.is_multiple_of(2) {
                return Err(format!(
                    "rotary_dim {dim} is not a positive even count of at most head_dim {head_dim}"
                ));
            }
            return Ok(dim);
        }
        let factor = self.partial_rotary_factor.or_else(|| {
            self.rope_parameters
                .as_ref()
                .and_then(|p| p.get("partial_rotary_factor"))
                .and_then(Value::as_f64)
        });
        let Some(factor) = factor else {
            return Ok(head_dim);
        };
        if !(factor > 0.0 && factor <= 1.0) {
            return Err(format!("partial_rotary_factor {factor} is not in (0, 1]"));
        }
        let dim = (head_dim as f64 * factor) as usize;
        if dim == 0 || !dim.is_multiple_of(2) {
            return Err(format!(
                "partial_rotary_factor {factor} of head_dim {head_dim} leaves {dim} rotated dimensions: not a positive even count"
            ));
        }
        Ok(dim)
    }

    /// How many routed experts there are (each family names them differently) and how many
    /// each token picks.
    fn routed_experts(&self, family: Family) -> std::result::Result<(usize, usize), String> {
        let num_experts = match family {
            Family::DeepseekV3 | Family::Glm4Moe | Family::Glm4MoeLite => {
                require(self.n_routed_experts, "n_routed_experts")?
            }
            Family::Qwen3Moe => require(self.num_experts, "num_experts")?,
            Family::Mixtral | Family::MinimaxM2 => {
                require(self.num_local_experts, "num_local_experts")?
            }
        };
        let top_k = require(self.num_experts_per_tok, "num_experts_per_tok")?;
        if top_k == 0 || top_k > num_experts {
            return Err(format!(
                "num_experts_per_tok {top_k} must be between 1 and the number of experts {num_experts}"
            ));
        }
        Ok((num_experts, top_k))
    }

    /// The gate and the experts' widths, and which layers are MoE layers.
    fn moe_config(
        &self,
        family: Family,
        num_experts: usize,
        top_k: usize,
        dense_intermediate_size: usize,
    ) -> std::result::Result<(MoeConfig, Vec<bool>), String> {
        let num_layers = self.num_hidden_layers;
        let (gating, intermediate_size, n_shared_experts, moe_layers) = match family {
            Family::DeepseekV3 | Family::Glm4Moe | Family::Glm4MoeLite => {
                let gating = self.deepseek_gating(num_experts)?;
                // transformers' defaults when the file leaves it out: GLM's 1, ours 0.
                let glm = matches!(family, Family::Glm4Moe | Family::Glm4MoeLite);
                let first_dense = self.first_k_dense_replace.unwrap_or(usize::from(glm));
                let freq = self.moe_layer_freq.unwrap_or(1).max(1);
                let layers = match (&self.mlp_layer_types, family) {
                    (Some(types), Family::Glm4MoeLite) => sparse_layers(types, num_layers)?,
                    _ => (0..num_layers)
                        .map(|i| i >= first_dense && i % freq == 0)
                        .collect(),
                };
                (
                    gating,
                    require(self.moe_intermediate_size, "moe_intermediate_size")?,
                    self.n_shared_experts.unwrap_or(0),
                    layers,
                )
            }
            Family::Qwen3Moe => {
                let step = self.decoder_sparse_step.unwrap_or(1).max(1);
                let only_mlp = self.mlp_only_layers.clone().unwrap_or_default();
                let layers = (0..num_layers)
                    .map(|i| !only_mlp.contains(&i) && (i + 1) % step == 0)
                    .collect();
                (
                    Gating::SoftmaxTopK {
                        norm_topk_prob: self.norm_topk_prob.unwrap_or(false),
                    },
                    require(self.moe_intermediate_size, "moe_intermediate_size")?,
                    0,
                    layers,
                )
            }
            Family::Mixtral => (
                Gating::SoftmaxTopK {
                    norm_topk_prob: true,
                },
                dense_intermediate_size,
                0,
                vec![true; num_layers],
            ),
            Family::MinimaxM2 => (
                self.minimax_gating()?,
                dense_intermediate_size,
                0,
                vec![true; num_layers],
            ),
        };
        let moe = MoeConfig {
            num_experts,
            top_k,
            intermediate_size,
            n_shared_experts,
            gating,
        };
        Ok((moe, moe_layers))
    }

    /// MiniMax-M2's gate and what it does not have: sigmoid scores with a correction bias for
    /// the choice, top-k among all experts, renormalised, no scaling; no shared expert and no
    /// linear-attention layers (MiniMax-01's `attn_type_list` 0).
    fn minimax_gating(&self) -> std::result::Result<Gating, String> {
        if let Some(f) = self.scoring_func.as_deref().filter(|f| *f != "sigmoid") {
            return Err(format!(
                "scoring_func {f:?} is not supported (only \"sigmoid\")"
            ));
        }
        if self.use_routing_bias == Some(false) {
            return Err("use_routing_bias false is not supported".into());
        }
        if let Some(width) = self.shared_intermediate_size.filter(|w| *w > 0) {
            return Err(format!(
                "shared_intermediate_size {width}: a shared expert is not supported here"
            ));
        }
        if let Some(kinds) = &self.attn_type_list {
            if let Some(layer) = kinds.iter().position(|k| *k != 1) {
                return Err(format!(
                    "attn_type_list: layer {layer} is not full attention (linear attention is not supported)"
                ));
            }
        }
        Ok(Gating::SigmoidGroupLimited {
            n_group: 1,
            topk_group: 1,
            norm_topk_prob: true,
            routed_scaling_factor: 1.0,
        })
    }

    /// DeepSeek-V3's gate: sigmoid scores with `noaux_tc` group-limited top-k only.
    fn deepseek_gating(&self, num_experts: usize) -> std::result::Result<Gating, String> {
        if let Some(f) = &self.scoring_func {
            if f != "sigmoid" {
                return Err(format!(
                    "scoring_func {f:?} is not supported (only \"sigmoid\")"
                ));
            }
        }
        if let Some(m) = &self.topk_method {
            if m != "noaux_tc" {
                return Err(format!(
                    "topk_method {m:?} is not supported (only \"noaux_tc\")"
                ));
            }
        }
        let n_group = self.n_group.unwrap_or(1).max(1);
        let topk_group = self.topk_group.unwrap_or(n_group);
        if !num_experts.is_multiple_of(n_group) || topk_group > n_group || topk_group == 0 {
            return Err(format!(
                "n_group {n_group} / topk_group {topk_group} do not fit {num_experts} experts"
            ));
        }
        if num_experts / n_group < 2 {
            return Err("each expert group needs at least 2 experts".into());
        }
        Ok(Gating::SigmoidGroupLimited {
            n_group,
            topk_group,
            norm_topk_prob: self.norm_topk_prob.unwrap_or(true),
            routed_scaling_factor: self.routed_scaling_factor.unwrap_or(1.0) as f32,
        })
    }

    /// Accepts both `rope_theta` + `rope_scaling` and transformers 5's `rope_parameters`.
    fn rope_config(&self, dim: usize, max_pos: usize) -> std::result::Result<RopeConfig, String> {
        let params = self
            .rope_parameters
            .as_ref()
            .filter(|v| !v.is_null())
            .or(self.rope_scaling.as_ref().filter(|v| !v.is_null()));
        let get = |key: &str| params.and_then(|p| p.get(key)).and_then(Value::as_f64);
        let theta = self
            .rope_theta
            .or_else(|| get("rope_theta"))
            .unwrap_or(10000.0);
        let kind = params
            .and_then(|p| p.get("rope_type").or_else(|| p.get("type")))
            .and_then(Value::as_str)
            .unwrap_or("default");
        let scaling = match kind {
            "default" => RopeScaling::None,
            "linear" => RopeScaling::Linear {
                factor: get("factor").ok_or("linear rope scaling needs \"factor\"")?,
            },
            "yarn" => {
                let mut factor = get("factor").ok_or("yarn rope scaling needs \"factor\"")?;
                // As transformers does: when the original length is given, the factor is the
                // ratio of the extended to the original context.
                let original = match get("original_max_position_embeddings") {
                    Some(orig) if orig > 0.0 => {
                        factor = max_pos as f64 / orig;
                        orig as usize
                    }
                    _ => max_pos,
                };
                RopeScaling::Yarn {
                    factor,
                    original_max_position_embeddings: original,
                    beta_fast: get("beta_fast").unwrap_or(32.0),
                    beta_slow: get("beta_slow").unwrap_or(1.0),
                    mscale: get("mscale"),
                    mscale_all_dim: get("mscale_all_dim"),
                    attention_factor: get("attention_factor"),
                    truncate: params
                        .and_then(|p| p.get("truncate"))
                        .and_then(Value::as_bool)
                        .unwrap_or(true),
                }
            }
            other => return Err(format!("rope scaling type {other:?} is not supported")),
        };
        Ok(RopeConfig {
            theta,
            dim,
            scaling,
        })
    }
}

/// YaRN's magnitude correction `0.1 * m * ln(s) + 1`.
pub fn yarn_get_mscale(scale: f64, mscale: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * mscale * scale.ln() + 1.0
    }
}

impl ModelConfig {
    /// Softmax scale of attention scores, including DeepSeek's YaRN correction.
    pub fn softmax_scale(&self) -> f32 {
        match &self.attention {
            AttentionConfig::Gqa { head_dim, .. } => (*head_dim as f64).powf(-0.5) as f32,
            AttentionConfig::Mla {
                qk_nope_head_dim,
                qk_rope_head_dim,
                ..
            } => {
                let mut scale = ((qk_nope_head_dim + qk_rope_head_dim) as f64).powf(-0.5);
                if let RopeScaling::Yarn {
                    factor,
                    mscale_all_dim: Some(m),
                    ..
                } = self.rope.scaling
                {
                    if m != 0.0 {
                        let ms = yarn_get_mscale(factor, m);
                        scale *= ms * ms;
                    }
                }
                scale as f32
            }
        }
    }

    pub fn is_moe_layer(&self, layer: usize) -> bool {
        self.moe_layers.get(layer).copied().unwrap_or(false)
    }

    /// Serves a shorter context than the checkpoint's (vLLM's `--max-model-len`): prompt and
    /// answer together stay within `max_model_len`, which becomes `max_position_embeddings`
    /// for everything downstream (validation, the API's reports, the cache). The rope keeps
    /// the checkpoint's own parameters. Longer than the checkpoint's is an error.
    pub fn cap_context(&mut self, max_model_len: usize) -> std::result::Result<(), String> {
        if max_model_len == 0 || max_model_len > self.max_position_embeddings {
            return Err(format!(
                "--max-model-len {max_model_len} must be from 1 to the model's max_position_embeddings ({})",
                self.max_position_embeddings
            ));
        }
        self.max_position_embeddings = max_model_len;
        Ok(())
    }

    /// This config with its first multi-token-prediction layer as one more MoE layer after the
    /// main ones (layer `num_layers`, where DeepSeek's checkpoints name it): the draft head's
    /// tensors, experts and KV cache layer are found by that index. `None` without one.
    pub fn with_mtp_layer(&self) -> Option<ModelConfig> {
        if self.mtp_layers == 0 {
            return None;
        }
        let mut config = self.clone();
        config.moe_layers.resize(self.num_layers, false);
        config.moe_layers.push(true);
        config.num_layers += 1;
        config.mtp_layers = 0;
        Some(config)
    }

    /// Layers that are MoE layers, in order.
    pub fn moe_layer_indices(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.num_layers).filter(|&l| self.is_moe_layer(l))
    }

    /// Values one token leaves in one layer's attention cache: keys and values for GQA; for
    /// MLA the normalised latent and the rotated shared key (576 on DeepSeek-V3).
    pub fn kv_values_per_token_per_layer(&self) -> usize {
        match self.attention {
            AttentionConfig::Gqa {
                num_kv_heads,
                head_dim,
                ..
            } => 2 * num_kv_heads * head_dim,
            AttentionConfig::Mla {
                kv_lora_rank,
                qk_rope_head_dim,
                ..
            } => kv_lora_rank + qk_rope_head_dim,
        }
    }

    /// Bytes one token's cache takes across all layers, as the router's cache holds it.
    pub fn kv_cache_bytes_per_token(&self) -> usize {
        self.kv_values_per_token_per_layer() * self.num_layers * KV_VALUE_BYTES
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// DeepSeek-V3's gate in one group, renormalised, scaled by `routed_scaling_factor`.
    fn one_group_sigmoid(routed_scaling_factor: f32) -> Gating {
        Gating::SigmoidGroupLimited {
            n_group: 1,
            topk_group: 1,
            norm_topk_prob: true,
            routed_scaling_factor,
        }
    }

    fn parse(json: &str) -> Result<ModelConfig> {
        ModelConfig::from_json_str(json, Path::new("config.json"))
    }

    #[test]
    fn unknown_model_type_is_named() {
        let err = parse(r#"{"model_type":"llama","hidden_size":8}"#).unwrap_err();
        assert!(matches!(err, ModelError::UnsupportedModelType(ref t) if t == "llama"));
        assert!(err.to_string().contains("llama"));
        assert!(err.to_string().contains("kimi_k2"), "{err}");
    }

    /// Kimi-K2's config (moonshotai/Kimi-K2-Instruct: `kimi_k2`, DeepSeek-V3's architecture
    /// with 384 experts, one group, Kimi's yarn betas, FP8 blocks) reads as DeepSeek-V3, and so
    /// does Kimi-K2-Thinking's INT4 one; a checkpoint quantized another way is refused by name.
    #[test]
    fn kimi_k2_reads_as_deepseek_v3_and_other_quantizations_are_named() {
        let kimi = r#"{"architectures": ["DeepseekV3ForCausalLM"], "bos_token_id": 163584,
            "eos_token_id": 163585, "first_k_dense_replace": 1, "hidden_act": "silu",
            "hidden_size": 7168, "intermediate_size": 18432, "kv_lora_rank": 512,
            "max_position_embeddings": 131072, "model_type": "kimi_k2",
            "moe_intermediate_size": 2048, "n_group": 1, "n_routed_experts": 384,
            "n_shared_experts": 1, "norm_topk_prob": true, "num_attention_heads": 64,
            "num_experts_per_tok": 8, "num_hidden_layers": 61, "num_key_value_heads": 64,
            "num_nextn_predict_layers": 0, "q_lora_rank": 1536, "qk_nope_head_dim": 128,
            "qk_rope_head_dim": 64, "quantization_config": {"activation_scheme": "dynamic",
            "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]},
            "rms_norm_eps": 1e-06, "rope_theta": 50000.0, "routed_scaling_factor": 2.827,
            "rope_scaling": {"beta_fast": 1.0, "beta_slow": 1.0, "factor": 32.0, "mscale": 1.0,
            "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096, "type": "yarn"},
            "scoring_func": "sigmoid", "tie_word_embeddings": false, "topk_group": 1,
            "topk_method": "noaux_tc", "v_head_dim": 128, "vocab_size": 163840}"#;
        let cfg = parse(kimi).unwrap();
        assert_eq!(cfg.family, Family::DeepseekV3);
        assert_eq!(cfg.moe.num_experts, 384);
        assert_eq!(cfg.vocab_size, 163840);
        let unknown_int4 = kimi.replace(
            r#""quant_method": "fp8""#,
            r#""quant_method": "compressed-tensors""#,
        );
        let err = parse(&unknown_int4).unwrap_err().to_string();
        assert!(err.contains("compressed-tensors format"), "{err}");
        let thinking = kimi.replace(
            r#""quant_method": "fp8""#,
            r#""quant_method": "compressed-tensors", "format": "pack-quantized",
            "config_groups": {"group_0": {"input_activations": null, "targets": ["Linear"],
            "weights": {"actorder": null, "dynamic": false, "group_size": 32, "num_bits": 4,
            "strategy": "group", "symmetric": true, "type": "int"}}}"#,
        );
        assert_eq!(parse(&thinking).unwrap().moe.num_experts, 384);
        let gptq = kimi.replace(r#""quant_method": "fp8""#, r#""quant_method": "gptq""#);
        let err = parse(&gptq).unwrap_err().to_string();
        assert!(err.contains("\"gptq\" is not supported"), "{err}");
    }

    #[test]
    fn rope_parameters_form_is_accepted() {
        let cfg = parse(
            r#"{"model_type":"mixtral","hidden_size":64,"vocab_size":10,"num_hidden_layers":1,
            "num_attention_heads":4,"num_key_value_heads":2,"intermediate_size":8,
            "num_local_experts":4,"num_experts_per_tok":2,
            "rope_parameters":{"rope_type":"default","rope_theta":1000000.0}}"#,
        )
        .unwrap();
        assert_eq!(cfg.rope.theta, 1e6);
        assert_eq!(cfg.rope.scaling, RopeScaling::None);
    }

    #[test]
    fn missing_key_is_named() {
        let err = parse(
            r#"{"model_type":"mixtral","hidden_size":64,"vocab_size":10,"num_hidden_layers":1,
            "num_attention_heads":4,"intermediate_size":8,"num_experts_per_tok":2}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("num_local_experts"), "{err}");
    }

    /// GLM-4.5-Air's published config.json (zai-org/GLM-4.5-Air): half-rotary heads of 128,
    /// q/k/v biases, no q/k norm, DeepSeek's gate in one group, one dense layer, one MTP layer.
    #[test]
    fn glm_4_5_air_config_is_read_as_published() {
        let cfg = parse(
            r#"{"architectures": ["Glm4MoeForCausalLM"], "attention_bias": true,
            "attention_dropout": 0.0, "pad_token_id": 151329,
            "eos_token_id": [151329, 151336, 151338], "head_dim": 128, "hidden_act": "silu",
            "hidden_size": 4096, "partial_rotary_factor": 0.5, "initializer_range": 0.02,
            "intermediate_size": 10944, "max_position_embeddings": 131072,
            "model_type": "glm4_moe", "moe_intermediate_size": 1408, "norm_topk_prob": true,
            "num_attention_heads": 96, "n_group": 1, "topk_group": 1, "n_routed_experts": 128,
            "n_shared_experts": 1, "routed_scaling_factor": 1.0, "num_experts_per_tok": 8,
            "first_k_dense_replace": 1, "num_hidden_layers": 46, "num_key_value_heads": 8,
            "rms_norm_eps": 1e-05, "rope_scaling": null, "rope_theta": 1000000,
            "num_nextn_predict_layers": 1, "tie_word_embeddings": false,
            "torch_dtype": "bfloat16", "use_cache": true, "use_qk_norm": false,
            "vocab_size": 151552}"#,
        )
        .unwrap();
        assert_eq!(cfg.family, Family::Glm4Moe);
        assert_eq!(
            cfg.attention,
            AttentionConfig::Gqa {
                num_heads: 96,
                num_kv_heads: 8,
                head_dim: 128,
                qk_norm: QkNorm::None,
                bias: true,
            }
        );
        assert_eq!((cfg.rope.dim, cfg.rope.theta), (64, 1e6));
        assert_eq!(cfg.moe.gating, one_group_sigmoid(1.0));
        assert_eq!((cfg.moe.num_experts, cfg.moe.top_k), (128, 8));
        assert_eq!(cfg.moe.n_shared_experts, 1);
        assert_eq!(cfg.moe_layers[..2], [false, true]);
        assert_eq!(cfg.mtp_layers, 1);
        assert_eq!(cfg.eos_token_ids, [151329, 151336, 151338]);
    }

    /// GLM-4.7-Flash's config.json keys and dimensions (zai-org/GLM-4.7-Flash, as vLLM's
    /// config test writes them): latent attention with v heads wider than the no-rope part, no
    /// yarn, DeepSeek's gate in one group, one dense layer, one MTP layer.
    const GLM_4_7_FLASH: &str = r#"{"architectures": ["Glm4MoeLiteForCausalLM"],
        "attention_bias": false, "attention_dropout": 0.0, "eos_token_id": [7, 9],
        "hidden_act": "silu", "hidden_size": 2048,
        "intermediate_size": 10240, "max_position_embeddings": 202752,
        "model_type": "glm4_moe_lite", "moe_intermediate_size": 1536, "topk_method": "noaux_tc",
        "norm_topk_prob": true, "num_attention_heads": 20, "n_group": 1, "topk_group": 1,
        "n_routed_experts": 64, "n_shared_experts": 1, "routed_scaling_factor": 1.8,
        "num_experts_per_tok": 4, "first_k_dense_replace": 1, "num_hidden_layers": 47,
        "num_key_value_heads": 20, "num_nextn_predict_layers": 1, "partial_rotary_factor": 1.0,
        "kv_lora_rank": 512, "q_lora_rank": 768, "qk_nope_head_dim": 192,
        "qk_rope_head_dim": 64, "v_head_dim": 256, "rms_norm_eps": 1e-05, "rope_scaling": null,
        "rope_theta": 1000000, "tie_word_embeddings": false, "dtype": "bfloat16",
        "use_cache": true, "vocab_size": 154880}"#;

    #[test]
    fn glm_4_7_flash_config_is_read_as_published() {
        let cfg = parse(GLM_4_7_FLASH).unwrap();
        assert_eq!(cfg.family, Family::Glm4MoeLite);
        assert!(cfg.family.latent_attention() && cfg.family.ships_mtp_layers());
        assert_eq!(
            cfg.attention,
            AttentionConfig::Mla {
                num_heads: 20,
                q_lora_rank: Some(768),
                kv_lora_rank: 512,
                qk_nope_head_dim: 192,
                qk_rope_head_dim: 64,
                v_head_dim: 256,
                rope_interleave: true,
            }
        );
        assert_eq!((cfg.rope.dim, cfg.rope.theta), (64, 1e6));
        assert_eq!(cfg.rope.scaling, RopeScaling::None);
        assert_eq!(cfg.moe.gating, one_group_sigmoid(1.8));
        assert_eq!((cfg.moe.num_experts, cfg.moe.top_k), (64, 4));
        assert_eq!(cfg.moe.intermediate_size, 1536);
        assert_eq!(cfg.moe_layers.len(), 47);
        assert_eq!(cfg.moe_layers[..3], [false, true, true]);
        assert_eq!(cfg.mtp_layers, 1);
        assert_eq!(cfg.eos_token_ids, [7, 9]);
    }

    /// transformers 5 writes `mlp_layer_types`; it decides, and a list that does not fit the
    /// layers, an unknown kind or a partial rotation of latent heads is refused by name.
    #[test]
    fn glm_4_7_flash_layer_types_and_rotation_are_checked() {
        let with = |key: &str, value: &str| {
            let mut v: Value = serde_json::from_str(GLM_4_7_FLASH).unwrap();
            v[key] = serde_json::from_str(value).unwrap();
            v["num_hidden_layers"] = 3.into();
            parse(&v.to_string())
        };
        let cfg = with("mlp_layer_types", r#"["dense", "dense", "sparse"]"#).unwrap();
        assert_eq!(cfg.moe_layers, [false, false, true]);
        let err = with("mlp_layer_types", r#"["dense", "sparse"]"#).unwrap_err();
        assert!(err.to_string().contains("names 2 layers"), "{err}");
        let err = with("mlp_layer_types", r#"["dense", "moe", "sparse"]"#).unwrap_err();
        assert!(err.to_string().contains("\"moe\""), "{err}");
        let err = with("partial_rotary_factor", "0.5").unwrap_err();
        assert!(err.to_string().contains("rotates 32 of 64"), "{err}");
    }

    /// MiniMax-M2's config.json keys and dimensions (MiniMaxAI/MiniMax-M2; `attn_type_list`
    /// cut to the layers of the test): one q/k norm over all heads, 64 of 128 dimensions
    /// rotated, every layer MoE with a biased sigmoid gate and no shared expert.
    fn minimax_m2(layers: usize, extra: &str) -> Result<ModelConfig> {
        parse(&format!(
            r#"{{"architectures": ["MiniMaxM2ForCausalLM"], "attn_type_list": {:?},
            "head_dim": 128, "hidden_act": "silu", "hidden_size": 3072,
            "intermediate_size": 1536, "max_position_embeddings": 196608,
            "model_type": "minimax_m2", "mtp_transformer_layers": 1, "num_attention_heads": 48,
            "num_experts_per_tok": 8, "num_hidden_layers": {layers}, "num_key_value_heads": 8,
            "num_local_experts": 256, "num_mtp_modules": 3, "qk_norm_type": "per_layer",
            "rms_norm_eps": 1e-06, "rope_theta": 5000000, "rotary_dim": 64,
            "scoring_func": "sigmoid", "shared_intermediate_size": 0,
            "tie_word_embeddings": false, "use_cache": true, "use_mtp": true,
            "use_qk_norm": true, "use_routing_bias": true, "vocab_size": 200064{extra}}}"#,
            vec![1; layers]
        ))
    }

    #[test]
    fn minimax_m2_config_is_read_as_published() {
        let cfg = minimax_m2(62, "").unwrap();
        assert_eq!(cfg.family, Family::MinimaxM2);
        assert_eq!(
            cfg.attention,
            AttentionConfig::Gqa {
                num_heads: 48,
                num_kv_heads: 8,
                head_dim: 128,
                qk_norm: QkNorm::AllHeads,
                bias: false,
            }
        );
        assert_eq!((cfg.rope.dim, cfg.rope.theta), (64, 5e6));
        assert_eq!(cfg.moe.gating, one_group_sigmoid(1.0));
        assert_eq!((cfg.moe.num_experts, cfg.moe.top_k), (256, 8));
        assert_eq!(cfg.moe.intermediate_size, 1536);
        assert_eq!(cfg.moe.n_shared_experts, 0);
        assert!(cfg.moe_layers.iter().all(|&moe| moe) && cfg.moe_layers.len() == 62);
        assert_eq!(
            cfg.mtp_layers, 0,
            "its MTP modules are not in the checkpoint"
        );
    }

    /// What MiniMax-M2's loader does not implement is refused by name, not served wrongly.
    #[test]
    fn minimax_m2_settings_not_implemented_are_refused() {
        for (extra, named) in [
            (r#", "qk_norm_type": "per_head""#, "qk_norm_type"),
            (r#", "use_routing_bias": false"#, "use_routing_bias"),
            (
                r#", "shared_intermediate_size": 512"#,
                "shared_intermediate_size",
            ),
            (r#", "scoring_func": "softmax""#, "scoring_func"),
            (r#", "rotary_dim": 130"#, "rotary_dim"),
            (r#", "attn_type_list": [1, 0]"#, "linear attention"),
        ] {
            // A key given twice: serde_json keeps the last.
            let err = minimax_m2(2, extra).unwrap_err();
            assert!(err.to_string().contains(named), "{extra}: {err}");
        }
        let cfg = minimax_m2(2, r#", "use_qk_norm": false"#).unwrap();
        assert!(matches!(
            cfg.attention,
            AttentionConfig::Gqa {
                qk_norm: QkNorm::None,
                ..
            }
        ));
    }

    /// A rotary share that leaves no or an odd number of rotated dimensions is refused by name;
    /// transformers 5's form (inside `rope_parameters`) is read too.
    #[test]
    fn partial_rotary_factor_is_checked() {
        let glm = |head_dim: usize, rope: &str| {
            parse(&format!(
                r#"{{"model_type":"glm4_moe","hidden_size":64,"vocab_size":10,
                "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,
                "head_dim":{head_dim},"intermediate_size":8,"moe_intermediate_size":8,
                "n_routed_experts":4,"num_experts_per_tok":2,{rope}}}"#
            ))
        };
        let dim = |c: ModelConfig| c.rope.dim;
        assert_eq!(dim(glm(32, r#""partial_rotary_factor":0.5"#).unwrap()), 16);
        let v5 = r#""rope_parameters":{"rope_type":"default","rope_theta":10000.0,"partial_rotary_factor":0.25}"#;
        assert_eq!(dim(glm(32, v5).unwrap()), 8);
        assert_eq!(dim(glm(32, r#""rope_theta":10000.0"#).unwrap()), 32);
        for bad in [
            r#""partial_rotary_factor":1.5"#,
            r#""partial_rotary_factor":0"#,
        ] {
            let err = glm(32, bad).unwrap_err().to_string();
            assert!(err.contains("partial_rotary_factor"), "{err}");
        }
        let err = glm(10, r#""partial_rotary_factor":0.5"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("5 rotated dimensions"), "{err}");
    }
}
