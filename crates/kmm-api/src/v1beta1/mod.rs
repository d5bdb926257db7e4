//! kmm.sigs.x-k8s.io/v1beta1: Module and the operator's internal kinds.

pub mod images;
pub mod module;
pub mod nmc;
pub mod preflight;

pub use images::*;
pub use module::*;
pub use nmc::*;
pub use preflight::{
    CrStatus, PreflightValidation, PreflightValidationSpec, PreflightValidationStatus,
};
