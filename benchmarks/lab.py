"""The benchmark's lab: its cluster file and server configs, up/down, and reading processes.

Two nodes; the namespace `mesh` is enrolled (ambient), `plain` is not. Each namespace has a
`client` pod on node-a and a `server` pod on node-b. The servers run nginx (a 1 KB file) and an
iperf3 server; the plain server also runs the server half of the stunnel pair, and the plain
client runs the client half (it waits for its config, written once the server's IP is known).
So the three paths compared share pods, nodes, bridges and the underlay:

- mesh:    mesh/client ─▶ node proxy (node-a) ═HBONE/mTLS═▶ node proxy (node-b) ─▶ mesh/server
- direct:  plain/client ─────────────────────── tcp ─────────────────────────────▶ plain/server
- stunnel: plain/client ─▶ stunnel client ═══ TLS 1.3, mTLS ═══▶ stunnel server ─▶ plain/server

With the L7 case, the namespace `l7` (ambient, with an L7 gateway) has a `server` pod (nginx) on
node-b behind the Service `web`, and `plain` gets an `haproxy` pod on the gateway's node:

- mesh:    mesh/client ─▶ node proxy ═HBONE═▶ l7/nodeproxy-gateway ═HBONE═▶ node proxy ─▶ l7/server
- direct:  plain/client ─────────────────────── tcp ─────────────────────────────▶ plain/server
- haproxy: plain/client ─▶ plain/haproxy (HTTP) ═══ TLS 1.3, mTLS ═══▶ nginx of plain/server
"""

from __future__ import annotations

import json
import logging
import os
import resource
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import pki
from benchmarks.tools import parse_proc_stat_cpu_ticks, parse_status_kb

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
NGINX_PORT = 8080
IPERF_PORT = 5201
# the stunnel pair: client listens on the client pod's loopback, server on the server pod
STUNNEL_HTTP_LOCAL, STUNNEL_HTTP_REMOTE = 18080, 18443
STUNNEL_IPERF_LOCAL, STUNNEL_IPERF_REMOTE = 15201, 15443
STUNNEL = "/usr/bin/stunnel4"
# the L7 case: the gateway's namespace and Service; the lab places a namespace's gateway on
# node (sum of the name's code points mod the number of nodes): "l7" lands on node-b
L7_NS, L7_SERVICE, L7_SERVICE_PORT = "l7", "web", 80
L7_GATEWAY_POD = f"{L7_NS}/nodeproxy-gateway"
L7_GATEWAY_NODE = "node-b"
# plain/server's extra nginx listeners: HTTP/2 prior knowledge, and TLS with client certs
NGINX_H2C_PORT, NGINX_TLS_PORT = 8081, 8443
# haproxy: HTTP/1.1 and HTTP/2 (prior knowledge) front ends
HAPROXY_H1_PORT, HAPROXY_H2_PORT = 8080, 8081
HAPROXY = "/usr/sbin/haproxy"
BODY_BYTES = 1024
# enough descriptors for the 10,000-connection figure on every process the lab starts
NOFILE = 65536
CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchLabError(RuntimeError):
    pass


def _server_command(workdir: Path, ns: str, with_stunnel: bool, with_iperf: bool = True
                    ) -> list[str]:
    nginx = (f"nginx -c {workdir}/nginx-{ns}/nginx.conf -e {workdir}/nginx-{ns}/error.log "
             "-g 'daemon off;'")
    parts = [f"{nginx} &"]
    if with_iperf:
        parts.append(f"iperf3 -s -p {IPERF_PORT} &")
    if with_stunnel:
        parts.append(f"{STUNNEL} {workdir}/stunnel-server.conf &")
    return ["sh", "-c", " ".join(parts) + " wait"]


def _wait_then(conf: Path, command: str) -> list[str]:
    """A pod command that waits for its config (written once the lab's IPs are known)."""
    return ["sh", "-c", f"while [ ! -s {conf} ]; do sleep 0.1; done; exec {command}"]


