//! Tier 2: in-cluster builds on OpenShift (spec §6.6) with every reconciler running in-process
//! against the real control plane. This binary's cluster gets minimal structural CRDs for
//! `builds.build.openshift.io` and `imagestreams.image.openshift.io` before the reconcilers start,
//! so API discovery makes them create `Build` objects instead of kaniko pods, and `DTK_AUTO` is
//! resolved from the ImageStream `openshift/driver-toolkit` through the nodes' osImage. Nothing
//! runs Builds here: the test completes them itself by setting `status.phase`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

mod common;

use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Event, Namespace, Node, Pod, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kmm_api::v1beta1::Module;
use kmm_api::wire;
use kmm_core::{dtk, openshift_build};
use kmm_operator::controllers::ImageCheckMode;
use kmm_testenv::{FakeNode, Registry, TestEnv, WAIT_TIMEOUT, wait_for};
use kube::ResourceExt;
use kube::api::{Api, ApiResource, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::wait::conditions;
use serde_json::{Value, json};

const TIMEOUT: Duration = Duration::from_secs(90);
const FIELD_MANAGER: &str = "buildsign-openshift-test";

/// An RHCOS release with a Driver Toolkit tag, and the image behind the tag.
const TAGGED_OS: &str = "411.86.202210072320-0";
const TAGGED_DTK: &str = "quay.io/openshift-release-dev/driver-toolkit@sha256:0a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9";
/// A second tagged release, so that the tags named in an error are a list.
const OTHER_TAGGED_OS: &str = "413.92.202303281804-0";
const OTHER_DTK: &str = "quay.io/openshift-release-dev/driver-toolkit@sha256:f9e8d7c6b5a4039281706f5e4d3c2b1a0f9e8d7c6b5a4039281706f5e4d3c2b1a";
/// The `latest` tag points somewhere else and must never be used.
const LATEST_DTK: &str = "quay.io/openshift-release-dev/driver-toolkit@sha256:latest0000000000000000000000000000000000000000000000000000000000";
/// An RHCOS release the ImageStream has no tag for (user pain #25).
const UNTAGGED_OS: &str = "412.86.202301311551-0";

const LAB_DOCKERFILE: &str = "ARG DTK_AUTO\nFROM ${DTK_AUTO} AS builder\nARG KERNEL_FULL_VERSION\nWORKDIR /build\nRUN make -C ci/kmm-kmod KVER=${KERNEL_FULL_VERSION}\n\nFROM registry.access.redhat.com/ubi9/ubi-minimal\nARG KERNEL_FULL_VERSION\nRUN microdnf install -y kmod\nCOPY --from=builder /build/ci/kmm-kmod/*.ko /opt/lib/modules/${KERNEL_FULL_VERSION}/\nRUN depmod -b /opt ${KERNEL_FULL_VERSION}\n";
const PLAIN_DOCKERFILE: &str = "FROM registry.access.redhat.com/ubi9/ubi-minimal\nARG KERNEL_FULL_VERSION\nRUN mkdir -p /opt/lib/modules/${KERNEL_FULL_VERSION}\n";

fn os_image(version: &str) -> String {
    format!("Red Hat Enterprise Linux CoreOS {version} (Ootpa)")
}

fn build_resource() -> ApiResource {
    ApiResource {
        group: "build.openshift.io".into(),
        version: "v1".into(),
        api_version: openshift_build::API_VERSION.into(),
        kind: openshift_build::KIND.into(),
        plural: "builds".into(),
    }
}

fn image_stream_resource() -> ApiResource {
    ApiResource {
        group: "image.openshift.io".into(),
        version: "v1".into(),
        api_version: "image.openshift.io/v1".into(),
        kind: "ImageStream".into(),
        plural: "imagestreams".into(),
    }
}

/// A namespaced CRD whose spec and status keep any field, with a status subresource.
fn open_crd(group: &str, kind: &str, plural: &str) -> Value {
    let open = json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true});
    json!({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": format!("{plural}.{group}")},
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {
                "plural": plural,
                "singular": kind.to_lowercase(),
                "kind": kind,
                "listKind": format!("{kind}List"),
            },
            "versions": [{
                "name": "v1", "served": true, "storage": true,
                "subresources": {"status": {}},
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "properties": {"spec": open, "status": open},
                }},
            }],
        },
    })
}

