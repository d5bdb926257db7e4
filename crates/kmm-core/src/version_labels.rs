//! Ordered upgrade (the NodeLabelModuleVersion reconciler of Go KMM): from the version labels on
//! one node, which `version-worker-pod` (W) and `version-schedule-pod` (S) labels to add or
//! delete so that a module moves to the version of the administrator's `version-module` (M)
//! label one step at a time: device plugin off, module unloaded, new module loaded, device
//! plugin on.
//!
//! The two guards that need more than the labels are inputs: which modules still have a device
//! plugin or DRA pod on the node, and (read from the labels) whether the module is still loaded.

use std::collections::{BTreeMap, BTreeSet};

use kmm_api::wire;

/// The part of a templated label before `<ns>.<mod>`, taken from the `wire` function itself.
fn prefix_of(label: fn(&str, &str) -> String) -> String {
    let mut prefix = label("", "");
    prefix.pop(); // the dot between the empty namespace and name
    prefix
}

/// A module, by namespace and name.
pub type ModuleKey = (String, String);

/// The three version labels of one module on one node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VersionLabels {
    /// `version-module.<ns>.<mod>`, set by the administrator.
    pub module: Option<String>,
    /// `version-worker-pod.<ns>.<mod>`: the version worker pods may load.
    pub worker: Option<String>,
    /// `version-schedule-pod.<ns>.<mod>`: the version whose device plugin may run.
    pub schedule: Option<String>,
}

impl VersionLabels {
    /// Whether the next step deletes the W label, which needs to know about device plugin pods.
    pub fn wants_worker_removal(&self) -> bool {
        self.schedule.is_none()
            && self
                .worker
                .as_ref()
                .is_some_and(|w| self.module.as_ref() != Some(w))
    }
}

/// Groups a node's version labels by module. Only modules with at least one label appear.
pub fn version_labels_by_module(
    labels: &BTreeMap<String, String>,
) -> BTreeMap<ModuleKey, VersionLabels> {
    let module_prefix = prefix_of(wire::version_module_label);
    let worker_prefix = prefix_of(wire::version_worker_pod_label);
    let schedule_prefix = prefix_of(wire::version_schedule_pod_label);
    let mut by_module: BTreeMap<ModuleKey, VersionLabels> = BTreeMap::new();
    for (key, value) in labels {
        let (rest, slot): (&str, fn(&mut VersionLabels) -> &mut Option<String>) =
            if let Some(rest) = key.strip_prefix(&module_prefix) {
                (rest, |v| &mut v.module)
            } else if let Some(rest) = key.strip_prefix(&worker_prefix) {
                (rest, |v| &mut v.worker)
            } else if let Some(rest) = key.strip_prefix(&schedule_prefix) {
                (rest, |v| &mut v.schedule)
            } else {
                continue;
            };
        // Namespaces are DNS labels (no dots); the module name is the rest.
        let Some((ns, name)) = rest
            .split_once('.')
            .filter(|(ns, name)| !ns.is_empty() && !name.is_empty())
        else {
            continue;
        };
        let entry = by_module
            .entry((ns.to_owned(), name.to_owned()))
            .or_default();
        *slot(entry) = Some(value.clone());
    }
    by_module
}

/// The next step for one module on one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VersionStep {
    /// Nothing to do.
    None,
    /// Set the W label to this version (the module may be loaded in that version).
    AddWorker(String),
    /// Delete the W label (the module gets unloaded).
    DeleteWorker,
    /// Set the S label to this version (its device plugin may run).
    AddSchedule(String),
    /// Delete the S label (the device plugin pod leaves the node).
    DeleteSchedule,
    /// The W label must go but a device plugin or DRA pod of the module is still on the node.
    WaitForPluginPod,
    /// The W label must be set but the old version is still loaded (`.ready` label present).
    WaitForUnload,
}

