//! A real OCI registry on loopback for tests (DESIGN.md §4, tier 3): Debian's `docker-registry`
//! (installed with apt when missing) with its own config and storage directory, optionally with
//! htpasswd Basic auth and/or a self-signed TLS certificate. Each registry is stopped when its
//! [`Registry`] is dropped or the test binary exits, however it exits (a `setsid` watchdog holds a
//! pipe from the test process, as for the cluster).
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use kmm_testenv::registry::{Registry, RegistryOptions};
//! let registry = Registry::shared();                      // plain HTTP, no auth
//! let image = registry.push_image("kmm/kmod:6.1.0").await?; // "127.0.0.1:PORT/kmm/kmod:6.1.0"
//! let private = Registry::start(RegistryOptions::default().basic_auth("kmm", "s3cret"))?;
//! let secret = private.docker_config_secret("pull-secret"); // kubernetes.io/dockerconfigjson
//! # Ok(()) }
//! ```

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use base64::Engine as _;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::ObjectMeta;
use oci_client::client::{ClientConfig, ClientProtocol, Config, ImageLayer};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

/// How long the registry may take to listen.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// Where Debian installs the registry.
const REGISTRY_BIN: &str = "docker-registry";

/// How to run a registry.
#[derive(Debug, Clone, Default)]
pub struct RegistryOptions {
    /// htpasswd Basic auth with this user and password.
    pub basic_auth: Option<(String, String)>,
    /// Serve HTTPS with a fresh self-signed certificate for 127.0.0.1 (clients must skip
    /// verification, as `registryTLS.insecureSkipTLSVerify` does).
    pub tls: bool,
}

impl RegistryOptions {
    /// Requires Basic auth with `user` and `password`.
    pub fn basic_auth(mut self, user: &str, password: &str) -> Self {
        self.basic_auth = Some((user.to_owned(), password.to_owned()));
        self
    }

    /// Serves HTTPS with a self-signed certificate.
    pub fn tls(mut self) -> Self {
        self.tls = true;
        self
    }
}

/// A running registry.
#[derive(Debug)]
pub struct Registry {
    /// `127.0.0.1:<port>`: the registry part of image references.
    pub host: String,
    /// Config, storage, htpasswd, certificate and log (`registry.log`).
    pub dir: PathBuf,
    /// Time from spawning the process to the registry listening.
    pub startup: Duration,
    /// The options it runs with.
    pub options: RegistryOptions,
    _process: Child,
    /// Its stdin closing (drop or process exit) stops the registry and removes `dir`.
    _watchdog: Child,
}

static SHARED: OnceLock<Registry> = OnceLock::new();
static INSTALL: Mutex<()> = Mutex::new(());

impl Registry {
    /// The test binary's plain-HTTP registry without auth, started on first use. Panics with the
    /// reason if it cannot start.
    pub fn shared() -> &'static Registry {
        SHARED.get_or_init(|| match Registry::start(RegistryOptions::default()) {
            Ok(registry) => registry,
            Err(err) => panic!("the test registry did not start: {err:#}"),
        })
    }

    /// Starts a registry of its own on a free loopback port.
    pub fn start(options: RegistryOptions) -> anyhow::Result<Registry> {
        ensure_installed()?;
        // The port is picked by binding and releasing it; another process may grab it in
        // between, so a registry that exits before listening is retried on a new port.
        let mut last_error = None;
        for _ in 0..3 {
            match start_once(&options) {
                Ok(registry) => return Ok(registry),
                Err(err) => last_error = Some(err),
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow::anyhow!("registry did not start")))
    }

    /// `<host>/<repo_tag>`.
    pub fn image(&self, repo_tag: &str) -> String {
        format!("{}/{repo_tag}", self.host)
    }

    /// The Basic auth credentials, if any.
    pub fn auth(&self) -> RegistryAuth {
        match &self.options.basic_auth {
            Some((user, password)) => RegistryAuth::Basic(user.clone(), password.clone()),
            None => RegistryAuth::Anonymous,
        }
    }

    /// A `kubernetes.io/dockerconfigjson` Secret named `name` with this registry's credentials
    /// (`kmm-rs:none` when it has no auth).
    pub fn docker_config_secret(&self, name: &str) -> Secret {
        let (user, password) = self
            .options
            .basic_auth
            .clone()
            .unwrap_or_else(|| ("kmm-rs".to_owned(), "none".to_owned()));
        docker_config_secret(name, &self.host, &user, &password)
    }

    /// Pushes a small valid image (one uncompressed layer holding one file, an OCI config and an
    /// OCI manifest) as `<host>/<repo_tag>` and returns that reference.
    pub async fn push_image(&self, repo_tag: &str) -> anyhow::Result<String> {
        crate::install_crypto_provider();
        let image = self.image(repo_tag);
        let reference: Reference = image.parse().with_context(|| format!("parsing {image}"))?;
        let layer = ImageLayer::oci_v1(
            tar_with_file("kmm-rs-test-image", format!("{image}\n").as_bytes()),
            None,
        );
        let config = serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": [layer.sha256_digest()]},
        });
        let config = Config::oci_v1(serde_json::to_vec(&config)?, None);
        self.client()?
            .push(&reference, &[layer], config, &self.auth(), None)
            .await
            .with_context(|| format!("pushing {image}"))?;
        Ok(image)
    }

    /// An OCI client for this registry (HTTP, or HTTPS accepting its self-signed certificate).
    pub fn client(&self) -> anyhow::Result<Client> {
        crate::install_crypto_provider();
        Ok(Client::try_from(ClientConfig {
            protocol: if self.options.tls {
                ClientProtocol::Https
            } else {
                ClientProtocol::Http
            },
            accept_invalid_certificates: self.options.tls,
            ..ClientConfig::default()
        })?)
    }
}

