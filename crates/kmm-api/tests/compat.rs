//! Compatibility with the manifests Go KMM users write: every object of a kind kmm-rs serves in
//! `../shared/compat/` deserialises into our types and serialises back without losing or
//! changing a field. Run with `--nocapture` to see the counts.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

use std::path::{Path, PathBuf};

use kmm_api::{hub, v1beta1, v1beta2};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

fn compat_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/compat")
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            yaml_files(&path, out);
        } else if path
            .extension()
            .is_some_and(|ext| ext == "yaml" || ext == "yml")
        {
            out.push(path);
        }
    }
}

/// Values Go treats as "not set": kmm-rs may drop them on the way back.
fn is_empty(value: Option<&Value>) -> bool {
    match value {
        None | Some(Value::Null) => true,
        Some(Value::Bool(b)) => !b,
        Some(Value::String(s)) => s.is_empty(),
        Some(Value::Array(items)) => items.is_empty(),
        Some(Value::Object(map)) => map.values().all(|v| is_empty(Some(v))),
        Some(Value::Number(_)) => false,
    }
}

/// Schema defaults that the API server (and kmm-rs) fill in when a key is missing.
fn is_schema_default(key: &str, value: &Value) -> bool {
    matches!(
        (key, value.as_str()),
        ("dirName", Some("/opt")) | ("imagePullPolicy", Some("IfNotPresent"))
    )
}

/// Every difference between what a user wrote and what kmm-rs writes back.
fn diff(path: &str, input: Option<&Value>, output: Option<&Value>, out: &mut Vec<String>) {
    match (input, output) {
        (Some(Value::Object(a)), Some(Value::Object(b))) => {
            let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            for key in keys {
                let (x, y) = (a.get(key), b.get(key));
                if is_empty(x) && y.is_some_and(|y| is_schema_default(key, y)) {
                    continue;
                }
                diff(&format!("{path}.{key}"), x, y, out);
            }
        }
        (Some(Value::Array(a)), Some(Value::Array(b))) if a.len() == b.len() => {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                diff(&format!("{path}[{i}]"), Some(x), Some(y), out);
            }
        }
        (x, y) if is_empty(x) && is_empty(y) => {}
        (x, y) if x == y => {}
        (x, y) => out.push(format!("{path}: wrote {x:?}, read back {y:?}")),
    }
}

fn round_trip<T: DeserializeOwned + Serialize>(doc: &Value) -> Result<Vec<String>, String> {
    let typed: T = serde_json::from_value(doc.clone()).map_err(|err| err.to_string())?;
    let back = serde_json::to_value(&typed).map_err(|err| err.to_string())?;
    let mut diffs = Vec::new();
    diff("", Some(doc), Some(&back), &mut diffs);
    Ok(diffs)
}

#[derive(Default)]
struct Tally {
    files: usize,
    by_kind: std::collections::BTreeMap<String, usize>,
    foreign: usize,
    skipped: Vec<String>,
    failures: Vec<String>,
    rejected_files: Vec<String>,
}

/// The one corpus file that is not valid YAML (a stray U+00B7 after `imageRepoSecret:`).
const INVALID_YAML_FILE: &str = "labs/v1.1/device-plugin/device_plugin.yaml";

#[test]
fn compat_corpus_round_trips() {
    let dir = compat_dir();
    if !dir.is_dir() {
        println!(
            "SKIPPED: {} is absent (a user's clone); nothing to check",
            dir.display()
        );
        return;
    }
    let mut files = Vec::new();
    yaml_files(&dir, &mut files);
    let mut tally = Tally::default();
    for file in &files {
        let rel = file
            .strip_prefix(&dir)
            .unwrap_or(file)
            .display()
            .to_string();
        tally.files += 1;
        let text = std::fs::read_to_string(file).unwrap();
        let docs: Vec<Value> = match serde_saphyr::from_multiple(&text) {
            Ok(docs) => docs,
            Err(err) => {
                tally.rejected_files.push(format!("{rel}: {err}"));
                continue;
            }
        };
        for (index, doc) in docs.iter().enumerate() {
            let api_version = doc
                .get("apiVersion")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let kind = doc.get("kind").and_then(Value::as_str).unwrap_or_default();
            let result = match (api_version, kind) {
                ("kmm.sigs.x-k8s.io/v1beta1", "Module") => round_trip::<v1beta1::Module>(doc),
                ("kmm.sigs.x-k8s.io/v1beta1", "NodeModulesConfig") => {
                    round_trip::<v1beta1::NodeModulesConfig>(doc)
                }
                ("kmm.sigs.x-k8s.io/v1beta1", "ModuleImagesConfig") => {
                    round_trip::<v1beta1::ModuleImagesConfig>(doc)
                }
                ("kmm.sigs.x-k8s.io/v1beta1", "ModuleBuildSignConfig") => {
                    round_trip::<v1beta1::ModuleBuildSignConfig>(doc)
                }
                ("kmm.sigs.x-k8s.io/v1beta1", "PreflightValidation") => {
                    round_trip::<v1beta1::PreflightValidation>(doc)
                }
                ("kmm.sigs.x-k8s.io/v1beta2", "PreflightValidation") => {
                    round_trip::<v1beta2::PreflightValidation>(doc)
                }
                ("hub.kmm.sigs.x-k8s.io/v1beta1", "ManagedClusterModule") => {
                    round_trip::<hub::ManagedClusterModule>(doc)
                }
                ("", _) | (_, "") => {
                    tally.skipped.push(format!(
                        "{rel}#{index}: not a complete object (no apiVersion/kind)"
                    ));
                    continue;
                }
                _ => {
                    tally.foreign += 1;
                    continue;
                }
            };
            let label = format!("{api_version} {kind}");
            match result {
                Ok(diffs) if diffs.is_empty() => *tally.by_kind.entry(label).or_default() += 1,
                Ok(diffs) => tally.failures.push(format!(
                    "{rel}#{index} {label} changed: {}",
                    diffs.join("; ")
                )),
                // Doc fragments such as `moduleLoader: # ...` lack keys the CRD schema requires;
                // the API server rejects them as well.
                Err(err) if err.starts_with("missing field") => tally.skipped.push(format!(
                    "{rel}#{index}: incomplete fragment, rejected like the API server would: {err}"
                )),
                Err(err) => tally
                    .failures
                    .push(format!("{rel}#{index} {label} rejected: {err}")),
            }
        }
    }

    println!("compat corpus: {} files", tally.files);
    for (kind, count) in &tally.by_kind {
        println!("  accepted and round-tripped: {count:>3} {kind}");
    }
    println!("  foreign kinds ignored: {}", tally.foreign);
    println!("  skipped: {}", tally.skipped.len());
    for reason in &tally.skipped {
        println!("    {reason}");
    }
    println!(
        "  files rejected as invalid YAML: {}",
        tally.rejected_files.len()
    );
    for reason in &tally.rejected_files {
        println!("    {reason}");
    }

    assert!(
        tally.failures.is_empty(),
        "objects that do not round-trip:\n{}",
        tally.failures.join("\n")
    );
    let modules = tally
        .by_kind
        .get("kmm.sigs.x-k8s.io/v1beta1 Module")
        .copied()
        .unwrap_or_default();
    assert!(modules >= 50, "only {modules} Modules accepted");
    assert_eq!(
        tally.rejected_files.len(),
        1,
        "exactly the known-bad file is rejected"
    );
    let rejected = &tally.rejected_files[0];
    assert!(rejected.starts_with(INVALID_YAML_FILE), "{rejected}");
    assert!(
        rejected.contains("line"),
        "the error names the line: {rejected}"
    );
}
