//! The ModuleImagesConfig (MIC) reconciler: finds out whether each module image exists, and
//! records `Exists`, `DoesNotExist`, `NeedsBuilding` or `NeedsSigning` (plus a reason and the
//! registry's message) in the MIC status for the Module reconciler and the build/sign work.
//!
//! Two ways to find out (operator config, [`ImageCheckMode`]): ask the registry directly
//! (default; tells missing, unauthorized, unreachable and TLS problems apart), or run Go KMM's
//! pull pods through a node's container runtime. Transient failures keep the image unknown and
//! are retried with per-image exponential backoff. Images to build or sign are handed to the
//! MIC's ModuleBuildSignConfig, whose outcomes come back as image states ([`build_sign`]).

pub mod build_sign;
pub mod plan;
pub mod pull_pod;
pub mod registry;

use std::collections::BTreeMap;
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kmm_api::v1beta1::{
    ModuleBuildSignConfig, ModuleBuildSignConfigSpec, ModuleBuildSignImageSpec, ModuleImageSpec,
    ModuleImageState, ModuleImagesConfig, ModuleImagesConfigStatus, TlsOptions,
};
use kmm_api::wire::{field_manager, label};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use tracing::{Instrument, debug, info, info_span, warn};

use self::plan::{Backoffs, Finding, RetryKey};
use self::registry::Credentials;
use super::{Context, ImageCheckMode};

/// Registry checks of one MIC run at most this many at a time.
const CHECK_CONCURRENCY: usize = 8;
/// Shortest requeue, so that a backoff that is already due does not spin.
const MIN_REQUEUE: Duration = Duration::from_millis(200);

/// The API call that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Deleting the MBSC on a rebuild trigger.
    DeleteBuildSignConfig,
    /// Listing the MIC's pull pods.
    ListPullPods,
    /// Reading the `imageRepoSecret`.
    ReadSecret,
    /// Writing the MIC status.
    WriteStatus,
    /// Deleting a finished pull pod.
    DeletePullPod,
    /// Creating a pull pod.
    CreatePullPod,
    /// Reading the MBSC.
    ReadBuildSignConfig,
    /// Writing the MBSC spec.
    WriteBuildSignConfig,
}

impl Stage {
    /// Short stable name (event reason, metric label).
    pub fn category(self) -> &'static str {
        match self {
            Stage::DeleteBuildSignConfig => "DeleteBuildSignConfig",
            Stage::ListPullPods => "ListPullPods",
            Stage::ReadSecret => "ReadSecret",
            Stage::WriteStatus => "WriteStatus",
            Stage::DeletePullPod => "DeletePullPod",
            Stage::CreatePullPod => "CreatePullPod",
            Stage::ReadBuildSignConfig => "ReadBuildSignConfig",
            Stage::WriteBuildSignConfig => "WriteBuildSignConfig",
        }
    }
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Stage::DeleteBuildSignConfig => "DeleteBuildSignConfig",
            Stage::ListPullPods => "listing the pull pods",
            Stage::ReadSecret => "ReadSecret",
            Stage::WriteStatus => "WriteStatus",
            Stage::DeletePullPod => "DeletePullPod",
            Stage::CreatePullPod => "CreatePullPod",
            Stage::ReadBuildSignConfig => "ReadBuildSignConfig",
            Stage::WriteBuildSignConfig => "WriteBuildSignConfig",
        })
    }
}

/// What failed, on which MIC.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The MIC has no namespace (the API server never sends one without).
    #[error("ModuleImagesConfig {0} has no namespace")]
    NoNamespace(String),
    /// An API call failed.
    #[error("{stage} of ModuleImagesConfig {namespace}/{name}")]
    Kube {
        /// What the call was for.
        stage: Stage,
        /// MIC namespace.
        namespace: String,
        /// MIC name.
        name: String,
        /// The client's error.
        #[source]
        source: kube::Error,
    },
}

impl Error {
    /// Short stable category (event reason, metric label).
    pub fn category(&self) -> &'static str {
        match self {
            Error::NoNamespace(_) => "InvalidObject",
            Error::Kube { stage, .. } => stage.category(),
        }
    }
}

/// The reconciler's own state next to the shared [`Context`].
struct Reconciler {
    ctx: Arc<Context>,
    store: Store<ModuleImagesConfig>,
    backoffs: Mutex<Backoffs>,
    noise: std::hash::RandomState,
}

