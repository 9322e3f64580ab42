//! Datapath events to flows: verdict, drop reason, addresses, L4, event
//! type, direction, observation point, policy rule, and both sides enriched
//! from what the node knows (its endpoints, the identity stream's labels and
//! ipcache owners).

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use membrane_proto::observer::v1 as pb;

use super::clock::{WallClock, timestamp};
use crate::bpf::{DatapathEvent, Direction, DropReason, EventKind, ObservationPoint, identity};
use crate::endpoints::EndpointManager;
use crate::identity::ClusterView;

/// A pod on this node, as the observer shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalEndpoint {
    pub id: u32,
    pub ip: Ipv4Addr,
    pub namespace: String,
    pub pod_name: String,
    pub identity: u32,
    pub labels: BTreeMap<String, String>,
}

/// The node's endpoints and policy rule names, as far as flows need them.
pub trait LocalEndpoints: Send + Sync + 'static {
    /// Every endpoint attached now.
    fn endpoints(&self) -> Vec<LocalEndpoint>;
    /// `Kind ns/name path` of a policy rule id reported by a drop.
    fn rule_name(&self, rule_id: u32) -> Option<String>;
}

/// A flow with its wall-clock time in nanoseconds (the ring's order key).
#[derive(Debug, Clone, PartialEq)]
pub struct BuiltFlow {
    pub time_ns: i64,
    pub flow: pb::Flow,
}

/// Builds flows from events. Holds a snapshot of the local endpoints,
/// refreshed when stale or when an event names an endpoint it lacks.
pub struct FlowBuilder {
    node: String,
    clock: WallClock,
    local: Arc<dyn LocalEndpoints>,
    view: ClusterView,
    by_ip: HashMap<Ipv4Addr, LocalEndpoint>,
    by_id: HashMap<u32, LocalEndpoint>,
    refreshed: Option<Instant>,
}

/// The snapshot of local endpoints is re-read at least this often...
const REFRESH: Duration = Duration::from_secs(2);
/// ...and on a miss, at most this often (records are files: keep reads rare).
const REFRESH_ON_MISS: Duration = Duration::from_millis(200);

// === impl FlowBuilder ===

impl FlowBuilder {
    pub fn new(
        node: impl Into<String>,
        clock: WallClock,
        local: Arc<dyn LocalEndpoints>,
        view: ClusterView,
    ) -> Self {
        Self {
            node: node.into(),
            clock,
            local,
            view,
            by_ip: HashMap::new(),
            by_id: HashMap::new(),
            refreshed: None,
        }
    }

    /// The flow for one datapath event.
    pub fn build(&mut self, ev: &DatapathEvent) -> BuiltFlow {
        self.refresh_if_needed(ev);
        let time_ns = self.clock.wall_ns(ev.ts_ns);
        let (verdict, event_type, drop_reason) = match ev.kind {
            EventKind::NewConnection => (pb::Verdict::Forwarded, pb::EventType::Trace, None),
            EventKind::Drop(r) => (pb::Verdict::Dropped, pb::EventType::Drop, Some(r)),
            EventKind::Other(_) => (pb::Verdict::Unspecified, pb::EventType::Unspecified, None),
        };
        let policy_rule = match drop_reason {
            Some(DropReason::PolicyDeny) if ev.rule_id != 0 => self
                .local
                .rule_name(ev.rule_id)
                .unwrap_or_else(|| format!("rule {}", ev.rule_id)),
            _ => String::new(),
        };
        let direction = traffic_direction(ev);
        // Which side the event's endpoint id is: the sender for egress, the receiver for ingress.
        let (src_ep_id, dst_ep_id) = match ev.direction {
            Some(Direction::Egress) => (ev.endpoint_id, 0),
            Some(Direction::Ingress) => (0, ev.endpoint_id),
            None => (0, 0),
        };
        let (source, destination, ip) = match &ev.flow {
            Some(f) => (
                Some(self.endpoint(Some(f.saddr), ev.src_identity, src_ep_id)),
                Some(self.endpoint(Some(f.daddr), ev.dst_identity, dst_ep_id)),
                Some(pb::Ip {
                    source: f.saddr.to_string(),
                    destination: f.daddr.to_string(),
                }),
            ),
            None => (
                (src_ep_id != 0).then(|| self.endpoint(None, ev.src_identity, src_ep_id)),
                (dst_ep_id != 0).then(|| self.endpoint(None, ev.dst_identity, dst_ep_id)),
                None,
            ),
        };
        let l4 = ev
            .flow
            .as_ref()
            .and_then(|f| layer4(f.proto, f.sport, f.dport, tcp_flags(ev), icmp_type(ev)));
        let summary = summary(ev, l4.as_ref());
        let flow = pb::Flow {
            time: Some(timestamp(time_ns)),
            verdict: verdict as i32,
            drop_reason: drop_reason.map(drop_reason_name).unwrap_or_default(),
            ip,
            l4,
            source,
            destination,
            event_type: event_type as i32,
            node_name: self.node.clone(),
            traffic_direction: direction as i32,
            policy_rule,
            // Trace events are first packets of connections and replies are
            // never judged by policy: no event the datapath emits is a reply.
            is_reply: false,
            trace_observation_point: observation_point_name(ev.source),
            http: None,
            service: String::new(),
            summary,
        };
        BuiltFlow { time_ns, flow }
    }

