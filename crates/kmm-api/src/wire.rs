//! Every string that KMM writes to or reads from the cluster: labels, annotations, finalizers,
//! field managers, event reasons and object names. Go KMM and kmm-rs must agree on these byte for
//! byte, so that a cluster can switch operators and keep its nodes, NMCs and pods.

/// API group of the KMM kinds.
pub const GROUP: &str = "kmm.sigs.x-k8s.io";
/// API group of the hub kinds.
pub const HUB_GROUP: &str = "hub.kmm.sigs.x-k8s.io";

const NODE_PREFIX: &str = "kmm.node.kubernetes.io";
const BETA_NODE_PREFIX: &str = "beta.kmm.node.kubernetes.io";

/// Finalizers.
pub mod finalizer {
    /// On Modules, until every node has unloaded the module.
    pub const MODULE: &str = "kmm.node.kubernetes.io/module-finalizer";
    /// On worker pods, until the NMC reconciler has recorded their outcome.
    pub const NMC_RECONCILER: &str = "kmm.node.kubernetes.io/nodemodulesconfig-reconciler";
    /// On device plugin and DRA pods, until their node's readiness label is removed.
    pub const NODE_LABELER: &str = "kmm.node.kubernetes.io/node-labeler";
    /// On build and sign pods, to keep successful ones for `job.gcDelay`.
    pub const GC_DELAY: &str = "kmm.node.kubernetes.io/gc-delay";
    /// On build and sign pods, until their events are sent.
    pub const JOB_EVENT: &str = "kmm.node.kubernetes.io/job-event-finalizer";
}

/// Fixed label keys and values.
pub mod label {
    /// Module (or MBSC) name on worker, build, sign and device plugin objects.
    pub const MODULE_NAME: &str = "kmm.node.kubernetes.io/module.name";
    /// Module namespace on DeviceClasses.
    pub const MODULE_NAMESPACE: &str = "kmm.node.kubernetes.io/module.namespace";
    /// Role of a DaemonSet and its pods.
    pub const ROLE: &str = "kmm.node.kubernetes.io/role";
    /// Value of [`ROLE`] for device plugins.
    pub const ROLE_DEVICE_PLUGIN: &str = "device-plugin";
    /// Value of [`ROLE`] for DRA drivers.
    pub const ROLE_DRA: &str = "dra";
    /// Legacy value of [`ROLE`] (KMM 1.x module loader DaemonSets).
    pub const ROLE_MODULE_LOADER: &str = "module-loader";
    /// BuildImage or SignImage, on build and sign pods.
    pub const RESOURCE_TYPE: &str = "kmm.node.kubernetes.io/resource-type";
    /// DNS-safe kernel version, on build and sign pods.
    pub const TARGET_KERNEL: &str = "kmm.node.kubernetes.io/target-kernel";
    /// Load or Unload, on worker pods.
    pub const WORKER_ACTION: &str = "kmm.node.kubernetes.io/worker-action";
    /// Value of [`WORKER_ACTION`] for loader pods.
    pub const WORKER_ACTION_LOAD: &str = "Load";
    /// Value of [`WORKER_ACTION`] for unloader pods.
    pub const WORKER_ACTION_UNLOAD: &str = "Unload";
    /// MIC name, on image pull pods.
    pub const IMAGE_OWNER: &str = "kmm.node.kubernetes.io/image-owner";
    /// Kind of image pull pod.
    pub const PULL_POD_TYPE: &str = "kmm.node.kubernetes.io/pull-pod-type";
    /// Value of [`PULL_POD_TYPE`]: a single attempt.
    pub const PULL_POD_ONE_TIME: &str = "one-time-pull";
    /// Value of [`PULL_POD_TYPE`]: retried until the image appears.
    pub const PULL_POD_UNTIL_SUCCESS: &str = "until-success";
    /// MCM name, on ManifestWorks.
    pub const MANAGED_CLUSTER_MODULE_NAME: &str =
        "kmm.node.kubernetes.io/managedclustermodule.name";
    /// On namespaces that contain Modules (note `k8s.io`, not `kubernetes.io`).
    pub const NAMESPACE_CONTAINS_MODULES: &str = "kmm.node.k8s.io/contains-modules";
    /// Legacy node label of KMM 1.x, kept only to recognise it.
    pub const KERNEL_VERSION_FULL: &str = "kmm.node.kubernetes.io/kernel-version.full";
    /// `app.kubernetes.io/name`.
    pub const APP_NAME: &str = "app.kubernetes.io/name";
    /// `app.kubernetes.io/component`.
    pub const APP_COMPONENT: &str = "app.kubernetes.io/component";
    /// `app.kubernetes.io/part-of`.
    pub const APP_PART_OF: &str = "app.kubernetes.io/part-of";
    /// Value of [`APP_NAME`] and [`APP_PART_OF`] on every pod KMM creates.
    pub const APP_KMM: &str = "kmm";
    /// Value of [`APP_COMPONENT`] on worker pods.
    pub const COMPONENT_WORKER: &str = "worker";
}

