//! `kmmctl status`: one row per Module and node — loaded, loading, failed or not targeted, with
//! the reason and ages. A summary of the same per-node explanations `explain` prints.

use jiff::Timestamp;
use serde::Serialize;

use crate::explain::{ModuleExplanation, NodeScope, Observed, explain_module};
use crate::table::{age, render};

/// One row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusRow {
    /// Module namespace.
    pub namespace: String,
    /// Module name.
    pub module: String,
    /// Node name, empty when the Module targets no node.
    pub node: String,
    /// Node kernel.
    pub kernel: String,
    /// `loaded`, `loading`, `failed` or `not targeted`.
    pub state: String,
    /// The cause's reason.
    pub reason: String,
    /// The cause's message.
    pub message: String,
    /// Module image for the node's kernel.
    pub image: String,
    /// `found`, `missing`, `built`, `needs build` ...
    pub image_state: String,
    /// `signed`, `needs signing`, `sign failed` or `-`.
    pub signing: String,
    /// The node carries the module's ready label.
    pub labelled: bool,
    /// `running`, `pending`, `none` or `-`.
    pub device_plugin: String,
    /// When the node's state last changed, if known.
    pub since: Option<Timestamp>,
    /// When the Module was created.
    pub created: Option<Timestamp>,
}

/// Rows for every Module, nodes the Module targets or has configured only.
pub fn status_rows(observed: &[Observed]) -> Vec<StatusRow> {
    observed
        .iter()
        .flat_map(|o| rows_of(&explain_module(o, &NodeScope::Targeted)))
        .collect()
}

fn rows_of(explanation: &ModuleExplanation) -> Vec<StatusRow> {
    if explanation.nodes.is_empty() {
        let (reason, message) = match explanation.invalid.first() {
            Some(error) => ("InvalidSpec", error.clone()),
            None => (
                "NoMatchingNodes",
                "no node has the selector's labels".to_owned(),
            ),
        };
        return vec![StatusRow {
            namespace: explanation.namespace.clone(),
            module: explanation.name.clone(),
            node: String::new(),
            kernel: String::new(),
            state: "not targeted".into(),
            reason: reason.into(),
            message,
            image: String::new(),
            image_state: "-".into(),
            signing: "-".into(),
            labelled: false,
            device_plugin: "-".into(),
            since: None,
            created: explanation.created,
        }];
    }
    explanation
        .nodes
        .iter()
        .map(|n| StatusRow {
            namespace: explanation.namespace.clone(),
            module: explanation.name.clone(),
            node: n.node.clone(),
            kernel: n.kernel.clone(),
            state: n.state.as_str().into(),
            reason: n.cause.reason.clone(),
            message: n.cause.message.clone(),
            image: n.image.clone().unwrap_or_default(),
            image_state: n.image_state.clone(),
            signing: n.signing.clone(),
            labelled: n.labelled,
            device_plugin: n.device_plugin.clone(),
            since: n.since,
            created: explanation.created,
        })
        .collect()
}

fn or_dash(text: &str) -> String {
    if text.is_empty() {
        "-".into()
    } else {
        text.to_owned()
    }
}

/// The table; `wide` adds kernel, image, signing, label and device plugin columns.
pub fn render_table(rows: &[StatusRow], wide: bool, now: Timestamp) -> String {
    if rows.is_empty() {
        return "No Modules found.\n".into();
    }
    let when = |t: Option<Timestamp>| t.map_or_else(|| "-".to_owned(), |t| age(t, now));
    if wide {
        let body: Vec<Vec<String>> = rows
            .iter()
            .map(|r| {
                vec![
                    r.namespace.clone(),
                    r.module.clone(),
                    or_dash(&r.node),
                    or_dash(&r.kernel),
                    r.state.clone(),
                    r.reason.clone(),
                    r.image_state.clone(),
                    r.signing.clone(),
                    if r.labelled { "yes" } else { "no" }.into(),
                    r.device_plugin.clone(),
                    when(r.since),
                    when(r.created),
                ]
            })
            .collect();
        render(
            &[
                "NAMESPACE",
                "MODULE",
                "NODE",
                "KERNEL",
                "STATE",
                "REASON",
                "IMAGE",
                "SIGNED",
                "LABELLED",
                "DEVICE-PLUGIN",
                "SINCE",
                "AGE",
            ],
            &body,
        )
    } else {
        let body: Vec<Vec<String>> = rows
            .iter()
            .map(|r| {
                vec![
                    r.namespace.clone(),
                    r.module.clone(),
                    or_dash(&r.node),
                    r.state.clone(),
                    r.reason.clone(),
                    when(r.since),
                    when(r.created),
                ]
            })
            .collect();
        render(
            &[
                "NAMESPACE",
                "MODULE",
                "NODE",
                "STATE",
                "REASON",
                "SINCE",
                "AGE",
            ],
            &body,
        )
    }
}
