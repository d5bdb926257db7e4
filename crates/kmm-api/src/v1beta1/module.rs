//! `Module` (kmm.sigs.x-k8s.io/v1beta1): what a cluster administrator writes to get an
//! out-of-tree kernel module, and optionally its device plugin, onto selected nodes.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    EnvVar, LocalObjectReference, ResourceRequirements, Toleration, Volume, VolumeMount,
};
use k8s_openapi::api::resource::v1::{DeviceClassConfiguration, DeviceSelector};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::serde_util::{
    is_false, no_default, nullable, require_container, require_container_image,
    require_mappings_and_modprobe, require_selector,
};

/// Desired state of a Module: which nodes, which kernel module image per kernel, how to load it.
// Several printer columns share a `type_`; clippy mistakes that for a repeated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "kmm.sigs.x-k8s.io",
    version = "v1beta1",
    kind = "Module",
    namespaced,
    status = "ModuleStatus",
    derive = "Default",
    derive = "PartialEq",
    doc = "Module describes an out-of-tree kernel module: the nodes it targets, the container image holding it for each kernel, how to build and sign that image when it is missing, and an optional device plugin.",
    printcolumn(
        name = "Loaded",
        type_ = "integer",
        json_path = ".status.moduleLoader.availableNumber",
        description = "Nodes where the module is loaded with the current configuration"
    ),
    printcolumn(
        name = "Desired",
        type_ = "integer",
        json_path = ".status.moduleLoader.desiredNumber",
        description = "Nodes where the module should be loaded"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status",
        description = "Whether the module is loaded everywhere it should be"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = Rule::new("!(has(self.dra) && has(self.devicePlugin))").message("spec.dra and spec.devicePlugin are mutually exclusive"))]
#[serde(rename_all = "camelCase")]
#[schemars(transform = require_selector)]
pub struct ModuleSpec {
    /// Device plugin DaemonSet run on the nodes where the module is loaded. Excludes `dra`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_plugin: Option<DevicePluginSpec>,

    /// Dynamic Resource Allocation driver DaemonSet and DeviceClasses (Kubernetes 1.34 or later).
    /// Excludes `devicePlugin`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dra: Option<DraSpec>,

    /// How to load the kernel module. Without it, only the device plugin or DRA driver runs, on
    /// the nodes matching `selector`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module_loader: Option<ModuleLoaderSpec>,

    /// Pull secret (type kubernetes.io/dockerconfigjson) for the module images; also used to push
    /// images built or signed in the cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_repo_secret: Option<LocalObjectReference>,

    /// Node labels that select the nodes for this module; every pair must match. `{}` selects
    /// every node.
    #[serde(default, deserialize_with = "nullable")]
    pub selector: BTreeMap<String, String>,

    /// Tolerations copied to every pod the operator runs for this module (worker, build, sign,
    /// device plugin). Nodes with taints not tolerated here are not targeted.
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub tolerations: Vec<Toleration>,

    /// Change this number to make the operator check again, and rebuild if missing, every image
    /// of this module.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_rebuild_trigger_generation: Option<i64>,
}

/// How the kernel module is loaded.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = require_container)]
pub struct ModuleLoaderSpec {
    /// The module image settings: kernel mappings, modprobe, build and sign.
    #[serde(default)]
    pub container: ModuleLoaderContainerSpec,

    /// ServiceAccount of the worker pods that load and unload the module (`default` if empty).
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub service_account_name: String,
}

/// Module image settings shared by all kernel mappings, which may override them.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = require_mappings_and_modprobe)]
pub struct ModuleLoaderContainerSpec {
    /// How to build the image when it does not exist; merged with a mapping's `build`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build: Option<Build>,

    /// How to sign the module files; merged with a mapping's `sign`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sign: Option<Sign>,

    /// Version of the module, for ordered upgrades driven by node labels. Cannot change between
    /// empty and non-empty.
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub version: String,

    /// Default image for mappings whose `containerImage` is empty. Supports `${KERNEL_FULL_VERSION}`,
    /// `${KERNEL_XYZ}`, `${MOD_NAME}` and the other substitution variables.
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub container_image: String,

    /// Pull policy of the module image (Always, IfNotPresent or Never).
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub image_pull_policy: String,

    /// Kernel mappings, tried in order; the first that matches the node's kernel wins.
    #[schemars(length(min = 1))]
    #[serde(default, deserialize_with = "nullable")]
    pub kernel_mappings: Vec<KernelMapping>,

    /// modprobe settings.
    #[serde(default)]
    pub modprobe: ModprobeSpec,

