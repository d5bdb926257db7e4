//! Simulated nodes: kwok manages every Node annotated `kwok.x-k8s.io/node: fake`, makes it Ready
//! and keeps the `status.nodeInfo` a test sets (kernel version, OS image, boot ID).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Node, NodeSpec, NodeStatus, NodeSystemInfo, Taint};
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::wait::Condition;
use serde_json::json;

use crate::wait::{WAIT_TIMEOUT, wait_for};

/// The annotation kwok looks for.
const KWOK_NODE_ANNOTATION: &str = "kwok.x-k8s.io/node";

/// A node to create.
#[derive(Debug, Clone)]
pub struct FakeNode {
    /// Node name.
    pub name: String,
    /// `status.nodeInfo.kernelVersion`.
    pub kernel_version: String,
    /// `status.nodeInfo.osImage`.
    pub os_image: String,
    /// `status.nodeInfo.bootID`.
    pub boot_id: String,
    /// Labels (`kubernetes.io/hostname` is added).
    pub labels: BTreeMap<String, String>,
    /// Taints.
    pub taints: Vec<Taint>,
}

impl FakeNode {
    /// A node with the given kernel and defaults for the rest.
    pub fn new(name: impl Into<String>, kernel_version: impl Into<String>) -> Self {
        let name = name.into();
        Self {
            boot_id: format!("{name}-boot-1"),
            name,
            kernel_version: kernel_version.into(),
            os_image: "Debian GNU/Linux 12 (bookworm)".into(),
            labels: BTreeMap::new(),
            taints: Vec::new(),
        }
    }

    /// Adds a label.
    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    /// Adds a taint.
    pub fn taint(mut self, key: &str, effect: &str) -> Self {
        self.taints.push(Taint {
            key: key.into(),
            effect: effect.into(),
            ..Taint::default()
        });
        self
    }

    /// Sets the OS image.
    pub fn os_image(mut self, os_image: impl Into<String>) -> Self {
        self.os_image = os_image.into();
        self
    }

    /// Creates the node (the API server keeps the status given on create) and waits until kwok
    /// has made it Ready.
    pub async fn create(self, client: &kube::Client) -> anyhow::Result<Node> {
        let mut labels = self.labels;
        labels.insert("kubernetes.io/hostname".into(), self.name.clone());
        labels.insert("type".into(), "kwok".into());
        let node = Node {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                labels: Some(labels),
                annotations: Some(BTreeMap::from([(
                    KWOK_NODE_ANNOTATION.into(),
                    "fake".into(),
                )])),
                ..ObjectMeta::default()
            },
            spec: Some(NodeSpec {
                taints: (!self.taints.is_empty()).then_some(self.taints),
                ..NodeSpec::default()
            }),
            status: Some(NodeStatus {
                node_info: Some(NodeSystemInfo {
                    kernel_version: self.kernel_version,
                    os_image: self.os_image,
                    boot_id: self.boot_id,
                    architecture: "amd64".into(),
                    operating_system: "linux".into(),
                    ..NodeSystemInfo::default()
                }),
                ..NodeStatus::default()
            }),
        };
        let api = Api::<Node>::all(client.clone());
        api.create(&PostParams::default(), &node).await?;
        let ready = wait_for(&api, &self.name, WAIT_TIMEOUT, "Ready", is_node_ready()).await?;
        ready.ok_or_else(|| anyhow::anyhow!("node {} vanished", self.name))
    }
}

/// Condition: the node reports Ready=True.
pub fn is_node_ready() -> impl Condition<Node> {
    |node: Option<&Node>| {
        node.and_then(|n| n.status.as_ref())
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|conditions| {
                conditions
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True")
            })
    }
}

async fn patch_node_info(
    client: &kube::Client,
    name: &str,
    info: serde_json::Value,
) -> anyhow::Result<Node> {
    let api = Api::<Node>::all(client.clone());
    let patch = json!({"status": {"nodeInfo": info}});
    Ok(api
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?)
}

/// Simulates a reboot: a new boot ID.
pub async fn reboot_node(client: &kube::Client, name: &str, boot_id: &str) -> anyhow::Result<Node> {
    patch_node_info(client, name, json!({"bootID": boot_id})).await
}

/// Simulates a kernel upgrade (reboot into a new kernel): new kernel version and boot ID.
pub async fn set_kernel(
    client: &kube::Client,
    name: &str,
    kernel: &str,
    boot_id: &str,
) -> anyhow::Result<Node> {
    patch_node_info(
        client,
        name,
        json!({"kernelVersion": kernel, "bootID": boot_id}),
    )
    .await
}
