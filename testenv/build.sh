#!/usr/bin/env bash
# Build the tier-2 test control plane (kube-apiserver, kube-controller-manager,
# kube-scheduler, kubectl, etcd, kwok, helm) from the Go modules pinned in this
# directory, into a cache directory keyed by the content of the pins.
#
#   testenv/build.sh            # builds if needed; last stdout line = bin dir
#   KMM_TESTENV_CACHE=/x build.sh
#
# The build goes to a temporary directory next to the cache entry and is
# renamed into place only when every binary is there, so an interrupted build
# never leaves a half-filled cache entry behind.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache_root="${KMM_TESTENV_CACHE:-${HOME}/.cache/kmm-rs/testenv}"
binaries=(kube-apiserver kube-controller-manager kube-scheduler kubectl etcd kwok helm)

# The key covers everything that decides what gets built.
key="$(cd "$here" && cat go.mod go.sum tools.go build.sh | sha256sum | cut -c1-16)"
entry="${cache_root}/${key}"

complete() {
  local dir="$1" b
  for b in "${binaries[@]}"; do
    [[ -x "${dir}/bin/${b}" ]] || return 1
  done
}

if complete "$entry"; then
  echo "${entry}/bin"
  exit 0
fi

command -v go >/dev/null || { echo "build.sh: go is not on PATH" >&2; exit 1; }
mkdir -p "$cache_root"
tmp="$(mktemp -d "${cache_root}/.build-${key}.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT

cd "$here"
export CGO_ENABLED=0
k8s_version="$(go list -m -f '{{.Version}}' k8s.io/kubernetes)"   # e.g. v1.37.2
k8s_time="$(go list -m -f '{{.Time.UTC.Format "2006-01-02T15:04:05Z"}}' k8s.io/kubernetes)"
major="${k8s_version#v}"; major="${major%%.*}"
minor="${k8s_version#v*.}"; minor="${minor%%.*}"

# The same variables hack/lib/version.sh sets in a Kubernetes release build, so
# /version, discovery and `kubectl version` report the real release.
ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldflags+=" -X ${pkg}.gitVersion=${k8s_version}"
  ldflags+=" -X ${pkg}.gitMajor=${major}"
  ldflags+=" -X ${pkg}.gitMinor=${minor}"
  ldflags+=" -X ${pkg}.gitCommit="
  ldflags+=" -X ${pkg}.gitTreeState=clean"
  ldflags+=" -X ${pkg}.buildDate=${k8s_time}"
done

start=$(date +%s)
echo "build.sh: building ${binaries[*]} (kubernetes ${k8s_version}) into ${entry}" >&2
go build -trimpath -buildvcs=false -mod=readonly -ldflags "$ldflags" -o "${tmp}/bin/" \
  k8s.io/kubernetes/cmd/kube-apiserver \
  k8s.io/kubernetes/cmd/kube-controller-manager \
  k8s.io/kubernetes/cmd/kube-scheduler \
  k8s.io/kubernetes/cmd/kubectl \
  sigs.k8s.io/kwok/cmd/kwok >&2
# helm renders the chart in deploy/helm for the install tests; its version
# string is stamped like a release build so `helm version` is truthful.
helm_version="$(go list -m -f '{{.Version}}' helm.sh/helm/v3)"
go build -trimpath -buildvcs=false -mod=readonly \
  -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=${helm_version}" \
  -o "${tmp}/bin/helm" helm.sh/helm/v3/cmd/helm >&2
# The etcd server module's root package is etcd's main; its default binary
# name would be "server".
go build -trimpath -buildvcs=false -mod=readonly -ldflags "-s -w" -o "${tmp}/bin/etcd" \
  go.etcd.io/etcd/server/v3 >&2

{
  go list -m k8s.io/kubernetes go.etcd.io/etcd/server/v3 sigs.k8s.io/kwok helm.sh/helm/v3
  go version
} > "${tmp}/VERSIONS"
complete "$tmp" || { echo "build.sh: a binary is missing after the build" >&2; exit 1; }

# Publish. A stale incomplete entry (e.g. binaries deleted by hand) is moved
# aside first; if a concurrent build published the entry meanwhile, keep it.
if [[ -e "$entry" ]] && ! complete "$entry"; then
  mv "$entry" "${tmp}/stale"
fi
if ! mv -T "$tmp" "$entry" 2>/dev/null; then
  complete "$entry" || { echo "build.sh: could not publish ${entry}" >&2; exit 1; }
else
  trap - EXIT
  rm -rf "${entry}/stale"
fi
echo "build.sh: done in $(( $(date +%s) - start ))s" >&2
echo "${entry}/bin"
