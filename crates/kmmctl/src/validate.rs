//! `kmmctl validate`: offline checks of KMM manifests, with no cluster. Every validation error of
//! every Module with its field path (the operator's own rules, Go KMM's messages), and for each
//! kernel given, what the operator would do: the mapping that matches, the image, the build
//! arguments and the files to sign.

use std::collections::BTreeMap;

use kmm_api::{hub, v1beta1, v1beta2};
use kmm_core::mapping::{build_args_for_kernel, resolve};
use kmm_core::targeting::selector_matches;
use kmm_core::validate::{
    ClusterInfo, ValidationErrors, validate_managed_cluster_module, validate_module,
    validate_preflight,
};
use serde::Serialize;
use serde_json::Value;

/// What to check beyond the objects themselves.
#[derive(Debug, Clone, Default)]
pub struct ValidateOptions {
    /// Kernels to resolve every Module's mappings for.
    pub kernels: Vec<String>,
    /// Labels of a node, to check every Module's selector against.
    pub node_labels: Option<BTreeMap<String, String>>,
}

/// The report for one input (a file or stdin).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FileReport {
    /// The file name as given, or `<stdin>`.
    pub source: String,
    /// Set when the input could not be read or is not valid YAML.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// One entry per YAML document.
    pub documents: Vec<DocumentReport>,
}

/// Verdict on one document.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// A KMM object the operator accepts.
    Valid,
    /// A KMM object the operator (or its webhook) rejects.
    Invalid,
    /// Not a KMM kind; the operator does not look at it.
    Ignored,
}

/// One YAML document.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DocumentReport {
    /// Position in the file, from 0.
    pub index: usize,
    /// `apiVersion`, empty if missing.
    pub api_version: String,
    /// `kind`, empty if missing.
    pub kind: String,
    /// `namespace/name` (namespace `default` when absent) or `name`.
    pub name: String,
    /// The verdict.
    pub verdict: Verdict,
    /// Every problem, `path: message`.
    pub errors: Vec<FieldProblem>,
    /// Whether the Module selects a node with the given labels.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub selector: Option<SelectorCheck>,
    /// Per kernel given.
    pub kernels: Vec<KernelReport>,
}

/// One problem in a document.
#[derive(Debug, Clone, Serialize)]
pub struct FieldProblem {
    /// Field path (`spec.moduleLoader...`), or empty when the whole document is at fault.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

/// The selector against `--node-labels`.
#[derive(Debug, Clone, Serialize)]
pub struct SelectorCheck {
    /// The node would be selected.
    pub selected: bool,
    /// Selector pairs the node lacks.
    pub missing: Vec<String>,
}

/// What the operator would do for one kernel.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KernelReport {
    /// The kernel.
    pub kernel: String,
    /// `kernelMappings[i] (literal "...")`, when one matches.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mapping: Option<String>,
    /// The module image.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// ConfigMap holding the Dockerfile, when the image is built in the cluster.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dockerfile_config_map: Option<String>,
    /// Build arguments passed to the build, `NAME=value`.
    pub build_args: Vec<String>,
    /// Image signed in the cluster (the unsigned input), when signing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unsigned_image: Option<String>,
    /// Files to sign, substituted.
    pub files_to_sign: Vec<String>,
    /// In-tree modules removed before loading.
    pub in_tree_modules_to_remove: Vec<String>,
    /// Why nothing is resolved for this kernel.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl FileReport {
    /// Whether the input is free of errors (invalid YAML and invalid objects count).
    pub fn ok(&self) -> bool {
        self.error.is_none() && self.documents.iter().all(|d| d.verdict != Verdict::Invalid)
    }
}

/// Validates the YAML text of one input.
pub fn validate_text(source: &str, text: &str, options: &ValidateOptions) -> FileReport {
    let mut report = FileReport {
        source: source.to_owned(),
        error: None,
        documents: Vec::new(),
    };
    let docs: Vec<Value> = match serde_saphyr::from_multiple(text) {
        Ok(docs) => docs,
        Err(err) => {
            report.error = Some(format!("{source}: not valid YAML: {err}"));
            return report;
        }
    };
    report.documents = docs
        .iter()
        .enumerate()
        .filter(|(_, doc)| !doc.is_null())
        .map(|(index, doc)| validate_document(index, doc, options))
        .collect();
    report
}

