//! The node's side of identities: allocating the identity of each local
//! pod's labels, recording pod and node addresses in the cluster-wide
//! ipcache (both through the identity service), keeping the node's lease
//! alive, and writing the ipcache that the identity service publishes into
//! the eBPF `ipcache` map. The same stream also keeps a [`ClusterView`]
//! current (identity labels, who owns each ipcache address) for the flow
//! observer's enrichment, so the node opens the stream once.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::sync::{Arc, RwLock};

use ipnet::Ipv4Net;
use membrane_proto::identity::v1 as pb;
use membrane_runtime::grpc::GrpcChannel;
use membrane_runtime::stream::StateSink;
use prost_types::Any;

/// Reserved identity of the node itself.
pub const HOST: u32 = 1;
/// Reserved identity of other nodes.
pub const REMOTE_NODE: u32 = 6;

/// Talks to the identity service on behalf of this node.
#[derive(Debug, Clone)]
pub struct IdentityClient {
    node: String,
    client: pb::identity_client::IdentityClient<GrpcChannel>,
}

impl IdentityClient {
    /// A client for `node`.
    pub fn new(node: impl Into<String>, channel: GrpcChannel) -> Self {
        Self {
            node: node.into(),
            client: pb::identity_client::IdentityClient::new(channel),
        }
    }

    /// The identity of a pod's labels (a reference held by this node).
    pub async fn allocate(
        &self,
        namespace: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<u32, tonic::Status> {
        let resp = self
            .client
            .clone()
            .allocate(pb::AllocateRequest {
                node: self.node.clone(),
                namespace: namespace.to_string(),
                labels: labels.clone().into_iter().collect(),
            })
            .await?;
        Ok(resp.into_inner().id)
    }

    /// Drops this node's reference to `id`.
    pub async fn release(&self, id: u32) -> Result<(), tonic::Status> {
        self.client
            .clone()
            .release(pb::ReleaseRequest {
                id,
                node: self.node.clone(),
            })
            .await
            .map(drop)
    }

    /// Records a pod address in the ipcache.
    pub async fn upsert_endpoint(
        &self,
        ip: Ipv4Addr,
        id: u32,
        namespace: &str,
        pod: &str,
    ) -> Result<(), tonic::Status> {
        self.client
            .clone()
            .upsert_endpoint(pb::UpsertEndpointRequest {
                ip: ip.to_string(),
                identity: id,
                node: self.node.clone(),
                namespace: namespace.to_string(),
                pod: pod.to_string(),
            })
            .await
            .map(drop)
    }

    /// Removes a pod address from the ipcache.
    pub async fn delete_endpoint(&self, ip: Ipv4Addr) -> Result<(), tonic::Status> {
        self.client
            .clone()
            .delete_endpoint(pb::DeleteEndpointRequest {
                ip: ip.to_string(),
                node: self.node.clone(),
            })
            .await
            .map(drop)
    }

    /// Keeps the node's lease alive; `true` when the lease is new (everything
    /// recorded under the old one is gone and must be recorded again).
    pub async fn heartbeat(&self) -> Result<bool, tonic::Status> {
        Ok(self
            .client
            .clone()
            .heartbeat(pb::HeartbeatRequest {
                node: self.node.clone(),
            })
            .await?
            .into_inner()
            .new_lease)
    }

    /// Records the node's underlay address (remote-node for the others).
    pub async fn register_node_ip(&self, ip: Ipv4Addr) -> Result<(), tonic::Status> {
        self.client
            .clone()
            .register_node_ip(pb::RegisterNodeIpRequest {
                node: self.node.clone(),
                ip: ip.to_string(),
            })
            .await
            .map(drop)
    }
}

/// The eBPF ipcache map, as far as the sink needs it.
pub trait IpcacheMap: Send + 'static {
    /// Entries now in the map.
    fn entries(&mut self) -> Result<BTreeMap<Ipv4Net, u32>, String>;
    /// Adds or replaces an entry.
    fn upsert(&mut self, prefix: Ipv4Net, identity: u32) -> Result<(), String>;
    /// Removes an entry.
    fn remove(&mut self, prefix: Ipv4Net) -> Result<(), String>;
}

