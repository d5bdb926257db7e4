//! Tier 2: the install manifests are accepted by a real API server (`kubectl apply
//! --dry-run=server`): every kustomize overlay that needs no extra CRDs, and the rendered Helm
//! chart.
#![allow(clippy::unwrap_used)] // setup failures should fail the test on the spot

use std::path::{Path, PathBuf};
use std::process::Command;

use kmm_testenv::TestEnv;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy")
}

fn run(program: &Path, args: &[&str]) -> String {
    let output = Command::new(program).args(args).output().unwrap();
    assert!(
        output.status.success(),
        "{} {}: {}",
        program.display(),
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

fn dry_run(env: &TestEnv, name: &str, manifests: &str) {
    let file = env.dir.join(format!("{}.yaml", env.unique_name(name)));
    std::fs::write(&file, manifests).unwrap();
    let out = env
        .kubectl(&["apply", "--dry-run=server", "-f", file.to_str().unwrap()])
        .unwrap();
    println!("{name}:\n{out}");
    for kind in [
        "deployment.apps/kmm-operator-controller",
        "deployment.apps/kmm-operator-webhook",
        "validatingwebhookconfiguration.admissionregistration.k8s.io/kmm-operator-validating-webhook-configuration",
        "clusterrole.rbac.authorization.k8s.io/kmm-operator-manager-role",
    ] {
        assert!(out.contains(kind), "{name}: {kind} missing in\n{out}");
    }
}

/// A dry run cannot create the namespace that the namespaced objects go into, so the namespace
/// is created for real first.
fn ensure_namespace(env: &TestEnv, ns: &str) {
    let exists = env.kubectl(&["get", "namespace", ns]).is_ok();
    if !exists {
        let _ = env.kubectl(&["create", "namespace", ns]);
    }
}

#[test]
fn kustomize_overlays_pass_a_server_side_dry_run() {
    let env = TestEnv::get();
    let kubectl = env.bin_dir.join("kubectl");
    for (overlay, ns) in [
        ("kubernetes", "kmm-operator-system"),
        ("openshift", "openshift-kmm"),
    ] {
        let dir = deploy_dir().join("overlays").join(overlay);
        let manifests = run(&kubectl, &["kustomize", dir.to_str().unwrap()]);
        ensure_namespace(env, ns);
        dry_run(env, overlay, &manifests);
    }
    // The cert-manager overlay needs cert-manager's CRDs; check that it builds.
    let dir = deploy_dir().join("overlays/cert-manager");
    let manifests = run(&kubectl, &["kustomize", dir.to_str().unwrap()]);
    assert!(manifests.contains("--cert-dir=/tmp/k8s-webhook-server/serving-certs"));
}

#[test]
fn helm_chart_renders_and_passes_a_server_side_dry_run() {
    let env = TestEnv::get();
    let helm = env.bin_dir.join("helm");
    assert!(
        helm.exists(),
        "no helm in {}: rebuild with testenv/build.sh",
        env.bin_dir.display()
    );
    let chart = deploy_dir().join("helm/kmm-operator");
    let ns = "kmm-helm-test";
    let manifests = run(
        &helm,
        &[
            "template",
            "kmm",
            chart.to_str().unwrap(),
            "--namespace",
            ns,
            "--kube-version",
            "1.37.2",
        ],
    );
    ensure_namespace(env, ns);
    dry_run(env, "helm", &manifests);
}
