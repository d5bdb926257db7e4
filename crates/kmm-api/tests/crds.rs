//! The committed CRDs under `deploy/crds/` are exactly what the Rust types generate, and they
//! carry the schema details users and the API server rely on.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

use std::path::{Path, PathBuf};

use kmm_api::crds;

fn crd_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/crds")
}

#[test]
fn committed_crds_match_the_types() {
    let dir = crd_dir();
    let generated = crds::all().unwrap();
    let mut stale = Vec::new();
    for (file, crd) in &generated {
        let want = crds::to_yaml(crd).unwrap();
        let have = std::fs::read_to_string(dir.join(file)).unwrap_or_default();
        if have != want {
            stale.push(file.clone());
        }
    }
    let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .filter(|name| name.ends_with(".yaml"))
        .collect();
    on_disk.sort();
    let mut expected: Vec<String> = generated.iter().map(|(file, _)| file.clone()).collect();
    expected.sort();
    assert!(
        stale.is_empty() && on_disk == expected,
        "deploy/crds is out of date ({stale:?} differ; on disk {on_disk:?}, expected {expected:?}); run `make crds`"
    );
}

fn crd_json(kind: &str) -> serde_json::Value {
    let (_, crd) = crds::all()
        .unwrap()
        .into_iter()
        .find(|(_, crd)| crd.spec.names.kind == kind)
        .unwrap();
    serde_json::to_value(crd).unwrap()
}

#[test]
fn every_kind_is_served_with_the_go_kmm_names() {
    let cases = [
        ("Module", "kmm.sigs.x-k8s.io", "Namespaced", vec![]),
        (
            "NodeModulesConfig",
            "kmm.sigs.x-k8s.io",
            "Cluster",
            vec!["nmc"],
        ),
        (
            "ModuleImagesConfig",
            "kmm.sigs.x-k8s.io",
            "Namespaced",
            vec!["mic"],
        ),
        (
            "ModuleBuildSignConfig",
            "kmm.sigs.x-k8s.io",
            "Namespaced",
            vec!["mbsc"],
        ),
        (
            "PreflightValidation",
            "kmm.sigs.x-k8s.io",
            "Cluster",
            vec!["pfv"],
        ),
        (
            "ManagedClusterModule",
            "hub.kmm.sigs.x-k8s.io",
            "Cluster",
            vec![],
        ),
    ];
    for (kind, group, scope, short) in cases {
        let crd = crd_json(kind);
        assert_eq!(crd["spec"]["group"], group, "{kind}");
        assert_eq!(crd["spec"]["scope"], scope, "{kind}");
        let shorts: Vec<&str> = crd["spec"]["names"]["shortNames"]
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
            .unwrap_or_default();
        assert_eq!(shorts, short, "{kind}");
        for version in crd["spec"]["versions"].as_array().unwrap() {
            assert!(
                version["subresources"]["status"].is_object(),
                "{kind} has a status subresource"
            );
        }
    }
}

#[test]
fn preflight_validation_serves_both_versions_and_stores_v1beta2() {
    let crd = crd_json("PreflightValidation");
    let mut versions: Vec<(String, bool, bool, bool)> = crd["spec"]["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["name"].as_str().unwrap().to_owned(),
                v["served"].as_bool().unwrap(),
                v["storage"].as_bool().unwrap(),
                v["deprecated"].as_bool().unwrap_or(false),
            )
        })
        .collect();
    versions.sort();
    assert_eq!(
        versions,
        [
            ("v1beta1".to_owned(), true, false, true),
            ("v1beta2".to_owned(), true, true, false)
        ]
    );
}

#[test]
fn module_schema_has_the_cel_rule_defaults_and_required_keys() {
    let crd = crd_json("Module");
    let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
    let spec = &schema["properties"]["spec"];
    assert_eq!(
        spec["x-kubernetes-validations"][0]["rule"],
        "!(has(self.dra) && has(self.devicePlugin))"
    );
    assert_eq!(
        spec["x-kubernetes-validations"][0]["message"],
        "spec.dra and spec.devicePlugin are mutually exclusive"
    );
    assert!(
        spec["required"]
            .as_array()
            .unwrap()
            .contains(&"selector".into())
    );
    let container = &spec["properties"]["moduleLoader"]["properties"]["container"];
    let required = container["required"].as_array().unwrap();
    assert!(required.contains(&"kernelMappings".into()) && required.contains(&"modprobe".into()));
    assert_eq!(container["properties"]["kernelMappings"]["minItems"], 1);
    assert!(
        container["properties"]["kernelMappings"]
            .get("default")
            .is_none()
    );
    assert_eq!(
        container["properties"]["modprobe"]["properties"]["dirName"]["default"],
        "/opt"
    );
    let mapping = &container["properties"]["kernelMappings"]["items"];
    assert!(
        mapping["required"]
            .as_array()
            .unwrap()
            .contains(&"containerImage".into())
    );
    assert!(
        mapping["properties"]["registryTLS"].is_object(),
        "Go's JSON name registryTLS"
    );
    let conditions = &schema["properties"]["status"]["properties"]["conditions"];
    assert_eq!(conditions["x-kubernetes-list-type"], "map");
    assert_eq!(
        conditions["x-kubernetes-list-map-keys"],
        serde_json::json!(["type"])
    );
    let columns: Vec<&str> = crd["spec"]["versions"][0]["additionalPrinterColumns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(columns, ["Loaded", "Desired", "Ready", "Reason", "Age"]);
}

#[test]
fn nmc_requires_insecure_pull_without_a_default() {
    let crd = crd_json("NodeModulesConfig");
    let config = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
        ["modules"]["items"]["properties"]["config"];
    let required = config["required"].as_array().unwrap();
    for key in [
        "containerImage",
        "insecurePull",
        "kernelVersion",
        "modprobe",
    ] {
        assert!(required.contains(&key.into()), "{key} required");
    }
    assert!(
        config["properties"]["insecurePull"]
            .get("default")
            .is_none()
    );
    assert_eq!(
        config["properties"]["imagePullPolicy"]["default"],
        "IfNotPresent"
    );
}
