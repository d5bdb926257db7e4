//! Admission validation of Module, ManagedClusterModule and PreflightValidation objects: every rule
//! of the Go KMM webhook, with Go's messages byte for byte, so that users and tooling that match on
//! them keep working.
//!
//! One deliberate difference: Go stops at the first problem, this module reports every problem it
//! finds, each with the path of the field at fault. The errors come in Go's check order, so the
//! first one ([`ValidationErrors::go_message`]) is the message Go would have returned.
//!
//! Two parts of a message come from libraries rather than from KMM and so read differently from
//! Go's: the detail after a toleration key/value or DNS-subdomain error (Go prints
//! apimachinery's wording, we print our own), and the text of a regexp compile error (the Rust
//! `regex` crate's, not RE2's).
//!
//! Two representation limits of our API types: `modprobe.modulesLoadingOrder` and the container's
//! `inTreeModulesToRemove` are plain lists, so an explicit empty list (`[]`), which Go tells apart
//! from an absent one, is treated here as absent.

use std::collections::BTreeSet;
use std::fmt;

use k8s_openapi::api::core::v1::{Toleration, Volume};
use kmm_api::hub::ManagedClusterModule;
use kmm_api::v1beta1::{
    DEFAULT_DIR_NAME, DraSpec, KernelMapping, ModprobeSpec, Module, ModuleLoaderContainerSpec,
    ModuleSpec, Sign,
};
use kmm_api::v1beta2::PreflightValidation;
use kmm_api::wire;

/// Oldest Kubernetes (major, minor) that serves `resource.k8s.io/v1`, which `spec.dra` needs.
const MIN_KUBERNETES_FOR_DRA: (u32, u32) = (1, 34);

/// Host directories a device plugin or DRA driver may mount.
const ALLOWED_HOST_PATHS: [&str; 5] = ["/dev", "/sys", "/var", "/opt", "/run"];

/// Go wraps every container and kernel-mapping error in this.
const CONTAINER_PREFIX: &str = "failed to validate kernel mappings";

const DNS1123_SUBDOMAIN_MAX_LEN: usize = 253;
const QUALIFIED_NAME_MAX_LEN: usize = 63;

const NAMESPACE_DELETION_MESSAGE: &str =
    "namespace contains one or more Module resources; delete those before deleting the namespace";

/// One problem in an object, located by the path of the field at fault.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// JSON path of the field, e.g. `spec.moduleLoader.container.kernelMappings[2].regexp`.
    pub path: String,
    /// The Go KMM webhook message, including its prefix.
    pub message: String,
}

impl FieldError {
    fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Every problem found in an object, in Go KMM's check order. Never empty when returned as an
/// error.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidationErrors(pub Vec<FieldError>);

impl ValidationErrors {
    /// The message Go KMM would have rejected the object with: the first problem, without path.
    pub fn go_message(&self) -> &str {
        self.0.first().map_or("", |e| e.message.as_str())
    }

    fn into_result(errors: Vec<FieldError>) -> Result<(), Self> {
        if errors.is_empty() {
            Ok(())
        } else {
            Err(Self(errors))
        }
    }
}

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ValidationErrors {}

/// What validation needs to know about the cluster it runs in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClusterInfo {
    /// Kubernetes (major, minor) version of the cluster; `None` when unknown, which skips the
    /// DRA version gate (as on the hub, where the spoke's own webhook enforces it).
    pub kubernetes_minor: Option<(u32, u32)>,
}

/// Validates a Module being created.
pub fn validate_module(module: &Module, cluster: &ClusterInfo) -> Result<(), ValidationErrors> {
    ValidationErrors::into_result(validate_module_spec(
        &module.spec,
        module.metadata.name.as_deref().unwrap_or_default(),
        module.metadata.namespace.as_deref().unwrap_or_default(),
        cluster,
    ))
}

/// Validates a Module being updated: the version transition rule, then everything
/// [`validate_module`] checks on the new object.
pub fn validate_module_update(
    old: &Module,
    new: &Module,
    cluster: &ClusterInfo,
) -> Result<(), ValidationErrors> {
    let mut errors = version_transition_errors(&old.spec, &new.spec);
    errors.extend(validate_module_spec(
        &new.spec,
        new.metadata.name.as_deref().unwrap_or_default(),
        new.metadata.namespace.as_deref().unwrap_or_default(),
        cluster,
    ));
    ValidationErrors::into_result(errors)
}

/// Every Module rule except the update-only one, on a spec with the given name and namespace.
/// Paths start at `metadata.name` or `spec.`.
///
/// The name-length rule reproduces Go's quirk #6 (spec §12): the limit exists so that
/// `version-schedule-pod.<ns>.<name>` fits a label name, which only matters when
/// `moduleLoader.container.version` is set, and the message says so, but Go applies it to every
/// Module. We do the same, so that both operators accept exactly the same Modules.
pub fn validate_module_spec(
    spec: &ModuleSpec,
    name: &str,
    namespace: &str,
    cluster: &ClusterInfo,
) -> Vec<FieldError> {
    let mut errors = Vec::new();

    let combined = name.len() + namespace.len();
    if combined > wire::MAX_MODULE_NAME_AND_NAMESPACE {
        errors.push(FieldError::new(
            "metadata.name",
            format!(
                "module name and namespace have a combined length of {combined} characters, which exceeds the maximum of {} when version is set",
                wire::MAX_MODULE_NAME_AND_NAMESPACE
            ),
        ));
    }

    check_tolerations(&spec.tolerations, &mut errors);

    if let Some(dra) = &spec.dra {
        check_dra(dra, cluster, &mut errors);
        check_host_paths(
            "spec.dra",
            &dra.volumes,
            "failed to validate DRA volumes",
            &mut errors,
        );
    }
    if let Some(device_plugin) = &spec.device_plugin {
        check_host_paths(
            "spec.devicePlugin",
            &device_plugin.volumes,
            "failed to validate device plugin volumes",
            &mut errors,
        );
    }

    // Without a module loader there is nothing to load, so nothing more to check.
    if let Some(loader) = &spec.module_loader {
        let container = &loader.container;
        check_container(container, &mut errors);
        check_modprobe(&container.modprobe, &mut errors);
        check_files_to_sign(container, &mut errors);
    }

    errors
}

/// Validates a ManagedClusterModule being created: the Module rules on its `moduleSpec`, with no
/// name or namespace and no DRA version gate (the spoke's webhook enforces that one). Paths point
/// into `spec.moduleSpec`.
pub fn validate_managed_cluster_module(mcm: &ManagedClusterModule) -> Result<(), ValidationErrors> {
    ValidationErrors::into_result(managed_cluster_module_errors(&mcm.spec.module_spec))
}

/// Validates a ManagedClusterModule being updated: the version transition rule between the old
/// and new `moduleSpec`, then [`validate_managed_cluster_module`] on the new object.
pub fn validate_managed_cluster_module_update(
    old: &ManagedClusterModule,
    new: &ManagedClusterModule,
) -> Result<(), ValidationErrors> {
    let mut errors = under_module_spec(version_transition_errors(
        &old.spec.module_spec,
        &new.spec.module_spec,
    ));
    errors.extend(managed_cluster_module_errors(&new.spec.module_spec));
    ValidationErrors::into_result(errors)
}

fn managed_cluster_module_errors(spec: &ModuleSpec) -> Vec<FieldError> {
    under_module_spec(validate_module_spec(spec, "", "", &ClusterInfo::default()))
}

/// Moves Module paths (`spec.x`) under a ManagedClusterModule's `spec.moduleSpec`.
fn under_module_spec(mut errors: Vec<FieldError>) -> Vec<FieldError> {
    for error in &mut errors {
        if let Some(rest) = error.path.strip_prefix("spec.") {
            error.path = format!("spec.moduleSpec.{rest}");
        }
    }
    errors
}

