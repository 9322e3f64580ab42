/* SPDX-License-Identifier: (Apache-2.0 OR GPL-2.0-only) */
/*
 * NodePort / LoadBalancer / externalIPs at tc: DNAT to a backend chosen with
 * the service's table (Maglev: hash of source address, source port,
 * destination port and protocol, so every node picks the same backend for a
 * client flow), and the reverse translation of the replies.
 *
 * - Local backend: DNAT only; delivered like any packet from the underlay
 *   (ingress policy, ct). The backend's reply is rewritten back to the
 *   frontend in bpf_lxc (from_container) and sent straight out of the
 *   device the request came in on (bpf_redirect_neigh), bypassing the
 *   node's stack and netfilter (which never saw the request).
 * - Remote backend ("SNAT mode"): DNAT and SNAT to this node's underlay
 *   address, forwarded with a FIB lookup. The source port is allocated
 *   (np_snat_alloc): the client's own when no other flow to that backend
 *   uses it, else one of CONFIG_SNAT_PORT_MIN..MAX found by a hash of the
 *   flow and a bounded linear probe; none free: the packet is dropped
 *   (DROP_NAT_NO_PORT). The reverse entry (backend, node, backend port,
 *   SNAT port) restores the client's address and port. The reply comes
 *   back to this node, where bpf_host rewrites it back (frontend -> client)
 *   and sends it out again. On the backend's node the request (source: a
 *   remote node, destination: a backend port listed in mb_lb_be_ports) gets
 *   an identity reverse entry, so bpf_lxc sends the reply straight out of
 *   the underlay: through that node's stack it would be masqueraded
 *   (nftables never saw the request). Limitation: the node's own
 *   connections are not in mb_lb_nat4, so a connection of the node itself
 *   from its underlay address to a backend's port, using a port a SNATed
 *   flow holds, would have its replies taken for that flow's (the default
 *   range is the kernel's ephemeral range; Cilium avoids this by tracking
 *   host connections in its SNAT table).
 * - No backend: the packet goes to the stack untouched (a NodePort then
 *   gets the stack's RST / port unreachable).
 * With no entry in mb_lb_ext_services / mb_lb_nat4 (service LB off) nothing
 * here changes a packet.
 *
 * The decision and the state (np_plan_forward, np_commit, np_snat_alloc,
 * np_reverse_entry) take no context, so bpf_xdp runs the same code in front
 * of bpf_host for requests to remote backends; only the packet rewrite
 * differs (skb helpers here, np_apply_data on linear memory there).
 */
#ifndef MEMBRANE_NODEPORT_H
#define MEMBRANE_NODEPORT_H

#include <stddef.h>
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "common.h"
#include "csum.h"
#include "endpoints.h"
#include "ipv4.h"
#include "lb.h"

#define NP_NOT_OURS (-1)

#ifndef AF_INET
#define AF_INET 2
#endif

static __always_inline int np_store_csum(struct __sk_buff *ctx, __u32 off, __u32 csum_off,
					 int has_l4csum, __u64 flags, const void *oldp,
					 const void *newp, __u32 size, int l3)
{
	__u32 from = 0, to = 0;

	__builtin_memcpy(&from, oldp, size);
	__builtin_memcpy(&to, newp, size);
	if (from == to)
		return 0;
	if (has_l4csum && bpf_l4_csum_replace(ctx, csum_off, from, to, flags | size) < 0)
		return -1;
	if (l3 && bpf_l3_csum_replace(ctx, ETH_HLEN + offsetof(struct iphdr, check), from, to,
				      size) < 0)
		return -1;
	return bpf_skb_store_bytes(ctx, off, newp, size, 0);
}

