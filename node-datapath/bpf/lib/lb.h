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
 *    table (n = M); for random they list the backends. After them, slot
 *    n+1 holds k and slots n+2..=n+1+k the k distinct backend ids of the
 *    table in ascending order (the member list session affinity searches,
 *    see the end of this file). A change builds a new inner array and swaps
 *    it in with one update of the outer map, so a lookup sees either the
 *    old table (with its count and members) or the new one, never a mix.
 *    n = 0 (or no table): the service rejects connections.
 *  - mb_lb_backends: backend id -> lb_backend (address, port).
 *  - mb_lb_revnat: (socket cookie, backend address, port) -> frontend,
 *    written when connect4 or sendmsg4 translated: getpeername4 (connected
 *    TCP and UDP) and recvmsg4 (UDP) show the frontend instead of the
 *    backend.
 *  - mb_lb_affinity: (client, service_id) -> (backend id, last use), for
 *    services with ClientIP session affinity (lb_service.affinity_timeout).
 */
#ifndef MEMBRANE_LB_H
#define MEMBRANE_LB_H

#include <linux/types.h>

#define SOCK_LB_LAYOUT_VERSION 2

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
	__u32 service_id;       /* key of mb_lb_tables */
	__be16 target_port;     /* backend port when the backend has none; 0: the frontend's */
	__u8 algorithm;         /* LB_ALG_* */
	__u8 flags;             /* LB_F_* */
	__u32 affinity_timeout; /* ClientIP session affinity, seconds; 0: none */
};
#define SOCK_LB_SERVICE_SIZE 12

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

/*
 * Session affinity (sessionAffinity: ClientIP), for the socket hooks and
 * for NodePort/LoadBalancer at tc alike.
 *
 * mb_lb_affinity remembers, per (client, service id), the backend the
 * client's last new connection got and when. A client is either a network
 * namespace (socket LB: the cookie of the connecting socket's netns, and
 * each pod is its own netns) or an IPv4 source address (tc: the client as
 * seen on the wire); lb_affinity_key.kind keeps the two apart even where a
 * cookie and an address share their bits.
 *
 * A new connection to a service with a timeout reuses the remembered
 * backend when the entry was used less than the timeout ago AND the backend
 * is still a member of the service's current table AND still in
 * mb_lb_backends; the use refreshes it. Otherwise the backend is selected
 * as without affinity and remembered. Membership is a binary search of the
 * table's sorted member list (at most LB_MEMBER_STEPS lookups), which
 * is swapped in with the table itself: once a table without a backend is
 * in place, no affinity entry can lead to that backend again, and no
 * second map can disagree with the table (Cilium keeps a separate
 * (backend, service) match map for the same check). Service ids are local
 * to an agent and may be reused by a restarted one: an old entry then only
 * ever leads to a backend of the service's own current table.
 */
#define LB_AFFINITY_MAP_SIZE 65536
#define LB_AFFINITY_NETNS 1 /* client: a network namespace cookie */
#define LB_AFFINITY_ADDR 2  /* client: an IPv4 source address */
/* ceil(log2(LB_BACKENDS_MAP_SIZE + 1)): enough halvings for any member list
 * (a longer one could only make a search miss: affinity then falls back to
 * the normal selection, never to a backend outside the table). */
#define LB_MEMBER_STEPS 17

struct lb_affinity_key {
	__u64 client;     /* netns cookie, or the IPv4 address (network order) */
	__u32 service_id; /* lb_service.service_id */
	__u8 kind;        /* LB_AFFINITY_* */
	__u8 pad[3];
};
#define LB_AFFINITY_KEY_SIZE 16

struct lb_affinity {
	__u64 last_used; /* bpf_ktime_get_ns() of the last connection it served */
	__u32 backend_id;
	__u32 pad;
};
#define LB_AFFINITY_SIZE 16

_Static_assert(sizeof(struct lb_affinity_key) == LB_AFFINITY_KEY_SIZE, "lb_affinity_key");
_Static_assert(sizeof(struct lb_affinity) == LB_AFFINITY_SIZE, "lb_affinity");

#ifdef __BPF__

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct lb_affinity_key);
	__type(value, struct lb_affinity);
	__uint(max_entries, LB_AFFINITY_MAP_SIZE);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mb_lb_affinity SEC(".maps");

/* Whether backend_id is in the member list of a table of count slots. */
static __always_inline int lb_table_has(void *table, __u32 count, __u32 backend_id)
{
	__u32 slot = count + 1;
	__u32 *kp = bpf_map_lookup_elem(table, &slot);
	__u32 lo = 0, hi;

	if (!kp)
		return 0;
	hi = *kp; /* search [lo, hi) */
	for (int i = 0; i < LB_MEMBER_STEPS && lo < hi; i++) {
		__u32 mid = lo + (hi - lo) / 2;
		__u32 at = count + 2 + mid;
		__u32 *id = bpf_map_lookup_elem(table, &at);

		if (!id)
			return 0;
		if (*id == backend_id)
			return 1;
		if (*id < backend_id)
			lo = mid + 1;
		else
			hi = mid;
	}
	return 0;
}

/* The remembered backend of aff if it may still be used (see above), refreshed. */
static __always_inline struct lb_backend *lb_affinity_backend(const struct lb_affinity_key *aff,
							      __u32 timeout, void *table,
							      __u32 count, __u64 now)
{
	struct lb_affinity *a = bpf_map_lookup_elem(&mb_lb_affinity, aff);
	struct lb_backend *be;
	__u32 backend_id;
	__u64 last;

	if (!a)
		return NULL;
	backend_id = a->backend_id;
	last = a->last_used;
	/* last > now: refreshed on another CPU since this one read its clock. */
	if (now > last && now - last > (__u64)timeout * 1000000000ULL)
		return NULL;
	if (!lb_table_has(table, count, backend_id))
		return NULL;
	be = bpf_map_lookup_elem(&mb_lb_backends, &backend_id);
	if (!be)
		return NULL;
	a->last_used = now;
	return be;
}

/*
 * The backend for a new connection of client aff to svc: the affinity
 * entry's when the service has a timeout and the entry may be used, else
 * table slot hash % n (the caller's flow hash, or a random number), then
 * remembered for affinity. NULL: the service has no usable backend.
 */
static __always_inline struct lb_backend *lb_select_backend(const struct lb_service *svc,
							    __u32 hash,
							    const struct lb_affinity_key *aff)
{
	__u32 id = svc->service_id, zero = 0;
	__u32 timeout = svc->affinity_timeout;
	void *table = bpf_map_lookup_elem(&mb_lb_tables, &id);
	struct lb_backend *be;
	__u64 now = 0;

	if (!table)
		return NULL;
	__u32 *countp = bpf_map_lookup_elem(table, &zero);
	if (!countp || *countp == 0)
		return NULL;
	__u32 count = *countp;

	if (timeout) {
		now = bpf_ktime_get_ns();
		be = lb_affinity_backend(aff, timeout, table, count, now);
		if (be)
			return be;
	}
	__u32 slot = hash % count + 1; /* slot 0 holds the count */
	__u32 *backend_id = bpf_map_lookup_elem(table, &slot);
	if (!backend_id)
		return NULL;
	__u32 chosen = *backend_id;
	be = bpf_map_lookup_elem(&mb_lb_backends, &chosen);
	if (be && timeout) {
		struct lb_affinity remember = { .last_used = now, .backend_id = chosen };

		bpf_map_update_elem(&mb_lb_affinity, aff, &remember, BPF_ANY);
	}
	return be;
}

#endif /* __BPF__ */
#endif /* MEMBRANE_LB_H */
