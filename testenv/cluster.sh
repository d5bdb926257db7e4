#!/usr/bin/env bash
# A local Kubernetes control plane for kmm-rs tier-2 tests: etcd,
# kube-apiserver, kube-controller-manager, kube-scheduler and kwok (simulated
# nodes and pods), all on loopback, all state in one directory.
#
#   testenv/cluster.sh up   [--dir DIR]   start (no-op if already running)
#   testenv/cluster.sh down [--dir DIR]   stop everything it started; idempotent
#   testenv/cluster.sh env  [--dir DIR]   print `export KUBECONFIG=...`
#
# DIR defaults to $KMM_CLUSTER_DIR or /tmp/kmm-rs-cluster. Binaries come from
# testenv/build.sh (or $KMM_TESTENV_BIN if set). Ports are chosen by the kernel,
# so several clusters (different DIRs) can run at once. Layout of DIR:
#   kubeconfig            admin (group system:masters), embedded certs
#   cluster.env           ports, bin dir, URLs (shell syntax)
#   pki/                  CA, serving cert, client certs, service-account keys
#   *.kubeconfig          per-component kubeconfigs
#   logs/<component>.log  one log per process
#   pids/<component>.pid  one pid file per process
#   etcd/                 etcd data
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
components=(etcd kube-apiserver kube-controller-manager kube-scheduler kwok)
up_timeout="${KMM_CLUSTER_TIMEOUT:-90}"   # seconds

usage() { echo "usage: $0 up|down|env [--dir DIR]" >&2; exit 2; }

cmd="${1:-}"; shift || true
dir="${KMM_CLUSTER_DIR:-/tmp/kmm-rs-cluster}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dir) dir="${2:?--dir needs a value}"; shift 2 ;;
    --dir=*) dir="${1#--dir=}"; shift ;;
    *) usage ;;
  esac
done
mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"

log() { echo "cluster.sh: $*" >&2; }

# pid_of COMPONENT: print the pid if the process recorded for COMPONENT is still
# alive and is really ours (its command line mentions our state dir).
pid_of() {
  local f="${dir}/pids/$1.pid" pid
  [[ -f "$f" ]] || return 1
  pid="$(cat "$f")"
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  [[ -r "/proc/${pid}/cmdline" ]] || return 1
  tr '\0' ' ' < "/proc/${pid}/cmdline" | grep -qF -- "$dir" || return 1
  echo "$pid"
}

# wait_until TIMEOUT_S DESCRIPTION COMMAND...: poll COMMAND until it succeeds.
wait_until() {
  local timeout="$1" what="$2"; shift 2
  local deadline=$(( $(date +%s%N) / 1000000 + timeout * 1000 )) delay=0.05
  until "$@" >/dev/null 2>&1; do
    check_alive
    if (( $(date +%s%N) / 1000000 > deadline )); then
      log "timed out after ${timeout}s waiting for ${what}"
      return 1
    fi
    sleep "$delay"
    [[ "$delay" == 0.05 ]] && delay=0.1 || delay=0.2
  done
}

# Fail fast, with the end of its log, when a started component has exited.
check_alive() {
  local c
  for c in "${started[@]}"; do
    if ! pid_of "$c" >/dev/null; then
      log "${c} exited; last lines of ${dir}/logs/${c}.log:"
      tail -n 25 "${dir}/logs/${c}.log" >&2 || true
      exit 1
    fi
  done
}

# alive PID: the process exists and is not a zombie waiting to be reaped.
alive() {
  [[ -e "/proc/$1" ]] && ! grep -q '^State:[[:space:]]*Z' "/proc/$1/status" 2>/dev/null
}

