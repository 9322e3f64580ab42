//! `membrane`: the command-line interface to a Membrane cluster.
//!
//! Module map:
//! - `cluster`: `membrane up` / `down`, a local cluster of network namespaces on this machine.
//! - `client`: reaching a running cluster's services and nodes.
//! - `commands`: one module per subcommand group.
//! - `output`: table / JSON / YAML printing.
#![forbid(unsafe_code)]

mod client;
mod cluster;
mod commands;
mod output;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::output::Format;

/// eBPF networking, security and observability for Kubernetes nodes.
#[derive(Debug, Parser)]
#[command(name = "membrane", version, about)]
struct Cli {
    /// Directory holding the local cluster's state (certificates, logs, pids, cluster.json).
    #[arg(
        long,
        global = true,
        env = "MEMBRANE_STATE_DIR",
        default_value = "/run/membrane"
    )]
    state_dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Args)]
struct OutputFlag {
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Table)]
    output: Format,
}

#[derive(Debug, Args)]
struct FileFlag {
    /// A YAML/JSON file (multi-document), a directory of them, or `-` for stdin.
    #[arg(short = 'f', long = "filename")]
    file: PathBuf,
    /// Validate only; change nothing.
    #[arg(long)]
    dry_run: bool,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start a local cluster: etcd, the services, one node per network namespace.
    Up(cluster::UpArgs),
    /// Stop the local cluster and remove everything it created.
    Down,
    /// Restart one component of the local cluster (a service or a node's datapath).
    Restart {
        /// Component name: `ipam`, `node-1`, ...
        component: String,
    },
    /// Health of every service and node; exits non-zero when something is down.
    Status(OutputFlag),
    /// List resources.
    Get {
        #[command(subcommand)]
        what: GetCommand,
    },
    /// Create or update objects from Kubernetes-style documents.
    Apply(FileFlag),
    /// Delete the objects named in Kubernetes-style documents.
    Delete(FileFlag),
    /// Pods: network namespaces attached through the CNI plugin.
    Pod {
        #[command(subcommand)]
        what: PodCommand,
    },
    /// Load-balancing tools.
    Lb {
        #[command(subcommand)]
        what: LbCommand,
    },
    /// Network policy tools.
    Policy {
        #[command(subcommand)]
        what: PolicyCommand,
    },
    /// Run commands on the cluster's hosts (`external`, or a node).
    Host {
        #[command(subcommand)]
        what: HostCommand,
    },
    /// Manage pod addresses directly.
    Ipam {
        #[command(subcommand)]
        what: IpamCommand,
    },
    /// Flows the datapath saw (Hubble-style), for the cluster through the relay or for one node.
    Observe(commands::observe::ObserveArgs),
}

#[derive(Debug, Subcommand)]
enum GetCommand {
    /// Nodes: underlay address, pod CIDR, allocations, readiness.
    Nodes(OutputFlag),
    /// The address pool and every allocation.
    Ipam(OutputFlag),
    /// Endpoints as each node's datapath has programmed them.
    Endpoints(OutputFlag),
    /// Security identities: labels and references.
    Identities(OutputFlag),
    /// Network policies, the identities they select, and what is not enforced.
    Policies(OutputFlag),
    /// Kubernetes services: frontends, backends, algorithm.
    Services(OutputFlag),
    /// The ipcache (address → identity) as each node's eBPF map holds it.
    Ipcache {
        /// Only this node.
        #[arg(long)]
        node: Option<String>,
        #[command(flatten)]
        output: OutputFlag,
    },
}

