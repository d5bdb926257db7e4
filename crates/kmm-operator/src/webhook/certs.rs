//! The webhook's certificate without cert-manager: a CA and a serving certificate kept in a
//! Secret of the operator namespace (shared by every webhook replica, surviving restarts), and
//! the CA kept in the `caBundle` of the webhook configurations and of the PreflightValidation
//! CRD's conversion webhook, repaired whenever something (a re-apply) resets it.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, bail};
use futures::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceConversion, CustomResourceDefinition, ServiceReference, WebhookClientConfig,
    WebhookConversion,
};
use kube::api::{Api, ObjectMeta, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::watch;

use crate::tls::{CertBundle, SERVING_VALIDITY, SelfSignedCa};

const FIELD_MANAGER: &str = "kmm-operator-webhook";
const ANNOTATION_NAMES: &str = "kmm-rs.io/serving-names";
const ANNOTATION_NOT_AFTER: &str = "kmm-rs.io/serving-not-after";
/// A serving certificate is replaced this long before it expires.
const RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);

fn text(secret: &Secret, key: &str) -> Option<String> {
    secret
        .data
        .as_ref()?
        .get(key)
        .and_then(|v| String::from_utf8(v.0.clone()).ok())
        .filter(|s| !s.is_empty())
}

/// Reads the certificate Secret, creating or renewing what is missing, and returns the bundle
/// to serve. Safe to run in several replicas at once: writes carry the resourceVersion read,
/// and the loser of a race reads the winner's certificate.
pub async fn ensure_secret(
    client: kube::Client,
    namespace: &str,
    name: &str,
    serving_names: &[String],
) -> anyhow::Result<CertBundle> {
    let api: Api<Secret> = Api::namespaced(client, namespace);
    let wanted_names = serving_names.join(",");
    for _ in 0..5 {
        let existing = api.get_opt(name).await?;
        let now = jiff::Timestamp::now();
        if let Some(secret) = &existing
            && let (Some(ca_pem), Some(ca_key), Some(cert_pem), Some(key_pem)) = (
                text(secret, "ca.crt"),
                text(secret, "ca.key"),
                text(secret, "tls.crt"),
                text(secret, "tls.key"),
            )
        {
            let annotations = secret.metadata.annotations.clone().unwrap_or_default();
            let fresh = annotations
                .get(ANNOTATION_NOT_AFTER)
                .and_then(|t| t.parse::<jiff::Timestamp>().ok())
                .and_then(|t| {
                    t.checked_sub(jiff::SignedDuration::try_from(RENEW_BEFORE).ok()?)
                        .ok()
                })
                .is_some_and(|renew_at| renew_at > now);
            if fresh && annotations.get(ANNOTATION_NAMES) == Some(&wanted_names) {
                return Ok(CertBundle {
                    cert_pem,
                    key_pem,
                    ca_pem,
                });
            }
            // Same CA (so the caBundle stays valid), new serving certificate.
            let ca = SelfSignedCa {
                cert_pem: ca_pem,
                key_pem: ca_key,
            };
            let bundle = ca.issue(serving_names)?;
            let updated =
                secret_object(name, &ca, &bundle, &wanted_names, secret.metadata.clone())?;
            match api.replace(name, &post_params(), &updated).await {
                Ok(_) => {
                    tracing::info!(secret = name, "renewed the webhook serving certificate");
                    return Ok(bundle);
                }
                Err(kube::Error::Api(s)) if s.code == 409 => continue,
                Err(err) => return Err(err).context("updating the webhook certificate Secret"),
            }
        }
        let ca = SelfSignedCa::generate()?;
        let bundle = ca.issue(serving_names)?;
        let metadata = existing.map(|s| s.metadata).unwrap_or_default();
        let had_object = metadata.resource_version.is_some();
        let object = secret_object(name, &ca, &bundle, &wanted_names, metadata)?;
        let written = if had_object {
            api.replace(name, &post_params(), &object).await
        } else {
            api.create(&post_params(), &object).await
        };
        match written {
            Ok(_) => {
                tracing::info!(
                    secret = name,
                    "generated a webhook CA and serving certificate"
                );
                return Ok(bundle);
            }
            Err(kube::Error::Api(s)) if s.code == 409 => continue,
            Err(err) => return Err(err).context("writing the webhook certificate Secret"),
        }
    }
    bail!("the webhook certificate Secret {namespace}/{name} keeps changing under us")
}

fn post_params() -> PostParams {
    PostParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..Default::default()
    }
}

