use super::*;
use k8s_openapi::jiff::Timestamp;
use kmm_api::v1beta1::{ModprobeSpec, NodeModulesConfigSpec, NodeModulesConfigStatus};

fn config(kernel: &str, image: &str) -> ModuleConfig {
    ModuleConfig {
        kernel_version: kernel.into(),
        container_image: image.into(),
        image_pull_policy: "IfNotPresent".into(),
        insecure_pull: false,
        in_tree_modules_to_remove: vec![],
        in_tree_module_to_remove: String::new(),
        modprobe: ModprobeSpec {
            module_name: "kmod".into(),
            dir_name: "/opt".into(),
            ..ModprobeSpec::default()
        },
    }
}

fn item() -> ModuleItem {
    ModuleItem {
        name: "kmod".into(),
        namespace: "labs".into(),
        service_account_name: "default".into(),
        tolerations: crate::targeting::internal_tolerations(),
        ..ModuleItem::default()
    }
}

fn nmc(spec: Option<ModuleConfig>, status: Option<(ModuleConfig, &str)>) -> NodeModulesConfig {
    let mut nmc = NodeModulesConfig::new(
        "node-1",
        NodeModulesConfigSpec {
            modules: spec
                .into_iter()
                .map(|config| NodeModuleSpec {
                    item: item(),
                    config,
                })
                .collect(),
        },
    );
    nmc.metadata.uid = Some("nmc-uid".into());
    nmc.status = Some(NodeModulesConfigStatus {
        modules: status
            .into_iter()
            .map(|(config, boot)| NodeModuleStatus {
                item: item(),
                config: Some(config),
                boot_id: boot.into(),
                last_failure: None,
            })
            .collect(),
    });
    nmc
}

fn node() -> NodeState {
    NodeState {
        name: "node-1".into(),
        ready: true,
        boot_id: "boot-1".into(),
        ..NodeState::default()
    }
}

fn settings() -> WorkerSettings {
    WorkerSettings {
        image: "kmm/worker:1".into(),
        firmware_host_path: Some("/lib/firmware".into()),
        run_as_user: 0,
        selinux_type: "spc_t".into(),
    }
}

fn now() -> Time {
    Time(Timestamp::from_second(1_800_000_000).unwrap())
}

fn pod_from(plan_pod: &Pod, phase: &str) -> WorkerPodState {
    let mut state = worker_pod_state(plan_pod).unwrap();
    state.phase = phase.into();
    state
}

fn action_of(pod: &Pod) -> String {
    pod.metadata.labels.as_ref().unwrap()[label::WORKER_ACTION].clone()
}

fn config_of(pod: &Pod) -> ModuleConfig {
    worker_pod_state(pod).unwrap().config.unwrap()
}

const K1: &str = "6.1.0-56-amd64";
const K2: &str = "6.1.0-57-amd64";

#[test]
fn new_entry_starts_a_loader_then_its_success_becomes_status_and_a_ready_label() {
    let n = nmc(Some(config(K1, "r/kmod:1")), None);
    let plan = plan_nmc(&n, &node(), &[], &settings(), &now());
    assert_eq!(plan.create.len(), 1);
    assert_eq!(action_of(&plan.create[0]), "Load");
    assert!(plan.add_node_labels.is_empty());

    let done = pod_from(&plan.create[0], "Succeeded");
    let plan = plan_nmc(&n, &node(), &[done], &settings(), &now());
    assert!(plan.create.is_empty());
    assert_eq!(
        plan.delete,
        [PodRef {
            namespace: "labs".into(),
            name: "kmm-worker-node-1-kmod".into()
        }]
    );
    assert_eq!(plan.status.len(), 1);
    assert_eq!(
        plan.status[0].config.as_ref(),
        Some(&config(K1, "r/kmod:1"))
    );
    assert_eq!(plan.status[0].boot_id, "boot-1");
    assert_eq!(
        plan.add_node_labels.keys().collect::<Vec<_>>(),
        ["kmm.node.kubernetes.io/labs.kmod.ready"]
    );
    assert_eq!(plan.events.len(), 1);
    assert_eq!(plan.events[0].reason, "ModuleLoaded");
    assert_eq!(
        plan.events[0].note,
        "Module labs/kmod loaded into the kernel"
    );
}

