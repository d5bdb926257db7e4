//! What the worker runs for a load or an unload, computed from its config file alone: the
//! `modprobe` command lines of the Go KMM worker, byte for byte.

use kmm_api::v1beta1::{ModprobeSpec, ModuleConfig};

/// Directory the worker pod's init container copies the module image's files into.
pub const SHARED_FILES_DIR: &str = "/tmp";

/// Reads a worker config file (YAML of `ModuleConfig`); unknown keys are rejected.
pub fn parse_config(text: &str) -> Result<ModuleConfig, serde_saphyr::Error> {
    serde_saphyr::from_str(text)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn config(yaml: &str) -> ModuleConfig {
        parse_config(yaml).unwrap()
    }

    const BASE: &str =
        "kernelVersion: 6.1.0-56-amd64\ncontainerImage: r/kmod:6.1\ninsecurePull: false\n";

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
        assert_eq!(
            unload_args(&c.modprobe),
            ["-rvd", "/tmp/mods", "a", "b", "c"]
        );

        let raw = config(&format!(
            "{BASE}modprobe:\n  rawArgs: {{load: [-v, x], unload: [-rv, x]}}\n"
        ));
        assert_eq!(load_args(&raw.modprobe), ["-v", "x"]);
        assert_eq!(unload_args(&raw.modprobe), ["-rv", "x"]);
    }

    #[test]
    fn unknown_config_keys_are_rejected() {
        let err =
            parse_config(&format!("{BASE}modprobe: {{moduleName: m}}\nsurprise: 1\n")).unwrap_err();
        assert!(err.to_string().contains("surprise"), "{err}");
    }
}
