//! Tier 2 + 3: the ModuleImagesConfig reconciler in-process against the real control plane and a
//! real OCI registry (Debian's docker-registry on loopback). Each test runs its own controller,
//! scoped to its own namespace, on the test's runtime.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::{LocalObjectReference, Pod, Secret, Toleration};
use kmm_api::v1beta1::{
    Build, ImageState, ModuleImageSpec, ModuleImageState, ModuleImagesConfig,
    ModuleImagesConfigSpec, Sign, TlsOptions,
};
use kmm_api::wire::label;
use kmm_operator::controllers::{Context, ControllerConfig, ImageCheckMode, images};
use kmm_testenv::outcome::MISSING_IMAGE_MARKER;
use kmm_testenv::{FakeNode, Registry, RegistryOptions, TestEnv, WAIT_TIMEOUT, wait_for};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};

/// A test's namespace with an images controller running in it.
struct Setup {
    client: kube::Client,
    ns: String,
    _controller: tokio::task::JoinHandle<()>,
}

async fn setup(prefix: &str, mode: ImageCheckMode) -> Setup {
    let env = TestEnv::get();
    let client = env.client().await.unwrap();
    let ns = env.namespace(&client, prefix).await.unwrap();
    let ctx = Arc::new(Context::new(
        client.clone(),
        ControllerConfig {
            image_check: mode,
            ..ControllerConfig::default()
        },
    ));
    let controller = tokio::spawn(images::run_in(ctx, Some(ns.clone())));
    Setup {
        client,
        ns,
        _controller: controller,
    }
}

impl Setup {
    fn mics(&self) -> Api<ModuleImagesConfig> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    async fn create_mic(&self, name: &str, spec: ModuleImagesConfigSpec) -> ModuleImagesConfig {
        self.mics()
            .create(&PostParams::default(), &ModuleImagesConfig::new(name, spec))
            .await
            .unwrap()
    }

    async fn create_secret(&self, secret: Secret) {
        Api::<Secret>::namespaced(self.client.clone(), &self.ns)
            .create(&PostParams::default(), &secret)
            .await
            .unwrap();
    }

    /// Waits until `check` accepts the states of MIC `name` (by image) and returns them.
    async fn wait_states(
        &self,
        name: &str,
        what: &str,
        check: impl Fn(&BTreeMap<String, ModuleImageState>) -> bool + Send + 'static,
    ) -> BTreeMap<String, ModuleImageState> {
        let mic = wait_for(
            &self.mics(),
            name,
            WAIT_TIMEOUT,
            what,
            move |mic: Option<&ModuleImagesConfig>| mic.is_some_and(|m| check(&states(m))),
        )
        .await
        .unwrap()
        .unwrap();
        states(&mic)
    }

    /// Waits until `check` accepts the list of this MIC's pull pods, watching them.
    async fn wait_pull_pods(
        &self,
        mic: &str,
        what: &str,
        check: impl Fn(&[Pod]) -> bool,
    ) -> Vec<Pod> {
        let selector = format!("{}={mic}", label::IMAGE_OWNER);
        let (reader, writer) = kube::runtime::reflector::store();
        // Every watcher event, InitDone included: the store holds the full list only then.
        let stream = watcher(self.pods(), watcher::Config::default().labels(&selector))
            .default_backoff()
            .reflect(writer);
        let wait = async {
            let mut stream = std::pin::pin!(stream);
            while stream.next().await.is_some() {
                if reader.wait_until_ready().now_or_never().is_none() {
                    continue;
                }
                let pods: Vec<Pod> = reader.state().iter().map(|p| (**p).clone()).collect();
                if check(&pods) {
                    return pods;
                }
            }
            Vec::new()
        };
        match tokio::time::timeout(WAIT_TIMEOUT, wait).await {
            Ok(pods) => pods,
            Err(_) => panic!(
                "timed out waiting for the pull pods of {mic} to be {what}; now: {:#?}",
                self.pods()
                    .list(&ListParams::default().labels(&selector))
                    .await
                    .map(|l| l.items)
            ),
        }
    }
}

