//! What the worker does for a load or an unload, computed from its config file and flags alone:
//! the Go KMM worker's `modprobe` command lines byte for byte, the in-tree modules to remove,
//! the firmware to copy or delete and the modules that must be present afterwards. No I/O here.

use std::path::{Path, PathBuf};

use kmm_api::v1beta1::{ModprobeSpec, ModuleConfig};
use serde::Deserialize;
use serde::de::IgnoredAny;

/// Directory the worker pod's init container copies the module image's files into.
pub const SHARED_FILES_DIR: &str = "/tmp";

/// A config file the worker refuses, with a message that names the offending key or value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

/// Reads a worker config file (YAML of `ModuleConfig`). Unknown keys are rejected at every
/// level, as the Go worker's strict decoding does.
pub fn parse_config(text: &str) -> Result<ModuleConfig, ConfigError> {
    // kmm-api rejects unknown keys only at the top level of ModuleConfig; the nested
    // `modprobe`, `args` and `rawArgs` maps are checked against the shapes below first.
    serde_saphyr::from_str::<ConfigKeys>(text).map_err(decode_error)?;
    serde_saphyr::from_str(text).map_err(decode_error)
}

/// The first line of a decoding error: where and what. (The parser goes on with a snippet of
/// the input, which does not belong in a one-line termination message.)
fn decode_error(err: serde_saphyr::Error) -> ConfigError {
    let text = err.to_string();
    let first = text.lines().next().unwrap_or_default();
    ConfigError(
        first
            .strip_prefix("error: ")
            .unwrap_or(first)
            .trim()
            .to_owned(),
    )
}

/// The keys of `ModuleConfig`, for the strict check only (values are checked by the real type).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[allow(dead_code)] // only the key names matter
struct ConfigKeys {
    kernel_version: Option<IgnoredAny>,
    container_image: Option<IgnoredAny>,
    image_pull_policy: Option<IgnoredAny>,
    insecure_pull: Option<IgnoredAny>,
    in_tree_modules_to_remove: Option<IgnoredAny>,
    in_tree_module_to_remove: Option<IgnoredAny>,
    modprobe: Option<ModprobeKeys>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[allow(dead_code)]
struct ModprobeKeys {
    module_name: Option<IgnoredAny>,
    parameters: Option<IgnoredAny>,
    dir_name: Option<IgnoredAny>,
    args: Option<ArgsKeys>,
    raw_args: Option<ArgsKeys>,
    firmware_path: Option<IgnoredAny>,
    modules_loading_order: Option<IgnoredAny>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct ArgsKeys {
    load: Option<IgnoredAny>,
    unload: Option<IgnoredAny>,
}

/// Copy of the image's firmware directory to the node's firmware directory (or, on unload,
/// removal of the same relative paths from the node).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirmwareTransfer {
    /// Firmware files as the init container extracted them: `/tmp<firmwarePath>`.
    pub from_image: PathBuf,
    /// The node's firmware directory (`--firmware-path`).
    pub to_host: PathBuf,
}

/// Everything a load does, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadPlan {
    /// Value for `/sys/module/firmware_class/parameters/path` (step 1).
    pub firmware_class_path: Option<PathBuf>,
    /// In-tree modules to remove first, if the running kernel has them (step 2).
    pub in_tree_candidates: Vec<String>,
    /// Firmware to copy before loading (step 3).
    pub firmware: Option<FirmwareTransfer>,
    /// `modprobe` arguments that load the module (step 4).
    pub modprobe_args: Vec<String>,
    /// Names that must appear under `/sys/module` once modprobe succeeded.
    pub expect_loaded: Vec<String>,
}

/// Everything an unload does, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnloadPlan {
    /// `modprobe` arguments that unload the module and its soft dependencies.
    pub modprobe_args: Vec<String>,
    /// Firmware files to delete from the node afterwards.
    pub firmware: Option<FirmwareTransfer>,
}

