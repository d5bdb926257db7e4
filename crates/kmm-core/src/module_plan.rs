//! The Module reconciler's plan: for every node, whether the Module's entry in that node's
//! NodeModulesConfig should be written, removed or left alone, and which images the Module needs.
//! Pure: it sees plain data (the Module, the nodes, the image states) and returns decisions that
//! also feed the Module's status and `kmmctl explain`.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use k8s_openapi::api::core::v1::Taint;
use kmm_api::v1beta1::{
    ImageState, Module, ModuleConfig, ModuleImageSpec, ModuleImagesConfigSpec, ModuleItem,
    ModuleLoaderSpec, NodeModuleSpec,
};
use kmm_api::wire;

use crate::kernel::node_kernel;
use crate::mapping::{MappingError, ResolvedMapping, resolve};
use crate::targeting::{Eligibility, eligibility, with_internal_tolerations};

/// The ServiceAccount of worker pods when the Module names none.
pub const DEFAULT_SERVICE_ACCOUNT: &str = "default";

/// What the planner needs to know about a node.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeFacts {
    /// Node name (also its NMC's name).
    pub name: String,
    /// Node labels.
    pub labels: BTreeMap<String, String>,
    /// Node taints.
    pub taints: Vec<Taint>,
    /// `status.nodeInfo.kernelVersion`, as reported.
    pub kernel_version: String,
}

/// Why a node has, or has not, the Module's entry. One per node the Module could concern.
#[derive(Debug, Clone, PartialEq)]
pub enum NodeDecision {
    /// The entry is (to be) written with this image.
    Configured {
        /// The module image.
        image: String,
    },
    /// The node is cordoned; the loaded module stays, nothing new is written.
    KeptWhileCordoned,
    /// The node's labels do not match the selector.
    NotSelected,
    /// A taint keeps the module off the node.
    Tainted {
        /// The taint's key.
        key: String,
        /// The taint's effect.
        effect: String,
    },
    /// No kernel mapping matches the node's kernel.
    NoMatchingMapping {
        /// The error, naming the kernel and the mappings tried.
        error: MappingError,
    },
    /// The mapping cannot be resolved because the Module is invalid.
    InvalidSpec {
        /// The error.
        error: MappingError,
    },
    /// The image is not known to exist yet (missing, being checked, built or signed).
    WaitingForImage {
        /// The module image.
        image: String,
        /// What is known about it.
        state: ImageState,
    },
    /// Ordered upgrade: the node's `version-worker-pod` label names another version.
    OtherVersionOnNode {
        /// The version the node allows.
        node_version: String,
    },
    /// Ordered upgrade: the node has no `version-worker-pod` label yet.
    VersionNotAllowedYet,
}

impl NodeDecision {
    /// Short stable name, for conditions and `kmmctl`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Configured { .. } => "Configured",
            Self::KeptWhileCordoned => "KeptWhileCordoned",
            Self::NotSelected => "NotSelected",
            Self::Tainted { .. } => "Tainted",
            Self::NoMatchingMapping { .. } => "NoMatchingMapping",
            Self::InvalidSpec { .. } => "InvalidSpec",
            Self::WaitingForImage { .. } => "WaitingForImage",
            Self::OtherVersionOnNode { .. } => "OtherVersionOnNode",
            Self::VersionNotAllowedYet => "VersionNotAllowedYet",
        }
    }
}

/// What to do with the Module's entry in one node's NMC.
#[derive(Debug, Clone, PartialEq)]
pub enum EntryAction {
    /// Write this entry (and the configured / in-use labels).
    Upsert(Box<NodeModuleSpec>),
    /// Remove the entry and the configured label (the in-use label stays until unloaded).
    Remove,
}

/// The plan for one Module.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ModulePlan {
    /// Entry changes by node name. Nodes absent from the map are left as they are.
    pub actions: BTreeMap<String, EntryAction>,
    /// Why each node is where it is, by node name (selected or configured nodes only).
    pub decisions: BTreeMap<String, NodeDecision>,
    /// The images the Module needs, one per distinct image, for its ModuleImagesConfig.
    pub images: Vec<ModuleImageSpec>,
    /// Nodes that match the selector and tolerate the taints (status `nodesMatchingSelectorNumber`).
    pub matching_nodes: usize,
}

