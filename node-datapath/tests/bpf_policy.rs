// SPDX-License-Identifier: Apache-2.0
//! Network policy through BPF_PROG_TEST_RUN: identities (ipcache and the
//! endpoint map), the policy map's rule shapes, enforcement flags, and how
//! policy meets connection tracking. SETUP: a private pin dir, pods A and B
//! as local endpoints, a remote pod in the ipcache; RUN: crafted frames
//! through the program that would see them; CHECK: verdict, drop events
//! (reason, rule, identities, endpoint, direction), counters, ct.
//! Root only (loading programs needs CAP_BPF).

mod bpf_support;

use std::net::Ipv4Addr;

use bpf_support::*;
use membrane_node_datapath::bpf::{
    Datapath, DatapathEvent, DatapathOptions, Direction, DropReason, EndpointInfo, EventKind,
    EventReader, Hook, MacAddr, ObservationPoint, PolicyEntry, PolicyMode, PortMatch, TcVerdict,
    Verdict, identity,
};

const POD_A: Ipv4Addr = Ipv4Addr::new(10, 200, 1, 10);
const POD_B: Ipv4Addr = Ipv4Addr::new(10, 200, 1, 11);
const REMOTE_POD: Ipv4Addr = Ipv4Addr::new(10, 200, 2, 10);
const REMOTE_OTHER: Ipv4Addr = Ipv4Addr::new(10, 200, 2, 11);
const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 11);
const POD_A_MAC: MacAddr = MacAddr([0x02, 0, 0, 0, 0x0a, 0x02]);
const LXC_A_MAC: MacAddr = MacAddr([0x02, 0, 0, 0, 0x0a, 0x01]);
const POD_B_MAC: MacAddr = MacAddr([0x02, 0, 0, 0, 0x0b, 0x02]);
const LXC_B_MAC: MacAddr = MacAddr([0x02, 0, 0, 0, 0x0b, 0x01]);
const UNDERLAY_MAC: MacAddr = MacAddr([0x02, 0, 0, 0, 0xee, 0x01]);
const PEER_NODE_MAC: MacAddr = MacAddr([0x02, 0, 0, 0, 0xee, 0x02]);

const EP_A: u32 = 1;
const EP_B: u32 = 2;
const ID_A: u32 = 1000;
const ID_B: u32 = 2000;
/// The remote pod's /32 in the ipcache.
const ID_REMOTE: u32 = 3000;
/// The remote node's pod CIDR /24 around it.
const ID_REMOTE_CIDR: u32 = 4000;

const TCP: u8 = 6;
const UDP: u8 = 17;
const ICMP: u8 = 1;

const ALL_ON: DatapathOptions = DatapathOptions {
    redirect_peer: true,
    redirect_neigh: true,
};

struct Fixture {
    _pins: PinDir,
    dp: Datapath,
    events: EventReader,
}

/// Pods A (endpoint 1, identity 1000) and B (2, 2000); the remote pod CIDR
/// 10.200.2.0/24 as 4000 with 10.200.2.10/32 as 3000; the node as host.
fn setup() -> Fixture {
    setup_with(ALL_ON, PolicyMode::Enforced)
}

fn setup_with(opts: DatapathOptions, policy: PolicyMode) -> Fixture {
    let pins = PinDir::new();
    let mut dp = Datapath::load_with_policy(pins.path(), &opts, policy).expect("load datapath");
    for (ip, ifindex, pod_mac, node_mac, endpoint_id, identity) in [
        (POD_A, 101, POD_A_MAC, LXC_A_MAC, EP_A, ID_A),
        (POD_B, 102, POD_B_MAC, LXC_B_MAC, EP_B, ID_B),
    ] {
        let info = EndpointInfo {
            ifindex,
            pod_mac,
            node_mac,
            endpoint_id,
            identity,
            flags: 0,
        };
        dp.upsert_endpoint(ip, &info).expect("upsert endpoint");
    }
    for (prefix, id) in [
        ("10.200.2.0/24", ID_REMOTE_CIDR),
        ("10.200.2.10/32", ID_REMOTE),
        ("10.99.0.11/32", identity::HOST),
    ] {
        dp.upsert_ipcache(prefix.parse().expect("prefix"), id)
            .expect("upsert ipcache");
    }
    let events = dp.events().expect("events");
    Fixture {
        _pins: pins,
        dp,
        events,
    }
}

fn pod_frame(saddr: Ipv4Addr, daddr: Ipv4Addr) -> Ipv4Frame {
    let (src_mac, dst_mac) = if saddr == POD_B {
        (POD_B_MAC, LXC_B_MAC)
    } else {
        (POD_A_MAC, LXC_A_MAC)
    };
    Ipv4Frame {
        src_mac,
        dst_mac,
        saddr,
        daddr,
        ttl: 64,
    }
}

fn a_to_b() -> Ipv4Frame {
    pod_frame(POD_A, POD_B)
}

fn b_to_a() -> Ipv4Frame {
    pod_frame(POD_B, POD_A)
}

fn from_underlay(saddr: Ipv4Addr, daddr: Ipv4Addr) -> Ipv4Frame {
    Ipv4Frame {
        src_mac: PEER_NODE_MAC,
        dst_mac: UNDERLAY_MAC,
        saddr,
        daddr,
        ttl: 63,
    }
}

fn udp(frame: &Ipv4Frame, sport: u16, dport: u16) -> Vec<u8> {
    let mut l4 = vec![0u8; 8];
    l4[0..2].copy_from_slice(&sport.to_be_bytes());
    l4[2..4].copy_from_slice(&dport.to_be_bytes());
    l4[4..6].copy_from_slice(&8u16.to_be_bytes());
    frame.with_l4(UDP, &l4)
}

