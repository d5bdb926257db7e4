//! `kmmctl explain`: for one Module and one node, the whole decision chain the operator walks
//! (selector, taints, kernel, mapping, image, build/sign, version gate, NMC entry, worker pod,
//! last failure, labels) and, first, the single most likely cause with its fix.
//!
//! Pure: it takes the objects as read from the cluster ([`Observed`]) and the current time, so
//! every cause is unit-tested with plain data. `status` is a summary of the same explanations.

use std::collections::BTreeMap;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::{Node, Pod};
use kmm_api::v1beta1::{
    BuildSignAction, BuildSignResult, ImageState, Module, ModuleBuildSignConfig,
    ModuleImagesConfig, NodeModuleSpec, NodeModuleStatus, NodeModulesConfig,
};
use kmm_api::wire::{self, label};
use kmm_core::kernel::{dns_safe, node_kernel};
use kmm_core::mapping::{MappingError, ResolvedMapping, resolve};
use kmm_core::targeting::{Eligibility, eligibility, with_internal_tolerations};
use kmm_core::validate::{ClusterInfo, validate_module};
use serde::Serialize;

/// Everything `explain` reads for one Module.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    /// The Module.
    pub module: Module,
    /// Every node.
    pub nodes: Vec<Node>,
    /// Every NodeModulesConfig.
    pub nmcs: Vec<NodeModulesConfig>,
    /// The Module's ModuleImagesConfig (same name and namespace), if any.
    pub mic: Option<ModuleImagesConfig>,
    /// The Module's ModuleBuildSignConfig (same name and namespace), if any.
    pub mbsc: Option<ModuleBuildSignConfig>,
    /// Pods of the Module's namespace labelled with its name (worker, build, sign, device plugin).
    pub pods: Vec<Pod>,
}

/// Where a module stands on a node, in one word.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum NodeState {
    /// Loaded with the current configuration.
    Loaded,
    /// On its way: image check, build, worker pod running, or an unload.
    Loading,
    /// Stuck until someone fixes something.
    Failed,
    /// The Module does not (and should not) load here: not selected, tainted, no mapping for
    /// this kernel, or the version gate is closed.
    NotTargeted,
}

impl NodeState {
    /// The word shown in tables.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Loaded => "loaded",
            Self::Loading => "loading",
            Self::Failed => "failed",
            Self::NotTargeted => "not targeted",
        }
    }
}

/// The outcome of one step of the chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// The step passed.
    Ok,
    /// The step failed: the chain stops here for the operator too.
    Fail,
    /// The step is not done yet.
    Wait,
    /// Not applicable, or not reached.
    Skip,
    /// Information only.
    Info,
}

impl Outcome {
    fn symbol(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Fail => "FAIL",
            Self::Wait => "wait",
            Self::Skip => "-",
            Self::Info => "info",
        }
    }
}

/// One step of the decision chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Step {
    /// What was checked.
    pub check: &'static str,
    /// How it went.
    pub outcome: Outcome,
    /// What was found.
    pub detail: String,
}

/// The single most likely cause, with its fix.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Cause {
    /// Short stable reason (`NoMatchingMapping`, `ImageMissing`, `LoadFailed`, `Loaded` ...).
    pub reason: String,
    /// What is wrong, naming the objects involved.
    pub message: String,
    /// What to do about it (empty when nothing is to be done).
    pub fix: String,
}

/// One node's explanation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeExplanation {
    /// Node name.
    pub node: String,
    /// The node's kernel, as reported.
    pub kernel: String,
    /// Where the module stands.
    pub state: NodeState,
    /// The most likely cause first.
    pub cause: Cause,
    /// The module image for this node's kernel, if a mapping resolved.
    pub image: Option<String>,
    /// Image summary for tables: `found`, `missing`, `built`, `needs build`, ... or `-`.
    pub image_state: String,
    /// Sign summary: `signed`, `needs signing`, `sign failed`, or `-` when not signed.
    pub signing: String,
    /// The node carries the `<ns>.<name>.ready` label.
    pub labelled: bool,
    /// Device plugin summary: `running`, `pending`, `none` (not started) or `-` (no plugin).
    pub device_plugin: String,
    /// When the current state was last known to change (last failure or a pod start), if known.
    pub since: Option<Timestamp>,
    /// Every step, in the operator's order.
    pub chain: Vec<Step>,
}

/// A Module's explanation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ModuleExplanation {
    /// Module namespace.
    pub namespace: String,
    /// Module name.
    pub name: String,
    /// When the Module was created.
    pub created: Option<Timestamp>,
    /// Validation errors (`path: message`), if the Module is invalid.
    pub invalid: Vec<String>,
    /// Per node.
    pub nodes: Vec<NodeExplanation>,
}

/// Which nodes to explain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeScope {
    /// Nodes the selector matches and nodes whose NMC mentions the Module; every node if that is
    /// none (so that "no node is selected" shows up, node by node).
    Relevant,
    /// Nodes the selector matches and nodes whose NMC mentions the Module, and no others.
    Targeted,
    /// Only this node.
    One(String),
}

fn node_labels(node: &Node) -> BTreeMap<String, String> {
    node.metadata.labels.clone().unwrap_or_default()
}

fn node_kernel_version(node: &Node) -> String {
    node.status
        .as_ref()
        .and_then(|s| s.node_info.as_ref())
        .map(|i| i.kernel_version.clone())
        .unwrap_or_default()
}

fn node_name(node: &Node) -> String {
    node.metadata.name.clone().unwrap_or_default()
}

