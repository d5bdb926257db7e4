//! Device plugins (spec §4.7 and §4.9): the DaemonSet a Module's `devicePlugin` asks for, which
//! nodes carry the `device-plugin-target` label, which old-version DaemonSets may go, and the
//! `device-plugin-ready` / `dra-ready` node labels that follow the plugin pods' readiness.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::apps::v1::{DaemonSet, DaemonSetSpec};
use k8s_openapi::api::core::v1::{
    Container, HostPathVolumeSource, LocalObjectReference, PodSpec, PodTemplateSpec,
    SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use kmm_api::v1beta1::{CommonContainerSpec, DevicePluginSpec, Module};
use kmm_api::wire;

use crate::module_plan::NodeFacts;
use crate::targeting::{blocking_taint, selector_matches};

/// Name of the kubelet device-plugin socket volume.
pub const KUBELET_VOLUME: &str = "kubelet-device-plugins";
/// Where kubelet expects device plugin sockets.
pub const KUBELET_DEVICE_PLUGINS_PATH: &str = "/var/lib/kubelet/device-plugins";
/// Name of the device plugin container.
pub const CONTAINER_NAME: &str = "device-plugin";
/// Name of the device plugin init container.
pub const INIT_CONTAINER_NAME: &str = "device-plugin-init";
/// Priority class of device plugin pods.
pub const PRIORITY_CLASS: &str = "system-node-critical";

/// Labels of a device plugin DaemonSet, its selector and its pods.
pub fn daemonset_labels(namespace: &str, name: &str, version: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::from([
        (wire::label::MODULE_NAME.to_owned(), name.to_owned()),
        (
            wire::label::ROLE.to_owned(),
            wire::label::ROLE_DEVICE_PLUGIN.to_owned(),
        ),
    ]);
    if !version.is_empty() {
        labels.insert(
            wire::version_schedule_pod_label(namespace, name),
            version.to_owned(),
        );
    }
    labels
}

/// The module version a device plugin DaemonSet runs (`""` when unversioned).
pub fn daemonset_version(ds: &DaemonSet, namespace: &str, name: &str) -> String {
    ds.metadata
        .labels
        .as_ref()
        .and_then(|labels| labels.get(&wire::version_schedule_pod_label(namespace, name)))
        .cloned()
        .unwrap_or_default()
}

fn identity(module: &Module) -> (String, String) {
    (
        module.metadata.namespace.clone().unwrap_or_default(),
        module.metadata.name.clone().unwrap_or_default(),
    )
}

fn module_version(module: &Module) -> &str {
    module
        .spec
        .module_loader
        .as_ref()
        .map(|l| l.container.version.as_str())
        .unwrap_or_default()
}

fn non_empty<T>(items: Vec<T>) -> Option<Vec<T>> {
    (!items.is_empty()).then_some(items)
}

fn container(name: &str, spec: &CommonContainerSpec, own_mounts: Vec<VolumeMount>) -> Container {
    let mut mounts = own_mounts;
    mounts.extend(spec.volume_mounts.iter().cloned());
    Container {
        name: name.to_owned(),
        image: Some(spec.image.clone()),
        image_pull_policy: Some(spec.image_pull_policy.clone()).filter(|p| !p.is_empty()),
        command: non_empty(spec.command.clone()),
        args: non_empty(spec.args.clone()),
        env: non_empty(spec.env.clone()),
        resources: spec.resources.clone(),
        security_context: Some(SecurityContext {
            privileged: Some(true),
            ..SecurityContext::default()
        }),
        volume_mounts: non_empty(mounts),
        ..Container::default()
    }
}

/// The DaemonSet a Module's `devicePlugin` asks for, for the Module's current version. It has a
/// `generateName`, no name: the caller keeps the name of an existing one.
pub fn render_daemonset(module: &Module, plugin: &DevicePluginSpec) -> DaemonSet {
    let (ns, name) = identity(module);
    let version = module_version(module);
    let labels = daemonset_labels(&ns, &name, version);

    let node_selector = if module.spec.module_loader.is_some() {
        let mut selector = BTreeMap::from([
            (wire::module_ready_label(&ns, &name), String::new()),
            (wire::device_plugin_target_label(&ns, &name), String::new()),
        ]);
        if !version.is_empty() {
            selector.insert(
                wire::version_schedule_pod_label(&ns, &name),
                version.to_owned(),
            );
        }
        selector
    } else {
        module.spec.selector.clone()
    };
    let kubelet_mount = VolumeMount {
        name: KUBELET_VOLUME.into(),
        mount_path: KUBELET_DEVICE_PLUGINS_PATH.into(),
        ..VolumeMount::default()
    };
    let mut volumes = vec![Volume {
        name: KUBELET_VOLUME.into(),
        host_path: Some(HostPathVolumeSource {
            path: KUBELET_DEVICE_PLUGINS_PATH.into(),
            type_: Some("Directory".into()),
        }),
        ..Volume::default()
    }];
    volumes.extend(plugin.volumes.iter().cloned());

    let pod = PodSpec {
        containers: vec![container(
            CONTAINER_NAME,
            &plugin.container,
            vec![kubelet_mount],
        )],
        init_containers: plugin
            .init_container
            .as_ref()
            .map(|init| vec![container(INIT_CONTAINER_NAME, init, Vec::new())]),
        node_selector: Some(node_selector),
        priority_class_name: Some(PRIORITY_CLASS.into()),
        service_account_name: Some(plugin.service_account_name.clone()).filter(|s| !s.is_empty()),
        automount_service_account_token: plugin.automount_service_account_token,
        image_pull_secrets: module.spec.image_repo_secret.as_ref().map(|s| {
            vec![LocalObjectReference {
                name: s.name.clone(),
            }]
        }),
        tolerations: non_empty(module.spec.tolerations.clone()),
        volumes: Some(volumes),
        ..PodSpec::default()
    };
    DaemonSet {
        metadata: ObjectMeta {
            generate_name: Some(wire::device_plugin_generate_name(&name)),
            namespace: Some(ns),
            labels: Some(labels.clone()),
            owner_references: Some(vec![OwnerReference {
                api_version: format!("{}/v1beta1", wire::GROUP),
                kind: "Module".into(),
                name: name.clone(),
                uid: module.metadata.uid.clone().unwrap_or_default(),
                controller: Some(true),
                block_owner_deletion: Some(true),
            }]),
            ..ObjectMeta::default()
        },
        spec: Some(DaemonSetSpec {
            selector: LabelSelector {
                match_labels: Some(labels.clone()),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    finalizers: Some(vec![wire::finalizer::NODE_LABELER.into()]),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod),
            },
            ..DaemonSetSpec::default()
        }),
        status: None,
    }
}

