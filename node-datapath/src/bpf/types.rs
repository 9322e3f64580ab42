// SPDX-License-Identifier: Apache-2.0
//! The plain Rust types the datapath API speaks: host byte order, std
//! addresses, enums instead of codes. Conversions from/to the wire types of
//! `abi.rs` live here too.

use std::{collections::BTreeMap, fmt, net::Ipv4Addr, str::FromStr};

use super::abi::{self, CtEntryRaw, CtKeyRaw, EndpointInfoRaw, MetricValueRaw, TraceEventRaw};

/// An Ethernet address.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MacAddr(pub [u8; 6]);

/// What the datapath needs to deliver packets to one local pod.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointInfo {
    /// The node-side veth (`lxc*`) in the node's network namespace.
    pub ifindex: u32,
    /// MAC of `eth0` inside the pod (destination of delivered frames).
    pub pod_mac: MacAddr,
    /// MAC of the node-side veth (source of delivered frames: the pod's gateway).
    pub node_mac: MacAddr,
    /// Agent-assigned endpoint id.
    pub endpoint_id: u32,
    /// Security identity of the pod; 0 (unassigned): the datapath asks the ipcache.
    pub identity: u32,
    /// [`EndpointInfo::INGRESS_ENFORCED`] | [`EndpointInfo::EGRESS_ENFORCED`].
    pub flags: u32,
}

/// A policy direction, from the endpoint's point of view.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    /// Packets entering the endpoint (the peer is the source).
    Ingress,
    /// Packets leaving the endpoint (the peer is the destination).
    Egress,
}

/// Direction (hook) in which a tracked connection was first seen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CtDirection {
    /// Leaving a pod (`bpf_lxc`).
    Egress,
    /// Entering a pod (`bpf_host`, `to_container`).
    Ingress,
}

/// An IPv4 5-tuple with the direction of the hook that saw it. For ICMP echo
/// both ports hold the echo id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Flow {
    pub saddr: Ipv4Addr,
    pub daddr: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    /// IP protocol number (6 TCP, 17 UDP, 1 ICMP).
    pub proto: u8,
    pub direction: CtDirection,
}

/// Connection tracking state of one flow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtEntry {
    /// `CLOCK_MONOTONIC` nanoseconds.
    pub created_ns: u64,
    pub last_seen_ns: u64,
    pub packets_fwd: u64,
    pub bytes_fwd: u64,
    pub packets_rev: u64,
    pub bytes_rev: u64,
    /// Union of TCP flags seen in each direction.
    pub tcp_flags_fwd: u8,
    pub tcp_flags_rev: u8,
    /// A reply has been seen.
    pub seen_reply: bool,
}

/// A packet and byte count.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

/// Why the datapath dropped a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DropReason {
    /// Truncated or malformed IPv4 sent by a pod.
    Invalid,
    /// No connection tracking entry could be created.
    CtFull,
    /// TTL would expire on the routed hop.
    TtlExceeded,
    /// A packet-rewrite helper failed.
    RewriteFailed,
    /// A policy deny entry matched.
    PolicyDeny,
    /// The direction is enforced (default deny) and no entry allowed the packet.
    PolicyDefaultDeny,
    /// No free SNAT source port towards a remote service backend.
    NatNoPort,
    /// A pod sent from an address that is not its own (anti-spoofing).
    InvalidSource,
    /// A code this build does not know (a newer datapath).
    Other(u16),
}

/// Counters summed over all CPUs since the maps were created (they are
/// pinned, so they survive agent restarts).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Metrics {
    /// Packets seen leaving pods.
    pub lxc_rx: Counter,
    /// Packets seen on the underlay ingress.
    pub host_rx: Counter,
    /// Handed to the node's stack.
    pub passed: Counter,
    pub redirect_peer: Counter,
    pub redirect_neigh: Counter,
    pub ct_new: Counter,
    pub ct_established: Counter,
    pub ct_reply: Counter,
    /// Packets the node's stack delivered to pods (seen by `to_container`).
    pub to_container: Counter,
    /// ARP replies bpf_host sent for announced service addresses.
    pub arp_replies: Counter,
    /// Packets bpf_xdp saw on the underlay.
    pub xdp_rx: Counter,
    /// NodePort/LoadBalancer requests bpf_xdp translated and sent back out
    /// (`XDP_TX`) towards a backend on another node; tc never saw them.
    pub xdp_tx: Counter,
    /// Only reasons with a non-zero count.
    pub drops: BTreeMap<DropReason, Counter>,
}

