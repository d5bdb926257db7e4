//! The NodeModulesConfig reconciler's state machine, as a pure function: from the NMC (what
//! should be loaded, what is), the node and the worker pods on it, decide which worker pods to
//! create or delete, the new status, the node's labels and the events.
//!
//! It follows Go KMM (spec/kmm-behavior.md §4.6) with these differences: the status of a failed
//! load or unload is recorded (`lastFailure`) instead of being visible only as a crash-looping
//! pod; a cordon alone keeps a loaded module; the `<ns>.<name>.ready` label means exactly "loaded
//! with the current configuration"; the upstream early return and label-GC quirks are fixed.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{LocalObjectReference, Pod, Taint, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kmm_api::v1beta1::{
    LastFailure, ModuleConfig, ModuleItem, NodeModuleSpec, NodeModuleStatus, NodeModulesConfig,
};
use kmm_api::wire::{self, annotation, label};

use crate::targeting::blocking_taint;
use crate::worker_pod::{
    RenderError, WorkerAction, WorkerPodInput, WorkerSettings, render_worker_pod,
};

/// `(namespace, name)` of a Module.
pub type ModuleKey = (String, String);

/// What the state machine needs to know about the node.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeState {
    /// Node name.
    pub name: String,
    /// Ready condition is True.
    pub ready: bool,
    /// `status.nodeInfo.bootID`.
    pub boot_id: String,
    /// Node taints.
    pub taints: Vec<Taint>,
    /// Node labels.
    pub labels: BTreeMap<String, String>,
}

/// A worker pod on the node, as the state machine sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerPodState {
    /// Pod name.
    pub name: String,
    /// Pod namespace (= Module namespace).
    pub namespace: String,
    /// Module name (label).
    pub module: String,
    /// Load or unload.
    pub action: WorkerAction,
    /// Pod phase.
    pub phase: String,
    /// The worker container has restarted at least once (its module operation failed).
    pub restarted: bool,
    /// `worker-hash` annotation.
    pub hash: String,
    /// The config the pod was made from (`worker-config` annotation).
    pub config: Option<ModuleConfig>,
    /// `worker-tolerations` annotation.
    pub tolerations: Vec<Toleration>,
    /// `worker-module-version` annotation.
    pub version: String,
    /// First pull secret.
    pub image_repo_secret: Option<LocalObjectReference>,
    /// ServiceAccount.
    pub service_account: String,
    /// The worker's termination message of its last failed run, if any.
    pub failure: Option<String>,
    /// The pod is being deleted.
    pub deleting: bool,
    /// The pod still carries the NMC reconciler's finalizer.
    pub has_finalizer: bool,
}

impl WorkerPodState {
    fn key(&self) -> ModuleKey {
        (self.namespace.clone(), self.module.clone())
    }
}

/// Reads a worker pod; `None` for pods that are not worker pods.
pub fn worker_pod_state(pod: &Pod) -> Option<WorkerPodState> {
    let labels = pod.metadata.labels.as_ref()?;
    let action = WorkerAction::from_label(labels.get(label::WORKER_ACTION)?)?;
    let module = labels.get(label::MODULE_NAME)?.clone();
    let annotations = pod.metadata.annotations.clone().unwrap_or_default();
    let status = pod.status.as_ref();
    let worker = status
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|statuses| statuses.iter().find(|c| c.name == "worker"));
    let restarted = worker.is_some_and(|c| c.restart_count > 0);
    let terminated_message = |state: Option<&k8s_openapi::api::core::v1::ContainerState>| {
        state
            .and_then(|s| s.terminated.as_ref())
            .filter(|t| t.exit_code != 0)
            .map(|t| {
                t.message
                    .clone()
                    .unwrap_or_else(|| t.reason.clone().unwrap_or_default())
            })
    };
    let failure = worker.and_then(|c| {
        terminated_message(c.state.as_ref()).or_else(|| terminated_message(c.last_state.as_ref()))
    });
    let spec = pod.spec.as_ref();
    Some(WorkerPodState {
        name: pod.metadata.name.clone().unwrap_or_default(),
        namespace: pod.metadata.namespace.clone().unwrap_or_default(),
        module,
        action,
        phase: status.and_then(|s| s.phase.clone()).unwrap_or_default(),
        restarted,
        hash: annotations
            .get(annotation::WORKER_HASH)
            .cloned()
            .unwrap_or_default(),
        config: annotations
            .get(annotation::WORKER_CONFIG)
            .and_then(|yaml| serde_saphyr::from_str(yaml).ok()),
        tolerations: annotations
            .get(annotation::WORKER_TOLERATIONS)
            .and_then(|yaml| serde_saphyr::from_str(yaml).ok())
            .unwrap_or_default(),
        version: annotations
            .get(annotation::WORKER_MODULE_VERSION)
            .cloned()
            .unwrap_or_default(),
        image_repo_secret: spec
            .and_then(|s| s.image_pull_secrets.as_ref())
            .and_then(|s| s.first().cloned()),
        service_account: spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_default(),
        failure,
        deleting: pod.metadata.deletion_timestamp.is_some(),
        has_finalizer: pod
            .metadata
            .finalizers
            .as_ref()
            .is_some_and(|f| f.iter().any(|f| f == wire::finalizer::NMC_RECONCILER)),
    })
}