/// Plans the Module's NMC entries.
///
/// `configured` names the nodes whose NMC currently carries the Module's `module-configured`
/// label; `image_states` is the ModuleImagesConfig status by image.
pub fn plan_module(
    module: &Module,
    loader: &ModuleLoaderSpec,
    nodes: &[NodeFacts],
    configured: &BTreeSet<String>,
    image_states: &BTreeMap<String, ImageState>,
) -> ModulePlan {
    let name = module.metadata.name.as_deref().unwrap_or_default();
    let namespace = module.metadata.namespace.as_deref().unwrap_or_default();
    let tolerations = with_internal_tolerations(&module.spec.tolerations);
    let version = &loader.container.version;
    let version_label = wire::version_worker_pod_label(namespace, name);
    let mut plan = ModulePlan::default();
    let mut seen_images = BTreeSet::new();

    for node in nodes {
        let is_configured = configured.contains(&node.name);
        let eligible = eligibility(
            &module.spec.selector,
            &node.labels,
            &node.taints,
            &tolerations,
            is_configured,
        );
        let decision = match eligible {
            Eligibility::NotSelected | Eligibility::Tainted(_) => {
                if is_configured {
                    plan.actions.insert(node.name.clone(), EntryAction::Remove);
                }
                match eligible {
                    Eligibility::Tainted(taint) => NodeDecision::Tainted {
                        key: taint.key,
                        effect: taint.effect,
                    },
                    _ if is_configured => NodeDecision::NotSelected,
                    _ => continue,
                }
            }
            Eligibility::KeptWhileCordoned => NodeDecision::KeptWhileCordoned,
            Eligibility::Eligible => {
                plan.matching_nodes += 1;
                let kernel = node_kernel(&node.kernel_version);
                match resolve(&loader.container, name, namespace, kernel) {
                    Err(error @ MappingError::NoMatch { .. }) => {
                        if is_configured {
                            plan.actions.insert(node.name.clone(), EntryAction::Remove);
                        }
                        NodeDecision::NoMatchingMapping { error }
                    }
                    Err(error) => NodeDecision::InvalidSpec { error },
                    Ok(resolved) => {
                        if seen_images.insert(resolved.container_image.clone()) {
                            plan.images.push(image_spec(&resolved, loader));
                        }
                        let node_version = node.labels.get(&version_label);
                        match (version.is_empty(), node_version) {
                            (false, None) => {
                                if is_configured {
                                    plan.actions.insert(node.name.clone(), EntryAction::Remove);
                                }
                                NodeDecision::VersionNotAllowedYet
                            }
                            (false, Some(other)) if other != version => {
                                NodeDecision::OtherVersionOnNode {
                                    node_version: other.clone(),
                                }
                            }
                            _ => {
                                let state = image_states
                                    .get(&resolved.container_image)
                                    .cloned()
                                    .unwrap_or_default();
                                if state == ImageState::Exists {
                                    let entry = node_entry(module, loader, &tolerations, &resolved);
                                    plan.actions.insert(
                                        node.name.clone(),
                                        EntryAction::Upsert(Box::new(entry)),
                                    );
                                    NodeDecision::Configured {
                                        image: resolved.container_image,
                                    }
                                } else {
                                    NodeDecision::WaitingForImage {
                                        image: resolved.container_image,
                                        state,
                                    }
                                }
                            }
                        }
                    }
                }
            }
        };
        plan.decisions.insert(node.name.clone(), decision);
    }

    // The node cache has no order: without sorting, the ModuleImagesConfig spec (and with it a
    // write, and a pass of every node the Module targets) would change with every pass.
    plan.images.sort_by(|a, b| a.image.cmp(&b.image));

    // Configured nodes that no longer exist lose their entry too.
    let present: HashSet<&str> = nodes.iter().map(|node| node.name.as_str()).collect();
    for gone in configured
        .iter()
        .filter(|name| !present.contains(name.as_str()))
    {
        plan.actions.insert(gone.clone(), EntryAction::Remove);
    }
    plan
}

