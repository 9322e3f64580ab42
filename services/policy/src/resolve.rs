//! Resolution: policies × identities × namespaces → one [`IdentityPolicy`]
//! per subject identity, and [`trace`], which decides one packet exactly as
//! the datapath does with those policies:
//!
//! 1. a matching deny rule drops, whatever allows also match (deny wins);
//! 2. else a matching allow rule passes;
//! 3. else the direction's default: drop if enforced, pass if not.
//!
//! A packet passes only if the source's egress and the destination's
//! ingress both pass. Only endpoints have policy: global identities and the
//! health (4) and init (5) endpoints; host, world, unmanaged, remote-node
//! and CIDR peers have none of their own.
//!
//! CIDR peers stay prefixes (nodes allocate node-local CIDR identities).
//! For an address, a CIDR rule on P with excepts E matches when the address
//! is in P and in no prefix of E. This equals the node contract (a rule on P
//! applies to every ipcache prefix inside P) because nodes allocate a CIDR
//! identity for every P and every except, and an address resolves to its
//! longest matching prefix: that prefix lies inside P exactly when the
//! address does, and inside an except exactly when the address is.
//! Identity-set peers containing world (2) match every address, since CIDR
//! identities are world's refinements; a rule on a /0 prefix matches world.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use crate::labels::{self, Label, LabelSet, NAMESPACE_LABELS_PREFIX, SOURCE_K8S};
use crate::model::{
    CidrPeer, Direction, Entity, Entry, Kind, Peer, Peers, Policy, PortRange, Proto, Section,
    Verdict,
};

/// Identity 0: unknown.
pub const UNKNOWN: u32 = 0;
/// Identity 1: the local host.
pub const HOST: u32 = 1;
/// Identity 2: outside the cluster.
pub const WORLD: u32 = 2;
/// Identity 3: endpoints not managed by Membrane.
pub const UNMANAGED: u32 = 3;
/// Identity 4: health endpoints.
pub const HEALTH: u32 = 4;
/// Identity 5: endpoints whose labels are not known yet.
pub const INIT: u32 = 5;
/// Identity 6: other nodes.
pub const REMOTE_NODE: u32 = 6;
/// First global identity.
pub const GLOBAL_MIN: u32 = 256;
/// First node-local CIDR identity (never seen here).
pub const CIDR_BASE: u32 = 1 << 24;

/// The reserved identities with their labels, known without the identity
/// service.
pub fn reserved_identities() -> BTreeMap<u32, LabelSet> {
    [
        (UNKNOWN, "reserved:unknown"),
        (HOST, "reserved:host"),
        (WORLD, "reserved:world"),
        (UNMANAGED, "reserved:unmanaged"),
        (HEALTH, "reserved:health"),
        (INIT, "reserved:init"),
        (REMOTE_NODE, "reserved:remote-node"),
    ]
    .into_iter()
    .map(|(id, l)| (id, LabelSet::parse([l])))
    .collect()
}

/// The identity an entity name stands for (`entity/world` in traces).
pub fn entity_identity(name: &str) -> Option<u32> {
    Some(match name {
        "host" => HOST,
        "world" => WORLD,
        "unmanaged" => UNMANAGED,
        "health" => HEALTH,
        "init" => INIT,
        "remote-node" => REMOTE_NODE,
        _ => return None,
    })
}

/// Whether an identity is an endpoint that policies can select.
pub fn is_subject(id: u32) -> bool {
    id == HEALTH || id == INIT || (GLOBAL_MIN..CIDR_BASE).contains(&id)
}

/// Names the policy rule a resolved rule comes from.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RuleRef {
    /// Policy kind.
    pub kind: Kind,
    /// Policy namespace.
    pub namespace: Option<String>,
    /// Policy name.
    pub name: String,
    /// Section.
    pub section: Section,
    /// Index in the section.
    pub index: usize,
    /// Field path, e.g. `specs[1].ingress[0]`.
    pub path: String,
}

/// A resolved peer.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PeerSet {
    /// Every peer.
    Any,
    /// These identities.
    Identities(BTreeSet<u32>),
    /// A prefix, resolved by nodes.
    Cidr(CidrPeer),
}

/// A rule, resolved for one subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedRule {
    /// Direction.
    pub direction: Direction,
    /// Allow or deny.
    pub verdict: Verdict,
    /// Peer.
    pub peer: PeerSet,
    /// Ports; empty means all.
    pub ports: Vec<PortRange>,
    /// Origin.
    pub rule: RuleRef,
    /// Whether the origin has L7 rules (not enforced).
    pub l7: bool,
}

/// The policy of one subject identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityPolicy {
    /// Subject identity.
    pub identity: u32,
    /// Default-deny for ingress.
    pub ingress_enforced: bool,
    /// Default-deny for egress.
    pub egress_enforced: bool,
    /// Every rule that applies, in a stable order.
    pub rules: Vec<ResolvedRule>,
}

/// The result of resolving every policy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resolution {
    /// Per subject identity that some rule selects.
    pub policies: BTreeMap<u32, IdentityPolicy>,
    /// Per input policy (same order): identities its rules select.
    pub selected: Vec<BTreeSet<u32>>,
}

