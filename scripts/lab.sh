#!/usr/bin/env bash
# `make lab`: run the KMM labs of labs/ on a local control plane and print, per lab and per node,
# what happened. Leaves the cluster, the registry and the operator running; `make lab-down` stops
# them.
#
#   scripts/lab.sh up     [--lab NAME] [--nodes N] [--check] [--timeout SECONDS]
#   scripts/lab.sh down
#   scripts/lab.sh ci     (make test: one lab, two nodes, --check, in its own directory, stopped after)
#
# What `up` does: installs what is missing (docker-registry, jq, curl from Debian), builds
# kmm-operator and kmmctl, starts the control plane (testenv/cluster.sh) with N kwok nodes on
# different kernels and a plain-HTTP OCI registry on loopback, runs `kmm-operator run`, pushes
# each lab's module images, applies the labs (one namespace per lab: lab-<name>), waits with a
# progress line, then prints `kmmctl status -A -o wide`. --check exits non-zero unless every
# mapped node of every applied lab ends `loaded` with its image found and its ready label set.
#
# Labs whose feature this kmm-rs version does not run yet are listed as "not yet supported"
# instead of being applied.

set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LAB_DIR="${KMM_LAB_DIR:-/tmp/kmm-rs-lab}"
CLUSTER_DIR="$LAB_DIR/cluster"
CARGO="${CARGO:-cargo}"
LABEL_KEY="feature.kmm.lab"
OPERATOR_NS="kmm-operator-system"

# Labs this version runs, and why the others are not run.
SUPPORTED_LABS=(prebuilt soft-dependencies in-tree-removal build-multi-stage build-single-stage device-plugin)
declare -A UNSUPPORTED=(
  [build-and-sign]="needs in-cluster builds and signing"
  [ordered-upgrade]="a step-by-step lab (relabel nodes one at a time): follow labs/ordered-upgrade/README.md"
)
ALL_LABS=(prebuilt soft-dependencies in-tree-removal ordered-upgrade build-multi-stage build-single-stage build-and-sign device-plugin)

# Simulated nodes: name, kernel, OS image. The first two are covered by every lab's mappings;
# the third has a kernel that the prebuilt lab does not map, so nothing must happen there.
NODE_NAMES=(lab-node-1 lab-node-2 lab-node-3)
NODE_KERNELS=(6.1.0-56-amd64 6.8.0-31-generic 5.14.0-427.13.1.el9_4.x86_64)
NODE_OS=("Debian GNU/Linux 12 (bookworm)" "Ubuntu 24.04 LTS" "Red Hat Enterprise Linux CoreOS 9.4")

