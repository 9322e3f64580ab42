// SPDX-License-Identifier: Apache-2.0
//! Network policy as the datapath stores it, and the encoding from rules to
//! policy map entries. Plain Rust, no aya: unit-tested here.
//!
//! The map (`mb_policy`, see `struct policy_key` in `bpf/lib/common.h`) is
//! an LPM trie keyed by `(endpoint, direction, peer identity, protocol,
//! destination port)` where only the port is wildcarded by the prefix
//! length. A *group* is one `(endpoint, direction, peer, protocol)`, with
//! `None` (any) a group of its own. The datapath looks up four groups per
//! packet and lets a deny in any of them win; it relies on userspace for
//! deny-wins *within* a group. So [`encode`] resolves each group over the
//! port space first (deny beats allow; among rules with the same verdict the
//! lowest `rule_id` names the result), and writes disjoint port ranges, each
//! as the aligned power-of-two blocks (prefixes) that tile it.

use std::collections::BTreeMap;

use super::{abi, types::Direction};

/// Reserved security identities (`IDENTITY_*` in `common.h`).
pub mod identity {
    /// No identity known (an endpoint whose identity is not assigned yet).
    pub const UNKNOWN: u32 = super::abi::IDENTITY_UNKNOWN;
    /// This node.
    pub const HOST: u32 = super::abi::IDENTITY_HOST;
    /// Any address the ipcache does not cover.
    pub const WORLD: u32 = super::abi::IDENTITY_WORLD;
    pub const UNMANAGED: u32 = super::abi::IDENTITY_UNMANAGED;
    pub const HEALTH: u32 = super::abi::IDENTITY_HEALTH;
    pub const INIT: u32 = super::abi::IDENTITY_INIT;
    /// Another node of the cluster.
    pub const REMOTE_NODE: u32 = super::abi::IDENTITY_REMOTE_NODE;
    /// Cluster-wide, label-derived identities: `GLOBAL_MIN..=GLOBAL_MAX`.
    pub const GLOBAL_MIN: u32 = super::abi::IDENTITY_GLOBAL_MIN;
    pub const GLOBAL_MAX: u32 = super::abi::IDENTITY_GLOBAL_MAX;
    /// Node-local identities of CIDR prefixes start here.
    pub const LOCAL_CIDR_BASE: u32 = super::abi::IDENTITY_LOCAL_CIDR_BASE;
}

/// What a policy entry does with the packets it matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Verdict {
    Allow,
    Deny,
}

/// The destination ports an entry matches. Only TCP and UDP have ports in
/// the datapath; every other protocol is looked up with port 0, which only
/// [`PortMatch::Any`] covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PortMatch {
    Any,
    /// `lo..=hi`, with `1 <= lo <= hi`.
    Range(u16, u16),
}

/// One policy rule of one endpoint, in one direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyEntry {
    pub endpoint_id: u32,
    pub direction: Direction,
    /// IP protocol number (6 TCP, 17 UDP, 1 ICMP); `None` for any.
    pub proto: Option<u8>,
    /// The peer's identity (source for ingress, destination for egress);
    /// `None` for any peer.
    pub peer_identity: Option<u32>,
    pub ports: PortMatch,
    pub verdict: Verdict,
    /// Reported with the drops a deny causes; opaque to the datapath.
    pub rule_id: u32,
}

/// A rule the datapath cannot represent.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("rule {rule_id}: endpoint {got} in a policy for endpoint {expected}")]
    WrongEndpoint {
        rule_id: u32,
        expected: u32,
        got: u32,
    },
    #[error(
        "rule {rule_id}: port range {lo}-{hi} is empty or includes port 0 (use PortMatch::Any)"
    )]
    InvalidPortRange { rule_id: u32, lo: u16, hi: u16 },
    #[error("rule {rule_id}: protocol {proto} has no ports; only TCP (6) and UDP (17) do")]
    PortsWithoutPorts { rule_id: u32, proto: u8 },
    #[error("rule {rule_id}: protocol 0 means any protocol: use `None`")]
    ProtoZero { rule_id: u32 },
    #[error("rule {rule_id}: peer identity 0 means any peer: use `None`")]
    PeerZero { rule_id: u32 },
}

