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
use membrane_runtime::stream::{StateSink, Subscriber};
use membrane_runtime::{flags, telemetry};

use ipnet::Ipv4Net;
use tokio::sync::watch;

use crate::api::{NodeApi, NodeFacts};
use crate::bpf;
use crate::endpoints::{EndpointManager, NodeNet};
use crate::identity::{ClusterView, IdentityClient, IpcacheMap, IpcacheSink};
use crate::masquerade;
use crate::observer::{self, Observer, ObserverService};
use crate::policy::PolicySink;
use crate::routes::{IpRouteTable, NodeRoutes, RouteSink, VxlanRouteTable};

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
    /// Identity service URL; without it pods get identity 0 and no ipcache is programmed.
    #[arg(long, env = "MEMBRANE_IDENTITY_ENDPOINT")]
    pub identity_endpoint: Option<String>,
    /// Name the identity service's certificate carries.
    #[arg(
        long,
        env = "MEMBRANE_IDENTITY_SERVER_NAME",
        default_value = "identity.membrane.local"
    )]
    pub identity_server_name: String,
    /// Policy service URL; without it no policy is enforced.
    #[arg(long, env = "MEMBRANE_POLICY_ENDPOINT")]
    pub policy_endpoint: Option<String>,
    /// Name the policy service's certificate carries.
    #[arg(
        long,
        env = "MEMBRANE_POLICY_SERVER_NAME",
        default_value = "policy.membrane.local"
    )]
    pub policy_server_name: String,
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
    /// How pod traffic reaches other nodes.
    #[arg(long, env = "MEMBRANE_ROUTING", value_enum, default_value = "direct")]
    pub routing: Routing,
    /// How local pods are delivered.
    #[arg(long, env = "MEMBRANE_DELIVERY", value_enum, default_value = "auto")]
    pub delivery: Delivery,
    /// The XDP fast path on the underlay device (`bpf_xdp`: NodePort /
    /// LoadBalancer requests for backends on other nodes). `auto`: native
    /// where the driver has it, except on a veth (generic there, see
    /// [`Xdp::Auto`]); `off`: tc handles everything.
    #[arg(long, env = "MEMBRANE_XDP", value_enum, default_value = "auto")]
    pub xdp: Xdp,
    /// Drop packets a pod sends from an address that is not its own
    /// (anti-spoofing; reason `INVALID_SOURCE_IP`).
    #[arg(
        long,
        env = "MEMBRANE_SOURCE_IP_VERIFICATION",
        default_value_t = true,
        action = clap::ArgAction::Set
    )]
    pub source_ip_verification: bool,
    /// Record flows from the datapath's events (off: the agent does not read
    /// them, for benchmarks; the datapath still emits them).
    #[arg(
        long,
        env = "MEMBRANE_FLOWS",
        default_value_t = true,
        action = clap::ArgAction::Set
    )]
    pub flows: bool,
    /// How many recent flows the node keeps for `GetFlows`.
    #[arg(long, env = "MEMBRANE_FLOWS_CAPACITY", default_value_t = observer::DEFAULT_CAPACITY)]
    pub flows_capacity: usize,
    /// Socket-level load balancing of ClusterIP services (`bpf_sock` on the
    /// node's cgroup); needs `--lb-endpoint`. Off by default.
    #[arg(
        long,
        env = "MEMBRANE_SERVICE_LB",
        default_value_t = false,
        action = clap::ArgAction::Set
    )]
    pub service_lb: bool,
    /// Load-balancing service URL (its desired-state stream); used with `--service-lb`.
    #[arg(long, env = "MEMBRANE_LB_ENDPOINT")]
    pub lb_endpoint: Option<String>,
    /// Name the load-balancing service's certificate carries.
    #[arg(
        long,
        env = "MEMBRANE_LB_SERVER_NAME",
        default_value = "lb.membrane.local"
    )]
    pub lb_server_name: String,
    /// cgroup v2 directory under which the node's cgroup
    /// (`<root>/<node>`, holding its pods' cgroups) is created.
    #[arg(
        long,
        env = "MEMBRANE_CGROUP_ROOT",
        default_value = "/sys/fs/cgroup/unified/membrane"
    )]
    pub cgroup_root: PathBuf,
    #[command(flatten)]
    pub tls: flags::TlsFlags,
    #[command(flatten)]
    pub telemetry: flags::TelemetryFlags,
    #[command(flatten)]
    pub metrics: flags::MetricsFlags,
}