/// An identity's labels plus its namespace's labels, as selectors see them.
fn effective_labels(
    labels: &LabelSet,
    namespaces: &BTreeMap<String, BTreeMap<String, String>>,
) -> LabelSet {
    let mut out = labels.clone();
    if let Some(ns) = labels.namespace() {
        let ns_labels = namespaces
            .get(ns)
            .cloned()
            .unwrap_or_else(|| labels::default_namespace_labels(ns));
        for (k, v) in ns_labels {
            out.insert(Label::new(
                SOURCE_K8S,
                &format!("{NAMESPACE_LABELS_PREFIX}{k}"),
                &v,
            ));
        }
    }
    out
}

/// Resolves `policies` against `identities` (reserved ones are added when
/// missing) and `namespaces` (name → labels; a namespace never applied has
/// only `kubernetes.io/metadata.name`).
pub fn resolve(
    identities: &BTreeMap<u32, LabelSet>,
    namespaces: &BTreeMap<String, BTreeMap<String, String>>,
    policies: &[Policy],
) -> Resolution {
    let mut all = reserved_identities();
    all.extend(identities.iter().map(|(id, l)| (*id, l.clone())));
    all.remove(&UNKNOWN);
    let labels: BTreeMap<u32, LabelSet> = all
        .iter()
        .map(|(id, l)| (*id, effective_labels(l, namespaces)))
        .collect();
    let cluster: BTreeSet<u32> = labels
        .keys()
        .copied()
        .filter(|id| (GLOBAL_MIN..CIDR_BASE).contains(id))
        .chain([HOST, UNMANAGED, HEALTH, INIT, REMOTE_NODE])
        .collect();

    let mut out = Resolution {
        policies: BTreeMap::new(),
        selected: vec![BTreeSet::new(); policies.len()],
    };
    for (pi, policy) in policies.iter().enumerate() {
        for rule in &policy.rules {
            let subjects: Vec<u32> = labels
                .iter()
                .filter(|(id, l)| is_subject(**id) && rule.subject.matches(l))
                .map(|(id, _)| *id)
                .collect();
            if subjects.is_empty() {
                continue;
            }
            let resolved: Vec<ResolvedRule> = rule
                .entries
                .iter()
                .flat_map(|e| resolve_entry(policy, &rule.path, e, &labels, &cluster))
                .collect();
            for id in subjects {
                out.selected[pi].insert(id);
                let ip = out.policies.entry(id).or_insert_with(|| IdentityPolicy {
                    identity: id,
                    ingress_enforced: false,
                    egress_enforced: false,
                    rules: Vec::new(),
                });
                ip.ingress_enforced |= rule.enforce_ingress;
                ip.egress_enforced |= rule.enforce_egress;
                ip.rules.extend(resolved.iter().cloned());
            }
        }
    }
    for ip in out.policies.values_mut() {
        ip.rules
            .sort_by(|a, b| (&a.rule, &a.peer, &a.ports).cmp(&(&b.rule, &b.peer, &b.ports)));
        ip.rules.dedup();
    }
    out
}

fn resolve_entry(
    policy: &Policy,
    rule_path: &str,
    e: &Entry,
    labels: &BTreeMap<u32, LabelSet>,
    cluster: &BTreeSet<u32>,
) -> Vec<ResolvedRule> {
    let rule = RuleRef {
        kind: policy.kind,
        namespace: policy.namespace.clone(),
        name: policy.name.clone(),
        section: e.section,
        index: e.index,
        path: format!("{rule_path}.{}[{}]", e.section.name(), e.index),
    };
    let make = |peer| ResolvedRule {
        direction: e.section.direction(),
        verdict: e.section.verdict(),
        peer,
        ports: e.ports.clone(),
        rule: rule.clone(),
        l7: e.l7,
    };
    let peers = match &e.peers {
        Peers::Any => return vec![make(PeerSet::Any)],
        Peers::Listed(p) => p,
    };
    let mut ids = BTreeSet::new();
    let mut cidrs = Vec::new();
    for p in peers {
        match p {
            Peer::Endpoints(sel) => {
                ids.extend(
                    labels
                        .iter()
                        .filter(|(_, l)| sel.matches(l))
                        .map(|(id, _)| *id),
                );
            }
            Peer::Entity(ent) => match ent {
                Entity::All => return vec![make(PeerSet::Any)],
                Entity::World => {
                    ids.insert(WORLD);
                }
                Entity::Cluster => ids.extend(cluster.iter().copied()),
                Entity::Host => {
                    ids.insert(HOST);
                }
                Entity::RemoteNode => {
                    ids.insert(REMOTE_NODE);
                }
                Entity::Init => {
                    ids.insert(INIT);
                }
                Entity::Health => {
                    ids.insert(HEALTH);
                }
                Entity::Unmanaged => {
                    ids.insert(UNMANAGED);
                }
            },
            Peer::Cidr(c) => cidrs.push(c.clone()),
        }
    }
    let mut out = Vec::new();
    if !ids.is_empty() {
        out.push(make(PeerSet::Identities(ids)));
    }
    cidrs.sort();
    cidrs.dedup();
    out.extend(cidrs.into_iter().map(|c| make(PeerSet::Cidr(c))));
    out
}

