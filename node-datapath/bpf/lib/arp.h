/* SPDX-License-Identifier: (Apache-2.0 OR GPL-2.0-only) */
/*
 * L2 announcement of service addresses (LoadBalancer, externalIPs): an ARP
 * responder at tc ingress of the underlay device, after Cilium 1.14's L2
 * responder. Such an address is configured on no interface, so without this
 * nobody would answer "who has <address>?" and a client on the underlay L2
 * would need a static route. An ARP request for an address listed in
 * mb_lb_announce (with LB_ANNOUNCE_F_ARP) that arrives on a device listed in
 * mb_l2_dev is turned into the reply in place (our MAC as the sender, the
 * requester as the target) and sent back out of the same device
 * (bpf_redirect egress); the stack never sees it. Everything else, ARP for
 * the node's own addresses included, goes to the stack as before.
 *
 * Which node announces which address is the agent's decision (one node per
 * address, so the L2 sees one MAC for it); this file only answers for what
 * the map lists. No gratuitous ARP is sent: a takeover is learned when the
 * client's neighbour entry goes stale and it asks again.
 */
#ifndef MEMBRANE_ARP_H
#define MEMBRANE_ARP_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "common.h"

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __be32); /* announced IPv4 address, network order */
	__type(value, __u32); /* LB_ANNOUNCE_F_* */
	__uint(max_entries, LB_ANNOUNCE_MAP_SIZE);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mb_lb_announce SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32); /* ifindex of an underlay device */
	__type(value, struct l2_dev);
	__uint(max_entries, L2_DEV_MAP_SIZE);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mb_l2_dev SEC(".maps");

#define ARPHRD_ETHER_ 1
#define ARPOP_REQUEST_ 1
#define ARPOP_REPLY_ 2

/* The Ethernet/IPv4 ARP packet, restated: <linux/if_arp.h> drags in glibc headers. */
struct arp_eth4 {
	__be16 htype;
	__be16 ptype;
	__u8 hlen;
	__u8 plen;
	__be16 op;
	__u8 sha[ETH_ALEN];
	__be32 spa;
	__u8 tha[ETH_ALEN];
	__be32 tpa;
} __attribute__((packed));

/*
 * Context-free (tc and XDP): if [data, data_end) is an ARP request for an
 * announced address, received on `ifindex`, rewrite it into the reply in
 * place and return 1 (the caller sends it back out of `ifindex`); else 0,
 * with the packet untouched.
 */
static __always_inline int arp_respond_in_place(void *data, void *data_end, __u32 ifindex)
{
	struct ethhdr *eth = data;
	struct arp_eth4 *arp = data + ETH_HLEN;

	if ((void *)(arp + 1) > data_end)
		return 0;
	if (eth->h_proto != bpf_htons(ETH_P_ARP) || arp->htype != bpf_htons(ARPHRD_ETHER_) ||
	    arp->ptype != bpf_htons(ETH_P_IP) || arp->hlen != ETH_ALEN || arp->plen != 4 ||
	    arp->op != bpf_htons(ARPOP_REQUEST_))
		return 0;

	__be32 tpa = arp->tpa;
	__be32 spa = arp->spa;

	/* Another host announcing the address itself (gratuitous ARP): not a question. */
	if (spa == tpa)
		return 0;
	__u32 *flags = bpf_map_lookup_elem(&mb_lb_announce, &tpa);

	if (!flags || !(*flags & LB_ANNOUNCE_F_ARP))
		return 0;
	struct l2_dev *dev = bpf_map_lookup_elem(&mb_l2_dev, &ifindex);

	if (!dev)
		return 0;
	__u8 requester[ETH_ALEN];

	__builtin_memcpy(requester, arp->sha, ETH_ALEN);
	/* Our own request looped back (a bridge in hairpin mode): no answer. */
	if (__builtin_memcmp(requester, dev->mac, ETH_ALEN) == 0)
		return 0;

	__builtin_memcpy(eth->h_dest, requester, ETH_ALEN);
	__builtin_memcpy(eth->h_source, dev->mac, ETH_ALEN);
	arp->op = bpf_htons(ARPOP_REPLY_);
	__builtin_memcpy(arp->tha, requester, ETH_ALEN);
	arp->tpa = spa;
	__builtin_memcpy(arp->sha, dev->mac, ETH_ALEN);
	arp->spa = tpa;
	return 1;
}

#endif /* MEMBRANE_ARP_H */
