//! `NodeModulesConfig` (cluster-scoped, named after its Node): the operator's per-node record of
//! which modules should be loaded (spec) and which are (status). Internal; users only read it.

use k8s_openapi::api::core::v1::{LocalObjectReference, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::module::ModprobeSpec;
use crate::serde_util::{nullable, require_insecure_pull};

/// Modules that should be loaded on the node.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "kmm.sigs.x-k8s.io",
    version = "v1beta1",
    kind = "NodeModulesConfig",
    shortname = "nmc",
    status = "NodeModulesConfigStatus",
    derive = "Default",
    derive = "PartialEq",
    doc = "NodeModulesConfig is the operator's record, for one node (same name), of the kernel modules that should be loaded there (spec) and of those that are loaded (status).",
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
pub struct NodeModulesConfigSpec {
    /// Modules that should be loaded on the node.
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub modules: Vec<NodeModuleSpec>,
}

/// Identity and pod settings of one module on one node.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModuleItem {
    /// Pull secret of the worker pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_repo_secret: Option<LocalObjectReference>,
    /// Module name.
    pub name: String,
    /// Module namespace.
    pub namespace: String,
    /// ServiceAccount of the worker pods.
    #[serde(deserialize_with = "nullable")]
    pub service_account_name: String,
    /// Tolerations of the worker pods.
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub tolerations: Vec<Toleration>,
    /// Module version (ordered upgrades).
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub version: String,
}

/// One module that should be loaded on the node.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct NodeModuleSpec {
    /// Identity and pod settings.
    #[serde(flatten)]
    pub item: ModuleItem,
    /// What to load.
    pub config: ModuleConfig,
}

/// What to load for one module on one node; also the worker's config file.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(transform = require_insecure_pull)]
pub struct ModuleConfig {
    /// Kernel version the image was chosen for.
    pub kernel_version: String,
    /// The module image.
    pub container_image: String,
    /// Pull policy of the module image.
    #[serde(default = "default_pull_policy", deserialize_with = "nullable")]
    pub image_pull_policy: String,
    /// Unused; kept for compatibility.
    #[serde(default, deserialize_with = "nullable")]
    pub insecure_pull: bool,
    /// In-tree modules removed before loading.
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub in_tree_modules_to_remove: Vec<String>,
    /// Deprecated single in-tree module to remove.
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub in_tree_module_to_remove: String,
    /// modprobe settings.
    pub modprobe: ModprobeSpec,
}

/// The default image pull policy of a module config.
pub const DEFAULT_PULL_POLICY: &str = "IfNotPresent";

fn default_pull_policy() -> String {
    DEFAULT_PULL_POLICY.to_owned()
}

/// Modules loaded on the node.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct NodeModulesConfigStatus {
    /// Modules loaded on the node, with the configuration they were loaded with.
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub modules: Vec<NodeModuleStatus>,
}

/// One module loaded on the node.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeModuleStatus {
    /// Identity and pod settings.
    #[serde(flatten)]
    pub item: ModuleItem,
    /// The configuration the module was loaded with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<ModuleConfig>,
    /// The node's boot ID when the module was loaded; a different boot ID means a reboot.
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub boot_id: String,
    /// The last failed load or unload of this module on this node (kmm-rs addition).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure: Option<LastFailure>,
}

/// A failed load or unload, as reported by the worker.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct LastFailure {
    /// Stable reason, for example SignatureRejected, UnknownSymbol or ModuleNotFound.
    pub reason: String,
    /// The kernel's or modprobe's own message.
    pub message: String,
    /// When the failure was recorded.
    pub time: Time,
}
