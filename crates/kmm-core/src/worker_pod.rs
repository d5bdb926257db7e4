//! The worker pod that loads or unloads one module on one node, rendered exactly as Go KMM
//! renders it (names, labels, annotations, volumes, security context, finalizer, owner), so
//! clusters can switch operators with worker pods in flight.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, Container, DownwardAPIVolumeFile, DownwardAPIVolumeSource, EmptyDirVolumeSource,
    HostPathVolumeSource, LocalObjectReference, ObjectFieldSelector, Pod, PodSpec,
    ResourceRequirements, SELinuxOptions, SecurityContext, Toleration, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kmm_api::v1beta1::ModuleConfig;
use kmm_api::wire::{self, annotation, finalizer, label};

/// Load or unload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WorkerAction {
    /// Load the module.
    Load,
    /// Unload the module.
    Unload,
}

impl WorkerAction {
    /// Value of the `worker-action` label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Load => label::WORKER_ACTION_LOAD,
            Self::Unload => label::WORKER_ACTION_UNLOAD,
        }
    }

    /// The worker's subcommand.
    fn verb(self) -> &'static str {
        match self {
            Self::Load => "load",
            Self::Unload => "unload",
        }
    }

    /// Reads the `worker-action` label.
    pub fn from_label(value: &str) -> Option<Self> {
        match value {
            label::WORKER_ACTION_LOAD => Some(Self::Load),
            label::WORKER_ACTION_UNLOAD => Some(Self::Unload),
            _ => None,
        }
    }
}

/// Operator settings that shape worker pods.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerSettings {
    /// The worker image.
    pub image: String,
    /// Host firmware directory; `None` when firmware loading is disabled.
    pub firmware_host_path: Option<String>,
    /// `runAsUser` of the worker container.
    pub run_as_user: i64,
    /// SELinux type of the worker container.
    pub selinux_type: String,
}

/// Everything about one module on one node that the pod is made from.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerPodInput<'a> {
    /// Node name (= NMC name).
    pub node: &'a str,
    /// UID of the node's NodeModulesConfig, the pod's controller.
    pub nmc_uid: &'a str,
    /// Module name.
    pub module: &'a str,
    /// Module namespace.
    pub namespace: &'a str,
    /// ServiceAccount of the pod.
    pub service_account: &'a str,
    /// Pull secret.
    pub image_repo_secret: Option<&'a LocalObjectReference>,
    /// Pod tolerations.
    pub tolerations: &'a [Toleration],
    /// Module version (load pods only).
    pub version: &'a str,
    /// What to load or unload.
    pub config: &'a ModuleConfig,
}

/// Why a worker pod cannot be rendered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    /// The module needs firmware but the operator has no firmware host path.
    #[error("firmwareHostPath wasn't set, while the Module requires firmware loading")]
    FirmwareHostPathUnset,
    /// Serialising the config or the tolerations failed.
    #[error("serialising the worker {what}: {message}")]
    Serialise {
        /// What was serialised.
        what: &'static str,
        /// The serialiser's message.
        message: String,
    },
}

const CONFIG_VOLUME: &str = "config";
const LIB_MODULES_VOLUME: &str = "lib-modules";
const TMP_VOLUME: &str = "tmp";
const MODULES_ORDER_VOLUME: &str = "modules-order";
const FIRMWARE_VOLUME: &str = "lib-firmware";
const CONFIG_DIR: &str = "/etc/kmm-worker";
const CONFIG_FILE: &str = "config.yaml";
const SOFTDEP_FILE: &str = "softdep.conf";
const SHARED_DIR: &str = "/tmp";

/// Content of the `softdep.conf` for a loading order: each module depends on the next one, so
/// modprobe loads the chain from its end.
pub fn softdep_conf(loading_order: &[String]) -> String {
    loading_order
        .windows(2)
        .map(|pair| format!("softdep {} pre: {}\n", pair[0], pair[1]))
        .collect()
}

