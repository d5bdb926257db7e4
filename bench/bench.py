#!/usr/bin/env python3
"""kmm-rs scale and cost benchmark (`make bench`; DESIGN.md section 4, tier "bench").

Starts the local control plane (testenv/cluster.sh), a plain-HTTP OCI registry holding the
module images, N kwok nodes over K kernels and the release-built `kmm-operator run` as its own
process, authenticated as its ServiceAccount with the shipped RBAC (deploy/base/rbac.yaml). Then:

  apply   create M Modules (one literal mapping per kernel)  -> every node has every ready label
  change  switch every Module to a new image tag             -> every NMC reports the new image loaded
  delete  delete every Module                                -> Modules gone, no ready label left

For each phase: convergence time, the operator's API requests by verb and resource (from the API
server's audit log, which records ServiceAccount requests, so only the operator's are counted),
writes against the minimum the state machine needs (formula in bench/report.md), CPU seconds
(/proc/PID/stat) and resident memory (/proc/PID/status VmRSS, VmHWM).

    bench/bench.py run [--nodes 500] [--modules 10] [--kernels 3] [--keep]
    bench/bench.py report        # rebuild the results table of bench/report.md from bench/results/

Python 3 standard library only. Never asserts on timings; a run that does not converge within
--timeout is reported as such.
"""

import argparse
import base64
import datetime
import hashlib
import http.client
import io
import json
import os
import platform
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tarfile
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")
OPERATOR_NS = "kmm-operator-system"
SA = "kmm-operator-controller"
MODULE_NS = "kmm-bench"
NODE_LABEL = "kmm-bench/node"
WRITE_VERBS = ("create", "update", "patch", "delete", "deletecollection")


def say(msg):
    print(f"==> {msg}", file=sys.stderr, flush=True)


def loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sh(*args, **kw):
    return subprocess.run(args, check=True, text=True, capture_output=True, **kw).stdout


# ------------------------------------------------------------------------------------------------
# A small client for the API server (admin certificate) and for the registry.


class Busy(RuntimeError):
    """The API server answered 429 or 5xx: overloaded (its watch cache behind etcd, say); try
    again later."""


class Kube:
    def __init__(self, cluster_dir):
        env = dict(
            line.split("=", 1)
            for line in open(os.path.join(cluster_dir, "cluster.env")).read().splitlines()
            if "=" in line
        )
        url = urllib.parse.urlparse(env["APISERVER_URL"].strip("'\""))
        self.host, self.port = url.hostname, url.port
        self.ctx = ssl.create_default_context(cafile=os.path.join(cluster_dir, "pki", "ca.crt"))
        cert, key = self._admin_credentials(cluster_dir)
        self.ctx.load_cert_chain(cert, key)
        self.local = threading.local()

    @staticmethod
    def _admin_credentials(cluster_dir):
        # The admin kubeconfig embeds its certificate and key; write them out for ssl.
        text = open(os.path.join(cluster_dir, "kubeconfig")).read()
        found = {}
        for line in text.splitlines():
            line = line.strip()
            for field in ("client-certificate-data", "client-key-data"):
                if line.startswith(field + ":"):
                    found[field] = base64.b64decode(line.split(":", 1)[1].strip())
        paths = []
        for field, name in (("client-certificate-data", "bench-admin.crt"), ("client-key-data", "bench-admin.key")):
            path = os.path.join(cluster_dir, "pki", name)
            with open(path, "wb") as f:
                f.write(found[field])
            os.chmod(path, 0o600)
            paths.append(path)
        return paths

    def _conn(self):
        conn = getattr(self.local, "conn", None)
        if conn is None:
            conn = http.client.HTTPSConnection(self.host, self.port, context=self.ctx, timeout=120)
            self.local.conn = conn
        return conn

    def request(self, method, path, body=None, content_type="application/json", accept="application/json"):
        data = None if body is None else json.dumps(body).encode()
        headers = {"Accept": accept, "User-Agent": "kmm-bench"}
        if data is not None:
            headers["Content-Type"] = content_type
        for attempt in range(3):
            conn = self._conn()
            try:
                conn.request(method, path, body=data, headers=headers)
                resp = conn.getresponse()
                raw = resp.read()
                break
            except (http.client.HTTPException, OSError):
                conn.close()
                self.local.conn = None
                if attempt == 2:
                    raise
                time.sleep(0.5)
        payload = json.loads(raw) if raw else None
        return resp.status, payload

    def must(self, method, path, body=None, ok=(200, 201), **kw):
        status, payload = self.request(method, path, body, **kw)
        if status not in ok and (status == 429 or status >= 500):
            raise Busy(f"{method} {path}: HTTP {status}: {json.dumps(payload)[:400]}")
        if status not in ok:
            raise RuntimeError(f"{method} {path}: HTTP {status}: {json.dumps(payload)[:400]}")
        return payload

    def list(self, path, metadata_only=False):
        accept = (
            "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1,application/json"
            if metadata_only
            else "application/json"
        )
        items, cont = [], ""
        while True:
            sep = "&" if "?" in path else "?"
            q = f"{path}{sep}limit=1000" + (f"&continue={urllib.parse.quote(cont)}" if cont else "")
            page = self.must("GET", q, accept=accept)
            items.extend(page.get("items") or [])
            cont = page.get("metadata", {}).get("continue")
            if not cont:
                return items