/// One side of a traced packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TracePeer {
    /// An identity (`300`, `entity/world` = 2).
    Identity(u32),
    /// An address outside the cluster (`cidr/8.8.8.8`).
    Address(IpAddr),
}

/// Why a direction decided as it did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TraceReason {
    /// A deny rule matched.
    DeniedByRule,
    /// No deny rule, an allow rule matched.
    AllowedByRule,
    /// Nothing matched; enforced.
    DefaultDeny,
    /// Nothing matched; not enforced.
    NotEnforced,
    /// That side is not an endpoint.
    NotAnEndpoint,
}

/// The decision in one direction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectionTrace {
    /// The endpoint whose policy was consulted.
    pub subject: Option<u32>,
    /// Whether the direction is enforced for it.
    pub enforced: bool,
    /// The decision.
    pub verdict: Verdict,
    /// Why.
    pub reason: TraceReason,
    /// The rules that decided it.
    pub rules: Vec<ResolvedRule>,
}

/// A traced packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trace {
    /// Allow only if both directions allow.
    pub verdict: Verdict,
    /// The source's egress.
    pub egress: DirectionTrace,
    /// The destination's ingress.
    pub ingress: DirectionTrace,
}

/// Whether a resolved peer matches one side of a packet.
pub fn peer_matches(peer: &PeerSet, side: &TracePeer) -> bool {
    match (peer, side) {
        (PeerSet::Any, _) => true,
        (PeerSet::Identities(ids), TracePeer::Identity(id)) => ids.contains(id),
        (PeerSet::Identities(ids), TracePeer::Address(_)) => ids.contains(&WORLD),
        (PeerSet::Cidr(c), TracePeer::Address(a)) => {
            c.cidr.contains(a) && !c.except.iter().any(|e| e.contains(a))
        }
        (PeerSet::Cidr(c), TracePeer::Identity(id)) => {
            *id == WORLD && c.cidr.prefix_len() == 0 && c.except.is_empty()
        }
    }
}

fn decide(
    res: &Resolution,
    subject: &TracePeer,
    peer: &TracePeer,
    direction: Direction,
    port: u16,
    proto: Proto,
) -> DirectionTrace {
    let id = match subject {
        TracePeer::Identity(id) if is_subject(*id) => *id,
        _ => {
            return DirectionTrace {
                subject: None,
                enforced: false,
                verdict: Verdict::Allow,
                reason: TraceReason::NotAnEndpoint,
                rules: Vec::new(),
            };
        }
    };
    let Some(policy) = res.policies.get(&id) else {
        return DirectionTrace {
            subject: Some(id),
            enforced: false,
            verdict: Verdict::Allow,
            reason: TraceReason::NotEnforced,
            rules: Vec::new(),
        };
    };
    let enforced = match direction {
        Direction::Ingress => policy.ingress_enforced,
        Direction::Egress => policy.egress_enforced,
    };
    let matching: Vec<&ResolvedRule> = policy
        .rules
        .iter()
        .filter(|r| r.direction == direction && peer_matches(&r.peer, peer))
        .filter(|r| r.ports.is_empty() || r.ports.iter().any(|p| p.matches(port, proto)))
        .collect();
    let of = |v: Verdict| -> Vec<ResolvedRule> {
        matching
            .iter()
            .filter(|r| r.verdict == v)
            .map(|r| (*r).clone())
            .collect()
    };
    let (verdict, reason, rules) = {
        let deny = of(Verdict::Deny);
        if !deny.is_empty() {
            (Verdict::Deny, TraceReason::DeniedByRule, deny)
        } else {
            let allow = of(Verdict::Allow);
            if !allow.is_empty() {
                (Verdict::Allow, TraceReason::AllowedByRule, allow)
            } else if enforced {
                (Verdict::Deny, TraceReason::DefaultDeny, Vec::new())
            } else {
                (Verdict::Allow, TraceReason::NotEnforced, Vec::new())
            }
        }
    };
    DirectionTrace {
        subject: Some(id),
        enforced,
        verdict,
        reason,
        rules,
    }
}

/// Decides a packet from `from` to `to` on `port`/`proto` (port 0 and
/// [`Proto::Icmp`] for ping).
pub fn trace(res: &Resolution, from: &TracePeer, to: &TracePeer, port: u16, proto: Proto) -> Trace {
    let egress = decide(res, from, to, Direction::Egress, port, proto);
    let ingress = decide(res, to, from, Direction::Ingress, port, proto);
    let verdict = if egress.verdict == Verdict::Allow && ingress.verdict == Verdict::Allow {
        Verdict::Allow
    } else {
        Verdict::Deny
    };
    Trace {
        verdict,
        egress,
        ingress,
    }
}

#[cfg(test)]
#[path = "resolve_tests.rs"]
mod tests;