/// The step the Go KMM state table gives for one module. `plugin_pod_on_node`: a device plugin
/// or DRA pod of the module runs on the node; `module_ready`: the node has the module's `.ready`
/// label.
///
/// Two combinations the Go table leaves alone are cleaned up, so that a node cannot stay stuck:
/// an S label without M and W, and an S label of another version next to W = M (both: delete S).
pub fn version_step(
    labels: &VersionLabels,
    plugin_pod_on_node: bool,
    module_ready: bool,
) -> VersionStep {
    let VersionLabels {
        module,
        worker,
        schedule,
    } = labels;
    match (module, worker, schedule) {
        (None, None, None) => VersionStep::None,
        (None, None, Some(_)) => VersionStep::DeleteSchedule,
        (None, Some(_), Some(_)) => VersionStep::DeleteSchedule,
        (None, Some(_), None) => delete_worker(plugin_pod_on_node),
        (Some(_), None, None) if module_ready => VersionStep::WaitForUnload,
        (Some(m), None, None) => VersionStep::AddWorker(m.clone()),
        // S without W: the device plugin must go before anything else happens.
        (Some(_), None, Some(_)) => VersionStep::DeleteSchedule,
        (Some(m), Some(w), None) if w == m => VersionStep::AddSchedule(m.clone()),
        (Some(_), Some(_), None) => delete_worker(plugin_pod_on_node),
        (Some(m), Some(w), Some(s)) if w == m && s == m => VersionStep::None,
        (Some(_), Some(_), Some(_)) => VersionStep::DeleteSchedule,
    }
}

fn delete_worker(plugin_pod_on_node: bool) -> VersionStep {
    if plugin_pod_on_node {
        VersionStep::WaitForPluginPod
    } else {
        VersionStep::DeleteWorker
    }
}

/// Label changes for one node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VersionLabelPlan {
    /// Labels to set.
    pub add: BTreeMap<String, String>,
    /// Labels to delete.
    pub remove: BTreeSet<String>,
    /// Modules waiting for a device plugin or DRA pod to leave the node (the caller looks again
    /// when such a pod changes).
    pub waiting_for_plugin_pods: BTreeSet<ModuleKey>,
}

