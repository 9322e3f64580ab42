// SPDX-License-Identifier: (Apache-2.0 OR GPL-2.0-only)
/*
 * bpf_lxc: the two tc hooks of a pod's node-side veth (lxc*).
 *
 * from_container (tc ingress): every packet the pod sends. Tracks the
 * connection and applies the pod's egress policy; delivers pod -> local pod
 * traffic with bpf_redirect_peer after the destination pod's ingress policy
 * (the node's stack, and so to_container, never sees it); everything else
 * goes to the node's stack, which routes it (underlay, other nodes, world).
 *
 * to_container (tc egress): packets the node's stack delivers to the pod
 * (from the node itself, de-masqueraded replies, pod -> pod when
 * redirect_peer is off). Applies the pod's ingress policy.
 */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>

#include "lib/common.h"
#include "lib/config.h"
#include "lib/ct.h"
#include "lib/endpoints.h"
#include "lib/identity.h"
#include "lib/ingress.h"
#include "lib/ipv4.h"
#include "lib/metrics.h"
#include "lib/nodeport.h"
#include "lib/policy.h"
#include "lib/redirect.h"
#include "lib/trace.h"

SEC("classifier")
int from_container(struct __sk_buff *ctx)
{
	struct trace_meta meta = { .direction = POLICY_EGRESS };
	const struct endpoint_info *src_ep = NULL;
	const struct endpoint_info *dst_ep;
	struct pkt4 p = {};
	enum ct_status status;
	struct ct_entry *e;
	int ret;

	metric_inc(METRIC_LXC_RX, ctx->len);

	ret = parse_ipv4(ctx, &p);
	if (ret == PARSE_NOT_IPV4)
		return pass_to_stack(ctx);
	/* A pod sending truncated IPv4 is broken or hostile: drop and say so. */
	if (ret != PARSE_OK)
		return drop_packet(ctx, OBS_LXC, DROP_INVALID, NULL);
	/* Anti-spoofing: the source must be the pod behind this veth. */
	if (verify_source()) {
		src_ep = lookup_endpoint(p.tuple.saddr);
		if (!src_ep || src_ep->ifindex != ctx->ifindex)
			return drop_packet(ctx, OBS_LXC, DROP_INVALID_SOURCE, &p);
	}

	p.tuple.dir = CT_EGRESS;
	e = ct_lookup(&p.tuple, &status);
	dst_ep = lookup_endpoint(p.tuple.daddr);

	/*
	 * Original direction: the sender's egress policy, and the receiver's
	 * ingress policy when it is a local pod we deliver to ourselves (with
	 * redirect_peer off the stack delivers, through to_container, which
	 * judges it there). Replies of a tracked connection always pass.
	 */
	if (status != CT_REPLY && (policy_enabled() || status == CT_NEW)) {
		/* Already found by source verification when that is on. */
		if (!src_ep)
			src_ep = lookup_endpoint(p.tuple.saddr);
		meta.endpoint_id = src_ep ? src_ep->endpoint_id : 0;
		meta.src_identity = resolve_identity(src_ep, p.tuple.saddr);
		meta.dst_identity = resolve_identity(dst_ep, p.tuple.daddr);
	}
	if (status != CT_REPLY) {
		__be16 port = policy_port(&p);

		/* No endpoint entry (not programmed yet): nothing to enforce for. */
		if (src_ep) {
			ret = policy_check(src_ep, POLICY_EGRESS, meta.dst_identity, p.tuple.proto,
					   port, &meta.rule_id);
			if (ret)
				return drop_policy(ctx, OBS_LXC, ret, &p, &meta);
		}
		if (dst_ep && feature_enabled(FEATURE_REDIRECT_PEER)) {
			ret = policy_check(dst_ep, POLICY_INGRESS, meta.src_identity, p.tuple.proto,
					   port, &meta.rule_id);
			if (ret) {
				meta.endpoint_id = dst_ep->endpoint_id;
				meta.direction = POLICY_INGRESS;
				return drop_policy(ctx, OBS_LXC, ret, &p, &meta);
			}
		}
	}

	/* Only now, allowed: an entry is what lets the peer's packets in as replies. */
	ret = ct_commit(&p.tuple, e, &status, ctx->len, p.tcp_flags);
	if (ret)
		return drop_packet(ctx, OBS_LXC, ret, &p);
	metric_inc(METRIC_CT_NEW + status, ctx->len);
	if (status == CT_NEW)
		emit_event(ctx, EVENT_TRACE_NEW_CONN, OBS_LXC, 0, &p, &meta);

	/* A backend's reply to a NodePort/LB client: back to the frontend, out where it came in. */
	if (feature_enabled(FEATURE_REDIRECT_NEIGH)) {
		__u32 oif = 0;
		int r = np_reverse(ctx, &p, &oif);

		if (r < 0)
			return drop_packet(ctx, OBS_LXC, DROP_REWRITE_FAILED, &p);
		if (r > 0)
			return bpf_redirect_neigh(oif, NULL, 0, 0);
	}

	if (!dst_ep)
		return pass_to_stack(ctx);
	/* Only redirect_peer: without it the stack's forwarding path is the fallback. */
	return redirect_to_endpoint(ctx, dst_ep, &p, OBS_LXC, FEATURE_REDIRECT_PEER);
}

SEC("classifier")
int to_container(struct __sk_buff *ctx)
{
	const struct endpoint_info *ep;
	struct pkt4 p = {};
	int ret;

	metric_inc(METRIC_TO_LXC, ctx->len);

	/* bpf_host delivered it with redirect_neigh and already judged it. */
	if (ctx->mark == MARK_POLICY_DONE) {
		ctx->mark = 0;
		return TC_ACT_OK;
	}
	/* The stack built or forwarded it and validated what it parsed: not ours to drop. */
	if (parse_ipv4(ctx, &p) != PARSE_OK)
		return TC_ACT_OK;
	ep = lookup_endpoint(p.tuple.daddr);
	if (!ep)
		return TC_ACT_OK;

	ret = ingress_admit(ctx, &p, ep, lookup_endpoint(p.tuple.saddr), OBS_TO_LXC);
	if (ret)
		return ret;
	return TC_ACT_OK;
}

/* The kernel checks this for GPL-only helpers: we load under the GPL option of the SPDX line. */
char _license[] SEC("license") = "GPL";
