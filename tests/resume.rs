//! What a resumed stream rests on (a request moved to another router continues from its prompt
//! and the tokens already sent): prefilling the prompt and the generated ids in one pass gives
//! bitwise the logits that decoding them one by one gave, alone and beside another sequence, on
//! every fixture. With counter-based sampling (`model/src/sampling.rs`) the draws then match
//! too, so the rest of the stream is the uninterrupted one's.

use moe_model::dense::StepSequence;
use moe_model::{Engine, GenerateRequest, SamplingParams};
use moe_tests::{fixture_dir, golden_cases, FIXTURES, FP8_FIXTURE};

#[test]
fn prefilling_generated_ids_gives_the_decoded_logits_bitwise() {
    for fixture in FIXTURES.iter().chain([&FP8_FIXTURE]) {
        let engine = Engine::load(&fixture_dir(fixture)).unwrap();
        let cases = golden_cases(fixture);
        let (case, other) = (&cases[0], &cases[cases.len() - 1]);
        let n = 12;
        let decoded = engine
            .generate(&GenerateRequest {
                input_ids: case.input_ids.clone(),
                max_new_tokens: n,
                sampling: SamplingParams::default(),
                ignore_eos: true,
                emit_logits: true,
            })
            .unwrap();
        let step_logits = decoded.step_logits.unwrap();
        // The prompt and every generated id but the last (whose logits nobody computed).
        let mut ids = case.input_ids.clone();
        ids.extend(&decoded.output_ids[..n - 1]);
        let vocab = engine.config().vocab_size;
        let first = case.input_ids.len() - 1;
        let check = |rows: &[f32], how: &str| {
            for (k, want) in step_logits.iter().enumerate() {
                let got = &rows[(first + k) * vocab..(first + k + 1) * vocab];
                assert!(
                    got == &want[..],
                    "{fixture} ({how}): generated token {k}'s logits differ in one pass"
                );
            }
        };
        check(&engine.prompt_logits(&ids).unwrap(), "alone");

        // Beside another sequence's prefill in the same step.
        let (mut mine, mut theirs) = (engine.new_cache(), engine.new_cache());
        let mut step = [
            StepSequence {
                cache: &mut theirs,
                tokens: &other.input_ids,
                all_logits: false,
            },
            StepSequence {
                cache: &mut mine,
                tokens: &ids,
                all_logits: true,
            },
        ];
        let rows = engine.step(&mut step).unwrap();
        check(&rows[1], "in a batch");
    }
}
