//! Tier 2: device plugins (spec §4.7, §4.9) against the real control plane. The DaemonSet
//! controller and scheduler of the control plane place the plugin pods on kwok nodes; kwok makes
//! them Running and Ready.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

mod common;

use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Node, Pod};
use kmm_api::v1beta1::{DaemonSetStatus, Module};
use kmm_api::wire;
use kmm_operator::controllers::ImageCheckMode;
use kmm_testenv::{FakeNode, TestEnv, wait_for};
use kube::ResourceExt;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::wait::{await_condition, conditions};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(90);

fn module_with_plugin(selector: (&str, &str)) -> Module {
    serde_json::from_value(json!({
        "apiVersion": "kmm.sigs.x-k8s.io/v1beta1", "kind": "Module",
        "metadata": {"name": "kmod"},
        "spec": {
            "selector": {selector.0: selector.1},
            "moduleLoader": {"container": {
                "modprobe": {"moduleName": "kmm_ci_a"},
                "kernelMappings": [
                    {"literal": "6.1.0-56-amd64", "containerImage": "registry.example/kmod:6.1"}
                ]
            }},
            "devicePlugin": {"container": {"image": "registry.example/device-plugin:v1"}}
        }
    }))
    .unwrap()
}

fn label_is(key: String, present: bool) -> impl Fn(Option<&Node>) -> bool {
    move |node| node.is_some_and(|n| n.labels().contains_key(&key) == present)
}

async fn plugin_pods(client: &kube::Client, ns: &str) -> Vec<Pod> {
    Api::<Pod>::namespaced(client.clone(), ns)
        .list(&ListParams::default().labels(&format!(
            "{}={}",
            wire::label::ROLE,
            wire::label::ROLE_DEVICE_PLUGIN
        )))
        .await
        .unwrap()
        .items
}

fn node_of(pod: &Pod) -> String {
    pod.spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .unwrap_or_default()
}

