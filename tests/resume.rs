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

/// A request resumed on a router with the ids another router already sent (`resume`) goes
/// on token for token, logprob for logprob and piece for piece as the uninterrupted run, greedy
/// and seeded; usage counts the whole answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_request_continues_the_uninterrupted_stream() {
    use moe_proto::v1::Resume;
    use moe_tests::harness::{self, generate, wait_serving};
    use moe_tooling::{greedy, LocalCluster};

    let dir = fixture_dir(FIXTURES[0]);
    let prompt = golden_cases(FIXTURES[0])[0].input_ids.clone();
    let cluster = LocalCluster::start(harness::spec(dir, 2)).unwrap();
    wait_serving(&cluster, 2).await;
    let mut client = harness::inference(&cluster).await;
    let n = 40u32;
    let mut seeded = greedy(&prompt, n);
    seeded.temperature = Some(0.9);
    seeded.top_p = Some(0.95);
    seeded.seed = Some(1234);
    seeded.presence_penalty = Some(0.3);
    seeded.stop = vec!["\u{1}never".into()];
    for (how, request) in [("greedy", greedy(&prompt, n)), ("seeded", seeded)] {
        let whole = generate(&mut client, request.clone()).await.unwrap();
        assert_eq!(whole.ids.len(), n as usize, "{how}");
        for cut in [1usize, 17, 39] {
            let mut resumed = request.clone();
            resumed.resume = Some(Resume {
                generated_ids: whole.ids[..cut].to_vec(),
            });
            let rest = generate(&mut client, resumed).await.unwrap();
            assert_eq!(rest.ids, whole.ids[cut..], "{how}, resumed after {cut}");
            assert_eq!(
                rest.logprobs,
                whole.logprobs[cut..],
                "{how}, {cut}: logprobs"
            );
            assert_eq!(rest.completion_tokens, n, "{how}, {cut}: usage");
            assert_eq!(rest.prompt_tokens as usize, prompt.len());
            // The text: what the first router sent up to the cut, then this.
            let sent: String = whole.pieces[..cut].concat();
            assert_eq!(
                sent + &rest.pieces.concat(),
                whole.pieces.concat(),
                "{how}, {cut}: text"
            );
        }
    }
    // A resume that leaves nothing to generate, or ids outside the vocabulary, is refused.
    let mut over = greedy(&prompt, 4);
    over.resume = Some(Resume {
        generated_ids: vec![5; 4],
    });
    let err = generate(&mut client, over).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    let mut bad = greedy(&prompt, 4);
    bad.resume = Some(Resume {
        generated_ids: vec![u32::MAX],
    });
    let err = generate(&mut client, bad).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
}
