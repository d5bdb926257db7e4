//! The node reconciler: one pass per node writes that node's NodeModulesConfig spec from every
//! Module (one write per node, however many Modules changed), then drives the NMC state machine:
//! worker pods, NMC status, node labels and events.
//!
//! Go KMM splits this between the Module reconciler (NMC spec, one write per Module and node) and
//! the NMC reconciler; kmm-rs keeps the same objects and strings but batches per node.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{OwnerReference, Time};
use kmm_api::v1beta1::{ImageState, Module, ModuleImagesConfig, NodeModuleSpec, NodeModulesConfig};
use kmm_api::wire;
use kmm_core::module_plan::{EntryAction, NodeFacts, plan_module};
use kmm_core::nmc_plan::{NmcPlan, NodeState, WorkerPodState, plan_nmc, worker_pod_state};
use kmm_core::worker_pod::WorkerSettings;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Resource, ResourceExt};
use serde_json::json;

use super::{Context, Error, Stores};

/// What the node reconciler works with.
pub struct NodeReconciler {
    /// Shared context.
    pub ctx: Arc<Context>,
    /// Shared caches.
    pub stores: Stores,
    /// Event recorder.
    pub recorder: Recorder,
    /// Per-object backoff of failed passes.
    pub backoff: super::backoff::Backoff,
    /// This reconciler's own writes that the caches have not shown yet, per node.
    pub expectations: Expectations,
}

/// How long a pass waits for the caches to show the worker pods (or the NodeModulesConfig) it
/// created before it runs anyway (someone else may have deleted one before the watch saw it).
const CREATED_OBJECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// How long a pass waits for the NodeModulesConfig cache to reach the resourceVersion of its own
/// last write. Any later change, or a relist, brings a higher one, so this only guards against
/// a watch that stopped altogether.
const NMC_VERSION_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

/// A node's writes not yet seen in the caches.
#[derive(Debug, Default)]
struct Expected {
    /// resourceVersion of the NodeModulesConfig as our last write left it.
    nmc_version: Option<u64>,
    /// Worker pods created (namespace, name), to appear in the pod cache.
    created: BTreeSet<(String, String)>,
    /// When the oldest unmet expectation was recorded.
    since: Option<std::time::Instant>,
}

/// Per node, the writes of earlier passes that the shared caches do not reflect yet. A pass
/// planned from caches older than its own last writes would repeat them: create the same worker
/// pod again (409), or — once a pod's outcome is recorded and the pod released — start a second
/// pod for a step already done. Such a pass waits instead; the watch event carrying the write
/// wakes the node again. (Deleted pods need no waiting: the planner leaves a terminating pod's
/// module alone until it is gone.)
#[derive(Debug, Default)]
pub struct Expectations(std::sync::Mutex<std::collections::HashMap<String, Expected>>);

fn version_number(object: &impl Resource) -> Option<u64> {
    object.meta().resource_version.as_deref()?.parse().ok()
}

impl Expectations {
    fn with<T>(&self, node: &str, f: impl FnOnce(&mut Expected) -> T) -> T {
        let mut all = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let expected = all.entry(node.to_owned()).or_default();
        expected.since.get_or_insert_with(std::time::Instant::now);
        f(expected)
    }

    fn wrote_nmc(&self, node: &str, nmc: &NodeModulesConfig) {
        if let Some(version) = version_number(nmc) {
            self.with(node, |e| {
                e.nmc_version = Some(e.nmc_version.map_or(version, |v| v.max(version)));
            });
        }
    }

    fn created_pod(&self, node: &str, namespace: &str, name: &str) {
        self.with(node, |e| {
            e.created.insert((namespace.to_owned(), name.to_owned()))
        });
    }

