//! What is planned: the model, the machines, the layout, and what the workload looks like;
//! and how the GPUs split into attention GPUs (routers) and expert GPUs.

use moe_model::config::{AttentionConfig, ModelConfig};
use serde::Serialize;

use crate::efficiency::Efficiency;
use crate::footprint::{Footprint, WeightFormat};
use crate::gpu::GpuKind;

/// Where attention and experts run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    /// Ours: router GPUs run attention and the dense part, expert-node GPUs the routed
    /// experts; rows cross between them as the data plane sends them (f32).
    Disaggregated,
    /// DeepSeek's: every GPU runs attention data-parallel and hosts routed experts
    /// expert-parallel; DeepEP's formats on the wire (FP8 dispatch, bf16 combine).
    Colocated,
}

/// Tokens each GPU prefills per step: DeepSeek's profile and LMSYS's runs use 16,384.
pub const PREFILL_TOKENS_PER_GPU: usize = 16_384;

/// GPU memory kept for the CUDA context, libraries' workspaces and communication buffers.
pub const RUNTIME_RESERVE_BYTES: f64 = 4.0 * (1u64 << 30) as f64;

/// Everything the planner is asked about.
#[derive(Debug, Clone)]
pub struct Deployment {
    pub config: ModelConfig,
    pub gpu: GpuKind,
    pub machines: usize,
    pub gpus_per_machine: usize,
    pub layout: Layout,
    pub format: WeightFormat,
    pub redundant_experts: usize,
    /// Average tokens in a decoding sequence's cache; prompt length for prefill.
    pub context: usize,
    pub tpot_ms: f64,
    /// Share of prompt tokens found in a prefix cache (not computed again).
    pub prefix_hit_rate: f64,
    /// Multi-token prediction: the chance the drafted token is accepted (None: not used; our
    /// cluster does not run MTP).
    pub mtp_acceptance: Option<f64>,
    /// Micro-batches per step; None lets the planner choose (1 to 4).
    pub micro_batches: Option<usize>,
    /// Sequences per attention GPU to evaluate, instead of the largest that meets the time per
    /// output token.
    pub decode_batch: Option<usize>,
    /// What-ifs for our layout: bytes per value of rows and answers on the wire, and of the
    /// router's KV cache; None is what the code does today (f32 for both).
    pub wire_value_bytes: Option<usize>,
    pub kv_value_bytes: Option<usize>,
    pub efficiency: Efficiency,
}

impl Deployment {
    pub fn gpus(&self) -> usize {
        self.machines * self.gpus_per_machine
    }

    pub fn footprint(&self) -> Footprint {
        Footprint::of(&self.config, self.format)
    }

    /// Bytes of one cached value: DeepSeek keeps bf16; our router keeps f32.
    pub fn kv_value_bytes(&self) -> usize {
        match self.layout {
            Layout::Colocated => 2,
            Layout::Disaggregated => self
                .kv_value_bytes
                .unwrap_or(moe_model::kv_cache::KV_VALUE_BYTES),
        }
    }

    pub fn kv_bytes_per_token(&self) -> f64 {
        crate::footprint::kv_bytes_per_token(
            &self.config,
            self.kv_value_bytes(),
            self.mtp_acceptance.is_some(),
        )
    }

    /// Tokens a sequence gains per decode step, and rows it runs per step.
    pub fn tokens_and_rows_per_step(&self) -> (f64, f64) {
        match self.mtp_acceptance {
            Some(a) => (1.0 + a, 2.0),
            None => (1.0, 1.0),
        }
    }

    /// Expected distinct members among `members` that one token's top-k experts land on
    /// (uniform picks, as balanced routing makes them on average).
    pub fn distinct_targets(&self, members: usize) -> f64 {
        let m = members.max(1) as f64;
        let k = self.config.moe.top_k as f64;
        m * (1.0 - (1.0 - 1.0 / m).powf(k))
    }

