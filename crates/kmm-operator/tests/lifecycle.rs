//! Tier 2: the pre-built image lifecycle (KMM Lab 3) against the real control plane, with the
//! reconcilers running in-process and kwok playing the nodes and the worker pods.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

mod common;

use std::time::Duration;

use k8s_openapi::api::core::v1::{Event, Node, Pod};
use kmm_api::v1beta1::{Module, NodeModulesConfig};
use kmm_api::wire;
use kmm_operator::controllers::ImageCheckMode;
use kmm_testenv::{FakeNode, TestEnv, wait_for};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(90);

fn start_operator() {
    common::start_shared_operator(common::test_controller_config(ImageCheckMode::PullPod));
}

fn lab3_module(name: &str, selector_key: &str, selector_value: &str) -> Module {
    serde_json::from_value(json!({
        "apiVersion": "kmm.sigs.x-k8s.io/v1beta1", "kind": "Module",
        "metadata": {"name": name},
        "spec": {
            "selector": {selector_key: selector_value},
            "moduleLoader": {"container": {
                "modprobe": {"moduleName": "kmm_ci_a"},
                "kernelMappings": [
                    {"literal": "6.1.0-56-amd64", "containerImage": "registry.example/kmod:6.1"},
                    {"regexp": "^6\\.8\\.", "containerImage": "registry.example/kmod:${KERNEL_XYZ}"}
                ]
            }}
        }
    }))
    .unwrap()
}

fn has_label(key: String) -> impl Fn(Option<&Node>) -> bool {
    move |node| node.is_some_and(|n| n.labels().contains_key(&key))
}

fn lacks_label(key: String) -> impl Fn(Option<&Node>) -> bool {
    move |node| node.is_some_and(|n| !n.labels().contains_key(&key))
}

