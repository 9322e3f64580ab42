//! The domain: validated services and their backends, the allocation
//! choices, and the per-service state that is published. Plain Rust: no
//! I/O, no generated types.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::ops::RangeInclusive;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::maglev::{Seed, TableSize};

/// NodePorts are allocated from here (the Kubernetes default range).
pub const NODE_PORT_RANGE: RangeInclusive<u16> = 30000..=32767;

/// The service type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServiceType {
    /// A ClusterIP only.
    ClusterIP,
    /// ClusterIP plus a NodePort per port.
    NodePort,
    /// NodePort plus an address from the LoadBalancer pool.
    LoadBalancer,
}

/// Transport protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        })
    }
}

/// Backend selection algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Algorithm {
    /// A random backend per flow.
    Random,
    /// Maglev consistent hashing.
    Maglev,
}

impl std::str::FromStr for Algorithm {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "random" => Ok(Self::Random),
            "maglev" => Ok(Self::Maglev),
            other => Err(format!(
                "unknown algorithm `{other}` (use random or maglev)"
            )),
        }
    }
}

/// One service port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServicePort {
    /// Name (may be empty when the service has one port).
    pub name: String,
    /// Protocol.
    pub protocol: Protocol,
    /// Port on the ClusterIP, LoadBalancer address and external IPs.
    pub port: u16,
    /// Port on the backends.
    pub target_port: u16,
    /// NodePort: requested, or allocated once stored.
    pub node_port: Option<u16>,
}

/// A validated service; once stored, with every allocation filled in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Type.
    pub kind: ServiceType,
    /// ClusterIP: requested, or allocated once stored.
    pub cluster_ip: Option<Ipv4Addr>,
    /// Ports.
    pub ports: Vec<ServicePort>,
    /// Pod selector; `None` means backends come from Endpoints/EndpointSlices.
    pub selector: Option<BTreeMap<String, String>>,
    /// `spec.externalIPs`.
    pub external_ips: Vec<Ipv4Addr>,
    /// LoadBalancer address: requested (`spec.loadBalancerIP`), or allocated.
    pub load_balancer_ip: Option<Ipv4Addr>,
    /// ClientIP affinity timeout in seconds.
    pub affinity_timeout: Option<u32>,
    /// Algorithm from the annotation; `None` uses the service's default.
    pub algorithm: Option<Algorithm>,
    /// Hash the source address only.
    pub hash_source_only: bool,
}

impl Service {
    /// `namespace/name`.
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Whether the type asks for NodePorts.
    pub fn wants_node_ports(&self) -> bool {
        matches!(self.kind, ServiceType::NodePort | ServiceType::LoadBalancer)
    }
}

/// Backends declared by an `Endpoints` object or one `EndpointSlice`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointSet {
    /// Namespace.
    pub namespace: String,
    /// Service the backends belong to.
    pub service: String,
    /// `endpoints/<ns>/<name>` or `endpointslice/<ns>/<name>`.
    pub source: String,
    /// Backends with their weights (0: not ready / terminating → drain).
    pub backends: Vec<(Ipv4Addr, u32)>,
    /// Target port per port name, overriding the service's targetPort.
    pub ports: BTreeMap<String, u16>,
}

/// A running pod, as learned from the identity service's stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pod {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Address.
    pub address: Ipv4Addr,
    /// Labels (`key` → `value`, without the `k8s:` source).
    pub labels: BTreeMap<String, String>,
}

/// Cluster-wide settings that every replica must share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LbConfig {
    /// ClusterIPs come from here.
    pub service_cidr: Ipv4Net,
    /// LoadBalancer addresses come from here.
    pub lb_pool: Ipv4Net,
    /// Algorithm for services without the annotation.
    pub default_algorithm: Algorithm,
    /// Maglev table size.
    pub table_size: TableSize,
}

/// Where a frontend is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum FrontendKind {
    /// ClusterIP.
    ClusterIp,
    /// NodePort (every node's underlay address).
    NodePort,
    /// LoadBalancer address.
    LoadBalancer,
    /// External IP.
    ExternalIp,
}