#[test]
fn loaded_and_labelled_is_a_fixed_point() {
    let n = nmc(
        Some(config(K1, "r/kmod:1")),
        Some((config(K1, "r/kmod:1"), "boot-1")),
    );
    let mut nd = node();
    nd.labels
        .insert(wire::module_ready_label("labs", "kmod"), String::new());
    let plan = plan_nmc(&n, &nd, &[], &settings(), &now());
    assert_eq!(
        plan,
        NmcPlan {
            status: n.status.clone().unwrap().modules,
            ..NmcPlan::default()
        }
    );
}

#[test]
fn config_change_on_the_same_kernel_unloads_the_old_config_first() {
    let n = nmc(
        Some(config(K1, "r/kmod:2")),
        Some((config(K1, "r/kmod:1"), "boot-1")),
    );
    let mut nd = node();
    nd.labels
        .insert(wire::module_ready_label("labs", "kmod"), String::new());
    let plan = plan_nmc(&n, &nd, &[], &settings(), &now());
    assert_eq!(plan.create.len(), 1);
    assert_eq!(action_of(&plan.create[0]), "Unload");
    assert_eq!(config_of(&plan.create[0]).container_image, "r/kmod:1");
    assert!(
        plan.remove_node_labels
            .contains("kmm.node.kubernetes.io/labs.kmod.ready"),
        "not loaded with the current config"
    );
    assert!(
        plan.events.is_empty(),
        "still loaded (old config): no ModuleUnloaded yet"
    );

    let unloaded = pod_from(&plan.create[0], "Succeeded");
    let plan = plan_nmc(&n, &node(), &[unloaded], &settings(), &now());
    assert!(plan.status.is_empty());
    assert_eq!(
        plan.events.iter().map(|e| e.reason).collect::<Vec<_>>(),
        ["ModuleUnloaded"]
    );
    // The load pod has the unload pod's name: it waits until that one is gone (no 409).
    assert!(plan.create.is_empty(), "{:?}", plan.create);
    assert_eq!(plan.delete.len(), 1);

    let mut after = n.clone();
    after.status = Some(NodeModulesConfigStatus {
        modules: plan.status.clone(),
    });
    let plan = plan_nmc(&after, &node(), &[], &settings(), &now());
    assert_eq!(plan.create.len(), 1);
    assert_eq!(action_of(&plan.create[0]), "Load");
    assert_eq!(config_of(&plan.create[0]).container_image, "r/kmod:2");
}

#[test]
fn no_new_worker_pod_while_the_previous_one_terminates() {
    let n = nmc(Some(config(K1, "r/kmod:1")), None);
    let plan = plan_nmc(&n, &node(), &[], &settings(), &now());
    assert_eq!(plan.create.len(), 1);
    let mut terminating = pod_from(&plan.create[0], "Running");
    terminating.deleting = true;
    terminating.has_finalizer = false;
    let plan = plan_nmc(&n, &node(), &[terminating], &settings(), &now());
    assert!(plan.create.is_empty(), "{:?}", plan.create);
    assert!(plan.delete.is_empty());
}

#[test]
fn kernel_upgrade_loads_without_unloading() {
    let n = nmc(
        Some(config(K2, "r/kmod:k2")),
        Some((config(K1, "r/kmod:k1"), "boot-1")),
    );
    let mut nd = node();
    nd.boot_id = "boot-2".into();
    let plan = plan_nmc(&n, &nd, &[], &settings(), &now());
    assert_eq!(plan.create.len(), 1);
    assert_eq!(action_of(&plan.create[0]), "Load");
    assert_eq!(config_of(&plan.create[0]).kernel_version, K2);
}

