/* SPDX-License-Identifier: (Apache-2.0 OR GPL-2.0-only) */
/*
 * Every type and constant shared between the datapath and userspace lives
 * here, and only here. The Rust mirror is node-datapath/src/bpf/abi.rs; its
 * layout test compiles this header and compares sizes and field offsets, so
 * a change on one side that is not made on the other fails `cargo test`.
 *
 * Rules that keep the two sides in step:
 *  - fixed-width types only, explicit padding, no implicit holes;
 *  - addresses and ports in network byte order (as on the wire);
 *  - bump MEMBRANE_LAYOUT_VERSION when any map key/value changes: aya reuses
 *    a pinned map even if its layout differs, so the pin directory is
 *    versioned with it.
 *
 * This header is also compiled for the host by the layout test: include
 * nothing but <linux/types.h>.
 */
#ifndef MEMBRANE_COMMON_H
#define MEMBRANE_COMMON_H

#include <linux/types.h>

#define MEMBRANE_LAYOUT_VERSION 2

/* Map sizes (max_entries). */
#define ENDPOINT_MAP_SIZE 4096
#define CT_MAP_SIZE 65536
#define EVENTS_RINGBUF_SIZE (256 * 1024)
#define IPCACHE_MAP_SIZE 65536
#define POLICY_MAP_SIZE 65536
#define EP_DROPS_MAP_SIZE (ENDPOINT_MAP_SIZE * 4)
#define LB_ANNOUNCE_MAP_SIZE 4096
#define L2_DEV_MAP_SIZE 16

/* --- identities --- */

/*
 * Reserved security identities. Global (cluster-wide, label-derived)
 * identities are IDENTITY_GLOBAL_MIN..=IDENTITY_GLOBAL_MAX; identities of
 * CIDR prefixes are node-local and start at IDENTITY_LOCAL_CIDR_BASE.
 */
#define IDENTITY_UNKNOWN 0
#define IDENTITY_HOST 1        /* this node */
#define IDENTITY_WORLD 2       /* anything the ipcache does not know */
#define IDENTITY_UNMANAGED 3
#define IDENTITY_HEALTH 4
#define IDENTITY_INIT 5
#define IDENTITY_REMOTE_NODE 6
#define IDENTITY_GLOBAL_MIN 256
#define IDENTITY_GLOBAL_MAX 65535
#define IDENTITY_LOCAL_CIDR_BASE (1 << 24)

/* --- endpoint map: pod IPv4 (network order, __be32) -> endpoint_info --- */

/*
 * endpoint_info.flags. An enforced direction is default-deny: a packet no
 * policy entry allows is dropped (DROP_POLICY_DEFAULT_DENY). A direction that
 * is not enforced still honours explicit deny entries.
 * Bit n is direction n (POLICY_INGRESS, POLICY_EGRESS).
 */
#define ENDPOINT_F_NONE 0
#define ENDPOINT_F_INGRESS_ENFORCED 0x1
#define ENDPOINT_F_EGRESS_ENFORCED 0x2

struct endpoint_info {
	__u32 ifindex;      /* node-side veth (lxc*) in the node namespace */
	__u32 endpoint_id;  /* agent-assigned, stable for the pod's lifetime */
	__u32 identity;     /* security identity of the pod (0: unassigned, use the ipcache) */
	__u32 flags;        /* ENDPOINT_F_* */
	__u8 pod_mac[6];    /* MAC of eth0 inside the pod */
	__u8 node_mac[6];   /* MAC of the node-side veth */
	__u8 pad[4];
};

/* --- connection tracking --- */

/*
 * ct_key.dir: the hook that created the entry. A packet is ESTABLISHED if
 * (tuple, dir of its hook) is a key and a REPLY if its reversed tuple is a
 * key with either dir (see ct.h).
 */
#define CT_EGRESS 0  /* seen leaving a pod (bpf_lxc) */
#define CT_INGRESS 1 /* seen entering a pod (bpf_host, to_container) */

struct ct_key {
	__be32 saddr;
	__be32 daddr;
	__be16 sport; /* ICMP echo: both ports hold the echo id */
	__be16 dport;
	__u8 proto;
	__u8 dir;     /* CT_EGRESS / CT_INGRESS */
	__u8 pad[2];
};

/* ct_entry.flags */
#define CT_F_SEEN_REPLY 0x1