#[derive(Debug, Subcommand)]
enum PodCommand {
    /// Create a pod on a node and print its address.
    Run(commands::pod::RunArgs),
    /// Run a command inside a pod's network namespace.
    Exec {
        /// Pod name.
        name: String,
        /// Pod namespace.
        #[arg(long, short = 'n', default_value = "default")]
        namespace: String,
        /// The command and its arguments (after `--`).
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// List pods.
    List(OutputFlag),
    /// Set (`k=v`) or remove (`k-`) pod labels; the pod moves to the new label set's identity.
    Label {
        /// Pod name.
        name: String,
        /// Label changes.
        #[arg(required = true)]
        changes: Vec<String>,
        /// Pod namespace.
        #[arg(long, short = 'n', default_value = "default")]
        namespace: String,
    },
    /// Delete a pod and release everything it held.
    Rm {
        /// Pod name.
        name: String,
        /// Pod namespace.
        #[arg(long, short = 'n', default_value = "default")]
        namespace: String,
    },
}

#[derive(Debug, Subcommand)]
enum LbCommand {
    /// A service's Maglev table (slot → backend address): as programmed in a
    /// node's eBPF maps with `--node`, else as the lb service computes it
    /// from what it publishes (what every node should program).
    Table {
        /// `namespace/name`, or `name` in `default`.
        service: String,
        /// Read the table from this node's maps (`node-1`, ...).
        #[arg(long)]
        node: Option<String>,
        #[command(flatten)]
        output: OutputFlag,
    },
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// Explain the verdict for traffic: allowed or denied, and by which rules.
    Trace {
        /// `pod/NS/NAME`, `entity/world` (or another entity), `cidr/ADDR`, or `identity/N`.
        #[arg(long)]
        from: String,
        /// `pod/NS/NAME`, `entity/...`, `cidr/ADDR`, or `identity/N`.
        #[arg(long)]
        to: String,
        /// `PORT/PROTO`, e.g. `80/TCP`, `53/UDP`, `0/ICMP`.
        #[arg(long)]
        port: String,
    },
}

#[derive(Debug, Subcommand)]
enum HostCommand {
    /// Run a command in a host's network namespace.
    Exec {
        /// `external` (the world) or a node name.
        host: String,
        /// The command and its arguments (after `--`).
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
enum IpamCommand {
    /// Allocate an address on a node.
    Allocate {
        /// Node name.
        #[arg(long)]
        node: String,
        /// Who holds the address (one address per owner and node).
        #[arg(long)]
        owner: String,
        #[command(flatten)]
        output: OutputFlag,
    },
    /// Release an address.
    Release {
        /// Node name.
        #[arg(long)]
        node: String,
        /// The address.
        #[arg(long)]
        ip: String,
    },
}

/// What a command asks `main` to do when it returns.
enum Exit {
    Ok,
    Failed,
    Code(i32),
}

async fn run(cli: Cli) -> anyhow::Result<Exit> {
    let ctx = || client::Ctx::load(&cli.state_dir);
    match cli.command {
        Command::Up(args) => cluster::up_command(&cli.state_dir, args).await?,
        Command::Down => cluster::down(&cli.state_dir).await?,
        Command::Restart { component } => cluster::restart(&cli.state_dir, &component).await?,
        Command::Status(o) => {
            return Ok(if commands::status::run(&ctx()?, o.output).await? {
                Exit::Ok
            } else {
                Exit::Failed
            });
        }
        Command::Get {
            what: GetCommand::Endpoints(o),
        } => commands::pod::endpoints(&ctx()?, o.output).await?,
        Command::Pod {
            what: PodCommand::Run(args),
        } => commands::pod::run(&ctx()?, args).await?,
        Command::Pod {
            what:
                PodCommand::Exec {
                    name,
                    namespace,
                    command,
                },
        } => {
            return Ok(Exit::Code(commands::pod::exec(
                &ctx()?,
                &namespace,
                &name,
                &command,
            )?));
        }
        Command::Pod {
            what: PodCommand::List(o),
        } => commands::pod::list(&ctx()?, o.output)?,
        Command::Pod {
            what:
                PodCommand::Label {
                    name,
                    changes,
                    namespace,
                },
        } => commands::pod::label(&ctx()?, &namespace, &name, &changes).await?,
        Command::Get {
            what: GetCommand::Services(o),
        } => commands::services::get_services(&ctx()?, o.output).await?,
        Command::Lb {
            what:
                LbCommand::Table {
                    service,
                    node,
                    output,
                },
        } => {
            commands::services::lb_table(&ctx()?, &service, node.as_deref(), output.output).await?
        }
        Command::Get {
            what: GetCommand::Policies(o),
        } => commands::policy::get_policies(&ctx()?, o.output).await?,
        Command::Policy {
            what: PolicyCommand::Trace { from, to, port },
        } => commands::policy::trace(&ctx()?, &from, &to, &port).await?,
        Command::Get {
            what: GetCommand::Identities(o),
        } => commands::identities::identities(&ctx()?, o.output).await?,
        Command::Get {
            what: GetCommand::Ipcache { node, output },
        } => commands::pod::ipcache(&ctx()?, node.as_deref(), output.output).await?,
        Command::Pod {
            what: PodCommand::Rm { name, namespace },
        } => commands::pod::rm(&ctx()?, &namespace, &name).await?,
        Command::Host {
            what: HostCommand::Exec { host, command },
        } => {
            return Ok(Exit::Code(commands::pod::host_exec(
                &ctx()?,
                &host,
                &command,
            )?));
        }
        Command::Get {
            what: GetCommand::Nodes(o),
        } => commands::get::nodes(&ctx()?, o.output).await?,
        Command::Get {
            what: GetCommand::Ipam(o),
        } => commands::get::ipam(&ctx()?, o.output).await?,
        Command::Apply(f) => commands::apply::run(&ctx()?, &f.file, false, f.dry_run).await?,
        Command::Delete(f) => commands::apply::run(&ctx()?, &f.file, true, f.dry_run).await?,
        Command::Ipam {
            what:
                IpamCommand::Allocate {
                    node,
                    owner,
                    output,
                },
        } => commands::ipam::allocate(&ctx()?, &node, &owner, output.output).await?,
        Command::Ipam {
            what: IpamCommand::Release { node, ip },
        } => commands::ipam::release(&ctx()?, &node, &ip).await?,
        Command::Observe(args) => commands::observe::run(&ctx()?, args).await?,
    }
    Ok(Exit::Ok)
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    membrane_runtime::tls::install_crypto_provider();
    quiet_on_closed_stdout();
    match run(Cli::parse()).await {
        Ok(Exit::Ok) => std::process::ExitCode::SUCCESS,
        Ok(Exit::Failed) => std::process::ExitCode::FAILURE,
        Ok(Exit::Code(c)) => std::process::ExitCode::from(u8::try_from(c).unwrap_or(1)),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// `membrane get ... | head` closes stdout early; like other Unix tools,
/// exit quietly instead of panicking on the broken pipe.
fn quiet_on_closed_stdout() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let msg = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("");
        if msg.contains("failed printing to stdout") && msg.contains("Broken pipe") {
            std::process::exit(0);
        }
        default(info);
    }));
}
