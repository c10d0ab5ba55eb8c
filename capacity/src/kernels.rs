//! Time of one kernel as the larger of its compute time and its memory time at the reached
//! fraction of each peak; a step's kernels summed by what bounds each.

use serde::Serialize;

use crate::efficiency::Efficiency;
use crate::footprint::Weights;
use crate::gpu::GpuKind;

/// Seconds of a step (or a part of one) by what bounds them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Seconds {
    /// Kernels whose memory traffic takes longer than their math.
    pub memory: f64,
    /// Kernels whose math takes longer.
    pub compute: f64,
}

impl Seconds {
    pub fn total(&self) -> f64 {
        self.memory + self.compute
    }

    fn kernel(flop_s: f64, memory_s: f64) -> Self {
        if memory_s >= flop_s {
            Seconds {
                memory: memory_s,
                compute: 0.0,
            }
        } else {
            Seconds {
                memory: 0.0,
                compute: flop_s,
            }
        }
    }

    pub fn times(self, n: f64) -> Self {
        Seconds {
            memory: self.memory * n,
            compute: self.compute * n,
        }
    }
}

impl std::ops::Add for Seconds {
    type Output = Seconds;
    fn add(self, o: Seconds) -> Seconds {
        Seconds {
            memory: self.memory + o.memory,
            compute: self.compute + o.compute,
        }
    }
}

impl std::ops::AddAssign for Seconds {
    fn add_assign(&mut self, o: Seconds) {
        *self = *self + o;
    }
}

/// The GPU and what its kernels reach.
#[derive(Debug, Clone, Copy)]
pub struct Machine<'a> {
    pub gpu: &'a GpuKind,
    pub eff: &'a Efficiency,
    /// Whether projections run on FP8 tensor cores (FP8 weights) or bf16 ones.
    pub fp8_math: bool,
}

/// How a GEMM's rows arrive: few (decode, weights streamed), many (prefill), or grouped by
/// expert.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum GemmKind {
    Dense,
    GroupedDecode,
    GroupedPrefill,
}

impl Machine<'_> {
    fn projection_peak(&self) -> f64 {
        if self.fp8_math {
            self.gpu.fp8_flops
        } else {
            self.gpu.bf16_flops
        }
    }

    /// `rows` rows through `weights`, read once.
    pub fn gemm(&self, kind: GemmKind, rows: f64, weights: Weights) -> Seconds {
        self.grouped(kind, rows, weights, 1)
    }

    /// `rows` rows, each through one of `groups` matrices like `weights` (routed experts):
    /// the math of one matrix per row, the bytes of all of them.
    pub fn grouped(&self, kind: GemmKind, rows: f64, weights: Weights, groups: usize) -> Seconds {
        if rows <= 0.0 {
            return Seconds::default();
        }
        let eff = match kind {
            GemmKind::Dense => self.eff.dense_gemm,
            GemmKind::GroupedDecode => self.eff.grouped_gemm_decode,
            GemmKind::GroupedPrefill => self.eff.grouped_gemm_prefill,
        };
        let flop_s = 2.0 * rows * weights.params / (self.projection_peak() * eff);
        let memory_s =
            weights.bytes * groups as f64 / (self.gpu.hbm_bytes_per_s * self.eff.weight_streaming);
        Seconds::kernel(flop_s, memory_s)
    }

    /// A bf16 GEMM (lm_head, the MoE gate) whatever the weight format.
    pub fn gemm_bf16(&self, rows: f64, weights: Weights) -> Seconds {
        if rows <= 0.0 {
            return Seconds::default();
        }
        let flop_s = 2.0 * rows * weights.params / (self.gpu.bf16_flops * self.eff.dense_gemm);
        let memory_s = weights.bytes / (self.gpu.hbm_bytes_per_s * self.eff.weight_streaming);
        Seconds::kernel(flop_s, memory_s)
    }

    /// Decode attention: `flops` of bf16 math over `cache_bytes` read from the KV cache.
    pub fn decode_attention(&self, flops: f64, cache_bytes: f64) -> Seconds {
        let flop_s = flops / (self.gpu.bf16_flops * self.eff.mla_decode_compute);
        let memory_s = cache_bytes / (self.gpu.hbm_bytes_per_s * self.eff.mla_decode_memory);
        Seconds::kernel(flop_s, memory_s)
    }

    /// Prefill attention: compute-bound at long prompts.
    pub fn prefill_attention(&self, flops: f64) -> Seconds {
        Seconds::kernel(
            flops / (self.gpu.bf16_flops * self.eff.prefill_attention),
            0.0,
        )
    }
}

