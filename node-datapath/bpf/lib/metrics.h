/* SPDX-License-Identifier: (Apache-2.0 OR GPL-2.0-only) */
/*
 * Packet/byte counters: a per-CPU array indexed by enum metric, so the hot
 * path never contends on a cache line, and per-CPU drop counters per
 * (endpoint, reason, direction). Userspace sums the CPUs.
 */
#ifndef MEMBRANE_METRICS_H
#define MEMBRANE_METRICS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "common.h"

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct metric_value);
	__uint(max_entries, METRIC_MAX);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mb_metrics SEC(".maps");

static __always_inline void metric_inc(__u32 idx, __u32 bytes)
{
	struct metric_value *v = bpf_map_lookup_elem(&mb_metrics, &idx);

	/* Per-CPU slot and tc programs run with preemption disabled: no atomics needed. */
	if (v) {
		v->packets++;
		v->bytes += bytes;
	}
}

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__type(key, struct ep_drop_key);
	__type(value, struct metric_value);
	__uint(max_entries, EP_DROPS_MAP_SIZE);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mb_ep_drops SEC(".maps");

static __always_inline void ep_drop_inc(__u32 endpoint_id, __u8 reason, __u8 direction,
					__u32 bytes)
{
	struct ep_drop_key key = {
		.endpoint_id = endpoint_id,
		.reason = reason,
		.direction = direction,
	};
	struct metric_value *v = bpf_map_lookup_elem(&mb_ep_drops, &key);

	if (!v) {
		struct metric_value zero = {};

		/* NOEXIST: a concurrent first drop on another CPU already made the slot. */
		bpf_map_update_elem(&mb_ep_drops, &key, &zero, BPF_NOEXIST);
		v = bpf_map_lookup_elem(&mb_ep_drops, &key);
	}
	/* Full map: the global per-reason counter still counts the drop. */
	if (v) {
		v->packets++;
		v->bytes += bytes;
	}
}

#endif /* MEMBRANE_METRICS_H */
