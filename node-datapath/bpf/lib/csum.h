/* SPDX-License-Identifier: (Apache-2.0 OR GPL-2.0-only) */
/*
 * Incremental Internet checksum updates (RFC 1624) on packet memory, for
 * XDP, which has no bpf_l3/l4_csum_replace. One's complement sums do not
 * depend on byte order as long as every word is read the same way, so the
 * fields are used as they sit in memory.
 */
#ifndef MEMBRANE_CSUM_H
#define MEMBRANE_CSUM_H

#include <linux/types.h>

static __always_inline __u16 csum_fold32(__u32 s)
{
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return (__u16)s;
}

/* *sum covered `from`; make it cover `to` instead. */
static __always_inline void csum_replace2(__u16 *sum, __u16 from, __u16 to)
{
	__u32 s = (__u16)~*sum;

	s += (__u16)~from;
	s += to;
	*sum = (__u16)~csum_fold32(s);
}

static __always_inline void csum_replace4(__u16 *sum, __u32 from, __u32 to)
{
	csum_replace2(sum, (__u16)from, (__u16)to);
	csum_replace2(sum, (__u16)(from >> 16), (__u16)(to >> 16));
}

#endif /* MEMBRANE_CSUM_H */
