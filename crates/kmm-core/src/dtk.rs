//! `DTK_AUTO`: the Driver Toolkit image for a kernel on OpenShift. The kernel leads to the nodes
//! that run it, their `osImage` to an RHCOS version (`414.92.202310170514-0`), and that version to
//! a tag of the ImageStream `openshift/driver-toolkit`, whose source image is the answer. Every
//! way this can fail says what it found, so that a user can tell a missing tag from a node whose
//! OS is not RHCOS (user pain #25).

use std::sync::LazyLock;

use regex::Regex;

/// Namespace of the Driver Toolkit ImageStream.
pub const IMAGE_STREAM_NAMESPACE: &str = "openshift";
/// Name of the Driver Toolkit ImageStream.
pub const IMAGE_STREAM_NAME: &str = "driver-toolkit";
/// The tag that follows the newest release; it says nothing about a kernel.
const LATEST: &str = "latest";

static OS_VERSION: LazyLock<Option<Regex>> = LazyLock::new(|| Regex::new(r"\d+\.\d+\.\d+-\d").ok());

/// What a node tells about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeOs<'a> {
    /// Node name.
    pub name: &'a str,
    /// `status.nodeInfo.kernelVersion`.
    pub kernel: &'a str,
    /// `status.nodeInfo.osImage`.
    pub os_image: &'a str,
}

/// One tag of the Driver Toolkit ImageStream: its name and `from.name`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DtkTag {
    /// Tag name (an RHCOS version).
    pub name: String,
    /// The image the tag points to.
    pub image: String,
}

/// Why `DTK_AUTO` has no value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DtkError {
    /// No node runs the kernel, so there is no osImage to go by.
    #[error(
        "could not get DTK image for kernel {kernel}: no node runs this kernel, so its OS version is unknown; set the build argument DTK_AUTO to the Driver Toolkit image for this kernel"
    )]
    NoNode {
        /// Kernel version.
        kernel: String,
    },
    /// The node's osImage carries no RHCOS version.
    #[error(
        "could not get DTK image for kernel {kernel}: osImage {os_image:?} of node {node} has no OpenShift OS version (like 414.92.202310170514-0); set the build argument DTK_AUTO to the Driver Toolkit image for this kernel"
    )]
    NoOsVersion {
        /// Kernel version.
        kernel: String,
        /// A node running it.
        node: String,
        /// Its osImage.
        os_image: String,
    },
    /// The ImageStream does not exist.
    #[error(
        "could not get DTK image for kernel {kernel}: ImageStream openshift/driver-toolkit not found; set the build argument DTK_AUTO to the Driver Toolkit image for this kernel"
    )]
    NoImageStream {
        /// Kernel version.
        kernel: String,
    },
    /// The ImageStream has no tag for the OS version.
    #[error(
        "could not get DTK image for kernel {kernel}: could not find osImage {os_version} (node {node}: {os_image:?}) in ImageStream openshift/driver-toolkit, whose tags are [{tags}]; set the build argument DTK_AUTO to the Driver Toolkit image for this kernel"
    )]
    NoTag {
        /// Kernel version.
        kernel: String,
        /// A node running it.
        node: String,
        /// Its osImage.
        os_image: String,
        /// The OS version found in it.
        os_version: String,
        /// The tags the ImageStream has (without `latest`).
        tags: String,
    },
}

/// The OS version in an osImage (`Red Hat Enterprise Linux CoreOS 414.92.202310170514-0 (Plow)`
/// → `414.92.202310170514-0`).
pub fn os_version(os_image: &str) -> Option<&str> {
    let regex = OS_VERSION.as_ref()?;
    let found = regex.find(os_image)?;
    // The regexp ends at the first digit after the dash; keep the whole build number.
    let rest = os_image.get(found.end()..).unwrap_or_default();
    let more = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    os_image.get(found.start()..found.end() + more)
}

