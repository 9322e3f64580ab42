//! Network policy on this node: turns the policy service's `policy/<id>`
//! resources into eBPF policy entries and enforcement flags for every local
//! endpoint, and gives CIDR peers node-local identities in the ipcache.
//!
//! The contract (in `proto/membrane/policy/v1/policy.proto`): deny wins over
//! allow, then allow, then default-deny when the direction is enforced. The
//! datapath combines (peer, protocol) groups with deny-wins; within a group
//! `Datapath::replace_endpoint_policy` resolves overlapping port ranges.

use std::collections::{BTreeMap, BTreeSet};

use ipnet::Ipv4Net;
use membrane_proto::policy::v1 as pb;

use crate::bpf::{Direction, EndpointInfo, PolicyEntry, PortMatch, Verdict};

/// First node-local CIDR identity (`membrane.identity.v1.IdentityRange`).
pub const CIDR_BASE: u32 = 1 << 24;
const WORLD: u32 = 2;

/// The policy state this node enforces.
#[derive(Debug, Default)]
pub struct PolicyState {
    /// Resolved policy per subject identity.
    policies: BTreeMap<u32, pb::IdentityPolicy>,
    /// The datapath entries of each subject identity, computed once per
    /// change of its policy (or of the CIDR identities it names) and shared
    /// by its endpoints; `endpoint_id` is 0 here and set per endpoint.
    entries: BTreeMap<u32, Vec<PolicyEntry>>,
    /// Node-local identities of the CIDR prefixes that rules name.
    cidr_ids: BTreeMap<Ipv4Net, u32>,
    /// Rule ids reported with drops, by rule (`kind/ns/name path`). Never
    /// reused, so an unchanged policy keeps its entries' rule ids.
    rule_ids: BTreeMap<String, u32>,
}

/// What one [`PolicyState::set_policies`] changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PolicyChange {
    /// CIDR identities to add to the ipcache map.
    pub cidr_added: Vec<(Ipv4Net, u32)>,
    /// CIDR prefixes to remove from the ipcache map.
    pub cidr_removed: Vec<Ipv4Net>,
    /// Subject identities whose endpoints need reprogramming: their entries
    /// or their enforcement flags differ from before.
    pub identities: BTreeSet<u32>,
}

impl PolicyChange {
    /// Whether an endpoint of `identity` needs reprogramming.
    pub fn reaches(&self, identity: u32) -> bool {
        self.identities.contains(&identity)
    }
}

impl PolicyState {
    /// Replaces the policies; gives every CIDR prefix they name (and only
    /// those) an identity, keeping the numbers of prefixes still named.
    /// Re-resolves only the identities whose policy changed, or that name
    /// CIDR identities when those changed, and reports which of them now
    /// resolve differently.
    pub fn set_policies(&mut self, policies: BTreeMap<u32, pb::IdentityPolicy>) -> PolicyChange {
        let mut named = BTreeSet::new();
        for p in policies.values() {
            for r in &p.rules {
                if let Some(pb::resolved_rule::Peer::Cidr(c)) = &r.peer {
                    for text in std::iter::once(&c.cidr).chain(c.except.iter()) {
                        // IPv6 has no map yet.
                        if let Ok(net) = text.parse::<Ipv4Net>() {
                            named.insert(net);
                        }
                    }
                }
            }
        }
        let removed: Vec<Ipv4Net> = self
            .cidr_ids
            .keys()
            .filter(|n| !named.contains(n))
            .copied()
            .collect();
        for n in &removed {
            self.cidr_ids.remove(n);
        }
        let mut added = Vec::new();
        for net in named {
            if !self.cidr_ids.contains_key(&net) {
                let used: BTreeSet<u32> = self.cidr_ids.values().copied().collect();
                let id = (CIDR_BASE..)
                    .find(|i| !used.contains(i))
                    .unwrap_or(CIDR_BASE);
                self.cidr_ids.insert(net, id);
                added.push((net, id));
            }
        }
        let cidrs_changed = !added.is_empty() || !removed.is_empty();

        let old = std::mem::replace(&mut self.policies, policies);
        let subjects: BTreeSet<u32> = old.keys().chain(self.policies.keys()).copied().collect();
        let mut identities = BTreeSet::new();
        for id in subjects {
            let (before, after) = (old.get(&id), self.policies.get(&id));
            let same_input = before == after && !(cidrs_changed && after.is_some_and(names_cidrs));
            if same_input {
                continue;
            }
            let entries = after
                .map(|p| resolve(p, &self.cidr_ids, &mut self.rule_ids))
                .unwrap_or_default();
            let flags_changed = before.map(flags) != after.map(flags);
            let previous = if entries.is_empty() {
                self.entries.remove(&id)
            } else {
                self.entries.insert(id, entries.clone())
            };
            if flags_changed || previous.unwrap_or_default() != entries {
                identities.insert(id);
            }
        }
        PolicyChange {
            cidr_added: added,
            cidr_removed: removed,
            identities,
        }
    }

