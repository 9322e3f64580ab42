//! `membrane`: the command-line interface to a Membrane cluster.
//!
//! Module map:
//! - `cluster`: `membrane up` / `down`, a local cluster of network namespaces on this machine.
#![forbid(unsafe_code)]

mod cluster;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// eBPF networking, security and observability for Kubernetes nodes.
#[derive(Debug, Parser)]
#[command(name = "membrane", version, about)]
struct Cli {
    /// Directory holding the local cluster's state (certificates, logs, pids, cluster.json).
    #[arg(long, global = true, env = "MEMBRANE_STATE_DIR", default_value = "/run/membrane")]
    state_dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start a local cluster: etcd, the services, one node per network namespace.
    Up(cluster::UpArgs),
    /// Stop the local cluster and remove everything it created.
    Down,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    membrane_runtime::tls::install_crypto_provider();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Up(args) => cluster::up_command(&cli.state_dir, args).await,
        Command::Down => cluster::down(&cli.state_dir).await,
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