#[test]
fn reboot_reloads_and_not_ready_nodes_wait() {
    let n = nmc(
        Some(config(K1, "r/kmod:1")),
        Some((config(K1, "r/kmod:1"), "boot-1")),
    );
    let mut nd = node();
    nd.boot_id = "boot-2".into();
    let plan = plan_nmc(&n, &nd, &[], &settings(), &now());
    assert_eq!(
        plan.create.iter().map(action_of).collect::<Vec<_>>(),
        ["Load"]
    );
    nd.ready = false;
    assert!(
        plan_nmc(&n, &nd, &[], &settings(), &now())
            .create
            .is_empty()
    );
}

#[test]
fn removed_entry_is_unloaded_then_forgotten_with_an_event() {
    let n = nmc(None, Some((config(K1, "r/kmod:1"), "boot-1")));
    let mut nd = node();
    nd.labels
        .insert(wire::module_ready_label("labs", "kmod"), String::new());
    let plan = plan_nmc(&n, &nd, &[], &settings(), &now());
    assert_eq!(
        plan.create.iter().map(action_of).collect::<Vec<_>>(),
        ["Unload"]
    );
    assert!(
        plan.remove_node_labels
            .contains("kmm.node.kubernetes.io/labs.kmod.ready")
    );

    let done = pod_from(&plan.create[0], "Succeeded");
    let plan = plan_nmc(&n, &nd, &[done], &settings(), &now());
    assert!(plan.status.is_empty());
    assert!(plan.create.is_empty());
    assert_eq!(
        plan.events.iter().map(|e| e.reason).collect::<Vec<_>>(),
        ["ModuleUnloaded"]
    );
    assert_eq!(
        plan.events[0].note,
        "Module labs/kmod unloaded from the kernel"
    );
}

#[test]
fn orphan_status_of_a_rebooted_node_is_dropped_without_unloading() {
    let n = nmc(None, Some((config(K1, "r/kmod:1"), "boot-1")));
    let mut nd = node();
    nd.boot_id = "boot-2".into();
    let plan = plan_nmc(&n, &nd, &[], &settings(), &now());
    assert!(plan.create.is_empty());
    assert!(plan.status.is_empty());
}

#[test]
fn crash_looping_loader_records_the_failure_once_and_stays() {
    let n = nmc(Some(config(K1, "r/kmod:1")), None);
    let plan = plan_nmc(&n, &node(), &[], &settings(), &now());
    let mut pod = pod_from(&plan.create[0], "Running");
    pod.restarted = true;
    pod.failure = Some("UnknownSymbol: kmm_ci_b: Unknown symbol provider_fn (err -2)".into());
    let plan = plan_nmc(&n, &node(), &[pod.clone()], &settings(), &now());
    assert!(
        plan.create.is_empty() && plan.delete.is_empty(),
        "same template: keep retrying in place"
    );
    let failure = plan.status[0].last_failure.clone().unwrap();
    assert_eq!(failure.reason, "UnknownSymbol");
    assert_eq!(
        failure.message,
        "kmm_ci_b: Unknown symbol provider_fn (err -2)"
    );
    assert!(plan.status[0].config.is_none(), "never loaded");
    assert_eq!(plan.events.len(), 1);
    assert_eq!(
        (plan.events[0].type_, plan.events[0].reason),
        ("Warning", "ModuleLoadFailed")
    );
    assert!(plan.add_node_labels.is_empty());

    let mut recorded = n.clone();
    recorded.status = Some(NodeModulesConfigStatus {
        modules: plan.status.clone(),
    });
    let again = plan_nmc(&recorded, &node(), &[pod.clone()], &settings(), &now());
    assert!(again.events.is_empty(), "the same failure is reported once");
    assert!(
        again.create.is_empty(),
        "a failure-only status is not 'loaded'"
    );

    // The user fixes the Module: the desired pod changes, the crash-looping one is replaced.
    let fixed = nmc(Some(config(K1, "r/kmod:2")), None);
    let mut fixed_recorded = fixed.clone();
    fixed_recorded.status = recorded.status.clone();
    let replaced = plan_nmc(&fixed_recorded, &node(), &[pod], &settings(), &now());
    assert_eq!(replaced.delete.len(), 1);
}