say() { printf '==> %s\n' "$*" >&2; }
die() { printf 'lab: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------------------------------------
# down

stop_pidfile() {
  local file="$1"
  [[ -f "$file" ]] || return 0
  local pid
  pid="$(cat "$file")"
  if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$file"
}

down() {
  stop_pidfile "$LAB_DIR/operator.pid"
  stop_pidfile "$LAB_DIR/registry.pid"
  if [[ -d "$CLUSTER_DIR" ]]; then
    "$ROOT/testenv/cluster.sh" down --dir "$CLUSTER_DIR" >/dev/null
  fi
  rm -rf "$LAB_DIR"
  say "lab stopped"
}

# ---------------------------------------------------------------------------------------------
# up

install_prerequisites() {
  local missing=()
  command -v docker-registry >/dev/null || missing+=(docker-registry)
  command -v jq >/dev/null || missing+=(jq)
  command -v curl >/dev/null || missing+=(curl)
  command -v sha256sum >/dev/null || missing+=(coreutils)
  if ((${#missing[@]})); then
    say "installing ${missing[*]} (apt-get)"
    local sudo=""
    [[ "$(id -u)" == 0 ]] || sudo="sudo"
    $sudo apt-get install -y -qq "${missing[@]}" >/dev/null 2>&1 \
      || { $sudo apt-get update -qq && $sudo apt-get install -y -qq "${missing[@]}" >/dev/null; }
  fi
  command -v "$CARGO" >/dev/null || die "cargo not found: install Rust (rust-toolchain.toml names the version)"
  command -v go >/dev/null || [[ -n "${KMM_TESTENV_BIN:-}" ]] \
    || die "go not found: the control plane is built from Go modules (testenv/README.md)"
}

free_port() {
  # The kernel picks a free port; bash holds it only for a moment, as the test registry does.
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' 2>/dev/null \
    || shuf -i 20000-40000 -n 1
}

# Waits until `$1` (a command) succeeds, for at most $2 seconds.
wait_until() {
  local what="$1" seconds="$2"
  shift 2
  local deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || die "timed out after ${seconds}s waiting for $what"
    sleep 0.2
  done
}

start_registry() {
  local port
  port="$(free_port)"
  REGISTRY="127.0.0.1:$port"
  mkdir -p "$LAB_DIR/registry/data"
  cat >"$LAB_DIR/registry/config.yml" <<EOF
version: 0.1
log:
  level: info
storage:
  filesystem:
    rootdirectory: $LAB_DIR/registry/data
  delete:
    enabled: true
http:
  addr: $REGISTRY
  secret: kmm-rs-lab
EOF
  setsid docker-registry serve "$LAB_DIR/registry/config.yml" \
    >"$LAB_DIR/registry/registry.log" 2>&1 </dev/null &
  echo $! >"$LAB_DIR/registry.pid"
  wait_until "the registry on $REGISTRY" 20 curl -fsS "http://$REGISTRY/v2/"
  echo "$REGISTRY" >"$LAB_DIR/registry.address"
}

# Pushes a one-layer OCI image (a tar with a file naming the image) as REPO:TAG.
push_image() {
  local repo="$1" tag="$2" work
  work="$(mktemp -d "$LAB_DIR/push.XXXXXX")"
  printf '%s:%s\n' "$repo" "$tag" >"$work/IMAGE"
  tar -C "$work" --mtime=@0 --owner=0 --group=0 -cf "$work/layer.tar" IMAGE
  local layer_digest layer_size
  layer_digest="sha256:$(sha256sum "$work/layer.tar" | cut -d' ' -f1)"
  layer_size="$(stat -c %s "$work/layer.tar")"
  printf '{"architecture":"amd64","os":"linux","config":{},"rootfs":{"type":"layers","diff_ids":["%s"]}}' \
    "$layer_digest" >"$work/config.json"
  local config_digest config_size
  config_digest="sha256:$(sha256sum "$work/config.json" | cut -d' ' -f1)"
  config_size="$(stat -c %s "$work/config.json")"
  local blob digest location
  for blob in layer.tar config.json; do
    digest="sha256:$(sha256sum "$work/$blob" | cut -d' ' -f1)"
    location="$(curl -fsS -X POST -D - -o /dev/null "http://$REGISTRY/v2/$repo/blobs/uploads/" \
      | tr -d '\r' | sed -n 's/^[Ll]ocation: //p')"
    [[ "$location" == http* ]] || location="http://$REGISTRY$location"
    if [[ "$location" == *\?* ]]; then location="$location&digest=$digest"; else location="$location?digest=$digest"; fi
    curl -fsS -X PUT -H 'Content-Type: application/octet-stream' --data-binary "@$work/$blob" "$location" >/dev/null
  done
  printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"%s","size":%s}]}' \
    "$config_digest" "$config_size" "$layer_digest" "$layer_size" >"$work/manifest.json"
  curl -fsS -X PUT -H 'Content-Type: application/vnd.oci.image.manifest.v1+json' \
    --data-binary "@$work/manifest.json" "http://$REGISTRY/v2/$repo/manifests/$tag" >/dev/null
  rm -rf "$work"
}

create_node() {
  local name="$1" kernel="$2" os="$3"
  kubectl create -f - >/dev/null <<EOF
{"apiVersion": "v1", "kind": "Node",
 "metadata": {"name": "$name",
   "annotations": {"kwok.x-k8s.io/node": "fake"},
   "labels": {"kubernetes.io/hostname": "$name", "type": "kwok", "$LABEL_KEY": "true"}},
 "status": {"nodeInfo": {"kernelVersion": "$kernel", "osImage": "$os", "bootID": "$name-boot-1",
   "architecture": "amd64", "operatingSystem": "linux"}}}
EOF
}

start_operator() {
  kubectl create namespace "$OPERATOR_NS" >/dev/null 2>&1 || true
  local probe_port
  probe_port="$(free_port)"
  (
    cd "$LAB_DIR"
    RUST_LOG="${RUST_LOG:-info}" setsid "$ROOT/target/debug/kmm-operator" run \
      --operator-namespace "$OPERATOR_NS" \
      --worker-image "registry.example.com/kmm-rs/kmm-worker:lab" \
      --image-check registry \
      --health-probe-bind-address "127.0.0.1:$probe_port" \
      --metrics-bind-address 0 \
      --leader-elect false \
      >"$LAB_DIR/operator.log" 2>&1 </dev/null &
    echo $! >"$LAB_DIR/operator.pid"
  )
  local deadline=$((SECONDS + 60))
  until curl -fsS "http://127.0.0.1:$probe_port/readyz" >/dev/null 2>&1; do
    if ! kill -0 "$(cat "$LAB_DIR/operator.pid")" 2>/dev/null; then
      tail -n 30 "$LAB_DIR/operator.log" >&2
      die "kmm-operator exited; its log is above ($LAB_DIR/operator.log)"
    fi
    ((SECONDS < deadline)) || die "kmm-operator not ready after 60s; see $LAB_DIR/operator.log"
    sleep 0.2
  done
}

