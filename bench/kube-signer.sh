#!/usr/bin/env bash
# meshca's in-cluster signers against a real API server, each next to its "limit": what the same
# API server sustains for the same writes done by a trivial client, measured in the same run.
#
#   bench/kube-signer.sh [all|csr|pcr|memory]
#
# Uses the cluster of $MESHCA_E2E_KUBECONFIG/$MESHCA_E2E_KUBECTL (tests/cluster/cluster.sh's
# env.sh); without them it starts one (k8s-v1.37) in a temporary directory and stops it at the
# end. Installs deploy/ with the auto-approve and pod-certificates components (namespace
# `meshca`), creates CA `bench` (`--auto-approve`, managed namespace meshca-bench-secrets,
# in-cluster default rules: a ServiceAccount gets its own SPIFFE ID and <sa>.<ns>.svc) and runs
# `meshca signer run` (release build) under a TokenRequest token of deploy/'s ServiceAccount
# meshca/meshca-signer, so with exactly deploy/'s RBAC. The client is examples/kube_bench.rs.
#
#   COUNT=1000 PARALLEL=16 PAIRS=2 SKIP_BUILD=1 QPS=0 MEM_CSRS=10000 MEM_SECRETS=5000
#
# PARALLEL is both the client's creates in flight and meshca's --concurrency (and the trivial
# signer's writes in flight). QPS is meshca's --qps (0 = its client-side limiter off; the
# trivial client has none). Prints Markdown tables; raw JSON lines go to $OUT/results.jsonl.
set -euo pipefail

cd "$(dirname "$0")/.."
WHAT="${1:-all}"
COUNT="${COUNT:-1000}"
PARALLEL="${PARALLEL:-16}"
PAIRS="${PAIRS:-2}"
QPS="${QPS:-0}"
MEM_CSRS="${MEM_CSRS:-10000}"
MEM_SECRETS="${MEM_SECRETS:-5000}"
OUT="${OUT:-$(mktemp -d /tmp/meshca-kube-bench.XXXXXX)}"
mkdir -p "$OUT"
SECRET_NS=meshca-bench-secrets