/// Annotation keys.
pub mod annotation {
    /// YAML of the worker's ModuleConfig, mounted as its config file.
    pub const WORKER_CONFIG: &str = "kmm.node.kubernetes.io/worker-config";
    /// YAML of the worker pod's tolerations.
    pub const WORKER_TOLERATIONS: &str = "kmm.node.kubernetes.io/worker-tolerations";
    /// Module version of a loader pod.
    pub const WORKER_MODULE_VERSION: &str = "kmm.node.kubernetes.io/worker-module-version";
    /// softdep lines of a loader pod, mounted as `/etc/modprobe.d/softdep.conf`.
    pub const MODULES_ORDER: &str = "kmm.node.kubernetes.io/modules-order";
    /// Hash of a worker pod's template.
    pub const WORKER_HASH: &str = "kmm.node.kubernetes.io/worker-hash";
    /// Hash of a build or sign pod's inputs.
    pub const LAST_HASH: &str = "kmm.node.kubernetes.io/last-hash";
    /// Generated Dockerfile of a sign pod.
    pub const DOCKERFILE: &str = "dockerfile";
    /// Marks build and sign pods whose creation event was sent.
    pub const CREATED_EVENT_SENT: &str = "kmm.node.kubernetes.io/created-event-sent";
    /// Names the module of a node event.
    pub const EVENT_MODULE: &str = "module";
}

/// Values of the `resource-type` label and `app.kubernetes.io/component` on build and sign pods.
pub mod resource_type {
    /// Build pods.
    pub const BUILD: &str = "BuildImage";
    /// Sign pods.
    pub const SIGN: &str = "SignImage";
}

/// Why a module image is not usable, as the MIC records it (`imagesStates[].reason`, kmm-rs
/// addition); read by the Module status and by `kmmctl explain`.
pub mod image_reason {
    /// The registry does not have the image (or the one-time pull pod could not pull it).
    pub const NOT_FOUND: &str = "NotFound";
    /// The registry refused the credentials (401/403).
    pub const UNAUTHORIZED: &str = "Unauthorized";
    /// Connection refused, DNS failure or timeout.
    pub const REGISTRY_UNREACHABLE: &str = "RegistryUnreachable";
    /// The TLS handshake failed (certificate, or HTTP/HTTPS mismatch).
    pub const TLS_ERROR: &str = "TlsError";
    /// The registry answered with an error that says nothing about the image (5xx, 429, ...).
    pub const REGISTRY_ERROR: &str = "RegistryError";
    /// The image reference cannot be parsed.
    pub const INVALID_IMAGE: &str = "InvalidImage";
    /// An until-success pull pod cannot pull the image yet.
    pub const PULL_FAILED: &str = "PullFailed";
    /// A pull pod ended Failed or Unknown; it is deleted and the pull retried.
    pub const PULL_POD_FAILED: &str = "PullPodFailed";
}

/// Event reasons.
pub mod reason {
    /// A module was loaded on a node.
    pub const MODULE_LOADED: &str = "ModuleLoaded";
    /// A module was unloaded from a node.
    pub const MODULE_UNLOADED: &str = "ModuleUnloaded";
}