/// `device-plugin-target` label changes and the node count of a Module's device plugin.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TargetPlan {
    /// Nodes that get the label.
    pub add: BTreeSet<String>,
    /// Nodes that lose it.
    pub remove: BTreeSet<String>,
    /// Schedulable nodes matching the selector (both `nodesMatchingSelectorNumber` and
    /// `desiredNumber` of `status.devicePlugin`).
    pub matching: i32,
}

/// Selected nodes whose taints the Module tolerates carry the target label; every other node
/// loses it (Go KMM leaves it on deselected nodes).
pub fn plan_target_labels(module: &Module, nodes: &[NodeFacts]) -> TargetPlan {
    let (ns, name) = identity(module);
    let label = wire::device_plugin_target_label(&ns, &name);
    let mut plan = TargetPlan::default();
    for node in nodes {
        let wanted = selector_matches(&module.spec.selector, &node.labels)
            && blocking_taint(&node.taints, &module.spec.tolerations).is_none();
        let has = node.labels.contains_key(&label);
        if wanted {
            plan.matching += 1;
            if !has {
                plan.add.insert(node.name.clone());
            }
        } else if has {
            plan.remove.insert(node.name.clone());
        }
    }
    plan
}

/// Device plugin DaemonSets of older versions that no node runs any more (only when the Module
/// loads a module: without one there is no ordered upgrade).
pub fn stale_daemonsets(module: &Module, daemonsets: &[DaemonSet]) -> Vec<String> {
    if module.spec.module_loader.is_none() {
        return Vec::new();
    }
    let (ns, name) = identity(module);
    let version = module_version(module);
    daemonsets
        .iter()
        .filter(|ds| daemonset_version(ds, &ns, &name) != version)
        .filter(|ds| {
            ds.status
                .as_ref()
                .is_none_or(|s| s.desired_number_scheduled == 0)
        })
        .filter_map(|ds| ds.metadata.name.clone())
        .collect()
}

