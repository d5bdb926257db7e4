//! The real Kubernetes control plane for kmm-rs tests: kube-apiserver, etcd,
//! kube-controller-manager, kube-scheduler and kwok (simulated nodes and pods), built from Go
//! modules by `testenv/build.sh` and run by `testenv/cluster.sh`.
//!
//! One cluster per test binary, started on first use with the kmm-rs CRDs installed, and stopped
//! when the test binary exits however it exits (a watchdog process holds the read end of a pipe
//! whose write end dies with the test process). Each test works in its own namespace and with
//! its own node names.

mod nodes;
pub mod registry;
mod wait;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Context, bail};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};

pub use nodes::{FakeNode, reboot_node, set_kernel};
pub use registry::{Registry, RegistryOptions, docker_config_secret};
pub use wait::{WAIT_TIMEOUT, wait_for};

/// Pod annotations that tell kwok how a simulated pod ends (see `testenv/kwok/stages.yaml`).
pub mod outcome {
    /// `fail`, `image-pull-backoff` or `hold`; absent means the pod succeeds or keeps running.
    pub const OUTCOME: &str = "kmm-rs.test/outcome";
    /// Termination message of a failing pod.
    pub const MESSAGE: &str = "kmm-rs.test/message";
    /// Exit code of a failing pod.
    pub const EXIT_CODE: &str = "kmm-rs.test/exit-code";
    /// How long the pod runs before it ends (Go duration, e.g. `3s`).
    pub const RUN_DURATION: &str = "kmm-rs.test/run-duration";
    /// Value of [`OUTCOME`]: the pod fails.
    pub const FAIL: &str = "fail";
    /// Value of [`OUTCOME`]: the pod stays Pending in ImagePullBackOff.
    pub const IMAGE_PULL_BACKOFF: &str = "image-pull-backoff";
    /// Value of [`OUTCOME`]: the pod keeps running.
    pub const HOLD: &str = "hold";
    /// A container image containing this behaves as [`IMAGE_PULL_BACKOFF`] without an
    /// annotation (for pods that controllers create, such as image pull pods).
    pub const MISSING_IMAGE_MARKER: &str = "/kmm-rs-test-missing/";
}

/// A running test cluster.
#[derive(Debug)]
pub struct TestEnv {
    /// The cluster's state directory.
    pub dir: PathBuf,
    /// Admin kubeconfig (group system:masters).
    pub kubeconfig: PathBuf,
    /// Directory of the control-plane binaries (kubectl included).
    pub bin_dir: PathBuf,
    /// Seconds `cluster.sh up` took.
    pub startup_seconds: f64,
    /// Keeps the watchdog's stdin open for as long as the test process lives.
    _watchdog: Child,
}

static ENV: OnceLock<TestEnv> = OnceLock::new();
static COUNTER: AtomicUsize = AtomicUsize::new(0);

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

