//! The PreflightValidation reconciler: for the kernel a PreflightValidation names, says per
//! Module whether it would load — a mapping exists and its image exists or was built and signed.
//! Images are checked (and built, signed, optionally pushed) through one ModuleImagesConfig per
//! Module, `<module>-preflight`, controlled by the PreflightValidation, so the image machinery
//! is the Module flow's own and deleting the PreflightValidation garbage-collects everything.
//!
//! Beyond Go KMM: `lastTransitionTime` moves only on a real transition; a Module's
//! `-preflight` ModuleImagesConfig is deleted when the Module goes; two PreflightValidations
//! never fight over one ModuleImagesConfig (the second waits, and says so); a Module that
//! fails verification gets a Warning event on the PreflightValidation.

use std::collections::BTreeSet;
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kmm_api::v1beta1::{Module, ModuleImagesConfig};
use kmm_api::v1beta2::{PreflightValidation, PreflightValidationModuleStatus, VerificationStatus};
use kmm_api::wire::field_manager;
use kmm_core::preflight::{self, MIC_SUFFIX, check_module, status_entry};
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use serde_json::json;

use super::{Context, Error, stores};

/// What the reconciler works with.
pub struct PreflightReconciler {
    /// Shared context.
    pub ctx: Arc<Context>,
    /// Every Module.
    pub modules: Store<Module>,
    /// Every ModuleImagesConfig.
    pub mics: Store<ModuleImagesConfig>,
    /// Events on PreflightValidations.
    pub recorder: Recorder,
    /// Per-object backoff of failed passes.
    pub backoff: super::backoff::Backoff,
}

impl super::Reconciler for PreflightReconciler {
    const NAME: &'static str = "preflight";

    fn backoff(&self) -> &super::backoff::Backoff {
        &self.backoff
    }

    fn context(&self) -> &Context {
        &self.ctx
    }
}

/// The shared caches and triggers the reconciler runs on.
pub struct Inputs {
    /// Every Module.
    pub modules: Store<Module>,
    /// Every ModuleImagesConfig.
    pub mics: Store<ModuleImagesConfig>,
    /// Module events: every Module change may change every verdict.
    pub module_trigger: stores::Trigger<Module>,
    /// ModuleImagesConfig events: a `-preflight` one wakes the PreflightValidation owning it.
    pub mic_trigger: stores::Trigger<ModuleImagesConfig>,
}

/// Runs the reconciler until dropped.
pub async fn run(ctx: Arc<Context>, inputs: Inputs) {
    let client = ctx.client.clone();
    let controller = Controller::new(
        Api::<PreflightValidation>::all(client.clone()),
        watcher::Config::default().any_semantic(),
    );
    let preflights = controller.store();
    let reconciler = Arc::new(PreflightReconciler {
        recorder: Recorder::new(client, ctx.reporter.clone()),
        ctx,
        modules: inputs.modules,
        mics: inputs.mics,
        backoff: super::backoff::Backoff::default(),
    });
    controller
        .watches_stream(inputs.module_trigger, move |_: Module| {
            preflights
                .state()
                .iter()
                .map(|pv| ObjectRef::from_obj(pv.as_ref()))
                .collect::<Vec<_>>()
        })
        .watches_stream(inputs.mic_trigger, |mic: ModuleImagesConfig| {
            controller_of(&mic).map(|name| ObjectRef::new(&name))
        })
        .run(
            |pv, r| super::with_backoff(pv.clone(), r.clone(), reconcile(pv, r)),
            super::error_policy,
            reconciler,
        )
        .for_each(super::log_result("preflight"))
        .await;
}

/// Name of the PreflightValidation controlling a ModuleImagesConfig, if one does.
fn controller_of(mic: &ModuleImagesConfig) -> Option<String> {
    mic.owner_references()
        .iter()
        .find(|o| o.controller == Some(true) && o.kind == PreflightValidation::kind(&()))
        .map(|o| o.name.clone())
}

fn controlled_by(mic: &ModuleImagesConfig, pv: &PreflightValidation) -> bool {
    mic.owner_references()
        .iter()
        .any(|o| o.controller == Some(true) && Some(&o.uid) == pv.uid().as_ref())
}