fn states(mic: &ModuleImagesConfig) -> BTreeMap<String, ModuleImageState> {
    mic.status
        .iter()
        .flat_map(|s| s.images_states.iter())
        .map(|s| (s.image.clone(), s.clone()))
        .collect()
}

fn image(reference: &str) -> ModuleImageSpec {
    ModuleImageSpec {
        image: reference.into(),
        kernel_version: "6.1.0-kwok".into(),
        dir_name: "/opt".into(),
        ..ModuleImageSpec::default()
    }
}

fn insecure(mut spec: ModuleImageSpec) -> ModuleImageSpec {
    spec.registry_tls = Some(TlsOptions {
        insecure: true,
        insecure_skip_tls_verify: false,
    });
    spec
}

fn with_build(mut spec: ModuleImageSpec) -> ModuleImageSpec {
    spec.build = Some(Build {
        dockerfile_config_map: LocalObjectReference {
            name: "dockerfile".into(),
        },
        ..Build::default()
    });
    spec
}

fn with_sign(mut spec: ModuleImageSpec) -> ModuleImageSpec {
    spec.sign = Some(Sign {
        key_secret: LocalObjectReference { name: "key".into() },
        cert_secret: LocalObjectReference {
            name: "cert".into(),
        },
        ..Sign::default()
    });
    spec
}

fn spec(images: Vec<ModuleImageSpec>) -> ModuleImagesConfigSpec {
    ModuleImagesConfigSpec {
        images,
        image_pull_policy: "IfNotPresent".into(),
        ..ModuleImagesConfigSpec::default()
    }
}

fn all_settled(n: usize) -> impl Fn(&BTreeMap<String, ModuleImageState>) -> bool + Send + 'static {
    move |s| s.len() == n && s.values().all(|s| s.status != ImageState::Unknown)
}

fn has_reason(
    image: String,
    reason: &'static str,
) -> impl Fn(&BTreeMap<String, ModuleImageState>) -> bool + Send + 'static {
    move |s| s.get(&image).is_some_and(|s| s.reason == reason)
}

async fn timed<T>(what: &str, fut: impl Future<Output = T>) -> T {
    let started = Instant::now();
    let out = fut.await;
    eprintln!("{what}: {:?}", started.elapsed());
    out
}

/// An image in the registry is Exists; a missing one is DoesNotExist (NotFound), or
/// NeedsBuilding / NeedsSigning when it can be built or signed.
#[tokio::test]
async fn registry_mode_tells_existing_from_missing_images() {
    let t = setup("mic-exists", ImageCheckMode::Registry).await;
    let registry = Registry::shared();
    eprintln!("shared registry started in {:?}", registry.startup);
    let present = registry.push_image("kmm/kmod:6.1.0").await.unwrap();
    let missing = registry.image("kmm/kmod:missing");
    let unknown_repo = registry.image("kmm/never-pushed:1");
    let to_build = registry.image("kmm/kmod:to-build");
    let to_sign = registry.image("kmm/kmod:to-sign");
    let mut skip = insecure(image(&registry.image("kmm/kmod:skip")));
    skip.skip_wait_missing_image = true;
    t.create_mic(
        "kmod",
        spec(vec![
            insecure(image(&present)),
            insecure(image(&missing)),
            insecure(image(&unknown_repo)),
            with_build(insecure(image(&to_build))),
            with_sign(insecure(image(&to_sign))),
            skip,
        ]),
    )
    .await;
    let s = timed(
        "registry check of 6 images (create to status)",
        t.wait_states("kmod", "all settled", all_settled(6)),
    )
    .await;

    assert_eq!(s[&present].status, ImageState::Exists);
    assert_eq!(s[&present].reason, "");
    for img in [&missing, &unknown_repo] {
        assert_eq!(s[img].status, ImageState::DoesNotExist, "{img}");
        assert_eq!(s[img].reason, "NotFound", "{img}");
        assert!(s[img].message.contains("unknown"), "{:?}", s[img]);
    }
    assert_eq!(s[&to_build].status, ImageState::NeedsBuilding);
    assert_eq!(s[&to_build].reason, "NotFound");
    assert_eq!(s[&to_sign].status, ImageState::NeedsSigning);
    assert_eq!(
        s[&registry.image("kmm/kmod:skip")].status,
        ImageState::DoesNotExist
    );

    // Status lists the images in spec order and carries the (absent) rebuild generation.
    let mic = t.mics().get("kmod").await.unwrap();
    let order: Vec<&str> = mic
        .status
        .as_ref()
        .unwrap()
        .images_states
        .iter()
        .map(|s| s.image.as_str())
        .collect();
    assert_eq!(order[0], present);
    assert_eq!(order[3], to_build);

    // A missing image nobody builds is looked at again: once pushed, it becomes Exists.
    registry.push_image("kmm/kmod:missing").await.unwrap();
    timed(
        "missing image pushed, seen as Exists after backoff",
        t.wait_states("kmod", "missing image found after push", {
            let missing = missing.clone();
            move |s| {
                s.get(&missing)
                    .is_some_and(|s| s.status == ImageState::Exists)
            }
        }),
    )
    .await;
}

