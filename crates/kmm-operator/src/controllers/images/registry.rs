//! Image existence straight from the registry: an OCI manifest HEAD (GET when the registry sends
//! no digest header) with the MIC's pull secret and the image's `registryTLS`, and the pure
//! parts around it: the registry host of an image reference, the credentials for that host in a
//! dockerconfigjson Secret, and what a registry error means.

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine as _;
use k8s_openapi::api::core::v1::Secret;
use kmm_api::v1beta1::TlsOptions;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

use super::plan::Finding;

/// Docker Hub's canonical host, which image references without a registry part resolve to.
pub const DOCKER_HUB: &str = "docker.io";

/// Time allowed for the TCP (and TLS) connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Time allowed between reads of a response.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed for one whole check (token exchange and manifest request).
const CHECK_TIMEOUT: Duration = Duration::from_secs(20);

/// The registry host of an image reference, as Docker reads it: the first path component when it
/// contains `.` or `:` or is `localhost`, otherwise Docker Hub. Lower-cased; the port is kept.
pub fn registry_host(image: &str) -> String {
    match image.split_once('/') {
        Some((first, _)) if first.contains(['.', ':']) || first == "localhost" => {
            canonical_host(first)
        }
        _ => DOCKER_HUB.to_owned(),
    }
}

/// A host as written in a docker config `auths` key (`https://index.docker.io/v1/`,
/// `registry.example.com:5000`, `http://host/path` ...), reduced to what [`registry_host`]
/// returns for images of that registry.
pub fn config_key_host(key: &str) -> String {
    let without_scheme = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let host = without_scheme.split('/').next().unwrap_or_default();
    canonical_host(host)
}

fn canonical_host(host: &str) -> String {
    let host = host.to_ascii_lowercase();
    match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            DOCKER_HUB.to_owned()
        }
        _ => host,
    }
}

/// Credentials per registry host, from a `kubernetes.io/dockerconfigjson` (key
/// `.dockerconfigjson`, `{"auths": {...}}`) or legacy `kubernetes.io/dockercfg` (key
/// `.dockercfg`, the `auths` map itself) Secret. An entry gives either `auth`
/// (base64 of `user:password`) or `username` and `password`; `registrytoken` is used as a bearer
/// token. Entries without usable credentials are skipped.
pub fn parse_docker_config(secret: &Secret) -> Result<BTreeMap<String, RegistryAuth>, String> {
    let data = secret.data.as_ref();
    let (raw, nested) = match (
        data.and_then(|d| d.get(".dockerconfigjson")),
        data.and_then(|d| d.get(".dockercfg")),
    ) {
        (Some(raw), _) => (raw, true),
        (None, Some(raw)) => (raw, false),
        (None, None) => return Err("has neither .dockerconfigjson nor .dockercfg".to_owned()),
    };
    let json: serde_json::Value = serde_json::from_slice(&raw.0)
        .map_err(|err| format!("is not a valid docker config: {err}"))?;
    let auths = if nested { &json["auths"] } else { &json };
    let auths = auths
        .as_object()
        .ok_or_else(|| "has no `auths` object".to_owned())?;
    let mut by_host = BTreeMap::new();
    for (key, entry) in auths {
        if let Some(auth) = entry_auth(entry) {
            // The first entry of a host wins, as in Docker's keychain.
            by_host.entry(config_key_host(key)).or_insert(auth);
        }
    }
    Ok(by_host)
}

fn entry_auth(entry: &serde_json::Value) -> Option<RegistryAuth> {
    let field = |name: &str| entry.get(name).and_then(|v| v.as_str()).unwrap_or_default();
    if let Some((user, password)) = base64::engine::general_purpose::STANDARD
        .decode(field("auth").trim())
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .and_then(|text| {
            text.split_once(':')
                .map(|(u, p)| (u.to_owned(), p.to_owned()))
        })
    {
        return Some(RegistryAuth::Basic(user, password));
    }
    if !field("username").is_empty() {
        return Some(RegistryAuth::Basic(
            field("username").to_owned(),
            field("password").to_owned(),
        ));
    }
    if !field("registrytoken").is_empty() {
        return Some(RegistryAuth::Bearer(field("registrytoken").to_owned()));
    }
    None
}

