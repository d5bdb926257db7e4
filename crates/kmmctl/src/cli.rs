//! Command-line parsing and dispatch. Exit codes: 0 success, 1 problems found (`validate` on an
//! invalid file), 2 the command itself failed (cluster unreachable, bad arguments).

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use jiff::Timestamp;
use kube::config::{KubeConfigOptions, Kubeconfig};
use serde::Serialize;

use crate::explain::{NodeScope, explain_module, render_text};
use crate::gather::{Selection, observe};
use crate::status::{render_table, status_rows};
use crate::validate::{ValidateOptions, parse_labels, validate_text};

/// Why a kernel module is, or is not, loaded on your nodes — and what to do about it.
#[derive(Parser, Debug)]
#[command(name = "kmmctl", version, about)]
pub struct Cli {
    /// Output format.
    #[arg(short, long, global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// Path of the kubeconfig file (default: $KUBECONFIG, then ~/.kube/config).
    #[arg(long, global = true, env = "KUBECONFIG", value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// Kubeconfig context to use.
    #[arg(long, global = true)]
    pub context: Option<String>,
    /// Namespace of the Module (default: the context's namespace, else `default`).
    #[arg(short, long, global = true)]
    pub namespace: Option<String>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Human-readable tables.
    Table,
    /// Tables with more columns (`status`).
    Wide,
    /// JSON.
    Json,
    /// YAML.
    Yaml,
}

/// Subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// For each node: the decision chain for a Module and the most likely cause first, with the fix.
    Explain {
        /// The Module's name.
        module: String,
        /// Only this node.
        #[arg(long)]
        node: Option<String>,
    },
    /// Check KMM manifests offline (no cluster): every error with its field path, and per kernel
    /// the image, build arguments and files to sign.
    Validate {
        /// Files to check; `-` reads standard input.
        #[arg(required = true)]
        files: Vec<String>,
        /// A kernel to resolve the kernel mappings for (repeatable).
        #[arg(long = "kernel", value_name = "KERNEL")]
        kernels: Vec<String>,
        /// A node's labels (`key=value,...`), to check the selector against.
        #[arg(long, value_name = "LABELS")]
        node_labels: Option<String>,
    },
    /// Per Module and node: loaded, loading, failed or not targeted, with ages.
    Status {
        /// Only this Module.
        module: Option<String>,
        /// Every namespace.
        #[arg(short = 'A', long)]
        all_namespaces: bool,
    },
}

/// Runs the command line of the current process.
pub fn main() -> ExitCode {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: starting the async runtime: {err}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(2)
        }
    }
}

fn print_structured<T: Serialize>(value: &T, output: Output) -> anyhow::Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(value)?),
        Output::Yaml => print!("{}", serde_saphyr::to_string(value)?),
        Output::Table | Output::Wide => {}
    }
    Ok(())
}

async fn client(cli: &Cli) -> anyhow::Result<(kube::Client, String)> {
    let options = KubeConfigOptions {
        context: cli.context.clone(),
        ..KubeConfigOptions::default()
    };
    let config = match &cli.kubeconfig {
        Some(path) if !path.as_os_str().is_empty() => {
            let kubeconfig = Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &options).await?
        }
        _ => kube::Config::from_kubeconfig(&options)
            .await
            .or_else(|_| kube::Config::incluster())
            .context("no kubeconfig found (set KUBECONFIG or --kubeconfig)")?,
    };
    let namespace = cli
        .namespace
        .clone()
        .unwrap_or_else(|| config.default_namespace.clone());
    Ok((kube::Client::try_from(config)?, namespace))
}

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match &cli.command {
        Command::Validate {
            files,
            kernels,
            node_labels,
        } => {
            let options = ValidateOptions {
                kernels: kernels.clone(),
                node_labels: node_labels
                    .as_deref()
                    .map(parse_labels)
                    .transpose()
                    .map_err(|err| anyhow::anyhow!("--node-labels: {err}"))?,
            };
            let mut reports = Vec::new();
            for file in files {
                let (source, text) = if file == "-" {
                    let mut text = String::new();
                    std::io::stdin()
                        .read_to_string(&mut text)
                        .context("reading standard input")?;
                    ("<stdin>".to_owned(), text)
                } else {
                    let text =
                        std::fs::read_to_string(file).with_context(|| format!("reading {file}"))?;
                    (file.clone(), text)
                };
                reports.push(validate_text(&source, &text, &options));
            }
            match cli.output {
                Output::Table | Output::Wide => {
                    print!("{}", crate::validate::render_text(&reports))
                }
                other => print_structured(&reports, other)?,
            }
            Ok(if reports.iter().all(|r| r.ok()) {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Explain { module, node } => {
            let (client, namespace) = client(&cli).await?;
            let selection = Selection::One {
                namespace,
                name: module.clone(),
            };
            let observed = observe(&client, &selection).await?;
            let scope = node.clone().map_or(NodeScope::Relevant, NodeScope::One);
            let explanations: Vec<_> = observed.iter().map(|o| explain_module(o, &scope)).collect();
            match cli.output {
                Output::Table | Output::Wide => {
                    for explanation in &explanations {
                        print!("{}", render_text(explanation, Timestamp::now()));
                    }
                }
                other => match explanations.as_slice() {
                    [one] => print_structured(one, other)?,
                    many => print_structured(&many, other)?,
                },
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Status {
            module,
            all_namespaces,
        } => {
            let (client, namespace) = client(&cli).await?;
            let selection = match (module, all_namespaces) {
                (Some(name), _) => Selection::One {
                    namespace,
                    name: name.clone(),
                },
                (None, true) => Selection::All,
                (None, false) => Selection::Namespace(namespace),
            };
            let rows = status_rows(&observe(&client, &selection).await?);
            match cli.output {
                Output::Table => print!("{}", render_table(&rows, false, Timestamp::now())),
                Output::Wide => print!("{}", render_table(&rows, true, Timestamp::now())),
                other => print_structured(&rows, other)?,
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
