//! Tier 2: in-cluster build and signing on Kubernetes (KMM Labs 1 and 2, build + sign, build
//! failures, bad inputs) with every reconciler running in-process against the real control plane.
//! kwok plays the nodes and runs the kaniko pods: they succeed, or fail when a container argument
//! contains `KMM_RS_TEST_OUTCOME=fail` (here: a build argument). Images under
//! `/kmm-rs-test-missing/` do not exist (their pull pods back off), so they must be built.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Event, Node, Pod, Secret};
use kmm_api::v1beta1::{Module, ModuleBuildSignConfig};
use kmm_api::wire;
use kmm_operator::controllers::{self, ControllerConfig, ImageCheckMode};
use kmm_testenv::{FakeNode, TestEnv, WAIT_TIMEOUT, wait_for};
use kube::ResourceExt;
use kube::api::{Api, ListParams, Patch, PatchParams};
use serde_json::{Value, json};

const TIMEOUT: Duration = Duration::from_secs(90);
/// Successful build and sign pods are kept this long after their deletion, so that tests can
/// read them (and see the GC delay at work).
const GC_DELAY: Duration = Duration::from_secs(15);
const KERNEL: &str = "6.1.0-56-amd64";
const DNS_KERNEL: &str = "6-1-0-56-amd64";

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
                    build_image: "registry.example/kaniko:test".into(),
                    sign_image: "registry.example/signimage:test".into(),
                    image_check: ImageCheckMode::PullPod,
                    job_gc_delay: GC_DELAY,
                    ..ControllerConfig::default()
                };
                let (ready_tx, mut ready_rx) = tokio::sync::watch::channel(false);
                let operator = tokio::spawn(controllers::run(client, config, ready_tx));
                let _ = ready_rx.wait_for(|ready| *ready).await;
                tx.send(()).unwrap();
                match operator.await {
                    Ok(Ok(())) => {}
                    Ok(Err(err)) => panic!("controllers stopped: {err:#}"),
                    Err(err) => panic!("controllers panicked: {err}"),
                }
            });
        });
        rx.recv_timeout(WAIT_TIMEOUT)
            .expect("the operator's caches did not sync");
    });
}

struct Lab {
    client: kube::Client,
    ns: String,
    selector: String,
}

impl Lab {
    async fn new(prefix: &str) -> Lab {
        let env = TestEnv::get();
        let client = env.client().await.unwrap();
        let ns = env.namespace(&client, prefix).await.unwrap();
        start_operator();
        Lab {
            client,
            ns,
            selector: "test.kmm-rs.dev/buildsign".into(),
        }
    }

    /// A node with `kernel`, selected by this test's Modules when `selected`.
    async fn node(&self, prefix: &str, kernel: &str, selected: bool) -> String {
        let name = TestEnv::get().unique_name(prefix);
        let value = if selected {
            self.ns.clone()
        } else {
            "other".into()
        };
        FakeNode::new(&name, kernel)
            .label(&self.selector, value)
            .create(&self.client)
            .await
            .unwrap();
        name
    }

    fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    fn modules(&self) -> Api<Module> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    async fn apply<K>(&self, object: Value)
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
            + Clone
            + serde::de::DeserializeOwned
            + serde::Serialize
            + std::fmt::Debug,
    {
        let name = object["metadata"]["name"].as_str().unwrap().to_owned();
        Api::<K>::namespaced(self.client.clone(), &self.ns)
            .patch(
                &name,
                &PatchParams::apply("buildsign-test").force(),
                &Patch::Apply(&object),
            )
            .await
            .unwrap();
    }