/// One pass for one PreflightValidation.
#[tracing::instrument(skip_all, fields(preflight = %pv.name_any()))]
pub async fn reconcile(
    pv: Arc<PreflightValidation>,
    this: Arc<PreflightReconciler>,
) -> Result<Action, Error> {
    if pv.meta().deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let client = &this.ctx.client;
    let kernel = &pv.spec.kernel_version;
    let previous: &[PreflightValidationModuleStatus] = pv
        .status
        .as_ref()
        .map(|s| s.modules.as_slice())
        .unwrap_or_default();
    let now = Time(Timestamp::now());

    let mut modules: Vec<Arc<Module>> = this
        .modules
        .state()
        .into_iter()
        .filter(|m| m.meta().deletion_timestamp.is_none())
        .collect();
    modules.sort_by_key(|m| (m.namespace(), m.name_any()));

    let mut entries = Vec::with_capacity(modules.len());
    let mut verified: BTreeSet<(String, String)> = BTreeSet::new();
    for module in &modules {
        let (ns, name) = (module.namespace().unwrap_or_default(), module.name_any());
        let mic_name = preflight::mic_name(&name);
        let mic = this.mics.get(&ObjectRef::new(&mic_name).within(&ns));
        let ours = mic.as_ref().filter(|m| controlled_by(m, &pv));
        let states = ours
            .and_then(|m| m.status.as_ref())
            .map(|s| s.images_states.as_slice())
            .unwrap_or_default();
        let mut check = check_module(module, kernel, pv.spec.push_built_image, states);
        match (&check.mic, &mic, ours) {
            (Some(_), Some(other), None) => {
                // Another PreflightValidation (or a Module named `<name>-preflight`) holds it.
                check.verdict.reason = format!(
                    "{}: waiting for ModuleImagesConfig {ns}/{mic_name}, which {}",
                    preflight::reason::IN_PROGRESS,
                    controller_of(other).map_or_else(
                        || "kmm-rs did not create for this PreflightValidation".to_owned(),
                        |owner| format!("PreflightValidation {owner} is using")
                    )
                );
            }
            (Some(spec), _, _) if ours.map(|m| &m.spec) != Some(spec) => {
                apply_mic(&this, &pv, &ns, &mic_name, spec.clone()).await?;
            }
            _ => {}
        }
        verified.insert((ns.clone(), mic_name));
        entries.push(status_entry(&ns, &name, &check.verdict, previous, &now));
    }

    // The `-preflight` ModuleImagesConfigs of Modules that are gone.
    for mic in this.mics.state() {
        let key = (mic.namespace().unwrap_or_default(), mic.name_any());
        if key.1.ends_with(MIC_SUFFIX) && controlled_by(&mic, &pv) && !verified.contains(&key) {
            match Api::<ModuleImagesConfig>::namespaced(client.clone(), &key.0)
                .delete(&key.1, &DeleteParams::background())
                .await
            {
                Ok(_) => {}
                Err(kube::Error::Api(status)) if status.code == 404 => {}
                Err(err) => return Err(err.into()),
            }
        }
    }

    if entries != previous {
        for entry in entries.iter().filter(|e| {
            e.verification_status == VerificationStatus::Failure && !previous.contains(e)
        }) {
            warn_failed(&this, &pv, entry).await;
        }
        Api::<PreflightValidation>::all(client.clone())
            .patch_status(
                &pv.name_any(),
                &PatchParams {
                    field_manager: Some(field_manager::PREFLIGHT.into()),
                    ..PatchParams::default()
                },
                &Patch::Merge(&json!({"status": {"modules": entries}})),
            )
            .await?;
    }
    Ok(Action::await_change())
}

async fn apply_mic(
    this: &PreflightReconciler,
    pv: &PreflightValidation,
    ns: &str,
    name: &str,
    spec: kmm_api::v1beta1::ModuleImagesConfigSpec,
) -> Result<(), Error> {
    let mut mic = ModuleImagesConfig::new(name, spec);
    mic.metadata.namespace = Some(ns.to_owned());
    mic.metadata.owner_references = pv.controller_owner_ref(&()).map(|r| vec![r]);
    tracing::debug!(
        namespace = ns,
        name,
        "writing the preflight ModuleImagesConfig"
    );
    Api::<ModuleImagesConfig>::namespaced(this.ctx.client.clone(), ns)
        .patch(
            name,
            &PatchParams::apply(field_manager::PREFLIGHT).force(),
            &Patch::Apply(&mic),
        )
        .await?;
    Ok(())
}

async fn warn_failed(
    this: &PreflightReconciler,
    pv: &PreflightValidation,
    entry: &PreflightValidationModuleStatus,
) {
    let event = Event {
        type_: EventType::Warning,
        reason: "VerificationFailed".into(),
        note: Some(
            format!(
                "Module {}/{}: {}",
                entry.namespace, entry.name, entry.status_reason
            )
            .chars()
            .take(1000)
            .collect(),
        ),
        action: "Verify".into(),
        secondary: None,
    };
    if let Err(err) = this.recorder.publish(&event, &pv.object_ref(&())).await {
        tracing::warn!(preflight = %pv.name_any(), error = %err, "could not publish an event");
    }
}