impl Metrics {
    /// Every packet delivered straight to a pod, whichever helper did it.
    pub fn redirected(&self) -> u64 {
        self.redirect_peer.packets + self.redirect_neigh.packets
    }

    /// Packets dropped for any reason.
    pub fn dropped(&self) -> u64 {
        self.drops.values().map(|c| c.packets).sum()
    }
}

/// Where in the datapath an event was observed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ObservationPoint {
    /// `bpf_lxc`: leaving a pod.
    Lxc,
    /// `bpf_host`: arriving on the underlay.
    Host,
    /// `to_container`: the node's stack delivering to a pod.
    ToContainer,
    Other(u8),
}

/// What happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// The first packet of a new connection.
    NewConnection,
    Drop(DropReason),
    Other(u8),
}

/// One record from the datapath's event ring buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DatapathEvent {
    pub kind: EventKind,
    pub source: ObservationPoint,
    /// Interface the packet arrived on.
    pub ifindex: u32,
    pub pkt_len: u32,
    /// `CLOCK_MONOTONIC` nanoseconds.
    pub ts_ns: u64,
    /// `None` when the packet could not be parsed.
    pub flow: Option<Flow>,
    /// Security identities of source and destination; 0 where not resolved
    /// (replies, unparsable packets).
    pub src_identity: u32,
    pub dst_identity: u32,
    /// The endpoint whose policy applied (for a new connection: the sender
    /// in `bpf_lxc`, the receiver elsewhere); 0 for none.
    pub endpoint_id: u32,
    /// The policy direction of `endpoint_id`; `None` when no policy was involved.
    pub direction: Option<Direction>,
    /// For [`DropReason::PolicyDeny`]: the deny entry's rule; else 0.
    pub rule_id: u32,
    /// TCP flags of the packet (byte 13 of its TCP header: FIN 0x01, SYN
    /// 0x02, RST 0x04, PSH 0x08, ACK 0x10, ...); 0 for other protocols and
    /// where no TCP header was read. See [`DatapathEvent::reported_tcp_flags`].
    pub tcp_flags: u8,
    /// ICMP type and code of the packet; 0 for other protocols. See
    /// [`DatapathEvent::reported_icmp`].
    pub icmp_type: u8,
    pub icmp_code: u8,
}

// === impl DatapathEvent ===

impl DatapathEvent {
    /// The packet's TCP flags when it is TCP and the datapath read its TCP
    /// header. `None` for other protocols, unparsed packets, and a flag
    /// byte of 0: that is what a non-first fragment (no TCP header) reports,
    /// and no valid segment has every flag clear.
    pub fn reported_tcp_flags(&self) -> Option<u8> {
        const TCP: u8 = 6;
        let flow = self.flow.as_ref()?;
        (flow.proto == TCP && self.tcp_flags != 0).then_some(self.tcp_flags)
    }

    /// The packet's ICMP `(type, code)` when it is ICMP; `None` for other
    /// protocols and unparsed packets. (A non-first fragment of an ICMP
    /// message carries no ICMP header and reports `(0, 0)`.)
    pub fn reported_icmp(&self) -> Option<(u8, u8)> {
        const ICMP: u8 = 1;
        let flow = self.flow.as_ref()?;
        (flow.proto == ICMP).then_some((self.icmp_type, self.icmp_code))
    }
}

/// A tc verdict as returned by a datapath program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcVerdict {
    /// `TC_ACT_OK`: continue into the stack.
    Ok,
    /// `TC_ACT_SHOT`: dropped.
    Shot,
    /// `TC_ACT_REDIRECT`: redirected by a `bpf_redirect*` helper.
    Redirect,
    Other(i32),
}

/// What an XDP program did with a packet (`enum xdp_action`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpAction {
    /// `XDP_ABORTED`: a program error; dropped.
    Aborted,
    /// `XDP_DROP`.
    Drop,
    /// `XDP_PASS`: on to the stack (and tc).
    Pass,
    /// `XDP_TX`: sent back out of the device it arrived on.
    Tx,
    /// `XDP_REDIRECT`.
    Redirect,
    Other(u32),
}