def lab_yaml(workdir: Path, l7: bool = False, workers: int = 1) -> str:
    """The cluster file (JSON documents are YAML too); `l7` adds the L7 case's pods;
    `workers` > 1 runs each node proxy with that many worker processes."""
    node_extra: dict[str, Any] = {"workers": workers} if workers > 1 else {}
    wait_conf = (f"while [ ! -s {workdir}/stunnel-client.conf ]; do sleep 0.1; done; "
                 f"exec {STUNNEL} {workdir}/stunnel-client.conf")
    docs: list[dict[str, Any]] = [
        {"apiVersion": "nodeproxy.io/v1alpha1", "kind": "Lab", "metadata": {"name": "bench"},
         "spec": {"nodes": [{"name": "node-a", **node_extra},
                            {"name": "node-b", **node_extra}]}},
        {"apiVersion": "v1", "kind": "Namespace",
         "metadata": {"name": "mesh", "labels": {"nodeproxy.io/dataplane-mode": "ambient"}}},
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "plain"}},
    ]

    def pod(ns: str, name: str, node: str, command: list[str]) -> dict[str, Any]:
        return {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": ns, "labels": {"app": name}},
                "spec": {"nodeName": node, "serviceAccountName": name,
                         "containers": [{"name": name, "command": command}]}}

    docs += [
        pod("mesh", "client", "node-a", ["sleep", "infinity"]),
        pod("mesh", "server", "node-b", _server_command(workdir, "mesh", False)),
        pod("plain", "client", "node-a", ["sh", "-c", wait_conf]),
        pod("plain", "server", "node-b", _server_command(workdir, "plain", True)),
    ]
    if l7:
        docs += [
            {"apiVersion": "v1", "kind": "Namespace",
             "metadata": {"name": L7_NS, "labels": {"nodeproxy.io/dataplane-mode": "ambient",
                                                    "nodeproxy.io/l7-gateway": "enabled"}}},
            pod(L7_NS, "server", "node-b", _server_command(workdir, L7_NS, False, False)),
            {"apiVersion": "v1", "kind": "Service",
             "metadata": {"name": L7_SERVICE, "namespace": L7_NS},
             "spec": {"selector": {"app": "server"},
                      "ports": [{"name": "http", "port": L7_SERVICE_PORT,
                                 "targetPort": NGINX_PORT}]}},
            # the C reference sits on the gateway's node, as the gateway does
            pod("plain", "haproxy", L7_GATEWAY_NODE,
                _wait_then(workdir / "haproxy.cfg",
                           f"{HAPROXY} -db -f {workdir}/haproxy.cfg")),
        ]
    return "---\n".join(json.dumps(d) + "\n" for d in docs)


def nginx_conf(directory: Path, h2c: bool = False, tls: dict[str, Path] | None = None) -> str:
    """One worker serving `www/`; `h2c` adds an HTTP/2 prior-knowledge listener, `tls` (the
    throwaway PKI) a TLS listener that requires a client certificate of that CA."""
    extra = ""
    if h2c:
        extra += f"""
    server {{
        listen {NGINX_H2C_PORT} http2 backlog=4096;
        location / {{ root {directory}/www; }}
    }}"""
    if tls:
        extra += f"""
    server {{
        listen {NGINX_TLS_PORT} ssl backlog=4096;
        ssl_protocols TLSv1.3;
        ssl_certificate {tls['server']};
        ssl_certificate_key {tls['server_key']};
        ssl_client_certificate {tls['ca']};
        ssl_verify_client on;
        ssl_session_cache shared:bench:1m;
        location / {{ root {directory}/www; }}
    }}"""
    return f"""\
worker_processes 1;
worker_rlimit_nofile {NOFILE};
pid {directory}/nginx.pid;
error_log {directory}/error.log warn;
events {{ worker_connections 30000; }}
http {{
    access_log off;
    client_body_temp_path {directory}/tmp/body;
    proxy_temp_path {directory}/tmp/proxy;
    fastcgi_temp_path {directory}/tmp/fastcgi;
    uwsgi_temp_path {directory}/tmp/uwsgi;
    scgi_temp_path {directory}/tmp/scgi;
    # idle connections of the memory figure must stay open while they are counted
    keepalive_timeout 900s;
    keepalive_requests 10000000;
    client_header_timeout 900s;
    server {{
        listen {NGINX_PORT} backlog=4096;
        location / {{ root {directory}/www; }}
    }}{extra}
}}
"""


