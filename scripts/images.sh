#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
#
# Builds the `membrane:dev` image (images/Dockerfile, FROM scratch).
#
# Steps:
#   1. cargo build --release of membrane-ipam, membrane-node-datapath, membrane (CLI);
#   2. a build context in target/images/context/: those binaries, /usr/bin/etcd
#      (+ etcdctl), /usr/bin/ip, and every shared library `ldd` lists for them;
#   3. DOCKER_BUILDKIT=0 docker build (no base image can be pulled here, and
#      BuildKit wants to fetch its frontend).
#
# Without a reachable Docker daemon it prints what it would do and exits 0
# (before spending minutes in cargo). `--context-only` assembles the context
# without needing Docker at all.
#
# Usage: scripts/images.sh [--tag TAG] [--skip-cargo] [--context-only]
#
# Host requirements: Debian packages etcd-server, etcd-client (optional),
# iproute2; for step 3 docker.io with a running dockerd.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
CONTEXT="$TARGET_DIR/images/context"
DOCKERFILE="$ROOT/images/Dockerfile"
TAG="membrane:dev"
SKIP_CARGO=0
CONTEXT_ONLY=0

# The Rust binaries, by cargo package → binary name.
PACKAGES=(membrane-ipam membrane-node-datapath membrane-cli)
BINARIES=(membrane-ipam membrane-node-datapath membrane)
# Host binaries copied as they are: etcd for compose, `ip` for node-datapath.
HOST_REQUIRED=(/usr/bin/etcd /usr/bin/ip)
HOST_OPTIONAL=(/usr/bin/etcdctl)
# The unprivileged user the services run as (same number as distroless' nonroot).
NONROOT_UID=65532

usage() { sed -n '/^# Usage:/,/^# Host/p' "$0" | sed 's/^# \{0,1\}//'; }
log() { printf 'images: %s\n' "$*"; }
die() { printf 'images: error: %s\n' "$*" >&2; exit 1; }

while [ $# -gt 0 ]; do
    case "$1" in
        --tag) TAG="${2:?--tag needs a value}"; shift 2 ;;
        --skip-cargo) SKIP_CARGO=1; shift ;;
        --context-only) CONTEXT_ONLY=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
done

docker_reachable() {
    command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1
}

plan() {
    cat <<EOF
  1. cargo build --release $(printf -- '-p %s ' "${PACKAGES[@]}")
  2. assemble $CONTEXT:
       rootfs/usr/bin/{$(IFS=,; echo "${BINARIES[*]}")} from $TARGET_DIR/release
       rootfs/usr/bin/{etcd,etcdctl,ip} from the host, /etc/iproute2
       every shared library ldd lists for them (glibc, libbpf, libelf, ...)
       rootfs/etc/{passwd,group,nsswitch.conf}, etcd-data/ (owned by $NONROOT_UID)
  3. DOCKER_BUILDKIT=0 docker build -f images/Dockerfile -t $TAG $CONTEXT
EOF
}

if [ "$CONTEXT_ONLY" = 0 ] && ! docker_reachable; then
    log "no Docker daemon is reachable (docker info failed); nothing built."
    log "this script would:"
    plan
    log "to build for real: apt-get install docker.io && dockerd &  (then re-run)"
    log "to only assemble the build context: scripts/images.sh --context-only"
    exit 0
fi

for bin in "${HOST_REQUIRED[@]}"; do
    [ -x "$bin" ] || die "$bin not found (apt-get install etcd-server iproute2)"
done

# --- 1. binaries --------------------------------------------------------------
if [ "$SKIP_CARGO" = 0 ]; then
    log "cargo build --release (several minutes on 2 cores)"
    pkg_args=()
    for pkg in "${PACKAGES[@]}"; do pkg_args+=(-p "$pkg"); done
    (cd "$ROOT" && cargo build --release "${pkg_args[@]}")
