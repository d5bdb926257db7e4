//! kmm.sigs.x-k8s.io/v1beta2: the stored version of `PreflightValidation`.

pub mod preflight;

pub use preflight::*;
