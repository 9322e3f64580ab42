// SPDX-License-Identifier: Apache-2.0
//! NodePort at tc through BPF_PROG_TEST_RUN: a client's packet to this
//! node's underlay address + a NodePort is DNATed by bpf_host to a backend of
//! the service's Maglev table (SNATed to the node's address as well when the
//! backend lives on another node), and the backend's replies are translated
//! back to the frontend (bpf_lxc for a local backend, bpf_host for a remote
//! one). The maps are programmed the way the agent does it: a `ServiceState`
//! through `LbSink` into `SockLb`, whose maps bpf_host shares.
//! Root only (loading programs needs CAP_BPF).

mod bpf_support;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use bpf_support::*;
use membrane_lb::maglev::Seed;
use membrane_node_datapath::bpf::{
    Datapath, DatapathOptions, DropReason, EndpointInfo, Hook, LoadConfig, MacAddr, SockLb,
    TcVerdict, TestRunOutput,
};
use membrane_node_datapath::lb::LbSink;
use membrane_proto::lb::v1 as proto;
use prost_types::Any;

const NODE_1: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 11);
const NODE_2: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 12);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 200);
/// On node-1; "remote" when seen from node-2.
const POD_1: Ipv4Addr = Ipv4Addr::new(10, 200, 1, 10);
/// On node-2.
const POD_2: Ipv4Addr = Ipv4Addr::new(10, 200, 2, 10);
const NODE_PORT: u16 = 30080;
const TARGET_PORT: u16 = 8080;
const POD_MAC: MacAddr = MacAddr([0x02, 0, 0, 0, 0x0a, 0x02]);
const LXC_MAC: MacAddr = MacAddr([0x02, 0, 0, 0, 0x0a, 0x01]);
const UNDERLAY_MAC: MacAddr = MacAddr([0x02, 0, 0, 0, 0xee, 0x01]);
const CLIENT_MAC: MacAddr = MacAddr([0x02, 0, 0, 0, 0xee, 0xc8]);

const ALL_ON: DatapathOptions = DatapathOptions {
    redirect_peer: true,
    redirect_neigh: true,
};

struct Node {
    dp: Datapath,
    _sink: LbSink<SockLb>,
    _pins: PinDir,
}

fn service(with_node_port: bool) -> BTreeMap<String, Any> {
    let mut frontends = vec![proto::Frontend {
        kind: proto::FrontendKind::ClusterIp as i32,
        address: "10.96.0.10".into(),
        port: 80,
        protocol: proto::Protocol::Tcp as i32,
        port_name: String::new(),
        target_port: u32::from(TARGET_PORT),
    }];
    if with_node_port {
        frontends.push(proto::Frontend {
            kind: proto::FrontendKind::NodePort as i32,
            address: String::new(),
            port: u32::from(NODE_PORT),
            protocol: proto::Protocol::Tcp as i32,
            port_name: String::new(),
            target_port: u32::from(TARGET_PORT),
        });
    }
    let msg = proto::ServiceState {
        namespace: "default".into(),
        name: "web".into(),
        frontends,
        algorithm: proto::Algorithm::Maglev as i32,
        hash_source_address_only: false,
        affinity_timeout_seconds: 0,
        backends: [(1, POD_1), (2, POD_2)]
            .iter()
            .map(|(id, a)| proto::Backend {
                id: *id,
                address: a.to_string(),
                weight: 1,
                source: String::new(),
            })
            .collect(),
        maglev: Some(proto::MaglevParams {
            table_size: 251,
            seed: Seed::from_bytes(*b"membrane-lb!").to_base64(),
        }),
    };
    BTreeMap::from([(
        "service/default/web".to_owned(),
        Any::from_msg(&msg).expect("encode"),
    )])
}

/// A node with `local` as its one local pod, the service programmed.
fn node(addr: Ipv4Addr, local: Ipv4Addr, with_node_port: bool) -> Node {
    node_with(addr, local, with_node_port, &LoadConfig::default())
}

fn node_with(addr: Ipv4Addr, local: Ipv4Addr, with_node_port: bool, config: &LoadConfig) -> Node {
    let pins = PinDir::new();
    let mut dp = Datapath::load_with(pins.path(), &ALL_ON, config).expect("load datapath");
    dp.set_node_address(addr).expect("node address");
    let info = EndpointInfo {
        ifindex: 101,
        pod_mac: POD_MAC,
        node_mac: LXC_MAC,
        endpoint_id: 1,
        identity: 0,
        flags: 0,
    };
    dp.upsert_endpoint(local, &info).expect("endpoint");
    let sock = SockLb::load(pins.path()).expect("load bpf_sock");
    let mut sink = LbSink::new(sock);
    sink.reconcile(&service(with_node_port)).expect("reconcile");
    Node {
        dp,
        _sink: sink,
        _pins: pins,
    }
}

