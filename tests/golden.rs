//! Every fixture reproduces transformers' golden outputs: prefill logits at every position,
//! the logits of every greedy step, and the greedy tokens up to the first near-tie.

use moe_model::{Engine, GenerateRequest, SamplingParams};
use moe_tests::{fixture_dir, golden_cases, max_abs_diff, steps_to_compare, FIXTURES};

const TOLERANCE: f32 = 2e-3;

fn check_fixture(name: &str) {
    let engine = Engine::load(&fixture_dir(name)).expect("fixture loads");
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
            diff <= TOLERANCE,
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
        let n = steps_to_compare(&case.step_top2_margin);
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
                diff <= TOLERANCE,
                "{name} case {i} step {step}: logits differ by {diff}"
            );
        }
        for step in 0..n {
            let diff = (out.logprobs[step] - case.output_logprobs[step]).abs();
            assert!(
                diff <= TOLERANCE,
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
