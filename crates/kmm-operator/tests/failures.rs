//! Tier 2: what users see when something is wrong, with the operator checking images against a
//! real OCI registry on loopback: a missing image and a denied one are told apart, and a worker
//! failure is recorded with the kernel's reason and recovers once the Module is fixed.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

mod common;

use std::time::Duration;

use k8s_openapi::api::core::v1::{Event, Node, Secret};
use kmm_api::v1beta1::{Module, NodeModulesConfig};
use kmm_api::wire;
use kmm_operator::controllers::ImageCheckMode;
use kmm_testenv::registry::{Registry, RegistryOptions};
use kmm_testenv::{FakeNode, TestEnv, wait_for};
use kube::ResourceExt;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(90);

fn start_operator() {
    common::start_shared_operator(common::test_controller_config(ImageCheckMode::Registry));
}

fn module(name: &str, key: &str, value: &str, image: &str, secret: Option<&str>) -> Module {
    let mut spec = json!({
        "selector": {key: value},
        "moduleLoader": {"container": {
            "modprobe": {"moduleName": "kmm_ci_a"},
            "kernelMappings": [{"regexp": "^.+$", "containerImage": image, "registryTLS": {"insecure": true}}]
        }}
    });
    if let Some(secret) = secret {
        spec["imageRepoSecret"] = json!({"name": secret});
    }
    serde_json::from_value(json!({"metadata": {"name": name}, "spec": spec})).unwrap()
}

