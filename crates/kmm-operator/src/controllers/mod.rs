//! The reconcilers and the caches they share. `run` is the only entry point the operator's
//! runtime (leader election, admin server) needs.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use kmm_api::v1beta1::{Module, ModuleImagesConfig, NodeModulesConfig};
use kmm_api::wire;
use kube::api::Api;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::Recorder;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};

use crate::metrics::{PassResult, ReconcileMetrics};

mod backoff;
pub mod buildsign;
pub mod device_plugin;
pub mod images;
pub mod modules;
pub mod nodes;
pub mod preflight;
mod stores;
pub mod versions;

/// How the operator checks that a module image exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ImageCheckMode {
    /// Ask the registry directly (OCI manifest request with the Module's pull secret and TLS
    /// settings). Tells missing, unauthorized and unreachable apart.
    #[default]
    Registry,
    /// Go KMM 2.4+ behaviour: a short-lived pod pulls the image through a node's container runtime
    /// (for clusters whose nodes use registry mirrors the operator cannot see).
    PullPod,
}

/// What the reconcilers need from the operator configuration.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// Namespace the operator runs in.
    pub operator_namespace: String,
    /// Image of the worker pods (`RELATED_IMAGE_WORKER`).
    pub worker_image: String,
    /// Image of kaniko build and sign pods (`RELATED_IMAGE_BUILD`).
    pub build_image: String,
    /// Image holding `sign-file` (`RELATED_IMAGE_SIGN`).
    pub sign_image: String,
    /// Host directory for module firmware (`worker.firmwareHostPath`); `None` disables firmware.
    pub firmware_host_path: Option<String>,
    /// `runAsUser` of worker pods (`worker.runAsUser`).
    pub worker_run_as_user: i64,
    /// SELinux type of worker pods (`worker.seLinuxType`).
    pub worker_selinux_type: String,
    /// How long successful build and sign pods are kept (`job.gcDelay`).
    pub job_gc_delay: Duration,
    /// How image existence is checked.
    pub image_check: ImageCheckMode,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        Self {
            operator_namespace: "kmm-operator-system".into(),
            worker_image: String::new(),
            build_image: "gcr.io/kaniko-project/executor:latest".into(),
            sign_image: String::new(),
            firmware_host_path: Some("/lib/firmware".into()),
            worker_run_as_user: 0,
            worker_selinux_type: "spc_t".into(),
            job_gc_delay: Duration::ZERO,
            image_check: ImageCheckMode::default(),
        }
    }
}

