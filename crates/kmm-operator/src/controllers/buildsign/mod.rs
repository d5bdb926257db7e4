//! The ModuleBuildSignConfig (MBSC) reconciler: builds and signs module images in the cluster.
//! For each MBSC entry it renders the job (a kaniko pod, or an OpenShift Build when the API
//! server serves `build.openshift.io/v1`), creates it, replaces it when its inputs change (by
//! hash: Dockerfile, build arguments, Secrets, keys), records Success/Failure in the MBSC status
//! and deletes successful jobs. A failed job is kept and never recreated for the same inputs: the
//! failure (the job's termination message or log snippet, or the user error that stopped the job
//! before it existed) is reported once, and the next attempt waits for a change of the inputs or
//! of `imageRebuildTriggerGeneration`. Job events and finalizers are handled in [`events`].

mod events;
pub mod job;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Secret};
use kmm_api::v1beta1::{
    BuildSignAction, BuildSignImageState, BuildSignResult, ModuleBuildSignConfig,
    ModuleBuildSignImageSpec,
};
use kmm_api::wire::{field_manager, label};
use kmm_core::build_pod::{self, BuildPodInput, BuildSignError, JobTarget};
use kmm_core::dtk::{self, DtkTag, NodeOs};
use kmm_core::sign_pod::{self, SignPodInput};
use kmm_core::{kernel, openshift_build};
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams,
};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};
use tracing::{Instrument, debug, info, info_span, warn};

use self::job::{Phase, Runner};
use super::{Context, Error};

/// MBSC annotation: JSON object from image to the message of its last failure (kmm-rs addition;
/// the MBSC status has no room for it). Read by the MIC reconciler into the image state.
pub const FAILURES_ANNOTATION: &str = "kmm.sigs.x-k8s.io/build-sign-failures";

/// Nodes and the Driver Toolkit ImageStream are not watched: a `DTK_AUTO` error is looked at
/// again after this long.
const DTK_RETRY: Duration = Duration::from_secs(60);
/// A job of an older MBSC with the same name is on its way out; look again soon.
const LEFTOVER_RETRY: Duration = Duration::from_secs(2);

/// The failure messages recorded on an MBSC, by image.
pub fn failure_messages(mbsc: &ModuleBuildSignConfig) -> BTreeMap<String, String> {
    mbsc.annotations()
        .get(FAILURES_ANNOTATION)
        .and_then(|text| serde_json::from_str(text).ok())
        .unwrap_or_default()
}

/// Which optional APIs the cluster serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClusterApis {
    /// Who runs the jobs.
    pub runner: Runner,
    /// `image.openshift.io/v1` is served (ImageStreams, for `DTK_AUTO`).
    pub image_streams: bool,
}

/// Asks the API server (once, at start) whether it serves OpenShift builds and image streams.
pub async fn discover(client: &kube::Client) -> ClusterApis {
    let groups = match client.list_api_groups().await {
        Ok(groups) => groups.groups,
        Err(err) => {
            warn!(error = %err, "API discovery failed; assuming plain Kubernetes (kaniko builds)");
            Vec::new()
        }
    };
    let serves = |group: &str| {
        groups
            .iter()
            .any(|g| g.name == group && g.versions.iter().any(|v| v.version == "v1"))
    };
    let apis = ClusterApis {
        runner: if serves("build.openshift.io") {
            Runner::OpenShift
        } else {
            Runner::Kaniko
        },
        image_streams: serves("image.openshift.io"),
    };
    info!(?apis, "in-cluster builds");
    apis
}

struct Reconciler {
    ctx: Arc<Context>,
    apis: ClusterApis,
    recorder: Recorder,
    backoff: super::backoff::Backoff,
}

impl super::Reconciler for Reconciler {
    const NAME: &'static str = "module-build-sign-config";

    fn backoff(&self) -> &super::backoff::Backoff {
        &self.backoff
    }

    fn context(&self) -> &Context {
        &self.ctx
    }
}

/// Runs the MBSC controller and the job events controller until the future is dropped.
pub async fn run(ctx: Arc<Context>) {
    run_in(ctx, None).await;
}

/// [`run`] for the objects of one namespace only (`None`: all); tests run one per namespace.
pub async fn run_in(ctx: Arc<Context>, namespace: Option<String>) {
    let apis = discover(&ctx.client).await;
    run_with(ctx, namespace, apis).await;
}

