#!/usr/bin/env bash
# A real Kubernetes control plane for meshca's end-to-end tests: etcd and kube-apiserver, built
# from their Go modules (the go.mod/go.sum beside this script pin them), run on 127.0.0.1 with
# free ports and a PKI generated here. No kubelet, no controller-manager, no scheduler: tests
# create and delete what they need themselves.
#
#   cluster.sh build VERSION            build (or find in the cache) kube-apiserver, kubectl, etcd
#   cluster.sh start VERSION DIR        start etcd + kube-apiserver; writes DIR/env.sh
#   cluster.sh restart-apiserver DIR    kill -9 kube-apiserver and start it again on the same etcd
#   cluster.sh stop DIR                 stop both and wait until they are gone
#
# VERSION is a directory name k8s-vX.Y beside this script (k8s-v1.37, k8s-v1.34). Binaries are
# cached under $MESHCA_CLUSTER_CACHE (default ~/.cache/meshca/cluster) by exact module version,
# so a second run builds nothing. DIR/env.sh exports MESHCA_E2E_KUBECONFIG (an admin in
# system:masters), MESHCA_E2E_NODE_KUBECONFIG (system:node:meshca-e2e-node, group system:nodes),
# MESHCA_E2E_KUBECTL, MESHCA_E2E_CLUSTER_CTL/DIR (for the restart test) and
# MESHCA_E2E_K8S_VERSION; DIR/audit.log is the API server's audit log of CSR and
# PodCertificateRequest status writes. A watchdog stops the cluster when the process that started it exits,
# even if that process was killed and could not run its trap.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${MESHCA_CLUSTER_CACHE:-$HOME/.cache/meshca/cluster}"
NODE_NAME=meshca-e2e-node

die() { echo "cluster.sh: $*" >&2; exit 1; }

# The version of module $2 that go.mod in directory $1 requires.
module_version() {
  (cd "$1" && go list -m -f '{{.Version}}' "$2")
}

k8s_version() {
  module_version "$HERE/$1" k8s.io/kubernetes
}

etcd_version() {
  module_version "$HERE/etcd" go.etcd.io/etcd/server/v3
}

# Paths of the binaries for VERSION (a k8s-vX.Y directory).
bin_dir() { echo "$CACHE/k8s-$(k8s_version "$1")"; }
etcd_bin() { echo "$CACHE/etcd-$(etcd_version)/etcd"; }

