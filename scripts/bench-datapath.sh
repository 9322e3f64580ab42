#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Datapath benchmark: pod<->pod request/response rate (sockperf ping-pong,
# TCP) and single-stream throughput (iperf3) through Membrane's eBPF
# datapath, against two baselines measured in the same run:
#   (a) a plain veth pair between two namespaces, no programs;
#   (b) two namespaces routed through a third by the kernel stack, no programs.
# Rounds are interleaved and the median is reported. Needs root and a built
# workspace; starts (and stops) its own local cluster, so no other cluster
# may be running.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS="${ROUNDS:-3}"
SECS="${SECS:-4}"
M="$PWD/target/debug/membrane"
STATE="$(mktemp -d)"
export MEMBRANE_STATE_DIR="$STATE"

cleanup() {
  pkill -f "sockperf sr --tcp -i 10.25" 2>/dev/null || true
  pkill -f "iperf3 -s -B 10.25" 2>/dev/null || true
  for ns in bva bvb bra brb brr; do ip netns del "$ns" 2>/dev/null || true; done
  pkill -f "sockperf sr --tcp -i 10.200" 2>/dev/null || true
  pkill -f "iperf3 -s -B 10.200" 2>/dev/null || true
  "$M" down >/dev/null 2>&1 || true
  rm -rf "$STATE"
}
trap cleanup EXIT

in_ns() { local ns=$1; shift; nsenter --net="/run/netns/$ns" "$@"; }

# (a) veth pair
ip netns add bva; ip netns add bvb
ip link add va netns bva type veth peer name vb netns bvb
in_ns bva ip addr add 10.251.0.1/24 dev va; in_ns bva ip link set va up; in_ns bva ip link set lo up
in_ns bvb ip addr add 10.251.0.2/24 dev vb; in_ns bvb ip link set vb up; in_ns bvb ip link set lo up

# (b) routed by the stack
ip netns add bra; ip netns add brb; ip netns add brr
ip link add ra netns bra type veth peer name r1 netns brr
ip link add rb netns brb type veth peer name r2 netns brr
in_ns brr sysctl -qw net.ipv4.ip_forward=1
in_ns brr ip addr add 10.252.1.1/24 dev r1; in_ns brr ip addr add 10.252.2.1/24 dev r2
in_ns brr ip link set r1 up; in_ns brr ip link set r2 up
in_ns bra ip addr add 10.252.1.2/24 dev ra; in_ns bra ip link set ra up; in_ns bra ip route add default via 10.252.1.1
in_ns brb ip addr add 10.252.2.2/24 dev rb; in_ns brb ip link set rb up; in_ns brb ip route add default via 10.252.2.1

# Membrane: two pods on node-1 (eBPF redirect), one on node-2 (cross-node).
"$M" up --nodes 2 --detach >/dev/null
"$M" pod run bench-a --node node-1 >/dev/null
"$M" pod run bench-b --node node-1 >/dev/null
"$M" pod run bench-c --node node-2 >/dev/null
ip_of() { "$M" pod list -o json | python3 -c "import json,sys; print(next(p['ip'] for p in json.load(sys.stdin)['items'] if p['name']=='$1'))"; }
B_IP=$(ip_of bench-b); C_IP=$(ip_of bench-c)

# name client_ns server_ns server_ip
CASES=(
  "veth-pair(a)|bva|bvb|10.251.0.2"
  "host-routing(b)|bra|brb|10.252.2.2"
  "membrane-same-node|pod-default-bench-a|pod-default-bench-b|$B_IP"
  "membrane-cross-node|pod-default-bench-a|pod-default-bench-c|$C_IP"
)

rr() { # client server ip -> requests/s
  in_ns "$2" sockperf sr --tcp -i "$3" -p 11111 >/dev/null 2>&1 &
  local pid=$!; sleep 0.4
  in_ns "$1" sockperf pp --tcp -i "$3" -p 11111 -t "$SECS" 2>&1 \
    | sed -n 's/.*RunTime=\([0-9.]*\) sec; SentMessages=\([0-9]*\).*/\2 \1/p' | awk '{printf "%.0f", $1/$2}'
  kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null || true
}
tput() { # client server ip -> Gbit/s
  in_ns "$2" iperf3 -s -B "$3" -1 >/dev/null 2>&1 &
  local pid=$!; sleep 0.4
  in_ns "$1" iperf3 -c "$3" -t "$SECS" -J | python3 -c "import json,sys; print('%.2f' % (json.load(sys.stdin)['end']['sum_received']['bits_per_second']/1e9))"
  wait "$pid" 2>/dev/null || true
}

declare -A RR TP
for round in $(seq "$ROUNDS"); do
  for c in "${CASES[@]}"; do
    IFS='|' read -r name cl sv ip <<<"$c"
    RR[$name]+="$(rr "$cl" "$sv" "$ip") "
    TP[$name]+="$(tput "$cl" "$sv" "$ip") "
  done
  echo "round $round done" >&2
done

median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
echo
echo "| path | TCP RR/s (median of $ROUNDS) | vs (a) | vs (b) | iperf3 Gbit/s (median) | vs (a) | vs (b) |"
echo "| --- | --- | --- | --- | --- | --- | --- |"
RA=$(echo "${RR[veth-pair(a)]}" | median); RB=$(echo "${RR[host-routing(b)]}" | median)
TA=$(echo "${TP[veth-pair(a)]}" | median); TB=$(echo "${TP[host-routing(b)]}" | median)
for c in "${CASES[@]}"; do
  IFS='|' read -r name _ _ _ <<<"$c"
  r=$(echo "${RR[$name]}" | median); t=$(echo "${TP[$name]}" | median)
  awk -v n="$name" -v r="$r" -v t="$t" -v ra="$RA" -v rb="$RB" -v ta="$TA" -v tb="$TB" \
    'BEGIN { printf "| %s | %d | %.2f | %.2f | %.2f | %.2f | %.2f |\n", n, r, r/ra, r/rb, t, t/ta, t/tb }'
done
echo
echo "raw RR samples:"; for k in "${!RR[@]}"; do echo "  $k: ${RR[$k]}"; done
echo "raw throughput samples (Gbit/s):"; for k in "${!TP[@]}"; do echo "  $k: ${TP[$k]}"; done
