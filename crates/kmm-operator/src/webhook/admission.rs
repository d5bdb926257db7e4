//! The validating webhooks. Every rule and message comes from `kmm_core::validate`; this file
//! only decodes AdmissionReviews and encodes the answers.

use axum::Json;
use axum::extract::State;
use kmm_api::hub::ManagedClusterModule;
use kmm_api::v1beta1::Module;
use kmm_api::v1beta2::PreflightValidation;
use kmm_api::wire;
use kmm_core::validate::{self, ClusterInfo, ValidationErrors};
use kube::api::{Api, ListParams};
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use serde::de::DeserializeOwned;

/// What the handlers share.
#[derive(Clone)]
pub struct AdmissionState {
    pub client: kube::Client,
    pub cluster: ClusterInfo,
}

impl std::fmt::Debug for AdmissionState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdmissionState")
            .field("cluster", &self.cluster)
            .finish_non_exhaustive()
    }
}

type Review = Json<AdmissionReview<DynamicObject>>;

/// The answer to a review whose request could not be read.
fn invalid(reason: impl ToString) -> Review {
    Json(AdmissionResponse::invalid(reason).into_review())
}

fn request(
    review: AdmissionReview<DynamicObject>,
) -> Result<AdmissionRequest<DynamicObject>, Box<Review>> {
    review
        .try_into()
        .map_err(|err: kube::core::admission::ConvertAdmissionReviewError| Box::new(invalid(err)))
}

/// Decodes the typed object; a shape our types cannot read is a denial that says why.
fn typed<K: DeserializeOwned>(
    object: Option<&DynamicObject>,
    what: &str,
) -> Result<Option<K>, String> {
    object
        .map(|o| {
            serde_json::to_value(o)
                .and_then(serde_json::from_value)
                .map_err(|err| format!("cannot read the {what}: {err}"))
        })
        .transpose()
}

/// The message of a denial: exactly Go KMM's message for the first problem, then, when there is
/// more than one, each further problem with the path of its field.
pub fn denial_message(errors: &ValidationErrors) -> String {
    let mut message = errors.go_message().to_owned();
    for error in errors.0.iter().skip(1) {
        message.push_str("; ");
        message.push_str(&error.to_string());
    }
    message
}

fn answer(req: &AdmissionRequest<DynamicObject>, result: Result<(), String>) -> Review {
    let response = AdmissionResponse::from(req);
    let response = match result {
        Ok(()) => response,
        Err(message) => {
            tracing::info!(
                kind = %req.kind.kind,
                name = %req.name,
                namespace = req.namespace.as_deref().unwrap_or(""),
                operation = ?req.operation,
                "denied: {message}"
            );
            response.deny(message)
        }
    };
    Json(response.into_review())
}

/// `/validate-kmm-sigs-x-k8s-io-v1beta1-module`
pub async fn module(
    State(state): State<AdmissionState>,
    Json(review): Json<AdmissionReview<DynamicObject>>,
) -> Review {
    let req = match request(review) {
        Ok(req) => req,
        Err(review) => return *review,
    };
    let result = (|| {
        let new: Option<Module> = typed(req.object.as_ref(), "Module")?;
        let old: Option<Module> = typed(req.old_object.as_ref(), "old Module")?;
        let outcome = match (&req.operation, old, new) {
            (Operation::Create, _, Some(new)) => validate::validate_module(&new, &state.cluster),
            (Operation::Update, Some(old), Some(new)) => {
                validate::validate_module_update(&old, &new, &state.cluster)
            }
            _ => Ok(()),
        };
        outcome.map_err(|errors| denial_message(&errors))
    })();
    answer(&req, result)
}

/// `/validate-kmm-sigs-x-k8s-io-v1beta2-preflightvalidation`
pub async fn preflight(Json(review): Json<AdmissionReview<DynamicObject>>) -> Review {
    let req = match request(review) {
        Ok(req) => req,
        Err(review) => return *review,
    };
    let result = (|| {
        let new: Option<PreflightValidation> = typed(req.object.as_ref(), "PreflightValidation")?;
        match (&req.operation, new) {
            (Operation::Create | Operation::Update, Some(pv)) => {
                validate::validate_preflight(&pv).map_err(|errors| denial_message(&errors))
            }
            _ => Ok(()),
        }
    })();
    answer(&req, result)
}

/// `/validate-hub-kmm-sigs-x-k8s-io-v1beta1-managedclustermodule`
pub async fn managed_cluster_module(Json(review): Json<AdmissionReview<DynamicObject>>) -> Review {
    let req = match request(review) {
        Ok(req) => req,
        Err(review) => return *review,
    };
    let result = (|| {
        let new: Option<ManagedClusterModule> = typed(req.object.as_ref(), "ManagedClusterModule")?;
        let old: Option<ManagedClusterModule> =
            typed(req.old_object.as_ref(), "old ManagedClusterModule")?;
        let outcome = match (&req.operation, old, new) {
            (Operation::Create, _, Some(new)) => validate::validate_managed_cluster_module(&new),
            (Operation::Update, Some(old), Some(new)) => {
                validate::validate_managed_cluster_module_update(&old, &new)
            }
            _ => Ok(()),
        };
        outcome.map_err(|errors| denial_message(&errors))
    })();
    answer(&req, result)
}

/// `/validate--v1-namespace`: refuses to delete a namespace that still holds Modules.
///
/// Go KMM refuses whenever the namespace carries the `kmm.node.k8s.io/contains-modules` label.
/// kmm-rs asks the API server instead, so a stale label never blocks a deletion; only when that
/// lookup fails does it fall back to the label.
pub async fn namespace(
    State(state): State<AdmissionState>,
    Json(review): Json<AdmissionReview<DynamicObject>>,
) -> Review {
    let req = match request(review) {
        Ok(req) => req,
        Err(review) => return *review,
    };
    if req.operation != Operation::Delete {
        return answer(&req, Ok(()));
    }
    let name = req.name.clone();
    let modules: Api<Module> = Api::namespaced(state.client.clone(), &name);
    let holds_modules = match modules.list_metadata(&ListParams::default().limit(1)).await {
        Ok(list) => !list.items.is_empty(),
        Err(err) => {
            let labelled = req
                .old_object
                .as_ref()
                .and_then(|ns| ns.metadata.labels.as_ref())
                .is_some_and(|labels| labels.contains_key(wire::label::NAMESPACE_CONTAINS_MODULES));
            tracing::warn!(namespace = %name, "listing Modules failed ({err}); deciding by the label: {labelled}");
            labelled
        }
    };
    let result = if holds_modules {
        Err(validate::namespace_deletion_message().to_owned())
    } else {
        Ok(())
    };
    answer(&req, result)
}