/// [`run_in`] with the cluster's APIs already known.
pub async fn run_with(ctx: Arc<Context>, namespace: Option<String>, apis: ClusterApis) {
    let client = ctx.client.clone();
    let ns = namespace.as_deref();
    let ar = apis.runner.api_resource();
    let jobs_config = || watcher::Config::default().labels(label::RESOURCE_TYPE);
    let controller = Controller::new(
        scoped::<ModuleBuildSignConfig>(&client, ns),
        watcher::Config::default().any_semantic(),
    );
    let store = controller.store();
    let (for_config_maps, for_secrets) = (store.clone(), store.clone());
    let controller = controller
        .owns_with(dynamic(&client, ns, &ar), ar.clone(), jobs_config())
        .watches_stream(
            watcher(
                scoped::<PartialObjectMeta<ConfigMap>>(&client, ns),
                watcher::Config::default(),
            )
            .touched_objects(),
            move |cm: PartialObjectMeta<ConfigMap>| users_of(&for_config_maps, &cm),
        )
        .watches_stream(
            watcher(
                scoped::<PartialObjectMeta<Secret>>(&client, ns),
                watcher::Config::default(),
            )
            .touched_objects(),
            move |secret: PartialObjectMeta<Secret>| users_of(&for_secrets, &secret),
        );
    let reconciler = Arc::new(Reconciler {
        ctx: ctx.clone(),
        apis,
        recorder: Recorder::new(client.clone(), ctx.reporter.clone()),
        backoff: super::backoff::Backoff::default(),
    });
    let mbsc_controller = controller
        .run(
            |m, r| super::with_backoff(m.clone(), r.clone(), reconcile(m, r)),
            super::error_policy,
            reconciler,
        )
        .for_each(super::log_result("mbsc"));
    tokio::join!(
        mbsc_controller,
        events::run(ctx, dynamic(&client, ns, &ar), ar, jobs_config())
    );
}

fn scoped<K>(client: &kube::Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

fn dynamic(client: &kube::Client, namespace: Option<&str>, ar: &ApiResource) -> Api<DynamicObject> {
    match namespace {
        Some(ns) => Api::namespaced_with(client.clone(), ns, ar),
        None => Api::all_with(client.clone(), ar),
    }
}

/// The MBSCs of the object's namespace that name it (Dockerfile ConfigMap, build Secrets, key
/// and certificate Secrets, pull secret).
fn users_of<K: Resource>(
    store: &Store<ModuleBuildSignConfig>,
    object: &PartialObjectMeta<K>,
) -> Vec<ObjectRef<ModuleBuildSignConfig>> {
    let ns = object.metadata.namespace.clone().unwrap_or_default();
    let name = object.metadata.name.clone().unwrap_or_default();
    store
        .state()
        .iter()
        .filter(|m| m.namespace().as_deref() == Some(ns.as_str()))
        .filter(|m| {
            m.spec
                .image_repo_secret
                .as_ref()
                .is_some_and(|s| s.name == name)
                || m.spec.images.iter().any(|e| names_input(e, &name))
        })
        .map(|m| ObjectRef::from_obj(m.as_ref()))
        .collect()
}

fn names_input(entry: &ModuleBuildSignImageSpec, name: &str) -> bool {
    let build = entry.image.build.as_ref().is_some_and(|b| {
        b.dockerfile_config_map.name == name || b.secrets.iter().any(|s| s.name == name)
    });
    let sign = entry
        .image
        .sign
        .as_ref()
        .is_some_and(|s| s.key_secret.name == name || s.cert_secret.name == name);
    build || sign
}

fn target<'a>(
    mbsc: &'a ModuleBuildSignConfig,
    namespace: &'a str,
    owner: Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference>,
    entry: &'a ModuleBuildSignImageSpec,
) -> JobTarget<'a> {
    JobTarget {
        mbsc: mbsc.metadata.name.as_deref().unwrap_or_default(),
        namespace,
        owner,
        image: &entry.image,
        image_repo_secret: mbsc.spec.image_repo_secret.as_ref(),
        push: mbsc.spec.push_built_image,
        tolerations: &mbsc.spec.tolerations,
    }
}

async fn reconcile(mbsc: Arc<ModuleBuildSignConfig>, r: Arc<Reconciler>) -> Result<Action, Error> {
    let ns = mbsc.namespace().unwrap_or_default();
    let span = info_span!("reconcile", controller = "mbsc", ns = %ns, name = %mbsc.name_any());
    async move {
        if mbsc.meta().deletion_timestamp.is_some() {
            // Jobs go with the MBSC (owner references); their finalizers are released in events.
            return Ok(Action::await_change());
        }
        reconcile_live(&mbsc, &ns, &r).await
    }
    .instrument(span)
    .await
}

/// What one entry came to in this pass.
struct EntryOutcome {
    state: Option<BuildSignImageState>,
    failure: Option<String>,
}

