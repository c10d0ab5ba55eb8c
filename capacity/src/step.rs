//! One decode step and one prefill step of a deployment: the kernels of every layer on an
//! attention GPU and on the busiest expert GPU, the exchange between them, and the step time
//! once micro-batches overlap them.

use serde::Serialize;

use crate::deployment::{Deployment, Layout, Split};
use crate::exchange::{layer_exchange, Phase};
use crate::footprint::{Footprint, Weights};
use crate::kernels::{busiest_over_mean, pipelined, GemmKind, Machine, Seconds, Traffic};

/// Where a step's time goes, per step (all micro-batches).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StepCost {
    /// Attention over the cache (or the prompt), on an attention GPU.
    pub attention: Seconds,
    /// Projections, shared experts, dense MLPs, gates and lm_head, on an attention GPU.
    pub dense: Seconds,
    /// Routed experts on the busiest expert GPU.
    pub experts: Seconds,
    /// Bytes an attention GPU or the busiest expert GPU (the slower) moves, and the time.
    pub exchange: Traffic,
    pub micro_batches: usize,
    /// The step, overlapped as the layout runs it.
    pub seconds: f64,
}

impl StepCost {
    /// What bounds the step: the network if the exchange is the slowest stage, else the
    /// larger of the memory-bound and compute-bound kernel time.
    pub fn bound(&self, layout: Layout) -> &'static str {
        let gpu_side = match layout {
            Layout::Colocated => self.attention + self.dense + self.experts,
            Layout::Disaggregated => {
                let router = self.attention + self.dense;
                if router.total() >= self.experts.total() {
                    router
                } else {
                    self.experts
                }
            }
        };
        if self.exchange.seconds > gpu_side.total() {
            "network"
        } else if gpu_side.memory >= gpu_side.compute {
            "memory"
        } else {
            "compute"
        }
    }
}

/// Rows one micro-batch brings to a layer.
struct MicroBatch {
    /// Rows through the main layers (users x rows per user).
    rows: f64,
    /// Rows through the MTP layers (one draft per user), 0 without MTP.
    mtp_rows: f64,
    /// Tokens whose attention each row reads (cache length, or prompt position).
    attended: f64,
    /// Sequences whose cache is read (decode) or 0 (prefill reads no stored cache).
    cached_sequences: f64,
    /// lm_head rows.
    head_rows: f64,
}

fn gate(f: &Footprint, hidden: usize) -> Weights {
    Weights {
        params: (f.experts_per_layer * hidden) as f64,
        bytes: (f.experts_per_layer * hidden * 2) as f64,
    }
}

/// Attention, dense kernels and routed experts of one micro-batch over all layers.
fn micro_batch_kernels(
    d: &Deployment,
    split: &Split,
    phase: Phase,
    mb: &MicroBatch,
) -> (Seconds, Seconds, Seconds) {
    let m = Machine {
        gpu: &d.gpu,
        eff: &d.efficiency,
        fp8_math: d.format.uses_fp8_math(),
    };
    let f = d.footprint();
    let c = &d.config;
    let dims = d.attention_dims();
    let kv_layer_bytes = (c.kv_values_per_token_per_layer() * d.kv_value_bytes()) as f64;
    let (gemm, grouped) = match phase {
        Phase::Decode => (GemmKind::Dense, GemmKind::GroupedDecode),
        Phase::Prefill => (GemmKind::Dense, GemmKind::GroupedPrefill),
    };
    let attention_of = |rows: f64| match phase {
        Phase::Decode => {
            let flops = rows
                * mb.attended
                * dims.heads as f64
                * 2.0
                * (dims.decode_score + dims.decode_value) as f64;
            let read = mb.cached_sequences * mb.attended * kv_layer_bytes;
            m.decode_attention(flops, read)
        }
        Phase::Prefill => m.prefill_attention(
            rows * mb.attended
                * dims.heads as f64
                * 2.0
                * (dims.prefill_score + dims.prefill_value) as f64,
        ),
    };
    let mut attention = Seconds::default();
    let mut dense = Seconds::default();
    let mut experts = Seconds::default();
    let k = c.moe.top_k as f64;
    let moe_layer = |rows: f64| {
        let pairs = split.attention_gpus as f64 * rows * k / split.expert_gpus as f64;
        let busiest = busiest_over_mean(pairs, split.expert_gpus);
        let dense =
            m.gemm(gemm, rows, f.shared_per_layer) + m.gemm_bf16(rows, gate(&f, c.hidden_size));
        let routed = m.grouped(
            grouped,
            pairs * busiest,
            f.expert,
            split.routed_experts_per_gpu,
        );
        (dense, routed)
    };
    for layer in 0..c.num_layers {
        attention += attention_of(mb.rows);
        dense += m.gemm(gemm, mb.rows, f.attention_per_layer);
        if c.is_moe_layer(layer) {
            let (shared, routed) = moe_layer(mb.rows);
            dense += shared;
            experts += routed;
        } else {
            dense += m.gemm(gemm, mb.rows, f.dense_mlp_per_layer);
        }
    }
    let mtp_layers = if mb.mtp_rows > 0.0 { c.mtp_layers } else { 0 };
    for _ in 0..mtp_layers {
        attention += attention_of(mb.mtp_rows);
        dense += m.gemm(gemm, mb.mtp_rows, f.attention_per_layer);
        let (shared, routed) = moe_layer(mb.mtp_rows);
        dense += shared;
        experts += routed;
        dense += m.gemm_bf16(mb.mtp_rows, f.head);
    }
    dense += m.gemm_bf16(mb.head_rows, f.head);
    (attention, dense, experts)
}