/// Plans every module's next step on a node from its labels and the modules with a device plugin
/// or DRA pod on it.
pub fn plan_version_labels(
    labels: &BTreeMap<String, String>,
    plugin_pods: &BTreeSet<ModuleKey>,
) -> VersionLabelPlan {
    let mut plan = VersionLabelPlan::default();
    for ((ns, name), versions) in version_labels_by_module(labels) {
        let key = (ns, name);
        let ready = labels.contains_key(&wire::module_ready_label(&key.0, &key.1));
        match version_step(&versions, plugin_pods.contains(&key), ready) {
            VersionStep::None | VersionStep::WaitForUnload => {}
            VersionStep::AddWorker(v) => {
                plan.add
                    .insert(wire::version_worker_pod_label(&key.0, &key.1), v);
            }
            VersionStep::DeleteWorker => {
                plan.remove
                    .insert(wire::version_worker_pod_label(&key.0, &key.1));
            }
            VersionStep::AddSchedule(v) => {
                plan.add
                    .insert(wire::version_schedule_pod_label(&key.0, &key.1), v);
            }
            VersionStep::DeleteSchedule => {
                plan.remove
                    .insert(wire::version_schedule_pod_label(&key.0, &key.1));
            }
            VersionStep::WaitForPluginPod => {
                plan.waiting_for_plugin_pods.insert(key);
            }
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use VersionStep::{
        AddSchedule, AddWorker, DeleteSchedule, DeleteWorker, WaitForPluginPod, WaitForUnload,
    };

    fn v(s: &str) -> Option<String> {
        (!s.is_empty()).then(|| s.to_owned())
    }

    #[test]
    fn go_kmm_state_table() {
        // (M, W, S, plugin pod on node, module ready) → step; "" = missing.
        let rows: &[(&str, &str, &str, bool, bool, VersionStep)] = &[
            // missing missing missing: none
            ("", "", "", false, false, VersionStep::None),
            // missing present present: delete S
            ("", "v1", "v1", false, false, DeleteSchedule),
            ("", "v1", "v1", true, true, DeleteSchedule),
            // missing present missing: delete W, only without a plugin pod
            ("", "v1", "", false, true, DeleteWorker),
            ("", "v1", "", true, true, WaitForPluginPod),
            // present missing missing: add W=M, only once unloaded
            ("v2", "", "", false, false, AddWorker("v2".into())),
            ("v2", "", "", false, true, WaitForUnload),
            // present present(=M) missing: add S=M
            ("v2", "v2", "", false, true, AddSchedule("v2".into())),
            ("v2", "v2", "", true, true, AddSchedule("v2".into())),
            // present present present: none
            ("v2", "v2", "v2", true, true, VersionStep::None),
            // present different different: delete S
            ("v2", "v1", "v1", true, true, DeleteSchedule),
            // present different missing: delete W, only without a plugin pod
            ("v2", "v1", "", false, true, DeleteWorker),
            ("v2", "v1", "", true, true, WaitForPluginPod),
            // Not in the Go table (it does nothing there); cleaned up here.
            ("", "", "v1", false, false, DeleteSchedule),
            ("v2", "v2", "v1", true, true, DeleteSchedule),
            ("v2", "", "v1", true, false, DeleteSchedule),
        ];
        for (m, w, s, pod, ready, step) in rows {
            let labels = VersionLabels {
                module: v(m),
                worker: v(w),
                schedule: v(s),
            };
            assert_eq!(
                &version_step(&labels, *pod, *ready),
                step,
                "M={m:?} W={w:?} S={s:?} pod={pod} ready={ready}"
            );
            assert_eq!(
                labels.wants_worker_removal(),
                matches!(step, DeleteWorker | WaitForPluginPod),
                "M={m:?} W={w:?} S={s:?}"
            );
        }
    }

    fn node_labels(pairs: &[(String, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.clone(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn labels_are_grouped_by_module_and_others_ignored() {
        let labels = node_labels(&[
            (wire::version_module_label("ns", "a.b"), "v2"),
            (wire::version_worker_pod_label("ns", "a.b"), "v1"),
            (wire::version_schedule_pod_label("other", "m"), "v1"),
            (wire::module_ready_label("ns", "a.b"), ""),
            ("kmm.node.kubernetes.io/version-module.nodot".into(), "v1"),
            ("example.com/x".into(), "y"),
        ]);
        let groups = version_labels_by_module(&labels);
        assert_eq!(groups.len(), 2, "{groups:?}");
        assert_eq!(
            groups[&("ns".to_owned(), "a.b".to_owned())],
            VersionLabels {
                module: v("v2"),
                worker: v("v1"),
                schedule: None
            }
        );
        assert_eq!(
            groups[&("other".to_owned(), "m".to_owned())].schedule,
            v("v1")
        );
    }

    #[test]
    fn upgrade_of_one_node_walks_the_flow() {
        let (ns, m) = ("ns", "kmod");
        let key = (ns.to_owned(), m.to_owned());
        let mut labels = node_labels(&[
            (wire::version_module_label(ns, m), "v2"),
            (wire::version_worker_pod_label(ns, m), "v1"),
            (wire::version_schedule_pod_label(ns, m), "v1"),
            (wire::module_ready_label(ns, m), ""),
        ]);
        let pods = BTreeSet::from([key.clone()]);
        let apply = |labels: &mut BTreeMap<String, String>, plan: VersionLabelPlan| {
            for k in plan.remove {
                labels.remove(&k);
            }
            labels.extend(plan.add);
        };

        let plan = plan_version_labels(&labels, &pods);
        assert_eq!(
            plan.remove,
            BTreeSet::from([wire::version_schedule_pod_label(ns, m)])
        );
        apply(&mut labels, plan);

        let plan = plan_version_labels(&labels, &pods);
        assert_eq!(plan.waiting_for_plugin_pods, BTreeSet::from([key.clone()]));
        assert!(plan.add.is_empty() && plan.remove.is_empty());

        let plan = plan_version_labels(&labels, &BTreeSet::new());
        assert_eq!(
            plan.remove,
            BTreeSet::from([wire::version_worker_pod_label(ns, m)])
        );
        apply(&mut labels, plan);

        // Still loaded: wait for the unload.
        assert_eq!(
            plan_version_labels(&labels, &BTreeSet::new()),
            VersionLabelPlan::default()
        );
        labels.remove(&wire::module_ready_label(ns, m));
        let plan = plan_version_labels(&labels, &BTreeSet::new());
        assert_eq!(
            plan.add,
            BTreeMap::from([(wire::version_worker_pod_label(ns, m), "v2".to_owned())])
        );
        apply(&mut labels, plan);

        labels.insert(wire::module_ready_label(ns, m), String::new());
        let plan = plan_version_labels(&labels, &BTreeSet::new());
        assert_eq!(
            plan.add,
            BTreeMap::from([(wire::version_schedule_pod_label(ns, m), "v2".to_owned())])
        );
        apply(&mut labels, plan);
        assert_eq!(
            plan_version_labels(&labels, &pods),
            VersionLabelPlan::default()
        );
    }
}
