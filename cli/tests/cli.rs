//! The `moe` command line as other tools use it (process-level tests of the real binary): `generate --json` prints the documented JSON
//! object on its last line, `gen-checkpoint` writes checkpoints the engine loads, errors exit
//! non-zero with a message and no panic.

use std::process::{Command, Output};

use moe_tests::{fixture_dir, golden_cases, steps_to_compare, TempDir, FIXTURES};
use serde_json::Value;

fn moe(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_moe"))
        .args(args)
        .env("MOE_THREADS", "2")
        .output()
        .expect("moe runs")
}

fn last_json_line(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "moe failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout.clone()).unwrap();
    let line = stdout.lines().last().expect("some output");
    serde_json::from_str(line).unwrap_or_else(|e| panic!("last line is not JSON ({e}): {line}"))
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn generate_json_matches_golden_on_every_fixture() {
    for fixture in FIXTURES {
        let dir = fixture_dir(fixture);
        let case = &golden_cases(fixture)[1];
        let out = moe(&[
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--prompt",
            &case.prompt,
            "--max-new-tokens",
            "24",
            "--ignore-eos",
            "--json",
        ]);
        let json = last_json_line(&out);
        let keys: Vec<&str> = json
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        for key in [
            "input_ids",
            "output_ids",
            "logprobs",
            "text",
            "finish_reason",
        ] {
            assert!(keys.contains(&key), "{fixture}: missing {key} in {keys:?}");
        }
        assert!(
            !keys.contains(&"step_logits"),
            "step_logits only with --emit-logits"
        );
        assert_eq!(ids(&json["input_ids"]), case.input_ids, "{fixture}");
        let n = steps_to_compare(&case.step_top2_margin);
        assert_eq!(
            ids(&json["output_ids"])[..n],
            case.output_ids[..n],
            "{fixture}"
        );
        assert_eq!(json["logprobs"].as_array().unwrap().len(), 24);
        assert_eq!(json["finish_reason"], "length");
        if n == 24 {
            assert_eq!(json["text"], case.text.as_str(), "{fixture}");
        }
    }
}

/// `--speculative-config` offline: the same JSON, logprobs included, bit for bit, on every
/// fixture, plus how the drafts went (every token a step made or a draft token accepted).
#[test]
fn generate_speculating_offline_changes_no_token_or_logprob() {
    let config = r#"{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3}"#;
    let mut drafted_anywhere = 0;
    for fixture in FIXTURES {
        let dir = fixture_dir(fixture);
        let case = &golden_cases(fixture)[0];
        let common = [
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--prompt",
            &case.prompt,
            "--max-new-tokens",
            "24",
            "--ignore-eos",
            "--json",
        ];
        let plain = last_json_line(&moe(&common));
        assert!(plain.get("spec_decode").is_none(), "only when speculating");
        let mut drafted = last_json_line(&moe(
            &[&common[..], &["--speculative-config", config]].concat()
        ));
        let counts = drafted
            .as_object_mut()
            .unwrap()
            .remove("spec_decode")
            .expect("spec_decode");
        assert_eq!(drafted, plain, "{fixture}");
        let count = |key: &str| counts[key].as_u64().unwrap();
        drafted_anywhere += count("draft_tokens");
        assert!(
            count("accepted_tokens") <= count("draft_tokens"),
            "{counts}"
        );
        assert_eq!(count("steps") + count("accepted_tokens"), 24, "{counts}");
    }
    // (Qwen3's fixture answers with tokens found nowhere before them: it never drafts.)
    assert!(drafted_anywhere > 0);
    // Over a cluster the router's flag decides; a checkpoint without an MTP layer is refused.
    let dir = fixture_dir(FIXTURES[0]);
    let refused = moe(&[
        "generate",
        "--router",
        "127.0.0.1:1",
        "--input-ids",
        "1,2",
        "--speculative-config",
        config,
    ]);
    assert!(!refused.status.success());
    let mtp = moe(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--input-ids",
        "1,2",
        "--speculative-config",
        r#"{"method": "deepseek_mtp", "num_speculative_tokens": 1}"#,
    ]);
    assert!(!mtp.status.success());
    let stderr = String::from_utf8_lossy(&mtp.stderr);
    assert!(
        stderr.contains("eh_proj") && !stderr.contains("panicked"),
        "{stderr}"
    );
}

