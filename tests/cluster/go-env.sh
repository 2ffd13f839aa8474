# Sourced by build.sh and build-kueue.sh: where their Go builds cache, and how they build.
# Sets `cache` (SPIN_CLUSTER_CACHE, default ~/.cache/spin-operator/cluster), exports GOCACHE and
# GOMODCACHE (default under it, persistent), GOFLAGS and CGO_ENABLED, and defines
# `trim_gocache`, which CI calls after a build (SPIN_CLUSTER_TRIM_GOCACHE=1).
cache="${SPIN_CLUSTER_CACHE:-$HOME/.cache/spin-operator/cluster}"
own_gocache=0
[[ -z "${GOCACHE:-}" ]] && own_gocache=1
export GOCACHE="${GOCACHE:-$cache/go-build}"
export GOMODCACHE="${GOMODCACHE:-$cache/go-mod}"
# Two cores on the development and CI machines: more parallel compiles only thrash memory.
# The caller may override.
export GOFLAGS="${GOFLAGS:--p=2}"
export CGO_ENABLED=0

# Drop the compile cache after a build when SPIN_CLUSTER_TRIM_GOCACHE=1 (a fresh CI machine's
# disk is shared; only the built binaries are needed to run) -- never a GOCACHE the caller
# chose: that one may serve their other builds.
trim_gocache() {
    if [[ "${SPIN_CLUSTER_TRIM_GOCACHE:-0}" == 1 && $own_gocache == 1 ]]; then
        go clean -cache >&2
        echo "trimmed the Go build cache $GOCACHE" >&2
    fi
}
