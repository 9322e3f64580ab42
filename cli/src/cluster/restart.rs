//! `membrane restart COMPONENT`: stop one component of a running local
//! cluster and start it again as `up` did (same program, environment and
//! namespace), then wait until it is healthy. Used to show that restarting
//! a node's datapath does not interrupt its pods' connections.

use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use membrane_runtime::grpc;

use super::components;
use super::info::ClusterInfo;
use super::process::{self, Launch};

/// Restarts `component` (`ipam`, `node-1`, …).
pub async fn restart(state_dir: &Path, component: &str) -> anyhow::Result<()> {
    let mut info = ClusterInfo::load(state_dir)?;
    let path = process::launch_file(state_dir, component);
    let launch: Launch = serde_json::from_slice(&std::fs::read(&path).with_context(|| {
        format!("component `{component}` was not started by `membrane up` here")
    })?)
    .with_context(|| format!("parse {}", path.display()))?;
    let (url, server_name) = if let Some(n) = info.nodes.iter().find(|n| n.name == component) {
        (n.endpoint.clone(), n.server_name.clone())
    } else if let Some(s) = info.services.iter().find(|s| s.name == component) {
        (s.endpoint.clone(), s.server_name.clone())
    } else {
        anyhow::bail!("`{component}` is not a service or node of this cluster");
    };

    let entries: Vec<_> = process::pid_entries(state_dir)
        .into_iter()
        .filter(|e| e.name == component)
        .collect();
    process::stop_all(&entries, components::program_of).await?;
    let child = process::spawn(state_dir, &launch)?;
    let pid = child.pid;
    // The child is detached in its own session; dropping the handle leaves it running.
    drop(child);

    let tls = info.tls_files();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match grpc::check_health(&url, &server_name, Some(&tls), Duration::from_secs(2)).await {
            Ok(()) => break,
            Err(e) if tokio::time::Instant::now() > deadline => {
                return Err(e.context(format!("{component} did not become healthy after restart")));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    if let Some(n) = info.nodes.iter_mut().find(|n| n.name == component) {
        n.pid = Some(pid);
    }
    if let Some(s) = info.services.iter_mut().find(|s| s.name == component) {
        s.pid = pid;
    }
    info.save()?;
    println!("{component} restarted (pid {pid})");
    Ok(())
}