#[test]
fn failed_pod_is_recorded_and_removed() {
    let n = nmc(None, Some((config(K1, "r/kmod:1"), "boot-1")));
    let plan = plan_nmc(&n, &node(), &[], &settings(), &now());
    let mut pod = pod_from(&plan.create[0], "Failed");
    pod.failure = Some("ModuleInUse: Module kmod is in use".into());
    let plan = plan_nmc(&n, &node(), &[pod], &settings(), &now());
    assert_eq!(plan.delete.len(), 1);
    assert_eq!(
        plan.status[0].last_failure.as_ref().unwrap().reason,
        "ModuleInUse"
    );
    assert!(plan.status[0].config.is_some(), "still loaded");
    assert_eq!(plan.events[0].reason, "ModuleUnloadFailed");
}

#[test]
fn cordon_keeps_the_ready_label_but_other_taints_block() {
    let n = nmc(
        Some(config(K1, "r/kmod:1")),
        Some((config(K1, "r/kmod:1"), "boot-1")),
    );
    let mut nd = node();
    nd.labels
        .insert(wire::module_ready_label("labs", "kmod"), String::new());
    nd.taints = vec![Taint {
        key: wire::TAINT_UNSCHEDULABLE.into(),
        effect: "NoSchedule".into(),
        ..Taint::default()
    }];
    let plan = plan_nmc(&n, &nd, &[], &settings(), &now());
    assert!(plan.remove_node_labels.is_empty() && plan.create.is_empty());

    nd.taints = vec![Taint {
        key: "maintenance".into(),
        effect: "NoExecute".into(),
        ..Taint::default()
    }];
    let plan = plan_nmc(&n, &nd, &[], &settings(), &now());
    assert!(
        plan.remove_node_labels
            .contains("kmm.node.kubernetes.io/labs.kmod.ready")
    );

    let fresh = nmc(Some(config(K1, "r/kmod:1")), None);
    nd.taints = vec![Taint {
        key: wire::TAINT_UNSCHEDULABLE.into(),
        effect: "NoSchedule".into(),
        ..Taint::default()
    }];
    assert!(
        plan_nmc(&fresh, &nd, &[], &settings(), &now())
            .create
            .is_empty(),
        "a cordon blocks new loads"
    );
}

#[test]
fn orphan_pods_and_stale_labels_are_cleaned_up() {
    let mut n = nmc(None, None);
    n.metadata.labels = Some(BTreeMap::from([
        (wire::module_in_use_label("labs", "gone"), String::new()),
        (wire::module_in_use_label("labs", "busy"), String::new()),
    ]));
    let busy = nmc(Some(config(K1, "r/busy:1")), None);
    let busy_entry = &busy.spec.modules[0];
    let mut item = busy_entry.item.clone();
    item.name = "busy".into();
    let pod = render_worker_pod(
        &WorkerPodInput {
            node: "node-1",
            nmc_uid: "nmc-uid",
            module: "busy",
            namespace: "labs",
            service_account: "default",
            image_repo_secret: None,
            tolerations: &[],
            version: "",
            config: &busy_entry.config,
        },
        WorkerAction::Unload,
        &settings(),
    )
    .unwrap();
    let mut busy_status = n.clone();
    busy_status.status = Some(NodeModulesConfigStatus {
        modules: vec![NodeModuleStatus {
            item,
            config: Some(busy_entry.config.clone()),
            boot_id: "boot-1".into(),
            last_failure: None,
        }],
    });
    let running = pod_from(&pod, "Running");
    let plan = plan_nmc(
        &busy_status,
        &node(),
        std::slice::from_ref(&running),
        &settings(),
        &now(),
    );
    assert_eq!(
        plan.remove_nmc_labels.iter().collect::<Vec<_>>(),
        [&wire::module_in_use_label("labs", "gone")]
    );

    let mut nd = node();
    nd.labels.insert(
        "kmm.node.kubernetes.io/old-kmod.ready".into(),
        String::new(),
    );
    let plan = plan_nmc(&n, &nd, &[running], &settings(), &now());
    assert_eq!(
        plan.delete.len(),
        1,
        "a pod for a module in neither spec nor status goes"
    );
    assert!(
        plan.remove_node_labels
            .contains("kmm.node.kubernetes.io/old-kmod.ready")
    );
}