/// Bytes moved per GPU and the time they take.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Traffic {
    pub network_bytes: f64,
    pub nvlink_bytes: f64,
    pub seconds: f64,
}

impl std::ops::Add for Traffic {
    type Output = Traffic;
    fn add(self, o: Traffic) -> Traffic {
        Traffic {
            network_bytes: self.network_bytes + o.network_bytes,
            nvlink_bytes: self.nvlink_bytes + o.nvlink_bytes,
            seconds: self.seconds + o.seconds,
        }
    }
}

impl Traffic {
    /// `network` and `nvlink` bytes in one direction, at once over both links.
    pub fn over(
        gpu: &GpuKind,
        network_eff: f64,
        nvlink_eff: f64,
        network: f64,
        nvlink: f64,
    ) -> Self {
        let seconds = (network / (gpu.network_bytes_per_s * network_eff))
            .max(nvlink / (gpu.nvlink_bytes_per_s * nvlink_eff));
        Traffic {
            network_bytes: network,
            nvlink_bytes: nvlink,
            seconds,
        }
    }

    pub fn times(self, n: f64) -> Self {
        Traffic {
            network_bytes: self.network_bytes * n,
            nvlink_bytes: self.nvlink_bytes * n,
            seconds: self.seconds * n,
        }
    }
}

/// Time of a step whose `stages` (per-layer compute of each side, the exchange) pipeline over
/// `micro_batches`: the slowest stage always, the others once spread over the micro-batches
/// (one micro-batch: everything in sequence; many: the slowest stage alone).
pub fn pipelined(stages: &[f64], micro_batches: usize) -> f64 {
    let slowest = stages.iter().copied().fold(0.0, f64::max);
    let rest: f64 = stages.iter().sum::<f64>() - slowest;
    slowest + rest / micro_batches.max(1) as f64
}

/// The busiest of `gpus` GPUs against the mean, when each receives a Poisson count of mean
/// `pairs` (routing balanced on average, as EPLB makes it, the batch's picks random): the
/// expected maximum of `gpus` normals (Blom's approximation) in units of the count's spread.
pub fn busiest_over_mean(pairs: f64, gpus: usize) -> f64 {
    if gpus <= 1 || pairs <= 0.0 {
        return 1.0;
    }
    let n = gpus as f64;
    let z = inverse_normal((n - 0.375) / (n + 0.25));
    1.0 + z / pairs.sqrt()
}

/// The standard normal quantile (Acklam's rational approximation, relative error < 1.2e-9).
fn inverse_normal(p: f64) -> f64 {
    const A: [f64; 6] = [
        -3.969683028665376e1,
        2.209460984245205e2,
        -2.759285104469687e2,
        1.383_577_518_672_69e2,
        -3.066479806614716e1,
        2.506628277459239,
    ];
    const B: [f64; 5] = [
        -5.447609879822406e1,
        1.615858368580409e2,
        -1.556989798598866e2,
        6.680131188771972e1,
        -1.328068155288572e1,
    ];
    const C: [f64; 6] = [
        -7.784894002430293e-3,
        -3.223964580411365e-1,
        -2.400758277161838,
        -2.549732539343734,
        4.374664141464968,
        2.938163982698783,
    ];
    const D: [f64; 4] = [
        7.784695709041462e-3,
        3.224671290700398e-1,
        2.445134137142996,
        3.754408661907416,
    ];
    let p = p.clamp(1e-12, 1.0 - 1e-12);
    let tail = |q: f64| {
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    };
    if p < 0.02425 {
        tail((-2.0 * p.ln()).sqrt())
    } else if p > 1.0 - 0.02425 {
        -tail((-2.0 * (1.0 - p).ln()).sqrt())
    } else {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pipelining_hides_all_but_the_slowest_stage_as_micro_batches_grow() {
        assert_eq!(pipelined(&[3.0, 1.0, 2.0], 1), 6.0);
        assert_eq!(pipelined(&[3.0, 1.0, 2.0], 2), 4.5);
        assert!((pipelined(&[3.0, 1.0, 2.0], 1000) - 3.0).abs() < 0.01);
    }

    /// The maximum of 144 normals is about 2.6 standard deviations above the mean; a count
    /// of mean 1024 has a spread of 32, so the busiest GPU gets about 8% more.
    #[test]
    fn the_busiest_gpu_is_a_few_spreads_above_the_mean() {
        assert!((inverse_normal(0.975) - 1.959964).abs() < 1e-5);
        let f = busiest_over_mean(1024.0, 144);
        assert!((f - 1.082).abs() < 0.003, "{f}");
        assert_eq!(busiest_over_mean(10.0, 1), 1.0);
    }
}
