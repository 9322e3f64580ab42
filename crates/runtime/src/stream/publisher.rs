//! The publisher half of the desired-state stream.

use std::collections::{BTreeMap, BTreeSet};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::Stream;
use membrane_proto::stream::v1 as pb;
use pb::desired_state_server::DesiredState;
use prost_types::Any;
use tokio::sync::{broadcast, mpsc, watch};
use tonic::{Request, Response, Status, Streaming};

use super::SNAPSHOT_CHUNK;

/// Which nodes see a resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Every node.
    All,
    /// Only the named node.
    Node(String),
}

impl Scope {
    fn visible_to(&self, node: &str) -> bool {
        match self {
            Scope::All => true,
            Scope::Node(n) => n == node,
        }
    }
}

/// One change of published state.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// A resource is created or replaced.
    Upsert {
        /// Resource key.
        key: String,
        /// Who sees it.
        scope: Scope,
        /// Its value.
        value: Any,
    },
    /// A resource is removed.
    Remove {
        /// Resource key.
        key: String,
    },
}

/// Delivery state of one node, as this replica saw it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeDelivery {
    /// Whether a stream from the node is open.
    pub connected: bool,
    /// Newest version the node acknowledged.
    pub acked_version: u64,
    /// Newest version the node refused.
    pub nacked_version: u64,
    /// Why it refused.
    pub nack_reason: String,
    /// Identifies the node's current stream, so an old stream closing late
    /// does not mark a reconnected node disconnected.
    stream_id: u64,
}

/// A change as broadcast to streams: removals carry the scope the resource had.
#[derive(Debug)]
struct Delta {
    version: u64,
    upserts: Vec<(String, Scope, Any)>,
    removals: Vec<(String, Scope)>,
}

#[derive(Debug, Default)]
struct State {
    version: u64,
    resources: BTreeMap<String, (Scope, Any)>,
    nodes: BTreeMap<String, NodeDelivery>,
    next_stream_id: u64,
}

/// The state a service publishes to nodes. Cheap to clone; clones share state.
#[derive(Debug, Clone)]
pub struct Publisher {
    state: Arc<Mutex<State>>,
    tx: broadcast::Sender<Arc<Delta>>,
    /// Names of the nodes with an open stream.
    connected_tx: Arc<watch::Sender<BTreeSet<String>>>,
}

impl Default for Publisher {
    fn default() -> Self {
        Self::new()
    }
}

