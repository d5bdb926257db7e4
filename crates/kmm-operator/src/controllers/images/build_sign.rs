//! Pure decisions linking a MIC to its ModuleBuildSignConfig (Go KMM §4.3 steps 5 and 6): what
//! the MBSC's outcomes mean for the image states, and which images the MBSC must build or sign.
//!
//! Differences from Go KMM, on purpose:
//! - quirk #3: an image that only needs signing is never sent to a build;
//! - a failure is final for its inputs: the image becomes `DoesNotExist` with reason
//!   `BuildFailed`/`SignFailed` and the MBSC entry keeps its action, so nothing starts again
//!   (Go KMM turns a failed sign back into a build, which loops: user pain #6). The MBSC
//!   reconciler retries when the inputs change or the user bumps `imageRebuildTriggerGeneration`;
//!   while it retries the entry has no outcome and the image is `NeedsBuilding`/`NeedsSigning`.

use std::collections::BTreeMap;

use kmm_api::v1beta1::{
    BuildSignAction, BuildSignResult, ImageState, ModuleBuildSignConfig, ModuleBuildSignImageSpec,
    ModuleImageSpec, ModuleImageState,
};

use crate::controllers::buildsign::failure_messages;

/// `reason` of an image whose build failed.
pub const BUILD_FAILED: &str = "BuildFailed";
/// `reason` of an image whose signing failed.
pub const SIGN_FAILED: &str = "SignFailed";

fn failed_reason(action: BuildSignAction) -> &'static str {
    match action {
        BuildSignAction::BuildImage => BUILD_FAILED,
        BuildSignAction::SignImage => SIGN_FAILED,
    }
}

fn in_build_sign_flow(image: &ModuleImageSpec, state: &ModuleImageState) -> bool {
    (image.build.is_some() || image.sign.is_some())
        && match state.status {
            ImageState::NeedsBuilding | ImageState::NeedsSigning => true,
            ImageState::DoesNotExist => state.reason == BUILD_FAILED || state.reason == SIGN_FAILED,
            ImageState::Unknown | ImageState::Exists => false,
        }
}

/// Step 5: the MBSC's outcomes (and its entries without outcome yet) become image states.
pub fn apply_outcomes(
    images: &[&ModuleImageSpec],
    states: &mut BTreeMap<String, ModuleImageState>,
    mbsc: Option<&ModuleBuildSignConfig>,
) {
    let Some(mbsc) = mbsc else { return };
    let messages = failure_messages(mbsc);
    for image in images {
        let Some(state) = states.get_mut(&image.image) else {
            continue;
        };
        if !in_build_sign_flow(image, state) {
            continue;
        }
        let Some(entry) = mbsc
            .spec
            .images
            .iter()
            .find(|e| e.image.image == image.image)
        else {
            continue;
        };
        let outcome = mbsc
            .status
            .iter()
            .flat_map(|s| s.images.iter())
            .find(|s| s.image == image.image);
        let (status, reason, message) = match outcome {
            Some(o) if o.status == BuildSignResult::Failure => (
                ImageState::DoesNotExist,
                failed_reason(o.action),
                messages.get(&image.image).cloned().unwrap_or_else(|| {
                    format!(
                        "{:?} failed; see the events of ModuleBuildSignConfig {}",
                        o.action,
                        mbsc.metadata.name.as_deref().unwrap_or_default()
                    )
                }),
            ),
            Some(o) if o.action == BuildSignAction::BuildImage && image.sign.is_some() => {
                (ImageState::NeedsSigning, "", String::new())
            }
            Some(_) => (ImageState::Exists, "", String::new()),
            None => match entry.action {
                BuildSignAction::BuildImage => (ImageState::NeedsBuilding, "", String::new()),
                BuildSignAction::SignImage => (ImageState::NeedsSigning, "", String::new()),
            },
        };
        let was_failed = state.reason == BUILD_FAILED || state.reason == SIGN_FAILED;
        state.status = status;
        if !reason.is_empty() {
            state.reason = reason.to_owned();
            state.message = message;
        } else if was_failed || state.status == ImageState::Exists {
            // The `NotFound` that started a build stays while it runs.
            state.reason.clear();
            state.message.clear();
        }
    }
}

