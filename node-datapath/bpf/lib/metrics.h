/* SPDX-License-Identifier: (Apache-2.0 OR GPL-2.0-only) */
/*
 * Packet/byte counters: a per-CPU array indexed by enum metric, so the hot
 * path never contends on a cache line. Userspace sums the CPUs.
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

#endif /* MEMBRANE_METRICS_H */
