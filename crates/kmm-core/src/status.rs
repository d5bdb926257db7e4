//! A Module's status, recomputed from scratch on every pass: the node counts Go KMM reports and
//! kmm-rs's conditions, whose reasons and messages name the nodes, kernels and images involved.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kmm_api::v1beta1::{DaemonSetStatus, ImageState, ModuleImageState, ModuleStatus};
use kmm_api::wire::image_reason;

use crate::module_plan::{ModulePlan, NodeDecision};

/// Condition types.
pub mod condition {
    /// The module is loaded, with the current configuration, on every node that should have it.
    pub const READY: &str = "Ready";
    /// Loads, unloads, image checks or builds are under way.
    pub const PROGRESSING: &str = "Progressing";
    /// Something needs the administrator: a failure, a missing image, an invalid spec, a kernel
    /// without a mapping.
    pub const DEGRADED: &str = "Degraded";
}

/// What happened on one node's NMC for this module.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeModuleFacts {
    /// The NMC carries the module's `module-configured` label.
    pub configured: bool,
    /// The status config equals the spec config (loaded with the current configuration).
    pub available: bool,
    /// The last failure recorded there: reason and message.
    pub last_failure: Option<(String, String)>,
}

/// Inputs of the status computation beyond the plan.
#[derive(Debug, Clone, Default)]
pub struct StatusInputs<'a> {
    /// Per node name.
    pub nodes: BTreeMap<String, NodeModuleFacts>,
    /// The MIC status entries.
    pub images: &'a [ModuleImageState],
    /// Validation errors, if the Module is invalid (then nothing else is computed).
    pub invalid: Option<String>,
}

/// The computed status parts.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ComputedStatus {
    /// `status.moduleLoader`.
    pub module_loader: DaemonSetStatus,
    /// `status.conditions` (types Ready, Progressing, Degraded).
    pub conditions: Vec<Condition>,
}

fn list(names: &[&str]) -> String {
    const SHOWN: usize = 5;
    let mut text = names
        .iter()
        .take(SHOWN)
        .copied()
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > SHOWN {
        text.push_str(&format!(" and {} more", names.len() - SHOWN));
    }
    text
}

struct Cond {
    type_: &'static str,
    status: bool,
    reason: String,
    message: String,
}

/// Computes counts and conditions. `previous` keeps `lastTransitionTime` of conditions whose
/// status did not change; `generation` is the Module's `metadata.generation`.
pub fn compute_status(
    plan: Option<&ModulePlan>,
    inputs: &StatusInputs<'_>,
    previous: &[Condition],
    generation: Option<i64>,
    now: &Time,
) -> ComputedStatus {
    let mut out = ComputedStatus::default();
    let conds = match (&inputs.invalid, plan) {
        (Some(errors), _) => vec![
            Cond {
                type_: condition::READY,
                status: false,
                reason: "InvalidSpec".into(),
                message: errors.clone(),
            },
            Cond {
                type_: condition::PROGRESSING,
                status: false,
                reason: "InvalidSpec".into(),
                message: "fix the Module spec".into(),
            },
            Cond {
                type_: condition::DEGRADED,
                status: true,
                reason: "InvalidSpec".into(),
                message: errors.clone(),
            },
        ],
        (None, None) => vec![
            Cond {
                type_: condition::READY,
                status: true,
                reason: "NoModuleLoader".into(),
                message: "the Module loads no kernel module".into(),
            },
            Cond {
                type_: condition::PROGRESSING,
                status: false,
                reason: "NoModuleLoader".into(),
                message: String::new(),
            },
            Cond {
                type_: condition::DEGRADED,
                status: false,
                reason: "NoModuleLoader".into(),
                message: String::new(),
            },
        ],
        (None, Some(plan)) => {
            let desired = inputs.nodes.values().filter(|n| n.configured).count();
            let available = inputs
                .nodes
                .values()
                .filter(|n| n.configured && n.available)
                .count();
            out.module_loader = DaemonSetStatus {
                nodes_matching_selector_number: count(plan.matching_nodes),
                desired_number: count(desired),
                available_number: count(available),
            };
            loader_conditions(plan, inputs, desired, available)
        }
    };
    out.conditions = conds
        .into_iter()
        .map(|c| {
            let status = if c.status { "True" } else { "False" };
            let unchanged = previous
                .iter()
                .find(|p| p.type_ == c.type_)
                .filter(|p| p.status == status);
            Condition {
                type_: c.type_.into(),
                status: status.into(),
                reason: c.reason,
                message: c.message,
                observed_generation: generation,
                last_transition_time: unchanged
                    .map_or_else(|| now.clone(), |p| p.last_transition_time.clone()),
            }
        })
        .collect();
    out
}

fn count(n: usize) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

