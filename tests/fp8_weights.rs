//! FP8 checkpoints (DeepSeek's layout: e4m3 projections with 128x128 block scales) stay FP8 on
//! the CPU, at about a quarter of the bytes of their f32 dequantization, and give bitwise its
//! tokens and logprobs, alone and in a batch; in a cluster too.

use moe_model::checkpoint::WeightsDtype;
use moe_model::generator::{write_checkpoint, CheckpointPlan, Preset, WeightDtype};
use moe_model::{Engine, Family, GenerateOutput, GenerateRequest};
use moe_tests::harness::{self, generate, wait_serving};
use moe_tests::{
    fixture_dir, golden_cases, steps_to_compare, TempDir, FP8_FIXTURE, KIMI_INT4_FIXTURE,
};
use moe_tooling::{greedy, LocalCluster};

fn request(input_ids: Vec<u32>, max_new_tokens: usize) -> GenerateRequest {
    GenerateRequest {
        input_ids,
        max_new_tokens,
        sampling: Default::default(),
        ignore_eos: true,
        emit_logits: false,
    }
}

fn prompts(vocab: u32) -> Vec<Vec<u32>> {
    vec![
        vec![1, 5, 7, 9],
        (0..23).map(|i| (i * 31 + 2) % vocab).collect(),
        vec![3],
        (0..11).map(|i| (i * 97 + 5) % vocab).collect(),
    ]
}

/// Token ids and logprobs, bit for bit.
fn bits(outputs: &[GenerateOutput]) -> Vec<(Vec<u32>, Vec<u32>)> {
    outputs
        .iter()
        .map(|o| {
            (
                o.output_ids.clone(),
                o.logprobs.iter().map(|l| l.to_bits()).collect(),
            )
        })
        .collect()
}

fn same_bits_held_as_stored_and_widened(dir: &std::path::Path, reqs: &[GenerateRequest]) {
    let fp8 = Engine::load_holding(dir, WeightsDtype::AsStored).unwrap();
    let wide = Engine::load_holding(dir, WeightsDtype::F32).unwrap();
    assert!(
        fp8.experts().bytes() * 3 < wide.experts().bytes(),
        "FP8 experts hold {} bytes, f32 {}",
        fp8.experts().bytes(),
        wide.experts().bytes()
    );
    let batched = fp8.generate_batch(reqs).unwrap();
    assert_eq!(bits(&batched), bits(&wide.generate_batch(reqs).unwrap()));
    for (req, in_batch) in reqs.iter().zip(&batched) {
        let alone = fp8.generate(req).unwrap();
        assert_eq!(bits(&[alone]), bits(std::slice::from_ref(in_batch)));
    }
}

fn same_bits_on_a_preset(family: Family, preset: Preset, dtype: WeightDtype, new_tokens: usize) {
    let tmp = TempDir::new(dtype.name());
    let dir = tmp.path().join(dtype.name());
    write_checkpoint(family, preset, &dir, 3, dtype).unwrap();
    let vocab = moe_model::ModelConfig::from_dir(&dir).unwrap().vocab_size as u32;
    let reqs: Vec<GenerateRequest> = prompts(vocab)
        .into_iter()
        .map(|p| request(p, new_tokens))
        .collect();
    same_bits_held_as_stored_and_widened(&dir, &reqs);
}

/// The FP8 fixture (transformers' golden: `tests/golden.rs`): DeepSeek-sized blocks with
/// partial edges, kv_b heads across a scale boundary, q_a and kv_a on different grids.
#[test]
fn fp8_weights_held_as_stored_give_the_dequantized_tokens_bitwise_on_the_fixture() {
    let reqs: Vec<GenerateRequest> = golden_cases(FP8_FIXTURE)
        .into_iter()
        .map(|c| request(c.input_ids, 24))
        .collect();
    same_bits_held_as_stored_and_widened(&fixture_dir(FP8_FIXTURE), &reqs);
}

/// Kimi-K2-Thinking's INT4 experts, held as their integers on 32-column groups, give the
/// tokens and logprobs of their f32 dequantization bit for bit, alone and in a batch.
#[test]
fn int4_weights_held_as_stored_give_the_dequantized_tokens_bitwise_on_the_fixture() {
    let reqs: Vec<GenerateRequest> = golden_cases(KIMI_INT4_FIXTURE)
        .into_iter()
        .map(|c| request(c.input_ids, 24))
        .collect();
    same_bits_held_as_stored_and_widened(&fixture_dir(KIMI_INT4_FIXTURE), &reqs);
}

/// `moe gen-checkpoint --dtype int4` (Kimi-K2-Thinking's layout) on the tiny presets, Mixtral's
/// experts (`w1`/`w2`/`w3`) too.
#[test]
fn int4_weights_held_as_stored_give_the_dequantized_tokens_bitwise_on_tiny() {
    same_bits_on_a_preset(Family::DeepseekV3, Preset::Tiny, WeightDtype::Int4, 12);
    same_bits_on_a_preset(Family::Mixtral, Preset::Tiny, WeightDtype::Int4, 12);
}

/// The tiny preset: every dimension leaves partial 128-blocks. GLM-4.5's too, in DeepSeek's
/// block layout (q, k and v stacked into one GEMM, their biases added after it).
#[test]
fn fp8_weights_held_as_stored_give_the_dequantized_tokens_bitwise_on_tiny() {
    same_bits_on_a_preset(Family::DeepseekV3, Preset::Tiny, WeightDtype::Fp8, 12);
    same_bits_on_a_preset(Family::Glm4Moe, Preset::Tiny, WeightDtype::Fp8, 12);
}

