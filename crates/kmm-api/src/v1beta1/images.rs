//! `ModuleImagesConfig` and `ModuleBuildSignConfig`: the operator's internal records of which
//! module images exist, and which must be built or signed in the cluster.

use k8s_openapi::api::core::v1::{LocalObjectReference, Toleration};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::module::{Build, DEFAULT_DIR_NAME, Sign, TlsOptions};
use super::nmc::DEFAULT_PULL_POLICY;
use crate::serde_util::{is_false, nullable};

/// One module image, for one kernel, with the resolved build and sign settings.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModuleImageSpec {
    /// Image reference.
    pub image: String,
    /// Kernel version the image is for.
    pub kernel_version: String,
    /// Build settings, if the image may be built.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build: Option<Build>,
    /// Sign settings, if the image must be signed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sign: Option<Sign>,
    /// Report a missing image at once instead of waiting for it to appear.
    #[serde(default, skip_serializing_if = "is_false")]
    pub skip_wait_missing_image: bool,
    /// Registry TLS settings for the image.
    #[serde(
        default,
        rename = "registryTLS",
        skip_serializing_if = "Option::is_none"
    )]
    pub registry_tls: Option<TlsOptions>,
    /// `modprobe.dirName` of the Module.
    #[serde(default = "default_dir_name", deserialize_with = "nullable")]
    pub dir_name: String,
}

fn default_dir_name() -> String {
    DEFAULT_DIR_NAME.to_owned()
}

fn default_pull_policy() -> String {
    DEFAULT_PULL_POLICY.to_owned()
}

/// Images of one Module (or one preflight check) whose existence the operator verifies.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "kmm.sigs.x-k8s.io",
    version = "v1beta1",
    kind = "ModuleImagesConfig",
    namespaced,
    shortname = "mic",
    status = "ModuleImagesConfigStatus",
    derive = "Default",
    derive = "PartialEq",
    doc = "ModuleImagesConfig lists the images a Module needs, one per kernel, and records whether each exists or must be built or signed.",
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct ModuleImagesConfigSpec {
    /// The images, one per distinct image reference.
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub images: Vec<ModuleImageSpec>,
    /// Pull secret for the images.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_repo_secret: Option<LocalObjectReference>,
    /// Pull policy used when checking the images.
    #[serde(default = "default_pull_policy", deserialize_with = "nullable")]
    pub image_pull_policy: String,
    /// Push images built or signed in the cluster.
    #[serde(default, skip_serializing_if = "is_false")]
    pub push_built_image: bool,
    /// The Module's `imageRebuildTriggerGeneration`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_rebuild_trigger_generation: Option<i64>,
    /// Tolerations of the pods that check, build and sign the images.
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub tolerations: Vec<Toleration>,
}

/// What is known about each image.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModuleImagesConfigStatus {
    /// State of each image.
    #[serde(deserialize_with = "nullable")]
    pub images_states: Vec<ModuleImageState>,
    /// The `imageRebuildTriggerGeneration` the states belong to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_rebuild_trigger_generation: Option<i64>,
}

/// State of one image.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct ModuleImageState {
    /// Image reference.
    pub image: String,
    /// Exists, DoesNotExist, NeedsBuilding or NeedsSigning.
    #[schemars(with = "String")]
    pub status: ImageState,
    /// Why the image is in this state, as a stable word: NotFound, Unauthorized,
    /// RegistryUnreachable, TlsError, PullFailed (kmm-rs addition).
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub reason: String,
    /// What the registry or the container runtime said (kmm-rs addition).
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub message: String,
}

/// Whether an image exists or what must happen to it. Unknown values read as `Unknown`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub enum ImageState {
    /// Not checked yet (Go KMM writes an empty string).
    #[default]
    #[serde(rename = "")]
    Unknown,
    /// The image exists in its registry.
    Exists,
    /// The image does not exist and cannot be built or signed.
    DoesNotExist,
    /// The image must be built.
    NeedsBuilding,
    /// The image must be signed.
    NeedsSigning,
}

/// Images to build or sign in the cluster.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "kmm.sigs.x-k8s.io",
    version = "v1beta1",
    kind = "ModuleBuildSignConfig",
    namespaced,
    shortname = "mbsc",
    status = "ModuleBuildSignConfigStatus",
    derive = "Default",
    derive = "PartialEq",
    doc = "ModuleBuildSignConfig lists the module images to build or sign in the cluster and records the outcome of each.",
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct ModuleBuildSignConfigSpec {
    /// The images and what to do with each.
    #[serde(deserialize_with = "nullable")]
    pub images: Vec<ModuleBuildSignImageSpec>,
    /// Pull and push secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_repo_secret: Option<LocalObjectReference>,
    /// Push the built or signed images.
    #[serde(default, skip_serializing_if = "is_false")]
    pub push_built_image: bool,
    /// Tolerations of the build and sign pods.
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub tolerations: Vec<Toleration>,
}

/// One image and the action to take on it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct ModuleBuildSignImageSpec {
    /// The image.
    #[serde(flatten)]
    pub image: ModuleImageSpec,
    /// BuildImage or SignImage.
    pub action: BuildSignAction,
}

/// What to do with an image.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub enum BuildSignAction {
    /// Build the image.
    #[default]
    BuildImage,
    /// Sign the image.
    SignImage,
}

/// Outcomes of the builds and signs.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct ModuleBuildSignConfigStatus {
    /// Outcome per image.
    #[serde(deserialize_with = "nullable")]
    pub images: Vec<BuildSignImageState>,
}

/// Outcome of the last build or sign of one image.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct BuildSignImageState {
    /// Image reference.
    pub image: String,
    /// Success or Failure.
    pub status: BuildSignResult,
    /// The action the outcome belongs to.
    pub action: BuildSignAction,
}

/// Outcome of a build or sign pod.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub enum BuildSignResult {
    /// The pod succeeded.
    #[default]
    Success,
    /// The pod failed.
    Failure,
}
