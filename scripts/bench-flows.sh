#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Flow-events benchmark: request/response rate (sockperf ping-pong, one
# connection) and connection rate (a new TCP connection per request, so a
# flow event per connection) between two pods on one node, with the node's
# flow observer on vs off (MEMBRANE_FLOWS), interleaved, same run; median of
# ROUNDS. Needs root and a built workspace; starts (and stops) its own
# local cluster, so no other cluster may be running.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS="${ROUNDS:-3}"
SECS="${SECS:-3}"
M="$PWD/target/debug/membrane"
STATE="$(mktemp -d)"
export MEMBRANE_STATE_DIR="$STATE"
cleanup() {
  pkill -f "sockperf sr --tcp -i 10.200" 2>/dev/null || true
  pkill -f "crr-server" 2>/dev/null || true
  "$M" down >/dev/null 2>&1 || true
  rm -rf "$STATE"
}
trap cleanup EXIT
in_ns() { local ns=$1; shift; nsenter --net="/run/netns/$ns" "$@"; }

"$M" up --nodes 1 --detach >/dev/null
"$M" pod run fa --node node-1 >/dev/null
"$M" pod run fb --node node-1 >/dev/null
B=$("$M" pod list -o json | python3 -c "import json,sys; print(next(p['ip'] for p in json.load(sys.stdin)['items'] if p['name']=='fb'))")

set_flows() { # on|off: restart node-1's datapath with flow reading on or off
  python3 - "$STATE/launch/node-1.json" "$1" <<'PY'
import json, sys
p, mode = sys.argv[1], sys.argv[2]
d = json.load(open(p))
env = [e for e in d["env"] if e[0] != "MEMBRANE_FLOWS"]
env.append(["MEMBRANE_FLOWS", "true" if mode == "on" else "false"])
d["env"] = env
json.dump(d, open(p, "w"))
PY
  "$M" restart node-1 >/dev/null
}

in_ns pod-default-fb sockperf sr --tcp -i "$B" -p 11111 >/dev/null 2>&1 &
in_ns pod-default-fb python3 -c "
import socketserver, sys
sys.argv[0] = 'crr-server'
class H(socketserver.BaseRequestHandler):
    def handle(self):
        d = self.request.recv(16)
        if d: self.request.sendall(d)
class S(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
S(('$B', 9000), H).serve_forever()" &
sleep 0.5

rr() { in_ns pod-default-fa sockperf pp --tcp -i "$B" -p 11111 -t "$SECS" 2>&1 \
  | sed -n 's/.*RunTime=\([0-9.]*\) sec; SentMessages=\([0-9]*\).*/\2 \1/p' | awk '{printf "%.0f", $1/$2}'; }
crr() { in_ns pod-default-fa python3 -c "
import socket, time
n, end = 0, time.time() + $SECS
while time.time() < end:
    s = socket.create_connection(('$B', 9000)); s.sendall(b'x'); s.recv(1); s.close(); n += 1
print(round(n / $SECS))"; }

declare -A RR CRR
for round in $(seq "$ROUNDS"); do
  for mode in on off; do
    set_flows "$mode"
    sleep 0.5
    RR[$mode]+="$(rr) "
    CRR[$mode]+="$(crr) "
  done
  echo "round $round done" >&2
done
set_flows on
seen=$("$M" status -o json | python3 -c "import json,sys; r=json.load(sys.stdin).get('relay') or {}; print(r.get('seenFlows', r.get('seen_flows', '?')))" 2>/dev/null || echo "?")

median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
ron=$(echo "${RR[on]}" | median); roff=$(echo "${RR[off]}" | median)
con=$(echo "${CRR[on]}" | median); coff=$(echo "${CRR[off]}" | median)
echo
echo "| workload | flows off | flows on | ratio on/off |"
echo "| --- | --- | --- | --- |"
awk -v a="$roff" -v b="$ron" 'BEGIN { printf "| TCP request/response, 1 connection (sockperf) | %d/s | %d/s | %.3f |\n", a, b, b/a }'
awk -v a="$coff" -v b="$con" 'BEGIN { printf "| TCP connect+request+close (a flow event each) | %d/s | %d/s | %.3f |\n", a, b, b/a }'
echo
echo "raw: RR on [${RR[on]}] off [${RR[off]}]; CRR on [${CRR[on]}] off [${CRR[off]}]"
