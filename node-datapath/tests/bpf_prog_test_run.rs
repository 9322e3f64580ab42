// SPDX-License-Identifier: Apache-2.0
//! Packet tests of the programs through BPF_PROG_TEST_RUN: a crafted frame
//! goes in, the verdict and the rewritten frame come out, and the real maps
//! (endpoints, ct, counters, events) show what the program did.
//! SETUP: load into a private pin dir and program endpoints; RUN: one frame;
//! CHECK: verdict, bytes, maps. Root only (loading programs needs CAP_BPF).
//!
//! Decision on malformed input: bpf_lxc DROPS a frame that claims IPv4 but
//! is truncated or malformed (a pod has no business sending one; counted and
//! reported as `DropReason::Invalid`), while bpf_host PASSES anything it
//! cannot parse to the stack, which owns the underlay and validates it.

mod bpf_support;

use ipnet::Ipv4Net;
use std::net::Ipv4Addr;
use std::sync::Arc;

use bpf_support::*;
use membrane_node_datapath::bpf::{
    CtDirection, Datapath, DatapathEvent, DatapathOptions, DropReason, EndpointInfo, EventKind,
    EventReader, Flow, Hook, MacAddr, ObservationPoint, TcVerdict, probe_features,
};
use membrane_node_datapath::identity::ClusterView;
use membrane_node_datapath::observer::{
    FlowBuilder, LocalEndpoint, LocalEndpoints, clock::WallClock,
};
use membrane_proto::observer::v1 as pb;

const POD_A: Ipv4Addr = Ipv4Addr::new(10, 200, 1, 10);
const POD_B: Ipv4Addr = Ipv4Addr::new(10, 200, 1, 11);
const REMOTE_POD: Ipv4Addr = Ipv4Addr::new(10, 200, 2, 10);
const POD_A_MAC: MacAddr = MacAddr([0x02, 0, 0, 0, 0x0a, 0x02]);
const LXC_A_MAC: MacAddr = MacAddr([0x02, 0, 0, 0, 0x0a, 0x01]);
const POD_B_MAC: MacAddr = MacAddr([0x02, 0, 0, 0, 0x0b, 0x02]);
const LXC_B_MAC: MacAddr = MacAddr([0x02, 0, 0, 0, 0x0b, 0x01]);
const UNDERLAY_MAC: MacAddr = MacAddr([0x02, 0, 0, 0, 0xee, 0x01]);
const PEER_NODE_MAC: MacAddr = MacAddr([0x02, 0, 0, 0, 0xee, 0x02]);

const ALL_ON: DatapathOptions = DatapathOptions {
    redirect_peer: true,
    redirect_neigh: true,
};

/// A loaded datapath with pods A and B as local endpoints.
fn setup(opts: DatapathOptions) -> (PinDir, Datapath) {
    let pins = PinDir::new();
    let mut dp = Datapath::load(pins.path(), &opts).expect("load datapath");
    for (ip, ifindex, pod_mac, node_mac, id) in [
        (POD_A, 101, POD_A_MAC, LXC_A_MAC, 1),
        (POD_B, 102, POD_B_MAC, LXC_B_MAC, 2),
    ] {
        let info = EndpointInfo {
            ifindex,
            pod_mac,
            node_mac,
            endpoint_id: id,
            identity: 0,
            flags: 0,
        };
        dp.upsert_endpoint(ip, &info).expect("upsert endpoint");
    }
    (pins, dp)
}

/// A frame as pod A sends it: to its gateway's MAC (the node-side veth).
fn from_pod_a(daddr: Ipv4Addr) -> Ipv4Frame {
    Ipv4Frame {
        src_mac: POD_A_MAC,
        dst_mac: LXC_A_MAC,
        saddr: POD_A,
        daddr,
        ttl: 64,
    }
}

