//! Tier 2: `kmm-operator run` against the real control plane — leader election between two
//! processes, readiness tied to cache sync, and the KMM gauges on `/metrics`.
#![allow(clippy::unwrap_used)] // setup failures should fail the test on the spot

mod common;

use std::time::{Duration, Instant};

use common::{Operator, config_file, free_port, http_get, poll, service_account_kubeconfig};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{ClusterRoleBinding, RoleRef, Subject};
use kmm_api::v1beta1::Module;
use kmm_testenv::{TestEnv, WAIT_TIMEOUT, wait_for};
use kube::api::{Api, DeleteParams, ObjectMeta, PostParams};

fn holder(lease: Option<&Lease>) -> Option<String> {
    lease?.spec.as_ref()?.holder_identity.clone()
}

fn managers(lease: &Lease) -> Vec<String> {
    lease
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter_map(|m| m.manager.clone())
        .collect()
}

fn manager_config(health: u16, metrics: u16, lease: &str) -> String {
    format!(
        "healthProbeBindAddress: 127.0.0.1:{health}\n\
         metrics:\n  bindAddress: 127.0.0.1:{metrics}\n  secureServing: false\n  enableAuthnAuthz: false\n\
         leaderElection:\n  enabled: true\n  resourceID: {lease}\n  leaseDuration: 4s\n  renewDeadline: 3s\n  retryPeriod: 500ms\n"
    )
}

async fn leader_status(port: u16) -> Option<bool> {
    let (status, body) = http_get(port, "/leader").await?;
    if status != 200 {
        return None;
    }
    let json: serde_json::Value = serde_json::from_str(&body).ok()?;
    json["leader"].as_bool()
}

async fn metric_line(port: u16, prefix: &str) -> Option<String> {
    let (status, body) = http_get(port, "/metrics").await?;
    (status == 200)
        .then(|| {
            body.lines()
                .find(|l| l.starts_with(prefix))
                .map(str::to_owned)
        })
        .flatten()
}

