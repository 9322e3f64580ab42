/* SPDX-License-Identifier: (Apache-2.0 OR GPL-2.0-only) */
/*
 * The endpoint map: which pod IPs live on this node and how to reach them.
 * Written only by the agent; read by bpf_lxc and bpf_host.
 */
#ifndef MEMBRANE_ENDPOINTS_H
#define MEMBRANE_ENDPOINTS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "common.h"

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __be32); /* pod IPv4, network byte order */
	__type(value, struct endpoint_info);
	__uint(max_entries, ENDPOINT_MAP_SIZE);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mb_endpoints SEC(".maps");

static __always_inline const struct endpoint_info *lookup_endpoint(__be32 ip4)
{
	return bpf_map_lookup_elem(&mb_endpoints, &ip4);
}

#endif /* MEMBRANE_ENDPOINTS_H */
