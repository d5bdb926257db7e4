//! `kmm-worker`: runs in a worker pod on a node and loads or unloads one kernel module with
//! kmod's `modprobe`, with the same command line and config file as the Go KMM worker.
//!
//! This first version runs `modprobe`; in-tree module removal, firmware handling and failure
//! classification follow with the real-kernel tests.

mod plan;

use std::path::PathBuf;
use std::process::{Command, ExitCode};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

/// Loads and unloads kernel modules for Kernel Module Management.
#[derive(Parser, Debug)]
#[command(name = "kmm-worker", version, about)]
struct Cli {
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
    /// Host directory for firmware files.
    #[arg(long, value_name = "DIR")]
    firmware_path: Option<PathBuf>,
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("kmm-worker: fatal error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let Top::Kmod(action) = cli.command;
    let (args, load) = match &action {
        Kmod::Load(args) => (args, true),
        Kmod::Unload(args) => (args, false),
    };
    let text = std::fs::read_to_string(&args.config)
        .with_context(|| format!("reading config {}", args.config.display()))?;
    let config = plan::parse_config(&text)
        .with_context(|| format!("decoding config {}", args.config.display()))?;
    if let Some(firmware_dir) = &args.firmware_path {
        set_firmware_class_path(firmware_dir)?;
    }
    let modprobe_args = if load {
        plan::load_args(&config.modprobe)
    } else {
        plan::unload_args(&config.modprobe)
    };
    let status = Command::new("modprobe")
        .args(&modprobe_args)
        .status()
        .context("starting modprobe")?;
    if !status.success() {
        bail!("modprobe {} failed: {status}", modprobe_args.join(" "));
    }
    Ok(())
}

/// Points the kernel's firmware loader at `dir`, unless it already looks there.
fn set_firmware_class_path(dir: &std::path::Path) -> anyhow::Result<()> {
    const PARAMETER: &str = "/sys/module/firmware_class/parameters/path";
    let wanted = dir.to_string_lossy();
    let current = std::fs::read_to_string(PARAMETER).unwrap_or_default();
    if current.trim_end() != wanted {
        std::fs::write(PARAMETER, wanted.as_bytes())
            .with_context(|| format!("setting {PARAMETER} to {wanted}"))?;
    }
    Ok(())
}