/// The ModuleImagesConfig spec that checks (and builds and signs) `images` for `module`: the
/// Module's pull secret and pull policy, its tolerations plus the internal ones.
pub fn images_config_spec(
    module: &Module,
    loader: &ModuleLoaderSpec,
    images: Vec<ModuleImageSpec>,
    push_built_image: bool,
    image_rebuild_trigger_generation: Option<i64>,
) -> ModuleImagesConfigSpec {
    ModuleImagesConfigSpec {
        images,
        image_repo_secret: module.spec.image_repo_secret.clone(),
        image_pull_policy: if loader.container.image_pull_policy.is_empty() {
            kmm_api::v1beta1::DEFAULT_PULL_POLICY.to_owned()
        } else {
            loader.container.image_pull_policy.clone()
        },
        push_built_image,
        image_rebuild_trigger_generation,
        tolerations: module.spec.tolerations.clone(),
    }
}

/// The ModuleImagesConfig entry of a resolved mapping.
pub(crate) fn image_spec(resolved: &ResolvedMapping, loader: &ModuleLoaderSpec) -> ModuleImageSpec {
    ModuleImageSpec {
        image: resolved.container_image.clone(),
        kernel_version: resolved.kernel.clone(),
        build: resolved.build.clone(),
        sign: resolved.sign.clone(),
        skip_wait_missing_image: false,
        registry_tls: Some(resolved.registry_tls),
        dir_name: loader.container.modprobe.dir_name.clone(),
    }
}

