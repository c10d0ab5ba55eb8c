//! `moe generate --router`, `moe status` and `moe bench --router` against a real local cluster.

use std::process::Command;

use moe_tests::harness::{self, wait_serving};
use moe_tests::{fixture_dir, golden_cases, FIXTURES};
use moe_tooling::LocalCluster;
use serde_json::Value;

fn moe(args: &[&str]) -> Value {
    let mut command = Command::new(env!("CARGO_BIN_EXE_moe"));
    if args.contains(&"--router") {
        // A deployment's environment may name the processes' GPU; a remote command must not
        // take it as a second place to run.
        command
            .env("MOE_DEVICE", "cuda:0")
            .env("MOE_GPU_DTYPE", "f32");
    }
    let out = command.args(args).output().expect("moe runs");
    assert!(
        out.status.success(),
        "moe {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    serde_json::from_str(stdout.lines().last().expect("output")).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_generate_prints_the_offline_json_and_status_lists_nodes() {
    let fixture = FIXTURES[0];
    let dir = fixture_dir(fixture);
    let cluster = LocalCluster::start(harness::spec(dir.clone(), 2)).unwrap();
    wait_serving(&cluster, 2).await;
    let case = &golden_cases(fixture)[2];
    let common = [
        "--prompt",
        case.prompt.as_str(),
        "--max-new-tokens",
        "24",
        "--ignore-eos",
        "--json",
    ];
    let remote = moe(&[
        &["generate", "--router", cluster.router_addr.as_str()][..],
        &common[..],
    ]
    .concat());
    let offline = moe(&[
        &["generate", "--model", dir.to_str().unwrap()][..],
        &common[..],
    ]
    .concat());
    assert_eq!(remote, offline, "same JSON over the cluster as offline");

    let status = moe(&["status", "--router", &cluster.router_addr, "--json"]);
    assert!(status["serving_epoch"].as_u64().unwrap() >= 1);
    assert_eq!(status["dense_device"], "cpu", "{status}");
    let nodes = status["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 2);
    for n in nodes {
        assert_eq!(n["state"], "ready");
        assert!(!n["experts"].as_array().unwrap().is_empty());
    }

    let bench = moe(&[
        "bench",
        "--router",
        &cluster.router_addr,
        "--batch",
        "1,4",
        "--prompt-len",
        "8",
        "--gen",
        "4",
        "--json",
    ]);
    let results = bench["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    assert!(results
        .iter()
        .all(|r| r["decode_tok_s"].as_f64().unwrap() > 0.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_command_removes_a_node_and_refuses_unknown_ones() {
    let fixture = FIXTURES[1];
    let mut cluster = LocalCluster::start(harness::spec(fixture_dir(fixture), 2)).unwrap();
    wait_serving(&cluster, 2).await;
    let leaving = cluster.node_ids()[0].clone();
    let out = Command::new(env!("CARGO_BIN_EXE_moe"))
        .args(["drain", "--router", &cluster.router_addr, &leaving])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("epoch"));
    let code = tokio::task::block_in_place(|| {
        cluster.wait_node_exit(&leaving, std::time::Duration::from_secs(60))
    });
    assert_eq!(code, Some(0));
    let status = moe(&["status", "--router", &cluster.router_addr, "--json"]);
    let placed: Vec<&str> = status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| !n["experts"].as_array().unwrap().is_empty())
        .map(|n| n["node_id"].as_str().unwrap())
        .collect();
    assert_eq!(placed, vec![cluster.node_ids()[0].as_str()]);
    assert!(status["imbalance_ratio"].is_number());
    assert_eq!(status["is_planner"], true);

    let out = Command::new(env!("CARGO_BIN_EXE_moe"))
        .args(["drain", "--router", &cluster.router_addr, "no-such-node"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no live node") && err.contains("no-such-node"),
        "{err}"
    );
}

/// Runs `moe chaos` on the DeepSeek fixture with `extra` flags; checks that nothing failed or
/// differed from the offline engine and returns the report.
fn chaos_report(extra: &[&str]) -> Value {
    let dir = fixture_dir(FIXTURES[0]);
    let out = Command::new(env!("CARGO_BIN_EXE_moe"))
        .args([
            "chaos",
            "--model",
            dir.to_str().unwrap(),
            "--interval-ms",
            "1500",
        ])
        .args(extra)
        .output()
        .expect("moe chaos runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(report["failed"], 0, "{report}");
    assert_eq!(report["mismatched"], 0, "{report}");
    assert!(report["completed"].as_u64().unwrap() > 0);
    assert_eq!(report["sent"], report["completed"]);
    report
}

#[test]
fn chaos_soak_loses_no_request_and_changes_no_token() {
    let report = chaos_report(&["--duration-secs", "20"]);
    let actions: u64 = ["kills", "terminations", "drains"]
        .iter()
        .map(|k| report[k].as_u64().unwrap())
        .sum();
    assert!(actions >= 3, "{report}");
}

/// The same soak with the layers over a TCP collective per epoch: every kill breaks a
/// collective, the layer goes over gRPC, the next epoch forms a new one; nothing is lost.
#[test]
fn chaos_soak_over_the_tcp_collective() {
    let report = chaos_report(&["--duration-secs", "15", "--transport", "tcp"]);
    assert!(
        report["collective_layers"].as_u64().unwrap() > 0,
        "layers went over the collective: {report}"
    );
}

/// `moe up --device cuda:0` passes the device to the router and the nodes; on a build without
/// CUDA (as here) the router stops at start, and `moe up` says why instead of waiting.
#[test]
fn up_reports_why_the_router_did_not_start() {
    if cfg!(feature = "cuda") {
        return;
    }
    let dir = fixture_dir(FIXTURES[1]);
    let out = Command::new(env!("CARGO_BIN_EXE_moe"))
        .args(["up", "--model", dir.to_str().unwrap(), "--nodes", "1"])
        .args(["--device", "cuda:0", "--gpu-dtype", "f32"])
        .env("PATH", path_with_etcd())
        .output()
        .expect("moe up runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("router exited before listening") && err.contains("no CUDA support"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

/// PATH with the etcd the tests use first (`moe up` finds etcd on PATH).
fn path_with_etcd() -> std::ffi::OsString {
    let etcd = moe_tests::harness::etcd_binary();
    let mut paths = vec![etcd.parent().unwrap().to_path_buf()];
    paths.extend(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    ));
    std::env::join_paths(paths).unwrap()
}

/// `moe up` opens the OpenAI endpoint too and prints it: a completion sent where it says is
/// answered; SIGTERM then stops everything.
#[test]
fn up_serves_the_openai_api_where_it_says() {
    use std::io::{BufRead, BufReader, Read, Write};
    let dir = fixture_dir(FIXTURES[0]);
    let mut up = Command::new(env!("CARGO_BIN_EXE_moe"))
        .args(["up", "--model", dir.to_str().unwrap(), "--nodes", "1"])
        .env("PATH", path_with_etcd())
        .env_remove("MOE_HTTP_LISTEN")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("moe up runs");
    let stdout = up.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut printed = Vec::new();
    let http = loop {
        match rx.recv_timeout(std::time::Duration::from_secs(120)) {
            Ok(line) => {
                if let Some(rest) = line.strip_prefix("openai http://") {
                    break rest.split("/v1").next().unwrap().to_string();
                }
                printed.push(line);
            }
            Err(e) => {
                let _ = up.kill();
                panic!("no openai line ({e}) after {printed:?}");
            }
        }
    };
    let curl = rx.recv_timeout(std::time::Duration::from_secs(5)).unwrap();
    assert!(
        curl.starts_with("try: curl") && curl.contains(&http),
        "{curl}"
    );

    let body = r#"{"prompt": "Hello", "max_tokens": 4, "temperature": 0, "ignore_eos": true}"#;
    let mut stream = std::net::TcpStream::connect(&http).unwrap();
    write!(
        stream,
        "POST /v1/completions HTTP/1.1\r\nHost: {http}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let _ = Command::new("kill")
        .args(["-TERM", &up.id().to_string()])
        .status();
    let status = up.wait().unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let json: Value = serde_json::from_str(answer.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(json["object"], "text_completion");
    assert_eq!(json["usage"]["completion_tokens"], 4);
    assert!(status.success(), "moe up exits 0 on SIGTERM: {status}");
}