fn flow(saddr: Ipv4Addr, daddr: Ipv4Addr, sport: u16, dport: u16, proto: u8) -> Flow {
    Flow {
        saddr,
        daddr,
        sport,
        dport,
        proto,
        direction: CtDirection::Egress,
    }
}

#[test]
fn the_kernel_has_the_redirect_helpers_the_datapath_uses() {
    if !privileged("the_kernel_has_the_redirect_helpers_the_datapath_uses") {
        return;
    }
    let f = probe_features().expect("probe");
    assert!(f.redirect_peer, "bpf_redirect_peer missing: {f:?}");
    assert!(f.redirect_neigh, "bpf_redirect_neigh missing: {f:?}");
}

#[test]
fn lxc_redirects_pod_to_local_pod_traffic_to_the_peer_with_router_macs() {
    if !privileged("lxc_redirects_pod_to_local_pod_traffic_to_the_peer_with_router_macs") {
        return;
    }
    let (_pins, mut dp) = setup(ALL_ON);
    let mut events = dp.events().expect("events");
    let syn = from_pod_a(POD_B).tcp(40000, 80, TCP_SYN);

    let out = dp.test_run(Hook::Lxc, &syn).expect("test run");

    assert_eq!(out.verdict, TcVerdict::Redirect);
    assert_eq!(dst_mac(&out.packet), POD_B_MAC, "delivered to pod B's eth0");
    assert_eq!(
        src_mac(&out.packet),
        LXC_B_MAC,
        "from pod B's gateway (its node-side veth)"
    );
    assert_eq!(ttl(&out.packet), 63, "a routed hop decrements the TTL");
    assert_eq!(
        ipv4_checksum(&out.packet[14..34]),
        0,
        "IPv4 checksum still valid"
    );
    assert_eq!(out.packet[34..], syn[34..], "L4 untouched");

    let ct = dp.conntrack().expect("ct");
    assert_eq!(ct.len(), 1, "{ct:?}");
    assert_eq!(ct[0].0, flow(POD_A, POD_B, 40000, 80, 6));
    assert_eq!(
        (
            ct[0].1.packets_fwd,
            ct[0].1.tcp_flags_fwd,
            ct[0].1.seen_reply
        ),
        (1, TCP_SYN, false)
    );

    let m = dp.metrics().expect("metrics");
    assert_eq!(
        (m.lxc_rx.packets, m.redirect_peer.packets, m.ct_new.packets),
        (1, 1, 1)
    );
    assert_eq!((m.passed.packets, m.dropped()), (0, 0));

    let ev = events
        .try_next()
        .expect("a trace event for the new connection");
    assert_eq!(ev.kind, EventKind::NewConnection);
    assert_eq!(ev.source, ObservationPoint::Lxc);
    assert_eq!(ev.flow, Some(flow(POD_A, POD_B, 40000, 80, 6)));
    assert_eq!(ev.pkt_len as usize, syn.len());
}

#[test]
fn lxc_traces_only_the_first_packet_and_recognises_the_reply() {
    if !privileged("lxc_traces_only_the_first_packet_and_recognises_the_reply") {
        return;
    }
    let (_pins, mut dp) = setup(ALL_ON);
    let mut events = dp.events().expect("events");
    let a_to_b = from_pod_a(POD_B);
    let b_to_a = Ipv4Frame {
        src_mac: POD_B_MAC,
        dst_mac: LXC_B_MAC,
        saddr: POD_B,
        daddr: POD_A,
        ttl: 64,
    };

    for frame in [
        a_to_b.tcp(40000, 80, TCP_SYN),
        b_to_a.tcp(80, 40000, TCP_SYN | TCP_ACK),
        a_to_b.tcp(40000, 80, TCP_ACK),
    ] {
        assert_eq!(
            dp.test_run(Hook::Lxc, &frame).expect("run").verdict,
            TcVerdict::Redirect
        );
    }

    let ct = dp.conntrack().expect("ct");
    assert_eq!(ct.len(), 1, "the reply found the original entry: {ct:?}");
    let e = ct[0].1;
    assert!(e.seen_reply);
    assert_eq!((e.packets_fwd, e.packets_rev), (2, 1));
    assert_eq!(
        (e.tcp_flags_fwd, e.tcp_flags_rev),
        (TCP_SYN | TCP_ACK, TCP_SYN | TCP_ACK)
    );
    let m = dp.metrics().expect("metrics");
    assert_eq!(
        (
            m.ct_new.packets,
            m.ct_reply.packets,
            m.ct_established.packets
        ),
        (1, 1, 1)
    );
    assert_eq!(m.redirect_peer.packets, 3);
    assert_eq!(events.drain().len(), 1, "one trace event per connection");
}

