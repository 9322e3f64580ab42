//! The `membrane.observer.v1.Observer` service the relay serves: every
//! request fans out to every node, and the answers are merged.
//!
//! - `GetFlows` without `follow`: every node gets the same request; answers
//!   are collected, sorted by time and cut to `number` flows overall
//!   ([`merge::most_recent`]).
//! - `GetFlows` with `follow`: items are forwarded as they arrive, ordered
//!   within a short window ([`merge::ReorderWindow`]).
//! - Items keep (or get) the name of the node they come from; lost events
//!   pass through. A node that cannot be asked, or whose stream breaks, is
//!   reported in the stream as a `LostEvents` item from that node whose
//!   source starts with [`UNAVAILABLE_SOURCE`] (the API has no other item
//!   for it); when no node at all answers, the call fails with UNAVAILABLE.
//! - `ServerStatus`: every node is asked; see [`status::aggregate`].

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt as _;
use membrane_proto::observer::v1 as pb;
use pb::get_flows_response::ResponseTypes;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::merge::{self, Kind, ReorderWindow, Timed};
use crate::nodes::{FlowStream, NodeSource, Peer};
use crate::status::{self, NodeStatus};

/// Source of the `LostEvents` item that reports an unavailable node.
pub const UNAVAILABLE_SOURCE: &str = "relay: node unavailable";

/// The relay's knobs.
#[derive(Debug, Clone, Copy)]
pub struct RelayConfig {
    /// How long live items are held to order them across nodes.
    pub sort_window: Duration,
    /// How long a finished query waits for a node's answer.
    pub collect_timeout: Duration,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            sort_window: Duration::from_millis(200),
            collect_timeout: Duration::from_secs(10),
        }
    }
}

/// The relay's `Observer` service.
#[derive(Clone)]
pub struct RelayService {
    nodes: Arc<dyn NodeSource>,
    config: RelayConfig,
    started: Instant,
}

// === impl RelayService ===

impl RelayService {
    /// A relay over `nodes`.
    pub fn new(nodes: Arc<dyn NodeSource>, config: RelayConfig) -> Self {
        Self {
            nodes,
            config,
            started: Instant::now(),
        }
    }

    /// As a tonic service.
    pub fn server(self) -> pb::observer_server::ObserverServer<Self> {
        pb::observer_server::ObserverServer::new(self)
    }

    async fn collect(
        &self,
        peers: Vec<Peer>,
        req: pb::GetFlowsRequest,
    ) -> Result<FlowStream, Status> {
        let number = req.number;
        let timeout = self.config.collect_timeout;
        let answers = futures::future::join_all(peers.into_iter().map(|peer| {
            let req = req.clone();
            async move {
                let mut got = Vec::new();
                let result = tokio::time::timeout(timeout, async {
                    let mut stream = peer.observer.get_flows(req).await?;
                    while let Some(item) = stream.next().await {
                        got.push(item?);
                    }
                    Ok::<_, Status>(())
                })
                .await
                .unwrap_or_else(|_| Err(Status::deadline_exceeded("node did not finish in time")));
                (peer.name, got, result.err())
            }
        }))
        .await;

        let mut reports = Vec::new();
        let mut items = Vec::new();
        let mut failures = Vec::new();
        let total = answers.len();
        for (node, got, err) in answers {
            if let Some(status) = err {
                tracing::warn!(node = %node, error = %status.message(), "node unavailable for GetFlows");
                failures.push(format!("{node}: {}", status.message()));
                reports.push(unavailable(&node, &status));
            }
            items.extend(got.into_iter().map(|r| timed(&node, r)));
        }
        if failures.len() == total {
            return Err(Status::unavailable(format!(
                "no node answered: {}",
                failures.join("; ")
            )));
        }
        let merged = merge::most_recent(items, number);
        let out: Vec<Result<pb::GetFlowsResponse, Status>> = reports
            .into_iter()
            .chain(merged)
            .map(|t| t.item)
            .map(Ok)
            .collect();
        Ok(tokio_stream::iter(out).boxed())
    }

