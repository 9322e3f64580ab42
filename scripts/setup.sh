#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Installs everything Membrane builds and tests with, on Debian 12 as root.
# Idempotent: installs only what is missing.
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
  echo "setup.sh: run as root (it installs packages and mounts bpffs)" >&2
  exit 1
fi

need=()
have_cmd() { command -v "$1" >/dev/null 2>&1; }
have_cmd clang-19 || need+=(clang-19 llvm-19)
[ -f /usr/include/bpf/bpf_helpers.h ] || need+=(libbpf-dev)
[ -d /usr/include/x86_64-linux-gnu/asm ] || need+=(linux-libc-dev)
have_cmd etcd || need+=(etcd-server)
have_cmd etcdctl || need+=(etcd-client)
have_cmd protoc || need+=(protobuf-compiler)
have_cmd bpftool || need+=(bpftool)
have_cmd ip || need+=(iproute2)
have_cmd nsenter || need+=(util-linux)
have_cmd iperf3 || need+=(iperf3)
have_cmd ping || need+=(iputils-ping)
have_cmd socat || need+=(socat)
have_cmd curl || need+=(curl)
have_cmd nft || need+=(nftables)
have_cmd iptables-legacy-restore || need+=(iptables)
have_cmd sockperf || need+=(sockperf)
[ -x /usr/lib/cni/bridge ] || need+=(containernetworking-plugins)

if [ ${#need[@]} -gt 0 ]; then
  echo "setup.sh: installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# Debian's etcd-server package may start a system etcd on 2379; Membrane's
# local cluster uses its own ports, so it is left alone.

if ! have_cmd cargo; then
  echo "setup.sh: cargo not found; install a Rust toolchain (1.95+) first" >&2
  exit 1
fi

mountpoint -q /sys/fs/bpf || mount -t bpf bpffs /sys/fs/bpf
echo "setup.sh: ready (clang $(clang-19 --version | head -1 | awk '{print $4}'), etcd $(etcd --version | head -1 | awk '{print $3}'), $(cargo --version))"