/// One frontend.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Frontend {
    /// Kind.
    pub kind: FrontendKind,
    /// Address; `None` for NodePorts.
    pub address: Option<Ipv4Addr>,
    /// Port.
    pub port: u16,
    /// Protocol.
    pub protocol: Protocol,
    /// Service port name.
    pub port_name: String,
    /// Backend port.
    pub target_port: u16,
    /// The node that announces the address on the underlay (answers ARP
    /// for it): LoadBalancer and externalIPs frontends, once a node is
    /// subscribed; see [`announcer`].
    pub announcer: Option<String>,
}

/// One backend as published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    /// Stable id.
    pub id: u32,
    /// Address.
    pub address: Ipv4Addr,
    /// Weight (0: drain).
    pub weight: u32,
    /// Where it came from.
    pub source: String,
}

/// Everything a node needs for one service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceState {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Frontends, sorted.
    pub frontends: Vec<Frontend>,
    /// Algorithm.
    pub algorithm: Algorithm,
    /// Source-address-only hashing.
    pub hash_source_only: bool,
    /// Affinity timeout (0: none).
    pub affinity_timeout: u32,
    /// Backends sorted by address.
    pub backends: Vec<Backend>,
    /// Maglev M.
    pub table_size: TableSize,
    /// Maglev seed.
    pub seed: Seed,
}

/// Whether `pod` is selected by `selector` in `namespace`.
pub fn selects(selector: &BTreeMap<String, String>, namespace: &str, pod: &Pod) -> bool {
    pod.namespace == namespace && selector.iter().all(|(k, v)| pod.labels.get(k) == Some(v))
}

/// Backend candidates of `svc` (address → (weight, source)), before ids:
/// selected pods, or the endpoint sets naming it. Returns the target port
/// overrides from endpoint sets too.
pub fn backends_of(
    svc: &Service,
    pods: &[Pod],
    sets: &[EndpointSet],
) -> (BTreeMap<Ipv4Addr, (u32, String)>, BTreeMap<String, u16>) {
    let mut out = BTreeMap::new();
    let mut ports = BTreeMap::new();
    match &svc.selector {
        Some(sel) => {
            for p in pods.iter().filter(|p| selects(sel, &svc.namespace, p)) {
                out.entry(p.address)
                    .or_insert((1, format!("pod/{}/{}", p.namespace, p.name)));
            }
        }
        None => {
            for s in sets
                .iter()
                .filter(|s| s.namespace == svc.namespace && s.service == svc.name)
            {
                for (addr, w) in &s.backends {
                    // The first set naming an address wins; sets arrive sorted by key.
                    out.entry(*addr).or_insert((*w, s.source.clone()));
                }
                for (k, v) in &s.ports {
                    ports.entry(k.clone()).or_insert(*v);
                }
            }
        }
    }
    (out, ports)
}

/// The published state of a stored `svc`. Backends without an id yet are
/// left out (they are published once their id is stored).
pub fn service_state(
    svc: &Service,
    config: &LbConfig,
    seed: Seed,
    pods: &[Pod],
    sets: &[EndpointSet],
    ids: &BTreeMap<Ipv4Addr, u32>,
) -> ServiceState {
    let (candidates, port_overrides) = backends_of(svc, pods, sets);
    let mut frontends = Vec::new();
    for p in &svc.ports {
        let target = port_overrides
            .get(&p.name)
            .copied()
            .unwrap_or(p.target_port);
        let mut push = |kind, address, port| {
            frontends.push(Frontend {
                kind,
                address,
                port,
                protocol: p.protocol,
                port_name: p.name.clone(),
                target_port: target,
                announcer: None,
            })
        };
        if let Some(ip) = svc.cluster_ip {
            push(FrontendKind::ClusterIp, Some(ip), p.port);
        }
        if let (true, Some(np)) = (svc.wants_node_ports(), p.node_port) {
            push(FrontendKind::NodePort, None, np);
        }
        if let (ServiceType::LoadBalancer, Some(ip)) = (svc.kind, svc.load_balancer_ip) {
            push(FrontendKind::LoadBalancer, Some(ip), p.port);
        }
        for ip in &svc.external_ips {
            push(FrontendKind::ExternalIp, Some(*ip), p.port);
        }
    }
    frontends.sort();
    let backends = candidates
        .into_iter()
        .filter_map(|(address, (weight, source))| {
            ids.get(&address).map(|id| Backend {
                id: *id,
                address,
                weight,
                source,
            })
        })
        .collect();
    ServiceState {
        namespace: svc.namespace.clone(),
        name: svc.name.clone(),
        frontends,
        algorithm: svc.algorithm.unwrap_or(config.default_algorithm),
        hash_source_only: svc.hash_source_only,
        affinity_timeout: svc.affinity_timeout.unwrap_or(0),
        backends,
        table_size: config.table_size,
        seed,
    }
}

