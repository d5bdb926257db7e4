//! Tier 2: `kmm-operator webhook` registered with the real API server (clientConfig.url on
//! loopback, caBundle filled in by the webhook itself from its self-managed CA).
#![allow(clippy::unwrap_used)] // setup failures should fail the test on the spot

mod common;

use common::{Operator, free_port, http_get, poll};
use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kmm_api::v1beta1::Module;
use kmm_api::v1beta2::PreflightValidation;
use kmm_testenv::{TestEnv, WAIT_TIMEOUT, wait_for};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;

/// Deletes the webhook configuration even when the test fails, so that no other test meets a
/// webhook whose server is gone.
struct DeleteOnDrop(Api<ValidatingWebhookConfiguration>, String);

impl Drop for DeleteOnDrop {
    fn drop(&mut self) {
        let kubeconfig = TestEnv::get().kubeconfig.clone();
        let _ = std::process::Command::new(TestEnv::get().bin_dir.join("kubectl"))
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args([
                "delete",
                "validatingwebhookconfiguration",
                &self.1,
                "--ignore-not-found",
            ])
            .status();
        let _ = &self.0;
    }
}

fn module(ns: &str, name: &str, modprobe: serde_json::Value) -> Module {
    serde_json::from_value(json!({
        "apiVersion": "kmm.sigs.x-k8s.io/v1beta1", "kind": "Module",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"selector": {"kubernetes.io/os": "linux"}, "moduleLoader": {"container": {
            "modprobe": modprobe,
            "kernelMappings": [{"regexp": "^.+$", "containerImage": "example.org/m:1"}]}}}
    }))
    .unwrap()
}

fn api_message(err: kube::Error) -> String {
    match err {
        kube::Error::Api(status) => status.message,
        other => panic!("expected an API error, got {other}"),
    }
}