/// How pod traffic reaches other nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Routing {
    /// Routes to other nodes' pod CIDRs via their underlay addresses (the
    /// underlay must forward pod addresses between nodes, as one L2 does).
    Direct,
    /// Encapsulated in VXLAN between the nodes' underlay addresses.
    Vxlan,
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

/// Whether and how `bpf_xdp` runs on the underlay device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Xdp {
    /// Native if the driver accepts it, else generic, else off. On a veth,
    /// generic: native `XDP_TX` there is dropped unless the peer has NAPI
    /// (an XDP program or GRO on the other end, which this namespace cannot
    /// see), and a native frame loses the checksum-offload state of a
    /// same-host sender.
    Auto,
    /// Native (driver) mode, or fail to start. On a veth, the operator
    /// vouches for the peer's NAPI.
    Native,
    /// Generic (skb) mode: every device, at the cost of a copy for skbs
    /// without XDP headroom, on all of the device's traffic.
    Generic,
    /// No XDP: a program a previous agent left is detached.
    Off,
}

/// Runs the agent until SIGINT/SIGTERM.
pub async fn main(args: Args) -> anyhow::Result<()> {
    let _telemetry = telemetry::init("membrane-node-datapath", &args.telemetry)?;
    membrane_runtime::metrics::start(&args.metrics).await?;
    let tls = args.tls.files()?;
    let ipam_channel =
        rpc::connect_lazy(&args.ipam_endpoint, &args.ipam_server_name, tls.as_ref())?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("bind {}", args.listen))?;

    let node = register(&args, ipam_channel.clone()).await?;
    let pod_cidr: Ipv4Net = node
        .pod_cidr
        .parse()
        .with_context(|| format!("ipam gave pod CIDR `{}`", node.pod_cidr))?;
    let pool = ipam::ipam_client::IpamClient::new(ipam_channel.clone())
        .get_pool(ipam::GetPoolRequest {})
        .await
        .map_err(|s| anyhow::anyhow!("ipam pool: {}", s.message()))?
        .into_inner();
    let cluster_cidr: Ipv4Net = pool
        .cluster_cidr
        .parse()
        .with_context(|| format!("ipam gave cluster CIDR `{}`", pool.cluster_cidr))?;
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
    let load = bpf::LoadConfig {
        verify_source: args.source_ip_verification,
        ..bpf::LoadConfig::default()
    };
    let mut datapath =
        bpf::Datapath::load_with(&args.bpf_pin_dir, &opts, &load).context("load eBPF datapath")?;
    let underlay_ifindex = nix::net::if_::if_nametoindex(args.underlay_dev.as_str())
        .with_context(|| format!("underlay device `{}`", args.underlay_dev))?;
    let mode = datapath
        .attach(bpf::Hook::Host, underlay_ifindex)
        .context("attach bpf_host to the underlay")?;
    tracing::info!(delivery, ?mode, dev = %args.underlay_dev, "datapath loaded");
    let xdp = attach_xdp(
        &mut datapath,
        args.xdp,
        underlay_ifindex,
        &args.underlay_dev,
    )?;
    // Taken once, before anything else could: the reader is one per datapath.
    let events = if args.flows {
        Some(
            datapath
                .events()
                .context("take the datapath's event reader")?
                .into_async()
                .context("register the event ring buffer with tokio")?,
        )
    } else {
        tracing::warn!("flows are off (--flows=false): the datapath's events are not read");
        None
    };
    let datapath = Arc::new(Mutex::new(datapath));
    crate::metrics::register_datapath(datapath.clone());

    masquerade::install(pod_cidr, cluster_cidr, &args.underlay_dev)
        .context("install masquerading (nftables)")?;

    let net = NodeNet {
        pod_cidr,
        gateway: Ipv4Addr::from(u32::from(pod_cidr.network()) + 1),
    };
    let identity = match &args.identity_endpoint {
        Some(url) => {
            let channel = rpc::connect_lazy(url, &args.identity_server_name, tls.as_ref())?;
            Some((
                IdentityClient::new(args.node_name.clone(), channel.clone()),
                channel,
            ))
        }
        None => {
            tracing::warn!(
                "no identity service configured: pods get identity 0 and the ipcache stays empty"
            );
            None
        }
    };
    let endpoints = Arc::new(EndpointManager::new(
        args.node_name.clone(),
        net,
        args.state_dir.join("endpoints"),
        datapath.clone(),
        ipam::ipam_client::IpamClient::new(ipam_channel.clone()),
        identity.as_ref().map(|(c, _)| c.clone()),
    )?);
    if args.policy_endpoint.is_some() {
        endpoints.expect_policy();
    }
    let adopted = endpoints.restore().await?;
    tracing::info!(adopted, "endpoints restored");

    // Desired state from the services.
    let (applied_tx, applied_rx) = watch::channel(BTreeMap::new());
    let mut tasks = Vec::new();

    // Flows: the pump reads the datapath's events into the observer's ring.
    let view = ClusterView::default();
    let flows = Observer::new(args.node_name.clone(), args.flows_capacity, args.flows);
    flows.set_metrics(crate::metrics::FlowMetrics::global());
    if let Some(reader) = events {
        let builder = observer::FlowBuilder::new(
            args.node_name.clone(),
            observer::clock::WallClock::measure(),
            endpoints.clone(),
            view.clone(),
        );
        let counters: Arc<dyn observer::EventCounters> =
            Arc::new(observer::DatapathCounters(datapath.clone()));
        tasks.extend(observer::spawn_pump(
            reader,
            builder,
            flows.clone(),
            Some(counters),
        ));
        tracing::info!(capacity = args.flows_capacity, "flows recorded");
    }
    let table = match args.routing {
        Routing::Direct => NodeRoutes::Direct(IpRouteTable {
            dev: args.underlay_dev.clone(),
        }),
        Routing::Vxlan => {
            let t = VxlanRouteTable {
                local: args.underlay_ip,
                underlay_dev: args.underlay_dev.clone(),
                pod_cidr,
            };
            t.ensure_device()
                .context("create the VXLAN tunnel device")?;
            NodeRoutes::Vxlan(t)
        }
    };
    tracing::info!(routing = ?args.routing, "routing to other nodes' pods");
    let routes = RouteSink::new(args.node_name.clone(), table);
    tasks.push(subscribe(
        &args.node_name,
        "ipam",
        ipam_channel,
        routes,
        &applied_tx,
    ));
    if let Some((client, channel)) = identity {
        // Pods cannot get identities before the node holds a lease.
        first_lease(&client).await?;
        let sink = IpcacheSink::new(args.node_name.clone(), DatapathIpcache(datapath.clone()))
            .with_view(view.clone());
        tasks.push(subscribe(
            &args.node_name,
            "identity",
            channel,
            sink,
            &applied_tx,
        ));
        tasks.push(tokio::spawn(keep_lease(
            client,
            args.underlay_ip,
            endpoints.clone(),
        )));
    }
    match &args.policy_endpoint {
        Some(url) => {
            let channel = rpc::connect_lazy(url, &args.policy_server_name, tls.as_ref())?;
            tasks.push(subscribe(
                &args.node_name,
                "policy",
                channel,
                PolicySink::new(endpoints.clone()),
                &applied_tx,
            ));
        }
        None => tracing::warn!("no policy service configured: no network policy is enforced"),
    }

    let mut lb_view = None;
    match (args.service_lb, &args.lb_endpoint) {
        (true, Some(url)) => {
            let cgroup = args.cgroup_root.join(&args.node_name);
            std::fs::create_dir_all(&cgroup)
                .with_context(|| format!("create the node's cgroup {}", cgroup.display()))?;
            let mut sock = bpf::SockLb::load(&args.bpf_pin_dir).context("load bpf_sock")?;
            sock.attach(&cgroup)
                .with_context(|| format!("attach bpf_sock to {}", cgroup.display()))?;
            tracing::info!(cgroup = %cgroup.display(), "socket load balancing attached");
            let channel = rpc::connect_lazy(url, &args.lb_server_name, tls.as_ref())?;
            let l2 = datapath
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .l2_announcer()
                .context("open the announced-address map")?;
            // Service addresses get local routes (`routes::service_routes`):
            // the kernel must not answer ARP for them; the announcing
            // node's datapath does.
            crate::routes::service_routes::quiet_arp(&args.underlay_dev)
                .with_context(|| format!("set arp_ignore on `{}`", args.underlay_dev))?;
            let sink =
                crate::lb::LbSink::new(args.node_name.clone(), crate::lb::NodeLbMaps { sock, l2 });
            lb_view = Some(sink.view());
            tasks.push(subscribe(&args.node_name, "lb", channel, sink, &applied_tx));
        }
        (true, None) => {
            tracing::warn!("--service-lb needs --lb-endpoint: socket load balancing stays off");
        }
        (false, _) => {}
    }

    let facts = NodeFacts {
        underlay_ip: args.underlay_ip.to_string(),
        cluster_cidr: cluster_cidr.to_string(),
        features: [
            ("redirect_peer", features.redirect_peer),
            ("redirect_neigh", features.redirect_neigh),
        ]
        .into_iter()
        .filter(|(_, on)| *on)
        .map(|(n, _)| n.to_string())
        .chain(xdp.map(|mode| format!("xdp_{mode}")))
        .collect(),
        delivery: delivery.into(),
    };
    let api = NodeApi::new(endpoints, datapath, facts, applied_rx, lb_view);
    let socket = args.state_dir.join("agent.sock");
    let local = tokio::spawn({
        let routes = tonic::service::Routes::new(api.clone());
        let socket = socket.clone();
        async move { rpc::serve_unix(&socket, routes, std::future::pending()).await }
    });

    tracing::info!(addr = %args.listen, socket = %socket.display(), "node api serving");
    let routes = tonic::service::Routes::new(api).add_service(ObserverService::new(flows).server());
    let served = rpc::serve(
        listener,
        routes,
        &["membrane.node.v1.Node", "membrane.observer.v1.Observer"],
        tls.as_ref(),
        rpc::shutdown_signal(),
    )
    .await;
    for t in tasks {
        t.abort();
    }
    local.abort();
    // Programs, maps and links stay pinned: traffic keeps flowing until the next agent adopts them.
    served
}