#[test]
fn version_ready_label_follows_the_loaded_version() {
    let mut n = nmc(
        Some(config(K1, "r/kmod:1")),
        Some((config(K1, "r/kmod:1"), "boot-1")),
    );
    n.spec.modules[0].item.version = "v2".into();
    n.status.as_mut().unwrap().modules[0].item.version = "v2".into();
    let plan = plan_nmc(&n, &node(), &[], &settings(), &now());
    assert_eq!(
        plan.add_node_labels
            .get("kmm.node.kubernetes.io/labs.kmod.version.ready")
            .map(String::as_str),
        Some("v2")
    );
}

#[test]
fn failure_messages_are_split_into_reason_and_text() {
    let cases = [
        (
            "SignatureRejected: Key was rejected by service",
            ("SignatureRejected", "Key was rejected by service"),
        ),
        (
            "modprobe: FATAL: Module x not found",
            ("WorkerFailed", "modprobe: FATAL: Module x not found"),
        ),
        ("plain text", ("WorkerFailed", "plain text")),
        ("", ("WorkerFailed", "")),
    ];
    for (input, (reason, text)) in cases {
        assert_eq!(
            parse_failure(input),
            (reason.to_owned(), text.to_owned()),
            "{input}"
        );
    }
}

#[test]
fn a_slimmed_worker_pod_reads_the_same_and_is_much_smaller() {
    use k8s_openapi::api::core::v1::{
        ContainerState, ContainerStateTerminated, ContainerStatus, PodCondition, PodStatus,
    };
    let n = nmc(Some(config(K1, "r/kmod:1")), None);
    let mut pod = plan_nmc(&n, &node(), &[], &settings(), &now()).create[0].clone();
    let failed = ContainerState {
        terminated: Some(ContainerStateTerminated {
            exit_code: 1,
            message: Some("UnknownSymbol: kmod: Unknown symbol x (err -2)".into()),
            ..Default::default()
        }),
        ..Default::default()
    };
    pod.status = Some(PodStatus {
        phase: Some("Running".into()),
        conditions: Some(vec![PodCondition {
            type_: "Ready".into(),
            status: "False".into(),
            ..Default::default()
        }]),
        host_ip: Some("10.0.0.1".into()),
        container_statuses: Some(vec![ContainerStatus {
            name: "worker".into(),
            image: "registry.example.com/kmm-worker:1".into(),
            image_id: "sha256:0123".into(),
            restart_count: 2,
            last_state: Some(failed),
            ..Default::default()
        }]),
        ..Default::default()
    });
    pod.metadata.deletion_timestamp = Some(now());
    let full = worker_pod_state(&pod).unwrap();
    assert!(full.restarted && full.deleting && full.failure.is_some());
    assert_eq!(full.config, Some(config(K1, "r/kmod:1")));

    let mut slim = pod.clone();
    slim_worker_pod(&mut slim);
    assert_eq!(worker_pod_state(&slim).unwrap(), full);
    assert_eq!(
        slim.spec.as_ref().unwrap().node_name.as_deref(),
        Some("node-1")
    );
    let size = |p: &Pod| serde_json::to_vec(p).unwrap().len();
    assert!(
        size(&slim) * 2 < size(&pod),
        "slim {} bytes, full {} bytes",
        size(&slim),
        size(&pod)
    );
}
