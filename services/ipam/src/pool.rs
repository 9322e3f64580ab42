//! CIDR arithmetic for cluster-pool IPAM. IPv4 only for now.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

/// Errors of the IPAM domain. Messages name the object they are about.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IpamError {
    /// A CIDR that does not parse or does not fit.
    #[error("{field}: invalid CIDR `{value}`: {reason}")]
    InvalidCidr {
        /// Which input carried it.
        field: String,
        /// The value given.
        value: String,
        /// Why it is invalid.
        reason: String,
    },
    /// An address that does not parse.
    #[error("{field}: invalid IPv4 address `{value}`")]
    InvalidIp {
        /// Which input carried it.
        field: String,
        /// The value given.
        value: String,
    },
    /// A required field is empty.
    #[error("{field}: must not be empty")]
    Empty {
        /// The field.
        field: String,
    },
    /// The node was never registered.
    #[error("unknown node `{0}`")]
    UnknownNode(String),
    /// Every address of the node's CIDR is allocated.
    #[error("pool of node `{node}` ({cidr}) exhausted")]
    Exhausted {
        /// The node.
        node: String,
        /// Its CIDR.
        cidr: Ipv4Net,
    },
    /// Every node CIDR of the cluster CIDR is handed out.
    #[error("cluster CIDR {0} has no free node CIDR left")]
    ClusterExhausted(Ipv4Net),
    /// Releasing an address that is not allocated.
    #[error("address {ip} on node `{node}` is not allocated")]
    NotAllocated {
        /// The node.
        node: String,
        /// The address.
        ip: Ipv4Addr,
    },
    /// A node CIDR requested that another node holds.
    #[error("pod CIDR {cidr} requested for node `{node}` is held by node `{holder}`")]
    CidrTaken {
        /// Requesting node.
        node: String,
        /// The CIDR.
        cidr: Ipv4Net,
        /// Node holding it.
        holder: String,
    },
    /// A registered node asked for a different CIDR than it has.
    #[error("node `{node}` already has pod CIDR {has}, not {requested}")]
    CidrMismatch {
        /// The node.
        node: String,
        /// What it has.
        has: Ipv4Net,
        /// What was requested.
        requested: Ipv4Net,
    },
    /// A node that still has allocations cannot be removed without force.
    #[error("node `{node}` still has {count} allocated addresses")]
    NodeInUse {
        /// The node.
        node: String,
        /// Allocations left.
        count: usize,
    },
    /// The pool configuration in etcd differs from this replica's flags.
    #[error("pool configuration in etcd is {stored}, but this replica was started with {flags}")]
    ConfigMismatch {
        /// What etcd holds.
        stored: String,
        /// What the flags say.
        flags: String,
    },
    /// The store is unavailable.
    #[error("store: {0}")]
    Store(String),
    /// Too many concurrent writers kept winning the race.
    #[error("gave up after {0} conflicting attempts")]
    Contention(usize),
}

/// The cluster pool: node CIDRs of `/node_mask` carved out of `cluster`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PoolConfig {
    /// The cluster CIDR.
    pub cluster: Ipv4Net,
    /// Prefix length of every node's CIDR.
    pub node_mask: u8,
}

impl std::fmt::Display for PoolConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "cluster CIDR {} with /{} per node",
            self.cluster, self.node_mask
        )
    }
}

/// Parses a CIDR given for `field`, requiring it to be a network address.
pub fn parse_cidr(field: &str, value: &str) -> Result<Ipv4Net, IpamError> {
    let invalid = |reason: &str| IpamError::InvalidCidr {
        field: field.into(),
        value: value.into(),
        reason: reason.into(),
    };
    let net: Ipv4Net = value
        .trim()
        .parse()
        .map_err(|_| invalid("not an IPv4 CIDR (a.b.c.d/n)"))?;
    if net.network() != net.addr() {
        return Err(invalid(&format!(
            "host bits set; did you mean {}?",
            net.trunc()
        )));
    }
    Ok(net)
}

/// Parses an IPv4 address given for `field`.
pub fn parse_ip(field: &str, value: &str) -> Result<Ipv4Addr, IpamError> {
    value.trim().parse().map_err(|_| IpamError::InvalidIp {
        field: field.into(),
        value: value.into(),
    })
}

impl PoolConfig {
    /// Validates a pool: node CIDRs must fit inside the cluster CIDR and
    /// leave room for a gateway and at least one pod.
    pub fn new(cluster: &str, node_mask: u8) -> Result<Self, IpamError> {
        let cluster = parse_cidr("cluster-cidr", cluster)?;
        if node_mask < cluster.prefix_len() || node_mask > 30 {
            return Err(IpamError::InvalidCidr {
                field: "node-mask-size".into(),
                value: node_mask.to_string(),
                reason: format!(
                    "must be between the cluster prefix /{} and /30",
                    cluster.prefix_len()
                ),
            });
        }
        Ok(Self { cluster, node_mask })
    }

    /// How many node CIDRs the cluster CIDR holds.
    pub fn node_capacity(&self) -> u64 {
        1u64 << (self.node_mask - self.cluster.prefix_len())
    }

