//! `kmm-worker`: runs in a worker pod on a node and loads or unloads one kernel module with
//! kmod's `modprobe`, with the same command line and config file as the Go KMM worker. When a
//! step fails it writes `<Reason>: <message>` to the termination-message file and exits non-zero.

mod host;
mod plan;
mod reason;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::plan::{LoadPlan, UnloadPlan};
use crate::reason::{Failure, Reason};

/// Loads and unloads kernel modules for Kernel Module Management.
#[derive(Parser, Debug)]
#[command(name = "kmm-worker", version, about)]
struct Cli {
    /// Where the failure reason and message are written for Kubernetes to pick up.
    #[arg(
        long,
        global = true,
        env = "KMM_WORKER_TERMINATION_LOG",
        default_value = "/dev/termination-log",
        value_name = "FILE"
    )]
    termination_log: PathBuf,
    #[command(subcommand)]
    command: Top,
}

#[derive(Subcommand, Debug)]
enum Top {
    /// Kernel module operations.
    #[command(subcommand)]
    Kmod(Kmod),
}

#[derive(Subcommand, Debug)]
enum Kmod {
    /// Load the module described by a config file.
    Load(Args),
    /// Unload the module described by a config file.
    Unload(Args),
}

#[derive(clap::Args, Debug)]
struct Args {
    /// The worker config file (YAML of a ModuleConfig).
    config: PathBuf,
    /// Host directory for firmware files; also set as the kernel's firmware search path.
    #[arg(long, value_name = "DIR")]
    firmware_path: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let Top::Kmod(action) = cli.command;
    let result = match &action {
        Kmod::Load(args) => read_config(&args.config)
            .and_then(|config| {
                plan::plan_load(&config, args.firmware_path.as_deref()).map_err(invalid_config)
            })
            .and_then(|plan| load(&plan)),
        Kmod::Unload(args) => read_config(&args.config)
            .and_then(|config| {
                plan::plan_unload(&config, args.firmware_path.as_deref()).map_err(invalid_config)
            })
            .and_then(|plan| unload(&plan)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            host::log(&format!("fatal error: {failure}"));
            host::write_termination_message(&cli.termination_log, &failure.termination_message());
            ExitCode::FAILURE
        }
    }
}

fn invalid_config(err: plan::ConfigError) -> Failure {
    Failure::new(Reason::InvalidConfig, err.0)
}

fn read_config(path: &Path) -> Result<kmm_api::v1beta1::ModuleConfig, Failure> {
    let text = std::fs::read_to_string(path).map_err(|err| {
        Failure::new(
            Reason::InvalidConfig,
            format!("reading {}: {err}", path.display()),
        )
    })?;
    plan::parse_config(&text).map_err(|err| {
        Failure::new(
            Reason::InvalidConfig,
            format!("decoding {}: {err}", path.display()),
        )
    })
}

/// The Go worker's load sequence, then a check that the kernel has the module.
fn load(plan: &LoadPlan) -> Result<(), Failure> {
    if let Some(dir) = &plan.firmware_class_path {
        host::set_firmware_class_path(dir)
            .map_err(|err| Failure::new(Reason::FirmwareSetupFailed, err.to_string()))?;
    }
    if !plan.in_tree_candidates.is_empty() {
        let modules_dir = host::running_kernel_modules_dir();
        let files = host::file_names_under(&modules_dir);
        let present =
            plan::present_in_tree(&plan.in_tree_candidates, files.iter().map(String::as_str));
        host::log(&format!(
            "in-tree modules to remove: {:?}, found in {}: {present:?}",
            plan.in_tree_candidates,
            modules_dir.display()
        ));
        if !present.is_empty() {
            modprobe(&plan::in_tree_removal_args(&present))?;
        }
    }
    if let Some(firmware) = &plan.firmware {
        if !firmware.from_image.is_dir() {
            return Err(Failure::new(
                Reason::FirmwareSetupFailed,
                format!(
                    "firmware directory {} is not in the module image",
                    firmware.from_image.display()
                ),
            ));
        }
        host::copy_firmware(&firmware.from_image, &firmware.to_host)
            .map_err(|err| Failure::new(Reason::FirmwareSetupFailed, err.to_string()))?;
    }
    modprobe(&plan.modprobe_args)?;
    let missing: Vec<&String> = plan
        .expect_loaded
        .iter()
        .filter(|name| !host::module_is_loaded(name))
        .collect();
    if !missing.is_empty() {
        return Err(Failure::new(
            Reason::ModuleNotLoaded,
            format!(
                "modprobe succeeded but /sys/module has no {missing:?} (an install rule or blacklist in modprobe.d?)"
            ),
        ));
    }
    host::log(&format!("loaded: {:?}", plan.expect_loaded));
    Ok(())
}

/// The Go worker's unload sequence.
fn unload(plan: &UnloadPlan) -> Result<(), Failure> {
    modprobe(&plan.modprobe_args)?;
    if let Some(firmware) = &plan.firmware {
        host::remove_firmware(&firmware.from_image, &firmware.to_host);
    }
    host::log("unloaded");
    Ok(())
}

/// Runs modprobe and classifies a failure.
fn modprobe(args: &[String]) -> Result<(), Failure> {
    let run = host::run_modprobe(args)
        .map_err(|err| Failure::new(Reason::ModprobeFailed, err.to_string()))?;
    if run.status.success() {
        return Ok(());
    }
    Err(reason::classify(
        &run.output,
        &run.kernel_log,
        &run.status.to_string(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_go_worker_command_line_is_accepted() {
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from([
            "kmm-worker",
            "kmod",
            "load",
            "/etc/kmm-worker/config.yaml",
            "--firmware-path",
            "/var/lib/firmware",
        ])
        .unwrap();
        let Top::Kmod(Kmod::Load(args)) = cli.command else {
            panic!("not a load: {cli:?}");
        };
        assert_eq!(args.config, Path::new("/etc/kmm-worker/config.yaml"));
        assert_eq!(
            args.firmware_path.as_deref(),
            Some(Path::new("/var/lib/firmware"))
        );
        assert_eq!(cli.termination_log, Path::new("/dev/termination-log"));

        let cli = Cli::try_parse_from([
            "kmm-worker",
            "kmod",
            "unload",
            "c.yaml",
            "--termination-log",
            "/tmp/t",
        ])
        .unwrap();
        assert!(matches!(cli.command, Top::Kmod(Kmod::Unload(_))));
        assert_eq!(cli.termination_log, Path::new("/tmp/t"));
        assert!(Cli::try_parse_from(["kmm-worker", "kmod", "load"]).is_err());
        assert!(Cli::try_parse_from(["kmm-worker", "kmod", "load", "a", "b"]).is_err());
    }
}
