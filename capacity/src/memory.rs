//! Bytes each kind of GPU holds: weights, the KV cache of its sequences, activations, and a
//! reserve for the runtime.

use serde::Serialize;

use crate::deployment::{Deployment, Layout, Split, RUNTIME_RESERVE_BYTES};
use crate::footprint::Footprint;

/// One GPU's memory at a decode batch.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct GpuMemory {
    pub weights: f64,
    pub kv_cache: f64,
    pub activations: f64,
    pub reserve: f64,
    pub capacity: f64,
}

impl GpuMemory {
    pub fn used(&self) -> f64 {
        self.weights + self.kv_cache + self.activations + self.reserve
    }

    pub fn fits(&self) -> bool {
        self.used() <= self.capacity
    }
}

/// Hidden-sized f32 buffers a row keeps live through a layer (residual, normed input,
/// attention output, queries, MoE input and output, combine): about eight.
const ROW_BUFFERS: f64 = 8.0;

fn routed_bytes(f: &Footprint, split: &Split) -> f64 {
    f.expert.bytes * (split.routed_experts_per_gpu * f.moe_layers) as f64
}

/// Bytes of a row's activations on an attention GPU (and its logits).
fn row_activation_bytes(d: &Deployment) -> f64 {
    let c = &d.config;
    (c.hidden_size as f64 * ROW_BUFFERS + c.vocab_size as f64) * 4.0
}

/// Bytes of one routed pair's activations on an expert GPU: its input row, the gate and up
/// projections, and its output row, in f32.
fn pair_activation_bytes(d: &Deployment) -> f64 {
    let c = &d.config;
    (2 * c.hidden_size + 2 * c.moe.intermediate_size) as f64 * 4.0
}

/// An attention GPU (every GPU when colocated) decoding `users` sequences.
pub fn attention_gpu(d: &Deployment, split: &Split, users: usize) -> GpuMemory {
    let f = d.footprint();
    let (_, rows_per_user) = d.tokens_and_rows_per_step();
    let rows = users as f64 * rows_per_user;
    let mut weights = f.dense.bytes + f.mtp_dense.bytes;
    let mut activations = rows * row_activation_bytes(d);
    if d.layout == Layout::Colocated {
        weights += routed_bytes(&f, split);
        activations += rows * d.config.moe.top_k as f64 * pair_activation_bytes(d);
    }
    GpuMemory {
        weights,
        kv_cache: users as f64 * d.context as f64 * d.kv_bytes_per_token(),
        activations,
        reserve: RUNTIME_RESERVE_BYTES,
        capacity: d.gpu.memory_bytes,
    }
}

/// An expert GPU of the disaggregated layout while each attention GPU decodes `users`.
pub fn expert_gpu(d: &Deployment, split: &Split, users: usize) -> GpuMemory {
    let f = d.footprint();
    let (_, rows_per_user) = d.tokens_and_rows_per_step();
    let pairs =
        split.attention_gpus as f64 * users as f64 * rows_per_user * d.config.moe.top_k as f64
            / split.expert_gpus as f64;
    GpuMemory {
        weights: routed_bytes(&f, split),
        kv_cache: 0.0,
        activations: pairs * pair_activation_bytes(d),
        reserve: RUNTIME_RESERVE_BYTES,
        capacity: d.gpu.memory_bytes,
    }
}

/// Whether both kinds of GPU hold `users` sequences each.
pub fn holds(d: &Deployment, split: &Split, users: usize) -> bool {
    attention_gpu(d, split, users).fits()
        && (d.layout == Layout::Colocated || expert_gpu(d, split, users).fits())
}

/// Most sequences each attention GPU holds (0 when not even the weights fit).
pub fn max_users(d: &Deployment, split: &Split) -> usize {
    if !holds(d, split, 0) {
        return 0;
    }
    let (mut lo, mut hi) = (0usize, 1usize);
    while holds(d, split, hi) {
        lo = hi;
        hi *= 2;
        if hi > 1 << 24 {
            return lo;
        }
    }
    while hi - lo > 1 {
        let mid = (lo + hi) / 2;
        if holds(d, split, mid) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    lo
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deployment::Layout;
    use crate::footprint::WeightFormat;
    use crate::test_support::deployment;

    /// bf16 DeepSeek-V3 is about 1.37 TB: more than 8 x 141 GB. FP8 is about 0.69 TB: more
    /// than 8 x 80 GB. Neither fits one machine, whichever way it is split.
    #[test]
    fn the_model_does_not_fit_one_machine_in_bf16_on_h200_nor_in_fp8_on_h100() {
        let mut d = deployment("h200", 1, Layout::Colocated);
        d.format = WeightFormat::Bf16;
        assert!(d.footprint().total().bytes > 8.0 * 141e9);
        assert_eq!(max_users(&d, &Split::colocated(&d)), 0);
        d.layout = Layout::Disaggregated;
        assert!((1..8).all(|r| max_users(&d, &Split::disaggregated(&d, r).unwrap()) == 0));

        let mut d = deployment("h100", 1, Layout::Colocated);
        d.format = WeightFormat::Fp8;
        assert!(d.footprint().total().bytes > 8.0 * 80e9);
        assert_eq!(max_users(&d, &Split::colocated(&d)), 0);
        d.layout = Layout::Disaggregated;
        assert!((1..8).all(|r| max_users(&d, &Split::disaggregated(&d, r).unwrap()) == 0));

        // FP8 on one machine of 8 x H200 fits, colocated.
        let d = deployment("h200", 1, Layout::Colocated);
        assert!(max_users(&d, &Split::colocated(&d)) > 0);
    }
}