/// The Driver Toolkit image for `kernel` (already without a trailing `+`). `tags` is `None` when
/// the ImageStream does not exist.
pub fn resolve(
    kernel: &str,
    nodes: &[NodeOs<'_>],
    tags: Option<&[DtkTag]>,
) -> Result<String, DtkError> {
    let mut running: Vec<&NodeOs<'_>> = nodes
        .iter()
        .filter(|n| crate::kernel::node_kernel(n.kernel) == kernel)
        .collect();
    running.sort_by_key(|n| n.name);
    let Some(first) = running.first() else {
        return Err(DtkError::NoNode {
            kernel: kernel.to_owned(),
        });
    };
    // Nodes with the same kernel run the same release; the first one with a version decides.
    let Some((node, version)) = running
        .iter()
        .find_map(|n| os_version(n.os_image).map(|v| (n, v)))
    else {
        return Err(DtkError::NoOsVersion {
            kernel: kernel.to_owned(),
            node: first.name.to_owned(),
            os_image: first.os_image.to_owned(),
        });
    };
    let Some(tags) = tags else {
        return Err(DtkError::NoImageStream {
            kernel: kernel.to_owned(),
        });
    };
    tags.iter()
        .filter(|t| t.name != LATEST)
        .find(|t| t.name == version && !t.image.is_empty())
        .map(|t| t.image.clone())
        .ok_or_else(|| DtkError::NoTag {
            kernel: kernel.to_owned(),
            node: node.name.to_owned(),
            os_image: node.os_image.to_owned(),
            os_version: version.to_owned(),
            tags: tags
                .iter()
                .filter(|t| t.name != LATEST)
                .map(|t| t.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tags() -> Vec<DtkTag> {
        vec![
            DtkTag {
                name: "latest".into(),
                image: "quay.io/dtk@sha256:latest".into(),
            },
            DtkTag {
                name: "414.92.202310170514-0".into(),
                image: "quay.io/dtk@sha256:414".into(),
            },
        ]
    }

    const RHCOS: &str = "Red Hat Enterprise Linux CoreOS 414.92.202310170514-0 (Plow)";

    #[test]
    fn os_versions_from_os_images() {
        assert_eq!(os_version(RHCOS), Some("414.92.202310170514-0"));
        assert_eq!(
            os_version("RHCOS 411.86.202210072320-12"),
            Some("411.86.202210072320-12")
        );
        assert_eq!(os_version("Debian GNU/Linux 12 (bookworm)"), None);
    }

    #[test]
    fn resolves_through_the_node_os_image() {
        let nodes = [NodeOs {
            name: "worker-0",
            kernel: "5.14.0-284.36.1.el9_2.x86_64",
            os_image: RHCOS,
        }];
        assert_eq!(
            resolve("5.14.0-284.36.1.el9_2.x86_64", &nodes, Some(&tags())).unwrap(),
            "quay.io/dtk@sha256:414"
        );
    }

    #[test]
    fn every_failure_says_what_was_found() {
        let roks = [NodeOs {
            name: "roks-1",
            kernel: "5.14.0-570.el9.x86_64",
            os_image: "Red Hat Enterprise Linux 9.6.20260616-0",
        }];
        let err = resolve("5.14.0-570.el9.x86_64", &roks, Some(&tags())).unwrap_err();
        assert_eq!(
            err.to_string(),
            "could not get DTK image for kernel 5.14.0-570.el9.x86_64: could not find osImage 9.6.20260616-0 (node roks-1: \"Red Hat Enterprise Linux 9.6.20260616-0\") in ImageStream openshift/driver-toolkit, whose tags are [414.92.202310170514-0]; set the build argument DTK_AUTO to the Driver Toolkit image for this kernel"
        );
        assert!(matches!(
            resolve("6.0.0-1", &roks, Some(&tags())),
            Err(DtkError::NoNode { .. })
        ));
        let debian = [NodeOs {
            name: "d",
            kernel: "6.1.0-56-amd64",
            os_image: "Debian GNU/Linux 12 (bookworm)",
        }];
        assert!(matches!(
            resolve("6.1.0-56-amd64", &debian, Some(&tags())),
            Err(DtkError::NoOsVersion { .. })
        ));
        let rhcos = [NodeOs {
            name: "w",
            kernel: "5.14.0-1",
            os_image: RHCOS,
        }];
        assert!(matches!(
            resolve("5.14.0-1", &rhcos, None),
            Err(DtkError::NoImageStream { .. })
        ));
    }
}