/// A policy map key, in plain numbers: `port_bits` leading bits of `port`
/// are matched (0: any port, 16: exactly `port`). `proto` 0 / `peer` 0 mean any.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct MapKey {
    pub endpoint_id: u32,
    pub direction: Direction,
    pub peer: u32,
    pub proto: u8,
    pub port: u16,
    pub port_bits: u8,
}

/// A policy map value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct MapValue {
    pub verdict: Verdict,
    pub rule_id: u32,
}

/// A resolved, disjoint port segment of one group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Segment {
    pub lo: u16,
    pub hi: u16,
    pub verdict: Verdict,
    pub rule_id: u32,
}

const PORT_SPACE: u32 = 1 << 16;

/// The map entries for `endpoint_id`'s whole policy.
pub(crate) fn encode(
    endpoint_id: u32,
    entries: &[PolicyEntry],
) -> Result<BTreeMap<MapKey, MapValue>, PolicyError> {
    type Group = (Direction, u32, u8);
    let mut groups: BTreeMap<Group, Vec<(u16, u16, Verdict, u32)>> = BTreeMap::new();
    for e in entries {
        let (peer, proto, lo, hi) = validate(endpoint_id, e)?;
        groups
            .entry((e.direction, peer, proto))
            .or_default()
            .push((lo, hi, e.verdict, e.rule_id));
    }
    let mut out = BTreeMap::new();
    for ((direction, peer, proto), rules) in groups {
        for seg in resolve_group(&rules) {
            for (port, port_bits) in range_to_prefixes(seg.lo, seg.hi) {
                let key = MapKey {
                    endpoint_id,
                    direction,
                    peer,
                    proto,
                    port,
                    port_bits,
                };
                let value = MapValue {
                    verdict: seg.verdict,
                    rule_id: seg.rule_id,
                };
                out.insert(key, value);
            }
        }
    }
    Ok(out)
}

/// How many map entries one [`super::Datapath::replace_endpoint_policy`] touched.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyUpdate {
    /// New or changed entries written.
    pub written: usize,
    /// Stale entries deleted.
    pub deleted: usize,
}

/// What turns an endpoint's programmed entries into the desired ones.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct PolicyDiff {
    /// New or changed entries, to write first (so a port both policies
    /// allow is never dropped on the way).
    pub writes: Vec<(MapKey, MapValue)>,
    /// Keys only the programmed entries have, to delete afterwards.
    pub deletes: Vec<MapKey>,
}

/// The writes and deletes from `current` to `desired`: entries equal in
/// both are left alone, so an unchanged policy costs no map operation.
pub(crate) fn diff(
    current: &BTreeMap<MapKey, MapValue>,
    desired: &BTreeMap<MapKey, MapValue>,
) -> PolicyDiff {
    PolicyDiff {
        writes: desired
            .iter()
            .filter(|(k, v)| current.get(k) != Some(v))
            .map(|(k, v)| (*k, *v))
            .collect(),
        deletes: current
            .keys()
            .filter(|k| !desired.contains_key(k))
            .copied()
            .collect(),
    }
}

/// `(peer, proto, lo, hi)` in map terms, or why the rule cannot be stored.
fn validate(endpoint_id: u32, e: &PolicyEntry) -> Result<(u32, u8, u16, u16), PolicyError> {
    let rule_id = e.rule_id;
    if e.endpoint_id != endpoint_id {
        return Err(PolicyError::WrongEndpoint {
            rule_id,
            expected: endpoint_id,
            got: e.endpoint_id,
        });
    }
    let proto = match e.proto {
        Some(0) => return Err(PolicyError::ProtoZero { rule_id }),
        Some(p) => p,
        None => abi::POLICY_PROTO_ANY,
    };
    let peer = match e.peer_identity {
        Some(0) => return Err(PolicyError::PeerZero { rule_id }),
        Some(p) => p,
        None => abi::POLICY_PEER_ANY,
    };
    let (lo, hi) = match e.ports {
        PortMatch::Any => (0, u16::MAX),
        PortMatch::Range(lo, hi) => {
            if lo == 0 || lo > hi {
                return Err(PolicyError::InvalidPortRange { rule_id, lo, hi });
            }
            if !matches!(e.proto, None | Some(6) | Some(17)) {
                return Err(PolicyError::PortsWithoutPorts { rule_id, proto });
            }
            (lo, hi)
        }
    };
    Ok((peer, proto, lo, hi))
}