def push_image(registry, repo, tag):
    """One-layer OCI image (a tar with a file naming the image), as scripts/lab.sh pushes it."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        content = f"{repo}:{tag}\n".encode()
        info = tarfile.TarInfo("IMAGE")
        info.size = len(content)
        tar.addfile(info, io.BytesIO(content))
    layer = buf.getvalue()
    layer_digest = "sha256:" + hashlib.sha256(layer).hexdigest()
    config = json.dumps(
        {"architecture": "amd64", "os": "linux", "config": {}, "rootfs": {"type": "layers", "diff_ids": [layer_digest]}}
    ).encode()
    conn = http.client.HTTPConnection(registry, timeout=30)
    for blob in (layer, config):
        digest = "sha256:" + hashlib.sha256(blob).hexdigest()
        conn.request("POST", f"/v2/{repo}/blobs/uploads/")
        resp = conn.getresponse()
        resp.read()
        location = urllib.parse.urlparse(resp.getheader("Location"))
        target = location.path + "?" + (location.query + "&" if location.query else "") + f"digest={digest}"
        conn.request("PUT", target, body=blob, headers={"Content-Type": "application/octet-stream"})
        resp = conn.getresponse()
        resp.read()
        if resp.status != 201:
            raise RuntimeError(f"blob upload for {repo}:{tag}: HTTP {resp.status}")
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": "sha256:" + hashlib.sha256(config).hexdigest(),
            "size": len(config),
        },
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest, "size": len(layer)}],
    }
    conn.request(
        "PUT",
        f"/v2/{repo}/manifests/{tag}",
        body=json.dumps(manifest).encode(),
        headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"},
    )
    resp = conn.getresponse()
    resp.read()
    if resp.status != 201:
        raise RuntimeError(f"manifest push for {repo}:{tag}: HTTP {resp.status}")
    conn.close()


# ------------------------------------------------------------------------------------------------
# The operator's requests, from the audit log.


class AuditFollower(threading.Thread):
    """Follows DIR/logs/audit.log (and its rotations) and keeps one record per request of `user`:
    (time, verb, resource). Watches are counted when they start, other requests when they end."""

    def __init__(self, path, user):
        super().__init__(daemon=True)
        self.path, self.user = path, user
        self.records = []
        self.lock = threading.Lock()
        self.stopping = False
        self.last_write = 0.0

    def run(self):
        handle, inode = None, None
        pending = ""
        while not self.stopping:
            if handle is None:
                try:
                    handle = open(self.path)
                    inode = os.fstat(handle.fileno()).st_ino
                except FileNotFoundError:
                    time.sleep(0.2)
                    continue
            chunk = handle.read(1 << 20)
            if chunk:
                pending += chunk
                lines = pending.split("\n")
                pending = lines.pop()
                self._take(lines)
                continue
            try:
                rotated = os.stat(self.path).st_ino != inode
            except FileNotFoundError:
                rotated = True
            if rotated:
                handle.close()
                handle, pending = None, ""
                continue
            time.sleep(0.2)

    def _take(self, lines):
        out = []
        for line in lines:
            if self.user not in line:
                continue
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("user", {}).get("username") != self.user:
                continue
            verb = event.get("verb", "")
            stage = event.get("stage")
            if (verb == "watch") != (stage == "ResponseStarted"):
                continue
            ref = event.get("objectRef")
            if ref:
                resource = ref.get("resource", "")
                if ref.get("apiGroup"):
                    resource = f"{resource}.{ref['apiGroup']}"
                if ref.get("subresource"):
                    resource = f"{resource}/{ref['subresource']}"
            else:
                resource = "(non-resource)"
            ts = datetime.datetime.fromisoformat(event["requestReceivedTimestamp"].replace("Z", "+00:00")).timestamp()
            code = event.get("responseStatus", {}).get("code", 0)
            out.append((ts, verb, resource, code))
            if verb in WRITE_VERBS:
                self.last_write = max(self.last_write, time.time())
        with self.lock:
            self.records.extend(out)

    def between(self, start, end):
        with self.lock:
            return [r for r in self.records if start <= r[0] < end]


def summarize(records):
    by = {}
    for _, verb, resource, code in records:
        key = f"{verb} {resource}"
        by[key] = by.get(key, 0) + 1
    writes = sum(1 for r in records if r[1] in WRITE_VERBS)
    events = sum(1 for r in records if r[1] in WRITE_VERBS and r[2].split("/")[0] in ("events", "events.events.k8s.io"))
    conflicts = sum(1 for r in records if r[1] in WRITE_VERBS and r[3] == 409)
    return {
        "requests": len(records),
        "writes": writes - events,
        "event_writes": events,
        "write_conflicts": conflicts,
        "lists": sum(1 for r in records if r[1] == "list"),
        "gets": sum(1 for r in records if r[1] == "get"),
        "by_verb_resource": dict(sorted(by.items(), key=lambda kv: -kv[1])),
    }


# ------------------------------------------------------------------------------------------------
# The minimum number of writes (the formula is explained in bench/report.md).


def minimum_writes(n, m, phase):
    """The fewest writes the job allows: every worker pod is its own object (create, finalizer
    release, delete), while the NMC spec, the NMC status and the node's labels are per node and
    can carry all M Modules at once (one write per state change of the node)."""
    if phase == "nodes":
        return 0
    if phase == "apply":
        # per node: NMC create with all M entries, NMC status with all M loaded, ready labels
        # per node and Module: load pod create, finalizer release, delete
        # per Module: finalizer, MIC apply, MIC status, Module status; per namespace: 1 label
        return n * (3 + 3 * m) + 4 * m + 1
    if phase == "change":
        # per node: NMC spec with the M new entries; NMC status after the unloads and after the
        #   loads; ready labels removed at unload and set again after the load
        # per node and Module: unload pod and load pod (create, release, delete each)
        # per Module: MIC apply, MIC status, Module status
        return n * (5 + 6 * m) + 3 * m
    if phase == "delete":
        # per node: NMC spec without the entries, NMC status, ready labels off, in-use labels off
        # per node and Module: unload pod (create, release, delete)
        # per Module: finalizer removal; per namespace: label removal
        return n * (4 + 3 * m) + m + 1
    raise ValueError(phase)


# ------------------------------------------------------------------------------------------------
# The run.


class Proc:
    def __init__(self, pid):
        self.pid = pid
        self.tick = os.sysconf("SC_CLK_TCK")

    def cpu_seconds(self):
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / self.tick

    def memory_kib(self):
        out = {}
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    out[line.split(":")[0]] = int(line.split()[1])
        return out


class Bench:
    def __init__(self, args):
        self.args = args
        self.dir = args.dir
        self.cluster_dir = os.path.join(self.dir, "cluster")
        self.children = []
        self.kernels = [f"6.{k}.0-{10 + k}-bench" for k in range(args.kernels)]

    # --- set-up -------------------------------------------------------------------------------

    def build(self):
        if shutil.which("docker-registry") is None:
            say("installing docker-registry (apt-get)")
            sudo = [] if os.geteuid() == 0 else ["sudo"]
            if subprocess.run(sudo + ["apt-get", "install", "-y", "-qq", "docker-registry"]).returncode != 0:
                subprocess.run(sudo + ["apt-get", "update", "-qq"], check=True)
                subprocess.run(sudo + ["apt-get", "install", "-y", "-qq", "docker-registry"], check=True)
        if self.args.operator_bin:
            self.operator_bin = os.path.abspath(self.args.operator_bin)
        else:
            say("building kmm-operator (release)")
            subprocess.run(["cargo", "build", "--release", "-q", "-p", "kmm-operator"], cwd=ROOT, check=True)
            self.operator_bin = os.path.join(ROOT, "target", "release", "kmm-operator")
        self.bin = os.environ.get("KMM_TESTENV_BIN") or sh(os.path.join(ROOT, "testenv", "build.sh")).strip().splitlines()[-1]

    def kubectl(self, *args, stdin=None):
        return subprocess.run(
            [os.path.join(self.bin, "kubectl"), "--kubeconfig", os.path.join(self.cluster_dir, "kubeconfig"), *args],
            check=True, text=True, capture_output=True, input=stdin,
        ).stdout

    def start_cluster(self):
        say(f"starting the control plane in {self.cluster_dir}")
        env = dict(os.environ, KMM_TESTENV_BIN=self.bin)
        subprocess.run([os.path.join(ROOT, "testenv", "cluster.sh"), "up", "--dir", self.cluster_dir],
                       env=env, check=True, stdout=subprocess.DEVNULL)
        self.restart_kwok()
        self.restart_controller_manager()
        self.kube = Kube(self.cluster_dir)
        crds = []
        for name in sorted(os.listdir(os.path.join(ROOT, "deploy", "crds"))):
            if name.endswith(".yaml"):
                crds += ["-f", os.path.join(ROOT, "deploy", "crds", name)]
        self.kubectl("apply", "--server-side", "--field-manager=kmm-bench", *crds)
        self.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd", "--all")

    def restart_kwok(self):
        """Same kwok command line as cluster.sh, but with the bench stages (heartbeat every 5 min,
        like a kubelet's status report) and a longer node lease (renewed every lease/4 s)."""
        stages = open(os.path.join(ROOT, "testenv", "kwok", "stages.yaml")).read()
        heartbeat = "  delay:\n    durationMilliseconds: 60000\n    jitterDurationMilliseconds: 70000\n"
        if heartbeat not in stages:
            raise RuntimeError("testenv/kwok/stages.yaml: node heartbeat delay not found; update bench.py")
        stages = stages.replace(heartbeat, "  delay:\n    durationMilliseconds: 300000\n    jitterDurationMilliseconds: 60000\n")
        path = os.path.join(self.dir, "kwok-stages.yaml")
        with open(path, "w") as f:
            f.write(stages)
        self.restart_component("kwok", {"--config": path, "--node-lease-duration-seconds": self.args.lease_seconds})

    def restart_controller_manager(self):
        """Same kube-controller-manager command line as cluster.sh, with a node grace period of
        `--node-grace-seconds`: thousands of simulated kubelets share two cores with the control
        plane and renew their leases late; a real kubelet does not, and the operator must not be
        measured unloading and reloading modules on nodes that only look unreachable."""
        self.restart_component("kube-controller-manager",
                               {"--node-monitor-grace-period": f"{self.args.node_grace_seconds}s"})

    def restart_component(self, component, flags):
        """Restarts a control-plane process started by cluster.sh with `flags` set (replaced or
        added), keeping its pid file and log."""
        pidfile = os.path.join(self.cluster_dir, "pids", f"{component}.pid")
        pid = int(open(pidfile).read())
        argv = open(f"/proc/{pid}/cmdline").read().split("\0")[:-1]
        new = [arg for arg in argv if arg.split("=", 1)[0] not in flags]
        new += [f"{flag}={value}" for flag, value in flags.items()]
        os.kill(pid, signal.SIGTERM)
        for _ in range(100):
            if not os.path.exists(f"/proc/{pid}") or "zombie" in open(f"/proc/{pid}/status").read():
                break
            time.sleep(0.1)
        log = open(os.path.join(self.cluster_dir, "logs", f"{component}.log"), "a")
        proc = subprocess.Popen(new, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
        with open(pidfile, "w") as f:
            f.write(f"{proc.pid}\n")

    def start_registry(self):
        port = free_port()
        self.registry = f"127.0.0.1:{port}"
        data = os.path.join(self.dir, "registry")
        os.makedirs(data, exist_ok=True)
        config = os.path.join(self.dir, "registry.yml")
        with open(config, "w") as f:
            f.write(
                f"version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {data}\n"
                f"http:\n  addr: {self.registry}\n  secret: kmm-bench\n"
            )
        log = open(os.path.join(self.dir, "registry.log"), "w")
        proc = subprocess.Popen(["docker-registry", "serve", config], stdout=log, stderr=log,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        self.children.append(proc)
        deadline = time.time() + 20
        while True:
            try:
                c = http.client.HTTPConnection(self.registry, timeout=2)
                c.request("GET", "/v2/")
                if c.getresponse().status == 200:
                    break
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError("registry did not start; see registry.log")
            time.sleep(0.2)
        images = [(f"bench/kmod-{m}", f"{k}-{tag}") for m in range(self.args.modules)
                  for k in self.kernels for tag in ("v1", "v2")]
        say(f"pushing {len(images)} images to {self.registry}")
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda it: push_image(self.registry, *it), images))

    def start_operator(self):
        self.kube.must("POST", "/api/v1/namespaces", {"metadata": {"name": OPERATOR_NS}})
        self.kubectl("apply", "-n", OPERATOR_NS, "-f", os.path.join(ROOT, "deploy", "base", "rbac.yaml"))
        token = self.kubectl("create", "token", SA, "-n", OPERATOR_NS, "--duration=24h").strip()
        kubeconfig = os.path.join(self.dir, "operator.kubeconfig")
        server = f"https://{self.kube.host}:{self.kube.port}"
        with open(kubeconfig, "w") as f:
            f.write(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n"
                f"    server: {server}\n    certificate-authority: {self.cluster_dir}/pki/ca.crt\n"
                f"users:\n- name: u\n  user:\n    token: {token}\n"
                "contexts:\n- name: x\n  context: {cluster: c, user: u}\ncurrent-context: x\n"
            )
        os.chmod(kubeconfig, 0o600)
        self.audit = AuditFollower(os.path.join(self.cluster_dir, "logs", "audit.log"),
                                   f"system:serviceaccount:{OPERATOR_NS}:{SA}")
        self.audit.start()
        probe = free_port()
        log = open(os.path.join(self.dir, "operator.log"), "w")
        env = dict(os.environ, KUBECONFIG=kubeconfig, RUST_LOG=os.environ.get("RUST_LOG", "info"))
        self.operator_started = time.time()
        proc = subprocess.Popen(
            [self.operator_bin, "run", "--operator-namespace", OPERATOR_NS,
             "--worker-image", "registry.example.com/kmm-rs/kmm-worker:bench",
             "--image-check", "registry", "--leader-elect", "false", "--metrics-bind-address", "0",
             "--health-probe-bind-address", f"127.0.0.1:{probe}"],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=env, start_new_session=True, cwd=self.dir,
        )
        self.children.insert(0, proc)
        self.operator = Proc(proc.pid)
        deadline = time.time() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"kmm-operator exited; see {self.dir}/operator.log")
            try:
                c = http.client.HTTPConnection("127.0.0.1", probe, timeout=2)
                c.request("GET", "/readyz")
                if c.getresponse().status == 200:
                    break
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"kmm-operator not ready after 180 s; see {self.dir}/operator.log")
            time.sleep(0.2)

    def create_nodes(self):
        n = self.args.nodes

        def create(i):
            name = f"bench-node-{i:05d}"
            kernel = self.kernels[i % len(self.kernels)]
            self.kube.must("POST", "/api/v1/nodes", {
                "apiVersion": "v1", "kind": "Node",
                "metadata": {"name": name, "annotations": {"kwok.x-k8s.io/node": "fake"},
                             "labels": {"kubernetes.io/hostname": name, "type": "kwok", NODE_LABEL: "true"}},
                "status": {"nodeInfo": {"kernelVersion": kernel, "osImage": "Debian GNU/Linux 12 (bookworm)",
                                        "bootID": f"{name}-boot-1", "architecture": "amd64",
                                        "operatingSystem": "linux"}},
            })

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(create, range(n)))

        def ready():
            nodes = self.kube.list(f"/api/v1/nodes?labelSelector={NODE_LABEL}%3Dtrue")
            count = sum(1 for node in nodes if any(
                c["type"] == "Ready" and c["status"] == "True" for c in node.get("status", {}).get("conditions") or []))
            return count == n, f"{count}/{n} nodes Ready"

        return ready

    # --- phases -------------------------------------------------------------------------------

    def module_body(self, m, tag):
        return {
            "apiVersion": "kmm.sigs.x-k8s.io/v1beta1", "kind": "Module",
            "metadata": {"name": f"kmod-{m}", "namespace": MODULE_NS},
            "spec": {"selector": {NODE_LABEL: "true"}, "moduleLoader": {"container": {
                "modprobe": {"moduleName": f"kmm_bench_{m}"},
                "registryTLS": {"insecure": True},
                "kernelMappings": [{"literal": k, "containerImage": f"{self.registry}/bench/kmod-{m}:{k}-{tag}"}
                                   for k in self.kernels],
            }}},
        }

    def ready_labels(self):
        return [f"kmm.node.kubernetes.io/{MODULE_NS}.kmod-{m}.ready" for m in range(self.args.modules)]

    def all_labelled(self):
        nodes = self.kube.list(f"/api/v1/nodes?labelSelector={NODE_LABEL}%3Dtrue", metadata_only=True)
        keys = self.ready_labels()
        done = sum(1 for node in nodes if all(k in (node["metadata"].get("labels") or {}) for k in keys))
        return done == self.args.nodes, f"{done}/{self.args.nodes} nodes with all {len(keys)} ready labels"

    def apply(self):
        self.kube.must("POST", "/api/v1/namespaces", {"metadata": {"name": MODULE_NS}})
        for m in range(self.args.modules):
            self.kube.must("POST", f"/apis/kmm.sigs.x-k8s.io/v1beta1/namespaces/{MODULE_NS}/modules",
                           self.module_body(m, "v1"))
        return self.all_labelled

    def change(self):
        for m in range(self.args.modules):
            body = self.module_body(m, "v2")
            self.kube.must("PATCH", f"/apis/kmm.sigs.x-k8s.io/v1beta1/namespaces/{MODULE_NS}/modules/kmod-{m}",
                           {"spec": body["spec"]}, content_type="application/merge-patch+json")

        def converged():
            labelled, _ = self.all_labelled()
            nmcs = self.kube.list("/apis/kmm.sigs.x-k8s.io/v1beta1/nodemodulesconfigs")
            new = sum(
                1 for nmc in nmcs
                if sum(1 for s in (nmc.get("status") or {}).get("modules") or []
                       if (s.get("config") or {}).get("containerImage", "").endswith("-v2")) == self.args.modules
            )
            return labelled and new == self.args.nodes, f"{new}/{self.args.nodes} nodes loaded the new images"

        return converged

    def delete(self):
        for m in range(self.args.modules):
            self.kube.must("DELETE", f"/apis/kmm.sigs.x-k8s.io/v1beta1/namespaces/{MODULE_NS}/modules/kmod-{m}")

        def converged():
            left = self.kube.list(f"/apis/kmm.sigs.x-k8s.io/v1beta1/namespaces/{MODULE_NS}/modules", metadata_only=True)
            nodes = self.kube.list(f"/api/v1/nodes?labelSelector={NODE_LABEL}%3Dtrue", metadata_only=True)
            keys = self.ready_labels()
            labelled = sum(1 for node in nodes if any(k in (node["metadata"].get("labels") or {}) for k in keys))
            return not left and labelled == 0, f"{len(left)} Modules left, {labelled} nodes with a ready label"

        return converged

    def phase(self, name, start_action):
        say(f"phase {name} (load average {loadavg()})")
        cpu0 = self.operator.cpu_seconds()
        load0 = loadavg()
        t0 = time.time()
        check = start_action()
        status, last = "converged", 0.0
        while True:
            try:
                done, progress = check()
            except Busy as err:
                # A convergence poll is no reason to end the run: the next one may get through.
                done, progress = False, f"API server busy: {str(err)[-200:]}"
            if done:
                break
            if time.time() - last > 10:
                say(f"  {progress}  [{time.time() - t0:.0f}s]")
                last = time.time()
            if time.time() - t0 > self.args.timeout:
                status = f"timed out: {progress}"
                break
            time.sleep(1.0)
        converged = time.time() - t0
        say(f"  {name}: {status} after {converged:.1f}s; waiting for the operator's writes to stop")
        # Trailing writes (status, events) belong to the phase: wait until none for `quiet` s.
        deadline = time.time() + 120
        while time.time() < deadline:
            time.sleep(1.0)
            if time.time() - max(self.audit.last_write, t0) >= self.args.quiet:
                break
        time.sleep(1.0)  # let the audit log catch up with the last requests
        t1 = time.time()
        requests = summarize(self.audit.between(t0, t1))
        mem = self.operator.memory_kib()
        result = {
            "phase": name, "status": status, "convergence_s": round(converged, 2),
            "cpu_s": round(self.operator.cpu_seconds() - cpu0, 2),
            "rss_mib_after": round(mem["VmRSS"] / 1024, 1),
            "load_average_start": load0, "load_average_end": loadavg(),
            "minimum_writes": minimum_writes(self.args.nodes, self.args.modules, name),
            **requests,
        }
        if result["minimum_writes"]:
            result["writes_ratio"] = round(requests["writes"] / result["minimum_writes"], 2)
        say(f"  {name}: {requests['writes']} writes (minimum {result['minimum_writes']}), {requests['event_writes']} event writes, "
            f"{requests['requests']} requests, {result['cpu_s']} CPU s")
        return result

    def run(self):
        a = self.args
        started = time.time()
        self.build()
        if os.path.isdir(self.dir):
            shutil.rmtree(self.dir)
        os.makedirs(self.dir)
        try:
            self.start_cluster()
            self.start_registry()
            say("starting kmm-operator (release build, as its ServiceAccount)")
            self.start_operator()
            time.sleep(2)
            idle = self.operator.memory_kib()["VmRSS"]
            startup = summarize(self.audit.between(0, time.time()))
            phases = [self.phase("nodes", self.create_nodes)]
            with_nodes = self.operator.memory_kib()["VmRSS"]
            result = self.save(started, idle, startup, with_nodes, phases)
            actions = {"apply": self.apply, "change": self.change, "delete": self.delete}
            for name in ("apply", "change", "delete"):
                if name in a.phases:
                    phases.append(self.phase(name, actions[name]))
                    # Written after every phase: a run stopped later keeps what it measured.
                    result = self.save(started, idle, startup, with_nodes, phases)
        finally:
            self.stop()
        print(markdown([result]))
        say(f"wrote {os.path.relpath(self.result_path(), ROOT)}")

    def result_path(self):
        a = self.args
        tag = f"n{a.nodes}-m{a.modules}-k{a.kernels}" + (f"-{a.label}" if a.label else "")
        return os.path.join(RESULTS, f"{tag}.json")

    def save(self, started, idle, startup, with_nodes, phases):
        """Writes the result file with the phases measured so far and returns the result."""
        a = self.args
        mem = self.operator.memory_kib()
        total = summarize(self.audit.between(0, time.time()))
        result = {
            "machine": {"cpus": os.cpu_count(), "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
                        "cpu_model": next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?"),
                        "kernel": platform.release(), "python": platform.python_version()},
            "parameters": {"nodes": a.nodes, "modules": a.modules, "kernels": a.kernels, "phases": a.phases,
                           "lease_seconds": a.lease_seconds,
                           "node_grace_seconds": a.node_grace_seconds, "image_check": "registry"},
            "commit": sh("git", "-C", ROOT, "rev-parse", "--short", "HEAD").strip()
                      + ("-dirty" if sh("git", "-C", ROOT, "status", "--porcelain", "--", "crates").strip() else ""),
            "operator_bin": a.operator_bin or "this tree (cargo build --release)",
            "label": a.label,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "startup": {"requests": startup["requests"], "by_verb_resource": startup["by_verb_resource"]},
            "phases": phases,
            "operator": {
                "cpu_s_total": round(self.operator.cpu_seconds(), 2),
                "rss_mib_idle_no_nodes": round(idle / 1024, 1),
                "rss_mib_with_nodes": round(with_nodes / 1024, 1),
                "peak_rss_mib": round(mem["VmHWM"] / 1024, 1),
                "kib_per_node": round((mem["VmHWM"] - idle) / a.nodes, 1),
            },
            "total": {k: total[k] for k in ("requests", "writes", "event_writes", "write_conflicts", "lists", "gets")},
            "wall_s": round(time.time() - started, 1),
        }
        os.makedirs(RESULTS, exist_ok=True)
        with open(self.result_path(), "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
        return result

    def stop(self):
        if getattr(self, "audit", None):
            self.audit.stopping = True
        for proc in self.children:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
        if self.args.keep:
            say(f"kept the cluster in {self.cluster_dir} (testenv/cluster.sh down --dir {self.cluster_dir})")
            return
        subprocess.run([os.path.join(ROOT, "testenv", "cluster.sh"), "down", "--dir", self.cluster_dir],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if sys.exc_info()[0] is None:
            shutil.rmtree(self.dir, ignore_errors=True)
        else:
            say(f"failed or interrupted: logs kept in {self.dir}")


# ------------------------------------------------------------------------------------------------
# Report.


def normalize(r):
    """Results written before event writes were counted apart: take them out of `writes`; the
    minimum always comes from the current formula."""
    for ph in r["phases"]:
        ph["minimum_writes"] = minimum_writes(r["parameters"]["nodes"], r["parameters"]["modules"], ph["phase"])
        if ph["minimum_writes"]:
            ph["writes_ratio"] = round(ph["writes"] / ph["minimum_writes"], 2)
        if "event_writes" not in ph:
            events = sum(v for k, v in ph["by_verb_resource"].items()
                         if k.split()[0] in WRITE_VERBS and k.split()[1].split("/")[0] in ("events", "events.events.k8s.io"))
            ph["event_writes"] = events
            ph["writes"] -= events
            if ph["minimum_writes"]:
                ph["writes_ratio"] = round(ph["writes"] / ph["minimum_writes"], 2)
    return r


def markdown(results):
    out = []
    for r in map(normalize, results):
        p = r["parameters"]
        o = r["operator"]
        out.append(f"### N={p['nodes']} nodes, M={p['modules']} Modules, K={p['kernels']} kernels"
                   + (f" ({r['label']})" if r.get("label") else ""))
        out.append("")
        out.append(f"{r['date']}, commit {r['commit']}, {r['machine']['cpus']} CPUs ({r['machine']['cpu_model']}), "
                   f"{r['machine']['memory_gib']} GiB; kwok lease {p['lease_seconds']} s; run took {r['wall_s']} s")
        out.append("")
        out.append("| phase | converged in | operator writes (no events) | minimum | ratio | event writes | conflicts (409) | lists | gets | all requests | operator CPU s | RSS after | load avg (start → end) |")
        out.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for ph in r["phases"]:
            conv = f"{ph['convergence_s']} s" if ph["status"] == "converged" else ph["status"]
            out.append(f"| {ph['phase']} | {conv} | {ph['writes']} | {ph['minimum_writes']} | {ph.get('writes_ratio', '-')} | "
                       f"{ph.get('event_writes', '-')} | {ph['write_conflicts']} | {ph['lists']} | {ph['gets']} | {ph['requests']} | {ph['cpu_s']} | "
                       f"{ph['rss_mib_after']} MiB | {ph['load_average_start']} → {ph['load_average_end']} |")
        out.append("")
        out.append(f"Operator: {o['cpu_s_total']} CPU s in all; RSS {o['rss_mib_idle_no_nodes']} MiB idle without nodes, "
                   f"{o['rss_mib_with_nodes']} MiB with the nodes, peak {o['peak_rss_mib']} MiB; "
                   f"{o['kib_per_node']} KiB per node (peak minus idle, over N).")
        out.append("")
        out.append("<details><summary>requests by verb and resource, per phase</summary>")
        out.append("")
        for ph in r["phases"]:
            items = ", ".join(f"{k}: {v}" for k, v in ph["by_verb_resource"].items()) or "none"
            out.append(f"- **{ph['phase']}**: {items}")
        out.append("")
        out.append("</details>")
        out.append("")
    return "\n".join(out)


BEGIN, END = "<!-- bench:results:begin -->", "<!-- bench:results:end -->"


def report(_args):
    results = []
    for name in sorted(os.listdir(RESULTS)):
        if name.endswith(".json"):
            with open(os.path.join(RESULTS, name)) as f:
                results.append(json.load(f))
    results.sort(key=lambda r: (r["parameters"]["nodes"], r.get("label") or "", r["date"]))
    path = os.path.join(ROOT, "bench", "report.md")
    text = open(path).read()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    with open(path, "w") as f:
        f.write(head + BEGIN + "\n\n" + markdown(results) + "\n" + END + tail)
    say(f"updated {os.path.relpath(path, ROOT)} from {len(results)} result file(s)")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the benchmark and write bench/results/<params>.json")
    run.add_argument("--nodes", type=int, default=int(os.environ.get("BENCH_NODES", 500)))
    run.add_argument("--modules", type=int, default=int(os.environ.get("BENCH_MODULES", 10)))
    run.add_argument("--kernels", type=int, default=int(os.environ.get("BENCH_KERNELS", 3)))
    run.add_argument("--timeout", type=float, default=1800, help="seconds per phase before giving up")
    run.add_argument("--phases", type=lambda v: [p for p in v.split(",") if p], default=os.environ.get("BENCH_PHASES", "apply,change,delete").split(","),
                     help="comma-separated subset of apply,change,delete (nodes always runs); e.g. apply,delete "
                          "when the simulated kubelet cannot play N·M unload and load pods in the time at hand")
    run.add_argument("--quiet", type=float, default=5, help="seconds without operator writes that end a phase")
    run.add_argument("--lease-seconds", type=int, default=120,
                     help="kwok node lease; renewed every lease/4 s")
    run.add_argument("--node-grace-seconds", type=int, default=600,
                     help="kube-controller-manager --node-monitor-grace-period (default 50 s): how late a "
                          "simulated node may renew its lease before it is marked unreachable")
    run.add_argument("--label", default=os.environ.get("BENCH_LABEL", ""), help="suffix of the result file, e.g. before")
    run.add_argument("--dir", default=os.environ.get("BENCH_DIR", f"/tmp/kmm-rs-bench-{os.getpid()}"))
    run.add_argument("--keep", action="store_true", help="leave the cluster running afterwards")
    run.add_argument("--operator-bin", default=os.environ.get("BENCH_OPERATOR_BIN"),
                     help="a kmm-operator binary to measure instead of building this tree's (e.g. a before/after pair)")
    sub.add_parser("report", help="rebuild the results section of bench/report.md")
    args = parser.parse_args()
    # SIGTERM (kill, a CI timeout) stops the cluster, the registry and the operator like Ctrl-C.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.command == "run":
        Bench(args).run()
    else:
        report(args)


if __name__ == "__main__":
    main()