def haproxy_conf(workdir: Path, paths: dict[str, Path], server_ip: str) -> str:
    """haproxy on one thread as an HTTP reverse proxy: HTTP/1.1 and h2c in, mTLS (TLS 1.3, the
    throwaway CA, the server's name checked) to nginx's TLS listener, connections reused."""
    # two descriptors per proxied connection, within the limit the lab's processes get
    maxconn = (nofile_limit() - 200) // 2
    return f"""\
global
    nbthread 1
    maxconn {maxconn}
    log stderr format raw local0 err
    ssl-server-verify required
defaults
    mode http
    log global
    timeout connect 5s
    timeout client 900s
    timeout server 900s
    timeout http-keep-alive 900s
    http-reuse always
frontend h1
    bind :{HAPROXY_H1_PORT} backlog 4096
    default_backend nginx
frontend h2
    bind :{HAPROXY_H2_PORT} proto h2 backlog 4096
    default_backend nginx
backend nginx
    server s1 {server_ip}:{NGINX_TLS_PORT} ssl ssl-min-ver TLSv1.3 crt {paths['client_pem_key']} \
ca-file {paths['ca']} verify required verifyhost server.bench sni str(server.bench)
"""


def _stunnel_common(log_file: Path) -> str:
    return f"foreground = yes\npid =\nsyslog = no\ndebug = 3\noutput = {log_file}\n"


def _stunnel_service(name: str, accept: str, connect: str, paths: dict[str, Path], role: str,
                     ) -> str:
    lines = [
        f"[{name}]", f"accept = {accept}", f"connect = {connect}",
        f"cert = {paths[role]}", f"key = {paths[role + '_key']}", f"CAfile = {paths['ca']}",
        "verifyChain = yes", "requireCert = yes", "sslVersionMin = TLSv1.3",
    ]
    if role == "client":
        lines += ["client = yes", "checkHost = server.bench"]
    return "\n".join(lines) + "\n"


def stunnel_server_conf(workdir: Path, paths: dict[str, Path]) -> str:
    return (_stunnel_common(workdir / "stunnel-server.log")
            + _stunnel_service("http", f"0.0.0.0:{STUNNEL_HTTP_REMOTE}",
                               f"127.0.0.1:{NGINX_PORT}", paths, "server")
            + _stunnel_service("iperf", f"0.0.0.0:{STUNNEL_IPERF_REMOTE}",
                               f"127.0.0.1:{IPERF_PORT}", paths, "server"))


def stunnel_client_conf(workdir: Path, paths: dict[str, Path], server_ip: str) -> str:
    return (_stunnel_common(workdir / "stunnel-client.log")
            + _stunnel_service("http", f"127.0.0.1:{STUNNEL_HTTP_LOCAL}",
                               f"{server_ip}:{STUNNEL_HTTP_REMOTE}", paths, "client")
            + _stunnel_service("iperf", f"127.0.0.1:{STUNNEL_IPERF_LOCAL}",
                               f"{server_ip}:{STUNNEL_IPERF_REMOTE}", paths, "client"))


# -- /proc ------------------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            text = Path(f"/proc/{pid}/task/{task}/children").read_text()
            out += [int(c) for c in text.split()]
    except OSError:
        pass
    return out


def process_tree(pid: int) -> list[int]:
    """The process and its descendants (a proxy that forks workers is counted whole)."""
    seen, todo = [], [pid]
    while todo:
        p = todo.pop()
        if p not in seen:
            seen.append(p)
            todo += _children(p)
    return seen


def cpu_seconds(pids: list[int]) -> float:
    """user + system CPU of the processes (and their descendants), in seconds."""
    ticks = 0
    for root in pids:
        for p in process_tree(root):
            try:
                ticks += parse_proc_stat_cpu_ticks(Path(f"/proc/{p}/stat").read_text())
            except OSError:
                pass  # exited between listing and reading
    return ticks / CLK_TCK


