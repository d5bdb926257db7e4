//! PreflightValidation conversion between v1beta1 (served, deprecated) and v1beta2 (stored).
//!
//! The specs are identical; the statuses differ: v1beta1 keeps a map `crStatuses` keyed by
//! `<namespace>/<name>`, v1beta2 a list `modules` with `namespace` and `name` fields.
//!
//! Like Go KMM, v1beta2 → v1beta1 writes every entry under both `<namespace>/<name>` and
//! `<name>` (old v1beta1 readers look entries up by name). Unlike Go KMM, v1beta1 → v1beta2
//! skips keys without a `/` (they are those by-name duplicates) instead of aborting the
//! conversion of all following entries (spec §1.6 quirk).

use serde_json::{Map, Value, json};

use kmm_api::wire::GROUP;

/// `kmm.sigs.x-k8s.io/v1beta1` / `…/v1beta2`.
fn api_version(version: &str) -> String {
    format!("{GROUP}/{version}")
}

/// Converts one object (as the API server sends it) to `desired` (`group/version`).
pub fn convert(mut object: Value, desired: &str) -> Result<Value, String> {
    let current = object
        .get("apiVersion")
        .and_then(Value::as_str)
        .ok_or("object without apiVersion")?
        .to_owned();
    if current == desired {
        return Ok(object);
    }
    let (v1beta1, v1beta2) = (api_version("v1beta1"), api_version("v1beta2"));
    let status = object
        .as_object_mut()
        .ok_or("object is not a JSON object")?
        .remove("status");
    let converted_status = match (current.as_str(), desired) {
        (from, to) if from == v1beta1 && to == v1beta2 => status.map(status_to_v1beta2),
        (from, to) if from == v1beta2 && to == v1beta1 => status.map(status_to_v1beta1),
        (from, to) => {
            return Err(format!(
                "cannot convert PreflightValidation from {from} to {to}"
            ));
        }
    };
    let map = object
        .as_object_mut()
        .ok_or("object is not a JSON object")?;
    map.insert("apiVersion".into(), Value::String(desired.to_owned()));
    if let Some(status) = converted_status {
        map.insert("status".into(), status);
    }
    Ok(object)
}

fn status_to_v1beta2(mut status: Value) -> Value {
    let Some(map) = status.as_object_mut() else {
        return status;
    };
    let entries = map.remove("crStatuses");
    let mut modules = Vec::new();
    if let Some(Value::Object(entries)) = entries {
        for (key, entry) in entries {
            let Some((namespace, name)) = key.split_once('/') else {
                continue;
            };
            let mut entry = match entry {
                Value::Object(entry) => entry,
                _ => continue,
            };
            entry.insert("namespace".into(), json!(namespace));
            entry.insert("name".into(), json!(name));
            modules.push(Value::Object(entry));
        }
    }
    if !modules.is_empty() {
        map.insert("modules".into(), Value::Array(modules));
    }
    status
}

fn status_to_v1beta1(mut status: Value) -> Value {
    let Some(map) = status.as_object_mut() else {
        return status;
    };
    let modules = map.remove("modules");
    let mut entries = Map::new();
    if let Some(Value::Array(modules)) = modules {
        for module in modules {
            let Value::Object(mut module) = module else {
                continue;
            };
            let namespace = module.remove("namespace");
            let name = module.remove("name");
            let (Some(Value::String(namespace)), Some(Value::String(name))) = (namespace, name)
            else {
                continue;
            };
            entries.insert(format!("{namespace}/{name}"), Value::Object(module.clone()));
            entries.insert(name, Value::Object(module));
        }
    }
    if !entries.is_empty() {
        map.insert("crStatuses".into(), Value::Object(entries));
    }
    status
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(status: &str) -> Value {
        json!({"verificationStatus": status, "verificationStage": "Done",
               "lastTransitionTime": "2026-01-01T00:00:00Z"})
    }

    #[test]
    fn v1beta2_to_v1beta1_and_back() {
        let mut module = entry("Success");
        module["namespace"] = json!("ns");
        module["name"] = json!("m");
        let v2 = json!({
            "apiVersion": "kmm.sigs.x-k8s.io/v1beta2", "kind": "PreflightValidation",
            "metadata": {"name": "pv"}, "spec": {"kernelVersion": "6.1.0-1-amd64"},
            "status": {"modules": [module]}
        });
        let v1 = convert(v2.clone(), "kmm.sigs.x-k8s.io/v1beta1").unwrap();
        assert_eq!(v1["apiVersion"], "kmm.sigs.x-k8s.io/v1beta1");
        assert_eq!(v1["spec"], v2["spec"]);
        assert_eq!(v1["status"]["crStatuses"]["ns/m"], entry("Success"));
        assert_eq!(v1["status"]["crStatuses"]["m"], entry("Success"));
        let back = convert(v1, "kmm.sigs.x-k8s.io/v1beta2").unwrap();
        assert_eq!(back, v2);
    }

    #[test]
    fn keys_without_slash_do_not_stop_the_conversion() {
        let v1 = json!({
            "apiVersion": "kmm.sigs.x-k8s.io/v1beta1", "kind": "PreflightValidation",
            "metadata": {"name": "pv"}, "spec": {"kernelVersion": "6.1.0-1-amd64"},
            "status": {"crStatuses": {"a": entry("Failure"), "ns/b": entry("Success"), "ns/c": entry("InProgress")}}
        });
        let v2 = convert(v1, "kmm.sigs.x-k8s.io/v1beta2").unwrap();
        let modules = v2["status"]["modules"].as_array().unwrap();
        let names: Vec<_> = modules
            .iter()
            .map(|m| m["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["b", "c"]);
    }

    #[test]
    fn no_status_and_same_version() {
        let v1 = json!({"apiVersion": "kmm.sigs.x-k8s.io/v1beta1", "kind": "PreflightValidation",
                        "metadata": {"name": "pv"}, "spec": {"kernelVersion": "6.1.0-1"}});
        assert_eq!(
            convert(v1.clone(), "kmm.sigs.x-k8s.io/v1beta1").unwrap(),
            v1
        );
        let v2 = convert(v1, "kmm.sigs.x-k8s.io/v1beta2").unwrap();
        assert!(v2.get("status").is_none());
        assert!(convert(v2, "kmm.sigs.x-k8s.io/v9").is_err());
    }
}