/// Explains a Module on the nodes of `scope`.
pub fn explain_module(observed: &Observed, scope: &NodeScope) -> ModuleExplanation {
    let module = &observed.module;
    let name = module.metadata.name.clone().unwrap_or_default();
    let namespace = module.metadata.namespace.clone().unwrap_or_default();
    let invalid = match validate_module(module, &ClusterInfo::default()) {
        Ok(()) => Vec::new(),
        Err(errors) => errors.0.iter().map(ToString::to_string).collect(),
    };
    let nodes: Vec<&Node> = match scope {
        NodeScope::One(wanted) => observed
            .nodes
            .iter()
            .filter(|n| &node_name(n) == wanted)
            .collect(),
        NodeScope::Relevant | NodeScope::Targeted => {
            let relevant: Vec<&Node> = observed
                .nodes
                .iter()
                .filter(|n| {
                    kmm_core::targeting::selector_matches(&module.spec.selector, &node_labels(n))
                        || nmc_mentions(observed, &node_name(n), &namespace, &name)
                })
                .collect();
            if relevant.is_empty() && *scope == NodeScope::Relevant {
                observed.nodes.iter().collect()
            } else {
                relevant
            }
        }
    };
    let mut explanations: Vec<NodeExplanation> = nodes
        .into_iter()
        .map(|node| explain_node(observed, node, &invalid))
        .collect();
    if let NodeScope::One(wanted) = scope
        && explanations.is_empty()
    {
        explanations.push(NodeExplanation {
            node: wanted.clone(),
            kernel: String::new(),
            state: NodeState::NotTargeted,
            cause: Cause {
                reason: "NodeNotFound".into(),
                message: format!("there is no node named {wanted}"),
                fix: "check the name with `kubectl get nodes`".into(),
            },
            image: None,
            image_state: "-".into(),
            signing: "-".into(),
            labelled: false,
            device_plugin: "-".into(),
            since: None,
            chain: Vec::new(),
        });
    }
    ModuleExplanation {
        namespace,
        name,
        created: module.metadata.creation_timestamp.as_ref().map(|t| t.0),
        invalid,
        nodes: explanations,
    }
}

fn nmc_of<'a>(observed: &'a Observed, node: &str) -> Option<&'a NodeModulesConfig> {
    observed
        .nmcs
        .iter()
        .find(|n| n.metadata.name.as_deref() == Some(node))
}

fn nmc_mentions(observed: &Observed, node: &str, namespace: &str, name: &str) -> bool {
    nmc_of(observed, node).is_some_and(|nmc| {
        spec_entry(nmc, namespace, name).is_some() || status_entry(nmc, namespace, name).is_some()
    })
}

fn spec_entry<'a>(
    nmc: &'a NodeModulesConfig,
    namespace: &str,
    name: &str,
) -> Option<&'a NodeModuleSpec> {
    nmc.spec
        .modules
        .iter()
        .find(|m| m.item.namespace == namespace && m.item.name == name)
}

fn status_entry<'a>(
    nmc: &'a NodeModulesConfig,
    namespace: &str,
    name: &str,
) -> Option<&'a NodeModuleStatus> {
    nmc.status.as_ref().and_then(|s| {
        s.modules
            .iter()
            .find(|m| m.item.namespace == namespace && m.item.name == name)
    })
}

/// Builds the chain step by step; the first failing (else waiting) step is the cause.
struct Chain {
    steps: Vec<Step>,
    cause: Option<(NodeState, Cause)>,
}

impl Chain {
    fn step(&mut self, check: &'static str, outcome: Outcome, detail: impl Into<String>) {
        self.steps.push(Step {
            check,
            outcome,
            detail: detail.into(),
        });
    }

    /// Records a cause unless an earlier step already gave one.
    fn cause(&mut self, state: NodeState, reason: &str, message: String, fix: String) {
        if self.cause.is_none() {
            self.cause = Some((
                state,
                Cause {
                    reason: reason.into(),
                    message,
                    fix,
                },
            ));
        }
    }

    fn fail(
        &mut self,
        check: &'static str,
        state: NodeState,
        reason: &str,
        message: String,
        fix: String,
    ) {
        self.step(check, Outcome::Fail, message.clone());
        self.cause(state, reason, message, fix);
    }

    fn wait(&mut self, check: &'static str, reason: &str, message: String, fix: String) {
        self.step(check, Outcome::Wait, message.clone());
        self.cause(NodeState::Loading, reason, message, fix);
    }
}

/// What the steps after the mapping found, for the table columns.
#[derive(Default)]
struct Summary {
    image: Option<String>,
    image_state: Option<String>,
    signing: Option<String>,
    device_plugin: Option<String>,
    since: Option<Timestamp>,
}

fn explain_node(observed: &Observed, node: &Node, invalid: &[String]) -> NodeExplanation {
    let module = &observed.module;
    let name = module.metadata.name.clone().unwrap_or_default();
    let namespace = module.metadata.namespace.clone().unwrap_or_default();
    let node_name = node_name(node);
    let labels = node_labels(node);
    let kernel_reported = node_kernel_version(node);
    let nmc = nmc_of(observed, &node_name);
    let configured = nmc.is_some_and(|n| {
        n.metadata
            .labels
            .as_ref()
            .is_some_and(|l| l.contains_key(&wire::module_configured_label(&namespace, &name)))
    }) || nmc.is_some_and(|n| spec_entry(n, &namespace, &name).is_some());
    let labelled = labels.contains_key(&wire::module_ready_label(&namespace, &name));
    let mut chain = Chain {
        steps: Vec::new(),
        cause: None,
    };
    let mut summary = Summary::default();

    if !invalid.is_empty() {
        chain.fail(
            "spec",
            NodeState::Failed,
            "InvalidSpec",
            format!("the Module is invalid: {}", invalid.join("; ")),
            format!(
                "fix the Module (`kmmctl validate` on its YAML lists every error): kubectl edit module -n {namespace} {name}"
            ),
        );
    }

    walk_targeting(observed, node, &labels, configured, &mut chain);
    let resolved = walk_mapping(module, &kernel_reported, &mut chain);
    if let Some(resolved) = &resolved {
        summary.image = Some(resolved.container_image.clone());
        walk_image(observed, resolved, &mut chain, &mut summary);
        walk_version(module, &node_name, &labels, &mut chain);
    }
    walk_node_side(
        observed,
        &node_name,
        nmc,
        resolved.as_ref(),
        labelled,
        &mut chain,
        &mut summary,
    );
    if module.spec.device_plugin.is_some() {
        walk_device_plugin(observed, &node_name, &labels, &mut chain, &mut summary);
    }

    let (state, cause) = chain.cause.take().unwrap_or_else(|| {
        (
            NodeState::Loaded,
            Cause {
                reason: "Loaded".into(),
                message: format!(
                    "{namespace}/{name} is loaded on {node_name} with the current configuration"
                ),
                fix: String::new(),
            },
        )
    });
    NodeExplanation {
        node: node_name,
        kernel: kernel_reported,
        state,
        cause,
        image: summary.image,
        image_state: summary.image_state.unwrap_or_else(|| "-".into()),
        signing: summary.signing.unwrap_or_else(|| "-".into()),
        labelled,
        device_plugin: summary.device_plugin.unwrap_or_else(|| "-".into()),
        since: summary.since,
        chain: chain.steps,
    }
}

