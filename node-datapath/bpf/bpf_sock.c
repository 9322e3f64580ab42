// SPDX-License-Identifier: (Apache-2.0 OR GPL-2.0-only)
/*
 * bpf_sock: socket-level load balancing of ClusterIP services, attached to
 * the cgroup v2 that holds a node's pods (each pod's processes run in a
 * child cgroup of it). The destination is rewritten before the socket ever
 * sends a packet: no DNAT, no conntrack, no reverse translation on the wire.
 *
 * connect4 (TCP, connected UDP): service (address, port, protocol) ->
 * backend, by the service's algorithm; rewrites the connect() destination.
 * sendmsg4 (unconnected UDP): the same per datagram. Both record the
 * translation per socket (mb_lb_revnat, keyed by the socket cookie), so
 * that getpeername4 reports the frontend (ClusterIP:port) as the peer of a
 * connected socket and recvmsg4 shows replies as coming from it: the
 * application only ever sees the address it connected to.
 *
 * Session affinity (sessionAffinity: ClientIP): the client is the pod, i.e.
 * the network namespace of the socket (bpf_get_netns_cookie); a service with
 * a timeout sends every new connection of a pod to the backend its previous
 * one got, while that backend is still in the service's table
 * (lib/lb.h, lb_select_backend).
 *
 * Maglev at connect time: the flow hash wants the source port, but a socket
 * that was not bound yet has none (the kernel picks it after this hook).
 * Then a per-connect bpf_get_prandom_u32() stands in for it: the backend is
 * still drawn from the Maglev table (so weights, drains and the table's
 * consistency hold), but the choice cannot be reproduced from the tuple on
 * another node. A bound socket (explicit bind(), or connected UDP re-using
 * its port) hashes its real port. Cilium does the equivalent with the
 * socket cookie.
 *
 * A service with no backend (no table, count 0, or an unresolvable slot) fails the
 * connect() at once with ECONNREFUSED (sendmsg() likewise): never a timeout.
 *
 * Addresses that are not services are left alone (return 1, untouched).
 */
#include <linux/bpf.h>
#include <linux/in.h>
#include <linux/errno.h>
#include <bpf/bpf_helpers.h>

#include "lib/lb.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

#define SYS_REJECT 0
#define SYS_PROCEED 1

/* Outcome of a lookup. */
#define LB_NOT_SERVICE 0
#define LB_TRANSLATED 1
#define LB_NO_BACKEND 2

static __always_inline int lb4_translate(struct bpf_sock_addr *ctx, __u8 proto,
					 struct lb_revnat *frontend)
{
	struct lb_service_key key = {
		.address = ctx->user_ip4,
		.port = (__be16)ctx->user_port,
		.proto = proto,
	};
	struct lb_service *svc = bpf_map_lookup_elem(&mb_lb_services, &key);
	if (!svc)
		return LB_NOT_SERVICE;

	__u32 hash;
	if (svc->algorithm == LB_ALG_MAGLEV) {
		struct bpf_sock *sk = ctx->sk;
		__u32 sport = 0;
		__be32 saddr = 0;
		if (sk) {
			sport = sk->src_port; /* host order; 0 before bind */
			saddr = sk->src_ip4;
		}
		if (sport == 0)
			sport = bpf_get_prandom_u32(); /* see the file comment */
		hash = lb_flow_hash(saddr, sport, key.port, proto, svc->flags);
	} else {
		hash = bpf_get_prandom_u32();
	}
	struct lb_affinity_key pod = {
		.client = bpf_get_netns_cookie(ctx),
		.service_id = svc->service_id,
		.kind = LB_AFFINITY_NETNS,
	};
	struct lb_backend *be = lb_select_backend(svc, hash, &pod);
	if (!be)
		return LB_NO_BACKEND;

	__be16 port = be->port;
	if (!port)
		port = svc->target_port;
	if (!port)
		port = key.port;
	frontend->address = key.address;
	frontend->port = key.port;
	ctx->user_ip4 = be->address;
	ctx->user_port = port;
	return LB_TRANSLATED;
}

/* Remembers, for this socket, that the backend now in ctx stands for frontend. */
static __always_inline void lb4_remember(struct bpf_sock_addr *ctx, const struct lb_revnat *frontend)
{
	struct lb_revnat_key rk = {
		.cookie = bpf_get_socket_cookie(ctx),
		.address = ctx->user_ip4,
		.port = (__be16)ctx->user_port,
	};
	bpf_map_update_elem(&mb_lb_revnat, &rk, frontend, BPF_ANY);
}

/* A backend address this socket got from a translation shown as its frontend. */
static __always_inline void lb4_reverse(struct bpf_sock_addr *ctx)
{
	struct lb_revnat_key rk = {
		.cookie = bpf_get_socket_cookie(ctx),
		.address = ctx->user_ip4,
		.port = (__be16)ctx->user_port,
	};
	struct lb_revnat *fe = bpf_map_lookup_elem(&mb_lb_revnat, &rk);
	if (fe) {
		ctx->user_ip4 = fe->address;
		ctx->user_port = fe->port;
	}
}

static __always_inline __u8 sock_proto(struct bpf_sock_addr *ctx)
{
	if (ctx->protocol == IPPROTO_TCP)
		return IPPROTO_TCP;
	if (ctx->protocol == IPPROTO_UDP)
		return IPPROTO_UDP;
	return 0;
}

static __always_inline int reject(void)
{
	bpf_set_retval(-ECONNREFUSED);
	return SYS_REJECT;
}

SEC("cgroup/connect4")
int sock4_connect(struct bpf_sock_addr *ctx)
{
	__u8 proto = sock_proto(ctx);
	struct lb_revnat frontend = {};
	if (!proto)
		return SYS_PROCEED;
	switch (lb4_translate(ctx, proto, &frontend)) {
	case LB_NO_BACKEND:
		return reject();
	case LB_TRANSLATED:
		lb4_remember(ctx, &frontend);
		return SYS_PROCEED;
	default:
		return SYS_PROCEED;
	}
}

SEC("cgroup/sendmsg4")
int sock4_sendmsg(struct bpf_sock_addr *ctx)
{
	struct lb_revnat frontend = {};
	if (sock_proto(ctx) != IPPROTO_UDP)
		return SYS_PROCEED;
	switch (lb4_translate(ctx, IPPROTO_UDP, &frontend)) {
	case LB_NO_BACKEND:
		return reject();
	case LB_TRANSLATED:
		lb4_remember(ctx, &frontend);
		return SYS_PROCEED;
	default:
		return SYS_PROCEED;
	}
}

SEC("cgroup/recvmsg4")
int sock4_recvmsg(struct bpf_sock_addr *ctx)
{
	if (sock_proto(ctx) == IPPROTO_UDP)
		lb4_reverse(ctx);
	return SYS_PROCEED; /* recvmsg4 must return 1 */
}

SEC("cgroup/getpeername4")
int sock4_getpeername(struct bpf_sock_addr *ctx)
{
	if (sock_proto(ctx))
		lb4_reverse(ctx);
	return SYS_PROCEED; /* getpeername4 must return 1 */
}