/// Plans a load. `firmware_host_dir` is the `--firmware-path` flag.
pub fn plan_load(
    config: &ModuleConfig,
    firmware_host_dir: Option<&Path>,
) -> Result<LoadPlan, ConfigError> {
    validate(&config.modprobe, Action::Load)?;
    let firmware = firmware_transfer(&config.modprobe, firmware_host_dir);
    if !config.modprobe.firmware_path.is_empty() && firmware.is_none() {
        return Err(ConfigError(format!(
            "modprobe.firmwarePath is {:?} but --firmware-path was not given: there is nowhere to copy the firmware to",
            config.modprobe.firmware_path
        )));
    }
    let expect_loaded = if config.modprobe.raw_args.is_some() {
        // rawArgs may load anything; nothing to check by name.
        Vec::new()
    } else {
        let mut names = vec![sysfs_name(&config.modprobe.module_name)];
        for name in &config.modprobe.modules_loading_order {
            let name = sysfs_name(name);
            if !names.contains(&name) {
                names.push(name);
            }
        }
        names
    };
    Ok(LoadPlan {
        firmware_class_path: firmware_host_dir.map(Path::to_path_buf),
        in_tree_candidates: in_tree_candidates(config),
        firmware,
        modprobe_args: load_args(&config.modprobe),
        expect_loaded,
    })
}

/// Plans an unload. `firmware_host_dir` is the `--firmware-path` flag.
pub fn plan_unload(
    config: &ModuleConfig,
    firmware_host_dir: Option<&Path>,
) -> Result<UnloadPlan, ConfigError> {
    validate(&config.modprobe, Action::Unload)?;
    Ok(UnloadPlan {
        modprobe_args: unload_args(&config.modprobe),
        firmware: firmware_transfer(&config.modprobe, firmware_host_dir),
    })
}

#[derive(Clone, Copy)]
enum Action {
    Load,
    Unload,
}

/// Rejects configs whose modprobe command line would be meaningless.
fn validate(modprobe: &ModprobeSpec, action: Action) -> Result<(), ConfigError> {
    if let Some(raw) = &modprobe.raw_args {
        let (args, key) = match action {
            Action::Load => (&raw.load, "modprobe.rawArgs.load"),
            Action::Unload => (&raw.unload, "modprobe.rawArgs.unload"),
        };
        if args.is_empty() {
            return Err(ConfigError(format!(
                "{key} is empty: with rawArgs set it is the whole modprobe command line"
            )));
        }
        return Ok(());
    }
    if modprobe.module_name.is_empty() {
        return Err(ConfigError(
            "modprobe.moduleName is empty and modprobe.rawArgs is not set".to_owned(),
        ));
    }
    if let Some(first) = modprobe.modules_loading_order.first()
        && first != &modprobe.module_name
    {
        return Err(ConfigError(format!(
            "modprobe.modulesLoadingOrder starts with {first:?}, but its first entry must be moduleName {:?}",
            modprobe.module_name
        )));
    }
    Ok(())
}

fn firmware_transfer(
    modprobe: &ModprobeSpec,
    firmware_host_dir: Option<&Path>,
) -> Option<FirmwareTransfer> {
    if modprobe.firmware_path.is_empty() {
        return None;
    }
    Some(FirmwareTransfer {
        from_image: PathBuf::from(format!("{SHARED_FILES_DIR}{}", modprobe.firmware_path)),
        to_host: firmware_host_dir?.to_path_buf(),
    })
}

/// `modprobe` arguments (without the program name) that load the module.
pub fn load_args(modprobe: &ModprobeSpec) -> Vec<String> {
    if let Some(raw) = &modprobe.raw_args {
        return raw.load.clone();
    }
    let mut args = vec![
        "-vd".to_owned(),
        format!("{SHARED_FILES_DIR}{}", modprobe.dir_name),
    ];
    if let Some(extra) = &modprobe.args {
        args.extend(extra.load.iter().cloned());
    }
    args.push(modprobe.module_name.clone());
    args.extend(modprobe.parameters.iter().cloned());
    args
}

/// `modprobe` arguments (without the program name) that unload the module and its soft
/// dependencies.
pub fn unload_args(modprobe: &ModprobeSpec) -> Vec<String> {
    if let Some(raw) = &modprobe.raw_args {
        return raw.unload.clone();
    }
    let mut args = vec![
        "-rvd".to_owned(),
        format!("{SHARED_FILES_DIR}{}", modprobe.dir_name),
    ];
    if let Some(extra) = &modprobe.args {
        args.extend(extra.unload.iter().cloned());
    }
    if modprobe.modules_loading_order.is_empty() {
        args.push(modprobe.module_name.clone());
    } else {
        args.extend(modprobe.modules_loading_order.iter().cloned());
    }
    args
}

