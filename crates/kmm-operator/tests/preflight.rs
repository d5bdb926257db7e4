//! Tier 2: PreflightValidation against the real control plane. The reconcilers run in-process
//! (registry image checks against the loopback registry); kwok runs the kaniko build pod; the
//! `kmm-operator webhook` binary serves the v1beta1 ⇄ v1beta2 conversion the API server calls.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{Operator, free_port, http_get, poll};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Event};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kmm_api::v1beta1::{Module, ModuleImagesConfig};
use kmm_api::v1beta2::{
    PreflightValidation, PreflightValidationModuleStatus, VerificationStage, VerificationStatus,
};
use kmm_operator::controllers::ImageCheckMode;
use kmm_testenv::registry::Registry;
use kmm_testenv::{FakeNode, TestEnv, WAIT_TIMEOUT};
use kube::ResourceExt;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch,
    PatchParams, PostParams,
};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::{Value, json};

/// Not a kernel any node runs: preflight is about the next kernel.
const KERNEL: &str = "6.9.0-7.pf.x86_64";
const TIMEOUT: Duration = Duration::from_secs(120);

fn module(ns: &str, name: &str, mapping: Value) -> Module {
    serde_json::from_value(json!({
        "apiVersion": "kmm.sigs.x-k8s.io/v1beta1", "kind": "Module",
        "metadata": {"name": name, "namespace": ns},
        // No node carries this label: verification needs no node running the kernel.
        "spec": {"selector": {"test.kmm-rs.dev/preflight": ns},
                 "moduleLoader": {"container": {
                     "modprobe": {"moduleName": name},
                     "kernelMappings": [mapping]}}}
    }))
    .unwrap()
}

/// The entries of `ns` in the PreflightValidation's status, by Module name.
fn entries(
    pv: Option<&PreflightValidation>,
    ns: &str,
) -> BTreeMap<String, PreflightValidationModuleStatus> {
    pv.and_then(|pv| pv.status.as_ref())
        .map(|s| {
            s.modules
                .iter()
                .filter(|m| m.namespace == ns)
                .map(|m| (m.name.clone(), m.clone()))
                .collect()
        })
        .unwrap_or_default()
}

async fn wait_status(
    api: &Api<PreflightValidation>,
    name: &str,
    ns: &str,
    what: &str,
    done: impl Fn(&BTreeMap<String, PreflightValidationModuleStatus>) -> bool,
) -> BTreeMap<String, PreflightValidationModuleStatus> {
    poll(TIMEOUT, what, || {
        let api = api.clone();
        let done = &done;
        async move {
            let current = entries(api.get_opt(name).await.ok().flatten().as_ref(), ns);
            done(&current).then_some(current)
        }
    })
    .await
}

fn status_of(
    entries: &BTreeMap<String, PreflightValidationModuleStatus>,
    name: &str,
) -> Option<VerificationStatus> {
    entries.get(name).map(|e| e.verification_status)
}

