//! The node-datapath daemon: registers its node with IPAM, subscribes to
//! the services' desired-state streams and applies them, and serves the
//! node's gRPC API (health today).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use membrane_proto::ipam::v1 as ipam;
use membrane_runtime::grpc::{self as rpc, GrpcChannel};
use membrane_runtime::stream::Subscriber;
use membrane_runtime::{flags, telemetry};

use crate::routes::{IpRouteTable, RouteSink};

/// The Membrane node agent.
#[derive(Debug, Clone, Parser)]
#[command(name = "membrane-node-datapath", version)]
pub struct Args {
    /// This node's name.
    #[arg(long, env = "MEMBRANE_NODE_NAME")]
    pub node_name: String,
    /// This node's address on the underlay network.
    #[arg(long, env = "MEMBRANE_UNDERLAY_IP")]
    pub underlay_ip: Ipv4Addr,
    /// The device towards the underlay.
    #[arg(long, env = "MEMBRANE_UNDERLAY_DEV", default_value = "eth0")]
    pub underlay_dev: String,
    /// Address of the node's gRPC API.
    #[arg(
        long = "listen",
        env = "MEMBRANE_LISTEN",
        default_value = "127.0.0.1:7200"
    )]
    pub listen: SocketAddr,
    /// IPAM service URL.
    #[arg(
        long,
        env = "MEMBRANE_IPAM_ENDPOINT",
        default_value = "http://127.0.0.1:7101"
    )]
    pub ipam_endpoint: String,
    /// Name IPAM's certificate carries.
    #[arg(
        long,
        env = "MEMBRANE_IPAM_SERVER_NAME",
        default_value = "ipam.membrane.local"
    )]
    pub ipam_server_name: String,
    /// bpffs directory for this node's pins.
    #[arg(
        long,
        env = "MEMBRANE_BPF_PIN_DIR",
        default_value = "/sys/fs/bpf/membrane/node"
    )]
    pub bpf_pin_dir: PathBuf,
    /// Directory for this node's local state.
    #[arg(long, env = "MEMBRANE_STATE_DIR", default_value = "/run/membrane/node")]
    pub state_dir: PathBuf,
    #[command(flatten)]
    pub tls: flags::TlsFlags,
    #[command(flatten)]
    pub telemetry: flags::TelemetryFlags,
}

/// Runs the agent until SIGINT/SIGTERM.
pub async fn main(args: Args) -> anyhow::Result<()> {
    let _telemetry = telemetry::init("membrane-node-datapath", &args.telemetry)?;
    let tls = args.tls.files()?;
    let ipam_channel =
        rpc::connect_lazy(&args.ipam_endpoint, &args.ipam_server_name, tls.as_ref())?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("bind {}", args.listen))?;

    let node = register(&args, ipam_channel.clone()).await?;
    tracing::info!(node = %node.node, pod_cidr = %node.pod_cidr, "registered with ipam");

    let subscriber = Subscriber::new(args.node_name.clone(), "ipam", ipam_channel);
    let routes = RouteSink::new(
        args.node_name.clone(),
        IpRouteTable {
            dev: args.underlay_dev.clone(),
        },
    );
    let stream_task = tokio::spawn(subscriber.run(routes, std::future::pending()));

    tracing::info!(addr = %args.listen, "node api serving");
    let served = rpc::serve(
        listener,
        tonic::service::Routes::default(),
        &[],
        tls.as_ref(),
        rpc::shutdown_signal(),
    )
    .await;
    stream_task.abort();
    served
}

/// Registers the node with IPAM, retrying while IPAM is unreachable.
async fn register(args: &Args, channel: GrpcChannel) -> anyhow::Result<ipam::NodeInfo> {
    let mut client = ipam::ipam_client::IpamClient::new(channel);
    let req = ipam::RegisterNodeRequest {
        node: args.node_name.clone(),
        underlay_ip: args.underlay_ip.to_string(),
        pod_cidr: String::new(),
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        match client.register_node(req.clone()).await {
            Ok(resp) => return Ok(resp.into_inner()),
            Err(s)
                if s.code() == tonic::Code::Unavailable
                    && tokio::time::Instant::now() < deadline =>
            {
                tracing::warn!(error = %s.message(), "ipam not reachable yet");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(s) => anyhow::bail!(
                "register node `{}` with ipam: {}",
                args.node_name,
                s.message()
            ),
        }
    }
}
