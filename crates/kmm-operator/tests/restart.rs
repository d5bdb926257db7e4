//! Tier 2: the operator is stopped in the middle of a rollout and a new one takes over; it
//! converges without duplicate worker pods and without losing status.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod};
use kmm_api::v1beta1::{Module, NodeModulesConfig};
use kmm_api::wire;
use kmm_operator::controllers::{self, ControllerConfig, ImageCheckMode};
use kmm_testenv::{FakeNode, TestEnv, WAIT_TIMEOUT, wait_for};
use kube::ResourceExt;
use kube::api::{Api, ListParams, PostParams};
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(90);

async fn operator(client: &kube::Client) -> tokio::task::JoinHandle<anyhow::Result<()>> {
    let config = ControllerConfig {
        worker_image: "registry.example/kmm-worker:test".into(),
        image_check: ImageCheckMode::PullPod,
        ..ControllerConfig::default()
    };
    let (ready_tx, mut ready_rx) = tokio::sync::watch::channel(false);
    let handle = tokio::spawn(controllers::run(client.clone(), config, ready_tx));
    tokio::time::timeout(WAIT_TIMEOUT, ready_rx.wait_for(|ready| *ready))
        .await
        .unwrap()
        .unwrap();
    handle
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_operator_converges_without_duplicates() {
    let env = TestEnv::get();
    let client = env.client().await.unwrap();
    let ns = env.namespace(&client, "restart").await.unwrap();
    let key = "test.kmm-rs.dev/restart";
    let nodes: Vec<String> = (0..3)
        .map(|i| env.unique_name(&format!("restart-{i}")))
        .collect();
    for node in &nodes {
        FakeNode::new(node, "6.1.0-56-amd64")
            .label(key, &ns)
            .create(&client)
            .await
            .unwrap();
    }
    let modules = Api::<Module>::namespaced(client.clone(), &ns);
    let module: Module = serde_json::from_value(json!({
        "metadata": {"name": "kmod"},
        "spec": {"selector": {key: &ns}, "moduleLoader": {"container": {
            "modprobe": {"moduleName": "kmm_ci_a"},
            "kernelMappings": [{"regexp": "^.+$", "containerImage": "registry.example/kmod:1"}]
        }}}
    }))
    .unwrap();

    let first = operator(&client).await;
    modules
        .create(&PostParams::default(), &module)
        .await
        .unwrap();
    // Stop the first operator as soon as the rollout has started on some node.
    let nmcs = Api::<NodeModulesConfig>::all(client.clone());
    wait_for(
        &nmcs,
        &nodes[0],
        TIMEOUT,
        "configured",
        |nmc: Option<&NodeModulesConfig>| nmc.is_some_and(|n| !n.spec.modules.is_empty()),
    )
    .await
    .unwrap();
    first.abort();
    let _ = first.await;

    let second = operator(&client).await;
    let node_api = Api::<Node>::all(client.clone());
    let ready = wire::module_ready_label(&ns, "kmod");
    for node in &nodes {
        let label = ready.clone();
        wait_for(
            &node_api,
            node,
            TIMEOUT,
            "loaded",
            move |n: Option<&Node>| n.is_some_and(|n| n.labels().contains_key(&label)),
        )
        .await
        .unwrap();
        let nmc = nmcs.get(node).await.unwrap();
        assert_eq!(nmc.spec.modules.len(), 1);
        assert_eq!(
            nmc.status.unwrap().modules.len(),
            1,
            "exactly one status entry on {node}"
        );
    }
    let module = wait_for(
        &modules,
        "kmod",
        TIMEOUT,
        "counted",
        |m: Option<&Module>| {
            m.and_then(|m| m.status.as_ref())
                .is_some_and(|s| s.module_loader.available_number == 3)
        },
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(module.status.unwrap().module_loader.desired_number, 3);
    let pods = Api::<Pod>::namespaced(client.clone(), &ns)
        .list(&ListParams::default().labels(wire::label::WORKER_ACTION))
        .await
        .unwrap();
    assert!(
        pods.items.is_empty(),
        "finished worker pods are gone: {:?}",
        pods.items
            .iter()
            .map(ResourceExt::name_any)
            .collect::<Vec<_>>()
    );
    second.abort();
}
