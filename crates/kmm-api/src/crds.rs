//! The CustomResourceDefinitions of every kind kmm-rs serves, generated from the Rust types.
//! `kmm-operator crd` writes them to `deploy/crds/`; a test fails when that copy drifts.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;
use kube::core::crd::merge_crds;

use crate::{hub, v1beta1, v1beta2};

/// Error while assembling the CRDs.
#[derive(Debug)]
pub struct CrdError(String);

impl std::fmt::Display for CrdError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CrdError {}

/// Every CRD, each with its file name under `deploy/crds/`.
pub fn all() -> Result<Vec<(String, CustomResourceDefinition)>, CrdError> {
    let preflight = merge_crds(
        vec![
            v1beta1::PreflightValidation::crd(),
            v1beta2::PreflightValidation::crd(),
        ],
        "v1beta2",
    )
    .map_err(|err| CrdError(format!("merging the PreflightValidation versions: {err}")))?;
    let crds = vec![
        v1beta1::Module::crd(),
        v1beta1::NodeModulesConfig::crd(),
        v1beta1::ModuleImagesConfig::crd(),
        v1beta1::ModuleBuildSignConfig::crd(),
        preflight,
        hub::ManagedClusterModule::crd(),
    ];
    Ok(crds.into_iter().map(|crd| (file_name(&crd), crd)).collect())
}

/// `<group>_<plural>.yaml`, as controller-gen names them.
fn file_name(crd: &CustomResourceDefinition) -> String {
    format!("{}_{}.yaml", crd.spec.group, crd.spec.names.plural)
}

/// One CRD as YAML, the way it is committed.
pub fn to_yaml(crd: &CustomResourceDefinition) -> Result<String, CrdError> {
    serde_saphyr::to_string(crd).map_err(|err| CrdError(format!("{}: {err}", crd.spec.names.kind)))
}
