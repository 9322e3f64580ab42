#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Load-balancing benchmark: connection setup rate and connect() latency to a
# ClusterIP with 10, 1,000 and 10,000 services programmed, through
# Membrane's socket-level LB (bpf_sock, cgroup connect4) and through
# kube-proxy-style iptables rules for the same services (nft and legacy
# backends), built in the same run; paths interleaved, medians of ROUNDS.
# See node-datapath/examples/lb_conn_bench.rs for the setup. Needs root.
#
#   sudo ROUNDS=5 SECS=2 scripts/bench-lb.sh
#   SIZES=10,1000 CONCURRENCY=2 PATHS=sock,iptables-nft ... (optional)
#   NICE=-10: run the bench at that priority (the machine is shared; every
#   path gets the same priority).
#   CPU=n: the one CPU the client and the backends share (default: the last).
#   PROGRAMMING_ONLY=true: only the time to program ours per size (table
#   writes batched vs one syscall per slot and per table) and one table
#   swap at M = 16381; no namespaces or iptables.
#   On two CPUs every handshake wakes a thread on the other CPU; in this VM
#   that made rounds bimodal (x2 in CPU per connection), so they share one.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "bench-lb.sh: run as root (network namespaces, cgroups, eBPF, iptables)" >&2
  exit 1
fi
for cmd in ip nsenter taskset iptables-nft-restore iptables-legacy-restore; do
  command -v "$cmd" >/dev/null 2>&1 || { echo "bench-lb.sh: $cmd missing; run scripts/setup.sh" >&2; exit 1; }
done
mountpoint -q /sys/fs/bpf || mount -t bpf bpffs /sys/fs/bpf

export LB_BENCH_ROUNDS="${ROUNDS:-5}"
export LB_BENCH_SECS="${SECS:-2}"
export LB_BENCH_SIZES="${SIZES:-10,1000,10000}"
export LB_BENCH_CONCURRENCY="${CONCURRENCY:-1}"
export LB_BENCH_PATHS="${PATHS:-sock,iptables-nft,iptables-legacy}"
export LB_BENCH_PROGRAMMING_ONLY="${PROGRAMMING_ONLY:-false}"
CPU="${CPU:-$(($(nproc) - 1))}"

cargo build --release -q -p membrane-node-datapath --example lb_conn_bench
BIN="$PWD/target/release/examples/lb_conn_bench"

echo "machine: $(nproc) cores, kernel $(uname -r), $(iptables-nft-restore --version 2>&1 | head -1), load $(cut -d' ' -f1-3 /proc/loadavg), nice ${NICE:-0}, pinned to CPU $CPU" >&2

PID=""
# The bench removes what it built when it ends, even on error; this removes
# what a killed run left: its namespaces, cgroups and pins carry its pid.
cleanup() {
  if [ -n "$PID" ] && kill -0 "$PID" 2>/dev/null; then
    kill "$PID" 2>/dev/null || true
    wait "$PID" 2>/dev/null || true
  fi
  [ -n "$PID" ] || return 0
  local ns cg
  for ns in $(ip netns list | awk '{print $1}' | grep -E "^mbt-lb(srv|cl[0-9]+)-${PID}x" || true); do
    ip netns del "$ns" 2>/dev/null || true
  done
  for cg in /sys/fs/cgroup/unified/mbt-lb-"${PID}"x*; do
    [ -d "$cg" ] || continue
    rmdir "$cg/pod" 2>/dev/null || true
    rmdir "$cg" 2>/dev/null || true
  done
  rm -rf /sys/fs/bpf/membrane-test-"${PID}"x* 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

taskset -c "$CPU" nice -n "${NICE:-0}" "$BIN" &
PID=$!
wait "$PID"
