//! Tier 2: ordered upgrade (spec §4.10) against the real control plane. The administrator moves
//! one node at a time to a new module version with the `version-module` label; the operator
//! unloads the old version there before loading the new one and leaves other nodes alone.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

mod common;

use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kmm_api::v1beta1::{Module, NodeModulesConfig};
use kmm_api::wire;
use kmm_operator::controllers::ImageCheckMode;
use kmm_testenv::{FakeNode, TestEnv, wait_for};
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(90);

fn versioned_module(name: &str, selector: (&str, &str), version: &str, image: &str) -> Module {
    serde_json::from_value(json!({
        "apiVersion": "kmm.sigs.x-k8s.io/v1beta1", "kind": "Module",
        "metadata": {"name": name},
        "spec": {
            "selector": {selector.0: selector.1},
            "moduleLoader": {"container": {
                "version": version,
                "modprobe": {"moduleName": "kmm_ci_a"},
                "kernelMappings": [{"regexp": "^.+$", "containerImage": image}]
            }}
        }
    }))
    .unwrap()
}

/// The version labels of one module on a node, in the order W, `.ready`, `.version.ready`, S
/// (`None` = absent).
type Versions = [Option<String>; 4];

fn versions(node: &Node, ns: &str, module: &str) -> Versions {
    let labels = node.labels();
    [
        wire::version_worker_pod_label(ns, module),
        wire::module_ready_label(ns, module),
        wire::module_version_ready_label(ns, module),
        wire::version_schedule_pod_label(ns, module),
    ]
    .map(|key| labels.get(&key).cloned())
}

fn state(w: &str, ready: bool, version_ready: &str, s: &str) -> Versions {
    let opt = |v: &str| (!v.is_empty()).then(|| v.to_owned());
    [opt(w), ready.then(String::new), opt(version_ready), opt(s)]
}

/// Every distinct version state `node` goes through, from now on.
fn watch_versions(
    client: &kube::Client,
    node: &str,
    ns: &str,
    module: &str,
) -> tokio::sync::mpsc::UnboundedReceiver<Versions> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let config = watcher::Config::default().fields(&format!("metadata.name={node}"));
    let stream = watcher(Api::<Node>::all(client.clone()), config).applied_objects();
    let (ns, module) = (ns.to_owned(), module.to_owned());
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        let mut last = None;
        while let Some(Ok(node)) = stream.next().await {
            let now = versions(&node, &ns, &module);
            if last.as_ref() != Some(&now) {
                last = Some(now.clone());
                if tx.send(now).is_err() {
                    return;
                }
            }
        }
    });
    rx
}

/// Collects states until `last` is reached.
async fn history_until(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<Versions>,
    last: &Versions,
) -> Vec<Versions> {
    let mut seen = Vec::new();
    while seen.last() != Some(last) {
        match tokio::time::timeout(TIMEOUT, rx.recv()).await {
            Ok(Some(state)) => seen.push(state),
            _ => panic!("never reached {last:?}; went through {seen:#?}"),
        }
    }
    seen
}

fn is_subsequence(expected: &[Versions], seen: &[Versions]) -> bool {
    let mut seen = seen.iter();
    expected.iter().all(|e| seen.any(|s| s == e))
}

async fn label_node(nodes: &Api<Node>, node: &str, key: &str, value: &str) {
    nodes
        .patch(
            node,
            &PatchParams::default(),
            &Patch::Merge(&json!({"metadata": {"labels": {key: value}}})),
        )
        .await
        .unwrap();
}

async fn loaded_image(nmcs: &Api<NodeModulesConfig>, node: &str) -> Option<String> {
    nmcs.get(node)
        .await
        .unwrap()
        .status
        .and_then(|s| s.modules.into_iter().next())
        .and_then(|m| m.config)
        .map(|c| c.container_image)
}

