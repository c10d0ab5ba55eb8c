//! What fraction of each peak a kernel reaches, from published microbenchmarks on H800 (the
//! same silicon as H100 apart from NVLink). None of these is fitted to the serving figures
//! the planner is checked against (docs/capacity.md): each comes from a kernel's own table.

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Efficiency {
    /// Grouped FP8 GEMM of decode (few rows per expert, masked layout). DeepGEMM README,
    /// "Grouped GEMMs for MoE models (masked layout)", H800: 815 to 1233 TFLOP/s over its six
    /// shapes, median about 930 of 1979.
    pub grouped_gemm_decode: f64,
    /// Grouped FP8 GEMM of prefill (thousands of rows per expert, contiguous layout).
    /// DeepGEMM README, contiguous layout: 1093 to 1297 TFLOP/s, mean about 1194 of 1979.
    pub grouped_gemm_prefill: f64,
    /// A dense GEMM with thousands of rows. DeepGEMM README, normal GEMMs at M = 4096:
    /// 1025 to 1358 TFLOP/s (one shape with K = 512 at 590), about 1150 of 1979.
    pub dense_gemm: f64,
    /// A GEMM with few rows streams its weights: DeepGEMM README at M = 64 and 128 reaches
    /// 1509 to 2668 GB/s, median about 2300 of the H800's 3350 GB/s.
    pub weight_streaming: f64,
    /// MLA decode attention, compute-bound. FlashMLA README: 580 TFLOP/s (bf16) on H800.
    pub mla_decode_compute: f64,
    /// MLA decode attention, memory-bound. FlashMLA README: 3000 GB/s on H800.
    pub mla_decode_memory: f64,
    /// Prefill attention (causal, long sequences). FlashAttention-3 paper (Shah et al. 2024,
    /// figure 5): about 600 of 989 bf16 TFLOP/s for causal head dim 128 at 8k-16k tokens.
    pub prefill_attention: f64,
    /// Low-latency all-to-all of decode over the network card. DeepEP README, low-latency
    /// kernels, H800 with CX7 400 Gb/s: 39 to 46 GB/s at EP 64-256 of about 50.
    pub network_decode: f64,
    /// High-throughput all-to-all of prefill over the network card. DeepEP README, normal
    /// kernels internode: 43 to 58 GB/s "bottleneck bandwidth"; 43 of 50 taken.
    pub network_prefill: f64,
    /// NVLink inside a machine. DeepEP README, intranode: 153 to 158 GB/s of the H800's 200.
    pub nvlink: f64,
}

impl Efficiency {
    pub const PUBLISHED: Efficiency = Efficiency {
        grouped_gemm_decode: 930.0 / 1979.0,
        grouped_gemm_prefill: 1194.0 / 1979.0,
        dense_gemm: 1150.0 / 1979.0,
        weight_streaming: 2300.0 / 3350.0,
        mla_decode_compute: 580.0 / 989.0,
        mla_decode_memory: 3000.0 / 3350.0,
        prefill_attention: 600.0 / 989.0,
        network_decode: 39.0 / 50.0,
        network_prefill: 43.0 / 50.0,
        nvlink: 155.0 / 200.0,
    };
}
