//! Local clusters: `membrane up` builds one on this machine, `membrane down`
//! removes it.
//!
//! A local cluster is an underlay bridge (`mbr0`) in the host namespace, one
//! network namespace per node (`node-1` …) plus `external` ("the world"), a
//! single etcd, the cluster services listening on the bridge address, and a
//! `membrane-node-datapath` inside every node namespace — all under mTLS
//! from a development CA.
//!
//! Module map:
//! - [`plan`]: names and addresses derived from the flags (pure).
//! - [`net`]: the bridge, namespaces, veths and bpffs (the only user of `ip`).
//! - [`record`]: what this state directory created, so `down` removes exactly that.
//! - [`components`]: the table of services and where binaries are found.
//! - [`etcd`]: etcd's arguments and health probe.
//! - [`process`]: detached processes, pid files, logs, stopping.
//! - [`info`]: `cluster.json`, the description other commands read.
//!
//! State directory layout: `tls/` (kept by `down`), `logs/` (kept),
//! `pids/`, `etcd/`, `nodes/NODE/`, `created.json`, `cluster.json`.

pub mod cgroups;
pub(crate) mod components;
mod etcd;
mod info;
pub(crate) mod net;
mod plan;
mod process;
pub(crate) mod record;
mod restart;

pub use restart::restart;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use ipnet::Ipv4Net;
use membrane_runtime::pki::{self, LeafSpec};
use membrane_runtime::tls::TlsFiles;
use tokio::signal::unix::{Signal, SignalKind, signal};

use self::components::{CLI_IDENTITY, ETCD, NODE_BINARY, NODE_PORT, SERVICES, ServiceSpec};
#[allow(unused_imports, reason = "part of the module's API for other commands")]
pub use self::info::{ClusterInfo, ExternalInfo, NodeInfo, ServiceInfo, TlsPaths};
use self::plan::{BRIDGE, Member, NS_DEV, Plan};
use self::process::{Launch, Spawned};
use self::record::{Created, Record};

/// Root of the cluster's bpffs pins; node `K` pins under `membrane/node-K`.
const BPF_ROOT: &str = "/sys/fs/bpf/membrane";

/// How long a single health probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Flags of `membrane up`.
#[derive(Debug, Clone, clap::Args)]
pub struct UpArgs {
    /// Number of nodes: network namespaces `node-1` … `node-N`, each running a node datapath.
    #[arg(long, env = "MEMBRANE_NODES", default_value_t = 2)]
    pub nodes: u32,
    /// Return once every component is healthy instead of staying in the
    /// foreground (where Ctrl-C or SIGTERM stops the cluster).
    #[arg(long, env = "MEMBRANE_DETACH")]
    pub detach: bool,
    /// Underlay network: the bridge takes host address .1, node K .(10+K), external .200.
    #[arg(long, env = "MEMBRANE_UNDERLAY_CIDR", default_value = "10.99.0.0/24")]
    pub underlay_cidr: Ipv4Net,
    /// Pod CIDR of the whole cluster, split into one subnet per node.
    #[arg(long, env = "MEMBRANE_CLUSTER_CIDR", default_value = "10.200.0.0/16")]
    pub cluster_cidr: Ipv4Net,
    /// Prefix length of each node's pod subnet.
    #[arg(long, env = "MEMBRANE_NODE_MASK_SIZE", default_value_t = 24)]
    pub node_mask_size: u8,
    /// etcd client port on 127.0.0.1.
    #[arg(long, env = "MEMBRANE_ETCD_PORT", default_value_t = 23790)]
    pub etcd_port: u16,
    /// etcd peer port on 127.0.0.1.
    #[arg(long, env = "MEMBRANE_ETCD_PEER_PORT", default_value_t = 23800)]
    pub etcd_peer_port: u16,
    /// The etcd binary (default: `etcd` on PATH, then /usr/bin/etcd).
    #[arg(long, env = "MEMBRANE_ETCD_BINARY")]
    pub etcd_binary: Option<PathBuf>,
    /// Directory holding the component binaries. Default: next to this
    /// `membrane` executable, then PATH. When given, only this directory is searched.
    #[arg(long, env = "MEMBRANE_BIN_DIR")]
    pub bin_dir: Option<PathBuf>,
    /// OTLP/gRPC endpoint every component exports traces to, e.g. `http://127.0.0.1:4317`.
    #[arg(long, env = "MEMBRANE_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// Log filter passed to every component (`MEMBRANE_LOG`).
    #[arg(long, env = "MEMBRANE_COMPONENT_LOG", default_value = "info")]
    pub component_log: String,
    /// How pod traffic crosses nodes: `direct` routing over the underlay, or a `vxlan` tunnel.
    #[arg(long, env = "MEMBRANE_UP_ROUTING", default_value = "direct", value_parser = ["direct", "vxlan"])]
    pub routing: String,
    /// Seconds to wait for every component to report healthy.
    #[arg(long, env = "MEMBRANE_UP_TIMEOUT", default_value_t = 60)]
    pub timeout: u64,
    /// Service load-balancing algorithm for services without the
    /// `service.membrane.io/lb-algorithm` annotation: `random` or `maglev`.
    #[arg(long, env = "MEMBRANE_UP_LB_ALGORITHM", default_value = "maglev", value_parser = ["random", "maglev"])]
    pub lb_algorithm: String,
    /// Maglev table size M, one of the primes 251 … 131071 (see `membrane-lb --help`).
    #[arg(long, env = "MEMBRANE_UP_MAGLEV_TABLE_SIZE", default_value_t = membrane_lb::maglev::DEFAULT_TABLE_SIZE)]
    pub maglev_table_size: u32,
    /// Maglev seed: base64 of exactly 12 bytes. Unset: the lb service
    /// generates one on first start and keeps it in etcd.
    #[arg(long, env = "MEMBRANE_UP_MAGLEV_SEED")]
    pub maglev_seed: Option<String>,
    /// Pool LoadBalancer addresses come from (inside the underlay CIDR, so
    /// `external` reaches them through any node).
    #[arg(long, env = "MEMBRANE_UP_LB_POOL", default_value = "10.99.0.128/27")]
    pub lb_pool: Ipv4Net,
}

