// SPDX-License-Identifier: Apache-2.0
//! Rust mirrors of `bpf/lib/common.h`: the only types that cross the
//! kernel/userspace boundary. Each one is `#[repr(C)]` with the C field order
//! and explicit padding; the test at the bottom compiles `common.h` for the
//! host and fails if any size, offset or constant differs.
//!
//! These are wire types: addresses stay in network byte order (`[u8; 4]`),
//! and the public, typed views live in `types.rs`.

/// `MEMBRANE_LAYOUT_VERSION`: bump with any map key/value change (the map pin
/// directory is versioned with it, because aya reuses a pinned map whatever
/// layout the new object declares).
pub const LAYOUT_VERSION: u32 = 2;

pub(crate) const FEATURE_REDIRECT_PEER: u32 = 0x1;
pub(crate) const FEATURE_REDIRECT_NEIGH: u32 = 0x2;
#[allow(dead_code, reason = "mirrors common.h; checked by the layout test")]
pub(crate) const MARK_POLICY_DONE: u32 = 0x4d42_0001;

#[allow(dead_code, reason = "mirrors common.h; checked by the layout test")]
pub(crate) const IPCACHE_MAP_SIZE: u32 = 65536;
#[allow(dead_code, reason = "mirrors common.h; checked by the layout test")]
pub(crate) const POLICY_MAP_SIZE: u32 = 65536;

pub(crate) const IDENTITY_UNKNOWN: u32 = 0;
pub(crate) const IDENTITY_HOST: u32 = 1;
pub(crate) const IDENTITY_WORLD: u32 = 2;
pub(crate) const IDENTITY_UNMANAGED: u32 = 3;
pub(crate) const IDENTITY_HEALTH: u32 = 4;
pub(crate) const IDENTITY_INIT: u32 = 5;
pub(crate) const IDENTITY_REMOTE_NODE: u32 = 6;
pub(crate) const IDENTITY_GLOBAL_MIN: u32 = 256;
pub(crate) const IDENTITY_GLOBAL_MAX: u32 = 65535;
pub(crate) const IDENTITY_LOCAL_CIDR_BASE: u32 = 1 << 24;

pub(crate) const ENDPOINT_F_INGRESS_ENFORCED: u32 = 0x1;
pub(crate) const ENDPOINT_F_EGRESS_ENFORCED: u32 = 0x2;

pub(crate) const POLICY_INGRESS: u8 = 0;
pub(crate) const POLICY_EGRESS: u8 = 1;
pub(crate) const POLICY_ALLOW: u8 = 1;
pub(crate) const POLICY_DENY: u8 = 2;
pub(crate) const POLICY_PROTO_ANY: u8 = 0;
pub(crate) const POLICY_PEER_ANY: u32 = 0;
pub(crate) const POLICY_PREFIX_FIXED: u32 = 80;
#[allow(dead_code, reason = "mirrors common.h; checked by the layout test")]
pub(crate) const POLICY_PREFIX_FULL: u32 = 96;
#[allow(dead_code, reason = "mirrors common.h; checked by the layout test")]
pub(crate) const TRACE_DIR_NONE: u8 = 0xff;

#[allow(dead_code, reason = "mirrors common.h; checked by the layout test")]
pub(crate) const CT_EGRESS: u8 = 0;
pub(crate) const CT_INGRESS: u8 = 1;
pub(crate) const CT_F_SEEN_REPLY: u16 = 0x1;

#[allow(dead_code, reason = "mirrors common.h; checked by the layout test")]
pub(crate) const LB_ANNOUNCE_MAP_SIZE: u32 = 4096;
#[allow(dead_code, reason = "mirrors common.h; checked by the layout test")]
pub(crate) const L2_DEV_MAP_SIZE: u32 = 16;
pub(crate) const LB_ANNOUNCE_F_ARP: u32 = 0x1;