fn echo_reply(frame: &Ipv4Frame, id: u16) -> Vec<u8> {
    let mut f = frame.icmp_echo(id);
    f[34] = 0;
    f
}

fn rule(
    endpoint_id: u32,
    direction: Direction,
    peer: Option<u32>,
    proto: Option<u8>,
    ports: PortMatch,
    verdict: Verdict,
    rule_id: u32,
) -> PolicyEntry {
    PolicyEntry {
        endpoint_id,
        direction,
        proto,
        peer_identity: peer,
        ports,
        verdict,
        rule_id,
    }
}

impl Fixture {
    fn run(&self, hook: Hook, frame: &[u8]) -> TcVerdict {
        self.dp.test_run(hook, frame).expect("test run").verdict
    }

    fn policy(&mut self, endpoint_id: u32, entries: &[PolicyEntry]) {
        self.dp
            .replace_endpoint_policy(endpoint_id, entries)
            .expect("replace policy");
    }

    fn enforce(&mut self, ip: Ipv4Addr, ingress: bool, egress: bool) {
        self.dp
            .set_endpoint_enforcement(ip, ingress, egress)
            .expect("set enforcement");
    }

    /// The drop events since the last call (trace events are skipped).
    fn drops(&mut self) -> Vec<DatapathEvent> {
        self.events
            .drain()
            .into_iter()
            .filter(|e| matches!(e.kind, EventKind::Drop(_)))
            .collect()
    }

    /// Exactly one drop happened since the last call; returns it.
    fn one_drop(&mut self) -> DatapathEvent {
        let drops = self.drops();
        assert_eq!(drops.len(), 1, "{drops:#?}");
        drops[0]
    }

    fn new_conn_events(&mut self) -> Vec<DatapathEvent> {
        self.events
            .drain()
            .into_iter()
            .filter(|e| e.kind == EventKind::NewConnection)
            .collect()
    }
}

/// What a policy drop event should say.
#[track_caller]
fn assert_policy_drop(
    ev: &DatapathEvent,
    reason: DropReason,
    rule_id: u32,
    endpoint_id: u32,
    direction: Direction,
    (src_identity, dst_identity): (u32, u32),
) {
    assert_eq!(ev.kind, EventKind::Drop(reason), "{ev:#?}");
    assert_eq!(
        (ev.rule_id, ev.endpoint_id, ev.direction),
        (rule_id, endpoint_id, Some(direction)),
        "{ev:#?}"
    );
    assert_eq!(
        (ev.src_identity, ev.dst_identity),
        (src_identity, dst_identity),
        "{ev:#?}"
    );
}

#[test]
fn an_l3_allow_lets_an_enforced_egress_reach_that_peer_and_no_other() {
    if !privileged("an_l3_allow_lets_an_enforced_egress_reach_that_peer_and_no_other") {
        return;
    }
    let mut f = setup();
    f.enforce(POD_A, false, true);
    f.policy(
        EP_A,
        &[rule(
            EP_A,
            Direction::Egress,
            Some(ID_REMOTE),
            None,
            PortMatch::Any,
            Verdict::Allow,
            1,
        )],
    );

    let to_remote = pod_frame(POD_A, REMOTE_POD);
    assert_eq!(
        f.run(Hook::Lxc, &to_remote.tcp(40000, 443, TCP_SYN)),
        TcVerdict::Ok
    );
    assert_eq!(f.run(Hook::Lxc, &udp(&to_remote, 40000, 53)), TcVerdict::Ok);
    assert_eq!(f.run(Hook::Lxc, &to_remote.icmp_echo(7)), TcVerdict::Ok);
    assert!(f.drops().is_empty());

    let to_other = pod_frame(POD_A, REMOTE_OTHER).tcp(40001, 443, TCP_SYN);
    assert_eq!(f.run(Hook::Lxc, &to_other), TcVerdict::Shot);
    assert_policy_drop(
        &f.one_drop(),
        DropReason::PolicyDefaultDeny,
        0,
        EP_A,
        Direction::Egress,
        (ID_A, ID_REMOTE_CIDR),
    );
}

#[test]
fn an_l4_allow_matches_only_its_ports_and_protocol() {
    if !privileged("an_l4_allow_matches_only_its_ports_and_protocol") {
        return;
    }
    let mut f = setup();
    f.enforce(POD_B, true, false);
    let from_a = |proto, ports, id| {
        rule(
            EP_B,
            Direction::Ingress,
            Some(ID_A),
            proto,
            ports,
            Verdict::Allow,
            id,
        )
    };
    f.policy(
        EP_B,
        &[
            from_a(Some(TCP), PortMatch::Range(8000, 8100), 10),
            from_a(Some(UDP), PortMatch::Range(53, 53), 11),
            from_a(None, PortMatch::Range(9000, 9000), 12),
        ],
    );
    let a = a_to_b();

    let cases: [(&str, Vec<u8>, TcVerdict); 9] = [
        (
            "tcp 8000, range start",
            a.tcp(40000, 8000, TCP_SYN),
            TcVerdict::Redirect,
        ),
        (
            "tcp 8050, inside range",
            a.tcp(40001, 8050, TCP_SYN),
            TcVerdict::Redirect,
        ),
        (
            "tcp 8100, range end",
            a.tcp(40002, 8100, TCP_SYN),
            TcVerdict::Redirect,
        ),
        (
            "tcp 8101, past range",
            a.tcp(40003, 8101, TCP_SYN),
            TcVerdict::Shot,
        ),
        ("udp 53", udp(&a, 40004, 53), TcVerdict::Redirect),
        (
            "tcp 53, wrong protocol",
            a.tcp(40005, 53, TCP_SYN),
            TcVerdict::Shot,
        ),
        (
            "udp 9000, any protocol",
            udp(&a, 40006, 9000),
            TcVerdict::Redirect,
        ),
        (
            "tcp 9000, any protocol",
            a.tcp(40007, 9000, TCP_SYN),
            TcVerdict::Redirect,
        ),
        (
            "icmp, no port rule covers it",
            a.icmp_echo(9),
            TcVerdict::Shot,
        ),
    ];
    for (what, frame, want) in &cases {
        assert_eq!(f.run(Hook::Lxc, frame), *want, "{what}");
    }
    let drops = f.drops();
    assert_eq!(drops.len(), 3);
    for ev in &drops {
        assert_policy_drop(
            ev,
            DropReason::PolicyDefaultDeny,
            0,
            EP_B,
            Direction::Ingress,
            (ID_A, ID_B),
        );
    }
}

