//! In-cluster builds on Kubernetes: the kaniko build pod of one module image, rendered as Go KMM
//! renders it (name, labels, finalizers, arguments, volumes), plus what build and sign pods share:
//! the inputs taken from a ModuleBuildSignConfig entry, the user errors that stop a build or a
//! sign before any pod exists, and the hash that tells when a pod must be replaced.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    ConfigMapVolumeSource, Container, HostPathVolumeSource, KeyToPath, LocalObjectReference, Pod,
    PodSpec, SecretVolumeSource, Toleration, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kmm_api::v1beta1::{Build, BuildArg, BuildSignAction, ModuleImageSpec, TlsOptions};
use kmm_api::wire::{self, annotation, finalizer, label};

use crate::kernel::dns_safe;
use crate::mapping::{build_args_for_kernel, override_build_args};

/// ConfigMap key holding a Dockerfile.
pub const DOCKERFILE_KEY: &str = "dockerfile";
/// Build argument (and Dockerfile word) that asks for the Driver Toolkit image.
pub const DTK_AUTO: &str = "DTK_AUTO";
/// Name of the kaniko container of build and sign pods.
pub const KANIKO_CONTAINER: &str = "kaniko";
/// Where kaniko reads the Dockerfile (its default context).
const WORKSPACE: &str = "/workspace";
const DOCKERFILE_VOLUME: &str = "dockerfile";
const LIB_MODULES_VOLUME: &str = "lib-modules";
/// Lines of a failed pod's termination message kept in conditions and events.
pub const FAILURE_LINES: usize = 10;

/// A user error that stops a build or a sign before anything is created. Reported in the
/// Module's conditions and as a Warning event; retried only when the inputs change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BuildSignError {
    /// The entry asks for a build but the Module has no `build` section for this kernel.
    #[error("image {image}: no build section for kernel {kernel}")]
    NoBuild {
        /// Image reference.
        image: String,
        /// Kernel version.
        kernel: String,
    },
    /// The entry asks for a signature but the Module has no `sign` section for this kernel.
    #[error("image {image}: no sign section for kernel {kernel}")]
    NoSign {
        /// Image reference.
        image: String,
        /// Kernel version.
        kernel: String,
    },
    /// `build.dockerfileConfigMap` names a ConfigMap that does not exist.
    #[error("ConfigMap {namespace}/{name} (build.dockerfileConfigMap) not found")]
    DockerfileConfigMapMissing {
        /// Namespace.
        namespace: String,
        /// ConfigMap name.
        name: String,
    },
    /// The Dockerfile ConfigMap has no `dockerfile` key.
    #[error(
        "ConfigMap {namespace}/{name} (build.dockerfileConfigMap) has no key \"dockerfile\" (keys: {keys})"
    )]
    DockerfileKeyMissing {
        /// Namespace.
        namespace: String,
        /// ConfigMap name.
        name: String,
        /// The keys it has.
        keys: String,
    },
    /// A `build.secrets` entry names a Secret that does not exist.
    #[error("Secret {namespace}/{name} (build.secrets) not found")]
    BuildSecretMissing {
        /// Namespace.
        namespace: String,
        /// Secret name.
        name: String,
    },
    /// The key or certificate Secret does not exist.
    #[error("Secret {namespace}/{name} (sign.{field}) not found")]
    SigningSecretMissing {
        /// Namespace.
        namespace: String,
        /// Secret name.
        name: String,
        /// `keySecret` or `certSecret`.
        field: &'static str,
    },
    /// The key or certificate Secret lacks its data key.
    #[error("invalid Secret {namespace}/{name} (sign.{field}): key {key:?} is missing")]
    SigningSecretKeyMissing {
        /// Namespace.
        namespace: String,
        /// Secret name.
        name: String,
        /// `keySecret` or `certSecret`.
        field: &'static str,
        /// `key` or `cert`.
        key: &'static str,
    },
    /// A `filesToSign` entry is not under `modprobe.dirName`.
    #[error(
        "sign.filesToSign entry {file:?} is outside modprobe.dirName {dir_name:?}; only files under it are copied out of the image to be signed"
    )]
    FileOutsideDirName {
        /// The entry.
        file: String,
        /// `modprobe.dirName`.
        dir_name: String,
    },
    /// Nothing says which image to sign.
    #[error(
        "no image to sign given: set sign.unsignedImage, or a build section that produces the image"
    )]
    NoImageToSign,
    /// `DTK_AUTO` could not be resolved.
    #[error(transparent)]
    Dtk(#[from] crate::dtk::DtkError),
}

