//! `membrane status`: is every part of the cluster healthy? Exits non-zero
//! when anything is down.

use std::time::Duration;

use membrane_proto::stream::v1 as stream;
use membrane_runtime::grpc;
use serde_json::json;

use crate::client::{Ctx, Target};
use crate::output::{self, Format};

const PROBE: Duration = Duration::from_secs(3);

async fn healthy(ctx: &Ctx, t: &Target) -> Result<(), String> {
    grpc::check_health(&t.endpoint, &t.server_name, ctx.tls.as_ref(), PROBE)
        .await
        .map_err(|e| format!("{e:#}"))
}

/// Nodes connected to a service's desired-state stream, per that service.
async fn connected_nodes(ctx: &Ctx, t: &Target) -> Result<Vec<String>, String> {
    let channel = ctx.connect(t).await.map_err(|e| format!("{e:#}"))?;
    let resp = stream::desired_state_client::DesiredStateClient::new(channel)
        .subscribers(stream::SubscribersRequest {})
        .await
        .map_err(|s| s.message().to_string())?
        .into_inner();
    Ok(resp
        .nodes
        .into_iter()
        .filter(|n| n.connected)
        .map(|n| n.node)
        .collect())
}

async fn etcd_healthy(endpoint: &str) -> Result<(), String> {
    let probe = async {
        let mut c = etcd_client::Client::connect([endpoint], None).await?;
        c.status().await
    };
    match tokio::time::timeout(PROBE, probe).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out".into()),
    }
}

/// Returns whether everything is healthy.
pub async fn run(ctx: &Ctx, format: Format) -> anyhow::Result<bool> {
    let mut parts = Vec::new();
    let etcd = etcd_healthy(&ctx.etcd).await;
    parts.push(
        json!({"component": "etcd", "kind": "store", "endpoint": ctx.etcd,
        "healthy": etcd.is_ok(), "detail": etcd.err().unwrap_or_default()}),
    );
    let all_nodes: Vec<String> = ctx.nodes.iter().map(|n| n.name.clone()).collect();
    for s in &ctx.services {
        let health = healthy(ctx, s).await;
        let (detail, ok) = match (&health, connected_nodes(ctx, s).await) {
            (Err(e), _) => (e.clone(), false),
            (Ok(()), Err(e)) => (format!("stream status: {e}"), false),
            (Ok(()), Ok(connected)) => {
                let missing: Vec<&str> = all_nodes
                    .iter()
                    .filter(|n| !connected.contains(n))
                    .map(String::as_str)
                    .collect();
                let mut d = format!(
                    "connected nodes {}/{}",
                    all_nodes.len() - missing.len(),
                    all_nodes.len()
                );
                if !missing.is_empty() {
                    d.push_str(&format!(", unavailable: {}", missing.join(", ")));
                }
                (d, missing.is_empty())
            }
        };
        parts.push(json!({"component": s.name, "kind": "service", "endpoint": s.endpoint, "healthy": ok, "detail": detail}));
    }
    for n in &ctx.nodes {
        let health = healthy(ctx, n).await;
        parts.push(
            json!({"component": n.name, "kind": "node", "endpoint": n.endpoint,
            "healthy": health.is_ok(), "detail": health.err().unwrap_or_default()}),
        );
    }
    let ok = parts.iter().all(|p| p["healthy"] == json!(true));
    match format {
        Format::Table => {
            for p in &mut parts {
                p["status"] = json!(if p["healthy"] == json!(true) {
                    "OK"
                } else {
                    "DOWN"
                });
            }
            output::print_items(
                format,
                &[
                    ("COMPONENT", "component"),
                    ("KIND", "kind"),
                    ("STATUS", "status"),
                    ("ENDPOINT", "endpoint"),
                    ("DETAIL", "detail"),
                ],
                &parts,
            )?;
            let down: Vec<&str> = parts
                .iter()
                .filter(|p| p["healthy"] != json!(true))
                .filter_map(|p| p["component"].as_str())
                .collect();
            if down.is_empty() {
                println!(
                    "\nCluster healthy: {} services, {} nodes",
                    ctx.services.len(),
                    ctx.nodes.len()
                );
            } else {
                println!(
                    "\nCluster degraded: {} down: {}",
                    down.len(),
                    down.join(", ")
                );
            }
        }
        _ => output::print_value(format, &json!({"healthy": ok, "components": parts}))?,
    }
    Ok(ok)
}