/// Two managers share one Lease: only the holder leads (Lease holder, `/leader`, `kmm_leader`,
/// and no Lease write by the follower in `managedFields`); after SIGKILL of the leader the other
/// takes over once the Lease expires; SIGTERM releases the Lease.
#[tokio::test]
async fn only_the_leader_leads_and_the_other_takes_over() {
    let env = TestEnv::get();
    let client = env.client().await.unwrap();
    let ns = env.namespace(&client, "op-leader").await.unwrap();
    let lease_name = "kmm.sigs.x-k8s.io";
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);

    let (health_a, metrics_a, health_b, metrics_b) =
        (free_port(), free_port(), free_port(), free_port());
    let config_a = config_file(
        env,
        "leader-a",
        &manager_config(health_a, metrics_a, lease_name),
    );
    let config_b = config_file(
        env,
        "leader-b",
        &manager_config(health_b, metrics_b, lease_name),
    );
    let common_vars = [
        ("OPERATOR_NAMESPACE", ns.as_str()),
        ("RELATED_IMAGE_WORKER", "example.org/worker:1"),
    ];
    let start = |name: &str, config: &std::path::Path| {
        Operator::start(
            env,
            name,
            &[
                "run",
                "--config",
                config.to_str().unwrap(),
                "--leader-election-identity",
                name,
            ],
            &common_vars,
        )
    };

    let mut a = start("op-a", &config_a);
    wait_for(
        &leases,
        lease_name,
        WAIT_TIMEOUT,
        "held by op-a",
        |l: Option<&Lease>| holder(l).as_deref() == Some("op-a"),
    )
    .await
    .unwrap();
    let mut b = start("op-b", &config_b);
    // b is up (probes answer) and follows.
    assert!(!poll(WAIT_TIMEOUT, "op-b /leader", || leader_status(health_b)).await);
    assert!(poll(WAIT_TIMEOUT, "op-a /leader", || leader_status(health_a)).await);
    poll(WAIT_TIMEOUT, "op-b ready", || async {
        http_get(health_b, "/readyz")
            .await
            .filter(|(s, _)| *s == 200)
    })
    .await;
    assert_eq!(
        poll(WAIT_TIMEOUT, "op-a kmm_leader", || metric_line(
            metrics_a,
            "kmm_leader"
        ))
        .await,
        "kmm_leader 1"
    );
    assert_eq!(
        poll(WAIT_TIMEOUT, "op-b kmm_leader", || metric_line(
            metrics_b,
            "kmm_leader"
        ))
        .await,
        "kmm_leader 0"
    );

    // Let op-a renew several times while op-b polls the Lease, then check who wrote it.
    let first = leases.get(lease_name).await.unwrap();
    let first_renew = first.spec.as_ref().and_then(|s| s.renew_time.clone());
    let mut renewals = 0;
    let mut last = first_renew;
    while renewals < 3 {
        let (lease, changed, renew) = poll(WAIT_TIMEOUT, "a Lease read", || {
            let leases = leases.clone();
            let seen = last.clone();
            async move {
                let lease = leases.get(lease_name).await.ok()?;
                let renew = lease.spec.as_ref().and_then(|s| s.renew_time.clone());
                (renew != seen).then_some((lease, true, renew))
            }
        })
        .await;
        assert!(changed);
        assert_eq!(holder(Some(&lease)).as_deref(), Some("op-a"));
        last = renew;
        renewals += 1;
    }
    let lease = leases.get(lease_name).await.unwrap();
    let writers = managers(&lease);
    assert!(
        writers.contains(&"kmm-operator/op-a".to_owned()),
        "{writers:?}"
    );
    assert!(
        !writers.iter().any(|m| m.contains("op-b")),
        "the follower wrote the Lease: {writers:?}"
    );

    // Kill the leader without a chance to release; op-b takes over after the Lease expires.
    a.kill();
    let killed = Instant::now();
    wait_for(
        &leases,
        lease_name,
        WAIT_TIMEOUT,
        "held by op-b",
        |l: Option<&Lease>| holder(l).as_deref() == Some("op-b"),
    )
    .await
    .unwrap();
    let takeover = killed.elapsed();
    println!("leader takeover after SIGKILL: {takeover:?} (leaseDuration 4s, retryPeriod 500ms)");
    assert!(
        poll(WAIT_TIMEOUT, "op-b leads", || async {
            leader_status(health_b).await.filter(|l| *l)
        })
        .await
    );
    assert_eq!(
        poll(WAIT_TIMEOUT, "op-b kmm_leader 1", || async {
            metric_line(metrics_b, "kmm_leader")
                .await
                .filter(|l| l == "kmm_leader 1")
        })
        .await,
        "kmm_leader 1"
    );
    let lease = leases.get(lease_name).await.unwrap();
    assert!(managers(&lease).contains(&"kmm-operator/op-b".to_owned()));
    assert_eq!(
        lease.spec.as_ref().and_then(|s| s.lease_transitions),
        Some(1)
    );

    // Graceful shutdown releases the Lease.
    assert!(
        b.terminate().await,
        "op-b exited with an error:\n{}",
        b.logs()
    );
    let lease = leases.get(lease_name).await.unwrap();
    assert_eq!(holder(Some(&lease)), None, "SIGTERM must release the Lease");
    assert!(b.logs().contains("released leadership"));
}