/// A registry with Basic auth: no secret or a wrong password is Unauthorized (never
/// NeedsBuilding); the right Secret gives Exists, also after fixing a wrong Secret.
#[tokio::test]
async fn registry_mode_reports_unauthorized_and_uses_the_pull_secret() {
    let t = setup("mic-auth", ImageCheckMode::Registry).await;
    let registry = Registry::start(RegistryOptions::default().basic_auth("kmm", "s3cret")).unwrap();
    eprintln!(
        "auth registry startup (process to listening): {:?}",
        registry.startup
    );
    let private = registry.push_image("private/kmod:1").await.unwrap();

    let with_secret = |secret: &str| ModuleImagesConfigSpec {
        image_repo_secret: Some(LocalObjectReference {
            name: secret.into(),
        }),
        ..spec(vec![with_build(insecure(image(&private)))])
    };
    t.create_secret(registry.docker_config_secret("good")).await;
    t.create_secret(kmm_testenv::docker_config_secret(
        "wrong",
        &registry.host,
        "kmm",
        "nope",
    ))
    .await;
    t.create_mic(
        "anonymous",
        spec(vec![with_build(insecure(image(&private)))]),
    )
    .await;
    t.create_mic("wrong", with_secret("wrong")).await;
    t.create_mic("good", with_secret("good")).await;
    t.create_mic("no-secret", with_secret("does-not-exist"))
        .await;

    for name in ["anonymous", "wrong", "no-secret"] {
        let s = t
            .wait_states(
                name,
                "Unauthorized",
                has_reason(private.clone(), "Unauthorized"),
            )
            .await;
        assert_eq!(
            s[&private].status,
            ImageState::Unknown,
            "{name}: {:?}",
            s[&private]
        );
        assert!(!s[&private].message.is_empty());
    }
    let s = t
        .wait_states(
            "no-secret",
            "Unauthorized",
            has_reason(private.clone(), "Unauthorized"),
        )
        .await;
    assert!(
        s[&private].message.contains("does-not-exist not found"),
        "{:?}",
        s[&private]
    );
    let s = t.wait_states("good", "settled", all_settled(1)).await;
    assert_eq!(s[&private].status, ImageState::Exists);

    // Fixing the Secret is picked up by the retry (Secrets are not watched).
    let fixed = registry.docker_config_secret("wrong");
    Api::<Secret>::namespaced(t.client.clone(), &t.ns)
        .patch(
            "wrong",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"data": fixed.data})),
        )
        .await
        .unwrap();
    timed(
        "fixed Secret seen as Exists after backoff",
        t.wait_states("wrong", "Exists after the fix", all_settled(1)),
    )
    .await;
}