    async fn dockerfile(&self, name: &str, text: &str) {
        self.apply::<ConfigMap>(json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": name},
            "data": {"dockerfile": text},
        }))
        .await;
    }

    async fn secret(&self, name: &str, data: Value) {
        self.apply::<Secret>(json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": name},
            "stringData": data,
        }))
        .await;
    }

    async fn module(&self, name: &str, mapping: Value) {
        let image = format!(
            "registry.example/kmm-rs-test-missing/{}/{name}:{KERNEL}",
            self.ns
        );
        let mut mapping = mapping;
        mapping["literal"] = json!(KERNEL);
        mapping["containerImage"] = json!(image);
        self.apply::<Module>(json!({
            "apiVersion": "kmm.sigs.x-k8s.io/v1beta1", "kind": "Module",
            "metadata": {"name": name},
            "spec": {
                "selector": {self.selector.clone(): self.ns.clone()},
                "moduleLoader": {"container": {
                    "modprobe": {"moduleName": "kmm_ci_a"},
                    "kernelMappings": [mapping],
                }},
            },
        }))
        .await;
    }

    fn image(&self, module: &str) -> String {
        format!(
            "registry.example/kmm-rs-test-missing/{}/{module}:{KERNEL}",
            self.ns
        )
    }

    async fn wait_pod(
        &self,
        name: &str,
        what: &str,
        check: impl Fn(&Pod) -> bool + Send + 'static,
    ) -> Pod {
        wait_for(&self.pods(), name, TIMEOUT, what, move |p: Option<&Pod>| {
            p.is_some_and(&check)
        })
        .await
        .unwrap()
        .unwrap()
    }

    async fn wait_loaded(&self, module: &str, node: &str) {
        let ready = wire::module_ready_label(&self.ns, module);
        wait_for(
            &Api::<Node>::all(self.client.clone()),
            node,
            TIMEOUT,
            "labelled ready",
            move |n: Option<&Node>| n.is_some_and(|n| n.labels().contains_key(&ready)),
        )
        .await
        .unwrap();
    }

    async fn is_loaded(&self, module: &str, node: &str) -> bool {
        let node = Api::<Node>::all(self.client.clone())
            .get(node)
            .await
            .unwrap();
        node.labels()
            .contains_key(&wire::module_ready_label(&self.ns, module))
    }

    /// Waits for the Module's Degraded condition to have `reason` and returns its message.
    async fn wait_degraded(&self, module: &str, reason: &'static str) -> String {
        let m = wait_for(
            &self.modules(),
            module,
            TIMEOUT,
            reason,
            move |m: Option<&Module>| degraded(m).is_some_and(|(r, _)| r == reason),
        )
        .await
        .unwrap();
        degraded(m.as_ref()).unwrap().1
    }

    async fn events(&self, object: &str, reason: &str) -> Vec<Event> {
        Api::<Event>::namespaced(self.client.clone(), &self.ns)
            .list(&ListParams::default().fields(&format!("involvedObject.name={object}")))
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|e| e.reason.as_deref() == Some(reason))
            .collect()
    }
}

fn degraded(module: Option<&Module>) -> Option<(String, String)> {
    module
        .and_then(|m| m.status.as_ref())
        .and_then(|s| {
            s.conditions
                .iter()
                .find(|c| c.type_ == "Degraded" && c.status == "True")
        })
        .map(|c| (c.reason.clone(), c.message.clone()))
}

fn args(pod: &Pod) -> Vec<String> {
    pod.spec.as_ref().unwrap().containers[0]
        .args
        .clone()
        .unwrap()
}

fn mounts(pod: &Pod) -> Vec<(String, String)> {
    pod.spec.as_ref().unwrap().containers[0]
        .volume_mounts
        .clone()
        .unwrap()
        .into_iter()
        .map(|m| (m.name, m.mount_path))
        .collect()
}

fn phase(pod: &Pod) -> &str {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or_default()
}

const LAB1_DOCKERFILE: &str = "ARG DTK_AUTO\nFROM ${DTK_AUTO} AS builder\nARG KERNEL_FULL_VERSION\nWORKDIR /build\nRUN make -C ci/kmm-kmod KVER=${KERNEL_FULL_VERSION}\n\nFROM debian:bookworm-slim\nARG KERNEL_FULL_VERSION\nRUN apt-get update && apt-get install -y kmod\nCOPY --from=builder /build/ci/kmm-kmod/*.ko /opt/lib/modules/${KERNEL_FULL_VERSION}/\nRUN depmod -b /opt ${KERNEL_FULL_VERSION}\n";
const LAB2_DOCKERFILE: &str = "FROM registry.example/kernel-devel:6.1\nARG KERNEL_FULL_VERSION\nWORKDIR /build\nRUN make -C ci/kmm-kmod KVER=${KERNEL_FULL_VERSION} && mkdir -p /opt/lib/modules/${KERNEL_FULL_VERSION} && cp ci/kmm-kmod/*.ko /opt/lib/modules/${KERNEL_FULL_VERSION}/ && depmod -b /opt ${KERNEL_FULL_VERSION}\n";

