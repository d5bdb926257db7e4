//! Device plugins: the DaemonSet reconciler (per Module: one DaemonSet per module version, the
//! `device-plugin-target` node labels, `status.devicePlugin`) and the pod readiness labeler (per
//! device plugin or DRA pod: the node's `device-plugin-ready` / `dra-ready` label and the
//! `node-labeler` finalizer). Pure rendering and planning live in `kmm_core::device_plugin`.

use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Node, Pod};
use kmm_api::v1beta1::{DaemonSetStatus, Module};
use kmm_api::wire;
use kmm_core::device_plugin::{
    PluginPod, daemonset_version, plan_ready_labels, plan_target_labels, render_daemonset,
    stale_daemonsets,
};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use serde_json::json;

use super::nodes::node_facts;
use super::{Context, Error, backoff, stores};

fn params() -> PatchParams {
    PatchParams {
        field_manager: Some(wire::field_manager::DEVICE_PLUGIN.into()),
        ..PatchParams::default()
    }
}

/// What the device plugin reconciler works with.
pub struct DevicePluginReconciler {
    /// Shared context.
    pub ctx: Arc<Context>,
    /// Every Node.
    pub nodes: Store<Node>,
    /// Every device plugin DaemonSet.
    pub daemonsets: Store<DaemonSet>,
    /// Per-object backoff of failed passes.
    pub backoff: backoff::Backoff,
}

impl super::Reconciler for DevicePluginReconciler {
    const NAME: &'static str = "device-plugin";

    fn backoff(&self) -> &backoff::Backoff {
        &self.backoff
    }

    fn context(&self) -> &Context {
        &self.ctx
    }
}

/// What the readiness labeler works with.
pub struct PodNodeLabeler {
    /// Shared context.
    pub ctx: Arc<Context>,
    /// Every Node.
    pub nodes: Store<Node>,
    /// Every device plugin and DRA pod.
    pub pods: Store<Pod>,
    /// Per-object backoff of failed passes.
    pub backoff: backoff::Backoff,
}

impl super::Reconciler for PodNodeLabeler {
    const NAME: &'static str = "device-plugin-label";

    fn backoff(&self) -> &backoff::Backoff {
        &self.backoff
    }

    fn context(&self) -> &Context {
        &self.ctx
    }
}

/// Label selector of device plugin and DRA pods.
pub fn plugin_pod_selector() -> String {
    format!(
        "{} in ({},{})",
        wire::label::ROLE,
        wire::label::ROLE_DEVICE_PLUGIN,
        wire::label::ROLE_DRA
    )
}

fn device_plugin_selector() -> String {
    format!("{}={}", wire::label::ROLE, wire::label::ROLE_DEVICE_PLUGIN)
}

/// The shared caches and triggers the device plugin reconcilers use.
pub struct Inputs {
    /// Every Module.
    pub modules: Store<Module>,
    /// Every Node.
    pub nodes: Store<Node>,
    /// Every device plugin and DRA pod ([`plugin_pod_selector`]).
    pub pods: Store<Pod>,
    /// Module events.
    pub module_trigger: stores::Trigger<Module>,
    /// Node events.
    pub node_trigger: stores::Trigger<Node>,
    /// Device plugin and DRA pod events.
    pub pod_trigger: stores::Trigger<Pod>,
}

/// Runs both reconcilers (plus a watch of their own for device plugin DaemonSets) until dropped.
pub async fn run(ctx: Arc<Context>, inputs: Inputs) {
    let Inputs {
        modules,
        nodes,
        pods,
        module_trigger,
        node_trigger,
        pod_trigger,
    } = inputs;
    let labeler = Arc::new(PodNodeLabeler {
        ctx: ctx.clone(),
        nodes: nodes.clone(),
        pods: pods.clone(),
        backoff: backoff::Backoff::default(),
    });
    let label_controller = Controller::for_stream(pod_trigger, pods)
        .run(
            |p, c| super::with_backoff(p.clone(), c.clone(), label_node(p, c)),
            super::error_policy,
            labeler,
        )
        .for_each(super::log_result("pod-node-label"));
    tokio::join!(
        run_daemonsets(ctx, modules, nodes, module_trigger, node_trigger),
        label_controller
    );
}

/// The verbs the DaemonSet reconciler uses on `apps/daemonsets`.
const DAEMONSET_VERBS: [&str; 5] = ["list", "watch", "create", "patch", "delete"];