impl UpArgs {
    /// Rejects load-balancing settings the lb service would refuse, before
    /// anything is started or changed.
    fn validate_lb(&self) -> anyhow::Result<()> {
        membrane_lb::maglev::TableSize::new("--maglev-table-size", self.maglev_table_size.into())?;
        if let Some(seed) = &self.maglev_seed {
            membrane_lb::maglev::Seed::from_base64("--maglev-seed", seed)?;
        }
        anyhow::ensure!(
            self.underlay_cidr.contains(&self.lb_pool),
            "--lb-pool: {} is not inside the underlay {}",
            self.lb_pool,
            self.underlay_cidr
        );
        Ok(())
    }
}

/// `membrane up`: starts a local cluster (or reports the running one), then
/// either returns (`--detach`) or stays until Ctrl-C/SIGTERM and tears down.
pub async fn up_command(state_dir: &Path, args: UpArgs) -> anyhow::Result<()> {
    args.validate_lb()?;
    let plan = Plan::new(
        args.nodes,
        args.underlay_cidr,
        args.cluster_cidr,
        args.node_mask_size,
    )?;
    ensure_root("membrane up")?;
    let state_dir = std::path::absolute(state_dir)
        .with_context(|| format!("resolve {}", state_dir.display()))?;
    std::fs::create_dir_all(&state_dir)
        .with_context(|| format!("create {}", state_dir.display()))?;

    match existing_cluster(&state_dir, &plan, &args).await? {
        Existing::Nothing => {}
        Existing::Healthy(info) => {
            println!(
                "a local cluster with {} nodes is already running in {}",
                info.nodes.len(),
                state_dir.display()
            );
            print_summary(&info);
            return Ok(());
        }
        Existing::Leftovers => {
            println!(
                "cleaning up what an earlier cluster left in {}",
                state_dir.display()
            );
            teardown(&state_dir).await?;
        }
    }

    let mut signals = Signals::new()?;
    let started = tokio::select! {
        started = start(&state_dir, &plan, &args) => started,
        name = signals.recv() => {
            eprintln!("{name} received: removing the half-started cluster");
            teardown(&state_dir).await?;
            anyhow::bail!("interrupted by {name}");
        }
    };
    let (info, mut children) = started.with_context(|| {
        format!(
            "membrane up failed; `membrane down --state-dir {}` removes what was started",
            state_dir.display()
        )
    })?;
    print_summary(&info);
    if args.detach {
        return Ok(());
    }

    println!("running in the foreground; Ctrl-C stops the cluster");
    let name = supervise(&mut children, &mut signals).await;
    println!("{name} received: stopping the cluster");
    let result = teardown(&state_dir).await;
    for child in &mut children {
        let _ = child.child.try_wait();
    }
    result
}

