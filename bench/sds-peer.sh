#!/usr/bin/env bash
# Same-run comparison of meshca's SDS server with a go-control-plane SDS server (bench/go-sds):
# builds the peer (bench/go-sds/build.sh) and meshca-sds-load (release), then drives meshca
# and the peer one after the other with the same load, scenario by scenario, and prints a
# table with the ratio meshca / peer (below 1: meshca uses less or is faster).
#
#   bench/sds-peer.sh                      # defaults below
#   STREAMS=1000 ROUNDS=2 TLS_STREAMS= CA=0 bench/sds-peer.sh   # a quick one
#   STREAMS=1000 ROUNDS=1 CA=0 TLS_STREAMS= CHURN=10000 EXTRA="--churn-batches 10" \
#     bench/sds-peer.sh                    # the issue's 100,000 churn cycles
#   STREAMS=100 ROUNDS=80 CA=0 TLS_STREAMS= EXTRA="--stalled 1000" bench/sds-peer.sh
#
# Scenarios (each first meshca, then the peer; Envoy shape: 2 streams per connection):
#   rotation   --streams $STREAMS --rounds $ROUNDS on a Unix socket (plus --churn $CHURN);
#   CA change  --streams $STREAMS --rounds 2 --ca-rotation on a Unix socket (CA=0 skips);
#   mutual TLS --streams $TLS_STREAMS --rounds $ROUNDS on 127.0.0.1 (empty skips).
# Run it niced on a shared machine: nice -n 10 bench/sds-peer.sh
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
STREAMS="${STREAMS:-1000,10000}"
ROUNDS="${ROUNDS:-3}"
CHURN="${CHURN:-0}"
CA="${CA:-1}"
TLS_STREAMS="${TLS_STREAMS-10000}"
EXTRA="${EXTRA:-}"

peer="$(bash "$HERE/go-sds/build.sh")"
(cd "$ROOT" && cargo build --release -q -p meshca-sds --features load-generator --bin meshca-sds-load)
load="${CARGO_TARGET_DIR:-$ROOT/target}/release/meshca-sds-load"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT

# run SCENARIO ARGS...: meshca, then the peer, each appending to $out/SCENARIO.tsv.
run() {
  local scen="$1"
  shift
  echo "== $scen: meshca-sds-load $* ==" >&2
  # shellcheck disable=SC2086
  "$load" "$@" $EXTRA --summary "$out/$scen.tsv"
  # shellcheck disable=SC2086
  "$load" "$@" $EXTRA --summary "$out/$scen.tsv" --peer "go-control-plane=$peer"
}

churn=()
[[ "$CHURN" != 0 ]] && churn=(--churn "$CHURN")
run rotation --streams "$STREAMS" --per-conn 2 --rounds "$ROUNDS" --transport unix "${churn[@]}"
[[ "$CA" != 0 ]] && run ca --streams "$STREAMS" --per-conn 2 --rounds 2 --cold 20 --ca-rotation --transport unix
[[ -n "$TLS_STREAMS" ]] && run tls --streams "$TLS_STREAMS" --per-conn 2 --rounds "$ROUNDS" --cold 20 --cold-conn 50 --transport tls

echo
echo "# Same run: meshca vs go-control-plane $(cd "$HERE/go-sds" && go list -m -f '{{.Version}}' github.com/envoyproxy/go-control-plane) (ratio = meshca / peer)"
python3 - "$out" <<'PY'
import collections, glob, os, statistics, sys
out = sys.argv[1]
# data[(scenario, transport, n)][server][measure] = value
data = collections.defaultdict(lambda: collections.defaultdict(dict))
for path in sorted(glob.glob(os.path.join(out, "*.tsv"))):
    scen = os.path.basename(path)[:-4]
    for line in open(path):
        server, transport, n, measure, value = line.rstrip("\n").split("\t")
        data[(scen, transport, int(n))][server][measure] = float(value)

def rounds(m, key, stat):
    vals = [v for k, v in m.items() if k.startswith(key) and k.endswith("_" + stat)
            and k[len(key):-len(stat) - 1].isdigit()]
    return vals

def fmt_range(vals, unit):
    if not vals:
        return "-"
    lo, hi = min(vals), max(vals)
    a, b = f"{lo:.0f}", f"{hi:.0f}"
    return f"{a}{unit}" if a == b else f"{a}–{b}{unit}"

def ratio(a, b):
    if not a or not b:
        return "-"
    return f"{statistics.mean(a) / statistics.mean(b):.2f}"

rows = []
def row(label, mv, pv, unit, digits=1):
    if not mv and not pv:
        return
    def f(v):
        if not v:
            return "-"
        if len(v) > 1:
            return fmt_range(v, unit)
        return f"{v[0]:.{digits}f}{unit}"
    rows.append(f"| {label} | {f(mv)} | {f(pv)} | {ratio(mv, pv)} |")

print("| measure | meshca | go-control-plane | ratio |")
print("|---|---|---|---|")
for (scen, transport, n), by in sorted(data.items(), key=lambda kv: (["rotation", "ca", "tls"].index(kv[0][0]) if kv[0][0] in ("rotation", "ca", "tls") else 9, kv[0][2])):
    m, p = by.get("meshca", {}), by.get("go-control-plane", {})
    def one(k):
        return ([m[k]] if k in m else []), ([p[k]] if k in p else [])
    tag = f"{transport}, N = {n:,}"
    if scen in ("rotation", "tls"):
        row(f"{tag}: RSS idle (after start)", *one("rss_start_mib"), " MiB")
        row(f"{tag}: RSS with N streams", *one("rss_n_mib"), " MiB")
        row(f"{tag}: RSS per connection", *one("rss_per_conn_kib"), " KiB")
        row(f"{tag}: RSS per stream", *one("rss_per_stream_kib"), " KiB")
        row(f"{tag}: RSS with --stalled clients too", *one("rss_stalled_mib"), " MiB")
        row(f"{tag}: RSS after rotations", *one("rss_after_mib"), " MiB")
        row(f"{tag}: first secret while opening N, p50", *one("first_p50_ms"), " ms")
        row(f"{tag}: first secret while opening N, p99", *one("first_p99_ms"), " ms")
        row(f"{tag}: first secret on a fresh connection, p50", *one("cold_conn_p50_ms"), " ms", 2)
        row(f"{tag}: time to open N streams", *one("open_ms"), " ms", 0)
        for stat, label in (("p50_ms", "p50"), ("p99_ms", "p99"), ("all_ms", "all")):
            row(f"{tag}: rotation fan-out {label} (rounds)", rounds(m, "rot", stat), rounds(p, "rot", stat), " ms")
        row(f"{tag}: CPU per rotation (rounds)", rounds(m, "rot", "cpu_ms"), rounds(p, "rot", "cpu_ms"), " ms")
        row(f"{tag}: churn RSS growth, all batches", *one("churn_growth_pct"), " %")
        row(f"{tag}: churn RSS growth after the 1st batch", *one("churn_warm_growth_pct"), " %")
    else:
        for stat, label in (("p50_ms", "p50"), ("p99_ms", "p99"), ("all_ms", "all")):
            row(f"{tag}: CA-change fan-out {label} (rounds)", rounds(m, "ca", stat), rounds(p, "ca", stat), " ms")
        row(f"{tag}: CPU per CA change (rounds)", rounds(m, "ca", "cpu_ms"), rounds(p, "ca", "cpu_ms"), " ms")
print("\n".join(rows))
PY