#[test]
fn an_l3_deny_beats_an_l3_l4_allow_of_the_same_peer() {
    if !privileged("an_l3_deny_beats_an_l3_l4_allow_of_the_same_peer") {
        return;
    }
    let mut f = setup();
    f.policy(
        EP_B,
        &[
            rule(
                EP_B,
                Direction::Ingress,
                Some(ID_A),
                Some(TCP),
                PortMatch::Range(80, 80),
                Verdict::Allow,
                1,
            ),
            rule(
                EP_B,
                Direction::Ingress,
                Some(ID_A),
                None,
                PortMatch::Any,
                Verdict::Deny,
                2,
            ),
        ],
    );

    assert_eq!(
        f.run(Hook::Lxc, &a_to_b().tcp(40000, 80, TCP_SYN)),
        TcVerdict::Shot
    );
    assert_policy_drop(
        &f.one_drop(),
        DropReason::PolicyDeny,
        2,
        EP_B,
        Direction::Ingress,
        (ID_A, ID_B),
    );
    assert!(
        f.dp.conntrack().expect("ct").is_empty(),
        "no state for a denied SYN"
    );
}

#[test]
fn a_port_deny_beats_an_l3_allow_only_on_that_port() {
    if !privileged("a_port_deny_beats_an_l3_allow_only_on_that_port") {
        return;
    }
    let mut f = setup();
    f.enforce(POD_B, true, false);
    f.policy(
        EP_B,
        &[
            rule(
                EP_B,
                Direction::Ingress,
                Some(ID_A),
                None,
                PortMatch::Any,
                Verdict::Allow,
                1,
            ),
            rule(
                EP_B,
                Direction::Ingress,
                Some(ID_A),
                Some(TCP),
                PortMatch::Range(22, 22),
                Verdict::Deny,
                3,
            ),
        ],
    );
    let a = a_to_b();

    assert_eq!(
        f.run(Hook::Lxc, &a.tcp(40000, 22, TCP_SYN)),
        TcVerdict::Shot
    );
    assert_policy_drop(
        &f.one_drop(),
        DropReason::PolicyDeny,
        3,
        EP_B,
        Direction::Ingress,
        (ID_A, ID_B),
    );
    assert_eq!(
        f.run(Hook::Lxc, &a.tcp(40001, 80, TCP_SYN)),
        TcVerdict::Redirect
    );
    assert_eq!(
        f.run(Hook::Lxc, &a.tcp(40002, 23, TCP_SYN)),
        TcVerdict::Redirect
    );
    assert_eq!(
        f.run(Hook::Lxc, &udp(&a, 40003, 22)),
        TcVerdict::Redirect,
        "udp 22 is not tcp 22"
    );
    assert!(f.drops().is_empty());
}

#[test]
fn wildcard_peer_rules_apply_to_every_identity_and_their_denies_still_win() {
    if !privileged("wildcard_peer_rules_apply_to_every_identity_and_their_denies_still_win") {
        return;
    }
    let mut f = setup();
    f.enforce(POD_B, true, false);
    f.policy(
        EP_B,
        &[
            rule(
                EP_B,
                Direction::Ingress,
                None,
                Some(TCP),
                PortMatch::Range(443, 443),
                Verdict::Allow,
                1,
            ),
            rule(
                EP_B,
                Direction::Ingress,
                Some(ID_A),
                None,
                PortMatch::Any,
                Verdict::Allow,
                2,
            ),
            rule(
                EP_B,
                Direction::Ingress,
                None,
                Some(TCP),
                PortMatch::Range(23, 23),
                Verdict::Deny,
                3,
            ),
        ],
    );
    let remote = from_underlay(REMOTE_POD, POD_B);

    assert_eq!(
        f.run(Hook::Lxc, &a_to_b().tcp(40000, 443, TCP_SYN)),
        TcVerdict::Redirect
    );
    assert_eq!(
        f.run(Hook::Host, &remote.tcp(50000, 443, TCP_SYN)),
        TcVerdict::Redirect
    );
    assert_eq!(
        f.run(Hook::Host, &remote.tcp(50001, 444, TCP_SYN)),
        TcVerdict::Shot
    );
    assert_policy_drop(
        &f.one_drop(),
        DropReason::PolicyDefaultDeny,
        0,
        EP_B,
        Direction::Ingress,
        (ID_REMOTE, ID_B),
    );
    // A's identity allows any port, but the any-peer deny on 23 wins.
    assert_eq!(
        f.run(Hook::Lxc, &a_to_b().tcp(40001, 23, TCP_SYN)),
        TcVerdict::Shot
    );
    assert_policy_drop(
        &f.one_drop(),
        DropReason::PolicyDeny,
        3,
        EP_B,
        Direction::Ingress,
        (ID_A, ID_B),
    );
}