/// Labs 1 and 2: the image is missing, a build pod (checked field by field) builds and pushes it,
/// the image counts as existing, and the module is loaded on the selected node with the mapped
/// kernel only.
async fn lab(prefix: &str, dockerfile: &str, build_args: Value, dtk: Option<&str>) {
    let lab = Lab::new(prefix).await;
    let node = lab.node("bs-a", KERNEL, true).await;
    let other_kernel = lab.node("bs-b", "6.8.0-31-generic", true).await;
    let unselected = lab.node("bs-c", KERNEL, false).await;
    lab.dockerfile("build-module", dockerfile).await;
    lab.secret("build-secret", json!({"token": "s3cret"})).await;
    lab.module(
        "kmm-ci-a",
        json!({"build": {
            "dockerfileConfigMap": {"name": "build-module"},
            "buildArgs": build_args,
            "secrets": [{"name": "build-secret"}],
        }}),
    )
    .await;

    let name = format!("kmm-ci-a-build-{DNS_KERNEL}");
    let pod = lab.wait_pod(&name, "created", |_| true).await;
    let labels = pod.labels();
    assert_eq!(labels[wire::label::MODULE_NAME], "kmm-ci-a");
    assert_eq!(labels[wire::label::RESOURCE_TYPE], "BuildImage");
    assert_eq!(labels[wire::label::TARGET_KERNEL], DNS_KERNEL);
    assert_eq!(labels[wire::label::APP_COMPONENT], "BuildImage");
    assert!(pod.annotations().contains_key(wire::annotation::LAST_HASH));
    let owner = &pod.owner_references()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str()),
        ("ModuleBuildSignConfig", "kmm-ci-a")
    );
    let spec = pod.spec.as_ref().unwrap();
    assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
    assert_eq!(spec.containers[0].name, "kaniko");
    assert_eq!(
        spec.containers[0].image.as_deref(),
        Some("registry.example/kaniko:test")
    );
    let image = lab.image("kmm-ci-a");
    let mut want = vec!["--destination".to_owned(), image.clone()];
    let mut build_arg = |a: String| {
        want.push("--build-arg".into());
        want.push(a);
    };
    if let Some(dtk) = dtk {
        build_arg(format!("DTK_AUTO={dtk}"));
    }
    for a in [
        format!("KERNEL_FULL_VERSION={KERNEL}"),
        format!("KERNEL_VERSION={KERNEL}"),
        "MOD_NAME=kmm-ci-a".into(),
        format!("MOD_NAMESPACE={}", lab.ns),
    ] {
        build_arg(a);
    }
    assert_eq!(args(&pod), want);
    assert_eq!(
        mounts(&pod),
        [
            ("dockerfile".to_owned(), "/workspace".to_owned()),
            ("lib-modules".to_owned(), "/host/lib/modules".to_owned()),
            (
                "secret-build-secret".to_owned(),
                "/run/secrets/build-secret".to_owned()
            ),
        ]
    );
    let volumes = spec.volumes.as_ref().unwrap();
    let dockerfile_volume = volumes[0].config_map.as_ref().unwrap();
    assert_eq!(dockerfile_volume.name, "build-module");
    assert_eq!(
        dockerfile_volume.items.as_ref().unwrap()[0].path,
        "Dockerfile"
    );

    // Success: the image exists, the module loads where the mapping and the selector match.
    lab.wait_loaded("kmm-ci-a", &node).await;
    assert!(!lab.is_loaded("kmm-ci-a", &other_kernel).await);
    assert!(!lab.is_loaded("kmm-ci-a", &unselected).await);
    let succeeded = lab.events("kmm-ci-a", "BuildimageSucceeded").await;
    assert_eq!(succeeded.len(), 1, "{succeeded:?}");
    // The successful pod is deleted, and goes once the GC delay has passed.
    wait_for(
        &lab.pods(),
        &name,
        TIMEOUT,
        "garbage-collected",
        |p: Option<&Pod>| p.is_none(),
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn lab1_multi_stage_build_with_dtk_auto_then_load() {
    // On Kubernetes there is no Driver Toolkit ImageStream: the user names the builder image.
    let dtk = "registry.example/driver-toolkit:6.1";
    lab(
        "lab1",
        LAB1_DOCKERFILE,
        json!([{"name": "DTK_AUTO", "value": dtk}]),
        Some(dtk),
    )
    .await;
}

#[tokio::test]
async fn lab2_single_stage_build_then_load() {
    lab("lab2", LAB2_DOCKERFILE, json!([]), None).await;
}

#[tokio::test]
async fn build_then_sign_then_load() {
    let lab = Lab::new("sign").await;
    let node = lab.node("bs-s", KERNEL, true).await;
    lab.dockerfile("build-module", LAB2_DOCKERFILE).await;
    lab.secret("mykey", json!({"key": "-----BEGIN PRIVATE KEY-----"}))
        .await;
    lab.secret("mycert", json!({"cert": "certificate"})).await;
    lab.module(
        "signed",
        json!({
            "build": {"dockerfileConfigMap": {"name": "build-module"}},
            "sign": {
                "keySecret": {"name": "mykey"},
                "certSecret": {"name": "mycert"},
                "filesToSign": ["/opt/lib/modules/${KERNEL_FULL_VERSION}/kmm_ci_a.ko"],
            },
        }),
    )
    .await;
    lab.wait_pod(&format!("signed-build-{DNS_KERNEL}"), "built", |p| {
        phase(p) == "Succeeded"
    })
    .await;
    let sign = lab
        .wait_pod(&format!("signed-sign-{DNS_KERNEL}"), "created", |_| true)
        .await;
    assert_eq!(sign.labels()[wire::label::RESOURCE_TYPE], "SignImage");
    let image = lab.image("signed");
    assert_eq!(args(&sign), ["--destination", image.as_str()]);
    assert_eq!(
        mounts(&sign),
        [
            ("secret-mycert".to_owned(), "/run/secrets/cert".to_owned()),
            ("secret-mykey".to_owned(), "/run/secrets/key".to_owned()),
            ("dockerfile".to_owned(), "/workspace".to_owned()),
        ]
    );
    let dockerfile = &sign.annotations()[wire::annotation::DOCKERFILE];
    assert!(
        dockerfile.starts_with(&format!("FROM {image} AS source")),
        "{dockerfile}"
    );
    assert!(dockerfile.contains("FROM registry.example/signimage:test AS signimage"));
    assert!(dockerfile.contains(&format!(
        "for file in /opt/opt/lib/modules/{KERNEL}/kmm_ci_a.ko; do"
    )));
    assert!(dockerfile.contains(
        "/usr/local/bin/sign-file sha256 /run/secrets/key/key.pem /run/secrets/cert/cert.pem"
    ));
    lab.wait_loaded("signed", &node).await;
    assert_eq!(lab.events("signed", "SignimageSucceeded").await.len(), 1);
}

#[tokio::test]
async fn failed_build_is_reported_once_and_retried_only_on_change() {
    let lab = Lab::new("fail").await;
    let node = lab.node("bs-f", KERNEL, true).await;
    lab.dockerfile("build-module", LAB2_DOCKERFILE).await;
    let failing = json!({"build": {
        "dockerfileConfigMap": {"name": "build-module"},
        "buildArgs": [{"name": "KMM_RS_TEST_OUTCOME", "value": "fail"}],
    }});
    lab.module("broken", failing.clone()).await;
    let name = format!("broken-build-{DNS_KERNEL}");
    let failed = lab
        .wait_pod(&name, "failed", |p| phase(p) == "Failed")
        .await;
    let message = lab.wait_degraded("broken", "BuildFailed").await;
    assert!(
        message.contains(&format!("pod {}/{name} failed", lab.ns))
            && message.contains("cannot stat"),
        "{message}"
    );

    // Nothing starts again on its own: same pod, one Warning event for it.
    tokio::time::sleep(Duration::from_secs(5)).await; // a quiet period, not a wait for a condition
    let still = lab.pods().get(&name).await.unwrap();
    assert_eq!(still.uid(), failed.uid());
    let warnings = lab.events("broken", "BuildimageFailed").await;
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert_eq!(warnings[0].type_.as_deref(), Some("Warning"));
    assert_eq!(warnings[0].count.unwrap_or(1), 1);
    assert!(!lab.is_loaded("broken", &node).await);

    // The Dockerfile changes: a new build (which fails again: the marker is still there).
    lab.dockerfile("build-module", &format!("{LAB2_DOCKERFILE}# fixed\n"))
        .await;
    let uid = failed.uid();
    lab.wait_pod(&name, "rebuilt", move |p| {
        p.uid() != uid && phase(p) == "Failed"
    })
    .await;
    // The build arguments are fixed: built and loaded.
    lab.module(
        "broken",
        json!({"build": {"dockerfileConfigMap": {"name": "build-module"}}}),
    )
    .await;
    lab.wait_loaded("broken", &node).await;
    // The Module's status follows within its pass interval.
    wait_for(
        &lab.modules(),
        "broken",
        TIMEOUT,
        "no longer Degraded",
        |m: Option<&Module>| m.is_some() && degraded(m).is_none(),
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn bad_inputs_give_clear_errors_and_leave_other_modules_alone() {
    let lab = Lab::new("bad").await;
    let node = lab.node("bs-x", KERNEL, true).await;
    lab.dockerfile("good", LAB2_DOCKERFILE).await;
    lab.apply::<ConfigMap>(json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "wrong-key"},
        "data": {"Dockerfile": "FROM x"},
    }))
    .await;
    lab.secret("not-a-key", json!({"tls.key": "x"})).await;
    lab.secret("mycert", json!({"cert": "c"})).await;
    lab.module(
        "no-cm",
        json!({"build": {"dockerfileConfigMap": {"name": "missing"}}}),
    )
    .await;
    lab.module(
        "no-key",
        json!({"build": {"dockerfileConfigMap": {"name": "wrong-key"}}}),
    )
    .await;
    lab.module(
        "no-secret",
        json!({"build": {"dockerfileConfigMap": {"name": "good"}, "secrets": [{"name": "absent"}]}}),
    )
    .await;
    let sign = |key: &str, file: &str| {
        json!({
            "build": {"dockerfileConfigMap": {"name": "good"}},
            "sign": {"keySecret": {"name": key}, "certSecret": {"name": "mycert"}, "filesToSign": [file]},
        })
    };
    lab.module("bad-key", sign("not-a-key", "/opt/lib/modules/a.ko"))
        .await;
    lab.module("outside", sign("mycert", "/lib/modules/a.ko"))
        .await;
    lab.module(
        "fine",
        json!({"build": {"dockerfileConfigMap": {"name": "good"}}}),
    )
    .await;

    let ns = lab.ns.clone();
    let cases = [
        (
            "no-cm",
            "BuildFailed",
            format!("ConfigMap {ns}/missing (build.dockerfileConfigMap) not found"),
        ),
        (
            "no-key",
            "BuildFailed",
            format!(
                "ConfigMap {ns}/wrong-key (build.dockerfileConfigMap) has no key \"dockerfile\""
            ),
        ),
        (
            "no-secret",
            "BuildFailed",
            format!("Secret {ns}/absent (build.secrets) not found"),
        ),
        (
            "bad-key",
            "SignFailed",
            format!("invalid Secret {ns}/not-a-key (sign.keySecret): key \"key\" is missing"),
        ),
        (
            "outside",
            "InvalidSpec", // the Module validation catches it first; the MBSC check is a second line
            "filesToSign[\"/lib/modules/a.ko\"] must be under dirName \"/opt\"".to_owned(),
        ),
    ];
    for (module, reason, want) in cases {
        let message = lab.wait_degraded(module, reason).await;
        assert!(message.contains(&want), "{module}: {message}");
    }
    lab.wait_loaded("fine", &node).await;
    // No job was created for the bad ones.
    let pods = lab
        .pods()
        .list(&ListParams::default().labels(wire::label::RESOURCE_TYPE))
        .await
        .unwrap();
    for pod in &pods.items {
        let module = &pod.labels()[wire::label::MODULE_NAME];
        assert!(
            module == "fine" || module == "bad-key" || module == "outside",
            "unexpected job {}",
            pod.name_any()
        );
        assert!(!pod.name_any().contains("-sign-"), "{}", pod.name_any());
    }
    // The user fixes the key Secret: the sign runs and the module loads.
    lab.secret("not-a-key", json!({"key": "k"})).await;
    lab.wait_loaded("bad-key", &node).await;
    let mbsc = Api::<ModuleBuildSignConfig>::namespaced(lab.client.clone(), &lab.ns)
        .get("no-cm")
        .await
        .unwrap();
    assert_eq!(mbsc.spec.images.len(), 1);
}