    fn follow(&self, peers: Vec<Peer>, req: pb::GetFlowsRequest) -> FlowStream {
        let (in_tx, in_rx) = mpsc::channel::<(String, NodeEvent)>(1024);
        for peer in peers {
            tokio::spawn(forward(peer, req.clone(), in_tx.clone()));
        }
        drop(in_tx);
        let (out_tx, out_rx) = mpsc::channel(1024);
        tokio::spawn(merge_live(in_rx, out_tx, self.config.sort_window));
        ReceiverStream::new(out_rx).boxed()
    }
}

#[tonic::async_trait]
impl pb::observer_server::Observer for RelayService {
    type GetFlowsStream = FlowStream;

    async fn get_flows(
        &self,
        req: Request<pb::GetFlowsRequest>,
    ) -> Result<Response<Self::GetFlowsStream>, Status> {
        let req = req.into_inner();
        let peers = self.nodes.nodes().await;
        if peers.is_empty() {
            return Err(Status::unavailable("no nodes to observe (none known yet)"));
        }
        let stream = if req.follow {
            self.follow(peers, req)
        } else {
            self.collect(peers, req).await?
        };
        Ok(Response::new(stream))
    }

    async fn server_status(
        &self,
        _req: Request<pb::ServerStatusRequest>,
    ) -> Result<Response<pb::ServerStatusResponse>, Status> {
        let peers = self.nodes.nodes().await;
        let answers = futures::future::join_all(peers.into_iter().map(|peer| async move {
            let status = match peer.observer.server_status().await {
                Ok(s) => Some(NodeStatus {
                    num_flows: s.num_flows,
                    max_flows: s.max_flows,
                    seen_flows: s.seen_flows,
                    flows_rate: s.flows_rate,
                    lost_events: s.lost_events,
                }),
                Err(e) => {
                    tracing::debug!(node = %peer.name, error = %e.message(), "node unavailable for ServerStatus");
                    None
                }
            };
            (peer.name, status)
        }))
        .await;
        let s = status::aggregate(answers, self.started.elapsed());
        Ok(Response::new(pb::ServerStatusResponse {
            num_flows: s.num_flows,
            max_flows: s.max_flows,
            seen_flows: s.seen_flows,
            uptime_ns: u64::try_from(s.uptime.as_nanos()).unwrap_or(u64::MAX),
            flows_rate: s.flows_rate,
            num_connected_nodes: s.num_connected_nodes,
            unavailable_nodes: s.unavailable_nodes,
            num_nodes: s.num_nodes,
            lost_events: s.lost_events,
        }))
    }
}

/// What one node's live stream delivers to the merger.
enum NodeEvent {
    Item(Box<pb::GetFlowsResponse>),
    Unavailable(Status),
}

/// Forwards one node's live stream until it ends or nobody listens.
async fn forward(peer: Peer, req: pb::GetFlowsRequest, tx: mpsc::Sender<(String, NodeEvent)>) {
    let mut stream = match peer.observer.get_flows(req).await {
        Ok(s) => s,
        Err(status) => {
            let _ = tx.send((peer.name, NodeEvent::Unavailable(status))).await;
            return;
        }
    };
    loop {
        let next = tokio::select! {
            _ = tx.closed() => return,
            next = stream.next() => next,
        };
        let event = match next {
            Some(Ok(item)) => NodeEvent::Item(Box::new(item)),
            Some(Err(status)) => NodeEvent::Unavailable(status),
            None => NodeEvent::Unavailable(Status::unavailable("node ended its stream")),
        };
        let last = matches!(event, NodeEvent::Unavailable(_));
        if tx.send((peer.name.clone(), event)).await.is_err() || last {
            return;
        }
    }
}