/// In-tree modules to remove before loading: the list, or the deprecated single name when the
/// list is empty.
pub fn in_tree_candidates(config: &ModuleConfig) -> Vec<String> {
    if !config.in_tree_modules_to_remove.is_empty() {
        config.in_tree_modules_to_remove.clone()
    } else if !config.in_tree_module_to_remove.is_empty() {
        vec![config.in_tree_module_to_remove.clone()]
    } else {
        Vec::new()
    }
}

/// The candidates for which a module file exists among `file_names` (the files under the
/// node's `/lib/modules/<kernel>`), in the candidates' order and without repeats.
///
/// A file matches `<name>.ko`, optionally compressed (`.xz`, `.zst`, `.gz`), with `-` and `_`
/// treated alike as modprobe does. (The Go worker's unanchored regexp `^<name>.ko` also
/// matched unrelated files such as `<name>.kobject`; that quirk is not kept.)
pub fn present_in_tree<'a>(
    candidates: &[String],
    file_names: impl IntoIterator<Item = &'a str>,
) -> Vec<String> {
    let found: std::collections::HashSet<String> = file_names
        .into_iter()
        .filter_map(module_name_of_file)
        .collect();
    let mut present: Vec<String> = Vec::new();
    for candidate in candidates {
        if found.contains(&sysfs_name(candidate)) && !present.contains(candidate) {
            present.push(candidate.clone());
        }
    }
    present
}

/// The module name (as `/sys/module` spells it) of a module file name, if it is one.
fn module_name_of_file(file_name: &str) -> Option<String> {
    [".ko", ".ko.xz", ".ko.zst", ".ko.gz"]
        .iter()
        .find_map(|suffix| file_name.strip_suffix(suffix))
        .filter(|stem| !stem.is_empty())
        .map(sysfs_name)
}

/// `modprobe` arguments that remove the given in-tree modules (the Go worker's `-rv`).
pub fn in_tree_removal_args(present: &[String]) -> Vec<String> {
    let mut args = vec!["-rv".to_owned()];
    args.extend(present.iter().cloned());
    args
}

/// A module name as the kernel spells it in `/sys/module` and `/proc/modules`.
pub fn sysfs_name(module: &str) -> String {
    module.replace('-', "_")
}

#[cfg(test)]
mod tests {
    use super::*;
    use kmm_api::v1beta1::ModprobeArgs;

    fn config(yaml: &str) -> ModuleConfig {
        parse_config(yaml).unwrap()
    }

    const BASE: &str =
        "kernelVersion: 6.1.0-56-amd64\ncontainerImage: r/kmod:6.1\ninsecurePull: false\n";

    #[test]
    fn every_config_field_is_decoded() {
        let c = config(
            "kernelVersion: 6.1.0-56-amd64
containerImage: quay.io/x/kmod:6.1
imagePullPolicy: Always
insecurePull: true
inTreeModulesToRemove: [dummy, ifb]
inTreeModuleToRemove: old
modprobe:
  moduleName: kmm_ci_a
  parameters: [level=7, greeting=hi]
  dirName: /mods
  args: {load: [--first-time], unload: [--quiet]}
  firmwarePath: /firmware
  modulesLoadingOrder: [kmm_ci_a, kmm_ci_b]
",
        );
        assert_eq!(c.kernel_version, "6.1.0-56-amd64");
        assert_eq!(c.container_image, "quay.io/x/kmod:6.1");
        assert_eq!(c.image_pull_policy, "Always");
        assert!(c.insecure_pull);
        assert_eq!(c.in_tree_modules_to_remove, ["dummy", "ifb"]);
        assert_eq!(c.in_tree_module_to_remove, "old");
        let m = &c.modprobe;
        assert_eq!(m.module_name, "kmm_ci_a");
        assert_eq!(m.parameters, ["level=7", "greeting=hi"]);
        assert_eq!(m.dir_name, "/mods");
        assert_eq!(
            m.args,
            Some(ModprobeArgs {
                load: vec!["--first-time".into()],
                unload: vec!["--quiet".into()]
            })
        );
        assert_eq!(m.raw_args, None);
        assert_eq!(m.firmware_path, "/firmware");
        assert_eq!(m.modules_loading_order, ["kmm_ci_a", "kmm_ci_b"]);
    }