/// `membrane down`: stops every process the cluster in `state_dir` started
/// and deletes every namespace, device and bpffs pin it created. Safe on a
/// half-started cluster and when nothing runs.
pub async fn down(state_dir: &Path) -> anyhow::Result<()> {
    let state_dir = std::path::absolute(state_dir)
        .with_context(|| format!("resolve {}", state_dir.display()))?;
    let nothing = Record::load(&state_dir)?.is_empty()
        && process::pid_entries(&state_dir).is_empty()
        && !ClusterInfo::path(&state_dir).exists();
    if nothing {
        println!("no local cluster in {}", state_dir.display());
        return Ok(());
    }
    ensure_root("membrane down")?;
    teardown(&state_dir).await?;
    println!(
        "local cluster in {} is down (logs and certificates kept)",
        state_dir.display()
    );
    Ok(())
}

// === up ===

/// What a state directory holds before `up`.
enum Existing {
    Nothing,
    Healthy(Box<ClusterInfo>),
    Leftovers,
}

async fn existing_cluster(
    state_dir: &Path,
    plan: &Plan,
    args: &UpArgs,
) -> anyhow::Result<Existing> {
    let record = Record::load(state_dir)?;
    let pids = process::pid_entries(state_dir);
    let info_exists = ClusterInfo::path(state_dir).exists();
    if record.is_empty() && pids.is_empty() && !info_exists {
        return Ok(Existing::Nothing);
    }
    let any_alive = pids.iter().any(|e| {
        components::program_of(&e.name)
            .is_some_and(|p| process::is_alive(e.pid) && process::runs_program(e.pid, &p))
    });
    if let (true, Ok(info)) = (any_alive, ClusterInfo::load(state_dir)) {
        let differences = differences(&info, plan, args);
        if !differences.is_empty() {
            anyhow::bail!(
                "a local cluster with {} nodes is already running in {} and differs from the flags ({}); \
                 run `membrane down --state-dir {}` first",
                info.nodes.len(),
                state_dir.display(),
                differences.join(", "),
                state_dir.display()
            );
        }
        if is_healthy(&info, args.etcd_port).await {
            return Ok(Existing::Healthy(Box::new(info)));
        }
    }
    Ok(Existing::Leftovers)
}

/// Settings of the running cluster that the new flags would change.
fn differences(info: &ClusterInfo, plan: &Plan, args: &UpArgs) -> Vec<String> {
    let mut diffs = Vec::new();
    let mut check = |what: &str, running: String, wanted: String| {
        if running != wanted {
            diffs.push(format!("{what}: running {running}, requested {wanted}"));
        }
    };
    check(
        "--nodes",
        info.nodes.len().to_string(),
        plan.nodes.len().to_string(),
    );
    check(
        "--underlay-cidr",
        info.underlay_cidr.to_string(),
        plan.underlay.to_string(),
    );
    check(
        "--cluster-cidr",
        info.cluster_cidr.to_string(),
        plan.cluster_cidr.to_string(),
    );
    check(
        "--node-mask-size",
        info.node_mask_size.to_string(),
        plan.node_mask_size.to_string(),
    );
    check(
        "--etcd-port",
        info.etcd_endpoint.clone(),
        etcd::client_url(args.etcd_port),
    );
    diffs
}

/// Whether every process of `info` runs and answers its health check.
async fn is_healthy(info: &ClusterInfo, etcd_port: u16) -> bool {
    let entries = process::pid_entries(&info.state_dir);
    let all_ours = info.pids().all(|pid| {
        entries.iter().any(|e| {
            e.pid == pid
                && components::program_of(&e.name)
                    .is_some_and(|p| process::is_alive(pid) && process::runs_program(pid, &p))
        })
    });
    if !all_ours || !etcd::is_healthy(etcd_port, PROBE_TIMEOUT).await {
        return false;
    }
    let tls = info.tls_files();
    let probes = info
        .services
        .iter()
        .map(|s| (s.endpoint.clone(), s.server_name.clone()))
        .chain(
            info.nodes
                .iter()
                .filter(|n| n.pid.is_some())
                .map(|n| (n.endpoint.clone(), n.server_name.clone())),
        )
        .collect::<Vec<_>>();
    let checks = probes.iter().map(|(url, name)| {
        membrane_runtime::grpc::check_health(url, name, Some(&tls), PROBE_TIMEOUT)
    });
    futures::future::join_all(checks)
        .await
        .iter()
        .all(Result::is_ok)
}

