//! The ordered-upgrade reconciler (Go KMM's NodeLabelModuleVersion): per node, moves the
//! `version-worker-pod` and `version-schedule-pod` labels one step towards the administrator's
//! `version-module` label. The Module planner then loads or unloads according to the worker-pod
//! label, and the device plugin DaemonSets select nodes by the schedule-pod label.

use std::collections::BTreeSet;
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use kmm_api::wire;
use kmm_core::version_labels::{ModuleKey, plan_version_labels, version_labels_by_module};
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::{ObjectRef, Store};
use serde_json::json;

use super::{Context, Error, stores};

/// What the ordered-upgrade reconciler works with.
pub struct VersionReconciler {
    /// Shared context.
    pub ctx: Arc<Context>,
    /// Every device plugin and DRA pod.
    pub plugin_pods: Store<Pod>,
    /// Per-object backoff of failed passes.
    pub backoff: super::backoff::Backoff,
}

/// Runs the reconciler on the shared Node watch until dropped; plugin pod events wake the node
/// they run on (a node may be waiting for one to leave).
pub async fn run(
    ctx: Arc<Context>,
    nodes: Store<Node>,
    node_trigger: stores::Trigger<Node>,
    plugin_pods: Store<Pod>,
    pod_trigger: stores::Trigger<Pod>,
) {
    let reconciler = Arc::new(VersionReconciler {
        ctx,
        plugin_pods,
        backoff: super::backoff::Backoff::default(),
    });
    Controller::for_stream(node_trigger, nodes)
        .watches_stream(pod_trigger, |pod: Pod| {
            pod.spec
                .and_then(|s| s.node_name)
                .map(|node| ObjectRef::new(&node))
        })
        .run(
            |n, c| super::with_backoff(n.clone(), c.clone(), reconcile(n, c)),
            super::error_policy,
            reconciler,
        )
        .for_each(super::log_result("node-version"))
        .await;
}

impl super::Reconciler for VersionReconciler {
    const NAME: &'static str = "node-version";

    fn backoff(&self) -> &super::backoff::Backoff {
        &self.backoff
    }

    fn context(&self) -> &Context {
        &self.ctx
    }
}

/// One pass for one node.
#[tracing::instrument(skip_all, fields(node = %node.name_any()))]
pub async fn reconcile(node: Arc<Node>, this: Arc<VersionReconciler>) -> Result<Action, Error> {
    let name = node.name_any();
    let labels = node.labels();
    let groups = version_labels_by_module(labels);
    if groups.is_empty() {
        return Ok(Action::await_change());
    }
    let plugin_pods = if groups.values().any(|v| v.wants_worker_removal()) {
        // An incomplete cache would let the module unload under a running plugin.
        let _ = this.plugin_pods.wait_until_ready().await;
        plugin_pods_on_node(&this.plugin_pods, &name)
    } else {
        BTreeSet::new()
    };
    let plan = plan_version_labels(labels, &plugin_pods);
    if !plan.add.is_empty() || !plan.remove.is_empty() {
        let mut patch = serde_json::Map::new();
        for (key, value) in &plan.add {
            patch.insert(key.clone(), json!(value));
        }
        for key in &plan.remove {
            patch.insert(key.clone(), serde_json::Value::Null);
        }
        tracing::debug!(add = ?plan.add, remove = ?plan.remove, "version labels");
        let params = PatchParams {
            field_manager: Some(wire::field_manager::NODE_VERSION.into()),
            ..PatchParams::default()
        };
        Api::<Node>::all(this.ctx.client.clone())
            .patch(
                &name,
                &params,
                &Patch::Merge(&json!({"metadata": {"labels": patch}})),
            )
            .await?;
    }
    if !plan.waiting_for_plugin_pods.is_empty() {
        tracing::debug!(modules = ?plan.waiting_for_plugin_pods, "waiting for plugin pods to leave");
    }
    Ok(Action::await_change())
}

/// Modules with a device plugin or DRA pod on the node.
fn plugin_pods_on_node(pods: &Store<Pod>, node: &str) -> BTreeSet<ModuleKey> {
    pods.state()
        .iter()
        .filter(|pod| pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node))
        .filter_map(|pod| {
            let module = pod.labels().get(wire::label::MODULE_NAME)?;
            Some((pod.namespace().unwrap_or_default(), module.clone()))
        })
        .collect()
}