/// Experts reached through in-process nodes over the layer exchange (`--in-process-nodes`)
/// give the same JSON, logprobs included, bit for bit, on every fixture; so does `moe bench`
/// run through them.
#[test]
fn in_process_nodes_change_no_token_or_logprob() {
    for fixture in FIXTURES {
        let dir = fixture_dir(fixture);
        let case = &golden_cases(fixture)[0];
        let common = [
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--prompt",
            &case.prompt,
            "--max-new-tokens",
            "12",
            "--ignore-eos",
            "--json",
        ];
        let direct = last_json_line(&moe(&common));
        let through = last_json_line(&moe(&[&common[..], &["--in-process-nodes", "3"]].concat()));
        assert_eq!(direct, through, "{fixture}");
    }
    // One math thread: the engine's thread waits on the nodes, whose expert math is queued
    // on that same pool (it runs it while it waits).
    let dir = fixture_dir(FIXTURES[0]);
    let one_thread = Command::new(env!("CARGO_BIN_EXE_moe"))
        .args([
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--input-ids",
            "1,2,3",
            "--max-new-tokens",
            "6",
            "--ignore-eos",
            "--json",
            "--in-process-nodes",
            "2",
        ])
        .env("MOE_THREADS", "1")
        .output()
        .expect("moe runs");
    assert_eq!(
        last_json_line(&one_thread)["output_ids"]
            .as_array()
            .unwrap()
            .len(),
        6
    );
    let dir = fixture_dir(FIXTURES[1]);
    let bench = last_json_line(&moe(&[
        "bench",
        "--model",
        dir.to_str().unwrap(),
        "--batch",
        "1,3",
        "--prompt-len",
        "6",
        "--gen",
        "4",
        "--json",
        "--in-process-nodes",
        "2",
    ]));
    assert_eq!(bench["results"].as_array().unwrap().len(), 2);
    assert_eq!(bench["device"], "cpu, experts behind 2 in-process nodes");
    // A cluster has its own nodes: the flag is refused with --router, not ignored.
    let refused = moe(&[
        "generate",
        "--router",
        "127.0.0.1:1",
        "--prompt",
        "x",
        "--in-process-nodes",
        "2",
    ]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("cannot be used with"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
}

#[test]
fn generate_emits_logits_and_accepts_input_ids() {
    let dir = fixture_dir(FIXTURES[0]);
    let case = &golden_cases(FIXTURES[0])[0];
    let id_list: Vec<String> = case.input_ids.iter().map(u32::to_string).collect();
    let out = moe(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--input-ids",
        &id_list.join(","),
        "--max-new-tokens",
        "3",
        "--ignore-eos",
        "--json",
        "--emit-logits",
    ]);
    let json = last_json_line(&out);
    let logits = json["step_logits"].as_array().unwrap();
    assert_eq!(logits.len(), 3);
    for (step, row) in logits.iter().enumerate() {
        let row: Vec<f32> = row
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        let golden = &case.step_logits[step * 512..(step + 1) * 512];
        assert!(moe_tests::max_abs_diff(&row, golden) <= 2e-3, "step {step}");
    }
}

#[test]
fn generate_without_json_prints_text() {
    let dir = fixture_dir(FIXTURES[1]);
    let case = &golden_cases(FIXTURES[1])[0];
    let out = moe(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--prompt",
        &case.prompt,
        "--max-new-tokens",
        "24",
        "--ignore-eos",
    ]);
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    if steps_to_compare(&case.step_top2_margin) == 24 {
        assert_eq!(stdout.trim_end_matches('\n'), case.text);
    } else {
        assert!(!stdout.trim().is_empty());
    }
}

#[test]
fn seeded_sampling_is_reproducible_from_the_command_line() {
    let dir = fixture_dir(FIXTURES[2]);
    let run = |seed: &str| {
        let out = moe(&[
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--prompt",
            "Hello",
            "--max-new-tokens",
            "16",
            "--temperature",
            "1.0",
            "--top-p",
            "0.9",
            "--top-k",
            "50",
            "--seed",
            seed,
            "--ignore-eos",
            "--json",
        ]);
        ids(&last_json_line(&out)["output_ids"])
    };
    assert_eq!(run("11"), run("11"));
    assert_ne!(run("11"), run("12"));
}

