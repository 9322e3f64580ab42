//! The node's side of identities: allocating the identity of each local
//! pod's labels, recording pod and node addresses in the cluster-wide
//! ipcache (both through the identity service), keeping the node's lease
//! alive, and writing the ipcache that the identity service publishes into
//! the eBPF `ipcache` map.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

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
        let e: pb::IpcacheEntry = value
            .to_msg()
            .map_err(|e| format!("resource `{key}`: {e}"))?;
        // IPv6 entries have no map yet.
        let Ok(prefix) = e.prefix.parse::<Ipv4Net>() else {
            continue;
        };
        let id = if e.identity == REMOTE_NODE && e.node == node {
            HOST
        } else {
            e.identity
        };
        out.insert(prefix, id);
    }
    Ok(out)
}

/// Applies the identity service's stream to the eBPF ipcache.
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
}

impl<M: IpcacheMap> IpcacheSink<M> {
    /// Programs `map` for `node`.
    pub fn new(node: impl Into<String>, map: M) -> Self {
        Self {
            node: node.into(),
            map,
            programmed: None,
        }
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
                    let one: BTreeMap<String, Any> =
                        [(key.clone(), value.clone())].into_iter().collect();
                    let id = desired_ipcache(&self.node, &one)?.remove(&prefix);
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
