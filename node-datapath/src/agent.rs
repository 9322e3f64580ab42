//! The node-datapath daemon: registers its node with IPAM, subscribes to
//! the services' desired-state streams and applies them, and serves the
//! node's gRPC API (endpoints, status) on TCP and on a local unix socket.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use membrane_proto::ipam::v1 as ipam;
use membrane_runtime::grpc::{self as rpc, GrpcChannel};
use membrane_runtime::stream::Subscriber;
use membrane_runtime::{flags, telemetry};

use ipnet::Ipv4Net;
use tokio::sync::watch;

use crate::api::{NodeApi, NodeFacts};
use crate::bpf;
use crate::endpoints::{EndpointManager, NodeNet};
use crate::masquerade;
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
    /// How local pods are delivered.
    #[arg(long, env = "MEMBRANE_DELIVERY", value_enum, default_value = "auto")]
    pub delivery: Delivery,
    #[command(flatten)]
    pub tls: flags::TlsFlags,
    #[command(flatten)]
    pub telemetry: flags::TelemetryFlags,
}

/// How pods on this node are delivered by the eBPF datapath.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Delivery {
    /// The best the kernel has (probed): redirect_peer, else redirect_neigh, else the stack.
    Auto,
    /// Force `bpf_redirect_peer` (fails to start if the kernel lacks it).
    RedirectPeer,
    /// Force `bpf_redirect_neigh`.
    RedirectNeigh,
    /// Hand every packet to the kernel's routing stack.
    Stack,
}

/// Runs the agent until SIGINT/SIGTERM.
pub async fn main(args: Args) -> anyhow::Result<()> {
    let _telemetry = telemetry::init("membrane-node-datapath", &args.telemetry)?;
    let tls = args.tls.files()?;
    let ipam_channel = rpc::connect_lazy(&args.ipam_endpoint, &args.ipam_server_name, tls.as_ref())?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("bind {}", args.listen))?;

    let node = register(&args, ipam_channel.clone()).await?;
    let pod_cidr: Ipv4Net = node.pod_cidr.parse().with_context(|| format!("ipam gave pod CIDR `{}`", node.pod_cidr))?;
    let pool = ipam::ipam_client::IpamClient::new(ipam_channel.clone())
        .get_pool(ipam::GetPoolRequest {})
        .await
        .map_err(|s| anyhow::anyhow!("ipam pool: {}", s.message()))?
        .into_inner();
    let cluster_cidr: Ipv4Net = pool.cluster_cidr.parse().with_context(|| format!("ipam gave cluster CIDR `{}`", pool.cluster_cidr))?;
    tracing::info!(node = %node.node, pod_cidr = %pod_cidr, cluster_cidr = %cluster_cidr, "registered with ipam");

    // The datapath: load (adopting pinned maps), attach to the underlay.
    bpf::ensure_bpffs().context("mount bpffs")?;
    let features = bpf::probe_features().context("probe kernel features")?;
    let opts = datapath_options(args.delivery, &features)?;
    let delivery = match (opts.redirect_peer, opts.redirect_neigh) {
        (true, _) => "redirect_peer",
        (false, true) => "redirect_neigh",
        (false, false) => "stack",
    };
    let mut datapath = bpf::Datapath::load(&args.bpf_pin_dir, &opts).context("load eBPF datapath")?;
    let underlay_ifindex = nix::net::if_::if_nametoindex(args.underlay_dev.as_str())
        .with_context(|| format!("underlay device `{}`", args.underlay_dev))?;
    let mode = datapath.attach(bpf::Hook::Host, underlay_ifindex).context("attach bpf_host to the underlay")?;
    tracing::info!(delivery, ?mode, dev = %args.underlay_dev, "datapath loaded");
    let datapath = Arc::new(Mutex::new(datapath));

    masquerade::install(pod_cidr, cluster_cidr, &args.underlay_dev).context("install masquerading (nftables)")?;

    let net = NodeNet { pod_cidr, gateway: Ipv4Addr::from(u32::from(pod_cidr.network()) + 1) };
    let endpoints = Arc::new(EndpointManager::new(
        args.node_name.clone(),
        net,
        args.state_dir.join("endpoints"),
        datapath.clone(),
        ipam::ipam_client::IpamClient::new(ipam_channel.clone()),
    )?);
    let adopted = endpoints.restore().await?;
    tracing::info!(adopted, "endpoints restored");

    // Desired state from the services.
    let (applied_tx, applied_rx) = watch::channel(BTreeMap::new());
    let subscriber = Subscriber::new(args.node_name.clone(), "ipam", ipam_channel);
    let mut ipam_state = subscriber.state();
    let applied = applied_tx.clone();
    tokio::spawn(async move {
        while ipam_state.changed().await.is_ok() {
            let v = ipam_state.borrow().applied_version;
            applied.send_modify(|m| {
                m.insert("ipam".into(), v);
            });
        }
    });
    let routes = RouteSink::new(args.node_name.clone(), IpRouteTable { dev: args.underlay_dev.clone() });
    let stream_task = tokio::spawn(subscriber.run(routes, std::future::pending()));

    let facts = NodeFacts {
        underlay_ip: args.underlay_ip.to_string(),
        cluster_cidr: cluster_cidr.to_string(),
        features: [("redirect_peer", features.redirect_peer), ("redirect_neigh", features.redirect_neigh)]
            .into_iter()
            .filter(|(_, on)| *on)
            .map(|(n, _)| n.to_string())
            .collect(),
        delivery: delivery.into(),
    };
    let api = NodeApi::new(endpoints, facts, applied_rx);
    let socket = args.state_dir.join("agent.sock");
    let local = tokio::spawn({
        let routes = tonic::service::Routes::new(api.clone());
        let socket = socket.clone();
        async move { rpc::serve_unix(&socket, routes, std::future::pending()).await }
    });

    tracing::info!(addr = %args.listen, socket = %socket.display(), "node api serving");
    let served = rpc::serve(
        listener,
        tonic::service::Routes::new(api),
        &["membrane.node.v1.Node"],
        tls.as_ref(),
        rpc::shutdown_signal(),
    )
    .await;
    stream_task.abort();
    local.abort();
    // Programs, maps and links stay pinned: traffic keeps flowing until the next agent adopts them.
    served
}

fn datapath_options(delivery: Delivery, f: &bpf::Features) -> anyhow::Result<bpf::DatapathOptions> {
    Ok(match delivery {
        Delivery::Auto => bpf::DatapathOptions::from_features(f),
        Delivery::RedirectPeer => {
            anyhow::ensure!(f.redirect_peer, "--delivery redirect-peer: this kernel has no bpf_redirect_peer");
            bpf::DatapathOptions { redirect_peer: true, redirect_neigh: f.redirect_neigh }
        }
        Delivery::RedirectNeigh => {
            anyhow::ensure!(f.redirect_neigh, "--delivery redirect-neigh: this kernel has no bpf_redirect_neigh");
            bpf::DatapathOptions { redirect_peer: false, redirect_neigh: true }
        }
        Delivery::Stack => bpf::DatapathOptions { redirect_peer: false, redirect_neigh: false },
    })
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
