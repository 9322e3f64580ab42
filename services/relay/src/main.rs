//! `membrane-relay`: wiring only; see the library for what it does.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use membrane_relay::grpc::{RelayConfig, RelayService};
use membrane_relay::nodes::{self, IpamNodes, NodeSource, StaticNodes};
use membrane_runtime::{flags, grpc as rpc, telemetry};

/// The cluster-wide flow observer of Membrane.
#[derive(Debug, Parser)]
#[command(name = "membrane-relay", version)]
struct Args {
    #[command(flatten)]
    listen: flags::ListenFlags,
    #[command(flatten)]
    tls: flags::TlsFlags,
    #[command(flatten)]
    telemetry: flags::TelemetryFlags,
    #[command(flatten)]
    metrics: flags::MetricsFlags,
    /// URL of IPAM, whose node list says which nodes to observe.
    #[arg(long, env = "MEMBRANE_IPAM_ENDPOINT")]
    ipam_endpoint: Option<String>,
    /// Name IPAM's certificate carries.
    #[arg(
        long,
        env = "MEMBRANE_IPAM_SERVER_NAME",
        default_value = "ipam.membrane.local"
    )]
    ipam_server_name: String,
    /// A fixed node list, `name=url,...` (e.g. `node-1=https://10.99.0.11:7200`),
    /// used instead of IPAM's. Each node's certificate must name
    /// `<name>.nodes.membrane.local`.
    #[arg(long, env = "MEMBRANE_RELAY_NODES", value_delimiter = ',')]
    nodes: Vec<String>,
    /// Port of every node's observer on its underlay address (IPAM discovery).
    #[arg(long, env = "MEMBRANE_RELAY_NODE_PORT", default_value_t = 7200)]
    node_port: u16,
    /// Seconds between reads of IPAM's node list.
    #[arg(long, env = "MEMBRANE_RELAY_POLL_SECS", default_value_t = 3)]
    poll_secs: u64,
    /// A development PKI directory (CA key included, as `membrane up` writes
    /// it): when given, the relay re-issues every leaf certificate there
    /// before it expires; every process reloads its files on change.
    #[arg(long, env = "MEMBRANE_PKI_DIR")]
    pki_dir: Option<std::path::PathBuf>,
    /// Milliseconds live flows are held to order them across nodes.
    #[arg(long, env = "MEMBRANE_RELAY_SORT_WINDOW_MS", default_value_t = 200)]
    sort_window_ms: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    membrane_runtime::tls::install_crypto_provider();
    let args = Args::parse();
    let _telemetry = telemetry::init("membrane-relay", &args.telemetry)?;
    membrane_runtime::metrics::start(&args.metrics).await?;
    let tls = args.tls.files()?;
    if let Some(dir) = &args.pki_dir {
        let leaves = leaves_in(dir).with_context(|| format!("read {}", dir.display()))?;
        tracing::info!(dir = %dir.display(), leaves = leaves.len(), "renewing certificates before they expire");
        membrane_runtime::tls::spawn_renewal_with(dir.clone(), leaves, Default::default());
    }

    let list = nodes::parse_node_list(&args.nodes).context("--nodes")?;
    let source: Arc<dyn NodeSource> = match (&args.ipam_endpoint, list.is_empty()) {
        (_, false) => Arc::new(StaticNodes::from_list(&list, tls.as_ref())?),
        (Some(url), true) => {
            let ipam = Arc::new(IpamNodes::new(
                url,
                &args.ipam_server_name,
                tls.clone(),
                args.node_port,
            )?);
            tokio::spawn(ipam.clone().run(Duration::from_secs(args.poll_secs.max(1))));
            ipam
        }
        (None, true) => anyhow::bail!("give --ipam-endpoint (discovery) or --nodes (a fixed list)"),
    };

    let listener = tokio::net::TcpListener::bind(args.listen.listen)
        .await
        .with_context(|| format!("bind {}", args.listen.listen))?;
    tracing::info!(
        addr = %listener.local_addr()?,
        nodes = if list.is_empty() { "from ipam" } else { "fixed" },
        "membrane-relay serving"
    );
    let relay = RelayService::new(
        source,
        RelayConfig {
            sort_window: Duration::from_millis(args.sort_window_ms),
            ..RelayConfig::default()
        },
    );
    rpc::serve(
        listener,
        tonic::service::Routes::new(relay.server()),
        &["membrane.observer.v1.Observer"],
        tls.as_ref(),
        rpc::shutdown_signal(),
    )
    .await
}

/// The leaf certificates of a PKI directory, with the names each must carry:
/// `node-*` are nodes, `cli` the CLI, everything else a service.
fn leaves_in(dir: &std::path::Path) -> std::io::Result<Vec<membrane_runtime::pki::LeafSpec>> {
    use membrane_runtime::pki::LeafSpec;
    let mut names: Vec<String> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter_map(|f| f.strip_suffix(".pem").map(str::to_string))
        .filter(|n| n != "ca" && !n.ends_with("-key") && !n.starts_with("ca-"))
        .collect();
    names.sort();
    Ok(names
        .into_iter()
        .map(|n| match n.as_str() {
            "cli" => LeafSpec::client(&n),
            _ if n.starts_with("node-") => LeafSpec::node(&n),
            _ => LeafSpec::service(&n),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_leaf_of_a_pki_directory_is_renewed_with_its_names() {
        let dir = tempfile::tempdir().expect("tmp");
        for f in [
            "ca.pem",
            "ca-key.pem",
            "ipam.pem",
            "ipam-key.pem",
            "node-1.pem",
            "node-1-key.pem",
            "cli.pem",
            "cli-key.pem",
        ] {
            std::fs::write(dir.path().join(f), "x").expect("write");
        }
        let leaves = leaves_in(dir.path()).expect("read");
        let names: Vec<(&str, &[String])> = leaves
            .iter()
            .map(|l| (l.name.as_str(), l.dns_names.as_slice()))
            .collect();
        assert_eq!(names.len(), 3);
        assert_eq!(names[0].0, "cli");
        assert_eq!(names[1], ("ipam", &["ipam.membrane.local".to_string()][..]));
        assert_eq!(names[2].0, "node-1");
        assert!(
            names[2]
                .1
                .contains(&"node-1.nodes.membrane.local".to_string())
        );
    }
}
