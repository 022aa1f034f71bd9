#!/usr/bin/env bash
# Builds go-sds, the go-control-plane SDS benchmark peer (main.go beside this script;
# go-control-plane v0.14.0 and its envoy module v1.40.0, pinned by go.mod/go.sum), into the
# peer cache (tests/go-peer.sh) and prints its path. The cache key is the go-control-plane
# version plus a hash of the source, so a second run builds nothing.
#
#   GO_SDS="$(bash bench/go-sds/build.sh)"
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=../../tests/go-peer.sh
source "$HERE/../../tests/go-peer.sh"
gcp="$(go_mod_version "$HERE" github.com/envoyproxy/go-control-plane)"
sum="$(cat "$HERE/main.go" "$HERE/go.mod" "$HERE/go.sum" | sha256sum | cut -c1-12)"
go_peer go-sds "$gcp-$sum" "$HERE" go-sds -trimpath .