/// The NMC spec entry of a Module on a node.
pub fn node_entry(
    module: &Module,
    loader: &ModuleLoaderSpec,
    tolerations: &[k8s_openapi::api::core::v1::Toleration],
    resolved: &ResolvedMapping,
) -> NodeModuleSpec {
    let service_account = if loader.service_account_name.is_empty() {
        DEFAULT_SERVICE_ACCOUNT.to_owned()
    } else {
        loader.service_account_name.clone()
    };
    NodeModuleSpec {
        item: ModuleItem {
            image_repo_secret: module.spec.image_repo_secret.clone(),
            name: module.metadata.name.clone().unwrap_or_default(),
            namespace: module.metadata.namespace.clone().unwrap_or_default(),
            service_account_name: service_account,
            tolerations: tolerations.to_vec(),
            version: loader.container.version.clone(),
        },
        config: ModuleConfig {
            kernel_version: resolved.kernel.clone(),
            container_image: resolved.container_image.clone(),
            image_pull_policy: loader.container.image_pull_policy.clone(),
            insecure_pull: resolved.registry_tls.insecure
                || resolved.registry_tls.insecure_skip_tls_verify,
            in_tree_modules_to_remove: resolved.in_tree_modules_to_remove.clone(),
            in_tree_module_to_remove: String::new(),
            modprobe: loader.container.modprobe.clone(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn module(spec: serde_json::Value) -> Module {
        serde_json::from_value(
            json!({"metadata": {"name": "kmod", "namespace": "labs"}, "spec": spec}),
        )
        .unwrap()
    }

    fn lab3() -> Module {
        module(json!({
            "selector": {"feature.kmm.lab": "true"},
            "moduleLoader": {"container": {
                "modprobe": {"moduleName": "kmm_ci_a"},
                "kernelMappings": [
                    {"literal": "6.1.0-56-amd64", "containerImage": "r/kmod:6.1"},
                    {"regexp": "^6\\.8\\.", "containerImage": "r/kmod:${KERNEL_XYZ}"}
                ]
            }}
        }))
    }

    fn node(name: &str, kernel: &str, labels: &[(&str, &str)], taints: Vec<Taint>) -> NodeFacts {
        NodeFacts {
            name: name.into(),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect(),
            taints,
            kernel_version: kernel.into(),
        }
    }

    const LAB: (&str, &str) = ("feature.kmm.lab", "true");

    fn exists(images: &[&str]) -> BTreeMap<String, ImageState> {
        images
            .iter()
            .map(|i| ((*i).to_owned(), ImageState::Exists))
            .collect()
    }

    fn plan(
        m: &Module,
        nodes: &[NodeFacts],
        configured: &[&str],
        states: &BTreeMap<String, ImageState>,
    ) -> ModulePlan {
        let loader = m.spec.module_loader.clone().unwrap();
        let configured = configured.iter().map(|s| (*s).to_owned()).collect();
        plan_module(m, &loader, nodes, &configured, states)
    }

    #[test]
    fn lab3_three_nodes_two_kernels_one_without_mapping() {
        let nodes = [
            node("a", "6.1.0-56-amd64", &[LAB], vec![]),
            node("b", "6.8.0-31-generic+", &[LAB], vec![]),
            node("c", "5.14.0-284.el9.x86_64", &[LAB], vec![]),
            node("d", "6.1.0-56-amd64", &[], vec![]),
        ];
        let p = plan(
            &lab3(),
            &nodes,
            &[],
            &exists(&["r/kmod:6.1", "r/kmod:6.8.0"]),
        );
        let images: Vec<(&str, &str)> = p
            .images
            .iter()
            .map(|i| (i.image.as_str(), i.kernel_version.as_str()))
            .collect();
        assert_eq!(
            images,
            [
                ("r/kmod:6.1", "6.1.0-56-amd64"),
                ("r/kmod:6.8.0", "6.8.0-31-generic")
            ]
        );
        assert_eq!(p.matching_nodes, 3);
        let EntryAction::Upsert(entry) = &p.actions["b"] else {
            panic!("b not configured")
        };
        assert_eq!(
            entry.config.kernel_version, "6.8.0-31-generic",
            "trailing + trimmed"
        );
        assert_eq!(entry.config.container_image, "r/kmod:6.8.0");
        assert_eq!(entry.item.service_account_name, "default");
        assert_eq!(
            entry.item.tolerations.len(),
            3,
            "internal pressure tolerations"
        );
        assert!(p.actions.contains_key("a"));
        assert!(!p.actions.contains_key("c") && !p.actions.contains_key("d"));
        let NodeDecision::NoMatchingMapping { error } = &p.decisions["c"] else {
            panic!("{:?}", p.decisions["c"])
        };
        assert!(error.to_string().contains("5.14.0-284.el9.x86_64"));
        assert!(
            !p.decisions.contains_key("d"),
            "unselected, unconfigured nodes are not mentioned"
        );
    }

    #[test]
    fn images_do_not_depend_on_node_order() {
        let forward = [
            node("b", "6.8.0-31-generic", &[LAB], vec![]),
            node("a", "6.1.0-56-amd64", &[LAB], vec![]),
        ];
        let backward = [forward[1].clone(), forward[0].clone()];
        let first = plan(&lab3(), &forward, &[], &BTreeMap::new());
        let second = plan(&lab3(), &backward, &[], &BTreeMap::new());
        assert_eq!(first.images, second.images);
        assert_eq!(first.images[0].image, "r/kmod:6.1");
    }

    #[test]
    fn missing_image_waits_and_keeps_the_current_entry() {
        let nodes = [node("a", "6.1.0-56-amd64", &[LAB], vec![])];
        let p = plan(&lab3(), &nodes, &["a"], &BTreeMap::new());
        assert!(
            p.actions.is_empty(),
            "nothing written or removed while the image is unknown"
        );
        assert_eq!(p.decisions["a"].reason(), "WaitingForImage");
    }

    #[test]
    fn deselected_tainted_gone_and_unmapped_nodes_lose_their_entry() {
        let no_execute = Taint {
            key: "maint".into(),
            effect: "NoExecute".into(),
            ..Taint::default()
        };
        let nodes = [
            node("unlabelled", "6.1.0-56-amd64", &[], vec![]),
            node("tainted", "6.1.0-56-amd64", &[LAB], vec![no_execute]),
            node("unmapped", "5.14.0-1.el9", &[LAB], vec![]),
        ];
        let p = plan(
            &lab3(),
            &nodes,
            &["unlabelled", "tainted", "unmapped", "deleted"],
            &exists(&["r/kmod:6.1"]),
        );
        for node in ["unlabelled", "tainted", "unmapped", "deleted"] {
            assert_eq!(p.actions.get(node), Some(&EntryAction::Remove), "{node}");
        }
        assert_eq!(p.decisions["tainted"].reason(), "Tainted");
    }

    #[test]
    fn cordon_keeps_a_loaded_module_and_blocks_a_new_one() {
        let cordon = Taint {
            key: wire::TAINT_UNSCHEDULABLE.into(),
            effect: "NoSchedule".into(),
            ..Taint::default()
        };
        let nodes = [
            node("loaded", "6.1.0-56-amd64", &[LAB], vec![cordon.clone()]),
            node("new", "6.1.0-56-amd64", &[LAB], vec![cordon]),
        ];
        let p = plan(&lab3(), &nodes, &["loaded"], &exists(&["r/kmod:6.1"]));
        assert!(p.actions.is_empty(), "{:?}", p.actions);
        assert_eq!(p.decisions["loaded"], NodeDecision::KeptWhileCordoned);
        assert_eq!(p.decisions["new"].reason(), "Tainted");
    }

    #[test]
    fn ordered_upgrade_version_gate() {
        let mut m = lab3();
        m.spec.module_loader.as_mut().unwrap().container.version = "v2".into();
        let label = wire::version_worker_pod_label("labs", "kmod");
        let nodes = [
            node(
                "same",
                "6.1.0-56-amd64",
                &[LAB, (label.as_str(), "v2")],
                vec![],
            ),
            node(
                "older",
                "6.1.0-56-amd64",
                &[LAB, (label.as_str(), "v1")],
                vec![],
            ),
            node("none", "6.1.0-56-amd64", &[LAB], vec![]),
        ];
        let p = plan(&m, &nodes, &["older", "none"], &exists(&["r/kmod:6.1"]));
        assert!(
            matches!(p.actions.get("same"), Some(EntryAction::Upsert(e)) if e.item.version == "v2")
        );
        assert_eq!(p.actions.get("older"), None, "old version keeps running");
        assert_eq!(p.actions.get("none"), Some(&EntryAction::Remove));
    }

    #[test]
    fn invalid_regexp_leaves_nodes_untouched() {
        let m = module(json!({"selector": {}, "moduleLoader": {"container": {
            "modprobe": {"moduleName": "m"}, "kernelMappings": [{"regexp": "(", "containerImage": "r/m:1"}]}}}));
        let nodes = [node("a", "6.1.0-56-amd64", &[], vec![])];
        let p = plan(&m, &nodes, &["a"], &BTreeMap::new());
        assert!(p.actions.is_empty());
        assert_eq!(p.decisions["a"].reason(), "InvalidSpec");
    }

    #[test]
    fn entry_carries_the_module_settings() {
        let m = module(json!({
            "selector": {}, "imageRepoSecret": {"name": "pull"},
            "tolerations": [{"key": "gpu", "operator": "Exists"}],
            "moduleLoader": {"serviceAccountName": "kmm-sa", "container": {
                "modprobe": {"moduleName": "m", "parameters": ["a=1"]},
                "imagePullPolicy": "Always",
                "inTreeModulesToRemove": ["old"],
                "registryTLS": {"insecureSkipTLSVerify": true},
                "kernelMappings": [{"regexp": ".", "containerImage": "r/$MOD_NAMESPACE-$MOD_NAME:1"}]}}
        }));
        let p = plan(
            &m,
            &[node("a", "6.1.0-56-amd64", &[], vec![])],
            &[],
            &exists(&["r/labs-kmod:1"]),
        );
        let Some(EntryAction::Upsert(entry)) = p.actions.get("a") else {
            panic!("{p:?}")
        };
        assert_eq!(entry.item.image_repo_secret.as_ref().unwrap().name, "pull");
        assert_eq!(entry.item.service_account_name, "kmm-sa");
        assert_eq!(entry.item.tolerations.len(), 4);
        assert_eq!(entry.config.image_pull_policy, "Always");
        assert!(entry.config.insecure_pull);
        assert_eq!(entry.config.in_tree_modules_to_remove, ["old"]);
        assert_eq!(entry.config.modprobe.parameters, ["a=1"]);
        assert!(p.images[0].registry_tls.unwrap().insecure_skip_tls_verify);
    }
}