/// What every reconciler shares: the client, the configuration and the event reporter.
#[derive(Clone)]
pub struct Context {
    /// Client of the operator's ServiceAccount.
    pub client: kube::Client,
    /// Operator configuration.
    pub config: ControllerConfig,
    /// Identity of the operator in the Events it emits.
    pub reporter: kube::runtime::events::Reporter,
    /// Reconcile pass counts and durations.
    pub metrics: ReconcileMetrics,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Context {
    /// A context for `client` and `config`, reporting events as `kmm`.
    pub fn new(client: kube::Client, config: ControllerConfig) -> Self {
        let reporter = kube::runtime::events::Reporter {
            controller: "kmm".into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Self {
            client,
            config,
            reporter,
            metrics: ReconcileMetrics::default(),
        }
    }
}

/// Why a reconcile pass failed. Every variant is transient (retried); user errors are reported
/// in status conditions instead.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An API request failed.
    #[error("API request failed: {0}")]
    Kube(#[from] kube::Error),
}

impl Error {
    /// Short stable category, for logs and metric labels.
    pub fn category(&self) -> &'static str {
        match self {
            Self::Kube(kube::Error::Api(status)) if status.code == 409 => "conflict",
            Self::Kube(_) => "api",
        }
    }
}

/// The caches shared by the Module and node reconcilers.
#[derive(Clone)]
pub struct Stores {
    /// Every Module.
    pub modules: Store<Module>,
    /// Every Node.
    pub nodes: Store<Node>,
    /// Every NodeModulesConfig.
    pub nmcs: Store<NodeModulesConfig>,
    /// Every ModuleImagesConfig.
    pub mics: Store<ModuleImagesConfig>,
    /// Every worker pod (label `worker-action`), slimmed to what the node pass reads.
    pub pods: Store<Pod>,
    /// The worker pods of each node.
    pub pods_by_node: stores::Index<Pod>,
}

/// Keeps only the node events that change what the reconcilers look at: labels, taints, kernel,
/// boot ID and readiness (not the heartbeats).
fn relevant_node_changes(trigger: stores::Trigger<Node>) -> stores::Trigger<Node> {
    let mut seen: HashMap<String, u64> = HashMap::new();
    Box::pin(trigger.filter(move |event| {
        let keep = match event {
            Ok(node) => {
                let mut hasher = std::hash::DefaultHasher::new();
                node.labels().hash(&mut hasher);
                let spec = node.spec.as_ref();
                serde_json::to_string(&spec.and_then(|s| s.taints.as_ref()))
                    .unwrap_or_default()
                    .hash(&mut hasher);
                let status = node.status.as_ref();
                if let Some(info) = status.and_then(|s| s.node_info.as_ref()) {
                    info.kernel_version.hash(&mut hasher);
                    info.boot_id.hash(&mut hasher);
                }
                let ready = status
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
                ready.hash(&mut hasher);
                node.meta().deletion_timestamp.is_some().hash(&mut hasher);
                let digest = hasher.finish();
                seen.insert(node.name_any(), digest) != Some(digest)
            }
            Err(_) => true,
        };
        std::future::ready(keep)
    }))
}

/// Keeps only the Module events that change what the node, device plugin and preflight
/// reconcilers read: the spec (generation) and the start of deletion. Status writes — many per
/// rollout, each of which would otherwise wake a pass for every node — are dropped.
fn module_spec_changes(trigger: stores::Trigger<Module>) -> stores::Trigger<Module> {
    let mut seen: HashMap<String, (Option<i64>, bool)> = HashMap::new();
    Box::pin(trigger.filter(move |event| {
        let keep = match event {
            Ok(module) => {
                let digest = (
                    module.meta().generation,
                    module.meta().deletion_timestamp.is_some(),
                );
                seen.insert(object_key(module), digest) != Some(digest)
            }
            Err(_) => true,
        };
        std::future::ready(keep)
    }))
}

fn module_ref(ns: &str, name: &str) -> ObjectRef<Module> {
    ObjectRef::new(name).within(ns)
}

/// Modules named by an NMC's configured and in-use labels.
fn modules_of_nmc(nmc: &NodeModulesConfig) -> Vec<ObjectRef<Module>> {
    let mut refs: Vec<ObjectRef<Module>> = nmc
        .labels()
        .keys()
        .filter_map(|key| {
            let rest = key.strip_prefix("beta.kmm.node.kubernetes.io/")?;
            let middle = rest
                .strip_suffix(".module-configured")
                .or_else(|| rest.strip_suffix(".module-in-use"))?;
            let (ns, name) = middle.split_once('.')?;
            Some(module_ref(ns, name))
        })
        .collect();
    refs.extend(
        nmc.spec
            .modules
            .iter()
            .map(|m| module_ref(&m.item.namespace, &m.item.name)),
    );
    refs.sort_by_key(ToString::to_string);
    refs.dedup();
    refs
}

/// Nodes a Module concerns: those its selector matches and those whose NMC carries it.
fn nodes_of_module(stores: &Stores, module: &Module) -> Vec<ObjectRef<Node>> {
    let ns = module.namespace().unwrap_or_default();
    let name = module.name_any();
    let configured = wire::module_configured_label(&ns, &name);
    let in_use = wire::module_in_use_label(&ns, &name);
    let mut refs: Vec<ObjectRef<Node>> = stores
        .nodes
        .state()
        .iter()
        .filter(|node| kmm_core::targeting::selector_matches(&module.spec.selector, node.labels()))
        .map(|node| ObjectRef::new(&node.name_any()))
        .collect();
    refs.extend(
        stores
            .nmcs
            .state()
            .iter()
            .filter(|nmc| {
                nmc.labels().contains_key(&configured) || nmc.labels().contains_key(&in_use)
            })
            .map(|nmc| ObjectRef::new(&nmc.name_any())),
    );
    refs.sort_by_key(ToString::to_string);
    refs.dedup();
    refs
}

fn log_result<K: Resource, E: std::fmt::Display>(
    controller: &'static str,
) -> impl Fn(Result<(ObjectRef<K>, Action), E>) -> std::future::Ready<()> {
    move |result| {
        match result {
            Ok((object, _)) => tracing::debug!(controller, %object, "reconciled"),
            Err(err) => tracing::warn!(controller, error = %err, "reconcile failed"),
        }
        std::future::ready(())
    }
}

/// What a reconciler context offers the shared error policy and pass accounting.
pub trait Reconciler {
    /// The controller's name in metrics.
    const NAME: &'static str;
    /// The per-object backoff.
    fn backoff(&self) -> &backoff::Backoff;
    /// The shared context.
    fn context(&self) -> &Context;
}

/// Runs `pass` and records it in the reconcile metrics as a pass of `controller`.
async fn counted<E>(
    metrics: &ReconcileMetrics,
    controller: &'static str,
    pass: impl std::future::Future<Output = Result<Action, E>>,
) -> Result<Action, E> {
    let started = std::time::Instant::now();
    let result = pass.await;
    let outcome = match &result {
        Err(_) => PassResult::Error,
        Ok(action) if *action == Action::await_change() => PassResult::Success,
        Ok(_) => PassResult::RequeueAfter,
    };
    metrics.observe(controller, outcome, started.elapsed().as_secs_f64());
    result
}

fn object_key<K: Resource<DynamicType = ()>>(object: &K) -> String {
    ObjectRef::from_obj(object).to_string()
}

/// Transient errors retry per object with exponential backoff; conflicts (a write raced with
/// another) retry almost at once.
fn error_policy<K: Resource<DynamicType = ()>, C: Reconciler>(
    object: Arc<K>,
    err: &Error,
    ctx: Arc<C>,
) -> Action {
    let delay = ctx.backoff().failed(&object_key(object.as_ref()));
    let delay = if err.category() == "conflict" {
        delay.min(Duration::from_millis(200))
    } else {
        delay
    };
    tracing::debug!(object = %object_key(object.as_ref()), error = %err, ?delay, "will retry");
    Action::requeue(delay)
}

/// Runs a reconcile pass, counts it, and resets the object's backoff when it succeeds.
async fn with_backoff<K, C, F>(object: Arc<K>, ctx: Arc<C>, pass: F) -> Result<Action, Error>
where
    K: Resource<DynamicType = ()>,
    C: Reconciler,
    F: std::future::Future<Output = Result<Action, Error>>,
{
    let result = counted(&ctx.context().metrics, C::NAME, pass).await;
    if result.is_ok() {
        ctx.backoff().succeeded(&object_key(object.as_ref()));
    }
    result
}

/// Runs every reconciler until the returned future is dropped (the caller drops it on shutdown
/// or when leadership is lost). `ready` turns true once the shared caches have synced.
pub async fn run(
    client: kube::Client,
    config: ControllerConfig,
    ready: tokio::sync::watch::Sender<bool>,
) -> anyhow::Result<()> {
    run_with(client, config, ready, ReconcileMetrics::default()).await
}

/// [`run`], counting reconcile passes in `metrics` (registered by the caller).
pub async fn run_with(
    client: kube::Client,
    config: ControllerConfig,
    ready: tokio::sync::watch::Sender<bool>,
    metrics: ReconcileMetrics,
) -> anyhow::Result<()> {
    let ctx = Arc::new(Context {
        metrics,
        ..Context::new(client.clone(), config)
    });
    let cfg = || watcher::Config::default().any_semantic();
    let modules = stores::watch(Api::<Module>::all(client.clone()), cfg(), 4);
    let nodes = stores::watch(Api::<Node>::all(client.clone()), cfg(), 4);
    let nmcs = stores::watch(Api::<NodeModulesConfig>::all(client.clone()), cfg(), 2);
    let mics = stores::watch(Api::<ModuleImagesConfig>::all(client.clone()), cfg(), 3);
    let pods_by_node = stores::Index::new(|pod: &Pod| pod.spec.as_ref()?.node_name.clone());
    let pods = stores::watch_indexed(
        Api::<Pod>::all(client.clone()),
        cfg().labels(wire::label::WORKER_ACTION),
        1,
        Some(pods_by_node.clone()),
        kmm_core::nmc_plan::slim_worker_pod,
    );
    let shared = Stores {
        modules: modules.store.clone(),
        nodes: nodes.store.clone(),
        nmcs: nmcs.store.clone(),
        mics: mics.store.clone(),
        pods: pods.store.clone(),
        pods_by_node,
    };
    let drivers = futures::future::join_all([
        modules.driver,
        nodes.driver,
        nmcs.driver,
        mics.driver,
        pods.driver,
    ]);
    let mut module_triggers = modules.triggers;
    let module_trigger_pf = module_triggers
        .pop()
        .ok_or_else(|| anyhow::anyhow!("no module trigger for the preflight validations"))?;
    let module_trigger_dp = module_triggers
        .pop()
        .ok_or_else(|| anyhow::anyhow!("no module trigger for the device plugins"))?;
    let [module_trigger_m, module_trigger_n] = take2(module_triggers)?;
    let mut node_triggers = nodes.triggers;
    let node_trigger_dp = node_triggers
        .pop()
        .ok_or_else(|| anyhow::anyhow!("no node trigger for the device plugins"))?;
    let node_trigger_v = node_triggers
        .pop()
        .ok_or_else(|| anyhow::anyhow!("no node trigger for the version labels"))?;
    let [node_trigger_m, node_trigger_n] = take2(node_triggers)?;
    let [nmc_trigger_m, nmc_trigger_n] = take2(nmcs.triggers)?;
    let mut mic_triggers = mics.triggers;
    let mic_trigger_pf = mic_triggers.pop().ok_or_else(|| {
        anyhow::anyhow!("no ModuleImagesConfig trigger for the preflight validations")
    })?;
    let [mic_trigger_m, mic_trigger_n] = take2(mic_triggers)?;
    let pod_trigger = pods
        .triggers
        .into_iter()
        .next()
        .ok_or_else(|| anyhow::anyhow!("no pod trigger"))?;

    let ready_stores = shared.clone();
    let readiness = async move {
        let synced = futures::future::try_join5(
            ready_stores.modules.wait_until_ready(),
            ready_stores.nodes.wait_until_ready(),
            ready_stores.nmcs.wait_until_ready(),
            ready_stores.mics.wait_until_ready(),
            ready_stores.pods.wait_until_ready(),
        )
        .await;
        if synced.is_ok() {
            let _ = ready.send(true);
            tracing::info!("caches synced");
        }
    };

    let module_reconciler = Arc::new(modules::ModuleReconciler {
        ctx: ctx.clone(),
        stores: shared.clone(),
        recorder: Recorder::new(client.clone(), ctx.reporter.clone()),
        backoff: backoff::Backoff::default(),
        pacer: modules::Pacer::default(),
        labelled_namespaces: std::sync::Mutex::default(),
    });
    let mapper_stores = shared.clone();
    let module_controller = Controller::for_stream(module_trigger_m, shared.modules.clone())
        .watches_stream(relevant_node_changes(node_trigger_m), move |node: Node| {
            let mut refs: Vec<ObjectRef<Module>> = mapper_stores
                .modules
                .state()
                .iter()
                .filter(|m| kmm_core::targeting::selector_matches(&m.spec.selector, node.labels()))
                .map(|m| ObjectRef::from_obj(m.as_ref()))
                .collect();
            if let Some(nmc) = mapper_stores.nmcs.get(&ObjectRef::new(&node.name_any())) {
                refs.extend(modules_of_nmc(&nmc));
            }
            refs
        })
        .watches_stream(nmc_trigger_m, {
            // Like a watch handler that sees the old and the new object: a label that was just
            // removed (the module got unloaded) must still wake its Module.
            let previous: std::sync::Mutex<HashMap<String, Vec<ObjectRef<Module>>>> =
                std::sync::Mutex::default();
            move |nmc: NodeModulesConfig| {
                let now = modules_of_nmc(&nmc);
                let mut previous = previous
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let mut refs = previous
                    .insert(nmc.name_any(), now.clone())
                    .unwrap_or_default();
                refs.extend(now);
                refs.sort_by_key(ToString::to_string);
                refs.dedup();
                refs
            }
        })
        .watches_stream(mic_trigger_m, |mic: ModuleImagesConfig| {
            Some(module_ref(
                &mic.namespace().unwrap_or_default(),
                &mic.name_any(),
            ))
        })
        .run(
            |m, c| with_backoff(m.clone(), c.clone(), modules::reconcile(m, c)),
            error_policy,
            module_reconciler,
        )
        .for_each(log_result("module"));

    let node_reconciler = Arc::new(nodes::NodeReconciler {
        ctx: ctx.clone(),
        stores: shared.clone(),
        recorder: Recorder::new(client.clone(), ctx.reporter.clone()),
        backoff: backoff::Backoff::default(),
        expectations: nodes::Expectations::default(),
    });
    let (for_modules, for_mics) = (shared.clone(), shared.clone());
    let node_controller =
        Controller::for_stream(relevant_node_changes(node_trigger_n), shared.nodes.clone())
            .watches_stream(
                module_spec_changes(module_trigger_n),
                move |module: Module| nodes_of_module(&for_modules, &module),
            )
            .watches_stream(mic_trigger_n, move |mic: ModuleImagesConfig| {
                let module = for_mics.modules.get(&module_ref(
                    &mic.namespace().unwrap_or_default(),
                    &mic.name_any(),
                ));
                module
                    .map(|m| nodes_of_module(&for_mics, &m))
                    .unwrap_or_default()
            })
            .watches_stream(nmc_trigger_n, |nmc: NodeModulesConfig| {
                Some(ObjectRef::new(&nmc.name_any()))
            })
            .watches_stream(pod_trigger, |pod: Pod| {
                pod.spec
                    .and_then(|s| s.node_name)
                    .map(|node| ObjectRef::new(&node))
            })
            .run(
                |n, c| with_backoff(n.clone(), c.clone(), nodes::reconcile(n, c)),
                error_policy,
                node_reconciler,
            )
            .for_each(log_result("node"));

    // Device plugin and DRA pods: readiness labels, and the ordered upgrade waits for them.
    let plugin_pods = stores::watch(
        Api::<Pod>::all(client.clone()),
        cfg().labels(&device_plugin::plugin_pod_selector()),
        2,
    );
    let [plugin_pod_trigger_dp, plugin_pod_trigger_v] = take2(plugin_pods.triggers)?;

    tokio::join!(
        drivers,
        plugin_pods.driver,
        versions::run(
            ctx.clone(),
            shared.nodes.clone(),
            relevant_node_changes(node_trigger_v),
            plugin_pods.store.clone(),
            plugin_pod_trigger_v,
        ),
        device_plugin::run(
            ctx.clone(),
            device_plugin::Inputs {
                modules: shared.modules.clone(),
                nodes: shared.nodes.clone(),
                pods: plugin_pods.store,
                module_trigger: module_spec_changes(module_trigger_dp),
                node_trigger: node_trigger_dp,
                pod_trigger: plugin_pod_trigger_dp,
            },
        ),
        preflight::run(
            ctx.clone(),
            preflight::Inputs {
                modules: shared.modules.clone(),
                mics: shared.mics.clone(),
                module_trigger: module_spec_changes(module_trigger_pf),
                mic_trigger: mic_trigger_pf,
            },
        ),
        readiness,
        module_controller,
        node_controller,
        images::run(ctx.clone()),
        buildsign::run(ctx.clone())
    );
    Ok(())
}

fn take2<T>(items: Vec<T>) -> anyhow::Result<[T; 2]> {
    items
        .try_into()
        .map_err(|_| anyhow::anyhow!("expected two trigger streams"))
}