    fn refresh_if_needed(&mut self, ev: &DatapathEvent) {
        let now = Instant::now();
        let age = self.refreshed.map(|t| now.duration_since(t));
        let missing = ev.endpoint_id != 0 && !self.by_id.contains_key(&ev.endpoint_id);
        let stale = match age {
            None => true,
            Some(a) => a >= REFRESH || (missing && a >= REFRESH_ON_MISS),
        };
        if stale {
            let eps = self.local.endpoints();
            self.by_ip = eps.iter().map(|e| (e.ip, e.clone())).collect();
            self.by_id = eps.into_iter().map(|e| (e.id, e)).collect();
            self.refreshed = Some(now);
        }
    }

    /// One side: a local endpoint (by address, else by the event's endpoint
    /// id), else an ipcache owner (a pod elsewhere, or a node); labels of the
    /// identity from the identity stream.
    fn endpoint(
        &self,
        ip: Option<Ipv4Addr>,
        event_identity: u32,
        endpoint_id: u32,
    ) -> pb::Endpoint {
        let local = ip.and_then(|ip| self.by_ip.get(&ip)).or_else(|| {
            (endpoint_id != 0)
                .then(|| self.by_id.get(&endpoint_id))
                .flatten()
        });
        let mut ep = pb::Endpoint {
            identity: event_identity,
            ..pb::Endpoint::default()
        };
        if let Some(l) = local {
            ep.id = l.id;
            ep.namespace = l.namespace.clone();
            ep.pod_name = l.pod_name.clone();
            ep.node_name = self.node.clone();
            if ep.identity == identity::UNKNOWN {
                ep.identity = l.identity;
            }
        } else if let Some(owner) = ip.and_then(|ip| self.view.owners.get(ip)) {
            ep.namespace = owner.namespace;
            ep.pod_name = owner.pod;
            ep.node_name = owner.node;
            if ep.identity == identity::UNKNOWN {
                ep.identity = owner.identity;
            }
        }
        ep.labels = match self.view.labels.get(ep.identity) {
            Some(labels) => labels.to_vec(),
            None => match (reserved_label(ep.identity), local) {
                (Some(l), _) => vec![l.to_string()],
                // Identity not (yet) on the stream: the pod's own labels.
                (None, Some(l)) => l
                    .labels
                    .iter()
                    .map(|(k, v)| format!("k8s:{k}={v}"))
                    .collect(),
                (None, None) => Vec::new(),
            },
        };
        ep
    }
}

// === impl LocalEndpoints for EndpointManager ===

impl LocalEndpoints for EndpointManager {
    fn endpoints(&self) -> Vec<LocalEndpoint> {
        self.records()
            .into_iter()
            .map(|r| LocalEndpoint {
                id: r.id,
                ip: r.ip,
                namespace: r.pod_namespace,
                pod_name: r.pod_name,
                identity: r.identity,
                labels: r.labels,
            })
            .collect()
    }

    fn rule_name(&self, rule_id: u32) -> Option<String> {
        EndpointManager::rule_name(self, rule_id)
    }
}

/// The wire name of a drop reason (Hubble's where one exists).
pub fn drop_reason_name(r: DropReason) -> String {
    match r {
        DropReason::Invalid => "INVALID".into(),
        DropReason::CtFull => "CT_MAP_FULL".into(),
        DropReason::TtlExceeded => "TTL_EXCEEDED".into(),
        DropReason::RewriteFailed => "REWRITE_FAILED".into(),
        DropReason::PolicyDeny => "POLICY_DENIED".into(),
        DropReason::PolicyDefaultDeny => "POLICY_DEFAULT_DENY".into(),
        DropReason::NatNoPort => "NO_MAPPING_FOR_NAT".into(),
        DropReason::InvalidSource => "INVALID_SOURCE_IP".into(),
        DropReason::Other(code) => format!("UNKNOWN_{code}"),
    }
}

