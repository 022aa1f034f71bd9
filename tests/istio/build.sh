#!/usr/bin/env bash
# Builds the Istio CA API test client (main.go beside this script: istio.io/api's Go stubs and
# grpc-go, pinned by go.mod/go.sum) into the peer cache (tests/go-peer.sh) and prints its path.
# The cache key is the istio.io/api version plus a hash of the client's source, so a second run
# builds nothing.
#
#   MESHCA_ISTIO_CLIENT_BIN="$(bash tests/istio/build.sh)"
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=../go-peer.sh
source "$HERE/../go-peer.sh"
api="$(go_mod_version "$HERE" istio.io/api)"
sum="$(cat "$HERE/main.go" "$HERE/go.mod" "$HERE/go.sum" | sha256sum | cut -c1-12)"
CGO_ENABLED=1 go_peer istio-ca-client "$api-$sum" "$HERE" istio-ca-client .
