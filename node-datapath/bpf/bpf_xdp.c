// SPDX-License-Identifier: (Apache-2.0 OR GPL-2.0-only)
/*
 * bpf_xdp: XDP on the node's underlay device, a fast path in front of
 * bpf_host for one kind of traffic: NodePort / LoadBalancer / externalIPs
 * requests whose backend is on another node, when the way to that node is
 * back out of the device they came in on (one underlay L2). Such a packet is
 * translated exactly as bpf_host would (lib/nodeport.h: same backend choice,
 * same SNAT port allocation, same mb_lb_nat4 entries), gets the MACs the FIB
 * gives for the backend's node, and leaves with XDP_TX before an skb exists.
 *
 * Everything else is XDP_PASS, untouched, to tc and bpf_host: replies of
 * translated flows (bpf_host rewrites them back), local backends (delivery
 * and ingress policy are bpf_host's), IPv4 with options, ARP, and any flow
 * whose next hop the FIB cannot give yet (no neighbour entry: bpf_host's
 * bpf_redirect_neigh resolves it, and the flow's next packets come here).
 * A new flow's state is written only once XDP is sure to send it, so a
 * passed packet finds the maps as if XDP were not there; when no SNAT port
 * is free the packet is passed and bpf_host drops and counts it.
 *
 * As in bpf_host, the TTL is left alone: the translated packet is the
 * load balancer's own, not a routed one.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <bpf/bpf_helpers.h>

#include "lib/common.h"
#include "lib/config.h" /* the loader patches every object's load-time constants */
#include "lib/ipv4.h"
#include "lib/metrics.h"
#include "lib/nodeport.h"

SEC("xdp")
int xdp_underlay(struct xdp_md *ctx)
{
	void *data = ctx_data(ctx);
	void *data_end = ctx_data_end(ctx);
	struct iphdr *ip4 = data + ETH_HLEN;
	struct pkt4 p = {};
	struct np_plan plan;

	metric_inc(METRIC_XDP_RX, data_end - data);
	if (parse_ipv4_data(data, data_end, &p) != PARSE_OK)
		return XDP_PASS;
	/* parse_ipv4_data checked the bounds; options are rare, and tc's. */
	if ((void *)(ip4 + 1) > data_end || ip4->ihl != 5)
		return XDP_PASS;
	/*
	 * A reply first: its tuple (backend -> node:SNAT port) could also look
	 * like a request to a NodePort when the client's own port was kept.
	 */
	if (np_reverse_entry(&p))
		return XDP_PASS;
	if (np_plan_forward(&p, &plan) < 0 || !plan.remote)
		return XDP_PASS;

	struct bpf_fib_lookup fib = {
		.family = AF_INET,
		.l4_protocol = p.tuple.proto,
		.ifindex = ctx->ingress_ifindex,
		.ipv4_src = plan.fwd.saddr,
		.ipv4_dst = plan.fwd.daddr,
	};

	/* OUTPUT: as the node's own packet, so the node need not forward (ip_forward=0 is fine). */
	if (bpf_fib_lookup(ctx, &fib, sizeof(fib), BPF_FIB_LOOKUP_OUTPUT) !=
		    BPF_FIB_LKUP_RET_SUCCESS ||
	    fib.ifindex != ctx->ingress_ifindex)
		return XDP_PASS;
	if (np_commit(&p, &plan, ctx->ingress_ifindex) < 0)
		return XDP_PASS;
	/* Committed: should this fail, bpf_host finds the flow's entries and applies them. */
	if (np_apply_data(data, data_end, p.tuple.proto, &plan.fwd) < 0)
		return XDP_PASS;
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > data_end)
		return XDP_PASS;
	__builtin_memcpy(eth->h_dest, fib.dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, fib.smac, ETH_ALEN);
	metric_inc(METRIC_XDP_TX, data_end - data);
	return XDP_TX;
}

char _license[] SEC("license") = "GPL";