impl Reconciler {
    fn backoffs(&self) -> std::sync::MutexGuard<'_, Backoffs> {
        // A panic while holding the lock cannot leave the map inconsistent; keep going.
        self.backoffs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn noise(&self, key: &RetryKey) -> u64 {
        self.noise.hash_one((key, Instant::now()))
    }
}

/// Runs the MIC controller until the future is dropped. Watches every ModuleImagesConfig (all
/// namespaces) and, in pull-pod mode, the pull pods it owns.
pub async fn run(ctx: Arc<Context>) {
    run_in(ctx, None).await;
}

/// [`run`] for the MICs and pull pods of one namespace only (`None`: all namespaces); tests run
/// one controller per namespace side by side.
pub async fn run_in(ctx: Arc<Context>, namespace: Option<String>) {
    let client = ctx.client.clone();
    // Status writes wake the controller too; such a pass finds nothing due and writes nothing.
    let mut controller = Controller::new(
        scoped::<ModuleImagesConfig>(client.clone(), namespace.as_deref()),
        watcher::Config::default().any_semantic(),
    );
    let reader = controller.store();
    // Build and sign outcomes come back through the MBSC's status.
    controller = controller.owns(
        scoped::<ModuleBuildSignConfig>(client.clone(), namespace.as_deref()),
        watcher::Config::default().any_semantic(),
    );
    if ctx.config.image_check == ImageCheckMode::PullPod {
        controller = controller.owns(
            scoped::<Pod>(client, namespace.as_deref()),
            watcher::Config::default()
                .labels(label::IMAGE_OWNER)
                .any_semantic(),
        );
    }
    let reconciler = Arc::new(Reconciler {
        ctx,
        store: reader,
        backoffs: Mutex::new(Backoffs::default()),
        noise: std::hash::RandomState::new(),
    });
    controller
        .run(
            |mic, r| async move {
                let metrics = r.ctx.metrics.clone();
                super::counted(&metrics, "module-images-config", reconcile(mic, r)).await
            },
            error_policy,
            reconciler,
        )
        .for_each(|result| async move {
            match result {
                Ok((object, action)) => debug!(mic = %object, ?action, "reconciled"),
                Err(err) => warn!(error = %err, "ModuleImagesConfig controller"),
            }
        })
        .await;
}

fn scoped<K>(client: kube::Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(ns) => Api::namespaced(client, ns),
        None => Api::all(client),
    }
}

fn error_policy(mic: Arc<ModuleImagesConfig>, err: &Error, r: Arc<Reconciler>) -> Action {
    let key = mic_key(&mic);
    let noise = r.noise(&key);
    let delay = r.backoffs().failed(key, Instant::now(), noise);
    warn!(
        ns = mic.namespace().unwrap_or_default(),
        name = mic.name_any(),
        category = err.category(),
        error = %err,
        retry_in = ?delay,
        "reconcile failed"
    );
    Action::requeue(delay)
}

fn mic_key(mic: &ModuleImagesConfig) -> RetryKey {
    image_key(mic, "")
}

fn image_key(mic: &ModuleImagesConfig, image: &str) -> RetryKey {
    RetryKey {
        namespace: mic.namespace().unwrap_or_default(),
        name: mic.name_any(),
        image: image.to_owned(),
    }
}

async fn reconcile(mic: Arc<ModuleImagesConfig>, r: Arc<Reconciler>) -> Result<Action, Error> {
    let namespace = mic
        .namespace()
        .ok_or_else(|| Error::NoNamespace(mic.name_any()))?;
    let span = info_span!("reconcile", controller = "mic", ns = %namespace, name = %mic.name_any());
    async move {
        if mic.meta().deletion_timestamp.is_some() {
            // The pull pods go with the MIC (owner references).
            return Ok(Action::await_change());
        }
        let action = reconcile_live(&mic, &namespace, &r).await?;
        r.backoffs().succeeded(&mic_key(&mic));
        Ok(action)
    }
    .instrument(span)
    .await
}