    #[test]
    fn defaults_and_nulls() {
        let c = config(&format!("{BASE}modprobe: {{moduleName: m}}\n"));
        assert_eq!(c.image_pull_policy, "IfNotPresent");
        assert_eq!(c.modprobe.dir_name, "/opt");
        assert!(c.in_tree_modules_to_remove.is_empty());
        assert!(c.modprobe.args.is_none());

        let c = config(&format!(
            "{BASE}inTreeModulesToRemove: null\nmodprobe: {{moduleName: m, dirName: '', parameters: null, args: null}}\n"
        ));
        assert_eq!(c.modprobe.dir_name, "/opt");
        assert!(c.modprobe.parameters.is_empty());
        assert!(c.modprobe.args.is_none());
    }

    #[test]
    fn load_and_unload_command_lines_match_the_go_worker() {
        let c = config(&format!(
            "{BASE}modprobe:\n  moduleName: kmm_ci_a\n  parameters: [debug=1]\n  args: {{load: [--first-time], unload: [--quiet]}}\n"
        ));
        assert_eq!(
            load_args(&c.modprobe),
            ["-vd", "/tmp/opt", "--first-time", "kmm_ci_a", "debug=1"]
        );
        assert_eq!(
            unload_args(&c.modprobe),
            ["-rvd", "/tmp/opt", "--quiet", "kmm_ci_a"]
        );
    }

    #[test]
    fn unload_follows_the_loading_order_and_raw_args_replace_everything() {
        let c = config(&format!(
            "{BASE}modprobe:\n  moduleName: a\n  dirName: /mods\n  modulesLoadingOrder: [a, b, c]\n"
        ));
        assert_eq!(load_args(&c.modprobe), ["-vd", "/tmp/mods", "a"]);
        assert_eq!(
            unload_args(&c.modprobe),
            ["-rvd", "/tmp/mods", "a", "b", "c"]
        );

        let raw = config(&format!(
            "{BASE}modprobe:\n  moduleName: ignored\n  parameters: [x=1]\n  rawArgs: {{load: [-v, x], unload: [-rv, x]}}\n"
        ));
        assert_eq!(load_args(&raw.modprobe), ["-v", "x"]);
        assert_eq!(unload_args(&raw.modprobe), ["-rv", "x"]);
    }

    #[test]
    fn unknown_keys_are_rejected_at_every_level() {
        for (yaml, key) in [
            (
                format!("{BASE}modprobe: {{moduleName: m}}\nsurprise: 1\n"),
                "surprise",
            ),
            (
                format!("{BASE}modprobe: {{moduleName: m, modulename: x}}\n"),
                "modulename",
            ),
            (
                format!("{BASE}modprobe: {{moduleName: m, args: {{load: [a], remove: [b]}}}}\n"),
                "remove",
            ),
            (
                format!("{BASE}modprobe: {{moduleName: m, rawArgs: {{lod: [a]}}}}\n"),
                "lod",
            ),
        ] {
            let err = parse_config(&yaml).unwrap_err();
            assert!(
                err.0.contains(&format!("unknown field `{key}`")),
                "{key}: {err}"
            );
            assert!(!err.0.contains('\n'), "{err}");
        }
    }

    #[test]
    fn malformed_and_incomplete_configs_are_rejected() {
        assert!(parse_config("kernelVersion: [\n").is_err());
        let err = parse_config("containerImage: x\nmodprobe: {moduleName: m}\n").unwrap_err();
        assert!(err.0.contains("kernelVersion"), "{err}");
        assert!(parse_config(&format!("{BASE}modprobe: {{parameters: 3}}\n")).is_err());
    }

    #[test]
    fn load_plan_has_every_step() {
        let c = config(&format!(
            "{BASE}inTreeModulesToRemove: [dummy]\nmodprobe:\n  moduleName: kmm-ci-a\n  firmwarePath: /firmware\n  modulesLoadingOrder: [kmm-ci-a, kmm_ci_b]\n"
        ));
        let plan = plan_load(&c, Some(Path::new("/var/lib/firmware"))).unwrap();
        assert_eq!(
            plan,
            LoadPlan {
                firmware_class_path: Some("/var/lib/firmware".into()),
                in_tree_candidates: vec!["dummy".into()],
                firmware: Some(FirmwareTransfer {
                    from_image: "/tmp/firmware".into(),
                    to_host: "/var/lib/firmware".into(),
                }),
                modprobe_args: vec!["-vd".into(), "/tmp/opt".into(), "kmm-ci-a".into()],
                expect_loaded: vec!["kmm_ci_a".into(), "kmm_ci_b".into()],
            }
        );
        let unload = plan_unload(&c, Some(Path::new("/var/lib/firmware"))).unwrap();
        assert_eq!(unload.firmware, plan.firmware);
        assert_eq!(
            unload.modprobe_args,
            ["-rvd", "/tmp/opt", "kmm-ci-a", "kmm_ci_b"]
        );
    }