/// Makes the cluster look like OpenShift to the operator: the Build and ImageStream APIs are
/// served and discovered, and the Driver Toolkit ImageStream exists. Idempotent (every test calls
/// it before the shared reconcilers start).
async fn install_openshift_apis(client: &kube::Client) {
    let crds = Api::<CustomResourceDefinition>::all(client.clone());
    let apply = PatchParams::apply(FIELD_MANAGER).force();
    for crd in [
        open_crd("build.openshift.io", "Build", "builds"),
        open_crd("image.openshift.io", "ImageStream", "imagestreams"),
    ] {
        let name = crd["metadata"]["name"].as_str().unwrap().to_owned();
        crds.patch(&name, &apply, &Patch::Apply(&crd))
            .await
            .unwrap();
        wait_for(
            &crds,
            &name,
            WAIT_TIMEOUT,
            "Established",
            conditions::is_crd_established(),
        )
        .await
        .unwrap();
    }
    // Established is not yet discovered; the operator decides by discovery, once, at start.
    common::poll(
        WAIT_TIMEOUT,
        "the OpenShift API groups in discovery",
        || {
            let client = client.clone();
            async move {
                let groups = client.list_api_groups().await.ok()?.groups;
                let served = |name: &str| {
                    groups
                        .iter()
                        .any(|g| g.name == name && g.versions.iter().any(|v| v.version == "v1"))
                };
                (served("build.openshift.io") && served("image.openshift.io")).then_some(())
            }
        },
    )
    .await;

    let namespace = Namespace {
        metadata: kube::api::ObjectMeta {
            name: Some(dtk::IMAGE_STREAM_NAMESPACE.into()),
            ..Default::default()
        },
        ..Default::default()
    };
    match Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &namespace)
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.code == 409 => {}
        Err(err) => panic!("creating namespace openshift: {err}"),
    }
    let tag = |name: &str, image: &str| json!({"name": name, "from": {"kind": "DockerImage", "name": image}});
    let stream = json!({
        "apiVersion": "image.openshift.io/v1", "kind": "ImageStream",
        "metadata": {"name": dtk::IMAGE_STREAM_NAME, "namespace": dtk::IMAGE_STREAM_NAMESPACE},
        "spec": {"tags": [
            tag("latest", LATEST_DTK),
            tag(TAGGED_OS, TAGGED_DTK),
            tag(OTHER_TAGGED_OS, OTHER_DTK),
        ]},
    });
    Api::<DynamicObject>::namespaced_with(
        client.clone(),
        dtk::IMAGE_STREAM_NAMESPACE,
        &image_stream_resource(),
    )
    .patch(dtk::IMAGE_STREAM_NAME, &apply, &Patch::Apply(&stream))
    .await
    .unwrap();
}

struct Lab {
    client: kube::Client,
    ns: String,
    selector: String,
    registry: &'static Registry,
}

impl Lab {
    async fn new(prefix: &str) -> Lab {
        let env = TestEnv::get();
        let client = env.client().await.unwrap();
        install_openshift_apis(&client).await;
        common::start_shared_operator(common::test_controller_config(ImageCheckMode::Registry));
        let ns = env.namespace(&client, prefix).await.unwrap();
        Lab {
            client,
            ns,
            selector: "test.kmm-rs.dev/buildsign-openshift".into(),
            registry: Registry::shared(),
        }
    }