    /// Whether the caches show every write of earlier passes on `node` (or the wait timed out);
    /// forgets the expectations once met.
    fn met(&self, node: &str, nmc: Option<&NodeModulesConfig>, pods: &Store<Pod>) -> bool {
        let mut all = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(expected) = all.get(node) else {
            return true;
        };
        let waited = expected
            .since
            .map(|since| since.elapsed())
            .unwrap_or_default();
        let nmc_seen = match (expected.nmc_version, nmc.map(version_number)) {
            (Some(want), Some(Some(have))) => have >= want,
            // Written (created) by an earlier pass, not in the cache yet: the watch lags, and
            // planning now would create it again (409). Only this reconciler's owner, the Node,
            // removes an NMC (garbage collection of a deleted node, possibly recreated under the
            // same name), hence the short wait.
            (Some(_), None) => waited > CREATED_OBJECT_TIMEOUT,
            // A resourceVersion that is not a number: nothing to compare.
            (Some(_), Some(None)) | (None, _) => true,
        };
        let pods_seen = expected
            .created
            .iter()
            .all(|(ns, name)| pods.get(&ObjectRef::new(name).within(ns)).is_some());
        let met = (nmc_seen || waited > NMC_VERSION_TIMEOUT)
            && (pods_seen || waited > CREATED_OBJECT_TIMEOUT);
        if met {
            if !(nmc_seen && pods_seen) {
                tracing::debug!(
                    node,
                    ?waited,
                    "caches still miss this node's last writes; planning anyway"
                );
            }
            all.remove(node);
        }
        met
    }
}

impl super::Reconciler for NodeReconciler {
    const NAME: &'static str = "node";

    fn backoff(&self) -> &super::backoff::Backoff {
        &self.backoff
    }

    fn context(&self) -> &Context {
        &self.ctx
    }
}

/// Facts about a node that the Module planner uses.
pub fn node_facts(node: &Node) -> NodeFacts {
    NodeFacts {
        name: node.name_any(),
        labels: node.labels().clone(),
        taints: node
            .spec
            .as_ref()
            .and_then(|s| s.taints.clone())
            .unwrap_or_default(),
        kernel_version: node
            .status
            .as_ref()
            .and_then(|s| s.node_info.as_ref())
            .map(|i| i.kernel_version.clone())
            .unwrap_or_default(),
    }
}

fn node_state(node: &Node) -> NodeState {
    let status = node.status.as_ref();
    NodeState {
        name: node.name_any(),
        ready: status
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True")),
        boot_id: status
            .and_then(|s| s.node_info.as_ref())
            .map(|i| i.boot_id.clone())
            .unwrap_or_default(),
        taints: node
            .spec
            .as_ref()
            .and_then(|s| s.taints.clone())
            .unwrap_or_default(),
        labels: node.labels().clone(),
    }
}

/// Image states of a Module's MIC, by image.
pub fn image_states(
    mics: &Store<ModuleImagesConfig>,
    namespace: &str,
    name: &str,
) -> BTreeMap<String, ImageState> {
    mics.get(&ObjectRef::new(name).within(namespace))
        .and_then(|mic| mic.status.clone())
        .map(|s| {
            s.images_states
                .into_iter()
                .map(|i| (i.image, i.status))
                .collect()
        })
        .unwrap_or_default()
}

fn module_key(module: &Module) -> (String, String) {
    (module.namespace().unwrap_or_default(), module.name_any())
}

/// One pass for one node.
pub async fn reconcile(node: Arc<Node>, this: Arc<NodeReconciler>) -> Result<Action, Error> {
    let name = node.name_any();
    let nmc = this.stores.nmcs.get(&ObjectRef::new(&name));
    if !this
        .expectations
        .met(&name, nmc.as_deref(), &this.stores.pods)
    {
        // The watch event that brings our write wakes this node; the requeue is a fallback.
        return Ok(Action::requeue(std::time::Duration::from_secs(1)));
    }
    let nmc = write_spec(&this, &node, nmc.as_deref()).await?;
    let Some(nmc) = nmc else {
        return Ok(Action::await_change());
    };
    let pods: Vec<WorkerPodState> = this
        .stores
        .pods_by_node
        .get(&name)
        .iter()
        .filter_map(|pod| this.stores.pods.get(pod))
        .filter_map(|pod| worker_pod_state(&pod))
        .collect();
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let settings = WorkerSettings {
        image: this.ctx.config.worker_image.clone(),
        firmware_host_path: this.ctx.config.firmware_host_path.clone(),
        run_as_user: this.ctx.config.worker_run_as_user,
        selinux_type: this.ctx.config.worker_selinux_type.clone(),
    };
    let plan = plan_nmc(&nmc, &node_state(&node), &pods, &settings, &now);
    apply_nmc_plan(&this, &node, &nmc, plan).await?;
    Ok(Action::await_change())
}