pub(crate) const METRIC_LXC_RX: u32 = 0;
pub(crate) const METRIC_HOST_RX: u32 = 1;
pub(crate) const METRIC_PASS: u32 = 2;
pub(crate) const METRIC_REDIRECT_PEER: u32 = 3;
pub(crate) const METRIC_REDIRECT_NEIGH: u32 = 4;
pub(crate) const METRIC_CT_NEW: u32 = 5;
pub(crate) const METRIC_CT_ESTABLISHED: u32 = 6;
pub(crate) const METRIC_CT_REPLY: u32 = 7;
pub(crate) const METRIC_TO_LXC: u32 = 8;
pub(crate) const METRIC_ARP_REPLY: u32 = 9;
pub(crate) const METRIC_XDP_RX: u32 = 10;
pub(crate) const METRIC_XDP_TX: u32 = 11;
pub(crate) const METRIC_DROP_BASE: u32 = 16;
pub(crate) const METRIC_MAX: u32 = 32;

pub(crate) const DROP_INVALID: u16 = 1;
pub(crate) const DROP_CT_FULL: u16 = 2;
pub(crate) const DROP_TTL_EXCEEDED: u16 = 3;
pub(crate) const DROP_REWRITE_FAILED: u16 = 4;
pub(crate) const DROP_POLICY_DENY: u16 = 5;
pub(crate) const DROP_POLICY_DEFAULT_DENY: u16 = 6;
pub(crate) const DROP_NAT_NO_PORT: u16 = 7;
pub(crate) const DROP_INVALID_SOURCE: u16 = 8;
pub(crate) const DROP_REASON_MAX: u16 = 15;

pub(crate) const EVENT_TRACE_NEW_CONN: u8 = 1;
pub(crate) const EVENT_DROP: u8 = 2;
pub(crate) const OBS_LXC: u8 = 1;
pub(crate) const OBS_HOST: u8 = 2;
pub(crate) const OBS_TO_LXC: u8 = 3;

pub(crate) const TC_ACT_OK: i32 = 0;
pub(crate) const TC_ACT_SHOT: i32 = 2;
pub(crate) const TC_ACT_REDIRECT: i32 = 7;

/// `struct endpoint_info`; the map key is the pod IPv4 as `[u8; 4]` (network order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct EndpointInfoRaw {
    pub ifindex: u32,
    pub endpoint_id: u32,
    pub identity: u32,
    pub flags: u32,
    pub pod_mac: [u8; 6],
    pub node_mac: [u8; 6],
    pub pad: [u8; 4],
}

/// `struct ct_key`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub(crate) struct CtKeyRaw {
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    pub proto: u8,
    pub dir: u8,
    pub pad: [u8; 2],
}

/// `struct ct_entry`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct CtEntryRaw {
    pub created_ns: u64,
    pub last_seen_ns: u64,
    pub packets_fwd: u64,
    pub bytes_fwd: u64,
    pub packets_rev: u64,
    pub bytes_rev: u64,
    pub tcp_flags_fwd: u8,
    pub tcp_flags_rev: u8,
    pub flags: u16,
    pub pad: u32,
}

/// `struct ipcache_key`, for the layout test: aya's `lpm_trie::Key<[u8; 4]>`
/// is the same bytes (prefix length, then the address in network order).
#[cfg(test)]
#[repr(C)]
pub(crate) struct IpcacheKeyRaw {
    pub prefixlen: u32,
    pub addr: [u8; 4],
}

/// `struct ipcache_value`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct IpcacheValueRaw {
    pub identity: u32,
    pub flags: u32,
}

/// `struct policy_key` without its leading `prefixlen`: the data half of
/// aya's `lpm_trie::Key<PolicyKeyData>` (which is `#[repr(C, packed)]`
/// `{ u32 prefix_len; data }`, i.e. exactly `struct policy_key`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct PolicyKeyData {
    pub endpoint_id: u32,
    pub peer_identity: u32,
    pub direction: u8,
    pub proto: u8,
    /// Network byte order.
    pub dport: [u8; 2],
}

