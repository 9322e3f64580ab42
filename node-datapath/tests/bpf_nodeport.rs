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
    AttachMode, Datapath, DatapathOptions, DropReason, EndpointInfo, Hook, LoadConfig, MacAddr,
    SockLb, TcVerdict, TestRunOutput, XdpAction, XdpMode,
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

/// Both pods back the service.
const BOTH_PODS: &[(u32, Ipv4Addr)] = &[(1, POD_1), (2, POD_2)];

fn service(with_node_port: bool, backends: &[(u32, Ipv4Addr)]) -> BTreeMap<String, Any> {
    service_with(with_node_port, proto::Algorithm::Maglev, 0, backends)
}

/// The service with a NodePort (or without), `algorithm`, a ClientIP
/// affinity timeout (0: none) and `backends`.
fn service_with(
    with_node_port: bool,
    algorithm: proto::Algorithm,
    affinity_timeout_seconds: u32,
    backends: &[(u32, Ipv4Addr)],
) -> BTreeMap<String, Any> {
    let mut frontends = vec![proto::Frontend {
        kind: proto::FrontendKind::ClusterIp as i32,
        address: "10.96.0.10".into(),
        port: 80,
        protocol: proto::Protocol::Tcp as i32,
        port_name: String::new(),
        target_port: u32::from(TARGET_PORT),
        announcer: String::new(),
    }];
    if with_node_port {
        frontends.push(proto::Frontend {
            kind: proto::FrontendKind::NodePort as i32,
            address: String::new(),
            port: u32::from(NODE_PORT),
            protocol: proto::Protocol::Tcp as i32,
            port_name: String::new(),
            target_port: u32::from(TARGET_PORT),
            announcer: String::new(),
        });
    }
    let msg = proto::ServiceState {
        namespace: "default".into(),
        name: "web".into(),
        frontends,
        algorithm: algorithm as i32,
        hash_source_address_only: false,
        affinity_timeout_seconds,
        backends: backends
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
    node_with(
        addr,
        local,
        &service(with_node_port, BOTH_PODS),
        &LoadConfig::default(),
    )
}

fn node_with(
    addr: Ipv4Addr,
    local: Ipv4Addr,
    service: &BTreeMap<String, Any>,
    config: &LoadConfig,
) -> Node {
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
    let mut sink = LbSink::new("node-1", sock);
    sink.reconcile(service).expect("reconcile");
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

/// The backend node-1 DNATs a new flow from `client`:`sport` to.
fn nodeport_backend(n: &Node, client: Ipv4Addr, sport: u16) -> Ipv4Addr {
    let syn = frame(CLIENT_MAC, UNDERLAY_MAC, client, NODE_1, sport, NODE_PORT);
    let out = n.dp.test_run(Hook::Host, &syn).expect("run");
    assert_eq!(out.verdict, TcVerdict::Redirect, "{client}:{sport}");
    addrs(&out.packet).1
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
        let reply = frame(
            UNDERLAY_MAC,
            UNDERLAY_MAC,
            POD_2,
            NODE_1,
            TARGET_PORT,
            *port,
        );
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
    let n1 = node_with(NODE_1, POD_1, &service(true, BOTH_PODS), &config);
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
    assert_eq!(
        drops.get(&DropReason::NatNoPort).map(|c| c.packets),
        Some(1)
    );

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

// === XDP (bpf_xdp) ===

const NODE_2_MAC: MacAddr = MacAddr([0x02, 0, 0, 0, 0xee, 0x02]);

/// A namespace whose underlay `ul0` (NODE_1/24, MAC UNDERLAY_MAC) has a
/// route to node-2's pods via NODE_2 and, with `neighbour`, node-2's MAC
/// already known; the peer end sits in a second namespace, up.
fn xdp_node_ns(neighbour: bool) -> (Netns, Netns, u32) {
    let node = Netns::new("xdpnode");
    let peer = Netns::new("xdppeer");
    let ip = |ns: &Netns, args: &[&str]| run(&[&["ip", "-n", &ns.name], args].concat());
    ip(
        &node,
        &[
            "link",
            "add",
            "ul0",
            "address",
            &UNDERLAY_MAC.to_string(),
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &peer.name,
        ],
    );
    ip(
        &node,
        &["addr", "add", &format!("{NODE_1}/24"), "dev", "ul0"],
    );
    ip(&node, &["link", "set", "ul0", "up"]);
    ip(&peer, &["link", "set", "eth0", "up"]);
    ip(
        &node,
        &["route", "add", "10.200.2.0/24", "via", &NODE_2.to_string()],
    );
    if neighbour {
        ip(
            &node,
            &[
                "neigh",
                "add",
                &NODE_2.to_string(),
                "lladdr",
                &NODE_2_MAC.to_string(),
                "dev",
                "ul0",
                "nud",
                "permanent",
            ],
        );
    }
    let ifindex = node.ifindex("ul0");
    (node, peer, ifindex)
}

#[test]
fn xdp_sends_nodeport_requests_for_remote_backends_back_out_translated_and_passes_the_rest() {
    if !privileged(
        "xdp_sends_nodeport_requests_for_remote_backends_back_out_translated_and_passes_the_rest",
    ) {
        return;
    }
    let (ns, _peer, ul0) = xdp_node_ns(true);
    ns.run_in(|| {
        let n1 = node(NODE_1, POD_1, true);
        let mut sent = None;
        let mut passed = None;
        for sport in 42000..42064u16 {
            let request = client_syn(NODE_1, sport, NODE_PORT);
            let out = n1.dp.test_run_xdp(&request, ul0).expect("run");
            match out.action {
                XdpAction::Tx => {
                    // DNAT + SNAT as bpf_host does, MACs from the FIB.
                    assert_eq!(
                        addrs(&out.packet),
                        (NODE_1, POD_2, sport, TARGET_PORT),
                        "sport {sport}"
                    );
                    assert_checksums(&out.packet);
                    assert_eq!(
                        (dst_mac(&out.packet), src_mac(&out.packet)),
                        (NODE_2_MAC, UNDERLAY_MAC)
                    );
                    sent.get_or_insert(sport);
                }
                XdpAction::Pass => {
                    // The local backend: bpf_host's (delivery, policy), untouched here.
                    assert_eq!(out.packet, request);
                    let out = n1.dp.test_run(Hook::Host, &request).expect("run");
                    assert_eq!(addrs(&out.packet).1, POD_1);
                    passed.get_or_insert(sport);
                }
                other => panic!("sport {sport}: {other:?}"),
            }
        }
        let sent = sent.expect("some flow goes to the remote backend");
        passed.expect("some flow goes to the local backend");

        // The next packet of the flow: the same translation, from its entry.
        let out = n1
            .dp
            .test_run_xdp(&client_syn(NODE_1, sent, NODE_PORT), ul0)
            .expect("run");
        assert_eq!(out.action, XdpAction::Tx);
        assert_eq!(addrs(&out.packet), (NODE_1, POD_2, sent, TARGET_PORT));

        // The backend's reply: passed by XDP, translated back by bpf_host.
        let reply = frame(NODE_2_MAC, UNDERLAY_MAC, POD_2, NODE_1, TARGET_PORT, sent);
        let out = n1.dp.test_run_xdp(&reply, ul0).expect("run");
        assert_eq!((out.action, &out.packet), (XdpAction::Pass, &reply));
        let out = n1.dp.test_run(Hook::Host, &reply).expect("run");
        assert_eq!(out.verdict, TcVerdict::Redirect);
        assert_eq!(addrs(&out.packet), (NODE_1, CLIENT, NODE_PORT, sent));

        // No service: passed untouched.
        let other = client_syn(NODE_1, 42000, 22);
        let out = n1.dp.test_run_xdp(&other, ul0).expect("run");
        assert_eq!((out.action, &out.packet), (XdpAction::Pass, &other));

        let m = n1.dp.metrics().expect("metrics");
        assert!(m.xdp_tx.packets >= 2, "{m:?}");
        assert!(m.xdp_rx.packets > m.xdp_tx.packets, "{m:?}");
    });
}

#[test]
fn xdp_leaves_a_new_flow_to_tc_while_the_backends_node_has_no_neighbour_entry() {
    if !privileged("xdp_leaves_a_new_flow_to_tc_while_the_backends_node_has_no_neighbour_entry") {
        return;
    }
    let (ns, _peer, ul0) = xdp_node_ns(false);
    ns.run_in(|| {
        // Only the remote pod backs the service: every flow goes there.
        let n1 = node_with(
            NODE_1,
            POD_1,
            &service(true, &[(2, POD_2)]),
            &LoadConfig::default(),
        );
        let request = client_syn(NODE_1, 43000, NODE_PORT);
        let out = n1.dp.test_run_xdp(&request, ul0).expect("run");
        assert_eq!((out.action, &out.packet), (XdpAction::Pass, &request));
        // Nothing was committed: bpf_host decides the flow as if XDP were not there.
        let out = n1.dp.test_run(Hook::Host, &request).expect("run");
        assert_eq!(out.verdict, TcVerdict::Redirect);
        assert_eq!(addrs(&out.packet), (NODE_1, POD_2, 43000, TARGET_PORT));
        assert_eq!(n1.dp.metrics().expect("metrics").xdp_tx.packets, 0);
    });
}

/// A client, node-1 (the datapath) and node-2 (the backend
/// address on `lo`, a TCP echo server) on one bridge, as `membrane up` wires
/// the underlay.
struct Underlay {
    client: Netns,
    node1: Netns,
    node2: Netns,
    switch: Netns,
    node1_ul0: u32,
}

impl Underlay {
    fn new() -> Self {
        let switch = Netns::new("xsw");
        let ip = |ns: &Netns, args: &[&str]| run(&[&["ip", "-n", &ns.name], args].concat());
        ip(&switch, &["link", "add", "br0", "type", "bridge"]);
        ip(&switch, &["link", "set", "br0", "up"]);
        let attach = |role: &str, addr: Ipv4Addr, n: u8| {
            let ns = Netns::new(role);
            let port = format!("p{n}");
            ip(
                &switch,
                &[
                    "link",
                    "add",
                    &port,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    "ul0",
                    "address",
                    &format!("02:00:00:00:ee:{n:02x}"),
                    "netns",
                    &ns.name,
                ],
            );
            ip(&switch, &["link", "set", &port, "master", "br0", "up"]);
            ip(&ns, &["addr", "add", &format!("{addr}/24"), "dev", "ul0"]);
            ip(&ns, &["link", "set", "ul0", "up"]);
            ns
        };
        let client = attach("xcl", CLIENT, 0xc8);
        let node1 = attach("xn1", NODE_1, 0x01);
        let node2 = attach("xn2", NODE_2, 0x02);
        // bpf_fib_lookup answers only where the device forwards (else
        // FWD_DISABLED, and XDP leaves everything to tc).
        in_ns(&node1.name, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])
            .output()
            .expect("sysctl");
        ip(
            &node1,
            &["route", "add", "10.200.2.0/24", "via", &NODE_2.to_string()],
        );
        ip(
            &node2,
            &["addr", "add", &format!("{POD_2}/32"), "dev", "lo"],
        );
        let node1_ul0 = node1.ifindex("ul0");
        Self {
            client,
            node1,
            node2,
            switch,
            node1_ul0,
        }
    }

    /// Turns off transmit checksum offload on the client's `ul0` (ethtool's
    /// `tx off`, through SIOCETHTOOL from python: no ethtool binary here).
    fn client_computes_checksums(&self) {
        const SCRIPT: &str = "import ctypes, fcntl, socket, struct\n\
            v = ctypes.create_string_buffer(struct.pack('II', 0x17, 0))\n\
            ifr = struct.pack('16sP', b'ul0', ctypes.addressof(v))\n\
            s = socket.socket()\n\
            fcntl.ioctl(s.fileno(), 0x8946, ifr)\n";
        let out = in_ns(&self.client.name, &["python3", "-c", SCRIPT])
            .output()
            .expect("spawn python3");
        assert!(
            out.status.success(),
            "ETHTOOL_STXCSUM: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A TCP echo server on node-2 at POD_2:TARGET_PORT, for `conns` connections.
    fn echo_backend(&self, conns: usize) -> std::thread::JoinHandle<()> {
        let path = format!("/run/netns/{}", self.node2.name);
        let (tx, rx) = std::sync::mpsc::channel();
        let handle = std::thread::spawn(move || {
            enter_netns(&path);
            let listener = std::net::TcpListener::bind((POD_2, TARGET_PORT)).expect("bind backend");
            tx.send(()).expect("ready");
            for _ in 0..conns {
                let (mut c, _) = listener.accept().expect("accept");
                std::io::copy(&mut c.try_clone().expect("clone"), &mut c).expect("echo");
            }
        });
        rx.recv().expect("backend ready");
        handle
    }

    /// Connects from the client to NODE_1:NODE_PORT and checks the echo.
    fn exchange(&self, message: &[u8]) {
        use std::io::{Read as _, Write as _};
        let message = message.to_vec();
        self.client.run_in(move || {
            let addr = std::net::SocketAddr::from((NODE_1, NODE_PORT));
            let mut c =
                std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(3))
                    .expect("connect to the NodePort");
            c.set_read_timeout(Some(std::time::Duration::from_secs(3)))
                .expect("timeout");
            for _ in 0..10 {
                c.write_all(&message).expect("write");
                let mut back = vec![0u8; message.len()];
                c.read_exact(&mut back).expect("echo comes back");
                assert_eq!(back, message);
            }
        });
    }
}

#[test]
fn nodeport_traffic_to_a_remote_backend_takes_the_xdp_path_in_generic_and_native_mode() {
    if !privileged(
        "nodeport_traffic_to_a_remote_backend_takes_the_xdp_path_in_generic_and_native_mode",
    ) {
        return;
    }
    let net = Underlay::new();
    let ul0 = net.node1_ul0;
    let mut n1 = net.node1.run_in(|| {
        let mut n = node_with(
            NODE_1,
            POD_1,
            &service(true, &[(2, POD_2)]),
            &LoadConfig::default(),
        );
        n.dp.attach(Hook::Host, ul0).expect("attach bpf_host");
        n
    });
    let backend = net.echo_backend(2);

    let generic = net.node1.run_in(|| n1.dp.attach_xdp(ul0, XdpMode::Generic));
    assert_eq!(generic.expect("attach generic"), AttachMode::Fresh);
    assert_eq!(n1.dp.xdp_attachment(ul0), Some(XdpMode::Generic));
    net.exchange(b"through generic XDP");
    let after_generic = n1.dp.metrics().expect("metrics").xdp_tx.packets;
    // The handshake's SYN may go through tc (node-2's MAC not known yet); the rest through XDP.
    assert!(after_generic >= 10, "xdp_tx {after_generic}");

    // Native XDP_TX on a veth delivers only if the peer has NAPI: give the
    // bridge port an XDP program (another datapath, whose maps are empty,
    // so it passes everything).
    let switch_pins = PinDir::new();
    let mut switch_dp = net.switch.run_in(|| {
        let mut dp = Datapath::load(switch_pins.path(), &ALL_ON).expect("load");
        let port = net.switch.ifindex("p1");
        dp.attach_xdp(port, XdpMode::Native)
            .expect("attach on the bridge port");
        dp
    });
    // A native XDP frame carries no checksum-offload state: a checksum the
    // client's stack left for offload (CHECKSUM_PARTIAL, only possible when
    // the sender is on the same host) would leave unfinished. Frames from a
    // wire are complete: make the client's so.
    net.client_computes_checksums();
    let native = net.node1.run_in(|| n1.dp.attach_xdp(ul0, XdpMode::Native));
    assert_eq!(native.expect("attach native"), AttachMode::Fresh);
    assert_eq!(n1.dp.xdp_attachment(ul0), Some(XdpMode::Native));
    net.exchange(b"through native XDP");
    let after_native = n1.dp.metrics().expect("metrics").xdp_tx.packets;
    assert!(
        after_native >= after_generic + 10,
        "xdp_tx {after_generic} -> {after_native}"
    );
    backend.join().expect("backend");

    // Re-attaching in the same mode adopts the pinned link.
    let again = net.node1.run_in(|| n1.dp.attach_xdp(ul0, XdpMode::Native));
    assert_eq!(again.expect("adopt"), AttachMode::Adopted);
    assert!(n1.dp.detach_xdp(ul0).expect("detach"));
    assert_eq!(n1.dp.xdp_attachment(ul0), None);
    assert!(!n1.dp.detach_xdp(ul0).expect("detach again"));
    drop(switch_dp.detach_xdp(net.switch.ifindex("p1")));
}

#[test]
fn nodeport_with_client_ip_affinity_sends_every_flow_of_a_client_to_one_backend() {
    if !privileged("nodeport_with_client_ip_affinity_sends_every_flow_of_a_client_to_one_backend") {
        return;
    }
    // Random: without affinity one client's flows spread over both backends.
    let n1 = node_with(
        NODE_1,
        POD_1,
        &service_with(true, proto::Algorithm::Random, 0, BOTH_PODS),
        &LoadConfig::default(),
    );
    let spread: std::collections::BTreeSet<_> = (40000..40064u16)
        .map(|sport| nodeport_backend(&n1, CLIENT, sport))
        .collect();
    assert_eq!(spread.len(), 2, "random spreads: {spread:?}");

    // With affinity (the client is its source address): one backend per
    // client whatever its source port, and the clients spread.
    let n1 = node_with(
        NODE_1,
        POD_1,
        &service_with(true, proto::Algorithm::Random, 60, BOTH_PODS),
        &LoadConfig::default(),
    );
    let mut per_client = std::collections::BTreeSet::new();
    for host in 1..=32u8 {
        let client = Ipv4Addr::new(10, 99, 1, host);
        let first = nodeport_backend(&n1, client, 40000);
        for sport in 40001..40016u16 {
            assert_eq!(
                nodeport_backend(&n1, client, sport),
                first,
                "{client}:{sport}"
            );
        }
        per_client.insert(first);
    }
    assert_eq!(per_client.len(), 2, "clients spread: {per_client:?}");
}