/// `from-endpoint` (leaving a pod, `bpf_lxc`), `from-network` (arriving on
/// the underlay, `bpf_host`), `to-endpoint` (the stack delivering to a pod).
pub fn observation_point_name(p: ObservationPoint) -> String {
    match p {
        ObservationPoint::Lxc => "from-endpoint".into(),
        ObservationPoint::Host => "from-network".into(),
        ObservationPoint::ToContainer => "to-endpoint".into(),
        ObservationPoint::Other(n) => format!("unknown-{n}"),
    }
}

/// The policy direction when policy was involved; else the hook's: leaving
/// a pod is egress, everything else is on its way into one.
fn traffic_direction(ev: &DatapathEvent) -> pb::TrafficDirection {
    match (ev.direction, ev.source) {
        (Some(Direction::Ingress), _) => pb::TrafficDirection::Ingress,
        (Some(Direction::Egress), _) => pb::TrafficDirection::Egress,
        (None, ObservationPoint::Lxc) => pb::TrafficDirection::Egress,
        (None, ObservationPoint::Host | ObservationPoint::ToContainer) => {
            pb::TrafficDirection::Ingress
        }
        (None, ObservationPoint::Other(_)) => pb::TrafficDirection::Unspecified,
    }
}

/// TCP flags of the packet, as `struct trace_event` reports them (`None`
/// for other protocols and where no TCP header was read).
fn tcp_flags(ev: &DatapathEvent) -> Option<u8> {
    ev.reported_tcp_flags()
}

/// ICMP type and code of the packet, as `struct trace_event` reports them.
fn icmp_type(ev: &DatapathEvent) -> Option<(u8, u8)> {
    ev.reported_icmp()
}

const TCP: u8 = 6;
const UDP: u8 = 17;
const ICMP: u8 = 1;

/// L4 of a tuple. ICMP without a known type still says ICMPv4 (type and code
/// 0 then; the summary names the type only when it was reported).
pub fn layer4(
    proto: u8,
    sport: u16,
    dport: u16,
    flags: Option<u8>,
    icmp: Option<(u8, u8)>,
) -> Option<pb::Layer4> {
    use pb::layer4::Protocol as P;
    let protocol = match proto {
        TCP => P::Tcp(pb::Tcp {
            source_port: sport.into(),
            destination_port: dport.into(),
            flags: flags.map(tcp_flags_msg),
        }),
        UDP => P::Udp(pb::Udp {
            source_port: sport.into(),
            destination_port: dport.into(),
        }),
        ICMP => {
            let (t, c) = icmp.unwrap_or_default();
            P::Icmpv4(pb::IcmPv4 {
                r#type: t.into(),
                code: c.into(),
            })
        }
        _ => return None,
    };
    Some(pb::Layer4 {
        protocol: Some(protocol),
    })
}

fn tcp_flags_msg(f: u8) -> pb::TcpFlags {
    pb::TcpFlags {
        fin: f & 0x01 != 0,
        syn: f & 0x02 != 0,
        rst: f & 0x04 != 0,
        psh: f & 0x08 != 0,
        ack: f & 0x10 != 0,
    }
}

/// A Hubble-like one-liner: `TCP Flags: SYN`, `UDP`, `ICMPv4 EchoRequest`.
fn summary(ev: &DatapathEvent, l4: Option<&pb::Layer4>) -> String {
    use pb::layer4::Protocol as P;
    let Some(f) = &ev.flow else {
        return "unparsed packet".into();
    };
    match l4.and_then(|l| l.protocol.as_ref()) {
        Some(P::Tcp(t)) => match &t.flags {
            Some(fl) => {
                let names: Vec<&str> = [
                    (fl.syn, "SYN"),
                    (fl.ack, "ACK"),
                    (fl.fin, "FIN"),
                    (fl.rst, "RST"),
                    (fl.psh, "PSH"),
                ]
                .into_iter()
                .filter_map(|(on, n)| on.then_some(n))
                .collect();
                format!("TCP Flags: {}", names.join(", "))
            }
            None => "TCP".into(),
        },
        Some(P::Udp(_)) => "UDP".into(),
        Some(P::Icmpv4(_)) => match icmp_type(ev) {
            Some((t, _)) => format!("ICMPv4 {}", icmp_type_name(t)),
            None => "ICMPv4".into(),
        },
        None => format!("IP protocol {}", f.proto),
    }
}

fn icmp_type_name(t: u8) -> String {
    match t {
        0 => "EchoReply".into(),
        3 => "DestinationUnreachable".into(),
        5 => "Redirect".into(),
        8 => "EchoRequest".into(),
        11 => "TimeExceeded".into(),
        other => format!("Type{other}"),
    }
}