    async fn node(&self, prefix: &str, kernel: &str, os_image: &str) -> String {
        let name = TestEnv::get().unique_name(prefix);
        FakeNode::new(&name, kernel)
            .os_image(os_image)
            .label(&self.selector, &self.ns)
            .create(&self.client)
            .await
            .unwrap();
        name
    }

    fn builds(&self) -> Api<DynamicObject> {
        Api::namespaced_with(self.client.clone(), &self.ns, &build_resource())
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
                &PatchParams::apply(FIELD_MANAGER).force(),
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

    /// The module image for a kernel, in the shared registry (where it does not exist).
    fn image(&self, module: &str, kernel: &str) -> String {
        self.registry
            .image(&format!("{}/{module}:{kernel}", self.ns))
    }

    /// A Module mapping every `4.18.0` RHCOS kernel to an image built from `config_map`.
    async fn module(&self, name: &str, config_map: &str, image_repo_secret: Option<&str>) {
        let image = self
            .registry
            .image(&format!("{}/{name}:${{KERNEL_FULL_VERSION}}", self.ns));
        let mut spec = json!({
            "selector": {self.selector.clone(): self.ns.clone()},
            "moduleLoader": {"container": {
                "modprobe": {"moduleName": "kmm_ci_a"},
                "kernelMappings": [{
                    "regexp": r"^4\.18\.0-.+\.el8_6\.x86_64$",
                    "containerImage": image,
                    "registryTLS": {"insecure": true},
                    "build": {"dockerfileConfigMap": {"name": config_map}},
                }],
            }},
        });
        if let Some(secret) = image_repo_secret {
            spec["imageRepoSecret"] = json!({"name": secret});
        }
        self.apply::<Module>(json!({
            "apiVersion": "kmm.sigs.x-k8s.io/v1beta1", "kind": "Module",
            "metadata": {"name": name},
            "spec": spec,
        }))
        .await;
    }

    async fn wait_build(&self, name: &str) -> DynamicObject {
        wait_for(
            &self.builds(),
            name,
            TIMEOUT,
            "created",
            |b: Option<&DynamicObject>| b.is_some(),
        )
        .await
        .unwrap()
        .unwrap()
    }

    /// Plays the OpenShift build controller: the Build ran and pushed its image.
    async fn complete(&self, name: &str) {
        let patch = json!({"status": {"phase": "Complete"}});
        self.builds()
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap();
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

    /// Names of the Builds of this namespace.
    async fn build_names(&self) -> Vec<String> {
        self.builds()
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .iter()
            .map(ResourceExt::name_any)
            .collect()
    }

    /// No kaniko pod: on OpenShift every job is a Build.
    async fn assert_no_build_pods(&self) {
        let pods = Api::<Pod>::namespaced(self.client.clone(), &self.ns)
            .list(&ListParams::default().labels(wire::label::RESOURCE_TYPE))
            .await
            .unwrap();
        let names: Vec<String> = pods.items.iter().map(ResourceExt::name_any).collect();
        assert!(names.is_empty(), "kaniko pods on OpenShift: {names:?}");
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

fn dns_safe(kernel: &str) -> String {
    kernel.replace(['.', '_'], "-")
}

/// `NAME=VALUE` of each Docker strategy build argument, in order.
fn build_args(build: &DynamicObject) -> Vec<String> {
    build.data["spec"]["strategy"]["dockerStrategy"]["buildArgs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            format!(
                "{}={}",
                a["name"].as_str().unwrap(),
                a["value"].as_str().unwrap()
            )
        })
        .collect()
}

/// The fields of spec §6.6 that do not depend on the pull secret.
fn assert_build_object(build: &DynamicObject, module: &str, kernel: &str, dockerfile: &str) {
    let dns = dns_safe(kernel);
    assert_eq!(build.name_any(), format!("{module}-build-{dns}"));
    let labels = build.labels();
    assert_eq!(labels[wire::label::MODULE_NAME], module);
    assert_eq!(labels[wire::label::RESOURCE_TYPE], "BuildImage");
    assert_eq!(labels[wire::label::TARGET_KERNEL], dns);
    assert_eq!(labels[wire::label::APP_NAME], "kmm");
    assert_eq!(labels[wire::label::APP_COMPONENT], "BuildImage");
    assert_eq!(labels[wire::label::APP_PART_OF], "kmm");
    assert!(
        build
            .annotations()
            .contains_key(wire::annotation::LAST_HASH)
    );
    assert_eq!(
        build.finalizers(),
        [wire::finalizer::GC_DELAY, wire::finalizer::JOB_EVENT]
    );
    let owners = build.owner_references();
    assert_eq!(owners.len(), 1, "{owners:?}");
    assert_eq!(
        (
            owners[0].kind.as_str(),
            owners[0].name.as_str(),
            owners[0].controller
        ),
        ("ModuleBuildSignConfig", module, Some(true))
    );
    let spec = &build.data["spec"];
    assert_eq!(spec["serviceAccount"], "builder");
    assert_eq!(spec["source"]["type"], "Dockerfile");
    assert_eq!(spec["source"]["dockerfile"], dockerfile);
    assert_eq!(spec["strategy"]["type"], "Docker");
    assert_eq!(spec["output"]["to"]["kind"], "DockerImage");
    assert_eq!(spec["mountTrustedCA"], true);
}

/// Later labs on OpenShift: `FROM ${DTK_AUTO}`. The node whose RHCOS release has a Driver
/// Toolkit tag gets a Build (not a kaniko pod) with that tag's image as `DTK_AUTO`; once the
/// Build completes the module loads there. The node whose release has no tag gets no Build, and
/// the Module says which osImage and which tags were found.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dtk_auto_build_object_then_load_and_untagged_os_explained() {
    let lab = Lab::new("ocp-dtk").await;
    let kernel = "4.18.0-372.26.1.el8_6.x86_64";
    let untagged_kernel = "4.18.0-372.40.1.el8_6.x86_64";
    let node = lab.node("ocp-a", kernel, &os_image(TAGGED_OS)).await;
    let untagged = lab
        .node("ocp-b", untagged_kernel, &os_image(UNTAGGED_OS))
        .await;
    lab.dockerfile("build-module", LAB_DOCKERFILE).await;
    lab.module("kmm-ci-a", "build-module", None).await;

    let name = format!("kmm-ci-a-build-{}", dns_safe(kernel));
    let build = lab.wait_build(&name).await;
    assert_build_object(&build, "kmm-ci-a", kernel, LAB_DOCKERFILE);
    assert_eq!(
        build_args(&build),
        [
            format!("KERNEL_FULL_VERSION={kernel}"),
            format!("KERNEL_VERSION={kernel}"),
            "MOD_NAME=kmm-ci-a".to_owned(),
            format!("MOD_NAMESPACE={}", lab.ns),
            format!("DTK_AUTO={TAGGED_DTK}"),
        ]
    );
    let spec = &build.data["spec"];
    assert_eq!(spec["output"]["to"]["name"], lab.image("kmm-ci-a", kernel));
    // No imageRepoSecret: the builder account's own credentials push and pull.
    assert!(spec["output"].get("pushSecret").is_none(), "{spec:#}");
    assert!(
        spec["strategy"]["dockerStrategy"]
            .get("pullSecret")
            .is_none(),
        "{spec:#}"
    );
    lab.assert_no_build_pods().await;

    // Pain #25: the untagged release is explained on the Module and in the MBSC's event.
    let message = lab.wait_degraded("kmm-ci-a", "BuildFailed").await;
    for want in [
        format!("could not get DTK image for kernel {untagged_kernel}"),
        format!("could not find osImage {UNTAGGED_OS}"),
        format!("(node {untagged}: {:?})", os_image(UNTAGGED_OS)),
        format!("whose tags are [{TAGGED_OS}, {OTHER_TAGGED_OS}]"),
    ] {
        assert!(message.contains(&want), "missing {want:?} in: {message}");
    }
    assert!(!message.contains("latest"), "{message}");
    let warnings = lab.events("kmm-ci-a", "BuildimageFailed").await;
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert_eq!(warnings[0].type_.as_deref(), Some("Warning"));
    let note = warnings[0].message.as_deref().unwrap_or_default();
    assert!(
        note.contains(UNTAGGED_OS) && note.contains(TAGGED_OS),
        "{note}"
    );
    assert_eq!(lab.build_names().await, [name.as_str()]);

    // The test plays the build controller. MBSC Success counts as Exists (spec §4.3 step 5)
    // without another registry check, so nothing needs to be pushed.
    lab.complete(&name).await;
    lab.wait_loaded("kmm-ci-a", &node).await;
    assert!(!lab.is_loaded("kmm-ci-a", &untagged).await);
    let succeeded = lab.events("kmm-ci-a", "BuildimageSucceeded").await;
    assert_eq!(succeeded.len(), 1, "{succeeded:?}");
    // The completed Build is garbage-collected; nothing was ever built for the untagged node.
    wait_for(
        &lab.builds(),
        &name,
        TIMEOUT,
        "garbage-collected",
        |b: Option<&DynamicObject>| b.is_none(),
    )
    .await
    .unwrap();
    assert!(lab.build_names().await.is_empty());
    lab.assert_no_build_pods().await;
    let (reason, message) = degraded(lab.modules().get("kmm-ci-a").await.ok().as_ref()).unwrap();
    assert_eq!(reason, "BuildFailed", "{message}");
}

/// With an `imageRepoSecret` the Build pushes and pulls with it; a Dockerfile without `DTK_AUTO`
/// needs no Driver Toolkit (the node is not even RHCOS) and gets no such argument.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn build_object_uses_the_image_repo_secret() {
    let lab = Lab::new("ocp-secret").await;
    let kernel = "4.18.0-372.19.1.el8_6.x86_64";
    let node = lab
        .node("ocp-s", kernel, "Debian GNU/Linux 12 (bookworm)")
        .await;
    let mut secret = lab.registry.docker_config_secret("push-secret");
    secret.metadata.namespace = Some(lab.ns.clone());
    Api::<Secret>::namespaced(lab.client.clone(), &lab.ns)
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    lab.dockerfile("build-plain", PLAIN_DOCKERFILE).await;
    lab.module("kmm-ci-s", "build-plain", Some("push-secret"))
        .await;

