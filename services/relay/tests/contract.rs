//! The relay's contract over real gRPC with mTLS: a real `membrane-relay`
//! process pointed (`--nodes`) at two in-process **stand-in nodes** — tonic
//! Observer servers on loopback that serve canned flows, in place of
//! node-datapath — and a client asking the relay as `membrane observe` does.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt as _;
use membrane_proto::observer::v1 as pb;
use membrane_runtime::grpc;
use membrane_runtime::pki::{Bundle, LeafSpec, ensure_bundle};
use membrane_runtime::tls::{TlsFiles, install_crypto_provider};
use pb::get_flows_response::ResponseTypes;
use tokio::sync::{broadcast, oneshot};
use tokio_stream::wrappers::BroadcastStream;
use tonic::{Request, Response, Status};

const T: Duration = Duration::from_secs(5);

// === stand-in nodes ===

/// A stand-in for one node's observer: canned history, live flows pushed by
/// the test, and the `number` / `follow` semantics of the API.
#[derive(Clone)]
struct StandInNode {
    name: String,
    history: Arc<Mutex<Vec<pb::GetFlowsResponse>>>,
    live: broadcast::Sender<pb::GetFlowsResponse>,
}

#[tonic::async_trait]
impl pb::observer_server::Observer for StandInNode {
    type GetFlowsStream = futures::stream::BoxStream<'static, Result<pb::GetFlowsResponse, Status>>;

    async fn get_flows(
        &self,
        req: Request<pb::GetFlowsRequest>,
    ) -> Result<Response<Self::GetFlowsStream>, Status> {
        let req = req.into_inner();
        // Subscribe before reading history, so nothing falls between them.
        let live =
            BroadcastStream::new(self.live.subscribe()).filter_map(|r| async { r.ok().map(Ok) });
        let history = self.history.lock().expect("lock").clone();
        let n = usize::try_from(req.number).unwrap_or(usize::MAX);
        let skip = if n == 0 {
            0
        } else {
            history.len().saturating_sub(n)
        };
        let history = tokio_stream::iter(history.into_iter().skip(skip).map(Ok));
        Ok(Response::new(if req.follow {
            history.chain(live).boxed()
        } else {
            history.boxed()
        }))
    }

    async fn server_status(
        &self,
        _req: Request<pb::ServerStatusRequest>,
    ) -> Result<Response<pb::ServerStatusResponse>, Status> {
        let held = self.history.lock().expect("lock").len() as u64;
        Ok(Response::new(pb::ServerStatusResponse {
            num_flows: held,
            max_flows: 4096,
            seen_flows: held,
            flows_rate: 0.5,
            num_connected_nodes: 1,
            num_nodes: 1,
            ..Default::default()
        }))
    }
}

/// A running stand-in node, stopped by [`Running::stop`].
struct Running {
    node: StandInNode,
    url: String,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut self.task).await;
        self.task.abort();
    }

    /// A flow of this node, observed at `secs`.
    fn push(&self, secs: i64) {
        let _ = self.node.live.send(flow(&self.node.name, secs));
    }
}

