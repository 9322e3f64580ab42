//! `membrane.observer.v1.Observer` over the node's [`Observer`].

use std::sync::Arc;

use membrane_proto::observer::v1 as pb;
use tokio::sync::{broadcast, mpsc};
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::clock::{realtime_ns, timestamp, timestamp_ns};
use super::filter::FlowFilters;
use super::{FlowEntry, Observer, Query};

/// The `source` of lost events the observer's ring (or a follower's lag) caused.
pub const RING_SOURCE: &str = "observer ring buffer";
/// Items buffered per client stream before the sender waits (and, if it
/// waits long enough, lags and reports lost flows).
const STREAM_BUFFER: usize = 256;

/// The gRPC service.
#[derive(Debug, Clone)]
pub struct ObserverService {
    observer: Observer,
}

impl ObserverService {
    pub fn new(observer: Observer) -> Self {
        Self { observer }
    }

    /// The tonic server for [`tonic::service::Routes`].
    pub fn server(self) -> pb::observer_server::ObserverServer<Self> {
        pb::observer_server::ObserverServer::new(self)
    }
}

/// A validated `GetFlowsRequest`.
struct FlowsRequest {
    query: Query,
    follow: bool,
    filters: FlowFilters,
}

impl TryFrom<pb::GetFlowsRequest> for FlowsRequest {
    type Error = Status;

    fn try_from(r: pb::GetFlowsRequest) -> Result<Self, Status> {
        let pb::GetFlowsRequest {
            number,
            follow,
            whitelist,
            blacklist,
            since,
            until,
        } = r;
        let filters = FlowFilters::new(whitelist, blacklist)
            .map_err(|e| Status::invalid_argument(format!("filter field {}: {e}", e.field())))?;
        let since_ns = since.as_ref().map(timestamp_ns);
        let until_ns = until.as_ref().map(timestamp_ns);
        if let (Some(s), Some(u)) = (since_ns, until_ns)
            && s > u
        {
            return Err(Status::invalid_argument("since: later than until"));
        }
        Ok(Self {
            query: Query {
                number,
                since_ns,
                until_ns,
            },
            follow,
            filters,
        })
    }
}

#[tonic::async_trait]
impl pb::observer_server::Observer for ObserverService {
    type GetFlowsStream = ReceiverStream<Result<pb::GetFlowsResponse, Status>>;

    async fn get_flows(
        &self,
        request: Request<pb::GetFlowsRequest>,
    ) -> Result<Response<Self::GetFlowsStream>, Status> {
        let req = FlowsRequest::try_from(request.into_inner())?;
        let filters = Arc::new(req.filters);
        // Following with neither a number nor a start: only new flows.
        let history = !(req.follow && req.query.number == 0 && req.query.since_ns.is_none());
        let (selection, rx) = {
            let f = filters.clone();
            let (mut sel, rx) = self
                .observer
                .select_and_follow(&req.query, move |flow| f.allows(flow));
            if !history {
                sel.entries.clear();
                sel.lost = 0;
            }
            (sel, rx)
        };
        let (tx, out) = mpsc::channel(STREAM_BUFFER);
        let node = self.observer.node().to_string();
        tokio::spawn(async move {
            let send = Sender { tx, node };
            if selection.lost > 0 && !send.lost(selection.lost).await {
                return;
            }
            for e in selection.entries {
                if !send.flow(&e).await {
                    return;
                }
            }
            // An `until` already past ends the stream after the history.
            if req.follow && req.query.until_ns.is_none_or(|u| u >= realtime_ns()) {
                follow(send, rx, selection.next_seq, req.query, &filters).await;
            }
        });
        Ok(Response::new(ReceiverStream::new(out)))
    }

    async fn server_status(
        &self,
        _request: Request<pb::ServerStatusRequest>,
    ) -> Result<Response<pb::ServerStatusResponse>, Status> {
        let s = self.observer.status();
        Ok(Response::new(pb::ServerStatusResponse {
            num_flows: s.num_flows,
            max_flows: s.max_flows,
            seen_flows: s.seen_flows,
            uptime_ns: s.uptime_ns,
            flows_rate: s.flows_rate,
            num_connected_nodes: 1,
            unavailable_nodes: Vec::new(),
            num_nodes: 1,
            lost_events: s.lost_events,
        }))
    }
}

/// Streams new flows until the client leaves, `until` passes, or the observer stops.
async fn follow(
    send: Sender,
    mut rx: broadcast::Receiver<FlowEntry>,
    next_seq: u64,
    query: Query,
    filters: &FlowFilters,
) {
    loop {
        match rx.recv().await {
            Ok(e) if e.seq < next_seq => {} // already sent from the snapshot
            Ok(e) => {
                if query.until_ns.is_some_and(|u| e.time_ns > u) {
                    return;
                }
                if query.since_ns.is_some_and(|s| e.time_ns < s) || !filters.allows(&e.item) {
                    continue;
                }
                if !send.flow(&e).await {
                    return;
                }
            }
            Err(broadcast::error::RecvError::Lagged(n)) => {
                if !send.lost(n).await {
                    return;
                }
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

struct Sender {
    tx: mpsc::Sender<Result<pb::GetFlowsResponse, Status>>,
    node: String,
}

impl Sender {
    /// Sends a flow; `false` when the client has gone.
    async fn flow(&self, e: &FlowEntry) -> bool {
        let item = pb::GetFlowsResponse {
            response_types: Some(pb::get_flows_response::ResponseTypes::Flow(
                (*e.item).clone(),
            )),
            node_name: self.node.clone(),
            time: Some(timestamp(e.time_ns)),
        };
        self.tx.send(Ok(item)).await.is_ok()
    }

    /// Reports `n` lost flows; `false` when the client has gone.
    async fn lost(&self, n: u64) -> bool {
        let item = pb::GetFlowsResponse {
            response_types: Some(pb::get_flows_response::ResponseTypes::LostEvents(
                pb::LostEvents {
                    num_events_lost: n,
                    source: RING_SOURCE.into(),
                },
            )),
            node_name: self.node.clone(),
            time: Some(timestamp(realtime_ns())),
        };
        self.tx.send(Ok(item)).await.is_ok()
    }
}
