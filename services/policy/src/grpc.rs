//! The gRPC edge, the only module that sees generated types:
//! `membrane.policy.v1.Policy` (Trace, ListPolicies), the encoding of
//! published `IdentityPolicy` messages, and the sink that reads the identity
//! service's desired-state stream (`identity/<id>` → `IdentityInfo`).

use std::collections::BTreeMap;
use std::net::IpAddr;

use membrane_proto::identity::v1 as idpb;
use membrane_proto::policy::v1 as pb;
use membrane_runtime::stream::StateSink;
use prost_types::Any;
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::engine::{Engine, IdentitySnapshot};
use crate::model::{Direction, Proto, Verdict};
use crate::resolve::{
    self, DirectionTrace, IdentityPolicy, PeerSet, ResolvedRule, RuleRef, TracePeer, TraceReason,
};

/// The note `ListPolicies` gives a policy with L7 rules.
pub const L7_NOTE: &str = "L7 rules not enforced";

// === domain → proto ===

fn direction(d: Direction) -> pb::Direction {
    match d {
        Direction::Ingress => pb::Direction::Ingress,
        Direction::Egress => pb::Direction::Egress,
    }
}

fn verdict(v: Verdict) -> pb::Verdict {
    match v {
        Verdict::Allow => pb::Verdict::Allow,
        Verdict::Deny => pb::Verdict::Deny,
    }
}

fn protocol(p: Proto) -> pb::Protocol {
    match p {
        Proto::Tcp => pb::Protocol::Tcp,
        Proto::Udp => pb::Protocol::Udp,
        Proto::Icmp => pb::Protocol::Icmp,
        Proto::Any => pb::Protocol::Any,
    }
}

fn rule_ref(r: &RuleRef) -> pb::RuleRef {
    let RuleRef {
        kind,
        namespace,
        name,
        section,
        index,
        path,
    } = r;
    pb::RuleRef {
        kind: kind.name().into(),
        namespace: namespace.clone().unwrap_or_default(),
        name: name.clone(),
        section: section.name().into(),
        index: *index as u32,
        path: path.clone(),
    }
}

fn resolved_rule(r: &ResolvedRule) -> pb::ResolvedRule {
    let ResolvedRule {
        direction: d,
        verdict: v,
        peer,
        ports,
        rule,
        l7,
    } = r;
    let peer = match peer {
        PeerSet::Any => pb::resolved_rule::Peer::Any(pb::AnyPeer {}),
        PeerSet::Identities(ids) => pb::resolved_rule::Peer::Identities(pb::IdentitySet {
            ids: ids.iter().copied().collect(),
        }),
        PeerSet::Cidr(c) => pb::resolved_rule::Peer::Cidr(pb::CidrPeer {
            cidr: c.cidr.to_string(),
            except: c.except.iter().map(ToString::to_string).collect(),
        }),
    };
    pb::ResolvedRule {
        direction: direction(*d) as i32,
        verdict: verdict(*v) as i32,
        peer: Some(peer),
        ports: ports
            .iter()
            .map(|p| pb::PortRange {
                protocol: protocol(p.proto) as i32,
                lo: p.lo.into(),
                hi: p.hi.into(),
            })
            .collect(),
        rule: Some(rule_ref(rule)),
        l7_not_enforced: *l7,
    }
}

/// The published message of one subject identity.
pub fn identity_policy(p: &IdentityPolicy) -> pb::IdentityPolicy {
    let IdentityPolicy {
        identity,
        ingress_enforced,
        egress_enforced,
        rules,
    } = p;
    pb::IdentityPolicy {
        identity: *identity,
        ingress_enforced: *ingress_enforced,
        egress_enforced: *egress_enforced,
        rules: rules.iter().map(resolved_rule).collect(),
    }
}

/// `policy/<id>`'s value.
pub fn encode_policy(p: &IdentityPolicy) -> Any {
    // Encoding a message we built cannot fail; an empty Any would be NACKed.
    Any::from_msg(&identity_policy(p)).unwrap_or_default()
}

