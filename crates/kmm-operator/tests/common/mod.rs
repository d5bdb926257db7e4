//! Helpers shared by the operator's tier-2 tests: the operator binary as a child process that
//! dies with the test, free loopback ports, plain-HTTP probes and polling with a deadline.

// Test-only helpers: a failed setup step should fail the test on the spot.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kmm_testenv::TestEnv;

/// A `kmm-operator` child process, killed when dropped. Its stderr goes to a log file that is
/// printed when the test panics.
pub struct Operator {
    pub child: Child,
    pub log: PathBuf,
    pub name: String,
}

impl Operator {
    pub fn start(env: &TestEnv, name: &str, args: &[&str], vars: &[(&str, &str)]) -> Self {
        Self::start_with_kubeconfig(&env.kubeconfig, env, name, args, vars)
    }

    pub fn start_with_kubeconfig(
        kubeconfig: &Path,
        env: &TestEnv,
        name: &str,
        args: &[&str],
        vars: &[(&str, &str)],
    ) -> Self {
        let log = env.dir.join(format!("{}.log", env.unique_name(name)));
        let file = std::fs::File::create(&log).unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_kmm-operator"));
        command
            .args(args)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info,kmm_operator=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file);
        for (k, v) in vars {
            command.env(k, v);
        }
        let child = command.spawn().unwrap();
        Self {
            child,
            log,
            name: name.to_owned(),
        }
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL: no chance to release the Lease.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits for the exit and returns whether it was a success.
    pub async fn terminate(&mut self) -> bool {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.success();
            }
            assert!(
                Instant::now() < deadline,
                "{} did not stop after SIGTERM",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- log of {} ----\n{}", self.name, self.logs());
        }
    }
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `GET path` over plain HTTP; `None` while nothing listens.
pub async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.ok()?;
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Some((status, body))
}

/// Polls `check` every 100 ms until it returns `Some`, failing after `timeout`.
pub async fn poll<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Writes a config file into the cluster directory and returns its path.
pub fn config_file(env: &TestEnv, name: &str, text: &str) -> PathBuf {
    let path = env.dir.join(format!("{}.yaml", env.unique_name(name)));
    std::fs::write(&path, text).unwrap();
    path
}

/// Starts the reconcilers in-process, once per test binary, on a runtime of their own so that they
/// outlive each test's runtime, and waits until their caches have synced. Tests isolate themselves
/// by namespace, node names and selector labels.
pub fn start_shared_operator(config: kmm_operator::controllers::ControllerConfig) {
    static STARTED: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    STARTED.get_or_init(move || {
        let env = TestEnv::get();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let client = env.client().await.unwrap();
                let (ready_tx, mut ready_rx) = tokio::sync::watch::channel(false);
                let operator =
                    tokio::spawn(kmm_operator::controllers::run(client, config, ready_tx));
                let _ = ready_rx.wait_for(|ready| *ready).await;
                tx.send(()).unwrap();
                match operator.await {
                    Ok(Ok(())) => {}
                    Ok(Err(err)) => panic!("controllers stopped: {err:#}"),
                    Err(err) => panic!("controllers panicked: {err}"),
                }
            });
        });
        rx.recv_timeout(kmm_testenv::WAIT_TIMEOUT)
            .expect("the operator's caches did not sync");
    });
}

/// The controller settings the in-process tests use: a placeholder worker image and the given
/// image check.
pub fn test_controller_config(
    image_check: kmm_operator::controllers::ImageCheckMode,
) -> kmm_operator::controllers::ControllerConfig {
    kmm_operator::controllers::ControllerConfig {
        worker_image: "registry.example/kmm-worker:test".into(),
        image_check,
        ..Default::default()
    }
}

/// A kubeconfig that authenticates as ServiceAccount `sa` of `ns` (which must exist) with a
/// one-hour token, for running the operator binary with that identity.
pub fn service_account_kubeconfig(env: &TestEnv, ns: &str, sa: &str) -> PathBuf {
    let token = env
        .kubectl(&["create", "token", sa, "-n", ns, "--duration=1h"])
        .unwrap();
    let server = std::fs::read_to_string(env.dir.join("cluster.env"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("APISERVER_URL=").map(str::to_owned))
        .unwrap();
    let kubeconfig = env
        .dir
        .join(format!("{}.kubeconfig", env.unique_name("sa")));
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {server}\n    certificate-authority: {}\nusers:\n- name: u\n  user:\n    token: {}\ncontexts:\n- name: x\n  context: {{cluster: c, user: u}}\ncurrent-context: x\n",
            env.dir.join("pki/ca.crt").display(),
            token.trim()
        ),
    )
    .unwrap();
    kubeconfig
}
