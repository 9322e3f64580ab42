//! `membrane get nodes|ipam`.

use membrane_proto::ipam::v1 as ipam;
use membrane_proto::stream::v1 as stream;
use serde_json::json;

use super::status_err;
use crate::client::Ctx;
use crate::output::{self, Format};

/// `membrane get nodes`: IPAM's view of every node, with the node agent's
/// stream delivery state.
pub async fn nodes(ctx: &Ctx, format: Format) -> anyhow::Result<()> {
    let channel = ctx.service_channel("ipam").await?;
    let nodes = ipam::ipam_client::IpamClient::new(channel.clone())
        .list_nodes(ipam::ListNodesRequest {})
        .await
        .map_err(|s| status_err("list nodes", s))?
        .into_inner()
        .nodes;
    let subs = stream::desired_state_client::DesiredStateClient::new(channel)
        .subscribers(stream::SubscribersRequest {})
        .await
        .map_err(|s| status_err("stream status", s))?
        .into_inner();
    let items: Vec<_> = nodes
        .into_iter()
        .map(|n| {
            let sub = subs.nodes.iter().find(|s| s.node == n.node);
            let status = match sub {
                Some(s) if s.connected => "Ready",
                _ => "NotReady",
            };
            json!({
                "name": n.node,
                "status": status,
                "underlayIP": n.underlay_ip,
                "podCIDR": n.pod_cidr,
                "allocated": n.allocated,
                "capacity": n.capacity,
                "ipamVersionAcked": sub.map(|s| s.acked_version).unwrap_or(0),
                "ipamVersion": subs.current_version,
            })
        })
        .collect();
    output::print_items(
        format,
        &[
            ("NAME", "name"),
            ("STATUS", "status"),
            ("UNDERLAY-IP", "underlayIP"),
            ("POD-CIDR", "podCIDR"),
            ("ALLOCATED", "allocated"),
            ("CAPACITY", "capacity"),
            ("IPAM-ACKED", "ipamVersionAcked"),
        ],
        &items,
    )
}

/// `membrane get ipam`: the pool and every allocation.
pub async fn ipam(ctx: &Ctx, format: Format) -> anyhow::Result<()> {
    let mut client = ipam::ipam_client::IpamClient::new(ctx.service_channel("ipam").await?);
    let pool = client
        .get_pool(ipam::GetPoolRequest {})
        .await
        .map_err(|s| status_err("get pool", s))?
        .into_inner();
    let allocs = client
        .list_allocations(ipam::ListAllocationsRequest {
            node: String::new(),
        })
        .await
        .map_err(|s| status_err("list allocations", s))?
        .into_inner()
        .allocations;
    let items: Vec<_> = allocs
        .into_iter()
        .map(|a| json!({"node": a.node, "ip": a.ip, "owner": a.owner, "podCIDR": a.pod_cidr}))
        .collect();
    match format {
        Format::Table => {
            println!(
                "Cluster CIDR: {}   node mask: /{}   nodes: {}/{}\n",
                pool.cluster_cidr, pool.node_mask_size, pool.nodes, pool.node_capacity
            );
            output::print_items(
                format,
                &[("NODE", "node"), ("IP", "ip"), ("OWNER", "owner")],
                &items,
            )
        }
        _ => output::print_value(
            format,
            &json!({
                "clusterCIDR": pool.cluster_cidr,
                "nodeMaskSize": pool.node_mask_size,
                "nodes": pool.nodes,
                "nodeCapacity": pool.node_capacity,
                "allocations": items,
            }),
        ),
    }
}
