//! Which programs make up a local cluster and where their binaries are.
//!
//! [`SERVICES`] is the one table of cluster services: adding a service to
//! `membrane up` is adding a line. A service whose binary is not built yet is
//! skipped with a message, so the cluster grows as the workspace does.

use std::path::{Path, PathBuf};

use std::os::unix::fs::PermissionsExt as _;

/// A cluster service: runs in the host namespace and listens on the
/// underlay gateway address so every node namespace can reach it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServiceSpec {
    /// Short name: log/pid file stem, certificate name, `NAME.membrane.local`.
    pub name: &'static str,
    /// Binary file name.
    pub binary: &'static str,
    /// gRPC port on the gateway address.
    pub port: u16,
    /// Environment variable through which node datapaths learn its endpoint.
    pub node_env: &'static str,
}

// === impl ServiceSpec ===

impl ServiceSpec {
    /// Environment variable with the server name nodes expect of this
    /// service: `MEMBRANE_IPAM_ENDPOINT` → `MEMBRANE_IPAM_SERVER_NAME`.
    pub fn node_server_name_env(&self) -> String {
        let stem = self
            .node_env
            .strip_suffix("_ENDPOINT")
            .unwrap_or(self.node_env);
        format!("{stem}_SERVER_NAME")
    }
}

/// Every cluster service, in start order.
#[rustfmt::skip]
pub const SERVICES: &[ServiceSpec] = &[
    ServiceSpec { name: "ipam", binary: "membrane-ipam", port: 7101, node_env: "MEMBRANE_IPAM_ENDPOINT" },
    ServiceSpec { name: "identity", binary: "membrane-identity", port: 7102, node_env: "MEMBRANE_IDENTITY_ENDPOINT" },
    ServiceSpec { name: "relay", binary: "membrane-relay", port: 7108, node_env: "MEMBRANE_RELAY_ENDPOINT" },
    ServiceSpec { name: "policy", binary: "membrane-policy", port: 7103, node_env: "MEMBRANE_POLICY_ENDPOINT" },
    ServiceSpec { name: "lb", binary: "membrane-lb", port: 7104, node_env: "MEMBRANE_LB_ENDPOINT" },
    ServiceSpec { name: "bandwidth", binary: "membrane-bandwidth", port: 7105, node_env: "MEMBRANE_BANDWIDTH_ENDPOINT" },
    ServiceSpec { name: "redirect", binary: "membrane-redirect", port: 7106, node_env: "MEMBRANE_REDIRECT_ENDPOINT" },
    ServiceSpec { name: "proxy-bridge", binary: "membrane-proxy-bridge", port: 7107, node_env: "MEMBRANE_PROXY_BRIDGE_ENDPOINT" },
];

/// The per-node datapath binary, run once inside every node namespace.
pub const NODE_BINARY: &str = "membrane-node-datapath";

/// The node datapath's gRPC port on its underlay address.
pub const NODE_PORT: u16 = 7200;

/// The etcd process's component name (log and pid file stem).
pub const ETCD: &str = "etcd";

/// The identity the CLI presents to every component.
pub const CLI_IDENTITY: &str = "cli";

/// Finds `binary`: only in `bin_dir` when given; else next to the running
/// `membrane` executable (a `cargo build` puts every workspace binary
/// there), then on `PATH`.
pub fn find_binary(binary: &str, bin_dir: Option<&Path>) -> Option<PathBuf> {
    if let Some(dir) = bin_dir {
        return executable(dir.join(binary));
    }
    let beside_us = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join(binary)))
        .and_then(executable);
    beside_us.or_else(|| on_path(binary))
}

/// Finds `binary` on `PATH`.
pub fn on_path(binary: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).find_map(|dir| executable(dir.join(binary)))
}

fn executable(path: PathBuf) -> Option<PathBuf> {
    let meta = std::fs::metadata(&path).ok()?;
    (meta.is_file() && meta.permissions().mode() & 0o111 != 0).then_some(path)
}

/// The program a component's pid must still run for `down` to stop it.
pub fn program_of(component: &str) -> Option<String> {
    if component == ETCD {
        return Some("etcd".to_string());
    }
    if component.starts_with("node-") {
        return Some(NODE_BINARY.to_string());
    }
    SERVICES
        .iter()
        .find(|s| s.name == component)
        .map(|s| s.binary.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_names_and_ports_are_unique() {
        let mut names: Vec<_> = SERVICES.iter().map(|s| s.name).collect();
        let mut ports: Vec<_> = SERVICES.iter().map(|s| s.port).collect();
        names.sort_unstable();
        names.dedup();
        ports.sort_unstable();
        ports.dedup();
        assert_eq!(names.len(), SERVICES.len());
        assert_eq!(ports.len(), SERVICES.len());
        assert!(!ports.contains(&NODE_PORT));
    }

    #[test]
    fn every_component_maps_to_the_program_down_expects() {
        assert_eq!(program_of("etcd").as_deref(), Some("etcd"));
        assert_eq!(program_of("ipam").as_deref(), Some("membrane-ipam"));
        assert_eq!(program_of("node-12").as_deref(), Some(NODE_BINARY));
        assert_eq!(program_of("sshd"), None);
        assert_eq!(
            SERVICES[0].node_server_name_env(),
            "MEMBRANE_IPAM_SERVER_NAME"
        );
    }

    #[test]
    fn an_explicit_bin_dir_is_the_only_place_searched() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(find_binary("sh", Some(dir.path())), None);
        let fake = dir.path().join("membrane-ipam");
        std::fs::write(&fake, "#!/bin/sh\n").expect("write");
        assert_eq!(
            find_binary("membrane-ipam", Some(dir.path())),
            None,
            "not executable"
        );
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        assert_eq!(find_binary("membrane-ipam", Some(dir.path())), Some(fake));
    }
}
