//! Direct routing between nodes: for every other node, a kernel route to its
//! pod CIDR via its underlay address. Desired routes come from IPAM's
//! `node/<name>` resources; only routes tagged with Membrane's protocol
//! number are ever changed, so routes that others installed are left alone.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use membrane_proto::ipam::v1 as ipam;
use membrane_runtime::stream::StateSink;
use prost_types::Any;

/// Route protocol number that marks routes Membrane owns (`ip route ... proto 177`).
pub const ROUTE_PROTO: u8 = 177;

/// A route to a pod CIDR.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct PodRoute {
    /// Destination pod CIDR.
    pub cidr: Ipv4Net,
    /// Next hop: the other node's underlay address.
    pub via: Ipv4Addr,
}

/// Errors programming routes.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    /// `ip` failed.
    #[error("`{command}` failed: {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// What it printed.
        stderr: String,
    },
    /// A resource did not decode.
    #[error("resource `{key}`: {reason}")]
    BadResource {
        /// The resource key.
        key: String,
        /// Why.
        reason: String,
    },
}

/// The kernel's route table, as far as Membrane's routes go.
pub trait RouteTable: Send + 'static {
    /// Membrane's routes now installed.
    fn list(&mut self) -> Result<BTreeSet<PodRoute>, RouteError>;
    /// Installs or replaces a route.
    fn replace(&mut self, route: &PodRoute) -> Result<(), RouteError>;
    /// Removes a route.
    fn remove(&mut self, route: &PodRoute) -> Result<(), RouteError>;
}

/// The real table, through iproute2, in the process's network namespace.
#[derive(Debug, Clone)]
pub struct IpRouteTable {
    /// Device towards the underlay.
    pub dev: String,
}