/// One pass over a live MIC: rebuild trigger, checks, status (written once, if changed), then
/// the pull pods.
async fn reconcile_live(
    mic: &ModuleImagesConfig,
    namespace: &str,
    r: &Reconciler,
) -> Result<Action, Error> {
    let now = Instant::now();
    let images = plan::spec_images(&mic.spec);
    let start = plan::start(mic);
    forget_stale_backoffs(r, mic, &images, start.rebuild);
    if start.rebuild {
        info!(generation = ?start.rebuild_generation, "image rebuild requested: checking every image again");
        delete_build_sign_config(r, mic, namespace).await?;
    }
    let mut states = start.states;

    let pods = list_pull_pods(r, mic, namespace).await?;
    let mut create = Vec::new();
    let delete = match r.ctx.config.image_check {
        ImageCheckMode::Registry => {
            let due: Vec<&ModuleImageSpec> = {
                let backoffs = r.backoffs();
                images
                    .iter()
                    .copied()
                    .filter(|i| plan::needs_check(i, &plan::state_of(&states, &i.image)))
                    .filter(|i| backoffs.ready(&image_key(mic, &i.image), now))
                    .collect()
            };
            if !due.is_empty() {
                let credentials = load_credentials(r, mic, namespace).await?;
                let results = check_in_registry(&due, &credentials).await;
                for (image, (finding, message)) in due.iter().zip(results) {
                    record(r, mic, image, finding, &message, &mut states, now);
                }
            }
            // Pull pods left by Go KMM (or by pull-pod mode) would otherwise back off forever.
            pods.iter().map(ResourceExt::name_any).collect()
        }
        ImageCheckMode::PullPod => {
            let read = pull_pod::read_pull_pods(&images, &pods);
            for (image, finding, message) in &read.findings {
                if let Some(spec) = images.iter().find(|i| &i.image == image) {
                    record(r, mic, spec, *finding, message, &mut states, now);
                }
            }
            let to_pull = {
                let backoffs = r.backoffs();
                pull_pod::images_to_pull(&images, &states, &pods, &read.delete, |image| {
                    backoffs.ready(&image_key(mic, image), now)
                })
            };
            create = to_pull
                .into_iter()
                .map(|image| pull_pod::render_pull_pod(mic, image))
                .collect();
            read.delete
        }
    };

    let in_cluster = images.iter().any(|i| i.build.is_some() || i.sign.is_some());
    let mbsc = if in_cluster && !start.rebuild {
        read_build_sign_config(r, mic, namespace).await?
    } else {
        None
    };
    build_sign::apply_outcomes(&images, &mut states, mbsc.as_ref());

    let status = plan::assemble_status(&images, &states, start.rebuild_generation);
    if mic.status.as_ref() != Some(&status) {
        write_status(r, mic, namespace, &status).await?;
    }
    if in_cluster {
        let entries = build_sign::desired_entries(&images, &states, mbsc.as_ref());
        upsert_build_sign_config(r, mic, namespace, mbsc.as_ref(), entries).await?;
    }
    // Only after the status holds the pods' results (crash safety, as in Go KMM).
    let pods_api = Api::<Pod>::namespaced(r.ctx.client.clone(), namespace);
    for name in &delete {
        match pods_api.delete(name, &DeleteParams::background()).await {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.is_not_found() => {}
            Err(source) => return Err(kube_error(Stage::DeletePullPod, mic, source)),
        }
    }
    for pod in &create {
        pods_api
            .create(&PostParams::default(), pod)
            .await
            .map_err(|source| kube_error(Stage::CreatePullPod, mic, source))?;
    }
    Ok(next_action(r, mic, &images, &states, now))
}

/// Records a finding's outcome and its retry bookkeeping.
fn record(
    r: &Reconciler,
    mic: &ModuleImagesConfig,
    image: &ModuleImageSpec,
    finding: Finding,
    message: &str,
    states: &mut BTreeMap<String, ModuleImageState>,
    now: Instant,
) {
    let outcome = plan::decide(image, finding, message);
    let key = image_key(mic, &image.image);
    if outcome.retry {
        let noise = r.noise(&key);
        let delay = r.backoffs().failed(key, now, noise);
        debug!(image = %image.image, reason = %outcome.state.reason, retry_in = ?delay, "image check to retry");
    } else {
        r.backoffs().succeeded(&key);
    }
    if outcome.state.status == kmm_api::v1beta1::ImageState::Exists {
        debug!(image = %image.image, "image exists");
    }
    states.insert(image.image.clone(), outcome.state);
}

/// Requeue at the earliest backoff of an image still to be checked; otherwise wait for a change
/// (a spec change, or in pull-pod mode a pull pod's).
fn next_action(
    r: &Reconciler,
    mic: &ModuleImagesConfig,
    images: &[&ModuleImageSpec],
    states: &BTreeMap<String, ModuleImageState>,
    now: Instant,
) -> Action {
    let backoffs = r.backoffs();
    images
        .iter()
        .filter(|i| plan::needs_check(i, &plan::state_of(states, &i.image)))
        .filter_map(|i| backoffs.due(&image_key(mic, &i.image)))
        .min()
        .map_or_else(Action::await_change, |due| {
            Action::requeue(due.saturating_duration_since(now).max(MIN_REQUEUE))
        })
}

