//! The Module reconciler: finalizer and namespace label, validation, the ModuleImagesConfig with
//! the images the Module needs, and the Module's status (counts and conditions). The NMC entries
//! themselves are written per node by the node reconciler.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kmm_api::v1beta1::{
    Module, ModuleImagesConfig, ModuleImagesConfigSpec, ModuleStatus, NodeModulesConfig,
};
use kmm_api::wire;
use kmm_core::module_plan::{images_config_spec, plan_module};
use kmm_core::status::{NodeModuleFacts, StatusInputs, compute_status, condition};
use kmm_core::validate::{ClusterInfo, validate_module};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use serde_json::json;

use super::nodes::{image_states, node_facts};
use super::{Context, Error, Stores};

/// What the Module reconciler works with.
pub struct ModuleReconciler {
    /// Shared context.
    pub ctx: Arc<Context>,
    /// Shared caches.
    pub stores: Stores,
    /// Event recorder.
    pub recorder: Recorder,
    /// Per-object backoff of failed passes.
    pub backoff: super::backoff::Backoff,
    /// At most one full pass per Module and [`MIN_PASS_INTERVAL`] while its spec is unchanged.
    pub pacer: Pacer,
    /// Namespaces seen carrying the contains-modules label (Namespaces are not watched).
    pub labelled_namespaces: std::sync::Mutex<std::collections::HashSet<String>>,
}

/// Shortest time between two full passes of one Module whose spec did not change. A pass is
/// O(nodes) and is woken by every NodeModulesConfig change of every node it targets; during a
/// rollout over N nodes that is O(N) wake-ups, so at one pass a second the Module passes alone
/// grew as N² over a rollout (N=2000: most of the operator's CPU). Nothing waits on a Module
/// pass but its status (NMC entries are the node reconciler's), and counts are written at most
/// every [`COUNTS_INTERVAL`] anyway.
pub const MIN_PASS_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// Shortest time between two status writes of one Module that only change its counts. During a
/// rollout over N nodes the counts move with every node; conditions are written at once.
pub const COUNTS_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// When each Module last had a full pass (and for which generation), and when its status was
/// last written.
#[derive(Debug, Default)]
pub struct Pacer {
    passes: std::sync::Mutex<std::collections::HashMap<String, (std::time::Instant, Option<i64>)>>,
    status_writes: std::sync::Mutex<std::collections::HashMap<String, std::time::Instant>>,
}

impl Pacer {
    /// `None` when a full pass may run now (and records it), else how long to wait. A new
    /// generation always runs at once.
    pub fn admit(&self, key: &str, generation: Option<i64>) -> Option<std::time::Duration> {
        let now = std::time::Instant::now();
        let mut last = self
            .passes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((at, seen)) = last.get(key) {
            let since = now.duration_since(*at);
            if *seen == generation && since < MIN_PASS_INTERVAL {
                return Some(MIN_PASS_INTERVAL - since);
            }
        }
        last.insert(key.to_owned(), (now, generation));
        None
    }

    /// Forgets a Module that is gone.
    pub fn forget(&self, key: &str) {
        self.passes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(key);
        self.counts().remove(key);
    }