impl BuildSignError {
    /// Short stable category (event reason, metric label).
    pub fn category(&self) -> &'static str {
        match self {
            Self::NoBuild { .. } | Self::NoSign { .. } => "MissingSection",
            Self::DockerfileConfigMapMissing { .. } | Self::DockerfileKeyMissing { .. } => {
                "MissingDockerfile"
            }
            Self::BuildSecretMissing { .. } => "MissingBuildSecret",
            Self::SigningSecretMissing { .. } | Self::SigningSecretKeyMissing { .. } => {
                "InvalidSigningSecret"
            }
            Self::FileOutsideDirName { .. } => "InvalidFilesToSign",
            Self::NoImageToSign => "NoImageToSign",
            Self::Dtk(_) => "DriverToolkit",
        }
    }
}

/// The inputs every build and sign job takes from its ModuleBuildSignConfig.
#[derive(Debug, Clone, Copy)]
pub struct JobTarget<'a> {
    /// MBSC name (the Module's name).
    pub mbsc: &'a str,
    /// MBSC namespace (the Module's namespace).
    pub namespace: &'a str,
    /// Controller reference to the MBSC.
    pub owner: Option<&'a OwnerReference>,
    /// The image entry.
    pub image: &'a ModuleImageSpec,
    /// Pull and push secret.
    pub image_repo_secret: Option<&'a LocalObjectReference>,
    /// Push the result to `image.image`.
    pub push: bool,
    /// Tolerations of the pods.
    pub tolerations: &'a [Toleration],
}

impl JobTarget<'_> {
    /// The kernel in DNS-safe form (name suffix and `target-kernel` label).
    pub fn dns_kernel(&self) -> String {
        dns_safe(&self.image.kernel_version)
    }

    /// Name of the build or sign object of this entry.
    pub fn job_name(&self, action: BuildSignAction) -> String {
        match action {
            BuildSignAction::BuildImage => wire::build_pod_name(self.mbsc, &self.dns_kernel()),
            BuildSignAction::SignImage => wire::sign_pod_name(self.mbsc, &self.dns_kernel()),
        }
    }

    /// Metadata of the build or sign object: name, labels, finalizers, owner.
    pub fn job_metadata(&self, action: BuildSignAction) -> ObjectMeta {
        let kind = action_label(action);
        ObjectMeta {
            name: Some(self.job_name(action)),
            namespace: Some(self.namespace.to_owned()),
            labels: Some(BTreeMap::from([
                (label::MODULE_NAME.to_owned(), self.mbsc.to_owned()),
                (label::RESOURCE_TYPE.to_owned(), kind.to_owned()),
                (label::TARGET_KERNEL.to_owned(), self.dns_kernel()),
                (label::APP_NAME.to_owned(), label::APP_KMM.to_owned()),
                (label::APP_COMPONENT.to_owned(), kind.to_owned()),
                (label::APP_PART_OF.to_owned(), label::APP_KMM.to_owned()),
            ])),
            annotations: Some(BTreeMap::new()),
            finalizers: Some(vec![
                finalizer::GC_DELAY.to_owned(),
                finalizer::JOB_EVENT.to_owned(),
            ]),
            owner_references: self.owner.map(|o| vec![o.clone()]),
            ..ObjectMeta::default()
        }
    }
}

/// Value of the `resource-type` label for an action.
pub fn action_label(action: BuildSignAction) -> &'static str {
    match action {
        BuildSignAction::BuildImage => wire::resource_type::BUILD,
        BuildSignAction::SignImage => wire::resource_type::SIGN,
    }
}

/// The Dockerfile of a build: the `dockerfile` key of the ConfigMap's data (`None`: the
/// ConfigMap does not exist).
pub fn dockerfile_from<'d>(
    namespace: &str,
    build: &Build,
    data: Option<&'d BTreeMap<String, String>>,
) -> Result<&'d str, BuildSignError> {
    let name = &build.dockerfile_config_map.name;
    let data = data.ok_or_else(|| BuildSignError::DockerfileConfigMapMissing {
        namespace: namespace.to_owned(),
        name: name.clone(),
    })?;
    data.get(DOCKERFILE_KEY).map(String::as_str).ok_or_else(|| {
        BuildSignError::DockerfileKeyMissing {
            namespace: namespace.to_owned(),
            name: name.clone(),
            keys: data.keys().cloned().collect::<Vec<_>>().join(", "),
        }
    })
}