#[tokio::test]
async fn relabelled_node_unloads_the_old_version_before_loading_the_new_one() {
    let env = TestEnv::get();
    let client = env.client().await.unwrap();
    let ns = env.namespace(&client, "upgrade").await.unwrap();
    let selector = "test.kmm-rs.dev/ordered-upgrade";
    let user_label = wire::version_module_label(&ns, "kmod");
    let (a, b) = (env.unique_name("upgrade-a"), env.unique_name("upgrade-b"));
    for node in [&a, &b] {
        FakeNode::new(node, "6.1.0-56-amd64")
            .label(selector, &ns)
            .label(&user_label, "v1")
            .create(&client)
            .await
            .unwrap();
    }
    common::start_shared_operator(common::test_controller_config(ImageCheckMode::PullPod));

    let nodes = Api::<Node>::all(client.clone());
    let nmcs = Api::<NodeModulesConfig>::all(client.clone());
    let modules = Api::<Module>::namespaced(client.clone(), &ns);
    modules
        .create(
            &PostParams::default(),
            &versioned_module("kmod", (selector, &ns), "v1", "registry.example/kmod:v1"),
        )
        .await
        .unwrap();

    // v1 everywhere: W and S, then load.
    let v1_done = state("v1", true, "v1", "v1");
    for node in [&a, &b] {
        let (ns, want) = (ns.clone(), v1_done.clone());
        wait_for(&nodes, node, TIMEOUT, "at v1", move |n: Option<&Node>| {
            n.is_some_and(|n| versions(n, &ns, "kmod") == want)
        })
        .await
        .unwrap();
        assert_eq!(
            loaded_image(&nmcs, node).await.as_deref(),
            Some("registry.example/kmod:v1")
        );
    }

    // The Module moves to v2: nothing changes until a node is relabelled.
    let mut history = watch_versions(&client, &a, &ns, "kmod");
    assert_eq!(history.recv().await.unwrap(), v1_done);
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
    wait_for(
        &modules,
        "kmod",
        TIMEOUT,
        "reconciled at v2",
        |m: Option<&Module>| {
            m.and_then(|m| m.status.as_ref())
                .is_some_and(|s| s.module_loader.available_number == 2)
        },
    )
    .await
    .unwrap();
    for node in [&a, &b] {
        assert_eq!(
            versions(&nodes.get(node).await.unwrap(), &ns, "kmod"),
            v1_done
        );
        assert_eq!(
            loaded_image(&nmcs, node).await.as_deref(),
            Some("registry.example/kmod:v1"),
            "{node} keeps v1 until relabelled"
        );
    }

    // Relabel node a: S off, W off, unload, W=v2, S=v2, load v2.
    label_node(&nodes, &a, &user_label, "v2").await;
    let v2_done = state("v2", true, "v2", "v2");
    let seen = history_until(&mut history, &v2_done).await;
    let expected = [
        state("v1", true, "v1", ""),
        state("", true, "v1", ""),
        state("", false, "", ""),
        state("v2", false, "", ""),
        // S follows W at once (Go KMM's table); the device plugin still waits for `.ready`.
        state("v2", false, "", "v2"),
        v2_done.clone(),
    ];
    assert!(is_subsequence(&expected, &seen), "{seen:#?}");
    assert_eq!(
        loaded_image(&nmcs, &a).await.as_deref(),
        Some("registry.example/kmod:v2")
    );
    let entry = nmcs.get(&a).await.unwrap().spec.modules.remove(0);
    assert_eq!(entry.item.version, "v2");

    // Node b still runs v1, then follows once relabelled.
    assert_eq!(
        versions(&nodes.get(&b).await.unwrap(), &ns, "kmod"),
        v1_done
    );
    assert_eq!(
        loaded_image(&nmcs, &b).await.as_deref(),
        Some("registry.example/kmod:v1")
    );
    label_node(&nodes, &b, &user_label, "v2").await;
    let ns_b = ns.clone();
    wait_for(&nodes, &b, TIMEOUT, "at v2", move |n: Option<&Node>| {
        n.is_some_and(|n| versions(n, &ns_b, "kmod") == v2_done)
    })
    .await
    .unwrap();
    assert_eq!(
        loaded_image(&nmcs, &b).await.as_deref(),
        Some("registry.example/kmod:v2")
    );
}
