#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Sets up the machine, builds, and runs every test: unit, gRPC contract,
# etcd integration, eBPF program tests, privileged namespace tests and the
# local-cluster end-to-end tests. Run as root; under CI=true a privileged
# test that cannot run is a failure, not a skip.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
export CARGO_TERM_COLOR=never
cargo build --workspace --all-targets
bash scripts/validate-manifests.sh
cargo test --workspace --no-fail-fast 2>&1 | tee target/test.log
# Summarise: cargo prints one "test result" line per test binary.
awk '/^test result:/ { p += $4; f += $6; s += $8 } END { printf "\nsummary: %d passed, %d failed, %d skipped\n", p, f, s }' target/test.log