#[tokio::test]
async fn lab3_prebuilt_image_loads_where_a_mapping_matches_and_unloads_on_delete() {
    let env = TestEnv::get();
    let client = env.client().await.unwrap();
    let ns = env.namespace(&client, "lab3").await.unwrap();
    let selector_key = "test.kmm-rs.dev/lab3";
    let a = env.unique_name("lab3-a");
    let b = env.unique_name("lab3-b");
    let c = env.unique_name("lab3-c");
    for (node, kernel) in [
        (&a, "6.1.0-56-amd64"),
        (&b, "6.8.0-31-generic"),
        (&c, "5.14.0-284.el9.x86_64"),
    ] {
        FakeNode::new(node, kernel)
            .label(selector_key, &ns)
            .create(&client)
            .await
            .unwrap();
    }
    start_operator();

    let modules = Api::<Module>::namespaced(client.clone(), &ns);
    modules
        .create(
            &PostParams::default(),
            &lab3_module("kmod", selector_key, &ns),
        )
        .await
        .unwrap();

    // Loaded on the two nodes whose kernel has a mapping.
    let nodes = Api::<Node>::all(client.clone());
    let ready = wire::module_ready_label(&ns, "kmod");
    for node in [&a, &b] {
        wait_for(
            &nodes,
            node,
            TIMEOUT,
            "labelled ready",
            has_label(ready.clone()),
        )
        .await
        .unwrap();
    }
    let nmcs = Api::<NodeModulesConfig>::all(client.clone());
    let nmc_b = nmcs.get(&b).await.unwrap();
    let entry = &nmc_b.spec.modules[0];
    assert_eq!(entry.config.container_image, "registry.example/kmod:6.8.0");
    assert_eq!(entry.config.kernel_version, "6.8.0-31-generic");
    assert!(
        nmc_b
            .labels()
            .contains_key(&wire::module_configured_label(&ns, "kmod"))
    );
    assert!(
        nmc_b
            .labels()
            .contains_key(&wire::module_in_use_label(&ns, "kmod"))
    );
    let loaded = &nmc_b.status.as_ref().unwrap().modules[0];
    assert_eq!(loaded.config.as_ref(), Some(&entry.config));
    assert_eq!(loaded.boot_id, format!("{b}-boot-1"));
    assert!(
        nmcs.get_opt(&c).await.unwrap().is_none(),
        "no NMC for the node without a mapping"
    );
    assert!(!nodes.get(&c).await.unwrap().labels().contains_key(&ready));

    // Status counts and a condition that names the node and kernel without a mapping.
    let module = wait_for(
        &modules,
        "kmod",
        TIMEOUT,
        "counted",
        |m: Option<&Module>| {
            m.and_then(|m| m.status.as_ref())
                .is_some_and(|s| s.module_loader.available_number == 2)
        },
    )
    .await
    .unwrap()
    .unwrap();
    let status = module.status.unwrap();
    assert_eq!(status.module_loader.nodes_matching_selector_number, 3);
    assert_eq!(status.module_loader.desired_number, 2);
    let degraded = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Degraded")
        .unwrap();
    assert_eq!(degraded.reason, "NoMatchingMapping");
    assert!(
        degraded.message.contains(&c) && degraded.message.contains("5.14.0-284.el9.x86_64"),
        "{}",
        degraded.message
    );
    assert!(
        module
            .metadata
            .finalizers
            .unwrap()
            .contains(&wire::finalizer::MODULE.to_owned())
    );

    // Events on the nodes.
    let events = Api::<Event>::all(client.clone())
        .list(&ListParams::default().fields(&format!("involvedObject.name={a}")))
        .await
        .unwrap();
    assert!(
        events
            .items
            .iter()
            .any(|e| e.reason.as_deref() == Some("ModuleLoaded")
                && e.message.as_deref()
                    == Some(&format!("Module {ns}/kmod loaded into the kernel"))),
        "{:?}",
        events
            .items
            .iter()
            .map(|e| (&e.reason, &e.message))
            .collect::<Vec<_>>()
    );

    // Delete: unload everywhere, labels removed, finalizer released, Module gone.
    modules
        .delete("kmod", &DeleteParams::default())
        .await
        .unwrap();
    for node in [&a, &b] {
        wait_for(
            &nodes,
            node,
            TIMEOUT,
            "unlabelled",
            lacks_label(ready.clone()),
        )
        .await
        .unwrap();
    }
    wait_for(
        &modules,
        "kmod",
        TIMEOUT,
        "deleted",
        |m: Option<&Module>| m.is_none(),
    )
    .await
    .unwrap();
    let nmc_a = nmcs.get(&a).await.unwrap();
    assert!(nmc_a.spec.modules.is_empty());
    assert!(nmc_a.status.as_ref().is_none_or(|s| s.modules.is_empty()));
    assert!(
        !nmc_a
            .labels()
            .contains_key(&wire::module_in_use_label(&ns, "kmod"))
    );
    let leftover: Vec<Pod> = Api::<Pod>::namespaced(client.clone(), &ns)
        .list(&ListParams::default().labels(wire::label::WORKER_ACTION))
        .await
        .unwrap()
        .items;
    assert!(
        leftover.is_empty(),
        "{:?}",
        leftover
            .iter()
            .map(ResourceExt::name_any)
            .collect::<Vec<_>>()
    );
}

fn module_with_image(name: &str, selector_key: &str, selector_value: &str, image: &str) -> Module {
    serde_json::from_value(json!({
        "apiVersion": "kmm.sigs.x-k8s.io/v1beta1", "kind": "Module",
        "metadata": {"name": name},
        "spec": {
            "selector": {selector_key: selector_value},
            "moduleLoader": {"container": {
                "modprobe": {"moduleName": "kmm_ci_a"},
                "kernelMappings": [{"regexp": "^.+$", "containerImage": image}]
            }}
        }
    }))
    .unwrap()
}

/// The config the module is loaded with on `node`, once it equals the spec (fully rolled out).
async fn wait_loaded_image(
    nmcs: &Api<NodeModulesConfig>,
    node: &str,
    ns: &str,
    module: &str,
    image: &str,
) -> NodeModulesConfig {
    let (ns, module, image) = (ns.to_owned(), module.to_owned(), image.to_owned());
    wait_for(
        nmcs,
        node,
        TIMEOUT,
        &format!("loaded with {image}"),
        move |nmc: Option<&NodeModulesConfig>| {
            nmc.and_then(|n| n.status.as_ref()).is_some_and(|s| {
                s.modules.iter().any(|m| {
                    m.item.namespace == ns
                        && m.item.name == module
                        && m.config
                            .as_ref()
                            .is_some_and(|c| c.container_image == image)
                })
            })
        },
    )
    .await
    .unwrap()
    .unwrap()
}

