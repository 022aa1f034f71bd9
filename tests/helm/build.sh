#!/usr/bin/env bash
# The Helm CLI of the chart tests (cli/tests/helm_e2e.rs), built from its Go module: go.mod and
# go.sum beside this script pin helm.sh/helm/v4. The binary is cached by exact module version
# under $MESHCA_CLUSTER_CACHE (default ~/.cache/meshca/cluster), like tests/cluster/cluster.sh's
# peers, so a second run builds nothing.
#
#   build.sh          build (or find in the cache); prints the binary's path on stdout
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${MESHCA_CLUSTER_CACHE:-$HOME/.cache/meshca/cluster}"

die() { echo "helm build.sh: $*" >&2; exit 1; }

command -v go >/dev/null || die "go is not installed (the chart tests build helm from its Go module)"
version="$(cd "$HERE" && go list -m -f '{{.Version}}' helm.sh/helm/v4)"
dir="$CACHE/helm-$version"
if [[ -x "$dir/helm" ]]; then
  echo "helm build.sh: helm $version cached in $dir" >&2
else
  echo "helm build.sh: building helm $version into $dir" >&2
  mkdir -p "$(dirname "$dir")"
  out="$(mktemp -d "$CACHE.tmp.XXXXXX")"
  # The version stamp the Helm Makefile sets (`helm version`).
  (cd "$HERE" && CGO_ENABLED=0 go build -mod=readonly -trimpath \
    -ldflags "-X helm.sh/helm/v4/internal/version.version=$version" \
    -o "$out/helm" helm.sh/helm/v4/cmd/helm)
  rm -rf "$dir" && mv "$out" "$dir"
fi
echo "$dir/helm"
