#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Sets up the machine, builds, and starts a local 2-node Membrane cluster
# (nodes are network namespaces) with a short demo. Leaves it running;
# `target/debug/membrane down` stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
NODES="${NODES:-2}"

bash scripts/setup.sh
cargo build --workspace --bins
M=target/debug/membrane

$M up --nodes "$NODES" --detach
echo
echo "== membrane status"
$M status
echo
echo "== membrane get nodes"
$M get nodes
echo
echo "== an address for a demo pod on node-1"
$M ipam allocate --node node-1 --owner demo/pod-a
echo
echo "== membrane get ipam"
$M get ipam
echo
echo "Cluster is running. Try: $M status | $M get nodes -o yaml | $M down"
