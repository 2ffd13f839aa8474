#!/usr/bin/env bash
# Build the real Kubernetes control plane (etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler) as one multi-call binary from the Go
# module proxy, cached outside the work tree and keyed by the module's inputs,
# so a warm machine rebuilds nothing.
#
# Prints the binary's path on stdout (everything else goes to stderr).
# Env: SPIN_CLUSTER_CACHE (default ~/.cache/spin-operator/cluster),
#      GOCACHE / GOMODCACHE (default under SPIN_CLUSTER_CACHE, persistent),
#      SPIN_CLUSTER_TRIM_GOCACHE=1 (CI sets it): after a build, drop the ~3.7 GB compile
#      cache under SPIN_CLUSTER_CACHE; only the binary (~130 MB) is needed to run.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
src="$here/controlplane"
# shellcheck source=go-env.sh
source "$here/go-env.sh"
k8s_version="$(awk '$1=="k8s.io/kubernetes"{print $2; exit}' "$src/go.mod")"
# The version the components report (and helm's kubeVersion checks, and feature-gate
# emulation) comes from these link-time variables, as upstream's hack/lib/version.sh sets them;
# unset, the binary says v0.0.0-master.
major="${k8s_version#v}"; minor="${major#*.}"; minor="${minor%%.*}"; major="${major%%.*}"
ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=$k8s_version -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
    ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done
build_flags="-mod=mod -trimpath CGO_ENABLED=0 $ldflags"
# Key: the Kubernetes release plus a hash of everything that decides the
# binary (module graph, our main, the build flags, the Go toolchain) -- not
# this script's text, so editing a comment here rebuilds nothing.
key="$(cat "$src/go.mod" "$src/go.sum" "$src/main.go" <(echo "$build_flags") <(go version) | sha256sum | cut -c1-16)"
out="$cache/$k8s_version-$key"
bin="$out/controlplane"
if [[ -x "$bin" ]]; then
    echo "$bin"
    exit 0
fi
mkdir -p "$out"
start=$(date +%s)
echo "building control plane $k8s_version into $out (cold builds take a while)" >&2
(cd "$src" && go build -mod=mod -trimpath -ldflags="$ldflags" -o "$bin.tmp" .)
mv "$bin.tmp" "$bin"
echo "built in $(( $(date +%s) - start ))s" >&2
trim_gocache
echo "$bin"
