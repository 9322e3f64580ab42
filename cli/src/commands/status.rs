//! `membrane status`: is every part of the cluster healthy? Exits non-zero
//! when anything is down. A service that publishes desired state is healthy
//! when every node is on its stream; the relay is healthy when it reaches
//! every node's observer, and its flow counters are shown Hubble-style.

use std::time::Duration;

use membrane_proto::observer::v1 as observer;
use membrane_proto::stream::v1 as stream;
use membrane_runtime::grpc;
use serde_json::json;

use crate::client::{Ctx, Target};
use crate::output::{self, Format};

const PROBE: Duration = Duration::from_secs(3);

/// The relay asks every node, each within its own timeout.
const RELAY_PROBE: Duration = Duration::from_secs(8);

/// The relay's service name.
const RELAY: &str = "relay";

async fn healthy(ctx: &Ctx, t: &Target) -> Result<(), String> {
    grpc::check_health(&t.endpoint, &t.server_name, ctx.tls.as_ref(), PROBE)
        .await
        .map_err(|e| format!("{e:#}"))
}

/// A service's view of the nodes on its desired-state stream.
enum StreamView {
    /// The nodes connected to its stream.
    Connected(Vec<String>),
    /// It publishes no desired state (`Subscribers` is unimplemented): the
    /// relay, for one. Its health check alone says whether it is up.
    NotApplicable,
}

/// Nodes connected to a service's desired-state stream, per that service.
async fn connected_nodes(ctx: &Ctx, t: &Target) -> Result<StreamView, String> {
    let channel = ctx.connect(t).await.map_err(|e| format!("{e:#}"))?;
    match stream::desired_state_client::DesiredStateClient::new(channel)
        .subscribers(stream::SubscribersRequest {})
        .await
    {
        Ok(resp) => Ok(StreamView::Connected(
            resp.into_inner()
                .nodes
                .into_iter()
                .filter(|n| n.connected)
                .map(|n| n.node)
                .collect(),
        )),
        Err(s) if s.code() == tonic::Code::Unimplemented => Ok(StreamView::NotApplicable),
        Err(s) => Err(s.message().to_string()),
    }
}

/// The relay's view of the cluster's observers (`ServerStatus`).
async fn relay_status(ctx: &Ctx, t: &Target) -> Result<observer::ServerStatusResponse, String> {
    let channel = ctx.connect(t).await.map_err(|e| format!("{e:#}"))?;
    let mut client = observer::observer_client::ObserverClient::new(channel);
    let probe = client.server_status(observer::ServerStatusRequest {});
    match tokio::time::timeout(RELAY_PROBE, probe).await {
        Ok(Ok(resp)) => Ok(resp.into_inner()),
        Ok(Err(s)) => Err(s.message().to_string()),
        Err(_) => Err("server status timed out".into()),
    }
}

/// `connected nodes a/b[, unavailable: x, y]`.
fn nodes_detail(connected: usize, total: usize, missing: &[String]) -> String {
    let mut d = format!("connected nodes {connected}/{total}");
    if !missing.is_empty() {
        d.push_str(&format!(", unavailable: {}", missing.join(", ")));
    }
    d
}

/// The relay's block, as `hubble status` prints it.
pub fn relay_block(status: &Result<observer::ServerStatusResponse, String>) -> String {
    let s = match status {
        Err(e) => return format!("Healthcheck (via relay): Unavailable: {e}\n"),
        Ok(s) => s,
    };
    let percent = if s.max_flows == 0 {
        0.0
    } else {
        s.num_flows as f64 * 100.0 / s.max_flows as f64
    };
    let mut out = format!(
        "Healthcheck (via relay): Ok\nCurrent/Max Flows: {}/{} ({percent:.2}%)\nFlows/s: {:.2}\nConnected Nodes: {}/{}\n",
        thousands(s.num_flows),
        thousands(s.max_flows),
        s.flows_rate,
        s.num_connected_nodes,
        s.num_nodes
    );
    if !s.unavailable_nodes.is_empty() {
        out.push_str("Unavailable Nodes:\n");
        for n in &s.unavailable_nodes {
            out.push_str(&format!("  - {n}\n"));
        }
    }
    out
}

fn relay_json(status: &Result<observer::ServerStatusResponse, String>) -> serde_json::Value {
    match status {
        Err(e) => json!({"healthcheck": "Unavailable", "detail": e}),
        Ok(s) => json!({
            "healthcheck": "Ok",
            "numFlows": s.num_flows,
            "maxFlows": s.max_flows,
            "seenFlows": s.seen_flows,
            "flowsRate": s.flows_rate,
            "lostEvents": s.lost_events,
            "uptimeNs": s.uptime_ns,
            "connectedNodes": s.num_connected_nodes,
            "numNodes": s.num_nodes,
            "unavailableNodes": s.unavailable_nodes,
        }),
    }
}

/// `8192` → `8,192`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
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
    let mut relay = None;
    for s in &ctx.services {
        let health = healthy(ctx, s).await;
        let (detail, ok) = if s.name == RELAY {
            // The relay's nodes are the ones it observes, from its own status.
            let status = match &health {
                Ok(()) => relay_status(ctx, s).await,
                Err(e) => Err(e.clone()),
            };
            let row = match &status {
                Err(e) => (e.clone(), false),
                Ok(r) => (
                    nodes_detail(
                        r.num_connected_nodes as usize,
                        r.num_nodes as usize,
                        &r.unavailable_nodes,
                    ),
                    r.unavailable_nodes.is_empty(),
                ),
            };
            relay = Some(status);
            row
        } else {
            match (&health, connected_nodes(ctx, s).await) {
                (Err(e), _) => (e.clone(), false),
                (Ok(()), Err(e)) => (format!("stream status: {e}"), false),
                (Ok(()), Ok(StreamView::NotApplicable)) => (String::new(), true),
                (Ok(()), Ok(StreamView::Connected(connected))) => {
                    let missing: Vec<String> = all_nodes
                        .iter()
                        .filter(|n| !connected.contains(n))
                        .cloned()
                        .collect();
                    (
                        nodes_detail(all_nodes.len() - missing.len(), all_nodes.len(), &missing),
                        missing.is_empty(),
                    )
                }
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
            if let Some(r) = &relay {
                print!("\n{}", relay_block(r));
            }
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
        _ => {
            let mut doc = json!({"healthy": ok, "components": parts});
            if let Some(r) = &relay {
                doc["relay"] = relay_json(r);
            }
            output::print_value(format, &doc)?
        }
    }
    Ok(ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_relay_block_reads_like_hubble_status() {
        let s = observer::ServerStatusResponse {
            num_flows: 4096,
            max_flows: 8192,
            flows_rate: 12.345,
            num_connected_nodes: 1,
            num_nodes: 2,
            unavailable_nodes: vec!["node-2".into()],
            ..Default::default()
        };
        assert_eq!(
            relay_block(&Ok(s)),
            "Healthcheck (via relay): Ok\nCurrent/Max Flows: 4,096/8,192 (50.00%)\nFlows/s: 12.35\nConnected Nodes: 1/2\nUnavailable Nodes:\n  - node-2\n"
        );
        assert_eq!(
            relay_block(&Err("connection refused".into())),
            "Healthcheck (via relay): Unavailable: connection refused\n"
        );
    }

    #[test]
    fn node_details_name_the_missing_nodes() {
        assert_eq!(nodes_detail(2, 2, &[]), "connected nodes 2/2");
        assert_eq!(
            nodes_detail(1, 3, &["node-2".into(), "node-3".into()]),
            "connected nodes 1/3, unavailable: node-2, node-3"
        );
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }
}
