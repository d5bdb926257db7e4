//! The admin HTTP servers: probes (`/livez`, `/healthz`, `/readyz`, `/leader`) on the health
//! address, and `/metrics` on the metrics address (HTTPS with a self-signed certificate and a
//! TokenReview + SubjectAccessReview check by default, like controller-runtime's secure metrics).

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{
    NonResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::api::{Api, PostParams};
use tokio::sync::watch;

use crate::metrics::Metrics;

/// What the probes report.
#[derive(Clone, Debug)]
pub struct ProbeState {
    /// True once this process can do its job (caches synced; see `run`).
    pub ready: watch::Receiver<bool>,
    /// True while this process holds the leader Lease (`None`: no leader election here).
    pub leader: Option<watch::Receiver<bool>>,
    pub identity: String,
}

/// `/livez`, `/healthz`, `/readyz` and `/leader`.
pub fn probe_router(state: ProbeState) -> Router {
    Router::new()
        .route("/livez", get(|| async { "ok" }))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/leader", get(leader))
        .with_state(state)
}

async fn readyz(State(state): State<ProbeState>) -> Response {
    if *state.ready.borrow() {
        (StatusCode::OK, "ok").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "caches not synced yet").into_response()
    }
}

async fn leader(State(state): State<ProbeState>) -> Response {
    let leading = state.leader.as_ref().map(|l| *l.borrow());
    axum::Json(serde_json::json!({
        "identity": state.identity,
        "leaderElection": leading.is_some(),
        "leader": leading.unwrap_or(true),
    }))
    .into_response()
}

/// How `/metrics` requests are authorized.
#[derive(Clone)]
pub struct MetricsState {
    pub metrics: Arc<Metrics>,
    /// `Some`: require a bearer token allowed to `get` the non-resource URL `/metrics`.
    pub authorizer: Option<kube::Client>,
}

impl std::fmt::Debug for MetricsState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsState")
            .field("authn_authz", &self.authorizer.is_some())
            .finish()
    }
}

/// `/metrics`.
pub fn metrics_router(state: MetricsState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn metrics(State(state): State<MetricsState>, headers: HeaderMap) -> Response {
    if let Some(client) = &state.authorizer
        && let Err(response) = authorize(client, &headers).await
    {
        return response;
    }
    match state.metrics.encode() {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "encoding metrics failed").into_response(),
    }
}

/// TokenReview, then SubjectAccessReview for `get /metrics`.
async fn authorize(client: &kube::Client, headers: &HeaderMap) -> Result<(), Response> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| (StatusCode::UNAUTHORIZED, "bearer token required").into_response())?;
    let review = TokenReview {
        spec: TokenReviewSpec {
            token: Some(token.to_owned()),
            ..Default::default()
        },
        ..Default::default()
    };
    let reviewed = Api::<TokenReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .map_err(|err| {
            tracing::warn!("TokenReview for /metrics failed: {err}");
            (StatusCode::INTERNAL_SERVER_ERROR, "token review failed").into_response()
        })?;
    let status = reviewed.status.unwrap_or_default();
    let user = status
        .user
        .filter(|_| status.authenticated == Some(true))
        .ok_or_else(|| (StatusCode::UNAUTHORIZED, "invalid token").into_response())?;
    let access = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: user.username,
            groups: user.groups,
            uid: user.uid,
            extra: user.extra,
            non_resource_attributes: Some(NonResourceAttributes {
                path: Some("/metrics".into()),
                verb: Some("get".into()),
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let decided = Api::<SubjectAccessReview>::all(client.clone())
        .create(&PostParams::default(), &access)
        .await
        .map_err(|err| {
            tracing::warn!("SubjectAccessReview for /metrics failed: {err}");
            (StatusCode::INTERNAL_SERVER_ERROR, "access review failed").into_response()
        })?;
    if decided.status.is_some_and(|s| s.allowed) {
        Ok(())
    } else {
        Err((StatusCode::FORBIDDEN, "not allowed to get /metrics").into_response())
    }
}