/* Rewrite addresses and ports of a TCP/UDP packet, checksums included. */
static __always_inline int np_rewrite(struct __sk_buff *ctx, __u8 proto, const struct ct_key *old,
				      __be32 saddr, __be32 daddr, __be16 sport, __be16 dport)
{
	__u8 vihl;
	__u16 csum = 1;
	__u64 flags = BPF_F_PSEUDO_HDR;

	if (bpf_skb_load_bytes(ctx, ETH_HLEN, &vihl, 1) < 0)
		return -1;
	__u32 l4 = ETH_HLEN + (vihl & 0xf) * 4;
	__u32 csum_off = l4 + (proto == IPPROTO_TCP ? 16 : 6);
	if (proto == IPPROTO_UDP) {
		if (bpf_skb_load_bytes(ctx, csum_off, &csum, 2) < 0)
			return -1;
		flags |= BPF_F_MARK_MANGLED_0;
	}
	int has = csum != 0;

	if (np_store_csum(ctx, ETH_HLEN + offsetof(struct iphdr, saddr), csum_off, has, flags,
			  &old->saddr, &saddr, 4, 1) < 0)
		return -1;
	if (np_store_csum(ctx, ETH_HLEN + offsetof(struct iphdr, daddr), csum_off, has, flags,
			  &old->daddr, &daddr, 4, 1) < 0)
		return -1;
	flags &= ~BPF_F_PSEUDO_HDR;
	if (np_store_csum(ctx, l4, csum_off, has, flags, &old->sport, &sport, 2, 0) < 0)
		return -1;
	if (np_store_csum(ctx, l4 + 2, csum_off, has, flags, &old->dport, &dport, 2, 0) < 0)
		return -1;
	return 0;
}

static __always_inline void np_key(struct lb_nat_key *k, __be32 saddr, __be32 daddr,
				   __be16 sport, __be16 dport, __u8 proto, __u8 dir)
{
	k->saddr = saddr;
	k->daddr = daddr;
	k->sport = sport;
	k->dport = dport;
	k->proto = proto;
	k->dir = dir;
	k->pad[0] = 0;
	k->pad[1] = 0;
}

/* Apply a NAT entry to the packet and to p's tuple. */
static __always_inline int np_apply(struct __sk_buff *ctx, struct pkt4 *p, const struct lb_nat *n)
{
	if (np_rewrite(ctx, p->tuple.proto, &p->tuple, n->saddr, n->daddr, n->sport, n->dport) < 0)
		return -1;
	p->tuple.saddr = n->saddr;
	p->tuple.daddr = n->daddr;
	p->tuple.sport = n->sport;
	p->tuple.dport = n->dport;
	return 0;
}

static __always_inline int np_l4(const struct pkt4 *p)
{
	return (p->tuple.proto == IPPROTO_TCP || p->tuple.proto == IPPROTO_UDP) &&
	       (p->tuple.sport || p->tuple.dport);
}

/* Context-free: the reverse entry of p when p is a reply of a translated flow. */
static __always_inline struct lb_nat *np_reverse_entry(const struct pkt4 *p)
{
	struct lb_nat_key k;

	if (!np_l4(p))
		return NULL;
	np_key(&k, p->tuple.saddr, p->tuple.daddr, p->tuple.sport, p->tuple.dport, p->tuple.proto,
	       LB_NAT_REV);
	return bpf_map_lookup_elem(&mb_lb_nat4, &k);
}

/*
 * A reply of a translated flow (its reverse entry): rewritten back to
 * frontend -> client. Returns 1 (and the ifindex to leave by) when it was,
 * 0 when it is not one, -1 when the rewrite failed.
 */
static __always_inline int np_reverse(struct __sk_buff *ctx, struct pkt4 *p, __u32 *ifindex)
{
	struct lb_nat *n = np_reverse_entry(p);

	if (!n)
		return 0;
	*ifindex = n->ifindex;
	if (np_apply(ctx, p, n) < 0)
		return -1;
	return 1;
}

static __always_inline struct lb_service *np_service(const struct pkt4 *p, __be32 *node_addr)
{
	__u32 zero = 0;
	__be32 *node = bpf_map_lookup_elem(&mb_lb_node, &zero);
	struct lb_service_key key = {
		.address = p->tuple.daddr,
		.port = p->tuple.dport,
		.proto = p->tuple.proto,
	};
	struct lb_service *svc;

	*node_addr = node ? *node : 0;
	svc = bpf_map_lookup_elem(&mb_lb_ext_services, &key);
	if (svc)
		return svc;
	if (!*node_addr || *node_addr != p->tuple.daddr)
		return NULL;
	key.address = 0; /* NodePort: every node's own address */
	return bpf_map_lookup_elem(&mb_lb_ext_services, &key);
}

