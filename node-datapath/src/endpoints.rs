//! Endpoints: pods attached to this node. Adding one allocates its address
//! from IPAM, creates the veth pair (pod end named as the runtime asked, node
//! end `lxc<hash>`), configures the pod's address, gateway route and a
//! static neighbour for the gateway (so the pod never ARPs for it), routes
//! the address to the veth on the node, attaches `bpf_lxc` and programs the
//! endpoint map. Every step is undone if a later one fails.
//!
//! Records of attached endpoints live in the state directory, so a restarted
//! agent adopts them (re-attaching through the pinned links without a gap)
//! and a DEL after a restart still releases everything.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use ipnet::Ipv4Net;
use membrane_proto::ipam::v1 as ipam;
use membrane_runtime::grpc::GrpcChannel;
use serde::{Deserialize, Serialize};

use crate::bpf::{Datapath, EndpointInfo, Hook, MacAddr};
use crate::identity::IdentityClient;
use crate::netlink::{self, CommandError};
use crate::policy::PolicyState;

/// Route protocol number marking the per-pod /32 routes on the node.
pub const POD_ROUTE_PROTO: &str = "178";

/// Why an endpoint operation failed.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// A request field is missing or malformed.
    #[error("{field}: {message}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
    /// The container already has this interface.
    #[error("container `{container}` already has interface `{ifname}` (endpoint {id})")]
    AlreadyExists {
        /// Container id.
        container: String,
        /// Interface.
        ifname: String,
        /// Existing endpoint id.
        id: u32,
    },
    /// No such endpoint.
    #[error("container `{container}` has no interface `{ifname}` on this node")]
    NotFound {
        /// Container id.
        container: String,
        /// Interface.
        ifname: String,
    },
    /// CHECK found a difference.
    #[error("endpoint {id} ({container}): {what}")]
    Drifted {
        /// Endpoint id.
        id: u32,
        /// Container id.
        container: String,
        /// What differs.
        what: String,
    },
    /// IPAM refused or was unreachable.
    #[error("ipam: {0}")]
    Ipam(tonic::Status),
    /// The identity service refused or was unreachable.
    #[error("identity: {}", .0.message())]
    Identity(tonic::Status),
    /// A netlink step failed.
    #[error(transparent)]
    Netlink(#[from] CommandError),
    /// An eBPF step failed.
    #[error("datapath: {0:#}")]
    Datapath(anyhow::Error),
    /// The state directory could not be written.
    #[error("state {path}: {source}")]
    State {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

impl From<crate::bpf::Error> for EndpointError {
    fn from(e: crate::bpf::Error) -> Self {
        EndpointError::Datapath(anyhow::Error::new(e))
    }
}

/// An attached endpoint, as recorded on disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointRecord {
    /// Endpoint id (unique on the node).
    pub id: u32,
    /// Container id.
    pub container_id: String,
    /// Interface inside the pod.
    pub ifname: String,
    /// Pod network namespace path.
    pub netns: String,
    /// Pod name.
    pub pod_name: String,
    /// Pod namespace.
    pub pod_namespace: String,
    /// Pod labels.
    pub labels: BTreeMap<String, String>,
    /// Pod annotations.
    pub annotations: BTreeMap<String, String>,
    /// Pod address.
    pub ip: Ipv4Addr,
    /// Pod MAC.
    pub mac: String,
    /// Node-side veth.
    pub host_ifname: String,
    /// Node-side veth index.
    pub host_ifindex: u32,
    /// Node-side veth MAC.
    pub host_mac: String,
    /// Security identity.
    pub identity: u32,
}

/// What the CNI plugin asks for.
#[derive(Debug, Clone, Default)]
pub struct AddRequest {
    /// Container id.
    pub container_id: String,
    /// Pod netns path.
    pub netns: String,
    /// Interface name in the pod.
    pub ifname: String,
    /// Pod name.
    pub pod_name: String,
    /// Pod namespace.
    pub pod_namespace: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Annotations.
    pub annotations: BTreeMap<String, String>,
}

/// The node's addressing, learned from IPAM at start.
#[derive(Debug, Clone, Copy)]
pub struct NodeNet {
    /// This node's pod CIDR.
    pub pod_cidr: Ipv4Net,
    /// The pods' gateway: the first address of the pod CIDR.
    pub gateway: Ipv4Addr,
}

/// Attaches and detaches the pods of this node.
pub struct EndpointManager {
    node: String,
    net: NodeNet,
    dir: PathBuf,
    datapath: Arc<Mutex<Datapath>>,
    ipam: ipam::ipam_client::IpamClient<GrpcChannel>,
    identity: Option<IdentityClient>,
    /// What policy says; read when (re)programming an endpoint.
    policy: Mutex<PolicyState>,
    /// Set when a policy apply failed part-way: the next one reprograms
    /// every endpoint and rewrites every CIDR identity, not only what it changed.
    policy_resync: std::sync::atomic::AtomicBool,
    /// Set while a policy service is configured and its first state has
    /// not been applied yet (agent start): endpoints keep the policy
    /// entries and enforcement the maps hold, so a restarting agent does
    /// not open what a policy closed until it knows the policy.
    policy_pending: std::sync::atomic::AtomicBool,
    /// Serializes add/del: they read and write records and the id space.
    lock: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for EndpointManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndpointManager")
            .field("node", &self.node)
            .field("dir", &self.dir)
            .finish()
    }
}