fi
for bin in "${BINARIES[@]}"; do
    [ -x "$TARGET_DIR/release/$bin" ] || die "$TARGET_DIR/release/$bin missing (run without --skip-cargo)"
done

# --- 2. build context ---------------------------------------------------------
rm -rf "$CONTEXT"
mkdir -p "$CONTEXT/rootfs/usr/bin" "$CONTEXT/rootfs/etc" "$CONTEXT/etcd-data"

# Copies file $1 to the same absolute path inside the rootfs, following
# symlinks (the loader and libraries are usually symlinks on the host).
copy_into_rootfs() {
    local src="$1" dst="$CONTEXT/rootfs$1"
    [ -e "$dst" ] && return 0
    mkdir -p "$(dirname "$dst")"
    cp -L "$src" "$dst"
}

# Copies every shared library `ldd` reports for $1 (none for static binaries).
copy_libraries() {
    local bin="$1" out
    if ! out="$(ldd "$bin" 2>&1)"; then
        case "$out" in
            *"not a dynamic executable"*|*"statically linked"*) return 0 ;;
            *) die "ldd $bin: $out" ;;
        esac
    fi
    if grep -q 'not found' <<<"$out"; then
        die "ldd $bin: missing libraries: $(grep 'not found' <<<"$out" | tr -s ' \t' ' ')"
    fi
    # Lines look like `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)`
    # or `/lib64/ld-linux-x86-64.so.2 (0x...)`; linux-vdso has no file.
    awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' <<<"$out" |
        sort -u |
        while read -r lib; do copy_into_rootfs "$lib"; done
}

add_binary() {
    local src="$1" name="$2"
    cp -L "$src" "$CONTEXT/rootfs/usr/bin/$name"
    copy_libraries "$src"
    log "  + /usr/bin/$name"
}

for bin in "${BINARIES[@]}"; do
    add_binary "$TARGET_DIR/release/$bin" "$bin"
done
for bin in "${HOST_REQUIRED[@]}"; do
    add_binary "$bin" "$(basename "$bin")"
done
for bin in "${HOST_OPTIONAL[@]}"; do
    if [ -x "$bin" ]; then add_binary "$bin" "$(basename "$bin")"; else log "  - $bin not installed, skipped"; fi
done
[ -d /etc/iproute2 ] && cp -r /etc/iproute2 "$CONTEXT/rootfs/etc/iproute2"

cat >"$CONTEXT/rootfs/etc/passwd" <<EOF
root:x:0:0:root:/root:/sbin/nologin
nonroot:x:$NONROOT_UID:$NONROOT_UID:nonroot:/nonexistent:/sbin/nologin
EOF
cat >"$CONTEXT/rootfs/etc/group" <<EOF
root:x:0:
nonroot:x:$NONROOT_UID:
EOF
# glibc ≥ 2.34 has files/dns built in; this only fixes the lookup order.
printf 'hosts: files dns\n' >"$CONTEXT/rootfs/etc/nsswitch.conf"
mkdir -p "$CONTEXT/rootfs/tmp" && chmod 1777 "$CONTEXT/rootfs/tmp"
touch "$CONTEXT/etcd-data/.keep"

log "context ready: $CONTEXT ($(du -sh "$CONTEXT" | cut -f1))"
if [ "$CONTEXT_ONLY" = 1 ]; then
    log "--context-only: not building; would run:"
    echo "  DOCKER_BUILDKIT=0 docker build -f images/Dockerfile -t $TAG $CONTEXT"
    exit 0
fi

# --- 3. image -----------------------------------------------------------------
log "DOCKER_BUILDKIT=0 docker build -t $TAG"
DOCKER_BUILDKIT=0 docker build --quiet -f "$DOCKERFILE" -t "$TAG" "$CONTEXT"
log "built $TAG ($(docker image inspect -f '{{.Size}}' "$TAG" | awk '{printf "%.0f MB", $1/1e6}'))"