static __always_inline struct lb_backend *np_select(const struct pkt4 *p,
						    const struct lb_service *svc)
{
	/* ClientIP session affinity: here the client is the source address. */
	struct lb_affinity_key client = {
		.client = p->tuple.saddr,
		.service_id = svc->service_id,
		.kind = LB_AFFINITY_ADDR,
	};
	__u32 hash;

	if (svc->algorithm == LB_ALG_MAGLEV)
		hash = lb_flow_hash(p->tuple.saddr, bpf_ntohs(p->tuple.sport), p->tuple.dport,
				    p->tuple.proto, svc->flags);
	else
		hash = bpf_get_prandom_u32();
	return lb_select_backend(svc, hash, &client);
}

/*
 * SNAT source ports for flows to remote backends: the client's own port when
 * it is free towards that backend, else one of [MIN, MAX] (load-time
 * constants, patched by the loader; see np_snat_alloc).
 */
volatile const __u16 CONFIG_SNAT_PORT_MIN = 32768;
volatile const __u16 CONFIG_SNAT_PORT_MAX = 60999;

/* Ports tried after the client's own, as Cilium's snat_v4_new_mapping does. */
#define NP_SNAT_RETRIES 32

#define NP_REWRITE_FAILED (-2)
#define NP_NO_PORT (-3)

/*
 * What the forward direction of a flow becomes: an established flow's
 * translation (its LB_NAT_FWD entry), or a new flow's, decided but not yet
 * in the map (is_new: np_commit allocates its port and writes the entries).
 */
struct np_plan {
	struct lb_nat fwd;
	__u8 is_new;
	__u8 remote; /* the backend is on another node: SNATed to this node */
};

/*
 * Context-free (tc and XDP): the translation of a packet of p's forward
 * direction. Reads maps, writes none. Returns 0 with *plan filled, or
 * NP_NOT_OURS when it is no service traffic (or the service has no backend).
 */
static __always_inline int np_plan_forward(const struct pkt4 *p, struct np_plan *plan)
{
	struct lb_nat_key k;
	struct lb_nat *n;

	if (!np_l4(p))
		return NP_NOT_OURS;
	np_key(&k, p->tuple.saddr, p->tuple.daddr, p->tuple.sport, p->tuple.dport, p->tuple.proto,
	       LB_NAT_FWD);
	n = bpf_map_lookup_elem(&mb_lb_nat4, &k);
	if (n) {
		plan->fwd = *n;
		plan->is_new = 0;
		plan->remote = n->saddr != k.saddr;
		return 0;
	}
	__be32 node_addr;
	struct lb_service *svc = np_service(p, &node_addr);

	if (!svc)
		return NP_NOT_OURS;
	struct lb_backend *be = np_select(p, svc);

	if (!be)
		return NP_NOT_OURS;
	__be16 port = be->port;

	if (!port)
		port = svc->target_port;
	if (!port)
		port = p->tuple.dport;
	int local = lookup_endpoint(be->address) != NULL;
	__be32 src = local ? p->tuple.saddr : node_addr;

	if (!src)
		return NP_NOT_OURS;
	plan->fwd.saddr = src;
	plan->fwd.daddr = be->address;
	plan->fwd.sport = p->tuple.sport;
	plan->fwd.dport = port;
	plan->fwd.ifindex = 0;
	plan->is_new = 1;
	plan->remote = !local;
	return 0;
}

/*
 * Take the reverse entry rk -> rev unless another flow holds it. A flow
 * finding its own entry (its forward entry was evicted from the LRU, the
 * reverse one was not) takes it back.
 */
static __always_inline int np_snat_claim(const struct lb_nat_key *rk, const struct lb_nat *rev)
{
	if (bpf_map_update_elem(&mb_lb_nat4, rk, rev, BPF_NOEXIST) == 0)
		return 1;
	struct lb_nat *cur = bpf_map_lookup_elem(&mb_lb_nat4, rk);

	return cur && cur->saddr == rev->saddr && cur->daddr == rev->daddr &&
	       cur->sport == rev->sport && cur->dport == rev->dport;
}