/// The small preset (391M parameters): full blocks, MLA's kv_b split per head.
#[test]
fn fp8_weights_held_as_stored_give_the_dequantized_tokens_bitwise_on_small() {
    same_bits_on_a_preset(Family::DeepseekV3, Preset::Small, WeightDtype::Fp8, 4);
}

/// Expert nodes holding FP8 experts (the fixture's) answer with the offline engine's tokens
/// and logprobs, bit for bit, and so with transformers' golden tokens, on one node and on three.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_on_the_fp8_fixture_gives_the_golden_tokens() {
    let dir = fixture_dir(FP8_FIXTURE);
    let engine = Engine::load(&dir).unwrap();
    let cases = golden_cases(FP8_FIXTURE);
    let offline: Vec<GenerateOutput> = cases
        .iter()
        .map(|c| engine.generate(&request(c.input_ids.clone(), 24)).unwrap())
        .collect();
    for nodes in [1, 3] {
        let cluster = LocalCluster::start(harness::spec(dir.clone(), nodes)).unwrap();
        wait_serving(&cluster, nodes).await;
        let mut client = harness::inference(&cluster).await;
        for (i, case) in cases.iter().enumerate() {
            let got = generate(&mut client, greedy(&case.input_ids, 24))
                .await
                .unwrap();
            assert_eq!(got.ids, offline[i].output_ids, "{nodes} nodes, case {i}");
            assert_eq!(
                got.logprobs, offline[i].logprobs,
                "{nodes} nodes, case {i}: logprobs not bitwise equal"
            );
            let n = steps_to_compare(&case.step_top2_margin);
            assert_eq!(
                got.ids[..n],
                case.output_ids[..n],
                "{nodes} nodes, case {i}: not transformers' tokens"
            );
        }
    }
}

/// Peak resident memory (VmHWM) of `moe generate` on `dir`, asserting it succeeded.
fn peak_rss_of_generate(dir: &std::path::Path) -> u64 {
    let mut child = std::process::Command::new(harness::binary("moe"))
        .args(["generate", "--model"])
        .arg(dir)
        .args([
            "--input-ids",
            "1,5,7",
            "--max-new-tokens",
            "16",
            "--threads",
            "2",
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // The child's own high-water mark (rusage would count the parent's pages at the spawn),
    // read until it exits: the peak is at load, before it generates.
    let status_file = format!("/proc/{}/status", child.id());
    let mut peak = 0u64;
    let status = loop {
        if let Some(kb) = std::fs::read_to_string(&status_file).ok().and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        }) {
            peak = peak.max(kb * 1024);
        }
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    };
    assert!(status.success(), "moe generate failed");
    peak
}

fn assert_within_weights(peak: u64, weights: u64) {
    let bound = weights as f64 * 1.15 + 100e6;
    eprintln!("peak RSS {} MiB, weights {} MiB", peak >> 20, weights >> 20);
    assert!(
        (peak as f64) < bound,
        "peak {peak} bytes over {bound} for {weights} bytes of weights"
    );
}

/// Peak resident memory of `moe generate` on an FP8 checkpoint of the small preset: about
/// its file size (the mapped pages of each tensor are dropped once it is packed), within
/// 1.15 x the weights + 100 MB; the same for a synthetic checkpoint of the same weights,
/// whose tensors are generated one at a time and dropped once packed.
#[test]
fn generate_on_an_fp8_checkpoint_holds_about_its_file_size() {
    let tmp = TempDir::new("fp8-rss");
    let dir = tmp.path().join("ds-fp8");
    write_checkpoint(Family::DeepseekV3, Preset::Small, &dir, 5, WeightDtype::Fp8).unwrap();
    let weights = std::fs::metadata(dir.join("model.safetensors"))
        .unwrap()
        .len();
    assert_within_weights(peak_rss_of_generate(&dir), weights);
    let synthetic = tmp.path().join("ds-fp8-synthetic");
    CheckpointPlan::new(Family::DeepseekV3, Preset::Small, WeightDtype::Fp8, 5)
        .write_synthetic(&synthetic)
        .unwrap();
    assert_within_weights(peak_rss_of_generate(&synthetic), weights);
}

/// A synthetic checkpoint (no weight files: the router and each node generate the weights
/// from its seed) serves, on one node and on three, the tokens and logprobs the offline
/// engine gives on the written checkpoint of the same seed, bit for bit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_on_a_synthetic_checkpoint_gives_the_written_ones_tokens() {
    let tmp = TempDir::new("synthetic");
    let (files, synthetic) = (tmp.path().join("files"), tmp.path().join("synthetic"));
    let plan = CheckpointPlan::new(Family::DeepseekV3, Preset::Tiny, WeightDtype::Fp8, 21);
    plan.write(&files).unwrap();
    plan.write_synthetic(&synthetic).unwrap();
    let engine = Engine::load(&files).unwrap();
    let vocab = engine.config().vocab_size as u32;
    for nodes in [1, 3] {
        let cluster = LocalCluster::start(harness::spec(synthetic.clone(), nodes)).unwrap();
        wait_serving(&cluster, nodes).await;
        let mut client = harness::inference(&cluster).await;
        for (i, prompt) in prompts(vocab).into_iter().enumerate() {
            let offline = engine.generate(&request(prompt.clone(), 12)).unwrap();
            let got = generate(&mut client, greedy(&prompt, 12)).await.unwrap();
            assert_eq!(got.ids, offline.output_ids, "{nodes} nodes, prompt {i}");
            assert_eq!(
                got.logprobs, offline.logprobs,
                "{nodes} nodes, prompt {i}: logprobs not bitwise equal"
            );
        }
    }
}
