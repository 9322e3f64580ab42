/* SPDX-License-Identifier: (Apache-2.0 OR GPL-2.0-only) */
/*
 * Security identities of addresses: the ipcache, an LPM trie from IPv4
 * prefix to identity written by the agent (pods of every node, node
 * addresses as host / remote-node, CIDR identities). The longest matching
 * prefix names the identity; an address no prefix covers is IDENTITY_WORLD.
 * A local pod's identity also sits in its endpoint map entry, which the
 * datapath has usually looked up already: that one is used when set.
 */
#ifndef MEMBRANE_IDENTITY_H
#define MEMBRANE_IDENTITY_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "common.h"

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct ipcache_key);
	__type(value, struct ipcache_value);
	__uint(max_entries, IPCACHE_MAP_SIZE);
	__uint(map_flags, BPF_F_NO_PREALLOC); /* required for LPM tries */
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mb_ipcache SEC(".maps");

static __always_inline __u32 ipcache_identity(__be32 addr)
{
	struct ipcache_key key = { .prefixlen = 32, .addr = addr };
	const struct ipcache_value *v = bpf_map_lookup_elem(&mb_ipcache, &key);

	return v ? v->identity : IDENTITY_WORLD;
}

/* The identity of addr, whose endpoint map entry (or NULL) the caller holds. */
static __always_inline __u32 resolve_identity(const struct endpoint_info *ep, __be32 addr)
{
	if (ep && ep->identity != IDENTITY_UNKNOWN)
		return ep->identity;
	return ipcache_identity(addr);
}

#endif /* MEMBRANE_IDENTITY_H */