/*
 * Allocate the SNAT port of a new flow to a remote backend: the port in the
 * reverse key (backend, node, backend port, SNAT port) must be unique among
 * the flows to that backend, or their replies could not be told apart. The
 * client's own port first (most flows keep it), then NP_SNAT_RETRIES ports
 * of the range from a hash of the flow, probing linearly. The reverse entry
 * is written by the claim. Returns 0 with rk->dport the port, or NP_NO_PORT.
 */
static __always_inline int np_snat_alloc(const struct pkt4 *p, struct lb_nat_key *rk,
					 const struct lb_nat *rev)
{
	__u32 min = CONFIG_SNAT_PORT_MIN;
	__u32 span = (__u32)CONFIG_SNAT_PORT_MAX - min + 1;
	__u32 h;

	rk->dport = p->tuple.sport;
	if (np_snat_claim(rk, rev))
		return 0;
	if (CONFIG_SNAT_PORT_MAX < min)
		return NP_NO_PORT;
	h = lb_fmix32(p->tuple.saddr ^ lb_fmix32(p->tuple.daddr ^ 0x736e6174)); /* "snat" */
	h = lb_fmix32(h ^ (((__u32)p->tuple.sport << 16) | p->tuple.dport) ^ p->tuple.proto);
	for (__u32 i = 0; i < NP_SNAT_RETRIES; i++) {
		rk->dport = bpf_htons((__u16)(min + (h + i) % span));
		if (np_snat_claim(rk, rev))
			return 0;
	}
	return NP_NO_PORT;
}

/*
 * Context-free: make a planned new flow real. Its replies will leave by
 * `ifindex`. For a remote backend the SNAT port is allocated
 * (plan->fwd.sport). Returns 0 (nothing to do for an established flow),
 * NP_NO_PORT, or NP_NOT_OURS when the map refused the entries (the packet
 * then goes on untranslated, as without service LB).
 */
static __always_inline int np_commit(const struct pkt4 *p, struct np_plan *plan, __u32 ifindex)
{
	struct lb_nat_key k, rk;
	struct lb_nat rev = {
		.saddr = p->tuple.daddr,
		.daddr = p->tuple.saddr,
		.sport = p->tuple.dport,
		.dport = p->tuple.sport,
		.ifindex = ifindex,
	};

	if (!plan->is_new)
		return 0;
	plan->fwd.ifindex = ifindex;
	np_key(&rk, plan->fwd.daddr, plan->fwd.saddr, plan->fwd.dport, p->tuple.sport,
	       p->tuple.proto, LB_NAT_REV);
	if (plan->remote) {
		if (np_snat_alloc(p, &rk, &rev) < 0)
			return NP_NO_PORT;
		plan->fwd.sport = rk.dport;
	} else if (bpf_map_update_elem(&mb_lb_nat4, &rk, &rev, BPF_ANY) < 0) {
		/* Local backend: the client's own address and port, unique already. */
		return NP_NOT_OURS;
	}
	np_key(&k, p->tuple.saddr, p->tuple.daddr, p->tuple.sport, p->tuple.dport, p->tuple.proto,
	       LB_NAT_FWD);
	if (bpf_map_update_elem(&mb_lb_nat4, &k, &plan->fwd, BPF_ANY) < 0) {
		bpf_map_delete_elem(&mb_lb_nat4, &rk);
		return NP_NOT_OURS;
	}
	plan->is_new = 0;
	return 0;
}

/*
 * The forward direction at bpf_host: an established translated flow, or a
 * new one to a service frontend. Returns 0 with the packet translated and
 * *remote set when the backend is on another node (SNATed), NP_NOT_OURS
 * when it is no service traffic (or has no backend), NP_NO_PORT when no
 * SNAT port was free, NP_REWRITE_FAILED on rewrite failure.
 */
static __always_inline int np_forward(struct __sk_buff *ctx, struct pkt4 *p, int *remote)
{
	struct np_plan plan;
	int ret = np_plan_forward(p, &plan);

	if (ret < 0)
		return ret;
	ret = np_commit(p, &plan, ctx->ifindex);
	if (ret < 0)
		return ret;
	*remote = plan.remote;
	if (np_apply(ctx, p, &plan.fwd) < 0)
		return NP_REWRITE_FAILED;
	return 0;
}