    let name = format!("kmm-ci-s-build-{}", dns_safe(kernel));
    let build = lab.wait_build(&name).await;
    assert_build_object(&build, "kmm-ci-s", kernel, PLAIN_DOCKERFILE);
    assert_eq!(
        build_args(&build),
        [
            format!("KERNEL_FULL_VERSION={kernel}"),
            format!("KERNEL_VERSION={kernel}"),
            "MOD_NAME=kmm-ci-s".to_owned(),
            format!("MOD_NAMESPACE={}", lab.ns),
        ]
    );
    let spec = &build.data["spec"];
    assert_eq!(spec["output"]["to"]["name"], lab.image("kmm-ci-s", kernel));
    assert_eq!(spec["output"]["pushSecret"]["name"], "push-secret");
    assert_eq!(
        spec["strategy"]["dockerStrategy"]["pullSecret"]["name"],
        "push-secret"
    );
    lab.assert_no_build_pods().await;

    lab.complete(&name).await;
    lab.wait_loaded("kmm-ci-s", &node).await;
    // The Module's status follows within its pass interval.
    wait_for(
        &lab.modules(),
        "kmm-ci-s",
        TIMEOUT,
        "not Degraded",
        |m: Option<&Module>| m.is_some() && degraded(m).is_none(),
    )
    .await
    .unwrap();
}
