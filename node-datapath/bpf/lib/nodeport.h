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
 *   address (source port kept), forwarded with a FIB lookup. The reply
 *   comes back to this node, where bpf_host rewrites it back (frontend ->
 *   client) and sends it out again. On the backend's node the request
 *   (source: a remote node, destination: a backend port listed in
 *   mb_lb_be_ports) gets an identity reverse entry, so bpf_lxc sends the
 *   reply straight out of the underlay: through that node's stack it would
 *   be masqueraded (nftables never saw the request). Limitation: two clients using the same
 *   source port towards the same backend collide (the later flow's reverse
 *   entry wins); Cilium allocates SNAT ports, we do not yet.
 * - No backend: the packet goes to the stack untouched (a NodePort then
 *   gets the stack's RST / port unreachable).
 * With no entry in mb_lb_ext_services / mb_lb_nat4 (service LB off) nothing
 * here changes a packet.
 */
#ifndef MEMBRANE_NODEPORT_H
#define MEMBRANE_NODEPORT_H

#include <stddef.h>
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "common.h"
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

/*
 * A reply of a translated flow (its reverse entry): rewritten back to
 * frontend -> client. Returns 1 (and the ifindex to leave by) when it was,
 * 0 when it is not one, -1 when the rewrite failed.
 */
static __always_inline int np_reverse(struct __sk_buff *ctx, struct pkt4 *p, __u32 *ifindex)
{
	struct lb_nat_key k;
	struct lb_nat *n;

	if (!np_l4(p))
		return 0;
	np_key(&k, p->tuple.saddr, p->tuple.daddr, p->tuple.sport, p->tuple.dport, p->tuple.proto,
	       LB_NAT_REV);
	n = bpf_map_lookup_elem(&mb_lb_nat4, &k);
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
 * The forward direction at bpf_host: an established translated flow, or a
 * new one to a service frontend. Returns 0 with the packet translated and
 * *remote set when the backend is on another node (SNATed), NP_NOT_OURS
 * when it is no service traffic (or has no backend), -2 on rewrite failure.
 */
static __always_inline int np_forward(struct __sk_buff *ctx, struct pkt4 *p, int *remote)
{
	struct lb_nat_key k;
	struct lb_nat *n;

	if (!np_l4(p))
		return NP_NOT_OURS;
	np_key(&k, p->tuple.saddr, p->tuple.daddr, p->tuple.sport, p->tuple.dport, p->tuple.proto,
	       LB_NAT_FWD);
	n = bpf_map_lookup_elem(&mb_lb_nat4, &k);
	if (!n) {
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
		struct lb_nat fwd = {
			.saddr = src,
			.daddr = be->address,
			.sport = p->tuple.sport,
			.dport = port,
			.ifindex = ctx->ifindex,
		};
		struct lb_nat rev = {
			.saddr = p->tuple.daddr,
			.daddr = p->tuple.saddr,
			.sport = p->tuple.dport,
			.dport = p->tuple.sport,
			.ifindex = ctx->ifindex,
		};
		struct lb_nat_key rk;

		np_key(&rk, be->address, src, port, p->tuple.sport, p->tuple.proto, LB_NAT_REV);
		if (bpf_map_update_elem(&mb_lb_nat4, &rk, &rev, BPF_ANY) < 0 ||
		    bpf_map_update_elem(&mb_lb_nat4, &k, &fwd, BPF_ANY) < 0)
			return NP_NOT_OURS;
		*remote = !local;
		if (np_apply(ctx, p, &fwd) < 0)
			return -2;
		return 0;
	}
	*remote = n->saddr != k.saddr;
	if (np_apply(ctx, p, n) < 0)
		return -2;
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