    fn counts(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, std::time::Instant>> {
        self.status_writes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// How long a counts-only status write of `key` must wait, if at all.
    pub fn counts_wait(&self, key: &str) -> Option<std::time::Duration> {
        let since = self.counts().get(key)?.elapsed();
        (since < COUNTS_INTERVAL).then(|| COUNTS_INTERVAL - since)
    }

    /// Records a status write of `key`.
    pub fn wrote_status(&self, key: &str) {
        self.counts()
            .insert(key.to_owned(), std::time::Instant::now());
    }
}

impl super::Reconciler for ModuleReconciler {
    const NAME: &'static str = "module";

    fn backoff(&self) -> &super::backoff::Backoff {
        &self.backoff
    }

    fn context(&self) -> &Context {
        &self.ctx
    }
}

fn params() -> PatchParams {
    PatchParams {
        field_manager: Some(wire::field_manager::MODULE.into()),
        ..PatchParams::default()
    }
}

/// NMCs that still carry the Module (configured or possibly loaded).
fn nmcs_holding(stores: &Stores, ns: &str, name: &str) -> Vec<Arc<NodeModulesConfig>> {
    let configured = wire::module_configured_label(ns, name);
    let in_use = wire::module_in_use_label(ns, name);
    stores
        .nmcs
        .state()
        .into_iter()
        .filter(|nmc| nmc.labels().contains_key(&configured) || nmc.labels().contains_key(&in_use))
        .collect()
}

/// One pass for one Module.
pub async fn reconcile(module: Arc<Module>, this: Arc<ModuleReconciler>) -> Result<Action, Error> {
    let ns = module.namespace().unwrap_or_default();
    let name = module.name_any();
    let api = Api::<Module>::namespaced(this.ctx.client.clone(), &ns);

    let key = format!("{ns}/{name}");
    if module.meta().deletion_timestamp.is_some() {
        this.pacer.forget(&key);
        return finalize(&this, &module, &api, &ns, &name).await;
    }
    if let Some(wait) = this.pacer.admit(&key, module.meta().generation) {
        return Ok(Action::requeue(wait));
    }
    ensure_namespace_label(&this, &ns).await?;
    if !module
        .finalizers()
        .iter()
        .any(|f| f == wire::finalizer::MODULE)
    {
        let mut finalizers = module.finalizers().to_vec();
        finalizers.push(wire::finalizer::MODULE.into());
        let patch = json!({"metadata": {"resourceVersion": module.resource_version(), "finalizers": finalizers}});
        api.patch(&name, &params(), &Patch::Merge(&patch)).await?;
    }

    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let previous = module.status.clone().unwrap_or_default();
    let generation = module.meta().generation;
    let mut status = ModuleStatus {
        device_plugin: previous.device_plugin,
        dra: previous.dra,
        ..ModuleStatus::default()
    };

    if let Err(errors) = validate_module(
        &module,
        &ClusterInfo {
            kubernetes_minor: None,
        },
    ) {
        let computed = compute_status(
            None,
            &StatusInputs {
                invalid: Some(errors.to_string()),
                ..StatusInputs::default()
            },
            &previous.conditions,
            generation,
            &now,
        );
        status.conditions = computed.conditions;
        warn_on_new_degradation(&this, &module, &previous, &status).await;
        write_status(&api, &name, &previous, &status).await?;
        return Ok(Action::await_change());
    }

    let Some(loader) = module.spec.module_loader.as_ref() else {
        status.conditions = compute_status(
            None,
            &StatusInputs::default(),
            &previous.conditions,
            generation,
            &now,
        )
        .conditions;
        write_status(&api, &name, &previous, &status).await?;
        return Ok(Action::await_change());
    };

    let configured_label = wire::module_configured_label(&ns, &name);
    let nmcs = this.stores.nmcs.state();
    let configured = nmcs
        .iter()
        .filter(|n| n.labels().contains_key(&configured_label))
        .map(|n| n.name_any())
        .collect();
    let nodes: Vec<_> = this
        .stores
        .nodes
        .state()
        .iter()
        .map(|n| node_facts(n))
        .collect();
    let states = image_states(&this.stores.mics, &ns, &name);
    let plan = plan_module(&module, loader, &nodes, &configured, &states);

    let mic = this.stores.mics.get(&ObjectRef::new(&name).within(&ns));
    let desired_mic = images_config_spec(
        &module,
        loader,
        plan.images.clone(),
        true,
        module.spec.image_rebuild_trigger_generation,
    );
    if mic.as_ref().map(|m| &m.spec) != Some(&desired_mic) {
        apply_mic(&this, &module, desired_mic).await?;
    }

    let mut facts: BTreeMap<String, NodeModuleFacts> = BTreeMap::new();
    for nmc in &nmcs {
        let entry = nmc
            .spec
            .modules
            .iter()
            .find(|m| m.item.namespace == ns && m.item.name == name);
        let loaded = nmc.status.as_ref().and_then(|s| {
            s.modules
                .iter()
                .find(|m| m.item.namespace == ns && m.item.name == name)
        });
        if entry.is_none() && loaded.is_none() {
            continue;
        }
        facts.insert(
            nmc.name_any(),
            NodeModuleFacts {
                configured: nmc.labels().contains_key(&configured_label),
                available: entry
                    .is_some_and(|e| loaded.and_then(|l| l.config.as_ref()) == Some(&e.config)),
                last_failure: loaded
                    .and_then(|l| l.last_failure.as_ref())
                    .map(|f| (f.reason.clone(), f.message.clone())),
            },
        );
    }
    let mic_status = mic
        .as_ref()
        .and_then(|m| m.status.clone())
        .unwrap_or_default();
    let computed = compute_status(
        Some(&plan),
        &StatusInputs {
            nodes: facts,
            images: &mic_status.images_states,
            invalid: None,
        },
        &previous.conditions,
        generation,
        &now,
    );
    status.module_loader = computed.module_loader;
    status.conditions = computed.conditions;
    status.image_rebuild_trigger_generation = mic_status.image_rebuild_trigger_generation;
    if status != previous {
        if kmm_core::status::only_progress_changed(&previous, &status)
            && let Some(wait) = this.pacer.counts_wait(&key)
        {
            return Ok(Action::requeue(wait));
        }
        warn_on_new_degradation(&this, &module, &previous, &status).await;
        write_status(&api, &name, &previous, &status).await?;
        this.pacer.wrote_status(&key);
    }
    Ok(Action::await_change())
}

async fn finalize(
    this: &ModuleReconciler,
    module: &Module,
    api: &Api<Module>,
    ns: &str,
    name: &str,
) -> Result<Action, Error> {
    // The node reconciler removes the entries of a deleting Module; its NMCs keep the in-use
    // label until the module is unloaded.
    if !nmcs_holding(&this.stores, ns, name).is_empty() {
        return Ok(Action::await_change());
    }
    let others = this
        .stores
        .modules
        .state()
        .iter()
        .any(|m| m.namespace().as_deref() == Some(ns) && m.name_any() != name);
    if !others {
        this.labelled_namespaces
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(ns);
        let patch =
            json!({"metadata": {"labels": {wire::label::NAMESPACE_CONTAINS_MODULES: null}}});
        match Api::<Namespace>::all(this.ctx.client.clone())
            .patch(ns, &params(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(err) => return Err(err.into()),
        }
    }
    let finalizers: Vec<String> = module
        .finalizers()
        .iter()
        .filter(|f| *f != wire::finalizer::MODULE)
        .cloned()
        .collect();
    if finalizers.len() != module.finalizers().len() {
        let patch = json!({"metadata": {"resourceVersion": module.resource_version(), "finalizers": finalizers}});
        api.patch(name, &params(), &Patch::Merge(&patch)).await?;
    }
    Ok(Action::await_change())
}

/// Labels the namespace `contains-modules` once; later passes trust the memory instead of
/// reading the Namespace again (the finalizer of the namespace's last Module forgets it).
async fn ensure_namespace_label(this: &ModuleReconciler, ns: &str) -> Result<(), Error> {
    let labelled = || {
        this.labelled_namespaces
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    };
    if labelled().contains(ns) {
        return Ok(());
    }
    let api = Api::<Namespace>::all(this.ctx.client.clone());
    let namespace = api.get(ns).await?;
    if !namespace
        .labels()
        .contains_key(wire::label::NAMESPACE_CONTAINS_MODULES)
    {
        let patch = json!({"metadata": {"labels": {wire::label::NAMESPACE_CONTAINS_MODULES: ""}}});
        api.patch(ns, &params(), &Patch::Merge(&patch)).await?;
    }
    labelled().insert(ns.to_owned());
    Ok(())
}

async fn apply_mic(
    this: &ModuleReconciler,
    module: &Module,
    spec: ModuleImagesConfigSpec,
) -> Result<(), Error> {
    let ns = module.namespace().unwrap_or_default();
    let name = module.name_any();
    let mut mic = ModuleImagesConfig::new(&name, spec);
    mic.metadata.namespace = Some(ns.clone());
    mic.metadata.owner_references = module.controller_owner_ref(&()).map(|r| vec![r]);
    let api = Api::<ModuleImagesConfig>::namespaced(this.ctx.client.clone(), &ns);
    let params = PatchParams::apply(wire::field_manager::MODULE).force();
    api.patch(&name, &params, &Patch::Apply(&mic)).await?;
    Ok(())
}

async fn write_status(
    api: &Api<Module>,
    name: &str,
    previous: &ModuleStatus,
    status: &ModuleStatus,
) -> Result<(), Error> {
    if previous == status {
        return Ok(());
    }
    // Only the parts this reconciler owns: `devicePlugin` and `dra` belong to their reconcilers,
    // and a copy from a stale cache must not overwrite them.
    let mut owned = serde_json::to_value(status).unwrap_or_default();
    if let Some(fields) = owned.as_object_mut() {
        fields.remove("devicePlugin");
        fields.remove("dra");
        // Merge patches drop keys that are absent; say "no value" explicitly instead.
        fields
            .entry("imageRebuildTriggerGeneration")
            .or_insert(serde_json::Value::Null);
        fields
            .entry("conditions")
            .or_insert(serde_json::Value::Null);
    }
    let patch = json!({ "status": owned });
    api.patch_status(name, &params(), &Patch::Merge(&patch))
        .await?;
    Ok(())
}

/// A Warning event when the Degraded condition turns true or changes its reason.
async fn warn_on_new_degradation(
    this: &ModuleReconciler,
    module: &Module,
    previous: &ModuleStatus,
    status: &ModuleStatus,
) {
    let find = |s: &ModuleStatus| {
        s.conditions
            .iter()
            .find(|c| c.type_ == condition::DEGRADED)
            .cloned()
    };
    let (Some(now), before) = (find(status), find(previous)) else {
        return;
    };
    let changed = before.is_none_or(|b| b.status != now.status || b.reason != now.reason);
    if now.status != "True" || !changed {
        return;
    }
    let event = Event {
        type_: EventType::Warning,
        reason: now.reason.clone(),
        note: Some(now.message.chars().take(1000).collect()),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(err) = this.recorder.publish(&event, &module.object_ref(&())).await {
        tracing::warn!(module = %module.name_any(), error = %err, "could not publish an event");
    }
}
