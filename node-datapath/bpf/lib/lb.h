/* SPDX-License-Identifier: (Apache-2.0 OR GPL-2.0-only) */
/*
 * Socket-level service load balancing (bpf_sock.c): the maps and the
 * structs shared with userspace. The Rust mirror is
 * node-datapath/src/bpf/sock.rs; its test checks sizes against the ones
 * below (SOCK_LB_*_SIZE), so a change on one side fails `cargo test`.
 *
 * These maps are pinned by name under <pin_dir>/lb/v<SOCK_LB_LAYOUT_VERSION>
 * (a directory of its own: the tc programs never see them); bump the version
 * when any key or value below changes.
 *
 * Model:
 *  - mb_lb_services: (frontend address, port, protocol) -> lb_service. All
 *    frontends of one service share its service_id and so its table.
 *  - mb_lb_tables: service_id -> inner array: slot 0 holds the count n,
 *    slots 1..=n the backend ids. For maglev the n slots are the Maglev
 *    table (n = M); for random they list the backends. A change builds a
 *    new inner array and swaps it in with one update of the outer map, so a
 *    lookup sees either the old table (with its count) or the new one,
 *    never a mix. n = 0 (or no table): the service rejects connections.
 *  - mb_lb_backends: backend id -> lb_backend (address, port).
 *  - mb_lb_revnat: (socket cookie, backend address, port) -> frontend, for
 *    unconnected UDP: recvmsg4 shows the reply as coming from the frontend.
 */
#ifndef MEMBRANE_LB_H
#define MEMBRANE_LB_H

#include <linux/types.h>

#define SOCK_LB_LAYOUT_VERSION 1

#define LB_SERVICES_MAP_SIZE 65536
#define LB_BACKENDS_MAP_SIZE 65536
#define LB_TABLES_MAP_SIZE 65536
#define LB_REVNAT_MAP_SIZE 65536
/* Template size only: the inner arrays carry BPF_F_INNER_MAP, so each may
 * have its own size (a Maglev M, or a backend count). */
#define LB_TABLE_TEMPLATE_SIZE 1
#ifndef BPF_F_INNER_MAP
#define BPF_F_INNER_MAP (1U << 12)
#endif

/* lb_service.algorithm */
#define LB_ALG_RANDOM 1
#define LB_ALG_MAGLEV 2

/* lb_service.flags */
#define LB_F_HASH_SADDR_ONLY 0x1 /* maglev on the source address alone */

struct lb_service_key {
	__be32 address; /* frontend IPv4, network order */
	__be16 port;    /* frontend port, network order */
	__u8 proto;     /* IPPROTO_TCP or IPPROTO_UDP */
	__u8 pad;
};
#define SOCK_LB_SERVICE_KEY_SIZE 8

struct lb_service {
	__u32 service_id;   /* key of mb_lb_tables */
	__be16 target_port; /* backend port when the backend has none; 0: the frontend's */
	__u8 algorithm;     /* LB_ALG_* */
	__u8 flags;         /* LB_F_* */
};
#define SOCK_LB_SERVICE_SIZE 8

struct lb_backend {
	__be32 address; /* network order */
	__be16 port;    /* network order; 0: the service's target port */
	__u8 pad[2];
};
#define SOCK_LB_BACKEND_SIZE 8

struct lb_revnat_key {
	__u64 cookie;   /* socket cookie */
	__be32 address; /* backend */
	__be16 port;    /* backend */
	__u8 pad[2];
};
#define SOCK_LB_REVNAT_KEY_SIZE 16

struct lb_revnat {
	__be32 address; /* frontend */
	__be16 port;    /* frontend */
	__u8 pad[2];
};
#define SOCK_LB_REVNAT_SIZE 8