struct ct_entry {
	__u64 created_ns;   /* bpf_ktime_get_ns() clock (CLOCK_MONOTONIC) */
	__u64 last_seen_ns;
	__u64 packets_fwd;  /* in the direction of the key */
	__u64 bytes_fwd;
	__u64 packets_rev;  /* replies */
	__u64 bytes_rev;
	__u8 tcp_flags_fwd; /* union of TCP flags seen, per direction */
	__u8 tcp_flags_rev;
	__u16 flags;        /* CT_F_* */
	__u32 pad;
};

/* --- ipcache: LPM trie, IPv4 prefix -> security identity --- */

struct ipcache_key {
	__u32 prefixlen; /* 0..=32 */
	__be32 addr;     /* network byte order */
};

struct ipcache_value {
	__u32 identity;
	__u32 flags; /* none defined yet: 0 */
};

/* --- policy: LPM trie, (endpoint, direction, peer, proto, port) -> verdict --- */

#define POLICY_INGRESS 0
#define POLICY_EGRESS 1

#define POLICY_ALLOW 1
#define POLICY_DENY 2

#define POLICY_PROTO_ANY 0
#define POLICY_PEER_ANY 0

/*
 * Fields are ordered so that everything before dport is always fully
 * specified and only dport is wildcarded: prefixlen counts bits from
 * endpoint_id on, so an entry's prefixlen is POLICY_PREFIX_FIXED (80) plus
 * the number of leading dport bits it matches (0..=16). Lookups use
 * POLICY_PREFIX_FULL. A port range is written as the few aligned power-of-two
 * blocks that tile it. There are no padding bytes: the trie compares bytes.
 *
 * Contract with userspace (which alone writes this map):
 *  - A (endpoint, direction, peer_identity, proto) tuple is a "group". Within
 *    one group, entries never overlap: userspace resolves its rules over the
 *    port space first (deny wins over allow, the lowest rule_id names the
 *    result) and writes the resulting disjoint ranges. So the longest-prefix
 *    match of a group is the group's final verdict for the port.
 *  - The datapath combines the four groups that can apply to a packet,
 *    (peer, proto), (peer, any), (any, proto), (any, any): any deny wins,
 *    else any allow allows, else the endpoint's enforcement flag decides.
 *  - peer_identity 0 means any peer, proto 0 any protocol. TCP and UDP are
 *    looked up with their destination port, every other protocol with port 0.
 */
struct policy_key {
	__u32 prefixlen;
	__u32 endpoint_id;
	__u32 peer_identity; /* POLICY_PEER_ANY or an identity */
	__u8 direction;      /* POLICY_INGRESS / POLICY_EGRESS */
	__u8 proto;          /* POLICY_PROTO_ANY or an IP protocol number */
	__be16 dport;        /* network byte order; the only wildcarded bits */
};

#define POLICY_PREFIX_FIXED 80
#define POLICY_PREFIX_FULL 96

struct policy_value {
	__u8 verdict; /* POLICY_ALLOW / POLICY_DENY */
	__u8 pad[3];
	__u32 rule_id; /* reported with drops; opaque to the datapath */
};

/* --- per-endpoint drop counters: per-CPU hash of struct metric_value --- */

struct ep_drop_key {
	__u32 endpoint_id;
	__u8 reason;    /* enum drop_reason */
	__u8 direction; /* POLICY_INGRESS / POLICY_EGRESS */
	__u16 pad;
};

/* --- L2 announcement of service addresses (arp.h) --- */

/* mb_lb_announce: announced IPv4 (network order) -> LB_ANNOUNCE_F_* */
#define LB_ANNOUNCE_F_ARP 0x1 /* answer ARP requests for it */

/* mb_l2_dev: ifindex of an underlay device -> its MAC (the sender of our replies) */
struct l2_dev {
	__u8 mac[6];
	__u8 pad[2];
};

/* --- metrics: per-CPU array indexed by enum metric --- */