/// Computes the node's NMC spec from every Module and writes it when it changed. Returns the NMC
/// as it now stands (`None` when there is none and none is needed).
async fn write_spec(
    this: &NodeReconciler,
    node: &Node,
    current: Option<&NodeModulesConfig>,
) -> Result<Option<NodeModulesConfig>, Error> {
    let facts = node_facts(node);
    let labels = current.map(|n| n.labels().clone()).unwrap_or_default();
    let mut entries: BTreeMap<(String, String), NodeModuleSpec> = current
        .map(|n| {
            n.spec
                .modules
                .iter()
                .map(|m| ((m.item.namespace.clone(), m.item.name.clone()), m.clone()))
                .collect()
        })
        .unwrap_or_default();
    let mut new_labels = labels.clone();
    let mut live = BTreeSet::new();

    for module in this.stores.modules.state() {
        let (ns, name) = module_key(&module);
        let configured_label = wire::module_configured_label(&ns, &name);
        let configured = labels.contains_key(&configured_label);
        let Some(loader) = module
            .spec
            .module_loader
            .as_ref()
            .filter(|_| module.meta().deletion_timestamp.is_none())
        else {
            continue;
        };
        live.insert((ns.clone(), name.clone()));
        let configured_set: BTreeSet<String> = if configured {
            BTreeSet::from([facts.name.clone()])
        } else {
            BTreeSet::new()
        };
        let states = image_states(&this.stores.mics, &ns, &name);
        let plan = plan_module(
            &module,
            loader,
            std::slice::from_ref(&facts),
            &configured_set,
            &states,
        );
        match plan.actions.get(&facts.name) {
            Some(EntryAction::Upsert(entry)) => {
                entries.insert((ns.clone(), name.clone()), (**entry).clone());
                new_labels.insert(configured_label, String::new());
                new_labels.insert(wire::module_in_use_label(&ns, &name), String::new());
            }
            Some(EntryAction::Remove) => {
                entries.remove(&(ns.clone(), name.clone()));
                new_labels.remove(&configured_label);
            }
            None => {}
        }
    }
    // Entries of Modules that are gone or being deleted.
    entries.retain(|key, _| live.contains(key));
    let configured_keys: Vec<String> = new_labels
        .keys()
        .filter(|k| k.ends_with(".module-configured"))
        .cloned()
        .collect();
    for key in configured_keys {
        if !entries
            .keys()
            .any(|(ns, name)| wire::module_configured_label(ns, name) == key)
        {
            new_labels.remove(&key);
        }
    }
    let modules: Vec<NodeModuleSpec> = entries.into_values().collect();

    let api = Api::<NodeModulesConfig>::all(this.ctx.client.clone());
    let params = PatchParams {
        field_manager: Some(wire::field_manager::NMC.into()),
        ..PatchParams::default()
    };
    match current {
        None if modules.is_empty() => Ok(None),
        None => {
            let mut nmc = NodeModulesConfig::new(
                &facts.name,
                kmm_api::v1beta1::NodeModulesConfigSpec { modules },
            );
            nmc.metadata.labels = Some(new_labels);
            nmc.metadata.owner_references = Some(vec![OwnerReference {
                api_version: "v1".into(),
                kind: "Node".into(),
                name: facts.name.clone(),
                uid: node.uid().unwrap_or_default(),
                ..OwnerReference::default()
            }]);
            let created = api
                .create(
                    &PostParams {
                        field_manager: params.field_manager.clone(),
                        ..PostParams::default()
                    },
                    &nmc,
                )
                .await?;
            this.expectations.wrote_nmc(&facts.name, &created);
            Ok(Some(created))
        }
        Some(nmc) if nmc.spec.modules == modules && labels == new_labels => Ok(Some(nmc.clone())),
        Some(nmc) => {
            let mut label_patch = serde_json::Map::new();
            for (key, value) in &new_labels {
                if labels.get(key) != Some(value) {
                    label_patch.insert(key.clone(), json!(value));
                }
            }
            for key in labels.keys().filter(|k| !new_labels.contains_key(*k)) {
                label_patch.insert(key.clone(), serde_json::Value::Null);
            }
            let patch = json!({
                "metadata": {"resourceVersion": nmc.resource_version(), "labels": label_patch},
                "spec": {"modules": modules},
            });
            let patched = api
                .patch(&facts.name, &params, &Patch::Merge(&patch))
                .await?;
            this.expectations.wrote_nmc(&facts.name, &patched);
            Ok(Some(patched))
        }
    }
}