/// Server-side apply field managers, one per controller.
pub mod field_manager {
    /// Module reconciler.
    pub const MODULE: &str = "kmm-rs-module";
    /// NodeModulesConfig reconciler.
    pub const NMC: &str = "kmm-rs-nmc";
    /// ModuleImagesConfig reconciler.
    pub const MIC: &str = "kmm-rs-mic";
    /// ModuleBuildSignConfig reconciler.
    pub const MBSC: &str = "kmm-rs-mbsc";
    /// Device plugin reconciler.
    pub const DEVICE_PLUGIN: &str = "kmm-rs-device-plugin";
    /// Node version-label reconciler.
    pub const NODE_VERSION: &str = "kmm-rs-node-version";
    /// Preflight reconciler.
    pub const PREFLIGHT: &str = "kmm-rs-preflight";
}

/// Taint keys the operator tolerates on its own for node targeting and worker pods.
pub const INTERNAL_TOLERATION_KEYS: [&str; 3] = [
    "node.kubernetes.io/disk-pressure",
    "node.kubernetes.io/memory-pressure",
    "node.kubernetes.io/pid-pressure",
];

/// The taint of a cordoned node.
pub const TAINT_UNSCHEDULABLE: &str = "node.kubernetes.io/unschedulable";

/// Name of the OCM ClusterClaim that lists a spoke's kernels.
pub const KERNEL_VERSIONS_CLUSTER_CLAIM: &str = "kernel-versions.kmm.node.kubernetes.io";

/// Longest `len(namespace) + len(name)` of a Module, so that `version-schedule-pod.<ns>.<name>`
/// fits a label name (63 characters).
pub const MAX_MODULE_NAME_AND_NAMESPACE: usize = 41;

/// Node label: the module is loaded with its current configuration.
pub fn module_ready_label(namespace: &str, name: &str) -> String {
    format!("{NODE_PREFIX}/{namespace}.{name}.ready")
}

/// Node label: the version of the loaded module.
pub fn module_version_ready_label(namespace: &str, name: &str) -> String {
    format!("{NODE_PREFIX}/{namespace}.{name}.version.ready")
}

/// Node label: the device plugin pod on the node is Ready.
pub fn device_plugin_ready_label(namespace: &str, name: &str) -> String {
    format!("{NODE_PREFIX}/{namespace}.{name}.device-plugin-ready")
}

/// Node label: the DRA driver pod on the node is Ready.
pub fn dra_ready_label(namespace: &str, name: &str) -> String {
    format!("{NODE_PREFIX}/{namespace}.{name}.dra-ready")
}

/// Node label: the node may run the module's device plugin.
pub fn device_plugin_target_label(namespace: &str, name: &str) -> String {
    format!("{NODE_PREFIX}/{namespace}.{name}.device-plugin-target")
}

/// Node label set by the administrator: the module version wanted on the node.
pub fn version_module_label(namespace: &str, name: &str) -> String {
    format!("{NODE_PREFIX}/version-module.{namespace}.{name}")
}

/// Node label: the module version the worker pods may load.
pub fn version_worker_pod_label(namespace: &str, name: &str) -> String {
    format!("{BETA_NODE_PREFIX}/version-worker-pod.{namespace}.{name}")
}

/// Node and DaemonSet label: the module version whose device plugin may run.
pub fn version_schedule_pod_label(namespace: &str, name: &str) -> String {
    format!("{BETA_NODE_PREFIX}/version-schedule-pod.{namespace}.{name}")
}

/// NMC label: the NMC spec holds an entry for the module.
pub fn module_configured_label(namespace: &str, name: &str) -> String {
    format!("{BETA_NODE_PREFIX}/{namespace}.{name}.module-configured")
}

/// NMC label: the module may be loaded on the node.
pub fn module_in_use_label(namespace: &str, name: &str) -> String {
    format!("{BETA_NODE_PREFIX}/{namespace}.{name}.module-in-use")
}

