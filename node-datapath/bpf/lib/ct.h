/* SPDX-License-Identifier: (Apache-2.0 OR GPL-2.0-only) */
/*
 * Connection tracking. One LRU hash keyed by the tuple of the packet that
 * opened the connection plus the direction (hook) that created the entry:
 * CT_EGRESS (bpf_lxc, leaving a pod) or CT_INGRESS (bpf_host / to_container,
 * entering a pod). A packet seen by a hook of direction D is:
 *  - ESTABLISHED if (its tuple, D) is a key,
 *  - REPLY if its reversed tuple is a key with either direction (a reply
 *    comes back through whichever hook faces the other side),
 *  - NEW otherwise.
 * Lookup and creation are separate steps so that policy can sit between
 * them: an entry is created only for a packet policy allowed, because an
 * entry is what lets the other side's packets through as replies.
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
 * Classify the packet without changing anything. Returns the entry for
 * ESTABLISHED/REPLY (to hand to ct_account), NULL for NEW.
 */
static __always_inline struct ct_entry *ct_lookup(const struct ct_key *tuple,
						  enum ct_status *status)
{
	struct ct_entry *e;
	struct ct_key rev;

	e = bpf_map_lookup_elem(&mb_ct4, tuple);
	if (e) {
		*status = CT_ESTABLISHED;
		return e;
	}

	ct_reverse(tuple, &rev);
	rev.dir = CT_EGRESS;
	e = bpf_map_lookup_elem(&mb_ct4, &rev);
	if (!e) {
		rev.dir = CT_INGRESS;
		e = bpf_map_lookup_elem(&mb_ct4, &rev);
	}
	*status = e ? CT_REPLY : CT_NEW;
	return e;
}

/*
 * Count a packet of a known connection. Counter updates are atomic (several
 * CPUs can serve one flow); the flag bytes are best-effort ORs, which is fine
 * for what they are used for.
 */
static __always_inline void ct_account(struct ct_entry *e, enum ct_status status, __u32 len,
				       __u8 tcp_flags)
{
	e->last_seen_ns = bpf_ktime_get_ns();
	if (status == CT_REPLY) {
		__sync_fetch_and_add(&e->packets_rev, 1);
		__sync_fetch_and_add(&e->bytes_rev, len);
		e->tcp_flags_rev |= tcp_flags;
		e->flags |= CT_F_SEEN_REPLY;
	} else {
		__sync_fetch_and_add(&e->packets_fwd, 1);
		__sync_fetch_and_add(&e->bytes_fwd, len);
		e->tcp_flags_fwd |= tcp_flags;
	}
}

/*
 * Create the entry for a NEW packet (policy already allowed it).
 * Returns 0 with *status CT_NEW, or CT_ESTABLISHED if another CPU created it
 * meanwhile (that entry wins and this is its packet), or a drop reason.
 */
static __always_inline int ct_create(const struct ct_key *tuple, __u32 len, __u8 tcp_flags,
				     enum ct_status *status)
{
	__u64 now = bpf_ktime_get_ns();
	struct ct_entry fresh = {
		.created_ns = now,
		.last_seen_ns = now,
		.packets_fwd = 1,
		.bytes_fwd = len,
		.tcp_flags_fwd = tcp_flags,
	};

	if (bpf_map_update_elem(&mb_ct4, tuple, &fresh, BPF_NOEXIST) < 0) {
		struct ct_entry *e = bpf_map_lookup_elem(&mb_ct4, tuple);

		if (e) {
			ct_account(e, CT_ESTABLISHED, len, tcp_flags);
			*status = CT_ESTABLISHED;
			return 0;
		}
		return DROP_CT_FULL;
	}
	*status = CT_NEW;
	return 0;
}

/* Account or create, after policy allowed the packet. Returns 0 or a drop reason. */
static __always_inline int ct_commit(const struct ct_key *tuple, struct ct_entry *e,
				     enum ct_status *status, __u32 len, __u8 tcp_flags)
{
	if (e) {
		ct_account(e, *status, len, tcp_flags);
		return 0;
	}
	return ct_create(tuple, len, tcp_flags, status);
}

#endif /* MEMBRANE_CT_H */