/// `struct policy_value`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct PolicyValueRaw {
    pub verdict: u8,
    pub pad: [u8; 3],
    pub rule_id: u32,
}

/// `struct ep_drop_key`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub(crate) struct EpDropKeyRaw {
    pub endpoint_id: u32,
    pub reason: u8,
    pub direction: u8,
    pub pad: u16,
}

/// `struct l2_dev`; the map key is the device's ifindex.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct L2DevRaw {
    pub mac: [u8; 6],
    pub pad: [u8; 2],
}

/// `struct metric_value`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct MetricValueRaw {
    pub packets: u64,
    pub bytes: u64,
}

/// `struct trace_event`, as read from the ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct TraceEventRaw {
    pub ts_ns: u64,
    pub kind: u8,
    pub source: u8,
    pub reason: u16,
    pub ifindex: u32,
    pub pkt_len: u32,
    pub rule_id: u32,
    pub tuple: CtKeyRaw,
    pub src_identity: u32,
    pub dst_identity: u32,
    pub endpoint_id: u32,
    pub direction: u8,
    /// TCP: byte 13 of the header; 0 for other protocols and where no L4
    /// header was read (non-first fragments, unparsed packets).
    pub tcp_flags: u8,
    /// ICMP: type and code; 0 otherwise.
    pub icmp_type: u8,
    pub icmp_code: u8,
}

impl TraceEventRaw {
    /// Decodes one ring buffer record; `None` if it is too short (a newer
    /// datapath may append fields, so longer is fine).
    pub(crate) fn from_bytes(bytes: &[u8]) -> Option<Self> {
        let u8_at = |off: usize| bytes[off];
        let u16_at = |off: usize| u16::from_ne_bytes([bytes[off], bytes[off + 1]]);
        let u32_at = |off: usize| {
            u32::from_ne_bytes([bytes[off], bytes[off + 1], bytes[off + 2], bytes[off + 3]])
        };
        let arr4 = |off: usize| [bytes[off], bytes[off + 1], bytes[off + 2], bytes[off + 3]];
        let arr2 = |off: usize| [bytes[off], bytes[off + 1]];
        if bytes.len() < size_of::<Self>() {
            return None;
        }
        let mut ts = [0u8; 8];
        ts.copy_from_slice(&bytes[0..8]);
        // Offsets as checked by the layout test.
        let t = 24;
        Some(Self {
            ts_ns: u64::from_ne_bytes(ts),
            kind: u8_at(8),
            source: u8_at(9),
            reason: u16_at(10),
            ifindex: u32_at(12),
            pkt_len: u32_at(16),
            rule_id: u32_at(20),
            tuple: CtKeyRaw {
                saddr: arr4(t),
                daddr: arr4(t + 4),
                sport: arr2(t + 8),
                dport: arr2(t + 10),
                proto: u8_at(t + 12),
                dir: u8_at(t + 13),
                pad: arr2(t + 14),
            },
            src_identity: u32_at(40),
            dst_identity: u32_at(44),
            endpoint_id: u32_at(48),
            direction: u8_at(52),
            tcp_flags: u8_at(53),
            icmp_type: u8_at(54),
            icmp_code: u8_at(55),
        })
    }
}

// SAFETY: `aya::Pod` requires plain-old-data: `#[repr(C)]`, `Copy`, every bit
// pattern valid and no implicit padding (so no uninitialised bytes are read
// when aya copies the value into the kernel). All fields are integers or
// integer arrays and every gap is an explicit `pad` field; the layout test
// checks that the sizes equal the sum the C compiler computes.
#[allow(unsafe_code)]
mod pod {
    use super::{
        CtEntryRaw, CtKeyRaw, EndpointInfoRaw, EpDropKeyRaw, IpcacheValueRaw, L2DevRaw,
        MetricValueRaw, PolicyKeyData, PolicyValueRaw,
    };

