// SPDX-License-Identifier: (Apache-2.0 OR GPL-2.0-only)
/*
 * bpf_lxc: tc ingress on the node-side veth (lxc*) of a pod, i.e. every
 * packet the pod sends. Tracks the connection, then delivers pod -> local pod
 * traffic with bpf_redirect_peer; everything else goes to the node's stack,
 * which routes it (underlay, other nodes, the world).
 */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>

#include "lib/common.h"
#include "lib/config.h"
#include "lib/ct.h"
#include "lib/endpoints.h"
#include "lib/ipv4.h"
#include "lib/metrics.h"
#include "lib/redirect.h"
#include "lib/trace.h"

SEC("classifier")
int from_container(struct __sk_buff *ctx)
{
	struct pkt4 p = {};
	enum ct_status status;
	int ret;

	metric_inc(METRIC_LXC_RX, ctx->len);

	ret = parse_ipv4(ctx, &p);
	if (ret == PARSE_NOT_IPV4)
		return pass_to_stack(ctx);
	/* A pod sending truncated IPv4 is broken or hostile: drop and say so. */
	if (ret != PARSE_OK)
		return drop_packet(ctx, OBS_LXC, DROP_INVALID, NULL);

	p.tuple.dir = CT_EGRESS;
	ret = ct_process(&p.tuple, ctx->len, p.tcp_flags, &status);
	if (ret)
		return drop_packet(ctx, OBS_LXC, ret, &p.tuple);
	metric_inc(METRIC_CT_NEW + status, ctx->len);
	if (status == CT_NEW)
		emit_event(ctx, EVENT_TRACE_NEW_CONN, OBS_LXC, 0, &p.tuple);

	const struct endpoint_info *ep = lookup_endpoint(p.tuple.daddr);

	if (!ep)
		return pass_to_stack(ctx);
	/* Only redirect_peer: without it the stack's forwarding path is the fallback. */
	return redirect_to_endpoint(ctx, ep, &p, OBS_LXC, FEATURE_REDIRECT_PEER);
}

/* The kernel checks this for GPL-only helpers: we load under the GPL option of the SPDX line. */
char _license[] SEC("license") = "GPL";
