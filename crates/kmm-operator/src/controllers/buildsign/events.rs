//! Go KMM's BuildSignEvents and JobGC reconcilers, for kaniko pods and OpenShift Builds alike:
//! one `<T>Created` event per job, one `<T>Succeeded` or `<T>Failed` event when it ends (then the
//! `job-event` finalizer goes), and the `gc-delay` finalizer that keeps a successful job for
//! `job.gcDelay` after its deletion. Events go to the job's owner, the MBSC.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::ObjectReference;
use kmm_api::wire::{annotation, finalizer, label};
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use serde_json::json;
use tracing::warn;

use super::job::{self, Phase};
use crate::controllers::{Context, Error};

struct EventsReconciler {
    ctx: Arc<Context>,
    recorder: Recorder,
    api_resource: ApiResource,
}

/// Runs until dropped.
pub(super) async fn run(
    ctx: Arc<Context>,
    api: Api<DynamicObject>,
    ar: ApiResource,
    config: watcher::Config,
) {
    let reconciler = Arc::new(EventsReconciler {
        recorder: Recorder::new(ctx.client.clone(), ctx.reporter.clone()),
        ctx,
        api_resource: ar.clone(),
    });
    Controller::new_with(api, config, ar)
        .run(
            |job, r| async move {
                let metrics = r.ctx.metrics.clone();
                crate::controllers::counted(&metrics, "build-sign-events", reconcile(job, r)).await
            },
            error_policy,
            reconciler,
        )
        .for_each(|result| async move {
            if let Err(err) = result {
                warn!(error = %err, "build/sign job events");
            }
        })
        .await;
}

fn error_policy(_: Arc<DynamicObject>, err: &Error, _: Arc<EventsReconciler>) -> Action {
    let delay = if err.category() == "conflict" {
        Duration::from_millis(200)
    } else {
        Duration::from_secs(5)
    };
    Action::requeue(delay)
}

async fn reconcile(job: Arc<DynamicObject>, r: Arc<EventsReconciler>) -> Result<Action, Error> {
    let Some(action) = job::action(&job) else {
        return Ok(Action::await_change());
    };
    let ns = job.namespace().unwrap_or_default();
    let kernel = job
        .labels()
        .get(label::TARGET_KERNEL)
        .cloned()
        .unwrap_or_default();
    let prefix = job::event_prefix(action);
    let owner = job
        .owner_references()
        .iter()
        .find(|o| o.controller == Some(true))
        .map(|o| ObjectReference {
            api_version: Some(o.api_version.clone()),
            kind: Some(o.kind.clone()),
            name: Some(o.name.clone()),
            namespace: Some(ns.clone()),
            uid: Some(o.uid.clone()),
            ..ObjectReference::default()
        });
    let deleting = job.meta().deletion_timestamp.clone();
    let phase = job::phase(&job);
    let mut finalizers = job.finalizers().to_vec();
    let mut annotate = false;

    if let Some(owner) = &owner
        && deleting.is_none()
        && !job
            .annotations()
            .contains_key(annotation::CREATED_EVENT_SENT)
    {
        let note = format!("{prefix} created for kernel {kernel}");
        publish(
            &r,
            owner,
            EventType::Normal,
            &format!("{prefix}Created"),
            &note,
        )
        .await;
        annotate = true;
    }
    if finalizers.iter().any(|f| f == finalizer::JOB_EVENT) {
        let done = match (&owner, &phase) {
            (Some(owner), Phase::Succeeded) => {
                let note = format!("{prefix} job succeeded for kernel {kernel}");
                publish(
                    &r,
                    owner,
                    EventType::Normal,
                    &format!("{prefix}Succeeded"),
                    &note,
                )
                .await;
                true
            }
            (Some(owner), Phase::Failed(said)) => {
                let note = format!("{prefix} job failed for kernel {kernel}: {said}");
                publish(
                    &r,
                    owner,
                    EventType::Warning,
                    &format!("{prefix}Failed"),
                    &note,
                )
                .await;
                true
            }
            // No owner to report to, or deleted before it ended: nothing to wait for.
            (None, _) | (_, Phase::Active) => owner.is_none() || deleting.is_some(),
        };
        if done {
            finalizers.retain(|f| f != finalizer::JOB_EVENT);
        }
    }
    let mut requeue = None;
    if let Some(deleted) = &deleting
        && finalizers.iter().any(|f| f == finalizer::GC_DELAY)
    {
        let due = deleted
            .0
            .checked_add(r.ctx.config.job_gc_delay)
            .unwrap_or(deleted.0);
        let now = k8s_openapi::jiff::Timestamp::now();
        if phase != Phase::Succeeded || now >= due {
            finalizers.retain(|f| f != finalizer::GC_DELAY);
        } else {
            let left = now.duration_until(due).unsigned_abs();
            requeue = Some(left.max(Duration::from_millis(100)));
        }
    }

    if annotate || finalizers.len() != job.finalizers().len() {
        let mut patch = json!({"metadata": {
            "resourceVersion": job.resource_version(),
            "finalizers": finalizers,
        }});
        if annotate {
            patch["metadata"]["annotations"] = json!({annotation::CREATED_EVENT_SENT: ""});
        }
        let api = Api::<DynamicObject>::namespaced_with(r.ctx.client.clone(), &ns, &r.api_resource);
        match api
            .patch(
                &job.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.is_not_found() => {}
            Err(err) => return Err(err.into()),
        }
    }
    Ok(requeue.map_or_else(Action::await_change, Action::requeue))
}

async fn publish(
    r: &EventsReconciler,
    owner: &ObjectReference,
    type_: EventType,
    reason: &str,
    note: &str,
) {
    let event = Event {
        type_,
        reason: reason.to_owned(),
        note: Some(note.chars().take(1000).collect()),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(err) = r.recorder.publish(&event, owner).await {
        warn!(error = %err, "could not publish an event");
    }
}
