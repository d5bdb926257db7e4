//! Pure decisions of the ModuleImagesConfig reconciler: which images to check, what a check's
//! finding means for an image's state, how the status is assembled, and when to retry. No I/O.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use kmm_api::v1beta1::{
    ImageState, ModuleImageSpec, ModuleImageState, ModuleImagesConfig, ModuleImagesConfigSpec,
    ModuleImagesConfigStatus,
};

pub use kmm_api::wire::image_reason as reason;

/// What one check (a registry request or a pull pod) found out about one image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finding {
    /// The image exists.
    Exists,
    /// The image does not exist.
    Missing,
    /// The registry refused our credentials.
    Unauthorized,
    /// The registry could not be reached.
    Unreachable,
    /// TLS failed.
    Tls,
    /// The registry failed in another way.
    RegistryError,
    /// The reference is not a valid image reference.
    InvalidImage,
    /// An until-success pull pod is backing off.
    PullFailed,
    /// A pull pod ended Failed or Unknown.
    PullPodFailed,
}

impl Finding {
    /// The `reason` recorded for this finding (empty for `Exists`).
    pub fn reason(self) -> &'static str {
        match self {
            Finding::Exists => "",
            Finding::Missing => reason::NOT_FOUND,
            Finding::Unauthorized => reason::UNAUTHORIZED,
            Finding::Unreachable => reason::REGISTRY_UNREACHABLE,
            Finding::Tls => reason::TLS_ERROR,
            Finding::RegistryError => reason::REGISTRY_ERROR,
            Finding::InvalidImage => reason::INVALID_IMAGE,
            Finding::PullFailed => reason::PULL_FAILED,
            Finding::PullPodFailed => reason::PULL_POD_FAILED,
        }
    }
}

/// The new state of an image after a finding, and whether to check it again later (with
/// backoff) without waiting for a change of the MIC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// State to record.
    pub state: ModuleImageState,
    /// Check again after a backoff.
    pub retry: bool,
}

/// What a finding means for `image` (Go KMM §4.3 step 4 for missing images; transient failures
/// keep the state unknown so that the image is checked again).
pub fn decide(image: &ModuleImageSpec, finding: Finding, message: &str) -> Outcome {
    let (status, retry) = match finding {
        Finding::Exists => (ImageState::Exists, false),
        Finding::Missing => match (&image.build, &image.sign) {
            (Some(_), _) => (ImageState::NeedsBuilding, false),
            (None, Some(_)) => (ImageState::NeedsSigning, false),
            // Go keeps an until-success pull pod waiting for the image to be pushed; we record
            // DoesNotExist and look again later, unless the user asked not to wait.
            (None, None) => (ImageState::DoesNotExist, !image.skip_wait_missing_image),
        },
        // A build would fail to push with the same credentials: wait for the Secret to be fixed.
        Finding::Unauthorized
        | Finding::Unreachable
        | Finding::Tls
        | Finding::RegistryError
        | Finding::PullPodFailed => (ImageState::Unknown, true),
        // Only a change of the image reference can help.
        Finding::InvalidImage => (ImageState::Unknown, false),
        // The pull pod keeps trying; its status changes wake us up.
        Finding::PullFailed => (ImageState::Unknown, false),
    };
    Outcome {
        state: ModuleImageState {
            image: image.image.clone(),
            status,
            reason: finding.reason().to_owned(),
            message: if finding == Finding::Exists {
                String::new()
            } else {
                message.to_owned()
            },
        },
        retry,
    }
}

/// Whether the existence of `image` must be (re)checked given its current `state`: unknown
/// images, and missing images that nothing will build or sign and that the user waits for.
pub fn needs_check(image: &ModuleImageSpec, state: &ModuleImageState) -> bool {
    match state.status {
        ImageState::Unknown => true,
        ImageState::DoesNotExist => {
            image.build.is_none() && image.sign.is_none() && !image.skip_wait_missing_image
        }
        ImageState::Exists | ImageState::NeedsBuilding | ImageState::NeedsSigning => false,
    }
}