impl XdpAction {
    pub(crate) fn from_code(code: u32) -> Self {
        match code {
            0 => Self::Aborted,
            1 => Self::Drop,
            2 => Self::Pass,
            3 => Self::Tx,
            4 => Self::Redirect,
            other => Self::Other(other),
        }
    }
}

/// How an XDP program is attached to a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum XdpMode {
    /// In the driver, before an skb exists (`XDP_FLAGS_DRV_MODE`). On a
    /// veth, `XDP_TX` only delivers if the peer has NAPI (an XDP program or
    /// GRO on); otherwise the frames are dropped.
    Native,
    /// In the stack's receive path, on an skb (`XDP_FLAGS_SKB_MODE`): works
    /// on every device, but skbs without 256 bytes of headroom (or cloned,
    /// or paged) are copied first, for all traffic of the device.
    Generic,
}

impl std::fmt::Display for XdpMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Native => "native",
            Self::Generic => "generic",
        })
    }
}

// === impl EndpointInfo ===

impl EndpointInfo {
    /// `flags` bit: ingress is default-deny (only what policy allows enters).
    pub const INGRESS_ENFORCED: u32 = abi::ENDPOINT_F_INGRESS_ENFORCED;
    /// `flags` bit: egress is default-deny (only what policy allows leaves).
    pub const EGRESS_ENFORCED: u32 = abi::ENDPOINT_F_EGRESS_ENFORCED;

    /// The enforcement bits for the two directions.
    pub fn enforcement_flags(ingress: bool, egress: bool) -> u32 {
        let mut flags = 0;
        if ingress {
            flags |= Self::INGRESS_ENFORCED;
        }
        if egress {
            flags |= Self::EGRESS_ENFORCED;
        }
        flags
    }
}

// === impl Direction ===

impl Direction {
    pub(crate) fn to_code(self) -> u8 {
        match self {
            Self::Ingress => abi::POLICY_INGRESS,
            Self::Egress => abi::POLICY_EGRESS,
        }
    }

    pub(crate) fn from_code(code: u8) -> Option<Self> {
        match code {
            abi::POLICY_INGRESS => Some(Self::Ingress),
            abi::POLICY_EGRESS => Some(Self::Egress),
            _ => None,
        }
    }
}

// === impl MacAddr ===

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

/// A MAC address that is not six `:`-separated hex bytes.
#[derive(Debug, thiserror::Error)]
#[error("invalid MAC address `{0}`")]
pub struct InvalidMac(pub String);

impl FromStr for MacAddr {
    type Err = InvalidMac;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut out {
            let part = parts.next().ok_or_else(|| InvalidMac(s.to_owned()))?;
            if part.len() != 2 {
                return Err(InvalidMac(s.to_owned()));
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| InvalidMac(s.to_owned()))?;
        }
        if parts.next().is_some() {
            return Err(InvalidMac(s.to_owned()));
        }
        Ok(Self(out))
    }
}

// === conversions from/to the wire types ===

impl From<&EndpointInfo> for EndpointInfoRaw {
    fn from(e: &EndpointInfo) -> Self {
        let EndpointInfo {
            ifindex,
            pod_mac,
            node_mac,
            endpoint_id,
            identity,
            flags,
        } = *e;
        Self {
            ifindex,
            endpoint_id,
            identity,
            flags,
            pod_mac: pod_mac.0,
            node_mac: node_mac.0,
            pad: [0; 4],
        }
    }
}

impl From<EndpointInfoRaw> for EndpointInfo {
    fn from(r: EndpointInfoRaw) -> Self {
        Self {
            ifindex: r.ifindex,
            pod_mac: MacAddr(r.pod_mac),
            node_mac: MacAddr(r.node_mac),
            endpoint_id: r.endpoint_id,
            identity: r.identity,
            flags: r.flags,
        }
    }
}

impl From<CtKeyRaw> for Flow {
    fn from(k: CtKeyRaw) -> Self {
        Self {
            saddr: Ipv4Addr::from(k.saddr),
            daddr: Ipv4Addr::from(k.daddr),
            sport: u16::from_be_bytes(k.sport),
            dport: u16::from_be_bytes(k.dport),
            proto: k.proto,
            direction: if k.dir == abi::CT_INGRESS {
                CtDirection::Ingress
            } else {
                CtDirection::Egress
            },
        }
    }
}