/// Validates a PreflightValidation (v1beta2) being created or updated.
pub fn validate_preflight(pv: &PreflightValidation) -> Result<(), ValidationErrors> {
    let kernel = &pv.spec.kernel_version;
    let message = if kernel.is_empty() {
        Some("kernelVersion cannot be empty".to_owned())
    } else if kernel.split(['.', ',', '-']).count() < 3 {
        Some(format!("invalid kernelVersion {kernel}"))
    } else {
        None
    };
    ValidationErrors::into_result(
        message
            .map(|m| FieldError::new("spec.kernelVersion", m))
            .into_iter()
            .collect(),
    )
}

/// Why a namespace labelled [`wire::label::NAMESPACE_CONTAINS_MODULES`] cannot be deleted.
pub fn namespace_deletion_message() -> &'static str {
    NAMESPACE_DELETION_MESSAGE
}

/// Rule U: `version` may not go from empty to set or back while a module loader exists in both.
fn version_transition_errors(old: &ModuleSpec, new: &ModuleSpec) -> Vec<FieldError> {
    match (&old.module_loader, &new.module_loader) {
        (Some(old), Some(new))
            if old.container.version.is_empty() != new.container.version.is_empty() =>
        {
            vec![FieldError::new(
                "spec.moduleLoader.container.version",
                "cannot update to or from an empty version; please delete the Module and create it again",
            )]
        }
        _ => Vec::new(),
    }
}

fn check_tolerations(tolerations: &[Toleration], errors: &mut Vec<FieldError>) {
    const PREFIX: &str = "failed to validate Module's tolerations";
    for (i, toleration) in tolerations.iter().enumerate() {
        let path = format!("spec.tolerations[{i}]");
        let mut push = |field: &str, detail: String| {
            errors.push(FieldError::new(
                format!("{path}.{field}"),
                format!("{PREFIX}: Toleration[{i}] {detail}"),
            ));
        };
        let key = toleration.key.as_deref().unwrap_or_default();
        let operator = toleration.operator.as_deref().unwrap_or_default();
        let value = toleration.value.as_deref().unwrap_or_default();
        let effect = toleration.effect.as_deref().unwrap_or_default();

        if !key.is_empty() {
            let problems = qualified_name_problems(key);
            if !problems.is_empty() {
                push(
                    "key",
                    format!("invalid key '{key}': {}", problems.join("; ")),
                );
            }
        } else if operator != "Exists" {
            push(
                "operator",
                "operator must be 'Exists' when key is empty".to_owned(),
            );
        }

        if toleration.toleration_seconds.is_some() && effect != "NoExecute" {
            push(
                "effect",
                "effect must be 'NoExecute' when tolerationSeconds is set".to_owned(),
            );
        }

        match operator {
            "Equal" | "" => {
                let problems = label_value_problems(value);
                if !problems.is_empty() {
                    push(
                        "value",
                        format!(
                            "invalid value '{value}' for Equal operator {}",
                            problems.join("; ")
                        ),
                    );
                }
            }
            "Exists" => {
                if !value.is_empty() {
                    push(
                        "value",
                        "value must be empty when operator is 'Exists'".to_owned(),
                    );
                }
            }
            other => push(
                "operator",
                format!("invalid operator '{other}', allowed values are ['Equal', 'Exists']"),
            ),
        }

        if !effect.is_empty() && !matches!(effect, "NoSchedule" | "PreferNoSchedule" | "NoExecute")
        {
            push(
                "effect",
                format!(
                    "invalid effect '{effect}', allowed values are ['NoSchedule', 'PreferNoSchedule', 'NoExecute']"
                ),
            );
        }
    }
}

fn check_dra(dra: &DraSpec, cluster: &ClusterInfo, errors: &mut Vec<FieldError>) {
    let mut push = |path: String, detail: String| {
        errors.push(FieldError::new(
            path,
            format!("failed to validate DRA: {detail}"),
        ));
    };

    if let Some((major, minor)) = cluster.kubernetes_minor
        && (major, minor) < MIN_KUBERNETES_FOR_DRA
    {
        let (min_major, min_minor) = MIN_KUBERNETES_FOR_DRA;
        push(
            "spec.dra".to_owned(),
            format!(
                "spec.dra requires Kubernetes {min_major}.{min_minor} or later; current cluster version is {major}.{minor}"
            ),
        );
    }

    let driver = &dra.driver_name;
    if driver.is_empty() {
        push(
            "spec.dra.driverName".to_owned(),
            "spec.dra.driverName is required".to_owned(),
        );
    } else {
        let problems = dns1123_subdomain_problems(driver);
        if !problems.is_empty() {
            push(
                "spec.dra.driverName".to_owned(),
                format!(
                    "spec.dra.driverName {} is not a valid DNS subdomain: {}",
                    go_quote(driver),
                    problems.join("; ")
                ),
            );
        }
    }

    let mut seen = BTreeSet::new();
    for (i, class) in dra.device_classes.iter().enumerate() {
        let path = format!("spec.dra.deviceClasses[{i}].name");
        let name = &class.name;
        if name.is_empty() {
            push(
                path,
                format!("spec.dra.deviceClasses[{i}].name is required"),
            );
            continue;
        }
        let problems = dns1123_subdomain_problems(name);
        if !problems.is_empty() {
            push(
                path,
                format!(
                    "spec.dra.deviceClasses[{i}].name {} is not a valid DNS subdomain: {}",
                    go_quote(name),
                    problems.join("; ")
                ),
            );
        } else if !seen.insert(name.as_str()) {
            push(
                path,
                format!(
                    "spec.dra.deviceClasses[{i}].name {} is a duplicate",
                    go_quote(name)
                ),
            );
        }
    }
}

fn check_host_paths(field: &str, volumes: &[Volume], prefix: &str, errors: &mut Vec<FieldError>) {
    for (i, volume) in volumes.iter().enumerate() {
        let Some(host_path) = &volume.host_path else {
            continue;
        };
        let cleaned = clean_path(&host_path.path);
        let allowed = ALLOWED_HOST_PATHS.iter().any(|root| {
            cleaned == *root
                || cleaned
                    .strip_prefix(root)
                    .is_some_and(|rest| rest.starts_with('/'))
        });
        if !allowed {
            errors.push(FieldError::new(
                format!("{field}.volumes[{i}].hostPath.path"),
                format!(
                    "{prefix}: {field}.volumes[{i}]: hostPath {} is not allowed; only /dev, /sys, /var, /opt and /run paths are permitted",
                    go_quote(&host_path.path)
                ),
            ));
        }
    }
}

/// Go's image check: only the presence of a `:` or `@` is required, nothing about their place.
fn has_tag_or_digest(image: &str) -> bool {
    image.contains([':', '@'])
}

fn image_format_problem(image: &str) -> String {
    format!(
        "failed to validate image format: container image must explicitely set a tag or digest; got: {image}"
    )
}

fn check_container(container: &ModuleLoaderContainerSpec, errors: &mut Vec<FieldError>) {
    const BASE: &str = "spec.moduleLoader.container";

    let container_list_set = !container.in_tree_modules_to_remove.is_empty();
    let container_single_set = !container.in_tree_module_to_remove.is_empty();
    if container_list_set && container_single_set {
        errors.push(FieldError::new(
            format!("{BASE}.inTreeModuleToRemove"),
            format!(
                "{CONTAINER_PREFIX}: only one of the Container's fields: InTreeModulesToRemove or InTreeModuleToRemove can be defined"
            ),
        ));
    }

    let container_image = &container.container_image;
    if !container_image.is_empty() && !has_tag_or_digest(container_image) {
        errors.push(FieldError::new(
            format!("{BASE}.containerImage"),
            format!(
                "{CONTAINER_PREFIX}: {}",
                image_format_problem(container_image)
            ),
        ));
    }

    for (idx, mapping) in container.kernel_mappings.iter().enumerate() {
        let path = format!("{BASE}.kernelMappings[{idx}]");
        check_kernel_mapping(mapping, idx, &path, container, errors);
    }
}

