/* SPDX-License-Identifier: (Apache-2.0 OR GPL-2.0-only) */
/*
 * Delivering a packet straight to a local pod, bypassing the node's stack
 * (so it works with ip_forward=0 in the node namespace).
 *
 * bpf_redirect_peer(lxc ifindex) from a tc *ingress* hook moves the skb to
 * the ingress of the veth's peer, i.e. eth0 inside the pod, without a
 * backlog round-trip. No neighbour lookup happens, so we write the Ethernet
 * header the pod would have received from a router: src = node-side veth MAC
 * (the pod's gateway neighbour), dst = pod MAC.
 * bpf_redirect_neigh(lxc ifindex) transmits out of the node-side veth and
 * lets the kernel's neighbour subsystem fill in the L2 header.
 */
#ifndef MEMBRANE_REDIRECT_H
#define MEMBRANE_REDIRECT_H

#include <stddef.h>
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>

#include "common.h"
#include "config.h"
#include "ipv4.h"
#include "metrics.h"
#include "trace.h"

static __always_inline int eth_rewrite(struct __sk_buff *ctx, const struct endpoint_info *ep)
{
	int ret = bpf_skb_store_bytes(ctx, offsetof(struct ethhdr, h_dest), ep->pod_mac, ETH_ALEN, 0);

	if (ret < 0)
		return ret;
	return bpf_skb_store_bytes(ctx, offsetof(struct ethhdr, h_source), ep->node_mac, ETH_ALEN, 0);
}

/*
 * Deliver to ep with the best helper allowed by CONFIG_FEATURES and
 * `allowed` (a mask of FEATURE_REDIRECT_*), or hand the packet to the stack
 * when none is. Returns the tc verdict.
 */
static __always_inline int redirect_to_endpoint(struct __sk_buff *ctx, const struct endpoint_info *ep,
						const struct pkt4 *p, __u8 source, __u32 allowed)
{
	int use_peer = feature_enabled(FEATURE_REDIRECT_PEER) && (allowed & FEATURE_REDIRECT_PEER);
	int use_neigh = feature_enabled(FEATURE_REDIRECT_NEIGH) && (allowed & FEATURE_REDIRECT_NEIGH);

	if (!use_peer && !use_neigh)
		return pass_to_stack(ctx);

	/* The stack would answer with ICMP time exceeded; we only drop, for now. */
	if (p->ttl <= 1)
		return drop_packet(ctx, source, DROP_TTL_EXCEEDED, p);
	if (ipv4_dec_ttl(ctx, p->ttl) < 0)
		return drop_packet(ctx, source, DROP_REWRITE_FAILED, p);

	if (use_peer) {
		if (eth_rewrite(ctx, ep) < 0)
			return drop_packet(ctx, source, DROP_REWRITE_FAILED, p);
		metric_inc(METRIC_REDIRECT_PEER, ctx->len);
		return bpf_redirect_peer(ep->ifindex, 0);
	}
	/* The packet leaves through the veth's tc egress: tell to_container it was judged. */
	ctx->mark = MARK_POLICY_DONE;
	metric_inc(METRIC_REDIRECT_NEIGH, ctx->len);
	return bpf_redirect_neigh(ep->ifindex, NULL, 0, 0);
}

#endif /* MEMBRANE_REDIRECT_H */