CLUSTER_STARTED=""
SIGNER_PID=""
cleanup() {
  if [[ -n "$SIGNER_PID" ]]; then kill "$SIGNER_PID" 2>/dev/null || true; wait "$SIGNER_PID" 2>/dev/null || true; fi
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
KUBECTL="$MESHCA_E2E_KUBECTL"
k() { "$KUBECTL" --kubeconfig "$KC" "$@"; }

if [[ -z "${SKIP_BUILD:-}" ]]; then
  cargo build --release -q -p meshca-cli
  cargo build --release -q --features kube,aws-pca --example kube_bench
fi
MESHCA="$PWD/target/release/meshca"
BENCH="$PWD/target/release/examples/kube_bench"
[[ -x "$MESHCA" && -x "$BENCH" ]] || { echo "release binaries missing; run without SKIP_BUILD" >&2; exit 1; }

# --- install: deploy/ + components, the CA, the managed namespace's Role -------------------
overlay="$(mktemp -d "$PWD/target/kube-bench-overlay.XXXXXX")"
cat >"$overlay/kustomization.yaml" <<EOF
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources: [../../deploy]
components: [../../deploy/components/auto-approve, ../../deploy/components/pod-certificates]
EOF
k apply -k "$overlay" >/dev/null
rm -rf "$overlay"
k create namespace "$SECRET_NS" --dry-run=client -o yaml | k apply -f - >/dev/null
sed "s/^  namespace: demo$/  namespace: $SECRET_NS/" deploy/examples/demo-rbac.yaml | k apply -f - >/dev/null
if ! "$MESHCA" --kubeconfig "$KC" --store kube:meshca ca list 2>/dev/null | grep -qw bench; then
  "$MESHCA" --kubeconfig "$KC" --store kube:meshca init --ca bench --auto-approve \
    --managed-namespace "$SECRET_NS" >/dev/null
fi
SA_KC="$OUT/signer.kubeconfig"
token="$(k create token meshca-signer -n meshca --duration=2h)"
k config view --raw --minify -o json | jq --arg t "$token" \
  '.users = [{"name": "meshca-signer", "user": {"token": $t}}] | .contexts[0].context.user = "meshca-signer"' >"$SA_KC"
chmod 600 "$SA_KC"

start_signer() { # $1 log name
  local port
  port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
  "$MESHCA" --kubeconfig "$SA_KC" --store kube:meshca signer run --ca bench --auto-approve \
    --pod-certificates --managed-namespace "$SECRET_NS" --concurrency "$PARALLEL" --qps "$QPS" \
    --lease-namespace meshca --identity "bench-$1" --metrics-addr "127.0.0.1:$port" \
    --log-level warn 2>"$OUT/signer-$1.log" >/dev/null &
  SIGNER_PID=$!
  local i
  for i in $(seq 1 150); do
    [[ "$(k get lease meshca-signer -n meshca -o jsonpath='{.spec.holderIdentity}' 2>/dev/null)" == "bench-$1" ]] && return 0
    kill -0 "$SIGNER_PID" 2>/dev/null || { cat "$OUT/signer-$1.log" >&2; echo "signer exited" >&2; exit 1; }
    sleep 0.2
  done
  echo "signer bench-$1 did not take the Lease in 30 s" >&2
  exit 1
}
stop_signer() {
  kill "$SIGNER_PID" 2>/dev/null || true
  wait "$SIGNER_PID" 2>/dev/null || true
  SIGNER_PID=""
}
rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$SIGNER_PID/status"; }
load() { cut -d' ' -f1 /proc/loadavg; }
# CPU seconds (user + system) used so far by the process in pid file / pid $1.
cpu_s() {
  local pid="$1"
  [[ -f "$pid" ]] && pid="$(cat "$pid")"
  [[ -n "$pid" && -r "/proc/$pid/stat" ]] || { echo 0; return; }
  awk -v t="$(getconf CLK_TCK)" '{print ($14 + $15) / t}' "/proc/$pid/stat"
}
# API server + etcd CPU seconds, meshca CPU seconds.
cpu_now() {
  local d="${MESHCA_E2E_CLUSTER_DIR:-}"
  echo "$(awk "BEGIN{print $(cpu_s "$d/kube-apiserver.pid") + $(cpu_s "$d/etcd.pid")}") $(cpu_s "${SIGNER_PID:-}")"
}

# One timed run: $1 mode, then extra flags. Appends {..., load_before, load_after} to results.
run() {
  local mode="$1" l0 line
  shift
  l0="$(load)"
  local c0
  c0="$(cpu_now)"
  line="$(timeout 600 "$BENCH" --kubeconfig "$KC" --signer-kubeconfig "$SA_KC" --mode "$mode" \
    --count "$COUNT" --parallel "$PARALLEL" --timeout 300s "$@")" || {
    echo "kube_bench --mode $mode $* failed: $line" >&2
    grep -i 'denied\|error' "$OUT"/signer-*.log | tail -5 >&2 || true
    exit 1
  }
  local c1
  c1="$(cpu_now)"
  line="$(jq -c --arg a "$l0" --arg b "$(load)" --arg c0 "$c0" --arg c1 "$c1" \
    '. + {load_before: $a, load_after: $b,
          apiserver_etcd_cpu_s: (((($c1 | split(" ")[0] | tonumber) - ($c0 | split(" ")[0] | tonumber)) * 100 | round) / 100),
          meshca_cpu_s: (((($c1 | split(" ")[1] | tonumber) - ($c0 | split(" ")[1] | tonumber)) * 100 | round) / 100)}' <<<"$line")"
  echo "$line" >>"$OUT/results.jsonl"
  echo "$line" >&2
  "$BENCH" --kubeconfig "$KC" --mode cleanup >/dev/null
  LAST="$line"
}

table_row() { # $1 label, $2 json, $3 limit rate
  jq -r --arg l "$1" --argjson lim "$3" \
    '"| \($l) | \(if .rate_target > 0 then "\(.rate_target) /s paced" else "closed, \(.parallel) in flight" end) | \(.per_second) | \((100 * .per_second / $lim) | round)% | \(.p50_ms) | \(.p99_ms) | \(.max_ms) | \(.apiserver_etcd_cpu_s) | \(.meshca_cpu_s) | \(.load_before) → \(.load_after) |"' <<<"$2"
}