/// The credentials of one MIC, plus what went wrong reading them (reported with a failed check).
#[derive(Default)]
pub struct Credentials {
    /// Auth per registry host.
    pub by_host: BTreeMap<String, RegistryAuth>,
    /// Why the Secret could not be used, if it could not.
    pub problem: Option<String>,
}

impl Credentials {
    /// The auth to send to the registry of `image` (anonymous when none matches).
    pub fn for_image(&self, image: &str) -> RegistryAuth {
        self.by_host
            .get(&registry_host(image))
            .cloned()
            .unwrap_or(RegistryAuth::Anonymous)
    }
}

/// What a failed manifest request means. Found-ness is decided by error codes and HTTP status:
/// 404 / MANIFEST_UNKNOWN / NAME_UNKNOWN is a missing image; 401 / 403 / UNAUTHORIZED / DENIED is
/// a credentials problem; a failed connection is unreachable or TLS; everything else is a
/// registry error (transient).
pub fn classify(err: &OciDistributionError) -> (Finding, String) {
    let message = error_chain(err);
    let finding = match err {
        OciDistributionError::RegistryError { envelope, .. } => {
            let codes = || envelope.errors.iter().map(|e| &e.code);
            if codes().any(|c| {
                matches!(
                    c,
                    OciErrorCode::ManifestUnknown
                        | OciErrorCode::NameUnknown
                        | OciErrorCode::NotFound
                )
            }) {
                Finding::Missing
            } else if codes()
                .any(|c| matches!(c, OciErrorCode::Unauthorized | OciErrorCode::Denied))
            {
                Finding::Unauthorized
            } else {
                Finding::RegistryError
            }
        }
        OciDistributionError::ServerError { code, message, .. } => match code {
            404 => Finding::Missing,
            401 | 403 => Finding::Unauthorized,
            // What Go's net/http answers to plain HTTP on a TLS port.
            400 if message.contains("HTTP request to an HTTPS server") => Finding::Tls,
            _ => Finding::RegistryError,
        },
        OciDistributionError::ImageManifestNotFoundError(_) => Finding::Missing,
        OciDistributionError::UnauthorizedError { .. }
        | OciDistributionError::AuthenticationFailure(_) => Finding::Unauthorized,
        OciDistributionError::RequestError(source) => {
            if is_tls_error(source) {
                Finding::Tls
            } else {
                Finding::Unreachable
            }
        }
        _ => Finding::RegistryError,
    };
    if finding == Finding::Tls {
        return (finding, format!("{message} ({TLS_HINT})"));
    }
    (finding, message)
}

/// What a user can do about a TLS error.
const TLS_HINT: &str = "for a plain-HTTP registry set registryTLS.insecure; \
                        for an untrusted certificate set registryTLS.insecureSkipTLSVerify";

/// Whether a TLS failure is somewhere in the causes of `err` (rustls errors travel inside
/// `std::io::Error`, whose `source()` skips them, hence the `get_ref`).
fn is_tls_error(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(err);
    while let Some(e) = next {
        if e.is::<rustls::Error>() {
            return true;
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && io.get_ref().is_some_and(|inner| is_tls_error(inner))
        {
            return true;
        }
        next = e.source();
    }
    false
}

/// `err` and its causes joined with `: `, without repeats.
fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(err);
    while let Some(e) = next {
        let text = e.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        next = e.source();
    }
    parts.join(": ")
}

/// An OCI client for one TLS setting. A fresh client per MIC pass: oci-client remembers the
/// first credentials it saw for a registry, and MICs must not share theirs.
pub fn client_for(tls: &TlsOptions) -> Result<Client, OciDistributionError> {
    Client::try_from(ClientConfig {
        protocol: if tls.insecure {
            ClientProtocol::Http
        } else {
            ClientProtocol::Https
        },
        accept_invalid_certificates: tls.insecure_skip_tls_verify,
        connect_timeout: Some(CONNECT_TIMEOUT),
        read_timeout: Some(READ_TIMEOUT),
        user_agent: concat!("kmm-rs/", env!("CARGO_PKG_VERSION")),
        ..ClientConfig::default()
    })
}