/// Labels of the reserved identities, for when the stream has not said.
fn reserved_label(id: u32) -> Option<&'static str> {
    Some(match id {
        identity::HOST => "reserved:host",
        identity::WORLD => "reserved:world",
        identity::UNMANAGED => "reserved:unmanaged",
        identity::HEALTH => "reserved:health",
        identity::INIT => "reserved:init",
        identity::REMOTE_NODE => "reserved:remote-node",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bpf::{CtDirection, Flow};
    use crate::identity::IpcacheOwner;

    struct FakeEndpoints(Vec<LocalEndpoint>);

    impl LocalEndpoints for FakeEndpoints {
        fn endpoints(&self) -> Vec<LocalEndpoint> {
            self.0.clone()
        }
        fn rule_name(&self, rule_id: u32) -> Option<String> {
            (rule_id == 7).then(|| "CiliumNetworkPolicy prod/deny-web egress[0]".into())
        }
    }

    const WEB: Ipv4Addr = Ipv4Addr::new(10, 200, 1, 10);
    const DB_REMOTE: Ipv4Addr = Ipv4Addr::new(10, 200, 2, 20);

    fn builder() -> FlowBuilder {
        let web = LocalEndpoint {
            id: 3,
            ip: WEB,
            namespace: "default".into(),
            pod_name: "web".into(),
            identity: 1000,
            labels: [("app".to_string(), "web".to_string())]
                .into_iter()
                .collect(),
        };
        let view = ClusterView::default();
        view.labels.set(2000, Some(vec!["k8s:app=db".into()]));
        view.owners.set(
            DB_REMOTE,
            Some(IpcacheOwner {
                identity: 2000,
                node: "obs-b".into(),
                namespace: "prod".into(),
                pod: "db-0".into(),
            }),
        );
        FlowBuilder::new(
            "obs-a",
            WallClock::with_offset(1_000),
            Arc::new(FakeEndpoints(vec![web])),
            view,
        )
    }

    fn event(kind: EventKind, proto: u8) -> DatapathEvent {
        DatapathEvent {
            kind,
            source: ObservationPoint::Lxc,
            ifindex: 9,
            pkt_len: 60,
            ts_ns: 5_000,
            flow: Some(Flow {
                saddr: WEB,
                daddr: DB_REMOTE,
                sport: 40000,
                dport: 5432,
                proto,
                direction: CtDirection::Egress,
            }),
            src_identity: 1000,
            dst_identity: 2000,
            endpoint_id: 3,
            direction: Some(Direction::Egress),
            rule_id: 7,
            tcp_flags: 0,
            icmp_type: 0,
            icmp_code: 0,
        }
    }

    #[test]
    fn a_policy_drop_becomes_a_dropped_flow_with_reason_rule_and_both_sides_named() {
        let f = builder().build(&event(EventKind::Drop(DropReason::PolicyDeny), TCP));
        assert_eq!(f.time_ns, 6_000);
        let flow = f.flow;
        assert_eq!(flow.verdict, pb::Verdict::Dropped as i32);
        assert_eq!(flow.event_type, pb::EventType::Drop as i32);
        assert_eq!(flow.drop_reason, "POLICY_DENIED");
        assert_eq!(
            flow.policy_rule,
            "CiliumNetworkPolicy prod/deny-web egress[0]"
        );
        assert_eq!(flow.traffic_direction, pb::TrafficDirection::Egress as i32);
        assert_eq!(flow.trace_observation_point, "from-endpoint");
        assert_eq!(flow.node_name, "obs-a");
        let src = flow.source.expect("source");
        assert_eq!(
            (
                src.id,
                src.namespace.as_str(),
                src.pod_name.as_str(),
                src.node_name.as_str()
            ),
            (3, "default", "web", "obs-a")
        );
        assert_eq!(
            src.labels,
            ["k8s:app=web"],
            "pod labels stand in until the identity is on the stream"
        );
        let dst = flow.destination.expect("destination");
        assert_eq!(
            (
                dst.id,
                dst.namespace.as_str(),
                dst.pod_name.as_str(),
                dst.node_name.as_str()
            ),
            (0, "prod", "db-0", "obs-b")
        );
        assert_eq!(dst.labels, ["k8s:app=db"]);
        assert_eq!(flow.summary, "TCP");
    }

    #[test]
    fn a_new_connection_is_a_forwarded_trace_and_udp_and_icmp_say_so() {
        let mut b = builder();
        let f = b.build(&event(EventKind::NewConnection, UDP)).flow;
        assert_eq!(f.verdict, pb::Verdict::Forwarded as i32);
        assert_eq!(f.event_type, pb::EventType::Trace as i32);
        assert!(f.drop_reason.is_empty() && f.policy_rule.is_empty());
        assert_eq!(f.summary, "UDP");
        let f = b.build(&event(EventKind::NewConnection, ICMP)).flow;
        assert_eq!(f.summary, "ICMPv4 EchoReply", "type 0 is reported for ICMP");
    }

    #[test]
    fn a_syn_event_becomes_a_flow_with_its_tcp_flags() {
        let mut ev = event(EventKind::NewConnection, TCP);
        ev.tcp_flags = 0x02;
        let f = builder().build(&ev).flow;
        let Some(pb::layer4::Protocol::Tcp(tcp)) = f.l4.and_then(|l| l.protocol) else {
            panic!("TCP L4");
        };
        assert_eq!((tcp.source_port, tcp.destination_port), (40000, 5432));
        assert_eq!(
            tcp.flags,
            Some(pb::TcpFlags {
                syn: true,
                ..pb::TcpFlags::default()
            })
        );
        assert_eq!(f.summary, "TCP Flags: SYN");
    }

    #[test]
    fn an_icmp_event_becomes_a_flow_with_its_type_and_code() {
        let mut ev = event(EventKind::NewConnection, ICMP);
        (ev.icmp_type, ev.icmp_code) = (8, 0);
        let f = builder().build(&ev).flow;
        assert_eq!(
            f.l4.and_then(|l| l.protocol),
            Some(pb::layer4::Protocol::Icmpv4(pb::IcmPv4 {
                r#type: 8,
                code: 0
            }))
        );
        assert_eq!(f.summary, "ICMPv4 EchoRequest");

        (ev.icmp_type, ev.icmp_code) = (3, 4);
        let f = builder().build(&ev).flow;
        assert_eq!(
            f.l4.and_then(|l| l.protocol),
            Some(pb::layer4::Protocol::Icmpv4(pb::IcmPv4 {
                r#type: 3,
                code: 4
            }))
        );
        assert_eq!(f.summary, "ICMPv4 DestinationUnreachable");
    }

    #[test]
    fn flag_and_type_bytes_of_another_protocol_are_ignored() {
        let mut ev = event(EventKind::NewConnection, UDP);
        (ev.tcp_flags, ev.icmp_type) = (0x02, 8);
        assert_eq!(builder().build(&ev).flow.summary, "UDP");
        let mut ev = event(EventKind::NewConnection, TCP);
        ev.icmp_type = 8;
        let f = builder().build(&ev).flow;
        assert_eq!(f.summary, "TCP", "no TCP header read: no flags claimed");
    }

    #[test]
    fn every_drop_reason_has_a_name() {
        let all = [
            (DropReason::Invalid, "INVALID"),
            (DropReason::CtFull, "CT_MAP_FULL"),
            (DropReason::TtlExceeded, "TTL_EXCEEDED"),
            (DropReason::RewriteFailed, "REWRITE_FAILED"),
            (DropReason::PolicyDeny, "POLICY_DENIED"),
            (DropReason::PolicyDefaultDeny, "POLICY_DEFAULT_DENY"),
            (DropReason::NatNoPort, "NO_MAPPING_FOR_NAT"),
            (DropReason::InvalidSource, "INVALID_SOURCE_IP"),
            (DropReason::Other(77), "UNKNOWN_77"),
        ];
        for (r, name) in all {
            assert_eq!(drop_reason_name(r), name);
        }
    }

    #[test]
    fn an_unparsed_drop_without_policy_is_judged_by_its_hook() {
        let mut ev = event(EventKind::Drop(DropReason::Invalid), TCP);
        ev.flow = None;
        ev.direction = None;
        ev.endpoint_id = 0;
        ev.source = ObservationPoint::ToContainer;
        let f = builder().build(&ev).flow;
        assert_eq!(f.traffic_direction, pb::TrafficDirection::Ingress as i32);
        assert_eq!(f.trace_observation_point, "to-endpoint");
        assert!(f.ip.is_none() && f.l4.is_none() && f.source.is_none());
        assert_eq!(f.summary, "unparsed packet");
    }

    #[test]
    fn tcp_flags_read_like_hubbles() {
        let l4 = layer4(TCP, 1, 2, Some(0x12), None);
        let mut ev = event(EventKind::NewConnection, TCP);
        ev.flow = ev.flow.map(|f| Flow { proto: TCP, ..f });
        assert_eq!(summary(&ev, l4.as_ref()), "TCP Flags: SYN, ACK");
    }
}
