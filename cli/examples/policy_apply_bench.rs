//! Benchmark: time from applying a policy to its enforcement on every node,
//! for policies of 1, 100 and 1,000 rules selecting 50 endpoints.
//!
//! "Enforced on every node" = every node has acknowledged the policy
//! service's version that contains the policy (a node ACKs only after its
//! datapath holds the entries of every local endpoint). Starts its own
//! pods on a running local cluster and removes them afterwards.
//!
//! `membrane up --nodes 2 --detach && cargo run --release -p membrane-cli --example policy_apply_bench -- [REPS]`

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use membrane_proto::objects::v1 as obj;
use membrane_proto::stream::v1 as stream;
use membrane_runtime::grpc;
use membrane_runtime::tls::TlsFiles;

const ENDPOINTS: usize = 50;

fn membrane(args: &[&str]) -> anyhow::Result<()> {
    let exe = std::env::current_exe()?;
    let bin = exe
        .parent()
        .and_then(|d| d.parent())
        .map(|d| d.join("membrane"))
        .context("membrane binary")?;
    let out = Command::new(bin).args(args).output()?;
    anyhow::ensure!(
        out.status.success(),
        "membrane {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn policy(rules: usize, generation: usize) -> String {
    // Distinct ports per rule; the generation makes every apply a change.
    let ingress: Vec<serde_json::Value> = (0..rules)
        .map(|i| {
            serde_json::json!({
                "fromEndpoints": [{"matchLabels": {"app": "bench"}}],
                "toPorts": [{"ports": [{"port": format!("{}", 10000 + i + generation % 2), "protocol": "TCP"}]}],
            })
        })
        .collect();
    serde_json::json!({
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumNetworkPolicy",
        "metadata": {"name": "bench", "namespace": "default"},
        "spec": {"endpointSelector": {"matchLabels": {"app": "bench"}}, "ingress": ingress},
    })
    .to_string()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    membrane_runtime::tls::install_crypto_provider();
    let reps: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(10);
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
        .and_then(|s| s.iter().find(|s| s["name"] == "policy"))
        .context("policy service")?;
    let channel = grpc::connect(
        svc["endpoint"].as_str().context("endpoint")?,
        svc["server_name"].as_str().context("name")?,
        Some(&tls),
    )
    .await?;
    let nodes: Vec<String> = info["nodes"]
        .as_array()
        .context("nodes")?
        .iter()
        .filter_map(|n| n["name"].as_str().map(String::from))
        .collect();

    eprintln!("starting {ENDPOINTS} endpoints ...");
    for i in 0..ENDPOINTS {
        let node = &nodes[i % nodes.len()];
        membrane(&[
            "pod",
            "run",
            &format!("bench-{i}"),
            "--node",
            node,
            "--labels",
            "app=bench",
        ])?;
    }
    let mut objects = obj::objects_client::ObjectsClient::new(channel.clone());
    let mut subs = stream::desired_state_client::DesiredStateClient::new(channel);

    println!("| rules | endpoints | p50 | p99 | max | samples |");
    println!("| --- | --- | --- | --- | --- | --- |");
    let mut generation = 0;
    for rules in [1usize, 100, 1000] {
        let mut samples = Vec::new();
        for _ in 0..reps {
            generation += 1;
            let before = subs
                .subscribers(stream::SubscribersRequest {})
                .await?
                .into_inner()
                .current_version;
            let start = Instant::now();
            objects
                .apply(obj::ApplyRequest {
                    objects: vec![obj::Object {
                        origin: "bench".into(),
                        json: policy(rules, generation),
                    }],
                    dry_run: false,
                })
                .await
                .map_err(|s| anyhow::anyhow!("apply: {}", s.message()))?;
            loop {
                let s = subs
                    .subscribers(stream::SubscribersRequest {})
                    .await?
                    .into_inner();
                let done = s.current_version > before
                    && nodes.iter().all(|n| {
                        s.nodes.iter().any(|x| {
                            &x.node == n && x.connected && x.acked_version >= s.current_version
                        })
                    });
                if done {
                    break;
                }
                anyhow::ensure!(
                    start.elapsed() < Duration::from_secs(60),
                    "policy not enforced within 60 s"
                );
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            samples.push(start.elapsed());
        }
        samples.sort();
        let pct = |q: f64| {
            samples[((samples.len() as f64 * q).ceil() as usize)
                .saturating_sub(1)
                .min(samples.len() - 1)]
        };
        println!(
            "| {rules} | {ENDPOINTS} | {:.1?} | {:.1?} | {:.1?} | {} |",
            pct(0.5),
            pct(0.99),
            samples[samples.len() - 1],
            samples.len()
        );
    }
    let _ = objects
        .delete(obj::DeleteRequest {
            objects: vec![obj::Object {
                origin: "bench".into(),
                json: policy(1, 0),
            }],
            dry_run: false,
        })
        .await;
    for i in 0..ENDPOINTS {
        let _ = membrane(&["pod", "rm", &format!("bench-{i}")]);
    }
    Ok(())
}