fn loader_conditions(
    plan: &ModulePlan,
    inputs: &StatusInputs<'_>,
    desired: usize,
    available: usize,
) -> Vec<Cond> {
    let mut by_reason: BTreeMap<&'static str, Vec<&str>> = BTreeMap::new();
    let mut details: BTreeMap<&'static str, String> = BTreeMap::new();
    for (node, decision) in &plan.decisions {
        by_reason.entry(decision.reason()).or_default().push(node);
        match decision {
            NodeDecision::NoMatchingMapping { error } | NodeDecision::InvalidSpec { error } => {
                details
                    .entry(decision.reason())
                    .or_insert_with(|| error.to_string());
            }
            _ => {}
        }
    }
    let failures: Vec<(&str, &(String, String))> = inputs
        .nodes
        .iter()
        .filter(|(_, n)| !n.available)
        .filter_map(|(node, n)| n.last_failure.as_ref().map(|f| (node.as_str(), f)))
        .collect();
    let image_problem = |state: &ModuleImageState| {
        // An image being built or signed is progress, not a problem (its reason says why the
        // build was needed).
        matches!(state.status, ImageState::DoesNotExist)
            || !state.reason.is_empty() && state.status == ImageState::Unknown
    };
    let bad_images: Vec<&ModuleImageState> =
        inputs.images.iter().filter(|s| image_problem(s)).collect();

    // Degraded: the first problem that needs the administrator, most actionable first.
    let degraded = if let Some((node, (reason, message))) = failures.first() {
        let nodes: Vec<&str> = failures.iter().map(|(n, _)| *n).collect();
        Some(Cond {
            type_: condition::DEGRADED,
            status: true,
            reason: "LoadFailed".into(),
            message: format!(
                "load or unload failed on {} node(s) ({}); on {node}: {reason}: {message}",
                nodes.len(),
                list(&nodes)
            ),
        })
    } else if let Some(image) = bad_images.first() {
        let reason = match image.reason.as_str() {
            image_reason::UNAUTHORIZED => "ImageUnauthorized",
            image_reason::REGISTRY_UNREACHABLE | image_reason::TLS_ERROR => "RegistryUnreachable",
            // Set by the MIC reconciler from the ModuleBuildSignConfig outcome.
            reason @ ("BuildFailed" | "SignFailed") => reason,
            _ => "ImageMissing",
        };
        let said = if image.message.is_empty() {
            String::new()
        } else {
            format!(": {}", image.message)
        };
        Some(Cond {
            type_: condition::DEGRADED,
            status: true,
            reason: reason.into(),
            message: format!(
                "image {} is not usable ({}){said}",
                image.image,
                if image.reason.is_empty() {
                    "does not exist"
                } else {
                    &image.reason
                }
            ),
        })
    } else if let Some(nodes) = by_reason.get("InvalidSpec") {
        Some(Cond {
            type_: condition::DEGRADED,
            status: true,
            reason: "InvalidSpec".into(),
            message: format!(
                "{} (nodes {})",
                details.get("InvalidSpec").cloned().unwrap_or_default(),
                list(nodes)
            ),
        })
    } else {
        by_reason.get("NoMatchingMapping").map(|nodes| Cond {
            type_: condition::DEGRADED,
            status: true,
            reason: "NoMatchingMapping".into(),
            message: format!(
                "no kernel mapping for {} node(s) ({}): {}",
                nodes.len(),
                list(nodes),
                details
                    .get("NoMatchingMapping")
                    .cloned()
                    .unwrap_or_default()
            ),
        })
    };

    let waiting = by_reason.get("WaitingForImage").map_or(0, Vec::len);
    let loading = desired.saturating_sub(available);
    let progressing = if waiting > 0 || loading > 0 {
        let mut parts = Vec::new();
        if loading > 0 {
            parts.push(format!("loading on {loading} of {desired} node(s)"));
        }
        if let Some(nodes) = by_reason.get("WaitingForImage") {
            parts.push(format!(
                "waiting for the image on {} node(s) ({})",
                nodes.len(),
                list(nodes)
            ));
        }
        Cond {
            type_: condition::PROGRESSING,
            status: true,
            reason: "Rollout".into(),
            message: parts.join("; "),
        }
    } else {
        Cond {
            type_: condition::PROGRESSING,
            status: false,
            reason: "Stable".into(),
            message: String::new(),
        }
    };

    let ready = if desired > 0 && available == desired && waiting == 0 {
        Cond {
            type_: condition::READY,
            status: true,
            reason: "Loaded".into(),
            message: format!("loaded on {available} node(s)"),
        }
    } else if desired == 0 && plan.matching_nodes == 0 {
        Cond {
            type_: condition::READY,
            status: false,
            reason: "NoMatchingNodes".into(),
            message: "no node matches the selector and tolerates its taints".into(),
        }
    } else {
        Cond {
            type_: condition::READY,
            status: false,
            reason: degraded
                .as_ref()
                .map_or_else(|| "Progressing".to_owned(), |d| d.reason.clone()),
            message: format!(
                "loaded on {available} of {} node(s)",
                desired.max(plan.matching_nodes)
            ),
        }
    };
    let degraded = degraded.unwrap_or(Cond {
        type_: condition::DEGRADED,
        status: false,
        reason: "AsExpected".into(),
        message: String::new(),
    });
    vec![ready, progressing, degraded]
}