#[test]
fn default_deny_applies_only_while_a_direction_is_enforced() {
    if !privileged("default_deny_applies_only_while_a_direction_is_enforced") {
        return;
    }
    let mut f = setup();
    let a = a_to_b();

    assert_eq!(
        f.run(Hook::Lxc, &a.tcp(40000, 80, TCP_SYN)),
        TcVerdict::Redirect,
        "no rules, not enforced"
    );
    f.enforce(POD_B, true, false);
    assert_eq!(
        f.run(Hook::Lxc, &a.tcp(40001, 80, TCP_SYN)),
        TcVerdict::Shot,
        "B ingress enforced"
    );
    assert_eq!(
        f.one_drop().kind,
        EventKind::Drop(DropReason::PolicyDefaultDeny)
    );
    // B's ingress is not A's egress: B may still send to A.
    assert_eq!(
        f.run(Hook::Lxc, &b_to_a().tcp(40002, 80, TCP_SYN)),
        TcVerdict::Redirect
    );
    f.enforce(POD_B, false, false);
    assert_eq!(
        f.run(Hook::Lxc, &a.tcp(40003, 80, TCP_SYN)),
        TcVerdict::Redirect,
        "lifted"
    );

    let info = f.dp.endpoints().expect("endpoints");
    assert_eq!(info[1].1.flags, 0);
    f.enforce(POD_B, true, true);
    assert_eq!(
        f.dp.endpoints().expect("endpoints")[1].1.flags,
        EndpointInfo::INGRESS_ENFORCED | EndpointInfo::EGRESS_ENFORCED
    );
    assert!(
        f.dp.set_endpoint_enforcement(Ipv4Addr::new(10, 1, 1, 1), true, true)
            .is_err()
    );
}

#[test]
fn egress_rules_do_not_open_ingress_and_ingress_rules_do_not_open_egress() {
    if !privileged("egress_rules_do_not_open_ingress_and_ingress_rules_do_not_open_egress") {
        return;
    }
    let mut f = setup();
    f.enforce(POD_B, true, true);
    f.policy(
        EP_B,
        &[
            // B may send to A, and may receive from the remote pod.
            rule(
                EP_B,
                Direction::Egress,
                Some(ID_A),
                None,
                PortMatch::Any,
                Verdict::Allow,
                1,
            ),
            rule(
                EP_B,
                Direction::Ingress,
                Some(ID_REMOTE),
                None,
                PortMatch::Any,
                Verdict::Allow,
                2,
            ),
        ],
    );

    assert_eq!(
        f.run(Hook::Lxc, &b_to_a().tcp(40000, 80, TCP_SYN)),
        TcVerdict::Redirect
    );
    assert_eq!(
        f.run(Hook::Lxc, &a_to_b().tcp(40001, 80, TCP_SYN)),
        TcVerdict::Shot
    );
    assert_policy_drop(
        &f.one_drop(),
        DropReason::PolicyDefaultDeny,
        0,
        EP_B,
        Direction::Ingress,
        (ID_A, ID_B),
    );
    assert_eq!(
        f.run(
            Hook::Host,
            &from_underlay(REMOTE_POD, POD_B).tcp(50000, 80, TCP_SYN)
        ),
        TcVerdict::Redirect
    );
    assert_eq!(
        f.run(
            Hook::Lxc,
            &pod_frame(POD_B, REMOTE_POD).tcp(40002, 80, TCP_SYN)
        ),
        TcVerdict::Shot
    );
    assert_policy_drop(
        &f.one_drop(),
        DropReason::PolicyDefaultDeny,
        0,
        EP_B,
        Direction::Egress,
        (ID_B, ID_REMOTE),
    );
}

#[test]
fn the_ipcache_resolves_the_longest_prefix_and_a_miss_is_world() {
    if !privileged("the_ipcache_resolves_the_longest_prefix_and_a_miss_is_world") {
        return;
    }
    let mut f = setup();
    let world = Ipv4Addr::new(8, 8, 8, 8);
    let dst_identity = |f: &mut Fixture, daddr: Ipv4Addr, port: u16| {
        let frame = pod_frame(POD_A, daddr).tcp(port, 443, TCP_SYN);
        assert_eq!(f.run(Hook::Lxc, &frame), TcVerdict::Ok);
        let evs = f.new_conn_events();
        assert_eq!(evs.len(), 1, "{evs:#?}");
        assert_eq!((evs[0].src_identity, evs[0].endpoint_id), (ID_A, EP_A));
        evs[0].dst_identity
    };

    assert_eq!(
        dst_identity(&mut f, REMOTE_POD, 1),
        ID_REMOTE,
        "the /32 inside the /24"
    );
    assert_eq!(
        dst_identity(&mut f, REMOTE_OTHER, 2),
        ID_REMOTE_CIDR,
        "the /24"
    );
    assert_eq!(dst_identity(&mut f, world, 3), identity::WORLD, "no prefix");
    assert_eq!(dst_identity(&mut f, NODE_IP, 4), identity::HOST);

    let listed = f.dp.ipcache().expect("ipcache");
    assert_eq!(
        listed,
        [
            ("10.99.0.11/32".parse().expect("net"), identity::HOST),
            ("10.200.2.0/24".parse().expect("net"), ID_REMOTE_CIDR),
            ("10.200.2.10/32".parse().expect("net"), ID_REMOTE),
        ]
    );
    assert!(
        f.dp.remove_ipcache("10.200.2.10/32".parse().expect("net"))
            .expect("remove")
    );
    assert!(
        !f.dp
            .remove_ipcache("10.200.2.10/32".parse().expect("net"))
            .expect("remove again")
    );
    assert_eq!(
        dst_identity(&mut f, REMOTE_POD, 5),
        ID_REMOTE_CIDR,
        "falls back to the /24"
    );
    // A host-bits-set prefix is stored as its network.
    f.dp.upsert_ipcache("10.200.2.77/24".parse().expect("net"), 4001)
        .expect("upsert");
    assert_eq!(dst_identity(&mut f, REMOTE_POD, 6), 4001);
}