fn frame(
    src_mac: MacAddr,
    dst_mac: MacAddr,
    s: Ipv4Addr,
    d: Ipv4Addr,
    sp: u16,
    dp: u16,
) -> Vec<u8> {
    let mut f = Ipv4Frame {
        src_mac,
        dst_mac,
        saddr: s,
        daddr: d,
        ttl: 64,
    }
    .tcp(sp, dp, TCP_SYN);
    let c = tcp_checksum(&f);
    f[34 + 16..34 + 18].copy_from_slice(&c.to_be_bytes());
    f
}

/// The TCP checksum over the pseudo header and segment (field taken as 0).
fn tcp_checksum(f: &[u8]) -> u16 {
    let seg = &f[34..];
    let mut buf = Vec::new();
    buf.extend_from_slice(&f[26..34]);
    buf.extend_from_slice(&[0, 6]);
    buf.extend_from_slice(&(seg.len() as u16).to_be_bytes());
    buf.extend_from_slice(seg);
    buf[12 + 16] = 0;
    buf[12 + 17] = 0;
    ipv4_checksum(&buf)
}

fn addrs(f: &[u8]) -> (Ipv4Addr, Ipv4Addr, u16, u16) {
    let ip = |o: usize| Ipv4Addr::new(f[o], f[o + 1], f[o + 2], f[o + 3]);
    let port = |o: usize| u16::from_be_bytes([f[o], f[o + 1]]);
    (ip(26), ip(30), port(34), port(36))
}

fn assert_checksums(f: &[u8]) {
    assert_eq!(ipv4_checksum(&f[14..34]), 0, "IPv4 header checksum");
    let stored = u16::from_be_bytes([f[50], f[51]]);
    assert_eq!(stored, tcp_checksum(f), "TCP checksum");
}

fn client_syn(to: Ipv4Addr, sport: u16, dport: u16) -> Vec<u8> {
    frame(CLIENT_MAC, UNDERLAY_MAC, CLIENT, to, sport, dport)
}

#[test]
fn nodeport_is_dnated_to_a_maglev_backend_and_replies_are_translated_back() {
    if !privileged("nodeport_is_dnated_to_a_maglev_backend_and_replies_are_translated_back") {
        return;
    }
    let n1 = node(NODE_1, POD_1, true);
    let mut seen_local = None;
    let mut seen_remote = None;
    for sport in 40000..40064u16 {
        let out = n1
            .dp
            .test_run(Hook::Host, &client_syn(NODE_1, sport, NODE_PORT))
            .expect("run");
        assert_eq!(out.verdict, TcVerdict::Redirect, "sport {sport}");
        assert_checksums(&out.packet);
        let (s, d, sp, dp) = addrs(&out.packet);
        assert_eq!((sp, dp), (sport, TARGET_PORT));
        if d == POD_1 {
            // Local backend: DNAT only, delivered to the pod.
            assert_eq!(s, CLIENT);
            assert_eq!(
                (dst_mac(&out.packet), src_mac(&out.packet)),
                (POD_MAC, LXC_MAC)
            );
            seen_local.get_or_insert(sport);
        } else {
            // Remote backend: DNAT + SNAT to the node's address.
            assert_eq!((s, d), (NODE_1, POD_2));
            seen_remote.get_or_insert(sport);
        }
        // The same flow again (its next packet) keeps its translation.
        let again = n1
            .dp
            .test_run(Hook::Host, &client_syn(NODE_1, sport, NODE_PORT))
            .expect("run");
        assert_eq!(addrs(&again.packet), addrs(&out.packet));
    }
    let local = seen_local.expect("some flow lands on the local backend");
    let remote = seen_remote.expect("some flow lands on the remote backend");

    // The local backend's reply, as the pod sends it (bpf_lxc).
    let reply = frame(POD_MAC, LXC_MAC, POD_1, CLIENT, TARGET_PORT, local);
    let out = n1.dp.test_run(Hook::Lxc, &reply).expect("run");
    assert_eq!(out.verdict, TcVerdict::Redirect);
    assert_eq!(addrs(&out.packet), (NODE_1, CLIENT, NODE_PORT, local));
    assert_checksums(&out.packet);

    // The remote backend's reply, coming back to this node (bpf_host).
    let reply = frame(
        UNDERLAY_MAC,
        UNDERLAY_MAC,
        POD_2,
        NODE_1,
        TARGET_PORT,
        remote,
    );
    let out = n1.dp.test_run(Hook::Host, &reply).expect("run");
    assert_eq!(out.verdict, TcVerdict::Redirect);
    assert_eq!(addrs(&out.packet), (NODE_1, CLIENT, NODE_PORT, remote));
    assert_checksums(&out.packet);
}

