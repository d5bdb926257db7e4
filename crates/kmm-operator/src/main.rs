//! `kmm-operator`: the kmm-rs operator binary. `run` is the manager (reconcilers, leader
//! election, probes, metrics), `webhook` the admission and conversion webhook server, `crd`
//! prints the CRDs.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use kmm_operator::{run, webhook};

/// mimalloc instead of glibc's malloc: the watch caches parse a steady stream of large JSON
/// objects on several threads, which leaves glibc's per-thread arenas fragmented (resident
/// memory grows with every rollout and is not given back).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Kernel Module Management operator.
#[derive(Parser, Debug)]
#[command(name = "kmm-operator", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the manager: the reconcilers (on the elected leader only), probes and metrics.
    Run(run::RunArgs),
    /// Run the validating and conversion webhook server.
    Webhook(webhook::WebhookArgs),
    /// Print every CustomResourceDefinition as YAML, or write one file per CRD into a directory.
    Crd {
        /// Directory to write `<group>_<plural>.yaml` files into (for example `deploy/crds`).
        /// Without it, all CRDs are printed to stdout as one multi-document YAML stream.
        #[arg(long, value_name = "DIR")]
        out_dir: Option<PathBuf>,
    },
}

fn main() -> anyhow::Result<()> {
    // One rustls provider for the whole process (kube's client, the webhook and metrics servers).
    let _ = rustls::crypto::ring::default_provider().install_default();
    match Cli::parse().command {
        Command::Crd { out_dir } => write_crds(out_dir),
        Command::Run(args) => runtime()?.block_on(run::run(args)),
        Command::Webhook(args) => runtime()?.block_on(webhook::run(args)),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
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
