//! Image existence through a node's container runtime (Go KMM 2.4+): a pod whose only
//! container runs the module image with `exit 0`. Rendering, reading a pull pod's outcome and
//! planning a pass are pure; the reconciler does the API calls.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{Container, LocalObjectReference, Pod, PodSpec};
use kmm_api::v1beta1::{ModuleImageSpec, ModuleImageState, ModuleImagesConfig};
use kmm_api::wire::{self, label};
use kube::api::ObjectMeta;
use kube::{Resource, ResourceExt};

use super::plan::{Finding, needs_check};

/// Name of the pull pod's only container.
pub const PULLER_CONTAINER: &str = "puller";

/// The pull pod type of an image: one attempt when a failure leads somewhere (build, sign, or
/// "do not wait"), otherwise retried by the kubelet until the image appears.
pub fn pull_pod_type(image: &ModuleImageSpec) -> &'static str {
    if image.build.is_some() || image.sign.is_some() || image.skip_wait_missing_image {
        label::PULL_POD_ONE_TIME
    } else {
        label::PULL_POD_UNTIL_SUCCESS
    }
}

/// The pull pod of `image` for `mic`, exactly as Go KMM renders it (§4.3).
pub fn render_pull_pod(mic: &ModuleImagesConfig, image: &ModuleImageSpec) -> Pod {
    let name = mic.name_any();
    Pod {
        metadata: ObjectMeta {
            generate_name: Some(wire::pull_pod_generate_name(&name)),
            namespace: mic.namespace(),
            labels: Some(BTreeMap::from([
                (label::IMAGE_OWNER.to_owned(), name),
                (
                    label::PULL_POD_TYPE.to_owned(),
                    pull_pod_type(image).to_owned(),
                ),
            ])),
            // As controller-runtime's SetControllerReference: controller and blocking.
            owner_references: mic.controller_owner_ref(&()).map(|mut owner| {
                owner.block_owner_deletion = Some(true);
                vec![owner]
            }),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            containers: vec![Container {
                name: PULLER_CONTAINER.to_owned(),
                image: Some(image.image.clone()),
                command: Some(vec!["/bin/sh".into(), "-c".into(), "exit 0".into()]),
                image_pull_policy: Some(mic.spec.image_pull_policy.clone()),
                ..Container::default()
            }],
            restart_policy: Some("Never".into()),
            image_pull_secrets: mic.spec.image_repo_secret.as_ref().map(|secret| {
                vec![LocalObjectReference {
                    name: secret.name.clone(),
                }]
            }),
            tolerations: (!mic.spec.tolerations.is_empty()).then(|| mic.spec.tolerations.clone()),
            ..PodSpec::default()
        }),
        status: None,
    }
}

/// How far a pull pod got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PullPodPhase {
    /// Still pulling or starting.
    InProgress,
    /// The image was pulled and the container ran.
    Succeeded,
    /// The kubelet cannot pull the image (ErrImagePull / ImagePullBackOff); the message is the
    /// kubelet's.
    PullFailed(String),
    /// Failed or Unknown: something other than the pull went wrong.
    Unexpected(String),
}

/// Reads a pull pod's status (Go KMM's rules; a Pending pod waiting for another reason, such as
/// ContainerCreating, is still in progress).
pub fn pull_pod_phase(pod: &Pod) -> PullPodPhase {
    let status = pod.status.as_ref();
    let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or("Pending");
    match phase {
        "Succeeded" => PullPodPhase::Succeeded,
        "Failed" | "Unknown" => PullPodPhase::Unexpected(failure_message(pod, phase)),
        "Pending" => status
            .and_then(|s| s.container_statuses.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|c| c.state.as_ref()?.waiting.as_ref())
            .find(|w| {
                matches!(
                    w.reason.as_deref(),
                    Some("ImagePullBackOff" | "ErrImagePull")
                )
            })
            .map_or(PullPodPhase::InProgress, |w| {
                let reason = w.reason.clone().unwrap_or_default();
                PullPodPhase::PullFailed(match w.message.as_deref() {
                    Some(message) if !message.is_empty() => format!("{reason}: {message}"),
                    _ => reason,
                })
            }),
        _ => PullPodPhase::InProgress,
    }
}