/// Runs a subscriber for `service` with `sink`, publishing its applied
/// version into `applied` (reported by the node's Status).
fn subscribe<S: StateSink>(
    node: &str,
    service: &'static str,
    channel: GrpcChannel,
    sink: S,
    applied: &watch::Sender<BTreeMap<String, u64>>,
) -> tokio::task::JoinHandle<()> {
    let subscriber = Subscriber::new(node.to_string(), service, channel);
    let mut state = subscriber.state();
    let applied = applied.clone();
    tokio::spawn(async move {
        while state.changed().await.is_ok() {
            let v = state.borrow().applied_version;
            applied.send_modify(|m| {
                m.insert(service.to_string(), v);
            });
        }
    });
    tokio::spawn(subscriber.run(sink, std::future::pending()))
}

/// How often the node renews its identity lease (well within its TTL).
const HEARTBEAT: Duration = Duration::from_secs(5);

/// Keeps the node's identity lease alive; whenever the lease is new (first
/// start, or the old one expired while the service or etcd was away),
/// records the node's address and every local endpoint again.
async fn keep_lease(
    client: IdentityClient,
    underlay_ip: Ipv4Addr,
    endpoints: Arc<EndpointManager>,
) {
    let mut recorded = false;
    loop {
        match client.heartbeat().await {
            Ok(new_lease) => {
                if new_lease || !recorded {
                    let node_ip = client
                        .register_node_ip(underlay_ip)
                        .await
                        .map_err(|s| s.message().to_string());
                    let eps = endpoints.rerecord().await.map_err(|e| e.to_string());
                    recorded = node_ip.is_ok() && eps.is_ok();
                    if let Err(e) = node_ip.and(eps) {
                        tracing::warn!(error = %e, "could not record the node with the identity service; retrying");
                    }
                }
            }
            Err(s) => tracing::warn!(error = %s.message(), "identity heartbeat failed"),
        }
        tokio::time::sleep(if recorded {
            HEARTBEAT
        } else {
            Duration::from_millis(500)
        })
        .await;
    }
}

