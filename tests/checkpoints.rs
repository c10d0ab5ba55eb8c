//! Checkpoint formats beyond the fixtures: sharded safetensors with an index, f16 weights, and
//! DeepSeek's FP8 (e4m3 weights with block `weight_scale_inv`), each written here.

use moe_model::checkpoint::fp8::{e4m3_to_f32, f32_to_e4m3};
use moe_model::checkpoint::{Dtype, SafetensorsFile, SafetensorsWriter};
use moe_model::{Engine, GenerateRequest, SamplingParams};
use moe_tests::{fixture_dir, golden_cases, rewrite_fixture, RawTensor, TempDir, FIXTURES};

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn prompt_logits(dir: &std::path::Path) -> Vec<f32> {
    let engine = Engine::load(dir).unwrap();
    engine
        .prompt_logits(&golden_cases(FIXTURES[0])[0].input_ids)
        .unwrap()
}

#[test]
fn sharded_checkpoint_loads_like_a_single_file() {
    let single = prompt_logits(&fixture_dir(FIXTURES[0]));
    let dir = TempDir::new("sharded");
    rewrite_fixture(FIXTURES[0], dir.path(), |t| vec![t]);
    // Split the tensors into two shards and write the hub's index file.
    let file = SafetensorsFile::open(&dir.path().join("model.safetensors")).unwrap();
    let mut names: Vec<String> = file.names().map(str::to_string).collect();
    names.sort();
    let mut shards = [SafetensorsWriter::default(), SafetensorsWriter::default()];
    let mut map = serde_json::Map::new();
    for (i, name) in names.iter().enumerate() {
        let info = file.info(name).unwrap();
        let shard = i % 2;
        shards[shard].add(
            name.clone(),
            info.dtype,
            info.shape.clone(),
            file.bytes(info).to_vec(),
        );
        map.insert(
            name.clone(),
            format!("model-0000{}-of-00002.safetensors", shard + 1).into(),
        );
    }
    drop(file);
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    for (i, shard) in shards.into_iter().enumerate() {
        shard
            .write(
                &dir.path()
                    .join(format!("model-0000{}-of-00002.safetensors", i + 1)),
            )
            .unwrap();
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    assert_eq!(prompt_logits(dir.path()), single);
}

#[test]
fn f16_weights_load_and_compute_in_f32() {
    let dir = TempDir::new("f16");
    rewrite_fixture(FIXTURES[0], dir.path(), |(n, _, s, b)| {
        let halves = f32s(&b)
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect();
        vec![(n, Dtype::F16, s, halves)]
    });
    let reference = prompt_logits(&fixture_dir(FIXTURES[0]));
    let logits = prompt_logits(dir.path());
    let diff = moe_tests::max_abs_diff(&logits, &reference);
    // f16 rounding of every weight moves logits a little, not a lot.
    assert!(diff > 0.0 && diff < 0.5, "f16 logits differ by {diff}");
}

/// Every float tensor of a fixture as bf16 (`as_bf16`) or as the exact f32 widening of that
/// bf16 value (`!as_bf16`).
fn bf16_values(as_bf16: bool) -> impl FnMut(RawTensor) -> Vec<RawTensor> {
    move |(name, dtype, shape, bytes)| {
        let values: Vec<half::bf16> = match dtype {
            Dtype::F32 => f32s(&bytes)
                .iter()
                .map(|&v| half::bf16::from_f32(v))
                .collect(),
            Dtype::BF16 => bytes
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]))
                .collect(),
            _ => return vec![(name, dtype, shape, bytes)],
        };
        if as_bf16 {
            let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            vec![(name, Dtype::BF16, shape, bytes)]
        } else {
            let bytes = values
                .iter()
                .flat_map(|v| v.to_f32().to_le_bytes())
                .collect();
            vec![(name, Dtype::F32, shape, bytes)]
        }
    }
}