#[test]
fn errors_exit_nonzero_with_a_message_and_no_panic() {
    let tmp = TempDir::new("cli-bad");
    let out = moe(&[
        "generate",
        "--model",
        tmp.path().to_str().unwrap(),
        "--prompt",
        "x",
        "--json",
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("config.json"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");

    let dir = fixture_dir(FIXTURES[0]);
    let out = moe(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--input-ids",
        "0,9999",
        "--json",
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("9999") && stderr.contains("512"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn gen_checkpoint_writes_loadable_checkpoints() {
    for (arch, dtype) in [
        ("deepseek_v3", "f32"),
        ("qwen3_moe", "f32"),
        ("mixtral", "bf16"),
    ] {
        let tmp = TempDir::new(arch);
        let out_dir = tmp.path().join("ckpt");
        let out = moe(&[
            "gen-checkpoint",
            "--arch",
            arch,
            "--preset",
            "tiny",
            "--out",
            out_dir.to_str().unwrap(),
            "--seed",
            "3",
            "--dtype",
            dtype,
        ]);
        assert!(
            out.status.success(),
            "{arch}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        for f in [
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
        ] {
            assert!(out_dir.join(f).exists(), "{arch}: {f} missing");
        }
        let json = last_json_line(&moe(&[
            "generate",
            "--model",
            out_dir.to_str().unwrap(),
            "--prompt",
            "Hello world",
            "--max-new-tokens",
            "5",
            "--ignore-eos",
            "--json",
        ]));
        assert_eq!(json["output_ids"].as_array().unwrap().len(), 5, "{arch}");
        let config: Value =
            serde_json::from_str(&std::fs::read_to_string(out_dir.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(config["model_type"], arch);
    }
}

/// `--synthetic` writes no weights, and `moe generate` on it answers what it answers on the
/// written checkpoint of the same seed (tokens and logprobs); `--layers` that leave no MoE
/// layer is an error, not a model without experts.
#[test]
fn gen_checkpoint_synthetic_generates_the_written_checkpoints_answer() {
    let tmp = TempDir::new("synthetic");
    let gen = |out: &std::path::Path, extra: &[&str]| {
        let mut args = vec![
            "gen-checkpoint",
            "--arch",
            "qwen3_moe",
            "--preset",
            "tiny",
            "--dtype",
            "bf16",
            "--seed",
            "9",
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        moe(&args)
    };
    let (files, synthetic) = (tmp.path().join("files"), tmp.path().join("synthetic"));
    assert!(gen(&files, &[]).status.success());
    let out = gen(&synthetic, &["--synthetic"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(synthetic.join("synthetic_weights.json").exists());
    assert!(!synthetic.join("model.safetensors").exists());
    let answer = |dir: &std::path::Path| {
        let json = last_json_line(&moe(&[
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--prompt",
            "Hello world",
            "--max-new-tokens",
            "6",
            "--ignore-eos",
            "--json",
        ]));
        (json["output_ids"].clone(), json["logprobs"].clone())
    };
    assert_eq!(answer(&files), answer(&synthetic));

    let out = moe(&[
        "gen-checkpoint",
        "--arch",
        "deepseek_v3",
        "--preset",
        "full",
        "--layers",
        "2",
        "--synthetic",
        "--out",
        tmp.path().join("none").to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("no MoE layer"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn bench_reports_json() {
    let dir = fixture_dir(FIXTURES[0]);
    let json = last_json_line(&moe(&[
        "bench",
        "--model",
        dir.to_str().unwrap(),
        "--batch",
        "1,4",
        "--prompt-len",
        "8",
        "--gen",
        "4",
        "--json",
    ]));
    let results = json["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    for r in results {
        for key in ["prefill_tok_s", "decode_tok_s", "time_to_first_token_ms"] {
            assert!(r[key].as_f64().unwrap() > 0.0, "{key}");
        }
        assert!(r["inter_token_latency_ms"]["p50"].as_f64().unwrap() > 0.0);
    }
    assert_eq!(json["sampling"], "greedy");
    // Drawn at a temperature, as seeded requests would be; a top-p no request may ask for is
    // refused.
    let bench = |top_p: &str| {
        moe(&[
            "bench",
            "--model",
            dir.to_str().unwrap(),
            "--batch",
            "2",
            "--prompt-len",
            "8",
            "--gen",
            "4",
            "--temperature",
            "0.7",
            "--top-p",
            top_p,
            "--json",
        ])
    };
    let json = last_json_line(&bench("0.9"));
    assert_eq!(json["sampling"], "temperature 0.7, top-p 0.9");
    assert!(json["results"][0]["decode_tok_s"].as_f64().unwrap() > 0.0);
    let refused = bench("1.5");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && stderr.contains("top_p"),
        "{stderr}"
    );
}

/// `moe gen-secrets` writes each secret once, private to its owner, and keeps existing ones.
#[test]
fn gen_secrets_writes_private_files_once() {
    let dir = moe_tests::TempDir::new("secrets");
    let out = dir.path().join("secrets");
    let run = || moe(&["gen-secrets", "--out", out.to_str().unwrap()]);
    assert!(run().status.success());
    let read = |name: &str| std::fs::read_to_string(out.join(name)).unwrap();
    let first: Vec<String> = ["cluster-token", "admin-key", "api-key", "etcd-password"]
        .iter()
        .map(|n| read(n))
        .collect();
    for secret in &first {
        assert_eq!(secret.trim().len(), 64, "{secret:?}");
    }
    assert_ne!(first[0], first[1]);
    moe_cluster::auth::ClusterToken::from_file(&out.join("cluster-token")).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(out.join("cluster-token"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "{mode:o}");
    }
    let again = run();
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stdout).contains("kept"));
    assert_eq!(
        read("cluster-token"),
        first[0],
        "an existing secret is kept"
    );
}