fn problems(errors: ValidationErrors) -> Vec<FieldProblem> {
    errors
        .0
        .into_iter()
        .map(|e| FieldProblem {
            path: e.path,
            message: e.message,
        })
        .collect()
}

fn validate_document(index: usize, doc: &Value, options: &ValidateOptions) -> DocumentReport {
    let text = |key: &str| doc.get(key).and_then(Value::as_str).unwrap_or_default();
    let meta = |key: &str| {
        doc.get("metadata")
            .and_then(|m| m.get(key))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    let mut report = DocumentReport {
        index,
        api_version: text("apiVersion").to_owned(),
        kind: text("kind").to_owned(),
        name: meta("name"),
        verdict: Verdict::Valid,
        errors: Vec::new(),
        selector: None,
        kernels: Vec::new(),
    };
    let whole = |message: String| {
        vec![FieldProblem {
            path: String::new(),
            message,
        }]
    };
    let outcome: Result<(), Vec<FieldProblem>> =
        match (report.api_version.as_str(), report.kind.as_str()) {
            ("", _) | (_, "") => Err(whole(
                "not a complete object: apiVersion and kind are required".into(),
            )),
            ("kmm.sigs.x-k8s.io/v1beta1", "Module") => {
                match serde_json::from_value::<v1beta1::Module>(doc.clone()) {
                    Ok(mut module) => {
                        let namespace = module
                            .metadata
                            .namespace
                            .get_or_insert_with(|| "default".to_owned())
                            .clone();
                        report.name = format!("{namespace}/{}", report.name);
                        report.selector = options
                            .node_labels
                            .as_ref()
                            .map(|labels| check_selector(&module, labels));
                        report.kernels = options
                            .kernels
                            .iter()
                            .map(|kernel| resolve_kernel(&module, kernel))
                            .collect();
                        validate_module(&module, &ClusterInfo::default()).map_err(problems)
                    }
                    Err(err) => Err(whole(err.to_string())),
                }
            }
            ("hub.kmm.sigs.x-k8s.io/v1beta1", "ManagedClusterModule") => {
                match serde_json::from_value::<hub::ManagedClusterModule>(doc.clone()) {
                    Ok(mcm) => validate_managed_cluster_module(&mcm).map_err(problems),
                    Err(err) => Err(whole(err.to_string())),
                }
            }
            ("kmm.sigs.x-k8s.io/v1beta2", "PreflightValidation") => {
                match serde_json::from_value::<v1beta2::PreflightValidation>(doc.clone()) {
                    Ok(pv) => validate_preflight(&pv).map_err(problems),
                    Err(err) => Err(whole(err.to_string())),
                }
            }
            ("kmm.sigs.x-k8s.io/v1beta1", "PreflightValidation") => {
                parse_only::<v1beta1::PreflightValidation>(doc)
            }
            ("kmm.sigs.x-k8s.io/v1beta1", "NodeModulesConfig") => {
                parse_only::<v1beta1::NodeModulesConfig>(doc)
            }
            ("kmm.sigs.x-k8s.io/v1beta1", "ModuleImagesConfig") => {
                parse_only::<v1beta1::ModuleImagesConfig>(doc)
            }
            ("kmm.sigs.x-k8s.io/v1beta1", "ModuleBuildSignConfig") => {
                parse_only::<v1beta1::ModuleBuildSignConfig>(doc)
            }
            _ => {
                report.verdict = Verdict::Ignored;
                Ok(())
            }
        };
    if let Err(errors) = outcome {
        report.verdict = Verdict::Invalid;
        report.errors = errors;
    }
    report
}

fn parse_only<T: serde::de::DeserializeOwned>(doc: &Value) -> Result<(), Vec<FieldProblem>> {
    serde_json::from_value::<T>(doc.clone())
        .map(|_| ())
        .map_err(|err| {
            vec![FieldProblem {
                path: String::new(),
                message: err.to_string(),
            }]
        })
}

fn check_selector(module: &v1beta1::Module, labels: &BTreeMap<String, String>) -> SelectorCheck {
    SelectorCheck {
        selected: selector_matches(&module.spec.selector, labels),
        missing: module
            .spec
            .selector
            .iter()
            .filter(|(k, v)| labels.get(*k) != Some(*v))
            .map(|(k, v)| format!("{k}={v}"))
            .collect(),
    }
}

fn resolve_kernel(module: &v1beta1::Module, kernel: &str) -> KernelReport {
    let mut report = KernelReport {
        kernel: kernel.to_owned(),
        mapping: None,
        image: None,
        dockerfile_config_map: None,
        build_args: Vec::new(),
        unsigned_image: None,
        files_to_sign: Vec::new(),
        in_tree_modules_to_remove: Vec::new(),
        error: None,
    };
    let name = module.metadata.name.as_deref().unwrap_or_default();
    let namespace = module.metadata.namespace.as_deref().unwrap_or_default();
    let Some(loader) = &module.spec.module_loader else {
        report.error = Some("no moduleLoader: nothing to load".into());
        return report;
    };
    match resolve(&loader.container, name, namespace, kernel) {
        Ok(resolved) => {
            let mapping = &loader.container.kernel_mappings[resolved.index];
            let how = if !mapping.literal.is_empty() && mapping.literal == kernel {
                format!("literal {:?}", mapping.literal)
            } else {
                format!("regexp {:?}", mapping.regexp)
            };
            report.mapping = Some(format!("kernelMappings[{}] ({how})", resolved.index));
            if let Some(build) = &resolved.build {
                report.dockerfile_config_map = Some(build.dockerfile_config_map.name.clone());
                report.build_args = build_args_for_kernel(build, kernel, name, namespace)
                    .into_iter()
                    .map(|a| format!("{}={}", a.name, a.value))
                    .collect();
            }
            if let Some(sign) = &resolved.sign {
                report.unsigned_image = Some(if sign.unsigned_image.is_empty() {
                    resolved.container_image.clone()
                } else {
                    sign.unsigned_image.clone()
                });
                report.files_to_sign = sign.files_to_sign.clone();
            }
            report.in_tree_modules_to_remove = resolved.in_tree_modules_to_remove.clone();
            report.image = Some(resolved.container_image);
        }
        Err(err) => report.error = Some(err.to_string()),
    }
    report
}

/// Renders reports as text.
pub fn render_text(reports: &[FileReport]) -> String {
    let mut out = String::new();
    for report in reports {
        out.push_str(&format!("{}\n", report.source));
        if let Some(error) = &report.error {
            out.push_str(&format!("  ERROR {}\n", indent(error, 4)));
        }
        for doc in &report.documents {
            let what = match (doc.kind.as_str(), doc.name.as_str()) {
                ("", _) => format!("document {}", doc.index),
                (kind, "") => format!("{kind} (document {})", doc.index),
                (kind, name) => format!("{kind} {name}"),
            };
            let verdict = match doc.verdict {
                Verdict::Valid => "valid".to_owned(),
                Verdict::Invalid => format!("INVALID ({} error(s))", doc.errors.len()),
                Verdict::Ignored => "ignored (not a KMM kind)".to_owned(),
            };
            out.push_str(&format!("  {what}: {verdict}\n"));
            for error in &doc.errors {
                let message = indent(&error.message, 6);
                if error.path.is_empty() {
                    out.push_str(&format!("    - {message}\n"));
                } else {
                    out.push_str(&format!("    - {}: {message}\n", error.path));
                }
            }
            if let Some(selector) = &doc.selector {
                if selector.selected {
                    out.push_str("    node labels: selected\n");
                } else {
                    out.push_str(&format!(
                        "    node labels: not selected (missing {})\n",
                        selector.missing.join(", ")
                    ));
                }
            }
            for kernel in &doc.kernels {
                out.push_str(&format!("    kernel {}:\n", kernel.kernel));
                if let Some(error) = &kernel.error {
                    out.push_str(&format!("      nothing to load: {}\n", indent(error, 8)));
                    continue;
                }
                if let Some(mapping) = &kernel.mapping {
                    out.push_str(&format!("      mapping:        {mapping}\n"));
                }
                if let Some(image) = &kernel.image {
                    out.push_str(&format!("      image:          {image}\n"));
                }
                if let Some(config_map) = &kernel.dockerfile_config_map {
                    out.push_str(&format!(
                        "      build:          Dockerfile from ConfigMap {config_map}\n"
                    ));
                    for arg in &kernel.build_args {
                        out.push_str(&format!("        build arg     {arg}\n"));
                    }
                }
                if let Some(unsigned) = &kernel.unsigned_image {
                    out.push_str(&format!("      sign:           {unsigned}\n"));
                    for file in &kernel.files_to_sign {
                        out.push_str(&format!("        file to sign  {file}\n"));
                    }
                }
                if !kernel.in_tree_modules_to_remove.is_empty() {
                    out.push_str(&format!(
                        "      remove in-tree: {}\n",
                        kernel.in_tree_modules_to_remove.join(", ")
                    ));
                }
            }
        }
    }
    out
}

/// Indents every line after the first of a multi-line message (regex and YAML errors).
fn indent(text: &str, width: usize) -> String {
    let pad = format!("\n{}", " ".repeat(width));
    text.trim_end().replace('\n', &pad)
}

/// Parses `k=v,k2=v2` (also `k=` for an empty value).
pub fn parse_labels(text: &str) -> Result<BTreeMap<String, String>, String> {
    text.split(',')
        .filter(|pair| !pair.trim().is_empty())
        .map(|pair| {
            pair.split_once('=')
                .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
                .filter(|(k, _)| !k.is_empty())
                .ok_or_else(|| format!("{pair:?} is not key=value"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_parse_and_reject_pairs_without_equals() {
        let labels = parse_labels("a=1, b=").unwrap();
        assert_eq!(labels["a"], "1");
        assert_eq!(labels["b"], "");
        assert!(parse_labels("a").is_err());
    }

    #[test]
    fn every_error_of_a_module_is_reported_with_its_path() {
        let text = r#"
apiVersion: kmm.sigs.x-k8s.io/v1beta1
kind: Module
metadata: {name: m}
spec:
  selector: {}
  moduleLoader:
    container:
      modprobe: {moduleName: ""}
      kernelMappings:
        - regexp: "("
          containerImage: r/m:1
"#;
        let report = validate_text("m.yaml", text, &ValidateOptions::default());
        let doc = &report.documents[0];
        assert_eq!(doc.verdict, Verdict::Invalid);
        assert!(doc.errors.len() >= 2, "{:?}", doc.errors);
        assert!(
            doc.errors
                .iter()
                .any(|e| e.path.contains("kernelMappings[0].regexp")),
            "{:?}",
            doc.errors
        );
        assert!(!report.ok());
    }

    #[test]
    fn kernels_resolve_to_image_build_args_and_files_to_sign() {
        let text = r#"
apiVersion: kmm.sigs.x-k8s.io/v1beta1
kind: Module
metadata: {name: m, namespace: labs}
spec:
  selector: {role: gpu}
  moduleLoader:
    container:
      modprobe: {moduleName: m}
      kernelMappings:
        - regexp: '^6\.'
          containerImage: r/m:${KERNEL_FULL_VERSION}
          build:
            dockerfileConfigMap: {name: dockerfile}
          sign:
            keySecret: {name: key}
            certSecret: {name: cert}
            filesToSign: ["/opt/lib/modules/${KERNEL_FULL_VERSION}/m.ko"]
"#;
        let options = ValidateOptions {
            kernels: vec!["6.1.0-56-amd64".into(), "5.14.0".into()],
            node_labels: Some(parse_labels("role=cpu").unwrap()),
        };
        let report = validate_text("m.yaml", text, &options);
        assert!(report.ok(), "{report:?}");
        let doc = &report.documents[0];
        let k = &doc.kernels[0];
        assert_eq!(k.image.as_deref(), Some("r/m:6.1.0-56-amd64"));
        assert!(k.build_args.contains(&"MOD_NAMESPACE=labs".to_owned()));
        assert_eq!(k.files_to_sign, ["/opt/lib/modules/6.1.0-56-amd64/m.ko"]);
        assert!(
            doc.kernels[1]
                .error
                .as_deref()
                .unwrap_or_default()
                .contains("5.14.0")
        );
        let selector = doc.selector.as_ref().unwrap();
        assert!(!selector.selected);
        assert_eq!(selector.missing, ["role=gpu"]);
    }
}