fn ip(args: &[&str]) -> Result<String, RouteError> {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| RouteError::Command {
            command: format!("ip {}", args.join(" ")),
            stderr: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(RouteError::Command {
            command: format!("ip {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl RouteTable for IpRouteTable {
    fn list(&mut self) -> Result<BTreeSet<PodRoute>, RouteError> {
        let proto = ROUTE_PROTO.to_string();
        let out = ip(&["-4", "route", "show", "proto", &proto])?;
        // Lines look like `10.200.1.0/24 via 10.99.0.12 dev eth0`.
        Ok(out
            .lines()
            .filter_map(|l| {
                let mut words = l.split_whitespace();
                let cidr = words.next()?.parse().ok()?;
                let via = words.skip_while(|w| *w != "via").nth(1)?.parse().ok()?;
                Some(PodRoute { cidr, via })
            })
            .collect())
    }

    fn replace(&mut self, r: &PodRoute) -> Result<(), RouteError> {
        let (cidr, via, proto) = (
            r.cidr.to_string(),
            r.via.to_string(),
            ROUTE_PROTO.to_string(),
        );
        ip(&[
            "route", "replace", &cidr, "via", &via, "dev", &self.dev, "proto", &proto,
        ])
        .map(drop)
    }

    fn remove(&mut self, r: &PodRoute) -> Result<(), RouteError> {
        let (cidr, proto) = (r.cidr.to_string(), ROUTE_PROTO.to_string());
        ip(&["route", "del", &cidr, "proto", &proto]).map(drop)
    }
}

/// Route protocol marking this node's local routes for service addresses.
pub const SERVICE_ROUTE_PROTO: u8 = 179;

/// Service addresses (LoadBalancer, externalIPs) the node's stack treats as
/// its own, as kube-proxy's IPVS mode does with its dummy device: traffic
/// to such an address that the datapath did not translate (the service has
/// no backend) gets the stack's answer at once (TCP reset, ICMP port
/// unreachable) instead of being forwarded into the void. Local routes,
/// not addresses, so `arp_ignore=1` on the underlay keeps the kernel from
/// answering ARP for them: only the announcing node's datapath does.
pub mod service_routes {
    use std::net::Ipv4Addr;

    use super::{RouteError, SERVICE_ROUTE_PROTO, ip};

    /// Service addresses with a local route of ours.
    pub fn list() -> Result<Vec<Ipv4Addr>, RouteError> {
        let proto = SERVICE_ROUTE_PROTO.to_string();
        let out = ip(&["-4", "route", "show", "table", "local", "proto", &proto])?;
        // Lines look like `local 10.99.0.129 dev lo scope host`.
        Ok(out
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1)?.parse().ok())
            .collect())
    }

    /// Makes `addr` local to this node.
    pub fn add(addr: Ipv4Addr) -> Result<(), RouteError> {
        let (a, proto) = (format!("{addr}/32"), SERVICE_ROUTE_PROTO.to_string());
        ip(&[
            "route", "replace", "local", &a, "dev", "lo", "table", "local", "proto", &proto,
        ])
        .map(drop)
    }

    /// Removes the local route of `addr`.
    pub fn remove(addr: Ipv4Addr) -> Result<(), RouteError> {
        let (a, proto) = (format!("{addr}/32"), SERVICE_ROUTE_PROTO.to_string());
        ip(&[
            "route", "del", "local", &a, "table", "local", "proto", &proto,
        ])
        .map(drop)
    }

    /// Keeps the kernel from answering ARP on `dev` for addresses that are
    /// not configured on it (the service addresses above).
    pub fn quiet_arp(dev: &str) -> std::io::Result<()> {
        std::fs::write(format!("/proc/sys/net/ipv4/conf/{dev}/arp_ignore"), "1")
    }
}

/// The VXLAN device of tunnel mode.
pub const VXLAN_DEV: &str = "mbvx0";
/// VXLAN network identifier used between nodes.
pub const VXLAN_VNI: u32 = 77;
/// UDP port of the tunnel (Linux's and Cilium's default).
pub const VXLAN_PORT: u16 = 8472;

/// The tunnel endpoint MAC of a node, derived from its underlay address so
/// that every node knows every other node's without asking.
pub fn vtep_mac(underlay: Ipv4Addr) -> String {
    let o = underlay.octets();
    format!("02:6d:{:02x}:{:02x}:{:02x}:{:02x}", o[0], o[1], o[2], o[3])
}

/// Tunnel mode: pod traffic to other nodes is encapsulated in VXLAN over
/// the underlay (for underlays that do not route pod addresses). As in
/// Flannel's VXLAN backend: each node's `mbvx0` carries its pod CIDR's
/// network address; a remote CIDR is routed `onlink` via the remote
/// network address, whose neighbour entry is the remote tunnel MAC, whose
/// forwarding entry is the remote underlay address.
#[derive(Debug, Clone)]
pub struct VxlanRouteTable {
    /// This node's underlay address.
    pub local: Ipv4Addr,
    /// Device towards the underlay.
    pub underlay_dev: String,
    /// This node's pod CIDR (its network address goes on the device).
    pub pod_cidr: Ipv4Net,
}

impl VxlanRouteTable {
    /// Creates the tunnel device if missing (an existing one is kept, so a
    /// restarted agent does not interrupt traffic).
    pub fn ensure_device(&self) -> Result<(), RouteError> {
        if ip(&["link", "show", "dev", VXLAN_DEV]).is_err() {
            let (vni, port, local) = (
                VXLAN_VNI.to_string(),
                VXLAN_PORT.to_string(),
                self.local.to_string(),
            );
            ip(&[
                "link",
                "add",
                VXLAN_DEV,
                "type",
                "vxlan",
                "id",
                &vni,
                "dstport",
                &port,
                "local",
                &local,
                "dev",
                &self.underlay_dev,
                "nolearning",
            ])?;
        }
        ip(&[
            "link",
            "set",
            VXLAN_DEV,
            "address",
            &vtep_mac(self.local),
            "mtu",
            "1450",
            "up",
        ])?;
        let addr = format!("{}/32", self.pod_cidr.network());
        ip(&["addr", "replace", &addr, "dev", VXLAN_DEV])?;
        Ok(())
    }
}

impl RouteTable for VxlanRouteTable {
    fn list(&mut self) -> Result<BTreeSet<PodRoute>, RouteError> {
        let proto = ROUTE_PROTO.to_string();
        let out = ip(&["-4", "route", "show", "proto", &proto, "dev", VXLAN_DEV])?;
        // The underlay address behind each route is in the forwarding table:
        // overlay next hop → MAC (neighbour) → underlay (fdb).
        let neigh = ip(&["-4", "neigh", "show", "dev", VXLAN_DEV])?;
        let fdb = run_bridge(&["fdb", "show", "dev", VXLAN_DEV])?;
        let mac_of = |hop: &str| {
            neigh
                .lines()
                .find(|l| l.split_whitespace().next() == Some(hop))
                .and_then(|l| {
                    let w: Vec<&str> = l.split_whitespace().collect();
                    w.iter()
                        .position(|x| *x == "lladdr")
                        .and_then(|i| w.get(i + 1))
                        .map(|m| m.to_string())
                })
        };
        let underlay_of = |mac: &str| {
            fdb.lines().find(|l| l.starts_with(mac)).and_then(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                w.iter()
                    .position(|x| *x == "dst")
                    .and_then(|i| w.get(i + 1))
                    .and_then(|d| d.parse().ok())
            })
        };
        Ok(out
            .lines()
            .filter_map(|l| {
                let mut words = l.split_whitespace();
                let cidr = words.next()?.parse().ok()?;
                let hop = l.split_whitespace().skip_while(|w| *w != "via").nth(1)?;
                let via = underlay_of(&mac_of(hop)?)?;
                Some(PodRoute { cidr, via })
            })
            .collect())
    }

    fn replace(&mut self, r: &PodRoute) -> Result<(), RouteError> {
        let hop = r.cidr.network().to_string();
        let mac = vtep_mac(r.via);
        let (cidr, via, proto) = (
            r.cidr.to_string(),
            r.via.to_string(),
            ROUTE_PROTO.to_string(),
        );
        run_bridge(&["fdb", "replace", &mac, "dev", VXLAN_DEV, "dst", &via])?;
        ip(&[
            "neigh",
            "replace",
            &hop,
            "lladdr",
            &mac,
            "dev",
            VXLAN_DEV,
            "nud",
            "permanent",
        ])?;
        ip(&[
            "route", "replace", &cidr, "via", &hop, "dev", VXLAN_DEV, "onlink", "proto", &proto,
        ])
        .map(drop)
    }

    fn remove(&mut self, r: &PodRoute) -> Result<(), RouteError> {
        let hop = r.cidr.network().to_string();
        let mac = vtep_mac(r.via);
        let (cidr, proto) = (r.cidr.to_string(), ROUTE_PROTO.to_string());
        ip(&["route", "del", &cidr, "proto", &proto])?;
        let _ = ip(&["neigh", "del", &hop, "dev", VXLAN_DEV]);
        let _ = run_bridge(&["fdb", "del", &mac, "dev", VXLAN_DEV]);
        Ok(())
    }
}

fn run_bridge(args: &[&str]) -> Result<String, RouteError> {
    let out = std::process::Command::new("bridge")
        .args(args)
        .output()
        .map_err(|e| RouteError::Command {
            command: format!("bridge {}", args.join(" ")),
            stderr: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(RouteError::Command {
            command: format!("bridge {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Either routing mode, chosen at start.
#[derive(Debug, Clone)]
pub enum NodeRoutes {
    /// Direct routing over the underlay.
    Direct(IpRouteTable),
    /// VXLAN tunnel.
    Vxlan(VxlanRouteTable),
}

impl RouteTable for NodeRoutes {
    fn list(&mut self) -> Result<BTreeSet<PodRoute>, RouteError> {
        match self {
            NodeRoutes::Direct(t) => t.list(),
            NodeRoutes::Vxlan(t) => t.list(),
        }
    }
    fn replace(&mut self, r: &PodRoute) -> Result<(), RouteError> {
        match self {
            NodeRoutes::Direct(t) => t.replace(r),
            NodeRoutes::Vxlan(t) => t.replace(r),
        }
    }
    fn remove(&mut self, r: &PodRoute) -> Result<(), RouteError> {
        match self {
            NodeRoutes::Direct(t) => t.remove(r),
            NodeRoutes::Vxlan(t) => t.remove(r),
        }
    }
}

/// The routes `node` needs, from IPAM's published state.
pub fn desired_routes(
    node: &str,
    state: &BTreeMap<String, Any>,
) -> Result<BTreeSet<PodRoute>, RouteError> {
    let mut routes = BTreeSet::new();
    for (key, value) in state.range("node/".to_string()..) {
        let Some(name) = key.strip_prefix("node/") else {
            break;
        };
        let bad = |reason: String| RouteError::BadResource {
            key: key.clone(),
            reason,
        };
        let n: ipam::NodeCidr = value.to_msg().map_err(|e| bad(e.to_string()))?;
        if name == node {
            continue;
        }
        let cidr = n
            .pod_cidr
            .parse()
            .map_err(|_| bad(format!("pod_cidr `{}` is not a CIDR", n.pod_cidr)))?;
        let via = n
            .underlay_ip
            .parse()
            .map_err(|_| bad(format!("underlay_ip `{}` is not an address", n.underlay_ip)))?;
        routes.insert(PodRoute { cidr, via });
    }
    Ok(routes)
}

/// Applies IPAM's stream to a route table.
#[derive(Debug)]
pub struct RouteSink<T> {
    node: String,
    table: T,
}

impl<T: RouteTable> RouteSink<T> {
    /// Programs `table` for `node`.
    pub fn new(node: impl Into<String>, table: T) -> Self {
        Self {
            node: node.into(),
            table,
        }
    }

    /// Makes the table hold exactly the desired routes. Validates everything
    /// first, so bad input changes nothing.
    pub fn reconcile(&mut self, state: &BTreeMap<String, Any>) -> Result<(), RouteError> {
        let want = desired_routes(&self.node, state)?;
        let have = self.table.list()?;
        for r in have.difference(&want) {
            self.table.remove(r)?;
        }
        for r in want.difference(&have) {
            self.table.replace(r)?;
        }
        Ok(())
    }
}

impl<T: RouteTable> StateSink for RouteSink<T> {
    async fn apply(
        &mut self,
        version: u64,
        state: &BTreeMap<String, Any>,
        _changed: &[String],
    ) -> Result<(), String> {
        self.reconcile(state).map_err(|e| e.to_string())?;
        tracing::debug!(version, "routes reconciled");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct FakeTable(BTreeSet<PodRoute>);

    impl RouteTable for FakeTable {
        fn list(&mut self) -> Result<BTreeSet<PodRoute>, RouteError> {
            Ok(self.0.clone())
        }
        fn replace(&mut self, r: &PodRoute) -> Result<(), RouteError> {
            self.0.insert(r.clone());
            Ok(())
        }
        fn remove(&mut self, r: &PodRoute) -> Result<(), RouteError> {
            self.0.remove(r);
            Ok(())
        }
    }

    fn node(name: &str, cidr: &str, via: &str) -> (String, Any) {
        let msg = ipam::NodeCidr {
            node: name.into(),
            underlay_ip: via.into(),
            pod_cidr: cidr.into(),
        };
        (format!("node/{name}"), Any::from_msg(&msg).expect("encode"))
    }

    #[test]
    fn every_other_node_gets_a_route_and_stale_ones_go() {
        let mut sink = RouteSink::new("node-1", FakeTable::default());
        let mut state: BTreeMap<_, _> = [
            node("node-1", "10.200.0.0/24", "10.99.0.11"),
            node("node-2", "10.200.1.0/24", "10.99.0.12"),
            node("node-3", "10.200.2.0/24", "10.99.0.13"),
        ]
        .into_iter()
        .collect();
        sink.reconcile(&state).expect("reconcile");
        let cidrs: Vec<_> = sink.table.0.iter().map(|r| r.cidr.to_string()).collect();
        assert_eq!(cidrs, ["10.200.1.0/24", "10.200.2.0/24"]);
        state.remove("node/node-3");
        sink.reconcile(&state).expect("reconcile");
        assert_eq!(sink.table.0.len(), 1);
    }

    #[test]
    fn a_bad_resource_changes_nothing() {
        let mut sink = RouteSink::new("node-1", FakeTable::default());
        let good: BTreeMap<_, _> = [node("node-2", "10.200.1.0/24", "10.99.0.12")]
            .into_iter()
            .collect();
        sink.reconcile(&good).expect("reconcile");
        let mut bad = good.clone();
        bad.extend([node("node-3", "not-a-cidr", "10.99.0.13")]);
        let err = sink.reconcile(&bad).expect_err("bad cidr");
        assert!(err.to_string().contains("node/node-3"), "{err}");
        assert_eq!(sink.table.0.len(), 1);
    }
}

#[cfg(test)]
mod vxlan_tests {
    use super::*;

    #[test]
    fn tunnel_macs_are_derived_from_underlay_addresses() {
        assert_eq!(vtep_mac(Ipv4Addr::new(10, 99, 0, 12)), "02:6d:0a:63:00:0c");
        assert_ne!(
            vtep_mac(Ipv4Addr::new(10, 99, 0, 11)),
            vtep_mac(Ipv4Addr::new(10, 99, 0, 12))
        );
    }
}