impl From<CtEntryRaw> for CtEntry {
    fn from(e: CtEntryRaw) -> Self {
        Self {
            created_ns: e.created_ns,
            last_seen_ns: e.last_seen_ns,
            packets_fwd: e.packets_fwd,
            bytes_fwd: e.bytes_fwd,
            packets_rev: e.packets_rev,
            bytes_rev: e.bytes_rev,
            tcp_flags_fwd: e.tcp_flags_fwd,
            tcp_flags_rev: e.tcp_flags_rev,
            seen_reply: e.flags & abi::CT_F_SEEN_REPLY != 0,
        }
    }
}

impl From<MetricValueRaw> for Counter {
    fn from(v: MetricValueRaw) -> Self {
        Self {
            packets: v.packets,
            bytes: v.bytes,
        }
    }
}

impl std::ops::AddAssign for Counter {
    fn add_assign(&mut self, rhs: Self) {
        self.packets += rhs.packets;
        self.bytes += rhs.bytes;
    }
}

impl DropReason {
    pub(crate) fn from_code(code: u16) -> Self {
        match code {
            abi::DROP_INVALID => Self::Invalid,
            abi::DROP_CT_FULL => Self::CtFull,
            abi::DROP_TTL_EXCEEDED => Self::TtlExceeded,
            abi::DROP_REWRITE_FAILED => Self::RewriteFailed,
            abi::DROP_POLICY_DENY => Self::PolicyDeny,
            abi::DROP_POLICY_DEFAULT_DENY => Self::PolicyDefaultDeny,
            abi::DROP_NAT_NO_PORT => Self::NatNoPort,
            abi::DROP_INVALID_SOURCE => Self::InvalidSource,
            other => Self::Other(other),
        }
    }
}

impl Metrics {
    /// Builds from per-slot sums indexed like `enum metric`.
    pub(crate) fn from_slots(slots: &[Counter]) -> Self {
        let at = |i: u32| slots.get(i as usize).copied().unwrap_or_default();
        let drops = (1..=abi::DROP_REASON_MAX)
            .map(|code| {
                (
                    DropReason::from_code(code),
                    at(abi::METRIC_DROP_BASE + u32::from(code)),
                )
            })
            .filter(|(_, c)| c.packets > 0)
            .collect();
        Self {
            lxc_rx: at(abi::METRIC_LXC_RX),
            host_rx: at(abi::METRIC_HOST_RX),
            passed: at(abi::METRIC_PASS),
            redirect_peer: at(abi::METRIC_REDIRECT_PEER),
            redirect_neigh: at(abi::METRIC_REDIRECT_NEIGH),
            ct_new: at(abi::METRIC_CT_NEW),
            ct_established: at(abi::METRIC_CT_ESTABLISHED),
            ct_reply: at(abi::METRIC_CT_REPLY),
            to_container: at(abi::METRIC_TO_LXC),
            arp_replies: at(abi::METRIC_ARP_REPLY),
            xdp_rx: at(abi::METRIC_XDP_RX),
            xdp_tx: at(abi::METRIC_XDP_TX),
            drops,
        }
    }
}

impl From<TraceEventRaw> for DatapathEvent {
    fn from(r: TraceEventRaw) -> Self {
        let kind = match r.kind {
            abi::EVENT_TRACE_NEW_CONN => EventKind::NewConnection,
            abi::EVENT_DROP => EventKind::Drop(DropReason::from_code(r.reason)),
            other => EventKind::Other(other),
        };
        let source = match r.source {
            abi::OBS_LXC => ObservationPoint::Lxc,
            abi::OBS_HOST => ObservationPoint::Host,
            abi::OBS_TO_LXC => ObservationPoint::ToContainer,
            other => ObservationPoint::Other(other),
        };
        let flow = (r.tuple != CtKeyRaw::default()).then(|| Flow::from(r.tuple));
        Self {
            kind,
            source,
            ifindex: r.ifindex,
            pkt_len: r.pkt_len,
            ts_ns: r.ts_ns,
            flow,
            src_identity: r.src_identity,
            dst_identity: r.dst_identity,
            endpoint_id: r.endpoint_id,
            direction: Direction::from_code(r.direction),
            rule_id: r.rule_id,
            tcp_flags: r.tcp_flags,
            icmp_type: r.icmp_type,
            icmp_code: r.icmp_code,
        }
    }
}

