//! The operator configuration file (`controller_config.yaml`, mounted from the ConfigMap
//! `kmm-operator-manager-config`): Go KMM's keys with Go's defaults, plus kmm-rs's own keys.
//!
//! Decoding is strict. Go KMM logs an unknown key or bad YAML and then runs with *all* defaults,
//! silently dropping the admin's settings; kmm-rs refuses to start instead and names the file and
//! the key (docs/configure.md, docs/compatibility.md).

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Deserialize;

use crate::controllers::{ControllerConfig, ImageCheckMode};

/// The whole file. Every section may be left out; every key has Go KMM's default.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OperatorConfig {
    /// `host:port` (host optional) of `/healthz`, `/livez` and `/readyz`. Default `:8081`.
    #[serde(default = "default_health_address")]
    pub health_probe_bind_address: String,
    /// Webhook port (Go KMM's older key; `webhook.port` is the newer one). Default 9443.
    pub webhook_port: Option<u16>,
    #[serde(default)]
    pub webhook: WebhookSection,
    #[serde(default)]
    pub leader_election: LeaderElectionSection,
    #[serde(default)]
    pub metrics: MetricsSection,
    #[serde(default)]
    pub job: JobSection,
    #[serde(default)]
    pub worker: WorkerSection,
    /// kmm-rs: how the existence of module images is checked.
    #[serde(default)]
    pub image_check: ImageCheckSection,
    /// kmm-rs: log format and filter.
    #[serde(default)]
    pub logging: LoggingSection,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WebhookSection {
    pub port: Option<u16>,
    /// Accepted for compatibility; kmm-rs's servers speak HTTP/1.1 only.
    #[serde(default, rename = "disableHTTP2")]
    pub disable_http2: Option<bool>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LeaderElectionSection {
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Name of the Lease in the operator namespace.
    #[serde(default = "default_resource_id", rename = "resourceID")]
    pub resource_id: String,
    /// kmm-rs: how long a Lease is valid without renewal (Go duration). Default `15s`.
    #[serde(default = "default_lease_duration", with = "go_duration")]
    pub lease_duration: Duration,
    /// kmm-rs: how long the leader keeps trying to renew before it gives up. Default `10s`.
    #[serde(default = "default_renew_deadline", with = "go_duration")]
    pub renew_deadline: Duration,
    /// kmm-rs: how often candidates retry and the leader renews. Default `2s`.
    #[serde(default = "default_retry_period", with = "go_duration")]
    pub retry_period: Duration,
}

impl Default for LeaderElectionSection {
    fn default() -> Self {
        Self {
            enabled: true,
            resource_id: default_resource_id(),
            lease_duration: default_lease_duration(),
            renew_deadline: default_renew_deadline(),
            retry_period: default_retry_period(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MetricsSection {
    /// `host:port` of `/metrics`; `"0"` disables the metrics server. Default `0.0.0.0:8443`.
    #[serde(default = "default_metrics_address")]
    pub bind_address: String,
    /// Serve `/metrics` over HTTPS with a self-signed certificate. Default true.
    #[serde(default = "yes")]
    pub secure_serving: bool,
    /// Require a bearer token allowed to `get` the non-resource URL `/metrics`
    /// (TokenReview + SubjectAccessReview). Default true.
    #[serde(default = "yes")]
    pub enable_authn_authz: bool,
    /// Accepted for compatibility; kmm-rs's servers speak HTTP/1.1 only.
    #[serde(default, rename = "disableHTTP2")]
    pub disable_http2: Option<bool>,
}

impl Default for MetricsSection {
    fn default() -> Self {
        Self {
            bind_address: default_metrics_address(),
            secure_serving: true,
            enable_authn_authz: true,
            disable_http2: None,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JobSection {
    /// How long successful build and sign pods are kept. Default `0s`.
    #[serde(default, with = "go_duration")]
    pub gc_delay: Duration,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkerSection {
    #[serde(default)]
    pub run_as_user: i64,
    #[serde(default = "default_selinux_type", rename = "seLinuxType")]
    pub selinux_type: String,
    /// `null` disables firmware support. Default `/lib/firmware`.
    #[serde(default = "default_firmware_host_path")]
    pub firmware_host_path: Option<String>,
}

impl Default for WorkerSection {
    fn default() -> Self {
        Self {
            run_as_user: 0,
            selinux_type: default_selinux_type(),
            firmware_host_path: default_firmware_host_path(),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ImageCheckSection {
    /// `registry` (default) or `pullPod`.
    #[serde(default)]
    pub mode: ImageCheckModeName,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum ImageCheckModeName {
    #[default]
    Registry,
    PullPod,
}

impl From<ImageCheckModeName> for ImageCheckMode {
    fn from(mode: ImageCheckModeName) -> Self {
        match mode {
            ImageCheckModeName::Registry => ImageCheckMode::Registry,
            ImageCheckModeName::PullPod => ImageCheckMode::PullPod,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoggingSection {
    /// `text` or `json`; the `--log-format` flag wins.
    pub format: Option<crate::logging::LogFormat>,
    /// A tracing filter such as `info` or `kmm_operator=debug,info`; `RUST_LOG` wins.
    pub level: Option<String>,
}

fn yes() -> bool {
    true
}
fn default_health_address() -> String {
    ":8081".into()
}
fn default_metrics_address() -> String {
    "0.0.0.0:8443".into()
}
fn default_resource_id() -> String {
    "kmm.sigs.x-k8s.io".into()
}
fn default_lease_duration() -> Duration {
    Duration::from_secs(15)
}
fn default_renew_deadline() -> Duration {
    Duration::from_secs(10)
}
fn default_retry_period() -> Duration {
    Duration::from_secs(2)
}
fn default_selinux_type() -> String {
    "spc_t".into()
}
fn default_firmware_host_path() -> Option<String> {
    Some("/lib/firmware".into())
}

impl OperatorConfig {
    /// Reads and validates the file. Any problem is an error naming the file.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the operator config file {}", path.display()))?;
        Self::parse(&text).with_context(|| {
            format!(
                "invalid operator config file {} (kmm-rs refuses to start rather than ignore it; see docs/configure.md)",
                path.display()
            )
        })
    }

    /// Parses and validates the YAML text of the file.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        // An empty file (or one holding only comments) means "all defaults".
        let config: Self = if text
            .lines()
            .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
        {
            Self::default_values()
        } else {
            serde_saphyr::from_str(text).map_err(|err| anyhow::anyhow!("{err}"))?
        };
        config.validate()?;
        Ok(config)
    }

    /// Go KMM's defaults (what `Default` would give if the derive knew the serde defaults).
    pub fn default_values() -> Self {
        Self {
            health_probe_bind_address: default_health_address(),
            webhook_port: None,
            webhook: WebhookSection::default(),
            leader_election: LeaderElectionSection::default(),
            metrics: MetricsSection::default(),
            job: JobSection::default(),
            worker: WorkerSection::default(),
            image_check: ImageCheckSection::default(),
            logging: LoggingSection::default(),
        }
    }

    fn validate(&self) -> anyhow::Result<()> {
        parse_bind_address(&self.health_probe_bind_address).context("healthProbeBindAddress")?;
        if self.metrics.bind_address != "0" {
            parse_bind_address(&self.metrics.bind_address).context("metrics.bindAddress")?;
        }
        if let (Some(old), Some(new)) = (self.webhook_port, self.webhook.port)
            && old != new
        {
            bail!("webhookPort ({old}) and webhook.port ({new}) disagree; set only one");
        }
        let le = &self.leader_election;
        if le.resource_id.is_empty() {
            bail!("leaderElection.resourceID must not be empty");
        }
        if le.retry_period.is_zero() || le.renew_deadline <= le.retry_period {
            bail!("leaderElection: retryPeriod must be > 0 and shorter than renewDeadline");
        }
        if le.lease_duration <= le.renew_deadline {
            bail!("leaderElection: leaseDuration must be longer than renewDeadline");
        }
        if self.worker.selinux_type.is_empty() {
            bail!("worker.seLinuxType must not be empty");
        }
        Ok(())
    }

    /// The webhook port: `webhook.port`, else `webhookPort`, else 9443.
    pub fn webhook_port(&self) -> u16 {
        self.webhook.port.or(self.webhook_port).unwrap_or(9443)
    }
}

/// Parses Go's `host:port` listen syntax, where an empty host means every interface.
pub fn parse_bind_address(address: &str) -> anyhow::Result<std::net::SocketAddr> {
    let full = match address.strip_prefix(':') {
        Some(port) => format!("0.0.0.0:{port}"),
        None => address.to_owned(),
    };
    full.parse()
        .with_context(|| format!("{address:?} is not a host:port listen address"))
}

/// The images and namespace that come from the environment (`OPERATOR_NAMESPACE`,
/// `RELATED_IMAGE_*`), already checked by clap.
#[derive(Debug, Clone)]
pub struct Environment {
    pub operator_namespace: String,
    pub worker_image: String,
    pub build_image: String,
    pub sign_image: String,
}

/// Combines the file and the environment into what the reconcilers need.
pub fn controller_config(
    file: &OperatorConfig,
    env: &Environment,
    image_check_override: Option<ImageCheckModeName>,
) -> ControllerConfig {
    ControllerConfig {
        operator_namespace: env.operator_namespace.clone(),
        worker_image: env.worker_image.clone(),
        build_image: env.build_image.clone(),
        sign_image: env.sign_image.clone(),
        firmware_host_path: file.worker.firmware_host_path.clone(),
        worker_run_as_user: file.worker.run_as_user,
        worker_selinux_type: file.worker.selinux_type.clone(),
        job_gc_delay: file.job.gc_delay,
        image_check: image_check_override.unwrap_or(file.image_check.mode).into(),
    }
}

/// Go `time.ParseDuration` syntax: a sequence of decimal numbers with units
/// (`ns`, `us`, `µs`, `ms`, `s`, `m`, `h`), e.g. `1h30m`, `0.5s`, `0`. Negative durations are
/// rejected (no KMM setting means anything by them).
pub mod go_duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        parse(&text).map_err(serde::de::Error::custom)
    }

    pub fn parse(text: &str) -> Result<Duration, String> {
        let bad = || format!("{text:?} is not a duration (examples: 0s, 90s, 1h30m)");
        let s = text.trim();
        if s == "0" {
            return Ok(Duration::ZERO);
        }
        if s.is_empty() || s.starts_with('-') {
            return Err(bad());
        }
        let s = s.strip_prefix('+').unwrap_or(s);
        let mut total = 0f64;
        let mut rest = s;
        while !rest.is_empty() {
            let number_len = rest
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .ok_or_else(bad)?;
            if number_len == 0 {
                return Err(bad());
            }
            let number: f64 = rest[..number_len].parse().map_err(|_| bad())?;
            rest = &rest[number_len..];
            let unit_len = rest
                .find(|c: char| c.is_ascii_digit() || c == '.')
                .unwrap_or(rest.len());
            let seconds_per_unit = match &rest[..unit_len] {
                "ns" => 1e-9,
                "us" | "µs" | "μs" => 1e-6,
                "ms" => 1e-3,
                "s" => 1.0,
                "m" => 60.0,
                "h" => 3600.0,
                _ => return Err(bad()),
            };
            rest = &rest[unit_len..];
            total += number * seconds_per_unit;
        }
        Duration::try_from_secs_f64(total).map_err(|_| bad())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_go_defaults() {
        let config = OperatorConfig::parse("# nothing\n").unwrap();
        assert_eq!(config, OperatorConfig::default_values());
        assert_eq!(config.health_probe_bind_address, ":8081");
        assert_eq!(config.metrics.bind_address, "0.0.0.0:8443");
        assert!(config.leader_election.enabled);
        assert_eq!(config.leader_election.resource_id, "kmm.sigs.x-k8s.io");
        assert_eq!(
            config.worker.firmware_host_path.as_deref(),
            Some("/lib/firmware")
        );
        assert_eq!(config.webhook_port(), 9443);
    }

    #[test]
    fn upstream_default_file_is_accepted() {
        // The file Go KMM's kustomize and the OpenShift docs ship.
        let text = r#"
healthProbeBindAddress: :8081
job:
  gcDelay: 0s
leaderElection:
  enabled: true
  resourceID: kmm.sigs.x-k8s.io
metrics:
  bindAddress: 0.0.0.0:8443
  disableHTTP2: true
  enableAuthnAuthz: true
  secureServing: true
webhook:
  disableHTTP2: true
  port: 9443
worker:
  runAsUser: 0
  seLinuxType: spc_t
  firmwareHostPath: /var/lib/firmware
"#;
        let config = OperatorConfig::parse(text).unwrap();
        assert_eq!(
            config.worker.firmware_host_path.as_deref(),
            Some("/var/lib/firmware")
        );
        assert_eq!(config.webhook_port(), 9443);
    }

    #[test]
    fn unknown_key_is_an_error_naming_the_key() {
        let err = OperatorConfig::parse("worker:\n  setFirmwareClassPath: /x\n").unwrap_err();
        let text = format!("{err:#}");
        assert!(text.contains("setFirmwareClassPath"), "{text}");
        let err = OperatorConfig::parse("bogus: 1\n").unwrap_err();
        assert!(format!("{err:#}").contains("bogus"), "{err:#}");
    }

    #[test]
    fn kmm_rs_keys_and_null_firmware() {
        let text = "imageCheck:\n  mode: pullPod\nworker:\n  firmwareHostPath: null\njob:\n  gcDelay: 1h30m\nlogging:\n  format: json\n";
        let config = OperatorConfig::parse(text).unwrap();
        assert_eq!(config.image_check.mode, ImageCheckModeName::PullPod);
        assert_eq!(config.worker.firmware_host_path, None);
        assert_eq!(config.job.gc_delay, Duration::from_secs(5400));
        let env = Environment {
            operator_namespace: "ns".into(),
            worker_image: "w:1".into(),
            build_image: "b:1".into(),
            sign_image: "s:1".into(),
        };
        let cc = controller_config(&config, &env, None);
        assert_eq!(cc.image_check, ImageCheckMode::PullPod);
        assert_eq!(cc.job_gc_delay, Duration::from_secs(5400));
        let cc = controller_config(&config, &env, Some(ImageCheckModeName::Registry));
        assert_eq!(cc.image_check, ImageCheckMode::Registry);
    }

    #[test]
    fn inconsistent_values_are_errors() {
        assert!(OperatorConfig::parse("healthProbeBindAddress: nope\n").is_err());
        assert!(OperatorConfig::parse("webhookPort: 1\nwebhook:\n  port: 2\n").is_err());
        assert!(OperatorConfig::parse("leaderElection:\n  leaseDuration: 5s\n").is_err());
        assert!(OperatorConfig::parse("job:\n  gcDelay: -1s\n").is_err());
    }

    #[test]
    fn go_durations() {
        use go_duration::parse;
        assert_eq!(parse("0").unwrap(), Duration::ZERO);
        assert_eq!(parse("0s").unwrap(), Duration::ZERO);
        assert_eq!(parse("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse("2m3s").unwrap(), Duration::from_secs(123));
        assert_eq!(parse("300ms").unwrap(), Duration::from_millis(300));
        assert!(parse("5").is_err());
        assert!(parse("5x").is_err());
        assert!(parse("").is_err());
    }

    #[test]
    fn bind_addresses() {
        assert_eq!(parse_bind_address(":8081").unwrap().port(), 8081);
        assert_eq!(
            parse_bind_address("127.0.0.1:9").unwrap().to_string(),
            "127.0.0.1:9"
        );
    }
}
