//! `kmm-operator webhook`: the validating webhooks (Module, namespace deletion,
//! PreflightValidation, ManagedClusterModule) and the PreflightValidation conversion webhook,
//! over HTTPS. No leader election: every replica serves.

pub mod admission;
pub mod certs;
pub mod convert;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Json;
use axum::Router;
use axum::routing::post;
use clap::Args;
use kmm_core::validate::ClusterInfo;
use kube::core::conversion::{ConversionRequest, ConversionResponse, ConversionReview};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::admin::{self, ProbeState};
use crate::config;
use crate::logging::LogFormat;
use crate::run::{load_config, non_empty, wait_for_shutdown};
use crate::tls::{self, CertResolver};
use admission::AdmissionState;

/// Webhook paths, as Go KMM registers them.
pub mod path {
    pub const MODULE: &str = "/validate-kmm-sigs-x-k8s-io-v1beta1-module";
    pub const NAMESPACE: &str = "/validate--v1-namespace";
    pub const PREFLIGHT: &str = "/validate-kmm-sigs-x-k8s-io-v1beta2-preflightvalidation";
    pub const MANAGED_CLUSTER_MODULE: &str =
        "/validate-hub-kmm-sigs-x-k8s-io-v1beta1-managedclustermodule";
    pub const CONVERT: &str = "/convert";
}

/// Flags of `kmm-operator webhook`; each one can also be set through the environment variable
/// shown in `--help`.
#[derive(Args, Debug)]
pub struct WebhookArgs {
    /// The operator config file (for `webhook.port` and `healthProbeBindAddress`).
    #[arg(long, env = "KMM_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Namespace the operator runs in (where the self-managed certificate Secret lives).
    #[arg(long, env = "OPERATOR_NAMESPACE", value_parser = non_empty)]
    pub operator_namespace: String,
    /// Serve the Module webhook.
    #[arg(long, env = "KMM_WEBHOOK_ENABLE_MODULE")]
    pub enable_module: bool,
    /// Serve the namespace-deletion webhook.
    #[arg(long, env = "KMM_WEBHOOK_ENABLE_NAMESPACE")]
    pub enable_namespace: bool,
    /// Serve the PreflightValidation webhook and the PreflightValidation conversion endpoint.
    #[arg(long, env = "KMM_WEBHOOK_ENABLE_PREFLIGHTVALIDATION")]
    pub enable_preflightvalidation: bool,
    /// Serve the ManagedClusterModule webhook (hub).
    #[arg(long, env = "KMM_WEBHOOK_ENABLE_MANAGEDCLUSTERMODULE")]
    pub enable_managedclustermodule: bool,
    /// Address to listen on; the port comes from `webhook.port` (default 9443) unless `--port`.
    #[arg(long, env = "KMM_WEBHOOK_BIND_HOST", default_value = "0.0.0.0")]
    pub bind_host: String,
    /// Overrides the webhook port of the config file.
    #[arg(long, env = "KMM_WEBHOOK_PORT")]
    pub port: Option<u16>,
    /// Overrides `healthProbeBindAddress`.
    #[arg(long, env = "KMM_HEALTH_PROBE_BIND_ADDRESS")]
    pub health_probe_bind_address: Option<String>,
    /// Directory with `tls.crt`, `tls.key` (and `ca.crt`) from a mounted Secret, e.g. made by
    /// cert-manager; reloaded when the files change. Without it the operator manages its own CA
    /// in `--cert-secret`.
    #[arg(long, env = "KMM_WEBHOOK_CERT_DIR")]
    pub cert_dir: Option<PathBuf>,
    /// Secret (operator namespace) holding the self-managed CA and serving certificate.
    #[arg(
        long,
        env = "KMM_WEBHOOK_CERT_SECRET",
        default_value = "kmm-operator-webhook-cert"
    )]
    pub cert_secret: String,
    /// Service in front of the webhook; its DNS names go into the serving certificate and the
    /// CRD conversion points at it.
    #[arg(
        long,
        env = "KMM_WEBHOOK_SERVICE",
        default_value = "kmm-operator-webhook-service"
    )]
    pub service_name: String,
    /// Extra DNS names or IP addresses for the serving certificate (repeatable).
    #[arg(long = "tls-san", env = "KMM_WEBHOOK_TLS_SANS", value_delimiter = ',')]
    pub tls_sans: Vec<String>,
    /// ValidatingWebhookConfigurations whose caBundle this process keeps (repeatable; empty to
    /// leave them alone, e.g. when cert-manager's CA injector does it).
    #[arg(
        long = "webhook-configuration",
        env = "KMM_WEBHOOK_CONFIGURATIONS",
        value_delimiter = ',',
        default_value = "kmm-operator-validating-webhook-configuration"
    )]
    pub webhook_configurations: Vec<String>,
    /// CRD whose conversion webhook this process points at itself and keeps the caBundle of.
    #[arg(long, env = "KMM_WEBHOOK_CONVERSION_CRD")]
    pub conversion_crd: Option<String>,
    /// Overrides `logging.format`.
    #[arg(long, env = "KMM_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
}