    /// Registry TLS settings for mappings that set none of their own.
    #[serde(
        default,
        rename = "registryTLS",
        skip_serializing_if = "Option::is_none"
    )]
    pub registry_tls: Option<TlsOptions>,

    /// Deprecated: use `inTreeModulesToRemove`.
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub in_tree_module_to_remove: String,

    /// In-tree modules unloaded before the out-of-tree module is loaded.
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub in_tree_modules_to_remove: Vec<String>,
}

/// One kernel mapping: which kernels it matches and the image for them.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = require_container_image)]
pub struct KernelMapping {
    /// Build settings for this mapping, merged over the container-level `build`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build: Option<Build>,

    /// Sign settings for this mapping, merged over the container-level `sign`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sign: Option<Sign>,

    /// Image for the matched kernels; empty means the container-level `containerImage`.
    #[serde(default, deserialize_with = "nullable")]
    pub container_image: String,

    /// Exact kernel version to match. Exclusive with `regexp`.
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub literal: String,

    /// Registry TLS settings; replace the container-level ones entirely.
    #[serde(
        default,
        rename = "registryTLS",
        skip_serializing_if = "Option::is_none"
    )]
    pub registry_tls: Option<TlsOptions>,

    /// Regular expression (RE2 syntax, unanchored) matched against the kernel version. Exclusive
    /// with `literal`.
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub regexp: String,

    /// Deprecated: use `inTreeModulesToRemove`.
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub in_tree_module_to_remove: String,

    /// In-tree modules to unload first; replaces the container-level list when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_tree_modules_to_remove: Option<Vec<String>>,
}

/// How to build a module image in the cluster.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Build {
    /// Build arguments (`--build-arg name=value`).
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub build_args: Vec<BuildArg>,

    /// ConfigMap in the Module's namespace holding the Dockerfile under the key `dockerfile`.
    pub dockerfile_config_map: LocalObjectReference,

    /// TLS settings for pulling the base images.
    #[serde(
        default,
        rename = "baseImageRegistryTLS",
        skip_serializing_if = "Option::is_none"
    )]
    pub base_image_registry_tls: Option<TlsOptions>,

    /// Secrets mounted read-only at `/run/secrets/<name>` during the build.
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub secrets: Vec<LocalObjectReference>,

    /// Settings of the kaniko builder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kaniko_params: Option<KanikoParams>,

    /// Node selector of the build pod.
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub selector: BTreeMap<String, String>,
}

/// One `--build-arg`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct BuildArg {
    /// Argument name.
    pub name: String,
    /// Argument value (not substituted).
    #[serde(deserialize_with = "nullable")]
    pub value: String,
}

/// Settings of the kaniko builder.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct KanikoParams {
    /// Tag of the kaniko image to use instead of the operator's default.
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub tag: String,
}

/// How to sign the kernel module files for Secure Boot.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Sign {
    /// Image holding the unsigned modules; ignored when the image is also built.
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub unsigned_image: String,

    /// TLS settings for pulling `unsignedImage`.
    #[serde(
        default,
        rename = "unsignedImageRegistryTLS",
        skip_serializing_if = "Option::is_none"
    )]
    pub unsigned_image_registry_tls: Option<TlsOptions>,

    /// Secret holding the private signing key under the key `key`.
    pub key_secret: LocalObjectReference,

    /// Secret holding the public certificate (DER) under the key `cert`.
    pub cert_secret: LocalObjectReference,

    /// Files to sign: absolute paths or shell globs under `modprobe.dirName`.
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub files_to_sign: Vec<String>,
}

/// Registry TLS settings.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TlsOptions {
    /// Use plain HTTP.
    #[serde(default, skip_serializing_if = "is_false")]
    pub insecure: bool,
    /// Do not verify the registry's TLS certificate.
    #[serde(
        default,
        rename = "insecureSkipTLSVerify",
        skip_serializing_if = "is_false"
    )]
    pub insecure_skip_tls_verify: bool,
}

/// modprobe settings.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModprobeSpec {
    /// Name of the kernel module to load. May be empty only when `rawArgs` is set.
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub module_name: String,

    /// Module parameters (`key=value`), passed after the module name.
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub parameters: Vec<String>,

    /// Directory in the image that holds `lib/modules/<kernel>/`.
    #[serde(default = "default_dir_name", deserialize_with = "nullable_dir_name")]
    pub dir_name: String,

    /// Extra modprobe arguments, placed before the module name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<ModprobeArgs>,

    /// Complete modprobe command lines; when set, every other setting is ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw_args: Option<ModprobeArgs>,

    /// Directory in the image whose content is copied to the node's firmware directory.
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub firmware_path: String,

    /// Soft-dependency chain; the first entry must be `moduleName`. Loaded last to first,
    /// unloaded first to last.
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub modules_loading_order: Vec<String>,
}