    /// Enforcement flags for an endpoint of `identity`.
    pub fn flags_for(&self, identity: u32) -> u32 {
        self.policies.get(&identity).map(flags).unwrap_or(0)
    }

    /// The rule a drop's `rule_id` names.
    pub fn rule_name(&self, id: u32) -> Option<&str> {
        self.rule_ids
            .iter()
            .find(|(_, v)| **v == id)
            .map(|(k, _)| k.as_str())
    }

    /// The datapath entries of one endpoint.
    pub fn entries_for(&self, endpoint_id: u32, identity: u32) -> Vec<PolicyEntry> {
        self.entries
            .get(&identity)
            .map(|entries| {
                entries
                    .iter()
                    .map(|e| PolicyEntry { endpoint_id, ..*e })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// CIDR identities, for the ipcache map.
    pub fn cidr_identities(&self) -> &BTreeMap<Ipv4Net, u32> {
        &self.cidr_ids
    }
}

fn flags(p: &pb::IdentityPolicy) -> u32 {
    EndpointInfo::enforcement_flags(p.ingress_enforced, p.egress_enforced)
}

/// Whether `p`'s entries depend on the CIDR identities: a CIDR peer, or
/// world (which stands for every CIDR identity too).
fn names_cidrs(p: &pb::IdentityPolicy) -> bool {
    p.rules.iter().any(|r| match &r.peer {
        Some(pb::resolved_rule::Peer::Cidr(_)) => true,
        Some(pb::resolved_rule::Peer::Identities(set)) => set.ids.contains(&WORLD),
        _ => false,
    })
}

fn rule_id(rule_ids: &mut BTreeMap<String, u32>, r: &Option<pb::RuleRef>) -> u32 {
    let key = r
        .as_ref()
        .map(|r| format!("{}/{}/{} {}", r.kind, r.namespace, r.name, r.path))
        .unwrap_or_default();
    let next = rule_ids.len() as u32 + 1;
    *rule_ids.entry(key).or_insert(next)
}

/// The peers a rule matches, as datapath identities (`None` = any peer).
fn peers(
    cidr_ids: &BTreeMap<Ipv4Net, u32>,
    peer: &Option<pb::resolved_rule::Peer>,
) -> Vec<Option<u32>> {
    match peer {
        None | Some(pb::resolved_rule::Peer::Any(_)) => vec![None],
        Some(pb::resolved_rule::Peer::Identities(set)) => {
            let mut out: BTreeSet<u32> = set.ids.iter().copied().collect();
            // World stands for every address outside the cluster, CIDR identities included.
            if out.contains(&WORLD) {
                out.extend(cidr_ids.values().copied());
            }
            out.into_iter().map(Some).collect()
        }
        Some(pb::resolved_rule::Peer::Cidr(c)) => {
            let Ok(p) = c.cidr.parse::<Ipv4Net>() else {
                return Vec::new();
            };
            let except: Vec<Ipv4Net> = c.except.iter().filter_map(|e| e.parse().ok()).collect();
            let mut out: BTreeSet<u32> = cidr_ids
                .iter()
                .filter(|(q, _)| p.contains(*q) && !except.iter().any(|e| e.contains(*q)))
                .map(|(_, id)| *id)
                .collect();
            if p.prefix_len() == 0 && except.is_empty() {
                out.insert(WORLD);
            }
            out.into_iter().map(Some).collect()
        }
    }
}

/// The datapath entries of one identity's policy, for endpoint 0.
fn resolve(
    policy: &pb::IdentityPolicy,
    cidr_ids: &BTreeMap<Ipv4Net, u32>,
    rule_ids: &mut BTreeMap<String, u32>,
) -> Vec<PolicyEntry> {
    let mut out = Vec::new();
    for rule in &policy.rules {
        let direction = match pb::Direction::try_from(rule.direction) {
            Ok(pb::Direction::Ingress) => Direction::Ingress,
            Ok(pb::Direction::Egress) => Direction::Egress,
            _ => continue,
        };
        let verdict = match pb::Verdict::try_from(rule.verdict) {
            Ok(pb::Verdict::Allow) => Verdict::Allow,
            Ok(pb::Verdict::Deny) => Verdict::Deny,
            _ => continue,
        };
        let rule_id = rule_id(rule_ids, &rule.rule);
        let ports = port_matches(&rule.ports);
        for peer in peers(cidr_ids, &rule.peer) {
            for (proto, ports) in &ports {
                out.push(PolicyEntry {
                    endpoint_id: 0,
                    direction,
                    proto: *proto,
                    peer_identity: peer,
                    ports: *ports,
                    verdict,
                    rule_id,
                });
            }
        }
    }
    out
}

/// (protocol, ports) pairs of a rule; an empty list is every port of every protocol.
fn port_matches(ports: &[pb::PortRange]) -> Vec<(Option<u8>, PortMatch)> {
    if ports.is_empty() {
        return vec![(None, PortMatch::Any)];
    }
    let mut out = Vec::new();
    for p in ports {
        let range = if p.lo == 0 && p.hi >= 65535 {
            PortMatch::Any
        } else {
            let lo = p.lo.clamp(1, 65535) as u16;
            let hi = p.hi.clamp(u32::from(lo), 65535) as u16;
            PortMatch::Range(lo, hi)
        };
        match pb::Protocol::try_from(p.protocol) {
            Ok(pb::Protocol::Tcp) => out.push((Some(6), range)),
            Ok(pb::Protocol::Udp) => out.push((Some(17), range)),
            Ok(pb::Protocol::Icmp) => out.push((Some(1), PortMatch::Any)),
            _ => {
                out.push((Some(6), range));
                out.push((Some(17), range));
            }
        }
    }
    out
}

/// Decodes the policy service's resources.
pub fn decode(
    state: &BTreeMap<String, prost_types::Any>,
) -> Result<BTreeMap<u32, pb::IdentityPolicy>, String> {
    let mut out = BTreeMap::new();
    for (key, value) in state {
        if !key.starts_with(POLICY_PREFIX) {
            continue;
        }
        let p = decode_one(key, value)?;
        out.insert(p.identity, p);
    }
    Ok(out)
}

const POLICY_PREFIX: &str = "policy/";

fn decode_one(key: &str, value: &prost_types::Any) -> Result<pb::IdentityPolicy, String> {
    value.to_msg().map_err(|e| format!("resource `{key}`: {e}"))
}

/// The decoded `policy/<id>` resources, kept between applies so that only
/// the resources that changed are decoded again.
#[derive(Debug, Default)]
pub struct PolicyDecoder {
    /// Decoded resources, by key.
    decoded: BTreeMap<String, pb::IdentityPolicy>,
    /// Keys named as changed by an apply that did not succeed: a retry is
    /// handed no changed keys, yet must still decode them.
    pending: BTreeSet<String>,
}

impl PolicyDecoder {
    /// The policies `state` holds, by subject identity (as [`decode`]
    /// returns them). Decodes the `changed` keys, the keys of earlier calls
    /// not yet [`PolicyDecoder::applied`], and any key whose presence
    /// differs from the last call, so a full snapshot with an incomplete
    /// `changed` list is still read right. Fails, keeping everything as it
    /// was, if any of them does not decode.
    pub fn update(
        &mut self,
        state: &BTreeMap<String, prost_types::Any>,
        changed: &[String],
    ) -> Result<BTreeMap<u32, pb::IdentityPolicy>, String> {
        self.pending.extend(
            changed
                .iter()
                .filter(|k| k.starts_with(POLICY_PREFIX))
                .cloned(),
        );
        let appeared = state
            .keys()
            .filter(|k| k.starts_with(POLICY_PREFIX) && !self.decoded.contains_key(*k));
        let vanished = self.decoded.keys().filter(|k| !state.contains_key(*k));
        let todo: BTreeSet<&String> = self
            .pending
            .iter()
            .chain(appeared)
            .chain(vanished)
            .collect();
        // Decode everything first: bad input changes nothing.
        let mut updates = Vec::with_capacity(todo.len());
        for key in todo {
            let value = state.get(key).map(|v| decode_one(key, v)).transpose()?;
            updates.push((key.clone(), value));
        }
        for (key, value) in updates {
            match value {
                Some(p) => self.decoded.insert(key, p),
                None => self.decoded.remove(&key),
            };
        }
        Ok(self
            .decoded
            .values()
            .map(|p| (p.identity, p.clone()))
            .collect())
    }

    /// The policies of the last [`PolicyDecoder::update`] are in the datapath.
    pub fn applied(&mut self) {
        self.pending.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(
        dir: pb::Direction,
        verdict: pb::Verdict,
        peer: pb::resolved_rule::Peer,
        ports: Vec<pb::PortRange>,
    ) -> pb::ResolvedRule {
        pb::ResolvedRule {
            direction: dir as i32,
            verdict: verdict as i32,
            peer: Some(peer),
            ports,
            rule: Some(pb::RuleRef {
                kind: "CiliumNetworkPolicy".into(),
                namespace: "default".into(),
                name: "p".into(),
                section: "ingress".into(),
                index: 0,
                path: "spec.ingress[0]".into(),
            }),
            l7_not_enforced: false,
        }
    }

    fn cidr(c: &str, except: &[&str]) -> pb::resolved_rule::Peer {
        pb::resolved_rule::Peer::Cidr(pb::CidrPeer {
            cidr: c.into(),
            except: except.iter().map(|s| s.to_string()).collect(),
        })
    }

    #[test]
    fn cidr_rules_apply_to_every_named_prefix_inside_them_except_excepts() {
        let mut st = PolicyState::default();
        let p = pb::IdentityPolicy {
            identity: 300,
            ingress_enforced: true,
            egress_enforced: false,
            rules: vec![
                rule(
                    pb::Direction::Ingress,
                    pb::Verdict::Deny,
                    cidr("192.0.2.0/24", &[]),
                    vec![],
                ),
                rule(
                    pb::Direction::Ingress,
                    pb::Verdict::Allow,
                    cidr("192.0.2.3/32", &[]),
                    vec![],
                ),
                rule(
                    pb::Direction::Ingress,
                    pb::Verdict::Allow,
                    cidr("198.51.100.0/24", &["198.51.100.128/25"]),
                    vec![],
                ),
            ],
        };
        let change = st.set_policies([(300, p)].into_iter().collect());
        assert_eq!(change.cidr_added.len(), 4);
        assert!(change.cidr_removed.is_empty());
        let id = |n: &str| st.cidr_identities()[&n.parse::<Ipv4Net>().expect("net")];
        let (slash24, slash32, allowed, excepted) = (
            id("192.0.2.0/24"),
            id("192.0.2.3/32"),
            id("198.51.100.0/24"),
            id("198.51.100.128/25"),
        );
        let entries = st.entries_for(7, 300);
        let peers_of = |v: Verdict| -> BTreeSet<u32> {
            entries
                .iter()
                .filter(|e| e.verdict == v)
                .filter_map(|e| e.peer_identity)
                .collect()
        };
        // The /32 inside the denied /24 is denied too (deny wins in the datapath).
        assert_eq!(
            peers_of(Verdict::Deny),
            [slash24, slash32].into_iter().collect()
        );
        assert!(peers_of(Verdict::Allow).contains(&allowed));
        assert!(!peers_of(Verdict::Allow).contains(&excepted));
        assert_eq!(st.flags_for(300), EndpointInfo::INGRESS_ENFORCED);
        assert_eq!(st.flags_for(301), 0);
        // Dropping the policy frees its CIDR identities.
        let change = st.set_policies(BTreeMap::new());
        assert_eq!(change.cidr_removed.len(), 4);
        assert!(st.entries_for(7, 300).is_empty());
    }

    #[test]
    fn any_protocol_ports_become_tcp_and_udp_and_no_ports_mean_everything() {
        assert_eq!(port_matches(&[]), vec![(None, PortMatch::Any)]);
        let any80 = pb::PortRange {
            protocol: pb::Protocol::Any as i32,
            lo: 80,
            hi: 80,
        };
        assert_eq!(
            port_matches(&[any80]),
            vec![
                (Some(6), PortMatch::Range(80, 80)),
                (Some(17), PortMatch::Range(80, 80))
            ]
        );
        let all_tcp = pb::PortRange {
            protocol: pb::Protocol::Tcp as i32,
            lo: 0,
            hi: 65535,
        };
        assert_eq!(port_matches(&[all_tcp]), vec![(Some(6), PortMatch::Any)]);
    }

    #[test]
    fn world_in_an_identity_set_covers_cidr_identities() {
        let mut st = PolicyState::default();
        let p = pb::IdentityPolicy {
            identity: 300,
            ingress_enforced: true,
            egress_enforced: false,
            rules: vec![
                rule(
                    pb::Direction::Ingress,
                    pb::Verdict::Deny,
                    pb::resolved_rule::Peer::Identities(pb::IdentitySet { ids: vec![2] }),
                    vec![],
                ),
                rule(
                    pb::Direction::Ingress,
                    pb::Verdict::Allow,
                    cidr("203.0.113.0/24", &[]),
                    vec![],
                ),
            ],
        };
        st.set_policies([(300, p)].into_iter().collect());
        let denied: BTreeSet<u32> = st
            .entries_for(1, 300)
            .iter()
            .filter(|e| e.verdict == Verdict::Deny)
            .filter_map(|e| e.peer_identity)
            .collect();
        assert!(denied.contains(&2) && denied.contains(&CIDR_BASE));
    }

    /// A policy of `identity` allowing TCP from `peer` on each of `ports`.
    fn allow_from(identity: u32, peer: u32, ports: &[u32]) -> pb::IdentityPolicy {
        pb::IdentityPolicy {
            identity,
            ingress_enforced: true,
            egress_enforced: false,
            rules: ports
                .iter()
                .map(|&port| {
                    rule(
                        pb::Direction::Ingress,
                        pb::Verdict::Allow,
                        pb::resolved_rule::Peer::Identities(pb::IdentitySet { ids: vec![peer] }),
                        vec![pb::PortRange {
                            protocol: pb::Protocol::Tcp as i32,
                            lo: port,
                            hi: port,
                        }],
                    )
                })
                .collect(),
        }
    }

    fn policies(ps: &[pb::IdentityPolicy]) -> BTreeMap<u32, pb::IdentityPolicy> {
        ps.iter().map(|p| (p.identity, p.clone())).collect()
    }

    #[test]
    fn changing_one_identitys_policy_reaches_only_that_identitys_endpoints() {
        let mut st = PolicyState::default();
        let first = st.set_policies(policies(&[
            allow_from(300, 400, &[80]),
            allow_from(301, 400, &[80]),
        ]));
        assert_eq!(first.identities, [300, 301].into_iter().collect());

        let change = st.set_policies(policies(&[
            allow_from(300, 400, &[80, 443]),
            allow_from(301, 400, &[80]),
        ]));
        assert_eq!(change.identities, [300].into_iter().collect());
        // Endpoints 1 and 2 are of identity 300, 3 of 301, 4 has no policy.
        let endpoints = [(1, 300), (2, 300), (3, 301), (4, 302)];
        let reached: Vec<u32> = endpoints
            .iter()
            .filter(|(_, identity)| change.reaches(*identity))
            .map(|(id, _)| *id)
            .collect();
        assert_eq!(reached, [1, 2]);
        assert_eq!(st.entries_for(2, 300).len(), 2);
        assert!(st.entries_for(2, 300).iter().all(|e| e.endpoint_id == 2));
        assert_eq!(st.entries_for(3, 301).len(), 1);
    }

    #[test]
    fn the_same_policies_again_change_nothing() {
        let mut st = PolicyState::default();
        let all = policies(&[allow_from(300, 400, &[80]), allow_from(301, 2, &[53])]);
        st.set_policies(all.clone());
        let entries = st.entries_for(1, 300);
        assert_eq!(st.set_policies(all), PolicyChange::default());
        assert_eq!(st.entries_for(1, 300), entries, "rule ids are kept");
    }

    #[test]
    fn dropping_a_policy_or_only_its_enforcement_reaches_its_endpoints() {
        let mut st = PolicyState::default();
        st.set_policies(policies(&[
            allow_from(300, 400, &[80]),
            allow_from(301, 400, &[80]),
        ]));
        let mut relaxed = allow_from(301, 400, &[80]);
        relaxed.ingress_enforced = false;
        let change = st.set_policies(policies(&[relaxed]));
        assert_eq!(change.identities, [300, 301].into_iter().collect());
        assert!(st.entries_for(1, 300).is_empty());
        assert_eq!(st.flags_for(300), 0);
        assert_eq!(st.flags_for(301), 0);
    }

    #[test]
    fn a_new_cidr_identity_reaches_the_policies_naming_world_and_no_other() {
        let mut st = PolicyState::default();
        let world = allow_from(300, WORLD, &[80]);
        let pods = allow_from(301, 400, &[80]);
        st.set_policies(policies(&[world.clone(), pods.clone()]));
        let cidr = pb::IdentityPolicy {
            identity: 302,
            ingress_enforced: false,
            egress_enforced: true,
            rules: vec![rule(
                pb::Direction::Egress,
                pb::Verdict::Allow,
                cidr("192.0.2.0/24", &[]),
                vec![],
            )],
        };
        let change = st.set_policies(policies(&[world, pods, cidr]));
        assert_eq!(
            change.cidr_added,
            [("192.0.2.0/24".parse().expect("net"), CIDR_BASE)]
        );
        // 300's world now covers the CIDR identity too; 301 does not change.
        assert_eq!(change.identities, [300, 302].into_iter().collect());
        assert!(
            st.entries_for(1, 300)
                .iter()
                .any(|e| e.peer_identity == Some(CIDR_BASE))
        );
    }

    fn resource(p: &pb::IdentityPolicy) -> (String, prost_types::Any) {
        let any = prost_types::Any::from_msg(p).expect("encode");
        (format!("policy/{}", p.identity), any)
    }

    fn garbage() -> prost_types::Any {
        prost_types::Any {
            type_url: "type.googleapis.com/membrane.policy.v1.IdentityPolicy".into(),
            value: vec![0xff; 3],
        }
    }

    #[test]
    fn the_decoder_reads_a_full_snapshot_like_decode_does() {
        let state: BTreeMap<String, prost_types::Any> = [
            resource(&allow_from(300, 400, &[80])),
            resource(&allow_from(301, 400, &[443])),
        ]
        .into_iter()
        .collect();
        let mut d = PolicyDecoder::default();
        // No changed keys at all: keys the decoder has not seen are decoded anyway.
        assert_eq!(d.update(&state, &[]), decode(&state));
        d.applied();
        let fewer: BTreeMap<_, _> = [resource(&allow_from(301, 400, &[443]))]
            .into_iter()
            .collect();
        assert_eq!(
            d.update(&fewer, &[]),
            decode(&fewer),
            "a vanished key is dropped"
        );
    }

    #[test]
    fn the_decoder_decodes_only_changed_keys_and_bad_input_changes_nothing() {
        let (k300, v300) = resource(&allow_from(300, 400, &[80]));
        let (k301, v301) = resource(&allow_from(301, 400, &[443]));
        let mut d = PolicyDecoder::default();
        let state: BTreeMap<_, _> = [(k300.clone(), v300), (k301.clone(), v301.clone())].into();
        let before = d
            .update(&state, &[k300.clone(), k301.clone()])
            .expect("decodes");
        d.applied();

        // 301 changed; 300's bytes are not looked at again (here: unreadable).
        let (_, v301b) = resource(&allow_from(301, 400, &[8443]));
        let next: BTreeMap<_, _> = [(k300.clone(), garbage()), (k301.clone(), v301b)].into();
        let got = d
            .update(&next, std::slice::from_ref(&k301))
            .expect("decodes");
        assert_eq!(got[&300], before[&300]);
        assert_eq!(got[&301].rules[0].ports[0].lo, 8443);
        d.applied();

        // A bad changed resource fails the update; its retry (which names
        // no changed keys) fails too, until the resource is fixed.
        let bad: BTreeMap<_, _> = [(k300.clone(), garbage()), (k301.clone(), v301)].into();
        assert!(d.update(&bad, &[k300.clone(), k301.clone()]).is_err());
        assert!(d.update(&bad, &[]).is_err(), "the retry decodes them again");
        let (_, v300b) = resource(&allow_from(300, 400, &[81]));
        let fixed: BTreeMap<_, _> =
            [(k300.clone(), v300b), (k301.clone(), next[&k301].clone())].into();
        let got = d.update(&fixed, &[]).expect("decodes");
        assert_eq!(got[&300].rules[0].ports[0].lo, 81);
        assert_eq!(got[&301].rules[0].ports[0].lo, 8443);
    }
}

/// Applies the policy service's stream to every local endpoint.
#[derive(Debug)]
pub struct PolicySink {
    endpoints: std::sync::Arc<crate::endpoints::EndpointManager>,
    decoder: PolicyDecoder,
}

impl PolicySink {
    /// Programs the endpoints of `endpoints`.
    pub fn new(endpoints: std::sync::Arc<crate::endpoints::EndpointManager>) -> Self {
        Self {
            endpoints,
            decoder: PolicyDecoder::default(),
        }
    }
}

impl membrane_runtime::stream::StateSink for PolicySink {
    async fn apply(
        &mut self,
        version: u64,
        state: &BTreeMap<String, prost_types::Any>,
        changed: &[String],
    ) -> Result<(), String> {
        let policies = self.decoder.update(state, changed)?;
        let n = policies.len();
        let reprogrammed = self
            .endpoints
            .apply_policies(policies)
            .await
            .map_err(|e| e.to_string())?;
        self.decoder.applied();
        tracing::info!(version, identities = n, reprogrammed, "policy applied");
        Ok(())
    }
}