/// Resolves one group's rules `(lo, hi, verdict, rule_id)` into sorted,
/// disjoint segments: on every port a deny covering it wins over any allow,
/// and among the winning verdict's rules the lowest `rule_id` is reported.
/// Adjacent ports with the same outcome form one segment; ports no rule
/// covers have none. A sweep over range boundaries: O(n log n).
pub(crate) fn resolve_group(rules: &[(u16, u16, Verdict, u32)]) -> Vec<Segment> {
    // (position, +1 / -1, verdict, rule): a rule is active on lo..hi+1.
    let mut events: Vec<(u32, i8, Verdict, u32)> = Vec::with_capacity(rules.len() * 2);
    for &(lo, hi, verdict, rule_id) in rules {
        events.push((u32::from(lo), 1, verdict, rule_id));
        events.push((u32::from(hi) + 1, -1, verdict, rule_id));
    }
    events.sort_unstable();

    // Active rules per verdict: rule_id -> how many of its ranges cover here.
    let mut active: [BTreeMap<u32, usize>; 2] = [BTreeMap::new(), BTreeMap::new()];
    let slot = |v: Verdict| match v {
        Verdict::Deny => 0,
        Verdict::Allow => 1,
    };
    let mut out: Vec<Segment> = Vec::new();
    let mut i = 0;
    while i < events.len() {
        let pos = events[i].0;
        while i < events.len() && events[i].0 == pos {
            let (_, delta, verdict, rule_id) = events[i];
            let set = &mut active[slot(verdict)];
            if delta > 0 {
                *set.entry(rule_id).or_default() += 1;
            } else if let Some(n) = set.get_mut(&rule_id) {
                *n -= 1;
                if *n == 0 {
                    set.remove(&rule_id);
                }
            }
            i += 1;
        }
        if pos >= PORT_SPACE {
            break;
        }
        let next = events.get(i).map_or(PORT_SPACE, |e| e.0);
        let winner = [Verdict::Deny, Verdict::Allow]
            .into_iter()
            .find_map(|v| active[slot(v)].keys().next().map(|&id| (v, id)));
        let Some((verdict, rule_id)) = winner else {
            continue;
        };
        // Both fit in u16: pos < 2^16 and next - 1 < 2^16.
        let (lo, hi) = (pos as u16, (next - 1) as u16);
        match out.last_mut() {
            Some(last)
                if u32::from(last.hi) + 1 == pos
                    && last.verdict == verdict
                    && last.rule_id == rule_id =>
            {
                last.hi = hi;
            }
            _ => out.push(Segment {
                lo,
                hi,
                verdict,
                rule_id,
            }),
        }
    }
    out
}

/// The aligned power-of-two port blocks that exactly tile `lo..=hi`, as
/// `(base port, leading bits matched)`; at most 30 for any range.
pub(crate) fn range_to_prefixes(lo: u16, hi: u16) -> Vec<(u16, u8)> {
    let mut out = Vec::new();
    let (mut lo, hi) = (u32::from(lo), u32::from(hi));
    while lo <= hi {
        // The largest block aligned at lo that does not run past hi.
        let mut k = if lo == 0 {
            16
        } else {
            lo.trailing_zeros().min(16)
        };
        while lo + (1 << k) - 1 > hi {
            k -= 1;
        }
        // lo < 2^16 and k <= 16.
        out.push((lo as u16, (16 - k) as u8));
        lo += 1 << k;
    }
    out
}

// === conversions to and from the wire types ===