fn check_kernel_mapping(
    mapping: &KernelMapping,
    idx: usize,
    path: &str,
    container: &ModuleLoaderContainerSpec,
    errors: &mut Vec<FieldError>,
) {
    let mut push = |field: &str, detail: String| {
        let path = if field.is_empty() {
            path.to_owned()
        } else {
            format!("{path}.{field}")
        };
        errors.push(FieldError::new(
            path,
            format!("{CONTAINER_PREFIX}: {detail}"),
        ));
    };

    match (mapping.regexp.is_empty(), mapping.literal.is_empty()) {
        (false, false) => push(
            "",
            format!(
                "regexp and literal are mutually exclusive properties at kernelMappings[{idx}]"
            ),
        ),
        (true, true) => push(
            "",
            format!("regexp or literal must be set at kernelMappings[{idx}]"),
        ),
        _ => {}
    }

    if !mapping.regexp.is_empty()
        && let Err(error) = regex::Regex::new(&mapping.regexp)
    {
        push(
            "regexp",
            format!(
                "invalid regexp at index {idx}: {}",
                regexp_error_text(&mapping.regexp, &error)
            ),
        );
    }

    let image = &mapping.container_image;
    if image.is_empty() {
        if container.container_image.is_empty() {
            push(
                "containerImage",
                format!("missing spec.moduleLoader.container.kernelMappings[{idx}].containerImage"),
            );
        }
    } else if !has_tag_or_digest(image) {
        push("containerImage", image_format_problem(image));
    }

    check_in_tree(mapping, path, container, errors);
}

fn check_in_tree(
    mapping: &KernelMapping,
    path: &str,
    container: &ModuleLoaderContainerSpec,
    errors: &mut Vec<FieldError>,
) {
    let mapping_list_set = mapping.in_tree_modules_to_remove.is_some();
    let mapping_single_set = !mapping.in_tree_module_to_remove.is_empty();

    if mapping_list_set && mapping_single_set {
        errors.push(FieldError::new(
            format!("{path}.inTreeModuleToRemove"),
            format!(
                "{CONTAINER_PREFIX}: only one of the KernelMapping fields: InTreeModulesToRemove or InTreeModuleToRemove can be defined"
            ),
        ));
    }

    let mixed_list = mapping_list_set && !container.in_tree_module_to_remove.is_empty();
    let mixed_single = mapping_single_set && !container.in_tree_modules_to_remove.is_empty();
    if mixed_list || mixed_single {
        let field = if mixed_list {
            "inTreeModulesToRemove"
        } else {
            "inTreeModuleToRemove"
        };
        errors.push(FieldError::new(
            format!("{path}.{field}"),
            format!(
                "{CONTAINER_PREFIX}: only one type if field (InTreeModuleToRemove or InTreeModulesToRemove) can be defined in KenrelMapping or Container"
            ),
        ));
    }
}

/// The regex crate's error, plus a hint where Go's RE2 would have accepted the pattern.
fn regexp_error_text(pattern: &str, error: &regex::Error) -> String {
    let mut text = error.to_string();
    if uses_re2_only_escape(pattern) {
        text.push_str(
            "\nnote: kmm-rs compiles kernel-mapping regexps with the Rust regex crate, which unlike Go's RE2 does not support \\Q...\\E quoting or \\C",
        );
    }
    text
}

/// Whether the pattern uses `\Q` or `\C`, which RE2 accepts and the regex crate rejects.
fn uses_re2_only_escape(pattern: &str) -> bool {
    let mut chars = pattern.chars();
    while let Some(c) = chars.next() {
        if c == '\\' && matches!(chars.next(), Some('Q' | 'C')) {
            return true;
        }
    }
    false
}

fn check_modprobe(modprobe: &ModprobeSpec, errors: &mut Vec<FieldError>) {
    const BASE: &str = "spec.moduleLoader.container.modprobe";
    let mut push = |field: &str, detail: String| {
        errors.push(FieldError::new(
            format!("{BASE}.{field}"),
            format!("failed to validate modprobe: {detail}"),
        ));
    };

    let module_name = modprobe.module_name.as_str();
    let name_set = !module_name.is_empty();
    let raw_load_set = modprobe
        .raw_args
        .as_ref()
        .is_some_and(|raw| !raw.load.is_empty());
    let raw_unload_set = modprobe
        .raw_args
        .as_ref()
        .is_some_and(|raw| !raw.unload.is_empty());

    if name_set {
        if raw_load_set || raw_unload_set {
            push(
                "rawArgs",
                "rawArgs cannot be set when moduleName is set".to_owned(),
            );
        }
    } else if !raw_load_set || !raw_unload_set {
        push(
            "rawArgs",
            "load and unload rawArgs must be set when moduleName is unset".to_owned(),
        );
    }

    let order = &modprobe.modules_loading_order;
    if order.is_empty() {
        return;
    }
    if order.len() < 2 {
        push(
            "modulesLoadingOrder",
            "if a loading order is defined, at least two values must be defined".to_owned(),
        );
    }
    if !name_set {
        push(
            "moduleName",
            "if a loading order is defined, moduleName must be set".to_owned(),
        );
    } else if order[0] != module_name {
        push(
            "modulesLoadingOrder[0]",
            "if a loading order is defined, the first element must be moduleName".to_owned(),
        );
    }
    let mut seen = BTreeSet::new();
    for (j, name) in order.iter().enumerate() {
        if !seen.insert(name.as_str()) {
            push(
                &format!("modulesLoadingOrder[{j}]"),
                format!(
                    "{}: duplicate value in the loading order list",
                    go_quote(name)
                ),
            );
        }
    }
}

fn check_files_to_sign(container: &ModuleLoaderContainerSpec, errors: &mut Vec<FieldError>) {
    const BASE: &str = "spec.moduleLoader.container";
    let dir_name = match container.modprobe.dir_name.as_str() {
        "" => DEFAULT_DIR_NAME,
        dir => dir,
    };

    if let Some(sign) = &container.sign {
        check_sign(
            sign,
            dir_name,
            &format!("{BASE}.sign"),
            "global Sign",
            errors,
        );
    }
    for (idx, mapping) in container.kernel_mappings.iter().enumerate() {
        if let Some(sign) = &mapping.sign {
            check_sign(
                sign,
                dir_name,
                &format!("{BASE}.kernelMappings[{idx}].sign"),
                &format!("kernelMappings[{idx}].Sign"),
                errors,
            );
        }
    }
}

fn check_sign(sign: &Sign, dir_name: &str, path: &str, prefix: &str, errors: &mut Vec<FieldError>) {
    if sign.files_to_sign.is_empty() {
        errors.push(FieldError::new(
            format!("{path}.filesToSign"),
            format!("{prefix}: filesToSign is required when Sign is set"),
        ));
        return;
    }
    let required_prefix = format!("{dir_name}/");
    for (j, file) in sign.files_to_sign.iter().enumerate() {
        if !file.starts_with(&required_prefix) {
            errors.push(FieldError::new(
                format!("{path}.filesToSign[{j}]"),
                format!(
                    "{prefix}: filesToSign[{}] must be under dirName {}",
                    go_quote(file),
                    go_quote(dir_name)
                ),
            ));
        }
    }
}

/// Problems that make `value` not a Kubernetes qualified name (`[prefix/]name`, as in label
/// keys and toleration keys); empty when it is one.
fn qualified_name_problems(value: &str) -> Vec<String> {
    let parts: Vec<&str> = value.split('/').collect();
    let (prefix, name) = match parts.as_slice() {
        [name] => (None, *name),
        [prefix, name] => (Some(*prefix), *name),
        _ => {
            return vec![
                "a qualified name is a name part of alphanumeric characters, '-', '_' or '.' that starts and ends with an alphanumeric character, optionally preceded by a DNS subdomain prefix and '/' (e.g. 'MyName' or 'example.com/my-name')".to_owned(),
            ];
        }
    };

    let mut problems = Vec::new();
    match prefix {
        Some("") => problems.push("prefix part: must be non-empty".to_owned()),
        Some(prefix) => problems.extend(
            dns1123_subdomain_problems(prefix)
                .into_iter()
                .map(|p| format!("prefix part: {p}")),
        ),
        None => {}
    }
    if name.is_empty() {
        problems.push("name part: must be non-empty".to_owned());
    } else {
        problems.extend(
            name_part_problems(name)
                .into_iter()
                .map(|p| format!("name part: {p}")),
        );
    }
    problems
}