/// The init container's script: copy the module tree (and firmware) out of the module image.
fn extractor_script(config: &ModuleConfig) -> String {
    let dir = &config.modprobe.dir_name;
    let mut script = format!(
        "\nmkdir -p {SHARED_DIR}{dir}/lib/modules;\ncp -R {dir}/lib/modules/{kernel} {SHARED_DIR}{dir}/lib/modules;\n",
        kernel = config.kernel_version
    );
    let firmware = &config.modprobe.firmware_path;
    if !firmware.is_empty() {
        script.push_str(&format!(
            "\nmkdir -p {SHARED_DIR}{firmware};\ncp -R {firmware}/* {SHARED_DIR}{firmware};\n"
        ));
    }
    script
}

fn yaml<T: serde::Serialize>(what: &'static str, value: &T) -> Result<String, RenderError> {
    serde_saphyr::to_string(value).map_err(|err| RenderError::Serialise {
        what,
        message: err.to_string(),
    })
}

fn mount(name: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: read_only.then_some(true),
        ..VolumeMount::default()
    }
}

fn annotation_volume(name: &str, annotation_key: &str, file: &str) -> Volume {
    Volume {
        name: name.into(),
        downward_api: Some(DownwardAPIVolumeSource {
            items: Some(vec![DownwardAPIVolumeFile {
                path: file.into(),
                field_ref: Some(ObjectFieldSelector {
                    field_path: format!("metadata.annotations['{annotation_key}']"),
                    ..ObjectFieldSelector::default()
                }),
                ..DownwardAPIVolumeFile::default()
            }]),
            ..DownwardAPIVolumeSource::default()
        }),
        ..Volume::default()
    }
}

fn host_path_volume(name: &str, path: &str, kind: &str) -> Volume {
    Volume {
        name: name.into(),
        host_path: Some(HostPathVolumeSource {
            path: path.into(),
            type_: Some(kind.into()),
        }),
        ..Volume::default()
    }
}

fn worker_resources() -> ResourceRequirements {
    let quantities = |cpu: &str, memory: &str| {
        BTreeMap::from([
            ("cpu".to_owned(), Quantity(cpu.into())),
            ("memory".to_owned(), Quantity(memory.into())),
        ])
    };
    ResourceRequirements {
        requests: Some(quantities("0.5", "64Mi")),
        limits: Some(quantities("1", "128Mi")),
        ..Default::default()
    }
}