impl TcVerdict {
    pub(crate) fn from_code(code: i32) -> Self {
        match code {
            abi::TC_ACT_OK => Self::Ok,
            abi::TC_ACT_SHOT => Self::Shot,
            abi::TC_ACT_REDIRECT => Self::Redirect,
            other => Self::Other(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mac_address_round_trips_through_its_text_form() {
        let mac: MacAddr = "02:00:0a:c8:01:ff".parse().expect("valid");
        assert_eq!(mac, MacAddr([2, 0, 0x0a, 0xc8, 1, 0xff]));
        assert_eq!(mac.to_string(), "02:00:0a:c8:01:ff");
        for bad in [
            "",
            "02:00",
            "02:00:0a:c8:01:ff:00",
            "0g:00:0a:c8:01:ff",
            "2:00:0a:c8:01:ff",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn metrics_report_only_drop_reasons_that_happened() {
        let mut slots = vec![Counter::default(); abi::METRIC_MAX as usize];
        slots[abi::METRIC_REDIRECT_PEER as usize] = Counter {
            packets: 3,
            bytes: 300,
        };
        slots[(abi::METRIC_DROP_BASE + u32::from(abi::DROP_INVALID)) as usize] = Counter {
            packets: 2,
            bytes: 40,
        };
        let m = Metrics::from_slots(&slots);
        assert_eq!(m.redirected(), 3);
        assert_eq!(m.dropped(), 2);
        assert_eq!(
            m.drops.keys().copied().collect::<Vec<_>>(),
            vec![DropReason::Invalid]
        );
    }

    #[test]
    fn an_endpoint_survives_the_trip_to_the_wire_type_and_back() {
        let e = EndpointInfo {
            ifindex: 7,
            pod_mac: MacAddr([2, 0, 0, 0, 0, 1]),
            node_mac: MacAddr([2, 0, 0, 0, 0, 2]),
            endpoint_id: 42,
            identity: 0,
            flags: 0,
        };
        assert_eq!(EndpointInfo::from(EndpointInfoRaw::from(&e)), e);
    }

    fn raw_event(proto: u8, tcp_flags: u8, icmp_type: u8, icmp_code: u8) -> TraceEventRaw {
        TraceEventRaw {
            kind: abi::EVENT_TRACE_NEW_CONN,
            source: abi::OBS_LXC,
            tuple: CtKeyRaw {
                saddr: [10, 0, 0, 1],
                daddr: [10, 0, 0, 2],
                proto,
                ..CtKeyRaw::default()
            },
            direction: abi::TRACE_DIR_NONE,
            tcp_flags,
            icmp_type,
            icmp_code,
            ..TraceEventRaw::default()
        }
    }

    #[test]
    fn an_event_reports_tcp_flags_only_for_tcp_and_icmp_type_only_for_icmp() {
        let syn = DatapathEvent::from(raw_event(6, 0x02, 0, 0));
        assert_eq!((syn.tcp_flags, syn.icmp_type, syn.icmp_code), (0x02, 0, 0));
        assert_eq!(syn.reported_tcp_flags(), Some(0x02));
        assert_eq!(syn.reported_icmp(), None);

        let echo = DatapathEvent::from(raw_event(1, 0, 8, 0));
        assert_eq!(echo.reported_icmp(), Some((8, 0)));
        assert_eq!(echo.reported_tcp_flags(), None);
        // An echo reply is type 0: still reported, the protocol says it is ICMP.
        let reply = DatapathEvent::from(raw_event(1, 0, 0, 0));
        assert_eq!(reply.reported_icmp(), Some((0, 0)));

        let udp = DatapathEvent::from(raw_event(17, 0, 0, 0));
        assert_eq!(
            (udp.reported_tcp_flags(), udp.reported_icmp()),
            (None, None)
        );
        // No TCP header read (a non-first fragment): no flags, not "no flags set".
        let fragment = DatapathEvent::from(raw_event(6, 0, 0, 0));
        assert_eq!(fragment.reported_tcp_flags(), None);

        let mut unparsed = raw_event(0, 0, 0, 0);
        unparsed.tuple = CtKeyRaw::default();
        let unparsed = DatapathEvent::from(unparsed);
        assert_eq!(unparsed.flow, None);
        assert_eq!(
            (unparsed.reported_tcp_flags(), unparsed.reported_icmp()),
            (None, None)
        );
    }
}