/// Drops the backoffs of images that left the spec (all of this MIC's on a rebuild) and of MICs
/// that no longer exist.
fn forget_stale_backoffs(
    r: &Reconciler,
    mic: &ModuleImagesConfig,
    images: &[&ModuleImageSpec],
    rebuild: bool,
) {
    let this = mic_key(mic);
    r.backoffs().retain(|key| {
        if key.namespace == this.namespace && key.name == this.name {
            key.image.is_empty() || (!rebuild && images.iter().any(|i| i.image == key.image))
        } else {
            r.store
                .get(&ObjectRef::new(&key.name).within(&key.namespace))
                .is_some()
        }
    });
}

async fn list_pull_pods(
    r: &Reconciler,
    mic: &ModuleImagesConfig,
    namespace: &str,
) -> Result<Vec<Pod>, Error> {
    let selector = format!(
        "{}={},{}",
        label::IMAGE_OWNER,
        mic.name_any(),
        label::PULL_POD_TYPE
    );
    // A quorum read, not a cache: a pod created by the previous pass must be seen, or it would
    // be created twice.
    let pods = Api::<Pod>::namespaced(r.ctx.client.clone(), namespace)
        .list(&ListParams::default().labels(&selector))
        .await
        .map_err(|source| kube_error(Stage::ListPullPods, mic, source))?;
    let uid = mic.uid();
    Ok(pods
        .items
        .into_iter()
        .filter(|pod| {
            pod.owner_references()
                .iter()
                .any(|o| o.controller == Some(true) && Some(&o.uid) == uid.as_ref())
        })
        .collect())
}

/// The MBSC of a MIC holds build/sign outcomes of the previous rebuild generation.
async fn delete_build_sign_config(
    r: &Reconciler,
    mic: &ModuleImagesConfig,
    namespace: &str,
) -> Result<(), Error> {
    let api = Api::<ModuleBuildSignConfig>::namespaced(r.ctx.client.clone(), namespace);
    match api
        .delete(&mic.name_any(), &DeleteParams::background())
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.is_not_found() => Ok(()),
        Err(source) => Err(kube_error(Stage::DeleteBuildSignConfig, mic, source)),
    }
}

async fn read_build_sign_config(
    r: &Reconciler,
    mic: &ModuleImagesConfig,
    namespace: &str,
) -> Result<Option<ModuleBuildSignConfig>, Error> {
    Api::<ModuleBuildSignConfig>::namespaced(r.ctx.client.clone(), namespace)
        .get_opt(&mic.name_any())
        .await
        .map_err(|source| kube_error(Stage::ReadBuildSignConfig, mic, source))
}

/// Writes the MBSC (same name, controlled by the MIC) when its spec differs from what the images
/// need; an MBSC is created only when there is work for it.
async fn upsert_build_sign_config(
    r: &Reconciler,
    mic: &ModuleImagesConfig,
    namespace: &str,
    current: Option<&ModuleBuildSignConfig>,
    images: Vec<ModuleBuildSignImageSpec>,
) -> Result<(), Error> {
    let spec = ModuleBuildSignConfigSpec {
        images,
        image_repo_secret: mic.spec.image_repo_secret.clone(),
        push_built_image: mic.spec.push_built_image,
        tolerations: mic.spec.tolerations.clone(),
    };
    match current {
        Some(current) if current.spec == spec => return Ok(()),
        None if spec.images.is_empty() => return Ok(()),
        _ => {}
    }
    let mut mbsc = ModuleBuildSignConfig::new(&mic.name_any(), spec);
    mbsc.metadata.namespace = Some(namespace.to_owned());
    mbsc.metadata.owner_references = mic.controller_owner_ref(&()).map(|o| vec![o]);
    debug!(
        images = mbsc.spec.images.len(),
        "writing the ModuleBuildSignConfig"
    );
    Api::<ModuleBuildSignConfig>::namespaced(r.ctx.client.clone(), namespace)
        .patch(
            &mic.name_any(),
            &PatchParams::apply(field_manager::MIC).force(),
            &Patch::Apply(&mbsc),
        )
        .await
        .map_err(|source| kube_error(Stage::WriteBuildSignConfig, mic, source))?;
    Ok(())
}

