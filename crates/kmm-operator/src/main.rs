//! `kmm-operator`: the kmm-rs operator binary.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

/// Kernel Module Management operator.
#[derive(Parser, Debug)]
#[command(name = "kmm-operator", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print every CustomResourceDefinition as YAML, or write one file per CRD into a directory.
    Crd {
        /// Directory to write `<group>_<plural>.yaml` files into (for example `deploy/crds`).
        /// Without it, all CRDs are printed to stdout as one multi-document YAML stream.
        #[arg(long, value_name = "DIR")]
        out_dir: Option<PathBuf>,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Crd { out_dir } => write_crds(out_dir),
    }
}

fn write_crds(out_dir: Option<PathBuf>) -> anyhow::Result<()> {
    let crds = kmm_api::crds::all()?;
    match out_dir {
        Some(dir) => {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            for (file, crd) in &crds {
                let path = dir.join(file);
                std::fs::write(&path, kmm_api::crds::to_yaml(crd)?)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
        }
        None => {
            for (_, crd) in &crds {
                print!("---\n{}", kmm_api::crds::to_yaml(crd)?);
            }
        }
    }
    Ok(())
}