/// The HTTPS routes for the enabled webhooks.
pub fn router(args: &WebhookArgs, state: AdmissionState) -> Router {
    let mut router = Router::new();
    if args.enable_module {
        router = router.route(path::MODULE, post(admission::module));
    }
    if args.enable_namespace {
        router = router.route(path::NAMESPACE, post(admission::namespace));
    }
    if args.enable_preflightvalidation {
        router = router
            .route(path::PREFLIGHT, post(admission::preflight))
            .route(path::CONVERT, post(conversion));
    }
    if args.enable_managedclustermodule {
        router = router.route(
            path::MANAGED_CLUSTER_MODULE,
            post(admission::managed_cluster_module),
        );
    }
    router.with_state(state)
}

async fn conversion(Json(review): Json<ConversionReview>) -> Json<ConversionReview> {
    let request = match ConversionRequest::from_review(review) {
        Ok(request) => request,
        Err(err) => {
            return Json(
                ConversionResponse::invalid(kube::core::Status::failure(
                    &err.to_string(),
                    "InvalidRequest",
                ))
                .into_review(),
            );
        }
    };
    let desired = request.desired_api_version.clone();
    let converted: Result<Vec<_>, String> = request
        .objects
        .iter()
        .cloned()
        .map(|object| convert::convert(object, &desired))
        .collect();
    let response = ConversionResponse::for_request(request);
    Json(
        match converted {
            Ok(objects) => response.success(objects),
            Err(message) => {
                tracing::warn!("conversion failed: {message}");
                response.failure(kube::core::Status::failure(&message, "ConversionFailed"))
            }
        }
        .into_review(),
    )
}

/// `(major, minor)` from the API server's version, e.g. `1`, `34+` → (1, 34).
fn cluster_version(info: &k8s_openapi::apimachinery::pkg::version::Info) -> Option<(u32, u32)> {
    let digits = |s: &str| {
        s.chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse()
            .ok()
    };
    Some((digits(&info.major)?, digits(&info.minor)?))
}

