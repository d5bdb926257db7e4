//! Pure KMM planning logic, with no Kubernetes client and no async runtime: kernel-mapping
//! resolution, variable substitution, the build/sign merge rules, Module validation and the
//! names of the objects the operator creates. Everything here takes plain data and returns plain
//! data, so it is tested with tables.

pub mod build_pod;
pub mod device_plugin;
pub mod dtk;
pub mod kernel;
pub mod mapping;
pub mod module_plan;
pub mod nmc_plan;
pub mod openshift_build;
pub mod preflight;
pub mod sign_pod;
pub mod status;
pub mod subst;
pub mod targeting;
pub mod validate;
pub mod version_labels;
pub mod worker_pod;