impl Publisher {
    /// An empty publisher at version 0.
    pub fn new() -> Self {
        let (tx, _) = broadcast::channel(1024);
        Self {
            state: Arc::default(),
            tx,
            connected_tx: Arc::new(watch::Sender::new(BTreeSet::new())),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock leaves plain data behind; keep serving it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The current version.
    pub fn version(&self) -> u64 {
        self.lock().version
    }

    /// Number of resources published.
    pub fn len(&self) -> usize {
        self.lock().resources.len()
    }

    /// Whether nothing is published.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Applies `changes` as `version`. A version not above the current one is
    /// a replay (e.g. a re-delivered etcd event) and is ignored.
    pub fn apply(&self, version: u64, changes: Vec<Change>) {
        let mut st = self.lock();
        if version <= st.version {
            return;
        }
        self.apply_locked(&mut st, version, changes);
    }

    /// Replaces everything with `resources` at `version`, publishing only the
    /// difference. Used after (re)listing the store.
    pub fn replace_all(&self, version: u64, resources: Vec<(String, Scope, Any)>) {
        let mut st = self.lock();
        let mut wanted: BTreeMap<String, (Scope, Any)> =
            resources.into_iter().map(|(k, s, v)| (k, (s, v))).collect();
        let mut changes: Vec<Change> = st
            .resources
            .keys()
            .filter(|k| !wanted.contains_key(*k))
            .map(|k| Change::Remove { key: k.clone() })
            .collect();
        for (key, (scope, value)) in std::mem::take(&mut wanted) {
            if st.resources.get(&key) != Some(&(scope.clone(), value.clone())) {
                changes.push(Change::Upsert { key, scope, value });
            }
        }
        if changes.is_empty() {
            return;
        }
        // Versions only grow, even if the store's revision went backwards.
        let version = version.max(st.version + 1);
        self.apply_locked(&mut st, version, changes);
    }

    fn apply_locked(&self, st: &mut State, version: u64, changes: Vec<Change>) {
        let mut delta = Delta {
            version,
            upserts: Vec::new(),
            removals: Vec::new(),
        };
        for change in changes {
            match change {
                Change::Upsert { key, scope, value } => {
                    let old = st
                        .resources
                        .insert(key.clone(), (scope.clone(), value.clone()));
                    if old.as_ref() == Some(&(scope.clone(), value.clone())) {
                        continue; // The same value again: nothing to publish.
                    }
                    if let Some((old_scope, _)) = old.filter(|(s, _)| *s != scope) {
                        delta.removals.push((key.clone(), old_scope));
                    }
                    delta.upserts.push((key, scope, value));
                }
                Change::Remove { key } => {
                    if let Some((scope, _)) = st.resources.remove(&key) {
                        delta.removals.push((key, scope));
                    }
                }
            }
        }
        // A version that changes nothing is not published: a node that has
        // acknowledged the current version is then known to be in sync.
        if delta.upserts.is_empty() && delta.removals.is_empty() {
            return;
        }
        st.version = version;
        // No receivers is fine: no node is subscribed.
        let _ = self.tx.send(Arc::new(delta));
    }

    /// The names of the nodes with an open stream to this replica, as they
    /// change.
    pub fn connected_nodes(&self) -> watch::Receiver<BTreeSet<String>> {
        self.connected_tx.subscribe()
    }

    fn publish_connected(&self, st: &State) {
        let now: BTreeSet<String> = st
            .nodes
            .iter()
            .filter(|(_, d)| d.connected)
            .map(|(n, _)| n.clone())
            .collect();
        self.connected_tx.send_if_modified(|old| {
            let changed = *old != now;
            *old = now;
            changed
        });
    }

    /// [`Self::deliveries`] as the stream API reports them, sorted by node.
    pub fn subscriber_statuses(&self) -> Vec<pb::SubscriberStatus> {
        self.deliveries()
            .into_iter()
            .map(|(node, d)| pb::SubscriberStatus {
                node,
                connected: d.connected,
                acked_version: d.acked_version,
                nacked_version: d.nacked_version,
                nack_reason: d.nack_reason,
            })
            .collect()
    }

    /// The delivery state of every node that subscribed to this replica.
    pub fn deliveries(&self) -> BTreeMap<String, NodeDelivery> {
        self.lock().nodes.clone()
    }

    /// The resources `node` sees, with the version, and a receiver for what
    /// follows: taken under one lock so no change falls between them.
    fn snapshot_for(
        &self,
        node: &str,
    ) -> (u64, Vec<pb::Resource>, broadcast::Receiver<Arc<Delta>>) {
        let st = self.lock();
        let resources = st
            .resources
            .iter()
            .filter(|(_, (scope, _))| scope.visible_to(node))
            .map(|(key, (_, value))| pb::Resource {
                key: key.clone(),
                value: Some(value.clone()),
            })
            .collect();
        (st.version, resources, self.tx.subscribe())
    }

    fn connected(&self, node: &str) -> u64 {
        let mut st = self.lock();
        st.next_stream_id += 1;
        let id = st.next_stream_id;
        let entry = st.nodes.entry(node.to_string()).or_default();
        entry.connected = true;
        entry.stream_id = id;
        self.publish_connected(&st);
        id
    }

    fn disconnected(&self, node: &str, stream_id: u64) {
        let mut st = self.lock();
        if let Some(entry) = st.nodes.get_mut(node)
            && entry.stream_id == stream_id
        {
            entry.connected = false;
            self.publish_connected(&st);
        }
    }

    fn record(&self, node: &str, f: impl FnOnce(&mut NodeDelivery)) {
        if let Some(entry) = self.lock().nodes.get_mut(node) {
            f(entry);
        }
    }

    /// The gRPC service serving this publisher.
    pub fn service(&self) -> pb::desired_state_server::DesiredStateServer<PublisherService> {
        pb::desired_state_server::DesiredStateServer::new(PublisherService {
            publisher: self.clone(),
        })
    }
}

/// How long a node may take to send `Hello` after opening a stream.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// The gRPC face of a [`Publisher`].
#[derive(Debug, Clone)]
pub struct PublisherService {
    publisher: Publisher,
}

type UpdateStream = Pin<Box<dyn Stream<Item = Result<pb::StateUpdate, Status>> + Send>>;

#[tonic::async_trait]
impl DesiredState for PublisherService {
    type SubscribeStream = UpdateStream;

    async fn subscribe(
        &self,
        request: Request<Streaming<pb::SubscribeRequest>>,
    ) -> Result<Response<UpdateStream>, Status> {
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no hello within 10s"))??;
        let hello = match first.and_then(|m| m.kind) {
            Some(pb::subscribe_request::Kind::Hello(h)) => h,
            _ => {
                return Err(Status::invalid_argument(
                    "subscribe: the first message must be `hello`",
                ));
            }
        };
        if hello.node.is_empty() {
            return Err(Status::invalid_argument(
                "subscribe: hello.node: must not be empty",
            ));
        }
        let node = hello.node;
        tracing::info!(node = %node, last_applied = hello.last_applied_version, "node subscribed");
        let (out_tx, out_rx) = mpsc::channel(16);
        let publisher = self.publisher.clone();
        tokio::spawn(async move {
            let stream_id = publisher.connected(&node);
            let reason = serve_node(&publisher, &node, inbound, out_tx).await;
            publisher.disconnected(&node, stream_id);
            tracing::info!(node = %node, reason = %reason, "node stream closed");
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(out_rx),
        )))
    }

    async fn subscribers(
        &self,
        _request: Request<pb::SubscribersRequest>,
    ) -> Result<Response<pb::SubscribersResponse>, Status> {
        let nodes = self.publisher.subscriber_statuses();
        Ok(Response::new(pb::SubscribersResponse {
            current_version: self.publisher.version(),
            nodes,
        }))
    }
}

type Out = mpsc::Sender<Result<pb::StateUpdate, Status>>;

/// Streams a snapshot and then updates to one node, reading its ACKs/NACKs.
/// Returns why the stream ended.
async fn serve_node(
    publisher: &Publisher,
    node: &str,
    mut inbound: Streaming<pb::SubscribeRequest>,
    out: Out,
) -> String {
    let (mut sent, mut rx) = match send_snapshot(publisher, node, &out).await {
        Some(v) => v,
        None => return "node went away during snapshot".into(),
    };
    loop {
        tokio::select! {
            delta = rx.recv() => match delta {
                Ok(delta) => {
                    // Everything else already waiting goes out in the same
                    // update: a node that is behind catches up in a few
                    // messages (and ACKs) rather than one per version.
                    let mut merged = Merged::default();
                    merged.add(&delta, node);
                    let mut lagged = None;
                    for _ in 1..MAX_COALESCE {
                        match rx.try_recv() {
                            Ok(delta) => merged.add(&delta, node),
                            Err(broadcast::error::TryRecvError::Lagged(n)) => {
                                lagged = Some(n);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    if let Some(n) = lagged {
                        tracing::warn!(node = %node, missed = n, "node stream lagged; resending snapshot");
                        match send_snapshot(publisher, node, &out).await {
                            Some((v, r)) => { sent = v; rx = r; }
                            None => return "node went away during snapshot".into(),
                        }
                    } else if let Some(update) = merged.into_update() {
                        sent = update.version;
                        if out.send(Ok(update)).await.is_err() {
                            return "node went away".into();
                        }
                    }
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(node = %node, missed = n, "node stream lagged; resending snapshot");
                    match send_snapshot(publisher, node, &out).await {
                        Some((v, r)) => { sent = v; rx = r; }
                        None => return "node went away during snapshot".into(),
                    }
                }
                Err(broadcast::error::RecvError::Closed) => return "publisher closed".into(),
            },
            msg = inbound.message() => match msg {
                Ok(Some(pb::SubscribeRequest { kind: Some(pb::subscribe_request::Kind::Ack(ack)) })) => {
                    if ack.version > sent {
                        tracing::warn!(node = %node, version = ack.version, sent, "ack for a version never sent; ignored");
                        continue;
                    }
                    publisher.record(node, |d| d.acked_version = d.acked_version.max(ack.version));
                }
                Ok(Some(pb::SubscribeRequest { kind: Some(pb::subscribe_request::Kind::Nack(nack)) })) => {
                    tracing::warn!(node = %node, version = nack.version, reason = %nack.reason, "node refused update");
                    publisher.record(node, |d| {
                        d.nacked_version = d.nacked_version.max(nack.version);
                        d.nack_reason = nack.reason.clone();
                    });
                }
                Ok(Some(_)) => {
                    let _ = out.send(Err(Status::invalid_argument(
                        "subscribe: after `hello` only `ack` and `nack` are accepted",
                    ))).await;
                    return "protocol violation".into();
                }
                Ok(None) => return "node closed its stream".into(),
                Err(status) => return format!("inbound error: {status}"),
            },
        }
    }
}

async fn send_snapshot(
    publisher: &Publisher,
    node: &str,
    out: &Out,
) -> Option<(u64, broadcast::Receiver<Arc<Delta>>)> {
    let (version, resources, rx) = publisher.snapshot_for(node);
    let mut chunks: Vec<Vec<pb::Resource>> = resources
        .chunks(SNAPSHOT_CHUNK)
        .map(<[pb::Resource]>::to_vec)
        .collect();
    if chunks.is_empty() {
        chunks.push(Vec::new());
    }
    let last = chunks.len() - 1;
    for (i, upserts) in chunks.into_iter().enumerate() {
        let update = pb::StateUpdate {
            version,
            snapshot: true,
            snapshot_end: i == last,
            upserts,
            removals: Vec::new(),
        };
        out.send(Ok(update)).await.ok()?;
    }
    Some((version, rx))
}

/// At most this many published versions are sent to a node as one update.
const MAX_COALESCE: usize = 1024;

/// Consecutive deltas as one node sees them, net of each other: the last
/// change of each key wins, and the version is the newest delta's.
#[derive(Debug, Default)]
struct Merged {
    version: u64,
    /// Resource key → its value, or `None` when removed.
    changes: BTreeMap<String, Option<Any>>,
}

impl Merged {
    /// Adds the part of `delta` that `node` sees. Within one delta removals
    /// come first (a resource whose scope changed is removed from its old
    /// scope and upserted in its new one), as the subscriber applies them.
    fn add(&mut self, delta: &Delta, node: &str) {
        let removals = delta
            .removals
            .iter()
            .filter(|(_, scope)| scope.visible_to(node));
        for (key, _) in removals {
            self.changes.insert(key.clone(), None);
        }
        let upserts = delta
            .upserts
            .iter()
            .filter(|(_, scope, _)| scope.visible_to(node));
        for (key, _, value) in upserts {
            self.changes.insert(key.clone(), Some(value.clone()));
        }
        // Versions grow; one this node does not see still counts, so that
        // an ACK of the update covers it.
        self.version = self.version.max(delta.version);
    }

    /// The update to send, or `None` if the node sees nothing of it.
    fn into_update(self) -> Option<pb::StateUpdate> {
        if self.changes.is_empty() {
            return None;
        }
        let mut upserts = Vec::new();
        let mut removals = Vec::new();
        for (key, value) in self.changes {
            match value {
                Some(value) => upserts.push(pb::Resource {
                    key,
                    value: Some(value),
                }),
                None => removals.push(key),
            }
        }
        Some(pb::StateUpdate {
            version: self.version,
            snapshot: false,
            snapshot_end: false,
            upserts,
            removals,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn any(v: &str) -> Any {
        Any {
            type_url: "test/v".into(),
            value: v.as_bytes().to_vec(),
        }
    }

    fn delta(version: u64, upserts: &[(&str, Scope, &str)], removals: &[(&str, Scope)]) -> Delta {
        Delta {
            version,
            upserts: upserts
                .iter()
                .map(|(k, s, v)| (k.to_string(), s.clone(), any(v)))
                .collect(),
            removals: removals
                .iter()
                .map(|(k, s)| (k.to_string(), s.clone()))
                .collect(),
        }
    }

    /// (version, upserts as key and value bytes, removals).
    type Summary = (u64, Vec<(String, Vec<u8>)>, Vec<String>);

    fn summary(u: &pb::StateUpdate) -> Summary {
        (
            u.version,
            u.upserts
                .iter()
                .map(|r| (r.key.clone(), r.value.clone().unwrap_or_default().value))
                .collect(),
            u.removals.clone(),
        )
    }

    #[test]
    fn merged_deltas_carry_the_last_change_of_each_key_at_the_newest_version() {
        let n1 = || Scope::Node("node-1".into());
        let n2 = || Scope::Node("node-2".into());
        let deltas = [
            delta(5, &[("a", Scope::All, "1"), ("b", Scope::All, "1")], &[]),
            delta(6, &[("a", Scope::All, "2")], &[("c", Scope::All)]),
            // Removed then published again: an upsert.
            delta(7, &[], &[("b", Scope::All)]),
            delta(8, &[("b", Scope::All, "3")], &[]),
            // Published then removed: a removal.
            delta(9, &[("d", n1(), "1")], &[]),
            delta(10, &[], &[("d", n1())]),
            // Moved from node-1's scope to node-2's: node-1 sees a removal.
            delta(11, &[("e", n2(), "1")], &[("e", n1())]),
            // Only node-2 sees it; the version still counts.
            delta(12, &[("f", n2(), "1")], &[]),
        ];
        let mut m = Merged::default();
        for d in &deltas {
            m.add(d, "node-1");
        }
        let u = m.into_update().expect("an update");
        assert!(!u.snapshot && !u.snapshot_end);
        assert_eq!(
            summary(&u),
            (
                12,
                vec![("a".into(), b"2".to_vec()), ("b".into(), b"3".to_vec())],
                vec!["c".into(), "d".into(), "e".into()]
            )
        );
        // A scope change inside one delta, both scopes visible: the upsert wins.
        let mut m = Merged::default();
        m.add(
            &delta(3, &[("x", Scope::All, "2")], &[("x", n1())]),
            "node-1",
        );
        let u = m.into_update().expect("an update");
        assert_eq!(summary(&u), (3, vec![("x".into(), b"2".to_vec())], vec![]));
        // Nothing visible: nothing to send.
        let mut m = Merged::default();
        m.add(&delta(4, &[("y", n2(), "1")], &[]), "node-1");
        assert!(m.into_update().is_none());
    }
}