/// A device plugin or DRA pod, as the readiness labeler sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginPod {
    /// Namespace of the pod and its Module.
    pub namespace: String,
    /// Pod name.
    pub name: String,
    /// Module name (`module.name` label).
    pub module: String,
    /// Whether the pod is a DRA driver (else a device plugin).
    pub dra: bool,
    /// The pod's Ready condition is True.
    pub ready: bool,
    /// The pod is being deleted.
    pub deleting: bool,
    /// The pod still has the `node-labeler` finalizer.
    pub has_finalizer: bool,
}

impl PluginPod {
    fn ready_label(&self) -> String {
        if self.dra {
            wire::dra_ready_label(&self.namespace, &self.module)
        } else {
            wire::device_plugin_ready_label(&self.namespace, &self.module)
        }
    }
}

/// Readiness label changes on one node and the finalizers to release.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReadyLabelPlan {
    /// Labels to set (to `""`).
    pub add: BTreeSet<String>,
    /// Labels to remove.
    pub remove: BTreeSet<String>,
    /// Pods (namespace, name) whose `node-labeler` finalizer can go: being deleted, and their
    /// label is (or is about to be) in the right state.
    pub release: Vec<(String, String)>,
}

fn is_ready_label(key: &str) -> bool {
    // Compare with the wire format through a sample, so that the strings live in one place.
    let shape = |label: fn(&str, &str) -> String| {
        let sample = label("\u{0}", "\u{0}");
        let (prefix, suffix) = sample
            .split_once("\u{0}.\u{0}")
            .map(|(p, s)| (p.to_owned(), s.to_owned()))
            .unwrap_or_default();
        key.strip_prefix(&prefix)
            .and_then(|rest| rest.strip_suffix(&suffix))
            .is_some_and(|middle| middle.contains('.'))
    };
    shape(wire::device_plugin_ready_label) || shape(wire::dra_ready_label)
}

