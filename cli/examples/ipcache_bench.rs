//! Benchmark: ipcache propagation latency at 1,000 endpoints on a running
//! local cluster: from the identity service acknowledging an endpoint
//! (`UpsertEndpoint`) to that address appearing in another node's eBPF
//! ipcache map (read through the node API). Reports p50/p99/max, then
//! removes what it added.
//!
//! `membrane up --nodes 2 --detach && cargo run --release -p membrane-cli --example ipcache_bench -- [COUNT]`

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use membrane_proto::identity::v1 as id;
use membrane_proto::node::v1 as node;
use membrane_runtime::grpc;
use membrane_runtime::tls::TlsFiles;
use tokio::sync::{Mutex, Semaphore};

/// How often the remote node's map is read. Reading dumps the whole map
/// under the datapath lock, so polling too often slows what it measures.
const POLL_MS: u64 = 100;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    membrane_runtime::tls::install_crypto_provider();
    let count: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(1000);
    let state = std::env::var("MEMBRANE_STATE_DIR").unwrap_or_else(|_| "/run/membrane".into());
    let info: serde_json::Value = serde_json::from_slice(
        &std::fs::read(format!("{state}/cluster.json"))
            .context("read cluster.json (is a cluster up?)")?,
    )?;
    let tls = TlsFiles {
        ca: info["tls"]["ca"].as_str().context("tls.ca")?.into(),
        cert: info["tls"]["cert"].as_str().context("tls.cert")?.into(),
        key: info["tls"]["key"].as_str().context("tls.key")?.into(),
    };
    let svc = info["services"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == "identity"))
        .context("identity service")?;
    let observer = info["nodes"]
        .as_array()
        .and_then(|n| n.get(1))
        .context("a second node")?;
    let ident = id::identity_client::IdentityClient::new(
        grpc::connect(
            svc["endpoint"].as_str().context("endpoint")?,
            svc["server_name"].as_str().context("name")?,
            Some(&tls),
        )
        .await?,
    );
    let mut watcher = node::node_client::NodeClient::new(
        grpc::connect(
            observer["endpoint"].as_str().context("endpoint")?,
            observer["server_name"].as_str().context("name")?,
            Some(&tls),
        )
        .await?,
    );
    // Endpoints are recorded as if node-1 hosted them (it holds a lease).
    let owner = info["nodes"][0]["name"]
        .as_str()
        .context("node")?
        .to_string();
    ident
        .clone()
        .heartbeat(id::HeartbeatRequest {
            node: owner.clone(),
        })
        .await?;
    let identity = ident
        .clone()
        .allocate(id::AllocateRequest {
            node: owner.clone(),
            namespace: "bench".into(),
            labels: [("app".to_string(), "ipcache-bench".to_string())].into(),
        })
        .await?
        .into_inner()
        .id;
    let ips: Vec<Ipv4Addr> = (0..count as u32)
        .map(|i| Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 240, 0, 0)) + i))
        .collect();

    let acked: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let sem = Arc::new(Semaphore::new(16));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for ip in ips.clone() {
        let (mut c, acked, owner, permit) = (
            ident.clone(),
            acked.clone(),
            owner.clone(),
            sem.clone().acquire_owned().await?,
        );
        tasks.push(tokio::spawn(async move {
            let r = c
                .upsert_endpoint(id::UpsertEndpointRequest {
                    ip: ip.to_string(),
                    identity,
                    node: owner,
                    namespace: "bench".into(),
                    pod: format!("bench-{ip}"),
                })
                .await;
            acked
                .lock()
                .await
                .insert(format!("{ip}/32"), Instant::now());
            drop(permit);
            r.map(drop)
        }));
    }
    let mut seen: HashMap<String, Instant> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen.len() < count && Instant::now() < deadline {
        let entries = watcher
            .ipcache(node::IpcacheRequest {})
            .await?
            .into_inner()
            .entries;
        let now = Instant::now();
        for e in entries.into_iter().filter(|e| e.identity == identity) {
            seen.entry(e.prefix).or_insert(now);
        }
        tokio::time::sleep(Duration::from_millis(POLL_MS)).await;
    }
    for t in tasks {
        t.await??;
    }
    let acked = acked.lock().await;
    let mut lat: Vec<Duration> = seen
        .iter()
        .filter_map(|(p, s)| acked.get(p).map(|a| s.saturating_duration_since(*a)))
        .collect();
    lat.sort();
    let pct = |q: f64| {
        lat.get(((lat.len() as f64 * q).ceil() as usize).saturating_sub(1))
            .copied()
            .unwrap_or_default()
    };
    println!(
        "endpoints: {count}, seen on {}: {}, all upserts acked after {:?}",
        observer["name"],
        seen.len(),
        start.elapsed()
    );
    println!(
        "propagation ack -> remote eBPF map: p50 {:?}  p99 {:?}  max {:?}  (poll interval {POLL_MS} ms)",
        pct(0.50),
        pct(0.99),
        pct(1.0)
    );

    for ip in ips {
        let _ = ident
            .clone()
            .delete_endpoint(id::DeleteEndpointRequest {
                ip: ip.to_string(),
                node: owner.clone(),
            })
            .await;
    }
    let _ = ident
        .clone()
        .release(id::ReleaseRequest {
            id: identity,
            node: owner,
        })
        .await;
    anyhow::ensure!(
        seen.len() == count,
        "only {} of {count} entries reached the node",
        seen.len()
    );
    Ok(())
}
