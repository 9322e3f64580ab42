//! The nodes side of the relay: which nodes there are, and a client to each
//! one's observer.
//!
//! [`NodeObserver`] is the seam: production uses [`GrpcNode`] (a lazy,
//! self-reconnecting mTLS channel to `https://<underlay-ip>:7200`); tests
//! plug in-process streams. [`NodeSource`] says which nodes to ask now:
//! [`StaticNodes`] (`--nodes`) or [`IpamNodes`] (IPAM's node list, polled).

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt as _};
use membrane_proto::ipam::v1 as ipam;
use membrane_proto::observer::v1 as pb;
use membrane_runtime::grpc::{self, GrpcChannel};
use membrane_runtime::pki;
use membrane_runtime::tls::TlsFiles;
use tokio::sync::Mutex;
use tonic::Status;

/// A stream of one observer's answers.
pub type FlowStream = Pin<Box<dyn Stream<Item = Result<pb::GetFlowsResponse, Status>> + Send>>;

/// One node's observer, as the relay uses it.
#[tonic::async_trait]
pub trait NodeObserver: Send + Sync {
    /// `GetFlows` on that node.
    async fn get_flows(&self, req: pb::GetFlowsRequest) -> Result<FlowStream, Status>;
    /// `ServerStatus` on that node.
    async fn server_status(&self) -> Result<pb::ServerStatusResponse, Status>;
}

/// A node the relay observes.
#[derive(Clone)]
pub struct Peer {
    /// Node name.
    pub name: String,
    /// Its observer.
    pub observer: Arc<dyn NodeObserver>,
}

/// Where the relay's node list comes from.
#[tonic::async_trait]
pub trait NodeSource: Send + Sync {
    /// The nodes to ask now, sorted by name.
    async fn nodes(&self) -> Vec<Peer>;
}

/// Errors in a `--nodes` list.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NodeListError {
    /// An entry is not `name=url`.
    #[error("node entry `{0}` is not `name=url`")]
    Malformed(String),
    /// A name appears twice.
    #[error("node `{0}` is listed twice")]
    Duplicate(String),
}

/// Parses `--nodes` entries (`name=url`), e.g. `node-1=https://10.99.0.11:7200`.
pub fn parse_node_list(entries: &[String]) -> Result<Vec<(String, String)>, NodeListError> {
    let mut out: Vec<(String, String)> = Vec::new();
    for entry in entries.iter().map(|e| e.trim()).filter(|e| !e.is_empty()) {
        let (name, url) = entry
            .split_once('=')
            .filter(|(n, u)| !n.trim().is_empty() && !u.trim().is_empty())
            .ok_or_else(|| NodeListError::Malformed(entry.to_string()))?;
        let (name, url) = (name.trim().to_string(), url.trim().to_string());
        if out.iter().any(|(n, _)| *n == name) {
            return Err(NodeListError::Duplicate(name));
        }
        out.push((name, url));
    }
    Ok(out)
}

/// The observer endpoint of a node at `underlay_ip`.
pub fn node_url(underlay_ip: &str, port: u16) -> String {
    format!("https://{underlay_ip}:{port}")
}

/// How long a node may take to answer `ServerStatus` or to open `GetFlows`.
pub const NODE_TIMEOUT: Duration = Duration::from_secs(3);

/// A node observer over gRPC.
#[derive(Debug, Clone)]
pub struct GrpcNode {
    client: pb::observer_client::ObserverClient<GrpcChannel>,
}

// === impl GrpcNode ===

impl GrpcNode {
    /// A client to `url`, expecting the certificate of node `name`. Connects
    /// lazily and reconnects by itself, so a node that is down now is
    /// picked up again when it returns.
    pub fn new(name: &str, url: &str, tls: Option<&TlsFiles>) -> anyhow::Result<Self> {
        let channel = grpc::connect_lazy(url, &pki::node_server_name(name), tls)?;
        Ok(Self {
            client: pb::observer_client::ObserverClient::new(channel),
        })
    }
}

#[tonic::async_trait]
impl NodeObserver for GrpcNode {
    async fn get_flows(&self, req: pb::GetFlowsRequest) -> Result<FlowStream, Status> {
        let mut client = self.client.clone();
        let resp = tokio::time::timeout(NODE_TIMEOUT, client.get_flows(req))
            .await
            .map_err(|_| Status::deadline_exceeded("node did not answer in time"))??;
        Ok(resp.into_inner().boxed())
    }

    async fn server_status(&self) -> Result<pb::ServerStatusResponse, Status> {
        let mut client = self.client.clone();
        let resp = tokio::time::timeout(
            NODE_TIMEOUT,
            client.server_status(pb::ServerStatusRequest {}),
        )
        .await
        .map_err(|_| Status::deadline_exceeded("node did not answer in time"))??;
        Ok(resp.into_inner())
    }
}

/// A fixed node list (`--nodes`).
#[derive(Clone)]
pub struct StaticNodes(Vec<Peer>);

// === impl StaticNodes ===

impl StaticNodes {
    /// These peers, sorted by name.
    pub fn new(mut peers: Vec<Peer>) -> Self {
        peers.sort_by(|a, b| a.name.cmp(&b.name));
        Self(peers)
    }