#[test]
fn a_local_pods_identity_comes_from_its_endpoint_entry_before_the_ipcache() {
    if !privileged("a_local_pods_identity_comes_from_its_endpoint_entry_before_the_ipcache") {
        return;
    }
    let mut f = setup();
    f.dp.upsert_ipcache("10.200.1.0/24".parse().expect("net"), 5000)
        .expect("upsert");
    assert_eq!(
        f.run(Hook::Lxc, &a_to_b().tcp(40000, 80, TCP_SYN)),
        TcVerdict::Redirect
    );
    let evs = f.new_conn_events();
    assert_eq!((evs[0].src_identity, evs[0].dst_identity), (ID_A, ID_B));
}

#[test]
fn replies_of_an_allowed_connection_pass_while_a_new_one_the_other_way_is_denied() {
    if !privileged("replies_of_an_allowed_connection_pass_while_a_new_one_the_other_way_is_denied")
    {
        return;
    }
    let mut f = setup();
    f.enforce(POD_A, true, true);
    f.enforce(POD_B, true, true);
    f.policy(
        EP_A,
        &[rule(
            EP_A,
            Direction::Egress,
            Some(ID_B),
            Some(TCP),
            PortMatch::Range(80, 80),
            Verdict::Allow,
            1,
        )],
    );
    f.policy(
        EP_B,
        &[rule(
            EP_B,
            Direction::Ingress,
            Some(ID_A),
            Some(TCP),
            PortMatch::Range(80, 80),
            Verdict::Allow,
            2,
        )],
    );

    for (what, frame) in [
        ("SYN", a_to_b().tcp(40000, 80, TCP_SYN)),
        (
            "SYN-ACK, a reply",
            b_to_a().tcp(80, 40000, TCP_SYN | TCP_ACK),
        ),
        ("ACK", a_to_b().tcp(40000, 80, TCP_ACK)),
        ("data from B, a reply", b_to_a().tcp(80, 40000, TCP_ACK)),
    ] {
        assert_eq!(f.run(Hook::Lxc, &frame), TcVerdict::Redirect, "{what}");
    }
    assert!(f.drops().is_empty());

    assert_eq!(
        f.run(Hook::Lxc, &b_to_a().tcp(40001, 80, TCP_SYN)),
        TcVerdict::Shot,
        "B opens to A"
    );
    assert_policy_drop(
        &f.one_drop(),
        DropReason::PolicyDefaultDeny,
        0,
        EP_B,
        Direction::Egress,
        (ID_B, ID_A),
    );
    let ct = f.dp.conntrack().expect("ct");
    assert_eq!(ct.len(), 1, "{ct:#?}");
    assert_eq!((ct[0].1.packets_fwd, ct[0].1.packets_rev), (2, 2));
}

#[test]
fn a_denied_syn_leaves_no_state_that_would_let_the_peer_in_as_a_reply() {
    if !privileged("a_denied_syn_leaves_no_state_that_would_let_the_peer_in_as_a_reply") {
        return;
    }
    let mut f = setup();
    f.enforce(POD_A, true, false);
    f.enforce(POD_B, true, true);

    // A -> B is denied by B's ingress, after A's egress allowed it.
    assert_eq!(
        f.run(Hook::Lxc, &a_to_b().tcp(40000, 80, TCP_SYN)),
        TcVerdict::Shot
    );
    assert!(f.dp.conntrack().expect("ct").is_empty());
    // So B's "reply" is a new connection B -> A, which B's egress denies.
    assert_eq!(
        f.run(Hook::Lxc, &b_to_a().tcp(80, 40000, TCP_SYN | TCP_ACK)),
        TcVerdict::Shot
    );
    let drops = f.drops();
    assert_eq!(drops.len(), 2);
    assert_eq!(
        (drops[1].endpoint_id, drops[1].direction),
        (EP_B, Some(Direction::Egress))
    );

    // Likewise from the underlay: nothing B was denied creates state.
    assert_eq!(
        f.run(
            Hook::Host,
            &from_underlay(REMOTE_POD, POD_B).tcp(50000, 80, TCP_SYN)
        ),
        TcVerdict::Shot
    );
    assert!(f.dp.conntrack().expect("ct").is_empty());
}

