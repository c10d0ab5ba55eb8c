//! The deployment files in ops/ are checked offline: the Kubernetes manifests and the compose
//! file are structurally sound, configure only flags the binaries accept, mount the secrets
//! they name, and keep the data plane off public interfaces (a bad file is caught).

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
        .replace("serviceName: moe-expert-node", "serviceName: missing")
        .replace("\"$(POD_IP):7000\"", "\"0.0.0.0:7000\"")
        .replace("mountPath: /secrets", "mountPath: /elsewhere");
    std::fs::write(bad.path().join("expert-nodes.yaml"), text).unwrap();
    let out = check(bad.path());
    assert!(!out.status.success());
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        report.contains("does not accept MOE_NO_SUCH_FLAG"),
        "{report}"
    );
    assert!(report.contains("serviceName"), "{report}");
    assert!(report.contains("listens on all interfaces"), "{report}");
    assert!(
        report.contains("MOE_CLUSTER_TOKEN_FILE=/secrets/cluster-token is not in a mounted volume"),
        "{report}"
    );
}

fn check_compose(file: &std::path::Path) -> std::process::Output {
    Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/python/check_compose.py"
        ))
        .arg(file)
        .arg(binary("moe-router"))
        .arg(binary("moe-expert-node"))
        .arg("cluster-token,admin-key,api-key,etcd-password")
        .output()
        .expect("python3 runs")
}

#[test]
fn compose_file_carries_the_secrets_and_hides_the_data_plane() {
    let file = std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../ops/compose/docker-compose.yml"
    ));
    let out = check_compose(file);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let bad = TempDir::new("compose");
    let text = std::fs::read_to_string(file)
        .unwrap()
        .replace(
            "    MOE_CLUSTER_TOKEN_FILE: /secrets/cluster-token\n    MOE_LISTEN",
            "    MOE_LISTEN",
        )
        .replace(
            "MOE_ADMIN_KEY_FILE: /secrets/admin-key",
            "MOE_ADMIN_KEY_FILE: /secrets/admin-pass",
        );
    let bad_file = bad.path().join("docker-compose.yml");
    std::fs::write(&bad_file, text).unwrap();
    let out = check_compose(&bad_file);
    assert!(!out.status.success());
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        report.contains("node-0: no MOE_CLUSTER_TOKEN_FILE"),
        "{report}"
    );
    assert!(report.contains("admin-pass is not a secret"), "{report}");
}