/// Drops from a worker pod everything [`worker_pod_state`] does not read (containers, volumes,
/// pod conditions, addresses), so a cache of thousands of in-flight worker pods stays small.
/// The node name is kept: pods are looked up by node.
pub fn slim_worker_pod(pod: &mut Pod) {
    if let Some(spec) = pod.spec.take() {
        pod.spec = Some(k8s_openapi::api::core::v1::PodSpec {
            node_name: spec.node_name,
            image_pull_secrets: spec.image_pull_secrets,
            service_account_name: spec.service_account_name,
            ..Default::default()
        });
    }
    if let Some(status) = pod.status.take() {
        pod.status = Some(k8s_openapi::api::core::v1::PodStatus {
            phase: status.phase,
            container_statuses: status.container_statuses.map(|statuses| {
                statuses
                    .into_iter()
                    .map(|c| k8s_openapi::api::core::v1::ContainerStatus {
                        name: c.name,
                        restart_count: c.restart_count,
                        state: c.state,
                        last_state: c.last_state,
                        ..Default::default()
                    })
                    .collect()
            }),
            ..Default::default()
        });
    }
}

/// Splits a worker termination message `Reason: message` into its parts.
pub fn parse_failure(message: &str) -> (String, String) {
    let message = message.trim();
    match message.split_once(": ") {
        Some((reason, rest))
            if reason.starts_with(|c: char| c.is_ascii_uppercase())
                && reason.chars().all(|c| c.is_ascii_alphanumeric()) =>
        {
            (reason.to_owned(), rest.to_owned())
        }
        _ => ("WorkerFailed".to_owned(), message.to_owned()),
    }
}

/// A pod to delete: its finalizer comes off, then it is deleted.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct PodRef {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

/// An event on the Node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeEvent {
    /// `Normal` or `Warning`.
    pub type_: &'static str,
    /// Reason.
    pub reason: &'static str,
    /// Message.
    pub note: String,
    /// The module it is about.
    pub module: ModuleKey,
}

/// Event reason of a failed load.
pub const REASON_LOAD_FAILED: &str = "ModuleLoadFailed";
/// Event reason of a failed unload.
pub const REASON_UNLOAD_FAILED: &str = "ModuleUnloadFailed";

/// What the NMC reconciler does in one pass.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NmcPlan {
    /// The complete new `status.modules`.
    pub status: Vec<NodeModuleStatus>,
    /// Worker pods to create.
    pub create: Vec<Pod>,
    /// Worker pods to release and delete (after the status is written).
    pub delete: Vec<PodRef>,
    /// Node labels to set.
    pub add_node_labels: BTreeMap<String, String>,
    /// Node labels to remove.
    pub remove_node_labels: BTreeSet<String>,
    /// NMC `module-in-use` labels to remove.
    pub remove_nmc_labels: BTreeSet<String>,
    /// Events on the Node.
    pub events: Vec<NodeEvent>,
    /// Modules whose pods could not be rendered.
    pub errors: Vec<(ModuleKey, RenderError)>,
}

fn key_of(item: &ModuleItem) -> ModuleKey {
    (item.namespace.clone(), item.name.clone())
}

