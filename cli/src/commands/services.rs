//! `membrane get services` and `membrane lb table SERVICE`.

use anyhow::Context as _;
use membrane_proto::lb::v1 as lb;
use serde_json::json;

use super::status_err;
use crate::client::Ctx;
use crate::output::{self, Format};

fn frontend(f: &lb::Frontend) -> String {
    let proto = match lb::Protocol::try_from(f.protocol) {
        Ok(lb::Protocol::Udp) => "UDP",
        _ => "TCP",
    };
    match lb::FrontendKind::try_from(f.kind) {
        Ok(lb::FrontendKind::NodePort) => format!("*:{}/{proto}", f.port),
        _ => format!("{}:{}/{proto}", f.address, f.port),
    }
}

/// `membrane get services`: frontends, backends and algorithm of every
/// service, and which nodes have programmed its current state (a node's
/// acknowledged version of the lb stream is at least the version that
/// published the service).
pub async fn get_services(ctx: &Ctx, format: Format) -> anyhow::Result<()> {
    let resp = lb::load_balancer_client::LoadBalancerClient::new(ctx.service_channel("lb").await?)
        .list_services(lb::ListServicesRequest {})
        .await
        .map_err(|s| status_err("list services", s))?
        .into_inner();
    let items: Vec<_> = resp
        .services
        .iter()
        .map(|s| {
            let algorithm = match lb::Algorithm::try_from(s.algorithm) {
                Ok(lb::Algorithm::Random) => "random",
                _ => "maglev",
            };
            let name = format!("{}/{}", s.namespace, s.name);
            let version = resp.versions.get(&name).copied().unwrap_or(0);
            let nodes: Vec<_> = resp
                .nodes
                .iter()
                .map(|n| {
                    json!({
                        "node": n.node,
                        "connected": n.connected,
                        "ackedVersion": n.acked_version,
                        "programmed": n.acked_version >= version,
                        "nackedVersion": n.nacked_version,
                        "nackReason": n.nack_reason,
                    })
                })
                .collect();
            let programmed = resp
                .nodes
                .iter()
                .filter(|n| n.acked_version >= version)
                .count();
            json!({
                "namespace": s.namespace,
                "name": s.name,
                "frontends": s.frontends.iter().map(frontend).collect::<Vec<_>>().join(","),
                "frontendList": s.frontends.iter().map(|f| json!({
                    "kind": lb::FrontendKind::try_from(f.kind).map(|k| k.as_str_name()).unwrap_or("FRONTEND_KIND_UNSPECIFIED"),
                    "address": f.address,
                    "port": f.port,
                    "protocol": if f.protocol == lb::Protocol::Udp as i32 { "UDP" } else { "TCP" },
                    "targetPort": f.target_port,
                    "announcer": f.announcer,
                })).collect::<Vec<_>>(),
                "backends": s.backends.iter().map(|b| json!({"id": b.id, "address": b.address, "weight": b.weight, "source": b.source})).collect::<Vec<_>>(),
                "backendCount": s.backends.len(),
                "algorithm": algorithm,
                "sourceHashOnly": s.hash_source_address_only,
                "affinityTimeoutSeconds": s.affinity_timeout_seconds,
                "maglevTableSize": s.maglev.as_ref().map(|m| m.table_size).unwrap_or(0),
                "version": version,
                "nodes": nodes,
                "programmed": format!("{programmed}/{}", resp.nodes.len()),
            })
        })
        .collect();
    output::print_items(
        format,
        &[
            ("NAMESPACE", "namespace"),
            ("NAME", "name"),
            ("FRONTENDS", "frontends"),
            ("BACKENDS", "backendCount"),
            ("ALGORITHM", "algorithm"),
            ("VERSION", "version"),
            ("PROGRAMMED", "programmed"),
        ],
        &items,
    )
}

/// A table as either source reports it.
struct TableView {
    service: String,
    node: String,
    version: Option<u64>,
    table_size: u32,
    slots: Vec<String>,
    slots_per_backend: std::collections::HashMap<String, u32>,
}

/// `membrane lb table SERVICE [--node NODE]`: the Maglev table (slot →
/// backend address), read from `node`'s eBPF maps, or without a node as the
/// lb service computes it from what it publishes.
pub async fn lb_table(
    ctx: &Ctx,
    service: &str,
    node: Option<&str>,
    format: Format,
) -> anyhow::Result<()> {
    let t = match node {
        Some(node) => {
            let target = ctx
                .nodes
                .iter()
                .find(|n| n.name == node)
                .with_context(|| format!("node `{node}` is not part of this cluster"))?
                .clone();
            let r =
                membrane_proto::node::v1::node_client::NodeClient::new(ctx.connect(&target).await?)
                    .service_table(membrane_proto::node::v1::ServiceTableRequest {
                        service: service.to_string(),
                    })
                    .await
                    .map_err(|s| status_err(&format!("service table on {node}"), s))?
                    .into_inner();
            TableView {
                service: r.service,
                node: r.node,
                version: Some(r.version),
                table_size: r.table_size,
                slots: r.slots,
                slots_per_backend: r.slots_per_backend,
            }
        }
        None => {
            let r =
                lb::load_balancer_client::LoadBalancerClient::new(ctx.service_channel("lb").await?)
                    .maglev_table(lb::MaglevTableRequest {
                        service: service.to_string(),
                        node: String::new(),
                    })
                    .await
                    .map_err(|s| status_err("maglev table", s))?
                    .into_inner();
            TableView {
                service: r.service,
                node: String::new(),
                version: None,
                table_size: r.table_size,
                slots: r.slots,
                slots_per_backend: r.slots_per_backend,
            }
        }
    };
    match format {
        Format::Table => {
            let whence = match (&t.version, t.node.is_empty()) {
                (Some(v), false) => format!("programmed on {} (lb stream version {v})", t.node),
                _ => "computed by the lb service".to_string(),
            };
            println!(
                "service {}  M={}  {whence}  slots owned per backend:",
                t.service, t.table_size
            );
            let mut rows: Vec<Vec<String>> = t
                .slots_per_backend
                .iter()
                .map(|(a, n)| vec![a.clone(), n.to_string()])
                .collect();
            rows.sort();
            print!(
                "{}",
                output::table(&["BACKEND".to_string(), "SLOTS".to_string()], &rows)
            );
            Ok(())
        }
        _ => output::print_value(
            format,
            &json!({"service": t.service, "node": t.node, "version": t.version, "tableSize": t.table_size, "slotsPerBackend": t.slots_per_backend, "slots": t.slots}),
        ),
    }
}