async fn stand_in(name: &str, times: &[i64], tls: TlsFiles) -> Running {
    let node = StandInNode {
        name: name.to_string(),
        history: Arc::new(Mutex::new(times.iter().map(|t| flow(name, *t)).collect())),
        live: broadcast::channel(64).0,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr: SocketAddr = listener.local_addr().expect("addr");
    let (stop_tx, stop_rx) = oneshot::channel();
    let routes =
        tonic::service::Routes::new(pb::observer_server::ObserverServer::new(node.clone()));
    let task = tokio::spawn(async move {
        let _ = grpc::serve(listener, routes, &[], Some(&tls), async {
            let _ = stop_rx.await;
        })
        .await;
    });
    Running {
        node,
        url: format!("https://{addr}"),
        stop: Some(stop_tx),
        task,
    }
}

/// A flow as a node sends it: its own name and the time it saw it.
fn flow(node: &str, secs: i64) -> pb::GetFlowsResponse {
    let time = Some(prost_types::Timestamp {
        seconds: secs,
        nanos: 0,
    });
    pb::GetFlowsResponse {
        node_name: node.to_string(),
        time,
        response_types: Some(ResponseTypes::Flow(pb::Flow {
            time,
            node_name: node.to_string(),
            verdict: pb::Verdict::Dropped as i32,
            drop_reason: "POLICY_DENIED".into(),
            summary: format!("{node}@{secs}"),
            ..Default::default()
        })),
    }
}

// === the relay process ===

struct Relay {
    child: Child,
    url: String,
    cli: TlsFiles,
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Relay {
    async fn start(pki: &Bundle, nodes: &[(&str, &Running)]) -> Self {
        let port = membrane_test_support::free_port();
        let tls = &pki.leaves["relay"];
        let list: Vec<String> = nodes
            .iter()
            .map(|(n, r)| format!("{n}={}", r.url))
            .collect();
        let child = Command::new(env!("CARGO_BIN_EXE_membrane-relay"))
            .env("MEMBRANE_LISTEN", format!("127.0.0.1:{port}"))
            .env("MEMBRANE_TLS_CA", &tls.ca)
            .env("MEMBRANE_TLS_CERT", &tls.cert)
            .env("MEMBRANE_TLS_KEY", &tls.key)
            .env("MEMBRANE_RELAY_NODES", list.join(","))
            .env("MEMBRANE_RELAY_SORT_WINDOW_MS", "100")
            .env_remove("MEMBRANE_IPAM_ENDPOINT")
            .stdout(Stdio::null())
            .spawn()
            .expect("start membrane-relay");
        let relay = Self {
            child,
            url: format!("https://127.0.0.1:{port}"),
            cli: pki.leaves["cli"].clone(),
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while let Err(e) =
            grpc::check_health(&relay.url, "relay.membrane.local", Some(&relay.cli), T).await
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "relay never healthy: {e:#}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        relay
    }

    async fn client(&self) -> pb::observer_client::ObserverClient<grpc::GrpcChannel> {
        let channel = grpc::connect(&self.url, "relay.membrane.local", Some(&self.cli))
            .await
            .expect("connect to relay");
        pb::observer_client::ObserverClient::new(channel)
    }

    async fn flows(&self, req: pb::GetFlowsRequest) -> Vec<String> {
        let items: Vec<_> = self
            .client()
            .await
            .get_flows(req)
            .await
            .expect("get_flows")
            .into_inner()
            .collect()
            .await;
        items
            .into_iter()
            .map(|r| describe(&r.expect("item")))
            .collect()
    }

    async fn status(&self) -> pb::ServerStatusResponse {
        self.client()
            .await
            .server_status(pb::ServerStatusRequest {})
            .await
            .expect("status")
            .into_inner()
    }
}

fn describe(r: &pb::GetFlowsResponse) -> String {
    match &r.response_types {
        Some(ResponseTypes::Flow(f)) => f.summary.clone(),
        Some(ResponseTypes::LostEvents(l)) => format!("{} lost: {}", r.node_name, l.source),
        None => "?".into(),
    }
}

fn pki(dir: &std::path::Path) -> Bundle {
    ensure_bundle(
        dir,
        &[
            LeafSpec::service("relay"),
            LeafSpec::client("cli"),
            LeafSpec::node("node-a"),
            LeafSpec::node("node-b"),
        ],
    )
    .expect("pki")
}

// === tests ===

#[tokio::test]
async fn the_relay_merges_two_nodes_in_time_order_and_cuts_last_n_across_them() {
    install_crypto_provider();
    let dir = tempfile::tempdir().expect("tmp");
    let pki = pki(dir.path());
    let a = stand_in("node-a", &[1, 4, 5, 9], pki.leaves["node-a"].clone()).await;
    let b = stand_in("node-b", &[2, 3, 6, 7], pki.leaves["node-b"].clone()).await;
    let relay = Relay::start(&pki, &[("node-a", &a), ("node-b", &b)]).await;

    let all = relay.flows(pb::GetFlowsRequest::default()).await;
    assert_eq!(
        all,
        [
            "node-a@1", "node-b@2", "node-b@3", "node-a@4", "node-a@5", "node-b@6", "node-b@7",
            "node-a@9"
        ]
    );
    let last3 = relay
        .flows(pb::GetFlowsRequest {
            number: 3,
            ..Default::default()
        })
        .await;
    assert_eq!(last3, ["node-b@6", "node-b@7", "node-a@9"]);

    let s = relay.status().await;
    assert_eq!((s.num_connected_nodes, s.num_nodes), (2, 2));
    assert_eq!((s.num_flows, s.max_flows), (8, 8192));
    assert!(s.unavailable_nodes.is_empty());
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn follow_streams_new_flows_of_every_node_as_they_come() {
    install_crypto_provider();
    let dir = tempfile::tempdir().expect("tmp");
    let pki = pki(dir.path());
    let a = stand_in("node-a", &[1], pki.leaves["node-a"].clone()).await;
    let b = stand_in("node-b", &[2], pki.leaves["node-b"].clone()).await;
    let relay = Relay::start(&pki, &[("node-a", &a), ("node-b", &b)]).await;

    let mut stream = relay
        .client()
        .await
        .get_flows(pb::GetFlowsRequest {
            number: 5,
            follow: true,
            ..Default::default()
        })
        .await
        .expect("follow")
        .into_inner();
    let mut next = async || {
        let item = tokio::time::timeout(T, stream.next())
            .await
            .expect("an item in time")
            .expect("stream open")
            .expect("item ok");
        describe(&item)
    };
    assert_eq!([next().await, next().await], ["node-a@1", "node-b@2"]);
    // Give both nodes' live subscriptions a moment to be in place.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sent = std::time::Instant::now();
    b.push(11);
    a.push(10);
    assert_eq!([next().await, next().await], ["node-a@10", "node-b@11"]);
    assert!(
        sent.elapsed() < Duration::from_secs(1),
        "live flows within a second"
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn a_stopped_node_is_reported_unavailable_by_status_and_in_flows() {
    install_crypto_provider();
    let dir = tempfile::tempdir().expect("tmp");
    let pki = pki(dir.path());
    let a = stand_in("node-a", &[1, 3], pki.leaves["node-a"].clone()).await;
    let b = stand_in("node-b", &[2], pki.leaves["node-b"].clone()).await;
    let relay = Relay::start(&pki, &[("node-a", &a), ("node-b", &b)]).await;
    assert_eq!(relay.status().await.num_connected_nodes, 2);

    b.stop().await;
    let s = relay.status().await;
    assert_eq!((s.num_connected_nodes, s.num_nodes), (1, 2));
    assert_eq!(s.unavailable_nodes, ["node-b"]);
    assert_eq!(s.num_flows, 2, "only node-a's flows are counted");

    let flows = relay.flows(pb::GetFlowsRequest::default()).await;
    assert_eq!(flows.len(), 3, "{flows:?}");
    assert!(
        flows[0].starts_with("node-b lost: relay: node unavailable"),
        "{flows:?}"
    );
    assert_eq!(flows[1..], ["node-a@1", "node-a@3"]);

    a.stop().await;
    let Err(err) = relay
        .client()
        .await
        .get_flows(pb::GetFlowsRequest::default())
        .await
    else {
        panic!("no node answers, yet the call succeeded");
    };
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
}