/// The ipcache a node wants, from the identity service's resources: every
/// `ipcache/<prefix>` entry, with this node's own address as `host` rather
/// than `remote-node`.
pub fn desired_ipcache(
    node: &str,
    state: &BTreeMap<String, Any>,
) -> Result<BTreeMap<Ipv4Net, u32>, String> {
    let mut out = BTreeMap::new();
    for (key, value) in state.range("ipcache/".to_string()..) {
        if !key.starts_with("ipcache/") {
            break;
        }
        if let Some((prefix, id)) = ipcache_entry(node, key, value)? {
            out.insert(prefix, id);
        }
    }
    Ok(out)
}

/// The map entry of one `ipcache/<prefix>` resource; `None` for what the
/// map does not hold (IPv6 entries have no map yet).
fn ipcache_entry(node: &str, key: &str, value: &Any) -> Result<Option<(Ipv4Net, u32)>, String> {
    let e: pb::IpcacheEntry = value
        .to_msg()
        .map_err(|e| format!("resource `{key}`: {e}"))?;
    let Ok(prefix) = e.prefix.parse::<Ipv4Net>() else {
        return Ok(None);
    };
    let id = if e.identity == REMOTE_NODE && e.node == node {
        HOST
    } else {
        e.identity
    };
    Ok(Some((prefix, id)))
}

/// The labels of every identity the identity service published
/// (`identity/<id>` → `IdentityInfo`), as sorted `source:key=value` strings.
/// Shared and cheap to clone; readers never wait for the stream long.
#[derive(Debug, Clone, Default)]
pub struct IdentityLabels(Arc<RwLock<HashMap<u32, Arc<[String]>>>>);

/// Who an ipcache address belongs to (`ipcache/<prefix>` → `IpcacheEntry`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpcacheOwner {
    /// The address's identity.
    pub identity: u32,
    /// Node hosting the pod, or the node whose underlay address it is.
    pub node: String,
    /// Pod namespace; empty for node addresses.
    pub namespace: String,
    /// Pod name; empty for node addresses.
    pub pod: String,
}

/// Host addresses (`/32` entries) of the published ipcache and who owns
/// them: how a flow to a pod on another node still shows its pod and node.
#[derive(Debug, Clone, Default)]
pub struct IpcacheOwners(Arc<RwLock<HashMap<Ipv4Addr, IpcacheOwner>>>);

/// What the identity stream tells the observer about the cluster.
#[derive(Debug, Clone, Default)]
pub struct ClusterView {
    pub labels: IdentityLabels,
    pub owners: IpcacheOwners,
}

/// Applies the identity service's stream to the eBPF ipcache (and, when
/// given one, to a [`ClusterView`]).
///
/// A snapshot (or a retry after a failure) reconciles the whole map against
/// the kernel's contents; an update touches only the changed prefixes, so
/// applying N updates costs O(N) map operations, not O(N²).
#[derive(Debug)]
pub struct IpcacheSink<M> {
    node: String,
    map: M,
    /// What this sink programmed, when known to match the kernel map.
    programmed: Option<BTreeMap<Ipv4Net, u32>>,
    /// Kept current from every apply; `view_synced` once a full pass ran.
    view: Option<ClusterView>,
    view_synced: bool,
}

// === impl IdentityLabels ===

impl IdentityLabels {
    /// The labels of `id`, if the identity service published it.
    pub fn get(&self, id: u32) -> Option<Arc<[String]>> {
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .cloned()
    }

