//! The planner against published serving figures of DeepSeek-V3/R1. None of these figures was
//! used to set the planner's constants (those come from kernel microbenchmarks, see
//! `efficiency.rs`); the sources and the comparison are in docs/capacity.md.

use std::path::Path;

use moe_capacity::deployment::Split;
use moe_capacity::{plan, step, Deployment, Efficiency, Layout, WeightFormat};
use moe_model::ModelConfig;

fn deepseek_v3() -> ModelConfig {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ops/plan/deepseek-v3");
    ModelConfig::from_dir(&dir).expect("DeepSeek-V3's config")
}

/// A colocated deployment as DeepSeek and LMSYS run it: FP8, 32 redundant experts (288
/// slots), two micro-batches.
fn colocated(gpu: &str, machines: usize, context: usize) -> Deployment {
    Deployment {
        config: deepseek_v3(),
        gpu: moe_capacity::gpu::by_name(gpu).expect("known GPU"),
        machines,
        gpus_per_machine: 8,
        layout: Layout::Colocated,
        format: WeightFormat::Fp8,
        redundant_experts: 32,
        context,
        tpot_ms: 50.0,
        prefix_hit_rate: 0.0,
        mtp_acceptance: None,
        micro_batches: Some(2),
        decode_batch: None,
        wire_value_bytes: None,
        kv_value_bytes: None,
        efficiency: Efficiency::PUBLISHED,
    }
}

fn within(projected: f64, published: f64, tolerance: f64) {
    let ratio = projected / published;
    assert!(
        (1.0 - tolerance..=1.0 + tolerance).contains(&ratio),
        "projected {projected:.0} against {published:.0} published: {ratio:.2}x"
    );
}

/// DeepSeek's inference-system overview (2025-03-01): decode on 18 H800 nodes, expert
/// parallel over 144 GPUs with 32 redundant experts, about 20 tokens/s per user (50 ms per
/// token) with MTP, 4,989 tokens of KV per output token on average: 14.8k output tokens/s
/// per node.
#[test]
fn decode_on_deepseeks_deployment_is_within_35_percent_of_14_8k_per_node() {
    let mut d = colocated("h800", 18, 4989);
    d.mtp_acceptance = Some(0.85);
    let p = plan(&d);
    let decode = p.decode.expect("a decode batch meets 50 ms");
    within(decode.tok_s_per_node, 14_800.0, 0.35);
    assert_eq!(p.routed_experts_per_gpu, 2);
}

/// DeepSeek's profile-data (decode): EP128 (16 nodes), 128 requests per GPU at 4k prompt,
/// two micro-batches; LMSYS's blog (2025-05-05) reads 18,598 output tokens/s per node off it.
#[test]
fn decode_at_deepseeks_profiled_batch_is_within_35_percent_of_its_profile() {
    let mut d = colocated("h800", 16, 4096);
    d.mtp_acceptance = Some(0.85);
    let split = Split::colocated(&d);
    let cost = step::decode(&d, &split, 128, 2);
    let per_node = 8.0 * 128.0 * 1.85 / cost.seconds;
    within(per_node, 18_598.0, 0.35);
}

/// DeepSeek's profile-data (prefill): EP32 (4 nodes), 16,384 tokens per GPU of 4k prompts,
/// no cache hits: 62,713 tokens/s per node (LMSYS's reading).
#[test]
fn prefill_on_deepseeks_profiled_setup_is_within_35_percent_of_its_profile() {
    let d = colocated("h800", 4, 4096);
    let p = plan(&d).prefill.expect("prefill planned");
    within(p.input_tok_s_per_node, 62_713.0, 0.35);
}

/// DeepSeek's production prefill (73.7k input tokens/s per node, 56.3% of them prefix-cache
/// hits) runs at about half its profiled speed (LMSYS: "roughly twice that of its production
/// environment"): a capacity model projects the profile, so it is above production, by less
/// than twice.
#[test]
fn prefill_with_deepseeks_cache_hits_is_above_its_production_average_by_under_2x() {
    let mut d = colocated("h800", 4, 4989);
    d.prefix_hit_rate = 0.563;
    let p = plan(&d).prefill.expect("prefill planned");
    let ratio = p.input_tok_s_per_node / 73_700.0;
    assert!((1.0..2.0).contains(&ratio), "{ratio:.2}x of 73.7k");
}

/// LMSYS's SGLang on 96 H100s (2025-05-05): decode on 9 nodes, 256 sequences per GPU of
/// 2,000-token inputs, about 100 ms between tokens, no MTP: 22,282 output tokens/s per node.
#[test]
fn decode_on_lmsys_h100_setup_is_within_35_percent_of_22_3k_per_node() {
    let mut d = colocated("h100", 9, 2000);
    d.tpot_ms = 100.0;
    let split = Split::colocated(&d);
    let cost = step::decode(&d, &split, 256, 2);
    within(8.0 * 256.0 / cost.seconds, 22_282.0, 0.35);
    let planned = plan(&d).decode.expect("a batch meets 100 ms");
    within(planned.tok_s_per_node, 22_282.0, 0.35);
}

/// LMSYS's SGLang prefill, 4k prompts and 16,384 tokens per GPU: 59,337 tokens/s per node
/// with perfectly balanced experts (what the planner assumes), 50,302 with their EPLB.
#[test]
fn prefill_on_lmsys_h100_setup_is_within_35_percent_of_their_balanced_figure() {
    let d = colocated("h100", 4, 4096);
    let p = plan(&d).prefill.expect("prefill planned");
    within(p.input_tok_s_per_node, 59_337.0, 0.35);
    within(p.input_tok_s_per_node, 50_302.0, 0.35);
}
