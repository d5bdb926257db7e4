//! Tier 2: `kmmctl explain` against the real control plane with the operator's reconcilers
//! running in-process (registry image checks against a real OCI registry on loopback): for each
//! way a module can fail to load that this operator version can produce, explain names the right
//! cause first; and it says "loaded" when it is.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ConfigMap, Node};
use kmm_api::v1beta1::Module;
use kmm_api::wire;
use kmm_operator::controllers::{self, ControllerConfig, ImageCheckMode};
use kmm_testenv::registry::{Registry, RegistryOptions};
use kmm_testenv::{FakeNode, TestEnv, WAIT_TIMEOUT, wait_for};
use kmmctl::explain::{NodeExplanation, NodeScope, NodeState, explain_module};
use kmmctl::gather::{Selection, observe};
use kube::ResourceExt;
use kube::api::{Api, PostParams};
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(90);
const KEY: &str = "test.kmm-rs.dev/explain";

fn start_operator() {
    static STARTED: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    STARTED.get_or_init(|| {
        let env = TestEnv::get();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let client = env.client().await.unwrap();
                let config = ControllerConfig {
                    worker_image: "registry.example/kmm-worker:test".into(),
                    image_check: ImageCheckMode::Registry,
                    ..ControllerConfig::default()
                };
                let (ready_tx, mut ready_rx) = tokio::sync::watch::channel(false);
                let operator = tokio::spawn(controllers::run(client, config, ready_tx));
                let _ = ready_rx.wait_for(|ready| *ready).await;
                tx.send(()).unwrap();
                let _ = operator.await;
            });
        });
        rx.recv_timeout(WAIT_TIMEOUT)
            .expect("the operator's caches did not sync");
    });
}

/// A Module in `ns` selecting `KEY=ns`, with one regexp mapping to `image` (plain HTTP).
fn module(name: &str, ns: &str, image: &str, extra: serde_json::Value) -> Module {
    let mut container = json!({
        "modprobe": {"moduleName": "kmm_ci_a"},
        "kernelMappings": [{"regexp": "^6\\.", "containerImage": image, "registryTLS": {"insecure": true}}]
    });
    if let (Some(target), Some(extra)) = (container.as_object_mut(), extra.as_object()) {
        for (k, v) in extra {
            target.insert(k.clone(), v.clone());
        }
    }
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"selector": {KEY: ns}, "moduleLoader": {"container": container}}
    }))
    .unwrap()
}

struct Case {
    client: kube::Client,
    ns: String,
}

impl Case {
    async fn new(prefix: &str) -> Self {
        let env = TestEnv::get();
        let client = env.client().await.unwrap();
        let ns = env.namespace(&client, prefix).await.unwrap();
        start_operator();
        Self { client, ns }
    }

    async fn node(&self, prefix: &str, kernel: &str, selected: bool) -> String {
        let name = TestEnv::get().unique_name(prefix);
        let mut node = FakeNode::new(&name, kernel);
        if selected {
            node = node.label(KEY, &self.ns);
        }
        node.create(&self.client).await.unwrap();
        name
    }

    async fn apply(&self, module: &Module) {
        Api::<Module>::namespaced(self.client.clone(), &self.ns)
            .create(&PostParams::default(), module)
            .await
            .unwrap();
    }

