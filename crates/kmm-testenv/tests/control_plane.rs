//! Tier-2 smoke tests: the real control plane starts, serves our CRDs with their schemas and CEL
//! rules, runs kwok nodes and pods with the outcomes tests ask for, garbage-collects, and
//! enforces RBAC.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

use std::path::Path;

use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kmm_api::v1beta1::Module;
use kmm_testenv::{FakeNode, TestEnv, WAIT_TIMEOUT, outcome, wait_for};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, DynamicObject, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::{Value, json};

#[tokio::test]
async fn crds_are_established() {
    let env = TestEnv::get();
    println!(
        "control plane up in {:.1} s (state in {})",
        env.startup_seconds,
        env.dir.display()
    );
    let client = env.client().await.unwrap();
    let api = Api::<CustomResourceDefinition>::all(client);
    for (_, crd) in kmm_api::crds::all().unwrap() {
        let name = crd.metadata.name.unwrap();
        let served = api.get(&name).await.unwrap();
        let established = served
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .into_iter()
            .any(|c| c.type_ == "Established" && c.status == "True");
        assert!(established, "{name} is not Established");
    }
}

fn module_api(client: &kube::Client, namespace: &str) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("kmm.sigs.x-k8s.io", "v1beta1", "Module");
    Api::namespaced_with(client.clone(), namespace, &ApiResource::from_gvk(&gvk))
}

/// Every Module of the KMM corpus, sent as written (server-side dry run), is accepted by the real
/// API server with our CRD, except those Go KMM's own schema rejects as well.
#[tokio::test]
async fn compat_modules_are_accepted_by_the_api_server() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/compat");
    if !corpus.is_dir() {
        println!("SKIPPED: {} is absent (a user's clone)", corpus.display());
        return;
    }
    let env = TestEnv::get();
    let client = env.client().await.unwrap();
    let namespace = env.namespace(&client, "compat").await.unwrap();
    let api = module_api(&client, &namespace);
    let dry_run = PostParams {
        dry_run: true,
        ..PostParams::default()
    };

    let mut files = Vec::new();
    collect_yaml(&corpus, &mut files);
    let (mut accepted, mut rejected_like_go, mut unexpected) = (0, Vec::new(), Vec::new());
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let Ok(docs) = serde_saphyr::from_multiple::<Value>(&text) else {
            continue;
        };
        for mut doc in docs {
            if doc.get("kind") != Some(&json!("Module")) {
                continue;
            }
            doc["metadata"]["namespace"] = json!(namespace);
            let object: DynamicObject = serde_json::from_value(doc.clone()).unwrap();
            let rel = file.strip_prefix(&corpus).unwrap().display().to_string();
            match api.create(&dry_run, &object).await {
                Ok(_) => accepted += 1,
                Err(kube::Error::Api(status)) if violates_go_schema(&doc) => {
                    rejected_like_go.push(format!("{rel}: {}", status.message));
                }
                Err(err) => unexpected.push(format!("{rel}: {err}")),
            }
        }
    }
    println!("compat Modules accepted by kube-apiserver: {accepted}");
    println!(
        "rejected, as Go KMM's schema rejects them too: {}",
        rejected_like_go.len()
    );
    for reason in &rejected_like_go {
        println!("  {reason}");
    }
    assert!(
        unexpected.is_empty(),
        "rejected by the API server:\n{}",
        unexpected.join("\n")
    );
    assert!(accepted >= 40, "only {accepted} accepted");
}

/// Go KMM's CRD requires `spec.selector`, `kernelMappings` (at least one) and `modprobe`.
fn violates_go_schema(doc: &Value) -> bool {
    let spec = &doc["spec"];
    let container = &spec["moduleLoader"]["container"];
    spec.get("selector").is_none()
        || (spec.get("moduleLoader").is_some()
            && (container["kernelMappings"]
                .as_array()
                .is_none_or(Vec::is_empty)
                || container.get("modprobe").is_none()))
}

fn collect_yaml(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            collect_yaml(&path, out);
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            out.push(path);
        }
    }
    out.sort();
}

