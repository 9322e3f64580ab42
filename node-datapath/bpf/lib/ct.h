/* SPDX-License-Identifier: (Apache-2.0 OR GPL-2.0-only) */
/*
 * Connection tracking. One LRU hash keyed by the tuple of the packet that
 * opened the connection plus the direction (hook) that saw it. A packet is:
 *  - ESTABLISHED if its own tuple is a key,
 *  - REPLY if its reversed tuple is a key (the entry gets CT_F_SEEN_REPLY),
 *  - NEW otherwise, and an entry is created.
 * LRU: under pressure the kernel evicts the least recently used entries
 * instead of failing, so a full table degrades instead of dropping.
 * TCP state (FIN/RST teardown, timeouts) is not tracked yet: the union of TCP
 * flags per direction is recorded so a userspace GC or policy can use it.
 */
#ifndef MEMBRANE_CT_H
#define MEMBRANE_CT_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "common.h"

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct ct_key);
	__type(value, struct ct_entry);
	__uint(max_entries, CT_MAP_SIZE);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mb_ct4 SEC(".maps");

enum ct_status {
	CT_NEW = 0,
	CT_ESTABLISHED = 1,
	CT_REPLY = 2,
};

static __always_inline void ct_reverse(const struct ct_key *in, struct ct_key *out)
{
	out->saddr = in->daddr;
	out->daddr = in->saddr;
	out->sport = in->dport;
	out->dport = in->sport;
	out->proto = in->proto;
	out->dir = in->dir;
	out->pad[0] = 0;
	out->pad[1] = 0;
}

/*
 * Look the packet up, creating an entry for a new flow. Counter updates are
 * atomic (several CPUs can serve one flow); the flag bytes are best-effort
 * ORs, which is fine for what they are used for.
 * Returns 0 with *status set, or a drop reason.
 */
static __always_inline int ct_process(const struct ct_key *tuple, __u32 len, __u8 tcp_flags,
				      enum ct_status *status)
{
	__u64 now = bpf_ktime_get_ns();
	struct ct_entry *e;
	struct ct_key rev;

	e = bpf_map_lookup_elem(&mb_ct4, tuple);
	if (e) {
		e->last_seen_ns = now;
		__sync_fetch_and_add(&e->packets_fwd, 1);
		__sync_fetch_and_add(&e->bytes_fwd, len);
		e->tcp_flags_fwd |= tcp_flags;
		*status = CT_ESTABLISHED;
		return 0;
	}

	ct_reverse(tuple, &rev);
	e = bpf_map_lookup_elem(&mb_ct4, &rev);
	if (e) {
		e->last_seen_ns = now;
		__sync_fetch_and_add(&e->packets_rev, 1);
		__sync_fetch_and_add(&e->bytes_rev, len);
		e->tcp_flags_rev |= tcp_flags;
		e->flags |= CT_F_SEEN_REPLY;
		*status = CT_REPLY;
		return 0;
	}

	struct ct_entry fresh = {
		.created_ns = now,
		.last_seen_ns = now,
		.packets_fwd = 1,
		.bytes_fwd = len,
		.tcp_flags_fwd = tcp_flags,
	};

	/* NOEXIST: if another CPU created it meanwhile, that entry wins and this is its packet. */
	if (bpf_map_update_elem(&mb_ct4, tuple, &fresh, BPF_NOEXIST) < 0) {
		if (bpf_map_lookup_elem(&mb_ct4, tuple)) {
			*status = CT_ESTABLISHED;
			return 0;
		}
		return DROP_CT_FULL;
	}
	*status = CT_NEW;
	return 0;
}

#endif /* MEMBRANE_CT_H */
