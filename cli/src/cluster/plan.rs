//! The shape of a local cluster, computed from the flags before anything is
//! touched: names and addresses of the bridge, the node namespaces and the
//! "external" namespace. Pure, so the address arithmetic is unit-tested and
//! `up` can reject bad flags before it creates half a cluster.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

/// The underlay bridge in the host network namespace.
pub const BRIDGE: &str = "mbr0";

/// Name of the node end of every veth pair, inside its namespace.
pub const NS_DEV: &str = "eth0";

/// Namespace standing in for "the world" outside the cluster.
pub const EXTERNAL_NETNS: &str = "external";

/// Node `k` gets the underlay host address `10 + k`; external gets 200.
const NODE_HOST_OFFSET: u32 = 10;
const EXTERNAL_HOST: u32 = 200;

/// At most this many nodes fit between `.11` and `.199`.
pub const MAX_NODES: u32 = EXTERNAL_HOST - NODE_HOST_OFFSET - 1;

/// Flags that make a plan invalid.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    /// `--nodes` out of range.
    #[error("--nodes must be between 1 and {MAX_NODES}, got {0}")]
    NodeCount(u32),
    /// The underlay is too small for `.200`.
    #[error(
        "--underlay-cidr `{0}` is too small: it needs host addresses up to .200 (use a /24 or larger)"
    )]
    UnderlayTooSmall(Ipv4Net),
    /// `--node-mask-size` does not fit the cluster CIDR.
    #[error("--node-mask-size {mask} must be between the cluster prefix length {prefix} and 30")]
    MaskSize {
        /// The node mask.
        mask: u8,
        /// The cluster CIDR's prefix length.
        prefix: u8,
    },
    /// Fewer per-node subnets than nodes.
    #[error("--cluster-cidr `{cidr}` has only {subnets} /{mask} subnets for {nodes} nodes")]
    TooFewSubnets {
        /// The cluster CIDR.
        cidr: Ipv4Net,
        /// The node mask.
        mask: u8,
        /// Subnets available.
        subnets: u64,
        /// Nodes requested.
        nodes: u32,
    },
    /// Pod and underlay addresses would be ambiguous.
    #[error("--cluster-cidr `{cluster}` overlaps --underlay-cidr `{underlay}`")]
    Overlap {
        /// The cluster CIDR.
        cluster: Ipv4Net,
        /// The underlay CIDR.
        underlay: Ipv4Net,
    },
}

/// Everything `up` creates, by name and address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The underlay network (host bits cleared).
    pub underlay: Ipv4Net,
    /// The bridge's address: the nodes' default gateway, where services listen.
    pub gateway: Ipv4Addr,
    /// Pod CIDR of the whole cluster.
    pub cluster_cidr: Ipv4Net,
    /// Prefix length of each node's pod subnet.
    pub node_mask_size: u8,
    /// One entry per node, `node-1` first.
    pub nodes: Vec<Member>,
    /// The "world" namespace.
    pub external: Member,
}

/// A network namespace on the underlay: a node or the external namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Namespace name (`node-1`, `external`); for nodes also the node name.
    pub netns: String,
    /// Host end of the veth pair, enslaved to the bridge (≤ 15 chars).
    pub host_dev: String,
    /// Underlay address of `eth0` inside the namespace.
    pub ip: Ipv4Addr,
}

// === impl Plan ===