pub async fn run(args: WebhookArgs) -> anyhow::Result<()> {
    // Unlike the manager, Go's webhook server also treats config errors as fatal.
    let file = load_config(args.config.as_deref())?;
    crate::logging::init(
        args.log_format.or(file.logging.format).unwrap_or_default(),
        file.logging.level.as_deref(),
    );
    if !(args.enable_module
        || args.enable_namespace
        || args.enable_preflightvalidation
        || args.enable_managedclustermodule)
    {
        anyhow::bail!(
            "no webhook enabled: pass at least one of --enable-module, --enable-namespace, --enable-preflightvalidation, --enable-managedclustermodule"
        );
    }
    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API")?;
    let version = client
        .apiserver_version()
        .await
        .context("reading the Kubernetes version")?;
    let cluster = ClusterInfo {
        kubernetes_minor: cluster_version(&version),
    };
    tracing::info!(kubernetes = %version.git_version, "starting the kmm-operator webhook server");

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    tokio::spawn(async move {
        crate::shutdown::signal().await;
        let _ = shutdown_tx.send(true);
    });

    // Certificate.
    let namespace = &args.operator_namespace;
    let mut names = vec![
        format!("{}.{namespace}.svc", args.service_name),
        format!("{}.{namespace}.svc.cluster.local", args.service_name),
    ];
    names.extend(args.tls_sans.iter().cloned());
    let bundle = match &args.cert_dir {
        Some(dir) => tls::read_cert_dir(dir)?,
        None => certs::ensure_secret(client.clone(), namespace, &args.cert_secret, &names).await?,
    };
    let resolver = CertResolver::new(&bundle)?;
    let (bundle_tx, mut bundle_rx) = watch::channel(bundle.clone());
    match &args.cert_dir {
        Some(dir) => {
            tokio::spawn(tls::watch_cert_dir(
                dir.clone(),
                resolver.clone(),
                bundle_tx,
                Duration::from_secs(30),
            ));
        }
        None => {
            tokio::spawn(renew_self_managed(
                client.clone(),
                namespace.clone(),
                args.cert_secret.clone(),
                names.clone(),
                resolver.clone(),
                bundle_tx,
            ));
        }
    }
    // caBundle injection follows the CA of whatever is served.
    let (ca_tx, ca_rx) = watch::channel(bundle.ca_pem.clone());
    tokio::spawn(async move {
        while bundle_rx.changed().await.is_ok() {
            let ca = bundle_rx.borrow_and_update().ca_pem.clone();
            ca_tx.send_if_modified(|c| std::mem::replace(c, ca.clone()) != ca);
        }
    });
    if bundle.ca_pem.is_empty() {
        tracing::warn!(
            "the mounted certificate has no ca.crt; leaving caBundles to cert-manager's CA injector"
        );
    } else {
        let conversion = args.conversion_crd.clone().map(|crd| {
            (
                crd,
                certs::ConversionService {
                    namespace: namespace.clone(),
                    name: args.service_name.clone(),
                    port: 443,
                },
            )
        });
        tokio::spawn(certs::keep_ca_bundles(
            client.clone(),
            ca_rx,
            args.webhook_configurations
                .iter()
                .filter(|name| !name.is_empty())
                .cloned()
                .collect(),
            conversion,
        ));
    }

    // Servers.
    let port = args.port.unwrap_or_else(|| file.webhook_port());
    let address = format!("{}:{port}", args.bind_host);
    let listener = TcpListener::bind(&address)
        .await
        .with_context(|| format!("listening on {address} (webhook)"))?;
    tracing::info!(address = %listener.local_addr()?, "serving webhooks over HTTPS");
    let health = args
        .health_probe_bind_address
        .clone()
        .unwrap_or(file.health_probe_bind_address.clone());
    let health_address = config::parse_bind_address(&health)?;
    let health_listener = TcpListener::bind(health_address)
        .await
        .with_context(|| format!("listening on {health_address} (healthProbeBindAddress)"))?;
    tracing::info!(address = %health_listener.local_addr()?, "serving probes");
    // The webhook is ready as soon as it has a certificate and listens.
    let (_ready_tx, ready_rx) = watch::channel(true);
    let probes = admin::probe_router(ProbeState {
        ready: ready_rx,
        leader: None,
        identity: crate::leader::default_identity(),
    });
    let state = AdmissionState { client, cluster };
    let webhooks = router(&args, state);
    let tls_config: Arc<rustls::ServerConfig> = resolver.server_config();
    let mut servers = tokio::task::JoinSet::new();
    servers.spawn(tls::serve(
        health_listener,
        None,
        probes,
        wait_for_shutdown(shutdown_rx.clone()),
    ));
    servers.spawn(tls::serve(
        listener,
        Some(tls_config),
        webhooks,
        wait_for_shutdown(shutdown_rx.clone()),
    ));
    let mut outcome = Ok(());
    while let Some(result) = servers.join_next().await {
        if let Ok(Err(err)) = result {
            outcome = Err(err);
            servers.abort_all();
        }
    }
    tracing::info!("webhook server stopped");
    outcome
}

/// Re-checks the self-managed certificate twice a day and serves the renewed one.
async fn renew_self_managed(
    client: kube::Client,
    namespace: String,
    secret: String,
    names: Vec<String>,
    resolver: Arc<CertResolver>,
    updates: watch::Sender<tls::CertBundle>,
) {
    loop {
        tokio::time::sleep(Duration::from_secs(12 * 3600)).await;
        match certs::ensure_secret(client.clone(), &namespace, &secret, &names).await {
            Ok(bundle) if bundle != *updates.borrow() => match resolver.replace(&bundle) {
                Ok(()) => {
                    let _ = updates.send(bundle);
                }
                Err(err) => tracing::warn!("serving the renewed certificate: {err:#}"),
            },
            Ok(_) => {}
            Err(err) => tracing::warn!("renewing the webhook certificate: {err:#}"),
        }
    }
}