/// The readiness labels of one node from the plugin pods on it: a label for every module with a
/// Ready pod that is not being deleted; no readiness label for modules without one.
pub fn plan_ready_labels(
    node_labels: &BTreeMap<String, String>,
    pods: &[PluginPod],
) -> ReadyLabelPlan {
    let wanted: BTreeSet<String> = pods
        .iter()
        .filter(|p| p.ready && !p.deleting)
        .map(PluginPod::ready_label)
        .collect();
    let mut plan = ReadyLabelPlan::default();
    for label in &wanted {
        if !node_labels.contains_key(label) {
            plan.add.insert(label.clone());
        }
    }
    for key in node_labels.keys() {
        if is_ready_label(key) && !wanted.contains(key) {
            plan.remove.insert(key.clone());
        }
    }
    plan.release = pods
        .iter()
        .filter(|p| p.deleting && p.has_finalizer)
        .map(|p| (p.namespace.clone(), p.name.clone()))
        .collect();
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Taint;
    use serde_json::json;

    fn module(spec: serde_json::Value) -> Module {
        let mut m: Module = serde_json::from_value(json!({
            "apiVersion": "kmm.sigs.x-k8s.io/v1beta1", "kind": "Module",
            "metadata": {"name": "kmod", "namespace": "labs", "uid": "u-1"},
            "spec": spec
        }))
        .unwrap();
        m.metadata.uid = Some("u-1".into());
        m
    }

    fn with_loader(version: &str) -> Module {
        module(json!({
            "selector": {"role": "gpu"},
            "imageRepoSecret": {"name": "pull"},
            "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "moduleLoader": {"container": {
                "version": version,
                "modprobe": {"moduleName": "kmod"},
                "kernelMappings": [{"regexp": "^.+$", "containerImage": "r/kmod:1"}]
            }},
            "devicePlugin": {
                "serviceAccountName": "dp-sa",
                "container": {
                    "image": "r/dp:1", "args": ["--x"],
                    "volumeMounts": [{"name": "dev", "mountPath": "/dev"}]
                },
                "initContainer": {"image": "r/init:1"},
                "volumes": [{"name": "dev", "hostPath": {"path": "/dev"}}]
            }
        }))
    }

    #[test]
    fn daemonset_matches_go_kmm() {
        let m = with_loader("v2");
        let ds = render_daemonset(&m, m.spec.device_plugin.as_ref().unwrap());
        let version_label = wire::version_schedule_pod_label("labs", "kmod");
        let labels = BTreeMap::from([
            (wire::label::MODULE_NAME.to_owned(), "kmod".to_owned()),
            (wire::label::ROLE.to_owned(), "device-plugin".to_owned()),
            (version_label.clone(), "v2".to_owned()),
        ]);
        assert_eq!(
            ds.metadata.generate_name.as_deref(),
            Some("kmod-device-plugin-")
        );
        assert_eq!(ds.metadata.namespace.as_deref(), Some("labs"));
        assert_eq!(ds.metadata.labels.as_ref(), Some(&labels));
        let owner = &ds.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!((owner.kind.as_str(), owner.uid.as_str()), ("Module", "u-1"));
        assert_eq!(owner.controller, Some(true));
        let spec = ds.spec.unwrap();
        assert_eq!(spec.selector.match_labels.as_ref(), Some(&labels));
        let template = spec.template.metadata.unwrap();
        assert_eq!(template.labels.as_ref(), Some(&labels));
        assert_eq!(
            template.finalizers,
            Some(vec!["kmm.node.kubernetes.io/node-labeler".to_owned()])
        );
        let pod = spec.template.spec.unwrap();
        assert_eq!(
            pod.node_selector,
            Some(BTreeMap::from([
                (
                    "kmm.node.kubernetes.io/labs.kmod.ready".to_owned(),
                    String::new()
                ),
                (
                    "kmm.node.kubernetes.io/labs.kmod.device-plugin-target".to_owned(),
                    String::new()
                ),
                (version_label, "v2".to_owned()),
            ]))
        );
        assert_eq!(
            pod.priority_class_name.as_deref(),
            Some("system-node-critical")
        );
        assert_eq!(pod.service_account_name.as_deref(), Some("dp-sa"));
        assert_eq!(pod.image_pull_secrets.unwrap()[0].name, "pull");
        assert_eq!(pod.tolerations.unwrap()[0].key.as_deref(), Some("gpu"));
        let main = &pod.containers[0];
        assert_eq!(main.name, "device-plugin");
        assert_eq!(main.image.as_deref(), Some("r/dp:1"));
        assert_eq!(main.args, Some(vec!["--x".to_owned()]));
        assert_eq!(
            main.security_context.as_ref().unwrap().privileged,
            Some(true)
        );
        let mounts: Vec<(&str, &str)> = main
            .volume_mounts
            .iter()
            .flatten()
            .map(|m| (m.name.as_str(), m.mount_path.as_str()))
            .collect();
        assert_eq!(
            mounts,
            [
                ("kubelet-device-plugins", "/var/lib/kubelet/device-plugins"),
                ("dev", "/dev")
            ]
        );
        let init = &pod.init_containers.unwrap()[0];
        assert_eq!(
            (init.name.as_str(), init.image.as_deref()),
            ("device-plugin-init", Some("r/init:1"))
        );
        let volumes = pod.volumes.unwrap();
        assert_eq!(volumes[0].name, "kubelet-device-plugins");
        let host = volumes[0].host_path.as_ref().unwrap();
        assert_eq!(
            (host.path.as_str(), host.type_.as_deref()),
            ("/var/lib/kubelet/device-plugins", Some("Directory"))
        );
        assert_eq!(volumes[1].name, "dev");
    }

    #[test]
    fn without_loader_or_version_the_selector_is_simpler() {
        let unversioned = with_loader("");
        let ds = render_daemonset(
            &unversioned,
            unversioned.spec.device_plugin.as_ref().unwrap(),
        );
        let pod = ds.spec.unwrap().template.spec.unwrap();
        assert_eq!(pod.node_selector.unwrap().len(), 2);
        assert_eq!(ds.metadata.labels.unwrap().len(), 2);

        let mut no_loader = with_loader("v1");
        no_loader.spec.module_loader = None;
        let ds = render_daemonset(&no_loader, no_loader.spec.device_plugin.as_ref().unwrap());
        let pod = ds.spec.unwrap().template.spec.unwrap();
        assert_eq!(
            pod.node_selector,
            Some(BTreeMap::from([("role".to_owned(), "gpu".to_owned())]))
        );
    }

    fn node(name: &str, labels: &[(&str, &str)], taints: &[(&str, &str)]) -> NodeFacts {
        NodeFacts {
            name: name.into(),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            taints: taints
                .iter()
                .map(|(key, effect)| Taint {
                    key: (*key).into(),
                    effect: (*effect).into(),
                    ..Taint::default()
                })
                .collect(),
            kernel_version: "6.1.0".into(),
        }
    }

    #[test]
    fn target_label_on_selected_schedulable_nodes_only() {
        let m = with_loader("");
        let target = "kmm.node.kubernetes.io/labs.kmod.device-plugin-target";
        let nodes = [
            node("new", &[("role", "gpu")], &[]),
            node("kept", &[("role", "gpu"), (target, "")], &[]),
            node("tolerated", &[("role", "gpu")], &[("gpu", "NoSchedule")]),
            node(
                "cordoned",
                &[("role", "gpu"), (target, "")],
                &[(wire::TAINT_UNSCHEDULABLE, "NoSchedule")],
            ),
            node("deselected", &[(target, "")], &[]),
            node("other", &[], &[]),
        ];
        let plan = plan_target_labels(&m, &nodes);
        assert_eq!(plan.add, BTreeSet::from(["new".into(), "tolerated".into()]));
        assert_eq!(
            plan.remove,
            BTreeSet::from(["cordoned".into(), "deselected".into()])
        );
        assert_eq!(plan.matching, 3);
    }

    fn ds(version: Option<&str>, desired: i32) -> DaemonSet {
        let mut labels = BTreeMap::new();
        if let Some(v) = version {
            labels.insert(
                wire::version_schedule_pod_label("labs", "kmod"),
                v.to_owned(),
            );
        }
        DaemonSet {
            metadata: ObjectMeta {
                name: Some(format!("ds-{}-{desired}", version.unwrap_or("none"))),
                labels: Some(labels),
                ..ObjectMeta::default()
            },
            status: Some(k8s_openapi::api::apps::v1::DaemonSetStatus {
                desired_number_scheduled: desired,
                ..Default::default()
            }),
            ..DaemonSet::default()
        }
    }

    #[test]
    fn old_versions_go_once_no_node_runs_them() {
        let m = with_loader("v2");
        let all = [
            ds(Some("v2"), 0),
            ds(Some("v1"), 1),
            ds(Some("v1"), 0),
            ds(None, 0),
        ];
        assert_eq!(stale_daemonsets(&m, &all), ["ds-v1-0", "ds-none-0"]);
        let mut no_loader = m.clone();
        no_loader.spec.module_loader = None;
        assert!(stale_daemonsets(&no_loader, &all).is_empty());
    }

    fn pod(name: &str, module: &str, dra: bool, ready: bool, deleting: bool) -> PluginPod {
        PluginPod {
            namespace: "labs".into(),
            name: name.into(),
            module: module.into(),
            dra,
            ready,
            deleting,
            has_finalizer: true,
        }
    }

    #[test]
    fn ready_labels_follow_the_pods() {
        let dp = |m: &str| wire::device_plugin_ready_label("labs", m);
        let dra = |m: &str| wire::dra_ready_label("labs", m);
        let labels: BTreeMap<String, String> = [
            (dp("stays"), ""),
            (dp("gone"), ""),
            (dp("not-ready"), ""),
            (dra("replaced"), ""),
            (wire::module_ready_label("labs", "gone"), ""),
            (
                "kmm.node.kubernetes.io/legacy.device-plugin-ready".into(),
                "",
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k, v.to_owned()))
        .collect();
        let pods = [
            pod("a", "stays", false, true, false),
            pod("b", "not-ready", false, false, false),
            pod("c", "replaced", true, true, true),
            pod("d", "replaced", true, true, false),
            pod("e", "new", true, true, false),
            pod("f", "gone", false, true, true),
        ];
        let plan = plan_ready_labels(&labels, &pods);
        assert_eq!(plan.add, BTreeSet::from([dra("new")]));
        assert_eq!(plan.remove, BTreeSet::from([dp("gone"), dp("not-ready")]));
        assert_eq!(
            plan.release,
            [
                ("labs".to_owned(), "c".to_owned()),
                ("labs".to_owned(), "f".to_owned())
            ]
        );
    }
}