/*
 * Context-free rewrite of a TCP/UDP packet in linear memory (XDP): addresses
 * and ports to n's, checksums updated incrementally. The caller checked that
 * the IPv4 header has no options (ihl 5) and that the L4 header is there
 * (parse_ipv4_data). Returns 0, or -1 if the headers are out of bounds.
 */
static __always_inline int np_apply_data(void *data, void *data_end, __u8 proto,
					 const struct lb_nat *n)
{
	struct iphdr *ip4 = data + ETH_HLEN;
	__u16 *l4csum = NULL;
	__be16 *ports = (void *)(ip4 + 1);

	if ((void *)(ip4 + 1) > data_end)
		return -1;
	if (proto == IPPROTO_TCP) {
		struct tcphdr *tcp = (void *)(ip4 + 1);

		if ((void *)(tcp + 1) > data_end)
			return -1;
		l4csum = (__u16 *)&tcp->check;
	} else {
		struct udphdr *udp = (void *)(ip4 + 1);

		if ((void *)(udp + 1) > data_end)
			return -1;
		/* 0: the sender computed none, and none is owed. */
		if (udp->check)
			l4csum = (__u16 *)&udp->check;
	}
	csum_replace4((__u16 *)&ip4->check, ip4->saddr, n->saddr);
	csum_replace4((__u16 *)&ip4->check, ip4->daddr, n->daddr);
	if (l4csum) {
		/* The pseudo header carries the addresses. */
		csum_replace4(l4csum, ip4->saddr, n->saddr);
		csum_replace4(l4csum, ip4->daddr, n->daddr);
		csum_replace2(l4csum, ports[0], n->sport);
		csum_replace2(l4csum, ports[1], n->dport);
		if (proto == IPPROTO_UDP && *l4csum == 0)
			*l4csum = 0xffff;
	}
	ip4->saddr = n->saddr;
	ip4->daddr = n->daddr;
	ports[0] = n->sport;
	ports[1] = n->dport;
	return 0;
}

/*
 * On a backend's node: a request another node SNATed to its own address
 * (src: a remote node, dst: a local service backend port). Its replies
 * must not go through this node's stack, whose masquerading would rewrite
 * them (the stack never saw the request): an identity reverse entry makes
 * bpf_lxc send them straight out of the underlay device.
 */
static __always_inline void np_note_snated(struct __sk_buff *ctx, const struct pkt4 *p,
					   __u32 src_identity)
{
	struct lb_service_key key = {
		.address = p->tuple.daddr,
		.port = p->tuple.dport,
		.proto = p->tuple.proto,
	};
	struct lb_nat_key k;

	if (src_identity != IDENTITY_REMOTE_NODE || !np_l4(p))
		return;
	if (!bpf_map_lookup_elem(&mb_lb_be_ports, &key))
		return;
	struct lb_nat same = {
		.saddr = p->tuple.daddr,
		.daddr = p->tuple.saddr,
		.sport = p->tuple.dport,
		.dport = p->tuple.sport,
		.ifindex = ctx->ifindex,
	};
	np_key(&k, p->tuple.daddr, p->tuple.saddr, p->tuple.dport, p->tuple.sport, p->tuple.proto,
	       LB_NAT_REV);
	bpf_map_update_elem(&mb_lb_nat4, &k, &same, BPF_ANY);
}

/* Out of the node towards p's destination, by the FIB (routes to other nodes' pods). */
static __always_inline int np_redirect_fib(struct __sk_buff *ctx, const struct pkt4 *p)
{
	struct bpf_fib_lookup fib = {
		.family = AF_INET,
		.l4_protocol = p->tuple.proto,
		.tot_len = 0,
		.ifindex = ctx->ifindex,
		.ipv4_src = p->tuple.saddr,
		.ipv4_dst = p->tuple.daddr,
	};
	int ret = bpf_fib_lookup(ctx, &fib, sizeof(fib), BPF_FIB_LOOKUP_OUTPUT);

	if (ret != BPF_FIB_LKUP_RET_SUCCESS && ret != BPF_FIB_LKUP_RET_NO_NEIGH)
		return bpf_redirect_neigh(ctx->ifindex, NULL, 0, 0);
	return bpf_redirect_neigh(fib.ifindex, NULL, 0, 0);
}

#endif /* MEMBRANE_NODEPORT_H */
