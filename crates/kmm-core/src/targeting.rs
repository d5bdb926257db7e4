//! Which nodes a Module targets: its label selector and the node's taints, with KMM's internal
//! pressure tolerations, and kmm-rs's rule that a cordon alone never unloads a loaded module.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Taint, Toleration};
use kmm_api::wire;

const NO_SCHEDULE: &str = "NoSchedule";
const NO_EXECUTE: &str = "NoExecute";
const EXISTS: &str = "Exists";
const EQUAL: &str = "Equal";

/// The tolerations KMM adds to every Module's own: disk, memory and PID pressure never stop a
/// module from being loaded.
pub fn internal_tolerations() -> Vec<Toleration> {
    wire::INTERNAL_TOLERATION_KEYS
        .iter()
        .map(|key| Toleration {
            key: Some((*key).to_owned()),
            operator: Some(EXISTS.to_owned()),
            effect: Some(NO_SCHEDULE.to_owned()),
            ..Toleration::default()
        })
        .collect()
}

/// The Module's tolerations followed by the internal ones.
pub fn with_internal_tolerations(module_tolerations: &[Toleration]) -> Vec<Toleration> {
    let mut all = module_tolerations.to_vec();
    all.extend(internal_tolerations());
    all
}

/// Kubernetes' toleration matching: effect (if set) and key (if set) equal, then `Exists`, or
/// `Equal`/empty operator with an equal value.
pub fn tolerates(toleration: &Toleration, taint: &Taint) -> bool {
    let effect = toleration.effect.as_deref().unwrap_or_default();
    if !effect.is_empty() && effect != taint.effect {
        return false;
    }
    let key = toleration.key.as_deref().unwrap_or_default();
    if !key.is_empty() && key != taint.key {
        return false;
    }
    match toleration.operator.as_deref().unwrap_or_default() {
        EXISTS => true,
        "" | EQUAL => {
            toleration.value.as_deref().unwrap_or_default()
                == taint.value.as_deref().unwrap_or_default()
        }
        _ => false,
    }
}

/// The first `NoSchedule` or `NoExecute` taint that none of `tolerations` tolerates.
pub fn blocking_taint<'t>(taints: &'t [Taint], tolerations: &[Toleration]) -> Option<&'t Taint> {
    taints.iter().find(|taint| {
        (taint.effect == NO_SCHEDULE || taint.effect == NO_EXECUTE)
            && !tolerations
                .iter()
                .any(|toleration| tolerates(toleration, taint))
    })
}

/// Whether every pair of the equality selector is among the node's labels. An empty selector
/// selects every node.
pub fn selector_matches(
    selector: &BTreeMap<String, String>,
    labels: &BTreeMap<String, String>,
) -> bool {
    selector
        .iter()
        .all(|(key, value)| labels.get(key) == Some(value))
}

/// What the selector and the taints say about one node for one module.
#[derive(Debug, Clone, PartialEq)]
pub enum Eligibility {
    /// The module belongs on the node.
    Eligible,
    /// The node is cordoned (only the `unschedulable` taint blocks it) and the module is already
    /// configured there: it stays loaded, but nothing new starts (kmm-rs difference from Go KMM,
    /// which unloads).
    KeptWhileCordoned,
    /// The node's labels do not match the Module's selector.
    NotSelected,
    /// A taint the Module does not tolerate keeps the module off the node.
    Tainted(Taint),
}

impl Eligibility {
    /// Whether the module should be (or stay) configured on the node.
    pub fn keeps_module(&self) -> bool {
        matches!(self, Self::Eligible | Self::KeptWhileCordoned)
    }
}

