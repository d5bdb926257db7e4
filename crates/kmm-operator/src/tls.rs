//! HTTPS serving for the webhook and metrics servers: certificates (self-signed CA or files
//! mounted from a cert-manager Secret, reloaded when they change) and an accept loop that runs
//! an axum router over rustls with the ring provider.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use anyhow::{Context, anyhow};
use axum::Router;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::TcpListener;

/// PEM texts of a serving certificate chain, its key and the CA that signed it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertBundle {
    pub cert_pem: String,
    pub key_pem: String,
    /// CA certificate; empty when unknown (e.g. a mounted Secret without `ca.crt`).
    pub ca_pem: String,
}

/// A CA and its key, able to sign serving certificates.
pub struct SelfSignedCa {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for SelfSignedCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SelfSignedCa")
    }
}

/// Validity of generated CAs and serving certificates.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
pub const SERVING_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);

/// A day-granular date `delta` before or after now, in the form rcgen takes (its
/// `date_time_ymd` spares this crate a direct dependency on the `time` crate).
fn set_validity(params: &mut rcgen::CertificateParams, validity: Duration) -> anyhow::Result<()> {
    let (y, m, d) = date_from_now(Duration::from_secs(24 * 3600), false)?;
    params.not_before = rcgen::date_time_ymd(y, m, d);
    let (y, m, d) = date_from_now(validity, true)?;
    params.not_after = rcgen::date_time_ymd(y, m, d);
    Ok(())
}

fn date_from_now(delta: Duration, forward: bool) -> anyhow::Result<(i32, u8, u8)> {
    let now = jiff::Timestamp::now();
    let span = jiff::SignedDuration::try_from(delta)?;
    let at = if forward {
        now.checked_add(span)?
    } else {
        now.checked_sub(span)?
    };
    let date = at.to_zoned(jiff::tz::TimeZone::UTC).date();
    Ok((
        i32::from(date.year()),
        u8::try_from(date.month())?,
        u8::try_from(date.day())?,
    ))
}

/// Common name of every CA kmm-rs generates. Signing needs the issuer's name and key identifier,
/// which are rebuilt from this name and the CA key (no certificate parsing needed).
const CA_COMMON_NAME: &str = "kmm-operator-ca";

fn ca_params() -> anyhow::Result<rcgen::CertificateParams> {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, CA_COMMON_NAME);
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    Ok(params)
}

impl SelfSignedCa {
    /// A new ECDSA P-256 CA.
    pub fn generate() -> anyhow::Result<Self> {
        let key = rcgen::KeyPair::generate()?;
        let mut params = ca_params()?;
        set_validity(&mut params, CA_VALIDITY)?;
        let cert = params.self_signed(&key)?;
        Ok(Self {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A serving certificate for `names` (DNS names or IP addresses).
    pub fn issue(&self, names: &[String]) -> anyhow::Result<CertBundle> {
        let ca_key = rcgen::KeyPair::from_pem(&self.key_pem)?;
        let issuer = rcgen::Issuer::new(ca_params()?, ca_key);
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(names.to_vec())?;
        if let Some(first) = names.first() {
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, first.as_str());
        }
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        set_validity(&mut params, SERVING_VALIDITY)?;
        let cert = params.signed_by(&key, &issuer)?;
        Ok(CertBundle {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            ca_pem: self.cert_pem.clone(),
        })
    }
}

/// Parses a PEM chain and key into what rustls serves.
pub fn certified_key(bundle: &CertBundle) -> anyhow::Result<CertifiedKey> {
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(bundle.cert_pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|err| anyhow!("parsing the certificate PEM: {err}"))?;
    if chain.is_empty() {
        return Err(anyhow!("the certificate PEM holds no certificate"));
    }
    let key = PrivateKeyDer::from_pem_slice(bundle.key_pem.as_bytes())
        .map_err(|err| anyhow!("parsing the private key PEM: {err}"))?;
    let signing_key = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|err| anyhow!("unsupported private key: {err}"))?;
    Ok(CertifiedKey::new(chain, signing_key))
}

/// The certificate being served; swapped in place when the files change.
#[derive(Debug)]
pub struct CertResolver {
    current: RwLock<Arc<CertifiedKey>>,
}

impl CertResolver {
    pub fn new(bundle: &CertBundle) -> anyhow::Result<Arc<Self>> {
        Ok(Arc::new(Self {
            current: RwLock::new(Arc::new(certified_key(bundle)?)),
        }))
    }

