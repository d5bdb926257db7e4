//! Kernel-mapping resolution: for one kernel, which mapping of a Module applies and what it
//! resolves to (image, build, sign, registry TLS, in-tree modules), with Go KMM's merge rules
//! between the container-level defaults and the mapping.

use std::fmt;

use kmm_api::v1beta1::{
    Build, BuildArg, KernelMapping, ModuleLoaderContainerSpec, Sign, TlsOptions,
};
use regex::Regex;

use crate::kernel::{InvalidKernelVersion, kernel_vars, var};
use crate::subst::{SubstError, Vars, substitute};

/// Why no mapping could be resolved for a kernel.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MappingError {
    /// No mapping matches; the module is not loaded on nodes with this kernel.
    #[error(
        "no kernel mapping matches kernel {kernel} (tried {})",
        TriedList(tried)
    )]
    NoMatch {
        /// The kernel that was matched.
        kernel: String,
        /// Every mapping tried, in order, as `literal "..."` or `regexp "..."`.
        tried: Vec<String>,
    },
    /// A mapping's regexp does not compile.
    #[error(
        "kernelMappings[{index}].regexp {pattern:?} is not a valid regular expression: {message}"
    )]
    InvalidRegexp {
        /// Index of the mapping.
        index: usize,
        /// The regexp.
        pattern: String,
        /// The regex engine's message.
        message: String,
    },
    /// The kernel cannot provide the substitution variables.
    #[error(transparent)]
    InvalidKernel(#[from] InvalidKernelVersion),
    /// A substitution in `field` is malformed.
    #[error("{field}: {source}")]
    Substitution {
        /// Path of the field.
        field: String,
        /// What is wrong.
        source: SubstError,
    },
}

impl MappingError {
    /// Short stable category, for condition reasons, events and metric labels.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NoMatch { .. } => "NoMatchingMapping",
            Self::InvalidRegexp { .. } | Self::InvalidKernel(_) | Self::Substitution { .. } => {
                "InvalidSpec"
            }
        }
    }
}

struct TriedList<'a>(&'a [String]);

impl fmt::Display for TriedList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("no mappings");
        }
        f.write_str(&self.0.join(", "))
    }
}

/// A mapping resolved for one kernel: everything needed to check, build, sign and load the image.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ResolvedMapping {
    /// Index of the matching entry in `kernelMappings`.
    pub index: usize,
    /// The kernel the mapping was resolved for.
    pub kernel: String,
    /// The module image, substituted.
    pub container_image: String,
    /// The merged build settings.
    pub build: Option<Build>,
    /// The merged sign settings, with `unsignedImage` and `filesToSign` substituted.
    pub sign: Option<Sign>,
    /// The mapping's registry TLS settings, or the container-level ones.
    pub registry_tls: TlsOptions,
    /// In-tree modules to remove before loading.
    pub in_tree_modules_to_remove: Vec<String>,
}

/// Describes a mapping for error messages: `literal "..."` or `regexp "..."`.
fn describe(mapping: &KernelMapping) -> String {
    match (mapping.literal.is_empty(), mapping.regexp.is_empty()) {
        (false, _) => format!("literal {:?}", mapping.literal),
        (true, false) => format!("regexp {:?}", mapping.regexp),
        (true, true) => "an empty mapping".to_owned(),
    }
}

/// Compiled mapping regexps by pattern. Every node pass resolves every Module's mapping for its
/// node, so compiling the pattern each time would cost a regex compilation per (node, Module)
/// pass; the few distinct patterns of a cluster are compiled once. Bounded: cleared when it
/// holds more than [`REGEX_CACHE_LIMIT`] patterns.
fn compiled(pattern: &str) -> Result<Regex, String> {
    static CACHE: std::sync::LazyLock<
        std::sync::Mutex<std::collections::HashMap<String, Result<Regex, String>>>,
    > = std::sync::LazyLock::new(Default::default);
    let mut cache = CACHE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(found) = cache.get(pattern) {
        return found.clone();
    }
    if cache.len() >= REGEX_CACHE_LIMIT {
        cache.clear();
    }
    let result = Regex::new(pattern).map_err(|err| err.to_string());
    cache.insert(pattern.to_owned(), result.clone());
    result
}