/// A `kubernetes.io/dockerconfigjson` Secret named `name` holding `user:password` for `host`
/// (both as `auth` and as `username`/`password`, like `kubectl create secret docker-registry`).
pub fn docker_config_secret(name: &str, host: &str, user: &str, password: &str) -> Secret {
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    let config = serde_json::json!({
        "auths": {host: {"username": user, "password": password, "auth": auth}}
    });
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            ..ObjectMeta::default()
        },
        type_: Some("kubernetes.io/dockerconfigjson".to_owned()),
        data: Some(BTreeMap::from([(
            ".dockerconfigjson".to_owned(),
            ByteString(config.to_string().into_bytes()),
        )])),
        ..Secret::default()
    }
}

/// Installs `docker-registry` (and `htpasswd`) from Debian when missing; `apt-get update` only
/// if the first install fails.
fn ensure_installed() -> anyhow::Result<()> {
    let _guard = INSTALL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if which(REGISTRY_BIN) && which("htpasswd") {
        return Ok(());
    }
    let install = || {
        Command::new("apt-get")
            .args([
                "install",
                "-y",
                "--no-install-recommends",
                "docker-registry",
            ])
            .arg("apache2-utils")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(Stdio::null())
            .status()
    };
    if install().is_ok_and(|s| s.success()) {
        return Ok(());
    }
    let updated = Command::new("apt-get")
        .arg("update")
        .stdout(Stdio::null())
        .status()
        .context("running apt-get update")?;
    if !updated.success() || !install().is_ok_and(|s| s.success()) {
        bail!("cannot install docker-registry and apache2-utils with apt-get");
    }
    Ok(())
}

fn which(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn start_once(options: &RegistryOptions) -> anyhow::Result<Registry> {
    let port = free_port()?;
    let host = format!("127.0.0.1:{port}");
    let dir = std::env::temp_dir().join(format!("kmm-rs-registry-{}-{port}", std::process::id()));
    std::fs::create_dir_all(dir.join("data"))
        .with_context(|| format!("creating {}", dir.display()))?;
    let config = write_config(&dir, &host, options)?;

    let started = Instant::now();
    let mut process = Command::new(REGISTRY_BIN)
        .arg("serve")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {REGISTRY_BIN}"))?;
    // Started right after the registry so that nothing outlives the test process: when this
    // process exits (or the Registry is dropped), the pipe closes and the registry is stopped.
    let watchdog = Command::new("setsid")
        .arg("sh")
        .arg("-c")
        .arg(r#"read -r _ || true; kill "$0" 2>/dev/null; rm -rf "$1""#)
        .arg(process.id().to_string())
        .arg(&dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let watchdog = match watchdog {
        Ok(watchdog) => watchdog,
        Err(err) => {
            let _ = process.kill();
            return Err(err).context("starting the registry watchdog (setsid, sh)");
        }
    };

    let listening = follow_log(&mut process, &dir.join("registry.log"))?;
    match listening.recv_timeout(START_TIMEOUT) {
        Ok(true) => Ok(Registry {
            host,
            dir,
            startup: started.elapsed(),
            options: options.clone(),
            _process: process,
            _watchdog: watchdog,
        }),
        Ok(false) | Err(_) => {
            let _ = process.kill();
            let log = std::fs::read_to_string(dir.join("registry.log")).unwrap_or_default();
            bail!("docker-registry did not listen on {host}; its log:\n{log}")
        }
    }
}

/// Copies the registry's log to `log` on a thread; the receiver gets `true` once the registry
/// listens, `false` if it exits first.
fn follow_log(process: &mut Child, log: &Path) -> anyhow::Result<mpsc::Receiver<bool>> {
    let stderr = process
        .stderr
        .take()
        .context("the registry's stderr is not piped")?;
    let mut file =
        std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut told = false;
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            let _ = writeln!(file, "{line}");
            if !told && line.contains("msg=\"listening on ") {
                told = true;
                let _ = tx.send(true);
            }
        }
        if !told {
            let _ = tx.send(false);
        }
    });
    Ok(rx)
}