/// Problems that make a non-empty `value` not a valid qualified-name name part or label value.
fn name_part_problems(value: &str) -> Vec<String> {
    if value.len() > QUALIFIED_NAME_MAX_LEN {
        return vec![format!(
            "must be no more than {QUALIFIED_NAME_MAX_LEN} characters"
        )];
    }
    let mut problems = Vec::new();
    let bytes = value.as_bytes();
    let edges_ok = bytes.first().is_some_and(u8::is_ascii_alphanumeric)
        && bytes.last().is_some_and(u8::is_ascii_alphanumeric);
    if !edges_ok {
        problems.push("must start and end with an alphanumeric character".to_owned());
    }
    if !bytes
        .iter()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        problems.push("must contain only alphanumeric characters, '-', '_' or '.'".to_owned());
    }
    problems
}

/// Problems that make `value` not a valid label value (empty is valid).
fn label_value_problems(value: &str) -> Vec<String> {
    if value.is_empty() {
        Vec::new()
    } else {
        name_part_problems(value)
    }
}

/// Problems that make `value` not a lowercase RFC 1123 DNS subdomain.
fn dns1123_subdomain_problems(value: &str) -> Vec<String> {
    let mut problems = Vec::new();
    if value.len() > DNS1123_SUBDOMAIN_MAX_LEN {
        problems.push(format!(
            "must be no more than {DNS1123_SUBDOMAIN_MAX_LEN} characters"
        ));
    }
    let label_ok = |label: &str| {
        let bytes = label.as_bytes();
        let alnum = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
        bytes.first().is_some_and(alnum)
            && bytes.last().is_some_and(alnum)
            && bytes.iter().all(|b| alnum(b) || *b == b'-')
    };
    if !value.split('.').all(label_ok) {
        problems.push(
            "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com')".to_owned(),
        );
    }
    problems
}

/// Lexical path cleaning with the rules of Go's `path.Clean`: repeated slashes collapse, `.`
/// elements go, `..` removes the element before it (and is dropped at the root), and an empty
/// result is `.`.
fn clean_path(path: &str) -> String {
    let rooted = path.starts_with('/');
    let mut parts: Vec<&str> = Vec::new();
    for element in path.split('/') {
        match element {
            "" | "." => {}
            ".." => match parts.last() {
                Some(&last) if last != ".." => {
                    parts.pop();
                }
                _ if rooted => {}
                _ => parts.push(".."),
            },
            other => parts.push(other),
        }
    }
    let joined = parts.join("/");
    match (rooted, joined.is_empty()) {
        (true, _) => format!("/{joined}"),
        (false, true) => ".".to_owned(),
        (false, false) => joined,
    }
}

/// `s` formatted like Go's `%q` (`strconv.Quote`): double quotes, Go escapes for quotes,
/// backslashes and non-printable characters. Printability follows Go's `strconv.IsPrint` for
/// everything users write in practice (controls, separators, format and private-use characters
/// are escaped); unassigned code points, which std cannot recognise, are left as they are.
fn go_quote(s: &str) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{7}' => out.push_str("\\a"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{b}' => out.push_str("\\v"),
            c if go_is_print(c) => out.push(c),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c if (c as u32) < 0x10000 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => {
                let _ = write!(out, "\\U{:08x}", c as u32);
            }
        }
    }
    out.push('"');
    out
}

