// SPDX-License-Identifier: Apache-2.0
//! The flow observer end to end, privileged: a node namespace with two pods
//! on real veths and the datapath attached; pod A's egress denies TCP 8081
//! to pod B (rule 42) and allows the rest. The observer's pump reads the
//! real ring buffer; `membrane.observer.v1.Observer` is served on loopback
//! and asked over gRPC. Namespaces are `mbt-obs*` (never `node-*`/`pod-*`).

mod bpf_support;

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use bpf_support::*;
use membrane_node_datapath::bpf::{
    Datapath, DatapathOptions, Direction, EndpointInfo, PolicyEntry, PortMatch, Verdict,
    probe_features,
};
use membrane_node_datapath::identity::ClusterView;
use membrane_node_datapath::observer::{
    self, FlowBuilder, LocalEndpoint, LocalEndpoints, Observer, ObserverService, clock::WallClock,
};
use membrane_proto::observer::v1 as pb;
use pb::get_flows_response::ResponseTypes;
use pb::observer_client::ObserverClient;
use tonic::transport::Channel;

const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 201, 7, 10);
const SERVER_IP: Ipv4Addr = Ipv4Addr::new(10, 201, 7, 11);
const CLIENT_EP: u32 = 1;
const SERVER_EP: u32 = 2;
const CLIENT_ID: u32 = 1000;
const SERVER_ID: u32 = 2000;
const ALLOWED: u16 = 8080;
const DENIED: u16 = 8081;
const DENY_RULE: u32 = 42;
/// Small, so the test can overrun it.
const CAPACITY: usize = 8;

/// The node namespace must outlive the pods' veths; fields drop in order.
struct Topology {
    pods: Vec<Pod>,
    node: Netns,
}

fn topology() -> Topology {
    let node = Netns::new("obsnode");
    run(&[
        "ip",
        "netns",
        "exec",
        &node.name,
        "sysctl",
        "-qw",
        "net.ipv4.ip_forward=0",
    ]);
    let pods = [("a", CLIENT_IP, 0x1a), ("b", SERVER_IP, 0x1b)]
        .into_iter()
        .map(|(name, ip, n)| add_pod(&node, "obs", name, ip, n))
        .collect();
    Topology { pods, node }
}

/// Loads the datapath in the node namespace, attaches both pods, programs
/// the endpoints and pod A's egress policy (deny TCP 8081 to B).
fn load(topo: &Topology, pins: &PinDir) -> Datapath {
    topo.node.run_in(|| {
        let opts = DatapathOptions::from_features(&probe_features().expect("probe"));
        let mut dp = Datapath::load(pins.path(), &opts).expect("load");
        for (i, (p, identity)) in topo.pods.iter().zip([CLIENT_ID, SERVER_ID]).enumerate() {
            dp.attach_lxc(p.lxc_ifindex).expect("attach lxc");
            let info = EndpointInfo {
                ifindex: p.lxc_ifindex,
                pod_mac: p.mac,
                node_mac: p.lxc_mac,
                endpoint_id: i as u32 + 1,
                identity,
                flags: 0,
            };
            dp.upsert_endpoint(p.ip, &info).expect("upsert endpoint");
        }
        let deny = PolicyEntry {
            endpoint_id: CLIENT_EP,
            direction: Direction::Egress,
            proto: Some(6),
            peer_identity: Some(SERVER_ID),
            ports: PortMatch::Range(DENIED, DENIED),
            verdict: Verdict::Deny,
            rule_id: DENY_RULE,
        };
        dp.replace_endpoint_policy(CLIENT_EP, &[deny])
            .expect("policy");
        dp
    })
}

/// The pods as the agent's endpoint manager would describe them.
struct Pods;

impl LocalEndpoints for Pods {
    fn endpoints(&self) -> Vec<LocalEndpoint> {
        let ep = |id, ip, name: &str, identity, app: &str| LocalEndpoint {
            id,
            ip,
            namespace: "default".into(),
            pod_name: name.into(),
            identity,
            labels: BTreeMap::from([("app".to_string(), app.to_string())]),
        };
        vec![
            ep(CLIENT_EP, CLIENT_IP, "client", CLIENT_ID, "client"),
            ep(SERVER_EP, SERVER_IP, "server", SERVER_ID, "server"),
        ]
    }

