#!/usr/bin/env bash
# Compares meshca's certificate issuance with openssl and Python `cryptography`, in one run on
# this machine, and prints a Markdown table.
#
#   bench/compare.sh                # builds release binaries first
#   SKIP_BUILD=1 bench/compare.sh   # reuse target/release
#   SECONDS_PER=3 RUNS=50 bench/compare.sh
#
# Measured:
#  1. `openssl speed -seconds $SECONDS_PER ecdsap256`: raw ECDSA P-256 signs/s (one core). openssl
#     divides by CPU (user) time, so the in-process rates below are per CPU second as well
#     (thread CPU time); the wall-clock rates are shown next to them.
#  2. Python `cryptography` building the same workload certificate (keygen + sign + PEM), certs/s
#     (bench/py_issue.py).
#  3. meshca in-process, one thread (examples/issue_rate.rs): issue_workload (keygen + policy +
#     sign + DER + PEM), sign-only from a checked CSR, and a CSR end to end.
#  4. Whole process, per certificate: `meshca issue` writing the three App Mesh-style files
#     (store lock, policy, ledger append, atomic fsync'd writes) vs. the openssl commands doing
#     the same job: genpkey + req + x509 -req with the SAN/EKU/KU/basicConstraints extensions.
#     With hyperfine when installed (mean of $RUNS runs), else a timed loop of $RUNS runs.
#  5. Start-up: `meshca ca list` (a process that loads the store and prints, no crypto) as the
#     floor a short-lived meshca process costs; `meshca issue` CPU is given as a multiple of it.
set -euo pipefail

cd "$(dirname "$0")/.."
SECONDS_PER="${SECONDS_PER:-3}"
RUNS="${RUNS:-50}"
PY="${PYTHON:-python3}"

if [[ -z "${SKIP_BUILD:-}" ]]; then
    cargo build --release -q -p meshca-cli
    cargo build --release -q --example issue_rate
fi
MESHCA="$PWD/target/release/meshca"
RATE="$PWD/target/release/examples/issue_rate"
[[ -x "$MESHCA" && -x "$RATE" ]] || { echo "release binaries missing; run without SKIP_BUILD" >&2; exit 1; }

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

log() { echo "== $*" >&2; }

# --- 1. openssl speed ------------------------------------------------------------------------
log "openssl speed -seconds $SECONDS_PER ecdsap256"
OPENSSL_VERSION="$(openssl version)"
SPEED_OUT="$(openssl speed -seconds "$SECONDS_PER" ecdsap256 2>/dev/null)"
# "256 bits ecdsa (nistp256)   0.0000s   0.0001s  40000.0  13000.0": sign/s, verify/s.
OPENSSL_SIGN="$(awk '/nistp256\)/ && /bits ecdsa/ {print $(NF-1)}' <<<"$SPEED_OUT" | tail -1)"
[[ -n "$OPENSSL_SIGN" ]] || { echo "could not parse openssl speed output:"; echo "$SPEED_OUT"; exit 1; } >&2

# --- 2. Python cryptography ------------------------------------------------------------------
log "Python cryptography (bench/py_issue.py $SECONDS_PER)"
if PY_OUT="$("$PY" bench/py_issue.py "$SECONDS_PER" 2>&1)"; then
    PY_RATE="$(awk '{print $2}' <<<"$PY_OUT")"
    PY_VERSION="$(awk '{print $5}' <<<"$PY_OUT")"
    PY_WALL="$(awk '{print $6}' <<<"$PY_OUT")"
else
    echo "Python cryptography unavailable: $PY_OUT" >&2
    PY_RATE=""
    PY_WALL=""
    PY_VERSION="n/a"
fi

# --- 3. meshca in-process --------------------------------------------------------------------
log "meshca in-process (examples/issue_rate $SECONDS_PER)"
RATE_OUT="$("$RATE" "$SECONDS_PER")"
rate_of() { awk -v n="$1" '$1 == n {print $2}' <<<"$RATE_OUT"; }
wall_of() { awk -v n="$1" '$1 == n {print $6}' <<<"$RATE_OUT"; }
CLOCK="$(awk 'NR == 1 {print $5}' <<<"$RATE_OUT")"
MESHCA_ISSUE="$(rate_of issue_workload)"
MESHCA_SIGN="$(rate_of sign_csr)"
MESHCA_CSR="$(rate_of issue_csr)"

