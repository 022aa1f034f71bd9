#!/usr/bin/env bash
# Builds the Istio CA API test client (main.go beside this script: istio.io/api's Go stubs and
# grpc-go, pinned by go.mod/go.sum) into the peer cache and prints its path. The cache key is
# the istio.io/api version plus a hash of the client's source, so a second run builds nothing.
#
#   MESHCA_ISTIO_CLIENT_BIN="$(bash tests/istio/build.sh)"
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${MESHCA_CLUSTER_CACHE:-$HOME/.cache/meshca/cluster}"
command -v go >/dev/null || { echo "build.sh: go is not installed" >&2; exit 1; }
api="$(cd "$HERE" && go list -m -f '{{.Version}}' istio.io/api)"
sum="$(cat "$HERE/main.go" "$HERE/go.mod" "$HERE/go.sum" | sha256sum | cut -c1-12)"
dir="$CACHE/istio-ca-client-$api-$sum"
if [[ ! -x "$dir/istio-ca-client" ]]; then
  echo "build.sh: building the Istio CA client (istio.io/api $api) into $dir" >&2
  mkdir -p "$CACHE"
  out="$(mktemp -d "$CACHE.tmp.XXXXXX")"
  (cd "$HERE" && go build -mod=readonly -o "$out/istio-ca-client" .)
  rm -rf "$dir" && mv "$out" "$dir"
fi
echo "$dir/istio-ca-client"
