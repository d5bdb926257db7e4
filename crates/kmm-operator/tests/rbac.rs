//! Tier 2: the operator runs as a separate process, authenticated as its ServiceAccount bound to
//! the ClusterRole and Role shipped in deploy/base/rbac.yaml (not as admin), and KMM Lab 3 (load on
//! the mapped nodes, then delete and unload) succeeds: the RBAC is sufficient. The API server's
//! audit log of that run, compared with the shipped rules, lists the rules the run did not use;
//! every one of them must be on the list of rules kept for other features.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use common::{Operator, config_file, free_port, service_account_kubeconfig};
use k8s_openapi::api::core::v1::{Node, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding};
use kmm_api::v1beta1::Module;
use kmm_api::wire;
use kmm_testenv::{FakeNode, TestEnv, wait_for};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::{Value, json};

const TIMEOUT: Duration = Duration::from_secs(120);
const SA: &str = "kmm-operator-controller";

/// Shipped grants that Lab 3 does not exercise: (resource, verb or `*`, the feature that needs it).
const KEPT_FOR_OTHER_FEATURES: &[(&str, &str, &str)] = &[
    (
        "apps/daemonsets",
        "*",
        "device plugin DaemonSets (Lab 3 has no device plugin)",
    ),
    (
        "/configmaps",
        "get",
        "reading build Dockerfiles (in-cluster build)",
    ),
    (
        "/secrets",
        "get",
        "pull secrets for registry image checks (this run uses pull pods), signing keys",
    ),
    (
        "kmm.sigs.x-k8s.io/moduleimagesconfigs",
        "create",
        "server-side apply creates the MIC (audited as patch)",
    ),
    (
        "kmm.sigs.x-k8s.io/modulebuildsignconfigs",
        "*",
        "in-cluster build and sign",
    ),
    (
        "kmm.sigs.x-k8s.io/modulebuildsignconfigs/status",
        "*",
        "in-cluster build and sign",
    ),
    (
        "kmm.sigs.x-k8s.io/preflightvalidations/status",
        "*",
        "PreflightValidation verdicts (Lab 3 has none)",
    ),
    (
        "coordination.k8s.io/leases",
        "update",
        "renewing the Lease (runs longer than the renew period)",
    ),
    (
        "events.k8s.io/events",
        "patch",
        "counting repeated Events in a series",
    ),
    (
        "authentication.k8s.io/tokenreviews",
        "*",
        "authenticated /metrics (this run serves plain /metrics)",
    ),
    (
        "authorization.k8s.io/subjectaccessreviews",
        "*",
        "authorized /metrics (this run serves plain /metrics)",
    ),
];

fn shipped(kind: &str, name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/base/rbac.yaml");
    let docs: Vec<Value> =
        serde_saphyr::from_multiple(&std::fs::read_to_string(path).unwrap()).unwrap();
    docs.into_iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap()
}

/// Every (group/resource, verb) a set of rules grants.
fn granted(rules: &[PolicyRule]) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for rule in rules {
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                for verb in &rule.verbs {
                    out.insert((format!("{group}/{resource}"), verb.clone()));
                }
            }
        }
    }
    out
}

/// The controller's rules as the Helm chart and the OLM bundle ship them.
fn other_copies() -> Vec<(&'static str, Value)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy");
    let helm = std::fs::read_to_string(root.join("helm/kmm-operator/templates/rbac.yaml"))
        .unwrap()
        .replace("{{ .Release.Namespace }}", "x");
    let helm: Vec<Value> = serde_saphyr::from_multiple(&helm).unwrap();
    let helm_rules = helm
        .into_iter()
        .find(|d| {
            d["kind"] == "ClusterRole" && d["metadata"]["name"] == "kmm-operator-manager-role"
        })
        .unwrap()["rules"]
        .clone();
    let csv: Value = serde_saphyr::from_str(
        &std::fs::read_to_string(
            root.join("olm/bundle/manifests/kmm-rs.clusterserviceversion.yaml"),
        )
        .unwrap(),
    )
    .unwrap();
    let csv_rules = csv["spec"]["install"]["spec"]["clusterPermissions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["serviceAccountName"] == SA)
        .unwrap()["rules"]
        .clone();
    // The OLM bundle is for OpenShift: it adds the Build and ImageStream rules.
    let openshift = |rule: &Value| {
        rule["apiGroups"].as_array().is_some_and(|g| {
            g.iter()
                .any(|g| g.as_str().is_some_and(|g| g.ends_with("openshift.io")))
        })
    };
    let csv_rules = Value::Array(
        csv_rules
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| !openshift(r))
            .cloned()
            .collect(),
    );
    vec![("Helm chart", helm_rules), ("OLM bundle", csv_rules)]
}

