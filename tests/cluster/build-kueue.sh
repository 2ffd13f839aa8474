#!/usr/bin/env bash
# Build Kueue's controller manager (cmd/kueue) from the Go module proxy, cached
# outside the work tree and keyed by the module's inputs the way build.sh keys the
# control plane, so a warm machine rebuilds nothing. The module graph is pinned by
# tests/cluster/kueue/go.mod (a `tool` directive on sigs.k8s.io/kueue/cmd/kueue) and
# its go.sum; Kueue's CRDs come from the same module in GOMODCACHE. To move to another
# release: `go get -tool sigs.k8s.io/kueue/cmd/kueue@<version>` in tests/cluster/kueue (not
# `go mod tidy`: the main package it builds exists only in the overlay below).
#
# One line of Kueue is changed, by an -overlay the key covers: the manager reads its metrics
# certificate from a hard-coded /etc/kueue/metrics/certs (when internalCertManagement is off,
# as here: its rotator needs in-cluster webhook Services), a path no test may write. The overlay
# makes it $KUEUE_METRICS_CERT_DIR; nothing else differs from upstream's cmd/kueue.
#
# Prints the binary's path on stdout (everything else goes to stderr); the CRD
# directory is `$(dirname binary)/crd` (a copy, so a later `go clean -modcache`
# cannot take it away from a cached binary).
# Env: SPIN_CLUSTER_CACHE (default ~/.cache/spin-operator/cluster), shared with build.sh,
#      GOCACHE / GOMODCACHE (default under SPIN_CLUSTER_CACHE, persistent),
#      SPIN_CLUSTER_TRIM_GOCACHE=1 (CI sets it): after a build, drop the compile cache
#      under SPIN_CLUSTER_CACHE; only the binary (~90 MB) and the CRDs are needed to run.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
src="$here/kueue"
# shellcheck source=go-env.sh
source "$here/go-env.sh"
kueue_version="$(awk '$1=="sigs.k8s.io/kueue"{print $2; exit}' "$src/go.mod")"
# Kueue's Makefile stamps its version the same way; unset, the manager logs "v0.0.0".
ldflags="-s -w -X sigs.k8s.io/kueue/pkg/version.GitVersion=$kueue_version"
build_flags="-mod=readonly -trimpath CGO_ENABLED=0 $ldflags"
patch='s#metricsCertPath := "/etc/kueue/metrics/certs"#metricsCertPath := os.Getenv("KUEUE_METRICS_CERT_DIR")#'
# Key: the Kueue release plus a hash of the module graph, the build flags and the
# toolchain -- not this script's text.
key="$(cat "$src/go.mod" "$src/go.sum" <(echo "$build_flags $patch") <(go version) | sha256sum | cut -c1-16)"
out="$cache/kueue-$kueue_version-$key"
bin="$out/kueue"
if [[ -x "$bin" && -d "$out/crd" ]]; then
    echo "$bin"
    exit 0
fi
mkdir -p "$out"
start=$(date +%s)
echo "building Kueue $kueue_version into $out (cold builds take a while)" >&2
(cd "$src" && go mod download sigs.k8s.io/kueue)
moddir="$(cd "$src" && go list -mod=readonly -m -f '{{.Dir}}' sigs.k8s.io/kueue)"
sed "$patch" "$moddir/cmd/kueue/main.go" > "$out/main.go"
grep -q 'os.Getenv("KUEUE_METRICS_CERT_DIR")' "$out/main.go" || {
    echo "cmd/kueue/main.go of $kueue_version has no metricsCertPath line to patch" >&2; exit 1; }
# Go refuses overlays of files in GOMODCACHE: the patched file becomes the wrapper module's own
# main package (only in the overlay, nothing is written into the work tree).
printf '{"Replace": {"%s": "%s"}}\n' "$src/main.go" "$out/main.go" > "$out/overlay.json"
(cd "$src" && go build -mod=readonly -trimpath -overlay="$out/overlay.json" -ldflags="$ldflags" \
    -o "$bin.tmp" .)
rm -rf "$out/crd.tmp"
cp -r "$moddir/config/components/crd/bases" "$out/crd.tmp"
chmod -R u+w "$out/crd.tmp"
rm -rf "$out/crd"
mv "$out/crd.tmp" "$out/crd"
mv "$bin.tmp" "$bin"
echo "built in $(( $(date +%s) - start ))s" >&2
trim_gocache
echo "$bin"