    /// The first node CIDR not in `used`.
    pub fn carve(&self, used: &BTreeSet<Ipv4Net>) -> Result<Ipv4Net, IpamError> {
        self.cluster
            .subnets(self.node_mask)
            .map_err(|_| IpamError::ClusterExhausted(self.cluster))?
            .find(|n| !used.contains(n))
            .ok_or(IpamError::ClusterExhausted(self.cluster))
    }

    /// Checks that a requested node CIDR is one of this pool's node CIDRs.
    pub fn check_node_cidr(&self, field: &str, cidr: Ipv4Net) -> Result<(), IpamError> {
        if cidr.prefix_len() != self.node_mask || !self.cluster.contains(&cidr) {
            return Err(IpamError::InvalidCidr {
                field: field.into(),
                value: cidr.to_string(),
                reason: format!("must be a /{} inside {}", self.node_mask, self.cluster),
            });
        }
        Ok(())
    }
}

/// The node's gateway (router) address: the first host of its CIDR. Never
/// handed to a pod.
pub fn gateway(cidr: Ipv4Net) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(cidr.network()) + 1)
}

/// The addresses pods may get: every host address but the gateway.
fn pod_range(cidr: Ipv4Net) -> (u32, u32) {
    let first = u32::from(cidr.network()) + 2;
    let last = u32::from(cidr.broadcast()) - 1;
    (first, last)
}

/// How many pod addresses a node CIDR holds.
pub fn capacity(cidr: Ipv4Net) -> u32 {
    let (first, last) = pod_range(cidr);
    (last + 1).saturating_sub(first)
}

/// Whether `ip` is one a pod may hold in `cidr`.
pub fn is_pod_address(cidr: Ipv4Net, ip: Ipv4Addr) -> bool {
    let (first, last) = pod_range(cidr);
    (first..=last).contains(&u32::from(ip))
}

/// A pod address of `cidr` chosen by `r` (a random number), free or not:
/// the caller's transaction finds out.
pub fn random_pod_address(cidr: Ipv4Net, r: u32) -> Ipv4Addr {
    let (first, last) = pod_range(cidr);
    let size = (last + 1).saturating_sub(first).max(1);
    Ipv4Addr::from(first + r % size)
}

/// A free pod address of `cidr`, scanning from `start` (an offset that
/// callers randomize so concurrent allocators rarely pick the same one).
pub fn pick_free(cidr: Ipv4Net, used: &BTreeSet<Ipv4Addr>, start: u32) -> Option<Ipv4Addr> {
    let (first, last) = pod_range(cidr);
    let size = (last + 1).checked_sub(first)?;
    if size == 0 {
        return None;
    }
    (0..size)
        .map(|i| Ipv4Addr::from(first + (start.wrapping_add(i)) % size))
        .find(|ip| !used.contains(ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool() -> PoolConfig {
        PoolConfig::new("10.200.0.0/16", 24).expect("valid pool")
    }

    #[test]
    fn node_cidrs_are_carved_in_order_skipping_used_ones() {
        let p = pool();
        let mut used = BTreeSet::new();
        let a = p.carve(&used).expect("free");
        assert_eq!(a.to_string(), "10.200.0.0/24");
        used.insert(a);
        used.insert("10.200.1.0/24".parse().expect("cidr"));
        assert_eq!(p.carve(&used).expect("free").to_string(), "10.200.2.0/24");
    }

    #[test]
    fn a_full_cluster_cidr_is_reported_exhausted() {
        let p = PoolConfig::new("10.0.0.0/23", 24).expect("valid");
        let used: BTreeSet<_> = p.cluster.subnets(24).expect("subnets").collect();
        assert_eq!(p.node_capacity(), 2);
        assert_eq!(p.carve(&used), Err(IpamError::ClusterExhausted(p.cluster)));
    }

    #[test]
    fn malformed_or_misaligned_cidrs_are_rejected_with_the_field_named() {
        let err = PoolConfig::new("10.200.0.0/33", 24).expect_err("bad");
        assert!(
            err.to_string()
                .starts_with("cluster-cidr: invalid CIDR `10.200.0.0/33`"),
            "{err}"
        );
        let err = PoolConfig::new("10.200.0.1/16", 24).expect_err("host bits");
        assert!(
            err.to_string()
                .contains("host bits set; did you mean 10.200.0.0/16?"),
            "{err}"
        );
        let err = PoolConfig::new("10.200.0.0/16", 8).expect_err("mask");
        assert!(err.to_string().starts_with("node-mask-size:"), "{err}");
        let err = pool()
            .check_node_cidr("spec.podCIDR", "10.9.0.0/24".parse().expect("cidr"))
            .expect_err("outside");
        assert!(
            err.to_string()
                .contains("must be a /24 inside 10.200.0.0/16"),
            "{err}"
        );
    }

    #[test]
    fn pod_addresses_skip_network_gateway_and_broadcast() {
        let cidr: Ipv4Net = "10.200.1.0/29".parse().expect("cidr");
        assert_eq!(capacity(cidr), 5);
        assert_eq!(gateway(cidr), Ipv4Addr::new(10, 200, 1, 1));
        let mut used = BTreeSet::new();
        while let Some(ip) = pick_free(cidr, &used, 3) {
            assert!(is_pod_address(cidr, ip));
            assert!(used.insert(ip), "{ip} handed out twice");
        }
        let got: Vec<_> = used.iter().map(|ip| ip.octets()[3]).collect();
        assert_eq!(got, vec![2, 3, 4, 5, 6]);
    }
}