/// Whether the operator may manage DaemonSets. An operator deployed with RBAC that predates device
/// plugin support says so once, instead of failing its DaemonSet watch forever.
async fn may_manage_daemonsets(client: &kube::Client) -> bool {
    use k8s_openapi::api::authorization::v1::{
        ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
    };
    let api = Api::<SelfSubjectAccessReview>::all(client.clone());
    let mut denied = Vec::new();
    for verb in DAEMONSET_VERBS {
        let review = SelfSubjectAccessReview {
            spec: SelfSubjectAccessReviewSpec {
                resource_attributes: Some(ResourceAttributes {
                    group: Some("apps".into()),
                    resource: Some("daemonsets".into()),
                    verb: Some(verb.into()),
                    ..ResourceAttributes::default()
                }),
                ..SelfSubjectAccessReviewSpec::default()
            },
            ..SelfSubjectAccessReview::default()
        };
        match api.create(&PostParams::default(), &review).await {
            Ok(answer) if answer.status.as_ref().is_some_and(|s| s.allowed) => {}
            Ok(_) => denied.push(verb),
            Err(err) => {
                // Cannot tell: try, and let the watch report what fails.
                tracing::warn!(error = %err, "could not review the DaemonSet permissions");
                return true;
            }
        }
    }
    if !denied.is_empty() {
        tracing::error!(
            ?denied,
            "device plugins are disabled: the operator's RBAC does not allow these verbs on apps/daemonsets"
        );
    }
    denied.is_empty()
}

async fn run_daemonsets(
    ctx: Arc<Context>,
    modules: Store<Module>,
    nodes: Store<Node>,
    module_trigger: stores::Trigger<Module>,
    node_trigger: stores::Trigger<Node>,
) {
    if !may_manage_daemonsets(&ctx.client).await {
        // Keep draining the shared triggers: the fan-out waits for every consumer.
        futures::join!(
            module_trigger.for_each(|_| std::future::ready(())),
            node_trigger.for_each(|_| std::future::ready(()))
        );
        return;
    }
    let daemonsets = stores::watch(
        Api::<DaemonSet>::all(ctx.client.clone()),
        watcher::Config::default()
            .any_semantic()
            .labels(&device_plugin_selector()),
        1,
    );
    let ds_trigger = futures::stream::select_all(daemonsets.triggers);
    let reconciler = Arc::new(DevicePluginReconciler {
        ctx,
        nodes,
        daemonsets: daemonsets.store.clone(),
        backoff: backoff::Backoff::default(),
    });
    let for_nodes = modules.clone();
    let ds_controller = Controller::for_stream(module_trigger, modules)
        .watches_stream(
            super::relevant_node_changes(node_trigger),
            move |node: Node| modules_of_node(&for_nodes, &node),
        )
        .watches_stream(ds_trigger, |ds: DaemonSet| {
            let module = ds.labels().get(wire::label::MODULE_NAME)?;
            Some(ObjectRef::<Module>::new(module).within(&ds.namespace()?))
        })
        .run(
            |m, c| super::with_backoff(m.clone(), c.clone(), reconcile(m, c)),
            super::error_policy,
            reconciler,
        )
        .for_each(super::log_result("device-plugin"));
    tokio::join!(daemonsets.driver, ds_controller);
}

/// Modules with a device plugin that select the node or have labelled it.
fn modules_of_node(modules: &Store<Module>, node: &Node) -> Vec<ObjectRef<Module>> {
    modules
        .state()
        .iter()
        .filter(|m| m.spec.device_plugin.is_some() || m.meta().deletion_timestamp.is_some())
        .filter(|m| {
            let target =
                wire::device_plugin_target_label(&m.namespace().unwrap_or_default(), &m.name_any());
            kmm_core::targeting::selector_matches(&m.spec.selector, node.labels())
                || node.labels().contains_key(&target)
        })
        .map(|m| ObjectRef::from_obj(m.as_ref()))
        .collect()
}

