//! A sequence's results never depend on its batch-mates: the fixture prompts batched together,
//! and a prefill mixed with ongoing decodes, give what each gives alone.

use moe_model::dense::StepSequence;
use moe_model::{Engine, GenerateRequest, SamplingParams};
use moe_tests::{fixture_dir, golden_cases, max_abs_diff, FIXTURES};

const TOLERANCE: f32 = 1e-4;

fn request(ids: &[u32], n: usize) -> GenerateRequest {
    GenerateRequest {
        input_ids: ids.to_vec(),
        max_new_tokens: n,
        sampling: SamplingParams::default(),
        ignore_eos: true,
        emit_logits: true,
    }
}

#[test]
fn fixture_prompts_batched_equal_alone() {
    for fixture in FIXTURES {
        let engine = Engine::load(&fixture_dir(fixture)).unwrap();
        let cases = golden_cases(fixture);
        let lengths: Vec<usize> = cases.iter().map(|c| c.input_ids.len()).collect();
        assert!(
            lengths.windows(2).any(|w| w[0] != w[1]),
            "{fixture}: want prompts of different lengths"
        );
        let requests: Vec<GenerateRequest> =
            cases.iter().map(|c| request(&c.input_ids, 16)).collect();
        let batched = engine.generate_batch(&requests).unwrap();
        for (i, req) in requests.iter().enumerate() {
            let alone = engine.generate(req).unwrap();
            assert_eq!(
                batched[i].output_ids, alone.output_ids,
                "{fixture} case {i}: ids differ in a batch"
            );
            let (b, a) = (
                batched[i].step_logits.as_ref().unwrap(),
                alone.step_logits.as_ref().unwrap(),
            );
            for step in 0..a.len() {
                let diff = max_abs_diff(&b[step], &a[step]);
                assert!(
                    diff <= TOLERANCE,
                    "{fixture} case {i} step {step}: batched logits differ by {diff}"
                );
            }
        }
    }
}

#[test]
fn prefill_mixed_with_decodes_equals_alone() {
    for fixture in FIXTURES {
        let engine = Engine::load(&fixture_dir(fixture)).unwrap();
        let cases = golden_cases(fixture);
        let (a_ids, b_ids, c_ids) = (
            &cases[0].input_ids,
            &cases[1].input_ids,
            &cases[2].input_ids,
        );

        // Reference: each sequence alone.
        let a_alone = engine.generate(&request(a_ids, 4)).unwrap();
        let b_alone = engine.generate(&request(b_ids, 4)).unwrap();
        let c_alone = engine.prompt_logits(c_ids).unwrap();

        // A and B prefilled and decoding; then one step with A's and B's decode tokens and C's
        // whole prompt (all of C's prompt logits requested).
        let mut a = engine.new_cache();
        let mut b = engine.new_cache();
        let mut c = engine.new_cache();
        let first = {
            let mut step = [
                StepSequence {
                    cache: &mut a,
                    tokens: a_ids,
                    all_logits: false,
                },
                StepSequence {
                    cache: &mut b,
                    tokens: b_ids,
                    all_logits: false,
                },
            ];
            engine.step(&mut step).unwrap()
        };
        assert!(max_abs_diff(&first[0], &a_alone.step_logits.as_ref().unwrap()[0]) <= TOLERANCE);
        assert!(max_abs_diff(&first[1], &b_alone.step_logits.as_ref().unwrap()[0]) <= TOLERANCE);
        let (ta, tb) = ([a_alone.output_ids[0]], [b_alone.output_ids[0]]);
        let mixed = {
            let mut step = [
                StepSequence {
                    cache: &mut a,
                    tokens: &ta,
                    all_logits: false,
                },
                StepSequence {
                    cache: &mut c,
                    tokens: c_ids,
                    all_logits: true,
                },
                StepSequence {
                    cache: &mut b,
                    tokens: &tb,
                    all_logits: false,
                },
            ];
            engine.step(&mut step).unwrap()
        };
        let diff_a = max_abs_diff(&mixed[0], &a_alone.step_logits.as_ref().unwrap()[1]);
        let diff_c = max_abs_diff(&mixed[1], &c_alone);
        let diff_b = max_abs_diff(&mixed[2], &b_alone.step_logits.as_ref().unwrap()[1]);
        assert!(
            diff_a <= TOLERANCE,
            "{fixture}: decode logits of A differ by {diff_a} next to a prefill"
        );
        assert!(
            diff_b <= TOLERANCE,
            "{fixture}: decode logits of B differ by {diff_b} next to a prefill"
        );
        assert!(
            diff_c <= TOLERANCE,
            "{fixture}: prefill logits of C differ by {diff_c} next to decodes"
        );
        assert_eq!(a.len, a_ids.len() + 1);
        assert_eq!(c.len, c_ids.len());
    }
}

#[test]
fn batching_is_bitwise_invariant() {
    // Stronger than the tolerance above: the kernels keep every row's arithmetic identical.
    let engine = Engine::load(&fixture_dir(FIXTURES[0])).unwrap();
    let cases = golden_cases(FIXTURES[0]);
    let requests: Vec<GenerateRequest> = cases.iter().map(|c| request(&c.input_ids, 8)).collect();
    let batched = engine.generate_batch(&requests).unwrap();
    for (i, req) in requests.iter().enumerate() {
        assert_eq!(batched[i], engine.generate(req).unwrap(), "case {i}");
    }
}