fn secret_object(
    name: &str,
    ca: &SelfSignedCa,
    bundle: &CertBundle,
    names: &str,
    mut metadata: ObjectMeta,
) -> anyhow::Result<Secret> {
    let not_after = jiff::Timestamp::now()
        .checked_add(jiff::SignedDuration::try_from(SERVING_VALIDITY)?)?
        // Certificates carry day-granular dates (see tls.rs); stay on the safe side.
        .checked_sub(jiff::SignedDuration::from_hours(24))?;
    metadata.name = Some(name.to_owned());
    metadata
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .extend([
            (ANNOTATION_NAMES.to_owned(), names.to_owned()),
            (ANNOTATION_NOT_AFTER.to_owned(), not_after.to_string()),
        ]);
    let data = [
        ("ca.crt", &ca.cert_pem),
        ("ca.key", &ca.key_pem),
        ("tls.crt", &bundle.cert_pem),
        ("tls.key", &bundle.key_pem),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), ByteString(v.as_bytes().to_vec())))
    .collect();
    Ok(Secret {
        metadata,
        data: Some(data),
        type_: Some("Opaque".into()),
        ..Default::default()
    })
}

/// Where the CRD's conversion webhook should point when the CRD does not say yet.
#[derive(Clone, Debug)]
pub struct ConversionService {
    pub namespace: String,
    pub name: String,
    pub port: i32,
}

/// Keeps `ca` in the caBundle of every named ValidatingWebhookConfiguration and, if given, in the
/// conversion webhook of the CRD. Runs until the process ends.
pub async fn keep_ca_bundles(
    client: kube::Client,
    ca: watch::Receiver<String>,
    webhook_configurations: Vec<String>,
    conversion: Option<(String, ConversionService)>,
) {
    let mut tasks = tokio::task::JoinSet::new();
    for name in webhook_configurations {
        let api: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
        tasks.spawn(keep_one(api, name, ca.clone(), |vwc, ca| {
            let mut changed = false;
            for webhook in vwc.webhooks.iter_mut().flatten() {
                let bundle = &mut webhook.client_config.ca_bundle;
                if bundle.as_ref().map(|b| b.0.as_slice()) != Some(ca.as_bytes()) {
                    *bundle = Some(ByteString(ca.as_bytes().to_vec()));
                    changed = true;
                }
            }
            changed
        }));
    }
    if let Some((crd, service)) = conversion {
        let api: Api<CustomResourceDefinition> = Api::all(client.clone());
        tasks.spawn(keep_one(api, crd, ca.clone(), move |crd, ca| {
            set_conversion_ca(crd, ca, &service)
        }));
    }
    while tasks.join_next().await.is_some() {}
}

/// Points the CRD's conversion at our service (unless it already names a client config) and sets
/// its caBundle. Returns whether anything changed.
pub fn set_conversion_ca(
    crd: &mut CustomResourceDefinition,
    ca: &str,
    service: &ConversionService,
) -> bool {
    let before = crd.spec.conversion.clone();
    let conversion = crd
        .spec
        .conversion
        .get_or_insert_with(CustomResourceConversion::default);
    conversion.strategy = "Webhook".into();
    let webhook = conversion.webhook.get_or_insert_with(|| WebhookConversion {
        client_config: None,
        conversion_review_versions: vec!["v1".into()],
    });
    let config = webhook
        .client_config
        .get_or_insert_with(|| WebhookClientConfig {
            service: Some(ServiceReference {
                namespace: service.namespace.clone(),
                name: service.name.clone(),
                path: Some("/convert".into()),
                port: Some(service.port),
            }),
            ..Default::default()
        });
    config.ca_bundle = Some(ByteString(ca.as_bytes().to_vec()));
    crd.spec.conversion != before
}

async fn keep_one<K>(
    api: Api<K>,
    name: String,
    mut ca: watch::Receiver<String>,
    update: impl Fn(&mut K, &str) -> bool + Send + 'static,
) where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + serde::Serialize
        + Send
        + Sync
        + 'static,
{
    let kind = K::kind(&());
    let events = watcher(
        api.clone(),
        watcher::Config::default().fields(&format!("metadata.name={name}")),
    )
    .default_backoff()
    .applied_objects();
    let mut events = std::pin::pin!(events);
    loop {
        let current = ca.borrow_and_update().clone();
        match api.get_opt(&name).await {
            Ok(Some(mut object)) => {
                if update(&mut object, &current) {
                    match api.replace(&name, &post_params(), &object).await {
                        Ok(_) => tracing::info!(%kind, %name, "caBundle updated"),
                        // A conflict means a newer version exists; its watch event retries.
                        Err(err) => tracing::warn!(%kind, %name, "updating the caBundle: {err}"),
                    }
                }
            }
            Ok(None) => tracing::debug!(%kind, %name, "not found yet; waiting for it"),
            Err(err) => tracing::warn!(%kind, %name, "reading: {err}"),
        }
        tokio::select! {
            event = events.next() => match event {
                Some(Err(err)) => tracing::debug!(%kind, %name, "watch: {err}"),
                Some(Ok(_)) => {}
                None => return,
            },
            changed = ca.changed() => if changed.is_err() { return },
        }
    }
}