/// Exchanges of one micro-batch over all MoE layers.
fn micro_batch_exchange(d: &Deployment, split: &Split, phase: Phase, mb: &MicroBatch) -> Traffic {
    let c = &d.config;
    let k = c.moe.top_k as f64;
    let layer = |rows: f64| {
        let pairs = split.attention_gpus as f64 * rows * k / split.expert_gpus as f64;
        layer_exchange(
            d,
            split,
            phase,
            rows,
            busiest_over_mean(pairs, split.expert_gpus),
        )
    };
    let moe_main = c.moe_layers.iter().filter(|&&m| m).count() as f64;
    let mut total = layer(mb.rows).times(moe_main);
    if mb.mtp_rows > 0.0 {
        total = total + layer(mb.mtp_rows).times(c.mtp_layers as f64);
    }
    total
}

/// A step of `mb` micro-batches, each as given.
fn step(
    d: &Deployment,
    split: &Split,
    phase: Phase,
    mb: &MicroBatch,
    micro_batches: usize,
) -> StepCost {
    let n = micro_batches.max(1) as f64;
    let (attention, dense, experts) = micro_batch_kernels(d, split, phase, mb);
    let (attention, dense, experts) = (attention.times(n), dense.times(n), experts.times(n));
    let exchange = micro_batch_exchange(d, split, phase, mb).times(n);
    let stages = match d.layout {
        Layout::Colocated => vec![(attention + dense + experts).total(), exchange.seconds],
        Layout::Disaggregated => vec![
            (attention + dense).total(),
            experts.total(),
            exchange.seconds,
        ],
    };
    StepCost {
        attention,
        dense,
        experts,
        exchange,
        micro_batches,
        seconds: pipelined(&stages, micro_batches),
    }
}

/// A decode step with `users` sequences on each attention GPU, split in `micro_batches`.
pub fn decode(d: &Deployment, split: &Split, users: usize, micro_batches: usize) -> StepCost {
    let (_, rows_per_user) = d.tokens_and_rows_per_step();
    let per_mb = users as f64 / micro_batches.max(1) as f64;
    let mb = MicroBatch {
        rows: per_mb * rows_per_user,
        mtp_rows: if d.mtp_acceptance.is_some() {
            per_mb
        } else {
            0.0
        },
        attended: d.context as f64,
        cached_sequences: per_mb,
        head_rows: per_mb * rows_per_user,
    };
    step(d, split, Phase::Decode, &mb, micro_batches)
}

/// A prefill step of `tokens` computed prompt tokens on each attention GPU. Each attends on
/// average to half its prompt's positions past the cached prefix plus that prefix.
pub fn prefill(d: &Deployment, split: &Split, tokens: usize, micro_batches: usize) -> StepCost {
    let per_mb = tokens as f64 / micro_batches.max(1) as f64;
    let hit = d.prefix_hit_rate;
    let computed_per_prompt = ((1.0 - hit) * d.context as f64).max(1.0);
    let mb = MicroBatch {
        rows: per_mb,
        mtp_rows: if d.mtp_acceptance.is_some() {
            per_mb
        } else {
            0.0
        },
        attended: (1.0 + hit) / 2.0 * d.context as f64,
        cached_sequences: 0.0,
        head_rows: per_mb / computed_per_prompt,
    };
    step(d, split, Phase::Prefill, &mb, micro_batches)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::deployment;

    /// A bigger batch takes longer; at a small batch, two micro-batches read every weight
    /// twice and lose to one; the exchange grows with the rows.
    #[test]
    fn decode_steps_grow_with_the_batch_and_micro_batches_reread_weights() {
        let d = deployment("h200", 4, Layout::Colocated);
        let split = Split::colocated(&d);
        let small = decode(&d, &split, 8, 1);
        let large = decode(&d, &split, 128, 1);
        assert!(large.seconds > small.seconds);
        assert!(large.exchange.network_bytes > 10.0 * small.exchange.network_bytes);
        let two = decode(&d, &split, 8, 2);
        assert!(two.dense.memory > 1.9 * small.dense.memory);
        assert!(two.seconds > small.seconds);
    }

    /// Per token and MoE layer, our router sends its f32 row to about eight expert GPUs and
    /// gets eight f32 answers back: 16 x 28.7 KB = 459 KB; DeepEP sends eight FP8 copies
    /// (7.4 KB with scales) and gets eight bf16 answers (14.3 KB): 174 KB. About 2.6 times.
    #[test]
    fn our_wire_moves_more_bytes_than_deepeps() {
        let ours = deployment("h200", 4, Layout::Disaggregated);
        let theirs = deployment("h200", 4, Layout::Colocated);
        let split = Split::disaggregated(&ours, 16).unwrap();
        let a = decode(&ours, &split, 64, 1).exchange;
        let b = decode(&theirs, &Split::colocated(&theirs), 64, 1).exchange;
        let ratio = (a.network_bytes + a.nvlink_bytes) / (b.network_bytes + b.nvlink_bytes);
        assert!(ratio > 2.0 && ratio < 3.0, "{ratio}");
    }

    /// Prefill attention grows with the cached prefix each computed token attends to.
    #[test]
    fn prefix_hits_lengthen_the_attention_of_computed_tokens() {
        let mut d = deployment("h800", 4, Layout::Colocated);
        let split = Split::colocated(&d);
        let cold = prefill(&d, &split, 16_384, 2);
        d.prefix_hit_rate = 0.5;
        let warm = prefill(&d, &split, 16_384, 2);
        let ratio = warm.attention.total() / cold.attention.total();
        assert!((ratio - 1.5).abs() < 1e-9, "{ratio}");
    }
}