/// Whether `key` is the KMM 1.x node label `kmm.node.kubernetes.io/<name>.ready`, which the
/// operator removes. `<ns>.<name>.ready` labels contain a dot in their name part and do not match.
pub fn is_deprecated_ready_label(key: &str) -> bool {
    key.strip_prefix(NODE_PREFIX)
        .and_then(|rest| rest.strip_prefix('/'))
        .and_then(|rest| rest.strip_suffix(".ready"))
        .is_some_and(|name| {
            !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// Name of the worker pod of a module on a node.
pub fn worker_pod_name(node: &str, module: &str) -> String {
    format!("kmm-worker-{node}-{module}")
}

/// Name of the build pod of an MBSC for a DNS-safe kernel name.
pub fn build_pod_name(mbsc: &str, dns_safe_kernel: &str) -> String {
    format!("{mbsc}-build-{dns_safe_kernel}")
}

/// Name of the sign pod of an MBSC for a DNS-safe kernel name.
pub fn sign_pod_name(mbsc: &str, dns_safe_kernel: &str) -> String {
    format!("{mbsc}-sign-{dns_safe_kernel}")
}

/// `generateName` of the image pull pods of a MIC.
pub fn pull_pod_generate_name(mic: &str) -> String {
    format!("{mic}-pull-pod-")
}

/// `generateName` of a module's device plugin DaemonSets.
pub fn device_plugin_generate_name(module: &str) -> String {
    format!("{module}-device-plugin-")
}

/// `generateName` of a module's DRA driver DaemonSets.
pub fn dra_generate_name(module: &str) -> String {
    format!("{module}-dra-")
}

/// Name of the MIC of a PreflightValidation for one Module.
pub fn preflight_mic_name(module: &str) -> String {
    format!("{module}-preflight")
}

/// Name of the hub MIC of a ManagedClusterModule for one cluster.
pub fn hub_mic_name(mcm: &str, cluster: &str) -> String {
    format!("{mcm}-{cluster}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templated_labels_match_go_kmm() {
        assert_eq!(
            module_ready_label("ns", "m"),
            "kmm.node.kubernetes.io/ns.m.ready"
        );
        assert_eq!(
            module_version_ready_label("ns", "m"),
            "kmm.node.kubernetes.io/ns.m.version.ready"
        );
        assert_eq!(
            version_worker_pod_label("ns", "m"),
            "beta.kmm.node.kubernetes.io/version-worker-pod.ns.m"
        );
        assert_eq!(
            version_schedule_pod_label("ns", "m"),
            "beta.kmm.node.kubernetes.io/version-schedule-pod.ns.m"
        );
        assert_eq!(
            version_module_label("ns", "m"),
            "kmm.node.kubernetes.io/version-module.ns.m"
        );
        assert_eq!(
            module_configured_label("ns", "m"),
            "beta.kmm.node.kubernetes.io/ns.m.module-configured"
        );
        assert_eq!(
            module_in_use_label("ns", "m"),
            "beta.kmm.node.kubernetes.io/ns.m.module-in-use"
        );
        assert_eq!(
            device_plugin_target_label("ns", "m"),
            "kmm.node.kubernetes.io/ns.m.device-plugin-target"
        );
        assert_eq!(worker_pod_name("node-1", "kmod"), "kmm-worker-node-1-kmod");
        assert_eq!(build_pod_name("m", "6-8-0"), "m-build-6-8-0");
    }

    #[test]
    fn deprecated_ready_label_is_only_the_single_name_form() {
        assert!(is_deprecated_ready_label(
            "kmm.node.kubernetes.io/my-kmod.ready"
        ));
        assert!(!is_deprecated_ready_label(
            "kmm.node.kubernetes.io/ns.my-kmod.ready"
        ));
        assert!(!is_deprecated_ready_label("kmm.node.kubernetes.io/.ready"));
        assert!(!is_deprecated_ready_label("example.com/my-kmod.ready"));
    }

    #[test]
    fn longest_module_identity_fits_a_label_name() {
        let ns = "n".repeat(20);
        let name = "m".repeat(MAX_MODULE_NAME_AND_NAMESPACE - 20);
        let key = version_schedule_pod_label(&ns, &name);
        let name_part = key.split('/').nth(1).unwrap_or_default();
        assert!(
            name_part.len() <= 63,
            "{name_part} is {} chars",
            name_part.len()
        );
    }
}