    /// MLA or GQA attention dimensions: (heads, score dims per cached token, value dims).
    pub fn attention_dims(&self) -> AttentionDims {
        match self.config.attention {
            AttentionConfig::Mla {
                num_heads,
                kv_lora_rank,
                qk_nope_head_dim,
                qk_rope_head_dim,
                v_head_dim,
                ..
            } => AttentionDims {
                heads: num_heads,
                // Decode runs absorbed: scores over [latent | rope key], values are latents.
                decode_score: kv_lora_rank + qk_rope_head_dim,
                decode_value: kv_lora_rank,
                // Prefill runs expanded: per-head keys and values.
                prefill_score: qk_nope_head_dim + qk_rope_head_dim,
                prefill_value: v_head_dim,
            },
            AttentionConfig::Gqa {
                num_heads,
                head_dim,
                ..
            } => AttentionDims {
                heads: num_heads,
                decode_score: head_dim,
                decode_value: head_dim,
                prefill_score: head_dim,
                prefill_value: head_dim,
            },
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct AttentionDims {
    pub heads: usize,
    pub decode_score: usize,
    pub decode_value: usize,
    pub prefill_score: usize,
    pub prefill_value: usize,
}

/// Which GPUs run what.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Split {
    /// GPUs running attention and the dense part (every GPU when colocated).
    pub attention_gpus: usize,
    /// GPUs holding routed experts (every GPU when colocated).
    pub expert_gpus: usize,
    /// Expert slots per MoE layer on each expert GPU (routed experts and redundant copies).
    pub routed_experts_per_gpu: usize,
}

impl Split {
    pub fn colocated(d: &Deployment) -> Self {
        let gpus = d.gpus();
        Split {
            attention_gpus: gpus,
            expert_gpus: gpus,
            routed_experts_per_gpu: slots(d, gpus),
        }
    }

    /// `routers` GPUs for attention, the rest for experts (None if none is left).
    pub fn disaggregated(d: &Deployment, routers: usize) -> Option<Self> {
        let experts = d.gpus().checked_sub(routers).filter(|&x| x > 0)?;
        Some(Split {
            attention_gpus: routers,
            expert_gpus: experts,
            routed_experts_per_gpu: slots(d, experts),
        })
    }

    /// Expert GPUs in the same machine as an attention GPU, when attention GPUs are spread
    /// evenly over the machines.
    pub fn local_expert_share(&self, d: &Deployment) -> f64 {
        if d.machines <= 1 {
            return 1.0;
        }
        1.0 / d.machines as f64
    }
}

/// Slots per MoE layer on each of `gpus` GPUs for every routed expert and redundant copy.
fn slots(d: &Deployment, gpus: usize) -> usize {
    (d.config.moe.num_experts + d.redundant_experts).div_ceil(gpus.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::deployment;

    /// 256 routed experts and 32 redundant copies over 144 GPUs: 288 / 144 = 2 per GPU
    /// (DeepSeek's decode deployment); over 32 GPUs, 9 (its prefill deployment).
    #[test]
    fn expert_slots_spread_routed_and_redundant_experts() {
        let mut d = deployment("h800", 18, Layout::Colocated);
        d.redundant_experts = 32;
        assert_eq!(Split::colocated(&d).routed_experts_per_gpu, 2);
        d.machines = 4;
        assert_eq!(Split::colocated(&d).routed_experts_per_gpu, 9);
        d.layout = Layout::Disaggregated;
        d.machines = 2;
        let s = Split::disaggregated(&d, 4).unwrap();
        assert_eq!((s.attention_gpus, s.expert_gpus), (4, 12));
        assert_eq!(s.routed_experts_per_gpu, 24);
        assert!(Split::disaggregated(&d, 16).is_none());
    }

    /// Eight picks over many GPUs land on eight distinct ones; over one, on one.
    #[test]
    fn distinct_targets_of_a_token() {
        let d = deployment("h800", 1, Layout::Disaggregated);
        assert!((d.distinct_targets(1) - 1.0).abs() < 1e-9);
        assert!((d.distinct_targets(1_000_000) - 8.0).abs() < 1e-3);
        // 4 machines: 4 x (1 - 0.75^8) = 3.60.
        assert!((d.distinct_targets(4) - 3.5995).abs() < 1e-3);
    }
}