/// Orders live items from every node within `window` and sends them on.
async fn merge_live(
    mut input: mpsc::Receiver<(String, NodeEvent)>,
    out: mpsc::Sender<Result<pb::GetFlowsResponse, Status>>,
    window: Duration,
) {
    let mut held = ReorderWindow::new(window);
    let mut open = true;
    while open || !held.is_empty() {
        let deadline = held.next_deadline().map(tokio::time::Instant::from_std);
        let mut due = Vec::new();
        tokio::select! {
            _ = out.closed() => return,
            event = input.recv(), if open => match event {
                Some((node, NodeEvent::Item(item))) => held.push(timed(&node, *item), Instant::now()),
                Some((node, NodeEvent::Unavailable(status))) => {
                    tracing::warn!(node = %node, error = %status.message(), "node stream unavailable");
                    if out.send(Ok(unavailable(&node, &status).item)).await.is_err() {
                        return;
                    }
                }
                None => {
                    open = false;
                    due = held.drain();
                }
            },
            _ = sleep_until(deadline), if deadline.is_some() => {}
        }
        due.extend(held.pop_ready(Instant::now()));
        for item in due {
            if out.send(Ok(item.item)).await.is_err() {
                return;
            }
        }
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// An item with its node filled in and the time it orders by: the flow's
/// time for flows, the item's time for reports.
fn timed(node: &str, mut resp: pb::GetFlowsResponse) -> Timed<pb::GetFlowsResponse> {
    if resp.node_name.is_empty() {
        resp.node_name = node.to_string();
    }
    let (kind, time) = match &mut resp.response_types {
        Some(ResponseTypes::Flow(flow)) => {
            if flow.node_name.is_empty() {
                flow.node_name = node.to_string();
            }
            (Kind::Flow, flow.time.or(resp.time))
        }
        _ => (Kind::Report, resp.time),
    };
    Timed {
        time_ns: time
            .map(|t| i128::from(t.seconds) * 1_000_000_000 + i128::from(t.nanos))
            .unwrap_or(0),
        node: resp.node_name.clone(),
        kind,
        item: resp,
    }
}

/// The report of a node that could not be asked.
fn unavailable(node: &str, status: &Status) -> Timed<pb::GetFlowsResponse> {
    let item = pb::GetFlowsResponse {
        node_name: node.to_string(),
        time: Some(prost_types::Timestamp::from(SystemTime::now())),
        response_types: Some(ResponseTypes::LostEvents(pb::LostEvents {
            num_events_lost: 0,
            source: format!("{UNAVAILABLE_SOURCE}: {}", status.message()),
        })),
    };
    timed(node, item)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nodes::{NodeObserver, StaticNodes};
    use pb::observer_server::Observer as _;

    /// A stand-in node: canned flows (answering `number` like a node), an
    /// optional live channel for `follow`, or always unavailable.
    struct FakeNode {
        name: &'static str,
        flows: Vec<pb::GetFlowsResponse>,
        live: std::sync::Mutex<Option<mpsc::Receiver<pb::GetFlowsResponse>>>,
        down: bool,
        status: pb::ServerStatusResponse,
    }

    #[tonic::async_trait]
    impl NodeObserver for FakeNode {
        async fn get_flows(&self, req: pb::GetFlowsRequest) -> Result<FlowStream, Status> {
            if self.down {
                return Err(Status::unavailable("connection refused"));
            }
            let n = usize::try_from(req.number).unwrap_or(usize::MAX);
            let skip = if n == 0 {
                0
            } else {
                self.flows.len().saturating_sub(n)
            };
            let history = tokio_stream::iter(self.flows[skip..].to_vec()).map(Ok);
            if !req.follow {
                return Ok(history.boxed());
            }
            let live = self
                .live
                .lock()
                .expect("lock")
                .take()
                .map(|rx| ReceiverStream::new(rx).map(Ok).boxed())
                .unwrap_or_else(|| futures::stream::pending().boxed());
            Ok(history.chain(live).boxed())
        }

        async fn server_status(&self) -> Result<pb::ServerStatusResponse, Status> {
            if self.down {
                return Err(Status::unavailable("connection refused"));
            }
            Ok(self.status.clone())
        }
    }

    fn node(name: &'static str, times: &[i64]) -> FakeNode {
        FakeNode {
            name,
            flows: times.iter().map(|t| flow(name, *t)).collect(),
            live: std::sync::Mutex::new(None),
            down: false,
            status: pb::ServerStatusResponse {
                num_flows: times.len() as u64,
                max_flows: 100,
                seen_flows: 10 * times.len() as u64,
                flows_rate: 1.0,
                num_connected_nodes: 1,
                num_nodes: 1,
                ..Default::default()
            },
        }
    }

    /// A flow at `secs` seconds, without a node name (the relay fills it in).
    fn flow(summary: &str, secs: i64) -> pb::GetFlowsResponse {
        pb::GetFlowsResponse {
            response_types: Some(ResponseTypes::Flow(pb::Flow {
                time: Some(prost_types::Timestamp {
                    seconds: secs,
                    nanos: 0,
                }),
                summary: format!("{summary}@{secs}"),
                ..Default::default()
            })),
            ..Default::default()
        }
    }

    fn relay(nodes: Vec<FakeNode>) -> RelayService {
        let peers = nodes
            .into_iter()
            .map(|n| Peer {
                name: n.name.to_string(),
                observer: Arc::new(n),
            })
            .collect();
        RelayService::new(
            Arc::new(StaticNodes::new(peers)),
            RelayConfig {
                sort_window: Duration::from_millis(50),
                collect_timeout: Duration::from_secs(2),
            },
        )
    }

    async fn get(relay: &RelayService, req: pb::GetFlowsRequest) -> Vec<pb::GetFlowsResponse> {
        relay
            .get_flows(Request::new(req))
            .await
            .expect("get_flows")
            .into_inner()
            .map(|r| r.expect("item"))
            .collect()
            .await
    }

    fn describe(items: &[pb::GetFlowsResponse]) -> Vec<String> {
        items
            .iter()
            .map(|r| match &r.response_types {
                Some(ResponseTypes::Flow(f)) => format!("{}:{}", r.node_name, f.summary),
                Some(ResponseTypes::LostEvents(l)) => {
                    format!("{} lost {} ({})", r.node_name, l.num_events_lost, l.source)
                }
                None => "?".into(),
            })
            .collect()
    }

    #[tokio::test]
    async fn flows_of_all_nodes_come_back_in_time_order_tagged_with_their_node() {
        let r = relay(vec![node("node-1", &[1, 4, 5]), node("node-2", &[2, 3, 6])]);
        let items = get(&r, pb::GetFlowsRequest::default()).await;
        assert_eq!(
            describe(&items),
            [
                "node-1:node-1@1",
                "node-2:node-2@2",
                "node-2:node-2@3",
                "node-1:node-1@4",
                "node-1:node-1@5",
                "node-2:node-2@6"
            ]
        );
        let Some(ResponseTypes::Flow(f)) = &items[0].response_types else {
            panic!("a flow")
        };
        assert_eq!(f.node_name, "node-1", "the flow itself names its node");
    }

    #[tokio::test]
    async fn number_is_applied_to_the_cluster_not_per_node() {
        let r = relay(vec![node("node-1", &[1, 2, 9]), node("node-2", &[5, 7, 8])]);
        let items = get(
            &r,
            pb::GetFlowsRequest {
                number: 3,
                ..Default::default()
            },
        )
        .await;
        assert_eq!(
            describe(&items),
            ["node-2:node-2@7", "node-2:node-2@8", "node-1:node-1@9"]
        );
    }

    #[tokio::test]
    async fn lost_events_pass_through_with_their_node() {
        let mut n2 = node("node-2", &[3]);
        n2.flows.insert(
            0,
            pb::GetFlowsResponse {
                time: Some(prost_types::Timestamp {
                    seconds: 2,
                    nanos: 0,
                }),
                response_types: Some(ResponseTypes::LostEvents(pb::LostEvents {
                    num_events_lost: 7,
                    source: "perf/ring buffer".into(),
                })),
                ..Default::default()
            },
        );
        let r = relay(vec![node("node-1", &[1, 4]), n2]);
        let items = get(&r, pb::GetFlowsRequest::default()).await;
        assert_eq!(
            describe(&items),
            [
                "node-1:node-1@1",
                "node-2 lost 7 (perf/ring buffer)",
                "node-2:node-2@3",
                "node-1:node-1@4"
            ]
        );
    }

    #[tokio::test]
    async fn an_unavailable_node_is_reported_and_the_others_still_answer() {
        let mut down = node("node-2", &[]);
        down.down = true;
        let r = relay(vec![node("node-1", &[1]), down]);
        let items = get(&r, pb::GetFlowsRequest::default()).await;
        assert_eq!(
            describe(&items),
            [
                format!("node-2 lost 0 ({UNAVAILABLE_SOURCE}: connection refused)"),
                "node-1:node-1@1".to_string()
            ]
        );
    }

    #[tokio::test]
    async fn when_no_node_answers_the_call_is_unavailable() {
        let mut down = node("node-1", &[]);
        down.down = true;
        let r = relay(vec![down]);
        let err = r
            .get_flows(Request::new(pb::GetFlowsRequest::default()))
            .await
            .err()
            .expect("fails");
        assert_eq!(err.code(), tonic::Code::Unavailable);
        assert!(
            err.message().contains("node-1: connection refused"),
            "{}",
            err.message()
        );
    }

    #[tokio::test]
    async fn follow_sends_history_then_live_flows_ordered_across_nodes() {
        let (tx1, rx1) = mpsc::channel(8);
        let (tx2, rx2) = mpsc::channel(8);
        let n1 = node("node-1", &[1, 3]);
        *n1.live.lock().expect("lock") = Some(rx1);
        let n2 = node("node-2", &[2]);
        *n2.live.lock().expect("lock") = Some(rx2);
        let r = relay(vec![n1, n2]);
        let mut stream = r
            .get_flows(Request::new(pb::GetFlowsRequest {
                follow: true,
                number: 10,
                ..Default::default()
            }))
            .await
            .expect("follow")
            .into_inner();
        let mut next = async || {
            tokio::time::timeout(Duration::from_secs(2), stream.next())
                .await
                .expect("item in time")
                .expect("open")
                .expect("ok")
        };
        let mut history = Vec::new();
        for _ in 0..3 {
            history.push(next().await);
        }
        assert_eq!(
            describe(&history),
            ["node-1:node-1@1", "node-2:node-2@2", "node-1:node-1@3"]
        );
        // Live: node-2's later flow is sent first, node-1's earlier one
        // right after; within the window they come out in time order.
        tx2.send(flow("node-2", 11)).await.expect("send");
        tx1.send(flow("node-1", 10)).await.expect("send");
        let live = vec![next().await, next().await];
        assert_eq!(describe(&live), ["node-1:node-1@10", "node-2:node-2@11"]);
    }

    #[tokio::test]
    async fn a_node_whose_live_stream_ends_is_reported() {
        let (tx1, rx1) = mpsc::channel(8);
        let n1 = node("node-1", &[]);
        *n1.live.lock().expect("lock") = Some(rx1);
        let r = relay(vec![n1, node("node-2", &[])]);
        let mut stream = r
            .get_flows(Request::new(pb::GetFlowsRequest {
                follow: true,
                ..Default::default()
            }))
            .await
            .expect("follow")
            .into_inner();
        drop(tx1);
        let item = tokio::time::timeout(Duration::from_secs(2), stream.next())
            .await
            .expect("in time")
            .expect("open")
            .expect("ok");
        assert_eq!(
            describe(&[item]),
            [format!(
                "node-1 lost 0 ({UNAVAILABLE_SOURCE}: node ended its stream)"
            )]
        );
    }

    #[tokio::test]
    async fn status_sums_connected_nodes_and_names_unavailable_ones() {
        let mut down = node("node-3", &[]);
        down.down = true;
        let r = relay(vec![node("node-1", &[1, 2]), node("node-2", &[3]), down]);
        let s = r
            .server_status(Request::new(pb::ServerStatusRequest {}))
            .await
            .expect("status")
            .into_inner();
        assert_eq!((s.num_flows, s.max_flows, s.seen_flows), (3, 200, 30));
        assert!((s.flows_rate - 2.0).abs() < 1e-9);
        assert_eq!((s.num_connected_nodes, s.num_nodes), (2, 3));
        assert_eq!(s.unavailable_nodes, ["node-3"]);
    }
}