/// The state machine. `nmc_uid` is the NMC's UID (worker pods' controller); `now` stamps failures.
pub fn plan_nmc(
    nmc: &NodeModulesConfig,
    node: &NodeState,
    pods: &[WorkerPodState],
    settings: &WorkerSettings,
    now: &Time,
) -> NmcPlan {
    let mut plan = NmcPlan::default();
    let nmc_uid = nmc.metadata.uid.clone().unwrap_or_default();
    let spec: BTreeMap<ModuleKey, &NodeModuleSpec> = nmc
        .spec
        .modules
        .iter()
        .map(|m| (key_of(&m.item), m))
        .collect();
    let mut status: BTreeMap<ModuleKey, NodeModuleStatus> = nmc
        .status
        .as_ref()
        .map(|s| {
            s.modules
                .iter()
                .map(|m| (key_of(&m.item), m.clone()))
                .collect()
        })
        .unwrap_or_default();
    let mut live_pods: BTreeMap<ModuleKey, &WorkerPodState> = BTreeMap::new();
    // Worker pods are named per (node, module): while one is terminating, a new one for the same
    // module cannot be created yet (it would only get 409 Conflict); its removal wakes the node.
    let mut terminating: BTreeSet<ModuleKey> = BTreeSet::new();

    // 1. Outcomes of worker pods become status.
    for pod in pods {
        let key = pod.key();
        let delete = || PodRef {
            namespace: pod.namespace.clone(),
            name: pod.name.clone(),
        };
        if pod.deleting {
            if pod.has_finalizer {
                plan.delete.push(delete());
            }
            terminating.insert(key);
            continue;
        }
        match (pod.phase.as_str(), pod.action) {
            ("Succeeded", WorkerAction::Unload) => {
                status.remove(&key);
                plan.delete.push(delete());
                terminating.insert(key.clone());
                plan.events.push(NodeEvent {
                    type_: "Normal",
                    reason: wire::reason::MODULE_UNLOADED,
                    note: format!("Module {}/{} unloaded from the kernel", key.0, key.1),
                    module: key,
                });
            }
            ("Succeeded", WorkerAction::Load) => {
                status.insert(key.clone(), loaded_status(pod, node));
                plan.delete.push(delete());
                terminating.insert(key);
            }
            ("Failed", _) => {
                record_failure(&mut status, &mut plan, pod, now);
                plan.delete.push(delete());
                terminating.insert(key);
            }
            _ => {
                if !spec.contains_key(&key) && !status.contains_key(&key) {
                    plan.delete.push(delete());
                    continue;
                }
                if pod.restarted {
                    record_failure(&mut status, &mut plan, pod, now);
                }
                live_pods.insert(key, pod);
            }
        }
    }

    let render = |item: &ModuleItem, config: &ModuleConfig, action: WorkerAction| {
        let input = WorkerPodInput {
            node: &node.name,
            nmc_uid: &nmc_uid,
            module: &item.name,
            namespace: &item.namespace,
            service_account: &item.service_account_name,
            image_repo_secret: item.image_repo_secret.as_ref(),
            tolerations: &item.tolerations,
            version: &item.version,
            config,
        };
        render_worker_pod(&input, action, settings)
    };
    let push_pod = |plan: &mut NmcPlan, key: &ModuleKey, pod: Result<Pod, RenderError>| match pod {
        Ok(_) if terminating.contains(key) => {}
        Ok(pod) => plan.create.push(pod),
        Err(err) => plan.errors.push((key.clone(), err)),
    };

    // 2. Spec entries: load, reload or unload-then-load.
    let mut keep_ready = BTreeSet::new();
    for (key, entry) in &spec {
        let loaded = status.get(key).and_then(|s| s.config.as_ref());
        let is_current = loaded == Some(&entry.config);
        if let Some(taint) = blocking_taint(&node.taints, &entry.item.tolerations) {
            // A cordon alone keeps a module that is loaded with the current config.
            if is_current
                && taint.key == wire::TAINT_UNSCHEDULABLE
                && only_cordon(&node.taints, &entry.item.tolerations)
            {
                keep_ready.insert(key.clone());
            }
            continue;
        }
        let existing = live_pods.get(key);
        match existing {
            None => {
                let status_entry = status.get(key);
                match loaded {
                    None => push_pod(
                        &mut plan,
                        key,
                        render(&entry.item, &entry.config, WorkerAction::Load),
                    ),
                    Some(old) if old != &entry.config => {
                        if old.kernel_version == entry.config.kernel_version {
                            let item = status_entry.map_or(&entry.item, |s| &s.item);
                            push_pod(&mut plan, key, render(item, old, WorkerAction::Unload));
                        } else {
                            push_pod(
                                &mut plan,
                                key,
                                render(&entry.item, &entry.config, WorkerAction::Load),
                            );
                        }
                    }
                    Some(_) => {
                        let rebooted =
                            status_entry.is_some_and(|s| node.ready && s.boot_id != node.boot_id);
                        if rebooted {
                            push_pod(
                                &mut plan,
                                key,
                                render(&entry.item, &entry.config, WorkerAction::Load),
                            );
                        }
                    }
                }
            }
            Some(pod) if pod.action == WorkerAction::Load && pod.restarted => {
                if let Ok(desired) = render(&entry.item, &entry.config, WorkerAction::Load)
                    && desired_hash(&desired) != pod.hash
                {
                    plan.delete.push(PodRef {
                        namespace: pod.namespace.clone(),
                        name: pod.name.clone(),
                    });
                }
            }
            Some(_) => {}
        }
    }

    // 3. Status without spec: unload what is still loaded.
    let orphans: Vec<ModuleKey> = status
        .keys()
        .filter(|k| !spec.contains_key(*k))
        .cloned()
        .collect();
    for key in orphans {
        let Some(entry) = status.get(&key).cloned() else {
            continue;
        };
        let rebooted = node.ready && !entry.boot_id.is_empty() && entry.boot_id != node.boot_id;
        match (live_pods.get(&key), entry.config.as_ref()) {
            (_, None) => {
                // Never loaded (only a failure was recorded): nothing to unload.
                if let Some(pod) = live_pods.get(&key) {
                    plan.delete.push(PodRef {
                        namespace: pod.namespace.clone(),
                        name: pod.name.clone(),
                    });
                }
                status.remove(&key);
            }
            (None, Some(_)) if rebooted => {
                status.remove(&key);
            }
            (None, Some(config)) => push_pod(
                &mut plan,
                &key,
                render(&entry.item, config, WorkerAction::Unload),
            ),
            (Some(pod), Some(config)) => match pod.action {
                WorkerAction::Load => plan.delete.push(PodRef {
                    namespace: pod.namespace.clone(),
                    name: pod.name.clone(),
                }),
                WorkerAction::Unload if pod.restarted => {
                    if let Ok(desired) = render(&entry.item, config, WorkerAction::Unload)
                        && desired_hash(&desired) != pod.hash
                    {
                        plan.delete.push(PodRef {
                            namespace: pod.namespace.clone(),
                            name: pod.name.clone(),
                        });
                    }
                }
                WorkerAction::Unload => {}
            },
        }
    }

    // 4. The module-in-use labels of modules that are neither wanted, loaded nor being worked on.
    let in_use_suffix = ".module-in-use";
    for key in nmc.metadata.labels.iter().flatten().map(|(k, _)| k) {
        let Some((ns, name)) =
            parse_module_label(key, "beta.kmm.node.kubernetes.io/", in_use_suffix)
        else {
            continue;
        };
        let module = (ns, name);
        if !spec.contains_key(&module)
            && !status.contains_key(&module)
            && !live_pods.contains_key(&module)
        {
            plan.remove_nmc_labels.insert(key.clone());
        }
    }

    // 5. Node labels and events.
    for key in node.labels.keys() {
        if wire::is_deprecated_ready_label(key) {
            plan.remove_node_labels.insert(key.clone());
        }
    }
    let mut wanted_ready: BTreeMap<ModuleKey, String> = BTreeMap::new();
    for (key, entry) in &spec {
        let current = status
            .get(key)
            .is_some_and(|s| s.config.as_ref() == Some(&entry.config));
        let blocked = blocking_taint(&node.taints, &entry.item.tolerations).is_some();
        if current && (!blocked || keep_ready.contains(key)) {
            wanted_ready.insert(
                key.clone(),
                status
                    .get(key)
                    .map(|s| s.item.version.clone())
                    .unwrap_or_default(),
            );
        }
    }
    for (key, version) in &wanted_ready {
        let ready = wire::module_ready_label(&key.0, &key.1);
        if !node.labels.contains_key(&ready) {
            plan.add_node_labels.insert(ready, String::new());
            plan.events.push(NodeEvent {
                type_: "Normal",
                reason: wire::reason::MODULE_LOADED,
                note: format!("Module {}/{} loaded into the kernel", key.0, key.1),
                module: key.clone(),
            });
        }
        let version_label = wire::module_version_ready_label(&key.0, &key.1);
        if version.is_empty() {
            if node.labels.contains_key(&version_label) {
                plan.remove_node_labels.insert(version_label);
            }
        } else if node.labels.get(&version_label) != Some(version) {
            plan.add_node_labels.insert(version_label, version.clone());
        }
    }
    for key in node.labels.keys() {
        let Some(module) = parse_module_label(key, "kmm.node.kubernetes.io/", ".ready") else {
            continue;
        };
        if wanted_ready.contains_key(&module) {
            continue;
        }
        plan.remove_node_labels.insert(key.clone());
        plan.remove_node_labels
            .insert(wire::module_version_ready_label(&module.0, &module.1));
    }
    plan.remove_node_labels
        .retain(|label| node.labels.contains_key(label));

    plan.status = status.into_values().collect();
    plan.delete.sort();
    plan.delete.dedup();
    plan
}

