// SPDX-License-Identifier: (Apache-2.0 OR GPL-2.0-only)
/*
 * Feature probes: never attached, only loaded. The verifier rejects a call to
 * a helper the kernel does not know, so "this program loads" is exactly
 * "this helper exists for tc programs".
 */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>

SEC("classifier")
int probe_rdr_peer(struct __sk_buff *ctx)
{
	return bpf_redirect_peer(ctx->ifindex, 0);
}

SEC("classifier")
int probe_rdr_neigh(struct __sk_buff *ctx)
{
	return bpf_redirect_neigh(ctx->ifindex, NULL, 0, 0);
}

char _license[] SEC("license") = "GPL";