/// Most mapping patterns kept compiled.
const REGEX_CACHE_LIMIT: usize = 1024;

/// The first mapping that matches `kernel`, in list order: a non-empty `literal` equal to the
/// kernel, or a non-empty `regexp` found anywhere in it (unanchored, like Go's MatchString).
pub fn find_mapping<'m>(
    mappings: &'m [KernelMapping],
    kernel: &str,
) -> Result<(usize, &'m KernelMapping), MappingError> {
    for (index, mapping) in mappings.iter().enumerate() {
        if !mapping.literal.is_empty() && mapping.literal == kernel {
            return Ok((index, mapping));
        }
        if !mapping.regexp.is_empty() {
            let regex =
                compiled(&mapping.regexp).map_err(|message| MappingError::InvalidRegexp {
                    index,
                    pattern: mapping.regexp.clone(),
                    message,
                })?;
            if regex.is_match(kernel) {
                return Ok((index, mapping));
            }
        }
    }
    Err(MappingError::NoMatch {
        kernel: kernel.to_owned(),
        tried: mappings.iter().map(describe).collect(),
    })
}

/// Resolves the mapping of a Module's loader container for `kernel` (already trimmed with
/// [`crate::kernel::node_kernel`] for a node; verbatim for a PreflightValidation).
pub fn resolve(
    container: &ModuleLoaderContainerSpec,
    module_name: &str,
    module_namespace: &str,
    kernel: &str,
) -> Result<ResolvedMapping, MappingError> {
    let (index, mapping) = find_mapping(&container.kernel_mappings, kernel)?;
    let kernel_only: Vars<'_> = kernel_vars(kernel)?;
    let mut image_vars = kernel_only.clone();
    image_vars.insert(var::MOD_NAME, module_name.to_owned());
    image_vars.insert(var::MOD_NAMESPACE, module_namespace.to_owned());

    let mapping_path = format!("spec.moduleLoader.container.kernelMappings[{index}]");
    let raw_image = if mapping.container_image.is_empty() {
        &container.container_image
    } else {
        &mapping.container_image
    };
    let container_image =
        substitute(raw_image, &image_vars).map_err(|source| MappingError::Substitution {
            field: format!("{mapping_path}.containerImage"),
            source,
        })?;

    let sign = merge_sign(container.sign.as_ref(), mapping.sign.as_ref())
        .map(|sign| substitute_sign(sign, &kernel_only, &mapping_path))
        .transpose()?;

    Ok(ResolvedMapping {
        index,
        kernel: kernel.to_owned(),
        container_image,
        build: merge_build(container.build.as_ref(), mapping.build.as_ref()),
        sign,
        registry_tls: mapping
            .registry_tls
            .or(container.registry_tls)
            .unwrap_or_default(),
        in_tree_modules_to_remove: merge_in_tree(container, mapping),
    })
}

fn substitute_sign(
    mut sign: Sign,
    vars: &Vars<'_>,
    mapping_path: &str,
) -> Result<Sign, MappingError> {
    let field = |name: &str| format!("{mapping_path}.sign.{name}");
    sign.unsigned_image =
        substitute(&sign.unsigned_image, vars).map_err(|source| MappingError::Substitution {
            field: field("unsignedImage"),
            source,
        })?;
    sign.files_to_sign = sign
        .files_to_sign
        .iter()
        .enumerate()
        .map(|(i, file)| {
            substitute(file, vars).map_err(|source| MappingError::Substitution {
                field: field(&format!("filesToSign[{i}]")),
                source,
            })
        })
        .collect::<Result<_, _>>()?;
    Ok(sign)
}

