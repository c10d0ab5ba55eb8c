//! The plan: the split of GPUs, the decode batch that meets the time per output token, and
//! the throughput that follows, for decode and prefill.

use serde::Serialize;

use crate::deployment::{Deployment, Layout, Split, PREFILL_TOKENS_PER_GPU};
use crate::memory::{self, GpuMemory};
use crate::step::{self, StepCost};

/// Decode at the chosen batch.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DecodePlan {
    /// Sequences on each attention GPU.
    pub batch_per_attention_gpu: usize,
    pub step_ms: f64,
    pub tpot_ms: f64,
    /// Output tokens/s averaged over every GPU of the deployment.
    pub tok_s_per_gpu: f64,
    pub tok_s_per_node: f64,
    pub bound: &'static str,
    /// What stopped the batch from growing: `tpot`, `kv-memory`, or `asked` (a fixed batch).
    pub batch_limited_by: &'static str,
    pub cost: StepCost,
}

/// Prefill with the same split.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PrefillPlan {
    /// Prompt tokens computed per step on each attention GPU.
    pub tokens_per_attention_gpu: usize,
    pub step_ms: f64,
    /// Prompt tokens computed per second, averaged over every GPU.
    pub computed_tok_s_per_gpu: f64,
    /// Prompt tokens served per second per machine, prefix-cache hits included.
    pub input_tok_s_per_node: f64,
    pub bound: &'static str,
    pub cost: StepCost,
}

/// What the planner found.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Plan {
    pub fits: bool,
    /// Why not, when it does not.
    pub why_not: Option<String>,
    pub split: Option<Split>,
    /// Routed-expert slots per MoE layer on each expert GPU (copies included).
    pub routed_experts_per_gpu: usize,
    /// The larger of an attention GPU's and an expert GPU's weights.
    pub weights_bytes_per_gpu: f64,
    pub kv_bytes_per_token: f64,
    pub kv_bytes_per_sequence_at_context: f64,
    pub attention_gpu_memory: Option<GpuMemory>,
    pub expert_gpu_memory: Option<GpuMemory>,
    pub decode: Option<DecodePlan>,
    pub prefill: Option<PrefillPlan>,
}

/// The micro-batch counts the layout tries.
fn micro_batch_choices(d: &Deployment) -> Vec<usize> {
    match d.micro_batches {
        Some(m) => vec![m.clamp(1, 4)],
        None => (1..=4).collect(),
    }
}

/// The largest batch per attention GPU that the memory holds and whose time per output
/// token meets the target (or the batch asked for, if the memory holds it); None when a
/// single sequence per micro-batch already misses the target.
fn best_batch(d: &Deployment, split: &Split, micro_batches: usize) -> Option<DecodePlan> {
    let cap = memory::max_users(d, split);
    let (tokens_per_step, _) = d.tokens_and_rows_per_step();
    let users = match d.decode_batch {
        Some(asked) => Some(asked).filter(|&u| u >= micro_batches && u <= cap)?,
        None => largest_meeting_tpot(d, split, micro_batches, cap)?,
    };
    let cost = step::decode(d, split, users, micro_batches);
    let total = split.attention_gpus as f64 * users as f64 * tokens_per_step / cost.seconds;
    let per_gpu = total / d.gpus() as f64;
    let limited_by = match d.decode_batch {
        Some(_) => "asked",
        None if users == cap => "kv-memory",
        None => "tpot",
    };
    Some(DecodePlan {
        batch_per_attention_gpu: users,
        step_ms: cost.seconds * 1e3,
        tpot_ms: cost.seconds / tokens_per_step * 1e3,
        tok_s_per_gpu: per_gpu,
        tok_s_per_node: per_gpu * d.gpus_per_machine as f64,
        bound: cost.bound(d.layout),
        batch_limited_by: limited_by,
        cost,
    })
}