fn failure_message(pod: &Pod, phase: &str) -> String {
    let status = pod.status.as_ref();
    let terminated = status
        .and_then(|s| s.container_statuses.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|c| c.state.as_ref()?.terminated.as_ref())
        .next();
    let mut parts = vec![format!("pull pod {} ended {phase}", pod.name_any())];
    if let Some(reason) = status.and_then(|s| s.reason.as_deref()) {
        parts.push(reason.to_owned());
    }
    if let Some(message) = status.and_then(|s| s.message.as_deref()) {
        parts.push(message.to_owned());
    }
    if let Some(t) = terminated {
        let mut text = format!("exit code {}", t.exit_code);
        if let Some(reason) = &t.reason {
            text.push_str(&format!(" ({reason})"));
        }
        if let Some(message) = t.message.as_deref().filter(|m| !m.is_empty()) {
            text.push_str(&format!(": {message}"));
        }
        parts.push(text);
    }
    parts.join(": ")
}

/// The image a pull pod pulls.
pub fn pulled_image(pod: &Pod) -> Option<&str> {
    let containers = &pod.spec.as_ref()?.containers;
    containers
        .iter()
        .find(|c| c.name == PULLER_CONTAINER)
        .or_else(|| containers.first())?
        .image
        .as_deref()
}

/// What one pass does with the pull pods.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PullPlan {
    /// Findings per image, in pod order.
    pub findings: Vec<(String, Finding, String)>,
    /// Pods to delete once the status is written.
    pub delete: Vec<String>,
}

/// Reads the MIC's pull pods: finished ones give findings and are deleted (Failed/Unknown ones
/// too, unlike Go KMM, so that the pull is retried); an until-success pod that cannot pull stays
/// and reports PullFailed; pods of images no longer in the spec are deleted.
pub fn read_pull_pods(images: &[&ModuleImageSpec], pods: &[Pod]) -> PullPlan {
    let wanted: BTreeSet<&str> = images.iter().map(|i| i.image.as_str()).collect();
    let mut plan = PullPlan::default();
    for pod in pods {
        if pod.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let name = pod.name_any();
        let Some(image) = pulled_image(pod).filter(|i| wanted.contains(i)) else {
            plan.delete.push(name);
            continue;
        };
        let one_time = pod.labels().get(label::PULL_POD_TYPE).map(String::as_str)
            == Some(label::PULL_POD_ONE_TIME);
        let (finding, message, delete) = match pull_pod_phase(pod) {
            PullPodPhase::InProgress => continue,
            PullPodPhase::Succeeded => (Finding::Exists, String::new(), true),
            PullPodPhase::PullFailed(message) if one_time => (Finding::Missing, message, true),
            PullPodPhase::PullFailed(message) => (Finding::PullFailed, message, false),
            PullPodPhase::Unexpected(message) => (Finding::PullPodFailed, message, true),
        };
        plan.findings.push((image.to_owned(), finding, message));
        if delete {
            plan.delete.push(name);
        }
    }
    plan
}