#[test]
fn every_node_picks_the_same_backend_for_the_same_client_flow() {
    if !privileged("every_node_picks_the_same_backend_for_the_same_client_flow") {
        return;
    }
    let n1 = node(NODE_1, POD_1, true);
    let n2 = node(NODE_2, POD_2, true);
    let mut backends = std::collections::BTreeSet::new();
    for sport in 41000..41100u16 {
        let b1 = addrs(
            &n1.dp
                .test_run(Hook::Host, &client_syn(NODE_1, sport, NODE_PORT))
                .expect("run")
                .packet,
        )
        .1;
        let b2 = addrs(
            &n2.dp
                .test_run(Hook::Host, &client_syn(NODE_2, sport, NODE_PORT))
                .expect("run")
                .packet,
        )
        .1;
        assert_eq!(b1, b2, "sport {sport}");
        backends.insert(b1);
    }
    assert_eq!(backends.len(), 2, "both backends used: {backends:?}");
}

#[test]
fn non_service_traffic_and_nodeport_without_the_service_pass_untouched() {
    if !privileged("non_service_traffic_and_nodeport_without_the_service_pass_untouched") {
        return;
    }
    // No NodePort programmed (service LB off looks the same: empty maps).
    let n1 = node(NODE_1, POD_1, false);
    for f in [
        client_syn(NODE_1, 40000, NODE_PORT),
        client_syn(NODE_1, 40000, 22),
        // Another address with the NodePort: not this node's.
        client_syn(NODE_2, 40000, NODE_PORT),
    ] {
        let out = n1.dp.test_run(Hook::Host, &f).expect("run");
        assert_eq!(out.verdict, TcVerdict::Ok);
        assert_eq!(out.packet, f);
    }
    let n1 = node(NODE_1, POD_1, true);
    for f in [
        client_syn(NODE_1, 40000, 22),
        client_syn(NODE_2, 40000, NODE_PORT),
    ] {
        let out = n1.dp.test_run(Hook::Host, &f).expect("run");
        assert_eq!(out.verdict, TcVerdict::Ok);
        assert_eq!(out.packet, f);
    }
}

#[test]
fn on_the_backends_node_replies_to_a_request_another_node_snated_bypass_the_stack() {
    if !privileged("on_the_backends_node_replies_to_a_request_another_node_snated_bypass_the_stack")
    {
        return;
    }
    // node-2, with POD_2 local; node-1's address is a remote node.
    let mut n2 = node(NODE_2, POD_2, true);
    n2.dp
        .upsert_ipcache(ipnet::Ipv4Net::new(NODE_1, 32).expect("prefix"), 6)
        .expect("ipcache");
    let request = frame(
        UNDERLAY_MAC,
        UNDERLAY_MAC,
        NODE_1,
        POD_2,
        40000,
        TARGET_PORT,
    );
    let out = n2.dp.test_run(Hook::Host, &request).expect("run");
    // Traffic from a node's own address is delivered by the stack (its
    // conntrack must see the request), untranslated.
    assert_eq!(out.verdict, TcVerdict::Ok);
    assert_eq!(addrs(&out.packet), (NODE_1, POD_2, 40000, TARGET_PORT));
    // The reply leaves by the underlay (redirect), untranslated, not via the stack.
    let reply = frame(POD_MAC, LXC_MAC, POD_2, NODE_1, TARGET_PORT, 40000);
    let out = n2.dp.test_run(Hook::Lxc, &reply).expect("run");
    assert_eq!(out.verdict, TcVerdict::Redirect);
    assert_eq!(addrs(&out.packet), (POD_2, NODE_1, TARGET_PORT, 40000));
    assert_checksums(&out.packet);

    // Not a service backend port: node -> pod traffic is left as it was.
    let request = frame(UNDERLAY_MAC, UNDERLAY_MAC, NODE_1, POD_2, 40001, 9090);
    n2.dp.test_run(Hook::Host, &request).expect("run");
    let reply = frame(POD_MAC, LXC_MAC, POD_2, NODE_1, 9090, 40001);
    let out = n2.dp.test_run(Hook::Lxc, &reply).expect("run");
    assert_eq!(out.verdict, TcVerdict::Ok);
    assert_eq!(out.packet, reply);
}