# --- 4. whole process ------------------------------------------------------------------------
log "whole process: meshca issue vs openssl genpkey + req + x509 ($RUNS runs each)"
export MESHCA_HOME="$WORK/home"
"$MESHCA" init --ca ca1 >/dev/null
CA_CRT="$MESHCA_HOME/cas/ca1/ca.crt"
CA_KEY="$MESHCA_HOME/cas/ca1/ca.key"
mkdir -p "$WORK/meshca-out" "$WORK/openssl-out"
cat >"$WORK/ext.cnf" <<'EOF'
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth, clientAuth
subjectAltName = URI:spiffe://cluster.local/ns/bench/sa/workload, DNS:workload.bench.svc.cluster.local
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
EOF
# openssl 3.0 x509 -req picks a random serial when no serial file is given.
cat >"$WORK/openssl-issue.sh" <<EOF
#!/bin/sh
set -e
cd "$WORK/openssl-out"
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out workload_key.pem 2>/dev/null
openssl req -new -key workload_key.pem -subj "/O=cluster.local/CN=workload.bench.svc.cluster.local" -out workload.csr
openssl x509 -req -in workload.csr -CA "$CA_CRT" -CAkey "$CA_KEY" \\
    -days 1 -sha256 -extfile "$WORK/ext.cnf" -out workload_cert.pem 2>/dev/null
cat workload_cert.pem > workload_cert_chain.pem
EOF
chmod +x "$WORK/openssl-issue.sh"
MESHCA_CMD="$MESHCA issue --ca ca1 --namespace bench --service-account workload --dns workload.bench.svc.cluster.local --out-dir $WORK/meshca-out --name workload"
OPENSSL_CMD="$WORK/openssl-issue.sh"
# Both must work (and produce a verifiable certificate) before they are timed.
$MESHCA_CMD >/dev/null
$OPENSSL_CMD
openssl verify -CAfile "$CA_CRT" "$WORK/meshca-out/workload_cert.pem" >/dev/null
openssl verify -CAfile "$CA_CRT" "$WORK/openssl-out/workload_cert.pem" >/dev/null

if command -v hyperfine >/dev/null; then
    TIMER="hyperfine $(hyperfine --version | awk '{print $2}'), mean of $RUNS runs"
    hyperfine -N --warmup 3 --runs "$RUNS" --export-json "$WORK/m.json" "$MESHCA_CMD" >&2
    hyperfine -N --warmup 3 --runs "$RUNS" --export-json "$WORK/o.json" "$OPENSSL_CMD" >&2
    mean_ms() { "$PY" -c 'import json,sys; r=json.load(open(sys.argv[1]))["results"][0]; print("%.2f" % (r[sys.argv[2]]*1000))' "$1" "$2"; }
    hyperfine -N --warmup 3 --runs "$RUNS" --export-json "$WORK/l.json" "$MESHCA ca list" >&2
    MESHCA_MS="$(mean_ms "$WORK/m.json" mean)"
    LIST_MS="$(mean_ms "$WORK/l.json" mean)"
    LIST_CPU_MS="$(awk -v u="$(mean_ms "$WORK/l.json" user)" -v s="$(mean_ms "$WORK/l.json" system)" 'BEGIN {printf "%.2f", u + s}')"
    OPENSSL_MS="$(mean_ms "$WORK/o.json" mean)"
    MESHCA_CPU_MS="$(awk -v u="$(mean_ms "$WORK/m.json" user)" -v s="$(mean_ms "$WORK/m.json" system)" 'BEGIN {printf "%.2f", u + s}')"
    OPENSSL_CPU_MS="$(awk -v u="$(mean_ms "$WORK/o.json" user)" -v s="$(mean_ms "$WORK/o.json" system)" 'BEGIN {printf "%.2f", u + s}')"
else
    TIMER="timed loop of $RUNS runs"
    loop_ms() {
        local start end
        start=$(date +%s%N)
        for _ in $(seq "$RUNS"); do "$@" >/dev/null; done
        end=$(date +%s%N)
        awk -v a="$start" -v b="$end" -v n="$RUNS" 'BEGIN {printf "%.2f", (b - a) / n / 1e6}'
    }
    MESHCA_MS="$(loop_ms $MESHCA_CMD)"
    OPENSSL_MS="$(loop_ms $OPENSSL_CMD)"
    LIST_MS="$(loop_ms "$MESHCA" ca list)"
    MESHCA_CPU_MS="n/a"
    OPENSSL_CPU_MS="n/a"
    LIST_CPU_MS="n/a"
fi
LEDGER_LINES="$(wc -l <"$MESHCA_HOME/ledger.jsonl")"