/// Nothing listening, TLS to a plain-HTTP registry and an unknown certificate are transient:
/// the state stays unknown with a reason; `insecureSkipTLSVerify` accepts the certificate.
#[tokio::test]
async fn registry_mode_reports_unreachable_and_tls_problems() {
    let t = setup("mic-net", ImageCheckMode::Registry).await;
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let unreachable = format!("127.0.0.1:{closed}/kmm/kmod:1");
    let plain = Registry::shared();
    let plain_image = plain.push_image("kmm/tls-mismatch:1").await.unwrap();
    let tls_registry = Registry::start(RegistryOptions::default().tls()).unwrap();
    let tls_image = tls_registry.push_image("kmm/kmod:1").await.unwrap();
    let mut skip_verify = image(&tls_image);
    skip_verify.registry_tls = Some(TlsOptions {
        insecure: false,
        insecure_skip_tls_verify: true,
    });

    t.create_mic(
        "down",
        spec(vec![with_build(insecure(image(&unreachable)))]),
    )
    .await;
    t.create_mic("https-to-http", spec(vec![image(&plain_image)]))
        .await;
    t.create_mic("unknown-ca", spec(vec![image(&tls_image)]))
        .await;
    t.create_mic("skip-verify", spec(vec![skip_verify])).await;

    let s = t
        .wait_states(
            "down",
            "RegistryUnreachable",
            has_reason(unreachable.clone(), "RegistryUnreachable"),
        )
        .await;
    assert_eq!(s[&unreachable].status, ImageState::Unknown);
    assert!(
        s[&unreachable].message.to_lowercase().contains("connect"),
        "{:?}",
        s[&unreachable]
    );
    for (name, img) in [("https-to-http", &plain_image), ("unknown-ca", &tls_image)] {
        let s = t
            .wait_states(name, "TlsError", has_reason(img.clone(), "TlsError"))
            .await;
        assert_eq!(s[img].status, ImageState::Unknown, "{name}");
        eprintln!("{name}: {}", s[img].message);
    }
    let s = t
        .wait_states("skip-verify", "settled", all_settled(1))
        .await;
    assert_eq!(s[&tls_image].status, ImageState::Exists);
}

/// Changing `imageRebuildTriggerGeneration` clears the states and checks every image again.
#[tokio::test]
async fn rebuild_trigger_clears_and_rechecks() {
    let t = setup("mic-rebuild", ImageCheckMode::Registry).await;
    let registry = Registry::shared();
    let img = registry.image("kmm/rebuild:1");
    t.create_mic("kmod", spec(vec![with_build(insecure(image(&img)))]))
        .await;
    let s = t.wait_states("kmod", "settled", all_settled(1)).await;
    assert_eq!(s[&img].status, ImageState::NeedsBuilding);

    // Someone (the build) pushed it; NeedsBuilding is final until the trigger changes.
    registry.push_image("kmm/rebuild:1").await.unwrap();
    t.mics()
        .patch(
            "kmod",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"imageRebuildTriggerGeneration": 1}})),
        )
        .await
        .unwrap();
    let mic = wait_for(
        &t.mics(),
        "kmod",
        WAIT_TIMEOUT,
        "re-checked for generation 1",
        |mic: Option<&ModuleImagesConfig>| {
            mic.and_then(|m| m.status.as_ref()).is_some_and(|s| {
                s.image_rebuild_trigger_generation == Some(1)
                    && s.images_states
                        .iter()
                        .all(|i| i.status == ImageState::Exists)
            })
        },
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(mic.status.unwrap().images_states.len(), 1);

    // Back to no trigger (nil-aware): cleared and re-checked again, recorded as absent.
    t.mics()
        .patch(
            "kmod",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"imageRebuildTriggerGeneration": null}})),
        )
        .await
        .unwrap();
    wait_for(
        &t.mics(),
        "kmod",
        WAIT_TIMEOUT,
        "trigger removed",
        |mic: Option<&ModuleImagesConfig>| {
            mic.and_then(|m| m.status.as_ref()).is_some_and(|s| {
                s.image_rebuild_trigger_generation.is_none()
                    && s.images_states
                        .iter()
                        .all(|i| i.status == ImageState::Exists)
            })
        },
    )
    .await
    .unwrap();
}