/// Takes the node's first identity lease, retrying while the identity
/// service is unreachable.
async fn first_lease(client: &IdentityClient) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        match client.heartbeat().await {
            Ok(_) => return Ok(()),
            Err(s) if tokio::time::Instant::now() < deadline => {
                tracing::warn!(error = %s.message(), "identity service not reachable yet");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(s) => anyhow::bail!("identity lease: {}", s.message()),
        }
    }
}

/// The datapath's ipcache map, for [`IpcacheSink`].
struct DatapathIpcache(Arc<Mutex<bpf::Datapath>>);

impl IpcacheMap for DatapathIpcache {
    fn entries(&mut self) -> Result<BTreeMap<Ipv4Net, u32>, String> {
        let dp = self.0.lock().unwrap_or_else(|p| p.into_inner());
        Ok(dp
            .ipcache()
            .map_err(|e| format!("{e:#}"))?
            .into_iter()
            .collect())
    }
    fn upsert(&mut self, prefix: Ipv4Net, identity: u32) -> Result<(), String> {
        let mut dp = self.0.lock().unwrap_or_else(|p| p.into_inner());
        dp.upsert_ipcache(prefix, identity)
            .map_err(|e| format!("{e:#}"))
    }
    fn remove(&mut self, prefix: Ipv4Net) -> Result<(), String> {
        let mut dp = self.0.lock().unwrap_or_else(|p| p.into_inner());
        dp.remove_ipcache(prefix)
            .map(drop)
            .map_err(|e| format!("{e:#}"))
    }
}