#[tokio::test]
async fn preflight_verifies_every_module_for_the_next_kernel() {
    let env = TestEnv::get();
    let client = env.client().await.unwrap();
    common::start_shared_operator(common::test_controller_config(ImageCheckMode::Registry));
    let ns = env.namespace(&client, "preflight").await.unwrap();
    let registry = Registry::shared();
    // Somewhere for the build pod to run (kwok plays kaniko); it runs no module.
    FakeNode::new(env.unique_name("pf-builder"), "5.14.0-1.el9.x86_64")
        .create(&client)
        .await
        .unwrap();

    let image = |name: &str| registry.image(&format!("{ns}/{name}:${{KERNEL_FULL_VERSION}}"));
    registry
        .push_image(&format!("{ns}/present:{KERNEL}"))
        .await
        .unwrap();
    Api::<ConfigMap>::namespaced(client.clone(), &ns)
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "dockerfile"},
                "data": {"dockerfile": "FROM example.org/base\nRUN make\n"}}))
            .unwrap(),
        )
        .await
        .unwrap();
    let modules: Api<Module> = Api::namespaced(client.clone(), &ns);
    let tls = json!({"insecure": true});
    for m in [
        // A mapping and an image that exists.
        module(
            &ns,
            "present",
            json!({"literal": KERNEL, "containerImage": image("present"), "registryTLS": tls}),
        ),
        // A mapping whose image is missing and nothing builds it.
        module(
            &ns,
            "missing",
            json!({"regexp": r"^6\.9\.", "containerImage": image("missing"), "registryTLS": tls}),
        ),
        // No mapping for the kernel.
        module(
            &ns,
            "unmapped",
            json!({"literal": "5.14.0-1.el9.x86_64", "containerImage": image("unmapped")}),
        ),
        // Built in the cluster.
        module(
            &ns,
            "built",
            json!({"regexp": r"^6\.", "containerImage": image("built"), "registryTLS": tls,
                   "build": {"dockerfileConfigMap": {"name": "dockerfile"}}}),
        ),
    ] {
        modules.create(&PostParams::default(), &m).await.unwrap();
    }

    // Every status the PreflightValidation goes through, from before it exists.
    let pv_name = env.unique_name("pfv");
    let pvs: Api<PreflightValidation> = Api::all(client.clone());
    let history = tokio::spawn({
        let (pvs, pv_name, ns) = (pvs.clone(), pv_name.clone(), ns.clone());
        async move {
            let mut seen: Vec<BTreeMap<String, PreflightValidationModuleStatus>> = Vec::new();
            let stream = watcher(
                pvs,
                watcher::Config::default().fields(&format!("metadata.name={pv_name}")),
            )
            .applied_objects();
            let mut stream = std::pin::pin!(stream);
            while let Some(Ok(pv)) = stream.next().await {
                let now = entries(Some(&pv), &ns);
                let done = now.len() == 4
                    && now
                        .values()
                        .all(|e| e.verification_status != VerificationStatus::InProgress);
                seen.push(now);
                if done {
                    break;
                }
            }
            seen
        }
    });

    let pv: PreflightValidation = serde_json::from_value(json!({
        "apiVersion": "kmm.sigs.x-k8s.io/v1beta2", "kind": "PreflightValidation",
        "metadata": {"name": pv_name},
        "spec": {"kernelVersion": KERNEL, "pushBuiltImage": false}
    }))
    .unwrap();
    pvs.create(&PostParams::default(), &pv).await.unwrap();

    let done = wait_status(&pvs, &pv_name, &ns, "every Module verified", |e| {
        e.len() == 4
            && e.values()
                .all(|e| e.verification_status != VerificationStatus::InProgress)
    })
    .await;
    assert_eq!(
        status_of(&done, "present"),
        Some(VerificationStatus::Success)
    );
    assert_eq!(
        done["present"].status_reason,
        format!(
            "verified image exists: {}",
            registry.image(&format!("{ns}/present:{KERNEL}"))
        )
    );
    assert_eq!(
        status_of(&done, "missing"),
        Some(VerificationStatus::Failure)
    );
    assert!(
        done["missing"]
            .status_reason
            .starts_with("verified image does not exist: "),
        "{}",
        done["missing"].status_reason
    );
    assert!(
        done["missing"].status_reason.contains("NotFound"),
        "{}",
        done["missing"].status_reason
    );
    assert_eq!(
        status_of(&done, "unmapped"),
        Some(VerificationStatus::Failure)
    );
    assert!(
        done["unmapped"]
            .status_reason
            .starts_with("mapping not found: ")
            && done["unmapped"].status_reason.contains(KERNEL),
        "{}",
        done["unmapped"].status_reason
    );
    assert_eq!(status_of(&done, "built"), Some(VerificationStatus::Success));
    assert!(
        done.values()
            .all(|e| e.verification_stage == VerificationStage::Done)
    );

    // The build was seen in progress (stage Image) before it succeeded.
    let seen = tokio::time::timeout(WAIT_TIMEOUT, history)
        .await
        .expect("the watch saw the final status")
        .unwrap();
    let built: Vec<_> = seen
        .iter()
        .filter_map(|s| s.get("built"))
        .map(|e| (e.verification_status, e.verification_stage))
        .collect();
    assert_eq!(
        built.first(),
        Some(&(VerificationStatus::InProgress, VerificationStage::Image)),
        "{built:?}"
    );
    assert_eq!(
        built.last(),
        Some(&(VerificationStatus::Success, VerificationStage::Done)),
        "{built:?}"
    );
    // The build pod really ran: its MIC went through NeedsBuilding.
    let mics: Api<ModuleImagesConfig> = Api::namespaced(client.clone(), &ns);
    let built_mic = mics.get("built-preflight").await.unwrap();
    assert_eq!(
        built_mic.owner_references()[0].name,
        pv_name,
        "the PreflightValidation controls its ModuleImagesConfigs"
    );
    assert!(!built_mic.spec.push_built_image);

    // A failed Module is announced on the PreflightValidation.
    let events: Api<Event> = Api::all(client.clone());
    poll(WAIT_TIMEOUT, "the VerificationFailed event", || {
        let events = events.clone();
        let pv_name = pv_name.clone();
        let ns = ns.clone();
        async move {
            let list = events
                .list(&ListParams::default().fields(&format!(
                    "involvedObject.name={pv_name},reason=VerificationFailed"
                )))
                .await
                .ok()?;
            list.items
                .iter()
                .any(|e| {
                    e.message.as_deref().is_some_and(|m| {
                        m.starts_with(&format!("Module {ns}/unmapped: mapping not found"))
                    })
                })
                .then_some(())
        }
    })
    .await;

    // lastTransitionTime moves only on a real transition: once the clock has left the second
    // of the last transition, a new Module makes the reconciler rewrite the status, and every
    // earlier entry keeps its time.
    let latest = done
        .values()
        .map(|e| e.last_transition_time.0)
        .max()
        .unwrap();
    poll(
        WAIT_TIMEOUT,
        "the clock to pass the last transition",
        || async move {
            (k8s_openapi::jiff::Timestamp::now().as_second() > latest.as_second() + 1).then_some(())
        },
    )
    .await;
    modules
        .create(
            &PostParams::default(),
            &module(
                &ns,
                "late",
                json!({"literal": "4.0.0", "containerImage": image("late")}),
            ),
        )
        .await
        .unwrap();
    let after = wait_status(&pvs, &pv_name, &ns, "the new Module verified", |e| {
        e.contains_key("late")
    })
    .await;
    assert!(after["late"].last_transition_time.0 > latest);
    for (name, entry) in &done {
        assert_eq!(
            after[name].last_transition_time, entry.last_transition_time,
            "{name} kept its transition time"
        );
    }

    // A Module that goes loses its entry.
    modules
        .delete("late", &DeleteParams::default())
        .await
        .unwrap();
    wait_status(
        &pvs,
        &pv_name,
        &ns,
        "the deleted Module's entry gone",
        |e| !e.contains_key("late") && e.len() == 4,
    )
    .await;

    read_back_through_v1beta1(env, &client, &pv_name, &ns).await;

    // Deleting the PreflightValidation garbage-collects its ModuleImagesConfigs.
    pvs.delete(&pv_name, &DeleteParams::default())
        .await
        .unwrap();
    poll(
        TIMEOUT,
        "the -preflight ModuleImagesConfigs collected",
        || {
            let mics = mics.clone();
            async move {
                let list = mics.list(&ListParams::default()).await.ok()?;
                (!list
                    .items
                    .iter()
                    .any(|m| m.name_any().ends_with("-preflight")))
                .then_some(())
            }
        },
    )
    .await;
}