async fn reconcile_live(
    mbsc: &ModuleBuildSignConfig,
    ns: &str,
    r: &Reconciler,
) -> Result<Action, Error> {
    let client = &r.ctx.client;
    let name = mbsc.name_any();
    let ar = r.apis.runner.api_resource();
    let api = Api::<DynamicObject>::namespaced_with(client.clone(), ns, &ar);
    let selector = format!("{}={name},{}", label::MODULE_NAME, label::RESOURCE_TYPE);
    // A quorum read: a job created by the previous pass must be seen.
    let jobs = api
        .list(&ListParams::default().labels(&selector))
        .await?
        .items;
    let uid = mbsc.uid();
    let ours = |job: &DynamicObject| {
        job.owner_references()
            .iter()
            .any(|o| o.controller == Some(true) && Some(&o.uid) == uid.as_ref())
    };
    let owner = mbsc.controller_owner_ref(&());
    let previous = mbsc
        .status
        .as_ref()
        .map(|s| s.images.as_slice())
        .unwrap_or_default();
    let previous_failures = failure_messages(mbsc);

    let mut states = Vec::new();
    let mut failures = BTreeMap::new();
    let mut wanted = HashSet::new();
    let mut requeue: Option<Duration> = None;
    for entry in &mbsc.spec.images {
        let image = &entry.image.image;
        let target = target(mbsc, ns, owner.as_ref(), entry);
        let job_name = target.job_name(entry.action);
        wanted.insert(job_name.clone());
        let prev = previous.iter().find(|s| &s.image == image);
        let existing = jobs.iter().find(|j| j.name_any() == job_name);
        let outcome = match desired_job(r, &target, entry.action).await? {
            Err(err) => {
                let message = err.to_string();
                let known = prev.is_some_and(|p| {
                    p.status == BuildSignResult::Failure && p.action == entry.action
                }) && previous_failures.get(image) == Some(&message);
                if !known {
                    warn!(image = %image, category = err.category(), error = %message, "cannot build or sign");
                    let reason = format!("{}Failed", job::event_prefix(entry.action));
                    publish(r, mbsc, EventType::Warning, &reason, &message).await;
                }
                if matches!(err, BuildSignError::Dtk(_)) {
                    requeue = Some(DTK_RETRY);
                }
                EntryOutcome {
                    state: Some(state(image, BuildSignResult::Failure, entry.action)),
                    failure: Some(message),
                }
            }
            Ok((object, hash)) => match existing {
                None => {
                    let done = prev.filter(|p| {
                        p.status == BuildSignResult::Success && p.action == entry.action
                    });
                    if done.is_none() {
                        info!(job = %job_name, action = ?entry.action, "creating");
                        create(&api, object).await?;
                    }
                    EntryOutcome {
                        state: done.cloned(),
                        failure: None,
                    }
                }
                Some(job) if !ours(job) || job::hash(job) != Some(hash.as_str()) => {
                    if job.meta().deletion_timestamp.is_none() {
                        info!(job = %job_name, "inputs changed: replacing");
                        delete(&api, &job_name).await?;
                    }
                    if !ours(job) {
                        requeue = Some(requeue.map_or(LEFTOVER_RETRY, |d| d.min(LEFTOVER_RETRY)));
                    }
                    EntryOutcome {
                        state: None,
                        failure: None,
                    }
                }
                Some(job) => match job::phase(job) {
                    Phase::Succeeded => EntryOutcome {
                        state: Some(state(image, BuildSignResult::Success, entry.action)),
                        failure: None,
                    },
                    Phase::Failed(said) => EntryOutcome {
                        state: Some(state(image, BuildSignResult::Failure, entry.action)),
                        failure: Some(format!(
                            "{} {ns}/{job_name} failed: {said}",
                            r.apis.runner.noun()
                        )),
                    },
                    Phase::Active => EntryOutcome {
                        state: None,
                        failure: None,
                    },
                },
            },
        };
        states.extend(outcome.state);
        if let Some(message) = outcome.failure {
            failures.insert(image.clone(), message);
        }
    }

    write_results(
        r,
        mbsc,
        ns,
        previous,
        &states,
        &previous_failures,
        &failures,
    )
    .await?;

    // Successful jobs, and jobs no entry wants, are not kept (finalizers hold them for the GC
    // delay). Failed jobs stay, for the user to read, until their inputs change.
    for job in jobs
        .iter()
        .filter(|j| ours(j) && j.meta().deletion_timestamp.is_none())
    {
        if !wanted.contains(&job.name_any()) || job::phase(job) == Phase::Succeeded {
            debug!(job = %job.name_any(), "garbage-collecting");
            delete(&api, &job.name_any()).await?;
        }
    }
    Ok(requeue.map_or_else(Action::await_change, Action::requeue))
}

