//! `membrane ipam allocate|release`: direct address management, for
//! operators and scripts (pods normally get addresses through the CNI plugin).

use membrane_proto::ipam::v1 as ipam;
use serde_json::json;

use super::status_err;
use crate::client::Ctx;
use crate::output::{self, Format};

/// Allocates an address on `node` for `owner` and prints it.
pub async fn allocate(ctx: &Ctx, node: &str, owner: &str, format: Format) -> anyhow::Result<()> {
    let a = ipam::ipam_client::IpamClient::new(ctx.service_channel("ipam").await?)
        .allocate(ipam::AllocateRequest {
            node: node.into(),
            owner: owner.into(),
        })
        .await
        .map_err(|s| status_err("allocate", s))?
        .into_inner();
    match format {
        Format::Table => println!("{}", a.ip),
        _ => output::print_value(
            format,
            &json!({"node": a.node, "ip": a.ip, "owner": a.owner, "podCIDR": a.pod_cidr}),
        )?,
    }
    Ok(())
}

/// Releases `ip` on `node`.
pub async fn release(ctx: &Ctx, node: &str, ip: &str) -> anyhow::Result<()> {
    ipam::ipam_client::IpamClient::new(ctx.service_channel("ipam").await?)
        .release(ipam::ReleaseRequest {
            node: node.into(),
            ip: ip.into(),
        })
        .await
        .map_err(|s| status_err("release", s))?;
    println!("released {ip} on {node}");
    Ok(())
}