/// Go KMM's build merge: the mapping's build alone, the container's alone, or the container's
/// with the mapping's Dockerfile ConfigMap (if named), build args (same name replaced in place,
/// new ones appended sorted by name) and secrets (appended).
pub fn merge_build(container: Option<&Build>, mapping: Option<&Build>) -> Option<Build> {
    match (container, mapping) {
        (None, None) => None,
        (None, Some(only)) | (Some(only), None) => Some(only.clone()),
        (Some(base), Some(over)) => {
            let mut merged = base.clone();
            if !over.dockerfile_config_map.name.is_empty() {
                merged.dockerfile_config_map = over.dockerfile_config_map.clone();
            }
            merged.build_args = override_build_args(&base.build_args, &over.build_args);
            merged.secrets.extend(over.secrets.iter().cloned());
            Some(merged)
        }
    }
}

/// `base` with each argument of `overrides` replacing the one of the same name in place; the
/// overrides that name no existing argument are appended, sorted by name.
pub fn override_build_args(base: &[BuildArg], overrides: &[BuildArg]) -> Vec<BuildArg> {
    let mut merged: Vec<BuildArg> = base
        .iter()
        .map(|arg| {
            overrides
                .iter()
                .find(|o| o.name == arg.name)
                .unwrap_or(arg)
                .clone()
        })
        .collect();
    let mut extra: Vec<BuildArg> = overrides
        .iter()
        .filter(|o| !base.iter().any(|arg| arg.name == o.name))
        .cloned()
        .collect();
    extra.sort_by(|a, b| a.name.cmp(&b.name));
    merged.extend(extra);
    merged
}

/// Go KMM's sign merge: the mapping's alone, the container's alone, or the container's with the
/// mapping's unsigned image and key/cert Secrets (where set) and both `filesToSign` lists.
pub fn merge_sign(container: Option<&Sign>, mapping: Option<&Sign>) -> Option<Sign> {
    match (container, mapping) {
        (None, None) => None,
        (None, Some(only)) | (Some(only), None) => Some(only.clone()),
        (Some(base), Some(over)) => {
            let mut merged = base.clone();
            if !over.unsigned_image.is_empty() {
                merged.unsigned_image = over.unsigned_image.clone();
            }
            if !over.key_secret.name.is_empty() {
                merged.key_secret = over.key_secret.clone();
            }
            if !over.cert_secret.name.is_empty() {
                merged.cert_secret = over.cert_secret.clone();
            }
            merged
                .files_to_sign
                .extend(over.files_to_sign.iter().cloned());
            Some(merged)
        }
    }
}

/// The in-tree modules to remove: the container's list, replaced by the mapping's when the
/// mapping sets one; a deprecated single entry (mapping first, then container) wins over both.
pub fn merge_in_tree(
    container: &ModuleLoaderContainerSpec,
    mapping: &KernelMapping,
) -> Vec<String> {
    let single = if mapping.in_tree_module_to_remove.is_empty() {
        &container.in_tree_module_to_remove
    } else {
        &mapping.in_tree_module_to_remove
    };
    if !single.is_empty() {
        return vec![single.clone()];
    }
    mapping
        .in_tree_modules_to_remove
        .clone()
        .unwrap_or_else(|| container.in_tree_modules_to_remove.clone())
}