/// Brings the cluster up step by step. On error, everything started so far
/// is recorded in the state directory for `down`.
async fn start(
    state_dir: &Path,
    plan: &Plan,
    args: &UpArgs,
) -> anyhow::Result<(ClusterInfo, Vec<Spawned>)> {
    let deadline = Instant::now() + Duration::from_secs(args.timeout);

    if net::ensure_bpffs()? {
        println!("mounted bpffs at {}", net::BPFFS);
    }

    let tls_dir = state_dir.join("tls");
    let leaves: Vec<LeafSpec> = SERVICES
        .iter()
        .map(|s| LeafSpec::service(s.name))
        .chain(plan.nodes.iter().map(|n| LeafSpec::node(&n.netns)))
        .chain([LeafSpec::client(CLI_IDENTITY)])
        .collect();
    pki::ensure_bundle(&tls_dir, &leaves)
        .with_context(|| format!("certificates in {}", tls_dir.display()))?;
    let cli_tls = pki::leaf_files(&tls_dir, CLI_IDENTITY);

    let mut record = Record::load(state_dir)?;
    create_network(state_dir, &mut record, plan)?;
    println!(
        "underlay {} on {BRIDGE} ({}), namespaces: {}",
        plan.underlay,
        plan.gateway,
        plan.members()
            .map(|m| m.netns.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    for node in &plan.nodes {
        create_bpf_dir(&mut record, &Path::new(BPF_ROOT).join(&node.netns))?;
    }

    let mut children = Vec::new();

    // etcd
    let etcd_binary = match &args.etcd_binary {
        Some(path) => path.clone(),
        None => components::on_path("etcd")
            .or_else(|| Some(PathBuf::from("/usr/bin/etcd")).filter(|p| p.is_file()))
            .context(
                "etcd not found on PATH or at /usr/bin/etcd (Debian: apt install etcd-server)",
            )?,
    };
    let etcd_endpoint = etcd::client_url(args.etcd_port);
    children.push(process::spawn(
        state_dir,
        &Launch {
            name: ETCD.to_string(),
            program: etcd_binary,
            args: etcd::args(&state_dir.join("etcd"), args.etcd_port, args.etcd_peer_port),
            env: Vec::new(),
            netns: None,
        },
    )?);
    wait_ready(
        state_dir,
        &mut children,
        vec![Probe::Etcd {
            name: ETCD.to_string(),
            port: args.etcd_port,
        }],
        &cli_tls,
        deadline,
    )
    .await?;

    // services
    let mut started: Vec<(&ServiceSpec, ServiceInfo)> = Vec::new();
    for spec in SERVICES {
        let Some(binary) = components::find_binary(spec.binary, args.bin_dir.as_deref()) else {
            println!("skipping {}: {} not found", spec.name, spec.binary);
            continue;
        };
        let listen = format!("{}:{}", plan.gateway, spec.port);
        let mut env = common_env(args, &pki::leaf_files(&tls_dir, spec.name));
        env.extend([
            ("MEMBRANE_LISTEN".to_string(), listen.clone()),
            ("MEMBRANE_ETCD_ENDPOINTS".to_string(), etcd_endpoint.clone()),
        ]);
        env.push((
            "MEMBRANE_METRICS_LISTEN".to_string(),
            format!("{}:{}", plan.gateway, spec.port + 2000),
        ));
        if spec.name == "lb" {
            // Nodes program services from the lb stream (socket-level load balancing).
            env.push(("MEMBRANE_LB_PUBLISH".to_string(), "true".to_string()));
            env.push((
                "MEMBRANE_LB_ALGORITHM".to_string(),
                args.lb_algorithm.clone(),
            ));
            env.push((
                "MEMBRANE_LB_MAGLEV_TABLE_SIZE".to_string(),
                args.maglev_table_size.to_string(),
            ));
            env.push(("MEMBRANE_LB_POOL".to_string(), args.lb_pool.to_string()));
            if let Some(seed) = &args.maglev_seed {
                env.push(("MEMBRANE_LB_MAGLEV_SEED".to_string(), seed.clone()));
            }
        }
        if spec.name == "relay" {
            // The relay keeps the cluster's certificates from expiring.
            env.push((
                "MEMBRANE_PKI_DIR".to_string(),
                tls_dir.display().to_string(),
            ));
        }
        // Services that follow others' streams (policy follows identity)
        // find them the way nodes do. The table is in dependency order.
        for (dep, service) in &started {
            env.push((dep.node_env.to_string(), service.endpoint.clone()));
            env.push((dep.node_server_name_env(), service.server_name.clone()));
        }
        let child = process::spawn(
            state_dir,
            &Launch {
                name: spec.name.to_string(),
                program: binary,
                args: Vec::new(),
                env,
                netns: None,
            },
        )?;
        started.push((
            spec,
            ServiceInfo {
                name: spec.name.to_string(),
                endpoint: format!("https://{listen}"),
                server_name: pki::service_server_name(spec.name),
                pid: child.pid,
            },
        ));
        children.push(child);
    }
    let probes = started
        .iter()
        .map(|(_, s)| Probe::Grpc {
            name: s.name.clone(),
            url: s.endpoint.clone(),
            server_name: s.server_name.clone(),
        })
        .collect();
    wait_ready(state_dir, &mut children, probes, &cli_tls, deadline).await?;

    // nodes
    let node_binary = components::find_binary(NODE_BINARY, args.bin_dir.as_deref());
    if node_binary.is_none() {
        println!("skipping node datapaths: {NODE_BINARY} not found");
    }
    let mut nodes = Vec::new();
    for node in &plan.nodes {
        let listen = format!("{}:{NODE_PORT}", node.ip);
        let mut info = NodeInfo {
            name: node.netns.clone(),
            netns: node.netns.clone(),
            underlay_ip: node.ip,
            endpoint: format!("https://{listen}"),
            server_name: pki::node_server_name(&node.netns),
            pid: None,
        };
        if let Some(binary) = &node_binary {
            let node_state = state_dir.join("nodes").join(&node.netns);
            std::fs::create_dir_all(&node_state)
                .with_context(|| format!("create {}", node_state.display()))?;
            let mut env = common_env(args, &pki::leaf_files(&tls_dir, &node.netns));
            env.extend([
                ("MEMBRANE_NODE_NAME".to_string(), node.netns.clone()),
                ("MEMBRANE_UNDERLAY_IP".to_string(), node.ip.to_string()),
                ("MEMBRANE_UNDERLAY_DEV".to_string(), NS_DEV.to_string()),
                ("MEMBRANE_LISTEN".to_string(), listen),
                (
                    "MEMBRANE_METRICS_LISTEN".to_string(),
                    format!("{}:9200", node.ip),
                ),
                ("MEMBRANE_ROUTING".to_string(), args.routing.clone()),
                ("MEMBRANE_SERVICE_LB".to_string(), "true".to_string()),
                (
                    "MEMBRANE_BPF_PIN_DIR".to_string(),
                    Path::new(BPF_ROOT).join(&node.netns).display().to_string(),
                ),
                (
                    "MEMBRANE_STATE_DIR".to_string(),
                    node_state.display().to_string(),
                ),
            ]);
            for (spec, service) in &started {
                env.push((spec.node_env.to_string(), service.endpoint.clone()));
                env.push((spec.node_server_name_env(), service.server_name.clone()));
            }
            let child = process::spawn(
                state_dir,
                &Launch {
                    name: node.netns.clone(),
                    program: binary.clone(),
                    args: Vec::new(),
                    env,
                    netns: Some(node.netns.clone()),
                },
            )?;
            info.pid = Some(child.pid);
            children.push(child);
        }
        nodes.push(info);
    }
    let probes = nodes
        .iter()
        .filter(|n| n.pid.is_some())
        .map(|n| Probe::Grpc {
            name: n.name.clone(),
            url: n.endpoint.clone(),
            server_name: n.server_name.clone(),
        })
        .collect();
    wait_ready(state_dir, &mut children, probes, &cli_tls, deadline).await?;

    let info = ClusterInfo {
        state_dir: state_dir.to_path_buf(),
        etcd_endpoint,
        etcd_pid: children.first().map(|c| c.pid).unwrap_or_default(),
        underlay_cidr: plan.underlay,
        underlay_gateway: plan.gateway,
        bridge: BRIDGE.to_string(),
        cluster_cidr: plan.cluster_cidr,
        node_mask_size: plan.node_mask_size,
        tls: TlsPaths::from(&cli_tls),
        services: started.into_iter().map(|(_, s)| s).collect(),
        nodes,
        external: ExternalInfo {
            netns: plan.external.netns.clone(),
            ip: plan.external.ip,
        },
    };
    // cluster.json appears only once everything is ready.
    route_external_to_pods(&info, &cli_tls).await?;
    info.save()?;
    Ok((info, children))
}

/// Gives `external` a route to every node's pod CIDR via that node, as an
/// upstream router that learned them would have: the world can then reach
/// pods (and policy decides whether it may).
async fn route_external_to_pods(info: &ClusterInfo, tls: &TlsFiles) -> anyhow::Result<()> {
    let Some(ipam) = info.services.iter().find(|s| s.name == "ipam") else {
        return Ok(());
    };
    if !info.nodes.iter().any(|n| n.pid.is_some()) {
        return Ok(());
    }
    let channel =
        membrane_runtime::grpc::connect(&ipam.endpoint, &ipam.server_name, Some(tls)).await?;
    let nodes = membrane_proto::ipam::v1::ipam_client::IpamClient::new(channel)
        .list_nodes(membrane_proto::ipam::v1::ListNodesRequest {})
        .await
        .map_err(|s| anyhow::anyhow!("list nodes from ipam: {}", s.message()))?
        .into_inner()
        .nodes;
    for n in nodes {
        net::ip_in_netns(
            &info.external.netns,
            &["route", "replace", &n.pod_cidr, "via", &n.underlay_ip],
        )?;
    }
    Ok(())
}

/// Environment every Membrane component gets: its mTLS files, log filter,
/// pod CIDR and, when set, the OTLP endpoint.
fn common_env(args: &UpArgs, tls: &TlsFiles) -> Vec<(String, String)> {
    let mut env = vec![
        ("MEMBRANE_TLS_CA".to_string(), tls.ca.display().to_string()),
        (
            "MEMBRANE_TLS_CERT".to_string(),
            tls.cert.display().to_string(),
        ),
        (
            "MEMBRANE_TLS_KEY".to_string(),
            tls.key.display().to_string(),
        ),
        ("MEMBRANE_LOG".to_string(), args.component_log.clone()),
        (
            "MEMBRANE_CLUSTER_CIDR".to_string(),
            args.cluster_cidr.trunc().to_string(),
        ),
        (
            "MEMBRANE_NODE_MASK_SIZE".to_string(),
            args.node_mask_size.to_string(),
        ),
    ];
    if let Some(otlp) = &args.otlp_endpoint {
        env.push(("MEMBRANE_OTLP_ENDPOINT".to_string(), otlp.clone()));
    }
    env
}

/// Creates the bridge and every namespace with its veth, refusing up front
/// when a name is taken by something this cluster did not create.
fn create_network(state_dir: &Path, record: &mut Record, plan: &Plan) -> anyhow::Result<()> {
    let mut taken = Vec::new();
    if net::link_exists(BRIDGE) && !record.owns_link(BRIDGE) {
        taken.push(format!("device `{BRIDGE}`"));
    }
    for member in plan.members() {
        if net::netns_exists(&member.netns) && !record.owns_netns(&member.netns) {
            taken.push(format!("network namespace `{}`", member.netns));
        }
        if net::link_exists(&member.host_dev) && !record.owns_link(&member.host_dev) {
            taken.push(format!("device `{}`", member.host_dev));
        }
    }
    if !taken.is_empty() {
        anyhow::bail!(
            "{} already exist but were not created by the cluster in {}; \
             stop the cluster that made them (`membrane down --state-dir ITS_DIR`) or delete them by hand",
            taken.join(", "),
            state_dir.display()
        );
    }

    record.add_link(BRIDGE)?;
    net::del_link(BRIDGE)?;
    net::add_bridge(BRIDGE, &plan.underlay_addr(plan.gateway))?;
    for member in plan.members() {
        connect_member(record, plan, member)?;
    }
    Ok(())
}

fn connect_member(record: &mut Record, plan: &Plan, member: &Member) -> anyhow::Result<()> {
    record.add_netns(&member.netns)?;
    net::del_netns(&member.netns)?;
    net::add_netns(&member.netns)?;
    record.add_link(&member.host_dev)?;
    net::del_link(&member.host_dev)?;
    net::connect_netns(
        BRIDGE,
        &member.netns,
        &member.host_dev,
        NS_DEV,
        &plan.underlay_addr(member.ip),
        &plan.gateway.to_string(),
    )?;
    Ok(())
}

/// Creates a bpffs directory (and [`BPF_ROOT`] if needed), recording what
/// did not exist before.
fn create_bpf_dir(record: &mut Record, dir: &Path) -> anyhow::Result<()> {
    for path in [Path::new(BPF_ROOT), dir] {
        if !path.exists() {
            record.add_bpf_dir(path)?;
            std::fs::create_dir(path).with_context(|| format!("create {}", path.display()))?;
        }
    }
    Ok(())
}

/// A readiness check of one component.
enum Probe {
    Etcd {
        name: String,
        port: u16,
    },
    Grpc {
        name: String,
        url: String,
        server_name: String,
    },
}

impl Probe {
    fn name(&self) -> &str {
        match self {
            Probe::Etcd { name, .. } | Probe::Grpc { name, .. } => name,
        }
    }

    async fn ready(&self, tls: &TlsFiles) -> Result<(), String> {
        match self {
            Probe::Etcd { port, .. } => {
                if etcd::is_healthy(*port, PROBE_TIMEOUT).await {
                    Ok(())
                } else {
                    Err(format!(
                        "{} does not report healthy",
                        etcd::client_url(*port)
                    ))
                }
            }
            Probe::Grpc {
                url, server_name, ..
            } => membrane_runtime::grpc::check_health(url, server_name, Some(tls), PROBE_TIMEOUT)
                .await
                .map_err(|e| format!("{e:#}")),
        }
    }
}

/// Polls `probes` until all pass. Fails as soon as a probed process exits,
/// or at `deadline`, printing the tail of the culprit's log.
async fn wait_ready(
    state_dir: &Path,
    children: &mut [Spawned],
    mut pending: Vec<Probe>,
    tls: &TlsFiles,
    deadline: Instant,
) -> anyhow::Result<()> {
    loop {
        for probe in &pending {
            let Some(child) = children.iter_mut().find(|c| c.name == probe.name()) else {
                continue;
            };
            if let Ok(Some(status)) = child.child.try_wait() {
                print_log_tail(&child.log);
                anyhow::bail!(
                    "{} exited during startup ({status}); see {}",
                    child.name,
                    child.log.display()
                );
            }
        }
        let results = futures::future::join_all(pending.iter().map(|probe| probe.ready(tls))).await;
        let mut still = Vec::new();
        let mut last_errors = Vec::new();
        for (probe, result) in pending.into_iter().zip(results) {
            match result {
                Ok(()) => println!("  {} is ready", probe.name()),
                Err(e) => {
                    last_errors.push(format!("{}: {e}", probe.name()));
                    still.push(probe);
                }
            }
        }
        pending = still;
        if pending.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            for probe in &pending {
                print_log_tail(&process::log_file(state_dir, probe.name()));
            }
            anyhow::bail!("not healthy in time: {}", last_errors.join("; "));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

fn print_log_tail(log: &Path) {
    eprintln!(
        "--- last lines of {} ---\n{}\n---",
        log.display(),
        process::log_tail(log, 20)
    );
}

/// Waits in the foreground for a stop signal, reporting components that die.
async fn supervise(children: &mut [Spawned], signals: &mut Signals) -> &'static str {
    let mut reported = vec![false; children.len()];
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            name = signals.recv() => return name,
            _ = tick.tick() => {
                for (child, reported) in children.iter_mut().zip(reported.iter_mut()) {
                    if let (false, Ok(Some(status))) = (*reported, child.child.try_wait()) {
                        eprintln!("warning: {} exited ({status}); see {}", child.name, child.log.display());
                        *reported = true;
                    }
                }
            }
        }
    }
}

/// SIGINT, SIGTERM and SIGHUP: each means "stop the cluster".
struct Signals {
    int: Signal,
    term: Signal,
    hup: Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Self> {
        Ok(Self {
            int: signal(SignalKind::interrupt()).context("listen for SIGINT")?,
            term: signal(SignalKind::terminate()).context("listen for SIGTERM")?,
            hup: signal(SignalKind::hangup()).context("listen for SIGHUP")?,
        })
    }

    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.int.recv() => "SIGINT",
            _ = self.term.recv() => "SIGTERM",
            _ = self.hup.recv() => "SIGHUP",
        }
    }
}