#[tokio::test]
async fn cel_rule_rejects_dra_together_with_device_plugin() {
    let env = TestEnv::get();
    let client = env.client().await.unwrap();
    let namespace = env.namespace(&client, "cel").await.unwrap();
    let module: Module = serde_json::from_value(json!({
        "apiVersion": "kmm.sigs.x-k8s.io/v1beta1", "kind": "Module",
        "metadata": {"name": "both"},
        "spec": {
            "selector": {},
            "devicePlugin": {"container": {"image": "r/dp:1"}},
            "dra": {"driverName": "gpu.example.com", "container": {"image": "r/dra:1"}}
        }
    }))
    .unwrap();
    let api = Api::<Module>::namespaced(client, &namespace);
    let err = api
        .create(&PostParams::default(), &module)
        .await
        .unwrap_err();
    let kube::Error::Api(status) = err else {
        panic!("unexpected error {err}")
    };
    assert_eq!(status.code, 422);
    assert!(
        status
            .message
            .contains("spec.dra and spec.devicePlugin are mutually exclusive"),
        "{}",
        status.message
    );

    let mut ok = module.clone();
    ok.spec.dra = None;
    api.create(&PostParams::default(), &ok)
        .await
        .expect("a Module with only devicePlugin is accepted");
}

#[tokio::test]
async fn kwok_node_turns_ready_and_keeps_its_kernel() {
    let env = TestEnv::get();
    let client = env.client().await.unwrap();
    let name = env.unique_name("node");
    let node = FakeNode::new(&name, "6.8.0-31-generic")
        .label("feature.kmm.lab", "true")
        .create(&client)
        .await
        .unwrap();
    let info = node.status.unwrap().node_info.unwrap();
    assert_eq!(info.kernel_version, "6.8.0-31-generic");
    assert_eq!(node.metadata.labels.unwrap()["feature.kmm.lab"], "true");

    let upgraded = kmm_testenv::set_kernel(&client, &name, "6.8.0-40-generic", "boot-2")
        .await
        .unwrap();
    let info = upgraded.status.unwrap().node_info.unwrap();
    assert_eq!(
        (info.kernel_version.as_str(), info.boot_id.as_str()),
        ("6.8.0-40-generic", "boot-2")
    );
    Api::<Node>::all(client)
        .delete(&name, &DeleteParams::default())
        .await
        .unwrap();
}

fn pod(name: &str, node: &str, restart_policy: &str, annotations: &[(&str, &str)]) -> Pod {
    serde_json::from_value(json!({
        "metadata": {
            "name": name,
            "annotations": annotations.iter().map(|(k, v)| ((*k).to_owned(), json!(v))).collect::<serde_json::Map<_, _>>()
        },
        "spec": {
            "nodeName": node,
            "restartPolicy": restart_policy,
            "containers": [{"name": "main", "image": "registry.example/kmod:1"}]
        }
    }))
    .unwrap()
}

fn phase(pod: Option<&Pod>) -> Option<String> {
    pod.and_then(|p| p.status.as_ref())
        .and_then(|s| s.phase.clone())
}

