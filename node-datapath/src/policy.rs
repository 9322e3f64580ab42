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

use crate::bpf::{Datapath, Direction, EndpointInfo, PolicyEntry, PortMatch, Verdict};
use crate::endpoints::EndpointRecord;

/// First node-local CIDR identity (`membrane.identity.v1.IdentityRange`).
pub const CIDR_BASE: u32 = 1 << 24;
const WORLD: u32 = 2;

/// The policy state this node enforces.
#[derive(Debug, Default)]
pub struct PolicyState {
    /// Resolved policy per subject identity.
    policies: BTreeMap<u32, pb::IdentityPolicy>,
    /// Node-local identities of the CIDR prefixes that rules name.
    cidr_ids: BTreeMap<Ipv4Net, u32>,
    /// Rule ids reported with drops, by rule (`kind/ns/name path`).
    rule_ids: BTreeMap<String, u32>,
}

impl PolicyState {
    /// Replaces the policies; gives every CIDR prefix they name (and only
    /// those) an identity, keeping the numbers of prefixes still named.
    /// Returns the CIDR entries to add and to remove from the ipcache map.
    pub fn set_policies(
        &mut self,
        policies: BTreeMap<u32, pb::IdentityPolicy>,
    ) -> (Vec<(Ipv4Net, u32)>, Vec<Ipv4Net>) {
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
        self.policies = policies;
        (added, removed)
    }

    /// Enforcement flags for an endpoint of `identity`.
    pub fn flags_for(&self, identity: u32) -> u32 {
        self.policies
            .get(&identity)
            .map(|p| EndpointInfo::enforcement_flags(p.ingress_enforced, p.egress_enforced))
            .unwrap_or(0)
    }

    fn rule_id(&mut self, r: &Option<pb::RuleRef>) -> u32 {
        let key = r
            .as_ref()
            .map(|r| format!("{}/{}/{} {}", r.kind, r.namespace, r.name, r.path))
            .unwrap_or_default();
        let next = self.rule_ids.len() as u32 + 1;
        *self.rule_ids.entry(key).or_insert(next)
    }

    /// The rule a drop's `rule_id` names.
    pub fn rule_name(&self, id: u32) -> Option<&str> {
        self.rule_ids
            .iter()
            .find(|(_, v)| **v == id)
            .map(|(k, _)| k.as_str())
    }

    /// The peers a rule matches, as datapath identities (`None` = any peer).
    fn peers(&self, peer: &Option<pb::resolved_rule::Peer>) -> Vec<Option<u32>> {
        match peer {
            None | Some(pb::resolved_rule::Peer::Any(_)) => vec![None],
            Some(pb::resolved_rule::Peer::Identities(set)) => {
                let mut out: BTreeSet<u32> = set.ids.iter().copied().collect();
                // World stands for every address outside the cluster, CIDR identities included.
                if out.contains(&WORLD) {
                    out.extend(self.cidr_ids.values().copied());
                }
                out.into_iter().map(Some).collect()
            }
            Some(pb::resolved_rule::Peer::Cidr(c)) => {
                let Ok(p) = c.cidr.parse::<Ipv4Net>() else {
                    return Vec::new();
                };
                let except: Vec<Ipv4Net> = c.except.iter().filter_map(|e| e.parse().ok()).collect();
                let mut out: BTreeSet<u32> = self
                    .cidr_ids
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

    /// The datapath entries of one endpoint.
    pub fn entries_for(&mut self, endpoint_id: u32, identity: u32) -> Vec<PolicyEntry> {
        let Some(policy) = self.policies.get(&identity).cloned() else {
            return Vec::new();
        };
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
            let rule_id = self.rule_id(&rule.rule);
            let ports = port_matches(&rule.ports);
            for peer in self.peers(&rule.peer) {
                for (proto, ports) in &ports {
                    out.push(PolicyEntry {
                        endpoint_id,
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

    /// CIDR identities, for the ipcache map.
    pub fn cidr_identities(&self) -> &BTreeMap<Ipv4Net, u32> {
        &self.cidr_ids
    }
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

/// Programs one endpoint's policy and enforcement into the datapath.
pub fn program_endpoint(
    state: &mut PolicyState,
    dp: &mut Datapath,
    r: &EndpointRecord,
) -> Result<(), String> {
    let entries = state.entries_for(r.id, r.identity);
    dp.replace_endpoint_policy(r.id, &entries)
        .map_err(|e| format!("policy of endpoint {}: {e:#}", r.id))?;
    let flags = state.flags_for(r.identity);
    dp.set_endpoint_enforcement(
        r.ip,
        flags & EndpointInfo::INGRESS_ENFORCED != 0,
        flags & EndpointInfo::EGRESS_ENFORCED != 0,
    )
    .map_err(|e| format!("enforcement of endpoint {}: {e:#}", r.id))
}

/// Decodes the policy service's resources.
pub fn decode(
    state: &BTreeMap<String, prost_types::Any>,
) -> Result<BTreeMap<u32, pb::IdentityPolicy>, String> {
    let mut out = BTreeMap::new();
    for (key, value) in state {
        if !key.starts_with("policy/") {
            continue;
        }
        let p: pb::IdentityPolicy = value
            .to_msg()
            .map_err(|e| format!("resource `{key}`: {e}"))?;
        out.insert(p.identity, p);
    }
    Ok(out)
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
        let (added, removed) = st.set_policies([(300, p)].into_iter().collect());
        assert_eq!(added.len(), 4);
        assert!(removed.is_empty());
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
        let (_, removed) = st.set_policies(BTreeMap::new());
        assert_eq!(removed.len(), 4);
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
}

/// Applies the policy service's stream to every local endpoint.
#[derive(Debug)]
pub struct PolicySink {
    endpoints: std::sync::Arc<crate::endpoints::EndpointManager>,
}

impl PolicySink {
    /// Programs the endpoints of `endpoints`.
    pub fn new(endpoints: std::sync::Arc<crate::endpoints::EndpointManager>) -> Self {
        Self { endpoints }
    }
}

impl membrane_runtime::stream::StateSink for PolicySink {
    async fn apply(
        &mut self,
        version: u64,
        state: &BTreeMap<String, prost_types::Any>,
        _changed: &[String],
    ) -> Result<(), String> {
        // Decode everything first: bad input changes nothing.
        let policies = decode(state)?;
        let n = policies.len();
        self.endpoints
            .apply_policies(policies)
            .await
            .map_err(|e| e.to_string())?;
        tracing::info!(version, identities = n, "policy applied");
        Ok(())
    }
}