    fn rule_name(&self, rule_id: u32) -> Option<String> {
        (rule_id == DENY_RULE).then(|| "CiliumNetworkPolicy default/deny-8081 egress[0]".into())
    }
}

/// TCP listeners in pod B on both ports, accepting forever.
fn serve_in(ns: &str, ip: Ipv4Addr) {
    for port in [ALLOWED, DENIED] {
        let path = format!("/run/netns/{ns}");
        let (tx, rx) = std::sync::mpsc::channel();
        thread::spawn(move || {
            enter_netns(&path);
            let l = TcpListener::bind((ip, port)).expect("bind");
            tx.send(()).expect("ready");
            for conn in l.incoming() {
                drop(conn);
            }
        });
        rx.recv().expect("listener ready");
    }
}

/// Connects from pod `ns` to `to`; whether the handshake completed.
fn connect_from(ns: &str, to: SocketAddr) -> bool {
    let path = format!("/run/netns/{ns}");
    thread::spawn(move || {
        enter_netns(&path);
        TcpStream::connect_timeout(&to, Duration::from_millis(300)).is_ok()
    })
    .join()
    .expect("connect thread")
}

async fn flows(
    client: &mut ObserverClient<Channel>,
    req: pb::GetFlowsRequest,
) -> Vec<pb::GetFlowsResponse> {
    let mut stream = client.get_flows(req).await.expect("get_flows").into_inner();
    let mut out = Vec::new();
    while let Some(item) = stream.message().await.expect("stream item") {
        out.push(item);
    }
    out
}

fn only_flows(items: &[pb::GetFlowsResponse]) -> Vec<&pb::Flow> {
    items
        .iter()
        .filter_map(|i| match &i.response_types {
            Some(ResponseTypes::Flow(f)) => Some(f),
            _ => None,
        })
        .collect()
}

fn dst_port(f: &pb::Flow) -> Option<u32> {
    match f.l4.as_ref()?.protocol.as_ref()? {
        pb::layer4::Protocol::Tcp(t) => Some(t.destination_port),
        _ => None,
    }
}

