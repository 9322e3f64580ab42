/* SPDX-License-Identifier: (Apache-2.0 OR GPL-2.0-only) */
/*
 * Events for userspace (ring buffer of struct trace_event) and the single
 * place where a packet is dropped, so every drop is both counted and reported
 * with its reason.
 */
#ifndef MEMBRANE_TRACE_H
#define MEMBRANE_TRACE_H

#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>

#include "common.h"
#include "ipv4.h"
#include "metrics.h"

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, EVENTS_RINGBUF_SIZE);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mb_events SEC(".maps");

/* Who the packet is, policy-wise: what events report beside the tuple. */
struct trace_meta {
	__u32 src_identity;
	__u32 dst_identity;
	__u32 endpoint_id; /* whose policy applied */
	__u32 rule_id;
	__u8 direction;    /* POLICY_INGRESS / POLICY_EGRESS / TRACE_DIR_NONE */
};

/*
 * p: the parsed packet (tuple, TCP flags, ICMP type/code), or NULL when it
 * could not be parsed (the event then reports a zero tuple).
 */
static __always_inline void emit_event(struct __sk_buff *ctx, __u8 type, __u8 source,
				       __u16 reason, const struct pkt4 *p,
				       const struct trace_meta *meta)
{
	struct trace_event ev = {
		.ts_ns = bpf_ktime_get_ns(),
		.type = type,
		.source = source,
		.reason = reason,
		.ifindex = ctx->ifindex,
		.pkt_len = ctx->len,
		.direction = TRACE_DIR_NONE,
	};

	if (p) {
		ev.tuple = p->tuple;
		ev.tcp_flags = p->tcp_flags;
		ev.icmp_type = p->icmp_type;
		ev.icmp_code = p->icmp_code;
	}
	if (meta) {
		ev.src_identity = meta->src_identity;
		ev.dst_identity = meta->dst_identity;
		ev.endpoint_id = meta->endpoint_id;
		ev.rule_id = meta->rule_id;
		ev.direction = meta->direction;
	}
	/* A full ring buffer loses the event, never the packet. */
	bpf_ringbuf_output(&mb_events, &ev, sizeof(ev), 0);
}

/* Count, report and drop. Returns the verdict to hand back to tc. */
static __always_inline int drop_packet(struct __sk_buff *ctx, __u8 source, __u16 reason,
				       const struct pkt4 *p)
{
	metric_inc(METRIC_DROP_BASE + (reason & DROP_REASON_MAX), ctx->len);
	emit_event(ctx, EVENT_DROP, source, reason, p, NULL);
	return TC_ACT_SHOT;
}

/* A policy drop: also counted per endpoint and reported with identities and rule. */
static __always_inline int drop_policy(struct __sk_buff *ctx, __u8 source, __u16 reason,
				       const struct pkt4 *p, const struct trace_meta *meta)
{
	metric_inc(METRIC_DROP_BASE + (reason & DROP_REASON_MAX), ctx->len);
	ep_drop_inc(meta->endpoint_id, reason, meta->direction, ctx->len);
	emit_event(ctx, EVENT_DROP, source, reason, p, meta);
	return TC_ACT_SHOT;
}

/* Hand the packet to the network stack. */
static __always_inline int pass_to_stack(struct __sk_buff *ctx)
{
	metric_inc(METRIC_PASS, ctx->len);
	return TC_ACT_OK;
}

#endif /* MEMBRANE_TRACE_H */