/// The MIC's pull secret as credentials. A missing or unreadable Secret is not fatal: the check
/// goes on anonymously (as a kubelet would) and the problem is reported if the registry refuses.
async fn load_credentials(
    r: &Reconciler,
    mic: &ModuleImagesConfig,
    namespace: &str,
) -> Result<Credentials, Error> {
    let Some(name) = mic.spec.image_repo_secret.as_ref().map(|s| s.name.as_str()) else {
        return Ok(Credentials::default());
    };
    let secret = Api::<Secret>::namespaced(r.ctx.client.clone(), namespace)
        .get_opt(name)
        .await
        .map_err(|source| kube_error(Stage::ReadSecret, mic, source))?;
    Ok(match secret {
        None => Credentials {
            problem: Some(format!("imageRepoSecret {namespace}/{name} not found")),
            ..Credentials::default()
        },
        Some(secret) => match registry::parse_docker_config(&secret) {
            Ok(by_host) => Credentials {
                by_host,
                problem: None,
            },
            Err(problem) => Credentials {
                problem: Some(format!("imageRepoSecret {namespace}/{name} {problem}")),
                ..Credentials::default()
            },
        },
    })
}

/// Checks `images` in their registries, a few at a time; results in the order of `images`.
async fn check_in_registry(
    images: &[&ModuleImageSpec],
    credentials: &Credentials,
) -> Vec<(Finding, String)> {
    // One client per TLS setting for this pass (clients keep the credentials they first used).
    let mut clients: BTreeMap<(bool, bool), Result<oci_client::Client, String>> = BTreeMap::new();
    for image in images {
        let tls = image.registry_tls.unwrap_or_default();
        clients
            .entry(tls_key(&tls))
            .or_insert_with(|| registry::client_for(&tls).map_err(|e| e.to_string()));
    }
    let clients = &clients;
    // Collected first: a closure kept inside the stream makes the reconcile future lose `Send`'s
    // higher-ranked lifetimes (rust-lang/rust#102211).
    let checks: Vec<_> = images
        .iter()
        .map(|image| check_one(clients, image, credentials))
        .collect();
    futures::stream::iter(checks)
        .buffered(CHECK_CONCURRENCY)
        .collect()
        .await
}

async fn check_one(
    clients: &BTreeMap<(bool, bool), Result<oci_client::Client, String>>,
    image: &ModuleImageSpec,
    credentials: &Credentials,
) -> (Finding, String) {
    let tls = image.registry_tls.unwrap_or_default();
    let (finding, message) = match clients.get(&tls_key(&tls)) {
        Some(Ok(client)) => {
            let auth = credentials.for_image(&image.image);
            registry::check_image(client, &image.image, &auth).await
        }
        Some(Err(err)) => (
            Finding::Tls,
            format!("cannot set up the registry client: {err}"),
        ),
        None => (Finding::RegistryError, "no registry client".to_owned()),
    };
    match &credentials.problem {
        Some(problem) if finding == Finding::Unauthorized => {
            (finding, format!("{message} ({problem})"))
        }
        _ => (finding, message),
    }
}

fn tls_key(tls: &TlsOptions) -> (bool, bool) {
    (tls.insecure, tls.insecure_skip_tls_verify)
}

/// Writes the whole status with one merge patch (explicit nulls so that no stale field stays).
async fn write_status(
    r: &Reconciler,
    mic: &ModuleImagesConfig,
    namespace: &str,
    status: &ModuleImagesConfigStatus,
) -> Result<(), Error> {
    let patch = serde_json::json!({
        "status": {
            "imagesStates": status.images_states,
            "imageRebuildTriggerGeneration": status.image_rebuild_trigger_generation,
        }
    });
    let params = PatchParams {
        field_manager: Some(field_manager::MIC.to_owned()),
        ..PatchParams::default()
    };
    Api::<ModuleImagesConfig>::namespaced(r.ctx.client.clone(), namespace)
        .patch_status(&mic.name_any(), &params, &Patch::Merge(&patch))
        .await
        .map_err(|source| kube_error(Stage::WriteStatus, mic, source))?;
    Ok(())
}

fn kube_error(stage: Stage, mic: &ModuleImagesConfig, source: kube::Error) -> Error {
    Error::Kube {
        stage,
        namespace: mic.namespace().unwrap_or_default(),
        name: mic.name_any(),
        source,
    }
}