def rss_kb(pids: list[int]) -> int:
    total = 0
    for root in pids:
        for p in process_tree(root):
            try:
                total += parse_status_kb(Path(f"/proc/{p}/status").read_text(), "VmRSS")
            except OSError:
                pass
    return total


def find_pids(exe_name: str, arg: str) -> list[int]:
    """Processes whose argv[0] ends with `exe_name` and whose argv holds `arg`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].decode(errors="replace").endswith(exe_name) and \
                arg.encode() in argv:
            found.append(int(entry))
    return found


def _ppid(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    return int(stat[stat.rfind(")") + 2:].split()[1])


def find_pids_with_arg(arg: str, exe_name: str = "") -> list[int]:
    """The topmost processes whose argv holds `arg` (a wrapper and the process it runs are
    one tree: counting both would count the child twice)."""
    found = set(find_pids(exe_name, arg))
    return sorted(p for p in found if _ppid(p) not in found)


def nofile_limit() -> int:
    """The descriptor limit the lab's processes get (the harness raises it to its hard limit)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return NOFILE if hard == resource.RLIM_INFINITY else min(hard, NOFILE)


def _raise_nofile() -> None:
    # inherited by the supervisor and everything it starts (proxies, nginx, stunnel)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = NOFILE if hard == resource.RLIM_INFINITY else min(NOFILE, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), max(hard, want)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# -- the lab ----------------------------------------------------------------------------------


@dataclass
class Pod:
    namespace: str
    name: str
    netns: str
    ip: str
    node: str


