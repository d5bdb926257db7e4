//! `kmm-operator run`: the manager. Reads the configuration, serves probes and metrics, takes
//! part in leader election and, only while it leads, runs the reconcilers.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::admin::{self, MetricsState, ProbeState};
use crate::config::{self, Environment, ImageCheckModeName, OperatorConfig};
use crate::leader::{LeaderElector, Timings};
use crate::logging::LogFormat;
use crate::metrics::{self, Metrics};
use crate::tls::{CertResolver, SelfSignedCa};
use crate::{controllers, shutdown};

/// Flags of `kmm-operator run`; each one can also be set through the environment variable
/// shown in `--help`. Flags beat the config file.
#[derive(Args, Debug)]
pub struct RunArgs {
    /// The operator config file (`controller_config.yaml` from the ConfigMap
    /// `kmm-operator-manager-config`). Without it, Go KMM's defaults apply.
    #[arg(long, env = "KMM_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Namespace the operator runs in (Lease, ConfigMaps, build pods).
    #[arg(long, env = "OPERATOR_NAMESPACE", value_parser = non_empty)]
    pub operator_namespace: String,
    /// Image of the worker pods that load and unload modules.
    #[arg(long, env = "RELATED_IMAGE_WORKER", value_parser = non_empty)]
    pub worker_image: String,
    /// Image of the kaniko build pods.
    #[arg(
        long,
        env = "RELATED_IMAGE_BUILD",
        default_value = "gcr.io/kaniko-project/executor:latest"
    )]
    pub build_image: String,
    /// Image holding `sign-file`, for sign pods.
    #[arg(long, env = "RELATED_IMAGE_SIGN", default_value = "")]
    pub sign_image: String,
    /// How module images are checked: `registry` or `pull-pod` (overrides `imageCheck.mode`).
    #[arg(long, env = "KMM_IMAGE_CHECK", value_enum)]
    pub image_check: Option<ImageCheckFlag>,
    /// Overrides `healthProbeBindAddress`.
    #[arg(long, env = "KMM_HEALTH_PROBE_BIND_ADDRESS")]
    pub health_probe_bind_address: Option<String>,
    /// Overrides `metrics.bindAddress` (`0` disables the metrics server).
    #[arg(long, env = "KMM_METRICS_BIND_ADDRESS")]
    pub metrics_bind_address: Option<String>,
    /// Overrides `leaderElection.enabled`.
    #[arg(long, env = "KMM_LEADER_ELECT")]
    pub leader_elect: Option<bool>,
    /// This process's name in the Lease (default: `<pod name or hostname>_<random>`).
    #[arg(long, env = "KMM_LEADER_ELECTION_IDENTITY")]
    pub leader_election_identity: Option<String>,
    /// Overrides `logging.format`.
    #[arg(long, env = "KMM_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum ImageCheckFlag {
    Registry,
    PullPod,
}

pub fn non_empty(s: &str) -> Result<String, String> {
    if s.trim().is_empty() {
        Err("must not be empty".into())
    } else {
        Ok(s.to_owned())
    }
}

/// Reads the config file if one is given, else Go KMM's defaults.
pub fn load_config(path: Option<&std::path::Path>) -> anyhow::Result<OperatorConfig> {
    match path {
        Some(path) => OperatorConfig::load(path),
        None => Ok(OperatorConfig::default_values()),
    }
}