    pub fn replace(&self, bundle: &CertBundle) -> anyhow::Result<()> {
        let key = Arc::new(certified_key(bundle)?);
        match self.current.write() {
            Ok(mut guard) => *guard = key,
            Err(poisoned) => *poisoned.into_inner() = key,
        }
        Ok(())
    }

    /// A rustls server configuration that serves this resolver's certificate (HTTP/1.1).
    pub fn server_config(self: &Arc<Self>) -> Arc<ServerConfig> {
        let mut config = ServerConfig::builder()
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(config)
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        match self.current.read() {
            Ok(guard) => Some(guard.clone()),
            Err(poisoned) => Some(poisoned.into_inner().clone()),
        }
    }
}

/// `tls.crt`, `tls.key` and (optional) `ca.crt` in a directory, as a kubelet mounts a
/// `kubernetes.io/tls` Secret made by cert-manager.
pub fn read_cert_dir(dir: &Path) -> anyhow::Result<CertBundle> {
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
    };
    Ok(CertBundle {
        cert_pem: read("tls.crt")?,
        key_pem: read("tls.key")?,
        ca_pem: read("ca.crt").unwrap_or_default(),
    })
}

fn newest_mtime(dir: &Path) -> Option<SystemTime> {
    ["tls.crt", "tls.key", "ca.crt"]
        .iter()
        .filter_map(|f| {
            std::fs::metadata(dir.join(f))
                .and_then(|m| m.modified())
                .ok()
        })
        .max()
}

/// Reloads the certificate from `dir` whenever its files change (cert-manager renewals), and
/// reports each new bundle on `updates`.
pub async fn watch_cert_dir(
    dir: PathBuf,
    resolver: Arc<CertResolver>,
    updates: tokio::sync::watch::Sender<CertBundle>,
    interval: Duration,
) {
    let mut seen = newest_mtime(&dir);
    loop {
        tokio::time::sleep(interval).await;
        let now = newest_mtime(&dir);
        if now == seen {
            continue;
        }
        match read_cert_dir(&dir).and_then(|b| resolver.replace(&b).map(|()| b)) {
            Ok(bundle) => {
                tracing::info!(dir = %dir.display(), "serving certificate reloaded");
                seen = now;
                let _ = updates.send(bundle);
            }
            // Files are swapped one by one; try again on the next tick.
            Err(err) => tracing::warn!(dir = %dir.display(), "reloading the certificate: {err:#}"),
        }
    }
}

/// Serves `router` on `listener` until `shutdown` resolves; over TLS when `tls` is given.
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<ServerConfig>>,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let Some(tls) = tls else {
        axum::serve(listener, router)
            .with_graceful_shutdown(shutdown)
            .await?;
        return Ok(());
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(err) => {
                    tracing::warn!("accepting a connection: {err}");
                    continue;
                }
            },
            _ = &mut shutdown => return Ok(()),
        };
        let acceptor = acceptor.clone();
        let service = TowerToHyperService::new(router.clone());
        tokio::spawn(async move {
            let stream = match tokio::time::timeout(
                Duration::from_secs(10),
                acceptor.accept(stream),
            )
            .await
            {
                Ok(Ok(stream)) => stream,
                Ok(Err(err)) => {
                    tracing::debug!(%peer, "TLS handshake failed: {err}");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            if let Err(err) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(%peer, "connection ended: {err}");
            }
        });
    }
}