/// Step 6: the MBSC entries the images need: `NeedsBuilding` → BuildImage, `NeedsSigning` →
/// SignImage, a failed image keeps its entry (and its failed action); other images need none.
pub fn desired_entries(
    images: &[&ModuleImageSpec],
    states: &BTreeMap<String, ModuleImageState>,
    mbsc: Option<&ModuleBuildSignConfig>,
) -> Vec<ModuleBuildSignImageSpec> {
    images
        .iter()
        .filter_map(|image| {
            let state = states.get(&image.image)?;
            if !in_build_sign_flow(image, state) {
                return None;
            }
            let action = match state.status {
                ImageState::NeedsBuilding => BuildSignAction::BuildImage,
                ImageState::NeedsSigning => BuildSignAction::SignImage,
                _ => {
                    mbsc?
                        .spec
                        .images
                        .iter()
                        .find(|e| e.image.image == image.image)?
                        .action
                }
            };
            // Quirk #3: an image without a build section is only ever signed.
            let action = if image.build.is_none() {
                BuildSignAction::SignImage
            } else {
                action
            };
            Some(ModuleBuildSignImageSpec {
                image: (*image).clone(),
                action,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use kmm_api::v1beta1::{
        Build, BuildSignImageState, ModuleBuildSignConfigSpec, ModuleBuildSignConfigStatus, Sign,
    };

    fn image(build: bool, sign: bool) -> ModuleImageSpec {
        ModuleImageSpec {
            image: "r/a:1".into(),
            kernel_version: "6.1.0".into(),
            dir_name: "/opt".into(),
            build: build.then(Build::default),
            sign: sign.then(Sign::default),
            ..ModuleImageSpec::default()
        }
    }

    fn state(status: ImageState, reason: &str) -> BTreeMap<String, ModuleImageState> {
        BTreeMap::from([(
            "r/a:1".to_owned(),
            ModuleImageState {
                image: "r/a:1".into(),
                status,
                reason: reason.into(),
                message: String::new(),
            },
        )])
    }

    fn mbsc(
        image: &ModuleImageSpec,
        action: BuildSignAction,
        outcome: Option<(BuildSignResult, BuildSignAction)>,
    ) -> ModuleBuildSignConfig {
        let mut m = ModuleBuildSignConfig::new(
            "m",
            ModuleBuildSignConfigSpec {
                images: vec![ModuleBuildSignImageSpec {
                    image: image.clone(),
                    action,
                }],
                ..ModuleBuildSignConfigSpec::default()
            },
        );
        m.status = outcome.map(|(status, action)| ModuleBuildSignConfigStatus {
            images: vec![BuildSignImageState {
                image: image.image.clone(),
                status,
                action,
            }],
        });
        m
    }

    fn run(
        image: &ModuleImageSpec,
        start: ImageState,
        start_reason: &str,
        mbsc: Option<&ModuleBuildSignConfig>,
    ) -> (ModuleImageState, Vec<BuildSignAction>) {
        let mut states = state(start, start_reason);
        apply_outcomes(&[image], &mut states, mbsc);
        let entries = desired_entries(&[image], &states, mbsc);
        (
            states["r/a:1"].clone(),
            entries.into_iter().map(|e| e.action).collect(),
        )
    }

    #[test]
    fn build_then_sign_then_exists() {
        use BuildSignAction::*;
        use BuildSignResult::*;
        let both = image(true, true);
        let (s, e) = run(&both, ImageState::NeedsBuilding, "NotFound", None);
        assert_eq!(
            (s.status, e.clone()),
            (ImageState::NeedsBuilding, vec![BuildImage])
        );
        let built = mbsc(&both, BuildImage, Some((Success, BuildImage)));
        let (s, e) = run(&both, ImageState::NeedsBuilding, "NotFound", Some(&built));
        assert_eq!((s.status, e), (ImageState::NeedsSigning, vec![SignImage]));
        let signing = mbsc(&both, SignImage, Some((Success, BuildImage)));
        let (s, e) = run(&both, ImageState::NeedsSigning, "", Some(&signing));
        assert_eq!((s.status, e), (ImageState::NeedsSigning, vec![SignImage]));
        let signed = mbsc(&both, SignImage, Some((Success, SignImage)));
        let (s, e) = run(&both, ImageState::NeedsSigning, "", Some(&signed));
        assert_eq!((s.status, e), (ImageState::Exists, vec![]));
    }

    #[test]
    fn a_failure_is_final_and_keeps_its_action() {
        use BuildSignAction::*;
        use BuildSignResult::*;
        let both = image(true, true);
        let failed = mbsc(&both, SignImage, Some((Failure, SignImage)));
        let (s, e) = run(&both, ImageState::NeedsSigning, "", Some(&failed));
        assert_eq!(s.status, ImageState::DoesNotExist);
        assert_eq!(s.reason, SIGN_FAILED);
        // Not sent back to a build (Go KMM's loop).
        assert_eq!(e, vec![SignImage]);
        // A retry under way (outcome cleared by the MBSC reconciler): signing again.
        let retry = mbsc(&both, SignImage, None);
        let (s, e) = run(&both, ImageState::DoesNotExist, SIGN_FAILED, Some(&retry));
        assert_eq!(
            (s.status, s.reason.as_str(), e),
            (ImageState::NeedsSigning, "", vec![SignImage])
        );
    }

    #[test]
    fn sign_only_images_are_never_built() {
        let sign_only = image(false, true);
        let (_, e) = run(&sign_only, ImageState::DoesNotExist, SIGN_FAILED, None);
        assert!(e.is_empty());
        let (_, e) = run(&sign_only, ImageState::NeedsSigning, "NotFound", None);
        assert_eq!(e, vec![BuildSignAction::SignImage]);
        let (_, e) = run(&sign_only, ImageState::NeedsBuilding, "NotFound", None);
        assert_eq!(e, vec![BuildSignAction::SignImage]);
    }

    #[test]
    fn images_outside_the_flow_are_left_alone() {
        let plain = image(false, false);
        let (s, e) = run(&plain, ImageState::DoesNotExist, "NotFound", None);
        assert_eq!((s.status, e.len()), (ImageState::DoesNotExist, 0));
        let build = image(true, false);
        let (s, e) = run(&build, ImageState::Exists, "", None);
        assert_eq!((s.status, e.len()), (ImageState::Exists, 0));
    }
}