#[test]
fn a_new_deny_cuts_an_established_connection_at_its_next_packet() {
    if !privileged("a_new_deny_cuts_an_established_connection_at_its_next_packet") {
        return;
    }
    let mut f = setup();
    for frame in [
        a_to_b().tcp(40000, 80, TCP_SYN),
        b_to_a().tcp(80, 40000, TCP_SYN | TCP_ACK),
        a_to_b().tcp(40000, 80, TCP_ACK),
    ] {
        assert_eq!(f.run(Hook::Lxc, &frame), TcVerdict::Redirect);
    }

    f.policy(
        EP_B,
        &[rule(
            EP_B,
            Direction::Ingress,
            Some(ID_A),
            Some(TCP),
            PortMatch::Range(80, 80),
            Verdict::Deny,
            7,
        )],
    );

    assert_eq!(
        f.run(Hook::Lxc, &a_to_b().tcp(40000, 80, TCP_ACK)),
        TcVerdict::Shot
    );
    assert_policy_drop(
        &f.one_drop(),
        DropReason::PolicyDeny,
        7,
        EP_B,
        Direction::Ingress,
        (ID_A, ID_B),
    );
    // Policy judges the original direction only: B's packets are replies.
    assert_eq!(
        f.run(Hook::Lxc, &b_to_a().tcp(80, 40000, TCP_ACK)),
        TcVerdict::Redirect
    );
    let ct = f.dp.conntrack().expect("ct");
    assert_eq!(
        ct[0].1.packets_fwd, 2,
        "the dropped packet is not counted in ct: {ct:#?}"
    );
}

#[test]
fn icmp_echo_requests_are_judged_and_their_replies_pass_as_replies() {
    if !privileged("icmp_echo_requests_are_judged_and_their_replies_pass_as_replies") {
        return;
    }
    let mut f = setup();
    f.enforce(POD_A, false, true);
    f.enforce(POD_B, false, true);
    f.policy(
        EP_A,
        &[rule(
            EP_A,
            Direction::Egress,
            Some(ID_B),
            Some(ICMP),
            PortMatch::Any,
            Verdict::Allow,
            1,
        )],
    );

    assert_eq!(
        f.run(Hook::Lxc, &a_to_b().icmp_echo(0x42)),
        TcVerdict::Redirect,
        "request"
    );
    assert_eq!(
        f.run(Hook::Lxc, &echo_reply(&b_to_a(), 0x42)),
        TcVerdict::Redirect,
        "reply"
    );
    assert_eq!(
        f.run(Hook::Lxc, &b_to_a().icmp_echo(0x43)),
        TcVerdict::Shot,
        "B pings A"
    );
    assert_policy_drop(
        &f.one_drop(),
        DropReason::PolicyDefaultDeny,
        0,
        EP_B,
        Direction::Egress,
        (ID_B, ID_A),
    );
}

#[test]
fn host_judges_ingress_from_the_underlay_with_the_ipcache_identity() {
    if !privileged("host_judges_ingress_from_the_underlay_with_the_ipcache_identity") {
        return;
    }
    let mut f = setup();
    f.enforce(POD_A, true, true);
    let remote = from_underlay(REMOTE_POD, POD_A);

    assert_eq!(
        f.run(Hook::Host, &remote.tcp(50000, 8080, TCP_SYN)),
        TcVerdict::Shot
    );
    let ev = f.one_drop();
    assert_eq!(ev.source, ObservationPoint::Host);
    assert_policy_drop(
        &ev,
        DropReason::PolicyDefaultDeny,
        0,
        EP_A,
        Direction::Ingress,
        (ID_REMOTE, ID_A),
    );

    f.policy(
        EP_A,
        &[rule(
            EP_A,
            Direction::Ingress,
            Some(ID_REMOTE),
            Some(TCP),
            PortMatch::Range(8080, 8080),
            Verdict::Allow,
            4,
        )],
    );
    assert_eq!(
        f.run(Hook::Host, &remote.tcp(50001, 8080, TCP_SYN)),
        TcVerdict::Redirect
    );
    // A's reply leaves through bpf_lxc: egress is enforced with no rule, but it is a reply.
    let reply = pod_frame(POD_A, REMOTE_POD).tcp(8080, 50001, TCP_SYN | TCP_ACK);
    assert_eq!(f.run(Hook::Lxc, &reply), TcVerdict::Ok);
    assert!(f.drops().is_empty());
    let ct = f.dp.conntrack().expect("ct");
    assert_eq!(ct.len(), 1);
    assert_eq!(
        ct[0].0.direction,
        membrane_node_datapath::bpf::CtDirection::Ingress
    );
    assert!(ct[0].1.seen_reply);
}

#[test]
fn to_container_judges_what_the_node_delivers_with_the_host_identity() {
    if !privileged("to_container_judges_what_the_node_delivers_with_the_host_identity") {
        return;
    }
    let mut f = setup();
    f.enforce(POD_B, true, false);
    let from_node = Ipv4Frame {
        src_mac: LXC_B_MAC,
        dst_mac: POD_B_MAC,
        saddr: NODE_IP,
        daddr: POD_B,
        ttl: 64,
    };

    assert_eq!(
        f.run(Hook::LxcEgress, &from_node.tcp(33000, 80, TCP_SYN)),
        TcVerdict::Shot
    );
    let ev = f.one_drop();
    assert_eq!(ev.source, ObservationPoint::ToContainer);
    assert_policy_drop(
        &ev,
        DropReason::PolicyDefaultDeny,
        0,
        EP_B,
        Direction::Ingress,
        (identity::HOST, ID_B),
    );

    f.policy(
        EP_B,
        &[rule(
            EP_B,
            Direction::Ingress,
            Some(identity::HOST),
            None,
            PortMatch::Any,
            Verdict::Allow,
            5,
        )],
    );
    let out =
        f.dp.test_run(Hook::LxcEgress, &from_node.tcp(33001, 80, TCP_SYN))
            .expect("run");
    assert_eq!(out.verdict, TcVerdict::Ok);
    assert_eq!(
        out.packet,
        from_node.tcp(33001, 80, TCP_SYN),
        "delivered untouched"
    );
    // B's reply to the node leaves through bpf_lxc and is recognised as one.
    let reply = pod_frame(POD_B, NODE_IP).tcp(80, 33001, TCP_SYN | TCP_ACK);
    f.enforce(POD_B, true, true);
    assert_eq!(f.run(Hook::Lxc, &reply), TcVerdict::Ok);
    assert!(f.drops().is_empty());
    let m = f.dp.metrics().expect("metrics");
    assert_eq!(m.to_container.packets, 2);
    assert_eq!(m.ct_reply.packets, 1);
}