    unsafe impl aya::Pod for EndpointInfoRaw {}
    unsafe impl aya::Pod for IpcacheValueRaw {}
    unsafe impl aya::Pod for PolicyKeyData {}
    unsafe impl aya::Pod for PolicyValueRaw {}
    unsafe impl aya::Pod for EpDropKeyRaw {}
    unsafe impl aya::Pod for CtKeyRaw {}
    unsafe impl aya::Pod for CtEntryRaw {}
    unsafe impl aya::Pod for MetricValueRaw {}
    unsafe impl aya::Pod for L2DevRaw {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{collections::BTreeMap, mem::offset_of, path::PathBuf, process::Command};

    /// What the Rust side believes, as `name -> value` lines the C side prints too.
    fn rust_side() -> BTreeMap<String, u64> {
        let mut m = BTreeMap::new();
        let mut put = |k: &str, v: u64| {
            m.insert(k.to_owned(), v);
        };
        macro_rules! layout {
            ($c:literal, $t:ty, [$($cf:literal => $rf:ident),* $(,)?]) => {
                put(concat!("sizeof ", $c), size_of::<$t>() as u64);
                $( put(concat!("offsetof ", $c, ".", $cf), offset_of!($t, $rf) as u64); )*
            };
        }
        layout!("endpoint_info", EndpointInfoRaw, [
            "ifindex" => ifindex, "endpoint_id" => endpoint_id, "identity" => identity,
            "flags" => flags, "pod_mac" => pod_mac, "node_mac" => node_mac, "pad" => pad,
        ]);
        layout!("ct_key", CtKeyRaw, [
            "saddr" => saddr, "daddr" => daddr, "sport" => sport, "dport" => dport,
            "proto" => proto, "dir" => dir, "pad" => pad,
        ]);
        layout!("ct_entry", CtEntryRaw, [
            "created_ns" => created_ns, "last_seen_ns" => last_seen_ns,
            "packets_fwd" => packets_fwd, "bytes_fwd" => bytes_fwd,
            "packets_rev" => packets_rev, "bytes_rev" => bytes_rev,
            "tcp_flags_fwd" => tcp_flags_fwd, "tcp_flags_rev" => tcp_flags_rev,
            "flags" => flags, "pad" => pad,
        ]);
        layout!("metric_value", MetricValueRaw, ["packets" => packets, "bytes" => bytes]);
        layout!("l2_dev", L2DevRaw, ["mac" => mac, "pad" => pad]);
        layout!("trace_event", TraceEventRaw, [
            "ts_ns" => ts_ns, "type" => kind, "source" => source, "reason" => reason,
            "ifindex" => ifindex, "pkt_len" => pkt_len, "rule_id" => rule_id, "tuple" => tuple,
            "src_identity" => src_identity, "dst_identity" => dst_identity,
            "endpoint_id" => endpoint_id, "direction" => direction,
            "tcp_flags" => tcp_flags, "icmp_type" => icmp_type, "icmp_code" => icmp_code,
        ]);
        layout!("ipcache_key", IpcacheKeyRaw, ["prefixlen" => prefixlen, "addr" => addr]);
        layout!("ipcache_value", IpcacheValueRaw, ["identity" => identity, "flags" => flags]);
        layout!("policy_value", PolicyValueRaw, [
            "verdict" => verdict, "pad" => pad, "rule_id" => rule_id,
        ]);
        layout!("ep_drop_key", EpDropKeyRaw, [
            "endpoint_id" => endpoint_id, "reason" => reason, "direction" => direction,
            "pad" => pad,
        ]);
        // aya's LPM key is `{ u32 prefix_len; PolicyKeyData }`, packed.
        type PolicyKey = aya::maps::lpm_trie::Key<PolicyKeyData>;
        put("sizeof policy_key", size_of::<PolicyKey>() as u64);
        put("offsetof policy_key.prefixlen", 0);
        for (field, off) in [
            ("endpoint_id", offset_of!(PolicyKeyData, endpoint_id)),
            ("peer_identity", offset_of!(PolicyKeyData, peer_identity)),
            ("direction", offset_of!(PolicyKeyData, direction)),
            ("proto", offset_of!(PolicyKeyData, proto)),
            ("dport", offset_of!(PolicyKeyData, dport)),
        ] {
            put(&format!("offsetof policy_key.{field}"), 4 + off as u64);
        }
        put(
            "sizeof ipcache_key",
            size_of::<aya::maps::lpm_trie::Key<[u8; 4]>>() as u64,
        );
        for (k, v) in [
            ("MEMBRANE_LAYOUT_VERSION", u64::from(LAYOUT_VERSION)),
            ("FEATURE_REDIRECT_PEER", u64::from(FEATURE_REDIRECT_PEER)),
            ("FEATURE_REDIRECT_NEIGH", u64::from(FEATURE_REDIRECT_NEIGH)),
            ("MARK_POLICY_DONE", u64::from(MARK_POLICY_DONE)),
            ("IPCACHE_MAP_SIZE", u64::from(IPCACHE_MAP_SIZE)),
            ("POLICY_MAP_SIZE", u64::from(POLICY_MAP_SIZE)),
            ("IDENTITY_UNKNOWN", u64::from(IDENTITY_UNKNOWN)),
            ("IDENTITY_HOST", u64::from(IDENTITY_HOST)),
            ("IDENTITY_WORLD", u64::from(IDENTITY_WORLD)),
            ("IDENTITY_UNMANAGED", u64::from(IDENTITY_UNMANAGED)),
            ("IDENTITY_HEALTH", u64::from(IDENTITY_HEALTH)),
            ("IDENTITY_INIT", u64::from(IDENTITY_INIT)),
            ("IDENTITY_REMOTE_NODE", u64::from(IDENTITY_REMOTE_NODE)),
            ("IDENTITY_GLOBAL_MIN", u64::from(IDENTITY_GLOBAL_MIN)),
            ("IDENTITY_GLOBAL_MAX", u64::from(IDENTITY_GLOBAL_MAX)),
            (
                "IDENTITY_LOCAL_CIDR_BASE",
                u64::from(IDENTITY_LOCAL_CIDR_BASE),
            ),
            (
                "ENDPOINT_F_INGRESS_ENFORCED",
                u64::from(ENDPOINT_F_INGRESS_ENFORCED),
            ),
            (
                "ENDPOINT_F_EGRESS_ENFORCED",
                u64::from(ENDPOINT_F_EGRESS_ENFORCED),
            ),
            ("POLICY_INGRESS", u64::from(POLICY_INGRESS)),
            ("POLICY_EGRESS", u64::from(POLICY_EGRESS)),
            ("POLICY_ALLOW", u64::from(POLICY_ALLOW)),
            ("POLICY_DENY", u64::from(POLICY_DENY)),
            ("POLICY_PROTO_ANY", u64::from(POLICY_PROTO_ANY)),
            ("POLICY_PEER_ANY", u64::from(POLICY_PEER_ANY)),
            ("POLICY_PREFIX_FIXED", u64::from(POLICY_PREFIX_FIXED)),
            ("POLICY_PREFIX_FULL", u64::from(POLICY_PREFIX_FULL)),
            ("TRACE_DIR_NONE", u64::from(TRACE_DIR_NONE)),
            ("METRIC_TO_LXC", u64::from(METRIC_TO_LXC)),
            ("METRIC_ARP_REPLY", u64::from(METRIC_ARP_REPLY)),
            ("METRIC_XDP_RX", u64::from(METRIC_XDP_RX)),
            ("METRIC_XDP_TX", u64::from(METRIC_XDP_TX)),
            ("LB_ANNOUNCE_MAP_SIZE", u64::from(LB_ANNOUNCE_MAP_SIZE)),
            ("L2_DEV_MAP_SIZE", u64::from(L2_DEV_MAP_SIZE)),
            ("LB_ANNOUNCE_F_ARP", u64::from(LB_ANNOUNCE_F_ARP)),
            ("DROP_POLICY_DENY", u64::from(DROP_POLICY_DENY)),
            (
                "DROP_POLICY_DEFAULT_DENY",
                u64::from(DROP_POLICY_DEFAULT_DENY),
            ),
            ("OBS_TO_LXC", u64::from(OBS_TO_LXC)),
            ("CT_EGRESS", u64::from(CT_EGRESS)),
            ("CT_INGRESS", u64::from(CT_INGRESS)),
            ("CT_F_SEEN_REPLY", u64::from(CT_F_SEEN_REPLY)),
            ("METRIC_LXC_RX", u64::from(METRIC_LXC_RX)),
            ("METRIC_HOST_RX", u64::from(METRIC_HOST_RX)),
            ("METRIC_PASS", u64::from(METRIC_PASS)),
            ("METRIC_REDIRECT_PEER", u64::from(METRIC_REDIRECT_PEER)),
            ("METRIC_REDIRECT_NEIGH", u64::from(METRIC_REDIRECT_NEIGH)),
            ("METRIC_CT_NEW", u64::from(METRIC_CT_NEW)),
            ("METRIC_CT_ESTABLISHED", u64::from(METRIC_CT_ESTABLISHED)),
            ("METRIC_CT_REPLY", u64::from(METRIC_CT_REPLY)),
            ("METRIC_DROP_BASE", u64::from(METRIC_DROP_BASE)),
            ("METRIC_MAX", u64::from(METRIC_MAX)),
            ("DROP_INVALID", u64::from(DROP_INVALID)),
            ("DROP_CT_FULL", u64::from(DROP_CT_FULL)),
            ("DROP_TTL_EXCEEDED", u64::from(DROP_TTL_EXCEEDED)),
            ("DROP_REWRITE_FAILED", u64::from(DROP_REWRITE_FAILED)),
            ("DROP_NAT_NO_PORT", u64::from(DROP_NAT_NO_PORT)),
            ("DROP_INVALID_SOURCE", u64::from(DROP_INVALID_SOURCE)),
            ("DROP_REASON_MAX", u64::from(DROP_REASON_MAX)),
            ("EVENT_TRACE_NEW_CONN", u64::from(EVENT_TRACE_NEW_CONN)),
            ("EVENT_DROP", u64::from(EVENT_DROP)),
            ("OBS_LXC", u64::from(OBS_LXC)),
            ("OBS_HOST", u64::from(OBS_HOST)),
            ("MEMBRANE_TC_ACT_OK", TC_ACT_OK as u64),
            ("MEMBRANE_TC_ACT_SHOT", TC_ACT_SHOT as u64),
            ("MEMBRANE_TC_ACT_REDIRECT", TC_ACT_REDIRECT as u64),
        ] {
            put(&format!("const {k}"), v);
        }
        m
    }