#[tokio::test]
async fn webhook_rejects_invalid_objects_through_the_api_server() {
    let env = TestEnv::get();
    let client = env.client().await.unwrap();
    let operator_ns = env.namespace(&client, "op-webhook").await.unwrap();
    let id = env.unique_name("wh");
    let (port, health) = (free_port(), free_port());
    let vwc_name = format!("kmm-test-{id}");
    let base = format!("https://127.0.0.1:{port}");

    // Only objects of this test go through this webhook: its namespaces and PreflightValidations
    // carry the label `kmm-rs.test/webhook: <id>`.
    let selector = json!({"matchLabels": {"kmm-rs.test/webhook": id}});
    let vwc: ValidatingWebhookConfiguration = serde_json::from_value(json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": vwc_name},
        "webhooks": [
            {"name": "vmodule.kb.io", "admissionReviewVersions": ["v1"], "sideEffects": "None",
             "failurePolicy": "Fail", "namespaceSelector": selector,
             "clientConfig": {"url": format!("{base}/validate-kmm-sigs-x-k8s-io-v1beta1-module")},
             "rules": [{"apiGroups": ["kmm.sigs.x-k8s.io"], "apiVersions": ["v1beta1"],
                        "operations": ["CREATE", "UPDATE"], "resources": ["modules"]}]},
            {"name": "namespace-deletion.kmm.sigs.k8s.io", "admissionReviewVersions": ["v1"],
             "sideEffects": "None", "failurePolicy": "Fail", "namespaceSelector": selector,
             "clientConfig": {"url": format!("{base}/validate--v1-namespace")},
             "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["DELETE"],
                        "resources": ["namespaces"]}]},
            {"name": "vpreflightvalidation.kb.io", "admissionReviewVersions": ["v1"],
             "sideEffects": "None", "failurePolicy": "Fail", "objectSelector": selector,
             "clientConfig": {"url": format!("{base}/validate-kmm-sigs-x-k8s-io-v1beta2-preflightvalidation")},
             "rules": [{"apiGroups": ["kmm.sigs.x-k8s.io"], "apiVersions": ["v1beta2"],
                        "operations": ["CREATE", "UPDATE"], "resources": ["preflightvalidations"]}]}
        ]
    }))
    .unwrap();
    let vwcs: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
    vwcs.create(&PostParams::default(), &vwc).await.unwrap();
    let _cleanup = DeleteOnDrop(vwcs.clone(), vwc_name.clone());

    let port_s = port.to_string();
    let health_s = format!("127.0.0.1:{health}");
    let webhook = Operator::start(
        env,
        "webhook",
        &[
            "webhook",
            "--enable-module",
            "--enable-namespace",
            "--enable-preflightvalidation",
            "--bind-host",
            "127.0.0.1",
            "--port",
            &port_s,
            "--health-probe-bind-address",
            &health_s,
            "--tls-san",
            "127.0.0.1",
            "--webhook-configuration",
            &vwc_name,
        ],
        &[("OPERATOR_NAMESPACE", operator_ns.as_str())],
    );

    // The webhook writes its CA into every webhook of the configuration.
    let secret = wait_for(
        &Api::<Secret>::namespaced(client.clone(), &operator_ns),
        "kmm-operator-webhook-cert",
        WAIT_TIMEOUT,
        "created",
        |s: Option<&Secret>| s.is_some(),
    )
    .await
    .unwrap()
    .unwrap();
    let ca = secret.data.unwrap()["ca.crt"].0.clone();
    wait_for(
        &vwcs,
        &vwc_name,
        WAIT_TIMEOUT,
        "carrying the CA",
        |v: Option<&ValidatingWebhookConfiguration>| {
            v.and_then(|v| v.webhooks.as_ref()).is_some_and(|ws| {
                ws.iter()
                    .all(|w| w.client_config.ca_bundle.as_ref().map(|b| &b.0) == Some(&ca))
            })
        },
    )
    .await
    .unwrap();
    poll(WAIT_TIMEOUT, "webhook /readyz", || async {
        http_get(health, "/readyz").await.filter(|(s, _)| *s == 200)
    })
    .await;

    // A namespace whose objects go through the webhook.
    let ns = env.unique_name("wh-modules");
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(
                json!({"metadata": {"name": ns, "labels": {"kmm-rs.test/webhook": id}}}),
            )
            .unwrap(),
        )
        .await
        .unwrap();
    let modules: Api<Module> = Api::namespaced(client.clone(), &ns);

    // Invalid: rawArgs together with moduleName. The API server may need a moment to pick up
    // the new webhook configuration, so retry until the webhook answers.
    let invalid = module(
        &ns,
        "invalid",
        json!({"moduleName": "m", "rawArgs": {"load": ["-v"], "unload": ["-v"]}}),
    );
    let expected = "admission webhook \"vmodule.kb.io\" denied the request: failed to validate modprobe: rawArgs cannot be set when moduleName is set";
    let message = poll(WAIT_TIMEOUT, "the Module webhook to deny", || {
        let modules = modules.clone();
        let invalid = invalid.clone();
        async move {
            match modules.create(&PostParams::default(), &invalid).await {
                Ok(_) => {
                    // Created before the webhook was active: remove it and try again.
                    let _ = modules.delete("invalid", &DeleteParams::default()).await;
                    None
                }
                Err(err) => Some(api_message(err)),
            }
        }
    })
    .await;
    assert_eq!(message, expected);

    // Valid: accepted.
    let valid = module(&ns, "valid", json!({"moduleName": "m"}));
    modules
        .create(&PostParams::default(), &valid)
        .await
        .unwrap();

    // Update rule: version may not go from "" to set.
    let err = modules
        .patch(
            "valid",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"moduleLoader": {"container": {"version": "v2"}}}})),
        )
        .await
        .unwrap_err();
    assert_eq!(
        api_message(err),
        "admission webhook \"vmodule.kb.io\" denied the request: cannot update to or from an empty version; please delete the Module and create it again"
    );

    // Deleting the namespace while it holds a Module is refused.
    let err = namespaces
        .delete(&ns, &DeleteParams::default())
        .await
        .unwrap_err();
    assert_eq!(
        api_message(err),
        "admission webhook \"namespace-deletion.kmm.sigs.k8s.io\" denied the request: namespace contains one or more Module resources; delete those before deleting the namespace"
    );
    // Without Modules it goes.
    modules
        .delete("valid", &DeleteParams::default())
        .await
        .unwrap();
    wait_for(
        &modules,
        "valid",
        WAIT_TIMEOUT,
        "deleted",
        |m: Option<&Module>| m.is_none(),
    )
    .await
    .unwrap();
    namespaces
        .delete(&ns, &DeleteParams::default())
        .await
        .unwrap();

    // PreflightValidation v1beta2.
    let pvs: Api<PreflightValidation> = Api::all(client.clone());
    let pv_name = env.unique_name("pv");
    let pv: PreflightValidation = serde_json::from_value(json!({
        "apiVersion": "kmm.sigs.x-k8s.io/v1beta2", "kind": "PreflightValidation",
        "metadata": {"name": pv_name, "labels": {"kmm-rs.test/webhook": id}},
        "spec": {"kernelVersion": "6"}
    }))
    .unwrap();
    let err = pvs.create(&PostParams::default(), &pv).await.unwrap_err();
    assert_eq!(
        api_message(err),
        "admission webhook \"vpreflightvalidation.kb.io\" denied the request: invalid kernelVersion 6"
    );
    let mut good = pv.clone();
    good.spec.kernel_version = "6.1.0-13-amd64".into();
    pvs.create(&PostParams::default(), &good).await.unwrap();
    pvs.delete(&pv_name, &DeleteParams::default())
        .await
        .unwrap();

    // Someone re-applies the configuration without a caBundle: the webhook puts it back.
    let mut stripped = vwcs.get(&vwc_name).await.unwrap();
    for w in stripped.webhooks.iter_mut().flatten() {
        w.client_config.ca_bundle = None;
    }
    vwcs.replace(&vwc_name, &PostParams::default(), &stripped)
        .await
        .unwrap();
    wait_for(
        &vwcs,
        &vwc_name,
        WAIT_TIMEOUT,
        "carrying the CA again",
        |v: Option<&ValidatingWebhookConfiguration>| {
            v.and_then(|v| v.webhooks.as_ref())
                .is_some_and(|ws| ws.iter().all(|w| w.client_config.ca_bundle.is_some()))
        },
    )
    .await
    .unwrap();
    drop(webhook);
}