async fn wait_status(modules: &Api<Module>, want: DaemonSetStatus) {
    wait_for(
        modules,
        "kmod",
        TIMEOUT,
        &format!("devicePlugin status {want:?}"),
        move |m: Option<&Module>| {
            m.and_then(|m| m.status.as_ref())
                .is_some_and(|s| s.device_plugin == want)
        },
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn plugin_runs_where_the_module_is_loaded_and_labels_follow_its_pods() {
    let env = TestEnv::get();
    let client = env.client().await.unwrap();
    let ns = env.namespace(&client, "dp").await.unwrap();
    let selector = "test.kmm-rs.dev/device-plugin";
    let a = env.unique_name("dp-a");
    let b = env.unique_name("dp-b");
    let c = env.unique_name("dp-c"); // no kernel mapping: the module never loads there
    for (node, kernel) in [
        (&a, "6.1.0-56-amd64"),
        (&b, "6.1.0-56-amd64"),
        (&c, "5.14.0-284.el9.x86_64"),
    ] {
        FakeNode::new(node, kernel)
            .label(selector, &ns)
            .create(&client)
            .await
            .unwrap();
    }
    common::start_shared_operator(common::test_controller_config(ImageCheckMode::PullPod));

    let modules = Api::<Module>::namespaced(client.clone(), &ns);
    modules
        .create(&PostParams::default(), &module_with_plugin((selector, &ns)))
        .await
        .unwrap();

    // Plugin pods on the nodes with the module loaded, and their readiness on those nodes.
    let nodes = Api::<Node>::all(client.clone());
    let ready = wire::device_plugin_ready_label(&ns, "kmod");
    let target = wire::device_plugin_target_label(&ns, "kmod");
    for node in [&a, &b] {
        wait_for(
            &nodes,
            node,
            TIMEOUT,
            "plugin ready",
            label_is(ready.clone(), true),
        )
        .await
        .unwrap();
    }
    wait_status(
        &modules,
        DaemonSetStatus {
            nodes_matching_selector_number: 3,
            desired_number: 3,
            available_number: 2,
        },
    )
    .await;
    let node_c = nodes.get(&c).await.unwrap();
    assert!(node_c.labels().contains_key(&target), "c is a target");
    assert!(!node_c.labels().contains_key(&ready));
    let pods = plugin_pods(&client, &ns).await;
    let mut placed: Vec<String> = pods.iter().map(node_of).collect();
    placed.sort();
    let mut loaded = vec![a.clone(), b.clone()];
    loaded.sort();
    assert_eq!(
        placed, loaded,
        "no plugin pod where the module is not loaded"
    );
    let pod = &pods[0];
    assert_eq!(pod.finalizers(), [wire::finalizer::NODE_LABELER.to_owned()]);
    let daemonsets = Api::<DaemonSet>::namespaced(client.clone(), &ns)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items;
    assert_eq!(daemonsets.len(), 1);
    assert!(daemonsets[0].name_any().starts_with("kmod-device-plugin-"));
    assert_eq!(
        daemonsets[0]
            .labels()
            .get(wire::label::ROLE)
            .map(String::as_str),
        Some(wire::label::ROLE_DEVICE_PLUGIN)
    );

    // Node b leaves the selector: module unloaded, target label gone, plugin pod evicted, its
    // readiness label removed and its finalizer released (the pod goes away).
    let pod_b = pods.iter().find(|p| node_of(p) == b).unwrap();
    let uid = pod_b.uid().unwrap();
    nodes
        .patch(
            &b,
            &PatchParams::default(),
            &Patch::Merge(&json!({"metadata": {"labels": {selector: null}}})),
        )
        .await
        .unwrap();
    for key in [ready.clone(), target.clone()] {
        wait_for(&nodes, &b, TIMEOUT, "unlabelled", label_is(key, false))
            .await
            .unwrap();
    }
    let pods_api = Api::<Pod>::namespaced(client.clone(), &ns);
    tokio::time::timeout(
        TIMEOUT,
        await_condition(
            pods_api.clone(),
            &pod_b.name_any(),
            conditions::is_deleted(&uid),
        ),
    )
    .await
    .expect("the evicted plugin pod is released")
    .unwrap();
    assert!(nodes.get(&a).await.unwrap().labels().contains_key(&ready));

    // devicePlugin removed: DaemonSet, pods and every label go, the status is cleared.
    modules
        .patch(
            "kmod",
            &PatchParams::default(),
            &Patch::Merge(&json!({"spec": {"devicePlugin": null}})),
        )
        .await
        .unwrap();
    for node in [&a, &c] {
        wait_for(
            &nodes,
            node,
            TIMEOUT,
            "untargeted",
            label_is(target.clone(), false),
        )
        .await
        .unwrap();
    }
    wait_for(
        &nodes,
        &a,
        TIMEOUT,
        "plugin gone",
        label_is(ready.clone(), false),
    )
    .await
    .unwrap();
    wait_status(&modules, DaemonSetStatus::default()).await;
    let ds_api = Api::<DaemonSet>::namespaced(client.clone(), &ns);
    let ds_name = daemonsets[0].name_any();
    let ds_uid = daemonsets[0].uid().unwrap();
    tokio::time::timeout(
        TIMEOUT,
        await_condition(ds_api, &ds_name, conditions::is_deleted(&ds_uid)),
    )
    .await
    .expect("the DaemonSet is deleted")
    .unwrap();
    // The module itself stays loaded on a.
    assert!(
        nodes
            .get(&a)
            .await
            .unwrap()
            .labels()
            .contains_key(&wire::module_ready_label(&ns, "kmod"))
    );
}

fn versioned_module_with_plugin(selector: (&str, &str), version: &str) -> Module {
    serde_json::from_value(json!({
        "apiVersion": "kmm.sigs.x-k8s.io/v1beta1", "kind": "Module",
        "metadata": {"name": "kmod"},
        "spec": {
            "selector": {selector.0: selector.1},
            "moduleLoader": {"container": {
                "version": version,
                "modprobe": {"moduleName": "kmm_ci_a"},
                "kernelMappings": [{"regexp": "^.+$", "containerImage": format!("registry.example/kmod:{version}")}]
            }},
            "devicePlugin": {"container": {"image": "registry.example/device-plugin:v1"}}
        }
    }))
    .unwrap()
}

/// Waits until `node` runs the module and its plugin at `version`, and returns the version label
/// of the plugin pods on it.
async fn wait_node_at(client: &kube::Client, ns: &str, node: &str, version: &str) -> Vec<String> {
    let keys = [
        (
            wire::version_schedule_pod_label(ns, "kmod"),
            version.to_owned(),
        ),
        (
            wire::module_version_ready_label(ns, "kmod"),
            version.to_owned(),
        ),
        (wire::device_plugin_ready_label(ns, "kmod"), String::new()),
    ];
    wait_for(
        &Api::<Node>::all(client.clone()),
        node,
        TIMEOUT,
        &format!("at {version} with its plugin"),
        move |n: Option<&Node>| {
            n.is_some_and(|n| keys.iter().all(|(k, v)| n.labels().get(k) == Some(v)))
        },
    )
    .await
    .unwrap();
    plugin_pods(client, ns)
        .await
        .iter()
        .filter(|p| node_of(p) == node)
        .map(|p| {
            p.labels()
                .get(&wire::version_schedule_pod_label(ns, "kmod"))
                .cloned()
                .unwrap_or_default()
        })
        .collect()
}

#[tokio::test]
async fn ordered_upgrade_moves_the_plugin_with_the_module() {
    let env = TestEnv::get();
    let client = env.client().await.unwrap();
    let ns = env.namespace(&client, "dp-upgrade").await.unwrap();
    let selector = "test.kmm-rs.dev/device-plugin";
    let user_label = wire::version_module_label(&ns, "kmod");
    let (a, b) = (env.unique_name("dpu-a"), env.unique_name("dpu-b"));
    for node in [&a, &b] {
        FakeNode::new(node, "6.1.0-56-amd64")
            .label(selector, &ns)
            .label(&user_label, "v1")
            .create(&client)
            .await
            .unwrap();
    }
    common::start_shared_operator(common::test_controller_config(ImageCheckMode::PullPod));
    let modules = Api::<Module>::namespaced(client.clone(), &ns);
    modules
        .create(
            &PostParams::default(),
            &versioned_module_with_plugin((selector, &ns), "v1"),
        )
        .await
        .unwrap();
    for node in [&a, &b] {
        assert_eq!(wait_node_at(&client, &ns, node, "v1").await, ["v1"]);
    }

    // The Module moves to v2: a second DaemonSet appears, selecting no node yet.
    modules
        .patch(
            "kmod",
            &PatchParams::default(),
            &Patch::Merge(&json!({"spec": {"moduleLoader": {"container": {
                "version": "v2",
                "kernelMappings": [{"regexp": "^.+$", "containerImage": "registry.example/kmod:v2"}]
            }}}})),
        )
        .await
        .unwrap();
    let ds_api = Api::<DaemonSet>::namespaced(client.clone(), &ns);
    let version_key = wire::version_schedule_pod_label(&ns, "kmod");
    // Every DaemonSet of the namespace as it appears, until the v2 one does.
    let mut seen = std::collections::BTreeMap::new();
    let events = watcher(ds_api.clone(), watcher::Config::default()).applied_objects();
    let mut events = std::pin::pin!(events);
    while !seen.contains_key("v2") {
        let ds = tokio::time::timeout(TIMEOUT, events.next())
            .await
            .expect("no v2 DaemonSet")
            .unwrap()
            .unwrap();
        let version = ds.labels().get(&version_key).cloned().unwrap_or_default();
        seen.insert(version, ds);
    }
    assert_eq!(seen.keys().collect::<Vec<_>>(), ["v1", "v2"]);
    let old_ds = seen.remove("v1").unwrap();

    // Node a first: its v1 plugin leaves, the module reloads at v2, the v2 plugin comes.
    let nodes = Api::<Node>::all(client.clone());
    for (node, other) in [(&a, Some(&b)), (&b, None)] {
        nodes
            .patch(
                node,
                &PatchParams::default(),
                &Patch::Merge(&json!({"metadata": {"labels": {&user_label: "v2"}}})),
            )
            .await
            .unwrap();
        assert_eq!(wait_node_at(&client, &ns, node, "v2").await, ["v2"]);
        if let Some(other) = other {
            assert_eq!(wait_node_at(&client, &ns, other, "v1").await, ["v1"]);
        }
    }
    // No node runs v1 any more: its DaemonSet is collected.
    tokio::time::timeout(
        TIMEOUT,
        await_condition(
            ds_api.clone(),
            &old_ds.name_any(),
            conditions::is_deleted(&old_ds.uid().unwrap()),
        ),
    )
    .await
    .expect("the v1 DaemonSet is collected")
    .unwrap();
}