fn walk_targeting(
    observed: &Observed,
    node: &Node,
    labels: &BTreeMap<String, String>,
    configured: bool,
    chain: &mut Chain,
) {
    let module = &observed.module;
    let node_name = node_name(node);
    let selector = &module.spec.selector;
    let missing: Vec<String> = selector
        .iter()
        .filter(|(k, v)| labels.get(*k) != Some(*v))
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    if missing.is_empty() {
        let detail = if selector.is_empty() {
            "the selector is empty: every node is selected".to_owned()
        } else {
            format!("labels match the selector ({})", pairs(selector))
        };
        chain.step("selected by labels", Outcome::Ok, detail);
    } else {
        let has: Vec<String> = selector
            .keys()
            .filter_map(|k| labels.get(k).map(|v| format!("{k}={v}")))
            .collect();
        let has = if has.is_empty() {
            String::new()
        } else {
            format!(" (it has {})", has.join(", "))
        };
        chain.fail(
            "selected by labels",
            NodeState::NotTargeted,
            "NotSelected",
            format!(
                "node {node_name} lacks the selector label(s) {}{has}",
                missing.join(", ")
            ),
            format!(
                "label the node: kubectl label node {node_name} {} (or change spec.selector)",
                missing.join(" ")
            ),
        );
    }

    let taints = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.clone())
        .unwrap_or_default();
    let tolerations = with_internal_tolerations(&module.spec.tolerations);
    // Selection is checked above; here only the taints count.
    match eligibility(
        &BTreeMap::new(),
        labels,
        &taints,
        &tolerations,
        configured,
    ) {
        Eligibility::Tainted(taint) => {
            let value = taint
                .value
                .as_deref()
                .map(|v| format!("={v}"))
                .unwrap_or_default();
            let shown = format!("{}{value}:{}", taint.key, taint.effect);
            chain.fail(
                "tainted",
                NodeState::NotTargeted,
                "Tainted",
                format!("node {node_name} has taint {shown}, which the Module does not tolerate"),
                format!(
                    "add a toleration for {} ({}) to spec.tolerations, or remove the taint: kubectl taint node {node_name} {}:{}-",
                    taint.key, taint.effect, taint.key, taint.effect
                ),
            );
        }
        Eligibility::KeptWhileCordoned => chain.step(
            "tainted",
            Outcome::Info,
            "cordoned: the loaded module stays, nothing new is started (kmm-rs never unloads for a cordon)",
        ),
        Eligibility::Eligible | Eligibility::NotSelected => {
            let detail = if taints.is_empty() {
                "no taints".to_owned()
            } else {
                format!("{} taint(s), all tolerated", taints.len())
            };
            chain.step("tainted", Outcome::Ok, detail);
        }
    }
}

