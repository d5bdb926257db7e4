//! PreflightValidation: would every Module load on a kernel no node runs yet? Pure: the
//! reconciler hands in the Modules, the target kernel and what the `<module>-preflight`
//! ModuleImagesConfig knows about each image; this module says what each Module's verdict is and
//! which image still has to be checked (or built and signed).
//!
//! Go KMM's words are kept (`mapping not found`, `verified image exists`, …); kmm-rs appends the
//! detail after them (the mappings tried, the registry's or the build's reason). Unlike Go KMM,
//! `lastTransitionTime` moves only when the verdict changes, not on every reconcile.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kmm_api::v1beta1::{
    ImageState, Module, ModuleImageSpec, ModuleImageState, ModuleImagesConfigSpec,
};
use kmm_api::v1beta2::{PreflightValidationModuleStatus, VerificationStage, VerificationStatus};

use crate::mapping::{MappingError, resolve};
use crate::module_plan::{image_spec, images_config_spec};

/// Suffix of the ModuleImagesConfig a PreflightValidation creates for each Module.
pub const MIC_SUFFIX: &str = "-preflight";

/// Go KMM's reasons, kept as the start of ours.
pub mod reason {
    /// No kernel mapping matches the target kernel.
    pub const MAPPING_NOT_FOUND: &str = "mapping not found";
    /// The image exists (or was built and signed).
    pub const IMAGE_EXISTS: &str = "verified image exists";
    /// The image does not exist and nothing builds it.
    pub const IMAGE_MISSING: &str = "verified image does not exist";
    /// Appended to [`IMAGE_MISSING`] when the Module builds or signs.
    pub const BUILD_SIGN_FAILED: &str = " and build/sign failed";
    /// The image is still being checked, built or signed.
    pub const IN_PROGRESS: &str = "verification is not finished yet";
}

/// Name of the ModuleImagesConfig that verifies `module`'s image for a PreflightValidation.
pub fn mic_name(module: &str) -> String {
    format!("{module}{MIC_SUFFIX}")
}

/// The verdict on one Module for the target kernel.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    /// Success, Failure or InProgress.
    pub status: VerificationStatus,
    /// Why, starting with Go KMM's words.
    pub reason: String,
}

impl Verdict {
    fn new(status: VerificationStatus, reason: impl Into<String>) -> Self {
        Self {
            status,
            reason: reason.into(),
        }
    }

    /// `Done` once Success or Failure, `Image` while in progress.
    pub fn stage(&self) -> VerificationStage {
        match self.status {
            VerificationStatus::InProgress => VerificationStage::Image,
            VerificationStatus::Success | VerificationStatus::Failure => VerificationStage::Done,
        }
    }

    /// Whether the verdict is final (the image no longer needs checking).
    pub fn is_final(&self) -> bool {
        self.status != VerificationStatus::InProgress
    }
}

/// What verifying one Module needs next.
#[derive(Debug, Clone, PartialEq)]
pub struct ModuleCheck {
    /// The verdict so far.
    pub verdict: Verdict,
    /// The ModuleImagesConfig to create or keep while the verdict is not final.
    pub mic: Option<ModuleImagesConfigSpec>,
}