/// The spec's images, first occurrence of each reference wins.
pub fn spec_images(spec: &ModuleImagesConfigSpec) -> Vec<&ModuleImageSpec> {
    let mut seen = std::collections::HashSet::new();
    spec.images
        .iter()
        .filter(|image| seen.insert(image.image.as_str()))
        .collect()
}

/// The states a pass starts from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Start {
    /// Known states by image (empty after a rebuild trigger).
    pub states: BTreeMap<String, ModuleImageState>,
    /// `imageRebuildTriggerGeneration` to record.
    pub rebuild_generation: Option<i64>,
    /// The rebuild trigger changed: every image is checked again.
    pub rebuild: bool,
}

/// Starting point of a reconcile: the recorded states, or none when the spec's rebuild trigger
/// differs from the recorded one (an absent value is a value of its own).
pub fn start(mic: &ModuleImagesConfig) -> Start {
    let recorded = mic
        .status
        .as_ref()
        .and_then(|s| s.image_rebuild_trigger_generation);
    let wanted = mic.spec.image_rebuild_trigger_generation;
    let rebuild = recorded != wanted;
    let states = if rebuild {
        BTreeMap::new()
    } else {
        mic.status
            .iter()
            .flat_map(|s| s.images_states.iter())
            .map(|s| (s.image.clone(), s.clone()))
            .collect()
    };
    Start {
        states,
        rebuild_generation: wanted,
        rebuild,
    }
}

/// The state of `image` in `states`, unknown if absent.
pub fn state_of(states: &BTreeMap<String, ModuleImageState>, image: &str) -> ModuleImageState {
    states
        .get(image)
        .cloned()
        .unwrap_or_else(|| ModuleImageState {
            image: image.to_owned(),
            ..ModuleImageState::default()
        })
}

/// The whole status: one state per spec image, in spec order (states of images no longer in the
/// spec are dropped).
pub fn assemble_status(
    images: &[&ModuleImageSpec],
    states: &BTreeMap<String, ModuleImageState>,
    rebuild_generation: Option<i64>,
) -> ModuleImagesConfigStatus {
    ModuleImagesConfigStatus {
        images_states: images
            .iter()
            .map(|image| state_of(states, &image.image))
            .collect(),
        image_rebuild_trigger_generation: rebuild_generation,
    }
}

/// First retry after 1 s, doubling, at most 5 minutes (the kubelet's image pull backoff cap).
pub fn backoff_delay(attempt: u32) -> Duration {
    const BASE: Duration = Duration::from_secs(1);
    const CAP: Duration = Duration::from_secs(300);
    BASE.checked_mul(1u32.checked_shl(attempt).unwrap_or(u32::MAX))
        .map_or(CAP, |delay| delay.min(CAP))
}

/// `delay` scaled by a factor in [0.9, 1.1) taken from `noise`, so that many objects failing at
/// once do not retry in lockstep.
pub fn jittered(delay: Duration, noise: u64) -> Duration {
    let permille = 900 + (noise % 200);
    delay * u32::try_from(permille).unwrap_or(1000) / 1000
}

/// What is retried, per MIC and image (the empty image stands for the MIC's own errors).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RetryKey {
    /// MIC namespace.
    pub namespace: String,
    /// MIC name.
    pub name: String,
    /// Image reference, or empty for the whole MIC.
    pub image: String,
}

#[derive(Debug, Clone, Copy)]
struct RetryEntry {
    attempts: u32,
    due: Instant,
}

/// Per-object exponential backoff, in memory (after a restart everything is checked at once).
#[derive(Debug, Default)]
pub struct Backoffs {
    entries: HashMap<RetryKey, RetryEntry>,
}

impl Backoffs {
    /// Whether `key` may be tried at `now` (no failure recorded, or its backoff has passed).
    pub fn ready(&self, key: &RetryKey, now: Instant) -> bool {
        self.entries.get(key).is_none_or(|e| e.due <= now)
    }

    /// Records a failure at `now` and returns the delay until the next try.
    pub fn failed(&mut self, key: RetryKey, now: Instant, noise: u64) -> Duration {
        let entry = self.entries.entry(key).or_insert(RetryEntry {
            attempts: 0,
            due: now,
        });
        let delay = jittered(backoff_delay(entry.attempts), noise);
        entry.attempts = entry.attempts.saturating_add(1);
        entry.due = now + delay;
        delay
    }