    /// A host C program printing the same lines from `common.h`.
    fn c_program(keys: &BTreeMap<String, u64>) -> String {
        let mut body = String::new();
        for key in keys.keys() {
            let expr = if let Some(s) = key.strip_prefix("sizeof ") {
                format!("sizeof(struct {s})")
            } else if let Some(f) = key.strip_prefix("offsetof ") {
                let (s, field) = f.split_once('.').expect("offsetof key has a dot");
                format!("offsetof(struct {s}, {field})")
            } else {
                let c = key.strip_prefix("const ").expect("const key");
                format!("(unsigned long long)({c})")
            };
            body.push_str(&format!(
                "\tprintf(\"%s=%llu\\n\", \"{key}\", (unsigned long long)({expr}));\n"
            ));
        }
        format!(
            "#include <stddef.h>\n#include <stdio.h>\n#include \"common.h\"\n\
             int main(void)\n{{\n{body}\treturn 0;\n}}\n"
        )
    }

    #[test]
    fn rust_mirror_structs_match_the_c_layout_of_common_h() {
        let rust = rust_side();
        let dir = tempfile::tempdir().expect("tempdir");
        let src = dir.path().join("layout.c");
        let bin = dir.path().join("layout");
        std::fs::write(&src, c_program(&rust)).expect("write layout.c");
        let lib = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("bpf/lib");
        let clang = std::env::var("CLANG").unwrap_or_else(|_| "clang-19".to_owned());
        let out = Command::new(&clang)
            .args(["-Wall", "-Werror", "-I"])
            .arg(&lib)
            .arg(&src)
            .arg("-o")
            .arg(&bin)
            .output()
            .expect("run clang");
        assert!(
            out.status.success(),
            "clang: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = Command::new(&bin).output().expect("run layout dumper");
        assert!(out.status.success());
        let c: BTreeMap<String, u64> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.parse().expect("number")))
            .collect();
        let diverged: Vec<String> = rust
            .iter()
            .filter(|(k, v)| c.get(*k) != Some(v))
            .map(|(k, v)| format!("{k}: rust {v}, C {:?}", c.get(k)))
            .collect();
        assert!(
            diverged.is_empty(),
            "common.h and abi.rs diverged:\n{}",
            diverged.join("\n")
        );
    }