/// Whether going from `previous` to `next` only moves a rollout along: node counts and condition
/// messages ("loaded on 230 of 2000 node(s)") differ, while every condition keeps its status and
/// reason and nothing else changed. Such a write can wait a few seconds; any other change is news
/// for the administrator and goes out at once.
pub fn only_progress_changed(previous: &ModuleStatus, next: &ModuleStatus) -> bool {
    let shape = |conditions: &[Condition]| -> Vec<(String, String, String, Option<i64>)> {
        conditions
            .iter()
            .map(|c| {
                (
                    c.type_.clone(),
                    c.status.clone(),
                    c.reason.clone(),
                    c.observed_generation,
                )
            })
            .collect()
    };
    let rest_equal = ModuleStatus {
        module_loader: previous.module_loader,
        conditions: previous.conditions.clone(),
        ..next.clone()
    } == *previous;
    rest_equal && shape(&previous.conditions) == shape(&next.conditions)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapping::MappingError;
    use k8s_openapi::jiff::Timestamp;

    fn now() -> Time {
        Time(Timestamp::from_second(1_800_000_000).unwrap())
    }

    fn plan(decisions: &[(&str, NodeDecision)], matching: usize) -> ModulePlan {
        ModulePlan {
            decisions: decisions
                .iter()
                .map(|(n, d)| ((*n).to_owned(), d.clone()))
                .collect(),
            matching_nodes: matching,
            ..ModulePlan::default()
        }
    }

    fn facts(configured: bool, available: bool, failure: Option<(&str, &str)>) -> NodeModuleFacts {
        NodeModuleFacts {
            configured,
            available,
            last_failure: failure.map(|(r, m)| (r.to_owned(), m.to_owned())),
        }
    }

    fn cond<'a>(status: &'a ComputedStatus, type_: &str) -> &'a Condition {
        status.conditions.iter().find(|c| c.type_ == type_).unwrap()
    }

    #[test]
    fn all_loaded_is_ready() {
        let p = plan(
            &[
                ("a", NodeDecision::Configured { image: "i".into() }),
                ("b", NodeDecision::Configured { image: "i".into() }),
            ],
            2,
        );
        let inputs = StatusInputs {
            nodes: [
                ("a".into(), facts(true, true, None)),
                ("b".into(), facts(true, true, None)),
            ]
            .into(),
            ..Default::default()
        };
        let s = compute_status(Some(&p), &inputs, &[], Some(3), &now());
        assert_eq!(
            s.module_loader,
            DaemonSetStatus {
                nodes_matching_selector_number: 2,
                desired_number: 2,
                available_number: 2
            }
        );
        assert_eq!(
            (
                cond(&s, "Ready").status.as_str(),
                cond(&s, "Ready").reason.as_str()
            ),
            ("True", "Loaded")
        );
        assert_eq!(cond(&s, "Degraded").status, "False");
        assert_eq!(cond(&s, "Ready").observed_generation, Some(3));
    }

    #[test]
    fn no_mapping_names_the_nodes_and_kernel() {
        let error = MappingError::NoMatch {
            kernel: "5.14.0-1.el9".into(),
            tried: vec!["literal \"6.1.0\"".into()],
        };
        let p = plan(
            &[
                ("a", NodeDecision::Configured { image: "i".into() }),
                ("c", NodeDecision::NoMatchingMapping { error }),
            ],
            2,
        );
        let inputs = StatusInputs {
            nodes: [("a".into(), facts(true, true, None))].into(),
            ..Default::default()
        };
        let s = compute_status(Some(&p), &inputs, &[], None, &now());
        let degraded = cond(&s, "Degraded");
        assert_eq!(
            (degraded.status.as_str(), degraded.reason.as_str()),
            ("True", "NoMatchingMapping")
        );
        assert!(
            degraded.message.contains("1 node(s) (c)") && degraded.message.contains("5.14.0-1.el9"),
            "{}",
            degraded.message
        );
    }

    #[test]
    fn load_failure_beats_other_problems_and_is_named() {
        let p = plan(&[("a", NodeDecision::Configured { image: "i".into() })], 1);
        let inputs = StatusInputs {
            nodes: [(
                "a".into(),
                facts(
                    true,
                    false,
                    Some(("SignatureRejected", "Key was rejected by service")),
                ),
            )]
            .into(),
            ..Default::default()
        };
        let s = compute_status(Some(&p), &inputs, &[], None, &now());
        let degraded = cond(&s, "Degraded");
        assert_eq!(degraded.reason, "LoadFailed");
        assert!(
            degraded
                .message
                .contains("on a: SignatureRejected: Key was rejected by service"),
            "{}",
            degraded.message
        );
        assert_eq!(cond(&s, "Ready").reason, "LoadFailed");
        assert_eq!(cond(&s, "Progressing").status, "True");
    }

    #[test]
    fn missing_and_unauthorized_images_differ() {
        let p = plan(
            &[(
                "a",
                NodeDecision::WaitingForImage {
                    image: "r/m:1".into(),
                    state: ImageState::DoesNotExist,
                },
            )],
            1,
        );
        let missing = [ModuleImageState {
            image: "r/m:1".into(),
            status: ImageState::DoesNotExist,
            reason: "NotFound".into(),
            message: "manifest unknown".into(),
        }];
        let denied = [ModuleImageState {
            image: "r/m:1".into(),
            status: ImageState::Unknown,
            reason: "Unauthorized".into(),
            message: "401".into(),
        }];
        let reason = |images: &[ModuleImageState]| {
            let inputs = StatusInputs {
                images,
                ..Default::default()
            };
            cond(
                &compute_status(Some(&p), &inputs, &[], None, &now()),
                "Degraded",
            )
            .reason
            .clone()
        };
        assert_eq!(reason(&missing), "ImageMissing");
        assert_eq!(reason(&denied), "ImageUnauthorized");
        let failed = [ModuleImageState {
            image: "r/a:1".into(),
            status: ImageState::DoesNotExist,
            reason: "BuildFailed".into(),
            message: "build pod ns/a-build-6-1 failed: exit 1".into(),
        }];
        assert_eq!(reason(&failed), "BuildFailed");
    }

    #[test]
    fn invalid_spec_and_transition_times() {
        let inputs = StatusInputs {
            invalid: Some("spec.x: bad".into()),
            ..Default::default()
        };
        let first = compute_status(None, &inputs, &[], None, &now());
        assert_eq!(cond(&first, "Degraded").reason, "InvalidSpec");
        let later = Time(Timestamp::from_second(1_900_000_000).unwrap());
        let second = compute_status(None, &inputs, &first.conditions, None, &later);
        assert_eq!(
            cond(&second, "Degraded").last_transition_time,
            now(),
            "unchanged status keeps its time"
        );
        let fixed = compute_status(
            Some(&plan(&[], 0)),
            &StatusInputs::default(),
            &first.conditions,
            None,
            &later,
        );
        assert_eq!(cond(&fixed, "Degraded").last_transition_time, later);
        assert_eq!(cond(&fixed, "Ready").reason, "NoMatchingNodes");
    }

    fn status(available: i32, conditions: &[(&str, &str, &str, &str)]) -> ModuleStatus {
        ModuleStatus {
            module_loader: DaemonSetStatus {
                available_number: available,
                desired_number: 2000,
                nodes_matching_selector_number: 2000,
            },
            conditions: conditions
                .iter()
                .map(|(type_, status, reason, message)| Condition {
                    type_: (*type_).into(),
                    status: (*status).into(),
                    reason: (*reason).into(),
                    message: (*message).into(),
                    observed_generation: Some(1),
                    last_transition_time: now(),
                })
                .collect(),
            ..ModuleStatus::default()
        }
    }

    #[test]
    fn a_rollout_moving_along_is_only_progress() {
        let before = status(
            230,
            &[(
                "Ready",
                "False",
                "Progressing",
                "loaded on 230 of 2000 node(s)",
            )],
        );
        let after = status(
            240,
            &[(
                "Ready",
                "False",
                "Progressing",
                "loaded on 240 of 2000 node(s)",
            )],
        );
        assert!(only_progress_changed(&before, &after));
        assert!(only_progress_changed(&before, &before));
    }

    #[test]
    fn a_new_condition_status_or_reason_is_news() {
        let before = status(1999, &[("Ready", "False", "Progressing", "loaded on 1999")]);
        let ready = status(2000, &[("Ready", "True", "Loaded", "loaded on 2000")]);
        assert!(!only_progress_changed(&before, &ready));
        let failed = status(1999, &[("Ready", "False", "LoadFailed", "loaded on 1999")]);
        assert!(!only_progress_changed(&before, &failed));
        let more = status(
            1999,
            &[
                ("Ready", "False", "Progressing", "loaded on 1999"),
                ("Degraded", "True", "LoadFailed", "on node-7"),
            ],
        );
        assert!(!only_progress_changed(&before, &more));
        let rebuilt = ModuleStatus {
            image_rebuild_trigger_generation: Some(2),
            ..before.clone()
        };
        assert!(!only_progress_changed(&before, &rebuilt));
    }
}