    /// Explains `module` on `node` until the cause is `reason`, or fails with the last
    /// explanation after the deadline.
    async fn explain_until(&self, module: &str, node: &str, reason: &str) -> NodeExplanation {
        let deadline = Instant::now() + TIMEOUT;
        let selection = Selection::One {
            namespace: self.ns.clone(),
            name: module.to_owned(),
        };
        loop {
            let observed = observe(&self.client, &selection).await.unwrap();
            let mut explanation = explain_module(&observed[0], &NodeScope::One(node.to_owned()));
            let on_node = explanation.nodes.remove(0);
            if on_node.cause.reason == reason {
                return on_node;
            }
            assert!(
                Instant::now() < deadline,
                "explain never said {reason} for {module} on {node}; last: {on_node:#?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_matching_mapping_names_the_kernel_and_every_mapping_tried() {
    let case = Case::new("ex-nomap").await;
    let node = case.node("ex-nomap", "5.14.0-284.el9.x86_64", true).await;
    let image = Registry::shared().image("kmod/a:1");
    case.apply(&module("kmod", &case.ns, &image, json!({})))
        .await;
    let e = case.explain_until("kmod", &node, "NoMatchingMapping").await;
    assert_eq!(e.state, NodeState::NotTargeted);
    assert!(
        e.cause.message.contains("5.14.0-284.el9.x86_64")
            && e.cause.message.contains(r#"regexp "^6\\.""#),
        "{}",
        e.cause.message
    );
    assert!(
        e.cause.fix.contains("literal: 5.14.0-284.el9.x86_64"),
        "{}",
        e.cause.fix
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_not_selected_says_which_label_to_add() {
    let case = Case::new("ex-nosel").await;
    let node = case.node("ex-nosel", "6.1.0-56-amd64", false).await;
    let image = Registry::shared().image("kmod/a:1");
    case.apply(&module("kmod", &case.ns, &image, json!({})))
        .await;
    let e = case.explain_until("kmod", &node, "NotSelected").await;
    assert_eq!(e.state, NodeState::NotTargeted);
    assert!(
        e.cause
            .fix
            .contains(&format!("kubectl label node {node} {KEY}={}", case.ns)),
        "{}",
        e.cause.fix
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tainted_node_names_the_taint() {
    let case = Case::new("ex-taint").await;
    let node = TestEnv::get().unique_name("ex-taint");
    FakeNode::new(&node, "6.1.0-56-amd64")
        .label(KEY, &case.ns)
        .taint("example.com/maintenance", "NoExecute")
        .create(&case.client)
        .await
        .unwrap();
    let image = Registry::shared().push_image("kmod/taint:1").await.unwrap();
    case.apply(&module("kmod", &case.ns, &image, json!({})))
        .await;
    let e = case.explain_until("kmod", &node, "Tainted").await;
    assert!(
        e.cause
            .message
            .contains("example.com/maintenance:NoExecute"),
        "{}",
        e.cause.message
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_and_unauthorized_images_are_named() {
    let case = Case::new("ex-image").await;
    let node = case.node("ex-image", "6.1.0-56-amd64", true).await;
    let private = Registry::start(RegistryOptions::default().basic_auth("kmm", "s3cret")).unwrap();
    private.push_image("kmod/present:1").await.unwrap();
    let missing = Registry::shared().image("kmod/absent:1");
    let denied = private.image("kmod/present:1");
    case.apply(&module("missing", &case.ns, &missing, json!({})))
        .await;
    case.apply(&module("denied", &case.ns, &denied, json!({})))
        .await;

    let e = case.explain_until("missing", &node, "ImageMissing").await;
    assert_eq!(e.state, NodeState::Failed);
    assert!(e.cause.message.contains(&missing), "{}", e.cause.message);
    assert_eq!(e.image_state, "missing");

    let e = case
        .explain_until("denied", &node, "ImageUnauthorized")
        .await;
    assert!(e.cause.message.contains(&denied), "{}", e.cause.message);
    assert!(
        e.cause.fix.contains("spec.imageRepoSecret"),
        "{}",
        e.cause.fix
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_build_is_named_with_the_pod_and_its_message() {
    let case = Case::new("ex-build").await;
    let node = case.node("ex-build", "6.1.0-56-amd64", true).await;
    let image = Registry::shared().image("kmod/tobuild:1");
    let dockerfile: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "dockerfile"},
        "data": {"dockerfile": "FROM debian:bookworm\nRUN false\n"}
    }))
    .unwrap();
    Api::<ConfigMap>::namespaced(case.client.clone(), &case.ns)
        .create(&PostParams::default(), &dockerfile)
        .await
        .unwrap();
    // kwok fails build pods with this build argument (testenv/README.md).
    let build = json!({"build": {
        "dockerfileConfigMap": {"name": "dockerfile"},
        "buildArgs": [{"name": "KMM_RS_TEST_OUTCOME", "value": "fail"}]
    }});
    case.apply(&module("kmod", &case.ns, &image, build)).await;
    let e = case.explain_until("kmod", &node, "BuildFailed").await;
    assert!(e.cause.message.contains(&image), "{}", e.cause.message);
    assert!(e.chain.iter().any(|s| s.check == "build"), "{e:#?}");
    assert_ne!(e.state, NodeState::Loaded);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_failure_shows_the_kernel_reason() {
    let case = Case::new("ex-load").await;
    let node = case.node("ex-load", "6.1.0-56-amd64", true).await;
    // kwok fails worker pods whose module image is under /kmm-rs-test-broken/ (testenv/README.md).
    let broken = Registry::shared()
        .push_image("kmm-rs-test-broken/kmod:explain")
        .await
        .unwrap();
    case.apply(&module("kmod", &case.ns, &broken, json!({})))
        .await;
    let e = case.explain_until("kmod", &node, "LoadFailed").await;
    assert_eq!(e.state, NodeState::Failed);
    assert!(
        e.cause.message.starts_with("UnknownSymbol: "),
        "{}",
        e.cause.message
    );
    assert!(
        e.cause.fix.contains("rebuild it against 6.1.0-56-amd64"),
        "{}",
        e.cause.fix
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordered_upgrade_without_the_version_label_says_which_label() {
    let case = Case::new("ex-version").await;
    let node = case.node("ex-version", "6.1.0-56-amd64", true).await;
    let image = Registry::shared()
        .push_image("kmod/version:1")
        .await
        .unwrap();
    case.apply(&module("kmod", &case.ns, &image, json!({"version": "1.0"})))
        .await;
    let e = case
        .explain_until("kmod", &node, "VersionLabelMissing")
        .await;
    assert_eq!(e.state, NodeState::NotTargeted);
    let label = wire::version_module_label(&case.ns, "kmod");
    assert!(
        e.cause
            .fix
            .contains(&format!("kubectl label node {node} {label}=1.0")),
        "{}",
        e.cause.fix
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loaded_module_is_said_loaded_by_explain_status_and_the_cli() {
    let case = Case::new("ex-loaded").await;
    let node = case.node("ex-loaded", "6.1.0-56-amd64", true).await;
    let image = Registry::shared()
        .push_image("kmod/loaded:1")
        .await
        .unwrap();
    case.apply(&module("kmod", &case.ns, &image, json!({})))
        .await;
    let ready = wire::module_ready_label(&case.ns, "kmod");
    wait_for(
        &Api::<Node>::all(case.client.clone()),
        &node,
        TIMEOUT,
        "labelled ready",
        move |n: Option<&Node>| n.is_some_and(|n| n.labels().contains_key(&ready)),
    )
    .await
    .unwrap();
    let e = case.explain_until("kmod", &node, "Loaded").await;
    assert_eq!(e.state, NodeState::Loaded);
    assert!(e.labelled);
    assert_eq!(e.image_state, "found");

    let env = TestEnv::get();
    let run = |args: &[&str]| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_kmmctl"))
            .args(args)
            .env("KUBECONFIG", &env.kubeconfig)
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        String::from_utf8(output.stdout).unwrap()
    };
    let text = run(&["explain", "-n", &case.ns, "kmod", "--node", &node]);
    assert!(
        text.contains(&format!("Node {node} (kernel 6.1.0-56-amd64): loaded")),
        "{text}"
    );
    let status = run(&["status", "-n", &case.ns, "-o", "json"]);
    let rows: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(rows[0]["state"], "loaded", "{status}");
    assert_eq!(rows[0]["node"], node.as_str());
}