impl MapKey {
    pub(crate) fn prefix_len(&self) -> u32 {
        abi::POLICY_PREFIX_FIXED + u32::from(self.port_bits)
    }

    pub(crate) fn to_raw(self) -> abi::PolicyKeyData {
        abi::PolicyKeyData {
            endpoint_id: self.endpoint_id,
            peer_identity: self.peer,
            direction: self.direction.to_code(),
            proto: self.proto,
            dport: self.port.to_be_bytes(),
        }
    }

    /// `None` for a key no encoder of this build writes.
    pub(crate) fn from_raw(prefix_len: u32, k: abi::PolicyKeyData) -> Option<Self> {
        let port_bits = prefix_len.checked_sub(abi::POLICY_PREFIX_FIXED)?;
        if port_bits > 16 {
            return None;
        }
        Some(Self {
            endpoint_id: k.endpoint_id,
            direction: Direction::from_code(k.direction)?,
            peer: k.peer_identity,
            proto: k.proto,
            port: u16::from_be_bytes(k.dport),
            port_bits: port_bits as u8,
        })
    }

    /// The entry this key and `value` stand for (ports as the block they cover).
    pub(crate) fn to_entry(self, value: MapValue) -> PolicyEntry {
        let ports = if self.port_bits == 0 {
            PortMatch::Any
        } else {
            let span = (1u32 << (16 - self.port_bits)) - 1;
            // port is block-aligned, so port + span stays within u16.
            PortMatch::Range(self.port, (u32::from(self.port) + span) as u16)
        };
        PolicyEntry {
            endpoint_id: self.endpoint_id,
            direction: self.direction,
            proto: (self.proto != abi::POLICY_PROTO_ANY).then_some(self.proto),
            peer_identity: (self.peer != abi::POLICY_PEER_ANY).then_some(self.peer),
            ports,
            verdict: value.verdict,
            rule_id: value.rule_id,
        }
    }
}

impl MapValue {
    pub(crate) fn to_raw(self) -> abi::PolicyValueRaw {
        abi::PolicyValueRaw {
            verdict: match self.verdict {
                Verdict::Allow => abi::POLICY_ALLOW,
                Verdict::Deny => abi::POLICY_DENY,
            },
            pad: [0; 3],
            rule_id: self.rule_id,
        }
    }

