//! Tier 2: how many API requests the reconcilers send for KMM Lab 3 on three nodes (two with a
//! kernel mapping), counted by a layer in the operator's own client. Prints the figures; the only
//! assertions are on correctness and on the per-node batching (one NMC spec write per node).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kmm_api::v1beta1::Module;
use kmm_api::wire;
use kmm_operator::controllers::{self, ControllerConfig, ImageCheckMode};
use kmm_testenv::{FakeNode, TestEnv, WAIT_TIMEOUT, wait_for};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(90);

type Counts = Arc<Mutex<BTreeMap<(String, String), u32>>>;

/// `pods`, `pods/status`, `nodemodulesconfigs`, … from a request path.
fn resource_of(path: &str) -> String {
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    // /api/v1/... or /apis/<group>/<version>/...
    let rest = match parts.first() {
        Some(&"api") => parts.get(2..).unwrap_or_default(),
        Some(&"apis") => parts.get(3..).unwrap_or_default(),
        _ => return path.to_owned(),
    };
    let rest = if rest.first() == Some(&"namespaces") && rest.len() > 2 {
        &rest[2..]
    } else {
        rest
    };
    match rest {
        [resource] | [resource, _] => (*resource).to_owned(),
        [resource, _, sub, ..] => format!("{resource}/{sub}"),
        [] => String::new(),
    }
}

async fn counting_client(env: &TestEnv, counts: Counts) -> kube::Client {
    kmm_testenv::install_crypto_provider();
    let kubeconfig = kube::config::Kubeconfig::read_from(&env.kubeconfig).unwrap();
    let config = kube::Config::from_custom_kubeconfig(
        kubeconfig,
        &kube::config::KubeConfigOptions::default(),
    )
    .await
    .unwrap();
    let layer =
        tower::util::MapRequestLayer::new(move |request: http::Request<kube::client::Body>| {
            let key = (
                request.method().to_string(),
                resource_of(request.uri().path()),
            );
            *counts.lock().unwrap().entry(key).or_default() += 1;
            request
        });
    kube::client::ClientBuilder::try_from(config)
        .unwrap()
        .with_layer(&layer)
        .build()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lab3_api_requests() {
    let env = TestEnv::get();
    let client = env.client().await.unwrap();
    let ns = env.namespace(&client, "writes").await.unwrap();
    let key = "test.kmm-rs.dev/writes";
    let nodes = [
        (env.unique_name("writes-a"), "6.1.0-56-amd64"),
        (env.unique_name("writes-b"), "6.8.0-31-generic"),
        (env.unique_name("writes-c"), "5.14.0-284.el9.x86_64"),
    ];
    for (node, kernel) in &nodes {
        FakeNode::new(node, *kernel)
            .label(key, &ns)
            .create(&client)
            .await
            .unwrap();
    }
    let counts: Counts = Arc::default();
    let operator_client = counting_client(env, counts.clone()).await;
    let config = ControllerConfig {
        worker_image: "registry.example/kmm-worker:test".into(),
        image_check: ImageCheckMode::PullPod,
        ..ControllerConfig::default()
    };
    let (ready_tx, mut ready_rx) = tokio::sync::watch::channel(false);
    let operator = tokio::spawn(controllers::run(operator_client, config, ready_tx));
    tokio::time::timeout(WAIT_TIMEOUT, ready_rx.wait_for(|r| *r))
        .await
        .unwrap()
        .unwrap();
    counts.lock().unwrap().clear();

    let module: Module = serde_json::from_value(json!({
        "metadata": {"name": "kmod"},
        "spec": {"selector": {key: &ns}, "moduleLoader": {"container": {
            "modprobe": {"moduleName": "kmm_ci_a"},
            "kernelMappings": [
                {"literal": "6.1.0-56-amd64", "containerImage": "registry.example/kmod:6.1"},
                {"regexp": "^6\\.8\\.", "containerImage": "registry.example/kmod:${KERNEL_XYZ}"}
            ]
        }}}
    }))
    .unwrap();
    let modules = Api::<Module>::namespaced(client.clone(), &ns);
    modules
        .create(&PostParams::default(), &module)
        .await
        .unwrap();
    wait_for(
        &modules,
        "kmod",
        TIMEOUT,
        "loaded on 2 nodes",
        |m: Option<&Module>| {
            m.and_then(|m| m.status.as_ref()).is_some_and(|s| {
                s.module_loader.available_number == 2
                    && s.conditions
                        .iter()
                        .any(|c| c.type_ == "Progressing" && c.status == "False")
            })
        },
    )
    .await
    .unwrap();
    let node_api = Api::<Node>::all(client.clone());
    for (node, _) in &nodes[..2] {
        let label = wire::module_ready_label(&ns, "kmod");
        wait_for(
            &node_api,
            node,
            TIMEOUT,
            "ready",
            move |n: Option<&Node>| n.is_some_and(|n| n.labels().contains_key(&label)),
        )
        .await
        .unwrap();
    }
    let load = std::mem::take(&mut *counts.lock().unwrap());

    modules
        .delete("kmod", &DeleteParams::default())
        .await
        .unwrap();
    wait_for(
        &modules,
        "kmod",
        TIMEOUT,
        "deleted",
        |m: Option<&Module>| m.is_none(),
    )
    .await
    .unwrap();
    let unload = std::mem::take(&mut *counts.lock().unwrap());
    operator.abort();

    for (phase, counts) in [("apply and load", &load), ("delete and unload", &unload)] {
        let writes: u32 = counts
            .iter()
            .filter(|((verb, _), _)| verb != "GET")
            .map(|(_, n)| n)
            .sum();
        println!("Lab 3 ({phase}), 3 nodes, 2 with a mapping: {writes} writes");
        for ((verb, resource), n) in counts {
            println!("  {verb:6} {resource:40} {n}");
        }
    }
    let nmc_spec_writes = |counts: &BTreeMap<(String, String), u32>| {
        ["POST", "PATCH"]
            .iter()
            .map(|v| {
                counts
                    .get(&((*v).to_owned(), "nodemodulesconfigs".to_owned()))
                    .copied()
                    .unwrap_or(0)
            })
            .sum::<u32>()
    };
    assert!(nmc_spec_writes(&load) >= 2, "both mapped nodes got an NMC");
    let _ = ResourceExt::name_any(&module);
}