enum metric {
	METRIC_LXC_RX = 0,        /* packets seen leaving pods */
	METRIC_HOST_RX = 1,       /* packets seen on the underlay ingress */
	METRIC_PASS = 2,          /* handed to the stack (TC_ACT_OK) */
	METRIC_REDIRECT_PEER = 3, /* bpf_redirect_peer to a local pod */
	METRIC_REDIRECT_NEIGH = 4,/* bpf_redirect_neigh to a local pod */
	METRIC_CT_NEW = 5,
	METRIC_CT_ESTABLISHED = 6,
	METRIC_CT_REPLY = 7,
	METRIC_TO_LXC = 8,        /* packets the stack delivers to pods (to_container) */
	METRIC_ARP_REPLY = 9,     /* ARP replies sent for announced addresses */
	METRIC_XDP_RX = 10,       /* packets seen by bpf_xdp on the underlay */
	METRIC_XDP_TX = 11,       /* NodePort/LB requests bpf_xdp translated and sent back out */
	/* METRIC_DROP_BASE + enum drop_reason */
	METRIC_DROP_BASE = 16,
	METRIC_MAX = 32,
};

enum drop_reason {
	DROP_INVALID = 1,       /* malformed / truncated IPv4 */
	DROP_CT_FULL = 2,       /* ct entry could not be created */
	DROP_TTL_EXCEEDED = 3,  /* would route a packet whose TTL is <= 1 */
	DROP_REWRITE_FAILED = 4,/* skb store/checksum helper failed */
	DROP_POLICY_DENY = 5,   /* a deny entry matched */
	DROP_POLICY_DEFAULT_DENY = 6, /* enforced direction, no entry allowed it */
	DROP_NAT_NO_PORT = 7,   /* no free SNAT port towards a remote service backend */
	DROP_INVALID_SOURCE = 8, /* a pod sent from an address that is not its own */
	DROP_REASON_MAX = 15,
};

struct metric_value {
	__u64 packets;
	__u64 bytes;
};

/* --- events: ring buffer of struct trace_event --- */

enum event_type {
	EVENT_TRACE_NEW_CONN = 1, /* first packet of a new connection */
	EVENT_DROP = 2,
};

enum obs_point {
	OBS_LXC = 1,  /* bpf_lxc: leaving a pod */
	OBS_HOST = 2, /* bpf_host: arriving on the underlay */
	OBS_TO_LXC = 3, /* to_container: the stack delivering to a pod */
};

/* trace_event.direction when no endpoint's policy was involved. */
#define TRACE_DIR_NONE 0xff

struct trace_event {
	__u64 ts_ns;
	__u8 type;      /* enum event_type */
	__u8 source;    /* enum obs_point */
	__u16 reason;   /* enum drop_reason for EVENT_DROP, else 0 */
	__u32 ifindex;  /* interface the packet arrived on */
	__u32 pkt_len;
	__u32 rule_id;  /* policy drops: the deny entry's rule (0 for default deny) */
	struct ct_key tuple; /* zero where the packet could not be parsed */
	__u32 src_identity;  /* 0 where not resolved */
	__u32 dst_identity;
	__u32 endpoint_id;   /* the endpoint whose policy applied (0: none) */
	__u8 direction;      /* POLICY_INGRESS / POLICY_EGRESS / TRACE_DIR_NONE */
	/*
	 * From the packet's L4 header, 0 where there is none to read (other
	 * protocols, non-first fragments, unparsed packets): tuple.proto says
	 * which of them means anything.
	 */
	__u8 tcp_flags;      /* TCP: byte 13 of the header (FIN 0x01, SYN 0x02, ... ACK 0x10) */
	__u8 icmp_type;      /* ICMP: type (8 echo request, 0 echo reply, ...) */
	__u8 icmp_code;      /* ICMP: code */
};

/* --- load-time configuration (a `volatile const` global, see config.h) --- */

#define FEATURE_REDIRECT_PEER 0x1
#define FEATURE_REDIRECT_NEIGH 0x2

/*
 * skb->mark set on a packet bpf_host delivers with bpf_redirect_neigh: it
 * then leaves through the pod veth's tc egress, where to_container must not
 * judge (and count) it a second time. Cleared there; never crosses into a pod.
 */
#define MARK_POLICY_DONE 0x4d420001

/* TC verdicts, from <linux/pkt_cls.h>, restated so userspace sees them here. */
#define MEMBRANE_TC_ACT_OK 0
#define MEMBRANE_TC_ACT_SHOT 2
#define MEMBRANE_TC_ACT_REDIRECT 7

#endif /* MEMBRANE_COMMON_H */