/// Applies `--xdp` to the underlay device; returns the mode now active.
fn attach_xdp(
    datapath: &mut bpf::Datapath,
    setting: Xdp,
    ifindex: u32,
    dev: &str,
) -> anyhow::Result<Option<bpf::XdpMode>> {
    let active = match setting {
        Xdp::Off => {
            datapath
                .detach_xdp(ifindex)
                .with_context(|| format!("detach bpf_xdp from `{dev}`"))?;
            None
        }
        Xdp::Native | Xdp::Generic => {
            let mode = if setting == Xdp::Native {
                bpf::XdpMode::Native
            } else {
                bpf::XdpMode::Generic
            };
            datapath
                .attach_xdp(ifindex, mode)
                .with_context(|| format!("attach bpf_xdp ({mode}) to `{dev}`"))?;
            Some(mode)
        }
        Xdp::Auto => {
            let veth = crate::netlink::link_kind(dev).as_deref() == Some("veth");
            let mut tries = vec![bpf::XdpMode::Generic];
            if !veth {
                tries.insert(0, bpf::XdpMode::Native);
            }
            tries.into_iter().find(|mode| {
                datapath
                    .attach_xdp(ifindex, *mode)
                    .inspect_err(
                        |e| tracing::warn!(error = %format!("{e:#}"), %mode, "XDP mode refused"),
                    )
                    .is_ok()
            })
        }
    };
    match active {
        Some(mode) => tracing::info!(%mode, dev, "XDP fast path attached"),
        None => tracing::warn!(dev, "no XDP fast path: tc handles all underlay traffic"),
    }
    Ok(active)
}

fn datapath_options(delivery: Delivery, f: &bpf::Features) -> anyhow::Result<bpf::DatapathOptions> {
    Ok(match delivery {
        Delivery::Auto => bpf::DatapathOptions::from_features(f),
        Delivery::RedirectPeer => {
            anyhow::ensure!(
                f.redirect_peer,
                "--delivery redirect-peer: this kernel has no bpf_redirect_peer"
            );
            bpf::DatapathOptions {
                redirect_peer: true,
                redirect_neigh: f.redirect_neigh,
            }
        }
        Delivery::RedirectNeigh => {
            anyhow::ensure!(
                f.redirect_neigh,
                "--delivery redirect-neigh: this kernel has no bpf_redirect_neigh"
            );
            bpf::DatapathOptions {
                redirect_peer: false,
                redirect_neigh: true,
            }
        }
        Delivery::Stack => bpf::DatapathOptions {
            redirect_peer: false,
            redirect_neigh: false,
        },
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