/// `/readyz` stays 503 while the caches cannot sync (the ServiceAccount may not list anything)
/// and turns 200 once RBAC allows it; `/metrics` then shows the KMM gauges of our Module.
#[tokio::test]
async fn readyz_follows_cache_sync_and_metrics_show_kmm_gauges() {
    let env = TestEnv::get();
    let client = env.client().await.unwrap();
    let ns = env.namespace(&client, "op-ready").await.unwrap();

    // A ServiceAccount with no permissions yet, and a kubeconfig with its token.
    let sa_name = "kmm-operator";
    Api::<ServiceAccount>::namespaced(client.clone(), &ns)
        .create(
            &PostParams::default(),
            &ServiceAccount {
                metadata: ObjectMeta {
                    name: Some(sa_name.into()),
                    ..Default::default()
                },
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let kubeconfig = service_account_kubeconfig(env, &ns, sa_name);

    let (health, metrics) = (free_port(), free_port());
    let config = config_file(
        env,
        "ready",
        &format!(
            "healthProbeBindAddress: 127.0.0.1:{health}\nmetrics:\n  bindAddress: 127.0.0.1:{metrics}\n  secureServing: false\n  enableAuthnAuthz: false\nleaderElection:\n  enabled: false\n"
        ),
    );
    let _operator = Operator::start_with_kubeconfig(
        &kubeconfig,
        env,
        "op-ready",
        &["run", "--config", config.to_str().unwrap()],
        &[
            ("OPERATOR_NAMESPACE", ns.as_str()),
            ("RELATED_IMAGE_WORKER", "example.org/worker:1"),
        ],
    );
    // Up and answering, but not ready: the Module list is forbidden. Wait until the process
    // has logged the forbidden watch, so "not ready" is observed after a sync attempt failed.
    let (status, body) = poll(WAIT_TIMEOUT, "/readyz answers", || {
        http_get(health, "/readyz")
    })
    .await;
    assert_eq!((status, body.as_str()), (503, "caches not synced yet"));
    poll(WAIT_TIMEOUT, "a forbidden watch in the log", || async {
        _operator
            .logs()
            .contains("watching Modules for metrics")
            .then_some(())
    })
    .await;
    assert_eq!(http_get(health, "/readyz").await.map(|r| r.0), Some(503));
    assert_eq!(http_get(health, "/livez").await.map(|r| r.0), Some(200));

    // Grant everything (the reconcilers' caches need more than the metrics ones, and which
    // exactly is the RBAC test's business, not this one's).
    let role_name = env.unique_name("kmm-ready");
    let binding = ClusterRoleBinding {
        metadata: ObjectMeta {
            name: Some(role_name.clone()),
            ..Default::default()
        },
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "ClusterRole".into(),
            name: "cluster-admin".into(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: sa_name.into(),
            namespace: Some(ns.clone()),
            ..Default::default()
        }]),
    };
    Api::<ClusterRoleBinding>::all(client.clone())
        .create(&PostParams::default(), &binding)
        .await
        .unwrap();
    let (status, _) = poll(Duration::from_secs(90), "/readyz 200", || async {
        http_get(health, "/readyz").await.filter(|(s, _)| *s == 200)
    })
    .await;
    assert_eq!(status, 200);

    // The gauges reflect a Module created now.
    let module: Module = serde_json::from_value(serde_json::json!({
        "apiVersion": "kmm.sigs.x-k8s.io/v1beta1", "kind": "Module",
        "metadata": {"name": "gauge", "namespace": ns},
        "spec": {"selector": {"kubernetes.io/os": "linux"}, "moduleLoader": {"container": {
            "modprobe": {"moduleName": "gauge", "args": {"load": ["a=1", "b"]}},
            "kernelMappings": [{"regexp": "^.+$", "containerImage": "example.org/gauge:1"}]}}}
    }))
    .unwrap();
    Api::<Module>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &module)
        .await
        .unwrap();
    let expected =
        format!("kmm_modprobe_args{{name=\"gauge\",namespace=\"{ns}\",modprobeArgs=\"a=1,b\"}} 1");
    poll(WAIT_TIMEOUT, "kmm_modprobe_args of our Module", || async {
        metric_line(metrics, &expected).await
    })
    .await;
    let modules = metric_line(metrics, "kmm_module_num ").await.unwrap();
    let count: i64 = modules.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(count >= 1, "{modules}");
    for gauge in [
        "kmm_in_cluster_build_num",
        "kmm_in_cluster_sign_num",
        "kmm_device_plugin_num",
        "kmm_preflight_num",
        "kmm_leader 1",
    ] {
        assert!(
            metric_line(metrics, gauge).await.is_some(),
            "{gauge} missing"
        );
    }
    // The Module reconciler's passes are counted under controller-runtime's names.
    poll(WAIT_TIMEOUT, "Module reconcile passes counted", || async {
        metric_line(
            metrics,
            "controller_runtime_reconcile_total{controller=\"module\",result=\"success\"}",
        )
        .await
        .filter(|line| !line.ends_with(" 0"))
    })
    .await;
    assert!(
        metric_line(
            metrics,
            "controller_runtime_reconcile_time_seconds_count{controller=\"module\"}"
        )
        .await
        .is_some()
    );

    Api::<Module>::namespaced(client.clone(), &ns)
        .delete("gauge", &DeleteParams::default())
        .await
        .unwrap();
    Api::<ClusterRoleBinding>::all(client)
        .delete(&role_name, &DeleteParams::default())
        .await
        .unwrap();
}