/// Renders the worker pod, with its `worker-hash` annotation.
pub fn render_worker_pod(
    input: &WorkerPodInput<'_>,
    action: WorkerAction,
    settings: &WorkerSettings,
) -> Result<Pod, RenderError> {
    let config = input.config;
    let wants_firmware = !config.modprobe.firmware_path.is_empty();
    let firmware_host = match (wants_firmware, &settings.firmware_host_path) {
        (false, _) => None,
        (true, Some(path)) => Some(path.as_str()),
        (true, None) => return Err(RenderError::FirmwareHostPathUnset),
    };
    let loading_order = (action == WorkerAction::Load
        && !config.modprobe.modules_loading_order.is_empty())
    .then(|| softdep_conf(&config.modprobe.modules_loading_order));

    let mut annotations = BTreeMap::from([(
        annotation::WORKER_CONFIG.to_owned(),
        yaml("config", config)?,
    )]);
    if !input.tolerations.is_empty() {
        annotations.insert(
            annotation::WORKER_TOLERATIONS.to_owned(),
            yaml("tolerations", &input.tolerations)?,
        );
    }
    if action == WorkerAction::Load && !input.version.is_empty() {
        annotations.insert(
            annotation::WORKER_MODULE_VERSION.to_owned(),
            input.version.to_owned(),
        );
    }
    if let Some(softdep) = &loading_order {
        annotations.insert(annotation::MODULES_ORDER.to_owned(), softdep.clone());
    }

    let mut volumes = vec![
        annotation_volume(CONFIG_VOLUME, annotation::WORKER_CONFIG, CONFIG_FILE),
        host_path_volume(LIB_MODULES_VOLUME, "/lib/modules", "Directory"),
        Volume {
            name: TMP_VOLUME.into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Volume::default()
        },
    ];
    let mut worker_mounts = vec![
        mount(CONFIG_VOLUME, CONFIG_DIR, true),
        mount(LIB_MODULES_VOLUME, "/lib/modules", true),
        mount(LIB_MODULES_VOLUME, "/host/lib/modules", true),
        mount(TMP_VOLUME, SHARED_DIR, true),
    ];
    if loading_order.is_some() {
        volumes.push(annotation_volume(
            MODULES_ORDER_VOLUME,
            annotation::MODULES_ORDER,
            SOFTDEP_FILE,
        ));
        worker_mounts.push(mount(MODULES_ORDER_VOLUME, "/etc/modprobe.d", true));
    }
    let mut args = vec![
        "kmod".to_owned(),
        action.verb().to_owned(),
        format!("{CONFIG_DIR}/{CONFIG_FILE}"),
    ];
    if let Some(host) = firmware_host {
        volumes.push(host_path_volume(FIRMWARE_VOLUME, host, "DirectoryOrCreate"));
        worker_mounts.push(mount(FIRMWARE_VOLUME, host, false));
        args.extend(["--firmware-path".to_owned(), host.to_owned()]);
    }

    let security_context = if action == WorkerAction::Load && wants_firmware {
        SecurityContext {
            privileged: Some(true),
            ..SecurityContext::default()
        }
    } else {
        SecurityContext {
            capabilities: Some(Capabilities {
                add: Some(vec!["SYS_MODULE".into()]),
                ..Capabilities::default()
            }),
            run_as_user: Some(settings.run_as_user),
            se_linux_options: Some(SELinuxOptions {
                type_: Some(settings.selinux_type.clone()),
                ..SELinuxOptions::default()
            }),
            ..SecurityContext::default()
        }
    };
    let pull_policy =
        (!config.image_pull_policy.is_empty()).then(|| config.image_pull_policy.clone());

    let mut pod = Pod {
        metadata: ObjectMeta {
            name: Some(wire::worker_pod_name(input.node, input.module)),
            namespace: Some(input.namespace.to_owned()),
            labels: Some(BTreeMap::from([
                (label::APP_NAME.to_owned(), label::APP_KMM.to_owned()),
                (
                    label::APP_COMPONENT.to_owned(),
                    label::COMPONENT_WORKER.to_owned(),
                ),
                (label::APP_PART_OF.to_owned(), label::APP_KMM.to_owned()),
                (label::MODULE_NAME.to_owned(), input.module.to_owned()),
                (label::WORKER_ACTION.to_owned(), action.label().to_owned()),
            ])),
            annotations: Some(annotations),
            finalizers: Some(vec![finalizer::NMC_RECONCILER.to_owned()]),
            owner_references: Some(vec![OwnerReference {
                api_version: format!("{}/v1beta1", wire::GROUP),
                kind: "NodeModulesConfig".into(),
                name: input.node.to_owned(),
                uid: input.nmc_uid.to_owned(),
                controller: Some(true),
                block_owner_deletion: Some(true),
            }]),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            node_name: Some(input.node.to_owned()),
            restart_policy: Some("OnFailure".into()),
            service_account_name: Some(input.service_account.to_owned()),
            image_pull_secrets: input.image_repo_secret.map(|secret| vec![secret.clone()]),
            tolerations: (!input.tolerations.is_empty()).then(|| input.tolerations.to_vec()),
            init_containers: Some(vec![Container {
                name: "image-extractor".into(),
                image: Some(config.container_image.clone()),
                image_pull_policy: pull_policy,
                command: Some(vec!["/bin/sh".into(), "-c".into()]),
                args: Some(vec![extractor_script(config)]),
                volume_mounts: Some(vec![mount(TMP_VOLUME, SHARED_DIR, false)]),
                resources: Some(worker_resources()),
                ..Container::default()
            }]),
            containers: vec![Container {
                name: "worker".into(),
                image: Some(settings.image.clone()),
                args: Some(args),
                volume_mounts: Some(worker_mounts),
                resources: Some(worker_resources()),
                security_context: Some(security_context),
                // The worker writes its failure reason to /dev/termination-log; if it could not,
                // the end of its log stands in.
                termination_message_policy: Some("FallbackToLogsOnError".into()),
                ..Container::default()
            }],
            volumes: Some(volumes),
            ..PodSpec::default()
        }),
        status: None,
    };
    let hash = pod_hash(&pod);
    if let Some(annotations) = pod.metadata.annotations.as_mut() {
        annotations.insert(annotation::WORKER_HASH.to_owned(), hash.to_string());
    }
    Ok(pod)
}