#[test]
fn lxc_tracks_an_icmp_echo_and_its_reply_as_one_connection() {
    if !privileged("lxc_tracks_an_icmp_echo_and_its_reply_as_one_connection") {
        return;
    }
    let (_pins, dp) = setup(ALL_ON);
    let request = from_pod_a(POD_B).icmp_echo(0x1234);
    let mut reply = Ipv4Frame {
        src_mac: POD_B_MAC,
        dst_mac: LXC_B_MAC,
        saddr: POD_B,
        daddr: POD_A,
        ttl: 64,
    }
    .icmp_echo(0x1234);
    reply[34] = 0; // echo reply

    assert_eq!(
        dp.test_run(Hook::Lxc, &request).expect("run").verdict,
        TcVerdict::Redirect
    );
    assert_eq!(
        dp.test_run(Hook::Lxc, &reply).expect("run").verdict,
        TcVerdict::Redirect
    );

    let ct = dp.conntrack().expect("ct");
    assert_eq!(ct.len(), 1, "{ct:?}");
    assert_eq!(ct[0].0, flow(POD_A, POD_B, 0x1234, 0x1234, 1));
    assert!(ct[0].1.seen_reply);
}

#[test]
fn lxc_hands_traffic_for_other_nodes_to_the_stack_unchanged_but_tracks_it() {
    if !privileged("lxc_hands_traffic_for_other_nodes_to_the_stack_unchanged_but_tracks_it") {
        return;
    }
    let (_pins, dp) = setup(ALL_ON);
    let syn = from_pod_a(REMOTE_POD).tcp(40001, 443, TCP_SYN);

    let out = dp.test_run(Hook::Lxc, &syn).expect("run");

    assert_eq!(out.verdict, TcVerdict::Ok);
    assert_eq!(
        out.packet, syn,
        "the stack routes it; no rewrite, no TTL change"
    );
    assert_eq!(
        dp.conntrack().expect("ct")[0].0,
        flow(POD_A, REMOTE_POD, 40001, 443, 6)
    );
    let m = dp.metrics().expect("metrics");
    assert_eq!((m.passed.packets, m.redirected()), (1, 0));
}

#[test]
fn lxc_leaves_local_traffic_to_the_stack_when_redirect_peer_is_off() {
    if !privileged("lxc_leaves_local_traffic_to_the_stack_when_redirect_peer_is_off") {
        return;
    }
    // bpf_lxc uses only redirect_peer; neigh alone must not make it redirect.
    let (_pins, dp) = setup(DatapathOptions {
        redirect_peer: false,
        redirect_neigh: true,
    });
    let syn = from_pod_a(POD_B).tcp(40002, 80, TCP_SYN);

    let out = dp.test_run(Hook::Lxc, &syn).expect("run");

    assert_eq!(out.verdict, TcVerdict::Ok);
    assert_eq!(out.packet, syn);
    assert_eq!(dp.metrics().expect("metrics").redirected(), 0);
}