    pub(crate) fn from_raw(v: abi::PolicyValueRaw) -> Option<Self> {
        let verdict = match v.verdict {
            abi::POLICY_ALLOW => Verdict::Allow,
            abi::POLICY_DENY => Verdict::Deny,
            _ => return None,
        };
        Some(Self {
            verdict,
            rule_id: v.rule_id,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The verdict the datapath would reach for one group on `port`: the
    /// longest matching prefix, as the LPM trie picks it.
    fn lpm(entries: &BTreeMap<MapKey, MapValue>, port: u16) -> Option<(Verdict, u32)> {
        entries
            .iter()
            .filter(|(k, _)| {
                let shift = 16 - u32::from(k.port_bits);
                k.port_bits == 0 || (u32::from(k.port) >> shift) == (u32::from(port) >> shift)
            })
            .max_by_key(|(k, _)| k.port_bits)
            .map(|(_, v)| (v.verdict, v.rule_id))
    }

    fn rule(verdict: Verdict, ports: PortMatch, rule_id: u32) -> PolicyEntry {
        PolicyEntry {
            endpoint_id: 7,
            direction: Direction::Ingress,
            proto: Some(6),
            peer_identity: Some(1000),
            ports,
            verdict,
            rule_id,
        }
    }

    #[test]
    fn a_single_port_is_one_full_prefix_and_any_is_the_empty_prefix() {
        assert_eq!(range_to_prefixes(80, 80), [(80, 16)]);
        assert_eq!(range_to_prefixes(0, 65535), [(0, 0)]);
        assert_eq!(range_to_prefixes(1024, 2047), [(1024, 6)]);
    }

    #[test]
    fn a_range_is_tiled_by_aligned_blocks_with_no_gap_or_overlap() {
        assert_eq!(
            range_to_prefixes(80, 90),
            [(80, 13), (88, 15), (90, 16)],
            "80-87, 88-89, 90"
        );
        assert_eq!(range_to_prefixes(1, 65535).len(), 16);
        // Exhaustive over a sample of ranges: the blocks cover exactly lo..=hi.
        for (lo, hi) in [
            (1u16, 1u16),
            (1, 65535),
            (3, 70),
            (8080, 8090),
            (30000, 32767),
            (1023, 1025),
            (65535, 65535),
            (2, 65534),
        ] {
            let blocks = range_to_prefixes(lo, hi);
            assert!(blocks.len() <= 30, "{lo}-{hi}: {}", blocks.len());
            let mut next = u32::from(lo);
            for (base, bits) in blocks {
                let size = 1u32 << (16 - u32::from(bits));
                assert_eq!(u32::from(base), next, "{lo}-{hi}: contiguous");
                assert_eq!(u32::from(base) % size, 0, "{lo}-{hi}: aligned");
                next += size;
            }
            assert_eq!(next, u32::from(hi) + 1, "{lo}-{hi}: ends at hi");
        }
    }

    #[test]
    fn an_allow_inside_a_denied_range_of_the_same_group_comes_out_denied() {
        let entries = [
            rule(Verdict::Deny, PortMatch::Any, 1),
            rule(Verdict::Allow, PortMatch::Range(80, 80), 2),
        ];
        let map = encode(7, &entries).expect("encode");
        assert_eq!(map.len(), 1, "one deny for the whole port space: {map:?}");
        for port in [0, 80, 443, 65535] {
            assert_eq!(lpm(&map, port), Some((Verdict::Deny, 1)), "port {port}");
        }
    }

    #[test]
    fn a_deny_on_one_port_carves_it_out_of_an_allowed_range() {
        let entries = [
            rule(Verdict::Allow, PortMatch::Range(1, 1000), 1),
            rule(Verdict::Deny, PortMatch::Range(80, 80), 2),
        ];
        let map = encode(7, &entries).expect("encode");
        for port in 0..=2000u16 {
            let want = match port {
                80 => Some((Verdict::Deny, 2)),
                1..=1000 => Some((Verdict::Allow, 1)),
                _ => None,
            };
            assert_eq!(lpm(&map, port), want, "port {port}");
        }
    }

    #[test]
    fn overlapping_rules_resolve_port_by_port_with_deny_first_then_lowest_rule_id() {
        let rules = [
            (100, 200, Verdict::Allow, 5),
            (150, 300, Verdict::Allow, 3),
            (180, 190, Verdict::Deny, 9),
            (185, 250, Verdict::Deny, 4),
        ];
        let segs = resolve_group(&rules);
        let at = |port: u16| {
            segs.iter()
                .find(|s| s.lo <= port && port <= s.hi)
                .map(|s| (s.verdict, s.rule_id))
        };
        assert_eq!(at(99), None);
        assert_eq!(at(120), Some((Verdict::Allow, 5)));
        assert_eq!(at(160), Some((Verdict::Allow, 3)));
        assert_eq!(at(182), Some((Verdict::Deny, 9)));
        assert_eq!(at(186), Some((Verdict::Deny, 4)));
        assert_eq!(at(240), Some((Verdict::Deny, 4)));
        assert_eq!(at(260), Some((Verdict::Allow, 3)));
        assert_eq!(at(301), None);
        for pair in segs.windows(2) {
            assert!(pair[0].hi < pair[1].lo, "disjoint and sorted: {segs:?}");
        }
    }

    #[test]
    fn groups_are_encoded_apart_and_decode_back() {
        let mut any_peer = rule(Verdict::Allow, PortMatch::Range(53, 53), 8);
        any_peer.peer_identity = None;
        any_peer.proto = Some(17);
        let mut icmp = rule(Verdict::Deny, PortMatch::Any, 9);
        icmp.proto = Some(1);
        let egress = PolicyEntry {
            direction: Direction::Egress,
            proto: None,
            ..rule(Verdict::Allow, PortMatch::Any, 10)
        };
        let map = encode(7, &[any_peer, icmp, egress]).expect("encode");
        let decoded: Vec<PolicyEntry> = map.iter().map(|(k, v)| k.to_entry(*v)).collect();
        for e in [any_peer, icmp, egress] {
            assert!(decoded.contains(&e), "{e:?} in {decoded:?}");
        }
        for (k, v) in &map {
            let back = MapKey::from_raw(k.prefix_len(), k.to_raw()).expect("decodes");
            assert_eq!(back, *k);
            assert_eq!(MapValue::from_raw(v.to_raw()), Some(*v));
        }
    }

    #[test]
    fn an_unchanged_policy_diffs_to_nothing_and_a_moved_port_to_one_write_and_one_delete() {
        let before: Vec<PolicyEntry> = (0..100)
            .map(|i| {
                // One rule per port, as a policy's rules are: one entry each.
                let port = 1000 + i;
                rule(
                    Verdict::Allow,
                    PortMatch::Range(port, port),
                    u32::from(port),
                )
            })
            .collect();
        let programmed = encode(7, &before).expect("encode");
        assert_eq!(diff(&programmed, &programmed), PolicyDiff::default());

        let mut after = before.clone();
        after[0].ports = PortMatch::Range(2000, 2000);
        let d = diff(&programmed, &encode(7, &after).expect("encode"));
        assert_eq!(d.writes.len(), 1, "{d:?}");
        assert_eq!(d.writes[0].0.port, 2000);
        assert_eq!(d.deletes.len(), 1, "{d:?}");
        assert_eq!(d.deletes[0].port, 1000);
    }

    #[test]
    fn a_changed_rule_id_or_verdict_is_rewritten_in_place_without_a_delete() {
        let programmed =
            encode(7, &[rule(Verdict::Allow, PortMatch::Range(80, 80), 1)]).expect("encode");
        for changed in [
            rule(Verdict::Allow, PortMatch::Range(80, 80), 2),
            rule(Verdict::Deny, PortMatch::Range(80, 80), 1),
        ] {
            let d = diff(&programmed, &encode(7, &[changed]).expect("encode"));
            assert_eq!(d.writes.len(), 1, "{changed:?}: {d:?}");
            assert!(d.deletes.is_empty(), "{changed:?}: {d:?}");
        }
        let d = diff(&programmed, &BTreeMap::new());
        assert!(d.writes.is_empty());
        assert_eq!(d.deletes.len(), 1, "an emptied policy deletes everything");
    }

    #[test]
    fn rules_the_datapath_cannot_represent_are_rejected_by_name() {
        let base = rule(Verdict::Allow, PortMatch::Range(80, 80), 1);
        let cases = [
            (
                PolicyEntry {
                    endpoint_id: 8,
                    ..base
                },
                PolicyError::WrongEndpoint {
                    rule_id: 1,
                    expected: 7,
                    got: 8,
                },
            ),
            (
                PolicyEntry {
                    ports: PortMatch::Range(0, 80),
                    ..base
                },
                PolicyError::InvalidPortRange {
                    rule_id: 1,
                    lo: 0,
                    hi: 80,
                },
            ),
            (
                PolicyEntry {
                    ports: PortMatch::Range(90, 80),
                    ..base
                },
                PolicyError::InvalidPortRange {
                    rule_id: 1,
                    lo: 90,
                    hi: 80,
                },
            ),
            (
                PolicyEntry {
                    proto: Some(1),
                    ..base
                },
                PolicyError::PortsWithoutPorts {
                    rule_id: 1,
                    proto: 1,
                },
            ),
            (
                PolicyEntry {
                    proto: Some(0),
                    ..base
                },
                PolicyError::ProtoZero { rule_id: 1 },
            ),
            (
                PolicyEntry {
                    peer_identity: Some(0),
                    ..base
                },
                PolicyError::PeerZero { rule_id: 1 },
            ),
        ];
        for (entry, want) in cases {
            assert_eq!(encode(7, &[entry]), Err(want.clone()), "{want}");
        }
    }
}