/// Binary search over batches up to `cap` (the time per token grows with the batch).
fn largest_meeting_tpot(
    d: &Deployment,
    split: &Split,
    micro_batches: usize,
    cap: usize,
) -> Option<usize> {
    if cap < micro_batches {
        return None;
    }
    let (tokens_per_step, _) = d.tokens_and_rows_per_step();
    let target = d.tpot_ms / 1e3;
    let meets = |users: usize| {
        step::decode(d, split, users, micro_batches).seconds / tokens_per_step <= target
    };
    if !meets(micro_batches) {
        return None;
    }
    let (mut lo, mut hi) = (micro_batches, cap + 1);
    while hi - lo > 1 {
        let mid = (lo + hi) / 2;
        if meets(mid) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Some(lo)
}

fn splits(d: &Deployment) -> Vec<Split> {
    match d.layout {
        Layout::Colocated => vec![Split::colocated(d)],
        Layout::Disaggregated => (1..d.gpus())
            .filter_map(|r| Split::disaggregated(d, r))
            .collect(),
    }
}

/// Plans `d`: the split and micro-batches with the most decode tokens/s.
pub fn plan(d: &Deployment) -> Plan {
    let kv_bytes_per_token = d.kv_bytes_per_token();
    let mut best: Option<(Split, DecodePlan)> = None;
    let mut any_holds: Option<Split> = None;
    for split in splits(d) {
        if memory::max_users(d, &split) == 0 {
            continue;
        }
        any_holds.get_or_insert_with(|| split.clone());
        for m in micro_batch_choices(d) {
            if let Some(p) = best_batch(d, &split, m) {
                if best
                    .as_ref()
                    .is_none_or(|(_, b)| p.tok_s_per_gpu > b.tok_s_per_gpu)
                {
                    best = Some((split.clone(), p));
                }
            }
        }
    }
    let chosen = best.as_ref().map(|(s, _)| s.clone()).or(any_holds);
    let why_not = match (&chosen, &best) {
        (None, _) => Some(unfit_reason(d)),
        (Some(_), None) => Some(match d.decode_batch {
            Some(b) => format!("{b} sequences per attention GPU do not fit its memory"),
            None => format!(
                "the weights fit, but not even one sequence per micro-batch decodes within {} ms per token",
                d.tpot_ms
            ),
        }),
        _ => None,
    };
    let users = best
        .as_ref()
        .map(|(_, p)| p.batch_per_attention_gpu)
        .unwrap_or(0);
    let attention_gpu_memory = chosen.as_ref().map(|s| memory::attention_gpu(d, s, users));
    let expert_gpu_memory = chosen
        .as_ref()
        .filter(|_| d.layout == Layout::Disaggregated)
        .map(|s| memory::expert_gpu(d, s, users));
    let weights_bytes_per_gpu = fallback_weights(d, &attention_gpu_memory, &expert_gpu_memory);
    let prefill = best
        .as_ref()
        .map(|(s, p)| prefill_plan(d, s, p.cost.micro_batches));
    Plan {
        fits: chosen.is_some(),
        why_not,
        routed_experts_per_gpu: chosen
            .as_ref()
            .map(|s| s.routed_experts_per_gpu)
            .unwrap_or_else(|| Split::colocated(d).routed_experts_per_gpu),
        split: chosen,
        weights_bytes_per_gpu,
        kv_bytes_per_token,
        kv_bytes_per_sequence_at_context: kv_bytes_per_token * d.context as f64,
        attention_gpu_memory,
        expert_gpu_memory,
        decode: best.map(|(_, p)| p),
        prefill,
    }
}

/// Weights per GPU as placed; when nothing fits, what an even spread would put on each GPU.
fn fallback_weights(d: &Deployment, a: &Option<GpuMemory>, x: &Option<GpuMemory>) -> f64 {
    match (a, x) {
        (Some(a), Some(x)) => a.weights.max(x.weights),
        (Some(a), None) => a.weights,
        _ => memory::attention_gpu(d, &Split::colocated(d), 0).weights,
    }
}

fn unfit_reason(d: &Deployment) -> String {
    let total = d.footprint().total().bytes;
    let capacity = d.gpu.memory_bytes * d.gpus() as f64;
    format!(
        "the weights ({:.0} GB in {}) and the runtime reserve do not fit {} x {} ({:.0} GB) in any split",
        total / 1e9,
        d.format.name(),
        d.gpus(),
        d.gpu.name,
        capacity / 1e9
    )
}

fn prefill_plan(d: &Deployment, split: &Split, micro_batches: usize) -> PrefillPlan {
    let tokens = PREFILL_TOKENS_PER_GPU;
    // DeepSeek and LMSYS prefill in two micro-batches; more only cost weight reads here.
    let m = micro_batches.clamp(1, 2);
    let cost = step::prefill(d, split, tokens, m);
    let computed = split.attention_gpus as f64 * tokens as f64 / cost.seconds / d.gpus() as f64;
    let served = computed / (1.0 - d.prefix_hit_rate).max(1e-6);
    PrefillPlan {
        tokens_per_attention_gpu: tokens,
        step_ms: cost.seconds * 1e3,
        computed_tok_s_per_gpu: computed,
        input_tok_s_per_node: served * d.gpus_per_machine as f64,
        bound: cost.bound(d.layout),
        cost,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::deployment;

    /// Our layout on 4 x 8 H200: every GPU is a router or an expert GPU, the batch meets the
    /// time per token, and the throughput is what the batch and step give.
    #[test]
    fn a_disaggregated_plan_splits_every_gpu_and_meets_the_target() {
        let d = deployment("h200", 4, Layout::Disaggregated);
        let p = plan(&d);
        assert!(p.fits);
        let split = p.split.clone().unwrap();
        assert_eq!(split.attention_gpus + split.expert_gpus, 32);
        let decode = p.decode.unwrap();
        assert!(decode.tpot_ms <= 50.0);
        let expected = split.attention_gpus as f64 * decode.batch_per_attention_gpu as f64
            / (decode.step_ms / 1e3)
            / 32.0;
        assert!((decode.tok_s_per_gpu - expected).abs() < 1e-6 * expected);
        assert!(["memory", "compute", "network"].contains(&decode.bound));
    }

    /// A target no batch meets is said, with the weights still placed.
    #[test]
    fn an_impossible_target_is_reported() {
        let mut d = deployment("h200", 4, Layout::Colocated);
        d.tpot_ms = 0.5;
        let p = plan(&d);
        assert!(p.fits && p.decode.is_none());
        assert!(p.why_not.unwrap().contains("0.5 ms"));
    }
}
