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

#define MEMBRANE_LAYOUT_VERSION 1

/* Map sizes (max_entries). */
#define ENDPOINT_MAP_SIZE 4096
#define CT_MAP_SIZE 65536
#define EVENTS_RINGBUF_SIZE (256 * 1024)

/* --- endpoint map: pod IPv4 (network order, __be32) -> endpoint_info --- */

/* endpoint_info.flags */
#define ENDPOINT_F_NONE 0

struct endpoint_info {
	__u32 ifindex;      /* node-side veth (lxc*) in the node namespace */
	__u32 endpoint_id;  /* agent-assigned, stable for the pod's lifetime */
	__u32 identity;     /* security identity; 0 until policy lands */
	__u32 flags;        /* ENDPOINT_F_* */
	__u8 pod_mac[6];    /* MAC of eth0 inside the pod */
	__u8 node_mac[6];   /* MAC of the node-side veth */
	__u8 pad[4];
};

/* --- connection tracking --- */

/* ct_key.dir: the hook that created the entry. Policy will add CT_INGRESS. */
#define CT_EGRESS 0 /* seen leaving a pod (bpf_lxc) */
#define CT_INGRESS 1

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
	/* METRIC_DROP_BASE + enum drop_reason */
	METRIC_DROP_BASE = 16,
	METRIC_MAX = 32,
};

enum drop_reason {
	DROP_INVALID = 1,       /* malformed / truncated IPv4 */
	DROP_CT_FULL = 2,       /* ct entry could not be created */
	DROP_TTL_EXCEEDED = 3,  /* would route a packet whose TTL is <= 1 */
	DROP_REWRITE_FAILED = 4,/* skb store/checksum helper failed */
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
};

struct trace_event {
	__u64 ts_ns;
	__u8 type;      /* enum event_type */
	__u8 source;    /* enum obs_point */
	__u16 reason;   /* enum drop_reason for EVENT_DROP, else 0 */
	__u32 ifindex;  /* interface the packet arrived on */
	__u32 pkt_len;
	__u32 pad;
	struct ct_key tuple; /* zero where the packet could not be parsed */
};

/* --- load-time configuration (a `volatile const` global, see config.h) --- */

#define FEATURE_REDIRECT_PEER 0x1
#define FEATURE_REDIRECT_NEIGH 0x2

/* TC verdicts, from <linux/pkt_cls.h>, restated so userspace sees them here. */
#define MEMBRANE_TC_ACT_OK 0
#define MEMBRANE_TC_ACT_SHOT 2
#define MEMBRANE_TC_ACT_REDIRECT 7

#endif /* MEMBRANE_COMMON_H */