/// One pass for one Module.
#[tracing::instrument(skip_all, fields(ns = %module.namespace().unwrap_or_default(), name = %module.name_any()))]
pub async fn reconcile(
    module: Arc<Module>,
    this: Arc<DevicePluginReconciler>,
) -> Result<Action, Error> {
    let ns = module.namespace().unwrap_or_default();
    let name = module.name_any();
    // A DaemonSet missing from a cache that is still filling would be created twice.
    let _ = this.daemonsets.wait_until_ready().await;
    let owned: Vec<DaemonSet> = this
        .daemonsets
        .state()
        .iter()
        .filter(|ds| {
            ds.namespace().as_deref() == Some(ns.as_str())
                && ds.labels().get(wire::label::MODULE_NAME) == Some(&name)
        })
        .map(|ds| (**ds).clone())
        .collect();
    let nodes: Vec<_> = this.nodes.state().iter().map(|n| node_facts(n)).collect();

    let deleting = module.meta().deletion_timestamp.is_some();
    let Some(plugin) = module.spec.device_plugin.as_ref().filter(|_| !deleting) else {
        let target = wire::device_plugin_target_label(&ns, &name);
        let labelled: Vec<String> = nodes
            .iter()
            .filter(|n| n.labels.contains_key(&target))
            .map(|n| n.name.clone())
            .collect();
        set_node_label(&this, &labelled, &target, false).await?;
        delete_daemonsets(&this, &ns, owned.iter().map(ResourceExt::name_any)).await?;
        if !deleting {
            write_status(&this, &module, DaemonSetStatus::default()).await?;
        }
        return Ok(Action::await_change());
    };

    let targets = plan_target_labels(&module, &nodes);
    let target = wire::device_plugin_target_label(&ns, &name);
    set_node_label(&this, &targets.add, &target, true).await?;
    set_node_label(&this, &targets.remove, &target, false).await?;

    let mut desired = render_daemonset(&module, plugin);
    let version = module
        .spec
        .module_loader
        .as_ref()
        .map(|l| l.container.version.clone())
        .unwrap_or_default();
    let api = Api::<DaemonSet>::namespaced(this.ctx.client.clone(), &ns);
    let current = owned
        .iter()
        .find(|ds| daemonset_version(ds, &ns, &name) == version)
        .map(ResourceExt::name_any);
    let current = match current {
        Some(existing) => Some(existing),
        // The cache may lag behind a create of the previous pass: ask the API server.
        None => api
            .list(&ListParams::default().labels(&format!(
                "{}={name},{}",
                wire::label::MODULE_NAME,
                device_plugin_selector()
            )))
            .await?
            .items
            .into_iter()
            .find(|ds| daemonset_version(ds, &ns, &name) == version)
            .map(|ds| ds.name_any()),
    };
    match current {
        Some(existing) => {
            desired.metadata.generate_name = None;
            desired.metadata.name = Some(existing.clone());
            // Server-side apply: a no-op for the API server when nothing changed.
            api.patch(&existing, &params().force(), &Patch::Apply(&desired))
                .await?;
        }
        None => {
            let created = api
                .create(
                    &PostParams {
                        field_manager: params().field_manager,
                        ..PostParams::default()
                    },
                    &desired,
                )
                .await?;
            tracing::info!(daemonset = %created.name_any(), "created the device plugin DaemonSet");
        }
    }
    delete_daemonsets(&this, &ns, stale_daemonsets(&module, &owned).into_iter()).await?;

    let available = owned
        .iter()
        .filter_map(|ds| ds.status.as_ref())
        .map(|s| s.number_available.unwrap_or_default())
        .sum();
    let status = DaemonSetStatus {
        nodes_matching_selector_number: targets.matching,
        desired_number: targets.matching,
        available_number: available,
    };
    write_status(&this, &module, status).await?;
    Ok(Action::await_change())
}

async fn set_node_label(
    this: &DevicePluginReconciler,
    nodes: impl IntoIterator<Item = &String>,
    key: &str,
    present: bool,
) -> Result<(), Error> {
    let value = if present {
        json!("")
    } else {
        serde_json::Value::Null
    };
    let patch = json!({"metadata": {"labels": {key: value}}});
    let api = Api::<Node>::all(this.ctx.client.clone());
    for node in nodes {
        match api.patch(node, &params(), &Patch::Merge(&patch)).await {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(err) => return Err(err.into()),
        }
    }
    Ok(())
}

