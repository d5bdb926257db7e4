#!/usr/bin/env bash
# End-to-end check of the tier-2 control plane and the kwok stage contract:
# starts a cluster in its own state dir, exercises nodes, pod outcomes,
# scheduling, garbage collection and deletion, and stops the cluster again.
# Exits non-zero on the first failure. Every wait has a deadline.
#
#   testenv/smoke.sh              # KMM_SMOKE_DIR overrides the state dir
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
dir="${KMM_SMOKE_DIR:-/tmp/kmm-rs-smoke-$$}"
timeout="${KMM_SMOKE_TIMEOUT:-60s}"
node=kwok-node-1
ns=smoke

step() { echo "smoke: [$(( ($(date +%s%N) - t0) / 1000000 )) ms] $*" >&2; }
fail() { echo "smoke: FAIL: $*" >&2; exit 1; }
cleanup() {
  local rc=$?
  "${here}/cluster.sh" down --dir "$dir" || rc=1
  if pgrep -f -- "$dir" >/dev/null; then
    echo "smoke: FAIL: processes left behind after down:" >&2
    pgrep -af -- "$dir" >&2
    rc=1
  fi
  if (( rc == 0 )); then rm -rf "$dir"; echo "smoke: PASS" >&2
  else echo "smoke: state and logs kept in ${dir}" >&2; fi
  exit "$rc"
}

# poll DESC COMMAND...: retry COMMAND until it succeeds, for at most 60 s.
poll() {
  local what="$1" deadline=$(( $(date +%s) + 60 )); shift
  until "$@" >/dev/null 2>&1; do
    (( $(date +%s) < deadline )) || fail "timed out waiting for ${what}"
    sleep 0.1
  done
}

# expect DESC ACTUAL WANTED
expect() { [[ "$2" == "$3" ]] || fail "$1: got '$2', want '$3'"; }

t0=$(date +%s%N)
trap cleanup EXIT
"${here}/cluster.sh" up --dir "$dir" >/dev/null
eval "$(grep -E '^(KUBECONFIG|KMM_TESTENV_BIN)=' "${dir}/cluster.env" | sed 's/^/export /')"
k() { "${KMM_TESTENV_BIN}/kubectl" --request-timeout=10s "$@"; }
get() { k get "$@"; }
step "cluster up"

# --- versions -----------------------------------------------------------------
server_version="$(k version -o json | jq -r .serverVersion.gitVersion)"
client_version="$(k version -o json | jq -r .clientVersion.gitVersion)"
want_version="$(cd "$here" && grep -E '^\s*k8s.io/kubernetes v' go.mod | awk '{print $2}')"
expect "apiserver version" "$server_version" "$want_version"
expect "kubectl version" "$client_version" "$want_version"
step "versions ${server_version}"

# --- node: Ready, nodeInfo kept -----------------------------------------------
k create -f - <<EOF
apiVersion: v1
kind: Node
metadata:
  name: ${node}
  annotations:
    kwok.x-k8s.io/node: fake
  labels:
    kubernetes.io/hostname: ${node}
    kubernetes.io/os: linux
    kubernetes.io/arch: amd64
    kmm-rs.test/smoke: "true"
status:
  nodeInfo:
    kernelVersion: 6.8.0-31-generic
    osImage: Ubuntu 24.04 LTS
    bootID: 11111111-2222-3333-4444-555555555555
    architecture: amd64
    operatingSystem: linux
EOF
k wait --for=condition=Ready "node/${node}" --timeout="$timeout"
expect "kernelVersion" "$(get node "$node" -o jsonpath='{.status.nodeInfo.kernelVersion}')" 6.8.0-31-generic
expect "osImage" "$(get node "$node" -o jsonpath='{.status.nodeInfo.osImage}')" "Ubuntu 24.04 LTS"
expect "bootID" "$(get node "$node" -o jsonpath='{.status.nodeInfo.bootID}')" 11111111-2222-3333-4444-555555555555
step "node Ready with kernel 6.8.0-31-generic"

# A "reboot into a new kernel": patch the status subresource; kwok keeps it.
k patch node "$node" --subresource=status --type=merge \
  -p '{"status":{"nodeInfo":{"kernelVersion":"6.8.0-40-generic","bootID":"66666666-7777-8888-9999-000000000000"}}}' >/dev/null
expect "patched kernelVersion" "$(get node "$node" -o jsonpath='{.status.nodeInfo.kernelVersion}')" 6.8.0-40-generic
expect "node still Ready" "$(get node "$node" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}')" True
step "node status patched to kernel 6.8.0-40-generic"

# --- pods -----------------------------------------------------------------------
k create namespace "$ns" >/dev/null
poll "ServiceAccount ${ns}/default" k -n "$ns" get serviceaccount default

pod() { # pod NAME RESTART_POLICY [ANNOTATIONS_YAML]
  k -n "$ns" create -f - <<EOF
apiVersion: v1
kind: Pod
metadata:
  name: $1
  annotations: {${3:-}}
spec:
  nodeName: ${node}
  restartPolicy: $2
  containers:
  - name: main
    image: registry.example/kmm-rs/worker:v1
EOF
}
pod ok Never
pod fails Never '"kmm-rs.test/outcome": "fail", "kmm-rs.test/message": "insmod: ERROR: could not insert module kmm_ci_a.ko: Invalid parameters", "kmm-rs.test/exit-code": "3"'
pod pull Never '"kmm-rs.test/outcome": "image-pull-backoff"'
pod crash Always '"kmm-rs.test/outcome": "fail", "kmm-rs.test/message": "modprobe: FATAL: Module kmm_ci_b not found"'
pod runs Always ''
pod held Never '"kmm-rs.test/outcome": "hold"'

