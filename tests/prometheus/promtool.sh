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
# shellcheck source=../go-peer.sh
source "$HERE/../go-peer.sh"

build() {
  local ver
  ver="$(go_mod_version "$HERE" github.com/prometheus/prometheus)"
  # remove_all_sd: no service-discovery plugins (see go.mod); -trimpath: no local paths.
  CGO_ENABLED=1 go_peer prometheus "$ver" "$HERE" promtool -trimpath -tags remove_all_sd \
    github.com/prometheus/prometheus/cmd/promtool
}

case "${1:-}" in
  build) build ;;
  *) echo "usage: promtool.sh build" >&2; exit 1 ;;
esac