/// Images that need a new pull pod: still to be checked, allowed to be tried now (`ready`), and
/// without a pull pod that stays.
pub fn images_to_pull<'a>(
    images: &[&'a ModuleImageSpec],
    states: &BTreeMap<String, ModuleImageState>,
    pods: &[Pod],
    deleted: &[String],
    ready: impl Fn(&str) -> bool,
) -> Vec<&'a ModuleImageSpec> {
    let staying: BTreeSet<&str> = pods
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| !deleted.contains(&p.name_any()))
        .filter_map(pulled_image)
        .collect();
    images
        .iter()
        .copied()
        .filter(|image| !staying.contains(image.image.as_str()))
        .filter(|image| needs_check(image, &super::plan::state_of(states, &image.image)))
        .filter(|image| ready(&image.image))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        ContainerState, ContainerStateTerminated, ContainerStateWaiting, ContainerStatus,
        PodStatus, Toleration,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use kmm_api::v1beta1::{Build, ImageState, ModuleImagesConfigSpec, Sign};

    fn image(name: &str) -> ModuleImageSpec {
        ModuleImageSpec {
            image: name.into(),
            kernel_version: "6.1.0".into(),
            dir_name: "/opt".into(),
            ..ModuleImageSpec::default()
        }
    }

    fn mic(images: Vec<ModuleImageSpec>) -> ModuleImagesConfig {
        let mut mic = ModuleImagesConfig::new(
            "kmod",
            ModuleImagesConfigSpec {
                images,
                image_repo_secret: Some(LocalObjectReference {
                    name: "pull-secret".into(),
                }),
                image_pull_policy: "Always".into(),
                tolerations: vec![Toleration {
                    key: Some("k".into()),
                    operator: Some("Exists".into()),
                    ..Toleration::default()
                }],
                ..ModuleImagesConfigSpec::default()
            },
        );
        mic.metadata.namespace = Some("ns".into());
        mic.metadata.uid = Some("uid-1".into());
        mic
    }

    #[test]
    fn pull_pod_type_follows_go() {
        let plain = image("r/a:1");
        let mut build = plain.clone();
        build.build = Some(Build::default());
        let mut sign = plain.clone();
        sign.sign = Some(Sign::default());
        let mut skip = plain.clone();
        skip.skip_wait_missing_image = true;
        assert_eq!(pull_pod_type(&plain), "until-success");
        assert_eq!(pull_pod_type(&build), "one-time-pull");
        assert_eq!(pull_pod_type(&sign), "one-time-pull");
        assert_eq!(pull_pod_type(&skip), "one-time-pull");
    }

    #[test]
    fn pull_pod_is_rendered_like_go_kmm() {
        let m = mic(vec![image("r/a:1")]);
        let pod = render_pull_pod(&m, &m.spec.images[0]);
        let json = serde_json::to_value(&pod).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "generateName": "kmod-pull-pod-",
                    "namespace": "ns",
                    "labels": {
                        "kmm.node.kubernetes.io/image-owner": "kmod",
                        "kmm.node.kubernetes.io/pull-pod-type": "until-success",
                    },
                    "ownerReferences": [{
                        "apiVersion": "kmm.sigs.x-k8s.io/v1beta1",
                        "kind": "ModuleImagesConfig",
                        "name": "kmod",
                        "uid": "uid-1",
                        "controller": true,
                        "blockOwnerDeletion": true,
                    }],
                },
                "spec": {
                    "containers": [{
                        "name": "puller",
                        "image": "r/a:1",
                        "command": ["/bin/sh", "-c", "exit 0"],
                        "imagePullPolicy": "Always",
                    }],
                    "restartPolicy": "Never",
                    "imagePullSecrets": [{"name": "pull-secret"}],
                    "tolerations": [{"key": "k", "operator": "Exists"}],
                },
            })
        );
    }

    fn pod(name: &str, img: &str, kind: &str, phase: &str) -> Pod {
        let mut p = render_pull_pod(&mic(vec![]), &image(img));
        p.metadata.name = Some(name.into());
        p.metadata
            .labels
            .get_or_insert_default()
            .insert(label::PULL_POD_TYPE.into(), kind.into());
        p.status = Some(PodStatus {
            phase: Some(phase.into()),
            ..PodStatus::default()
        });
        p
    }

    fn waiting(mut p: Pod, reason: &str) -> Pod {
        p.status.get_or_insert_default().container_statuses = Some(vec![ContainerStatus {
            name: PULLER_CONTAINER.into(),
            state: Some(ContainerState {
                waiting: Some(ContainerStateWaiting {
                    reason: Some(reason.into()),
                    message: Some("Back-off pulling image".into()),
                }),
                ..ContainerState::default()
            }),
            ..ContainerStatus::default()
        }]);
        p
    }

    #[test]
    fn pull_pod_phases() {
        let until = "until-success";
        assert_eq!(
            pull_pod_phase(&pod("p", "r/a:1", until, "Succeeded")),
            PullPodPhase::Succeeded
        );
        assert_eq!(
            pull_pod_phase(&pod("p", "r/a:1", until, "Running")),
            PullPodPhase::InProgress
        );
        assert_eq!(
            pull_pod_phase(&pod("p", "r/a:1", until, "Pending")),
            PullPodPhase::InProgress
        );
        assert_eq!(
            pull_pod_phase(&waiting(
                pod("p", "r/a:1", until, "Pending"),
                "ContainerCreating"
            )),
            PullPodPhase::InProgress
        );
        for reason in ["ImagePullBackOff", "ErrImagePull"] {
            assert_eq!(
                pull_pod_phase(&waiting(pod("p", "r/a:1", until, "Pending"), reason)),
                PullPodPhase::PullFailed(format!("{reason}: Back-off pulling image"))
            );
        }
        let mut failed = pod("p", "r/a:1", until, "Failed");
        failed.status.get_or_insert_default().container_statuses = Some(vec![ContainerStatus {
            state: Some(ContainerState {
                terminated: Some(ContainerStateTerminated {
                    exit_code: 127,
                    reason: Some("Error".into()),
                    message: Some("/bin/sh: not found".into()),
                    ..ContainerStateTerminated::default()
                }),
                ..ContainerState::default()
            }),
            ..ContainerStatus::default()
        }]);
        assert_eq!(
            pull_pod_phase(&failed),
            PullPodPhase::Unexpected(
                "pull pod p ended Failed: exit code 127 (Error): /bin/sh: not found".into()
            )
        );
        assert!(matches!(
            pull_pod_phase(&pod("p", "r/a:1", until, "Unknown")),
            PullPodPhase::Unexpected(_)
        ));
    }

    #[test]
    fn reading_pull_pods() {
        let images = [
            image("r/a:1"),
            image("r/b:1"),
            image("r/c:1"),
            image("r/d:1"),
        ];
        let refs: Vec<&ModuleImageSpec> = images.iter().collect();
        let mut terminating = pod("gone", "r/a:1", "one-time-pull", "Succeeded");
        terminating.metadata.deletion_timestamp = Some(Time(jiff::Timestamp::UNIX_EPOCH));
        let pods = [
            pod("ok", "r/a:1", "until-success", "Succeeded"),
            waiting(
                pod("wait", "r/b:1", "until-success", "Pending"),
                "ImagePullBackOff",
            ),
            waiting(
                pod("once", "r/c:1", "one-time-pull", "Pending"),
                "ErrImagePull",
            ),
            pod("boom", "r/d:1", "until-success", "Failed"),
            pod("old", "r/removed:1", "until-success", "Pending"),
            pod("run", "r/b:1", "until-success", "Running"),
            terminating,
        ];
        let plan = read_pull_pods(&refs, &pods);
        let findings: Vec<(&str, Finding)> = plan
            .findings
            .iter()
            .map(|(i, f, _)| (i.as_str(), *f))
            .collect();
        assert_eq!(
            findings,
            [
                ("r/a:1", Finding::Exists),
                ("r/b:1", Finding::PullFailed),
                ("r/c:1", Finding::Missing),
                ("r/d:1", Finding::PullPodFailed),
            ]
        );
        assert_eq!(plan.delete, ["ok", "once", "boom", "old"]);
        assert_eq!(
            plan.findings[1].2,
            "ImagePullBackOff: Back-off pulling image"
        );

        // After the findings: a and c are settled, b keeps its pod, d's pod is deleted but
        // d waits for its backoff; e has never been pulled.
        let mut with_e = images.to_vec();
        with_e.push(image("r/e:1"));
        let refs: Vec<&ModuleImageSpec> = with_e.iter().collect();
        let settled = |img: &str, status| {
            (
                img.to_owned(),
                ModuleImageState {
                    image: img.into(),
                    status,
                    ..ModuleImageState::default()
                },
            )
        };
        let states = BTreeMap::from([
            settled("r/a:1", ImageState::Exists),
            settled("r/c:1", ImageState::NeedsBuilding),
        ]);
        let pull: Vec<&str> = images_to_pull(&refs, &states, &pods, &plan.delete, |i| i != "r/d:1")
            .iter()
            .map(|i| i.image.as_str())
            .collect();
        assert_eq!(pull, ["r/e:1"]);
        let pull: Vec<&str> = images_to_pull(&refs, &states, &pods, &plan.delete, |_| true)
            .iter()
            .map(|i| i.image.as_str())
            .collect();
        assert_eq!(pull, ["r/d:1", "r/e:1"]);
    }
}