/// The first `build.secrets` entry for which `exists` is false, as an error.
pub fn check_build_secrets(
    namespace: &str,
    build: &Build,
    exists: impl Fn(&str) -> bool,
) -> Result<(), BuildSignError> {
    match build.secrets.iter().find(|s| !exists(&s.name)) {
        Some(missing) => Err(BuildSignError::BuildSecretMissing {
            namespace: namespace.to_owned(),
            name: missing.name.clone(),
        }),
        None => Ok(()),
    }
}

/// Whether the build needs the Driver Toolkit image resolved: the Dockerfile mentions
/// `DTK_AUTO` and the user did not pass a `DTK_AUTO` build argument of their own.
pub fn needs_dtk(dockerfile: &str, build: &Build) -> bool {
    dockerfile.contains(DTK_AUTO) && !build.build_args.iter().any(|a| a.name == DTK_AUTO)
}

/// The build arguments of a build: the user's, the injected kernel and module ones (§2), and
/// `DTK_AUTO` when resolved.
pub fn build_args(target: &JobTarget<'_>, build: &Build, dtk_image: Option<&str>) -> Vec<BuildArg> {
    let args = build_args_for_kernel(
        build,
        &target.image.kernel_version,
        target.mbsc,
        target.namespace,
    );
    match dtk_image {
        Some(image) => override_build_args(
            &args,
            &[BuildArg {
                name: DTK_AUTO.to_owned(),
                value: image.to_owned(),
            }],
        ),
        None => args,
    }
}

/// `image` with its tag (and digest) replaced by `tag`. Unlike Go KMM (quirk #7), a registry
/// port (`host:5000/kaniko`) is kept.
pub fn with_tag(image: &str, tag: &str) -> String {
    let name = image.split_once('@').map_or(image, |(name, _)| name);
    let repo_start = name.rfind('/').map_or(0, |i| i + 1);
    let name = match name.get(repo_start..).and_then(|repo| repo.find(':')) {
        Some(colon) => name.get(..repo_start + colon).unwrap_or(name),
        None => name,
    };
    format!("{name}:{tag}")
}

/// kaniko's push flags (`--destination` or `--no-push`, TLS of the destination) followed by its
/// pull TLS flags.
pub fn kaniko_push_pull_args(target: &JobTarget<'_>, pull_tls: Option<&TlsOptions>) -> Vec<String> {
    let mut args = Vec::new();
    if target.push {
        args.push("--destination".to_owned());
        args.push(target.image.image.clone());
        let tls = target.image.registry_tls.unwrap_or_default();
        if tls.insecure {
            args.push("--insecure".to_owned());
        }
        if tls.insecure_skip_tls_verify {
            args.push("--skip-tls-verify".to_owned());
        }
    } else {
        args.push("--no-push".to_owned());
    }
    let pull = pull_tls.copied().unwrap_or_default();
    if pull.insecure {
        args.push("--insecure-pull".to_owned());
    }
    if pull.insecure_skip_tls_verify {
        args.push("--skip-tls-verify-pull".to_owned());
    }
    args
}