/// A free host address of `net` (not its network or broadcast address),
/// starting the search at a position derived from `random`.
pub fn pick_free_ip(net: Ipv4Net, used: &BTreeSet<Ipv4Addr>, random: u32) -> Option<Ipv4Addr> {
    let base = u32::from(net.network());
    let size = 1u64 << (32 - net.prefix_len());
    let hosts: u64 = if size > 2 { size - 2 } else { size };
    let first = if size > 2 { base + 1 } else { base };
    let start = u64::from(random) % hosts;
    (0..hosts)
        .map(|i| Ipv4Addr::from(first + ((start + i) % hosts) as u32))
        .find(|ip| !used.contains(ip))
}

/// A free NodePort, starting the search at a position derived from `random`.
pub fn pick_free_node_port(used: &BTreeSet<u16>, random: u32) -> Option<u16> {
    let (lo, hi) = (
        *NODE_PORT_RANGE.start() as u32,
        *NODE_PORT_RANGE.end() as u32,
    );
    let n = hi - lo + 1;
    let start = random % n;
    (0..n)
        .map(|i| (lo + (start + i) % n) as u16)
        .find(|p| !used.contains(p))
}

/// The node among `nodes` that announces `address`: highest rendezvous
/// score (FNV-1a over the address and the node name, mixed), so every
/// replica picks the same node for the same set, and a node joining or
/// leaving moves only the addresses it wins or held.
pub fn announcer<'a>(
    address: Ipv4Addr,
    nodes: impl IntoIterator<Item = &'a String>,
) -> Option<&'a String> {
    nodes
        .into_iter()
        .max_by_key(|n| (rendezvous_score(address, n), n.as_str()))
}