impl TestEnv {
    /// The test binary's cluster, started on first use. Panics with the reason (and the end of
    /// the failing component's log, printed by `cluster.sh`) if it cannot start.
    pub fn get() -> &'static TestEnv {
        ENV.get_or_init(|| match start() {
            Ok(env) => env,
            Err(err) => panic!("the test control plane did not start: {err:#}"),
        })
    }

    /// A client for the admin user. Create one per test: a client belongs to the async runtime
    /// it was created on.
    pub async fn client(&self) -> anyhow::Result<kube::Client> {
        install_crypto_provider();
        let kubeconfig = Kubeconfig::read_from(&self.kubeconfig)?;
        let config =
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
        Ok(kube::Client::try_from(config)?)
    }

    /// Creates a fresh namespace named after `prefix` and returns its name.
    pub async fn namespace(&self, client: &kube::Client, prefix: &str) -> anyhow::Result<String> {
        let name = self.unique_name(prefix);
        let namespace = Namespace {
            metadata: kube::api::ObjectMeta {
                name: Some(name.clone()),
                ..Default::default()
            },
            ..Default::default()
        };
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &namespace)
            .await?;
        Ok(name)
    }

    /// A name no other test of this process uses: `<prefix>-<pid>-<n>`, DNS-safe.
    pub fn unique_name(&self, prefix: &str) -> String {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        format!("{prefix}-{}-{n}", std::process::id())
    }

    /// Runs the cluster's kubectl with the admin kubeconfig and returns its stdout.
    pub fn kubectl(&self, args: &[&str]) -> anyhow::Result<String> {
        let output = Command::new(self.bin_dir.join("kubectl"))
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .output()
            .context("running kubectl")?;
        if !output.status.success() {
            bail!(
                "kubectl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }
}

/// kube and reqwest need one process-wide rustls provider; kmm-rs uses ring.
pub fn install_crypto_provider() {
    // Fails only when a provider is already installed, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn start() -> anyhow::Result<TestEnv> {
    let root = repo_root();
    let bin_dir = match std::env::var_os("KMM_TESTENV_BIN") {
        Some(dir) => PathBuf::from(dir),
        None => build_binaries(&root)?,
    };
    let dir = std::env::temp_dir().join(format!("kmm-rs-test-{}", std::process::id()));
    let cluster_sh = root.join("testenv/cluster.sh");

    // The watchdog is started before the cluster so that nothing outlives the test process:
    // when this process exits, its end of the pipe closes, `read` returns and the cluster stops.
    // setsid keeps it out of the terminal's process group, so Ctrl-C reaches only the tests.
    let watchdog = Command::new("setsid")
        .arg("sh")
        .arg("-c")
        .arg(r#"read -r _ || true; "$0" down --dir "$1" >/dev/null 2>&1; rm -rf "$1""#)
        .arg(&cluster_sh)
        .arg(&dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting the cluster watchdog (setsid, sh)")?;

    let started = std::time::Instant::now();
    // Ports are picked free by the kernel and then handed to the components, so another process
    // can take one in between; `up` stops everything it started when a component exits, and one
    // more attempt (with new ports) gets past such a collision.
    let mut attempt = 0;
    loop {
        attempt += 1;
        let status = Command::new(&cluster_sh)
            .arg("up")
            .arg("--dir")
            .arg(&dir)
            .env("KMM_TESTENV_BIN", &bin_dir)
            .stdout(Stdio::null())
            .status()
            .context("running testenv/cluster.sh up")?;
        if status.success() {
            break;
        }
        if attempt == 2 {
            bail!(
                "testenv/cluster.sh up --dir {} failed twice ({status}); see its output above",
                dir.display()
            );
        }
        eprintln!("testenv: cluster.sh up failed ({status}); trying once more");
        let _ = std::fs::remove_dir_all(&dir);
    }
    let startup_seconds = started.elapsed().as_secs_f64();
    let env = TestEnv {
        kubeconfig: dir.join("kubeconfig"),
        dir,
        bin_dir,
        startup_seconds,
        _watchdog: watchdog,
    };
    // Only the generated CRD files: deploy/crds also holds a kustomization.
    let crds = root.join("deploy/crds");
    let mut args = vec![
        "apply".to_owned(),
        "--server-side".to_owned(),
        "--field-manager=kmm-rs-testenv".to_owned(),
    ];
    for (file, _) in kmm_api::crds::all()? {
        args.push("-f".to_owned());
        args.push(crds.join(file).to_string_lossy().into_owned());
    }
    env.kubectl(&args.iter().map(String::as_str).collect::<Vec<_>>())?;
    wait_crds_established(&env)?;
    Ok(env)
}

/// Waits until every kmm-rs CRD is Established. Runs on a runtime of its own in a thread of its
/// own: this is called from inside test runtimes, which cannot block on another future.
fn wait_crds_established(env: &TestEnv) -> anyhow::Result<()> {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::runtime::wait::{await_condition, conditions};

    let names: Vec<String> = kmm_api::crds::all()?
        .into_iter()
        .filter_map(|(_, crd)| crd.metadata.name)
        .collect();
    std::thread::scope(|scope| {
        scope
            .spawn(|| -> anyhow::Result<()> {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                runtime.block_on(async {
                    let client = env.client().await?;
                    let api = Api::<CustomResourceDefinition>::all(client);
                    for name in &names {
                        let established =
                            await_condition(api.clone(), name, conditions::is_crd_established());
                        tokio::time::timeout(WAIT_TIMEOUT, established)
                            .await
                            .map_err(|_| {
                                anyhow::anyhow!("CRD {name} not Established after {WAIT_TIMEOUT:?}")
                            })??;
                    }
                    Ok(())
                })
            })
            .join()
            .map_err(|_| anyhow::anyhow!("the CRD wait panicked"))?
    })
}

/// Runs `testenv/build.sh` (a no-op when the cache is complete) and returns the bin directory.
fn build_binaries(root: &Path) -> anyhow::Result<PathBuf> {
    let output = Command::new(root.join("testenv/build.sh"))
        .stderr(Stdio::inherit())
        .output()
        .context("running testenv/build.sh")?;
    if !output.status.success() {
        bail!("testenv/build.sh failed: {}", output.status);
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let bin = stdout.lines().last().unwrap_or_default().trim();
    if bin.is_empty() {
        bail!("testenv/build.sh printed no bin directory");
    }
    Ok(PathBuf::from(bin))
}
