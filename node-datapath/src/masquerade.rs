//! Masquerading of pod traffic leaving the cluster, with nftables in the
//! node's network namespace.
//!
//! Why nftables and not eBPF: masquerading needs source-port allocation and
//! reverse translation of replies, which the kernel's conntrack NAT does
//! well; doing it in eBPF means our own port allocator and NAT table (as
//! Cilium's BPF masquerading has). The eBPF datapath stays out of the way:
//! `bpf_lxc` hands non-local traffic to the stack, where this rule applies.

use ipnet::Ipv4Net;

use crate::netlink::{self, CommandError};

/// The rules: traffic from this node's pods to anything outside the cluster
/// CIDR, leaving through the underlay device, takes the node's address.
pub fn ruleset(pod_cidr: Ipv4Net, cluster_cidr: Ipv4Net, dev: &str) -> String {
    // Declaring then deleting the table makes the whole file idempotent and atomic.
    format!(
        "table ip membrane {{}}\n\
         delete table ip membrane\n\
         table ip membrane {{\n  \
           chain postrouting {{\n    \
             type nat hook postrouting priority srcnat; policy accept;\n    \
             ip saddr {pod_cidr} ip daddr != {cluster_cidr} oifname \"{dev}\" counter masquerade\n  \
           }}\n\
         }}\n"
    )
}

/// Installs (or replaces) the rules in this namespace.
pub fn install(pod_cidr: Ipv4Net, cluster_cidr: Ipv4Net, dev: &str) -> Result<(), CommandError> {
    netlink::run(
        "nft",
        &["-f", "-"],
        Some(&ruleset(pod_cidr, cluster_cidr, dev)),
    )
    .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ruleset_masquerades_only_traffic_leaving_the_cluster() {
        let r = ruleset(
            "10.200.1.0/24".parse().expect("cidr"),
            "10.200.0.0/16".parse().expect("cidr"),
            "eth0",
        );
        assert!(r.contains("ip saddr 10.200.1.0/24 ip daddr != 10.200.0.0/16 oifname \"eth0\" counter masquerade"), "{r}");
        assert!(r.starts_with("table ip membrane {}\ndelete table ip membrane\n"));
    }
}