/// Pull-pod mode: pods rendered as Go KMM does; a pod that succeeds means Exists (and is
/// deleted); a one-time pod that cannot pull means NeedsBuilding (or DoesNotExist with
/// skipWaitMissingImage) and is deleted; an until-success pod that cannot pull stays, and the
/// image stays unknown with reason PullFailed. kwok keeps pods whose image contains
/// `/kmm-rs-test-missing/` in ImagePullBackOff (testenv/README.md).
#[tokio::test]
async fn pull_pod_mode_follows_the_pull_pods() {
    let t = setup("mic-pull", ImageCheckMode::PullPod).await;
    let env = TestEnv::get();
    FakeNode::new(env.unique_name("pull-node"), "6.1.0-kwok")
        .create(&t.client)
        .await
        .unwrap();

    let missing = |tag: &str| format!("registry.example.com{MISSING_IMAGE_MARKER}kmod:{tag}");
    let present = "registry.example.com/kmm/kmod:1".to_owned();
    let waiting = missing("wait");
    let to_build = missing("build");
    let skipped = missing("skip");
    let mut skip = image(&skipped);
    skip.skip_wait_missing_image = true;
    let toleration = Toleration {
        key: Some("example.com/gpu".into()),
        operator: Some("Exists".into()),
        effect: Some("NoSchedule".into()),
        ..Toleration::default()
    };
    let mic = t
        .create_mic(
            "kmod",
            ModuleImagesConfigSpec {
                image_repo_secret: Some(LocalObjectReference {
                    name: "pull-secret".into(),
                }),
                image_pull_policy: "Always".into(),
                tolerations: vec![toleration.clone()],
                ..spec(vec![
                    image(&present),
                    image(&waiting),
                    with_build(image(&to_build)),
                    skip,
                ])
            },
        )
        .await;

    let s = timed(
        "pull pods: 3 images settled",
        t.wait_states("kmod", "settled or waiting", {
            let waiting = waiting.clone();
            move |s| {
                s.len() == 4
                    && s.iter().all(|(image, state)| {
                        if *image == waiting {
                            state.reason == "PullFailed"
                        } else {
                            state.status != ImageState::Unknown
                        }
                    })
            }
        }),
    )
    .await;
    assert_eq!(s[&present].status, ImageState::Exists);
    assert_eq!(s[&to_build].status, ImageState::NeedsBuilding);
    assert_eq!(s[&to_build].reason, "NotFound");
    assert!(
        s[&to_build].message.contains("ImagePullBackOff"),
        "{:?}",
        s[&to_build]
    );
    assert_eq!(s[&skipped].status, ImageState::DoesNotExist);
    assert_eq!(s[&waiting].status, ImageState::Unknown);
    assert!(
        s[&waiting].message.contains("Back-off pulling image"),
        "{:?}",
        s[&waiting]
    );

    // Finished pods are deleted; only the until-success pod that cannot pull stays.
    let pods = t
        .wait_pull_pods("kmod", "only the waiting pod", |pods| {
            pods.len() == 1
                && pods[0]
                    .spec
                    .as_ref()
                    .is_some_and(|s| s.containers[0].image.as_deref() == Some(waiting.as_str()))
        })
        .await;
    let pod = &pods[0];
    let meta = &pod.metadata;
    assert!(meta.name.as_deref().unwrap().starts_with("kmod-pull-pod-"));
    assert_eq!(meta.generate_name.as_deref(), Some("kmod-pull-pod-"));
    let labels = meta.labels.as_ref().unwrap();
    assert_eq!(labels[label::IMAGE_OWNER], "kmod");
    assert_eq!(labels[label::PULL_POD_TYPE], "until-success");
    let owner = &meta.owner_references.as_ref().unwrap()[0];
    assert_eq!(owner.kind, "ModuleImagesConfig");
    assert_eq!(owner.name, "kmod");
    assert_eq!(Some(&owner.uid), mic.metadata.uid.as_ref());
    assert_eq!(owner.controller, Some(true));
    let spec = pod.spec.as_ref().unwrap();
    assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
    assert_eq!(spec.containers.len(), 1);
    let puller = &spec.containers[0];
    assert_eq!(puller.name, "puller");
    assert_eq!(
        puller.command.as_deref(),
        Some(&["/bin/sh".to_owned(), "-c".to_owned(), "exit 0".to_owned()][..])
    );
    assert_eq!(puller.image_pull_policy.as_deref(), Some("Always"));
    assert_eq!(
        spec.image_pull_secrets.as_deref(),
        Some(
            &[LocalObjectReference {
                name: "pull-secret".into()
            }][..]
        )
    );
    assert!(
        spec.tolerations.iter().flatten().any(|t| *t == toleration),
        "{:?}",
        spec.tolerations
    );
    assert!(spec.node_selector.is_none());
}
