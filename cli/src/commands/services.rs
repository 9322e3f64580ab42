//! `membrane get services` and `membrane lb table SERVICE`.

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

/// `membrane get services`: frontends, backends and algorithm of every service.
pub async fn get_services(ctx: &Ctx, format: Format) -> anyhow::Result<()> {
    let services =
        lb::load_balancer_client::LoadBalancerClient::new(ctx.service_channel("lb").await?)
            .list_services(lb::ListServicesRequest {})
            .await
            .map_err(|s| status_err("list services", s))?
            .into_inner()
            .services;
    let items: Vec<_> = services
        .iter()
        .map(|s| {
            let algorithm = match lb::Algorithm::try_from(s.algorithm) {
                Ok(lb::Algorithm::Random) => "random",
                _ => "maglev",
            };
            json!({
                "namespace": s.namespace,
                "name": s.name,
                "frontends": s.frontends.iter().map(frontend).collect::<Vec<_>>().join(","),
                "backends": s.backends.iter().map(|b| json!({"id": b.id, "address": b.address, "weight": b.weight, "source": b.source})).collect::<Vec<_>>(),
                "backendCount": s.backends.len(),
                "algorithm": algorithm,
                "sourceHashOnly": s.hash_source_address_only,
                "affinityTimeoutSeconds": s.affinity_timeout_seconds,
                "maglevTableSize": s.maglev.as_ref().map(|m| m.table_size).unwrap_or(0),
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
        ],
        &items,
    )
}

/// `membrane lb table SERVICE`: the Maglev table (slot → backend address).
/// Until nodes program tables, this is the table computed by the lb service
/// from the published state (identical on every node by construction).
pub async fn lb_table(ctx: &Ctx, service: &str, format: Format) -> anyhow::Result<()> {
    let t = lb::load_balancer_client::LoadBalancerClient::new(ctx.service_channel("lb").await?)
        .maglev_table(lb::MaglevTableRequest {
            service: service.to_string(),
            node: String::new(),
        })
        .await
        .map_err(|s| status_err("maglev table", s))?
        .into_inner();
    match format {
        Format::Table => {
            println!(
                "service {}  M={}  slots owned per backend:",
                t.service, t.table_size
            );
            let rows: Vec<Vec<String>> = t
                .slots_per_backend
                .iter()
                .map(|(a, n)| vec![a.clone(), n.to_string()])
                .collect();
            print!(
                "{}",
                output::table(&["BACKEND".to_string(), "SLOTS".to_string()], &rows)
            );
            Ok(())
        }
        _ => output::print_value(
            format,
            &json!({"service": t.service, "node": t.node, "tableSize": t.table_size, "slotsPerBackend": t.slots_per_backend, "slots": t.slots}),
        ),
    }
}