    /// Forgets the failures of `key`.
    pub fn succeeded(&mut self, key: &RetryKey) {
        self.entries.remove(key);
    }

    /// When `key` is due, if a failure is recorded.
    pub fn due(&self, key: &RetryKey) -> Option<Instant> {
        self.entries.get(key).map(|e| e.due)
    }

    /// Keeps only the entries for which `keep` holds.
    pub fn retain(&mut self, mut keep: impl FnMut(&RetryKey) -> bool) {
        self.entries.retain(|key, _| keep(key));
    }

    /// Number of entries (for tests and metrics).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no failure is recorded.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kmm_api::v1beta1::{Build, Sign};

    fn image(name: &str) -> ModuleImageSpec {
        ModuleImageSpec {
            image: name.into(),
            kernel_version: "6.1.0".into(),
            dir_name: "/opt".into(),
            ..ModuleImageSpec::default()
        }
    }

    fn with_build(mut i: ModuleImageSpec) -> ModuleImageSpec {
        i.build = Some(Build::default());
        i
    }

    fn with_sign(mut i: ModuleImageSpec) -> ModuleImageSpec {
        i.sign = Some(Sign::default());
        i
    }

    fn skip_wait(mut i: ModuleImageSpec) -> ModuleImageSpec {
        i.skip_wait_missing_image = true;
        i
    }

    #[test]
    fn findings_become_states() {
        use ImageState::*;
        let plain = image("r/a:1");
        let build = with_build(image("r/a:1"));
        let sign = with_sign(image("r/a:1"));
        let both = with_sign(with_build(image("r/a:1")));
        let skip = skip_wait(image("r/a:1"));
        let table: &[(&ModuleImageSpec, Finding, ImageState, &str, bool)] = &[
            (&plain, Finding::Exists, Exists, "", false),
            (&build, Finding::Exists, Exists, "", false),
            (&plain, Finding::Missing, DoesNotExist, "NotFound", true),
            (&skip, Finding::Missing, DoesNotExist, "NotFound", false),
            (&build, Finding::Missing, NeedsBuilding, "NotFound", false),
            (&sign, Finding::Missing, NeedsSigning, "NotFound", false),
            (&both, Finding::Missing, NeedsBuilding, "NotFound", false),
            (&build, Finding::Unauthorized, Unknown, "Unauthorized", true),
            (
                &plain,
                Finding::Unreachable,
                Unknown,
                "RegistryUnreachable",
                true,
            ),
            (&plain, Finding::Tls, Unknown, "TlsError", true),
            (
                &plain,
                Finding::RegistryError,
                Unknown,
                "RegistryError",
                true,
            ),
            (
                &plain,
                Finding::InvalidImage,
                Unknown,
                "InvalidImage",
                false,
            ),
            (&plain, Finding::PullFailed, Unknown, "PullFailed", false),
            (
                &build,
                Finding::PullPodFailed,
                Unknown,
                "PullPodFailed",
                true,
            ),
        ];
        for (spec, finding, status, reason, retry) in table {
            let out = decide(spec, *finding, "what the registry said");
            assert_eq!(out.state.status, *status, "{finding:?} on {spec:?}");
            assert_eq!(out.state.reason, *reason, "{finding:?}");
            assert_eq!(out.retry, *retry, "{finding:?} on {spec:?}");
            assert_eq!(out.state.image, "r/a:1");
            let expect_message = if *finding == Finding::Exists {
                ""
            } else {
                "what the registry said"
            };
            assert_eq!(out.state.message, expect_message);
        }
    }

    #[test]
    fn which_states_are_checked_again() {
        let state = |status| ModuleImageState {
            image: "r/a:1".into(),
            status,
            ..ModuleImageState::default()
        };
        let plain = image("r/a:1");
        assert!(needs_check(&plain, &state(ImageState::Unknown)));
        assert!(needs_check(&plain, &state(ImageState::DoesNotExist)));
        assert!(!needs_check(
            &skip_wait(plain.clone()),
            &state(ImageState::DoesNotExist)
        ));
        assert!(!needs_check(
            &with_build(plain.clone()),
            &state(ImageState::DoesNotExist)
        ));
        assert!(!needs_check(&plain, &state(ImageState::Exists)));
        assert!(!needs_check(&plain, &state(ImageState::NeedsBuilding)));
        assert!(!needs_check(&plain, &state(ImageState::NeedsSigning)));
    }

