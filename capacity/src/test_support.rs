//! DeepSeek-V3's real config (ops/plan/deepseek-v3/config.json) and deployments over it.

use std::path::Path;

use moe_model::ModelConfig;

use crate::deployment::{Deployment, Layout};
use crate::efficiency::Efficiency;
use crate::footprint::WeightFormat;
use crate::gpu;

pub fn deepseek_v3() -> ModelConfig {
    let text = include_str!("../../ops/plan/deepseek-v3/config.json");
    ModelConfig::from_json_str(text, Path::new("ops/plan/deepseek-v3/config.json"))
        .expect("DeepSeek-V3's config parses")
}

/// DeepSeek-V3 in FP8 on `machines` x 8 GPUs of `gpu`, no redundant experts, 4k context,
/// 50 ms per output token, no prefix cache, no MTP.
pub fn deployment(gpu: &str, machines: usize, layout: Layout) -> Deployment {
    Deployment {
        config: deepseek_v3(),
        gpu: gpu::by_name(gpu).expect("a known GPU"),
        machines,
        gpus_per_machine: 8,
        layout,
        format: WeightFormat::Fp8,
        redundant_experts: 0,
        context: 4096,
        tpot_ms: 50.0,
        prefix_hit_rate: 0.0,
        mtp_acceptance: None,
        micro_batches: None,
        decode_batch: None,
        wire_value_bytes: None,
        kv_value_bytes: None,
        efficiency: Efficiency::PUBLISHED,
    }
}
