//! Reaching a running cluster: endpoints and TLS material from the state
//! directory that `membrane up` wrote.

use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use membrane_runtime::grpc::{self, GrpcChannel};
use membrane_runtime::tls::TlsFiles;

use crate::cluster::ClusterInfo;

/// A gRPC server of the cluster.
#[derive(Debug, Clone)]
pub struct Target {
    /// Component name (`ipam`, `node-1`).
    pub name: String,
    /// URL.
    pub endpoint: String,
    /// Name in its certificate.
    pub server_name: String,
}

/// Everything a command needs to talk to the cluster.
#[derive(Debug, Clone)]
pub struct Ctx {
    /// The CLI's client certificate.
    pub tls: Option<TlsFiles>,
    /// Services.
    pub services: Vec<Target>,
    /// Node agents.
    pub nodes: Vec<Target>,
    /// etcd client URL.
    pub etcd: String,
    /// The cluster as `up` recorded it.
    pub info: ClusterInfo,
}

impl Ctx {
    /// Reads the cluster's state directory.
    pub fn load(state_dir: &Path) -> anyhow::Result<Self> {
        let info = ClusterInfo::load(state_dir).with_context(|| {
            format!(
                "no cluster found in {} (run `membrane up`)",
                state_dir.display()
            )
        })?;
        Ok(Self::from_info(info))
    }

    fn from_info(info: ClusterInfo) -> Self {
        let services = info
            .services
            .iter()
            .map(|s| Target {
                name: s.name.clone(),
                endpoint: s.endpoint.clone(),
                server_name: s.server_name.clone(),
            })
            .collect();
        // Nodes whose datapath binary was missing have nothing to talk to.
        let nodes = info
            .nodes
            .iter()
            .filter(|n| n.pid.is_some())
            .map(|n| Target {
                name: n.name.clone(),
                endpoint: n.endpoint.clone(),
                server_name: n.server_name.clone(),
            })
            .collect();
        Self {
            tls: Some(info.tls_files()),
            services,
            nodes,
            etcd: info.etcd_endpoint.clone(),
            info,
        }
    }

    /// The service called `name`.
    pub fn service(&self, name: &str) -> anyhow::Result<&Target> {
        self.services
            .iter()
            .find(|s| s.name == name)
            .with_context(|| format!("service `{name}` is not part of this cluster"))
    }

    /// A channel to `target` that fails fast when it is down.
    pub async fn connect(&self, target: &Target) -> anyhow::Result<GrpcChannel> {
        tokio::time::timeout(
            Duration::from_secs(5),
            grpc::connect(&target.endpoint, &target.server_name, self.tls.as_ref()),
        )
        .await
        .with_context(|| {
            format!(
                "connect to {} at {} timed out",
                target.name, target.endpoint
            )
        })?
    }

    /// A channel to the service called `name`.
    pub async fn service_channel(&self, name: &str) -> anyhow::Result<GrpcChannel> {
        let target = self.service(name)?.clone();
        self.connect(&target).await
    }
}