impl Plan {
    /// Validates the flags and derives every name and address.
    pub fn new(
        nodes: u32,
        underlay: Ipv4Net,
        cluster_cidr: Ipv4Net,
        node_mask_size: u8,
    ) -> Result<Self, PlanError> {
        if nodes == 0 || nodes > MAX_NODES {
            return Err(PlanError::NodeCount(nodes));
        }
        let underlay = underlay.trunc();
        let cluster_cidr = cluster_cidr.trunc();
        if underlay.prefix_len() > 24 {
            return Err(PlanError::UnderlayTooSmall(underlay));
        }
        if node_mask_size < cluster_cidr.prefix_len() || node_mask_size > 30 {
            return Err(PlanError::MaskSize {
                mask: node_mask_size,
                prefix: cluster_cidr.prefix_len(),
            });
        }
        let subnets = 1u64 << (node_mask_size - cluster_cidr.prefix_len());
        if subnets < u64::from(nodes) {
            return Err(PlanError::TooFewSubnets {
                cidr: cluster_cidr,
                mask: node_mask_size,
                subnets,
                nodes,
            });
        }
        if underlay.contains(&cluster_cidr) || cluster_cidr.contains(&underlay) {
            return Err(PlanError::Overlap {
                cluster: cluster_cidr,
                underlay,
            });
        }
        let host = |n: u32| Ipv4Addr::from(u32::from(underlay.network()) + n);
        let nodes = (1..=nodes)
            .map(|k| Member {
                netns: format!("node-{k}"),
                host_dev: format!("mbn-{k}"),
                ip: host(NODE_HOST_OFFSET + k),
            })
            .collect();
        Ok(Self {
            underlay,
            gateway: host(1),
            cluster_cidr,
            node_mask_size,
            nodes,
            external: Member {
                netns: EXTERNAL_NETNS.to_string(),
                host_dev: "mbn-ext".to_string(),
                ip: host(EXTERNAL_HOST),
            },
        })
    }

    /// `ADDR/PREFIX` for an address on the underlay, as `ip addr add` wants it.
    pub fn underlay_addr(&self, ip: Ipv4Addr) -> String {
        format!("{ip}/{}", self.underlay.prefix_len())
    }

    /// Every namespace of the plan: the nodes, then external.
    pub fn members(&self) -> impl Iterator<Item = &Member> {
        self.nodes.iter().chain(std::iter::once(&self.external))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().expect("cidr")
    }

    fn default_plan(nodes: u32) -> Result<Plan, PlanError> {
        Plan::new(nodes, net("10.99.0.0/24"), net("10.200.0.0/16"), 24)
    }

    #[test]
    fn nodes_get_consecutive_underlay_addresses_after_ten_and_external_gets_200() {
        let plan = default_plan(2).expect("plan");
        assert_eq!(plan.gateway, Ipv4Addr::new(10, 99, 0, 1));
        let got: Vec<_> = plan
            .members()
            .map(|m| (m.netns.as_str(), m.host_dev.as_str(), m.ip.to_string()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("node-1", "mbn-1", "10.99.0.11".to_string()),
                ("node-2", "mbn-2", "10.99.0.12".to_string()),
                ("external", "mbn-ext", "10.99.0.200".to_string()),
            ]
        );
        assert_eq!(plan.underlay_addr(plan.gateway), "10.99.0.1/24");
    }

    #[test]
    fn host_bits_in_the_flags_are_ignored() {
        let plan = Plan::new(1, net("10.99.0.7/24"), net("10.200.3.0/16"), 24).expect("plan");
        assert_eq!(plan.underlay, net("10.99.0.0/24"));
        assert_eq!(plan.cluster_cidr, net("10.200.0.0/16"));
    }

    #[test]
    fn host_device_names_fit_the_kernel_limit_for_the_largest_cluster() {
        let plan = default_plan(MAX_NODES).expect("plan");
        assert!(plan.members().all(|m| m.host_dev.len() <= 15));
        assert_eq!(
            plan.nodes.last().map(|m| m.ip),
            Some(Ipv4Addr::new(10, 99, 0, 199))
        );
    }

    #[test]
    fn bad_flags_are_rejected_before_anything_is_created() {
        assert_eq!(default_plan(0), Err(PlanError::NodeCount(0)));
        assert_eq!(
            default_plan(MAX_NODES + 1),
            Err(PlanError::NodeCount(MAX_NODES + 1))
        );
        assert!(matches!(
            Plan::new(2, net("10.99.0.0/25"), net("10.200.0.0/16"), 24),
            Err(PlanError::UnderlayTooSmall(_))
        ));
        assert!(matches!(
            Plan::new(2, net("10.99.0.0/24"), net("10.200.0.0/16"), 8),
            Err(PlanError::MaskSize { .. })
        ));
        assert!(matches!(
            Plan::new(5, net("10.99.0.0/24"), net("10.200.0.0/24"), 26),
            Err(PlanError::TooFewSubnets { subnets: 4, .. })
        ));
        assert!(matches!(
            Plan::new(2, net("10.99.0.0/24"), net("10.0.0.0/8"), 24),
            Err(PlanError::Overlap { .. })
        ));
    }
}