/// The `imageRepoSecret` as kaniko's Docker config (`/kaniko/.docker/config.json`).
pub(crate) fn repo_secret_volume(
    secret: Option<&LocalObjectReference>,
) -> Option<(Volume, VolumeMount)> {
    let name = &secret?.name;
    let volume_name = format!("secret-{name}");
    Some((
        Volume {
            name: volume_name.clone(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(name.clone()),
                items: Some(vec![KeyToPath {
                    key: ".dockerconfigjson".into(),
                    path: "config.json".into(),
                    mode: None,
                }]),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        },
        VolumeMount {
            name: volume_name,
            mount_path: "/kaniko/.docker".into(),
            read_only: Some(true),
            ..VolumeMount::default()
        },
    ))
}

pub(crate) fn secret_volume(
    volume_name: String,
    secret: &str,
    items: Option<Vec<KeyToPath>>,
    mount_path: String,
) -> (Volume, VolumeMount) {
    (
        Volume {
            name: volume_name.clone(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(secret.to_owned()),
                items,
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        },
        VolumeMount {
            name: volume_name,
            mount_path,
            read_only: Some(true),
            ..VolumeMount::default()
        },
    )
}

/// The kaniko container and pod shape shared by build and sign pods.
pub(crate) fn kaniko_pod(
    metadata: ObjectMeta,
    image: String,
    args: Vec<String>,
    mounted: Vec<(Volume, VolumeMount)>,
    node_selector: Option<BTreeMap<String, String>>,
    tolerations: &[Toleration],
) -> Pod {
    let (volumes, mounts): (Vec<Volume>, Vec<VolumeMount>) = mounted.into_iter().unzip();
    Pod {
        metadata,
        spec: Some(PodSpec {
            containers: vec![Container {
                name: KANIKO_CONTAINER.into(),
                image: Some(image),
                args: Some(args),
                volume_mounts: Some(mounts),
                // kaniko writes no termination message: on failure the end of its log stands
                // in, so the failure can be reported without reading logs (kmm-rs addition).
                termination_message_policy: Some("FallbackToLogsOnError".into()),
                ..Container::default()
            }],
            restart_policy: Some("Never".into()),
            // kaniko needs no API access (kmm-rs addition: least privilege).
            automount_service_account_token: Some(false),
            node_selector,
            tolerations: (!tolerations.is_empty()).then(|| tolerations.to_vec()),
            volumes: Some(volumes),
            ..PodSpec::default()
        }),
        status: None,
    }
}

/// What a build pod is rendered from.
#[derive(Debug, Clone, Copy)]
pub struct BuildPodInput<'a> {
    /// The MBSC entry and its settings.
    pub target: JobTarget<'a>,
    /// Its build section.
    pub build: &'a Build,
    /// The Dockerfile text (hashed; the pod mounts the ConfigMap).
    pub dockerfile: &'a str,
    /// kaniko image (`RELATED_IMAGE_BUILD`).
    pub build_image: &'a str,
    /// The resolved Driver Toolkit image, when the Dockerfile asks for it.
    pub dtk_image: Option<&'a str>,
}

/// The kaniko build pod (spec §6.1), with its `last-hash` annotation.
pub fn render_build_pod(input: &BuildPodInput<'_>) -> Pod {
    let target = &input.target;
    let build = input.build;
    let image = match build.kaniko_params.as_ref().map(|p| p.tag.as_str()) {
        Some(tag) if !tag.is_empty() => with_tag(input.build_image, tag),
        _ => input.build_image.to_owned(),
    };
    let mut args = kaniko_push_pull_args(target, build.base_image_registry_tls.as_ref());
    for arg in build_args(target, build, input.dtk_image) {
        args.push("--build-arg".to_owned());
        args.push(format!("{}={}", arg.name, arg.value));
    }
    let mut mounted = vec![
        (
            Volume {
                name: DOCKERFILE_VOLUME.into(),
                config_map: Some(ConfigMapVolumeSource {
                    name: build.dockerfile_config_map.name.clone(),
                    items: Some(vec![KeyToPath {
                        key: DOCKERFILE_KEY.into(),
                        path: "Dockerfile".into(),
                        mode: None,
                    }]),
                    ..ConfigMapVolumeSource::default()
                }),
                ..Volume::default()
            },
            VolumeMount {
                name: DOCKERFILE_VOLUME.into(),
                mount_path: WORKSPACE.into(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
        ),
        (
            Volume {
                name: LIB_MODULES_VOLUME.into(),
                host_path: Some(HostPathVolumeSource {
                    path: "/lib/modules".into(),
                    type_: Some("Directory".into()),
                }),
                ..Volume::default()
            },
            VolumeMount {
                name: LIB_MODULES_VOLUME.into(),
                mount_path: "/host/lib/modules".into(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
        ),
    ];
    for secret in &build.secrets {
        mounted.push(secret_volume(
            format!("secret-{}", secret.name),
            &secret.name,
            None,
            format!("/run/secrets/{}", secret.name),
        ));
    }
    mounted.extend(repo_secret_volume(target.image_repo_secret));
    let node_selector = (!build.selector.is_empty()).then(|| build.selector.clone());
    let mut pod = kaniko_pod(
        target.job_metadata(BuildSignAction::BuildImage),
        image,
        args,
        mounted,
        node_selector,
        target.tolerations,
    );
    let hash = content_hash(&[
        &serde_json::to_vec(&pod).unwrap_or_default(),
        input.dockerfile.as_bytes(),
    ]);
    set_hash(&mut pod.metadata, hash);
    pod
}

pub(crate) fn set_hash(metadata: &mut ObjectMeta, hash: u64) {
    metadata
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(annotation::LAST_HASH.to_owned(), hash.to_string());
}

/// FNV-1a over the parts, each followed by a separator byte so that moving bytes from one part
/// to the next changes the hash.
pub fn content_hash(parts: &[&[u8]]) -> u64 {
    parts
        .iter()
        .flat_map(|part| part.iter().copied().chain(std::iter::once(0xff)))
        .fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
        })
}

/// The last [`FAILURE_LINES`] non-empty lines of a failure message (a termination message or a
/// log tail).
pub fn failure_tail(message: &str) -> String {
    let lines: Vec<&str> = message
        .lines()
        .map(str::trim_end)
        .filter(|l| !l.is_empty())
        .collect();
    lines[lines.len().saturating_sub(FAILURE_LINES)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use kmm_api::v1beta1::KanikoParams;

    pub(crate) fn image_spec() -> ModuleImageSpec {
        ModuleImageSpec {
            image: "registry.local:5000/labs/kmm-kmod:6.1.0-56-amd64".into(),
            kernel_version: "6.1.0-56-amd64".into(),
            dir_name: "/opt".into(),
            ..ModuleImageSpec::default()
        }
    }

    fn build() -> Build {
        Build {
            dockerfile_config_map: LocalObjectReference {
                name: "build-module".into(),
            },
            build_args: vec![
                BuildArg {
                    name: "KERNEL_VERSION".into(),
                    value: "overridden".into(),
                },
                BuildArg {
                    name: "EXTRA".into(),
                    value: "1".into(),
                },
            ],
            secrets: vec![LocalObjectReference {
                name: "build-secret".into(),
            }],
            ..Build::default()
        }
    }

    fn target<'a>(image: &'a ModuleImageSpec, secret: &'a LocalObjectReference) -> JobTarget<'a> {
        JobTarget {
            mbsc: "kmm-ci-a",
            namespace: "labs",
            owner: None,
            image,
            image_repo_secret: Some(secret),
            push: true,
            tolerations: &[],
        }
    }

    #[test]
    fn build_pod_matches_go_kmm() {
        let image = ModuleImageSpec {
            registry_tls: Some(TlsOptions {
                insecure: true,
                insecure_skip_tls_verify: false,
            }),
            ..image_spec()
        };
        let secret = LocalObjectReference {
            name: "pull".into(),
        };
        let build = build();
        let pod = render_build_pod(&BuildPodInput {
            target: target(&image, &secret),
            build: &build,
            dockerfile: "FROM ${DTK_AUTO}\n",
            build_image: "gcr.io/kaniko-project/executor:latest",
            dtk_image: Some("quay.io/dtk@sha256:1"),
        });
        assert_eq!(
            pod.metadata.name.as_deref(),
            Some("kmm-ci-a-build-6-1-0-56-amd64")
        );
        let labels = pod.metadata.labels.clone().unwrap();
        assert_eq!(labels[label::RESOURCE_TYPE], "BuildImage");
        assert_eq!(labels[label::TARGET_KERNEL], "6-1-0-56-amd64");
        assert_eq!(labels[label::MODULE_NAME], "kmm-ci-a");
        assert_eq!(labels[label::APP_COMPONENT], "BuildImage");
        assert_eq!(
            pod.metadata.finalizers.clone().unwrap(),
            vec![finalizer::GC_DELAY, finalizer::JOB_EVENT]
        );
        let spec = pod.spec.unwrap();
        let args = spec.containers[0].args.clone().unwrap();
        assert_eq!(
            args,
            [
                "--destination",
                "registry.local:5000/labs/kmm-kmod:6.1.0-56-amd64",
                "--insecure",
                "--build-arg",
                "KERNEL_VERSION=6.1.0-56-amd64",
                "--build-arg",
                "EXTRA=1",
                "--build-arg",
                "KERNEL_FULL_VERSION=6.1.0-56-amd64",
                "--build-arg",
                "MOD_NAME=kmm-ci-a",
                "--build-arg",
                "MOD_NAMESPACE=labs",
                "--build-arg",
                "DTK_AUTO=quay.io/dtk@sha256:1",
            ]
        );
        let volumes: Vec<String> = spec.volumes.unwrap().into_iter().map(|v| v.name).collect();
        assert_eq!(
            volumes,
            [
                "dockerfile",
                "lib-modules",
                "secret-build-secret",
                "secret-pull"
            ]
        );
        let mounts: Vec<String> = spec.containers[0]
            .volume_mounts
            .clone()
            .unwrap()
            .into_iter()
            .map(|m| m.mount_path)
            .collect();
        assert_eq!(
            mounts,
            [
                "/workspace",
                "/host/lib/modules",
                "/run/secrets/build-secret",
                "/kaniko/.docker"
            ]
        );
        assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
        assert!(spec.node_selector.is_none());
    }

    #[test]
    fn hash_follows_the_dockerfile() {
        let image = image_spec();
        let secret = LocalObjectReference {
            name: "pull".into(),
        };
        let build = build();
        let hash = |dockerfile: &str| {
            render_build_pod(&BuildPodInput {
                target: target(&image, &secret),
                build: &build,
                dockerfile,
                build_image: "kaniko:1",
                dtk_image: None,
            })
            .metadata
            .annotations
            .unwrap()[annotation::LAST_HASH]
                .clone()
        };
        assert_eq!(hash("FROM a"), hash("FROM a"));
        assert_ne!(hash("FROM a"), hash("FROM b"));
    }

    #[test]
    fn kaniko_tag_keeps_a_registry_port() {
        let cases = [
            (
                "gcr.io/kaniko-project/executor:latest",
                "gcr.io/kaniko-project/executor:debug",
            ),
            ("localhost:5000/kaniko", "localhost:5000/kaniko:debug"),
            (
                "localhost:5000/kaniko:v1@sha256:abc",
                "localhost:5000/kaniko:debug",
            ),
            ("kaniko", "kaniko:debug"),
        ];
        for (image, want) in cases {
            assert_eq!(with_tag(image, "debug"), want, "{image}");
        }
        let image = image_spec();
        let secret = LocalObjectReference { name: "p".into() };
        let build = Build {
            kaniko_params: Some(KanikoParams {
                tag: "debug".into(),
            }),
            ..build()
        };
        let pod = render_build_pod(&BuildPodInput {
            target: target(&image, &secret),
            build: &build,
            dockerfile: "",
            build_image: "localhost:5000/kaniko:v1",
            dtk_image: None,
        });
        assert_eq!(
            pod.spec.unwrap().containers[0].image.as_deref(),
            Some("localhost:5000/kaniko:debug")
        );
    }

    #[test]
    fn no_push_and_pull_tls() {
        let image = image_spec();
        let secret = LocalObjectReference { name: "p".into() };
        let mut t = target(&image, &secret);
        t.push = false;
        let tls = TlsOptions {
            insecure: true,
            insecure_skip_tls_verify: true,
        };
        assert_eq!(
            kaniko_push_pull_args(&t, Some(&tls)),
            ["--no-push", "--insecure-pull", "--skip-tls-verify-pull"]
        );
    }

    #[test]
    fn bad_inputs_name_what_is_missing() {
        let build = build();
        let err = dockerfile_from("labs", &build, None).unwrap_err();
        assert_eq!(
            err.to_string(),
            "ConfigMap labs/build-module (build.dockerfileConfigMap) not found"
        );
        let data = BTreeMap::from([("Dockerfile".to_owned(), "FROM a".to_owned())]);
        let err = dockerfile_from("labs", &build, Some(&data)).unwrap_err();
        assert!(
            err.to_string()
                .contains("has no key \"dockerfile\" (keys: Dockerfile)")
        );
        let err = check_build_secrets("labs", &build, |_| false).unwrap_err();
        assert_eq!(
            err.to_string(),
            "Secret labs/build-secret (build.secrets) not found"
        );
        assert!(check_build_secrets("labs", &build, |_| true).is_ok());
    }

    #[test]
    fn dtk_is_needed_only_when_mentioned_and_not_given() {
        let mut build = build();
        assert!(needs_dtk("FROM ${DTK_AUTO} AS builder", &build));
        assert!(!needs_dtk("FROM debian", &build));
        build.build_args.push(BuildArg {
            name: DTK_AUTO.into(),
            value: "mine".into(),
        });
        assert!(!needs_dtk("FROM ${DTK_AUTO}", &build));
    }

    #[test]
    fn failure_tail_keeps_the_last_lines() {
        let log: String = (1..=30).map(|i| format!("line {i}\n")).collect();
        let tail = failure_tail(&log);
        assert!(tail.starts_with("line 21"));
        assert!(tail.ends_with("line 30"));
    }
}
