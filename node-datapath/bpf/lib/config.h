/* SPDX-License-Identifier: (Apache-2.0 OR GPL-2.0-only) */
/*
 * Load-time configuration. A `volatile const` global lives in .rodata, which
 * the loader patches before the verifier runs (aya: EbpfLoader::override_global
 * "CONFIG_FEATURES"). The verifier then treats it as a constant and prunes the
 * branches of disabled features, so a kernel without a helper never sees a
 * call to it as long as its bit is clear.
 */
#ifndef MEMBRANE_CONFIG_H
#define MEMBRANE_CONFIG_H

#include "common.h"

/* FEATURE_* bits from common.h. Default: nothing, i.e. every packet goes to the stack. */
volatile const __u32 CONFIG_FEATURES = 0;

static __always_inline int feature_enabled(__u32 feature)
{
	return (CONFIG_FEATURES & feature) != 0;
}

/*
 * Network policy (ipcache + policy map lookups). On by default; a loader that
 * patches it to 0 gets programs from which the verifier removed every policy
 * branch (what the "policy off" benchmark measures).
 */
volatile const __u32 CONFIG_POLICY_ENABLED = 1;

static __always_inline int policy_enabled(void)
{
	return CONFIG_POLICY_ENABLED != 0;
}

/*
 * Source IP verification (anti-spoofing): a packet a pod sends must carry
 * the pod's own address, i.e. the endpoint entry of its source names the
 * veth it came in on. Off in the object (a program under test has no real
 * veth); the agent turns it on (`--source-ip-verification`).
 */
volatile const __u32 CONFIG_VERIFY_SOURCE = 0;

static __always_inline int verify_source(void)
{
	return CONFIG_VERIFY_SOURCE != 0;
}

#endif /* MEMBRANE_CONFIG_H */