fn direction_trace(t: &DirectionTrace) -> pb::DirectionTrace {
    let DirectionTrace {
        subject,
        enforced,
        verdict: v,
        reason,
        rules,
    } = t;
    let reason = match reason {
        TraceReason::DeniedByRule => pb::TraceReason::DeniedByRule,
        TraceReason::AllowedByRule => pb::TraceReason::AllowedByRule,
        TraceReason::DefaultDeny => pb::TraceReason::DefaultDeny,
        TraceReason::NotEnforced => pb::TraceReason::NotEnforced,
        TraceReason::NotAnEndpoint => pb::TraceReason::NotAnEndpoint,
    };
    pb::DirectionTrace {
        subject: subject.unwrap_or(0),
        enforced: *enforced,
        verdict: verdict(*v) as i32,
        reason: reason as i32,
        rules: rules.iter().map(resolved_rule).collect(),
    }
}

// === proto → domain ===

/// Parses a trace endpoint: `300`, `identity/300`, `entity/world`, `cidr/8.8.8.8`.
pub fn trace_peer(field: &str, s: &str) -> Result<TracePeer, Status> {
    let bad = |why: String| Status::invalid_argument(format!("{field}: {why}"));
    let number = |n: &str| {
        n.parse::<u32>()
            .map(TracePeer::Identity)
            .map_err(|_| bad(format!("`{s}` is not an identity number")))
    };
    if let Some(name) = s.strip_prefix("entity/") {
        return resolve::entity_identity(name)
            .map(TracePeer::Identity)
            .ok_or_else(|| {
                bad(format!(
                    "unknown entity `{name}` (world, host, remote-node, health, init, unmanaged)"
                ))
            });
    }
    if let Some(a) = s.strip_prefix("cidr/") {
        let a = a.split_once('/').map_or(a, |(ip, _)| ip);
        return a
            .parse::<IpAddr>()
            .map(TracePeer::Address)
            .map_err(|_| bad(format!("`{a}` is not an IP address")));
    }
    if let Some(n) = s.strip_prefix("identity/") {
        return number(n);
    }
    if s.starts_with("pod/") {
        return Err(bad(
            "pods are resolved by the caller (the CLI asks the node for the pod's identity)".into(),
        ));
    }
    number(s)
}

fn trace_proto(p: i32, port: u32) -> Result<(u16, Proto), Status> {
    let port = u16::try_from(port)
        .map_err(|_| Status::invalid_argument(format!("port: {port} is out of range")))?;
    let proto = match pb::Protocol::try_from(p) {
        Ok(pb::Protocol::Unspecified | pb::Protocol::Tcp) => Proto::Tcp,
        Ok(pb::Protocol::Udp) => Proto::Udp,
        Ok(pb::Protocol::Icmp) => Proto::Icmp,
        Ok(pb::Protocol::Any) | Err(_) => {
            return Err(Status::invalid_argument(
                "protocol: a packet is TCP, UDP or ICMP",
            ));
        }
    };
    Ok((if proto == Proto::Icmp { 0 } else { port }, proto))
}

// === the service ===

/// `membrane.policy.v1.Policy`.
#[derive(Debug, Clone)]
pub struct PolicyService {
    engine: Engine,
}

impl PolicyService {
    /// Serves the engine's current view.
    pub fn new(engine: Engine) -> pb::policy_server::PolicyServer<Self> {
        pb::policy_server::PolicyServer::new(Self { engine })
    }
}

#[tonic::async_trait]
impl pb::policy_server::Policy for PolicyService {
    async fn trace(
        &self,
        req: Request<pb::TraceRequest>,
    ) -> Result<Response<pb::TraceResponse>, Status> {
        let pb::TraceRequest {
            from,
            to,
            port,
            protocol: proto,
        } = req.into_inner();
        let from = trace_peer("from", &from)?;
        let to = trace_peer("to", &to)?;
        let (port, proto) = trace_proto(proto, port)?;
        let view = self.engine.view();
        let t = resolve::trace(&view.resolution, &from, &to, port, proto);
        let id = |p: &TracePeer| match p {
            TracePeer::Identity(i) => *i,
            TracePeer::Address(_) => 0,
        };
        Ok(Response::new(pb::TraceResponse {
            verdict: verdict(t.verdict) as i32,
            egress: Some(direction_trace(&t.egress)),
            ingress: Some(direction_trace(&t.ingress)),
            from_identity: id(&from),
            to_identity: id(&to),
        }))
    }