fn pairs(map: &BTreeMap<String, String>) -> String {
    map.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn walk_mapping(
    module: &Module,
    kernel_reported: &str,
    chain: &mut Chain,
) -> Option<ResolvedMapping> {
    let name = module.metadata.name.as_deref().unwrap_or_default();
    let namespace = module.metadata.namespace.as_deref().unwrap_or_default();
    let kernel = node_kernel(kernel_reported);
    if kernel.is_empty() {
        chain.wait(
            "kernel",
            "KernelUnknown",
            "the node reports no kernel version (status.nodeInfo.kernelVersion) yet".into(),
            "wait for the kubelet to report the node's status".into(),
        );
        return None;
    }
    chain.step("kernel", Outcome::Info, kernel.to_owned());
    let Some(loader) = &module.spec.module_loader else {
        chain.step(
            "kernel mapping",
            Outcome::Skip,
            "the Module has no moduleLoader: nothing to load",
        );
        return None;
    };
    match resolve(&loader.container, name, namespace, kernel) {
        Ok(resolved) => {
            let mapping = &loader.container.kernel_mappings[resolved.index];
            let how = if !mapping.literal.is_empty() && mapping.literal == kernel {
                format!("literal {:?}", mapping.literal)
            } else {
                format!("regexp {:?}", mapping.regexp)
            };
            chain.step(
                "kernel mapping",
                Outcome::Ok,
                format!("kernelMappings[{}] ({how}) matches", resolved.index),
            );
            chain.step("image", Outcome::Info, resolved.container_image.clone());
            Some(resolved)
        }
        Err(error @ MappingError::NoMatch { .. }) => {
            let suggestion = regexp_suggestion(kernel);
            chain.fail(
                "kernel mapping",
                NodeState::NotTargeted,
                "NoMatchingMapping",
                error.to_string(),
                format!(
                    "add a kernelMappings entry for this kernel, e.g. `literal: {kernel}` or `regexp: '{suggestion}'` with a containerImage built for it"
                ),
            );
            None
        }
        Err(error) => {
            chain.fail(
                "kernel mapping",
                NodeState::Failed,
                "InvalidSpec",
                error.to_string(),
                "fix the mapping (kmmctl validate lists every error)".into(),
            );
            None
        }
    }
}

/// A regexp matching the kernel's `major.minor.` series.
fn regexp_suggestion(kernel: &str) -> String {
    let series: Vec<&str> = kernel.split('.').take(2).collect();
    if series.len() == 2 {
        format!("^{}\\.{}\\.", series[0], series[1])
    } else {
        "^.+$".to_owned()
    }
}

fn walk_image(
    observed: &Observed,
    resolved: &ResolvedMapping,
    chain: &mut Chain,
    summary: &mut Summary,
) {
    let module = &observed.module;
    let namespace = module.metadata.namespace.as_deref().unwrap_or_default();
    let name = module.metadata.name.as_deref().unwrap_or_default();
    let image = &resolved.container_image;
    let state = observed.mic.as_ref().and_then(|mic| {
        mic.status
            .as_ref()
            .and_then(|s| s.images_states.iter().find(|s| &s.image == image))
    });
    let secret = module
        .spec
        .image_repo_secret
        .as_ref()
        .map(|s| s.name.clone());
    let Some(state) = state else {
        summary.image_state = Some("unchecked".into());
        chain.wait(
            "image state",
            "ImageNotChecked",
            format!("the operator has not recorded whether {image} exists yet (ModuleImagesConfig {namespace}/{name})"),
            "wait; if this lasts, check that kmm-operator is running and read its log".into(),
        );
        return;
    };
    let said = if state.message.is_empty() {
        String::new()
    } else {
        format!(": {}", state.message)
    };
    let has_sign = resolved.sign.is_some();
    let build_result = mbsc_result(observed, image, BuildSignAction::BuildImage);
    let sign_result = mbsc_result(observed, image, BuildSignAction::SignImage);
    match state.status {
        ImageState::Exists => {
            let built = build_result == Some(BuildSignResult::Success);
            summary.image_state = Some(if built { "built" } else { "found" }.into());
            if has_sign {
                summary.signing = Some("signed".into());
            }
            chain.step("image state", Outcome::Ok, format!("{image} exists"));
        }
        // A failed build or sign leaves the image missing: name the failed step, not the image.
        ImageState::DoesNotExist if build_result == Some(BuildSignResult::Failure) => {
            summary.image_state = Some("build failed".into());
            walk_build_sign(
                observed,
                resolved,
                BuildSignAction::BuildImage,
                build_result,
                chain,
                summary,
            );
        }
        ImageState::DoesNotExist if sign_result == Some(BuildSignResult::Failure) => {
            summary.image_state = Some("found (unsigned)".into());
            summary.signing = Some("sign failed".into());
            walk_build_sign(
                observed,
                resolved,
                BuildSignAction::SignImage,
                sign_result,
                chain,
                summary,
            );
        }
        ImageState::DoesNotExist => {
            summary.image_state = Some("missing".into());
            chain.fail(
                "image state",
                NodeState::Failed,
                "ImageMissing",
                format!("image {image} does not exist{said}"),
                format!(
                    "push {image}, fix the image name in the kernel mapping, or add a build section so that the operator builds it"
                ),
            );
        }
        ImageState::NeedsBuilding => {
            summary.image_state = Some("needs build".into());
            walk_build_sign(
                observed,
                resolved,
                BuildSignAction::BuildImage,
                build_result,
                chain,
                summary,
            );
            if has_sign {
                summary.signing = Some("needs signing".into());
            }
        }
        ImageState::NeedsSigning => {
            summary.image_state = Some("found (unsigned)".into());
            summary.signing = Some("needs signing".into());
            walk_build_sign(
                observed,
                resolved,
                BuildSignAction::SignImage,
                sign_result,
                chain,
                summary,
            );
        }
        ImageState::Unknown => match state.reason.as_str() {
            kmm_api::wire::image_reason::UNAUTHORIZED => {
                summary.image_state = Some("unauthorized".into());
                let fix = match &secret {
                    Some(secret) => format!(
                        "the registry refused the credentials of Secret {namespace}/{secret}: update it with credentials that may pull {image}"
                    ),
                    None => format!(
                        "create a kubernetes.io/dockerconfigjson Secret in {namespace} that may pull {image} and set spec.imageRepoSecret.name to it"
                    ),
                };
                chain.fail(
                    "image state",
                    NodeState::Failed,
                    "ImageUnauthorized",
                    format!("the registry refused access to {image}{said}"),
                    fix,
                );
            }
            kmm_api::wire::image_reason::REGISTRY_UNREACHABLE
            | kmm_api::wire::image_reason::TLS_ERROR => {
                summary.image_state = Some("unreachable".into());
                chain.fail(
                    "image state",
                    NodeState::Failed,
                    "RegistryUnreachable",
                    format!("could not ask the registry about {image} ({}){said}", state.reason),
                    "check the registry host and port; for a plain-HTTP registry set registryTLS.insecure: true, for a self-signed certificate registryTLS.insecureSkipTLSVerify: true".into(),
                );
            }
            "InvalidImage" => {
                summary.image_state = Some("invalid".into());
                chain.fail(
                    "image state",
                    NodeState::Failed,
                    "InvalidImage",
                    format!("{image} is not a valid image reference{said}"),
                    "fix containerImage in the kernel mapping".into(),
                );
            }
            "" => {
                summary.image_state = Some("checking".into());
                chain.wait(
                    "image state",
                    "ImageNotChecked",
                    format!("the existence of {image} is being checked"),
                    String::new(),
                );
            }
            other => {
                summary.image_state = Some("retrying".into());
                chain.wait(
                    "image state",
                    "ImageCheckRetrying",
                    format!("checking {image} failed ({other}){said}; the operator retries"),
                    "if this lasts, check the registry and the Module's imageRepoSecret".into(),
                );
            }
        },
    }
}

fn mbsc_result(
    observed: &Observed,
    image: &str,
    action: BuildSignAction,
) -> Option<BuildSignResult> {
    observed.mbsc.as_ref().and_then(|mbsc| {
        mbsc.status.as_ref().and_then(|s| {
            s.images
                .iter()
                .find(|i| i.image == image && i.action == action)
                .map(|i| i.status)
        })
    })
}

fn pod_label<'a>(pod: &'a Pod, key: &str) -> Option<&'a str> {
    pod.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(key))
        .map(String::as_str)
}