/*
 * Packet-level load balancing at tc (bpf_host / bpf_lxc, lib/nodeport.h):
 *  - mb_lb_ext_services: frontends reached from outside the node (NodePort,
 *    LoadBalancer, externalIPs), same key and value as mb_lb_services. A
 *    NodePort is keyed with address 0 and matches only packets addressed to
 *    this node's underlay address (mb_lb_node[0]).
 *  - mb_lb_nat4: per flow, both directions (lb_nat_key.dir): the original
 *    tuple -> its translation (LB_NAT_FWD), and the translated reply's tuple
 *    -> the rewrite back to the frontend (LB_NAT_REV).
 * Both are pinned beside the maps above (the Datapath loader points them there).
 */
#define LB_NAT_MAP_SIZE 65536
#define LB_NAT_FWD 1
#define LB_NAT_REV 2

struct lb_nat_key {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 dir; /* LB_NAT_* */
	__u8 pad[2];
};
#define LB_NAT_KEY_SIZE 16

struct lb_nat {
	__be32 saddr; /* rewrite to */
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__u32 ifindex; /* the device the flow arrived on: replies leave there */
};
#define LB_NAT_SIZE 16

#ifdef __BPF__ /* the maps and helpers: the datapath only */

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct lb_service_key);
	__type(value, struct lb_service);
	__uint(max_entries, LB_SERVICES_MAP_SIZE);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mb_lb_ext_services SEC(".maps");

/*
 * (backend address, port, protocol) of services with external frontends:
 * on the backend's node, a request SNATed by another node (source: that
 * node's address) to such a backend gets a reverse entry that sends the
 * reply straight back out of the underlay, past the node's masquerading.
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct lb_service_key);
	__type(value, __u32);
	__uint(max_entries, LB_BACKENDS_MAP_SIZE);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mb_lb_be_ports SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, __be32); /* [0]: this node's underlay address, 0 unknown */
	__uint(max_entries, 1);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mb_lb_node SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct lb_nat_key);
	__type(value, struct lb_nat);
	__uint(max_entries, LB_NAT_MAP_SIZE);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mb_lb_nat4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct lb_service_key);
	__type(value, struct lb_service);
	__uint(max_entries, LB_SERVICES_MAP_SIZE);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mb_lb_services SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32);
	__type(value, struct lb_backend);
	__uint(max_entries, LB_BACKENDS_MAP_SIZE);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mb_lb_backends SEC(".maps");

struct lb_table_inner {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, __u32); /* [0]: count n; [1..=n]: backend ids */
	__uint(max_entries, LB_TABLE_TEMPLATE_SIZE);
	__uint(map_flags, BPF_F_INNER_MAP);
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH_OF_MAPS);
	__type(key, __u32); /* service id */
	__uint(max_entries, LB_TABLES_MAP_SIZE);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__array(values, struct lb_table_inner);
} mb_lb_tables SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct lb_revnat_key);
	__type(value, struct lb_revnat);
	__uint(max_entries, LB_REVNAT_MAP_SIZE);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mb_lb_revnat SEC(".maps");

/* murmur3's 32-bit finalizer: a cheap, well-spread mix. */
static __always_inline __u32 lb_fmix32(__u32 h)
{
	h ^= h >> 16;
	h *= 0x85ebca6b;
	h ^= h >> 13;
	h *= 0xc2b2ae35;
	h ^= h >> 16;
	return h;
}

/*
 * The Maglev flow hash: source address, source port, destination port and
 * protocol (never the frontend address, so all frontends of a service
 * agree). With LB_F_HASH_SADDR_ONLY only the source address counts.
 * Ports in network order, as the socket hooks see them.
 */
static __always_inline __u32 lb_flow_hash(__be32 saddr, __u32 sport, __be16 dport,
					  __u8 proto, __u8 flags)
{
	__u32 h = lb_fmix32(saddr ^ 0x6d656d62); /* "memb" */
	if (flags & LB_F_HASH_SADDR_ONLY)
		return h;
	h = lb_fmix32(h ^ sport);
	return lb_fmix32(h ^ (((__u32)dport << 8) | proto));
}

#endif /* __BPF__ */
#endif /* MEMBRANE_LB_H */
