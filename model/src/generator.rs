//! Random checkpoints in the Hugging Face hub layout (`moe gen-checkpoint`): a `config.json`,
//! safetensors weights (sharded above 2 GiB, with `model.safetensors.index.json`), and the
//! bundled 512-token byte-level BPE tokenizer. Benchmarks and scale tests use these shapes.

use std::path::Path;

use serde_json::{json, Value};

use crate::checkpoint::{fp8, Dtype, SafetensorsWriter};
use crate::config::{Family, ModelConfig};
use crate::error::{ModelError, Result};
use crate::families;
use crate::layers::attention_shapes::{gqa_shape, mla_shape};
use crate::layers::mlp::MlpNames;
use crate::sampling::Rng;

const TOKENIZER_JSON: &str = include_str!("../assets/tokenizer.json");
const TOKENIZER_CONFIG: &str = include_str!("../assets/tokenizer_config.json");
/// Shards are cut at this size, as the hub's `save_pretrained` does at its default 5 GB.
const SHARD_BYTES: usize = 2 << 30;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    Tiny,
    Small,
    Medium,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightDtype {
    F32,
    Bf16,
    /// DeepSeek's layout: every projection in e4m3 with an f32 `weight_scale_inv` per 128x128
    /// block (partial edge blocks where the shape leaves them), everything else bf16, and a
    /// `quantization_config` in config.json.
    Fp8,
}

/// DeepSeek's FP8 block.
const FP8_BLOCK: (usize, usize) = (128, 128);

/// Whether an FP8 checkpoint stores this tensor in FP8: the 2-D projections, MLA's
/// `kv_a_proj_with_mqa` included (as in DeepSeek-V3's own checkpoint).
fn quantized(name: &str, shape: &[usize]) -> bool {
    shape.len() == 2 && (name.ends_with("_proj.weight") || name.ends_with("_proj_with_mqa.weight"))
}