/// Requests from clients 10.99.1.1, 10.99.1.2, ... all with source port
/// `sport`, to node-1's NodePort, until `count` of them went to the remote
/// backend: those clients and what bpf_host made of their requests.
fn clients_sent_to_the_remote_backend(
    n1: &Node,
    sport: u16,
    count: usize,
) -> Vec<(Ipv4Addr, TestRunOutput)> {
    let mut out = Vec::new();
    for i in 1..=250u8 {
        let client = Ipv4Addr::new(10, 99, 1, i);
        let request = frame(CLIENT_MAC, UNDERLAY_MAC, client, NODE_1, sport, NODE_PORT);
        let run = n1.dp.test_run(Hook::Host, &request).expect("run");
        if run.verdict == TcVerdict::Shot || addrs(&run.packet).1 == POD_2 {
            out.push((client, run));
            if out.len() == count {
                return out;
            }
        }
    }
    panic!("fewer than {count} clients went to the remote backend");
}

#[test]
fn clients_sharing_a_source_port_towards_a_remote_backend_get_distinct_snat_ports_and_their_own_replies()
 {
    if !privileged(
        "clients_sharing_a_source_port_towards_a_remote_backend_get_distinct_snat_ports_and_their_own_replies",
    ) {
        return;
    }
    const SPORT: u16 = 45000;
    let n1 = node(NODE_1, POD_1, true);
    let flows = clients_sent_to_the_remote_backend(&n1, SPORT, 3);
    let mut ports = Vec::new();
    for (client, out) in &flows {
        assert_eq!(out.verdict, TcVerdict::Redirect, "client {client}");
        assert_checksums(&out.packet);
        let (s, d, sp, dp) = addrs(&out.packet);
        assert_eq!((s, d, dp), (NODE_1, POD_2, TARGET_PORT));
        ports.push(sp);
    }
    // The first keeps its own port; the others get distinct ones from the range.
    assert_eq!(ports[0], SPORT);
    for p in &ports[1..] {
        assert!((32768..=60999).contains(p), "port {p}");
    }
    let distinct: std::collections::BTreeSet<_> = ports.iter().collect();
    assert_eq!(distinct.len(), ports.len(), "ports {ports:?}");

    for ((client, _), port) in flows.iter().zip(&ports) {
        // The flow's next packet keeps its port.
        let again = frame(CLIENT_MAC, UNDERLAY_MAC, *client, NODE_1, SPORT, NODE_PORT);
        let out = n1.dp.test_run(Hook::Host, &again).expect("run");
        assert_eq!(addrs(&out.packet), (NODE_1, POD_2, *port, TARGET_PORT));
        // The backend's reply goes back to this client, on its own port.
        let reply = frame(UNDERLAY_MAC, UNDERLAY_MAC, POD_2, NODE_1, TARGET_PORT, *port);
        let out = n1.dp.test_run(Hook::Host, &reply).expect("run");
        assert_eq!(out.verdict, TcVerdict::Redirect);
        assert_eq!(addrs(&out.packet), (NODE_1, *client, NODE_PORT, SPORT));
        assert_checksums(&out.packet);
    }
}

#[test]
fn a_new_flow_that_finds_no_free_snat_port_is_dropped_and_counted() {
    if !privileged("a_new_flow_that_finds_no_free_snat_port_is_dropped_and_counted") {
        return;
    }
    const SPORT: u16 = 45000;
    let config = LoadConfig {
        snat_ports: 61000..=61001,
        ..LoadConfig::default()
    };
    let n1 = node_with(NODE_1, POD_1, true, &config);
    // The client's own port, then the two of the range; the fourth finds none.
    let flows = clients_sent_to_the_remote_backend(&n1, SPORT, 4);
    let ports: Vec<u16> = flows[..3]
        .iter()
        .map(|(_, out)| {
            assert_eq!(out.verdict, TcVerdict::Redirect);
            addrs(&out.packet).2
        })
        .collect();
    assert_eq!(ports[0], SPORT);
    let mut rest = ports[1..].to_vec();
    rest.sort();
    assert_eq!(rest, [61000, 61001]);
    assert_eq!(flows[3].1.verdict, TcVerdict::Shot);
    let drops = n1.dp.metrics().expect("metrics").drops;
    assert_eq!(drops.get(&DropReason::NatNoPort).map(|c| c.packets), Some(1));

    assert!(
        Datapath::load_with(
            PinDir::new().path(),
            &ALL_ON,
            &LoadConfig {
                // An empty range is refused before anything is loaded.
                #[allow(clippy::reversed_empty_ranges, reason = "the point of the test")]
                snat_ports: 2..=1,
                ..LoadConfig::default()
            }
        )
        .is_err()
    );
}
