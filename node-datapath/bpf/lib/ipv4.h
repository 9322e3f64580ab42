/* SPDX-License-Identifier: (Apache-2.0 OR GPL-2.0-only) */
/*
 * Ethernet + IPv4 + L4 (TCP/UDP/ICMP) parsing into a ct tuple, and the TTL
 * decrement a routed hop owes the packet.
 */
#ifndef MEMBRANE_IPV4_H
#define MEMBRANE_IPV4_H

#include <stddef.h>
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "common.h"

/* Ethernet + IPv4 with maximal options + the L4 bytes we read (TCP's first 20). */
#define MAX_PARSE_LEN (ETH_HLEN + 60 + sizeof(struct tcphdr))

/*
 * <linux/icmp.h> drags in <linux/if.h> and with it glibc headers that do not
 * exist for -target bpf: restate the 8 bytes we read.
 */
struct icmp4hdr {
	__u8 type;
	__u8 code;
	__sum16 checksum;
	__be16 echo_id;
	__be16 echo_seq;
};

#define ICMP_ECHOREPLY 0
#define ICMP_ECHO 8

#define IP_OFFSET 0x1fff

enum parse_result {
	PARSE_OK = 0,
	PARSE_NOT_IPV4 = 1, /* ARP, IPv6, ...: not ours to judge */
	PARSE_INVALID = -1, /* claims to be IPv4 but is truncated or malformed */
};

struct pkt4 {
	struct ct_key tuple; /* dir left 0 (CT_EGRESS) for the caller to set */
	__u8 ttl;
	__u8 tcp_flags;      /* byte 13 of the TCP header: FIN|SYN|RST|PSH|ACK|URG|ECE|CWR */
	__u8 icmp_type;      /* ICMP only, else 0 */
	__u8 icmp_code;
};

#define ctx_data(ctx) ((void *)(long)(ctx)->data)
#define ctx_data_end(ctx) ((void *)(long)(ctx)->data_end)

/* Context-free (tc and XDP): parse the frame [data, data_end) into p. */
static __always_inline int parse_ipv4_data(void *data, void *data_end, struct pkt4 *p)
{
	struct ethhdr *eth = data;
	struct iphdr *ip4 = data + ETH_HLEN;

	if ((void *)(eth + 1) > data_end)
		return PARSE_INVALID;
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return PARSE_NOT_IPV4;
	if ((void *)(ip4 + 1) > data_end)
		return PARSE_INVALID;
	if (ip4->version != 4 || ip4->ihl < 5)
		return PARSE_INVALID;
	if (bpf_ntohs(ip4->tot_len) < ip4->ihl * 4)
		return PARSE_INVALID;

	p->tuple.saddr = ip4->saddr;
	p->tuple.daddr = ip4->daddr;
	p->tuple.proto = ip4->protocol;
	p->ttl = ip4->ttl;

	/*
	 * Non-first fragments carry no L4 header: they are tracked with ports 0.
	 * (Fragment reassembly/tracking is not implemented yet.)
	 */
	if (ip4->frag_off & bpf_htons(IP_OFFSET))
		return PARSE_OK;

	void *l4 = (void *)ip4 + ip4->ihl * 4;

	switch (ip4->protocol) {
	case IPPROTO_TCP: {
		struct tcphdr *tcp = l4;

		if ((void *)(tcp + 1) > data_end)
			return PARSE_INVALID;
		p->tuple.sport = tcp->source;
		p->tuple.dport = tcp->dest;
		p->tcp_flags = ((__u8 *)tcp)[13];
		break;
	}
	case IPPROTO_UDP: {
		struct udphdr *udp = l4;

		if ((void *)(udp + 1) > data_end)
			return PARSE_INVALID;
		p->tuple.sport = udp->source;
		p->tuple.dport = udp->dest;
		break;
	}
	case IPPROTO_ICMP: {
		struct icmp4hdr *icmp = l4;

		if ((void *)(icmp + 1) > data_end)
			return PARSE_INVALID;
		p->icmp_type = icmp->type;
		p->icmp_code = icmp->code;
		/*
		 * Echo request and reply share the id: putting it in both ports
		 * makes the reply's tuple the exact reverse of the request's.
		 */
		if (icmp->type == ICMP_ECHO || icmp->type == ICMP_ECHOREPLY) {
			p->tuple.sport = icmp->echo_id;
			p->tuple.dport = icmp->echo_id;
		}
		break;
	}
	default:
		break; /* other protocols: tracked by addresses and protocol only */
	}
	return PARSE_OK;
}

/*
 * Parse ctx into p. Headers may sit outside the skb's linear area (GSO
 * packets from a local socket, or a veth that did not linearise): pull at
 * most MAX_PARSE_LEN bytes once, then use direct packet access. Pulling
 * invalidates packet pointers, so it happens before any is taken.
 */
static __always_inline int parse_ipv4(struct __sk_buff *ctx, struct pkt4 *p)
{
	__u32 want = ctx->len < MAX_PARSE_LEN ? ctx->len : MAX_PARSE_LEN;

	if (ctx_data(ctx) + want > ctx_data_end(ctx))
		bpf_skb_pull_data(ctx, want); /* on failure the bounds checks below catch it */
	return parse_ipv4_data(ctx_data(ctx), ctx_data_end(ctx), p);
}

/*
 * Decrement the TTL and patch the header checksum incrementally. Redirecting
 * skips the stack's forwarding path, so we owe the packet this routed hop.
 * Returns 0, or a negative helper error.
 */
static __always_inline int ipv4_dec_ttl(struct __sk_buff *ctx, __u8 ttl)
{
	__u8 new_ttl = ttl - 1;
	/* TTL is the high byte of the 16-bit word it shares with the protocol. */
	__be16 old_word = bpf_htons((__u16)ttl << 8);
	__be16 new_word = bpf_htons((__u16)new_ttl << 8);
	int ret;

	ret = bpf_l3_csum_replace(ctx, ETH_HLEN + offsetof(struct iphdr, check),
				  old_word, new_word, sizeof(__u16));
	if (ret < 0)
		return ret;
	return bpf_skb_store_bytes(ctx, ETH_HLEN + offsetof(struct iphdr, ttl), &new_ttl,
				   sizeof(new_ttl), 0);
}

#endif /* MEMBRANE_IPV4_H */
