//! Every fixture reproduces transformers' golden outputs: prefill logits at every position,
//! the logits of every greedy step, and the greedy tokens up to the first near-tie.
//!
//! On the CPU (the default) within 2e-3. With `--features cuda` and `MOE_TEST_DEVICE=cuda:0`
//! the whole model runs on that GPU, the dense part (attention with its KV cache, norms, gate,
//! shared experts, lm_head) and the routed experts (`ops/gpu-check.sh`): within 2e-3 with
//! `MOE_TEST_GPU_DTYPE=f32`, within 2e-2 with `bf16` (the default).

use moe_model::device::{Device, GpuDtype};
use moe_model::experts::ExpertDevice;
use moe_model::{Engine, GenerateRequest, SamplingParams};
use moe_tests::{fixture_dir, golden_cases, max_abs_diff, steps_to_compare_at, FIXTURES};

/// Where the experts run and the tolerance that goes with it.
struct Target {
    experts_on: ExpertDevice,
    tolerance: f32,
    near_tie: f32,
}

fn target() -> Target {
    let device: Device = std::env::var("MOE_TEST_DEVICE")
        .unwrap_or_else(|_| "cpu".into())
        .parse()
        .expect("MOE_TEST_DEVICE is cpu or cuda:N");
    let dtype: GpuDtype = std::env::var("MOE_TEST_GPU_DTYPE")
        .unwrap_or_else(|_| "bf16".into())
        .parse()
        .expect("MOE_TEST_GPU_DTYPE is bf16 or f32");
    let experts_on = device
        .open_experts(dtype)
        .unwrap_or_else(|e| panic!("MOE_TEST_DEVICE={device}: {e}"));
    let tolerance = match (device, dtype) {
        (Device::Cpu, _) | (_, GpuDtype::F32) => 2e-3,
        (Device::Cuda(_), GpuDtype::Bf16) => 2e-2,
    };
    let near_tie = if device == Device::Cpu {
        0.002
    } else {
        2.0 * tolerance
    };
    Target {
        experts_on,
        tolerance,
        near_tie,
    }
}

fn check_fixture(name: &str) {
    let Target {
        experts_on,
        tolerance,
        near_tie,
    } = target();
    let engine = Engine::load_on(&fixture_dir(name), &experts_on).expect("fixture loads");
    eprintln!("{name}: on {}", engine.dense().placement());
    let vocab = engine.config().vocab_size;
    for (i, case) in golden_cases(name).iter().enumerate() {
        let encoded = engine.tokenizer().encode_prompt(&case.prompt).unwrap();
        assert_eq!(
            encoded, case.input_ids,
            "{name} case {i}: tokenizer differs"
        );

        let prefill = engine.prompt_logits(&case.input_ids).unwrap();
        let diff = max_abs_diff(&prefill, &case.prefill_logits);
        assert!(
            diff <= tolerance,
            "{name} case {i}: prefill logits differ by {diff}"
        );

        let out = engine
            .generate(&GenerateRequest {
                input_ids: case.input_ids.clone(),
                max_new_tokens: case.output_ids.len(),
                sampling: SamplingParams::default(),
                ignore_eos: true,
                emit_logits: true,
            })
            .unwrap();
        let n = steps_to_compare_at(&case.step_top2_margin, near_tie);
        assert_eq!(
            out.output_ids[..n],
            case.output_ids[..n],
            "{name} case {i}: greedy tokens differ within the first {n} steps"
        );
        let step_logits = out.step_logits.as_ref().unwrap();
        // Logits are comparable while the sequences agree (after a near-tie they may diverge).
        let agree = out
            .output_ids
            .iter()
            .zip(&case.output_ids)
            .take_while(|(a, b)| a == b)
            .count();
        let comparable = (agree + 1).min(case.output_ids.len());
        for (step, logits) in step_logits.iter().enumerate().take(comparable) {
            let golden = &case.step_logits[step * vocab..(step + 1) * vocab];
            let diff = max_abs_diff(logits, golden);
            assert!(
                diff <= tolerance,
                "{name} case {i} step {step}: logits differ by {diff}"
            );
        }
        for step in 0..n {
            let diff = (out.logprobs[step] - case.output_logprobs[step]).abs();
            assert!(
                diff <= tolerance,
                "{name} case {i} step {step}: logprob differs by {diff}"
            );
        }
        let text = engine.tokenizer().decode(&out.output_ids).unwrap();
        if agree == case.output_ids.len() {
            assert_eq!(text, case.text, "{name} case {i}: decoded text differs");
        }
    }
}

#[test]
fn deepseek_v3_matches_transformers() {
    check_fixture(FIXTURES[0]);
}

#[test]
fn qwen3_moe_matches_transformers() {
    check_fixture(FIXTURES[1]);
}

#[test]
fn mixtral_bf16_matches_transformers() {
    check_fixture(FIXTURES[2]);
}