#[test]
fn with_redirect_peer_off_lxc_leaves_the_receivers_ingress_to_to_container() {
    if !privileged("with_redirect_peer_off_lxc_leaves_the_receivers_ingress_to_to_container") {
        return;
    }
    let mut f = setup_with(
        DatapathOptions {
            redirect_peer: false,
            redirect_neigh: true,
        },
        PolicyMode::Enforced,
    );
    f.enforce(POD_B, true, false);
    let syn = a_to_b().tcp(40000, 80, TCP_SYN);

    assert_eq!(
        f.run(Hook::Lxc, &syn),
        TcVerdict::Ok,
        "to the stack, which forwards it"
    );
    assert!(f.drops().is_empty());
    assert_eq!(
        f.run(Hook::LxcEgress, &syn),
        TcVerdict::Shot,
        "judged where it is delivered"
    );
    assert_policy_drop(
        &f.one_drop(),
        DropReason::PolicyDefaultDeny,
        0,
        EP_B,
        Direction::Ingress,
        (ID_A, ID_B),
    );
}

#[test]
fn with_policy_compiled_out_nothing_is_judged() {
    if !privileged("with_policy_compiled_out_nothing_is_judged") {
        return;
    }
    let mut f = setup_with(ALL_ON, PolicyMode::CompiledOut);
    f.enforce(POD_A, true, true);
    f.enforce(POD_B, true, true);
    f.policy(
        EP_B,
        &[rule(
            EP_B,
            Direction::Ingress,
            None,
            None,
            PortMatch::Any,
            Verdict::Deny,
            1,
        )],
    );

    assert_eq!(
        f.run(Hook::Lxc, &a_to_b().tcp(40000, 80, TCP_SYN)),
        TcVerdict::Redirect
    );
    assert_eq!(
        f.run(
            Hook::Host,
            &from_underlay(REMOTE_POD, POD_B).tcp(50000, 80, TCP_SYN)
        ),
        TcVerdict::Redirect
    );
    assert!(f.drops().is_empty());
}

#[test]
fn policy_drops_are_counted_per_endpoint_reason_and_direction() {
    if !privileged("policy_drops_are_counted_per_endpoint_reason_and_direction") {
        return;
    }
    let mut f = setup();
    f.enforce(POD_B, true, false);
    f.enforce(POD_A, false, true);
    f.policy(
        EP_A,
        &[
            rule(
                EP_A,
                Direction::Egress,
                Some(ID_B),
                None,
                PortMatch::Any,
                Verdict::Allow,
                1,
            ),
            rule(
                EP_A,
                Direction::Egress,
                Some(ID_REMOTE),
                None,
                PortMatch::Any,
                Verdict::Deny,
                2,
            ),
        ],
    );

    for port in [1, 2, 3] {
        assert_eq!(
            f.run(Hook::Lxc, &a_to_b().tcp(40000, port, TCP_SYN)),
            TcVerdict::Shot
        );
    }
    assert_eq!(
        f.run(
            Hook::Lxc,
            &pod_frame(POD_A, REMOTE_POD).tcp(40000, 80, TCP_SYN)
        ),
        TcVerdict::Shot
    );

    let drops = f.dp.endpoint_drops().expect("drops");
    assert_eq!(
        drops.into_iter().collect::<Vec<_>>(),
        [
            ((EP_A, DropReason::PolicyDeny, Direction::Egress), 1),
            ((EP_B, DropReason::PolicyDefaultDeny, Direction::Ingress), 3),
        ]
    );
    let m = f.dp.metrics().expect("metrics");
    assert_eq!(
        m.drops
            .get(&DropReason::PolicyDefaultDeny)
            .map(|c| c.packets),
        Some(3)
    );
    assert_eq!(
        m.drops.get(&DropReason::PolicyDeny).map(|c| c.packets),
        Some(1)
    );
}

