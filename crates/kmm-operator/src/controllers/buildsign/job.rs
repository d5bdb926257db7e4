//! Build and sign jobs as the MBSC reconciler sees them, whatever runs them: kaniko pods on
//! Kubernetes, `Build` objects on OpenShift. Both are read as dynamic objects; this file says
//! which API holds them and how their phase and failure message are read. No I/O.

use kmm_api::v1beta1::BuildSignAction;
use kmm_api::wire::{annotation, label, resource_type};
use kube::ResourceExt;
use kube::api::{ApiResource, DynamicObject};
use serde_json::Value;

/// What runs builds and signs in this cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runner {
    /// kaniko pods.
    Kaniko,
    /// OpenShift `build.openshift.io/v1` Builds.
    OpenShift,
}

impl Runner {
    /// The API of the job objects.
    pub fn api_resource(self) -> ApiResource {
        match self {
            Runner::Kaniko => ApiResource::erase::<k8s_openapi::api::core::v1::Pod>(&()),
            Runner::OpenShift => ApiResource {
                group: "build.openshift.io".into(),
                version: "v1".into(),
                api_version: kmm_core::openshift_build::API_VERSION.into(),
                kind: kmm_core::openshift_build::KIND.into(),
                plural: "builds".into(),
            },
        }
    }

    /// Kind of the job objects, for messages.
    pub fn noun(self) -> &'static str {
        match self {
            Runner::Kaniko => "pod",
            Runner::OpenShift => "Build",
        }
    }
}

/// Where a job is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// Not finished.
    Active,
    /// Finished successfully.
    Succeeded,
    /// Finished with an error: what it said.
    Failed(String),
}

/// The phase of a job object (`status.phase` of a Pod or a Build).
pub fn phase(job: &DynamicObject) -> Phase {
    let status = job.data.get("status");
    let text = |v: Option<&Value>| v.and_then(Value::as_str).unwrap_or_default().to_owned();
    match status.and_then(|s| s.get("phase")).and_then(Value::as_str) {
        Some("Succeeded" | "Complete") => Phase::Succeeded,
        Some("Failed" | "Error" | "Cancelled") => {
            let status = status.unwrap_or(&Value::Null);
            // A pod: the containers' termination messages (the log tail, with
            // FallbackToLogsOnError). A Build: its reason, message and log snippet.
            let mut parts: Vec<String> = status
                .get("containerStatuses")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|c| {
                    let t = c.get("state")?.get("terminated")?;
                    let message = text(t.get("message"));
                    let code = t
                        .get("exitCode")
                        .and_then(Value::as_i64)
                        .unwrap_or_default();
                    Some(if message.is_empty() {
                        format!("exit code {code}")
                    } else {
                        format!("exit code {code}: {message}")
                    })
                })
                .collect();
            for key in ["reason", "message", "logSnippet"] {
                let value = text(status.get(key));
                if !value.is_empty() {
                    parts.push(value);
                }
            }
            Phase::Failed(kmm_core::build_pod::failure_tail(&parts.join("\n")))
        }
        _ => Phase::Active,
    }
}

/// The action of a job, from its `resource-type` label.
pub fn action(job: &DynamicObject) -> Option<BuildSignAction> {
    match job.labels().get(label::RESOURCE_TYPE)?.as_str() {
        resource_type::BUILD => Some(BuildSignAction::BuildImage),
        resource_type::SIGN => Some(BuildSignAction::SignImage),
        _ => None,
    }
}

/// The `last-hash` annotation of a job.
pub fn hash(job: &DynamicObject) -> Option<&str> {
    job.annotations()
        .get(annotation::LAST_HASH)
        .map(String::as_str)
}

/// `Buildimage` / `Signimage`: Go KMM's event reason prefix (`cases.Title` of the label value).
pub fn event_prefix(action: BuildSignAction) -> &'static str {
    match action {
        BuildSignAction::BuildImage => "Buildimage",
        BuildSignAction::SignImage => "Signimage",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn object(status: Value) -> DynamicObject {
        serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "p"},
            "status": status,
        }))
        .unwrap()
    }

    #[test]
    fn phases_of_pods_and_builds() {
        assert_eq!(phase(&object(json!({"phase": "Running"}))), Phase::Active);
        assert_eq!(
            phase(&object(json!({"phase": "Complete"}))),
            Phase::Succeeded
        );
        let failed = object(json!({"phase": "Failed", "containerStatuses": [
            {"name": "kaniko", "state": {"terminated": {"exitCode": 1, "message": "error building image: no such file"}}}
        ]}));
        assert_eq!(
            phase(&failed),
            Phase::Failed("exit code 1: error building image: no such file".into())
        );
        let build = object(
            json!({"phase": "Failed", "reason": "DockerBuildFailed", "logSnippet": "cp: cannot stat"}),
        );
        assert_eq!(
            phase(&build),
            Phase::Failed("DockerBuildFailed\ncp: cannot stat".into())
        );
    }
}