/// FNV-1a over the pod's JSON: stable across processes and releases of kmm-rs that render the
/// same pod, which is all change detection needs.
pub fn pod_hash(pod: &Pod) -> u64 {
    let bytes = serde_json::to_vec(pod).unwrap_or_default();
    bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use kmm_api::v1beta1::ModprobeSpec;

    fn config(modprobe: ModprobeSpec) -> ModuleConfig {
        ModuleConfig {
            kernel_version: "6.1.0-56-amd64".into(),
            container_image: "r/kmod:6.1".into(),
            image_pull_policy: "IfNotPresent".into(),
            insecure_pull: false,
            in_tree_modules_to_remove: vec![],
            in_tree_module_to_remove: String::new(),
            modprobe,
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

    fn input(config: &ModuleConfig) -> WorkerPodInput<'_> {
        WorkerPodInput {
            node: "node-1",
            nmc_uid: "uid-1",
            module: "kmod",
            namespace: "labs",
            service_account: "default",
            image_repo_secret: None,
            tolerations: &[],
            version: "",
            config,
        }
    }

    fn modprobe(name: &str) -> ModprobeSpec {
        ModprobeSpec {
            module_name: name.into(),
            dir_name: "/opt".into(),
            ..ModprobeSpec::default()
        }
    }

    #[test]
    fn load_pod_matches_go_kmm() {
        let c = config(modprobe("kmm_ci_a"));
        let pod = render_worker_pod(&input(&c), WorkerAction::Load, &settings()).unwrap();
        let json = serde_json::to_value(&pod).unwrap();
        assert_eq!(json["metadata"]["name"], "kmm-worker-node-1-kmod");
        assert_eq!(json["metadata"]["namespace"], "labs");
        assert_eq!(
            json["metadata"]["labels"]["kmm.node.kubernetes.io/worker-action"],
            "Load"
        );
        assert_eq!(
            json["metadata"]["labels"]["app.kubernetes.io/component"],
            "worker"
        );
        assert_eq!(
            json["metadata"]["finalizers"][0],
            "kmm.node.kubernetes.io/nodemodulesconfig-reconciler"
        );
        assert_eq!(
            json["metadata"]["ownerReferences"][0]["kind"],
            "NodeModulesConfig"
        );
        assert_eq!(json["metadata"]["ownerReferences"][0]["controller"], true);
        let spec = &json["spec"];
        assert_eq!(spec["nodeName"], "node-1");
        assert_eq!(spec["restartPolicy"], "OnFailure");
        assert_eq!(spec["serviceAccountName"], "default");
        let init = &spec["initContainers"][0];
        assert_eq!(init["name"], "image-extractor");
        assert_eq!(init["image"], "r/kmod:6.1");
        assert_eq!(init["command"], serde_json::json!(["/bin/sh", "-c"]));
        assert_eq!(
            init["args"][0],
            "\nmkdir -p /tmp/opt/lib/modules;\ncp -R /opt/lib/modules/6.1.0-56-amd64 /tmp/opt/lib/modules;\n"
        );
        let worker = &spec["containers"][0];
        assert_eq!(
            worker["args"],
            serde_json::json!(["kmod", "load", "/etc/kmm-worker/config.yaml"])
        );
        assert_eq!(
            worker["securityContext"]["capabilities"]["add"][0],
            "SYS_MODULE"
        );
        assert_eq!(worker["securityContext"]["seLinuxOptions"]["type"], "spc_t");
        assert_eq!(worker["resources"]["requests"]["cpu"], "0.5");
        assert_eq!(worker["resources"]["limits"]["memory"], "128Mi");
        let mounts: Vec<&str> = worker["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["mountPath"].as_str().unwrap())
            .collect();
        assert_eq!(
            mounts,
            [
                "/etc/kmm-worker",
                "/lib/modules",
                "/host/lib/modules",
                "/tmp"
            ]
        );
        let volumes: Vec<&str> = spec["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["name"].as_str().unwrap())
            .collect();
        assert_eq!(volumes, ["config", "lib-modules", "tmp"]);
        assert_eq!(
            spec["volumes"][0]["downwardAPI"]["items"][0]["fieldRef"]["fieldPath"],
            "metadata.annotations['kmm.node.kubernetes.io/worker-config']"
        );
        let config_back: ModuleConfig = serde_saphyr::from_str(
            json["metadata"]["annotations"]["kmm.node.kubernetes.io/worker-config"]
                .as_str()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(config_back, c);
        assert!(
            json["metadata"]["annotations"]["kmm.node.kubernetes.io/worker-hash"]
                .as_str()
                .unwrap()
                .parse::<u64>()
                .is_ok()
        );
    }

    #[test]
    fn loading_order_firmware_version_and_secret() {
        let mut m = modprobe("a");
        m.modules_loading_order = vec!["a".into(), "b".into(), "c".into()];
        m.firmware_path = "/firmware".into();
        let c = config(m);
        let secret = LocalObjectReference {
            name: "pull".into(),
        };
        let tolerations = [Toleration {
            key: Some("gpu".into()),
            operator: Some("Exists".into()),
            ..Toleration::default()
        }];
        let mut inp = input(&c);
        inp.image_repo_secret = Some(&secret);
        inp.tolerations = &tolerations;
        inp.version = "v2";
        let pod = render_worker_pod(&inp, WorkerAction::Load, &settings()).unwrap();
        let json = serde_json::to_value(&pod).unwrap();
        let annotations = &json["metadata"]["annotations"];
        assert_eq!(
            annotations["kmm.node.kubernetes.io/modules-order"],
            "softdep a pre: b\nsoftdep b pre: c\n"
        );
        assert_eq!(
            annotations["kmm.node.kubernetes.io/worker-module-version"],
            "v2"
        );
        assert!(
            annotations["kmm.node.kubernetes.io/worker-tolerations"]
                .as_str()
                .unwrap()
                .contains("gpu")
        );
        assert_eq!(json["spec"]["imagePullSecrets"][0]["name"], "pull");
        let worker = &json["spec"]["containers"][0];
        assert_eq!(
            worker["args"],
            serde_json::json!([
                "kmod",
                "load",
                "/etc/kmm-worker/config.yaml",
                "--firmware-path",
                "/lib/firmware"
            ])
        );
        assert_eq!(
            worker["securityContext"],
            serde_json::json!({"privileged": true})
        );
        assert!(
            json["spec"]["initContainers"][0]["args"][0]
                .as_str()
                .unwrap()
                .ends_with("\nmkdir -p /tmp/firmware;\ncp -R /firmware/* /tmp/firmware;\n")
        );
        let names: Vec<&str> = json["spec"]["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "config",
                "lib-modules",
                "tmp",
                "modules-order",
                "lib-firmware"
            ]
        );

        let unload = render_worker_pod(&inp, WorkerAction::Unload, &settings()).unwrap();
        let json = serde_json::to_value(&unload).unwrap();
        assert!(
            json["metadata"]["annotations"]
                .get("kmm.node.kubernetes.io/modules-order")
                .is_none()
        );
        assert!(
            json["metadata"]["annotations"]
                .get("kmm.node.kubernetes.io/worker-module-version")
                .is_none()
        );
        assert_eq!(
            json["spec"]["containers"][0]["securityContext"]["capabilities"]["add"][0],
            "SYS_MODULE"
        );
    }

    #[test]
    fn firmware_without_host_path_is_an_error() {
        let mut m = modprobe("a");
        m.firmware_path = "/firmware".into();
        let c = config(m);
        let mut s = settings();
        s.firmware_host_path = None;
        let err = render_worker_pod(&input(&c), WorkerAction::Load, &s).unwrap_err();
        assert_eq!(
            err.to_string(),
            "firmwareHostPath wasn't set, while the Module requires firmware loading"
        );
    }

    #[test]
    fn hash_changes_with_the_config_only() {
        let a = config(modprobe("a"));
        let mut b = a.clone();
        b.container_image = "r/kmod:6.2".into();
        let hash = |c: &ModuleConfig| {
            let pod = render_worker_pod(&input(c), WorkerAction::Load, &settings()).unwrap();
            pod.metadata.annotations.unwrap()[annotation::WORKER_HASH].clone()
        };
        assert_eq!(hash(&a), hash(&a.clone()));
        assert_ne!(hash(&a), hash(&b));
    }
}