fn degraded_reason(module: Option<&Module>) -> Option<String> {
    module
        .and_then(|m| m.status.as_ref())
        .and_then(|s| {
            s.conditions
                .iter()
                .find(|c| c.type_ == "Degraded" && c.status == "True")
        })
        .map(|c| c.reason.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_and_unauthorized_images_are_told_apart() {
    let env = TestEnv::get();
    let client = env.client().await.unwrap();
    let ns = env.namespace(&client, "images").await.unwrap();
    let key = "test.kmm-rs.dev/images";
    let node = env.unique_name("images");
    FakeNode::new(&node, "6.1.0-56-amd64")
        .label(key, &ns)
        .create(&client)
        .await
        .unwrap();
    let registry = Registry::start(RegistryOptions::default().basic_auth("kmm", "s3cret")).unwrap();
    registry.push_image("kmod/present:1").await.unwrap();
    let secret: Secret = registry.docker_config_secret("pull");
    Api::<Secret>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    start_operator();

    let modules = Api::<Module>::namespaced(client.clone(), &ns);
    let missing = registry.image("kmod/absent:1");
    let denied = registry.image("kmod/present:1");
    modules
        .create(
            &PostParams::default(),
            &module("missing", key, &ns, &missing, Some("pull")),
        )
        .await
        .unwrap();
    modules
        .create(
            &PostParams::default(),
            &module("denied", key, &ns, &denied, None),
        )
        .await
        .unwrap();

    let m = wait_for(
        &modules,
        "missing",
        TIMEOUT,
        "ImageMissing",
        |m: Option<&Module>| degraded_reason(m).as_deref() == Some("ImageMissing"),
    )
    .await
    .unwrap()
    .unwrap();
    let message = &m
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Degraded")
        .unwrap()
        .message;
    assert!(message.contains(&missing), "{message}");
    let d = wait_for(
        &modules,
        "denied",
        TIMEOUT,
        "ImageUnauthorized",
        |m: Option<&Module>| degraded_reason(m).as_deref() == Some("ImageUnauthorized"),
    )
    .await
    .unwrap()
    .unwrap();
    let message = &d
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Degraded")
        .unwrap()
        .message;
    assert!(message.contains(&denied), "{message}");
    let nmc = Api::<NodeModulesConfig>::all(client.clone())
        .get_opt(&node)
        .await
        .unwrap();
    assert!(
        nmc.is_none_or(|n| n.spec.modules.is_empty()),
        "nothing is loaded from an unusable image"
    );

    // Giving the Module the pull secret fixes it.
    let fix = json!({"spec": {"imageRepoSecret": {"name": "pull"}}});
    modules
        .patch("denied", &PatchParams::default(), &Patch::Merge(&fix))
        .await
        .unwrap();
    let nodes = Api::<Node>::all(client.clone());
    let ready = wire::module_ready_label(&ns, "denied");
    wait_for(&nodes, &node, TIMEOUT, "loaded", move |n: Option<&Node>| {
        n.is_some_and(|n| n.labels().contains_key(&ready))
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_failure_is_recorded_and_recovers_after_the_fix() {
    let env = TestEnv::get();
    let client = env.client().await.unwrap();
    let ns = env.namespace(&client, "broken").await.unwrap();
    let key = "test.kmm-rs.dev/broken";
    let node = env.unique_name("broken");
    FakeNode::new(&node, "6.1.0-56-amd64")
        .label(key, &ns)
        .create(&client)
        .await
        .unwrap();
    let registry = Registry::shared();
    // kwok fails worker pods whose module image is under /kmm-rs-test-broken/ (testenv/README.md).
    let broken = registry
        .push_image("kmm-rs-test-broken/kmod:1")
        .await
        .unwrap();
    let fixed = registry.push_image("kmod/fixed:1").await.unwrap();
    start_operator();

    let modules = Api::<Module>::namespaced(client.clone(), &ns);
    modules
        .create(
            &PostParams::default(),
            &module("kmod", key, &ns, &broken, None),
        )
        .await
        .unwrap();
    let nmcs = Api::<NodeModulesConfig>::all(client.clone());
    let nmc = wait_for(
        &nmcs,
        &node,
        TIMEOUT,
        "recording a failure",
        |n: Option<&NodeModulesConfig>| {
            n.and_then(|n| n.status.as_ref())
                .is_some_and(|s| s.modules.iter().any(|m| m.last_failure.is_some()))
        },
    )
    .await
    .unwrap()
    .unwrap();
    let failure = nmc.status.unwrap().modules[0].last_failure.clone().unwrap();
    assert_eq!(failure.reason, "UnknownSymbol");
    assert!(
        failure
            .message
            .contains("Unknown symbol kmm_ci_provider_value"),
        "{}",
        failure.message
    );

    let m = wait_for(
        &modules,
        "kmod",
        TIMEOUT,
        "LoadFailed",
        |m: Option<&Module>| degraded_reason(m).as_deref() == Some("LoadFailed"),
    )
    .await
    .unwrap()
    .unwrap();
    let degraded = m
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Degraded")
        .unwrap();
    assert!(
        degraded.message.contains(&node) && degraded.message.contains("UnknownSymbol"),
        "{}",
        degraded.message
    );
    let events = Api::<Event>::all(client.clone())
        .list(&ListParams::default().fields(&format!("involvedObject.name={node}")))
        .await
        .unwrap();
    assert!(
        events
            .items
            .iter()
            .any(|e| e.type_.as_deref() == Some("Warning")
                && e.reason.as_deref() == Some("ModuleLoadFailed")),
        "{:?}",
        events
            .items
            .iter()
            .map(|e| (&e.reason, &e.message))
            .collect::<Vec<_>>()
    );

    // The fix: a good image. The crash-looping pod is replaced and the module loads.
    let patch = json!({"spec": {"moduleLoader": {"container": {"kernelMappings": [
        {"regexp": "^.+$", "containerImage": fixed, "registryTLS": {"insecure": true}}
    ]}}}});
    modules
        .patch("kmod", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let nodes = Api::<Node>::all(client.clone());
    let ready = wire::module_ready_label(&ns, "kmod");
    wait_for(&nodes, &node, TIMEOUT, "loaded", move |n: Option<&Node>| {
        n.is_some_and(|n| n.labels().contains_key(&ready))
    })
    .await
    .unwrap();
    let recovered = wait_for(&modules, "kmod", TIMEOUT, "Ready", |m: Option<&Module>| {
        m.and_then(|m| m.status.as_ref()).is_some_and(|s| {
            s.conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        })
    })
    .await
    .unwrap()
    .unwrap();
    assert!(degraded_reason(Some(&recovered)).is_none());
    let loaded = nmcs.get(&node).await.unwrap().status.unwrap().modules[0].clone();
    assert!(
        loaded.last_failure.is_none(),
        "a successful load clears the failure"
    );
}