    #[test]
    fn firmware_class_path_is_set_even_without_firmware_in_the_image() {
        let c = config(&format!("{BASE}modprobe: {{moduleName: m}}\n"));
        let plan = plan_load(&c, Some(Path::new("/fw"))).unwrap();
        assert_eq!(plan.firmware_class_path, Some("/fw".into()));
        assert_eq!(plan.firmware, None);
        assert_eq!(plan_load(&c, None).unwrap().firmware_class_path, None);
    }

    #[test]
    fn raw_args_plans_check_no_module_name() {
        let c = config(&format!(
            "{BASE}modprobe: {{rawArgs: {{load: [-v, x], unload: [-rv, x]}}}}\n"
        ));
        let plan = plan_load(&c, None).unwrap();
        assert!(plan.expect_loaded.is_empty());
        assert_eq!(plan_unload(&c, None).unwrap().modprobe_args, ["-rv", "x"]);
    }

    #[test]
    fn configs_that_cannot_work_are_refused() {
        let cases = [
            ("modprobe: {moduleName: ''}\n", "moduleName is empty"),
            (
                "modprobe: {moduleName: a, modulesLoadingOrder: [b, a]}\n",
                "first entry must be moduleName",
            ),
            (
                "modprobe: {moduleName: a, firmwarePath: /fw}\n",
                "--firmware-path was not given",
            ),
            (
                "modprobe: {rawArgs: {unload: [-r, x]}}\n",
                "rawArgs.load is empty",
            ),
        ];
        for (tail, expected) in cases {
            let c = config(&format!("{BASE}{tail}"));
            let err = plan_load(&c, None).unwrap_err();
            assert!(err.0.contains(expected), "{tail}: {err}");
        }
        let c = config(&format!("{BASE}modprobe: {{rawArgs: {{load: [x]}}}}\n"));
        assert!(
            plan_unload(&c, None)
                .unwrap_err()
                .0
                .contains("rawArgs.unload")
        );
        // Unload without --firmware-path only skips the clean-up.
        let c = config(&format!(
            "{BASE}modprobe: {{moduleName: a, firmwarePath: /fw}}\n"
        ));
        assert_eq!(plan_unload(&c, None).unwrap().firmware, None);
    }

    #[test]
    fn in_tree_list_wins_over_the_deprecated_single_name() {
        let both = config(&format!(
            "{BASE}inTreeModulesToRemove: [a, b]\ninTreeModuleToRemove: c\nmodprobe: {{moduleName: m}}\n"
        ));
        assert_eq!(in_tree_candidates(&both), ["a", "b"]);
        let single = config(&format!(
            "{BASE}inTreeModuleToRemove: c\nmodprobe: {{moduleName: m}}\n"
        ));
        assert_eq!(in_tree_candidates(&single), ["c"]);
        let none = config(&format!("{BASE}modprobe: {{moduleName: m}}\n"));
        assert!(in_tree_candidates(&none).is_empty());
    }

    #[test]
    fn only_in_tree_modules_present_on_the_node_are_removed() {
        let files = [
            "dummy.ko.xz",
            "ifb.ko.zst",
            "e1000e.ko",
            "nvme-core.ko.gz",
            "modules.dep",
            "bonding.kobject",
            ".ko",
        ];
        let candidates: Vec<String> = [
            "ifb",
            "dummy",
            "absent",
            "nvme_core",
            "bonding",
            "dummy",
            "e1000",
        ]
        .map(String::from)
        .to_vec();
        let present = present_in_tree(&candidates, files);
        assert_eq!(present, ["ifb", "dummy", "nvme_core"]);
        assert_eq!(
            in_tree_removal_args(&present),
            ["-rv", "ifb", "dummy", "nvme_core"]
        );
    }
}