/// The hub `config.json` of a preset.
pub fn preset_config(family: Family, preset: Preset) -> Value {
    match (family, preset) {
        (Family::DeepseekV3, p) => {
            // (hidden, intermediate, moe_inter, layers, heads, experts, top_k, n_group, topk_group,
            //  q_lora, kv_lora, rope, nope, v, max_pos, original_max_pos)
            let (h, i, mi, l, nh, e, k, g, tg, ql, kvl, r, n, v, mp, omp) = match p {
                Preset::Tiny => (64, 128, 32, 3, 4, 16, 4, 4, 2, 48, 32, 8, 16, 16, 1024, 256),
                Preset::Small => (
                    1024, 2816, 256, 8, 16, 64, 6, 8, 4, 384, 256, 32, 64, 64, 4096, 1024,
                ),
                Preset::Medium => (
                    2048, 5632, 1408, 6, 16, 64, 6, 8, 4, 768, 512, 64, 128, 128, 4096, 1024,
                ),
            };
            json!({
                "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
                "hidden_size": h, "intermediate_size": i, "moe_intermediate_size": mi,
                "num_hidden_layers": l, "num_attention_heads": nh, "num_key_value_heads": nh,
                "n_routed_experts": e, "n_shared_experts": 1, "num_experts_per_tok": k,
                "n_group": g, "topk_group": tg, "first_k_dense_replace": 1, "norm_topk_prob": true,
                "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "topk_method": "noaux_tc",
                "q_lora_rank": ql, "kv_lora_rank": kvl, "qk_rope_head_dim": r, "qk_nope_head_dim": n,
                "v_head_dim": v, "qk_head_dim": r + n, "head_dim": r, "rope_interleave": true,
                "max_position_embeddings": mp, "rope_theta": 10000.0,
                "rope_scaling": {"type": "yarn", "factor": (mp / omp) as f64, "original_max_position_embeddings": omp,
                    "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
                "rms_norm_eps": 1e-6, "vocab_size": 512, "bos_token_id": 0, "eos_token_id": 1,
                "hidden_act": "silu", "tie_word_embeddings": false, "attention_bias": false
            })
        }
        (Family::Qwen3Moe, p) => {
            let (h, i, mi, l, nh, kv, hd, e, k) = match p {
                Preset::Tiny => (64, 128, 32, 3, 4, 2, 16, 16, 4),
                Preset::Small => (1024, 2816, 256, 8, 16, 4, 64, 64, 8),
                Preset::Medium => (2048, 6144, 768, 12, 32, 4, 128, 128, 8),
            };
            json!({
                "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
                "hidden_size": h, "intermediate_size": i, "moe_intermediate_size": mi,
                "num_hidden_layers": l, "num_attention_heads": nh, "num_key_value_heads": kv, "head_dim": hd,
                "num_experts": e, "num_experts_per_tok": k, "norm_topk_prob": true,
                "decoder_sparse_step": 1, "mlp_only_layers": [],
                "max_position_embeddings": 4096, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
                "vocab_size": 512, "bos_token_id": 0, "eos_token_id": 1, "hidden_act": "silu",
                "tie_word_embeddings": false, "attention_bias": false
            })
        }
        (Family::Mixtral, p) => {
            let (h, i, l, nh, kv, e) = match p {
                Preset::Tiny => (64, 48, 2, 4, 2, 8),
                Preset::Small => (1024, 1792, 8, 16, 4, 8),
                Preset::Medium => (2048, 3584, 8, 16, 4, 8),
            };
            json!({
                "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
                "hidden_size": h, "intermediate_size": i, "num_hidden_layers": l,
                "num_attention_heads": nh, "num_key_value_heads": kv,
                "num_local_experts": e, "num_experts_per_tok": 2,
                "max_position_embeddings": 4096, "rope_theta": 1000000.0, "rms_norm_eps": 1e-5,
                "vocab_size": 512, "bos_token_id": 0, "eos_token_id": 1, "hidden_act": "silu",
                "tie_word_embeddings": false
            })
        }
    }
}

/// How a tensor is initialised.
#[derive(Debug, Clone, Copy)]
enum Init {
    /// RMSNorm weight: around 1.
    Norm,
    /// Selection bias: small.
    Bias,
    /// Uniform with standard deviation `gain / sqrt(fan_in)`.
    Linear { gain: f32 },
}

/// A tensor to write: name, shape, init.
type TensorSpec = (String, Vec<usize>, Init);

/// Every tensor of a config, in the order the generator draws their values.
fn tensor_specs(config: &ModelConfig) -> Vec<TensorSpec> {
    let h = config.hidden_size;
    let mut specs = vec![
        (
            "model.embed_tokens.weight".to_string(),
            vec![config.vocab_size, h],
            Init::Linear {
                gain: (h as f32).sqrt(),
            },
        ),
        ("model.norm.weight".to_string(), vec![h], Init::Norm),
        (
            "lm_head.weight".to_string(),
            vec![config.vocab_size, h],
            Init::Linear { gain: 3.0 },
        ),
    ];
    for layer in 0..config.num_layers {
        let p = families::layer_prefix(layer);
        specs.push((format!("{p}.input_layernorm.weight"), vec![h], Init::Norm));
        specs.push((
            format!("{p}.post_attention_layernorm.weight"),
            vec![h],
            Init::Norm,
        ));
        attention_specs(config, &format!("{p}.self_attn"), &mut specs);
        ffn_specs(config, layer, &mut specs);
    }
    specs
}

/// The attention tensors of a layer, named under `prefix`.
fn attention_specs(config: &ModelConfig, prefix: &str, specs: &mut Vec<TensorSpec>) {
    let h = config.hidden_size;
    let lin = Init::Linear { gain: 1.0 };
    let mut push = |name: &str, shape: Vec<usize>, init: Init| {
        specs.push((format!("{prefix}.{name}.weight"), shape, init));
    };
    if let Some(mla) = mla_shape(config) {
        let (lora, rope) = (mla.kv_lora_rank, mla.rope);
        let q_out = mla.heads * (mla.nope + rope);
        match mla.q_lora_rank {
            Some(r) => {
                push("q_a_proj", vec![r, h], lin);
                push("q_a_layernorm", vec![r], Init::Norm);
                push("q_b_proj", vec![q_out, r], lin);
            }
            None => push("q_proj", vec![q_out, h], lin),
        }
        push("kv_a_proj_with_mqa", vec![lora + rope, h], lin);
        push("kv_a_layernorm", vec![lora], Init::Norm);
        push("kv_b_proj", vec![mla.heads * (mla.nope + mla.v), lora], lin);
        push("o_proj", vec![h, mla.heads * mla.v], lin);
    } else if let Some(gqa) = gqa_shape(config) {
        let (q_out, kv_out) = (gqa.heads * gqa.head_dim, gqa.kv_heads * gqa.head_dim);
        push("q_proj", vec![q_out, h], lin);
        push("k_proj", vec![kv_out, h], lin);
        push("v_proj", vec![kv_out, h], lin);
        push("o_proj", vec![h, q_out], lin);
        if gqa.qk_norm {
            push("q_norm", vec![gqa.head_dim], Init::Norm);
            push("k_norm", vec![gqa.head_dim], Init::Norm);
        }
    }
}

/// The feed-forward tensors of a layer: a dense MLP, or the gate, shared and routed experts.
fn ffn_specs(config: &ModelConfig, layer: usize, specs: &mut Vec<TensorSpec>) {
    let h = config.hidden_size;
    if !config.is_moe_layer(layer) {
        let names = families::dense_mlp_names(layer);
        mlp_specs(specs, names, config.dense_intermediate_size, h);
        return;
    }
    let names = families::moe_names(config, layer);
    let experts = config.moe.num_experts;
    specs.push((names.gate, vec![experts, h], Init::Linear { gain: 2.0 }));
    if let Some(bias) = names.correction_bias {
        specs.push((bias, vec![experts], Init::Bias));
    }
    if let Some(shared) = names.shared {
        let width = config.moe.intermediate_size * config.moe.n_shared_experts;
        mlp_specs(specs, shared, width, h);
    }
    for e in 0..experts {
        let names = families::expert_names(config.family, layer, e);
        mlp_specs(specs, names, config.moe.intermediate_size, h);
    }
}

/// A gated MLP's three matrices.
fn mlp_specs(specs: &mut Vec<TensorSpec>, names: MlpNames, inter: usize, hidden: usize) {
    let lin = Init::Linear { gain: 1.0 };
    specs.push((names.gate, vec![inter, hidden], lin));
    specs.push((names.up, vec![inter, hidden], lin));
    specs.push((names.down, vec![hidden, inter], lin));
}

fn init_values(rng: &mut Rng, shape: &[usize], init: Init) -> Vec<f32> {
    let n: usize = shape.iter().product();
    let uniform = |rng: &mut Rng| (rng.next_f64() * 2.0 - 1.0) as f32;
    match init {
        Init::Norm => (0..n).map(|_| 1.0 + 0.1 * uniform(rng)).collect(),
        Init::Bias => (0..n).map(|_| 0.05 * uniform(rng)).collect(),
        Init::Linear { gain } => {
            let fan_in = *shape.last().unwrap_or(&1) as f32;
            let a = gain * 3f32.sqrt() / fan_in.sqrt();
            (0..n).map(|_| a * uniform(rng)).collect()
        }
    }
}

/// Parameter count of a config (what `gen-checkpoint` reports).
pub fn parameter_count(config: &ModelConfig) -> usize {
    tensor_specs(config)
        .iter()
        .map(|(_, s, _)| s.iter().product::<usize>())
        .sum()
}

/// Writes a random checkpoint for `family`/`preset` into `out`; returns its parameter count.
pub fn write_checkpoint(
    family: Family,
    preset: Preset,
    out: &Path,
    seed: u64,
    dtype: WeightDtype,
) -> Result<usize> {
    std::fs::create_dir_all(out).map_err(|e| ModelError::io(out, e))?;
    let mut config_json = preset_config(family, preset);
    if dtype == WeightDtype::Fp8 {
        config_json["quantization_config"] = json!({
            "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
            "weight_block_size": [FP8_BLOCK.0, FP8_BLOCK.1],
        });
    }
    let config_text = serde_json::to_string_pretty(&config_json)
        .map_err(|e| ModelError::InvalidRequest(e.to_string()))?;
    let config = ModelConfig::from_json_str(&config_text, &out.join("config.json"))?;
    let write = |name: &str, text: &str| {
        let path = out.join(name);
        std::fs::write(&path, text).map_err(|e| ModelError::io(&path, e))
    };
    write("config.json", &config_text)?;
    write("tokenizer.json", TOKENIZER_JSON)?;
    write("tokenizer_config.json", TOKENIZER_CONFIG)?;
    let _ = std::fs::remove_file(out.join("model.safetensors"));
    let _ = std::fs::remove_file(out.join("model.safetensors.index.json"));

    let specs = tensor_specs(&config);
    let mut rng = Rng::seeded(seed);
    let bytes_per = |name: &str, shape: &[usize]| match dtype {
        WeightDtype::F32 => 4,
        WeightDtype::Fp8 if quantized(name, shape) => 1,
        WeightDtype::Bf16 | WeightDtype::Fp8 => 2,
    };
    let total_bytes: usize = specs
        .iter()
        .map(|(n, s, _)| s.iter().product::<usize>() * bytes_per(n, s))
        .sum();
    let num_shards = total_bytes.div_ceil(SHARD_BYTES).max(1);
    let mut shard = SafetensorsWriter::default();
    let mut shard_index = 0;
    let mut weight_map = serde_json::Map::new();
    let mut count = 0;
    let shard_name = |i: usize| {
        if num_shards == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", i + 1, num_shards)
        }
    };
    for (name, shape, init) in specs {
        let values = init_values(&mut rng, &shape, init);
        count += values.len();
        weight_map.insert(name.clone(), Value::String(shard_name(shard_index)));
        match dtype {
            WeightDtype::F32 => shard.add_f32(name, shape, &values),
            WeightDtype::Fp8 if quantized(&name, &shape) => {
                let (rows, cols) = (shape[0], shape[1]);
                let (bytes, scales) = fp8::quantize_blocks(&values, rows, cols, FP8_BLOCK);
                let scale_shape = vec![rows.div_ceil(FP8_BLOCK.0), cols.div_ceil(FP8_BLOCK.1)];
                weight_map.insert(
                    format!("{name}_scale_inv"),
                    Value::String(shard_name(shard_index)),
                );
                shard.add_f32(format!("{name}_scale_inv"), scale_shape, &scales);
                shard.add(name, Dtype::F8E4M3, shape, bytes);
            }
            WeightDtype::Bf16 | WeightDtype::Fp8 => shard.add_bf16(name, shape, &values),
        }
        if num_shards > 1 && shard.total_bytes() >= SHARD_BYTES && shard_index + 1 < num_shards {
            std::mem::take(&mut shard).write(&out.join(shard_name(shard_index)))?;
            shard_index += 1;
        }
    }
    shard.write(&out.join(shard_name(shard_index)))?;
    if num_shards > 1 {
        let index = json!({"metadata": {"total_size": total_bytes}, "weight_map": weight_map});
        write("model.safetensors.index.json", &index.to_string())?;
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_deepseek_preset_has_391m_parameters() {
        let text = preset_config(Family::DeepseekV3, Preset::Small).to_string();
        let config = ModelConfig::from_json_str(&text, Path::new("config.json")).unwrap();
        let n = parameter_count(&config);
        assert!((390_000_000..392_000_000).contains(&n), "{n}");
        let text = preset_config(Family::DeepseekV3, Preset::Medium).to_string();
        let config = ModelConfig::from_json_str(&text, Path::new("config.json")).unwrap();
        let n = parameter_count(&config);
        assert!((2_500_000_000..3_500_000_000).contains(&n), "{n}");
    }
}
