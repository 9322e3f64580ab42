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

# A fresh demo every time: remove a cluster left by an earlier run.
$M down >/dev/null 2>&1 || true
$M up --nodes "$NODES" --detach
echo
echo "== membrane status"
$M status
echo
echo "== membrane get nodes"
$M get nodes
echo
echo "== two pods on node-1, one on node-2 (network namespaces attached by the CNI plugin)"
$M pod run web --node node-1 --labels app=web
$M pod run db --node node-1 --labels app=db
$M pod run client --node node-2 --labels app=client
$M pod list
WEB=$($M pod list -o json | python3 -c "import json,sys; print(next(p['ip'] for p in json.load(sys.stdin)['items'] if p['name']=='web'))")
echo
echo "== client (node-2) -> web (node-1), across nodes; db -> web on the same node (eBPF redirect)"
$M pod exec client -- ping -c 2 -W 2 "$WEB"
$M pod exec db -- ping -c 2 -W 2 "$WEB"
echo
echo "== client -> the world (masqueraded to node-2's address)"
$M pod exec client -- ping -c 1 -W 2 10.99.0.200
echo
echo "== what the datapath has programmed"
$M get endpoints
$M get ipam
echo
echo "== a LoadBalancer service in front of web (Maglev in eBPF; the address is announced by one node)"
$M pod exec web -- socat TCP-LISTEN:8080,fork,reuseaddr SYSTEM:'echo hello from web' >/dev/null 2>&1 &
$M apply -f examples/web-service.yaml
sleep 2
$M get services
LB=$($M get services -o json | python3 -c "import json,sys; print(next(f['address'] for f in json.load(sys.stdin)['items'][0]['frontendList'] if f['kind']=='FRONTEND_KIND_LOAD_BALANCER'))")
echo "external -> $LB:80 (LoadBalancer):  $(ip netns exec external socat -T2 - TCP:$LB:80 </dev/null)"
echo "external -> 10.99.0.12:30080 (NodePort via node-2):  $(ip netns exec external socat -T2 - TCP:10.99.0.12:30080 </dev/null)"
$M lb table web --node node-2
echo
echo "== a deny policy: client may no longer reach web (db still may)"
$M apply -f examples/deny-client.yaml
sleep 1
$M pod exec client -- ping -c 1 -W 1 "$WEB" >/dev/null && echo "client -> web: allowed?!" || echo "client -> web: denied"
$M pod exec db -- ping -c 1 -W 1 "$WEB" >/dev/null && echo "db -> web: allowed" || echo "db -> web: denied?!"
$M policy trace --from pod/default/client --to pod/default/web --port 80/TCP || true
echo
echo "== the denied attempts, as flows from every node (through the relay)"
$M observe --verdict DROPPED --last 5
echo
$M status
echo
echo "Cluster is running. Try: $M status | $M get nodes -o yaml | $M pod exec web -- ip addr | $M down"