compare() { # $1 csr|pcr
  local kind="$1" i lim=0 rows=()
  start_signer "$kind"
  for i in $(seq 1 "$PAIRS"); do
    run "$kind-limit"
    local l="$LAST"
    run "$kind-meshca"
    local m="$LAST"
    local lr
    lr="$(jq .per_second <<<"$l")"
    rows+=("$(table_row "trivial client (limit), pair $i" "$l" "$lr")")
    rows+=("$(table_row "**meshca**, pair $i" "$m" "$lr")")
    lim="$lr"
  done
  # Paced at half the last limit: meshca, then the trivial client at the same rate.
  local half
  half="$(jq -n --argjson r "$lim" '($r / 2 * 10 | floor) / 10')"
  run "$kind-meshca" --rate "$half"
  rows+=("$(table_row "**meshca** at half the limit" "$LAST" "$lim")")
  run "$kind-limit" --rate "$half"
  rows+=("$(table_row "trivial client at the same rate" "$LAST" "$lim")")
  stop_signer
  echo
  echo "### $kind: $COUNT requests, $(nproc) cores, $(date -u +%FT%TZ)"
  echo
  echo "| Run | Load | per second | of limit | p50 ms | p99 ms | max ms | API server + etcd CPU s | meshca CPU s | load avg (1 min) |"
  echo "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"
  printf '%s\n' "${rows[@]}"
}

memory() {
  local half_c=$((MEM_CSRS / 2)) half_s=$((MEM_SECRETS / 2)) r0 r1 r2 r3
  "$BENCH" --kubeconfig "$KC" --mode cleanup >/dev/null
  start_signer mem
  sleep 5
  r0="$(rss_kib)"
  "$BENCH" --kubeconfig "$KC" --mode fill-csrs --count "$half_c" --parallel 32 >&2
  timeout 900 "$BENCH" --kubeconfig "$KC" --mode fill-secrets --count "$half_s" --parallel 32 --timeout 600s >&2
  sleep 10
  r1="$(rss_kib)"
  "$BENCH" --kubeconfig "$KC" --mode fill-csrs --count "$half_c" --parallel 32 >&2
  timeout 900 "$BENCH" --kubeconfig "$KC" --mode fill-secrets --count "$half_s" --parallel 32 --timeout 600s >&2
  sleep 10
  r2="$(rss_kib)"
  stop_signer
  # A fresh process that lists everything at start.
  start_signer mem2
  sleep 20
  r3="$(rss_kib)"
  stop_signer
  "$BENCH" --kubeconfig "$KC" --mode cleanup >/dev/null
  echo
  echo "### memory: RSS of meshca signer run (load avg $(load))"
  echo
  echo "| Objects in the cluster (CSRs / managed Secrets) | RSS MiB |"
  echo "|---|---:|"
  echo "| 0 / 0 | $(awk "BEGIN{printf \"%.1f\", $r0/1024}") |"
  echo "| $half_c / $half_s | $(awk "BEGIN{printf \"%.1f\", $r1/1024}") |"
  echo "| $MEM_CSRS / $MEM_SECRETS | $(awk "BEGIN{printf \"%.1f\", $r2/1024}") |"
  echo "| $MEM_CSRS / $MEM_SECRETS, fresh process (initial list) | $(awk "BEGIN{printf \"%.1f\", $r3/1024}") |"
  echo
  echo "Growth: $(awk "BEGIN{printf \"%.2f\", ($r2-$r0)/($MEM_CSRS+$MEM_SECRETS)}") KiB per object (0 to full, running process)"
}

case "$WHAT" in
  csr) compare csr ;;
  pcr) compare pcr ;;
  memory) memory ;;
  all) compare csr; compare pcr; memory ;;
  *) echo "usage: $0 [all|csr|pcr|memory]" >&2; exit 1 ;;
esac
echo
echo "raw results: $OUT/results.jsonl"
