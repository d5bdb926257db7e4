//! `PreflightValidation` v1beta2 (stored version).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::serde_util::{is_false, nullable};
pub use crate::v1beta1::preflight::{VerificationStage, VerificationStatus};

/// The kernel to validate every Module against.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "kmm.sigs.x-k8s.io",
    version = "v1beta2",
    kind = "PreflightValidation",
    shortname = "pfv",
    status = "PreflightValidationStatus",
    derive = "Default",
    derive = "PartialEq",
    doc = "PreflightValidation checks, before a kernel upgrade, that every Module has an image (or can build and sign one) for the new kernel.",
    printcolumn(name = "Kernel", type_ = "string", json_path = ".spec.kernelVersion"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct PreflightValidationSpec {
    /// The kernel version to validate the Modules against.
    pub kernel_version: String,
    /// Push the images built or signed during validation.
    #[serde(default, skip_serializing_if = "is_false")]
    pub push_built_image: bool,
}

/// Verification results, one per Module.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct PreflightValidationStatus {
    /// Result per Module.
    #[x_kube(merge_strategy = ListMerge::Map(vec!["namespace".into(), "name".into()]))]
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub modules: Vec<PreflightValidationModuleStatus>,
}

/// Verification result of one Module.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PreflightValidationModuleStatus {
    /// Module namespace.
    pub namespace: String,
    /// Module name.
    pub name: String,
    /// Success, Failure or InProgress.
    pub verification_status: VerificationStatus,
    /// Why the result is what it is.
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub status_reason: String,
    /// Image or Done.
    pub verification_stage: VerificationStage,
    /// When the result last changed.
    pub last_transition_time: Time,
}