fn write_config(dir: &Path, host: &str, options: &RegistryOptions) -> anyhow::Result<PathBuf> {
    let mut config = format!(
        "version: 0.1\n\
         log:\n  level: info\n  accesslog:\n    disabled: true\n\
         storage:\n  filesystem:\n    rootdirectory: {data}\n  delete:\n    enabled: true\n\
         http:\n  addr: {host}\n  secret: kmm-rs-test-{pid}\n",
        data = dir.join("data").display(),
        pid = std::process::id(),
    );
    if options.tls {
        let certified = rcgen::generate_simple_self_signed(vec![
            "127.0.0.1".to_owned(),
            "localhost".to_owned(),
        ])
        .context("generating the registry's certificate")?;
        let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
        std::fs::write(&cert, certified.cert.pem())?;
        std::fs::write(&key, certified.signing_key.serialize_pem())?;
        config.push_str(&format!(
            "  tls:\n    certificate: {}\n    key: {}\n",
            cert.display(),
            key.display()
        ));
    }
    if let Some((user, password)) = &options.basic_auth {
        let output = Command::new("htpasswd")
            .args(["-nbB", user, password])
            .output()
            .context("running htpasswd")?;
        if !output.status.success() {
            bail!(
                "htpasswd failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let htpasswd = dir.join("htpasswd");
        std::fs::write(&htpasswd, &output.stdout)?;
        config.push_str(&format!(
            "auth:\n  htpasswd:\n    realm: kmm-rs-test\n    path: {}\n",
            htpasswd.display()
        ));
    }
    let path = dir.join("config.yml");
    std::fs::write(&path, config)?;
    Ok(path)
}

/// A ustar archive holding one regular file (mode 0644, mtime 0), so that layer digests are
/// reproducible.
fn tar_with_file(name: &str, content: &[u8]) -> Vec<u8> {
    let mut header = [0u8; 512];
    let put = |header: &mut [u8; 512], at: usize, bytes: &[u8]| {
        header[at..at + bytes.len()].copy_from_slice(bytes);
    };
    put(&mut header, 0, &name.as_bytes()[..name.len().min(100)]);
    put(&mut header, 100, b"0000644\0");
    put(&mut header, 108, b"0000000\0");
    put(&mut header, 116, b"0000000\0");
    put(
        &mut header,
        124,
        format!("{:011o}\0", content.len()).as_bytes(),
    );
    put(&mut header, 136, b"00000000000\0");
    put(&mut header, 148, b"        ");
    header[156] = b'0';
    put(&mut header, 257, b"ustar\0");
    put(&mut header, 263, b"00");
    let checksum: u32 = header.iter().map(|&b| u32::from(b)).sum();
    put(&mut header, 148, format!("{checksum:06o}\0 ").as_bytes());

    let mut tar = header.to_vec();
    tar.extend_from_slice(content);
    tar.resize(tar.len().next_multiple_of(512), 0);
    tar.resize(tar.len() + 1024, 0);
    tar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tar_is_readable_by_tar() {
        let tar = tar_with_file("hello.txt", b"hello\n");
        assert_eq!(tar.len(), 512 * 4);
        let dir = std::env::temp_dir().join(format!("kmm-rs-tar-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("layer.tar");
        std::fs::write(&path, &tar).unwrap();
        let out = Command::new("tar").arg("-xOf").arg(&path).output().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.stdout, b"hello\n");
    }
}