    /// Identities known.
    pub fn len(&self) -> usize {
        self.0.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether no identity is known.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sets (or, with `None`, removes) the labels of `id`.
    pub fn set(&self, id: u32, labels: Option<Vec<String>>) {
        let mut m = self.0.write().unwrap_or_else(|p| p.into_inner());
        match labels {
            Some(l) => m.insert(id, l.into()),
            None => m.remove(&id),
        };
    }
}

// === impl IpcacheOwners ===

impl IpcacheOwners {
    /// Who `ip` belongs to, if the ipcache has it as a host address.
    pub fn get(&self, ip: Ipv4Addr) -> Option<IpcacheOwner> {
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&ip)
            .cloned()
    }

    /// Sets (or, with `None`, removes) the owner of `ip`.
    pub fn set(&self, ip: Ipv4Addr, owner: Option<IpcacheOwner>) {
        let mut m = self.0.write().unwrap_or_else(|p| p.into_inner());
        match owner {
            Some(o) => m.insert(ip, o),
            None => m.remove(&ip),
        };
    }
}

// === impl ClusterView ===

impl ClusterView {
    /// Updates from the stream's state: every `identity/` and `ipcache/`
    /// key when `full`, else only `changed`. Entries that do not decode are
    /// skipped (the view is for observability; the ipcache map NACKs them).
    pub fn update(&self, state: &BTreeMap<String, Any>, changed: &[String], full: bool) {
        let keys: Vec<&String> = if full {
            let mut labels = self.labels.0.write().unwrap_or_else(|p| p.into_inner());
            labels.clear();
            drop(labels);
            self.owners
                .0
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .clear();
            state.keys().collect()
        } else {
            changed.iter().collect()
        };
        for key in keys {
            let value = state.get(key);
            if let Some(id) = key.strip_prefix("identity/") {
                let Ok(id) = id.parse::<u32>() else { continue };
                let info = value.and_then(|v| v.to_msg::<pb::IdentityInfo>().ok());
                self.labels.set(id, info.map(|i| i.labels));
            } else if let Some(prefix) = key.strip_prefix("ipcache/") {
                let Ok(net) = prefix.parse::<Ipv4Net>() else {
                    continue;
                };
                if net.prefix_len() != 32 {
                    continue;
                }
                let owner = value
                    .and_then(|v| v.to_msg::<pb::IpcacheEntry>().ok())
                    .map(|e| IpcacheOwner {
                        identity: e.identity,
                        node: e.node,
                        namespace: e.namespace,
                        pod: e.pod,
                    });
                self.owners.set(net.addr(), owner);
            }
        }
    }
}

impl<M: IpcacheMap> IpcacheSink<M> {
    /// Programs `map` for `node`.
    pub fn new(node: impl Into<String>, map: M) -> Self {
        Self {
            node: node.into(),
            map,
            programmed: None,
            view: None,
            view_synced: false,
        }
    }

    /// Also keeps `view` current from the stream.
    pub fn with_view(mut self, view: ClusterView) -> Self {
        self.view = Some(view);
        self
    }

    /// Makes the map hold exactly the desired entries; decodes everything first.
    pub fn reconcile(&mut self, state: &BTreeMap<String, Any>) -> Result<(), String> {
        let want = desired_ipcache(&self.node, state)?;
        self.programmed = None;
        let have = self.map.entries()?;
        // Node-local CIDR identities belong to policy, not to this stream.
        let stale: BTreeSet<Ipv4Net> = have
            .iter()
            .filter(|(p, id)| !want.contains_key(p) && **id < crate::policy::CIDR_BASE)
            .map(|(p, _)| *p)
            .collect();
        for (prefix, id) in &want {
            if have.get(prefix) != Some(id) {
                self.map.upsert(*prefix, *id)?;
            }
        }
        for prefix in stale {
            self.map.remove(prefix)?;
        }
        self.programmed = Some(want);
        Ok(())
    }