fn state(image: &str, status: BuildSignResult, action: BuildSignAction) -> BuildSignImageState {
    BuildSignImageState {
        image: image.to_owned(),
        status,
        action,
    }
}

async fn write_results(
    r: &Reconciler,
    mbsc: &ModuleBuildSignConfig,
    ns: &str,
    previous: &[BuildSignImageState],
    states: &[BuildSignImageState],
    previous_failures: &BTreeMap<String, String>,
    failures: &BTreeMap<String, String>,
) -> Result<(), Error> {
    let api = Api::<ModuleBuildSignConfig>::namespaced(r.ctx.client.clone(), ns);
    let params = PatchParams {
        field_manager: Some(field_manager::MBSC.to_owned()),
        ..PatchParams::default()
    };
    // The messages first: the MIC reads them when the status says Failure.
    if previous_failures != failures {
        let value = if failures.is_empty() {
            Value::Null
        } else {
            Value::String(serde_json::to_string(failures).unwrap_or_default())
        };
        let patch = json!({"metadata": {"annotations": {FAILURES_ANNOTATION: value}}});
        api.patch(&mbsc.name_any(), &params, &Patch::Merge(&patch))
            .await?;
    }
    if previous != states || mbsc.status.is_none() {
        let patch = json!({"status": {"images": states}});
        api.patch_status(&mbsc.name_any(), &params, &Patch::Merge(&patch))
            .await?;
    }
    Ok(())
}

async fn create(api: &Api<DynamicObject>, object: Value) -> Result<(), Error> {
    let object: DynamicObject =
        serde_json::from_value(object).map_err(|e| Error::Kube(kube::Error::SerdeError(e)))?;
    match api.create(&PostParams::default(), &object).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
        Err(err) => Err(err.into()),
    }
}

async fn delete(api: &Api<DynamicObject>, name: &str) -> Result<(), Error> {
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.is_not_found() => Ok(()),
        Err(err) => Err(err.into()),
    }
}

async fn publish(
    r: &Reconciler,
    mbsc: &ModuleBuildSignConfig,
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
    if let Err(err) = r.recorder.publish(&event, &mbsc.object_ref(&())).await {
        warn!(error = %err, "could not publish an event");
    }
}

/// Reads the inputs of one entry and renders its job with its hash; `Ok(Err(_))` is a user
/// error (nothing to create until the inputs change).
async fn desired_job(
    r: &Reconciler,
    target: &JobTarget<'_>,
    action: BuildSignAction,
) -> Result<Result<(Value, String), BuildSignError>, Error> {
    let rendered = match action {
        BuildSignAction::BuildImage => render_build(r, target).await?,
        BuildSignAction::SignImage => render_sign(r, target).await?,
    };
    Ok(rendered.map(|object| {
        let hash = object["metadata"]["annotations"][kmm_api::wire::annotation::LAST_HASH]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        (object, hash)
    }))
}

async fn render_build(
    r: &Reconciler,
    target: &JobTarget<'_>,
) -> Result<Result<Value, BuildSignError>, Error> {
    let ns = target.namespace;
    let Some(build) = target.image.build.as_ref() else {
        return Ok(Err(BuildSignError::NoBuild {
            image: target.image.image.clone(),
            kernel: target.image.kernel_version.clone(),
        }));
    };
    let client = &r.ctx.client;
    let config_map = Api::<ConfigMap>::namespaced(client.clone(), ns)
        .get_opt(&build.dockerfile_config_map.name)
        .await?;
    let dockerfile = match build_pod::dockerfile_from(
        ns,
        build,
        config_map
            .as_ref()
            .map(|cm| cm.data.as_ref().unwrap_or(&EMPTY)),
    ) {
        Ok(text) => text.to_owned(),
        Err(err) => return Ok(Err(err)),
    };
    let secrets = Api::<Secret>::namespaced(client.clone(), ns);
    let mut missing = HashSet::new();
    for secret in &build.secrets {
        if secrets.get_metadata_opt(&secret.name).await?.is_none() {
            missing.insert(secret.name.clone());
        }
    }
    if let Err(err) = build_pod::check_build_secrets(ns, build, |name| !missing.contains(name)) {
        return Ok(Err(err));
    }
    let dtk_image = if build_pod::needs_dtk(&dockerfile, build) {
        match resolve_dtk(r, &target.image.kernel_version).await? {
            Ok(image) => Some(image),
            Err(err) => return Ok(Err(err.into())),
        }
    } else {
        None
    };
    Ok(Ok(match r.apis.runner {
        Runner::Kaniko => serde_json::to_value(build_pod::render_build_pod(&BuildPodInput {
            target: *target,
            build,
            dockerfile: &dockerfile,
            build_image: &r.ctx.config.build_image,
            dtk_image: dtk_image.as_deref(),
        }))
        .unwrap_or_default(),
        Runner::OpenShift => {
            openshift_build::render_build(target, build, &dockerfile, dtk_image.as_deref())
        }
    }))
}