# The lab's manifests, pointed at the local registry. The lab registry speaks plain HTTP, so
# every containerImage line gets a `registryTLS: {insecure: true}` sibling.
lab_manifests() {
  local lab="$1" file
  for file in "$ROOT/labs/$lab"/*.yaml; do
    sed -e "s#registry\.example\.com#$REGISTRY#g" \
      -e "s#^\( *\)containerImage: \(.*\)\$#\1containerImage: \2\n\1registryTLS: {insecure: true}#" "$file"
    printf '\n---\n'
  done
}

# Image repository and tag suffix a lab uses, and whether a node's kernel is mapped.
lab_repo() {
  case "$1" in
    prebuilt) echo "kmm-labs/kmm-ci-a" ;;
    soft-dependencies) echo "kmm-labs/kmm-ci-ab" ;;
    in-tree-removal) echo "kmm-labs/kmm-ci-replace" ;;
    device-plugin) echo "kmm-labs/kmm-ci-device" ;;
  esac
}
lab_maps_kernel() {
  case "$1" in
    prebuilt) [[ "$2" == 6.1.0-56-amd64 || "$2" == 6.8.* ]] ;;
    *) true ;;
  esac
}

# Rows of the lab table that count: the applied labs' namespaces.
lab_rows_json() {
  "$KMMCTL" status -A -o json | jq -c --argjson labs "$(printf '%s\n' "${APPLIED[@]}" | jq -R 'select(length>0) | "lab-" + .' | jq -sc .)" \
    '[.[] | select(.namespace as $n | $labs | index($n))]'
}

wait_for_labs() {
  local timeout="$1" start=$SECONDS last_print=-10 tty=0 rows counts
  [[ -t 2 ]] && tty=1
  local spin='|/-\' i=0
  while :; do
    rows="$(lab_rows_json 2>/dev/null || echo '[]')"
    counts="$(jq -r '[
        (map(select(.state=="loaded")) | length),
        (map(select(.state=="loading")) | length),
        (map(select(.state=="failed")) | length),
        (map(select(.state=="not targeted")) | length)] | @tsv' <<<"$rows")"
    read -r loaded loading failed untargeted <<<"$counts"
    local elapsed=$((SECONDS - start))
    local line="waiting for the labs: ${loaded} loaded, ${loading} loading, ${failed} failed, ${untargeted} not targeted  [${elapsed}s/${timeout}s]"
    if ((tty)); then
      printf '\r%s %s ' "${spin:i++%4:1}" "$line" >&2
    elif ((elapsed - last_print >= 5)); then
      printf '%s\n' "$line" >&2
      last_print=$elapsed
    fi
    if [[ "$rows" != "[]" ]] && ((loading == 0)); then
      break
    fi
    if ((elapsed >= timeout)); then
      ((tty)) && printf '\n' >&2
      say "gave up waiting after ${timeout}s; the table shows where things stand"
      return 0
    fi
    sleep 0.5
  done
  ((tty)) && printf '\n' >&2
  return 0
}

check_table() {
  local table="$1" lab node kernel ok=1
  for lab in "${APPLIED[@]}"; do
    for i in "${!NODE_NAMES[@]}"; do
      ((i < NODES)) || continue
      node="${NODE_NAMES[$i]}" kernel="${NODE_KERNELS[$i]}"
      if lab_maps_kernel "$lab" "$kernel"; then
        if ! grep -Eq "^lab-$lab +[^ ]+ +$node +$kernel +loaded +Loaded +found +- +yes " <<<"$table"; then
          printf 'CHECK FAILED: lab %s, node %s: expected loaded, image found, labelled\n' "$lab" "$node" >&2
          ok=0
        fi
      elif ! grep -Eq "^lab-$lab +[^ ]+ +$node +$kernel +not targeted +NoMatchingMapping " <<<"$table"; then
        printf 'CHECK FAILED: lab %s, node %s: expected not targeted (NoMatchingMapping)\n' "$lab" "$node" >&2
        ok=0
      fi
    done
  done
  ((ok)) || return 1
  say "check passed: every mapped node loaded, image found, labelled; unmapped nodes left alone"
}

up() {
  local lab="all" check=0 timeout=180
  NODES=3
  while (($#)); do
    case "$1" in
      --lab) lab="$2"; shift 2 ;;
      --nodes) NODES="$2"; shift 2 ;;
      --check) check=1; shift ;;
      --timeout) timeout="$2"; shift 2 ;;
      *) die "unknown argument $1" ;;
    esac
  done
  ((NODES >= 1 && NODES <= ${#NODE_NAMES[@]})) || die "--nodes must be 1..${#NODE_NAMES[@]}"
  local selected=()
  if [[ "$lab" == all ]]; then
    selected=("${ALL_LABS[@]}")
  else
    [[ -d "$ROOT/labs/$lab" ]] || die "no lab named $lab (labs: ${ALL_LABS[*]})"
    selected=("$lab")
  fi

  local started=$SECONDS
  install_prerequisites
  # A previous lab is replaced, never reused half-configured.
  if [[ -d "$LAB_DIR" ]]; then
    say "stopping the previous lab in $LAB_DIR"
    down 2>/dev/null
  fi
  mkdir -p "$LAB_DIR"

  say "building kmm-operator and kmmctl"
  (cd "$ROOT" && "$CARGO" build -q -p kmm-operator -p kmmctl)
  KMMCTL="$ROOT/target/debug/kmmctl"

  say "starting the control plane (testenv/cluster.sh; the first run builds it from Go modules, ~9 min)"
  local bin
  bin="${KMM_TESTENV_BIN:-$("$ROOT/testenv/build.sh" | tail -n 1)}"
  KMM_TESTENV_BIN="$bin" "$ROOT/testenv/cluster.sh" up --dir "$CLUSTER_DIR" >/dev/null
  export KUBECONFIG="$CLUSTER_DIR/kubeconfig"
  export PATH="$bin:$PATH"
  local crd_files=()
  for f in "$ROOT"/deploy/crds/*.yaml; do crd_files+=(-f "$f"); done
  kubectl apply --server-side --field-manager=kmm-rs-lab "${crd_files[@]}" >/dev/null
  kubectl wait --for=condition=Established --timeout=60s crd --all >/dev/null

  say "starting the OCI registry"
  start_registry

  say "creating $NODES kwok node(s)"
  for i in "${!NODE_NAMES[@]}"; do
    ((i < NODES)) || continue
    create_node "${NODE_NAMES[$i]}" "${NODE_KERNELS[$i]}" "${NODE_OS[$i]}"
  done
  kubectl wait --for=condition=Ready --timeout=60s node -l "$LABEL_KEY=true" >/dev/null

  say "starting kmm-operator"
  start_operator

  APPLIED=()
  local skipped=()
  for name in "${selected[@]}"; do
    if [[ -n "${UNSUPPORTED[$name]:-}" ]]; then
      skipped+=("$name")
      continue
    fi
    local repo
    repo="$(lab_repo "$name")"
    # The build labs start without an image: the operator builds it in the cluster.
    for i in "${!NODE_NAMES[@]}"; do
      ((i < NODES)) || continue
      if [[ "$name" != build-* ]] && lab_maps_kernel "$name" "${NODE_KERNELS[$i]}"; then
        push_image "$repo" "${NODE_KERNELS[$i]}"
      fi
    done
    kubectl create namespace "lab-$name" >/dev/null
    lab_manifests "$name" | kubectl apply -n "lab-$name" -f - >/dev/null
    APPLIED+=("$name")
    say "applied lab $name (namespace lab-$name)"
  done

  local table=""
  if ((${#APPLIED[@]})); then
    wait_for_labs "$timeout"
    table="$("$KMMCTL" status -A -o wide | awk 'NR==1 || /^lab-/')"
  fi

  printf '\nKMM labs on %d kwok node(s), %ss\n\n' "$NODES" "$((SECONDS - started))"
  [[ -n "$table" ]] && printf '%s\n' "$table"
  if ((${#skipped[@]})); then
    printf '\n'
    for name in "${skipped[@]}"; do
      printf '%-20s not yet supported by this kmm-rs version: %s\n' "$name" "${UNSUPPORTED[$name]}"
    done
  fi
  cat <<EOF

The nodes are simulated (kwok): "loaded" means the worker pod succeeded and the node got its
<namespace>.<module>.ready label; there is no kernel to run lsmod in. On a real cluster, check with
\`kmmctl status -A\` and \`kubectl debug node/<node> -it --image=busybox -- chroot /host lsmod\`.

Why a node is in its state:   $KMMCTL explain -n lab-<lab> <module> --node <node>
Use this cluster:             export KUBECONFIG=$KUBECONFIG
Operator log:                 $LAB_DIR/operator.log
Stop everything:              make lab-down
EOF
  if ((check)); then
    check_table "$table"
  fi
}

case "${1:-up}" in
  up) shift || true; up "$@" ;;
  down) down ;;
  ci)
    # `make test`: the short mode in a directory of its own, always stopped afterwards.
    LAB_DIR="/tmp/kmm-rs-lab-ci-$$"
    CLUSTER_DIR="$LAB_DIR/cluster"
    trap 'down >/dev/null 2>&1' EXIT
    up --lab prebuilt --nodes 2 --check --timeout 120
    ;;
  *) die "usage: scripts/lab.sh up [--lab NAME] [--nodes N] [--check] [--timeout S] | down | ci" ;;
esac
