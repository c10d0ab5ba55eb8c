//! Bad checkpoints and bad requests give typed errors naming the problem, never a panic.

use moe_model::checkpoint::Dtype;
use moe_model::{Engine, GenerateRequest, ModelError, SamplingParams};
use moe_tests::{fixture_dir, rewrite_fixture, TempDir, FIXTURES};

fn load_err(dir: &std::path::Path) -> ModelError {
    match Engine::load(dir) {
        Ok(_) => panic!("{} loaded but should not", dir.display()),
        Err(e) => e,
    }
}

const DROPPED: &str = "model.layers.1.self_attn.kv_b_proj.weight";

#[test]
fn missing_tensor_is_named_with_its_shape() {
    let dir = TempDir::new("missing");
    rewrite_fixture(FIXTURES[0], dir.path(), |t| {
        if t.0 == DROPPED {
            vec![]
        } else {
            vec![t]
        }
    });
    let err = load_err(dir.path());
    assert!(
        matches!(&err, ModelError::MissingTensor { name, expected } if name == DROPPED && expected == &vec![128, 32]),
        "{err:?}"
    );
    assert!(
        err.to_string().contains(DROPPED) && err.to_string().contains("[128, 32]"),
        "{err}"
    );
}

#[test]
fn misshaped_tensor_is_named_with_both_shapes() {
    let dir = TempDir::new("shape");
    rewrite_fixture(FIXTURES[1], dir.path(), |(n, d, s, b)| {
        if n == "model.layers.0.self_attn.q_proj.weight" {
            vec![(n, d, vec![32, 128], b)]
        } else {
            vec![(n, d, s, b)]
        }
    });
    let err = load_err(dir.path());
    let msg = err.to_string();
    assert!(matches!(err, ModelError::TensorShape { .. }), "{err:?}");
    assert!(
        msg.contains("q_proj") && msg.contains("[32, 128]") && msg.contains("[64, 64]"),
        "{msg}"
    );
}

#[test]
fn unsupported_model_type_is_named() {
    let dir = TempDir::new("arch");
    rewrite_fixture(FIXTURES[2], dir.path(), |t| vec![t]);
    let cfg = std::fs::read_to_string(dir.path().join("config.json")).unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        cfg.replace("\"mixtral\"", "\"gpt_oss\""),
    )
    .unwrap();
    let err = load_err(dir.path());
    assert!(
        matches!(&err, ModelError::UnsupportedModelType(t) if t == "gpt_oss"),
        "{err:?}"
    );
    assert!(err.to_string().contains("gpt_oss"));
}

#[test]
fn unknown_and_unsupported_dtypes_are_named() {
    // An integer dtype where a weight belongs.
    let dir = TempDir::new("dtype");
    rewrite_fixture(FIXTURES[2], dir.path(), |(n, d, s, b)| {
        if n == "model.norm.weight" {
            vec![(n, Dtype::I16, s, b)]
        } else {
            vec![(n, d, s, b)]
        }
    });
    let err = load_err(dir.path());
    assert!(
        matches!(&err, ModelError::UnsupportedDtype { name, dtype } if name == "model.norm.weight" && dtype == "I16"),
        "{err:?}"
    );
    // A dtype string the format does not define.
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let text = String::from_utf8_lossy(&bytes[8..]).into_owned();
    let at = text.find("\"I16\"").unwrap() + 8;
    let mut patched = bytes.clone();
    patched[at..at + 5].copy_from_slice(b"\"X16\"");
    std::fs::write(&path, patched).unwrap();
    let err = load_err(dir.path());
    assert!(matches!(err, ModelError::Safetensors { .. }), "{err:?}");
    assert!(err.to_string().contains("unknown dtype \"X16\""), "{err}");
}

#[test]
fn truncated_safetensors_is_reported() {
    let dir = TempDir::new("truncated");
    rewrite_fixture(FIXTURES[0], dir.path(), |t| vec![t]);
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    for keep in [bytes.len() - 1, bytes.len() / 2, 100, 4] {
        std::fs::write(&path, &bytes[..keep]).unwrap();
        let err = load_err(dir.path());
        assert!(
            matches!(err, ModelError::Safetensors { .. }),
            "{keep}: {err:?}"
        );
        assert!(err.to_string().contains("model.safetensors"), "{err}");
    }
}

#[test]
fn missing_tokenizer_is_reported() {
    let dir = TempDir::new("tokenizer");
    rewrite_fixture(FIXTURES[0], dir.path(), |t| vec![t]);
    std::fs::remove_file(dir.path().join("tokenizer.json")).unwrap();
    let err = load_err(dir.path());
    assert!(matches!(err, ModelError::Tokenizer(_)), "{err:?}");
    assert!(err.to_string().contains("tokenizer.json"), "{err}");
}

#[test]
fn bad_requests_are_rejected_before_any_work() {
    let engine = Engine::load(&fixture_dir(FIXTURES[1])).unwrap();
    let req = |ids: Vec<u32>| GenerateRequest {
        input_ids: ids,
        max_new_tokens: 4,
        sampling: SamplingParams::default(),
        ignore_eos: false,
        emit_logits: false,
    };
    let err = engine.generate(&req(vec![0, 5, 512])).unwrap_err();
    assert!(
        matches!(
            err,
            ModelError::TokenOutOfRange {
                id: 512,
                vocab_size: 512
            }
        ),
        "{err:?}"
    );
    let err = engine.generate(&req(vec![3; 1025])).unwrap_err();
    assert!(
        matches!(
            err,
            ModelError::SequenceTooLong {
                len: 1025,
                max: 1024
            }
        ),
        "{err:?}"
    );
    let err = engine.generate(&req(vec![])).unwrap_err();
    assert!(matches!(err, ModelError::InvalidRequest(_)), "{err:?}");
    let mut bad_temp = req(vec![0, 5]);
    bad_temp.sampling.temperature = f32::NAN;
    assert!(matches!(
        engine.generate(&bad_temp),
        Err(ModelError::InvalidRequest(_))
    ));
    // The engine still serves after rejecting.
    assert_eq!(
        engine
            .generate(&req(vec![0, 5, 7]))
            .unwrap()
            .output_ids
            .len(),
        4
    );
}

/// `--device cuda:N` on a machine or build without CUDA: both binaries exit with an error that
/// names the device, before opening any port, and never panic.
#[test]
fn a_gpu_that_is_not_there_is_a_clear_error() {
    for binary in ["moe-router", "moe-expert-node"] {
        let out = std::process::Command::new(moe_tests::harness::binary(binary))
            .args(["--model", &fixture_dir(FIXTURES[0]).display().to_string()])
            .args(["--device", "cuda:0", "--etcd", "http://127.0.0.1:1"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{binary} started without a GPU");
        assert!(stderr.contains("cuda:0"), "{binary}: {stderr}");
        assert!(!stderr.contains("panicked"), "{binary}: {stderr}");
        let bad = std::process::Command::new(moe_tests::harness::binary(binary))
            .args(["--model", "x", "--device", "tpu:1"])
            .output()
            .unwrap();
        assert!(String::from_utf8_lossy(&bad.stderr).contains("expected cpu, cuda or cuda:N"));
    }
}
