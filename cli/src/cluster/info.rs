//! `DIR/cluster.json`: what a running local cluster looks like, written by
//! `membrane up` once every component is healthy. Other commands read it to
//! find endpoints, server names and the CLI's certificate; its presence means
//! "an `up` completed here".

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use ipnet::Ipv4Net;
use membrane_runtime::tls::TlsFiles;
use serde::{Deserialize, Serialize};

const FILE: &str = "cluster.json";

/// A running local cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterInfo {
    /// The state directory (`--state-dir`).
    pub state_dir: PathBuf,
    /// etcd client URL.
    pub etcd_endpoint: String,
    /// etcd's pid.
    pub etcd_pid: u32,
    /// The underlay network.
    pub underlay_cidr: Ipv4Net,
    /// The bridge's address: nodes' default gateway and the services' listen address.
    pub underlay_gateway: Ipv4Addr,
    /// The underlay bridge device.
    pub bridge: String,
    /// Pod CIDR of the whole cluster.
    pub cluster_cidr: Ipv4Net,
    /// Prefix length of each node's pod subnet.
    pub node_mask_size: u8,
    /// The CLI's mTLS files (`cli.pem`).
    pub tls: TlsPaths,
    /// Services that were started (missing binaries are not listed).
    pub services: Vec<ServiceInfo>,
    /// Every node namespace, with or without a running datapath.
    pub nodes: Vec<NodeInfo>,
    /// The namespace standing in for the world.
    pub external: ExternalInfo,
}

/// PEM file paths, serializable (unlike [`TlsFiles`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsPaths {
    /// CA certificate.
    pub ca: PathBuf,
    /// Certificate.
    pub cert: PathBuf,
    /// Private key.
    pub key: PathBuf,
}

/// A running cluster service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceInfo {
    /// Short name (`ipam`).
    pub name: String,
    /// gRPC URL (`https://10.99.0.1:7101`).
    pub endpoint: String,
    /// Name its certificate carries (`ipam.membrane.local`).
    pub server_name: String,
    /// Its pid.
    pub pid: u32,
}

/// A node namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Node name (`node-1`).
    pub name: String,
    /// Network namespace name (in /run/netns).
    pub netns: String,
    /// Address of its `eth0`.
    pub underlay_ip: Ipv4Addr,
    /// The datapath's gRPC URL (`https://10.99.0.11:7200`).
    pub endpoint: String,
    /// Name its certificate carries (`node-1.nodes.membrane.local`).
    pub server_name: String,
    /// The datapath's pid; `None` when its binary was not available.
    pub pid: Option<u32>,
}

/// The "world" namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExternalInfo {
    /// Network namespace name.
    pub netns: String,
    /// Address of its `eth0`.
    pub ip: Ipv4Addr,
}

// === impl ClusterInfo ===

impl ClusterInfo {
    /// The path of `cluster.json` in `state_dir`.
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join(FILE)
    }

    /// Reads `DIR/cluster.json`; fails with a hint when no cluster was started there.
    pub fn load(state_dir: &Path) -> anyhow::Result<Self> {
        let path = Self::path(state_dir);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => anyhow::bail!(
                "no local cluster in {} ({} not found); start one with `membrane up`",
                state_dir.display(),
                path.display()
            ),
            Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
        };
        serde_json::from_slice(&bytes).with_context(|| format!("parse {}", path.display()))
    }

    /// Writes `cluster.json` into [`Self::state_dir`].
    pub fn save(&self) -> anyhow::Result<()> {
        let json = serde_json::to_vec_pretty(self).context("serialize cluster.json")?;
        super::write_atomic(&Self::path(&self.state_dir), &json)
    }

    /// The CLI's TLS files, to connect to any component.
    pub fn tls_files(&self) -> TlsFiles {
        TlsFiles {
            ca: self.tls.ca.clone(),
            cert: self.tls.cert.clone(),
            key: self.tls.key.clone(),
        }
    }

    /// The service called `name`, when it runs.
    #[allow(dead_code, reason = "for commands that talk to one service")]
    pub fn service(&self, name: &str) -> Option<&ServiceInfo> {
        self.services.iter().find(|s| s.name == name)
    }

    /// Every pid the cluster runs: etcd, services, node datapaths.
    pub fn pids(&self) -> impl Iterator<Item = u32> + '_ {
        std::iter::once(self.etcd_pid)
            .chain(self.services.iter().map(|s| s.pid))
            .chain(self.nodes.iter().filter_map(|n| n.pid))
    }
}

impl From<&TlsFiles> for TlsPaths {
    fn from(files: &TlsFiles) -> Self {
        Self {
            ca: files.ca.clone(),
            cert: files.cert.clone(),
            key: files.key.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_info_round_trips_through_its_file_and_missing_file_says_so() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = ClusterInfo::load(dir.path()).expect_err("nothing yet");
        assert!(format!("{err:#}").contains("membrane up"), "{err:#}");
        let info = ClusterInfo {
            state_dir: dir.path().to_path_buf(),
            etcd_endpoint: "http://127.0.0.1:23790".into(),
            etcd_pid: 10,
            underlay_cidr: "10.99.0.0/24".parse().expect("net"),
            underlay_gateway: Ipv4Addr::new(10, 99, 0, 1),
            bridge: "mbr0".into(),
            cluster_cidr: "10.200.0.0/16".parse().expect("net"),
            node_mask_size: 24,
            tls: TlsPaths {
                ca: "ca.pem".into(),
                cert: "cli.pem".into(),
                key: "cli-key.pem".into(),
            },
            services: vec![ServiceInfo {
                name: "ipam".into(),
                endpoint: "https://10.99.0.1:7101".into(),
                server_name: "ipam.membrane.local".into(),
                pid: 11,
            }],
            nodes: vec![NodeInfo {
                name: "node-1".into(),
                netns: "node-1".into(),
                underlay_ip: Ipv4Addr::new(10, 99, 0, 11),
                endpoint: "https://10.99.0.11:7200".into(),
                server_name: "node-1.nodes.membrane.local".into(),
                pid: None,
            }],
            external: ExternalInfo {
                netns: "external".into(),
                ip: Ipv4Addr::new(10, 99, 0, 200),
            },
        };
        info.save().expect("save");
        let loaded = ClusterInfo::load(dir.path()).expect("load");
        assert_eq!(loaded, info);
        assert_eq!(loaded.pids().collect::<Vec<_>>(), vec![10, 11]);
        assert_eq!(loaded.service("ipam").map(|s| s.pid), Some(11));
    }
}
