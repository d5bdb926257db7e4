//! Snapshot tests of `kmmctl validate` output: the whole compatibility corpus (every KMM manifest
//! of the public KMM repositories, read from `../shared/compat`) and bad input. Expected outputs
//! live in `tests/snapshots/`; `KMMCTL_UPDATE_SNAPSHOTS=1 cargo test -p kmmctl --test
//! validate_snapshots` rewrites them (review the diff before committing).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn compat_dir() -> PathBuf {
    manifest_dir().join("../../../shared/compat")
}

/// Runs kmmctl in `cwd` and returns `stdout`, `stderr` (if any) and the exit code as one text.
fn kmmctl(cwd: &Path, args: &[&str], stdin: Option<&str>) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kmmctl"))
        .args(args)
        .current_dir(cwd)
        .env_remove("KUBECONFIG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input
        .write_all(stdin.unwrap_or_default().as_bytes())
        .unwrap();
    drop(input);
    let output = child.wait_with_output().unwrap();
    let mut text = format!("$ kmmctl {}\n", args.join(" "));
    text.push_str(&String::from_utf8_lossy(&output.stdout));
    if !output.stderr.is_empty() {
        text.push_str("[stderr]\n");
        text.push_str(&String::from_utf8_lossy(&output.stderr));
    }
    text.push_str(&format!("[exit {}]\n", output.status.code().unwrap_or(-1)));
    text
}

fn check_snapshot(name: &str, actual: &str) {
    let path = manifest_dir().join("tests/snapshots").join(name);
    if std::env::var_os("KMMCTL_UPDATE_SNAPSHOTS").is_some() {
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|_| {
        panic!(
            "missing snapshot {}; run with KMMCTL_UPDATE_SNAPSHOTS=1 to create it",
            path.display()
        )
    });
    if expected != actual {
        let diff = similar::TextDiff::from_lines(expected.as_str(), actual)
            .unified_diff()
            .header("expected", "actual")
            .to_string();
        panic!("{name} differs from the snapshot:\n{diff}");
    }
}

fn yaml_files(dir: &Path, base: &Path, out: &mut Vec<String>) {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            yaml_files(&path, base, out);
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            out.push(path.strip_prefix(base).unwrap().display().to_string());
        }
    }
}

const KERNELS: [&str; 4] = [
    "--kernel",
    "4.18.0-372.19.1.el8_6.x86_64",
    "--kernel",
    "6.1.0-56-amd64",
];

#[test]
fn validate_the_compat_corpus() {
    let dir = compat_dir();
    if !dir.is_dir() {
        println!("SKIPPED: {} is absent; nothing to check", dir.display());
        return;
    }
    for part in ["labs", "upstream-samples"] {
        let mut files = Vec::new();
        yaml_files(&dir.join(part), &dir, &mut files);
        assert!(!files.is_empty(), "no YAML under {part}");
        let mut args = vec!["validate"];
        args.extend(files.iter().map(String::as_str));
        args.extend(KERNELS);
        args.extend(["--node-labels", "feature.kmm.lab=true"]);
        let output = kmmctl(&dir, &args, None);
        // The one upstream file that is not YAML is rejected with its line, nothing crashes.
        if part == "labs" {
            assert!(
                output.contains("device_plugin.yaml: not valid YAML: error: line 17"),
                "{output}"
            );
        }
        assert!(!output.contains("panicked"), "{output}");
        check_snapshot(&format!("compat-{part}.txt"), &output);
    }
}

#[test]
fn validate_bad_input_lists_every_error_with_its_path() {
    let fixtures = manifest_dir().join("tests/fixtures");
    let output = kmmctl(
        &fixtures,
        &[
            "validate",
            "bad-module.yaml",
            "--kernel",
            "6.8.0-31-generic",
            "--node-labels",
            "feature.kmm.lab=false",
        ],
        None,
    );
    assert!(output.ends_with("[exit 1]\n"), "{output}");
    assert!(output.contains("kernelMappings[0].regexp"), "{output}");
    check_snapshot("bad-module.txt", &output);

    let output = kmmctl(&fixtures, &["validate", "-"], Some("kind: [unclosed\n"));
    assert!(output.contains("<stdin>: not valid YAML"), "{output}");
    check_snapshot("stdin-not-yaml.txt", &output);

    let output = kmmctl(&fixtures, &["validate", "not-yaml.yaml"], None);
    assert!(output.ends_with("[exit 1]\n"), "{output}");
    check_snapshot("not-yaml.txt", &output);

    let output = kmmctl(&fixtures, &["validate", "does-not-exist.yaml"], None);
    assert!(output.ends_with("[exit 2]\n"), "{output}");
    check_snapshot("missing-file.txt", &output);
}

#[test]
fn validate_json_output_of_a_lab() {
    let labs = manifest_dir().join("../../labs");
    let output = kmmctl(
        &labs,
        &[
            "validate",
            "build-and-sign/module.yaml",
            "--kernel",
            "6.1.0-56-amd64",
            "-o",
            "json",
        ],
        None,
    );
    let json: serde_json::Value = serde_json::from_str(
        output
            .lines()
            .skip(1)
            .take_while(|l| !l.starts_with("[exit"))
            .collect::<Vec<_>>()
            .join("\n")
            .as_str(),
    )
    .unwrap();
    let kernel = &json[0]["documents"][0]["kernels"][0];
    assert_eq!(
        kernel["filesToSign"][0],
        "/opt/lib/modules/6.1.0-56-amd64/extra/kmm_ci_a.ko"
    );
    check_snapshot("lab-build-and-sign.json.txt", &output);
}