#[test]
fn lxc_drops_truncated_or_malformed_ipv4_and_reports_the_reason() {
    if !privileged("lxc_drops_truncated_or_malformed_ipv4_and_reports_the_reason") {
        return;
    }
    let (_pins, mut dp) = setup(ALL_ON);
    let mut events = dp.events().expect("events");
    let good = from_pod_a(POD_B).tcp(40003, 80, TCP_SYN);
    let mut bad_ihl = good.clone();
    bad_ihl[14] = 0x44; // IHL 4 words < 20-byte minimum
    let mut bad_version = good.clone();
    bad_version[14] = 0x65;
    let mut options_past_the_end = good[..34].to_vec();
    options_past_the_end[14] = 0x4f; // IHL 15: 40 bytes of options that are not there
    let mut short_total_length = good.clone();
    short_total_length[16..18].copy_from_slice(&12u16.to_be_bytes());
    // Frames shorter than Ethernet + a full IPv4 header never reach the
    // program: BPF_PROG_TEST_RUN itself rejects them (see the test below).
    let cases: [(&str, Vec<u8>); 6] = [
        ("IPv4 header but no TCP header", good[..34].to_vec()),
        ("TCP header cut short", good[..40].to_vec()),
        ("IHL below 5", bad_ihl),
        ("IP version 6 in an IPv4 ethertype", bad_version),
        (
            "IHL pointing past the end of the frame",
            options_past_the_end,
        ),
        ("total length shorter than the header", short_total_length),
    ];

    for (what, frame) in &cases {
        let out = dp.test_run(Hook::Lxc, frame).expect("run");
        assert_eq!(out.verdict, TcVerdict::Shot, "{what}");
    }

    let m = dp.metrics().expect("metrics");
    assert_eq!(
        m.drops.get(&DropReason::Invalid).map(|c| c.packets),
        Some(cases.len() as u64)
    );
    assert!(
        dp.conntrack().expect("ct").is_empty(),
        "nothing tracked from garbage"
    );
    let drops = events.drain();
    assert_eq!(drops.len(), cases.len());
    assert!(
        drops
            .iter()
            .all(|e| e.kind == EventKind::Drop(DropReason::Invalid) && e.flow.is_none())
    );
}

#[test]
fn lxc_drops_a_packet_whose_ttl_would_expire_on_the_redirect_hop() {
    if !privileged("lxc_drops_a_packet_whose_ttl_would_expire_on_the_redirect_hop") {
        return;
    }
    let (_pins, dp) = setup(ALL_ON);
    let frame = Ipv4Frame {
        ttl: 1,
        ..from_pod_a(POD_B)
    }
    .tcp(40004, 80, TCP_SYN);

    assert_eq!(
        dp.test_run(Hook::Lxc, &frame).expect("run").verdict,
        TcVerdict::Shot
    );
    assert!(
        dp.metrics()
            .expect("metrics")
            .drops
            .contains_key(&DropReason::TtlExceeded)
    );
}

#[test]
fn lxc_passes_non_ipv4_frames_such_as_arp() {
    if !privileged("lxc_passes_non_ipv4_frames_such_as_arp") {
        return;
    }
    let (_pins, dp) = setup(ALL_ON);
    let mut arp = from_pod_a(POD_B).tcp(1, 1, 0);
    arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());

    assert_eq!(
        dp.test_run(Hook::Lxc, &arp).expect("run").verdict,
        TcVerdict::Ok
    );
    assert!(dp.conntrack().expect("ct").is_empty());
}

