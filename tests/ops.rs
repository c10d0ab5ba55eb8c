//! The deployment files in ops/ are checked offline: the Kubernetes manifests are structurally
//! sound and configure only flags the binaries accept (a bad manifest is caught).

use std::process::Command;

use moe_tests::harness::binary;
use moe_tests::TempDir;

fn check(dir: &std::path::Path) -> std::process::Output {
    Command::new("python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/python/check_k8s.py"))
        .arg(dir)
        .arg(binary("moe-router"))
        .arg(binary("moe-expert-node"))
        .output()
        .expect("python3 runs")
}

#[test]
fn kubernetes_manifests_are_sound() {
    let dir = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../ops/k8s"));
    let out = check(dir);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let bad = TempDir::new("k8s");
    let text = std::fs::read_to_string(dir.join("expert-nodes.yaml"))
        .unwrap()
        .replace("MOE_DRAIN_TIMEOUT_SECS", "MOE_NO_SUCH_FLAG")
        .replace("serviceName: moe-expert-node", "serviceName: missing");
    std::fs::write(bad.path().join("expert-nodes.yaml"), text).unwrap();
    let out = check(bad.path());
    assert!(!out.status.success());
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        report.contains("does not accept MOE_NO_SUCH_FLAG"),
        "{report}"
    );
    assert!(report.contains("serviceName"), "{report}");
}