#[tokio::test]
async fn pods_on_kwok_nodes_end_as_the_test_asks() {
    let env = TestEnv::get();
    let client = env.client().await.unwrap();
    let namespace = env.namespace(&client, "pods").await.unwrap();
    let node = env.unique_name("pod-node");
    FakeNode::new(&node, "6.1.0-56-amd64")
        .create(&client)
        .await
        .unwrap();
    let api = Api::<Pod>::namespaced(client.clone(), &namespace);
    let create = |p: Pod| {
        let api = api.clone();
        async move { api.create(&PostParams::default(), &p).await.unwrap() }
    };

    create(pod("ok", &node, "Never", &[])).await;
    let message = "SignatureRejected: Key was rejected by service";
    create(pod(
        "fails",
        &node,
        "Never",
        &[
            (outcome::OUTCOME, outcome::FAIL),
            (outcome::MESSAGE, message),
        ],
    ))
    .await;
    create(pod(
        "crashes",
        &node,
        "OnFailure",
        &[
            (outcome::OUTCOME, outcome::FAIL),
            (outcome::MESSAGE, message),
        ],
    ))
    .await;
    create(pod(
        "no-image",
        &node,
        "Never",
        &[(outcome::OUTCOME, outcome::IMAGE_PULL_BACKOFF)],
    ))
    .await;

    let ok = wait_for(&api, "ok", WAIT_TIMEOUT, "Succeeded", |p: Option<&Pod>| {
        phase(p).as_deref() == Some("Succeeded")
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(ok.spec.unwrap().node_name.as_deref(), Some(node.as_str()));

    let failed = wait_for(&api, "fails", WAIT_TIMEOUT, "Failed", |p: Option<&Pod>| {
        phase(p).as_deref() == Some("Failed")
    })
    .await
    .unwrap()
    .unwrap();
    let terminated = failed.status.unwrap().container_statuses.unwrap()[0]
        .state
        .clone()
        .unwrap()
        .terminated
        .unwrap();
    assert_eq!(terminated.message.as_deref(), Some(message));
    assert_ne!(terminated.exit_code, 0);

    let restarted = |p: Option<&Pod>| {
        p.and_then(|p| p.status.as_ref())
            .and_then(|s| s.container_statuses.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.restart_count > 0))
    };
    let crashing = wait_for(&api, "crashes", WAIT_TIMEOUT, "restarted", restarted)
        .await
        .unwrap()
        .unwrap();
    let status = crashing.status.unwrap();
    assert_eq!(
        status.phase.as_deref(),
        Some("Running"),
        "OnFailure restarts in place, like a kubelet"
    );
    let last = status.container_statuses.unwrap()[0]
        .last_state
        .clone()
        .unwrap()
        .terminated
        .unwrap();
    assert_eq!(last.message.as_deref(), Some(message));

    let waiting_reason = |p: Option<&Pod>| {
        p.and_then(|p| p.status.as_ref())
            .and_then(|s| s.container_statuses.as_ref())
            .and_then(|cs| cs.first())
            .and_then(|c| c.state.as_ref())
            .and_then(|s| s.waiting.as_ref())
            .and_then(|w| w.reason.clone())
    };
    let pending = wait_for(
        &api,
        "no-image",
        WAIT_TIMEOUT,
        "in ImagePullBackOff",
        move |p: Option<&Pod>| waiting_reason(p).as_deref() == Some("ImagePullBackOff"),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(pending.status.unwrap().phase.as_deref(), Some("Pending"));
    Api::<Node>::all(client)
        .delete(&node, &DeleteParams::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn deleting_an_owner_garbage_collects_its_child() {
    let env = TestEnv::get();
    let client = env.client().await.unwrap();
    let namespace = env.namespace(&client, "gc").await.unwrap();
    let api = Api::<ConfigMap>::namespaced(client, &namespace);
    let owner = api
        .create(
            &PostParams::default(),
            &ConfigMap {
                metadata: kube::api::ObjectMeta {
                    name: Some("owner".into()),
                    ..Default::default()
                },
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let child: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "child", "ownerReferences": [{
            "apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner.uid().unwrap()
        }]},
        "data": {"k": "v"}
    }))
    .unwrap();
    api.create(&PostParams::default(), &child).await.unwrap();
    api.delete("owner", &DeleteParams::default()).await.unwrap();
    wait_for(
        &api,
        "child",
        WAIT_TIMEOUT,
        "garbage-collected",
        |c: Option<&ConfigMap>| c.is_none(),
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn a_service_account_without_rights_is_denied() {
    let env = TestEnv::get();
    let admin = env.client().await.unwrap();
    let namespace = env.namespace(&admin, "rbac").await.unwrap();
    let sa: ServiceAccount =
        serde_json::from_value(json!({"metadata": {"name": "nobody"}})).unwrap();
    Api::<ServiceAccount>::namespaced(admin.clone(), &namespace)
        .create(&PostParams::default(), &sa)
        .await
        .unwrap();

    let kubeconfig = kube::config::Kubeconfig::read_from(&env.kubeconfig).unwrap();
    let mut config = kube::Config::from_custom_kubeconfig(
        kubeconfig,
        &kube::config::KubeConfigOptions::default(),
    )
    .await
    .unwrap();
    config.auth_info.impersonate = Some(format!("system:serviceaccount:{namespace}:nobody"));
    let nobody = kube::Client::try_from(config).unwrap();
    let err = Api::<Pod>::namespaced(nobody, &namespace)
        .list(&Default::default())
        .await
        .unwrap_err();
    let kube::Error::Api(status) = err else {
        panic!("unexpected error {err}")
    };
    assert_eq!(status.code, 403, "{}", status.message);
}
