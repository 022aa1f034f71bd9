#!/usr/bin/env bash
# Istio's CA API (`meshca istio-ca serve`) against a real API server: COUNT agents start at
# once (each after a random delay up to JITTER, at most CONCURRENCY calls in flight), each
# with its own TokenRequest token (audience istio-ca) that the server reviews with
# TokenReview; then, in the same run and cluster, the same COUNT through the CSR API
# (bench/kube-signer.sh csr: create, approval, status per certificate, the writes of istiod's
# RA path, with meshca's auto-approver approving instead of istiod).
#
#   COUNT=1000 CONCURRENCY=64 JITTER=2s ACCOUNTS=10 SKIP_BUILD=1 SKIP_RA=1 bench/istio-ca.sh
#
# Uses the cluster of $MESHCA_E2E_KUBECONFIG (tests/cluster/cluster.sh's env.sh); without it
# starts one (k8s-v1.37) and stops it at the end. The client is tests/istio (Go, istio.io/api +
# grpc-go). Prints one JSON line per path; raw output in $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
COUNT="${COUNT:-1000}"
CONCURRENCY="${CONCURRENCY:-64}"
JITTER="${JITTER:-2s}"
ACCOUNTS="${ACCOUNTS:-10}"
OUT="${OUT:-$(mktemp -d /tmp/meshca-istio-bench.XXXXXX)}"
# A namespace of its own per run: without a controller-manager a deleted namespace never
# finishes terminating.
NS="meshca-bench-istio-$(date +%s)"
mkdir -p "$OUT/tokens" "$OUT/home"

CLUSTER_STARTED=""
SERVER_PID=""
cleanup() {
  if [[ -n "$SERVER_PID" ]]; then kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; fi
  if [[ -n "$CLUSTER_STARTED" ]]; then bash tests/cluster/cluster.sh stop "$CLUSTER_STARTED" || true; fi
}
trap cleanup EXIT
if [[ -z "${MESHCA_E2E_KUBECONFIG:-}" ]]; then
  CLUSTER_STARTED="$OUT/cluster"
  bash tests/cluster/cluster.sh start k8s-v1.37 "$CLUSTER_STARTED" >&2
  # shellcheck disable=SC1091
  source "$CLUSTER_STARTED/env.sh"
fi
KC="$MESHCA_E2E_KUBECONFIG"
k() { "$MESHCA_E2E_KUBECTL" --kubeconfig "$KC" "$@"; }
[[ -n "${SKIP_BUILD:-}" ]] || cargo build --release -q -p meshca-cli
MESHCA="$PWD/target/release/meshca"
CLIENT="$(bash tests/istio/build.sh)"

# The server's identity: meshca/meshca-signer with deploy/components/istio-ca's RBAC.
k create namespace meshca --dry-run=client -o yaml | k apply -f - >/dev/null
k -n meshca create serviceaccount meshca-signer --dry-run=client -o yaml | k apply -f - >/dev/null
k apply -f deploy/components/istio-ca/clusterrole.yaml >/dev/null
SERVER_TOKEN="$(k -n meshca create token meshca-signer --duration=2h)"
k config view --raw --minify -o json | python3 -c '
import json, sys
v = json.load(sys.stdin)
print(json.dumps({"apiVersion": "v1", "kind": "Config",
  "clusters": [{"name": "b", "cluster": v["clusters"][0]["cluster"]}],
  "users": [{"name": "s", "user": {"token": sys.argv[1]}}],
  "contexts": [{"name": "b", "context": {"cluster": "b", "user": "s"}}], "current-context": "b"}))
' "$SERVER_TOKEN" >"$OUT/server.kubeconfig"

# COUNT tokens of ACCOUNTS ServiceAccounts (not timed).
k create namespace "$NS" --dry-run=client -o yaml | k apply -f - >/dev/null
for a in $(seq 0 $((ACCOUNTS - 1))); do
  k -n "$NS" create serviceaccount "sa-$a" --dry-run=client -o yaml | k apply -f - >/dev/null
done
seq 0 $((COUNT - 1)) | xargs -P 8 -I{} bash -c '
  a=$(({} % '"$ACCOUNTS"'))
  t="$("$0" --kubeconfig "$1" -n "$2" create token "sa-$a" --audience istio-ca --duration=1h)"
  printf "%s\nspiffe://cluster.local/ns/%s/sa/sa-%s\n" "$t" "$2" "$a" >"$3/tokens/{}.token"
' "$MESHCA_E2E_KUBECTL" "$KC" "$NS" "$OUT"
made="$(find "$OUT/tokens" -name '*.token' -size +0 | wc -l)"
[[ "$made" -eq "$COUNT" ]] || { echo "only $made of $COUNT tokens were made" >&2; exit 1; }

MESHCA_HOME="$OUT/home" "$MESHCA" init --ca bench-istio >/dev/null
MESHCA_HOME="$OUT/home" "$MESHCA" --kubeconfig "$OUT/server.kubeconfig" --log-level warn \
  istio-ca serve --ca bench-istio --listen 127.0.0.1:0 2>"$OUT/server.log" &
SERVER_PID=$!
for _ in $(seq 1 100); do grep -q "listening on" "$OUT/server.log" && break; sleep 0.1; done
ADDR="$(sed -n 's/.*istio-ca listening on //p' "$OUT/server.log" | head -1)"
[[ -n "$ADDR" ]] || { cat "$OUT/server.log" >&2; exit 1; }
"$CLIENT" -addr "$ADDR" -bench "$COUNT" -concurrency "$CONCURRENCY" -jitter "$JITTER" \
  -token-dir "$OUT/tokens" -ttl 86400 | sed 's/^{/{"path":"istio-ca (TokenReview)",/' | tee "$OUT/istio-ca.json"
kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true; SERVER_PID=""
k delete namespace "$NS" --wait=false >/dev/null

if [[ -z "${SKIP_RA:-}" ]]; then
  COUNT="$COUNT" PAIRS=1 SKIP_BUILD=1 OUT="$OUT/ra" bash bench/kube-signer.sh csr | tee "$OUT/ra.txt"
fi