/// Decides whether a module belongs on a node. `tolerations` must already include the internal
/// ones; `configured` says whether the node's NMC currently holds the module.
pub fn eligibility(
    selector: &BTreeMap<String, String>,
    labels: &BTreeMap<String, String>,
    taints: &[Taint],
    tolerations: &[Toleration],
    configured: bool,
) -> Eligibility {
    if !selector_matches(selector, labels) {
        return Eligibility::NotSelected;
    }
    let untolerated: Vec<&Taint> = taints
        .iter()
        .filter(|taint| blocking_taint(std::slice::from_ref(*taint), tolerations).is_some())
        .collect();
    match untolerated.as_slice() {
        [] => Eligibility::Eligible,
        only_cordon
            if configured
                && only_cordon
                    .iter()
                    .all(|t| t.key == wire::TAINT_UNSCHEDULABLE) =>
        {
            Eligibility::KeptWhileCordoned
        }
        [first, ..] => Eligibility::Tainted((*first).clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn taint(key: &str, value: Option<&str>, effect: &str) -> Taint {
        Taint {
            key: key.into(),
            value: value.map(Into::into),
            effect: effect.into(),
            ..Taint::default()
        }
    }

    fn toleration(
        key: Option<&str>,
        operator: Option<&str>,
        value: Option<&str>,
        effect: Option<&str>,
    ) -> Toleration {
        Toleration {
            key: key.map(Into::into),
            operator: operator.map(Into::into),
            value: value.map(Into::into),
            effect: effect.map(Into::into),
            ..Toleration::default()
        }
    }

    #[test]
    fn toleration_matching_table() {
        let t = taint("gpu", Some("yes"), "NoSchedule");
        let cases = [
            (
                toleration(Some("gpu"), Some("Equal"), Some("yes"), Some("NoSchedule")),
                true,
            ),
            (toleration(Some("gpu"), None, Some("yes"), None), true),
            (
                toleration(Some("gpu"), Some("Equal"), Some("no"), None),
                false,
            ),
            (toleration(Some("gpu"), Some("Exists"), None, None), true),
            (toleration(None, Some("Exists"), None, None), true),
            (
                toleration(None, Some("Exists"), None, Some("NoExecute")),
                false,
            ),
            (toleration(Some("other"), Some("Exists"), None, None), false),
            (toleration(Some("gpu"), Some("Bogus"), None, None), false),
        ];
        for (tol, expected) in cases {
            assert_eq!(tolerates(&tol, &t), expected, "{tol:?}");
        }
    }

    #[test]
    fn prefer_no_schedule_never_blocks_and_pressure_is_tolerated_internally() {
        let taints = [
            taint("soft", None, "PreferNoSchedule"),
            taint("node.kubernetes.io/memory-pressure", None, "NoSchedule"),
        ];
        assert_eq!(blocking_taint(&taints, &internal_tolerations()), None);
        assert!(blocking_taint(&taints, &[]).is_some());
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn eligibility_table() {
        let selector = labels(&[("feature.kmm.lab", "true")]);
        let node = labels(&[
            ("feature.kmm.lab", "true"),
            ("kubernetes.io/hostname", "n1"),
        ]);
        let cordon = taint(wire::TAINT_UNSCHEDULABLE, None, "NoSchedule");
        let no_execute = taint("maintenance", None, "NoExecute");
        let internal = internal_tolerations();
        let cases = [
            (labels(&[]), vec![], false, Eligibility::NotSelected),
            (node.clone(), vec![], false, Eligibility::Eligible),
            (
                node.clone(),
                vec![cordon.clone()],
                true,
                Eligibility::KeptWhileCordoned,
            ),
            (
                node.clone(),
                vec![cordon.clone()],
                false,
                Eligibility::Tainted(cordon.clone()),
            ),
            (
                node.clone(),
                vec![no_execute.clone()],
                true,
                Eligibility::Tainted(no_execute.clone()),
            ),
            (
                node.clone(),
                vec![cordon.clone(), no_execute.clone()],
                true,
                Eligibility::Tainted(cordon.clone()),
            ),
        ];
        for (node_labels, taints, configured, expected) in cases {
            let got = eligibility(&selector, &node_labels, &taints, &internal, configured);
            assert_eq!(
                got, expected,
                "{node_labels:?} {taints:?} configured={configured}"
            );
        }
        assert_eq!(
            eligibility(&BTreeMap::new(), &labels(&[]), &[], &internal, false),
            Eligibility::Eligible
        );
    }

    #[test]
    fn tolerated_cordon_is_plain_eligible() {
        let cordon = taint(wire::TAINT_UNSCHEDULABLE, None, "NoSchedule");
        let mut tolerations = internal_tolerations();
        tolerations.push(toleration(
            Some(wire::TAINT_UNSCHEDULABLE),
            Some("Exists"),
            None,
            None,
        ));
        let got = eligibility(
            &BTreeMap::new(),
            &BTreeMap::new(),
            &[cordon],
            &tolerations,
            false,
        );
        assert_eq!(got, Eligibility::Eligible);
    }
}