#[test]
fn host_delivers_traffic_from_another_node_to_a_local_pod() {
    if !privileged("host_delivers_traffic_from_another_node_to_a_local_pod") {
        return;
    }
    let (_pins, mut dp) = setup(ALL_ON);
    // The sender is a pod of another node, known to the ipcache.
    dp.upsert_ipcache(Ipv4Net::new(REMOTE_POD, 32).expect("prefix"), 300)
        .expect("ipcache");
    let from_remote = Ipv4Frame {
        src_mac: PEER_NODE_MAC,
        dst_mac: UNDERLAY_MAC,
        saddr: REMOTE_POD,
        daddr: POD_A,
        ttl: 63,
    };
    let syn = from_remote.tcp(50000, 8080, TCP_SYN);

    let out = dp.test_run(Hook::Host, &syn).expect("run");

    assert_eq!(out.verdict, TcVerdict::Redirect);
    assert_eq!(
        (dst_mac(&out.packet), src_mac(&out.packet)),
        (POD_A_MAC, LXC_A_MAC)
    );
    assert_eq!(ttl(&out.packet), 62);
    assert_eq!(ipv4_checksum(&out.packet[14..34]), 0);
    let m = dp.metrics().expect("metrics");
    assert_eq!(
        (m.host_rx.packets, m.redirect_peer.packets, m.lxc_rx.packets),
        (1, 1, 0)
    );
}

#[test]
fn host_hands_traffic_from_outside_the_cluster_to_the_stack() {
    if !privileged("host_hands_traffic_from_outside_the_cluster_to_the_stack") {
        return;
    }
    let (_pins, dp) = setup(ALL_ON);
    // Not in the ipcache: the world. Its replies will leave through the
    // stack, so its first packet must go through the stack's conntrack too.
    let syn = Ipv4Frame {
        src_mac: PEER_NODE_MAC,
        dst_mac: UNDERLAY_MAC,
        saddr: REMOTE_POD,
        daddr: POD_A,
        ttl: 63,
    }
    .tcp(50002, 8080, TCP_SYN);

    let out = dp.test_run(Hook::Host, &syn).expect("run");

    assert_eq!(out.verdict, TcVerdict::Ok);
    assert_eq!(dp.metrics().expect("metrics").redirect_peer.packets, 0);
}

#[test]
fn host_falls_back_to_redirect_neigh_which_leaves_l2_to_the_kernel() {
    if !privileged("host_falls_back_to_redirect_neigh_which_leaves_l2_to_the_kernel") {
        return;
    }
    let (_pins, mut dp) = setup(DatapathOptions {
        redirect_peer: false,
        redirect_neigh: true,
    });
    dp.upsert_ipcache(Ipv4Net::new(REMOTE_POD, 32).expect("prefix"), 300)
        .expect("ipcache");
    let syn = Ipv4Frame {
        src_mac: PEER_NODE_MAC,
        dst_mac: UNDERLAY_MAC,
        saddr: REMOTE_POD,
        daddr: POD_B,
        ttl: 63,
    }
    .tcp(50001, 8080, TCP_SYN);

    let out = dp.test_run(Hook::Host, &syn).expect("run");

    assert_eq!(out.verdict, TcVerdict::Redirect);
    // The neighbour subsystem writes L2 on transmit; the program must not.
    assert_eq!(
        (dst_mac(&out.packet), src_mac(&out.packet)),
        (UNDERLAY_MAC, PEER_NODE_MAC)
    );
    assert_eq!(dp.metrics().expect("metrics").redirect_neigh.packets, 1);
}

#[test]
fn host_passes_non_local_and_malformed_packets_to_the_stack() {
    if !privileged("host_passes_non_local_and_malformed_packets_to_the_stack") {
        return;
    }
    let (_pins, dp) = setup(ALL_ON);
    let to_node = Ipv4Frame {
        src_mac: PEER_NODE_MAC,
        dst_mac: UNDERLAY_MAC,
        saddr: Ipv4Addr::new(10, 99, 0, 12),
        daddr: Ipv4Addr::new(10, 99, 0, 11),
        ttl: 64,
    }
    .tcp(50002, 22, TCP_SYN);
    let truncated = to_node[..40].to_vec();

    for frame in [&to_node, &truncated] {
        let out = dp.test_run(Hook::Host, frame).expect("run");
        assert_eq!(out.verdict, TcVerdict::Ok);
        assert_eq!(&out.packet, frame);
    }
    let m = dp.metrics().expect("metrics");
    assert_eq!(
        (m.host_rx.packets, m.passed.packets, m.dropped()),
        (2, 2, 0)
    );
    assert!(
        dp.conntrack().expect("ct").is_empty(),
        "bpf_host does not track (yet)"
    );
}