# --- table -----------------------------------------------------------------------------------
pct() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.0f%%", 100 * a / b}'; }
ratio() { if [[ -n "$2" ]]; then awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2fx", a / b}'; else echo "n/a"; fi; }
fmt() { if [[ -n "$1" ]]; then awk -v a="$1" 'BEGIN {printf "%.0f", a}'; else echo "n/a"; fi; }

CPU="$(lscpu 2>/dev/null | awk -F: '/Model name/ {gsub(/^ +/, "", $2); print $2; exit}')"
echo
echo "Machine: ${CPU:-unknown CPU}, $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg); $OPENSSL_VERSION; Python cryptography $PY_VERSION; $(rustc --version | awk '{print $1, $2}')."
echo "Rates: one thread, ${SECONDS_PER}s of CPU time each, per CPU second ($CLOCK clock; openssl speed uses CPU user time); wall-clock rates alongside."
echo "Whole process: $TIMER; wall time and user+system CPU time per certificate."
echo
echo "| Measurement (ECDSA P-256) | per CPU second | per wall second | vs. openssl sign | vs. Python |"
echo "|---|---:|---:|---:|---:|"
echo "| openssl speed: raw signs | $(fmt "$OPENSSL_SIGN") | | 100% | |"
echo "| Python cryptography: keygen + sign + PEM | $(fmt "$PY_RATE") | $(fmt "$PY_WALL") | $( [[ -n "$PY_RATE" ]] && pct "$PY_RATE" "$OPENSSL_SIGN" || echo n/a) | 1.0x |"
echo "| **meshca in-process: keygen + sign + DER/PEM** | **$(fmt "$MESHCA_ISSUE")** | $(fmt "$(wall_of issue_workload)") | **$(pct "$MESHCA_ISSUE" "$OPENSSL_SIGN")** | **$(ratio "$MESHCA_ISSUE" "$PY_RATE")** |"
echo "| meshca in-process: sign-only from a checked CSR | $(fmt "$MESHCA_SIGN") | $(fmt "$(wall_of sign_csr)") | $(pct "$MESHCA_SIGN" "$OPENSSL_SIGN") | $(ratio "$MESHCA_SIGN" "$PY_RATE") |"
echo "| meshca in-process: CSR end to end (parse + PoP verify + policy + sign) | $(fmt "$MESHCA_CSR") | $(fmt "$(wall_of issue_csr)") | $(pct "$MESHCA_CSR" "$OPENSSL_SIGN") | $(ratio "$MESHCA_CSR" "$PY_RATE") |"
echo
echo "| Whole process, one certificate to files | wall ms/cert | CPU ms/cert |"
echo "|---|---:|---:|"
echo "| \`meshca issue\` (store lock, policy, ledger, fsync'd atomic writes) | $MESHCA_MS | $MESHCA_CPU_MS |"
echo "| openssl genpkey + req + x509 -req (3 processes) | $OPENSSL_MS | $OPENSSL_CPU_MS |"
echo "| \`meshca ca list\` (start-up floor: load the store, print) | $LIST_MS | $LIST_CPU_MS |"
echo
WALL_RATIO="$(awk -v a="$MESHCA_MS" -v b="$OPENSSL_MS" 'BEGIN {printf "%.2f", a / b}')"
if [[ "$MESHCA_CPU_MS" != "n/a" ]]; then
    CPU_RATIO="$(awk -v a="$MESHCA_CPU_MS" -v b="$LIST_CPU_MS" 'BEGIN {printf "%.1f", a / b}')"
else
    CPU_RATIO="n/a"
fi
echo "| Ratio (same run) | measured | target |"
echo "|---|---:|---:|"
echo "| \`meshca issue\` CPU / \`meshca ca list\` CPU | ${CPU_RATIO}x | <= 3x |"
echo "| \`meshca issue\` wall / openssl pipeline wall | $WALL_RATIO | <= 0.5 |"
echo "| in-process issue rate / \`openssl speed ecdsap256\` sign rate | $(pct "$MESHCA_ISSUE" "$OPENSSL_SIGN") | >= 50% |"
echo
echo "($LEDGER_LINES ledger lines written.)"
TARGET1="$(awk -v a="$MESHCA_ISSUE" -v b="$OPENSSL_SIGN" 'BEGIN {print (a >= 0.5 * b) ? "met" : "MISSED"}')"
TARGET2="$( [[ -n "$PY_RATE" ]] && awk -v a="$MESHCA_ISSUE" -v b="$PY_RATE" 'BEGIN {print (a >= 3 * b) ? "met" : "MISSED"}' || echo "not measured")"
TARGET3="$(awk -v r="$WALL_RATIO" 'BEGIN {print (r <= 0.5) ? "met" : "MISSED"}')"
TARGET4="$( [[ "$CPU_RATIO" != "n/a" ]] && awk -v r="$CPU_RATIO" 'BEGIN {print (r <= 3) ? "met" : "MISSED"}' || echo "not measured")"
echo "Targets: in-process >= 50% of openssl sign rate: $TARGET1; >= 3x Python cryptography: $TARGET2; issue wall <= 0.5x openssl pipeline: $TARGET3; issue CPU <= 3x ca list: $TARGET4."
