//! `moe plan` as other tools use it: `--json` prints one object on its last line with the
//! documented fields; a deployment that does not fit says so (and exits 0); bad flags exit
//! non-zero with a message; `MOE_*` variables do not reach its flags.

use std::process::{Command, Output};

use serde_json::Value;

const MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../ops/plan/deepseek-v3");

fn moe_plan(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_moe"))
        .args(["plan", "--model", MODEL])
        .args(args)
        .output()
        .expect("moe runs")
}

fn json(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "moe plan failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().expect("output");
    serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
}

/// DeepSeek's decode deployment: every contract field, with the values worked by hand where
/// they are exact (288 slots over 144 GPUs; 61 layers + MTP x 576 values x 2 bytes of KV).
#[test]
fn json_has_the_contract_fields() {
    let out = moe_plan(&[
        "--gpu",
        "h800",
        "--machines",
        "18",
        "--layout",
        "colocated",
        "--redundant-experts",
        "32",
        "--context",
        "4989",
        "--tpot-ms",
        "50",
        "--mtp-acceptance",
        "0.85",
        "--json",
    ]);
    let v = json(&out);
    assert_eq!(v["fits"], true);
    assert_eq!(v["routed_experts_per_gpu"], 2);
    assert_eq!(v["kv_bytes_per_token"].as_f64(), Some(71_424.0));
    let weights = v["weights_bytes_per_gpu"].as_f64().unwrap();
    assert!(weights > 20e9 && weights < 40e9, "{weights}");
    let batch = v["decode_batch_per_gpu"].as_u64().unwrap();
    assert!(batch > 0);
    let per_gpu = v["decode_tok_s_per_gpu"].as_f64().unwrap();
    let per_node = v["decode_tok_s_per_node"].as_f64().unwrap();
    assert!((per_node - 8.0 * per_gpu).abs() < 1e-6 * per_node);
    assert!(["memory", "compute", "network"].contains(&v["bound"].as_str().unwrap()));
    assert!(v["plan"]["decode"]["tpot_ms"].as_f64().unwrap() <= 50.0);
}

/// Our layout: routers and expert GPUs apart; its KV cache is f32 (61 x 576 x 4 bytes).
#[test]
fn disaggregated_plan_splits_router_and_expert_gpus() {
    let v = json(&moe_plan(&["--gpu", "h200", "--machines", "2", "--json"]));
    assert_eq!(v["fits"], true);
    assert_eq!(v["kv_bytes_per_token"].as_f64(), Some(140_544.0));
    let split = &v["plan"]["split"];
    let routers = split["attention_gpus"].as_u64().unwrap();
    let experts = split["expert_gpus"].as_u64().unwrap();
    assert_eq!(routers + experts, 16);
    assert_eq!(
        v["routed_experts_per_gpu"].as_u64().unwrap(),
        256u64.div_ceil(experts)
    );
}

/// bf16 on one machine of 8 x H200 does not fit: said in the JSON and in the text.
#[test]
fn a_deployment_that_does_not_fit_says_so() {
    let args = [
        "--gpu",
        "h200",
        "--machines",
        "1",
        "--weight-format",
        "bf16",
    ];
    let v = json(&moe_plan(&[&args[..], &["--json"]].concat()));
    assert_eq!(v["fits"], false);
    assert_eq!(v["decode_tok_s_per_node"].as_f64(), Some(0.0));
    assert!(v["plan"]["why_not"]
        .as_str()
        .unwrap()
        .contains("do not fit"));
    let text = moe_plan(&args);
    assert!(text.status.success());
    assert!(String::from_utf8_lossy(&text.stdout).contains("fits: no"));
}

#[test]
fn bad_flags_fail_with_a_message() {
    let out = moe_plan(&["--gpu", "a100", "--machines", "1"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown --gpu"));
    let out = moe_plan(&[
        "--gpu",
        "h200",
        "--machines",
        "1",
        "--prefix-hit-rate",
        "1.5",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--prefix-hit-rate"));
}

/// A deployment's environment does not change a plan.
#[test]
fn moe_environment_variables_do_not_reach_the_plan() {
    let args = [
        "--gpu",
        "h200",
        "--machines",
        "4",
        "--layout",
        "colocated",
        "--json",
    ];
    let plain = json(&moe_plan(&args));
    let out = Command::new(env!("CARGO_BIN_EXE_moe"))
        .args(["plan", "--model", MODEL])
        .args(args)
        .env("MOE_CONTEXT", "100000")
        .env("MOE_TPOT_MS", "1")
        .env("MOE_MICRO_BATCHES", "1")
        .output()
        .unwrap();
    assert_eq!(json(&out), plain);
}