#[test]
fn helm_and_olm_ship_the_same_controller_rules() {
    let base = shipped("ClusterRole", "kmm-operator-manager-role")["rules"].clone();
    for (name, rules) in other_copies() {
        assert_eq!(rules, base, "the {name} differs from deploy/base/rbac.yaml");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lab3_runs_with_the_shipped_rbac_and_uses_it_all() {
    let env = TestEnv::get();
    let client = env.client().await.unwrap();
    let ns = env.namespace(&client, "rbac-op").await.unwrap();

    // The shipped roles, bound to the operator's ServiceAccount in this namespace.
    let sa: ServiceAccount = serde_json::from_value(json!({"metadata": {"name": SA}})).unwrap();
    Api::<ServiceAccount>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &sa)
        .await
        .unwrap();
    let mut cluster_role: ClusterRole =
        serde_json::from_value(shipped("ClusterRole", "kmm-operator-manager-role")).unwrap();
    cluster_role.metadata = kube::api::ObjectMeta {
        name: Some(format!("{ns}-manager")),
        ..Default::default()
    };
    Api::<ClusterRole>::all(client.clone())
        .create(&PostParams::default(), &cluster_role)
        .await
        .unwrap();
    let binding: ClusterRoleBinding = serde_json::from_value(json!({
        "metadata": {"name": format!("{ns}-manager")},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": format!("{ns}-manager")},
        "subjects": [{"kind": "ServiceAccount", "name": SA, "namespace": &ns}]
    }))
    .unwrap();
    Api::<ClusterRoleBinding>::all(client.clone())
        .create(&PostParams::default(), &binding)
        .await
        .unwrap();
    let mut lease_role: Role =
        serde_json::from_value(shipped("Role", "kmm-operator-leader-election-role")).unwrap();
    lease_role.metadata = kube::api::ObjectMeta {
        name: Some("leader-election".into()),
        namespace: Some(ns.clone()),
        ..Default::default()
    };
    Api::<Role>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &lease_role)
        .await
        .unwrap();
    let lease_binding: RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": "leader-election"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "leader-election"},
        "subjects": [{"kind": "ServiceAccount", "name": SA, "namespace": &ns}]
    }))
    .unwrap();
    Api::<RoleBinding>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &lease_binding)
        .await
        .unwrap();

    let kubeconfig = service_account_kubeconfig(env, &ns, SA);
    let (health, metrics) = (free_port(), free_port());
    let config = config_file(
        env,
        "rbac",
        &format!(
            "healthProbeBindAddress: 127.0.0.1:{health}\nmetrics:\n  bindAddress: 127.0.0.1:{metrics}\n  secureServing: false\n  enableAuthnAuthz: false\nimageCheck:\n  mode: pullPod\n"
        ),
    );
    let _operator = Operator::start_with_kubeconfig(
        &kubeconfig,
        env,
        "rbac-operator",
        &["run", "--config", config.to_str().unwrap()],
        &[
            ("OPERATOR_NAMESPACE", ns.as_str()),
            ("RELATED_IMAGE_WORKER", "registry.example/kmm-worker:test"),
        ],
    );

    // Lab 3.
    let key = "test.kmm-rs.dev/rbac";
    let nodes = [
        (env.unique_name("rbac-a"), "6.1.0-56-amd64"),
        (env.unique_name("rbac-b"), "6.8.0-31-generic"),
        (env.unique_name("rbac-c"), "5.14.0-284.el9.x86_64"),
    ];
    for (node, kernel) in &nodes {
        FakeNode::new(node, *kernel)
            .label(key, &ns)
            .create(&client)
            .await
            .unwrap();
    }
    let module: Module = serde_json::from_value(json!({
        "metadata": {"name": "kmod"},
        "spec": {"selector": {key: &ns}, "moduleLoader": {"container": {
            "modprobe": {"moduleName": "kmm_ci_a"},
            "kernelMappings": [
                {"literal": "6.1.0-56-amd64", "containerImage": "registry.example/kmod:6.1"},
                {"regexp": "^6\\.8\\.", "containerImage": "registry.example/kmod:${KERNEL_XYZ}"}
            ]
        }}}
    }))
    .unwrap();
    let modules = Api::<Module>::namespaced(client.clone(), &ns);
    modules
        .create(&PostParams::default(), &module)
        .await
        .unwrap();
    let node_api = Api::<Node>::all(client.clone());
    for (node, _) in &nodes[..2] {
        let label = wire::module_ready_label(&ns, "kmod");
        wait_for(
            &node_api,
            node,
            TIMEOUT,
            "loaded",
            move |n: Option<&Node>| n.is_some_and(|n| n.labels().contains_key(&label)),
        )
        .await
        .unwrap();
    }
    wait_for(
        &modules,
        "kmod",
        TIMEOUT,
        "counted",
        |m: Option<&Module>| {
            m.and_then(|m| m.status.as_ref())
                .is_some_and(|s| s.module_loader.available_number == 2)
        },
    )
    .await
    .unwrap();
    modules
        .delete("kmod", &DeleteParams::default())
        .await
        .unwrap();
    wait_for(
        &modules,
        "kmod",
        TIMEOUT,
        "deleted",
        |m: Option<&Module>| m.is_none(),
    )
    .await
    .unwrap();

    // What the operator did, from the audit log.
    let user = format!("system:serviceaccount:{ns}:{SA}");
    let audit = std::fs::read_to_string(env.dir.join("logs/audit.log")).unwrap();
    let mut used = BTreeSet::new();
    let mut denied = Vec::new();
    for line in audit.lines() {
        let Ok(event) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        if event["user"]["username"] != user.as_str() || event["objectRef"].is_null() {
            continue;
        }
        let object = &event["objectRef"];
        let mut resource = format!(
            "{}/{}",
            object["apiGroup"].as_str().unwrap_or_default(),
            object["resource"].as_str().unwrap_or_default()
        );
        if let Some(sub) = object["subresource"].as_str() {
            resource = format!("{resource}/{sub}");
        }
        let verb = event["verb"].as_str().unwrap_or_default().to_owned();
        if event["responseStatus"]["code"] == 403 {
            denied.push(format!("{verb} {resource}"));
        }
        used.insert((resource, verb));
    }
    assert!(
        denied.is_empty(),
        "the shipped RBAC denied the operator: {denied:?}"
    );
    let mut all_rules = cluster_role.rules.clone().unwrap_or_default();
    all_rules.extend(lease_role.rules.clone().unwrap_or_default());
    let unused: Vec<(String, String)> = granted(&all_rules)
        .into_iter()
        .filter(|grant| !used.contains(grant))
        .collect();
    println!(
        "operator requests by resource and verb ({} kinds):",
        used.len()
    );
    for (resource, verb) in &used {
        println!("  {verb:8} {resource}");
    }
    println!("shipped grants not used by Lab 3:");
    let mut unexplained = Vec::new();
    for (resource, verb) in &unused {
        match KEPT_FOR_OTHER_FEATURES
            .iter()
            .find(|(r, v, _)| r == resource && (*v == "*" || v == verb))
        {
            Some((_, _, why)) => println!("  {verb:8} {resource:50} kept: {why}"),
            None => unexplained.push(format!("{verb} {resource}")),
        }
    }
    assert!(
        unexplained.is_empty(),
        "shipped grants nobody uses: {unexplained:?}"
    );
}