#[test]
fn endpoints_can_be_listed_replaced_and_removed() {
    if !privileged("endpoints_can_be_listed_replaced_and_removed") {
        return;
    }
    let (_pins, mut dp) = setup(ALL_ON);
    assert_eq!(
        dp.endpoints()
            .expect("list")
            .iter()
            .map(|(ip, _)| *ip)
            .collect::<Vec<_>>(),
        [POD_A, POD_B]
    );

    let moved = EndpointInfo {
        ifindex: 200,
        pod_mac: POD_A_MAC,
        node_mac: LXC_A_MAC,
        endpoint_id: 9,
        identity: 0,
        flags: 0,
    };
    dp.upsert_endpoint(POD_A, &moved).expect("replace");
    assert_eq!(dp.endpoints().expect("list")[0], (POD_A, moved));

    assert!(dp.remove_endpoint(POD_A).expect("remove"));
    assert!(
        !dp.remove_endpoint(POD_A).expect("remove again"),
        "already gone"
    );
    let syn = from_pod_a(POD_A).tcp(1, 2, TCP_SYN);
    assert_eq!(
        dp.test_run(Hook::Lxc, &syn).expect("run").verdict,
        TcVerdict::Ok,
        "no longer local"
    );
}

#[test]
fn maps_are_shared_by_both_programs_and_survive_a_reload() {
    if !privileged("maps_are_shared_by_both_programs_and_survive_a_reload") {
        return;
    }
    let (pins, dp) = setup(ALL_ON);
    let syn = from_pod_a(POD_B).tcp(40005, 80, TCP_SYN);
    dp.test_run(Hook::Lxc, &syn).expect("run");
    drop(dp);

    let reloaded = Datapath::load(pins.path(), &ALL_ON).expect("reload");
    assert_eq!(
        reloaded.endpoints().expect("list").len(),
        2,
        "endpoints kept"
    );
    assert_eq!(reloaded.conntrack().expect("ct").len(), 1, "ct kept");
    assert_eq!(
        reloaded.metrics().expect("metrics").redirect_peer.packets,
        1,
        "counters kept"
    );
    assert!(
        reloaded
            .map_pin_dir()
            .ends_with(format!("v{}", membrane_node_datapath::bpf::LAYOUT_VERSION))
    );
}

#[test]
fn the_kernel_refuses_to_test_run_a_frame_with_a_truncated_ipv4_header() {
    if !privileged("the_kernel_refuses_to_test_run_a_frame_with_a_truncated_ipv4_header") {
        return;
    }
    // Kernel 6.18's BPF_PROG_TEST_RUN returns EINVAL for an IPv4 ethertype
    // with fewer than 20 bytes after Ethernet, so the program's own
    // "header truncated" branch can only be exercised by real traffic.
    let (_pins, dp) = setup(ALL_ON);
    let good = from_pod_a(POD_B).tcp(40006, 80, TCP_SYN);
    for len in [14, 24, 33] {
        assert!(dp.test_run(Hook::Lxc, &good[..len]).is_err(), "len {len}");
    }
    assert!(dp.test_run(Hook::Lxc, &good[..34]).is_ok());
}

#[test]
fn events_wait_with_a_timeout_and_can_be_awaited_with_tokio() {
    if !privileged("events_wait_with_a_timeout_and_can_be_awaited_with_tokio") {
        return;
    }
    let (_pins, mut dp) = setup(ALL_ON);
    let mut events = dp.events().expect("events");
    assert!(matches!(
        dp.events(),
        Err(membrane_node_datapath::bpf::Error::EventsTaken)
    ));
    let quiet = events
        .next_timeout(std::time::Duration::from_millis(50))
        .expect("wait");
    assert_eq!(quiet, None, "nothing happened yet");

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut events = events.into_async().expect("async reader");
        dp.test_run(Hook::Lxc, &from_pod_a(POD_B).tcp(40007, 80, TCP_SYN))
            .expect("run");
        let ev = tokio::time::timeout(std::time::Duration::from_secs(5), events.next())
            .await
            .expect("an event within 5s")
            .expect("read event");
        assert_eq!(ev.kind, EventKind::NewConnection);
    });
}