/// Whether every taint that blocks the module is the cordon taint.
fn only_cordon(taints: &[Taint], tolerations: &[Toleration]) -> bool {
    taints
        .iter()
        .filter(|t| blocking_taint(std::slice::from_ref(*t), tolerations).is_some())
        .all(|t| t.key == wire::TAINT_UNSCHEDULABLE)
}

fn desired_hash(pod: &Pod) -> String {
    pod.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(annotation::WORKER_HASH))
        .cloned()
        .unwrap_or_default()
}

fn loaded_status(pod: &WorkerPodState, node: &NodeState) -> NodeModuleStatus {
    NodeModuleStatus {
        item: ModuleItem {
            image_repo_secret: pod.image_repo_secret.clone(),
            name: pod.module.clone(),
            namespace: pod.namespace.clone(),
            service_account_name: pod.service_account.clone(),
            tolerations: pod.tolerations.clone(),
            version: pod.version.clone(),
        },
        config: pod.config.clone(),
        boot_id: node.boot_id.clone(),
        last_failure: None,
    }
}

/// Records a worker failure on the module's status entry (creating one without a config when the
/// module was never loaded), with a Warning event when the failure is new.
fn record_failure(
    status: &mut BTreeMap<ModuleKey, NodeModuleStatus>,
    plan: &mut NmcPlan,
    pod: &WorkerPodState,
    now: &Time,
) {
    let Some(message) = &pod.failure else { return };
    let (reason, text) = parse_failure(message);
    let key = pod.key();
    let entry = status
        .entry(key.clone())
        .or_insert_with(|| NodeModuleStatus {
            item: ModuleItem {
                name: pod.module.clone(),
                namespace: pod.namespace.clone(),
                service_account_name: pod.service_account.clone(),
                ..ModuleItem::default()
            },
            ..NodeModuleStatus::default()
        });
    let unchanged = entry
        .last_failure
        .as_ref()
        .is_some_and(|f| f.reason == reason && f.message == text);
    if unchanged {
        return;
    }
    let (event_reason, verb) = match pod.action {
        WorkerAction::Load => (REASON_LOAD_FAILED, "load"),
        WorkerAction::Unload => (REASON_UNLOAD_FAILED, "unload"),
    };
    plan.events.push(NodeEvent {
        type_: "Warning",
        reason: event_reason,
        note: format!(
            "Module {}/{} failed to {verb}: {reason}: {text}",
            key.0, key.1
        ),
        module: key,
    });
    entry.last_failure = Some(LastFailure {
        reason,
        message: text,
        time: now.clone(),
    });
}

/// Reads `<prefix><ns>.<name><suffix>` (namespaces hold no dots, so the first dot splits).
fn parse_module_label(key: &str, prefix: &str, suffix: &str) -> Option<ModuleKey> {
    let middle = key.strip_prefix(prefix)?.strip_suffix(suffix)?;
    let (ns, name) = middle.split_once('.')?;
    if ns.is_empty() || name.is_empty() || name.ends_with(".version") || name.contains('/') {
        return None;
    }
    Some((ns.to_owned(), name.to_owned()))
}

#[cfg(test)]
mod tests;