/// bf16 weights stay bf16 in memory (half the bytes) and give bitwise the logits and tokens of
/// the same values stored as f32, on every fixture family.
#[test]
fn bf16_weights_compute_exactly_like_their_f32_widening() {
    for fixture in FIXTURES {
        let narrow_dir = TempDir::new("bf16");
        let wide_dir = TempDir::new("bf16-widened");
        rewrite_fixture(fixture, narrow_dir.path(), bf16_values(true));
        rewrite_fixture(fixture, wide_dir.path(), bf16_values(false));
        let narrow = Engine::load(narrow_dir.path()).unwrap();
        let wide = Engine::load(wide_dir.path()).unwrap();
        assert_eq!(
            narrow.experts().bytes() * 2,
            wide.experts().bytes(),
            "{fixture}: experts are not held in bf16"
        );
        for case in golden_cases(fixture) {
            assert_eq!(
                narrow.prompt_logits(&case.input_ids).unwrap(),
                wide.prompt_logits(&case.input_ids).unwrap(),
                "{fixture}: prompt logits differ"
            );
            let request = |engine: &Engine| {
                engine
                    .generate(&GenerateRequest {
                        input_ids: case.input_ids.clone(),
                        max_new_tokens: 8,
                        sampling: SamplingParams::default(),
                        ignore_eos: true,
                        emit_logits: true,
                    })
                    .unwrap()
            };
            assert_eq!(request(&narrow), request(&wide), "{fixture}: tokens differ");
        }
    }
}

/// Block size of the test checkpoint: small enough that the tiny matrices have several blocks.
const BLOCK: usize = 16;

fn quantize(t: RawTensor) -> Vec<RawTensor> {
    let (name, dtype, shape, bytes) = t;
    let is_linear = shape.len() == 2 && name.ends_with("proj.weight") && dtype == Dtype::F32;
    if !is_linear {
        return vec![(name, dtype, shape, bytes)];
    }
    let (rows, cols) = (shape[0], shape[1]);
    let w = f32s(&bytes);
    let (br, bc) = (rows.div_ceil(BLOCK), cols.div_ceil(BLOCK));
    let mut scales = vec![0.0f32; br * bc];
    for r in 0..rows {
        for c in 0..cols {
            let s = &mut scales[(r / BLOCK) * bc + c / BLOCK];
            *s = s.max(w[r * cols + c].abs() / 448.0);
        }
    }
    let q: Vec<u8> = (0..rows * cols)
        .map(|i| {
            let s = scales[(i / cols / BLOCK) * bc + (i % cols) / BLOCK];
            f32_to_e4m3(if s > 0.0 { w[i] / s } else { 0.0 })
        })
        .collect();
    let scale_bytes = scales.iter().flat_map(|v| v.to_le_bytes()).collect();
    vec![
        (name.clone(), Dtype::F8E4M3, shape, q),
        (
            format!("{name}_scale_inv"),
            Dtype::F32,
            vec![br, bc],
            scale_bytes,
        ),
    ]
}

#[test]
fn fp8_block_scaled_checkpoint_dequantises_exactly() {
    // Write an FP8 checkpoint, then beside it the f32 checkpoint of its exact dequantised values.
    let fp8_dir = TempDir::new("fp8");
    rewrite_fixture(FIXTURES[0], fp8_dir.path(), quantize);
    let cfg_path = fp8_dir.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    // The config declares the block size, as DeepSeek's quantization_config does.
    cfg["quantization_config"] = serde_json::json!({
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [BLOCK, BLOCK]
    });
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();

    let file = SafetensorsFile::open(&fp8_dir.path().join("model.safetensors")).unwrap();
    let dequantised = |t: RawTensor| -> Vec<RawTensor> {
        let (name, _, shape, _) = t;
        if name.ends_with("_scale_inv") {
            return vec![];
        }
        let info = file.info(&name).unwrap();
        let bytes = file.bytes(info);
        if info.dtype != Dtype::F8E4M3 {
            return vec![(name, info.dtype, shape, bytes.to_vec())];
        }
        let cols = shape[1];
        let scales = f32s(file.bytes(file.info(&format!("{name}_scale_inv")).unwrap()));
        let bc = cols.div_ceil(BLOCK);
        let values: Vec<f32> = bytes
            .iter()
            .enumerate()
            .map(|(i, &b)| e4m3_to_f32(b) * scales[(i / cols / BLOCK) * bc + (i % cols) / BLOCK])
            .collect();
        vec![(
            name,
            Dtype::F32,
            shape,
            values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        )]
    };
    let deq_dir = TempDir::new("fp8-deq");
    rewrite_fixture(FIXTURES[0], deq_dir.path(), dequantised);

    let fp8 = prompt_logits(fp8_dir.path());
    assert_eq!(
        fp8,
        prompt_logits(deq_dir.path()),
        "FP8 load must equal loading its dequantised f32 weights"
    );
    assert_ne!(
        fp8,
        prompt_logits(&fixture_dir(FIXTURES[0])),
        "the checkpoint should really be quantised"
    );
}
