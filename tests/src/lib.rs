//! Shared helpers for the workspace integration tests: fixture paths and golden data.

pub mod fuzz;
pub mod harness;
pub mod otlp;

pub use moe_tooling::fixture_dir;

use std::path::{Path, PathBuf};

use moe_model::checkpoint::SafetensorsFile;
use serde_json::Value;

/// The transformers-checked checkpoints, one per family (GLM-4.5's, GLM-4.7-Flash's and
/// MiniMax-M2's made here: `tests/fixtures/make_glm4_moe_tiny.py`,
/// `make_glm4_moe_lite_tiny.py`, `make_minimax_m2_tiny.py`).
pub const FIXTURES: [&str; 6] = [
    "deepseek-v3-tiny",
    "qwen3-moe-tiny",
    "mixtral-tiny",
    "glm4-moe-tiny",
    "glm4-moe-lite-tiny",
    "minimax-m2-tiny",
];

/// DeepSeek-V3 in DeepSeek's FP8 layout (e4m3 projections, 128x128 block scales, partial edge
/// blocks), golden from transformers on its dequantized weights
/// (`tests/fixtures/make_deepseek_v3_fp8_tiny.py`).
pub const FP8_FIXTURE: &str = "deepseek-v3-fp8-tiny";

/// Kimi-K2 (`kimi_k2`: DeepSeek-V3's architecture) with its tokenizer as Moonshot ships it,
/// tiktoken ranks and no `tokenizer.json`; golden from transformers and tiktoken
/// (`tests/fixtures/make_kimi_k2_tiny.py`).
pub const KIMI_FIXTURE: &str = "kimi-k2-tiny";

/// Kimi-K2-Thinking: its routed experts in compressed-tensors' INT4 (`pack-quantized`, a bf16
/// scale per 32 columns, a partial group in each down projection), the rest bf16; golden from
/// transformers on the dequantized weights (`tests/fixtures/make_kimi_k2_thinking_int4_tiny.py`).
pub const KIMI_INT4_FIXTURE: &str = "kimi-k2-thinking-int4-tiny";

/// One golden case: prompt, ids and transformers' logits.
pub struct GoldenCase {
    pub prompt: String,
    pub input_ids: Vec<u32>,
    pub output_ids: Vec<u32>,
    pub output_logprobs: Vec<f32>,
    pub step_top2_margin: Vec<f32>,
    pub text: String,
    /// `[prompt_len, vocab]`.
    pub prefill_logits: Vec<f32>,
    /// `[24, vocab]`.
    pub step_logits: Vec<f32>,
}

fn u32s(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn f32s(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn tensor(file: &SafetensorsFile, name: &str) -> Vec<f32> {
    let info = file
        .info(name)
        .unwrap_or_else(|| panic!("{name} missing from golden.safetensors"));
    file.bytes(info)
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

pub fn golden_cases(fixture: &str) -> Vec<GoldenCase> {
    let dir = fixture_dir(fixture);
    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
    let logits = SafetensorsFile::open(&dir.join("golden.safetensors")).unwrap();
    json["cases"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, c)| GoldenCase {
            prompt: c["prompt"].as_str().unwrap().to_string(),
            input_ids: u32s(&c["input_ids"]),
            output_ids: u32s(&c["output_ids"]),
            output_logprobs: f32s(&c["output_logprobs"]),
            step_top2_margin: f32s(&c["step_top2_margin"]),
            text: c["text"].as_str().unwrap_or_default().to_string(),
            prefill_logits: tensor(&logits, &format!("case{i}.prefill_logits")),
            step_logits: tensor(&logits, &format!("case{i}.step_logits")),
        })
        .collect()
}

pub use moe_model::compare::max_abs_diff;

/// Number of leading steps whose tokens must match: up to and including the first near-tie.
pub fn steps_to_compare(margins: &[f32]) -> usize {
    steps_to_compare_at(margins, 0.002)
}

/// As [`steps_to_compare`], with a top-2 margin below `near_tie` counting as a near-tie (a
/// less exact backend, e.g. bf16 on a GPU, can flip wider margins).
pub fn steps_to_compare_at(margins: &[f32], near_tie: f32) -> usize {
    margins
        .iter()
        .position(|&m| m < near_tie)
        .map(|i| i + 1)
        .unwrap_or(margins.len())
}

/// A scratch directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let n = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let dir = std::env::temp_dir().join(format!("moe-test-{tag}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The checkpoint at `source` (its files linked) with `generation` as its
/// `generation_config.json`, in a temporary folder named after `name`.
pub fn with_generation_config(source: &Path, name: &str, generation: &Value) -> TempDir {
    let dir = TempDir::new(name);
    for file in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::os::unix::fs::symlink(source.join(file), dir.0.join(file)).unwrap();
    }
    std::fs::write(dir.0.join("generation_config.json"), generation.to_string()).unwrap();
    dir
}

/// One tensor as stored: name, dtype, shape, raw bytes.
pub type RawTensor = (String, moe_model::checkpoint::Dtype, Vec<usize>, Vec<u8>);

/// Copies a fixture directory to `dst`, rewriting its safetensors through `edit`, which returns
/// the tensors to store in place of each one (none to drop it, several to add companions).
/// Config and tokenizer files are copied as they are.
pub fn rewrite_fixture(
    fixture: &str,
    dst: &Path,
    mut edit: impl FnMut(RawTensor) -> Vec<RawTensor>,
) {
    let src = fixture_dir(fixture);
    for name in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(src.join(name), dst.join(name)).unwrap();
    }
    let file = SafetensorsFile::open(&src.join("model.safetensors")).unwrap();
    let mut names: Vec<String> = file.names().map(str::to_string).collect();
    names.sort();
    let mut writer = moe_model::checkpoint::SafetensorsWriter::default();
    for name in names {
        let info = file.info(&name).unwrap().clone();
        let raw = (
            name,
            info.dtype,
            info.shape.clone(),
            file.bytes(&info).to_vec(),
        );
        for (n, d, s, b) in edit(raw) {
            writer.add(n, d, s, b);
        }
    }
    writer.write(&dst.join("model.safetensors")).unwrap();
}