async fn apply_nmc_plan(
    this: &NodeReconciler,
    node: &Node,
    nmc: &NodeModulesConfig,
    plan: NmcPlan,
) -> Result<(), Error> {
    let client = &this.ctx.client;
    let name = node.name_any();
    let params = PatchParams {
        field_manager: Some(wire::field_manager::NMC.into()),
        ..PatchParams::default()
    };

    // Status first: a crash between here and the pod deletions repeats the deletions, never
    // loses an outcome.
    let current_status = nmc
        .status
        .as_ref()
        .map(|s| s.modules.clone())
        .unwrap_or_default();
    if current_status != plan.status {
        let patch = json!({"status": {"modules": plan.status}});
        let patched = Api::<NodeModulesConfig>::all(client.clone())
            .patch_status(&name, &params, &Patch::Merge(&patch))
            .await?;
        this.expectations.wrote_nmc(&name, &patched);
    }
    for pod in &plan.create {
        let namespace = pod.namespace().unwrap_or_default();
        match Api::<Pod>::namespaced(client.clone(), &namespace)
            .create(&PostParams::default(), pod)
            .await
        {
            Ok(_) => {}
            // AlreadyExists: the pod is there and the cache has not shown it yet (an earlier
            // pass created it and the wait for it ran out). Wait for it like for our own, or
            // every pass until the watch catches up repeats the create.
            Err(kube::Error::Api(status)) if status.code == 409 => {}
            Err(err) => return Err(err.into()),
        }
        this.expectations
            .created_pod(&name, &namespace, &pod.name_any());
    }
    for pod in &plan.delete {
        let api = Api::<Pod>::namespaced(client.clone(), &pod.namespace);
        let release = json!({"metadata": {"finalizers": null}});
        match api.patch(&pod.name, &params, &Patch::Merge(&release)).await {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 404 => continue,
            Err(err) => return Err(err.into()),
        }
        match api.delete(&pod.name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(err) => return Err(err.into()),
        }
    }
    if !plan.add_node_labels.is_empty() || !plan.remove_node_labels.is_empty() {
        let mut labels = serde_json::Map::new();
        for (key, value) in &plan.add_node_labels {
            labels.insert(key.clone(), json!(value));
        }
        for key in &plan.remove_node_labels {
            labels.insert(key.clone(), serde_json::Value::Null);
        }
        let patch = json!({"metadata": {"labels": labels}});
        Api::<Node>::all(client.clone())
            .patch(&name, &params, &Patch::Merge(&patch))
            .await?;
    }
    if !plan.remove_nmc_labels.is_empty() {
        let labels: serde_json::Map<String, serde_json::Value> = plan
            .remove_nmc_labels
            .iter()
            .map(|k| (k.clone(), serde_json::Value::Null))
            .collect();
        let patch = json!({"metadata": {"labels": labels}});
        let patched = Api::<NodeModulesConfig>::all(client.clone())
            .patch(&name, &params, &Patch::Merge(&patch))
            .await?;
        this.expectations.wrote_nmc(&name, &patched);
    }
    let reference = node.object_ref(&());
    for event in &plan.events {
        let type_ = if event.type_ == "Warning" {
            EventType::Warning
        } else {
            EventType::Normal
        };
        let published = this
            .recorder
            .publish(
                &Event {
                    type_,
                    reason: event.reason.into(),
                    note: Some(event.note.clone()),
                    action: "Reconcile".into(),
                    secondary: None,
                },
                &reference,
            )
            .await;
        if let Err(err) = published {
            tracing::warn!(node = %name, error = %err, "could not publish an event");
        }
    }
    for ((ns, module), err) in &plan.errors {
        tracing::warn!(node = %name, module = %format!("{ns}/{module}"), error = %err, "cannot render the worker pod");
    }
    Ok(())
}