/// Resolves when `shutdown` turns true.
pub async fn wait_for_shutdown(mut shutdown: watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let mut file = load_config(args.config.as_deref())?;
    crate::logging::init(
        args.log_format.or(file.logging.format).unwrap_or_default(),
        file.logging.level.as_deref(),
    );
    if let Some(address) = &args.health_probe_bind_address {
        file.health_probe_bind_address = address.clone();
    }
    if let Some(address) = &args.metrics_bind_address {
        file.metrics.bind_address = address.clone();
    }
    if let Some(enabled) = args.leader_elect {
        file.leader_election.enabled = enabled;
    }
    let env = Environment {
        operator_namespace: args.operator_namespace.clone(),
        worker_image: args.worker_image.clone(),
        build_image: args.build_image.clone(),
        sign_image: args.sign_image.clone(),
    };
    let image_check = args.image_check.map(|flag| match flag {
        ImageCheckFlag::Registry => ImageCheckModeName::Registry,
        ImageCheckFlag::PullPod => ImageCheckModeName::PullPod,
    });
    let controller_config = config::controller_config(&file, &env, image_check);
    let identity = args
        .leader_election_identity
        .clone()
        .unwrap_or_else(crate::leader::default_identity);
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        namespace = %env.operator_namespace,
        identity = %identity,
        config = ?args.config,
        "starting kmm-operator"
    );

    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API")?;

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let shutdown_tx = Arc::new(shutdown_tx);
    tokio::spawn({
        let shutdown_tx = shutdown_tx.clone();
        async move {
            shutdown::signal().await;
            let _ = shutdown_tx.send(true);
        }
    });

    // Readiness: the metrics caches have synced and, on the leader, the reconcilers' caches too.
    let (caches_tx, caches_rx) = watch::channel(false);
    let (leader_tx, leader_rx) = watch::channel(false);
    let (controllers_tx, controllers_rx) = watch::channel(false);
    let (ready_tx, ready_rx) = watch::channel(false);
    tokio::spawn(aggregate_readiness(
        caches_rx,
        leader_rx.clone(),
        controllers_rx,
        ready_tx,
    ));

    let mut metrics = Metrics::new();
    let gauges = metrics::kmm_gauges(client.clone(), &mut metrics, caches_tx);
    tokio::spawn(gauges);
    let metrics = Arc::new(metrics);
    tokio::spawn(mirror_leader_gauge(leader_rx.clone(), metrics.clone()));

    // Probes.
    let health_address = config::parse_bind_address(&file.health_probe_bind_address)?;
    let health_listener = TcpListener::bind(health_address)
        .await
        .with_context(|| format!("listening on {health_address} (healthProbeBindAddress)"))?;
    tracing::info!(address = %health_listener.local_addr()?, "serving probes");
    let probes = admin::probe_router(ProbeState {
        ready: ready_rx,
        leader: file.leader_election.enabled.then(|| leader_rx.clone()),
        identity: identity.clone(),
    });
    let mut servers = tokio::task::JoinSet::new();
    servers.spawn(crate::tls::serve(
        health_listener,
        None,
        probes,
        wait_for_shutdown(shutdown_rx.clone()),
    ));

    // Metrics.
    if file.metrics.bind_address != "0" {
        let address = config::parse_bind_address(&file.metrics.bind_address)?;
        let listener = TcpListener::bind(address)
            .await
            .with_context(|| format!("listening on {address} (metrics.bindAddress)"))?;
        let tls = if file.metrics.secure_serving {
            // Like controller-runtime: a throwaway self-signed certificate; scrapers either skip
            // verification or are given a certificate through a Secret in front of this.
            let ca = SelfSignedCa::generate()?;
            let bundle = ca.issue(&["kmm-operator-metrics".to_owned()])?;
            Some(CertResolver::new(&bundle)?.server_config())
        } else {
            None
        };
        tracing::info!(
            address = %listener.local_addr()?,
            https = file.metrics.secure_serving,
            authn_authz = file.metrics.enable_authn_authz,
            "serving metrics"
        );
        let state = MetricsState {
            metrics: metrics.clone(),
            authorizer: file.metrics.enable_authn_authz.then(|| client.clone()),
        };
        servers.spawn(crate::tls::serve(
            listener,
            tls,
            admin::metrics_router(state),
            wait_for_shutdown(shutdown_rx.clone()),
        ));
    }

    // The reconcilers, only on the leader.
    let lead = {
        let client = client.clone();
        let reconcile_metrics = metrics.reconcile.clone();
        move || controllers::run_with(client, controller_config, controllers_tx, reconcile_metrics)
    };
    let outcome = if file.leader_election.enabled {
        let le = &file.leader_election;
        let elector = LeaderElector::new(
            client.clone(),
            &env.operator_namespace,
            &le.resource_id,
            identity,
            Timings {
                lease_duration: le.lease_duration,
                renew_deadline: le.renew_deadline,
                retry_period: le.retry_period,
            },
        );
        elector
            .run(leader_tx, wait_for_shutdown(shutdown_rx.clone()), lead)
            .await
    } else {
        tracing::warn!("leader election is disabled: run only one replica");
        let _ = leader_tx.send(true);
        tokio::select! {
            result = lead() => result.context("the controllers stopped"),
            _ = wait_for_shutdown(shutdown_rx.clone()) => Ok(()),
        }
    };
    // Whatever ended the run, stop serving; a lost leadership is still an error exit so that
    // the kubelet restarts the process with clean state.
    let _ = shutdown_tx.send(true);
    servers.abort_all();
    while servers.join_next().await.is_some() {}
    tracing::info!("kmm-operator stopped");
    outcome
}

async fn aggregate_readiness(
    mut caches: watch::Receiver<bool>,
    mut leader: watch::Receiver<bool>,
    mut controllers: watch::Receiver<bool>,
    ready: watch::Sender<bool>,
) {
    // A sender that is gone (its task finished) keeps its last value; only when all three are gone
    // is there nothing left to follow. Returning on the first closed channel would freeze
    // readiness at whatever it was then.
    let (mut caches_open, mut leader_open, mut controllers_open) = (true, true, true);
    loop {
        let now = *caches.borrow_and_update()
            && (!*leader.borrow_and_update() || *controllers.borrow_and_update());
        ready.send_if_modified(|r| std::mem::replace(r, now) != now);
        if !(caches_open || leader_open || controllers_open) {
            return;
        }
        tokio::select! {
            r = caches.changed(), if caches_open => caches_open = r.is_ok(),
            r = leader.changed(), if leader_open => leader_open = r.is_ok(),
            r = controllers.changed(), if controllers_open => controllers_open = r.is_ok(),
        }
    }
}

async fn mirror_leader_gauge(mut leader: watch::Receiver<bool>, metrics: Arc<Metrics>) {
    loop {
        metrics.leader.set(i64::from(*leader.borrow_and_update()));
        if leader.changed().await.is_err() {
            return;
        }
    }
}
