"""The benchmark's lab: its cluster file and server configs, up/down, and reading processes.

Two nodes; the namespace `mesh` is enrolled (ambient), `plain` is not. Each namespace has a
`client` pod on node-a and a `server` pod on node-b. The servers run nginx (a 1 KB file) and an
iperf3 server; the plain server also runs the server half of the stunnel pair, and the plain
client runs the client half (it waits for its config, written once the server's IP is known).
So the three paths compared share pods, nodes, bridges and the underlay:

- mesh:    mesh/client ─▶ node proxy (node-a) ═HBONE/mTLS═▶ node proxy (node-b) ─▶ mesh/server
- direct:  plain/client ─────────────────────── tcp ─────────────────────────────▶ plain/server
- stunnel: plain/client ─▶ stunnel client ═══ TLS 1.3, mTLS ═══▶ stunnel server ─▶ plain/server
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
BODY_BYTES = 1024
# enough descriptors for the 10,000-connection figure on every process the lab starts
NOFILE = 65536
CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchLabError(RuntimeError):
    pass


def _server_command(workdir: Path, ns: str, with_stunnel: bool) -> list[str]:
    nginx = (f"nginx -c {workdir}/nginx-{ns}/nginx.conf -e {workdir}/nginx-{ns}/error.log "
             "-g 'daemon off;'")
    parts = [f"{nginx} &", f"iperf3 -s -p {IPERF_PORT} &"]
    if with_stunnel:
        parts.append(f"{STUNNEL} {workdir}/stunnel-server.conf &")
    return ["sh", "-c", " ".join(parts) + " wait"]


def lab_yaml(workdir: Path) -> str:
    """The cluster file (JSON documents are YAML too)."""
    wait_conf = (f"while [ ! -s {workdir}/stunnel-client.conf ]; do sleep 0.1; done; "
                 f"exec {STUNNEL} {workdir}/stunnel-client.conf")
    docs: list[dict[str, Any]] = [
        {"apiVersion": "nodeproxy.io/v1alpha1", "kind": "Lab", "metadata": {"name": "bench"},
         "spec": {"nodes": [{"name": "node-a"}, {"name": "node-b"}]}},
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
    return "---\n".join(json.dumps(d) + "\n" for d in docs)


def nginx_conf(directory: Path) -> str:
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
    }}
}}
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

    def __init__(self, lab_dir: Path, prefix: str, workdir: Path) -> None:
        self.lab_dir, self.prefix, self.workdir = lab_dir, prefix, workdir
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
        for ns in ("mesh", "plain"):
            d = self.workdir / f"nginx-{ns}"
            (d / "tmp").mkdir(parents=True, exist_ok=True)
            (d / "www").mkdir(exist_ok=True)
            (d / "www" / "1k").write_bytes(b"x" * BODY_BYTES)
            (d / "nginx.conf").write_text(nginx_conf(d))
        self.pki = pki.write_stunnel_pki(self.workdir / "pki")
        (self.workdir / "stunnel-server.conf").write_text(
            stunnel_server_conf(self.workdir, self.pki))
        stale = self.workdir / "stunnel-client.conf"
        stale.unlink(missing_ok=True)
        lab_file = self.workdir / "bench-lab.yaml"
        lab_file.write_text(lab_yaml(self.workdir))
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

    def wait_http(self, pod: str, url: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            p = self.run_in(pod, ["curl", "-sS", "-f", "-m", "3", "-o", "/dev/null", url], 10)
            if p.returncode == 0:
                return
            last = p.stderr.strip()
            time.sleep(0.3)
        raise BenchLabError(f"{pod} -> {url} never answered: {last}")