k -n "$ns" wait --for=jsonpath='{.status.phase}'=Succeeded pod/ok --timeout="$timeout"
expect "ok exit code" "$(get -n "$ns" pod ok -o jsonpath='{.status.containerStatuses[0].state.terminated.exitCode}')" 0
step "pod ok Succeeded"

k -n "$ns" wait --for=jsonpath='{.status.phase}'=Failed pod/fails --timeout="$timeout"
expect "fails message" "$(get -n "$ns" pod fails -o jsonpath='{.status.containerStatuses[0].state.terminated.message}')" \
  "insmod: ERROR: could not insert module kmm_ci_a.ko: Invalid parameters"
expect "fails exit code" "$(get -n "$ns" pod fails -o jsonpath='{.status.containerStatuses[0].state.terminated.exitCode}')" 3
expect "fails reason" "$(get -n "$ns" pod fails -o jsonpath='{.status.containerStatuses[0].state.terminated.reason}')" Error
step "pod fails Failed with its termination message"

k -n "$ns" wait --for=jsonpath='{.status.containerStatuses[0].state.waiting.reason}'=ImagePullBackOff pod/pull --timeout="$timeout"
expect "pull phase" "$(get -n "$ns" pod pull -o jsonpath='{.status.phase}')" Pending
step "pod pull Pending/ImagePullBackOff"

k -n "$ns" wait --for=jsonpath='{.status.containerStatuses[0].state.waiting.reason}'=CrashLoopBackOff pod/crash --timeout="$timeout"
expect "crash last message" "$(get -n "$ns" pod crash -o jsonpath='{.status.containerStatuses[0].lastState.terminated.message}')" \
  "modprobe: FATAL: Module kmm_ci_b not found"
step "pod crash CrashLoopBackOff"

k -n "$ns" wait --for=condition=Ready pod/runs pod/held --timeout="$timeout"
expect "held phase" "$(get -n "$ns" pod held -o jsonpath='{.status.phase}')" Running
step "pods runs/held Running and Ready"

# --- DaemonSet: controller-manager creates the pod, scheduler binds it -----------
k -n "$ns" create -f - <<EOF
apiVersion: apps/v1
kind: DaemonSet
metadata:
  name: worker
spec:
  selector:
    matchLabels: {app: worker}
  template:
    metadata:
      labels: {app: worker}
    spec:
      nodeSelector:
        kmm-rs.test/smoke: "true"
      containers:
      - name: worker
        image: registry.example/kmm-rs/worker:v1
EOF
k -n "$ns" wait --for=jsonpath='{.status.numberReady}'=1 daemonset/worker --timeout="$timeout"
expect "daemonset pod node" "$(get -n "$ns" pods -l app=worker -o jsonpath='{.items[0].spec.nodeName}')" "$node"
step "DaemonSet pod scheduled on ${node} and Ready"

# --- garbage collection ------------------------------------------------------------
k -n "$ns" create configmap owner >/dev/null
owner_uid="$(get -n "$ns" configmap owner -o jsonpath='{.metadata.uid}')"
k -n "$ns" create -f - <<EOF
apiVersion: v1
kind: ConfigMap
metadata:
  name: child
  ownerReferences:
  - apiVersion: v1
    kind: ConfigMap
    name: owner
    uid: ${owner_uid}
EOF
k -n "$ns" delete configmap owner --wait=false >/dev/null
k -n "$ns" wait --for=delete configmap/child --timeout="$timeout"
step "garbage collector deleted the child ConfigMap"

# --- pod deletion, with and without finalizers -------------------------------------
k -n "$ns" delete pod runs --wait=false >/dev/null
k -n "$ns" wait --for=delete pod/runs --timeout="$timeout"
k -n "$ns" patch pod held --type=merge -p '{"metadata":{"finalizers":["kmm-rs.test/keep"]}}' >/dev/null
k -n "$ns" delete pod held --wait=false >/dev/null
k -n "$ns" wait --for=jsonpath='{.metadata.deletionGracePeriodSeconds}'=0 pod/held --timeout="$timeout"
expect "held still present" "$(get -n "$ns" pod held -o jsonpath='{.metadata.name}')" held
k -n "$ns" patch pod held --type=json -p '[{"op":"remove","path":"/metadata/finalizers"}]' >/dev/null
k -n "$ns" wait --for=delete pod/held --timeout="$timeout"
step "pod deletion (plain and with a finalizer)"

# Deleting the DaemonSet cascades to its pod (garbage collector again).
k -n "$ns" delete daemonset worker --wait=false >/dev/null
no_worker_pods() { [[ -z "$(get -n "$ns" pods -l app=worker -o name)" ]]; }
poll "DaemonSet pods to go" no_worker_pods
step "DaemonSet deletion removed its pod"