fn rendezvous_score(address: Ipv4Addr, node: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in address.octets().iter().chain(node.as_bytes()) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // splitmix64's finalizer: FNV's low bits alone are poorly spread.
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// Sets the announcer of every LoadBalancer and externalIPs frontend of
/// `state` from the subscribed `nodes`.
pub fn assign_announcers(state: &mut ServiceState, nodes: &std::collections::BTreeSet<String>) {
    for f in &mut state.frontends {
        f.announcer = match (f.kind, f.address) {
            (FrontendKind::LoadBalancer | FrontendKind::ExternalIp, Some(a)) => {
                announcer(a, nodes).cloned()
            }
            _ => None,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(selector: Option<&[(&str, &str)]>) -> Service {
        Service {
            namespace: "default".into(),
            name: "web".into(),
            kind: ServiceType::LoadBalancer,
            cluster_ip: Some(Ipv4Addr::new(10, 96, 0, 10)),
            ports: vec![ServicePort {
                name: "http".into(),
                protocol: Protocol::Tcp,
                port: 80,
                target_port: 8080,
                node_port: Some(30080),
            }],
            selector: selector.map(|s| {
                s.iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect()
            }),
            external_ips: vec![Ipv4Addr::new(192, 0, 2, 1)],
            load_balancer_ip: Some(Ipv4Addr::new(10, 99, 0, 130)),
            affinity_timeout: None,
            algorithm: None,
            hash_source_only: false,
        }
    }

    fn pod(ns: &str, name: &str, ip: [u8; 4], app: &str) -> Pod {
        Pod {
            namespace: ns.into(),
            name: name.into(),
            address: Ipv4Addr::from(ip),
            labels: [("app".to_string(), app.to_string())].into(),
        }
    }

    fn config() -> LbConfig {
        LbConfig {
            service_cidr: "10.96.0.0/16".parse().expect("cidr"),
            lb_pool: "10.99.0.128/27".parse().expect("cidr"),
            default_algorithm: Algorithm::Maglev,
            table_size: TableSize::default(),
        }
    }

    #[test]
    fn a_selector_picks_matching_pods_of_the_services_namespace_only() {
        let pods = [
            pod("default", "a", [10, 200, 0, 5], "web"),
            pod("default", "b", [10, 200, 0, 6], "db"),
            pod("other", "c", [10, 200, 0, 7], "web"),
        ];
        let (b, _) = backends_of(&svc(Some(&[("app", "web")])), &pods, &[]);
        assert_eq!(
            b.keys().collect::<Vec<_>>(),
            [&Ipv4Addr::new(10, 200, 0, 5)]
        );
    }

    #[test]
    fn the_published_state_has_every_frontend_and_only_backends_with_ids() {
        let set = EndpointSet {
            namespace: "default".into(),
            service: "web".into(),
            source: "endpoints/default/web".into(),
            backends: vec![([10, 0, 0, 2].into(), 1), ([10, 0, 0, 1].into(), 0)],
            ports: [("http".to_string(), 9090)].into(),
        };
        let ids = [(Ipv4Addr::new(10, 0, 0, 1), 7)].into();
        let st = service_state(
            &svc(None),
            &config(),
            Seed::from_bytes([1; 12]),
            &[],
            &[set],
            &ids,
        );
        let kinds: Vec<_> = st
            .frontends
            .iter()
            .map(|f| (f.kind, f.port, f.target_port))
            .collect();
        assert_eq!(
            kinds,
            [
                (FrontendKind::ClusterIp, 80, 9090),
                (FrontendKind::NodePort, 30080, 9090),
                (FrontendKind::LoadBalancer, 80, 9090),
                (FrontendKind::ExternalIp, 80, 9090)
            ]
        );
        assert_eq!(st.backends.len(), 1);
        assert_eq!((st.backends[0].id, st.backends[0].weight), (7, 0));
        assert_eq!(st.algorithm, Algorithm::Maglev);
    }

    #[test]
    fn free_addresses_skip_network_broadcast_and_used_ones() {
        let net: Ipv4Net = "10.99.0.128/30".parse().expect("cidr");
        let used = [Ipv4Addr::new(10, 99, 0, 129)].into();
        assert_eq!(
            pick_free_ip(net, &used, 0),
            Some(Ipv4Addr::new(10, 99, 0, 130))
        );
        let full = [Ipv4Addr::new(10, 99, 0, 129), Ipv4Addr::new(10, 99, 0, 130)].into();
        assert_eq!(pick_free_ip(net, &full, 5), None);
        let ports: BTreeSet<u16> = NODE_PORT_RANGE.collect();
        assert_eq!(pick_free_node_port(&ports, 1), None);
        assert_eq!(pick_free_node_port(&BTreeSet::new(), 0), Some(30000));
    }

    #[test]
    fn one_node_announces_each_address_and_a_leaving_node_moves_only_its_own() {
        let three: BTreeSet<String> = ["node-1", "node-2", "node-3"].map(String::from).into();
        let addrs: Vec<Ipv4Addr> = (1..=60).map(|i| Ipv4Addr::new(10, 99, 0, i)).collect();
        let before: Vec<&String> = addrs
            .iter()
            .map(|a| announcer(*a, &three).expect("a node"))
            .collect();
        for n in &three {
            assert!(before.contains(&n), "{n} announces nothing of 60");
        }
        let two: BTreeSet<String> = ["node-1", "node-3"].map(String::from).into();
        for (a, old) in addrs.iter().zip(&before) {
            let new = announcer(*a, &two).expect("a node");
            if *old != "node-2" {
                assert_eq!(new, *old, "{a} moved though its node stayed");
            }
        }
        assert_eq!(announcer(addrs[0], &BTreeSet::new()), None);
    }
}