fn verdict_filter(v: pb::Verdict) -> pb::FlowFilter {
    pb::FlowFilter {
        verdict: vec![v as i32],
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flows_of_real_pods_are_served_filtered_followed_and_report_what_the_ring_lost() {
    if !privileged("flows_of_real_pods_are_served_filtered_followed_and_report_what_the_ring_lost")
    {
        return;
    }
    let pins = PinDir::new();
    let topo = topology();
    let mut dp = load(&topo, &pins);
    let reader = dp
        .events()
        .expect("events")
        .into_async()
        .expect("async reader");

    let obs = Observer::new("obs-test-node", CAPACITY, true);
    let builder = FlowBuilder::new(
        "obs-test-node",
        WallClock::measure(),
        Arc::new(Pods),
        ClusterView::default(),
    );
    let pump = observer::spawn_pump(reader, builder, obs.clone(), None);

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let routes = tonic::service::Routes::new(ObserverService::new(obs.clone()).server());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(membrane_runtime::grpc::serve(
        listener,
        routes,
        &[],
        None,
        async {
            let _ = stop_rx.await;
        },
    ));
    let mut client = ObserverClient::connect(format!("http://{addr}"))
        .await
        .expect("connect");

    // One allowed and one denied connection from A to B.
    let (client_ns, server_ns) = (topo.pods[0].ns.name.clone(), topo.pods[1].ns.name.clone());
    serve_in(&server_ns, SERVER_IP);
    let to = |port| SocketAddr::from((SERVER_IP, port));
    assert!(connect_from(&client_ns, to(ALLOWED)), "8080 is allowed");
    assert!(!connect_from(&client_ns, to(DENIED)), "8081 is denied");
    tokio::time::sleep(Duration::from_millis(200)).await;

    // The drop, with its reason, rule and both endpoints.
    let dropped = flows(
        &mut client,
        pb::GetFlowsRequest {
            whitelist: vec![verdict_filter(pb::Verdict::Dropped)],
            ..Default::default()
        },
    )
    .await;
    let dropped = only_flows(&dropped);
    assert!(!dropped.is_empty(), "no dropped flow");
    let d = dropped[0];
    assert_eq!(d.drop_reason, "POLICY_DENIED");
    assert_eq!(
        d.policy_rule,
        "CiliumNetworkPolicy default/deny-8081 egress[0]"
    );
    assert_eq!(d.event_type, pb::EventType::Drop as i32);
    assert_eq!(d.traffic_direction, pb::TrafficDirection::Egress as i32);
    assert_eq!(dst_port(d), Some(u32::from(DENIED)));
    let (src, dst) = (
        d.source.as_ref().expect("source"),
        d.destination.as_ref().expect("destination"),
    );
    assert_eq!(
        (src.id, src.identity, src.pod_name.as_str()),
        (CLIENT_EP, CLIENT_ID, "client")
    );
    assert_eq!(
        (dst.id, dst.identity, dst.pod_name.as_str()),
        (SERVER_EP, SERVER_ID, "server")
    );
    assert_eq!(d.node_name, "obs-test-node");
    assert!(
        d.time
            .as_ref()
            .is_some_and(|t| (t.seconds - now_secs()).abs() < 30),
        "wall-clock time: {:?}",
        d.time
    );

    // The allowed connection is a forwarded trace to 8080.
    let forwarded = flows(
        &mut client,
        pb::GetFlowsRequest {
            whitelist: vec![pb::FlowFilter {
                verdict: vec![pb::Verdict::Forwarded as i32],
                destination_port: vec![ALLOWED.to_string()],
                source_pod: vec!["default/client".into()],
                ..Default::default()
            }],
            ..Default::default()
        },
    )
    .await;
    assert_eq!(only_flows(&forwarded).len(), 1, "{forwarded:?}");

    // Follow: a new connection arrives within a second.
    let mut live = client
        .get_flows(pb::GetFlowsRequest {
            follow: true,
            ..Default::default()
        })
        .await
        .expect("follow")
        .into_inner();
    let started = std::time::Instant::now();
    let (ns, target) = (client_ns.clone(), to(ALLOWED));
    let connected = tokio::task::spawn_blocking(move || connect_from(&ns, target));
    let item = tokio::time::timeout(Duration::from_secs(1), live.message())
        .await
        .expect("a followed flow within 1 s")
        .expect("stream item")
        .expect("stream open");
    assert!(connected.await.expect("join"));
    match item.response_types {
        Some(ResponseTypes::Flow(f)) => assert_eq!(dst_port(&f), Some(u32::from(ALLOWED))),
        other => panic!("expected a flow, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(1));
    drop(live);

    // Overrun the tiny ring, then ask for more than it can hold.
    for _ in 0..CAPACITY {
        assert!(!connect_from(&client_ns, to(DENIED)));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let status = client
        .server_status(pb::ServerStatusRequest {})
        .await
        .expect("status")
        .into_inner();
    assert_eq!(
        (status.num_flows, status.max_flows),
        (CAPACITY as u64, CAPACITY as u64)
    );
    assert!(status.seen_flows >= 3 + CAPACITY as u64, "{status:?}");
    assert_eq!((status.num_nodes, status.num_connected_nodes), (1, 1));
    let items = flows(
        &mut client,
        pb::GetFlowsRequest {
            number: 100,
            ..Default::default()
        },
    )
    .await;
    match &items[0].response_types {
        Some(ResponseTypes::LostEvents(l)) => {
            assert_eq!(l.source, "observer ring buffer");
            assert_eq!(l.num_events_lost, status.seen_flows - CAPACITY as u64);
        }
        other => panic!("expected lost events first, got {other:?}"),
    }
    assert_eq!(only_flows(&items).len(), CAPACITY);

    let _ = stop_tx.send(());
    let _ = server.await;
    for t in pump {
        t.abort();
    }
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}