/// Checks one image with `client`: Exists with the manifest digest as message, or the finding
/// of the error.
pub async fn check_image(client: &Client, image: &str, auth: &RegistryAuth) -> (Finding, String) {
    let reference: Reference = match image.parse() {
        Ok(reference) => reference,
        Err(err) => return (Finding::InvalidImage, format!("{image}: {err}")),
    };
    match tokio::time::timeout(
        CHECK_TIMEOUT,
        client.fetch_manifest_digest(&reference, auth),
    )
    .await
    {
        Ok(Ok(digest)) => (Finding::Exists, digest),
        Ok(Err(err)) => classify(&err),
        Err(_) => (
            Finding::Unreachable,
            format!(
                "no answer from {} within {CHECK_TIMEOUT:?}",
                registry_host(image)
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;
    use oci_client::errors::{OciEnvelope, OciError};

    #[test]
    fn registry_host_follows_docker_rules() {
        let table = [
            ("busybox", "docker.io"),
            ("busybox:1.36", "docker.io"),
            ("library/busybox", "docker.io"),
            ("user/repo:tag", "docker.io"),
            ("docker.io/library/busybox", "docker.io"),
            ("index.docker.io/user/repo", "docker.io"),
            ("quay.io/org/kmod:6.1", "quay.io"),
            ("Quay.IO/org/kmod", "quay.io"),
            ("localhost/kmod:1", "localhost"),
            ("localhost:5000/kmod:1", "localhost:5000"),
            ("127.0.0.1:5000/kmm/kmod:6.1.0", "127.0.0.1:5000"),
            ("registry:5000/kmod", "registry:5000"),
            ("registry/kmod", "docker.io"),
            ("[::1]:5000/kmod", "[::1]:5000"),
            ("example.com/a/b/c@sha256:abcd", "example.com"),
        ];
        for (image, host) in table {
            assert_eq!(registry_host(image), host, "{image}");
        }
    }

    #[test]
    fn config_keys_reduce_to_hosts() {
        let table = [
            ("https://index.docker.io/v1/", "docker.io"),
            ("registry-1.docker.io", "docker.io"),
            ("docker.io", "docker.io"),
            ("quay.io", "quay.io"),
            ("https://quay.io", "quay.io"),
            ("http://127.0.0.1:5000/v2/", "127.0.0.1:5000"),
            ("Registry.Example.com:443", "registry.example.com:443"),
        ];
        for (key, host) in table {
            assert_eq!(config_key_host(key), host, "{key}");
        }
    }

    fn secret(key: &str, json: serde_json::Value) -> Secret {
        Secret {
            data: Some(BTreeMap::from([(
                key.to_owned(),
                ByteString(serde_json::to_vec(&json).unwrap_or_default()),
            )])),
            ..Secret::default()
        }
    }

    fn basic(user: &str, password: &str) -> String {
        format!("{:?}", RegistryAuth::Basic(user.into(), password.into()))
    }

    fn debug_map(m: &BTreeMap<String, RegistryAuth>) -> Vec<(String, String)> {
        m.iter()
            .map(|(k, v)| (k.clone(), format!("{v:?}")))
            .collect()
    }

    #[test]
    fn docker_config_entries() {
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let s = secret(
            ".dockerconfigjson",
            serde_json::json!({"auths": {
                "https://index.docker.io/v1/": {"auth": b64("hub:pw:with:colons")},
                "127.0.0.1:5000": {"username": "u", "password": "p"},
                "quay.io": {"auth": b64("quay:first")},
                "https://quay.io/v1/": {"auth": b64("quay:second")},
                "token.example.com": {"registrytoken": "tok"},
                "empty.example.com": {},
                "garbage.example.com": {"auth": "%%%"},
            }}),
        );
        let parsed = parse_docker_config(&s).unwrap();
        let got = debug_map(&parsed);
        let hosts: Vec<&str> = got.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            hosts,
            [
                "127.0.0.1:5000",
                "docker.io",
                "quay.io",
                "token.example.com"
            ]
        );
        assert_eq!(got[0].1, basic("u", "p"));
        assert_eq!(got[1].1, basic("hub", "pw:with:colons"));
        // serde_json keeps keys sorted, so "https://quay.io/v1/" comes before "quay.io".
        assert_eq!(got[2].1, basic("quay", "second"));
        assert!(matches!(
            parsed["token.example.com"],
            RegistryAuth::Bearer(_)
        ));

        let creds = Credentials {
            by_host: parsed,
            problem: None,
        };
        assert_eq!(
            format!("{:?}", creds.for_image("127.0.0.1:5000/kmm/kmod:1")),
            basic("u", "p")
        );
        assert_eq!(
            format!("{:?}", creds.for_image("busybox")),
            basic("hub", "pw:with:colons")
        );
        assert!(matches!(
            creds.for_image("ghcr.io/x/y"),
            RegistryAuth::Anonymous
        ));
    }

    #[test]
    fn legacy_dockercfg_and_bad_secrets() {
        let s = secret(
            ".dockercfg",
            serde_json::json!({"quay.io": {"username": "u", "password": "p"}}),
        );
        assert_eq!(
            debug_map(&parse_docker_config(&s).unwrap()),
            [("quay.io".to_owned(), basic("u", "p"))]
        );
        let no_key = secret("other", serde_json::json!({}));
        assert!(
            parse_docker_config(&no_key)
                .unwrap_err()
                .contains("neither")
        );
        let no_auths = secret(".dockerconfigjson", serde_json::json!({"x": 1}));
        assert!(
            parse_docker_config(&no_auths)
                .unwrap_err()
                .contains("auths")
        );
        let mut not_json = no_key.clone();
        not_json.data = Some(BTreeMap::from([(
            ".dockerconfigjson".to_owned(),
            ByteString(b"{".to_vec()),
        )]));
        assert!(
            parse_docker_config(&not_json)
                .unwrap_err()
                .contains("not a valid docker config")
        );
    }

    fn envelope(code: OciErrorCode) -> OciDistributionError {
        OciDistributionError::RegistryError {
            envelope: OciEnvelope {
                errors: vec![OciError {
                    code,
                    message: "said the registry".into(),
                    detail: serde_json::Value::Null,
                }],
            },
            url: "http://r/v2/a/manifests/1".into(),
        }
    }

    fn server(code: u16, message: &str) -> OciDistributionError {
        OciDistributionError::ServerError {
            code,
            url: "http://r/v2/a/manifests/1".into(),
            message: message.into(),
        }
    }

    #[test]
    fn registry_errors_are_classified() {
        let table = [
            (envelope(OciErrorCode::ManifestUnknown), Finding::Missing),
            (envelope(OciErrorCode::NameUnknown), Finding::Missing),
            (envelope(OciErrorCode::NotFound), Finding::Missing),
            (envelope(OciErrorCode::Unauthorized), Finding::Unauthorized),
            (envelope(OciErrorCode::Denied), Finding::Unauthorized),
            (
                envelope(OciErrorCode::Toomanyrequests),
                Finding::RegistryError,
            ),
            (
                envelope(OciErrorCode::Other("WEIRD".into())),
                Finding::RegistryError,
            ),
            (server(404, ""), Finding::Missing),
            (server(401, ""), Finding::Unauthorized),
            (server(403, "forbidden"), Finding::Unauthorized),
            (server(500, "oops"), Finding::RegistryError),
            (server(429, ""), Finding::RegistryError),
            (
                server(400, "Client sent an HTTP request to an HTTPS server.\n"),
                Finding::Tls,
            ),
            (server(400, "bad request"), Finding::RegistryError),
            (
                OciDistributionError::UnauthorizedError { url: "u".into() },
                Finding::Unauthorized,
            ),
            (
                OciDistributionError::AuthenticationFailure("no".into()),
                Finding::Unauthorized,
            ),
            (
                OciDistributionError::ImageManifestNotFoundError("x".into()),
                Finding::Missing,
            ),
            (
                OciDistributionError::RegistryNoDigestError,
                Finding::RegistryError,
            ),
        ];
        for (err, finding) in table {
            let (got, message) = classify(&err);
            assert_eq!(got, finding, "{err:?}");
            assert!(!message.is_empty());
        }
        let (_, message) = classify(&envelope(OciErrorCode::ManifestUnknown));
        assert!(message.contains("said the registry"), "{message}");
    }

    #[test]
    fn tls_errors_are_found_inside_io_errors() {
        let tls = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, tls);
        assert!(is_tls_error(&io));
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert!(!is_tls_error(&refused));
    }
}