/// Verifies `module` for `kernel` (used verbatim, like Go KMM: no `+` trimming). `image_states`
/// is the status of the Module's `-preflight` ModuleImagesConfig, if there is one.
pub fn check_module(
    module: &Module,
    kernel: &str,
    push_built_image: bool,
    image_states: &[ModuleImageState],
) -> ModuleCheck {
    let done = |verdict| ModuleCheck { verdict, mic: None };
    let Some(loader) = module.spec.module_loader.as_ref() else {
        return done(Verdict::new(
            VerificationStatus::Success,
            "the Module has no moduleLoader: there is no kernel module to verify",
        ));
    };
    let name = module.metadata.name.as_deref().unwrap_or_default();
    let namespace = module.metadata.namespace.as_deref().unwrap_or_default();
    let resolved = match resolve(&loader.container, name, namespace, kernel) {
        Ok(resolved) => resolved,
        Err(error @ MappingError::NoMatch { .. }) => {
            return done(Verdict::new(
                VerificationStatus::Failure,
                format!("{}: {error}", reason::MAPPING_NOT_FOUND),
            ));
        }
        Err(error) => {
            return done(Verdict::new(
                VerificationStatus::Failure,
                format!("invalid Module: {error}"),
            ));
        }
    };
    let builds_or_signs = resolved.build.is_some() || resolved.sign.is_some();
    let image = image_spec(&resolved, loader);
    let state = image_states.iter().find(|s| s.image == image.image);
    let verdict = match state.map(|s| &s.status) {
        Some(ImageState::Exists) => Verdict::new(
            VerificationStatus::Success,
            format!("{}: {}", reason::IMAGE_EXISTS, image.image),
        ),
        Some(ImageState::DoesNotExist) => {
            let mut text = reason::IMAGE_MISSING.to_owned();
            if builds_or_signs {
                text.push_str(reason::BUILD_SIGN_FAILED);
            }
            text.push_str(&format!(": {}", image.image));
            if let Some(state) = state.filter(|s| !s.reason.is_empty() || !s.message.is_empty()) {
                text.push_str(&format!(" ({}: {})", state.reason, state.message));
            }
            Verdict::new(VerificationStatus::Failure, text)
        }
        _ => Verdict::new(VerificationStatus::InProgress, reason::IN_PROGRESS),
    };
    let mic = (!verdict.is_final()).then(|| {
        images_config_spec(
            module,
            loader,
            vec![ModuleImageSpec {
                // Report a missing image at once: preflight waits for no one to push it.
                skip_wait_missing_image: true,
                ..image
            }],
            push_built_image,
            None,
        )
    });
    ModuleCheck { verdict, mic }
}