// === L4 details in events: TCP flags, ICMP type and code ===

/// The verdict on `frame` and the events it made `hook` emit.
fn run_with_events(
    dp: &Datapath,
    events: &mut EventReader,
    hook: Hook,
    frame: &[u8],
) -> (TcVerdict, Vec<DatapathEvent>) {
    let verdict = dp.test_run(hook, frame).expect("run").verdict;
    (verdict, events.drain())
}

/// The verdict on `frame` and the one event it made `hook` emit.
fn one_event(
    dp: &Datapath,
    events: &mut EventReader,
    hook: Hook,
    frame: &[u8],
) -> (TcVerdict, DatapathEvent) {
    let (verdict, mut got) = run_with_events(dp, events, hook, frame);
    assert_eq!(got.len(), 1, "{got:?}");
    (verdict, got.remove(0))
}

#[test]
fn a_syns_trace_event_carries_the_syn_flag() {
    if !privileged("a_syns_trace_event_carries_the_syn_flag") {
        return;
    }
    let (_pins, mut dp) = setup(ALL_ON);
    let mut events = dp.events().expect("events");
    let syn = from_pod_a(POD_B).tcp(40010, 80, TCP_SYN);

    let (verdict, ev) = one_event(&dp, &mut events, Hook::Lxc, &syn);

    assert_eq!(verdict, TcVerdict::Redirect);
    assert_eq!(ev.kind, EventKind::NewConnection);
    assert_eq!(ev.flow, Some(flow(POD_A, POD_B, 40010, 80, 6)));
    assert_eq!((ev.tcp_flags, ev.icmp_type, ev.icmp_code), (TCP_SYN, 0, 0));
    assert_eq!(ev.reported_tcp_flags(), Some(TCP_SYN));
    assert_eq!(ev.reported_icmp(), None);
}

#[test]
fn an_icmp_echo_requests_trace_event_carries_type_8_code_0() {
    if !privileged("an_icmp_echo_requests_trace_event_carries_type_8_code_0") {
        return;
    }
    let (_pins, mut dp) = setup(ALL_ON);
    let mut events = dp.events().expect("events");
    let request = from_pod_a(REMOTE_POD).icmp_echo(0x4242);

    let (verdict, ev) = one_event(&dp, &mut events, Hook::Lxc, &request);

    assert_eq!(
        verdict,
        TcVerdict::Ok,
        "for another node: the stack routes it"
    );
    assert_eq!(ev.kind, EventKind::NewConnection);
    assert_eq!(ev.flow, Some(flow(POD_A, REMOTE_POD, 0x4242, 0x4242, 1)));
    assert_eq!((ev.tcp_flags, ev.icmp_type, ev.icmp_code), (0, 8, 0));
    assert_eq!(ev.reported_icmp(), Some((8, 0)));
    assert_eq!(ev.reported_tcp_flags(), None);
}