/// `lxc` + 8 hex digits of a hash of the attachment: short enough for
/// IFNAMSIZ, stable across restarts.
pub fn host_ifname(container_id: &str, ifname: &str) -> String {
    // FNV-1a: tiny, stable, no dependency.
    let mut h: u32 = 0x811c_9dc5;
    for b in container_id.bytes().chain([0]).chain(ifname.bytes()) {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    format!("lxc{h:08x}")
}

fn record_name(container_id: &str, ifname: &str) -> String {
    format!("{container_id}_{ifname}.json")
}

fn valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

impl EndpointManager {
    /// A manager keeping its records under `dir`.
    pub fn new(
        node: String,
        net: NodeNet,
        dir: PathBuf,
        datapath: Arc<Mutex<Datapath>>,
        ipam: ipam::ipam_client::IpamClient<GrpcChannel>,
        identity: Option<IdentityClient>,
    ) -> Result<Self, EndpointError> {
        std::fs::create_dir_all(&dir).map_err(|source| EndpointError::State {
            path: dir.clone(),
            source,
        })?;
        Ok(Self {
            node,
            net,
            dir,
            datapath,
            ipam,
            identity,
            policy: Mutex::new(PolicyState::default()),
            policy_resync: std::sync::atomic::AtomicBool::new(false),
            policy_pending: std::sync::atomic::AtomicBool::new(false),
            lock: tokio::sync::Mutex::new(()),
        })
    }

    /// Declares that policy comes from a policy service: until its first
    /// state is applied, endpoints keep what the maps hold (see
    /// `policy_pending`), and that first apply reprograms every endpoint.
    pub fn expect_policy(&self) {
        use std::sync::atomic::Ordering;
        self.policy_pending.store(true, Ordering::SeqCst);
        self.policy_resync.store(true, Ordering::SeqCst);
    }

    /// The node's name.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The node's addressing.
    pub fn net(&self) -> NodeNet {
        self.net
    }

    fn datapath(&self) -> std::sync::MutexGuard<'_, Datapath> {
        self.datapath.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every recorded endpoint, sorted by id.
    pub fn records(&self) -> Vec<EndpointRecord> {
        let mut out: Vec<EndpointRecord> = std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
            .filter_map(|e| serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok())
            .collect();
        out.sort_by_key(|r: &EndpointRecord| r.id);
        out
    }

    fn record(&self, container_id: &str, ifname: &str) -> Option<EndpointRecord> {
        let bytes = std::fs::read(self.dir.join(record_name(container_id, ifname))).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    fn save(&self, r: &EndpointRecord) -> Result<(), EndpointError> {
        let path = self.dir.join(record_name(&r.container_id, &r.ifname));
        let tmp = path.with_extension("tmp");
        let bytes = serde_json::to_vec_pretty(r).unwrap_or_default();
        std::fs::write(&tmp, bytes)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|source| EndpointError::State { path, source })
    }

    fn forget(&self, container_id: &str, ifname: &str) {
        let _ = std::fs::remove_file(self.dir.join(record_name(container_id, ifname)));
    }

    fn next_id(&self) -> u32 {
        let used: std::collections::BTreeSet<u32> = self.records().iter().map(|r| r.id).collect();
        (1..).find(|i| !used.contains(i)).unwrap_or(u32::MAX)
    }

    /// Attaches a pod.
    pub async fn add(&self, req: AddRequest) -> Result<EndpointRecord, EndpointError> {
        if !valid_id(&req.container_id) {
            return Err(EndpointError::Invalid {
                field: "container_id",
                message: format!(
                    "`{}` must be 1-128 characters of [A-Za-z0-9._-]",
                    req.container_id
                ),
            });
        }
        if req.ifname.is_empty() || req.ifname.len() > 15 || req.ifname.contains('/') {
            return Err(EndpointError::Invalid {
                field: "ifname",
                message: format!("`{}` is not a valid interface name", req.ifname),
            });
        }
        if !Path::new(&req.netns).exists() {
            return Err(EndpointError::Invalid {
                field: "netns",
                message: format!("`{}` does not exist", req.netns),
            });
        }
        let _guard = self.lock.lock().await;
        if let Some(r) = self.record(&req.container_id, &req.ifname) {
            return Err(EndpointError::AlreadyExists {
                container: req.container_id,
                ifname: req.ifname,
                id: r.id,
            });
        }
        let owner = format!("cni/{}/{}", req.container_id, req.ifname);
        let alloc = self
            .ipam
            .clone()
            .allocate(ipam::AllocateRequest {
                node: self.node.clone(),
                owner,
            })
            .await
            .map_err(EndpointError::Ipam)?
            .into_inner();
        let ip: Ipv4Addr = alloc.ip.parse().map_err(|_| {
            EndpointError::Ipam(tonic::Status::internal(format!(
                "ipam returned `{}`",
                alloc.ip
            )))
        })?;
        let id = self.next_id();
        let host = host_ifname(&req.container_id, &req.ifname);
        let namespace = if req.pod_namespace.is_empty() {
            "default"
        } else {
            req.pod_namespace.as_str()
        };
        let identity = match &self.identity {
            Some(c) => match c.allocate(namespace, &req.labels).await {
                Ok(i) => i,
                Err(s) => {
                    let _ = self.release(ip).await;
                    return Err(EndpointError::Identity(s));
                }
            },
            None => 0,
        };
        let attached = match self.plumb(&req, ip, id, &host, identity) {
            Ok(record) => match &self.identity {
                Some(c) => c
                    .upsert_endpoint(ip, identity, namespace, &req.pod_name)
                    .await
                    .map(|()| record)
                    .map_err(EndpointError::Identity),
                None => Ok(record),
            },
            Err(e) => Err(e),
        };
        match attached {
            Ok(record) => {
                tracing::info!(endpoint = record.id, pod = %format!("{}/{}", record.pod_namespace, record.pod_name), ip = %ip, identity, dev = %host, "endpoint attached");
                Ok(record)
            }
            Err(e) => {
                // Undo: the veth (both ends), the map entry, the record, the identity reference, the address.
                let _ = netlink::ip(&["link", "del", &host]);
                let _ = self.datapath().remove_endpoint(ip);
                self.forget(&req.container_id, &req.ifname);
                self.release_identity(identity).await;
                let _ = self.release(ip).await;
                Err(e)
            }
        }
    }

    /// Drops this node's reference to `identity` unless another local endpoint still uses it.
    async fn release_identity(&self, identity: u32) {
        let Some(c) = &self.identity else { return };
        if identity < 256 || self.records().iter().any(|r| r.identity == identity) {
            return;
        }
        if let Err(s) = c.release(identity).await {
            tracing::warn!(identity, error = %s.message(), "could not release identity reference");
        }
    }

    /// Replaces a pod's labels: the endpoint moves to the new label set's
    /// identity (map entry and cluster-wide ipcache), and the old identity's
    /// reference is dropped when no local endpoint uses it any more.
    pub async fn set_labels(
        &self,
        container_id: &str,
        ifname: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<EndpointRecord, EndpointError> {
        let _guard = self.lock.lock().await;
        let mut r = self
            .record(container_id, ifname)
            .ok_or_else(|| EndpointError::NotFound {
                container: container_id.into(),
                ifname: ifname.into(),
            })?;
        let old = r.identity;
        let new = match &self.identity {
            Some(c) => c
                .allocate(&r.pod_namespace, &labels)
                .await
                .map_err(EndpointError::Identity)?,
            None => 0,
        };
        r.labels = labels;
        r.identity = new;
        self.reprogram(&r)?;
        self.save(&r)?;
        if let Some(c) = &self.identity {
            c.upsert_endpoint(r.ip, new, &r.pod_namespace, &r.pod_name)
                .await
                .map_err(EndpointError::Identity)?;
        }
        if old != new {
            self.release_identity(old).await;
        }
        tracing::info!(endpoint = r.id, old, new, "endpoint relabelled");
        Ok(r)
    }

    /// Records every local endpoint again under a new identity lease: its
    /// identity reference and its ipcache entry. Used after the old lease expired.
    pub async fn rerecord(&self) -> Result<(), EndpointError> {
        let Some(c) = &self.identity else {
            return Ok(());
        };
        let _guard = self.lock.lock().await;
        for mut r in self.records() {
            let id = c
                .allocate(&r.pod_namespace, &r.labels)
                .await
                .map_err(EndpointError::Identity)?;
            if id != r.identity {
                r.identity = id;
                self.reprogram(&r)?;
                self.save(&r)?;
            }
            c.upsert_endpoint(r.ip, id, &r.pod_namespace, &r.pod_name)
                .await
                .map_err(EndpointError::Identity)?;
        }
        Ok(())
    }

    /// The synchronous part of `add`: links, addresses, routes, eBPF.
    fn plumb(
        &self,
        req: &AddRequest,
        ip: Ipv4Addr,
        id: u32,
        host: &str,
        identity: u32,
    ) -> Result<EndpointRecord, EndpointError> {
        netlink::ip(&[
            "link",
            "add",
            host,
            "type",
            "veth",
            "peer",
            "name",
            &req.ifname,
            "netns",
            &req.netns,
        ])?;
        let host_link = netlink::link(host).ok_or_else(|| EndpointError::Invalid {
            field: "ifname",
            message: format!("{host} vanished"),
        })?;
        let gw = self.net.gateway.to_string();
        let ifn = &req.ifname;
        netlink::ip_batch_in(
            &req.netns,
            &[
                "link set lo up".into(),
                format!("link set {ifn} up"),
                format!("addr add {ip}/32 dev {ifn}"),
                format!("route add {gw} dev {ifn} scope link"),
                format!("route add default via {gw} dev {ifn}"),
                format!(
                    "neigh replace {gw} lladdr {} dev {ifn} nud permanent",
                    host_link.mac
                ),
            ],
        )?;
        let pod_link = netlink::link_in(&req.netns, ifn).ok_or_else(|| EndpointError::Invalid {
            field: "ifname",
            message: format!("{ifn} vanished from the pod"),
        })?;
        netlink::ip(&["link", "set", host, "up"])?;
        netlink::ip(&[
            "route",
            "replace",
            &format!("{ip}/32"),
            "dev",
            host,
            "scope",
            "link",
            "proto",
            POD_ROUTE_PROTO,
        ])?;
        let record = EndpointRecord {
            id,
            container_id: req.container_id.clone(),
            ifname: ifn.clone(),
            netns: req.netns.clone(),
            pod_name: req.pod_name.clone(),
            pod_namespace: if req.pod_namespace.is_empty() {
                "default".into()
            } else {
                req.pod_namespace.clone()
            },
            labels: req.labels.clone(),
            annotations: req.annotations.clone(),
            ip,
            mac: pod_link.mac,
            host_ifname: host.to_string(),
            host_ifindex: host_link.ifindex,
            host_mac: host_link.mac,
            identity,
        };
        self.program(&record)?;
        self.save(&record)?;
        Ok(record)
    }

    /// Attaches `bpf_lxc` (both directions) to the endpoint's veth, then
    /// writes its policy and its map entry.
    fn program(&self, r: &EndpointRecord) -> Result<(), EndpointError> {
        {
            let mut dp = self.datapath();
            dp.attach(Hook::Lxc, r.host_ifindex)?;
            dp.attach(Hook::LxcEgress, r.host_ifindex)?;
        }
        self.reprogram(r)
    }

    /// Writes the endpoint's policy entries, then its map entry with the
    /// enforcement flags: the entry never points at a policy not yet written.
    fn reprogram(&self, r: &EndpointRecord) -> Result<(), EndpointError> {
        if self
            .policy_pending
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            return self.reprogram_keeping_policy(r);
        }
        let st = self.policy.lock().unwrap_or_else(|p| p.into_inner());
        let mut info = endpoint_info(r)?;
        info.flags = st.flags_for(r.identity);
        let entries = st.entries_for(r.id, r.identity);
        let mut dp = self.datapath();
        dp.replace_endpoint_policy(r.id, &entries)
            .map_err(|e| EndpointError::Datapath(anyhow::Error::new(e)))?;
        dp.upsert_endpoint(r.ip, &info)?;
        Ok(())
    }

    /// Before the policy is known: the endpoint's map entry with the
    /// enforcement flags it already has (none for a new endpoint), its
    /// policy entries untouched.
    fn reprogram_keeping_policy(&self, r: &EndpointRecord) -> Result<(), EndpointError> {
        let mut info = endpoint_info(r)?;
        let mut dp = self.datapath();
        info.flags = dp
            .endpoint(r.ip)
            .map_err(|e| EndpointError::Datapath(anyhow::Error::new(e)))?
            .map(|old| old.flags)
            .unwrap_or(0);
        dp.upsert_endpoint(r.ip, &info)?;
        Ok(())
    }

    /// Replaces the policy state and reprograms the endpoints whose
    /// identity's entries or enforcement changed (every endpoint after an
    /// apply that failed part-way); CIDR prefixes that rules name get
    /// node-local identities in the ipcache. Returns how many endpoints it
    /// reprogrammed.
    pub async fn apply_policies(
        &self,
        policies: BTreeMap<u32, membrane_proto::policy::v1::IdentityPolicy>,
    ) -> Result<usize, EndpointError> {
        use std::sync::atomic::Ordering;

        let _guard = self.lock.lock().await;
        // Marked before any write, cleared only when all succeeded: the
        // state below moves to the new policies at once, so a retry of the
        // same policies would otherwise see nothing to do.
        let resync = self.policy_resync.swap(true, Ordering::SeqCst);
        let (change, cidrs) = {
            let mut st = self.policy.lock().unwrap_or_else(|p| p.into_inner());
            let change = st.set_policies(policies);
            let cidrs: Vec<(Ipv4Net, u32)> = if resync {
                st.cidr_identities().iter().map(|(n, i)| (*n, *i)).collect()
            } else {
                change.cidr_added.clone()
            };
            (change, cidrs)
        };
        {
            let mut dp = self.datapath();
            for (net, id) in cidrs {
                dp.upsert_ipcache(net, id)?;
            }
            for net in &change.cidr_removed {
                dp.remove_ipcache(*net)?;
            }
        }
        // The policy is known from here on: reprogram from it.
        self.policy_pending.store(false, Ordering::SeqCst);
        let mut reprogrammed = 0;
        for r in self.records() {
            if resync || change.reaches(r.identity) {
                self.reprogram(&r)?;
                reprogrammed += 1;
            }
        }
        self.policy_resync.store(false, Ordering::SeqCst);
        Ok(reprogrammed)
    }

    /// The rule a drop's rule id names.
    pub fn rule_name(&self, id: u32) -> Option<String> {
        self.policy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .rule_name(id)
            .map(str::to_string)
    }

    async fn release(&self, ip: Ipv4Addr) -> Result<(), EndpointError> {
        match self
            .ipam
            .clone()
            .release(ipam::ReleaseRequest {
                node: self.node.clone(),
                ip: ip.to_string(),
            })
            .await
        {
            Ok(_) => Ok(()),
            // Already free: DEL is idempotent.
            Err(s) if s.code() == tonic::Code::FailedPrecondition => Ok(()),
            Err(s) => Err(EndpointError::Ipam(s)),
        }
    }

    /// Detaches a pod; `Ok(false)` when nothing was attached.
    pub async fn del(&self, container_id: &str, ifname: &str) -> Result<bool, EndpointError> {
        let _guard = self.lock.lock().await;
        let Some(r) = self.record(container_id, ifname) else {
            // No record: remove a veth a crashed ADD may have left.
            let _ = netlink::ip(&["link", "del", &host_ifname(container_id, ifname)]);
            return Ok(false);
        };
        {
            let mut dp = self.datapath();
            dp.remove_endpoint(r.ip)?;
            dp.detach(Hook::Lxc, r.host_ifindex)?;
            dp.detach(Hook::LxcEgress, r.host_ifindex)?;
            dp.replace_endpoint_policy(r.id, &[])
                .map_err(|e| EndpointError::Datapath(anyhow::Error::new(e)))?;
        }
        if netlink::link(&r.host_ifname).is_some() {
            netlink::ip(&["link", "del", &r.host_ifname])?;
        }
        if let Some(c) = &self.identity
            && let Err(s) = c.delete_endpoint(r.ip).await
            && s.code() != tonic::Code::NotFound
        {
            return Err(EndpointError::Identity(s));
        }
        self.release(r.ip).await?;
        self.forget(container_id, ifname);
        self.release_identity(r.identity).await;
        tracing::info!(endpoint = r.id, ip = %r.ip, "endpoint detached");
        Ok(true)
    }

    /// Verifies that a pod is still as attached.
    pub fn check(
        &self,
        container_id: &str,
        netns: &str,
        ifname: &str,
    ) -> Result<(), EndpointError> {
        let r = self
            .record(container_id, ifname)
            .ok_or_else(|| EndpointError::NotFound {
                container: container_id.into(),
                ifname: ifname.into(),
            })?;
        let drift = |what: String| EndpointError::Drifted {
            id: r.id,
            container: r.container_id.clone(),
            what,
        };
        if !netns.is_empty() && netns != r.netns {
            return Err(drift(format!(
                "netns is `{netns}`, attached in `{}`",
                r.netns
            )));
        }
        let link = netlink::link_in(&r.netns, ifname)
            .ok_or_else(|| drift(format!("interface `{ifname}` is gone from the pod")))?;
        if link.mac != r.mac {
            return Err(drift(format!(
                "interface `{ifname}` has MAC {}, attached with {}",
                link.mac, r.mac
            )));
        }
        let addrs = netlink::addrs_in(&r.netns, ifname)?;
        if !addrs.contains(&format!("{}/32", r.ip)) {
            return Err(drift(format!(
                "address {}/32 missing (has {addrs:?})",
                r.ip
            )));
        }
        if netlink::default_gateway_in(&r.netns)? != Some(self.net.gateway) {
            return Err(drift(format!(
                "default route is not via {}",
                self.net.gateway
            )));
        }
        if netlink::link(&r.host_ifname).map(|l| l.ifindex) != Some(r.host_ifindex) {
            return Err(drift(format!("node-side veth `{}` is gone", r.host_ifname)));
        }
        let programmed = self
            .datapath()
            .endpoints()?
            .into_iter()
            .any(|(ip, e)| ip == r.ip && e.ifindex == r.host_ifindex);
        if !programmed {
            return Err(drift(format!("endpoint map has no entry for {}", r.ip)));
        }
        Ok(())
    }

    /// Addresses the endpoint map holds now.
    pub fn programmed(&self) -> Result<BTreeMap<Ipv4Addr, EndpointInfo>, EndpointError> {
        Ok(self.datapath().endpoints()?.into_iter().collect())
    }

    /// After a restart: re-attach every recorded endpoint whose veth still
    /// exists (adopting its pinned link), and clean up those whose veth is
    /// gone. Returns how many were adopted.
    pub async fn restore(&self) -> Result<usize, EndpointError> {
        let mut adopted = 0;
        for r in self.records() {
            match netlink::link(&r.host_ifname) {
                Some(l) if l.ifindex == r.host_ifindex => {
                    self.program(&r)?;
                    adopted += 1;
                }
                _ => {
                    tracing::warn!(endpoint = r.id, ip = %r.ip, "veth gone while the agent was down; releasing");
                    let _ = self.datapath().remove_endpoint(r.ip);
                    let _ = self.datapath().detach(Hook::Lxc, r.host_ifindex);
                    let _ = self.datapath().detach(Hook::LxcEgress, r.host_ifindex);
                    let _ = self.datapath().replace_endpoint_policy(r.id, &[]);
                    let _ = self.release(r.ip).await;
                    self.forget(&r.container_id, &r.ifname);
                }
            }
        }
        Ok(adopted)
    }
}

fn endpoint_info(r: &EndpointRecord) -> Result<EndpointInfo, EndpointError> {
    let mac = |field: &'static str, s: &str| {
        s.parse::<MacAddr>().map_err(|_| EndpointError::Invalid {
            field,
            message: format!("bad MAC `{s}`"),
        })
    };
    Ok(EndpointInfo {
        ifindex: r.host_ifindex,
        pod_mac: mac("mac", &r.mac)?,
        node_mac: mac("host_mac", &r.host_mac)?,
        endpoint_id: r.id,
        identity: r.identity,
        flags: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_interface_names_are_short_stable_and_distinct() {
        let a = host_ifname("abc123", "eth0");
        assert_eq!(a, host_ifname("abc123", "eth0"));
        assert!(a.len() <= 15 && a.starts_with("lxc"));
        assert_ne!(a, host_ifname("abc124", "eth0"));
        assert_ne!(a, host_ifname("abc123", "eth1"));
    }

    #[test]
    fn container_ids_follow_the_cni_character_set() {
        assert!(valid_id("pod-a_1.x"));
        assert!(!valid_id(""));
        assert!(!valid_id("../etc"));
        assert!(!valid_id("a b"));
    }
}