/// The status entry of a Module: `previous` keeps its `lastTransitionTime` when neither the
/// verification status, the stage nor the reason changed.
pub fn status_entry(
    namespace: &str,
    name: &str,
    verdict: &Verdict,
    previous: &[PreflightValidationModuleStatus],
    now: &Time,
) -> PreflightValidationModuleStatus {
    let stage = verdict.stage();
    let unchanged = previous.iter().find(|p| {
        p.namespace == namespace
            && p.name == name
            && p.verification_status == verdict.status
            && p.verification_stage == stage
            && p.status_reason == verdict.reason
    });
    PreflightValidationModuleStatus {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        verification_status: verdict.status,
        status_reason: verdict.reason.clone(),
        verification_stage: stage,
        last_transition_time: unchanged
            .map_or_else(|| now.clone(), |p| p.last_transition_time.clone()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn module(mappings: &str) -> Module {
        serde_saphyr::from_str(&format!(
            "apiVersion: kmm.sigs.x-k8s.io/v1beta1\nkind: Module\nmetadata: {{name: m, namespace: ns}}\nspec:\n  selector: {{}}\n  moduleLoader:\n    container:\n      modprobe: {{moduleName: m}}\n      kernelMappings:\n{mappings}"
        ))
        .unwrap()
    }

    fn state(image: &str, status: ImageState, reason: &str) -> ModuleImageState {
        ModuleImageState {
            image: image.into(),
            status,
            reason: reason.into(),
            message: if reason.is_empty() { "" } else { "detail" }.into(),
        }
    }

    const PLAIN: &str =
        "        - literal: 6.1.0-1+x\n          containerImage: reg/m:${KERNEL_FULL_VERSION}\n";
    const BUILD: &str = "        - regexp: '^6\\.'\n          containerImage: reg/m:${KERNEL_FULL_VERSION}\n          build:\n            dockerfileConfigMap: {name: d}\n";

    #[test]
    fn no_mapping_fails_with_go_words_and_the_mappings_tried() {
        let check = check_module(&module(PLAIN), "5.14.0", false, &[]);
        assert_eq!(check.verdict.status, VerificationStatus::Failure);
        assert!(
            check.verdict.reason.starts_with("mapping not found: "),
            "{}",
            check.verdict.reason
        );
        assert!(
            check.verdict.reason.contains("5.14.0"),
            "{}",
            check.verdict.reason
        );
        assert_eq!(check.verdict.stage(), VerificationStage::Done);
        assert_eq!(check.mic, None);
    }

    #[test]
    fn kernel_is_used_verbatim() {
        // A node's `+` suffix is trimmed; the preflight kernel is not.
        let check = check_module(&module(PLAIN), "6.1.0-1+x", false, &[]);
        assert_eq!(check.verdict.status, VerificationStatus::InProgress);
        let mic = check.mic.unwrap();
        // (an image tag cannot hold `+`: the substitution writes `_`)
        assert_eq!(mic.images[0].image, "reg/m:6.1.0-1_x");
        assert_eq!(mic.images[0].kernel_version, "6.1.0-1+x");
        assert!(mic.images[0].skip_wait_missing_image);
        assert!(!mic.push_built_image);
        assert_eq!(mic.image_rebuild_trigger_generation, None);
    }

    #[test]
    fn image_states_decide_the_verdict() {
        let m = module(BUILD);
        let image = "reg/m:6.2.0";
        let exists = check_module(&m, "6.2.0", true, &[state(image, ImageState::Exists, "")]);
        assert_eq!(exists.verdict.status, VerificationStatus::Success);
        assert_eq!(exists.verdict.reason, "verified image exists: reg/m:6.2.0");
        assert_eq!(exists.mic, None);

        let failed = check_module(
            &m,
            "6.2.0",
            true,
            &[state(image, ImageState::DoesNotExist, "BuildFailed")],
        );
        assert_eq!(failed.verdict.status, VerificationStatus::Failure);
        assert_eq!(
            failed.verdict.reason,
            "verified image does not exist and build/sign failed: reg/m:6.2.0 (BuildFailed: detail)"
        );

        let building = check_module(
            &m,
            "6.2.0",
            true,
            &[state(image, ImageState::NeedsBuilding, "")],
        );
        assert_eq!(building.verdict.status, VerificationStatus::InProgress);
        assert_eq!(building.verdict.stage(), VerificationStage::Image);
        let mic = building.mic.unwrap();
        assert!(mic.push_built_image);
        assert!(mic.images[0].build.is_some());

        // A state for another image (the Module changed since) does not count.
        let stale = check_module(
            &m,
            "6.2.0",
            true,
            &[state("reg/m:old", ImageState::Exists, "")],
        );
        assert_eq!(stale.verdict.status, VerificationStatus::InProgress);
    }

    #[test]
    fn missing_prebuilt_image_fails_without_build_words() {
        let check = check_module(
            &module(PLAIN),
            "6.1.0-1+x",
            false,
            &[state(
                "reg/m:6.1.0-1_x",
                ImageState::DoesNotExist,
                "NotFound",
            )],
        );
        assert_eq!(
            check.verdict.reason,
            "verified image does not exist: reg/m:6.1.0-1_x (NotFound: detail)"
        );
    }

    #[test]
    fn module_without_loader_has_nothing_to_verify() {
        let m: Module = serde_saphyr::from_str(
            "apiVersion: kmm.sigs.x-k8s.io/v1beta1\nkind: Module\nmetadata: {name: dp, namespace: ns}\nspec:\n  selector: {}\n  devicePlugin:\n    container: {image: dp:1}\n",
        )
        .unwrap();
        let check = check_module(&m, "6.2.0", false, &[]);
        assert_eq!(check.verdict.status, VerificationStatus::Success);
        assert_eq!(check.mic, None);
    }

    #[test]
    fn transition_time_moves_only_on_a_real_transition() {
        let t1 = Time(Timestamp::from_second(1_800_000_000).unwrap());
        let t2 = Time(Timestamp::from_second(1_800_000_100).unwrap());
        let progress = Verdict::new(VerificationStatus::InProgress, reason::IN_PROGRESS);
        let first = status_entry("ns", "m", &progress, &[], &t1);
        assert_eq!(first.last_transition_time, t1);
        let again = status_entry("ns", "m", &progress, std::slice::from_ref(&first), &t2);
        assert_eq!(again.last_transition_time, t1);
        let done = Verdict::new(VerificationStatus::Success, "verified image exists: x");
        let moved = status_entry("ns", "m", &done, &[again], &t2);
        assert_eq!(moved.last_transition_time, t2);
        assert_eq!(moved.verification_stage, VerificationStage::Done);
        // Another Module's entry is not this one's history.
        let other = status_entry("ns", "other", &done, &[moved], &t1);
        assert_eq!(other.last_transition_time, t1);
    }
}
