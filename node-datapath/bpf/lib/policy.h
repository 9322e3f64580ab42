/* SPDX-License-Identifier: (Apache-2.0 OR GPL-2.0-only) */
/*
 * Network policy: may this packet enter (ingress) or leave (egress) this
 * endpoint? The map layout and the contract with userspace are described at
 * struct policy_key in common.h. Per packet: four exact-prefix LPM lookups,
 * (peer, proto), (peer, any), (any, proto), (any, any); a deny in any of
 * them drops; otherwise an allow in any of them allows; otherwise the
 * endpoint's enforcement flag for the direction decides (default deny when
 * enforced, allow when not).
 *
 * Called only for packets in a connection's original direction (NEW and
 * ESTABLISHED): replies of a tracked connection always pass, and a deny
 * added later cuts an existing connection at its next packet.
 */
#ifndef MEMBRANE_POLICY_H
#define MEMBRANE_POLICY_H

#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>

#include "common.h"
#include "config.h"
#include "ipv4.h"

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct policy_key);
	__type(value, struct policy_value);
	__uint(max_entries, POLICY_MAP_SIZE);
	__uint(map_flags, BPF_F_NO_PREALLOC); /* required for LPM tries */
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mb_policy SEC(".maps");

/*
 * The port policy matches: the TCP/UDP destination port. Everything else
 * uses 0 (the parser stores the ICMP echo id in the ports, which is not a
 * port a rule could name).
 */
static __always_inline __be16 policy_port(const struct pkt4 *p)
{
	if (p->tuple.proto == IPPROTO_TCP || p->tuple.proto == IPPROTO_UDP)
		return p->tuple.dport;
	return 0;
}

/*
 * One group's verdict: 0 (no entry), POLICY_ALLOW or POLICY_DENY. The key is
 * built in place: every byte is set, as the trie compares bytes.
 */
static __always_inline __u8 policy_lookup_group(struct policy_key *key, __u32 peer, __u8 proto,
						__u32 *rule_id)
{
	const struct policy_value *v;

	key->peer_identity = peer;
	key->proto = proto;
	v = bpf_map_lookup_elem(&mb_policy, key);
	if (!v)
		return 0;
	if (v->verdict == POLICY_DENY)
		*rule_id = v->rule_id;
	return v->verdict;
}

/*
 * Returns 0 when ep may send (POLICY_EGRESS) / receive (POLICY_INGRESS) the
 * packet to / from `peer`, else DROP_POLICY_DENY (*rule_id: the deny entry's
 * rule; of several denies, the most specific group's) or
 * DROP_POLICY_DEFAULT_DENY (*rule_id 0).
 */
static __always_inline int policy_check(const struct endpoint_info *ep, __u8 direction,
					__u32 peer, __u8 proto, __be16 dport, __u32 *rule_id)
{
	struct policy_key key = {
		.prefixlen = POLICY_PREFIX_FULL,
		.endpoint_id = ep->endpoint_id,
		.direction = direction,
		.dport = dport,
	};
	__u8 allowed = 0;
	__u8 v;

	*rule_id = 0;
	if (!policy_enabled())
		return 0;

	/* Deny wins whatever the order: stop at the first, most specific first. */
	v = policy_lookup_group(&key, peer, proto, rule_id);
	if (v == POLICY_DENY)
		return DROP_POLICY_DENY;
	allowed |= v == POLICY_ALLOW;
	v = policy_lookup_group(&key, peer, POLICY_PROTO_ANY, rule_id);
	if (v == POLICY_DENY)
		return DROP_POLICY_DENY;
	allowed |= v == POLICY_ALLOW;
	v = policy_lookup_group(&key, POLICY_PEER_ANY, proto, rule_id);
	if (v == POLICY_DENY)
		return DROP_POLICY_DENY;
	allowed |= v == POLICY_ALLOW;
	v = policy_lookup_group(&key, POLICY_PEER_ANY, POLICY_PROTO_ANY, rule_id);
	if (v == POLICY_DENY)
		return DROP_POLICY_DENY;
	allowed |= v == POLICY_ALLOW;

	if (allowed)
		return 0;
	if (ep->flags & (1U << direction))
		return DROP_POLICY_DEFAULT_DENY;
	return 0;
}

#endif /* MEMBRANE_POLICY_H */
