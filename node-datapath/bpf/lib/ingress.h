/* SPDX-License-Identifier: (Apache-2.0 OR GPL-2.0-only) */
/*
 * Admitting a packet into a local pod from outside bpf_lxc's reach: from the
 * underlay (bpf_host) or from the node's stack (to_container). Connection
 * tracking in the ingress direction, then the pod's ingress policy for
 * packets of a connection's original direction, then the ct entry.
 * (Pod -> local pod traffic delivered with bpf_redirect_peer is judged in
 * bpf_lxc, which sees both endpoints at once.)
 */
#ifndef MEMBRANE_INGRESS_H
#define MEMBRANE_INGRESS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "common.h"
#include "config.h"
#include "ct.h"
#include "identity.h"
#include "ipv4.h"
#include "metrics.h"
#include "policy.h"
#include "trace.h"

/*
 * ep: the destination pod. src_ep: the source's endpoint entry when it is a
 * local pod (its identity then comes from there), else NULL (ipcache).
 * Returns 0 when the packet may be delivered, else the tc verdict to return
 * (it was dropped, counted and reported).
 */
static __always_inline int ingress_admit(struct __sk_buff *ctx, struct pkt4 *p,
					 const struct endpoint_info *ep,
					 const struct endpoint_info *src_ep, __u8 source)
{
	struct trace_meta meta = {
		.endpoint_id = ep->endpoint_id,
		.direction = POLICY_INGRESS,
	};
	enum ct_status status;
	struct ct_entry *e;
	int ret;

	p->tuple.dir = CT_INGRESS;
	e = ct_lookup(&p->tuple, &status);
	/* Identities feed policy and the new-connection event; replies need neither. */
	if (status != CT_REPLY && (policy_enabled() || status == CT_NEW)) {
		meta.src_identity = resolve_identity(src_ep, p->tuple.saddr);
		meta.dst_identity = resolve_identity(ep, p->tuple.daddr);
	}
	if (status != CT_REPLY) {
		ret = policy_check(ep, POLICY_INGRESS, meta.src_identity, p->tuple.proto,
				   policy_port(p), &meta.rule_id);
		if (ret)
			return drop_policy(ctx, source, ret, p, &meta);
	}

	ret = ct_commit(&p->tuple, e, &status, ctx->len, p->tcp_flags);
	if (ret)
		return drop_packet(ctx, source, ret, p);
	metric_inc(METRIC_CT_NEW + status, ctx->len);
	if (status == CT_NEW)
		emit_event(ctx, EVENT_TRACE_NEW_CONN, source, 0, p, &meta);
	return 0;
}

#endif /* MEMBRANE_INGRESS_H */
