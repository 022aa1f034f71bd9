#!/usr/bin/env bash
# promtool for meshca's metric and alert-rule tests, built from the Go module that go.mod
# beside this script pins (github.com/prometheus/prometheus), cached by version like
# tests/cluster/cluster.sh caches its binaries: $MESHCA_CLUSTER_CACHE (default
# ~/.cache/meshca/cluster)/prometheus-<version>/promtool. A second run builds nothing.
#
#   promtool.sh build    build it (or find it in the cache); the last line printed is its path
#
# .ci/run exports that path as MESHCA_PROMTOOL_BIN for tests/prometheus_rules.rs and
# cli/tests/metrics_scrape.rs.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${MESHCA_CLUSTER_CACHE:-$HOME/.cache/meshca/cluster}"

die() { echo "promtool.sh: $*" >&2; exit 1; }

build() {
  command -v go >/dev/null || die "go is not installed (promtool is built from its Go module)"
  local ver dir out
  ver="$(cd "$HERE" && go list -m -f '{{.Version}}' github.com/prometheus/prometheus)"
  dir="$CACHE/prometheus-$ver"
  if [[ -x "$dir/promtool" ]]; then
    echo "promtool.sh: promtool $ver cached in $dir" >&2
  else
    echo "promtool.sh: building promtool $ver into $dir" >&2
    mkdir -p "$CACHE"
    out="$(mktemp -d "$CACHE/.prometheus-$ver.XXXXXX")"
    # remove_all_sd: no service-discovery plugins (see go.mod); -trimpath: no local paths.
    (cd "$HERE" && go build -mod=readonly -trimpath -tags remove_all_sd -o "$out/promtool" \
      github.com/prometheus/prometheus/cmd/promtool)
    rm -rf "$dir" && mv "$out" "$dir"
  fi
  echo "$dir/promtool"
}

case "${1:-}" in
  build) build ;;
  *) die "usage: promtool.sh build" ;;
esac
