//! `PreflightValidation` v1beta1 (served, deprecated): asks whether every Module is ready for a
//! kernel the cluster will be upgraded to. Stored as v1beta2; see [`crate::v1beta2`].

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::serde_util::{is_false, nullable};

/// The kernel to validate every Module against.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "kmm.sigs.x-k8s.io",
    version = "v1beta1",
    kind = "PreflightValidation",
    shortname = "pfv",
    status = "PreflightValidationStatus",
    derive = "Default",
    derive = "PartialEq",
    storage = false,
    deprecated = "kmm.sigs.x-k8s.io/v1beta1 PreflightValidation is deprecated; use v1beta2",
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

/// Verification results keyed by `<namespace>/<name>` of each Module.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PreflightValidationStatus {
    /// Result per Module, keyed by `<namespace>/<name>`.
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub cr_statuses: BTreeMap<String, CrStatus>,
}

/// Verification result of one Module.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CrStatus {
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

/// Result of a preflight verification.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub enum VerificationStatus {
    /// The Module is ready for the kernel.
    Success,
    /// The Module is not ready for the kernel.
    Failure,
    /// Still verifying.
    #[default]
    InProgress,
}

/// Stage of a preflight verification.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub enum VerificationStage {
    /// Checking, building or signing the image.
    #[default]
    Image,
    /// Finished.
    Done,
}
