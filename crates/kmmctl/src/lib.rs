//! kmmctl, the kmm-rs command line (also the kubectl plugin `kubectl-kmm`): `explain` walks the
//! operator's decision chain for a Module on each node and names the most likely cause first,
//! `validate` checks manifests offline, `status` shows where every Module stands on every node.
//!
//! The commands are pure functions over objects read with a few list calls ([`gather`]), so
//! their logic is tested with plain data and their output with snapshots.

pub mod cli;
pub mod explain;
pub mod gather;
pub mod status;
pub mod table;
pub mod validate;