    fn mic(spec_gen: Option<i64>, status: Option<ModuleImagesConfigStatus>) -> ModuleImagesConfig {
        let mut mic = ModuleImagesConfig::new(
            "m",
            ModuleImagesConfigSpec {
                images: vec![image("r/a:1"), image("r/b:1"), image("r/a:1")],
                image_rebuild_trigger_generation: spec_gen,
                ..ModuleImagesConfigSpec::default()
            },
        );
        mic.status = status;
        mic
    }

    fn exists(img: &str) -> ModuleImageState {
        ModuleImageState {
            image: img.into(),
            status: ImageState::Exists,
            ..ModuleImageState::default()
        }
    }

    #[test]
    fn rebuild_trigger_is_nil_aware() {
        let status = |generation| {
            Some(ModuleImagesConfigStatus {
                images_states: vec![exists("r/a:1")],
                image_rebuild_trigger_generation: generation,
            })
        };
        let table = [
            (None, None, false),
            (None, status(None), false),
            (Some(1), status(None), true),
            (Some(1), None, true),
            (None, status(Some(1)), true),
            (Some(1), status(Some(1)), false),
            (Some(2), status(Some(1)), true),
        ];
        for (spec_gen, st, rebuild) in table {
            let had_states = st.is_some();
            let s = start(&mic(spec_gen, st));
            assert_eq!(s.rebuild, rebuild, "spec {spec_gen:?}");
            assert_eq!(s.rebuild_generation, spec_gen);
            assert_eq!(s.states.is_empty(), rebuild || !had_states);
        }
    }

    #[test]
    fn status_has_one_state_per_spec_image_in_order() {
        let m = mic(None, None);
        let images = spec_images(&m.spec);
        assert_eq!(images.len(), 2, "duplicates removed, first wins");
        let states = BTreeMap::from([
            ("r/b:1".to_owned(), exists("r/b:1")),
            ("r/gone:1".to_owned(), exists("r/gone:1")),
        ]);
        let status = assemble_status(&images, &states, Some(3));
        let got: Vec<_> = status
            .images_states
            .iter()
            .map(|s| (s.image.as_str(), s.status.clone()))
            .collect();
        assert_eq!(
            got,
            [
                ("r/a:1", ImageState::Unknown),
                ("r/b:1", ImageState::Exists)
            ]
        );
        assert_eq!(status.image_rebuild_trigger_generation, Some(3));
    }

    #[test]
    fn backoff_doubles_up_to_five_minutes() {
        let secs: Vec<u64> = (0..12).map(|n| backoff_delay(n).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]);
        assert_eq!(backoff_delay(u32::MAX), Duration::from_secs(300));
        for noise in [0, 1, 199, 12345, u64::MAX] {
            let d = jittered(Duration::from_secs(10), noise);
            assert!(
                d >= Duration::from_secs(9) && d < Duration::from_secs(11),
                "{d:?}"
            );
        }
    }

    #[test]
    fn backoffs_track_each_key() {
        let key = |image: &str| RetryKey {
            namespace: "ns".into(),
            name: "m".into(),
            image: image.into(),
        };
        let now = Instant::now();
        let mut b = Backoffs::default();
        assert!(b.ready(&key("a"), now));
        let first = b.failed(key("a"), now, 100);
        assert_eq!(first, Duration::from_secs(1));
        assert!(!b.ready(&key("a"), now));
        assert!(b.ready(&key("b"), now));
        assert!(b.ready(&key("a"), now + first));
        let second = b.failed(key("a"), now + first, 100);
        assert_eq!(second, Duration::from_secs(2));
        assert_eq!(b.due(&key("a")), Some(now + first + second));
        b.succeeded(&key("a"));
        assert!(b.ready(&key("a"), now) && b.is_empty());
        b.failed(key("a"), now, 0);
        b.failed(key("b"), now, 0);
        b.retain(|k| k.image == "b");
        assert_eq!(b.len(), 1);
    }
}