    /// Applies only `changed` keys; falls back to a full reconcile when the
    /// sink does not know what the map holds.
    pub fn apply_changes(
        &mut self,
        state: &BTreeMap<String, Any>,
        changed: &[String],
    ) -> Result<(), String> {
        let Some(mut programmed) = self.programmed.take() else {
            return self.reconcile(state);
        };
        // Decode everything first, so bad input changes nothing.
        let mut ops: Vec<(Ipv4Net, Option<u32>)> = Vec::new();
        for key in changed.iter().filter(|k| k.starts_with("ipcache/")) {
            let Ok(prefix) = key["ipcache/".len()..].parse::<Ipv4Net>() else {
                continue;
            };
            match state.get(key) {
                Some(value) => {
                    let id = ipcache_entry(&self.node, key, value)?
                        .filter(|(p, _)| *p == prefix)
                        .map(|(_, id)| id);
                    ops.push((prefix, id));
                }
                None => ops.push((prefix, None)),
            }
        }
        for (prefix, id) in ops {
            match id {
                Some(id) if programmed.get(&prefix) != Some(&id) => {
                    self.map.upsert(prefix, id)?;
                    programmed.insert(prefix, id);
                }
                Some(_) => {}
                None => {
                    if programmed.remove(&prefix).is_some() {
                        self.map.remove(prefix)?;
                    }
                }
            }
        }
        self.programmed = Some(programmed);
        Ok(())
    }
}