fn pod_phase(pod: &Pod) -> String {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.clone())
        .unwrap_or_else(|| "Pending".into())
}

/// The first container's waiting reason, or its last termination `reason: message`.
fn container_trouble(pod: &Pod) -> Option<String> {
    let statuses = pod.status.as_ref()?.container_statuses.as_ref()?;
    statuses.iter().find_map(|c| {
        let waiting = c.state.as_ref().and_then(|s| s.waiting.as_ref());
        let terminated = c
            .state
            .as_ref()
            .and_then(|s| s.terminated.as_ref())
            .or_else(|| c.last_state.as_ref().and_then(|s| s.terminated.as_ref()))
            .filter(|t| t.exit_code != 0);
        match (waiting, terminated) {
            (_, Some(t)) => Some(format!(
                "exit code {}{}",
                t.exit_code,
                t.message
                    .as_deref()
                    .map(|m| format!(": {}", m.trim()))
                    .unwrap_or_default()
            )),
            (Some(w), None) => w.reason.clone(),
            (None, None) => None,
        }
    })
}

fn walk_build_sign(
    observed: &Observed,
    resolved: &ResolvedMapping,
    action: BuildSignAction,
    result: Option<BuildSignResult>,
    chain: &mut Chain,
    summary: &mut Summary,
) {
    let module = &observed.module;
    let namespace = module.metadata.namespace.as_deref().unwrap_or_default();
    let (check, what, resource, failed_reason, pending_reason) = match action {
        BuildSignAction::BuildImage => (
            "build",
            "build",
            wire::resource_type::BUILD,
            "BuildFailed",
            "Building",
        ),
        BuildSignAction::SignImage => (
            "sign",
            "signing",
            wire::resource_type::SIGN,
            "SignFailed",
            "Signing",
        ),
    };
    let image = &resolved.container_image;
    let kernel = dns_safe(&resolved.kernel);
    let pods: Vec<&Pod> = observed
        .pods
        .iter()
        .filter(|p| {
            pod_label(p, label::RESOURCE_TYPE) == Some(resource)
                && pod_label(p, label::TARGET_KERNEL).is_none_or(|k| k == kernel)
        })
        .collect();
    let pod_list = if pods.is_empty() {
        "no pod".to_owned()
    } else {
        pods.iter()
            .map(|p| {
                let trouble = container_trouble(p)
                    .map(|t| format!(", {t}"))
                    .unwrap_or_default();
                format!(
                    "pod {} {}{trouble}",
                    p.metadata.name.as_deref().unwrap_or_default(),
                    pod_phase(p)
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    };
    let failed_pod = pods.iter().find(|p| pod_phase(p) == "Failed");
    if result == Some(BuildSignResult::Failure) || failed_pod.is_some() {
        if action == BuildSignAction::BuildImage {
            summary.image_state = Some("build failed".into());
        } else {
            summary.signing = Some("sign failed".into());
        }
        let logs = failed_pod
            .or(pods.first())
            .and_then(|p| p.metadata.name.as_deref())
            .map(|p| format!("read `kubectl logs -n {namespace} {p}`; "))
            .unwrap_or_default();
        let input = match action {
            BuildSignAction::BuildImage => resolved
                .build
                .as_ref()
                .map(|b| {
                    format!(
                        "fix the Dockerfile in ConfigMap {namespace}/{} or the build arguments",
                        b.dockerfile_config_map.name
                    )
                })
                .unwrap_or_else(|| "fix the build".into()),
            BuildSignAction::SignImage => resolved
                .sign
                .as_ref()
                .map(|s| {
                    format!(
                        "check Secrets {namespace}/{} (key `key`) and {namespace}/{} (key `cert`) and filesToSign",
                        s.key_secret.name, s.cert_secret.name
                    )
                })
                .unwrap_or_else(|| "fix the sign settings".into()),
        };
        chain.fail(
            check,
            NodeState::Failed,
            failed_reason,
            format!(
                "{what} of {image} for kernel {} failed ({pod_list})",
                resolved.kernel
            ),
            format!("{logs}{input}; then bump spec.imageRebuildTriggerGeneration to try again"),
        );
    } else {
        let since = pods
            .iter()
            .filter_map(|p| p.metadata.creation_timestamp.as_ref().map(|t| t.0))
            .max();
        summary.since = summary.since.or(since);
        let detail = if observed.mbsc.is_none() && pods.is_empty() {
            format!(
                "{image} must be {} in the cluster, but no {what} has started (no ModuleBuildSignConfig {namespace}/{})",
                if action == BuildSignAction::BuildImage {
                    "built"
                } else {
                    "signed"
                },
                module.metadata.name.as_deref().unwrap_or_default()
            )
        } else {
            format!("{what} of {image} in progress ({pod_list})")
        };
        chain.wait(
            check,
            pending_reason,
            detail,
            "wait; if no pod appears, check that this kmm-rs version runs in-cluster builds and read the operator log".into(),
        );
    }
}

fn walk_version(
    module: &Module,
    node_name: &str,
    labels: &BTreeMap<String, String>,
    chain: &mut Chain,
) {
    let Some(loader) = &module.spec.module_loader else {
        return;
    };
    let version = &loader.container.version;
    let namespace = module.metadata.namespace.as_deref().unwrap_or_default();
    let name = module.metadata.name.as_deref().unwrap_or_default();
    if version.is_empty() {
        chain.step(
            "version gate",
            Outcome::Skip,
            "no version set (unordered upgrades)",
        );
        return;
    }
    let user_label = wire::version_module_label(namespace, name);
    let worker_label = wire::version_worker_pod_label(namespace, name);
    match (labels.get(&user_label), labels.get(&worker_label)) {
        (_, Some(allowed)) if allowed == version => chain.step(
            "version gate",
            Outcome::Ok,
            format!("node allows version {version}"),
        ),
        (_, Some(other)) => chain.fail(
            "version gate",
            NodeState::NotTargeted,
            "OtherVersionOnNode",
            format!("the Module asks for version {version}, node {node_name} is at version {other} ({worker_label})"),
            format!("to move this node to {version}: kubectl label node {node_name} {user_label}={version} --overwrite"),
        ),
        (None, None) => chain.fail(
            "version gate",
            NodeState::NotTargeted,
            "VersionLabelMissing",
            format!(
                "the Module sets version {version} (ordered upgrade) and node {node_name} has no label {user_label}"
            ),
            format!("kubectl label node {node_name} {user_label}={version}"),
        ),
        (Some(wanted), None) => chain.wait(
            "version gate",
            "VersionPending",
            format!(
                "node {node_name} asks for version {wanted} ({user_label}); the operator has not yet allowed it ({worker_label})"
            ),
            if wanted == version {
                "wait; if this lasts, check that this kmm-rs version runs the node-version controller".into()
            } else {
                format!("the label asks for {wanted} but the Module is at {version}: relabel with {version}")
            },
        ),
    }
}

fn walk_node_side(
    observed: &Observed,
    node_name: &str,
    nmc: Option<&NodeModulesConfig>,
    resolved: Option<&ResolvedMapping>,
    labelled: bool,
    chain: &mut Chain,
    summary: &mut Summary,
) {
    let module = &observed.module;
    let namespace = module.metadata.namespace.as_deref().unwrap_or_default();
    let name = module.metadata.name.as_deref().unwrap_or_default();
    let spec = nmc.and_then(|n| spec_entry(n, namespace, name));
    let status = nmc.and_then(|n| status_entry(n, namespace, name));
    match (spec, resolved) {
        (Some(entry), _) => chain.step(
            "NMC entry",
            Outcome::Ok,
            format!(
                "NodeModulesConfig {node_name} asks for {} (kernel {})",
                entry.config.container_image, entry.config.kernel_version
            ),
        ),
        (None, Some(_)) if chain.cause.is_none() => chain.wait(
            "NMC entry",
            "Configuring",
            format!("the operator has not written the entry in NodeModulesConfig {node_name} yet"),
            "wait; if this lasts, read the operator log".into(),
        ),
        (None, _) => chain.step(
            "NMC entry",
            Outcome::Skip,
            format!("no entry in NodeModulesConfig {node_name}"),
        ),
    }

    let worker = observed
        .pods
        .iter()
        .find(|p| p.metadata.name.as_deref() == Some(&wire::worker_pod_name(node_name, name)));
    match worker {
        Some(pod) => {
            let action = pod_label(pod, label::WORKER_ACTION).unwrap_or("worker");
            let trouble = container_trouble(pod);
            let detail = format!(
                "{} pod {} {}{}",
                action,
                pod.metadata.name.as_deref().unwrap_or_default(),
                pod_phase(pod),
                trouble
                    .as_ref()
                    .map(|t| format!(" ({t})"))
                    .unwrap_or_default()
            );
            summary.since = summary
                .since
                .or(pod.metadata.creation_timestamp.as_ref().map(|t| t.0));
            match trouble.as_deref() {
                Some("ImagePullBackOff" | "ErrImagePull") => chain.fail(
                    "worker pod",
                    NodeState::Failed,
                    "WorkerImagePullFailed",
                    format!("the node cannot pull the module image: {detail}"),
                    format!(
                        "check that the node can reach the registry and that spec.imageRepoSecret may pull {}",
                        spec.map(|e| e.config.container_image.as_str()).unwrap_or_default()
                    ),
                ),
                _ => chain.step("worker pod", Outcome::Info, detail),
            }
        }
        None => chain.step(
            "worker pod",
            Outcome::Skip,
            "none (none is needed once loaded)",
        ),
    }

    match (spec, status) {
        (Some(entry), Some(loaded)) if loaded.config.as_ref() == Some(&entry.config) => {
            chain.step(
                "loaded",
                Outcome::Ok,
                format!(
                    "loaded from {} (boot {})",
                    entry.config.container_image, loaded.boot_id
                ),
            );
        }
        (_, Some(loaded)) if loaded.last_failure.is_some() => {
            if let Some(failure) = &loaded.last_failure {
                summary.since = Some(failure.time.0);
                chain.fail(
                    "last failure",
                    NodeState::Failed,
                    "LoadFailed",
                    format!("{}: {}", failure.reason, failure.message),
                    load_failure_fix(&failure.reason, namespace, node_name, name, resolved),
                );
            }
        }
        (Some(_), Some(loaded)) => chain.wait(
            "loaded",
            "Reloading",
            format!(
                "a different configuration is loaded ({}); the worker is replacing it",
                loaded
                    .config
                    .as_ref()
                    .map(|c| c.container_image.as_str())
                    .unwrap_or("unknown")
            ),
            String::new(),
        ),
        (Some(_), None) => chain.wait(
            "loaded",
            "Loading",
            "not loaded yet: the worker pod loads it".into(),
            "wait; if this lasts, `kubectl describe pod` the worker pod".into(),
        ),
        (None, Some(_)) => chain.wait(
            "loaded",
            "Unloading",
            "still loaded; the worker unloads it".into(),
            String::new(),
        ),
        (None, None) => chain.step("loaded", Outcome::Skip, "not loaded"),
    }
    if let (Some(_), Some(loaded)) = (spec, status)
        && let Some(failure) = &loaded.last_failure
        && loaded.config.as_ref() == spec.map(|e| &e.config)
    {
        chain.step(
            "last failure",
            Outcome::Info,
            format!("earlier: {}: {}", failure.reason, failure.message),
        );
    }
    let ready = wire::module_ready_label(namespace, name);
    chain.step(
        "ready label",
        if labelled { Outcome::Ok } else { Outcome::Skip },
        if labelled {
            format!("{ready} is set")
        } else {
            format!("{ready} is not set")
        },
    );
}

fn load_failure_fix(
    reason: &str,
    namespace: &str,
    node: &str,
    module: &str,
    resolved: Option<&ResolvedMapping>,
) -> String {
    let kernel = resolved
        .map(|r| r.kernel.as_str())
        .unwrap_or("the node's kernel");
    let specific = match reason {
        "UnknownSymbol" => format!(
            "the module was built for another kernel or needs a module that is not loaded: rebuild it against {kernel}, or list its dependencies in modprobe.modulesLoadingOrder"
        ),
        "SignatureRejected" => "Secure Boot refused the module: sign it (spec.moduleLoader.container.sign) with a key enrolled in the node's MOK".into(),
        "ModuleNotFound" => format!(
            "modprobe found no such module: check modprobe.moduleName and that the image holds it under <dirName>/lib/modules/{kernel}/"
        ),
        "InvalidModuleFormat" => format!("the .ko does not match the running kernel {kernel}: rebuild it for this kernel"),
        "ModuleInUse" => "something holds the module or an in-tree module to remove: stop its users first".into(),
        "FirmwareMissing" | "FirmwareSetupFailed" => "check modprobe.firmwarePath in the image and the operator's worker.firmwareHostPath".into(),
        "InvalidParameter" => "fix modprobe.parameters".into(),
        _ => "read the worker's message above and the pod's events".into(),
    };
    format!(
        "{specific}; the worker pod is kmm-worker-{node}-{module} in namespace {namespace} (`kubectl describe pod -n {namespace} kmm-worker-{node}-{module}`)"
    )
}

fn walk_device_plugin(
    observed: &Observed,
    node_name: &str,
    labels: &BTreeMap<String, String>,
    chain: &mut Chain,
    summary: &mut Summary,
) {
    let module = &observed.module;
    let namespace = module.metadata.namespace.as_deref().unwrap_or_default();
    let name = module.metadata.name.as_deref().unwrap_or_default();
    let pod = observed.pods.iter().find(|p| {
        pod_label(p, label::ROLE) == Some(label::ROLE_DEVICE_PLUGIN)
            && p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node_name)
    });
    let ready_label = labels.contains_key(&wire::device_plugin_ready_label(namespace, name));
    match pod {
        Some(pod) => {
            let phase = pod_phase(pod);
            summary.device_plugin = Some(
                if phase == "Running" {
                    "running"
                } else {
                    "pending"
                }
                .into(),
            );
            chain.step(
                "device plugin",
                if phase == "Running" {
                    Outcome::Ok
                } else {
                    Outcome::Wait
                },
                format!(
                    "pod {} {phase}{}",
                    pod.metadata.name.as_deref().unwrap_or_default(),
                    if ready_label {
                        ", node labelled device-plugin-ready"
                    } else {
                        ""
                    }
                ),
            );
        }
        None => {
            summary.device_plugin = Some("none".into());
            chain.step(
                "device plugin",
                Outcome::Skip,
                "no device plugin pod on this node (it starts once the module is loaded, in a kmm-rs version that runs device plugins)",
            );
        }
    }
}

/// Renders one Module's explanation as text.
pub fn render_text(explanation: &ModuleExplanation, now: Timestamp) -> String {
    let mut out = String::new();
    let age = explanation
        .created
        .map(|c| format!(", created {} ago", crate::table::age(c, now)))
        .unwrap_or_default();
    out.push_str(&format!(
        "Module {}/{}{age}\n",
        explanation.namespace, explanation.name
    ));
    if explanation.nodes.is_empty() {
        out.push_str("  no nodes in the cluster\n");
    }
    for node in &explanation.nodes {
        out.push('\n');
        let kernel = if node.kernel.is_empty() {
            String::new()
        } else {
            format!(" (kernel {})", node.kernel)
        };
        out.push_str(&format!(
            "Node {}{kernel}: {}\n",
            node.node,
            node.state.as_str()
        ));
        out.push_str(&format!(
            "  cause: {}: {}\n",
            node.cause.reason, node.cause.message
        ));
        if !node.cause.fix.is_empty() {
            out.push_str(&format!("  fix:   {}\n", node.cause.fix));
        }
        let rows: Vec<Vec<String>> = node
            .chain
            .iter()
            .map(|s| {
                vec![
                    format!("  {}", s.check),
                    s.outcome.symbol().to_owned(),
                    s.detail.clone(),
                ]
            })
            .collect();
        out.push_str(&crate::table::render(
            &["  CHECK", "RESULT", "DETAIL"],
            &rows,
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(name: &str, kernel: &str, labels: serde_json::Value) -> Node {
        serde_json::from_value(json!({
            "metadata": {"name": name, "labels": labels},
            "status": {"nodeInfo": {"kernelVersion": kernel, "bootID": "b1", "osImage": "", "architecture": "", "containerRuntimeVersion": "", "kernelVersion": kernel, "kubeProxyVersion": "", "kubeletVersion": "", "machineID": "", "operatingSystem": "", "systemUUID": ""}}
        }))
        .unwrap()
    }

    fn module(container: serde_json::Value) -> Module {
        serde_json::from_value(json!({
            "metadata": {"name": "kmod", "namespace": "labs"},
            "spec": {"selector": {"lab": "yes"}, "moduleLoader": {"container": container}}
        }))
        .unwrap()
    }

    fn built_module() -> Module {
        module(json!({
            "modprobe": {"moduleName": "kmod"},
            "kernelMappings": [{"regexp": "^6\\.", "containerImage": "r/kmod:${KERNEL_FULL_VERSION}",
                "build": {"dockerfileConfigMap": {"name": "dockerfile"}},
                "sign": {"keySecret": {"name": "key"}, "certSecret": {"name": "cert"}, "filesToSign": ["/opt/kmod.ko"]}}]
        }))
    }

    fn mic(state: &str, reason: &str) -> ModuleImagesConfig {
        serde_json::from_value(json!({
            "metadata": {"name": "kmod", "namespace": "labs"},
            "spec": {"images": []},
            "status": {"imagesStates": [{"image": "r/kmod:6.1.0-56-amd64", "status": state, "reason": reason, "message": "registry said so"}]}
        }))
        .unwrap()
    }

    fn explain_one(observed: &Observed) -> NodeExplanation {
        let mut out = explain_module(observed, &NodeScope::One("n1".into()));
        out.nodes.remove(0)
    }

    fn observed(module: Module) -> Observed {
        Observed {
            module,
            nodes: vec![node("n1", "6.1.0-56-amd64", json!({"lab": "yes"}))],
            ..Observed::default()
        }
    }

    #[test]
    fn build_failure_names_the_pod_and_the_dockerfile() {
        let mut o = observed(built_module());
        o.mic = Some(mic("NeedsBuilding", "NotFound"));
        o.mbsc = Some(
            serde_json::from_value(json!({
                "metadata": {"name": "kmod", "namespace": "labs"},
                "spec": {"images": []},
                "status": {"images": [{"image": "r/kmod:6.1.0-56-amd64", "status": "Failure", "action": "BuildImage"}]}
            }))
            .unwrap(),
        );
        o.pods = vec![
            serde_json::from_value(json!({
                "metadata": {"name": "kmod-build-6-1-0-56-amd64", "namespace": "labs", "labels": {
                    "kmm.node.kubernetes.io/module.name": "kmod",
                    "kmm.node.kubernetes.io/resource-type": "BuildImage",
                    "kmm.node.kubernetes.io/target-kernel": dns_safe("6.1.0-56-amd64")}},
                "status": {"phase": "Failed"}
            }))
            .unwrap(),
        ];
        let e = explain_one(&o);
        assert_eq!(e.state, NodeState::Failed);
        assert_eq!(e.cause.reason, "BuildFailed");
        assert!(
            e.cause.message.contains("kmod-build-6-1-0-56-amd64 Failed"),
            "{}",
            e.cause.message
        );
        assert!(
            e.cause.fix.contains("ConfigMap labs/dockerfile"),
            "{}",
            e.cause.fix
        );
        assert!(
            e.cause
                .fix
                .contains("kubectl logs -n labs kmod-build-6-1-0-56-amd64")
        );
        assert_eq!(e.image_state, "build failed");
    }

    #[test]
    fn needs_building_without_a_build_waits_and_says_so() {
        let mut o = observed(built_module());
        o.mic = Some(mic("NeedsBuilding", "NotFound"));
        let e = explain_one(&o);
        assert_eq!(e.state, NodeState::Loading);
        assert_eq!(e.cause.reason, "Building");
        assert!(
            e.cause.message.contains("no build has started"),
            "{}",
            e.cause.message
        );
        assert_eq!(e.signing, "needs signing");
    }

    #[test]
    fn sign_failure_names_the_secrets() {
        let mut o = observed(built_module());
        o.mic = Some(mic("NeedsSigning", "NotFound"));
        o.mbsc = Some(
            serde_json::from_value(json!({
                "metadata": {"name": "kmod", "namespace": "labs"},
                "spec": {"images": []},
                "status": {"images": [{"image": "r/kmod:6.1.0-56-amd64", "status": "Failure", "action": "SignImage"}]}
            }))
            .unwrap(),
        );
        let e = explain_one(&o);
        assert_eq!(e.cause.reason, "SignFailed");
        assert!(e.cause.fix.contains("labs/key") && e.cause.fix.contains("labs/cert"));
    }

    #[test]
    fn the_first_failing_step_is_the_cause() {
        // Not selected and no mapping: the selector comes first.
        let mut o = observed(module(json!({
            "modprobe": {"moduleName": "kmod"},
            "kernelMappings": [{"literal": "5.14.0", "containerImage": "r/kmod:1"}]
        })));
        o.nodes = vec![node("n1", "6.1.0-56-amd64", json!({"lab": "no"}))];
        let e = explain_one(&o);
        assert_eq!(e.cause.reason, "NotSelected");
        assert!(
            e.cause.fix.contains("kubectl label node n1 lab=yes"),
            "{}",
            e.cause.fix
        );
        assert!(
            e.chain
                .iter()
                .any(|s| s.check == "kernel mapping" && s.outcome == Outcome::Fail),
            "every step is still shown"
        );
    }

    #[test]
    fn registry_problems_are_told_apart() {
        let mut o = observed(module(json!({
            "modprobe": {"moduleName": "kmod"},
            "kernelMappings": [{"regexp": ".", "containerImage": "r/kmod:${KERNEL_FULL_VERSION}"}]
        })));
        for (state, reason, expected) in [
            ("DoesNotExist", "NotFound", "ImageMissing"),
            ("", "Unauthorized", "ImageUnauthorized"),
            ("", "TlsError", "RegistryUnreachable"),
            ("", "RegistryError", "ImageCheckRetrying"),
        ] {
            o.mic = Some(mic(state, reason));
            assert_eq!(explain_one(&o).cause.reason, expected, "{state} {reason}");
        }
    }

    #[test]
    fn unknown_node_is_reported() {
        let o = observed(built_module());
        let e = explain_module(&o, &NodeScope::One("ghost".into()));
        assert_eq!(e.nodes[0].cause.reason, "NodeNotFound");
    }

    #[test]
    fn no_selected_node_shows_every_node_for_explain_and_none_for_status() {
        let mut o = observed(built_module());
        o.nodes = vec![node("n1", "6.1.0-56-amd64", json!({}))];
        assert_eq!(explain_module(&o, &NodeScope::Relevant).nodes.len(), 1);
        assert!(explain_module(&o, &NodeScope::Targeted).nodes.is_empty());
    }
}