fn go_is_print(c: char) -> bool {
    if c == ' ' {
        return true;
    }
    if c.is_control() || c.is_whitespace() {
        return false;
    }
    !matches!(
        c as u32,
        0xAD | 0x600..=0x605
            | 0x61C
            | 0x6DD
            | 0x70F
            | 0x890..=0x891
            | 0x8E2
            | 0x180E
            | 0x200B..=0x200F
            | 0x2028..=0x202E
            | 0x2060..=0x206F
            | 0xD800..=0xDFFF
            | 0xE000..=0xF8FF
            | 0xFDD0..=0xFDEF
            | 0xFEFF
            | 0xFFF0..=0xFFFB
            | 0xFFFE..=0xFFFF
            | 0x110BD
            | 0x110CD
            | 0x13430..=0x1343F
            | 0x1BCA0..=0x1BCA3
            | 0x1D173..=0x1D17A
            | 0xE0000..=0xE007F
            | 0xF0000..=0x10FFFF
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{HostPathVolumeSource, Toleration, Volume};
    use kmm_api::v1beta1::ModprobeArgs;
    use proptest::prelude::*;
    use serde_json::json;

    const CLUSTER: ClusterInfo = ClusterInfo {
        kubernetes_minor: Some((1, 34)),
    };

    type Edit = fn(&mut Module);
    /// Expected (path, message) pairs, in order.
    type Expected<'a> = &'a [(&'a str, &'a str)];
    type Case<'a> = (&'a str, Edit, Expected<'a>);

    fn valid_module() -> Module {
        serde_json::from_value(json!({
            "apiVersion": "kmm.sigs.x-k8s.io/v1beta1",
            "kind": "Module",
            "metadata": {"name": "kmm-ci", "namespace": "default"},
            "spec": {
                "selector": {"kubernetes.io/os": "linux"},
                "moduleLoader": {"container": {
                    "containerImage": "quay.io/org/kmod:${KERNEL_FULL_VERSION}",
                    "modprobe": {"moduleName": "kmm_ci_a"},
                    "kernelMappings": [{"regexp": "^.+$", "containerImage": ""}]
                }}
            }
        }))
        .unwrap()
    }

    fn loader_less_module(spec: serde_json::Value) -> Module {
        serde_json::from_value(json!({
            "apiVersion": "kmm.sigs.x-k8s.io/v1beta1",
            "kind": "Module",
            "metadata": {"name": "kmm-ci", "namespace": "default"},
            "spec": spec,
        }))
        .unwrap()
    }

    fn container(m: &mut Module) -> &mut ModuleLoaderContainerSpec {
        &mut m.spec.module_loader.as_mut().unwrap().container
    }

    fn mapping(m: &mut Module) -> &mut KernelMapping {
        &mut container(m).kernel_mappings[0]
    }

    fn sign(files: &[&str]) -> Option<Sign> {
        Some(Sign {
            files_to_sign: files.iter().map(|f| f.to_string()).collect(),
            ..Sign::default()
        })
    }

    fn tol(
        key: &str,
        operator: &str,
        value: &str,
        effect: &str,
        seconds: Option<i64>,
    ) -> Toleration {
        let opt = |s: &str| (!s.is_empty()).then(|| s.to_owned());
        Toleration {
            key: opt(key),
            operator: opt(operator),
            value: opt(value),
            effect: opt(effect),
            toleration_seconds: seconds,
        }
    }

    fn host_path(path: &str) -> Volume {
        Volume {
            name: "v".to_owned(),
            host_path: Some(HostPathVolumeSource {
                path: path.to_owned(),
                type_: None,
            }),
            ..Volume::default()
        }
    }

    fn errors_with(module: &Module, cluster: &ClusterInfo) -> Vec<(String, String)> {
        match validate_module(module, cluster) {
            Ok(()) => Vec::new(),
            Err(errors) => {
                assert!(!errors.0.is_empty(), "Err must carry at least one error");
                errors.0.into_iter().map(|e| (e.path, e.message)).collect()
            }
        }
    }

    fn errors(module: &Module) -> Vec<(String, String)> {
        errors_with(module, &CLUSTER)
    }

    fn owned(expected: Expected<'_>) -> Vec<(String, String)> {
        expected
            .iter()
            .map(|(p, m)| (p.to_string(), m.to_string()))
            .collect()
    }

    fn assert_cases(cases: &[Case<'_>]) {
        for (name, edit, expected) in cases {
            let mut module = valid_module();
            edit(&mut module);
            assert_eq!(errors(&module), owned(expected), "case {name:?}");
        }
    }

    #[test]
    fn validate_valid_module_passes() {
        assert_eq!(validate_module(&valid_module(), &CLUSTER), Ok(()));
    }

    #[test]
    fn validate_name_and_namespace_length() {
        assert_cases(&[
            (
                // Go quirk #6: applied although no version is set.
                "42 characters without version",
                |m| {
                    m.metadata.name = Some("a".repeat(30));
                    m.metadata.namespace = Some("b".repeat(12));
                },
                &[(
                    "metadata.name",
                    "module name and namespace have a combined length of 42 characters, which exceeds the maximum of 41 when version is set",
                )],
            ),
            (
                "41 characters",
                |m| {
                    m.metadata.name = Some("a".repeat(30));
                    m.metadata.namespace = Some("b".repeat(11));
                },
                &[],
            ),
        ]);
    }

    #[test]
    fn validate_tolerations() {
        assert_cases(&[
            (
                "valid key, Equal, value, effect",
                |m| {
                    m.spec.tolerations =
                        vec![tol("example.com/gpu", "Equal", "true", "NoSchedule", None)]
                },
                &[],
            ),
            (
                "empty key with Exists",
                |m| m.spec.tolerations = vec![tol("", "Exists", "", "", None)],
                &[],
            ),
            (
                "key with three parts",
                |m| m.spec.tolerations = vec![tol("a/b/c", "Exists", "", "", None)],
                &[(
                    "spec.tolerations[0].key",
                    "failed to validate Module's tolerations: Toleration[0] invalid key 'a/b/c': a qualified name is a name part of alphanumeric characters, '-', '_' or '.' that starts and ends with an alphanumeric character, optionally preceded by a DNS subdomain prefix and '/' (e.g. 'MyName' or 'example.com/my-name')",
                )],
            ),
            (
                "key name part with bad edges and characters",
                |m| m.spec.tolerations = vec![tol("-a b", "Exists", "", "", None)],
                &[(
                    "spec.tolerations[0].key",
                    "failed to validate Module's tolerations: Toleration[0] invalid key '-a b': name part: must start and end with an alphanumeric character; name part: must contain only alphanumeric characters, '-', '_' or '.'",
                )],
            ),
            (
                "key with upper-case prefix and empty name",
                |m| m.spec.tolerations = vec![tol("Example.com/", "Exists", "", "", None)],
                &[(
                    "spec.tolerations[0].key",
                    "failed to validate Module's tolerations: Toleration[0] invalid key 'Example.com/': prefix part: a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com'); name part: must be non-empty",
                )],
            ),
            (
                "key with empty prefix",
                |m| m.spec.tolerations = vec![tol("/gpu", "Exists", "", "", None)],
                &[(
                    "spec.tolerations[0].key",
                    "failed to validate Module's tolerations: Toleration[0] invalid key '/gpu': prefix part: must be non-empty",
                )],
            ),
            (
                "key name part of 64 characters",
                |m| m.spec.tolerations = vec![tol(&"k".repeat(64), "Exists", "", "", None)],
                &[(
                    "spec.tolerations[0].key",
                    "failed to validate Module's tolerations: Toleration[0] invalid key 'kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk': name part: must be no more than 63 characters",
                )],
            ),
            (
                "empty key with Equal",
                |m| m.spec.tolerations = vec![tol("", "Equal", "", "", None)],
                &[(
                    "spec.tolerations[0].operator",
                    "failed to validate Module's tolerations: Toleration[0] operator must be 'Exists' when key is empty",
                )],
            ),
            (
                "tolerationSeconds with NoExecute",
                |m| m.spec.tolerations = vec![tol("k", "Exists", "", "NoExecute", Some(30))],
                &[],
            ),
            (
                "tolerationSeconds with NoSchedule",
                |m| m.spec.tolerations = vec![tol("k", "Exists", "", "NoSchedule", Some(30))],
                &[(
                    "spec.tolerations[0].effect",
                    "failed to validate Module's tolerations: Toleration[0] effect must be 'NoExecute' when tolerationSeconds is set",
                )],
            ),
            (
                "invalid value for the default (Equal) operator",
                |m| m.spec.tolerations = vec![tol("k", "", "a value", "", None)],
                &[(
                    "spec.tolerations[0].value",
                    "failed to validate Module's tolerations: Toleration[0] invalid value 'a value' for Equal operator must contain only alphanumeric characters, '-', '_' or '.'",
                )],
            ),
            (
                "value with Exists",
                |m| m.spec.tolerations = vec![tol("k", "Exists", "v", "", None)],
                &[(
                    "spec.tolerations[0].value",
                    "failed to validate Module's tolerations: Toleration[0] value must be empty when operator is 'Exists'",
                )],
            ),
            (
                "unknown operator",
                |m| m.spec.tolerations = vec![tol("k", "In", "", "", None)],
                &[(
                    "spec.tolerations[0].operator",
                    "failed to validate Module's tolerations: Toleration[0] invalid operator 'In', allowed values are ['Equal', 'Exists']",
                )],
            ),
            (
                "unknown effect at index 1",
                |m| {
                    m.spec.tolerations = vec![
                        tol("k", "Exists", "", "", None),
                        tol("k", "Exists", "", "Never", None),
                    ]
                },
                &[(
                    "spec.tolerations[1].effect",
                    "failed to validate Module's tolerations: Toleration[1] invalid effect 'Never', allowed values are ['NoSchedule', 'PreferNoSchedule', 'NoExecute']",
                )],
            ),
        ]);
    }

    fn dra_module(dra: serde_json::Value) -> Module {
        loader_less_module(json!({"selector": {}, "dra": dra}))
    }

    fn dra_json(driver: &str, classes: &[&str]) -> serde_json::Value {
        let classes: Vec<_> = classes.iter().map(|c| json!({"name": c})).collect();
        json!({"container": {"image": "quay.io/org/dra:v1"}, "driverName": driver, "deviceClasses": classes})
    }

    #[test]
    fn validate_dra() {
        let good = dra_module(dra_json(
            "gpu.example.com",
            &["gpu.example.com", "fast-gpu"],
        ));
        let cases: &[(&str, Module, ClusterInfo, Expected<'_>)] = &[
            ("valid on 1.34", good.clone(), CLUSTER, &[]),
            (
                "valid on 2.0",
                good.clone(),
                ClusterInfo {
                    kubernetes_minor: Some((2, 0)),
                },
                &[],
            ),
            (
                "unknown version skips the gate",
                good.clone(),
                ClusterInfo::default(),
                &[],
            ),
            (
                "1.33 is too old",
                good.clone(),
                ClusterInfo {
                    kubernetes_minor: Some((1, 33)),
                },
                &[(
                    "spec.dra",
                    "failed to validate DRA: spec.dra requires Kubernetes 1.34 or later; current cluster version is 1.33",
                )],
            ),
            (
                "missing driver name",
                dra_module(dra_json("", &[])),
                CLUSTER,
                &[(
                    "spec.dra.driverName",
                    "failed to validate DRA: spec.dra.driverName is required",
                )],
            ),
            (
                "driver name not a DNS subdomain",
                dra_module(dra_json("GPU_driver", &[])),
                CLUSTER,
                &[(
                    "spec.dra.driverName",
                    "failed to validate DRA: spec.dra.driverName \"GPU_driver\" is not a valid DNS subdomain: a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com')",
                )],
            ),
            (
                "device classes: empty, invalid, duplicate",
                dra_module(dra_json("gpu.example.com", &["a", "", "a..b", "a"])),
                CLUSTER,
                &[
                    (
                        "spec.dra.deviceClasses[1].name",
                        "failed to validate DRA: spec.dra.deviceClasses[1].name is required",
                    ),
                    (
                        "spec.dra.deviceClasses[2].name",
                        "failed to validate DRA: spec.dra.deviceClasses[2].name \"a..b\" is not a valid DNS subdomain: a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com')",
                    ),
                    (
                        "spec.dra.deviceClasses[3].name",
                        "failed to validate DRA: spec.dra.deviceClasses[3].name \"a\" is a duplicate",
                    ),
                ],
            ),
        ];
        for (name, module, cluster, expected) in cases {
            assert_eq!(
                errors_with(module, cluster),
                owned(expected),
                "case {name:?}"
            );
        }
        let long = "a".repeat(254);
        assert_eq!(
            dns1123_subdomain_problems(&long),
            vec!["must be no more than 253 characters".to_owned()]
        );
    }

    #[test]
    fn validate_host_path_volumes() {
        let allowed = [
            "/dev",
            "/dev/",
            "/sys/fs",
            "/var/lib/x",
            "/opt",
            "/run/../run/udev",
            "//dev//dri/.",
        ];
        let rejected = [
            "/etc",
            "/",
            "/devices",
            "/dev/../etc",
            "relative/dev",
            "",
            "/var/..",
        ];
        for path in allowed {
            let mut dp = loader_less_module(
                json!({"selector": {}, "devicePlugin": {"container": {"image": "dp:v1"}}}),
            );
            dp.spec.device_plugin.as_mut().unwrap().volumes = vec![host_path(path)];
            assert_eq!(errors(&dp), vec![], "device plugin {path:?}");
            let mut dra = dra_module(dra_json("gpu.example.com", &[]));
            dra.spec.dra.as_mut().unwrap().volumes = vec![host_path(path)];
            assert_eq!(errors(&dra), vec![], "DRA {path:?}");
        }
        for path in rejected {
            let mut dp = loader_less_module(
                json!({"selector": {}, "devicePlugin": {"container": {"image": "dp:v1"}}}),
            );
            dp.spec.device_plugin.as_mut().unwrap().volumes = vec![
                Volume {
                    name: "cm".to_owned(),
                    ..Volume::default()
                },
                host_path(path),
            ];
            assert_eq!(
                errors(&dp),
                vec![(
                    "spec.devicePlugin.volumes[1].hostPath.path".to_owned(),
                    format!(
                        "failed to validate device plugin volumes: spec.devicePlugin.volumes[1]: hostPath {} is not allowed; only /dev, /sys, /var, /opt and /run paths are permitted",
                        go_quote(path)
                    ),
                )],
                "device plugin {path:?}"
            );
            let mut dra = dra_module(dra_json("gpu.example.com", &[]));
            dra.spec.dra.as_mut().unwrap().volumes = vec![host_path(path)];
            assert_eq!(
                errors(&dra),
                vec![(
                    "spec.dra.volumes[0].hostPath.path".to_owned(),
                    format!(
                        "failed to validate DRA volumes: spec.dra.volumes[0]: hostPath {} is not allowed; only /dev, /sys, /var, /opt and /run paths are permitted",
                        go_quote(path)
                    ),
                )],
                "DRA {path:?}"
            );
        }
    }

    #[test]
    fn validate_clean_path_matches_go() {
        // Expected values are what Go's path.Clean returns.
        for (input, cleaned) in [
            ("", "."),
            ("/", "/"),
            ("//", "/"),
            ("/..", "/"),
            ("/../x", "/x"),
            ("a/../..", ".."),
            ("../../a", "../../a"),
            ("abc/./def/", "abc/def"),
            ("//dev//dri/.", "/dev/dri"),
            ("/dev/../etc", "/etc"),
            ("a/b/../../c", "c"),
            (".", "."),
        ] {
            assert_eq!(clean_path(input), cleaned, "clean({input:?})");
        }
    }

    #[test]
    fn validate_module_without_loader_stops_after_dra_and_device_plugin() {
        let module = loader_less_module(json!({"selector": {}}));
        assert_eq!(validate_module(&module, &CLUSTER), Ok(()));
    }

    #[test]
    fn validate_container() {
        assert_cases(&[
            (
                "both in-tree fields on the container",
                |m| {
                    container(m).in_tree_module_to_remove = "a".to_owned();
                    container(m).in_tree_modules_to_remove = vec!["b".to_owned()];
                },
                &[(
                    "spec.moduleLoader.container.inTreeModuleToRemove",
                    "failed to validate kernel mappings: only one of the Container's fields: InTreeModulesToRemove or InTreeModuleToRemove can be defined",
                )],
            ),
            (
                "only the in-tree list",
                |m| container(m).in_tree_modules_to_remove = vec!["b".to_owned()],
                &[],
            ),
            (
                "container image without tag or digest",
                |m| container(m).container_image = "quay.io/org/kmod".to_owned(),
                &[(
                    "spec.moduleLoader.container.containerImage",
                    "failed to validate kernel mappings: failed to validate image format: container image must explicitely set a tag or digest; got: quay.io/org/kmod",
                )],
            ),
            (
                "container image with digest",
                |m| container(m).container_image = "quay.io/org/kmod@sha256:0123".to_owned(),
                &[],
            ),
            // Go only looks for the characters: a registry port counts as a tag.
            (
                "registry port only",
                |m| container(m).container_image = "registry:5000/kmod".to_owned(),
                &[],
            ),
        ]);
    }

    #[test]
    fn validate_kernel_mappings() {
        const IMG: &str = "failed to validate kernel mappings: failed to validate image format: container image must explicitely set a tag or digest; got: kmod";
        assert_cases(&[
            (
                "literal only",
                |m| {
                    *mapping(m) = KernelMapping {
                        literal: "6.8.0".into(),
                        ..Default::default()
                    }
                },
                &[],
            ),
            (
                "regexp and literal",
                |m| mapping(m).literal = "6.8.0".to_owned(),
                &[(
                    "spec.moduleLoader.container.kernelMappings[0]",
                    "failed to validate kernel mappings: regexp and literal are mutually exclusive properties at kernelMappings[0]",
                )],
            ),
            (
                "neither regexp nor literal",
                |m| mapping(m).regexp = String::new(),
                &[(
                    "spec.moduleLoader.container.kernelMappings[0]",
                    "failed to validate kernel mappings: regexp or literal must be set at kernelMappings[0]",
                )],
            ),
            (
                "missing image",
                |m| container(m).container_image = String::new(),
                &[(
                    "spec.moduleLoader.container.kernelMappings[0].containerImage",
                    "failed to validate kernel mappings: missing spec.moduleLoader.container.kernelMappings[0].containerImage",
                )],
            ),
            (
                "mapping image only",
                |m| {
                    container(m).container_image = String::new();
                    mapping(m).container_image = "kmod:v1".to_owned();
                },
                &[],
            ),
            (
                "mapping image without tag",
                |m| mapping(m).container_image = "kmod".to_owned(),
                &[(
                    "spec.moduleLoader.container.kernelMappings[0].containerImage",
                    IMG,
                )],
            ),
            (
                "both in-tree fields on the mapping",
                |m| {
                    mapping(m).in_tree_module_to_remove = "a".to_owned();
                    mapping(m).in_tree_modules_to_remove = Some(vec![]);
                },
                &[(
                    "spec.moduleLoader.container.kernelMappings[0].inTreeModuleToRemove",
                    "failed to validate kernel mappings: only one of the KernelMapping fields: InTreeModulesToRemove or InTreeModuleToRemove can be defined",
                )],
            ),
            (
                "mapping list with container singular",
                |m| {
                    container(m).in_tree_module_to_remove = "a".to_owned();
                    mapping(m).in_tree_modules_to_remove = Some(vec![]);
                },
                &[(
                    "spec.moduleLoader.container.kernelMappings[0].inTreeModulesToRemove",
                    "failed to validate kernel mappings: only one type if field (InTreeModuleToRemove or InTreeModulesToRemove) can be defined in KenrelMapping or Container",
                )],
            ),
            (
                "mapping singular with container list",
                |m| {
                    container(m).in_tree_modules_to_remove = vec!["a".to_owned()];
                    mapping(m).in_tree_module_to_remove = "b".to_owned();
                },
                &[(
                    "spec.moduleLoader.container.kernelMappings[0].inTreeModuleToRemove",
                    "failed to validate kernel mappings: only one type if field (InTreeModuleToRemove or InTreeModulesToRemove) can be defined in KenrelMapping or Container",
                )],
            ),
            (
                "mapping list with container list",
                |m| {
                    container(m).in_tree_modules_to_remove = vec!["a".to_owned()];
                    mapping(m).in_tree_modules_to_remove = Some(vec!["b".to_owned()]);
                },
                &[],
            ),
            (
                "mapping singular with container singular",
                |m| {
                    container(m).in_tree_module_to_remove = "a".to_owned();
                    mapping(m).in_tree_module_to_remove = "b".to_owned();
                },
                &[],
            ),
        ]);
    }

    #[test]
    fn validate_kernel_mapping_regexp() {
        for (pattern, re2_note) in [
            ("(", false),
            ("a(?=b)", false),
            ("(a)\\1", false),
            ("\\Qa.b\\E", true),
        ] {
            let mut module = valid_module();
            container(&mut module).kernel_mappings.insert(
                0,
                KernelMapping {
                    literal: "6.8.0".into(),
                    ..Default::default()
                },
            );
            container(&mut module).kernel_mappings[1].regexp = pattern.to_owned();
            let rust_error = regex::Regex::new(pattern).unwrap_err().to_string();
            let mut expected = format!(
                "failed to validate kernel mappings: invalid regexp at index 1: {rust_error}"
            );
            if re2_note {
                expected.push_str("\nnote: kmm-rs compiles kernel-mapping regexps with the Rust regex crate, which unlike Go's RE2 does not support \\Q...\\E quoting or \\C");
            }
            assert_eq!(
                errors(&module),
                vec![(
                    "spec.moduleLoader.container.kernelMappings[1].regexp".to_owned(),
                    expected
                )],
                "pattern {pattern:?}"
            );
        }
        assert!(!uses_re2_only_escape("\\\\Q"));
    }

    #[test]
    fn validate_modprobe() {
        fn raw(load: &[&str], unload: &[&str]) -> Option<ModprobeArgs> {
            let own = |v: &[&str]| v.iter().map(|s| s.to_string()).collect();
            Some(ModprobeArgs {
                load: own(load),
                unload: own(unload),
            })
        }
        assert_cases(&[
            (
                "moduleName with rawArgs",
                |m| container(m).modprobe.raw_args = raw(&["-v"], &[]),
                &[(
                    "spec.moduleLoader.container.modprobe.rawArgs",
                    "failed to validate modprobe: rawArgs cannot be set when moduleName is set",
                )],
            ),
            (
                "moduleName with empty rawArgs",
                |m| container(m).modprobe.raw_args = raw(&[], &[]),
                &[],
            ),
            (
                "no moduleName, only load rawArgs",
                |m| {
                    container(m).modprobe.module_name = String::new();
                    container(m).modprobe.raw_args = raw(&["a"], &[]);
                },
                &[(
                    "spec.moduleLoader.container.modprobe.rawArgs",
                    "failed to validate modprobe: load and unload rawArgs must be set when moduleName is unset",
                )],
            ),
            (
                "no moduleName, both rawArgs",
                |m| {
                    container(m).modprobe.module_name = String::new();
                    container(m).modprobe.raw_args = raw(&["a"], &["b"]);
                },
                &[],
            ),
            (
                "loading order of one",
                |m| container(m).modprobe.modules_loading_order = vec!["kmm_ci_a".to_owned()],
                &[(
                    "spec.moduleLoader.container.modprobe.modulesLoadingOrder",
                    "failed to validate modprobe: if a loading order is defined, at least two values must be defined",
                )],
            ),
            (
                "loading order without moduleName",
                |m| {
                    container(m).modprobe.module_name = String::new();
                    container(m).modprobe.raw_args = raw(&["a"], &["b"]);
                    container(m).modprobe.modules_loading_order =
                        vec!["a".to_owned(), "b".to_owned()];
                },
                &[(
                    "spec.moduleLoader.container.modprobe.moduleName",
                    "failed to validate modprobe: if a loading order is defined, moduleName must be set",
                )],
            ),
            (
                "loading order not starting with moduleName",
                |m| {
                    container(m).modprobe.modules_loading_order =
                        vec!["b".to_owned(), "kmm_ci_a".to_owned()]
                },
                &[(
                    "spec.moduleLoader.container.modprobe.modulesLoadingOrder[0]",
                    "failed to validate modprobe: if a loading order is defined, the first element must be moduleName",
                )],
            ),
            (
                "loading order with a duplicate",
                |m| {
                    container(m).modprobe.modules_loading_order =
                        vec!["kmm_ci_a".to_owned(), "b\"c".to_owned(), "b\"c".to_owned()]
                },
                &[(
                    "spec.moduleLoader.container.modprobe.modulesLoadingOrder[2]",
                    "failed to validate modprobe: \"b\\\"c\": duplicate value in the loading order list",
                )],
            ),
            (
                "valid loading order",
                |m| {
                    container(m).modprobe.modules_loading_order =
                        vec!["kmm_ci_a".to_owned(), "b".to_owned()]
                },
                &[],
            ),
        ]);
    }

    #[test]
    fn validate_files_to_sign() {
        assert_cases(&[
            (
                "global sign under /opt",
                |m| container(m).sign = sign(&["/opt/lib/modules/x.ko"]),
                &[],
            ),
            (
                "global sign without files",
                |m| container(m).sign = sign(&[]),
                &[(
                    "spec.moduleLoader.container.sign.filesToSign",
                    "global Sign: filesToSign is required when Sign is set",
                )],
            ),
            (
                "global sign outside dirName",
                |m| container(m).sign = sign(&["/opt/a.ko", "/lib/x.ko", "/optx/y.ko"]),
                &[
                    (
                        "spec.moduleLoader.container.sign.filesToSign[1]",
                        "global Sign: filesToSign[\"/lib/x.ko\"] must be under dirName \"/opt\"",
                    ),
                    (
                        "spec.moduleLoader.container.sign.filesToSign[2]",
                        "global Sign: filesToSign[\"/optx/y.ko\"] must be under dirName \"/opt\"",
                    ),
                ],
            ),
            (
                "empty dirName means the /opt default",
                |m| {
                    container(m).modprobe.dir_name = String::new();
                    container(m).sign = sign(&["/opt/a.ko"]);
                },
                &[],
            ),
            (
                "custom dirName",
                |m| {
                    container(m).modprobe.dir_name = "/modules".to_owned();
                    mapping(m).sign = sign(&["/opt/a.ko"]);
                },
                &[(
                    "spec.moduleLoader.container.kernelMappings[0].sign.filesToSign[0]",
                    "kernelMappings[0].Sign: filesToSign[\"/opt/a.ko\"] must be under dirName \"/modules\"",
                )],
            ),
            (
                "mapping sign without files",
                |m| mapping(m).sign = sign(&[]),
                &[(
                    "spec.moduleLoader.container.kernelMappings[0].sign.filesToSign",
                    "kernelMappings[0].Sign: filesToSign is required when Sign is set",
                )],
            ),
        ]);
    }

    #[test]
    fn validate_update_version_transition() {
        const MSG: &str = "cannot update to or from an empty version; please delete the Module and create it again";
        let with_version = |v: &str| {
            let mut m = valid_module();
            container(&mut m).version = v.to_owned();
            m
        };
        let loader_less = loader_less_module(json!({"selector": {}}));
        let version_error = vec![(
            "spec.moduleLoader.container.version".to_owned(),
            MSG.to_owned(),
        )];
        let update_errors =
            |old: &Module, new: &Module| match validate_module_update(old, new, &CLUSTER) {
                Ok(()) => Vec::new(),
                Err(e) => e.0.into_iter().map(|e| (e.path, e.message)).collect(),
            };
        assert_eq!(
            update_errors(&with_version(""), &with_version("v1")),
            version_error
        );
        assert_eq!(
            update_errors(&with_version("v1"), &with_version("")),
            version_error
        );
        assert_eq!(
            update_errors(&with_version("v1"), &with_version("v2")),
            vec![]
        );
        assert_eq!(update_errors(&with_version(""), &with_version("")), vec![]);
        assert_eq!(update_errors(&loader_less, &with_version("v1")), vec![]);

        // The rule comes first and the new object is validated too.
        let mut bad_new = with_version("v1");
        container(&mut bad_new).container_image = "kmod".to_owned();
        let errors = validate_module_update(&with_version(""), &bad_new, &CLUSTER).unwrap_err();
        assert_eq!(errors.go_message(), MSG);
        assert_eq!(errors.0.len(), 2);
    }

    fn mcm(module_spec: serde_json::Value) -> ManagedClusterModule {
        serde_json::from_value(json!({
            "apiVersion": "hub.kmm.sigs.x-k8s.io/v1beta1",
            "kind": "ManagedClusterModule",
            "metadata": {"name": "a-very-long-managed-cluster-module-name-that-is-fine"},
            "spec": {"moduleSpec": module_spec, "spokeNamespace": "a-very-long-spoke-namespace", "selector": {}}
        }))
        .unwrap()
    }

    #[test]
    fn validate_managed_cluster_modules() {
        // No name-length rule and no DRA version gate on the hub.
        let dra = mcm(json!({"selector": {}, "dra": dra_json("gpu.example.com", &[])}));
        assert_eq!(validate_managed_cluster_module(&dra), Ok(()));

        let mut bad = mcm(serde_json::to_value(&valid_module().spec).unwrap());
        bad.spec
            .module_spec
            .module_loader
            .as_mut()
            .unwrap()
            .container
            .container_image = "kmod".to_owned();
        let errors = validate_managed_cluster_module(&bad).unwrap_err();
        assert_eq!(
            errors.0,
            vec![FieldError::new(
                "spec.moduleSpec.moduleLoader.container.containerImage",
                "failed to validate kernel mappings: failed to validate image format: container image must explicitely set a tag or digest; got: kmod",
            )]
        );

        let old = mcm(serde_json::to_value(&valid_module().spec).unwrap());
        let mut new = old.clone();
        new.spec
            .module_spec
            .module_loader
            .as_mut()
            .unwrap()
            .container
            .version = "v1".to_owned();
        let errors = validate_managed_cluster_module_update(&old, &new).unwrap_err();
        assert_eq!(errors.0.len(), 1);
        assert_eq!(
            errors.0[0].path,
            "spec.moduleSpec.moduleLoader.container.version"
        );
        assert_eq!(validate_managed_cluster_module_update(&old, &old), Ok(()));
    }

    #[test]
    fn validate_preflight_kernel_version() {
        let pv = |kernel: &str| {
            PreflightValidation::new(
                "pv",
                kmm_api::v1beta2::PreflightValidationSpec {
                    kernel_version: kernel.to_owned(),
                    push_built_image: false,
                },
            )
        };
        for (kernel, expected) in [
            ("", Some("kernelVersion cannot be empty")),
            ("5.14", Some("invalid kernelVersion 5.14")),
            ("6", Some("invalid kernelVersion 6")),
            ("5.14.0-284.el9.x86_64", None),
            ("a,b-c", None),
            ("..", None),
        ] {
            let got = validate_preflight(&pv(kernel));
            let want = expected.map(|m| vec![FieldError::new("spec.kernelVersion", m)]);
            assert_eq!(got.err().map(|e| e.0), want, "kernel {kernel:?}");
        }
    }

    #[test]
    fn validate_namespace_deletion_message() {
        assert_eq!(
            namespace_deletion_message(),
            "namespace contains one or more Module resources; delete those before deleting the namespace"
        );
        assert_eq!(
            wire::label::NAMESPACE_CONTAINS_MODULES,
            "kmm.node.k8s.io/contains-modules"
        );
    }

    #[test]
    fn validate_reports_every_problem_in_go_order() {
        let mut module = valid_module();
        module.metadata.name = Some("n".repeat(40));
        module.spec.tolerations = vec![tol("", "Equal", "", "Bad", None)];
        let c = container(&mut module);
        c.container_image = "kmod".to_owned();
        c.kernel_mappings.push(KernelMapping {
            regexp: "(".into(),
            literal: "x".into(),
            ..Default::default()
        });
        c.modprobe.modules_loading_order = vec!["other".to_owned()];
        c.sign = sign(&[]);

        let errors = validate_module(&module, &CLUSTER).unwrap_err();
        let paths: Vec<&str> = errors.0.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "metadata.name",
                "spec.tolerations[0].operator",
                "spec.tolerations[0].effect",
                "spec.moduleLoader.container.containerImage",
                "spec.moduleLoader.container.kernelMappings[1]",
                "spec.moduleLoader.container.kernelMappings[1].regexp",
                "spec.moduleLoader.container.modprobe.modulesLoadingOrder",
                "spec.moduleLoader.container.modprobe.modulesLoadingOrder[0]",
                "spec.moduleLoader.container.sign.filesToSign",
            ]
        );
        assert!(
            errors
                .go_message()
                .starts_with("module name and namespace have a combined length of 47")
        );

        let text = errors.to_string();
        let one_per_line: Vec<String> = errors.0.iter().map(ToString::to_string).collect();
        assert_eq!(text, one_per_line.join("\n"));
        assert!(text.starts_with("metadata.name: module name and namespace"));
        assert!(text.contains("\nspec.moduleLoader.container.sign.filesToSign: global Sign: filesToSign is required when Sign is set"));
        let _: &dyn std::error::Error = &errors;
    }

    #[test]
    fn validate_go_quote_matches_strconv_quote() {
        for (input, quoted) in [
            ("", r#""""#),
            ("plain /opt", r#""plain /opt""#),
            ("a\"b\\c", r#""a\"b\\c""#),
            ("\n\t\r\u{7}\u{8}\u{c}\u{b}", r#""\n\t\r\a\b\f\v""#),
            ("\u{1}\u{7f}", r#""\x01\x7f""#),
            ("é日本", "\"é日本\""),
            ("\u{a0}\u{200b}\u{feff}", r#""\u00a0\u200b\ufeff""#),
            ("\u{1F600}\u{F0000}", "\"\u{1F600}\\U000f0000\""),
        ] {
            assert_eq!(go_quote(input), quoted, "quote({input:?})");
        }
    }

    fn arbitrary_module(
        names: (String, String),
        mapping: (String, String, String),
        container_image: String,
        module_name: String,
        toleration: (String, String, String, String),
        files: Vec<String>,
    ) -> Module {
        let mut module = valid_module();
        module.metadata.name = Some(names.0);
        module.metadata.namespace = Some(names.1);
        module.spec.tolerations = vec![tol(
            &toleration.0,
            &toleration.1,
            &toleration.2,
            &toleration.3,
            Some(1),
        )];
        let c = container(&mut module);
        c.container_image = container_image;
        c.modprobe.module_name = module_name.clone();
        c.modprobe.modules_loading_order = vec![module_name.clone(), module_name];
        c.sign = Some(Sign {
            files_to_sign: files.clone(),
            ..Sign::default()
        });
        c.kernel_mappings[0] = KernelMapping {
            regexp: mapping.0,
            literal: mapping.1,
            container_image: mapping.2,
            sign: Some(Sign {
                files_to_sign: files,
                ..Sign::default()
            }),
            ..Default::default()
        };
        module
    }

    proptest! {
        #[test]
        fn validate_module_never_panics(
            names in ("\\PC{0,50}", "\\PC{0,20}"),
            mapping in ("[\\\\()\\[\\]{}?*+|^$.a-z0-9QC<=!-]{0,16}", ".{0,12}", ".{0,24}"),
            container_image in ".{0,24}",
            module_name in ".{0,12}",
            toleration in (".{0,70}", "(Equal|Exists|\\PC{0,8})", ".{0,70}", "(NoExecute|\\PC{0,10})"),
            files in proptest::collection::vec(".{0,16}", 0..3),
        ) {
            let module = arbitrary_module(names, mapping, container_image, module_name, toleration, files);
            if let Err(errors) = validate_module(&module, &CLUSTER) {
                prop_assert!(!errors.0.is_empty());
                prop_assert!(!errors.to_string().is_empty());
            }
            let _ = validate_managed_cluster_module(&ManagedClusterModule::new("m", kmm_api::hub::ManagedClusterModuleSpec {
                module_spec: module.spec.clone(),
                ..Default::default()
            }));
        }
    }
}
