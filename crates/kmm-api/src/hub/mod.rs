//! hub.kmm.sigs.x-k8s.io/v1beta1: `ManagedClusterModule`, a Module template the KMM hub deploys
//! to the spoke clusters selected by labels.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::serde_util::{no_default, nullable};
use crate::v1beta1::ModuleSpec;

/// A Module to deploy on the selected managed clusters.
// Several printer columns share a `type_`; clippy mistakes that for a repeated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "hub.kmm.sigs.x-k8s.io",
    version = "v1beta1",
    kind = "ManagedClusterModule",
    status = "ManagedClusterModuleStatus",
    derive = "Default",
    derive = "PartialEq",
    doc = "ManagedClusterModule deploys a Module to every managed cluster whose labels match its selector, building and signing its images on the hub.",
    printcolumn(
        name = "Desired",
        type_ = "integer",
        json_path = ".status.numberDesired"
    ),
    printcolumn(
        name = "Applied",
        type_ = "integer",
        json_path = ".status.numberApplied"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct ManagedClusterModuleSpec {
    /// The Module spec deployed to each cluster.
    #[serde(default)]
    #[schemars(transform = no_default)]
    pub module_spec: ModuleSpec,
    /// Namespace of the Module on the spoke clusters.
    pub spoke_namespace: String,
    /// Labels of the ManagedCluster objects to deploy to.
    #[serde(deserialize_with = "nullable")]
    pub selector: BTreeMap<String, String>,
}

/// Deployment counts.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ManagedClusterModuleStatus {
    /// ManifestWorks the hub maintains for this module.
    #[serde(default)]
    #[schemars(transform = no_default)]
    pub number_desired: i32,
    /// ManifestWorks applied on their cluster.
    #[serde(default)]
    #[schemars(transform = no_default)]
    pub number_applied: i32,
    /// ManifestWorks degraded on their cluster.
    #[serde(default)]
    #[schemars(transform = no_default)]
    pub number_degraded: i32,
}