    /// gRPC clients for `name=url` entries.
    pub fn from_list(list: &[(String, String)], tls: Option<&TlsFiles>) -> anyhow::Result<Self> {
        let peers = list
            .iter()
            .map(|(name, url)| {
                Ok(Peer {
                    name: name.clone(),
                    observer: Arc::new(GrpcNode::new(name, url, tls)?),
                })
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Self::new(peers))
    }
}

#[tonic::async_trait]
impl NodeSource for StaticNodes {
    async fn nodes(&self) -> Vec<Peer> {
        self.0.clone()
    }
}

/// The node list from IPAM: refreshed by [`IpamNodes::run`] every few
/// seconds, and on demand when a request finds it older than a second (so a
/// node that just joined is seen at once). When IPAM cannot be reached, the
/// last list stays.
pub struct IpamNodes {
    ipam: ipam::ipam_client::IpamClient<GrpcChannel>,
    tls: Option<TlsFiles>,
    port: u16,
    state: Mutex<IpamState>,
}

#[derive(Default)]
struct IpamState {
    /// Per node: its URL and client (rebuilt only when the URL changes).
    peers: BTreeMap<String, (String, Peer)>,
    refreshed: Option<Instant>,
}

/// A node list older than this is refreshed before it is used.
const STALE: Duration = Duration::from_secs(1);

// === impl IpamNodes ===

impl IpamNodes {
    /// Follows IPAM at `url` (`server_name` in its certificate); nodes
    /// are reached on `port` of their underlay address.
    pub fn new(
        url: &str,
        server_name: &str,
        tls: Option<TlsFiles>,
        port: u16,
    ) -> anyhow::Result<Self> {
        let channel = grpc::connect_lazy(url, server_name, tls.as_ref())?;
        Ok(Self {
            ipam: ipam::ipam_client::IpamClient::new(channel),
            tls,
            port,
            state: Mutex::new(IpamState::default()),
        })
    }

    /// Reads IPAM's node list and updates the clients.
    pub async fn refresh(&self) -> anyhow::Result<()> {
        let mut client = self.ipam.clone();
        let nodes =
            tokio::time::timeout(NODE_TIMEOUT, client.list_nodes(ipam::ListNodesRequest {}))
                .await
                .map_err(|_| anyhow::anyhow!("ipam did not answer in time"))?
                .map_err(|s| anyhow::anyhow!("list nodes: {}", s.message()))?
                .into_inner()
                .nodes;
        let mut state = self.state.lock().await;
        let mut next = BTreeMap::new();
        for n in nodes {
            let url = node_url(&n.underlay_ip, self.port);
            let kept = state
                .peers
                .remove(&n.node)
                .filter(|(old_url, _)| *old_url == url);
            let entry = match kept {
                Some(entry) => entry,
                None => {
                    tracing::info!(node = %n.node, url = %url, "observing node");
                    let observer = Arc::new(GrpcNode::new(&n.node, &url, self.tls.as_ref())?);
                    (
                        url,
                        Peer {
                            name: n.node.clone(),
                            observer,
                        },
                    )
                }
            };
            next.insert(n.node, entry);
        }
        for gone in state.peers.keys() {
            tracing::info!(node = %gone, "node left; no longer observed");
        }
        state.peers = next;
        state.refreshed = Some(Instant::now());
        Ok(())
    }

    /// Refreshes every `every` until the process ends.
    pub async fn run(self: Arc<Self>, every: Duration) {
        loop {
            if let Err(e) = self.refresh().await {
                tracing::warn!(error = %format!("{e:#}"), "cannot refresh the node list from ipam");
            }
            tokio::time::sleep(every).await;
        }
    }
}

#[tonic::async_trait]
impl NodeSource for IpamNodes {
    async fn nodes(&self) -> Vec<Peer> {
        let stale = self
            .state
            .lock()
            .await
            .refreshed
            .is_none_or(|t| t.elapsed() > STALE);
        if stale && let Err(e) = self.refresh().await {
            tracing::warn!(error = %format!("{e:#}"), "cannot refresh the node list from ipam; using the last one");
        }
        self.state
            .lock()
            .await
            .peers
            .values()
            .map(|(_, p)| p.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn a_node_list_is_name_equals_url_pairs() {
        assert_eq!(
            parse_node_list(&list(&[
                "a=https://127.0.0.1:1",
                " b = http://[::1]:2 ",
                ""
            ])),
            Ok(vec![
                ("a".into(), "https://127.0.0.1:1".into()),
                ("b".into(), "http://[::1]:2".into()),
            ])
        );
    }

    #[test]
    fn a_bad_node_list_names_the_bad_entry() {
        assert_eq!(
            parse_node_list(&list(&["https://x:1"])),
            Err(NodeListError::Malformed("https://x:1".into()))
        );
        assert_eq!(
            parse_node_list(&list(&["a="])),
            Err(NodeListError::Malformed("a=".into()))
        );
        assert_eq!(
            parse_node_list(&list(&["a=u1", "a=u2"])),
            Err(NodeListError::Duplicate("a".into()))
        );
    }

    #[test]
    fn nodes_are_reached_on_their_underlay_address() {
        assert_eq!(node_url("10.99.0.12", 7200), "https://10.99.0.12:7200");
    }
}