#[test]
fn drop_events_and_events_of_bpf_host_carry_the_l4_details_too() {
    if !privileged("drop_events_and_events_of_bpf_host_carry_the_l4_details_too") {
        return;
    }
    let (_pins, mut dp) = setup(ALL_ON);
    let mut events = dp.events().expect("events");

    // drop_packet (redirect.h): TTL would expire on the redirect hop. The
    // connection was tracked (and traced) before the redirect was attempted.
    let expiring = Ipv4Frame {
        ttl: 1,
        ..from_pod_a(POD_B)
    }
    .icmp_echo(7);
    let (verdict, evs) = run_with_events(&dp, &mut events, Hook::Lxc, &expiring);
    assert_eq!(verdict, TcVerdict::Shot);
    let kinds: Vec<_> = evs.iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        [
            EventKind::NewConnection,
            EventKind::Drop(DropReason::TtlExceeded)
        ]
    );
    for ev in &evs {
        assert_eq!((ev.icmp_type, ev.icmp_code), (8, 0), "{ev:?}");
        assert_eq!(ev.reported_icmp(), Some((8, 0)));
    }

    // ingress_admit (bpf_host): a SYN from a pod of another node.
    dp.upsert_ipcache(Ipv4Net::new(REMOTE_POD, 32).expect("prefix"), 300)
        .expect("ipcache");
    let syn = Ipv4Frame {
        src_mac: PEER_NODE_MAC,
        dst_mac: UNDERLAY_MAC,
        saddr: REMOTE_POD,
        daddr: POD_A,
        ttl: 63,
    }
    .tcp(50010, 8080, TCP_SYN);
    let (verdict, ev) = one_event(&dp, &mut events, Hook::Host, &syn);
    assert_eq!(verdict, TcVerdict::Redirect);
    assert_eq!(
        (ev.kind, ev.source),
        (EventKind::NewConnection, ObservationPoint::Host)
    );
    assert_eq!(ev.reported_tcp_flags(), Some(TCP_SYN));

    // Unparsed: nothing to report.
    let mut bad = from_pod_a(POD_B).tcp(40011, 80, TCP_SYN);
    bad[14] = 0x44;
    let (_, ev) = one_event(&dp, &mut events, Hook::Lxc, &bad);
    assert_eq!(ev.flow, None);
    assert_eq!((ev.tcp_flags, ev.icmp_type, ev.icmp_code), (0, 0, 0));
}

/// No local endpoints and no rule names: the flow's L4 is all these tests read.
struct NoEndpoints;

impl LocalEndpoints for NoEndpoints {
    fn endpoints(&self) -> Vec<LocalEndpoint> {
        Vec::new()
    }
    fn rule_name(&self, _rule_id: u32) -> Option<String> {
        None
    }
}

#[test]
fn flows_built_from_real_events_show_tcp_flags_and_icmp_type() {
    if !privileged("flows_built_from_real_events_show_tcp_flags_and_icmp_type") {
        return;
    }
    let (_pins, mut dp) = setup(ALL_ON);
    let mut events = dp.events().expect("events");
    let mut builder = FlowBuilder::new(
        "prog-test",
        WallClock::with_offset(0),
        Arc::new(NoEndpoints),
        ClusterView::default(),
    );

    let (_, syn_ev) = one_event(
        &dp,
        &mut events,
        Hook::Lxc,
        &from_pod_a(POD_B).tcp(40012, 80, TCP_SYN),
    );
    let f = builder.build(&syn_ev).flow;
    let Some(pb::layer4::Protocol::Tcp(tcp)) = f.l4.and_then(|l| l.protocol) else {
        panic!("a TCP flow");
    };
    assert_eq!((tcp.source_port, tcp.destination_port), (40012, 80));
    assert_eq!(
        tcp.flags,
        Some(pb::TcpFlags {
            syn: true,
            ..pb::TcpFlags::default()
        })
    );
    assert_eq!(f.summary, "TCP Flags: SYN");

    let (_, echo_ev) = one_event(
        &dp,
        &mut events,
        Hook::Lxc,
        &from_pod_a(POD_B).icmp_echo(0x99),
    );
    let f = builder.build(&echo_ev).flow;
    assert_eq!(
        f.l4.and_then(|l| l.protocol),
        Some(pb::layer4::Protocol::Icmpv4(pb::IcmPv4 {
            r#type: 8,
            code: 0
        }))
    );
    assert_eq!(f.summary, "ICMPv4 EchoRequest");
}