class BenchLab:
    """A lab at its own directory and netns prefix, driven through the `nodeproxy lab` CLI."""

    def __init__(self, lab_dir: Path, prefix: str, workdir: Path, l7: bool = False,
                 workers: int = 1) -> None:
        self.lab_dir, self.prefix, self.workdir, self.l7 = lab_dir, prefix, workdir, l7
        self.workers = workers  # node proxy worker processes (their CPU and RSS count whole)
        self.env = {**os.environ, "NODEPROXY_LAB_DIR": str(lab_dir),
                    "NODEPROXY_LAB_PREFIX": prefix}
        self.pods: dict[str, Pod] = {}
        self.status: dict[str, Any] = {}
        self.pki: dict[str, Path] = {}

    def cli(self, *args: str, timeout: float = 300, check: bool = True
            ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [sys.executable, "-m", "nodeproxy.cli", "lab", *args], env=self.env, cwd=ROOT,
            capture_output=True, text=True, timeout=timeout, preexec_fn=_raise_nofile,
        )
        if check and proc.returncode != 0:
            raise BenchLabError(f"nodeproxy lab {' '.join(args)} failed ({proc.returncode}):\n"
                                f"{proc.stdout}\n{proc.stderr}")
        return proc

    # -- files --------------------------------------------------------------------------------
    def prepare(self) -> Path:
        """Write the configs, the served file, the certificates and the lab file."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.workdir.chmod(0o755)  # nginx's worker runs as nobody and reads the served file
        self.pki = pki.write_stunnel_pki(self.workdir / "pki")
        # haproxy's `crt` takes the certificate and its key in one file
        combined = self.workdir / "pki" / "client-combined.pem"
        combined.write_bytes(self.pki["client"].read_bytes() + self.pki["client_key"].read_bytes())
        combined.chmod(0o600)
        self.pki["client_pem_key"] = combined
        for ns in ("mesh", "plain", *([L7_NS] if self.l7 else [])):
            d = self.workdir / f"nginx-{ns}"
            (d / "tmp").mkdir(parents=True, exist_ok=True)
            (d / "www").mkdir(exist_ok=True)
            (d / "www" / "1k").write_bytes(b"x" * BODY_BYTES)
            plain = ns == "plain" and self.l7
            (d / "nginx.conf").write_text(
                nginx_conf(d, h2c=plain, tls=self.pki if plain else None))
        (self.workdir / "stunnel-server.conf").write_text(
            stunnel_server_conf(self.workdir, self.pki))
        for stale in ("stunnel-client.conf", "haproxy.cfg"):
            (self.workdir / stale).unlink(missing_ok=True)
        lab_file = self.workdir / "bench-lab.yaml"
        lab_file.write_text(lab_yaml(self.workdir, self.l7, self.workers))
        return lab_file

    # -- lifecycle ----------------------------------------------------------------------------
    def up(self) -> None:
        self.cli("down", check=False, timeout=120)  # leftovers of a crashed run
        lab_file = self.prepare()
        self.cli("up", str(lab_file))
        self.refresh()
        conf = self.workdir / "stunnel-client.conf"
        tmp = conf.with_suffix(".tmp")
        tmp.write_text(stunnel_client_conf(self.workdir, self.pki, self.pod("plain/server").ip))
        tmp.rename(conf)  # the waiting client pod starts stunnel once the file is whole
        if self.l7:
            conf = self.workdir / "haproxy.cfg"
            tmp = conf.with_suffix(".tmp")
            tmp.write_text(haproxy_conf(self.workdir, self.pki, self.pod("plain/server").ip))
            tmp.rename(conf)

    def down(self) -> subprocess.CompletedProcess[str]:
        return self.cli("down", check=False, timeout=180)

    def refresh(self) -> None:
        self.status = json.loads(self.cli("status", "--json").stdout)
        self.pods = {
            f"{p['namespace']}/{p['name']}": Pod(p["namespace"], p["name"], p["netns"], p["ip"],
                                                 p["node"])
            for p in self.status.get("pods", [])
        }
        for ref, p in self.pods.items():
            if not p.ip:
                raise BenchLabError(f"pod {ref} has no IP: {self.status}")

    def pod(self, ref: str) -> Pod:
        try:
            return self.pods[ref]
        except KeyError:
            raise BenchLabError(f"no pod {ref} in the lab") from None

    # -- processes ----------------------------------------------------------------------------
    def node_proxy_pid(self, node: str) -> int:
        for n in self.status.get("nodes", []):
            if n["name"] == node:
                comp = n.get("components", {}).get(f"ztunnel-{node}") or {}
                if comp.get("pid"):
                    return int(comp["pid"])
        raise BenchLabError(f"no running node proxy on {node} in lab status")

    def service_ip(self, namespace: str, name: str) -> str:
        for svc in self.status.get("services", []):
            if svc["namespace"] == namespace and svc["name"] == name and svc.get("cluster_ip"):
                return str(svc["cluster_ip"])
        raise BenchLabError(f"no service {namespace}/{name} with a cluster IP in lab status")

    def gateway_pids(self, namespace: str = L7_NS) -> list[int]:
        """The gateway process of a namespace (found by its token file, unique to this lab)."""
        pids = find_pids_with_arg(str(self.lab_dir / "gateways" / namespace / "token"))
        if not pids:
            raise BenchLabError(f"no gateway process of namespace {namespace} running")
        return pids

    def haproxy_pids(self) -> list[int]:
        return find_pids_with_arg(str(self.workdir / "haproxy.cfg"), exe_name="haproxy")

    def stunnel_pids(self) -> dict[str, list[int]]:
        return {
            "client": find_pids("stunnel4", str(self.workdir / "stunnel-client.conf")),
            "server": find_pids("stunnel4", str(self.workdir / "stunnel-server.conf")),
        }

    def run_in(self, pod: str, cmd: list[str], timeout: float
               ) -> subprocess.CompletedProcess[str]:
        """Run a command in a pod's network namespace (what `nodeproxy lab exec` does)."""
        argv = ["ip", "netns", "exec", self.pod(pod).netns, *cmd]
        log.debug("run: %s", shlex.join(argv))
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)

    def popen_in(self, pod: str, cmd: list[str]) -> subprocess.Popen[str]:
        return subprocess.Popen(["ip", "netns", "exec", self.pod(pod).netns, *cmd],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, preexec_fn=_raise_nofile)

    def wait_http(self, pod: str, url: str, timeout: float = 30, *curl_args: str) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            p = self.run_in(pod, ["curl", "-sS", "-f", "-m", "3", "-o", "/dev/null",
                                  *curl_args, url], 10)
            if p.returncode == 0:
                return
            last = p.stderr.strip()
            time.sleep(0.3)
        raise BenchLabError(f"{pod} -> {url} never answered: {last}")
