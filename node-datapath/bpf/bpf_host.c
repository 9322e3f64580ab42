// SPDX-License-Identifier: (Apache-2.0 OR GPL-2.0-only)
/*
 * bpf_host: tc ingress on the node's underlay device. Packets from other
 * nodes addressed to a pod on this node are delivered straight to the pod;
 * everything else (node traffic, ARP, anything unparsable) goes to the stack,
 * which owns the underlay and validates what it receives.
 */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>

#include "lib/common.h"
#include "lib/config.h"
#include "lib/endpoints.h"
#include "lib/ipv4.h"
#include "lib/metrics.h"
#include "lib/redirect.h"
#include "lib/trace.h"

SEC("classifier")
int from_netdev(struct __sk_buff *ctx)
{
	struct pkt4 p = {};

	metric_inc(METRIC_HOST_RX, ctx->len);

	/* Malformed packets are the stack's business here, not a drop of ours. */
	if (parse_ipv4(ctx, &p) != PARSE_OK)
		return pass_to_stack(ctx);

	const struct endpoint_info *ep = lookup_endpoint(p.tuple.daddr);

	if (!ep)
		return pass_to_stack(ctx);
	return redirect_to_endpoint(ctx, ep, &p, OBS_HOST,
				    FEATURE_REDIRECT_PEER | FEATURE_REDIRECT_NEIGH);
}

char _license[] SEC("license") = "GPL";