    async fn list_policies(
        &self,
        _req: Request<pb::ListPoliciesRequest>,
    ) -> Result<Response<pb::ListPoliciesResponse>, Status> {
        let view = self.engine.view();
        let policies = view
            .policies
            .iter()
            .zip(&view.resolution.selected)
            .map(|(p, selected)| pb::PolicySummary {
                kind: p.policy.kind.name().into(),
                namespace: p.policy.namespace.clone().unwrap_or_default(),
                name: p.policy.name.clone(),
                selected_identities: selected.iter().copied().collect(),
                ingress_enforced: p.policy.rules.iter().any(|r| r.enforce_ingress),
                egress_enforced: p.policy.rules.iter().any(|r| r.enforce_egress),
                notes: if p.policy.has_l7() {
                    vec![L7_NOTE.into()]
                } else {
                    Vec::new()
                },
                document_json: p.doc.to_string(),
            })
            .collect();
        Ok(Response::new(pb::ListPoliciesResponse {
            policies,
            version: view.version,
        }))
    }
}

// === the identity stream ===

/// Reads the identity service's stream into an [`IdentitySnapshot`].
#[derive(Debug)]
pub struct IdentitySink {
    tx: watch::Sender<IdentitySnapshot>,
}

impl IdentitySink {
    /// A sink and the receiver of what it reads.
    pub fn new() -> (Self, watch::Receiver<IdentitySnapshot>) {
        let (tx, rx) = watch::channel(IdentitySnapshot::default());
        (Self { tx }, rx)
    }
}

/// Decodes `identity/<id>` resources; other keys (`ipcache/...`) are not ours.
pub fn decode_identities(state: &BTreeMap<String, Any>) -> BTreeMap<u32, Vec<String>> {
    state
        .iter()
        .filter(|(k, _)| k.starts_with("identity/"))
        .filter_map(|(key, v)| match v.to_msg::<idpb::IdentityInfo>() {
            Ok(info) => Some((info.id, info.labels)),
            Err(e) => {
                tracing::warn!(key = %key, error = %e, "identity resource does not decode; ignored");
                None
            }
        })
        .collect()
}

impl StateSink for IdentitySink {
    async fn apply(
        &mut self,
        version: u64,
        state: &BTreeMap<String, Any>,
        _changed: &[String],
    ) -> Result<(), String> {
        let identities = decode_identities(state);
        self.tx.send_replace(IdentitySnapshot {
            version,
            identities,
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_endpoints_read_as_identities_entities_or_addresses() {
        assert_eq!(
            trace_peer("from", "300").ok(),
            Some(TracePeer::Identity(300))
        );
        assert_eq!(
            trace_peer("from", "identity/7").ok(),
            Some(TracePeer::Identity(7))
        );
        assert_eq!(
            trace_peer("from", "entity/world").ok(),
            Some(TracePeer::Identity(2))
        );
        assert_eq!(
            trace_peer("from", "cidr/8.8.8.8/32").ok(),
            Some(TracePeer::Address("8.8.8.8".parse().expect("ip")))
        );
        let e = trace_peer("to", "pod/default/web").expect_err("pods are resolved by callers");
        assert!(
            e.message().starts_with("to: pods are resolved"),
            "{}",
            e.message()
        );
        assert!(trace_peer("to", "entity/moon").is_err());
    }

    #[test]
    fn identity_resources_decode_and_ipcache_entries_are_skipped() {
        let mut state = BTreeMap::new();
        state.insert(
            "identity/300".to_string(),
            Any::from_msg(&idpb::IdentityInfo {
                id: 300,
                labels: vec!["k8s:app=web".into()],
                reserved: false,
            })
            .expect("encode"),
        );
        state.insert(
            "ipcache/10.0.0.1/32".to_string(),
            Any::from_msg(&idpb::IpcacheEntry::default()).expect("encode"),
        );
        let ids = decode_identities(&state);
        assert_eq!(ids.len(), 1);
        assert_eq!(ids[&300], vec!["k8s:app=web".to_string()]);
    }
}