build() {
  local v="$1" dir out
  [[ -f "$HERE/$v/go.mod" ]] || die "no such release directory: $HERE/$v"
  command -v go >/dev/null || die "go is not installed (the harness builds its peers from Go modules)"
  dir="$(bin_dir "$v")"
  if [[ -x "$dir/kube-apiserver" && -x "$dir/kubectl" ]]; then
    echo "cluster.sh: kube-apiserver and kubectl $(k8s_version "$v") cached in $dir"
  else
    echo "cluster.sh: building kube-apiserver and kubectl $(k8s_version "$v") into $dir"
    out="$(mktemp -d "$CACHE.tmp.XXXXXX" 2>/dev/null || { mkdir -p "$(dirname "$CACHE")"; mktemp -d "$CACHE.tmp.XXXXXX"; })"
    # The version stamps that the Kubernetes build scripts set (/version, kubectl version).
    local kv ldflags="" pkg
    kv="$(k8s_version "$v")"
    for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
      ldflags+=" -X $pkg.gitVersion=$kv -X $pkg.gitMajor=$(cut -d. -f1 <<<"${kv#v}")"
      ldflags+=" -X $pkg.gitMinor=$(cut -d. -f2 <<<"$kv") -X $pkg.gitTreeState=clean"
    done
    (cd "$HERE/$v" && go build -mod=readonly -ldflags "$ldflags" -o "$out/" \
      k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kubectl)
    mkdir -p "$(dirname "$dir")"
    rm -rf "$dir" && mv "$out" "$dir"
  fi
  local e
  e="$(etcd_bin)"
  if [[ -x "$e" ]]; then
    echo "cluster.sh: etcd $(etcd_version) cached in $(dirname "$e")"
  else
    echo "cluster.sh: building etcd $(etcd_version) into $(dirname "$e")"
    out="$(mktemp -d "$CACHE.tmp.XXXXXX")"
    (cd "$HERE/etcd" && go build -mod=readonly -o "$out/etcd" go.etcd.io/etcd/server/v3)
    rm -rf "$(dirname "$e")" && mv "$out" "$(dirname "$e")"
  fi
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# A key and a certificate signed by the cluster CA: $1 name, $2 subject, $3 extensions.
issue_cert() {
  local d="$DIR/pki" name="$1" subj="$2" ext="$3"
  openssl ecparam -name prime256v1 -genkey -noout -out "$d/$name.key" 2>/dev/null
  openssl req -new -key "$d/$name.key" -subj "$subj" -out "$d/$name.csr" 2>/dev/null
  printf '%s\n' "$ext" >"$d/$name.ext"
  openssl x509 -req -in "$d/$name.csr" -CA "$d/ca.crt" -CAkey "$d/ca.key" -CAcreateserial \
    -days 7 -sha256 -extfile "$d/$name.ext" -out "$d/$name.crt" 2>/dev/null
  chmod 600 "$d/$name.key"
}

kubeconfig() {
  local name="$1" out="$2"
  cat >"$out" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: meshca-e2e
  cluster:
    server: https://127.0.0.1:$API_PORT
    certificate-authority: $DIR/pki/ca.crt
users:
- name: $name
  user:
    client-certificate: $DIR/pki/$name.crt
    client-key: $DIR/pki/$name.key
contexts:
- name: meshca-e2e
  context: {cluster: meshca-e2e, user: $name}
current-context: meshca-e2e
EOF
  chmod 600 "$out"
}

# The feature gates and API groups the PodCertificateRequest and ClusterTrustBundle APIs need
# on each release (design.md: v1alpha1 in 1.34, v1beta1 in 1.35, GA v1 in 1.37).
api_flags() {
  local minor
  minor="$(k8s_version "$1" | cut -d. -f2)"
  if ((minor >= 37)); then
    # PodCertificateRequest and ClusterTrustBundle are GA and on by default; the beta version
    # stays servable for clients that still use it.
    echo "--runtime-config=certificates.k8s.io/v1beta1=true"
  elif ((minor >= 35)); then
    echo "--feature-gates=PodCertificateRequest=true,ClusterTrustBundle=true,ClusterTrustBundleProjection=true"
    echo "--runtime-config=certificates.k8s.io/v1beta1=true,certificates.k8s.io/v1alpha1=true"
  else
    echo "--feature-gates=PodCertificateRequest=true,ClusterTrustBundle=true,ClusterTrustBundleProjection=true"
    echo "--runtime-config=certificates.k8s.io/v1alpha1=true,certificates.k8s.io/v1beta1=true"
  fi
}

start_apiserver() {
  # shellcheck disable=SC1091
  source "$DIR/ports.sh"
  local bin flags
  bin="$(cat "$DIR/apiserver.bin")"
  mapfile -t flags <"$DIR/apiserver.flags"
  setsid "$bin" "${flags[@]}" >>"$DIR/kube-apiserver.log" 2>&1 </dev/null &
  echo $! >"$DIR/kube-apiserver.pid"
  local i
  for i in $(seq 1 600); do
    if curl -sf --cacert "$DIR/pki/ca.crt" --cert "$DIR/pki/admin.crt" --key "$DIR/pki/admin.key" \
      "https://127.0.0.1:$API_PORT/readyz" >/dev/null 2>&1; then
      return 0
    fi
    kill -0 "$(cat "$DIR/kube-apiserver.pid")" 2>/dev/null || {
      tail -n 30 "$DIR/kube-apiserver.log" >&2
      die "kube-apiserver exited during start-up (log: $DIR/kube-apiserver.log)"
    }
    sleep 0.2
  done
  tail -n 30 "$DIR/kube-apiserver.log" >&2
  die "kube-apiserver not ready after 120 s (log: $DIR/kube-apiserver.log)"
}

start() {
  local v="$1"
  DIR="$2"
  build "$v" >&2
  mkdir -p "$DIR/pki" "$DIR/etcd-data"
  chmod 700 "$DIR" "$DIR/pki" "$DIR/etcd-data"
  DIR="$(cd "$DIR" && pwd)"
  local bindir etcd
  bindir="$(bin_dir "$v")"
  # A start that fails half-way stops what it started.
  trap 'stop "$DIR"' EXIT
  etcd="$(etcd_bin)"

  ETCD_PORT="$(free_port)"
  ETCD_PEER_PORT="$(free_port)"
  API_PORT="$(free_port)"
  printf 'ETCD_PORT=%s\nETCD_PEER_PORT=%s\nAPI_PORT=%s\n' "$ETCD_PORT" "$ETCD_PEER_PORT" "$API_PORT" >"$DIR/ports.sh"

  # PKI: one CA for serving and client certificates, the ServiceAccount token key pair.
  openssl ecparam -name prime256v1 -genkey -noout -out "$DIR/pki/ca.key" 2>/dev/null
  openssl req -x509 -new -key "$DIR/pki/ca.key" -subj "/CN=meshca-e2e-cluster-ca" -days 7 \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out "$DIR/pki/ca.crt" 2>/dev/null
  issue_cert apiserver "/CN=kube-apiserver" \
    "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc
extendedKeyUsage=serverAuth
keyUsage=critical,digitalSignature"
  issue_cert admin "/O=system:masters/CN=meshca-e2e-admin" \
    "extendedKeyUsage=clientAuth
keyUsage=critical,digitalSignature"
  issue_cert node "/O=system:nodes/CN=system:node:$NODE_NAME" \
    "extendedKeyUsage=clientAuth
keyUsage=critical,digitalSignature"
  openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$DIR/pki/sa.key" 2>/dev/null
  openssl pkey -in "$DIR/pki/sa.key" -pubout -out "$DIR/pki/sa.pub" 2>/dev/null
  chmod 600 "$DIR/pki/ca.key" "$DIR/pki/sa.key"

  setsid "$etcd" --name meshca-e2e --data-dir "$DIR/etcd-data" \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster "meshca-e2e=http://127.0.0.1:$ETCD_PEER_PORT" \
    --listen-metrics-urls "" --log-level warn --quota-backend-bytes 4294967296 \
    --unsafe-no-fsync \
    >"$DIR/etcd.log" 2>&1 </dev/null &
  echo $! >"$DIR/etcd.pid"
  local i
  for i in $(seq 1 150); do
    curl -sf "http://127.0.0.1:$ETCD_PORT/health" >/dev/null 2>&1 && break
    kill -0 "$(cat "$DIR/etcd.pid")" 2>/dev/null || { cat "$DIR/etcd.log" >&2; die "etcd exited during start-up"; }
    sleep 0.2
  done

  # Audit log of the writes the e2e tests count (CSR status and approval, PCR status): one
  # JSON line per request, so "exactly one status write per CSR" is checked on the server's
  # own record.
  cat >"$DIR/audit-policy.yaml" <<'EOF2'
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived, ResponseStarted]
rules:
- level: Metadata
  verbs: [update, patch]
  resources:
  - group: certificates.k8s.io
    resources: [certificatesigningrequests/status, certificatesigningrequests/approval, podcertificaterequests/status]
- level: None
EOF2
  echo "$bindir/kube-apiserver" >"$DIR/apiserver.bin"
  {
    echo "--etcd-servers=http://127.0.0.1:$ETCD_PORT"
    echo "--bind-address=127.0.0.1"
    echo "--advertise-address=127.0.0.1"
    # The `kubernetes` Service's endpoints may not be a loopback address; nothing here needs them.
    echo "--endpoint-reconciler-type=none"
    echo "--secure-port=$API_PORT"
    echo "--tls-cert-file=$DIR/pki/apiserver.crt"
    echo "--tls-private-key-file=$DIR/pki/apiserver.key"
    echo "--client-ca-file=$DIR/pki/ca.crt"
    echo "--service-account-issuer=https://kubernetes.default.svc.cluster.local"
    echo "--service-account-key-file=$DIR/pki/sa.pub"
    echo "--service-account-signing-key-file=$DIR/pki/sa.key"
    echo "--api-audiences=https://kubernetes.default.svc.cluster.local,istio-ca"
    echo "--service-cluster-ip-range=10.96.0.0/16"
    echo "--authorization-mode=Node,RBAC"
    # The defaults (NamespaceLifecycle, ServiceAccount, the certificate plugins
    # CertificateApproval/CertificateSigning/CertificateSubjectRestriction,
    # ClusterTrustBundleAttest, ValidatingAdmissionPolicy, ...) plus NodeRestriction, as
    # kubeadm runs it.
    echo "--enable-admission-plugins=NodeRestriction"
    echo "--allow-privileged=true"
    echo "--profiling=false"
    echo "--event-ttl=10m"
    echo "--audit-policy-file=$DIR/audit-policy.yaml"
    echo "--audit-log-path=$DIR/audit.log"
    echo "--audit-log-format=json"
    echo "--audit-log-mode=blocking"
    echo "--cert-dir=$DIR/pki"
    api_flags "$v"
  } >"$DIR/apiserver.flags"
  start_apiserver

  kubeconfig admin "$DIR/admin.kubeconfig"
  kubeconfig node "$DIR/node.kubeconfig"
  cat >"$DIR/env.sh" <<EOF
export MESHCA_E2E_KUBECONFIG=$DIR/admin.kubeconfig
export MESHCA_E2E_NODE_KUBECONFIG=$DIR/node.kubeconfig
export MESHCA_E2E_NODE_NAME=$NODE_NAME
export MESHCA_E2E_KUBECTL=$bindir/kubectl
export MESHCA_E2E_CLUSTER_CTL=$HERE/cluster.sh
export MESHCA_E2E_CLUSTER_DIR=$DIR
export MESHCA_E2E_K8S_VERSION=$(k8s_version "$v")
EOF

  # Watchdog: stop the cluster once the process that asked for it ($PPID of this script) is
  # gone, even after a SIGKILL that ran no trap.
  local owner="${MESHCA_CLUSTER_OWNER:-$PPID}"
  setsid bash -c 'while kill -0 "$1" 2>/dev/null && [[ -e "$2/env.sh" ]]; do sleep 1; done; "$3" stop "$2"' \
    watchdog "$owner" "$DIR" "$HERE/cluster.sh" >/dev/null 2>&1 </dev/null &
  trap - EXIT
  echo "cluster.sh: Kubernetes $(k8s_version "$v") ready at https://127.0.0.1:$API_PORT (etcd 127.0.0.1:$ETCD_PORT, state in $DIR)" >&2
}

stop_pid() {
  local f="$1" pid i
  [[ -f "$f" ]] || return 0
  pid="$(cat "$f")"
  kill -TERM "$pid" 2>/dev/null || { rm -f "$f"; return 0; }
  for i in $(seq 1 50); do
    kill -0 "$pid" 2>/dev/null || { rm -f "$f"; return 0; }
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  for i in $(seq 1 50); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  rm -f "$f"
}

restart_apiserver() {
  DIR="$(cd "$1" && pwd)"
  local pid i
  pid="$(cat "$DIR/kube-apiserver.pid")"
  kill -KILL "$pid" 2>/dev/null || true
  for i in $(seq 1 100); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  start_apiserver
}

stop() {
  DIR="$1"
  [[ -d "$DIR" ]] || return 0
  rm -f "$DIR/env.sh"
  stop_pid "$DIR/kube-apiserver.pid"
  stop_pid "$DIR/etcd.pid"
}

case "${1:-}" in
  build) build "${2:?VERSION}" ;;
  start) start "${2:?VERSION}" "${3:?DIR}" ;;
  restart-apiserver) restart_apiserver "${2:?DIR}" ;;
  stop) stop "${2:?DIR}" ;;
  *) die "usage: cluster.sh build VERSION | start VERSION DIR | restart-apiserver DIR | stop DIR" ;;
esac