fn print_summary(info: &ClusterInfo) {
    let mut rows = vec![(
        ETCD.to_string(),
        info.etcd_endpoint.clone(),
        "-".to_string(),
        format!("host, pid {}", info.etcd_pid),
    )];
    for s in &info.services {
        rows.push((
            s.name.clone(),
            s.endpoint.clone(),
            s.server_name.clone(),
            format!("host, pid {}", s.pid),
        ));
    }
    for n in &info.nodes {
        let (endpoint, server_name, pid) = match n.pid {
            Some(pid) => (
                n.endpoint.clone(),
                n.server_name.clone(),
                format!("pid {pid}"),
            ),
            None => (
                n.underlay_ip.to_string(),
                "-".to_string(),
                "no datapath".to_string(),
            ),
        };
        rows.push((
            n.name.clone(),
            endpoint,
            server_name,
            format!("netns {}, {pid}", n.netns),
        ));
    }
    rows.push((
        "external".to_string(),
        info.external.ip.to_string(),
        "-".to_string(),
        format!("netns {}", info.external.netns),
    ));
    println!(
        "local cluster: {} nodes, underlay {} (gateway {} on {}), pods {} (/{} per node)",
        info.nodes.len(),
        info.underlay_cidr,
        info.underlay_gateway,
        info.bridge,
        info.cluster_cidr,
        info.node_mask_size
    );
    println!(
        "  {:<14} {:<26} {:<34} WHERE",
        "COMPONENT", "ENDPOINT", "SERVER NAME"
    );
    for (name, endpoint, server_name, place) in rows {
        println!("  {name:<14} {endpoint:<26} {server_name:<34} {place}");
    }
    println!(
        "  CLI certificate {}; logs in {}",
        info.tls.cert.display(),
        info.state_dir.join("logs").display()
    );
}

