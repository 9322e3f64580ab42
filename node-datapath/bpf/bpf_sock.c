// SPDX-License-Identifier: (Apache-2.0 OR GPL-2.0-only)
/*
 * bpf_sock: socket-level load balancing of ClusterIP services, attached to
 * the cgroup v2 that holds a node's pods (each pod's processes run in a
 * child cgroup of it). The destination is rewritten before the socket ever
 * sends a packet: no DNAT, no conntrack, no reverse translation on the wire.
 *
 * connect4 (TCP, connected UDP): service (address, port, protocol) ->
 * backend, by the service's algorithm; rewrites the connect() destination.
 * sendmsg4 (unconnected UDP): the same per datagram, and records the
 * translation per socket so that recvmsg4 shows replies as coming from the
 * frontend.
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
	__u32 id = svc->service_id;
	void *table = bpf_map_lookup_elem(&mb_lb_tables, &id);
	if (!table)
		return LB_NO_BACKEND;
	__u32 zero = 0;
	__u32 *countp = bpf_map_lookup_elem(table, &zero);
	if (!countp || *countp == 0)
		return LB_NO_BACKEND;
	__u32 count = *countp;

	__u32 slot;
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
		slot = lb_flow_hash(saddr, sport, key.port, proto, svc->flags) % count;
	} else {
		slot = bpf_get_prandom_u32() % count;
	}
	slot += 1; /* slot 0 holds the count */

	__u32 *backend_id = bpf_map_lookup_elem(table, &slot);
	if (!backend_id)
		return LB_NO_BACKEND;
	struct lb_backend *be = bpf_map_lookup_elem(&mb_lb_backends, backend_id);
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
	if (lb4_translate(ctx, proto, &frontend) == LB_NO_BACKEND)
		return reject();
	return SYS_PROCEED;
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
	case LB_TRANSLATED: {
		struct lb_revnat_key rk = {
			.cookie = bpf_get_socket_cookie(ctx),
			.address = ctx->user_ip4,
			.port = (__be16)ctx->user_port,
		};
		bpf_map_update_elem(&mb_lb_revnat, &rk, &frontend, BPF_ANY);
		return SYS_PROCEED;
	}
	default:
		return SYS_PROCEED;
	}
}

SEC("cgroup/recvmsg4")
int sock4_recvmsg(struct bpf_sock_addr *ctx)
{
	if (sock_proto(ctx) != IPPROTO_UDP)
		return SYS_PROCEED;
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
	return SYS_PROCEED; /* recvmsg4 must return 1 */
}