async fn node_event_reasons(client: &kube::Client, node: &str) -> Vec<String> {
    Api::<Event>::all(client.clone())
        .list(&ListParams::default().fields(&format!("involvedObject.name={node}")))
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|e| e.reason)
        .collect()
}

#[tokio::test]
async fn image_change_unloads_the_old_module_then_loads_the_new_one() {
    let env = TestEnv::get();
    let client = env.client().await.unwrap();
    let ns = env.namespace(&client, "image-change").await.unwrap();
    let key = "test.kmm-rs.dev/image-change";
    let node = env.unique_name("image-change");
    FakeNode::new(&node, "6.1.0-56-amd64")
        .label(key, &ns)
        .create(&client)
        .await
        .unwrap();
    start_operator();
    let modules = Api::<Module>::namespaced(client.clone(), &ns);
    let nmcs = Api::<NodeModulesConfig>::all(client.clone());
    modules
        .create(
            &PostParams::default(),
            &module_with_image("kmod", key, &ns, "registry.example/kmod:v1"),
        )
        .await
        .unwrap();
    wait_loaded_image(&nmcs, &node, &ns, "kmod", "registry.example/kmod:v1").await;

    let patch = json!({"spec": {"moduleLoader": {"container": {"kernelMappings": [
        {"regexp": "^.+$", "containerImage": "registry.example/kmod:v2"}
    ]}}}});
    modules
        .patch(
            "kmod",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&patch),
        )
        .await
        .unwrap();
    let nmc = wait_loaded_image(&nmcs, &node, &ns, "kmod", "registry.example/kmod:v2").await;
    assert_eq!(nmc.status.unwrap().modules.len(), 1);
    let reasons = node_event_reasons(&client, &node).await;
    assert!(
        reasons.iter().any(|r| r == "ModuleUnloaded"),
        "the v1 module was unloaded first: {reasons:?}"
    );
    let nodes = Api::<Node>::all(client.clone());
    wait_for(
        &nodes,
        &node,
        TIMEOUT,
        "ready again",
        has_label(wire::module_ready_label(&ns, "kmod")),
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn kernel_upgrade_reboot_cordon_and_node_deletion() {
    let env = TestEnv::get();
    let client = env.client().await.unwrap();
    let ns = env.namespace(&client, "node-life").await.unwrap();
    let key = "test.kmm-rs.dev/node-life";
    let node = env.unique_name("node-life");
    FakeNode::new(&node, "6.1.0-56-amd64")
        .label(key, &ns)
        .create(&client)
        .await
        .unwrap();
    start_operator();
    let modules = Api::<Module>::namespaced(client.clone(), &ns);
    let nmcs = Api::<NodeModulesConfig>::all(client.clone());
    let nodes = Api::<Node>::all(client.clone());
    let image = "registry.example/kmod:${KERNEL_FULL_VERSION}";
    modules
        .create(
            &PostParams::default(),
            &module_with_image("kmod", key, &ns, image),
        )
        .await
        .unwrap();
    wait_loaded_image(
        &nmcs,
        &node,
        &ns,
        "kmod",
        "registry.example/kmod:6.1.0-56-amd64",
    )
    .await;

    // Kernel upgrade (the node reboots into a new kernel): the new kernel's image is loaded.
    kmm_testenv::set_kernel(&client, &node, "6.1.0-57-amd64", "boot-2")
        .await
        .unwrap();
    let nmc = wait_loaded_image(
        &nmcs,
        &node,
        &ns,
        "kmod",
        "registry.example/kmod:6.1.0-57-amd64",
    )
    .await;
    let loaded = &nmc.status.unwrap().modules[0];
    assert_eq!(
        loaded.config.as_ref().unwrap().kernel_version,
        "6.1.0-57-amd64"
    );
    assert_eq!(loaded.boot_id, "boot-2");

    // Reboot on the same kernel: reloaded, with the new boot ID recorded.
    kmm_testenv::reboot_node(&client, &node, "boot-3")
        .await
        .unwrap();
    wait_for(
        &nmcs,
        &node,
        TIMEOUT,
        "reloaded after the reboot",
        |nmc: Option<&NodeModulesConfig>| {
            nmc.and_then(|n| n.status.as_ref())
                .is_some_and(|s| s.modules.iter().any(|m| m.boot_id == "boot-3"))
        },
    )
    .await
    .unwrap();

    // Cordon: the module stays loaded and labelled.
    let cordon = json!({"spec": {"unschedulable": true, "taints": [
        {"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"}
    ]}});
    nodes
        .patch(
            &node,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&cordon),
        )
        .await
        .unwrap();
    // Let the reconcilers see the cordon: wait until the Module status counts it as not
    // matching, which happens in the same pass that would unload it.
    let counted = wait_for(
        &modules,
        "kmod",
        TIMEOUT,
        "recounted",
        |m: Option<&Module>| {
            m.and_then(|m| m.status.as_ref())
                .is_some_and(|s| s.module_loader.nodes_matching_selector_number == 0)
        },
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(
        counted.status.unwrap().module_loader.available_number,
        1,
        "still loaded while cordoned"
    );
    let nmc = nmcs.get(&node).await.unwrap();
    assert_eq!(nmc.spec.modules.len(), 1, "the cordon keeps the NMC entry");
    assert!(
        nodes
            .get(&node)
            .await
            .unwrap()
            .labels()
            .contains_key(&wire::module_ready_label(&ns, "kmod"))
    );

    // Node deleted: its NMC is garbage-collected with it.
    nodes.delete(&node, &DeleteParams::default()).await.unwrap();
    wait_for(
        &nmcs,
        &node,
        TIMEOUT,
        "garbage-collected",
        |nmc: Option<&NodeModulesConfig>| nmc.is_none(),
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn invalid_module_is_reported_and_a_valid_neighbour_still_loads() {
    let env = TestEnv::get();
    let client = env.client().await.unwrap();
    let ns = env.namespace(&client, "invalid").await.unwrap();
    let key = "test.kmm-rs.dev/invalid";
    let node = env.unique_name("invalid");
    FakeNode::new(&node, "6.1.0-56-amd64")
        .label(key, &ns)
        .create(&client)
        .await
        .unwrap();
    start_operator();
    let modules = Api::<Module>::namespaced(client.clone(), &ns);
    let mut bad = module_with_image("bad", key, &ns, "registry.example/kmod:v1");
    bad.spec
        .module_loader
        .as_mut()
        .unwrap()
        .container
        .kernel_mappings[0]
        .regexp = "(".into();
    modules.create(&PostParams::default(), &bad).await.unwrap();
    modules
        .create(
            &PostParams::default(),
            &module_with_image("good", key, &ns, "registry.example/kmod:v1"),
        )
        .await
        .unwrap();

    let nmcs = Api::<NodeModulesConfig>::all(client.clone());
    wait_loaded_image(&nmcs, &node, &ns, "good", "registry.example/kmod:v1").await;
    let bad = wait_for(
        &modules,
        "bad",
        TIMEOUT,
        "reported invalid",
        |m: Option<&Module>| {
            m.and_then(|m| m.status.as_ref())
                .is_some_and(|s| s.conditions.iter().any(|c| c.reason == "InvalidSpec"))
        },
    )
    .await
    .unwrap()
    .unwrap();
    let degraded = bad
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Degraded")
        .unwrap();
    assert!(
        degraded.message.contains("kernelMappings[0]")
            && degraded.message.contains("invalid regexp"),
        "{}",
        degraded.message
    );
    let events = Api::<Event>::namespaced(client.clone(), &ns)
        .list(&ListParams::default().fields("involvedObject.name=bad"))
        .await
        .unwrap();
    assert!(events.items.iter().any(
        |e| e.reason.as_deref() == Some("InvalidSpec") && e.type_.as_deref() == Some("Warning")
    ));
    let nmc = nmcs.get(&node).await.unwrap();
    assert!(
        nmc.spec.modules.iter().all(|m| m.item.name != "bad"),
        "the invalid Module touches no node"
    );
}