// === down ===

/// Removes what the cluster in `state_dir` started and created, trying every
/// step even when one fails; what could not be removed stays recorded so the
/// next `down` retries it.
async fn teardown(state_dir: &Path) -> anyhow::Result<()> {
    let mut errors: Vec<String> = Vec::new();

    let entries = process::pid_entries(state_dir);
    // Pods live in namespaces that go with the cluster; their records go too.
    let mut state_dirs = vec!["etcd", "nodes", "pids", "pods", "launch"];
    match process::stop_all(&entries, components::program_of).await {
        Ok(killed) if !killed.is_empty() => {
            println!("killed after the grace period: {}", killed.join(", "));
        }
        Ok(_) => {}
        Err(e) => {
            // Keep the pid files so the next `down` tries again.
            state_dirs.retain(|d| *d != "pids");
            errors.push(format!("{e:#}"));
        }
    }

    let mut record = Record::load(state_dir)?;
    let created = std::mem::take(&mut record.created);
    let mut left = Created::default();
    // Pods' processes (anything a user started with `pod exec`) go with
    // their cgroups, before the namespaces they hold.
    let nodes: Vec<&String> = created
        .netns
        .iter()
        .filter(|n| n.starts_with("node-"))
        .collect();
    for node in &nodes {
        let node_dir = cgroups::root().join(node);
        for pod in created.netns.iter().filter(|n| n.starts_with("pod-")) {
            if let Err(e) = cgroups::kill_and_remove(&node_dir.join(pod)) {
                errors.push(e);
            }
        }
        cgroups::remove_if_empty(&node_dir);
    }
    cgroups::remove_if_empty(&cgroups::root());
    for netns in created.netns {
        if let Err(e) = net::del_netns(&netns) {
            errors.push(e.to_string());
            left.netns.push(netns);
        }
    }
    // Veths before the bridge they are enslaved to.
    for link in created.links.into_iter().rev() {
        if let Err(e) = net::del_link(&link) {
            errors.push(e.to_string());
            left.links.insert(0, link);
        }
    }
    for dir in created.bpf_dirs.into_iter().rev() {
        let result = if dir == Path::new(BPF_ROOT) {
            // Someone else may pin here too: only an empty root is ours to remove.
            match std::fs::remove_dir(&dir) {
                Err(e) if e.kind() == std::io::ErrorKind::DirectoryNotEmpty => {
                    eprintln!("leaving {}: not empty", dir.display());
                    Ok(())
                }
                other => other,
            }
        } else {
            std::fs::remove_dir_all(&dir)
        };
        match result {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                errors.push(format!("remove {}: {e}", dir.display()));
                left.bpf_dirs.insert(0, dir);
            }
            _ => {}
        }
    }
    record.created = left;
    record.save()?;

    for path in [ClusterInfo::path(state_dir)] {
        if let Err(e) = std::fs::remove_file(&path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            errors.push(format!("remove {}: {e}", path.display()));
        }
    }
    for dir in state_dirs.into_iter().map(|d| state_dir.join(d)) {
        if let Err(e) = std::fs::remove_dir_all(&dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            errors.push(format!("remove {}: {e}", dir.display()));
        }
    }

    if !errors.is_empty() {
        anyhow::bail!("could not remove everything:\n  {}", errors.join("\n  "));
    }
    Ok(())
}

// === helpers ===

fn ensure_root(what: &str) -> anyhow::Result<()> {
    if effective_uid() != Some(0) {
        anyhow::bail!("{what} needs root (network namespaces, devices, bpffs)");
    }
    Ok(())
}

/// The effective uid, from /proc (nix's `geteuid` needs a feature the
/// workspace does not enable).
fn effective_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// Writes `bytes` to `path` through a temporary file and a rename, so readers
/// never see a partial `cluster.json`.
fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, bytes).with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("write {}", path.display()))
}