#[test]
fn replacing_a_policy_removes_stale_entries_and_leaves_other_endpoints_alone() {
    if !privileged("replacing_a_policy_removes_stale_entries_and_leaves_other_endpoints_alone") {
        return;
    }
    let mut f = setup();
    let a_rules = [rule(
        EP_A,
        Direction::Egress,
        Some(ID_B),
        Some(TCP),
        PortMatch::Range(80, 80),
        Verdict::Allow,
        1,
    )];
    f.policy(EP_A, &a_rules);
    f.policy(
        EP_B,
        &[
            rule(
                EP_B,
                Direction::Ingress,
                Some(ID_A),
                Some(TCP),
                PortMatch::Range(80, 90),
                Verdict::Allow,
                2,
            ),
            rule(
                EP_B,
                Direction::Ingress,
                None,
                None,
                PortMatch::Any,
                Verdict::Deny,
                3,
            ),
        ],
    );
    assert_eq!(
        f.dp.policy_entries(EP_B).expect("entries").len(),
        4,
        "80-87, 88-89, 90 and any"
    );

    let b_rules = [rule(
        EP_B,
        Direction::Egress,
        None,
        Some(UDP),
        PortMatch::Range(53, 53),
        Verdict::Allow,
        4,
    )];
    f.policy(EP_B, &b_rules);
    assert_eq!(f.dp.policy_entries(EP_B).expect("entries"), b_rules);
    assert_eq!(f.dp.policy_entries(EP_A).expect("entries"), a_rules);

    let bad = [rule(
        EP_B,
        Direction::Egress,
        None,
        Some(ICMP),
        PortMatch::Range(1, 2),
        Verdict::Allow,
        5,
    )];
    let err =
        f.dp.replace_endpoint_policy(EP_B, &bad)
            .expect_err("icmp has no ports");
    assert!(
        matches!(
            err,
            membrane_node_datapath::bpf::Error::Policy {
                endpoint_id: EP_B,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(
        f.dp.policy_entries(EP_B).expect("entries"),
        b_rules,
        "a rejected policy changes nothing"
    );

    f.policy(EP_B, &[]);
    assert!(f.dp.policy_entries(EP_B).expect("entries").is_empty());
}

/// `n` single-port TCP allows from B for endpoint A, one rule each (as a
/// policy with `n` rules resolves), starting at `first_port`.
fn port_allows(n: u16, first_port: u16) -> Vec<PolicyEntry> {
    (0..n)
        .map(|i| {
            rule(
                EP_A,
                Direction::Ingress,
                Some(ID_B),
                Some(TCP),
                PortMatch::Range(first_port + i, first_port + i),
                Verdict::Allow,
                u32::from(i) + 1,
            )
        })
        .collect()
}

#[test]
fn an_unchanged_policy_is_not_written_again_and_a_changed_one_writes_only_its_difference() {
    if !privileged(
        "an_unchanged_policy_is_not_written_again_and_a_changed_one_writes_only_its_difference",
    ) {
        return;
    }
    let mut f = setup();
    let rules = port_allows(100, 10_000);
    let first = f.dp.replace_endpoint_policy(EP_A, &rules).expect("replace");
    assert_eq!((first.written, first.deleted), (100, 0));
    let again = f.dp.replace_endpoint_policy(EP_A, &rules).expect("replace");
    assert_eq!((again.written, again.deleted), (0, 0));

    // Rule 1 moves from port 10000 to 20000; the other 99 stay.
    let mut moved = rules.clone();
    moved[0].ports = PortMatch::Range(20_000, 20_000);
    let update = f.dp.replace_endpoint_policy(EP_A, &moved).expect("replace");
    assert_eq!((update.written, update.deleted), (1, 1));
    let mut in_kernel = f.dp.policy_entries(EP_A).expect("entries");
    in_kernel.sort();
    moved.sort();
    assert_eq!(in_kernel, moved, "the kernel holds exactly the new policy");
}

#[test]
fn a_new_datapath_on_the_same_pins_reads_what_the_previous_one_left_and_cleans_it() {
    if !privileged("a_new_datapath_on_the_same_pins_reads_what_the_previous_one_left_and_cleans_it")
    {
        return;
    }
    let f = setup();
    let Fixture {
        _pins: pins, dp, ..
    } = f;
    let mut previous = dp;
    previous
        .replace_endpoint_policy(EP_A, &port_allows(10, 10_000))
        .expect("replace");
    drop(previous);

    let mut next =
        Datapath::load_with_policy(pins.path(), &ALL_ON, PolicyMode::Enforced).expect("reload");
    // The same first 5 rules: only the 5 others are stale.
    let update = next
        .replace_endpoint_policy(EP_A, &port_allows(5, 10_000))
        .expect("replace");
    assert_eq!((update.written, update.deleted), (0, 5));
    assert_eq!(next.policy_entries(EP_A).expect("entries").len(), 5);
}

#[test]
fn a_packet_host_delivered_with_redirect_neigh_is_not_judged_again_by_to_container() {
    if !privileged(
        "a_packet_host_delivered_with_redirect_neigh_is_not_judged_again_by_to_container",
    ) {
        return;
    }
    // redirect_neigh transmits out of the pod's veth, through its tc egress.
    let mut f = setup_with(
        DatapathOptions {
            redirect_peer: false,
            redirect_neigh: true,
        },
        PolicyMode::Enforced,
    );
    f.enforce(POD_B, true, false);
    f.policy(
        EP_B,
        &[rule(
            EP_B,
            Direction::Ingress,
            Some(ID_REMOTE),
            None,
            PortMatch::Any,
            Verdict::Allow,
            1,
        )],
    );
    let syn = from_underlay(REMOTE_POD, POD_B).tcp(50000, 80, TCP_SYN);

    let host = f.dp.test_run(Hook::Host, &syn).expect("run");
    assert_eq!(host.verdict, TcVerdict::Redirect);
    assert_ne!(host.mark, 0, "bpf_host marks what it judged");

    // Its rule is gone by the time the packet reaches to_container: were it
    // judged again, it would be dropped.
    f.policy(EP_B, &[]);
    let out =
        f.dp.test_run_with_mark(Hook::LxcEgress, &host.packet, host.mark)
            .expect("run");
    assert_eq!(out.verdict, TcVerdict::Ok);
    assert_eq!(
        out.mark, 0,
        "the mark is cleared before the pod sees the packet"
    );
    assert!(f.drops().is_empty());
    let unmarked =
        f.dp.test_run(
            Hook::LxcEgress,
            &from_underlay(REMOTE_POD, POD_B).tcp(50001, 80, TCP_SYN),
        )
        .expect("run");
    assert_eq!(
        unmarked.verdict,
        TcVerdict::Shot,
        "an unmarked packet is judged"
    );
}
