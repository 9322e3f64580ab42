//! The cluster's observer status, summed from the nodes that answered.

use std::time::Duration;

/// One node observer's state, as it reported it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct NodeStatus {
    /// Flows held in its ring.
    pub num_flows: u64,
    /// Capacity of its ring.
    pub max_flows: u64,
    /// Flows seen since it started.
    pub seen_flows: u64,
    /// Flows per second.
    pub flows_rate: f64,
    /// Flows its datapath could not deliver.
    pub lost_events: u64,
}

/// The whole cluster's observer state.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClusterStatus {
    /// Sum over connected nodes.
    pub num_flows: u64,
    /// Sum over connected nodes.
    pub max_flows: u64,
    /// Sum over connected nodes.
    pub seen_flows: u64,
    /// Sum over connected nodes.
    pub flows_rate: f64,
    /// Sum over connected nodes.
    pub lost_events: u64,
    /// The relay's own uptime.
    pub uptime: Duration,
    /// Nodes that answered.
    pub num_connected_nodes: u32,
    /// Nodes the relay knows of.
    pub num_nodes: u32,
    /// Nodes that did not answer, sorted by name.
    pub unavailable_nodes: Vec<String>,
}

/// Sums the states of the nodes that answered (`Some`) and names those that
/// did not (`None`).
pub fn aggregate(
    nodes: impl IntoIterator<Item = (String, Option<NodeStatus>)>,
    uptime: Duration,
) -> ClusterStatus {
    let mut total = ClusterStatus {
        uptime,
        ..ClusterStatus::default()
    };
    for (name, status) in nodes {
        total.num_nodes += 1;
        match status {
            Some(s) => {
                total.num_connected_nodes += 1;
                total.num_flows += s.num_flows;
                total.max_flows += s.max_flows;
                total.seen_flows += s.seen_flows;
                total.flows_rate += s.flows_rate;
                total.lost_events += s.lost_events;
            }
            None => total.unavailable_nodes.push(name),
        }
    }
    total.unavailable_nodes.sort();
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(flows: u64, max: u64, seen: u64, rate: f64) -> Option<NodeStatus> {
        Some(NodeStatus {
            num_flows: flows,
            max_flows: max,
            seen_flows: seen,
            flows_rate: rate,
            lost_events: 1,
        })
    }

    #[test]
    fn connected_nodes_are_summed_and_unavailable_ones_named() {
        let s = aggregate(
            [
                ("node-3".to_string(), None),
                ("node-1".to_string(), node(10, 4096, 100, 1.5)),
                ("node-2".to_string(), node(20, 4096, 300, 2.0)),
                ("node-0".to_string(), None),
            ],
            Duration::from_secs(7),
        );
        assert_eq!(s.num_flows, 30);
        assert_eq!(s.max_flows, 8192);
        assert_eq!(s.seen_flows, 400);
        assert!((s.flows_rate - 3.5).abs() < 1e-9);
        assert_eq!(s.lost_events, 2);
        assert_eq!(s.num_connected_nodes, 2);
        assert_eq!(s.num_nodes, 4);
        assert_eq!(s.unavailable_nodes, ["node-0", "node-3"]);
        assert_eq!(s.uptime, Duration::from_secs(7));
    }

    #[test]
    fn no_nodes_is_an_empty_status() {
        let s = aggregate([], Duration::ZERO);
        assert_eq!(s, ClusterStatus::default());
    }
}