static EMPTY: BTreeMap<String, String> = BTreeMap::new();

async fn render_sign(
    r: &Reconciler,
    target: &JobTarget<'_>,
) -> Result<Result<Value, BuildSignError>, Error> {
    let ns = target.namespace;
    let Some(sign) = target.image.sign.as_ref() else {
        return Ok(Err(BuildSignError::NoSign {
            image: target.image.image.clone(),
            kernel: target.image.kernel_version.clone(),
        }));
    };
    let secrets = Api::<Secret>::namespaced(r.ctx.client.clone(), ns);
    let key_secret = secrets.get_opt(&sign.key_secret.name).await?;
    let cert_secret = secrets.get_opt(&sign.cert_secret.name).await?;
    fn data(secret: &Option<Secret>) -> Option<&BTreeMap<String, k8s_openapi::ByteString>> {
        static NONE: BTreeMap<String, k8s_openapi::ByteString> = BTreeMap::new();
        secret.as_ref().map(|s| s.data.as_ref().unwrap_or(&NONE))
    }
    let key = match sign_pod::signing_secret_data(
        ns,
        &sign.key_secret.name,
        "keySecret",
        sign_pod::KEY_KEY,
        data(&key_secret),
    ) {
        Ok(bytes) => bytes,
        Err(err) => return Ok(Err(err)),
    };
    let cert = match sign_pod::signing_secret_data(
        ns,
        &sign.cert_secret.name,
        "certSecret",
        sign_pod::CERT_KEY,
        data(&cert_secret),
    ) {
        Ok(bytes) => bytes,
        Err(err) => return Ok(Err(err)),
    };
    let input = SignPodInput {
        target: *target,
        sign,
        key,
        cert,
        build_image: &r.ctx.config.build_image,
        sign_image: &r.ctx.config.sign_image,
    };
    Ok(match r.apis.runner {
        Runner::Kaniko => sign_pod::render_sign_pod(&input)
            .map(|pod| serde_json::to_value(pod).unwrap_or_default()),
        Runner::OpenShift => openshift_build::render_sign(&input),
    })
}

/// `DTK_AUTO` for a kernel: the nodes' osImage and the Driver Toolkit ImageStream's tags.
async fn resolve_dtk(
    r: &Reconciler,
    kernel_version: &str,
) -> Result<Result<String, dtk::DtkError>, Error> {
    let client = &r.ctx.client;
    let nodes = Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await?
        .items;
    let facts: Vec<(String, String, String)> = nodes
        .iter()
        .map(|n| {
            let info = n.status.as_ref().and_then(|s| s.node_info.as_ref());
            (
                n.name_any(),
                info.map(|i| i.kernel_version.clone()).unwrap_or_default(),
                info.map(|i| i.os_image.clone()).unwrap_or_default(),
            )
        })
        .collect();
    let nodes: Vec<NodeOs<'_>> = facts
        .iter()
        .map(|(name, kernel, os_image)| NodeOs {
            name,
            kernel,
            os_image,
        })
        .collect();
    let tags = if r.apis.image_streams {
        let ar = ApiResource {
            group: "image.openshift.io".into(),
            version: "v1".into(),
            api_version: "image.openshift.io/v1".into(),
            kind: "ImageStream".into(),
            plural: "imagestreams".into(),
        };
        Api::<DynamicObject>::namespaced_with(client.clone(), dtk::IMAGE_STREAM_NAMESPACE, &ar)
            .get_opt(dtk::IMAGE_STREAM_NAME)
            .await?
            .map(|stream| image_stream_tags(&stream))
    } else {
        None
    };
    Ok(dtk::resolve(
        kernel::node_kernel(kernel_version),
        &nodes,
        tags.as_deref(),
    ))
}

fn image_stream_tags(stream: &DynamicObject) -> Vec<DtkTag> {
    stream.data["spec"]["tags"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|tag| DtkTag {
            name: tag["name"].as_str().unwrap_or_default().to_owned(),
            image: tag["from"]["name"].as_str().unwrap_or_default().to_owned(),
        })
        .collect()
}