/// The build arguments KMM passes to an in-cluster build: the user's, with `KERNEL_VERSION`,
/// `KERNEL_FULL_VERSION` (the kernel as given, not normalised), `MOD_NAME` and `MOD_NAMESPACE`
/// replacing same-named ones in place or appended in name order.
pub fn build_args_for_kernel(
    build: &Build,
    kernel: &str,
    module_name: &str,
    module_namespace: &str,
) -> Vec<BuildArg> {
    let arg = |name: &str, value: &str| BuildArg {
        name: name.to_owned(),
        value: value.to_owned(),
    };
    let injected = [
        arg(var::KERNEL_FULL_VERSION, kernel),
        arg(var::KERNEL_VERSION, kernel),
        arg(var::MOD_NAME, module_name),
        arg(var::MOD_NAMESPACE, module_namespace),
    ];
    override_build_args(&build.build_args, &injected)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::LocalObjectReference;
    use proptest::prelude::*;
    use serde_json::json;

    fn container(value: serde_json::Value) -> ModuleLoaderContainerSpec {
        serde_json::from_value(value).unwrap()
    }

    fn literal(literal: &str, image: &str) -> serde_json::Value {
        json!({"literal": literal, "containerImage": image})
    }

    fn regexp(regexp: &str, image: &str) -> serde_json::Value {
        json!({"regexp": regexp, "containerImage": image})
    }

    fn base(mappings: Vec<serde_json::Value>) -> serde_json::Value {
        json!({"modprobe": {"moduleName": "kmod"}, "kernelMappings": mappings, "containerImage": "default/img:${KERNEL_XYZ}"})
    }

    #[test]
    fn first_match_in_list_order_wins() {
        let c = container(base(vec![
            literal("6.8.0-31-generic", "a:literal"),
            regexp("^6\\.8", "b:regexp"),
            regexp(".*", "c:any"),
        ]));
        let cases = [
            ("6.8.0-31-generic", 0, "a:literal"),
            ("6.8.0-40-generic", 1, "b:regexp"),
            ("5.14.0-284.el9.x86_64", 2, "c:any"),
        ];
        for (kernel, index, image) in cases {
            let resolved = resolve(&c, "m", "ns", kernel).unwrap();
            assert_eq!(
                (resolved.index, resolved.container_image.as_str()),
                (index, image),
                "{kernel}"
            );
        }
    }

    #[test]
    fn regexp_is_unanchored_and_literal_is_exact() {
        let c = container(base(vec![literal("6.8.0", "a:1"), regexp("el9", "b:1")]));
        assert_eq!(
            resolve(&c, "m", "ns", "5.14.0-284.el9.x86_64")
                .unwrap()
                .index,
            1
        );
        let err = resolve(&c, "m", "ns", "6.8.0-1").unwrap_err();
        assert_eq!(err.reason(), "NoMatchingMapping");
    }

    #[test]
    fn no_match_names_the_kernel_and_every_mapping_tried() {
        let c = container(base(vec![
            literal("4.18.0-372.19.1.el8_6.x86_64", "a:1"),
            regexp("^5\\.", "b:1"),
        ]));
        let err = resolve(&c, "m", "ns", "6.1.0-56-amd64").unwrap_err();
        assert_eq!(
            err.to_string(),
            "no kernel mapping matches kernel 6.1.0-56-amd64 (tried literal \"4.18.0-372.19.1.el8_6.x86_64\", regexp \"^5\\\\.\")"
        );
    }

    #[test]
    fn invalid_regexp_is_reported_with_its_index() {
        let c = container(base(vec![literal("x", "a:1"), regexp("(", "b:1")]));
        let err = resolve(&c, "m", "ns", "6.1.0-1").unwrap_err();
        assert!(
            matches!(err, MappingError::InvalidRegexp { index: 1, .. }),
            "{err}"
        );
        assert_eq!(err.reason(), "InvalidSpec");
        // The second resolution comes from the compiled-pattern cache and says the same.
        let again = resolve(&c, "m", "ns", "6.1.0-1").unwrap_err();
        assert_eq!(again.to_string(), err.to_string());
    }

    #[test]
    fn cached_patterns_match_like_fresh_ones() {
        for _ in 0..2 {
            assert!(
                compiled(r"^6\.1\.0-\d+-amd64$")
                    .unwrap()
                    .is_match("6.1.0-57-amd64")
            );
            assert!(
                !compiled(r"^6\.1\.0-\d+-amd64$")
                    .unwrap()
                    .is_match("6.1.0-57-arm64")
            );
        }
    }

    #[test]
    fn container_image_falls_back_and_is_substituted() {
        let c = container(base(vec![json!({"regexp": ".*", "containerImage": ""})]));
        let resolved = resolve(&c, "m", "ns", "6.8.0-31-generic").unwrap();
        assert_eq!(resolved.container_image, "default/img:6.8.0");

        let c = container(base(vec![regexp(
            ".*",
            "r/$MOD_NAMESPACE/$MOD_NAME:${KERNEL_FULL_VERSION}",
        )]));
        let resolved = resolve(&c, "kmm-ci", "labs", "6.8.0-31-generic").unwrap();
        assert_eq!(resolved.container_image, "r/labs/kmm-ci:6.8.0-31-generic");
    }

    #[test]
    fn kernel_with_fewer_than_three_components_is_an_error() {
        let c = container(base(vec![regexp(".*", "a:1")]));
        let err = resolve(&c, "m", "ns", "6.8").unwrap_err();
        assert!(matches!(err, MappingError::InvalidKernel(_)), "{err}");
    }

    #[test]
    fn registry_tls_of_the_mapping_replaces_the_container_one() {
        let mut spec = base(vec![
            json!({"literal": "6.1.0-1", "containerImage": "a:1", "registryTLS": {"insecureSkipTLSVerify": true}}),
            literal("6.1.0-2", "a:2"),
        ]);
        spec["registryTLS"] = json!({"insecure": true});
        let c = container(spec);
        let first = resolve(&c, "m", "ns", "6.1.0-1").unwrap().registry_tls;
        assert_eq!(
            first,
            TlsOptions {
                insecure: false,
                insecure_skip_tls_verify: true
            }
        );
        let second = resolve(&c, "m", "ns", "6.1.0-2").unwrap().registry_tls;
        assert_eq!(
            second,
            TlsOptions {
                insecure: true,
                insecure_skip_tls_verify: false
            }
        );
    }

    fn build(value: serde_json::Value) -> Build {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn build_merge_rules() {
        let module = build(json!({
            "dockerfileConfigMap": {"name": "module-cm"},
            "buildArgs": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}],
            "secrets": [{"name": "s1"}],
            "kanikoParams": {"tag": "debug"},
            "selector": {"k": "v"}
        }));
        let mapping = build(json!({
            "dockerfileConfigMap": {"name": "mapping-cm"},
            "buildArgs": [{"name": "Z", "value": "26"}, {"name": "B", "value": "two"}, {"name": "C", "value": "3"}],
            "secrets": [{"name": "s2"}],
            "kanikoParams": {"tag": "ignored"}
        }));
        let merged = merge_build(Some(&module), Some(&mapping)).unwrap();
        assert_eq!(merged.dockerfile_config_map.name, "mapping-cm");
        let args: Vec<(&str, &str)> = merged
            .build_args
            .iter()
            .map(|a| (a.name.as_str(), a.value.as_str()))
            .collect();
        assert_eq!(args, [("A", "1"), ("B", "two"), ("C", "3"), ("Z", "26")]);
        let secrets: Vec<&str> = merged.secrets.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(secrets, ["s1", "s2"]);
        assert_eq!(
            merged.kaniko_params.unwrap().tag,
            "debug",
            "module's kanikoParams kept"
        );
        assert_eq!(merged.selector.get("k").map(String::as_str), Some("v"));

        let unnamed = build(json!({"dockerfileConfigMap": {"name": ""}}));
        let kept = merge_build(Some(&module), Some(&unnamed)).unwrap();
        assert_eq!(kept.dockerfile_config_map.name, "module-cm");

        assert_eq!(merge_build(None, Some(&mapping)), Some(mapping.clone()));
        assert_eq!(merge_build(Some(&module), None), Some(module.clone()));
        assert_eq!(merge_build(None, None), None);
    }

    fn sign(value: serde_json::Value) -> Sign {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn sign_merge_rules_and_kernel_substitution() {
        let mut spec = base(vec![json!({
            "regexp": ".*", "containerImage": "a:1",
            "sign": {"keySecret": {"name": "mapping-key"}, "certSecret": {"name": ""},
                     "filesToSign": ["/opt/lib/modules/${KERNEL_FULL_VERSION}/b.ko"]}
        })]);
        spec["sign"] = json!({
            "unsignedImage": "u/${KERNEL_XYZ}:${MOD_NAME}", "keySecret": {"name": "k"}, "certSecret": {"name": "c"},
            "filesToSign": ["/opt/lib/modules/$KERNEL_FULL_VERSION/a.ko"]
        });
        let resolved = resolve(&container(spec), "m", "ns", "6.8.0-31-generic").unwrap();
        let merged = resolved.sign.unwrap();
        assert_eq!(
            merged.key_secret,
            LocalObjectReference {
                name: "mapping-key".into()
            }
        );
        assert_eq!(
            merged.cert_secret,
            LocalObjectReference { name: "c".into() }
        );
        assert_eq!(
            merged.unsigned_image, "u/6.8.0:",
            "MOD_NAME is not available to sign fields"
        );
        assert_eq!(
            merged.files_to_sign,
            [
                "/opt/lib/modules/6.8.0-31-generic/a.ko",
                "/opt/lib/modules/6.8.0-31-generic/b.ko"
            ]
        );
        let only = sign(json!({"keySecret": {"name": "k"}, "certSecret": {"name": "c"}}));
        assert_eq!(merge_sign(Some(&only), None), Some(only.clone()));
        assert_eq!(merge_sign(None, None), None);
    }

    #[test]
    fn in_tree_merge_rules() {
        let cases = [
            // (container list, container single, mapping list, mapping single, expected)
            (json!(["a", "b"]), "", json!(null), "", vec!["a", "b"]),
            (json!(["a", "b"]), "", json!(["c"]), "", vec!["c"]),
            (json!(["a", "b"]), "", json!([]), "", vec![]),
            (json!(null), "old", json!(null), "", vec!["old"]),
            (json!(null), "old", json!(null), "new", vec!["new"]),
            (json!(["a"]), "", json!(null), "new", vec!["new"]),
            (json!(null), "", json!(null), "", vec![]),
        ];
        for (c_list, c_single, m_list, m_single, expected) in cases {
            let mut spec = base(vec![json!({"regexp": ".*", "containerImage": "a:1",
                "inTreeModulesToRemove": m_list, "inTreeModuleToRemove": m_single})]);
            spec["inTreeModulesToRemove"] = c_list.clone();
            spec["inTreeModuleToRemove"] = json!(c_single);
            let resolved = resolve(&container(spec), "m", "ns", "6.1.0-1").unwrap();
            assert_eq!(
                resolved.in_tree_modules_to_remove, expected,
                "{c_list} {c_single} {m_single}"
            );
        }
    }

    #[test]
    fn injected_build_args_override_in_place_and_append_sorted() {
        let b = build(json!({"dockerfileConfigMap": {"name": "cm"},
            "buildArgs": [{"name": "MOD_NAME", "value": "user"}, {"name": "X", "value": "1"}]}));
        let args = build_args_for_kernel(&b, "6.8.0-31-generic+", "kmod", "ns");
        let args: Vec<(&str, &str)> = args
            .iter()
            .map(|a| (a.name.as_str(), a.value.as_str()))
            .collect();
        assert_eq!(
            args,
            [
                ("MOD_NAME", "kmod"),
                ("X", "1"),
                ("KERNEL_FULL_VERSION", "6.8.0-31-generic+"),
                ("KERNEL_VERSION", "6.8.0-31-generic+"),
                ("MOD_NAMESPACE", "ns"),
            ]
        );
    }

    proptest! {
        #[test]
        fn resolution_never_panics(
            kernel in ".{0,40}",
            lit in ".{0,20}",
            re in ".{0,20}",
            image in ".{0,40}",
            files in proptest::collection::vec(".{0,30}", 0..3),
        ) {
            let spec = json!({
                "modprobe": {"moduleName": "m"},
                "containerImage": image,
                "kernelMappings": [
                    {"literal": lit, "containerImage": ""},
                    {"regexp": re, "containerImage": image,
                     "sign": {"keySecret": {"name": "k"}, "certSecret": {"name": "c"}, "filesToSign": files}}
                ]
            });
            let c = container(spec);
            let _ = resolve(&c, "m", "ns", &kernel);
        }
    }
}
