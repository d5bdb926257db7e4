//! The KMM API as Rust types: every kind of `kmm.sigs.x-k8s.io` and `hub.kmm.sigs.x-k8s.io`,
//! field for field compatible with the Go KMM operator, plus the wire strings (labels,
//! annotations, finalizers, names) and the CRD generation.
//!
//! Fields that Go always serialises (no `omitempty`) read `null`, a missing key and an empty value
//! alike, so objects written by Go clients deserialise cleanly.

pub mod crds;
pub mod hub;
mod serde_util;
pub mod v1beta1;
pub mod v1beta2;
pub mod wire;