/// Points the CRD's conversion at a `kmm-operator webhook` on loopback and reads the
/// PreflightValidation as v1beta1: its status comes back keyed by `namespace/name` and by `name`.
async fn read_back_through_v1beta1(env: &TestEnv, client: &kube::Client, pv_name: &str, ns: &str) {
    let operator_ns = env.namespace(client, "op-convert").await.unwrap();
    let (port, health) = (free_port(), free_port());
    let crd_name = "preflightvalidations.kmm.sigs.x-k8s.io";
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.patch(
        crd_name,
        &PatchParams::default(),
        &Patch::Merge(&json!({"spec": {"conversion": {
            "strategy": "Webhook",
            "webhook": {"conversionReviewVersions": ["v1"],
                        "clientConfig": {"url": format!("https://127.0.0.1:{port}/convert")}}}}})),
    )
    .await
    .unwrap();
    let (port_s, health_s) = (port.to_string(), format!("127.0.0.1:{health}"));
    let _webhook = Operator::start(
        env,
        "convert",
        &[
            "webhook",
            "--enable-preflightvalidation",
            "--bind-host",
            "127.0.0.1",
            "--port",
            &port_s,
            "--health-probe-bind-address",
            &health_s,
            "--tls-san",
            "127.0.0.1",
            "--webhook-configuration=",
            "--conversion-crd",
            crd_name,
        ],
        &[("OPERATOR_NAMESPACE", operator_ns.as_str())],
    );
    poll(WAIT_TIMEOUT, "webhook /readyz", || async {
        http_get(health, "/readyz").await.filter(|(s, _)| *s == 200)
    })
    .await;

    let v1beta1 = ApiResource::from_gvk(&GroupVersionKind::gvk(
        "kmm.sigs.x-k8s.io",
        "v1beta1",
        "PreflightValidation",
    ));
    let old: Api<DynamicObject> = Api::all_with(client.clone(), &v1beta1);
    // The API server calls the webhook once the CRD carries its CA.
    let object = poll(WAIT_TIMEOUT, "the v1beta1 read through conversion", || {
        let old = old.clone();
        async move { old.get(pv_name).await.ok() }
    })
    .await;
    assert_eq!(
        object.types.as_ref().unwrap().api_version,
        "kmm.sigs.x-k8s.io/v1beta1"
    );
    assert_eq!(object.data["spec"]["kernelVersion"], KERNEL);
    let statuses = &object.data["status"]["crStatuses"];
    for key in [format!("{ns}/present"), "present".to_owned()] {
        assert_eq!(
            statuses[&key]["verificationStatus"], "Success",
            "{statuses}"
        );
        assert_eq!(statuses[&key]["verificationStage"], "Done", "{statuses}");
    }
    assert_eq!(
        statuses[format!("{ns}/unmapped")]["verificationStatus"],
        "Failure"
    );

    // Back to no conversion: the webhook process ends with this function.
    crds.patch(
        crd_name,
        &PatchParams::default(),
        &Patch::Merge(&json!({"spec": {"conversion": {"strategy": "None", "webhook": null}}})),
    )
    .await
    .unwrap();
}