/// The default of `modprobe.dirName`.
pub const DEFAULT_DIR_NAME: &str = "/opt";

fn default_dir_name() -> String {
    DEFAULT_DIR_NAME.to_owned()
}

fn nullable_dir_name<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<String, D::Error> {
    let value: Option<String> = Deserialize::deserialize(deserializer)?;
    Ok(value
        .filter(|dir| !dir.is_empty())
        .unwrap_or_else(default_dir_name))
}

/// modprobe arguments for load and unload.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct ModprobeArgs {
    /// Arguments used when loading.
    #[schemars(length(min = 1))]
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub load: Vec<String>,
    /// Arguments used when unloading.
    #[schemars(length(min = 1))]
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub unload: Vec<String>,
}

/// A container of a device plugin or DRA driver pod.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CommonContainerSpec {
    /// Entrypoint.
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub command: Vec<String>,
    /// Arguments.
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub args: Vec<String>,
    /// Environment variables.
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub env: Vec<EnvVar>,
    /// Container image.
    #[serde(deserialize_with = "nullable")]
    pub image: String,
    /// Pull policy (Always, IfNotPresent or Never).
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub image_pull_policy: String,
    /// Compute resources.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Volume mounts, added after the operator's own.
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub volume_mounts: Vec<VolumeMount>,
}

/// The device plugin container; same shape as [`CommonContainerSpec`].
pub type DevicePluginContainerSpec = CommonContainerSpec;

/// Device plugin DaemonSet settings.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DevicePluginSpec {
    /// The device plugin container.
    pub container: DevicePluginContainerSpec,
    /// Optional init container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_container: Option<DevicePluginContainerSpec>,
    /// ServiceAccount of the device plugin pods.
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub service_account_name: String,
    /// Extra volumes; hostPath volumes must be under /dev, /sys, /var, /opt or /run.
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub volumes: Vec<Volume>,
    /// Whether the ServiceAccount token is mounted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub automount_service_account_token: Option<bool>,
}

/// DRA driver DaemonSet and DeviceClass settings.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DraSpec {
    /// The DRA driver container.
    pub container: CommonContainerSpec,
    /// Optional init container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_container: Option<CommonContainerSpec>,
    /// ServiceAccount of the driver pods.
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub service_account_name: String,
    /// Extra volumes; hostPath volumes must be under /dev, /sys, /var, /opt or /run.
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub volumes: Vec<Volume>,
    /// Whether the ServiceAccount token is mounted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub automount_service_account_token: Option<bool>,
    /// Name of the DRA driver (a DNS subdomain).
    #[serde(deserialize_with = "nullable")]
    pub driver_name: String,
    /// DeviceClasses created for this driver.
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub device_classes: Vec<DeviceClassSpec>,
}

/// A DeviceClass created for a DRA driver.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct DeviceClassSpec {
    /// DeviceClass name (a DNS subdomain).
    #[schemars(regex(
        pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
    ))]
    pub name: String,
    /// Device selectors of the class.
    #[schemars(length(max = 32))]
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub selectors: Vec<DeviceSelector>,
    /// Configuration of the class.
    #[schemars(length(max = 32))]
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub config: Vec<DeviceClassConfiguration>,
}

/// Observed state of a Module.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ModuleStatus {
    /// Device plugin pods.
    #[serde(default)]
    #[schemars(transform = no_default)]
    pub device_plugin: DaemonSetStatus,
    /// DRA driver pods.
    #[serde(default)]
    #[schemars(transform = no_default)]
    pub dra: DaemonSetStatus,
    /// Nodes where the module is (to be) loaded.
    #[serde(default)]
    #[schemars(transform = no_default)]
    pub module_loader: DaemonSetStatus,
    /// The `imageRebuildTriggerGeneration` whose images were last verified.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_rebuild_trigger_generation: Option<i64>,
    /// Ready, Progressing and Degraded, each with a reason and a message naming the nodes,
    /// images or fields involved (kmm-rs addition).
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub conditions: Vec<Condition>,
}

/// Node counts of one kind of module pod.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DaemonSetStatus {
    /// Nodes that match the selector and tolerate the node's taints.
    #[serde(default)]
    #[schemars(transform = no_default)]
    pub nodes_matching_selector_number: i32,
    /// Nodes where the pods or the module should run.
    #[serde(default)]
    #[schemars(transform = no_default)]
    pub desired_number: i32,
    /// Nodes where they run with the current configuration.
    #[serde(default)]
    #[schemars(transform = no_default)]
    pub available_number: i32,
}