async fn delete_daemonsets(
    this: &DevicePluginReconciler,
    ns: &str,
    names: impl Iterator<Item = String>,
) -> Result<(), Error> {
    let api = Api::<DaemonSet>::namespaced(this.ctx.client.clone(), ns);
    for name in names {
        match api.delete(&name, &DeleteParams::background()).await {
            Ok(_) => tracing::info!(daemonset = %name, "deleted a device plugin DaemonSet"),
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(err) => return Err(err.into()),
        }
    }
    Ok(())
}

/// Writes only `status.devicePlugin` (the Module reconciler owns the rest of the status).
async fn write_status(
    this: &DevicePluginReconciler,
    module: &Module,
    status: DaemonSetStatus,
) -> Result<(), Error> {
    let current = module
        .status
        .as_ref()
        .map(|s| s.device_plugin)
        .unwrap_or_default();
    if current == status {
        return Ok(());
    }
    let api = Api::<Module>::namespaced(
        this.ctx.client.clone(),
        &module.namespace().unwrap_or_default(),
    );
    let patch = json!({"status": {"devicePlugin": status}});
    api.patch_status(&module.name_any(), &params(), &Patch::Merge(&patch))
        .await?;
    Ok(())
}

fn plugin_pod(pod: &Pod) -> Option<PluginPod> {
    let owned_by_daemonset = pod.owner_references().iter().any(|o| o.kind == "DaemonSet");
    if !owned_by_daemonset {
        return None;
    }
    Some(PluginPod {
        namespace: pod.namespace()?,
        name: pod.name_any(),
        module: pod.labels().get(wire::label::MODULE_NAME)?.clone(),
        dra: pod.labels().get(wire::label::ROLE).map(String::as_str) == Some(wire::label::ROLE_DRA),
        ready: pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True")),
        deleting: pod.meta().deletion_timestamp.is_some(),
        has_finalizer: pod
            .finalizers()
            .iter()
            .any(|f| f == wire::finalizer::NODE_LABELER),
    })
}

/// One pass for one device plugin or DRA pod: brings the readiness labels of its node in line
/// with every plugin pod there, then releases the finalizers of deleted pods.
#[tracing::instrument(skip_all, fields(ns = %pod.namespace().unwrap_or_default(), name = %pod.name_any()))]
pub async fn label_node(pod: Arc<Pod>, this: Arc<PodNodeLabeler>) -> Result<Action, Error> {
    let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.clone()) else {
        // Never scheduled: there is no label to take care of.
        if pod.meta().deletion_timestamp.is_some() {
            release_finalizer(&this, &pod).await?;
        }
        return Ok(Action::await_change());
    };
    let pods: Vec<PluginPod> = this
        .pods
        .state()
        .iter()
        .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node.as_str()))
        .filter_map(|p| plugin_pod(p))
        .collect();
    let labels = this
        .nodes
        .get(&ObjectRef::new(&node))
        .map(|n| n.labels().clone())
        .unwrap_or_default();
    let plan = plan_ready_labels(&labels, &pods);
    if !plan.add.is_empty() || !plan.remove.is_empty() {
        let mut patch = serde_json::Map::new();
        for key in &plan.add {
            patch.insert(key.clone(), json!(""));
        }
        for key in &plan.remove {
            patch.insert(key.clone(), serde_json::Value::Null);
        }
        match Api::<Node>::all(this.ctx.client.clone())
            .patch(
                &node,
                &params(),
                &Patch::Merge(&json!({"metadata": {"labels": patch}})),
            )
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(err) => return Err(err.into()),
        }
    }
    for (ns, name) in &plan.release {
        if let Some(pod) = this.pods.get(&ObjectRef::new(name).within(ns)) {
            release_finalizer(&this, &pod).await?;
        }
    }
    Ok(Action::await_change())
}

async fn release_finalizer(this: &PodNodeLabeler, pod: &Pod) -> Result<(), Error> {
    let remaining: Vec<&String> = pod
        .finalizers()
        .iter()
        .filter(|f| *f != wire::finalizer::NODE_LABELER)
        .collect();
    if remaining.len() == pod.finalizers().len() {
        return Ok(());
    }
    let patch = json!({"metadata": {
        "resourceVersion": pod.resource_version(),
        "finalizers": remaining,
    }});
    let api = Api::<Pod>::namespaced(
        this.ctx.client.clone(),
        &pod.namespace().unwrap_or_default(),
    );
    match api
        .patch(&pod.name_any(), &params(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(err) => Err(err.into()),
    }
}