impl<M: IpcacheMap> StateSink for IpcacheSink<M> {
    async fn apply(
        &mut self,
        version: u64,
        state: &BTreeMap<String, Any>,
        changed: &[String],
    ) -> Result<(), String> {
        // The view follows the published state even when the map NACKs:
        // `changed` is relative to the previous call, whatever its outcome.
        if let Some(view) = &self.view {
            view.update(state, changed, !self.view_synced);
            self.view_synced = true;
        }
        self.apply_changes(state, changed)?;
        tracing::debug!(version, changed = changed.len(), "ipcache applied");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct FakeMap(BTreeMap<Ipv4Net, u32>);

    impl IpcacheMap for FakeMap {
        fn entries(&mut self) -> Result<BTreeMap<Ipv4Net, u32>, String> {
            Ok(self.0.clone())
        }
        fn upsert(&mut self, prefix: Ipv4Net, identity: u32) -> Result<(), String> {
            self.0.insert(prefix, identity);
            Ok(())
        }
        fn remove(&mut self, prefix: Ipv4Net) -> Result<(), String> {
            self.0.remove(&prefix);
            Ok(())
        }
    }

    fn entry(prefix: &str, identity: u32, node: &str) -> (String, Any) {
        let e = pb::IpcacheEntry {
            prefix: prefix.into(),
            identity,
            node: node.into(),
            namespace: String::new(),
            pod: String::new(),
        };
        (
            format!("ipcache/{prefix}"),
            Any::from_msg(&e).expect("encode"),
        )
    }

    #[test]
    fn the_own_node_address_is_host_and_others_are_remote_node() {
        let state: BTreeMap<_, _> = [
            entry("10.99.0.11/32", REMOTE_NODE, "node-1"),
            entry("10.99.0.12/32", REMOTE_NODE, "node-2"),
            entry("10.200.0.5/32", 300, "node-2"),
        ]
        .into_iter()
        .collect();
        let mut sink = IpcacheSink::new("node-1", FakeMap::default());
        sink.reconcile(&state).expect("reconcile");
        let got: Vec<(String, u32)> = sink
            .map
            .0
            .iter()
            .map(|(p, i)| (p.to_string(), *i))
            .collect();
        assert_eq!(
            got,
            [
                ("10.99.0.11/32".into(), HOST),
                ("10.99.0.12/32".into(), REMOTE_NODE),
                ("10.200.0.5/32".into(), 300)
            ]
        );
    }

    #[test]
    fn removed_entries_leave_the_map_and_bad_input_changes_nothing() {
        let mut sink = IpcacheSink::new("node-1", FakeMap::default());
        let mut state: BTreeMap<_, _> = [
            entry("10.200.0.5/32", 300, "node-2"),
            entry("10.200.0.6/32", 301, "node-2"),
        ]
        .into_iter()
        .collect();
        sink.reconcile(&state).expect("reconcile");
        state.remove("ipcache/10.200.0.6/32");
        sink.reconcile(&state).expect("reconcile");
        assert_eq!(sink.map.0.len(), 1);
        state.insert(
            "ipcache/garbage".into(),
            Any {
                type_url: "x".into(),
                value: vec![0xff, 0xff],
            },
        );
        assert!(sink.reconcile(&state).is_err());
        assert_eq!(sink.map.0.len(), 1);
    }

    fn pod_entry(prefix: &str, identity: u32, node: &str, ns: &str, pod: &str) -> (String, Any) {
        let e = pb::IpcacheEntry {
            prefix: prefix.into(),
            identity,
            node: node.into(),
            namespace: ns.into(),
            pod: pod.into(),
        };
        (
            format!("ipcache/{prefix}"),
            Any::from_msg(&e).expect("encode"),
        )
    }

    fn identity(id: u32, labels: &[&str]) -> (String, Any) {
        let i = pb::IdentityInfo {
            id,
            labels: labels.iter().map(|l| l.to_string()).collect(),
            reserved: false,
        };
        (format!("identity/{id}"), Any::from_msg(&i).expect("encode"))
    }

    #[tokio::test]
    async fn the_sink_keeps_identity_labels_and_ipcache_owners_current_for_the_observer() {
        let view = ClusterView::default();
        let mut sink = IpcacheSink::new("node-1", FakeMap::default()).with_view(view.clone());
        let mut state: BTreeMap<_, _> = [
            identity(300, &["k8s:app=db"]),
            pod_entry("10.200.2.5/32", 300, "node-2", "prod", "db-0"),
        ]
        .into_iter()
        .collect();
        let all: Vec<String> = state.keys().cloned().collect();
        sink.apply(1, &state, &all).await.expect("snapshot");
        assert_eq!(
            view.labels.get(300).as_deref(),
            Some(&["k8s:app=db".to_string()][..])
        );
        let owner = view
            .owners
            .get("10.200.2.5".parse().expect("ip"))
            .expect("owner");
        assert_eq!(
            (owner.node.as_str(), owner.pod.as_str()),
            ("node-2", "db-0")
        );

        let (k, v) = identity(301, &["k8s:app=web"]);
        state.insert(k.clone(), v);
        state.remove("identity/300");
        state.remove("ipcache/10.200.2.5/32");
        let changed = [k, "identity/300".into(), "ipcache/10.200.2.5/32".into()];
        sink.apply(2, &state, &changed).await.expect("update");
        assert!(view.labels.get(300).is_none());
        assert!(view.labels.get(301).is_some());
        assert!(view.owners.get("10.200.2.5".parse().expect("ip")).is_none());
    }

    #[test]
    fn updates_touch_only_changed_prefixes_and_match_a_full_reconcile() {
        let mut sink = IpcacheSink::new("node-1", FakeMap::default());
        let mut state: BTreeMap<_, _> = [entry("10.200.0.5/32", 300, "node-2")]
            .into_iter()
            .collect();
        sink.apply_changes(&state, &["ipcache/10.200.0.5/32".into()])
            .expect("first apply reconciles");
        let (k, v) = entry("10.200.0.6/32", 301, "node-2");
        state.insert(k.clone(), v);
        state.remove("ipcache/10.200.0.5/32");
        sink.apply_changes(&state, &[k, "ipcache/10.200.0.5/32".into()])
            .expect("update");
        let got: Vec<_> = sink
            .map
            .0
            .iter()
            .map(|(p, i)| (p.to_string(), *i))
            .collect();
        assert_eq!(got, [("10.200.0.6/32".to_string(), 301)]);
        // A bad changed value fails without touching the map.
        state.insert(
            "ipcache/10.200.0.7/32".into(),
            Any {
                type_url: "x".into(),
                value: vec![0xff],
            },
        );
        assert!(
            sink.apply_changes(&state, &["ipcache/10.200.0.7/32".into()])
                .is_err()
        );
        assert_eq!(sink.map.0.len(), 1);
    }
}
