// SPDX-License-Identifier: (Apache-2.0 OR GPL-2.0-only)
/*
 * bpf_host: tc ingress on the node's underlay device. Packets from other
 * nodes addressed to a pod on this node pass the pod's ingress policy
 * (source identity from the ipcache) and are delivered straight to the pod;
 * ARP requests for announced service addresses are answered here (lib/arp.h);
 * everything else (node traffic, other ARP, anything unparsable) goes to the
 * stack, which owns the underlay and validates what it receives.
 */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>

#include "lib/arp.h"
#include "lib/common.h"
#include "lib/config.h"
#include "lib/endpoints.h"
#include "lib/ingress.h"
#include "lib/ipv4.h"
#include "lib/metrics.h"
#include "lib/nodeport.h"
#include "lib/redirect.h"
#include "lib/trace.h"

SEC("classifier")
int from_netdev(struct __sk_buff *ctx)
{
	struct pkt4 p = {};
	int ret;

	metric_inc(METRIC_HOST_RX, ctx->len);

	ret = parse_ipv4(ctx, &p);
	/* parse_ipv4 pulled the first bytes into the linear area: an ARP packet fits. */
	if (ret == PARSE_NOT_IPV4 &&
	    arp_respond_in_place(ctx_data(ctx), ctx_data_end(ctx), ctx->ifindex)) {
		metric_inc(METRIC_ARP_REPLY, ctx->len);
		return bpf_redirect(ctx->ifindex, 0);
	}
	/* Malformed packets are the stack's business here, not a drop of ours. */
	if (ret != PARSE_OK)
		return pass_to_stack(ctx);

	/*
	 * Service frontends reached from outside (lib/nodeport.h): replies of
	 * SNATed flows back to their clients, requests DNATed to a backend.
	 * Empty maps (service LB off): nothing matches, nothing changes.
	 */
	if (feature_enabled(FEATURE_REDIRECT_NEIGH)) {
		__u32 oif = 0;
		int remote = 0;
		int r = np_reverse(ctx, &p, &oif);

		if (r < 0)
			return drop_packet(ctx, OBS_HOST, DROP_REWRITE_FAILED, &p);
		if (r > 0)
			return bpf_redirect_neigh(oif, NULL, 0, 0);
		r = np_forward(ctx, &p, &remote);
		if (r == NP_REWRITE_FAILED)
			return drop_packet(ctx, OBS_HOST, DROP_REWRITE_FAILED, &p);
		if (r == NP_NO_PORT)
			return drop_packet(ctx, OBS_HOST, DROP_NAT_NO_PORT, &p);
		if (r == 0) {
			if (remote)
				return np_redirect_fib(ctx, &p);
			const struct endpoint_info *bep = lookup_endpoint(p.tuple.daddr);

			if (!bep)
				return pass_to_stack(ctx);
			ret = ingress_admit(ctx, &p, bep, NULL, OBS_HOST);
			if (ret)
				return ret;
			return redirect_to_endpoint(ctx, bep, &p, OBS_HOST,
						    FEATURE_REDIRECT_PEER | FEATURE_REDIRECT_NEIGH);
		}
	}

	const struct endpoint_info *ep = lookup_endpoint(p.tuple.daddr);

	if (!ep)
		return pass_to_stack(ctx);
	/* No helper to deliver with: the stack delivers, and to_container judges it there. */
	if (!feature_enabled(FEATURE_REDIRECT_PEER) && !feature_enabled(FEATURE_REDIRECT_NEIGH))
		return pass_to_stack(ctx);
	/*
	 * Traffic from outside the cluster goes through the stack: its replies
	 * leave through the stack too (the pod's gateway), and netfilter's
	 * conntrack must have seen the connection's first packet, or the
	 * masquerading rule would rewrite those replies. to_container judges it.
	 */
	__u32 src_identity = resolve_identity(NULL, p.tuple.saddr);

	if (src_identity == IDENTITY_WORLD || src_identity >= IDENTITY_LOCAL_CIDR_BASE)
		return pass_to_stack(ctx);
	if (feature_enabled(FEATURE_REDIRECT_NEIGH))
		np_note_snated(ctx, &p, src_identity);
	/*
	 * The same holds for the nodes' own traffic (host, remote-node): the
	 * pod's reply to a node address would otherwise meet the masquerading
	 * rule in a conntrack that never saw the request.
	 */
	if (src_identity == IDENTITY_REMOTE_NODE || src_identity == IDENTITY_HOST)
		return pass_to_stack(ctx);
	/* From the underlay the source is never a local pod: its identity is the ipcache's. */
	ret = ingress_admit(ctx, &p, ep, NULL, OBS_HOST);
	if (ret)
		return ret;
	return redirect_to_endpoint(ctx, ep, &p, OBS_HOST,
				    FEATURE_REDIRECT_PEER | FEATURE_REDIRECT_NEIGH);
}

char _license[] SEC("license") = "GPL";