    #[test]
    fn a_trace_event_decodes_from_its_c_byte_layout() {
        let mut bytes = vec![0u8; size_of::<TraceEventRaw>()];
        bytes[0..8].copy_from_slice(&42u64.to_ne_bytes());
        bytes[8] = EVENT_DROP;
        bytes[9] = OBS_LXC;
        bytes[10..12].copy_from_slice(&DROP_INVALID.to_ne_bytes());
        bytes[12..16].copy_from_slice(&7u32.to_ne_bytes());
        bytes[24..28].copy_from_slice(&[10, 0, 0, 1]);
        bytes[36] = 6;
        bytes[20..24].copy_from_slice(&9u32.to_ne_bytes());
        bytes[40..44].copy_from_slice(&1000u32.to_ne_bytes());
        bytes[44..48].copy_from_slice(&2u32.to_ne_bytes());
        bytes[48..52].copy_from_slice(&3u32.to_ne_bytes());
        bytes[52] = POLICY_EGRESS;
        bytes[53] = 0x12; // SYN|ACK
        bytes[54] = 3; // destination unreachable...
        bytes[55] = 4; // ...fragmentation needed
        let ev = TraceEventRaw::from_bytes(&bytes).expect("long enough");
        assert_eq!(ev.ts_ns, 42);
        assert_eq!(
            (ev.kind, ev.source, ev.reason, ev.ifindex),
            (EVENT_DROP, OBS_LXC, DROP_INVALID, 7)
        );
        assert_eq!(ev.tuple.saddr, [10, 0, 0, 1]);
        assert_eq!(ev.tuple.proto, 6);
        assert_eq!(
            (
                ev.rule_id,
                ev.src_identity,
                ev.dst_identity,
                ev.endpoint_id,
                ev.direction
            ),
            (9, 1000, 2, 3, POLICY_EGRESS)
        );
        assert_eq!((ev.tcp_flags, ev.icmp_type, ev.icmp_code), (0x12, 3, 4));
        assert!(TraceEventRaw::from_bytes(&bytes[..10]).is_none());
    }

    #[test]
    fn the_l4_fields_took_the_old_padding_so_the_trace_event_did_not_move() {
        // Readers of the previous layout keep decoding every other field:
        // same size, same offsets, the three bytes after `direction` reused.
        assert_eq!(size_of::<TraceEventRaw>(), 56);
        assert_eq!(offset_of!(TraceEventRaw, direction), 52);
        assert_eq!(
            (
                offset_of!(TraceEventRaw, tcp_flags),
                offset_of!(TraceEventRaw, icmp_type),
                offset_of!(TraceEventRaw, icmp_code)
            ),
            (53, 54, 55)
        );
    }
}