stop_all() {
  local c pid pids=() i
  for (( i=${#components[@]}-1; i>=0; i-- )); do
    c="${components[$i]}"
    if pid="$(pid_of "$c")"; then
      kill -TERM "$pid" 2>/dev/null || true
      pids+=("$pid")
    fi
  done
  local deadline=$(( $(date +%s) + 15 ))
  for pid in "${pids[@]}"; do
    while alive "$pid"; do
      if (( $(date +%s) > deadline )); then
        log "pid ${pid} ignored SIGTERM for 15s; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        deadline=$(( $(date +%s) + 15 ))
      fi
      sleep 0.05
    done
  done
  rm -f "${dir}"/pids/*.pid
}

free_ports() {
  python3 - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

# --- certificates -----------------------------------------------------------

# new_ca NAME CN: self-signed EC P-256 CA.
new_ca() {
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -keyout "${dir}/pki/$1.key" -out "${dir}/pki/$1.crt" -days 3650 -sha256 \
    -subj "/CN=$2" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" 2>/dev/null
}

# new_cert NAME SUBJECT [EXTFILE-CONTENT [CA]]: EC P-256 key + cert signed by
# CA (default: ca).
new_cert() {
  local name="$1" subj="$2" ext="${3:-}" ca="${4:-ca}" pki="${dir}/pki"
  openssl ecparam -name prime256v1 -genkey -noout -out "${pki}/${name}.key.tmp" 2>/dev/null
  openssl pkcs8 -topk8 -nocrypt -in "${pki}/${name}.key.tmp" -out "${pki}/${name}.key"
  rm -f "${pki}/${name}.key.tmp"
  openssl req -new -key "${pki}/${name}.key" -subj "$subj" -out "${pki}/${name}.csr"
  printf '%s\n' "basicConstraints=critical,CA:FALSE" \
    "keyUsage=critical,digitalSignature,keyEncipherment" "$ext" > "${pki}/${name}.ext"
  openssl x509 -req -in "${pki}/${name}.csr" -CA "${pki}/${ca}.crt" -CAkey "${pki}/${ca}.key" \
    -CAcreateserial -days 3650 -sha256 -extfile "${pki}/${name}.ext" \
    -out "${pki}/${name}.crt" 2>/dev/null
  rm -f "${pki}/${name}.csr" "${pki}/${name}.ext"
}

make_pki() {
  local pki="${dir}/pki"
  mkdir -p "$pki"
  new_ca ca kmm-rs-testenv-ca
  # Front proxy (request-header authentication) CA and the apiserver's client
  # certificate for it: lets kube-controller-manager/kube-scheduler read the
  # requestheader CA bundle, and makes aggregated API servers usable.
  new_ca front-proxy-ca kmm-rs-testenv-front-proxy-ca
  new_cert front-proxy-client "/CN=front-proxy-client" "extendedKeyUsage=clientAuth" front-proxy-ca
  new_cert apiserver "/CN=kube-apiserver" \
    "extendedKeyUsage=serverAuth
subjectAltName=DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,IP:127.0.0.1,IP:::1,IP:${service_ip}"
  new_cert admin "/O=system:masters/CN=kmm-rs-admin" "extendedKeyUsage=clientAuth"
  new_cert kube-controller-manager "/CN=system:kube-controller-manager" "extendedKeyUsage=clientAuth"
  new_cert kube-scheduler "/CN=system:kube-scheduler" "extendedKeyUsage=clientAuth"
  new_cert kwok "/O=system:masters/CN=kwok" "extendedKeyUsage=clientAuth"
  # Service-account token signing key pair.
  openssl ecparam -name prime256v1 -genkey -noout 2>/dev/null \
    | openssl pkcs8 -topk8 -nocrypt -out "${pki}/sa.key"
  openssl pkey -in "${pki}/sa.key" -pubout -out "${pki}/sa.pub"
  chmod 600 "${pki}"/*.key
}

# write_kubeconfig FILE CERT-NAME USER
write_kubeconfig() {
  local file="$1" name="$2" user="$3" pki="${dir}/pki"
  cat > "${file}.tmp" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: kmm-rs-testenv
  cluster:
    server: https://127.0.0.1:${api_port}
    certificate-authority-data: $(base64 -w0 < "${pki}/ca.crt")
users:
- name: ${user}
  user:
    client-certificate-data: $(base64 -w0 < "${pki}/${name}.crt")
    client-key-data: $(base64 -w0 < "${pki}/${name}.key")
contexts:
- name: kmm-rs-testenv
  context:
    cluster: kmm-rs-testenv
    user: ${user}
current-context: kmm-rs-testenv
EOF
  chmod 600 "${file}.tmp"
  mv "${file}.tmp" "$file"
}

# start COMPONENT BINARY ARGS...: run detached in its own session.
start() {
  local c="$1" bin="$2"; shift 2
  setsid "${bindir}/${bin}" "$@" > "${dir}/logs/${c}.log" 2>&1 < /dev/null &
  echo $! > "${dir}/pids/${c}.pid"
  started+=("$c")
}

kubectl_() { "${bindir}/kubectl" --kubeconfig "${dir}/kubeconfig" --request-timeout=5s "$@"; }

healthz() { curl -fsk --max-time 2 "https://127.0.0.1:$1/healthz"; }

# --- commands -----------------------------------------------------------------

# The tools this script runs besides the built binaries; on a fresh Debian machine some may be
# missing, so install them (root only) rather than fail half-way.
ensure_tools() {
  local missing=() tool
  for tool in openssl:openssl curl:curl python3:python3 setsid:util-linux; do
    command -v "${tool%%:*}" >/dev/null || missing+=("${tool#*:}")
  done
  ((${#missing[@]})) || return 0
  [[ "$(id -u)" == 0 ]] || { log "missing tools: ${missing[*]} (install them with apt-get)"; exit 1; }
  log "installing ${missing[*]} (apt-get)"
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1 \
    || { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; }
}

up() {
  started=()
  ensure_tools
  if pid_of kube-apiserver >/dev/null && [[ -f "${dir}/kubeconfig" ]]; then
    log "already running in ${dir}"
    echo "export KUBECONFIG=${dir}/kubeconfig"
    return 0
  fi
  stop_all
  # Whatever goes wrong from here on, do not leave half a cluster running.
  trap 'rc=$?; if (( rc != 0 )); then log "up failed; stopping what was started"; stop_all; fi' EXIT
  local t0; t0=$(date +%s%N)
  bindir="${KMM_TESTENV_BIN:-$("${here}/build.sh" | tail -n 1)}"
  # Start from an empty state directory (keep nothing from an earlier run).
  rm -rf "${dir:?}"/{etcd,pki,logs,pids,kubeconfig,cluster.env,*.kubeconfig}
  mkdir -p "${dir}/logs" "${dir}/pids"

  local ports
  read -r etcd_port etcd_peer_port api_port kcm_port sched_port <<< "$(free_ports 5)"
  service_cidr="10.96.0.0/16"
  service_ip="10.96.0.1"
  make_pki
  write_kubeconfig "${dir}/kubeconfig" admin kmm-rs-admin
  write_kubeconfig "${dir}/kube-controller-manager.kubeconfig" kube-controller-manager system:kube-controller-manager
  write_kubeconfig "${dir}/kube-scheduler.kubeconfig" kube-scheduler system:kube-scheduler
  write_kubeconfig "${dir}/kwok.kubeconfig" kwok kwok
  cat > "${dir}/cluster.env" <<EOF
KMM_CLUSTER_DIR=${dir}
KUBECONFIG=${dir}/kubeconfig
KMM_TESTENV_BIN=${bindir}
APISERVER_URL=https://127.0.0.1:${api_port}
ETCD_URL=http://127.0.0.1:${etcd_port}
ETCD_PORT=${etcd_port}
ETCD_PEER_PORT=${etcd_peer_port}
APISERVER_PORT=${api_port}
KUBE_CONTROLLER_MANAGER_PORT=${kcm_port}
KUBE_SCHEDULER_PORT=${sched_port}
SERVICE_CIDR=${service_cidr}
EOF

  local pki="${dir}/pki" etcd_url="http://127.0.0.1:${etcd_port}"
  start etcd etcd \
    --name=kmm-rs-testenv \
    --data-dir="${dir}/etcd" \
    --listen-client-urls="$etcd_url" --advertise-client-urls="$etcd_url" \
    --listen-peer-urls="http://127.0.0.1:${etcd_peer_port}" \
    --initial-advertise-peer-urls="http://127.0.0.1:${etcd_peer_port}" \
    --initial-cluster="kmm-rs-testenv=http://127.0.0.1:${etcd_peer_port}" \
    --unsafe-no-fsync=true \
    --log-level=warn
  wait_until 30 "etcd health" curl -fs --max-time 2 "${etcd_url}/health"

  # Audit only ServiceAccounts outside kube-system (operators under test, e.g. to check that
  # the shipped RBAC is minimal); metadata level, one line per request.
  cat > "${dir}/audit-policy.yaml" <<'POLICY'
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
- level: None
  userGroups: ["system:serviceaccounts:kube-system"]
- level: Metadata
  userGroups: ["system:serviceaccounts"]
- level: None
POLICY

  start kube-apiserver kube-apiserver \
    --etcd-servers="$etcd_url" \
    --bind-address=127.0.0.1 --advertise-address=127.0.0.1 \
    --secure-port="$api_port" \
    --cert-dir="${dir}/pki" \
    --tls-cert-file="${pki}/apiserver.crt" --tls-private-key-file="${pki}/apiserver.key" \
    --client-ca-file="${pki}/ca.crt" \
    --requestheader-client-ca-file="${pki}/front-proxy-ca.crt" \
    --requestheader-allowed-names=front-proxy-client \
    --requestheader-username-headers=X-Remote-User \
    --requestheader-group-headers=X-Remote-Group \
    --requestheader-extra-headers-prefix=X-Remote-Extra- \
    --proxy-client-cert-file="${pki}/front-proxy-client.crt" \
    --proxy-client-key-file="${pki}/front-proxy-client.key" \
    --authorization-mode=Node,RBAC \
    --service-cluster-ip-range="$service_cidr" \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --service-account-key-file="${pki}/sa.pub" \
    --service-account-signing-key-file="${pki}/sa.key" \
    --endpoint-reconciler-type=none \
    --audit-policy-file="${dir}/audit-policy.yaml" \
    --audit-log-path="${dir}/logs/audit.log" --audit-log-maxsize=200 --audit-log-maxbackup=1 \
    --allow-privileged=true \
    --profiling=false \
    --v=1
  wait_until "$up_timeout" "kube-apiserver /readyz" kubectl_ get --raw /readyz

  start kube-controller-manager kube-controller-manager \
    --kubeconfig="${dir}/kube-controller-manager.kubeconfig" \
    --authentication-kubeconfig="${dir}/kube-controller-manager.kubeconfig" \
    --authorization-kubeconfig="${dir}/kube-controller-manager.kubeconfig" \
    --bind-address=127.0.0.1 --secure-port="$kcm_port" \
    --cert-dir="${dir}/pki/kube-controller-manager" \
    --leader-elect=false \
    --controllers='*' \
    --use-service-account-credentials=true \
    --root-ca-file="${pki}/ca.crt" \
    --service-account-private-key-file="${pki}/sa.key" \
    --cluster-signing-cert-file="${pki}/ca.crt" --cluster-signing-key-file="${pki}/ca.key" \
    --service-cluster-ip-range="$service_cidr" \
    --profiling=false \
    --v=1
  start kube-scheduler kube-scheduler \
    --kubeconfig="${dir}/kube-scheduler.kubeconfig" \
    --authentication-kubeconfig="${dir}/kube-scheduler.kubeconfig" \
    --authorization-kubeconfig="${dir}/kube-scheduler.kubeconfig" \
    --bind-address=127.0.0.1 --secure-port="$sched_port" \
    --cert-dir="${dir}/pki/kube-scheduler" \
    --leader-elect=false \
    --profiling=false \
    --v=1
  start kwok kwok \
    --kubeconfig="${dir}/kwok.kubeconfig" \
    --config="${here}/kwok/stages.yaml" \
    --manage-all-nodes=false \
    --manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake \
    --node-lease-duration-seconds=40 \
    --cidr=10.244.0.1/16 \
    --node-ip=10.0.0.1 \
    --v=INFO

  wait_until "$up_timeout" "kube-controller-manager /healthz" healthz "$kcm_port"
  wait_until "$up_timeout" "kube-scheduler /healthz" healthz "$sched_port"
  wait_until "$up_timeout" "ServiceAccount default/default" kubectl_ -n default get serviceaccount default
  check_alive
  log "up in $(( ($(date +%s%N) - t0) / 1000000 )) ms; ${dir}"
  echo "export KUBECONFIG=${dir}/kubeconfig"
}

case "$cmd" in
  up) up ;;
  down) stop_all; log "down (${dir})" ;;
  env)
    [[ -f "${dir}/kubeconfig" ]] || { log "no cluster in ${dir}"; exit 1; }
    echo "export KUBECONFIG=${dir}/kubeconfig"
    ;;
  *) usage ;;
esac
