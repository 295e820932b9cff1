"""The cases, their paths (the subject and its baselines) and the figures measured on each.

A *case* is a scenario (L4 cross-node; L7 through a namespace gateway). It has *paths*: the
mesh path first, then its baselines (direct, and a C reference). A *figure* is one measurement
run on every path (throughput, latency, …); it yields one or more *metrics* (rows of the
report).
Paths are measured interleaved, figure by figure and repetition by repetition, so that load
from elsewhere on the machine falls on all of them alike.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path as FsPath
from typing import Any

from benchmarks import lab as labmod
from benchmarks.lab import BenchLab
from benchmarks.tools import (
    ToolOutputError,
    h2load_cmd,
    h2load_rate_cmd,
    iperf3_cmd,
    median,
    parse_h2load,
    parse_h2load_log,
    parse_iperf3,
    parse_wrk,
    prom_sum,
    ratio,
    wrk_cmd,
)

log = logging.getLogger(__name__)
HOLD_SCRIPT = FsPath(__file__).with_name("hold.py")


@dataclass(frozen=True)
class Mode:
    name: str
    seconds: float  # per load run
    reps: int  # repetitions of each timed figure; the report gives their median
    idle_conns: tuple[int, ...]
    concurrency: int = 32
    # the pod-memory figure: how many idle pods its node holds beyond its own, step by step
    extra_pods: tuple[int, ...] = ()


MODES = {
    "smoke": Mode("smoke", seconds=1, reps=1, idle_conns=(20,), extra_pods=(2,)),
    "quick": Mode("quick", seconds=3, reps=1, idle_conns=(100,), extra_pods=(20,)),
    "full": Mode("full", seconds=5, reps=5, idle_conns=(1000, 10000), extra_pods=(20, 100)),
}
# parallel iperf3 streams of the throughput figures: CPU per byte as connections grow
STREAMS = (1, 8, 32)


@dataclass(frozen=True)
class Metric:
    key: str
    title: str
    unit: str
    better: str  # "higher" | "lower"


@dataclass
class Path:
    """One way from the client pod to the servers."""

    name: str
    label: str
    client_pod: str
    http_host: str
    http_port: int
    iperf_host: str
    iperf_port: int
    # role -> pids; empty: no proxy. Roles: "client" and "server" (the proxies at either end:
    # node proxies, stunnel) and "gateway" (the L7 proxy in the middle: gateway, haproxy)
    proxies: Callable[[], dict[str, list[int]]] = dict
    # descriptors one held connection costs the busiest proxy process of the path
    fds_per_conn: int = 1
    h2_port: int | None = None  # where the path takes HTTP/2 prior knowledge, if it does
    # the client pod's node proxy enrolls the pods of this (ambient) namespace: the
    # pod-memory figure adds idle pods there; None: the path has no node proxy to weigh
    pods_namespace: str | None = None

    @property
    def url(self) -> str:
        return f"http://{self.http_host}:{self.http_port}/1k"

    @property
    def h2_url(self) -> str | None:
        return f"http://{self.http_host}:{self.h2_port}/1k" if self.h2_port else None


@dataclass
class Samples:
    """What the figures measured: metric -> path -> one value per repetition."""

    values: dict[str, dict[str, list[float | None]]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, metric: str, path: str, value: float | None) -> None:
        self.values.setdefault(metric, {}).setdefault(path, []).append(value)


class FigureError(RuntimeError):
    pass


# -- running tools ----------------------------------------------------------------------------


def _run_tool(lab: BenchLab, path: Path, cmd: list[str], timeout: float) -> str:
    try:
        proc = lab.run_in(path.client_pod, cmd, timeout)
    except subprocess.TimeoutExpired as e:
        raise FigureError(f"{path.name}: {' '.join(cmd)} timed out after {timeout:g}s") from e
    if proc.returncode != 0 and not proc.stdout.strip():
        raise FigureError(f"{path.name}: {' '.join(cmd)} exited {proc.returncode}: "
                          f"{proc.stderr.strip()[-400:]}")
    return proc.stdout


def _proxy_cpu(path: Path) -> dict[str, float]:
    """CPU seconds so far of each role's proxies (roles without pids are left out)."""
    return {role: labmod.cpu_seconds(pids) for role, pids in path.proxies().items() if pids}


@dataclass
class Cpu:
    """CPU seconds the path's proxies spent during one run, per role."""

    by_role: dict[str, float]

    @property
    def total(self) -> float | None:
        return sum(self.by_role.values()) if self.by_role else None

    def of(self, *roles: str) -> float | None:
        got = [self.by_role[r] for r in roles if r in self.by_role]
        return sum(got) if got else None

    def per_1k(self, value: float | None, requests: int) -> float | None:
        return value / requests * 1000 if value is not None and requests else None


def _timed(lab: BenchLab, path: Path, cmd: list[str], timeout: float) -> tuple[str, Cpu]:
    """Run a load tool; return its output and the CPU seconds the path's proxies spent."""
    before = _proxy_cpu(path)
    out = _run_tool(lab, path, cmd, timeout)
    after = _proxy_cpu(path)
    return out, Cpu({r: after[r] - before[r] for r in before if r in after})


@dataclass
class LoadRun:
    requests_per_second: float
    requests: int
    cpu: Cpu
    latency_ms: dict[int, float]

    def cpu_per_1k(self, *roles: str) -> float | None:
        """CPU seconds per 1000 requests of the given roles' proxies (all without roles)."""
        value = self.cpu.of(*roles) if roles else self.cpu.total
        return self.cpu.per_1k(value, self.requests)


def _wrk(lab: BenchLab, path: Path, mode: Mode, **kw: object) -> LoadRun:
    cmd = wrk_cmd(path.url, mode.seconds, **kw)  # type: ignore[arg-type]
    out, cpu = _timed(lab, path, cmd, mode.seconds + 30)
    try:
        res = parse_wrk(out)
    except ToolOutputError as e:
        raise FigureError(f"{path.name}: {e}") from e
    if res.requests == 0:
        raise FigureError(f"{path.name}: wrk completed no request ({res.socket_errors})")
    if res.errors:
        log.warning("%s: wrk saw errors: %s, non-2xx %d", path.name, res.socket_errors,
                    res.non_2xx)
    return LoadRun(res.requests_per_second, res.requests, cpu, res.latency_ms)


# -- figures ----------------------------------------------------------------------------------

M = Metric
METRICS: dict[str, Metric] = {m.key: m for m in [
    M("tput_1", "bulk throughput, 1 stream", "Gbit/s", "higher"),
    M("tput_1_cpu", "proxy CPU per GB, 1 stream", "CPU s/GB", "lower"),
    M("tput_8", "bulk throughput, 8 streams", "Gbit/s", "higher"),
    M("tput_8_cpu", "proxy CPU per GB, 8 streams", "CPU s/GB", "lower"),
    M("tput_32", "bulk throughput, 32 streams", "Gbit/s", "higher"),
    M("tput_32_cpu", "proxy CPU per GB, 32 streams", "CPU s/GB", "lower"),
    M("lat_p50", "latency p50, 1 connection", "ms", "lower"),
    M("lat_p99", "latency p99, 1 connection", "ms", "lower"),
    M("lat_added_p50", "added p50 latency over direct", "ms", "lower"),
    M("rps", "requests/s, 32 connections", "req/s", "higher"),
    M("rps_cpu", "proxy CPU per 1000 requests (all proxies of the path)", "CPU s", "lower"),
    M("rps_cpu_gw", "gateway / haproxy CPU per 1000 requests", "CPU s", "lower"),
    M("rps_cpu_np", "node proxies' CPU per 1000 requests (both)", "CPU s", "lower"),
    M("h2_rps", "HTTP/2 requests/s, 4 conns × 8 streams (h2load)", "req/s", "higher"),
    M("h2_cpu", "proxy CPU per 1000 HTTP/2 requests (all proxies)", "CPU s", "lower"),
    M("h2_cpu_gw", "gateway / haproxy CPU per 1000 HTTP/2 requests", "CPU s", "lower"),
    M("fr_p50", "latency p50 at a fixed 1,000 req/s (16 conns, h2load)", "ms", "lower"),
    M("fr_p99", "latency p99 at a fixed 1,000 req/s", "ms", "lower"),
    M("fr_vcpu", "proxy CPU at a fixed 1,000 req/s (all proxies of the path)", "vCPU", "lower"),
    M("fr_vcpu_gw", "gateway / haproxy CPU at a fixed 1,000 req/s", "vCPU", "lower"),
    M("cps", "new connections/s (Connection: close, 32 conc.)", "conn/s", "higher"),
    M("cps_cpu", "proxy CPU per 1000 connections (all proxies of the path)", "CPU s", "lower"),
    M("rss_idle_src", "proxy RSS idle, client side", "MB", "lower"),
    M("rss_idle_dst", "proxy RSS idle, server side", "MB", "lower"),
    M("rss_gw_idle", "gateway / haproxy RSS idle", "MB", "lower"),
]}
H2_STREAMS = 8  # streams per HTTP/2 connection; connections = concurrency / H2_STREAMS
# the fixed-rate figure: requests a second in all, over this many HTTP/1.1 connections
FIXED_RATE = 1000
FIXED_RATE_CONNS = 16


def conn_metrics(n: int) -> list[Metric]:
    return [
        Metric(f"rss_{n}_src", f"proxy RSS with {n} idle conns, client side", "MB", "lower"),
        Metric(f"rss_{n}_dst", f"proxy RSS with {n} idle conns, server side", "MB", "lower"),
        Metric(f"kb_per_conn_{n}", f"proxy KB per idle conn at {n} (both sides)", "KB",
               "lower"),
    ]


def gw_conn_metrics(n: int) -> list[Metric]:
    return [
        Metric(f"rss_gw_{n}", f"gateway / haproxy RSS with {n} idle conns", "MB", "lower"),
        Metric(f"kb_per_conn_gw_{n}", f"gateway / haproxy KB per idle conn at {n}", "KB",
               "lower"),
    ]


def fig_throughput(streams: int) -> Callable[[BenchLab, Path, Mode, Samples], None]:
    def run(lab: BenchLab, path: Path, mode: Mode, s: Samples) -> None:
        cmd = iperf3_cmd(path.iperf_host, path.iperf_port, mode.seconds, streams)
        out, run_cpu = _timed(lab, path, cmd, mode.seconds + 30)
        cpu = run_cpu.total
        try:
            res = parse_iperf3(out)
        except ToolOutputError as e:
            raise FigureError(f"{path.name}: {e}") from e
        s.add(f"tput_{streams}", path.name, res.bits_per_second / 1e9)
        gb = res.bytes / 1e9
        s.add(f"tput_{streams}_cpu", path.name, cpu / gb if cpu is not None and gb else None)
    return run


def fig_latency(lab: BenchLab, path: Path, mode: Mode, s: Samples) -> None:
    lat = _wrk(lab, path, mode, connections=1, latency=True).latency_ms
    s.add("lat_p50", path.name, lat.get(50))
    s.add("lat_p99", path.name, lat.get(99))


def fig_rps(lab: BenchLab, path: Path, mode: Mode, s: Samples) -> None:
    run = _wrk(lab, path, mode, connections=mode.concurrency)
    s.add("rps", path.name, run.requests_per_second)
    s.add("rps_cpu", path.name, run.cpu_per_1k())
    # the split by role (shown by the L7 case): the gateway in the middle, the node proxies
    s.add("rps_cpu_gw", path.name, run.cpu_per_1k("gateway"))
    s.add("rps_cpu_np", path.name, run.cpu_per_1k("client", "server"))


def fig_h2_rps(lab: BenchLab, path: Path, mode: Mode, s: Samples) -> None:
    """HTTP/2 (prior knowledge) at the same concurrency as `rps`: fewer connections, streams."""
    if path.h2_url is None:
        s.notes.append(f"{path.name}: HTTP/2 not measured: the path does not speak it")
        return
    conns = max(1, mode.concurrency // H2_STREAMS)
    cmd = h2load_cmd(path.h2_url, mode.seconds, conns, H2_STREAMS)
    out, cpu = _timed(lab, path, cmd, mode.seconds + 30)
    try:
        res = parse_h2load(out)
    except ToolOutputError as e:
        raise FigureError(f"{path.name}: {e}") from e
    if res.status_2xx == 0:
        raise FigureError(f"{path.name}: h2load completed no request: {out.strip()[-300:]}")
    if res.errors:
        log.warning("%s: h2load saw %d failed/errored/non-2xx requests", path.name, res.errors)
    s.add("h2_rps", path.name, res.requests_per_second)
    s.add("h2_cpu", path.name, cpu.per_1k(cpu.total, res.succeeded))
    s.add("h2_cpu_gw", path.name, cpu.per_1k(cpu.of("gateway"), res.succeeded))


def fig_fixed_rate(lab: BenchLab, path: Path, mode: Mode, s: Samples) -> None:
    """Latency and proxy CPU at a fixed request rate, well below every path's maximum (h2load
    ``--rps``): what a service under ordinary load sees, where the other figures saturate."""
    log_file = lab.workdir / "h2load-requests.log"  # the run's work directory, as stunnel's
    log_file.unlink(missing_ok=True)  # h2load appends
    try:
        cmd = h2load_rate_cmd(path.url, mode.seconds, FIXED_RATE_CONNS, FIXED_RATE,
                              str(log_file))
        out, cpu = _timed(lab, path, cmd, mode.seconds + 30)
        try:
            res = parse_h2load(out)
            reqs = parse_h2load_log(log_file.read_text(encoding="ascii", errors="replace"))
        except (ToolOutputError, FileNotFoundError) as e:
            raise FigureError(f"{path.name}: {e}") from e
    finally:
        log_file.unlink(missing_ok=True)
    if not reqs.latencies_ms:
        raise FigureError(f"{path.name}: h2load completed no request: {out.strip()[-300:]}")
    if reqs.not_2xx or res.errors:
        log.warning("%s: h2load at a fixed rate: %d non-2xx, %d failed/errored", path.name,
                    reqs.not_2xx, res.errors)
    if res.requests_per_second < 0.95 * FIXED_RATE:
        s.notes.append(f"{path.name}: the fixed-rate run reached only "
                       f"{res.requests_per_second:,.0f} of {FIXED_RATE:,} req/s")
    s.add("fr_p50", path.name, reqs.percentile(50))
    s.add("fr_p99", path.name, reqs.percentile(99))
    seconds = res.seconds or mode.seconds
    s.add("fr_vcpu", path.name, cpu.total / seconds if cpu.total is not None else None)
    gw = cpu.of("gateway")
    s.add("fr_vcpu_gw", path.name, gw / seconds if gw is not None else None)


def fig_conn_rate(lab: BenchLab, path: Path, mode: Mode, s: Samples) -> None:
    run = _wrk(lab, path, mode, connections=mode.concurrency, close=True)
    s.add("cps", path.name, run.requests_per_second)
    s.add("cps_cpu", path.name, run.cpu_per_1k())


def _rss_mb(pids: list[int]) -> float | None:
    return labmod.rss_kb(pids) / 1024 if pids else None


def fig_memory(lab: BenchLab, path: Path, mode: Mode, s: Samples) -> None:
    """RSS of the path's proxies idle, then while N idle tunneled connections are held."""
    sides = path.proxies()
    if not sides:
        return  # nothing to weigh on the direct path
    src, dst = sides.get("client", []), sides.get("server", [])
    idle_src, idle_dst = _rss_mb(src), _rss_mb(dst)
    s.add("rss_idle_src", path.name, idle_src)
    s.add("rss_idle_dst", path.name, idle_dst)
    for n in mode.idle_conns:
        limit = _nofile_limit()
        if n * path.fds_per_conn + 256 > limit:
            # not an error of the path: the machine's descriptor limit is below what it needs
            s.notes.append(f"{path.name}: {n} connections not measured: each costs a "
                           f"{path.label} process {path.fds_per_conn} descriptors and the "
                           f"limit here is {limit}")
            continue
        held_src, held_dst = _hold(lab, path, n, lambda: (_rss_mb(src), _rss_mb(dst)))
        s.add(f"rss_{n}_src", path.name, held_src)
        s.add(f"rss_{n}_dst", path.name, held_dst)
        grown = [(h - i) for h, i in ((held_src, idle_src), (held_dst, idle_dst))
                 if h is not None and i is not None]
        s.add(f"kb_per_conn_{n}", path.name, sum(grown) * 1024 / n if grown else None)


def fig_gateway_memory(lab: BenchLab, path: Path, mode: Mode, s: Samples) -> None:
    """RSS of the path's gateway (or haproxy) idle, then with N idle connections through it."""
    gw = path.proxies().get("gateway", [])
    if not gw:
        return  # no proxy in the middle of this path
    idle = _rss_mb(gw)
    s.add("rss_gw_idle", path.name, idle)
    for n in mode.idle_conns:
        limit = _nofile_limit()
        if n * path.fds_per_conn + 256 > limit:
            s.notes.append(f"{path.name}: {n} connections not measured: each costs a "
                           f"{path.label} process {path.fds_per_conn} descriptors and the "
                           f"limit here is {limit}")
            continue
        held, _ = _hold(lab, path, n, lambda: (_rss_mb(gw), None))
        s.add(f"rss_gw_{n}", path.name, held)
        grown = held - idle if held is not None and idle is not None else None
        s.add(f"kb_per_conn_gw_{n}", path.name, grown * 1024 / n if grown is not None else None)


# -- memory by enrolled pods ------------------------------------------------------------------

IDLE_POD = "idle-"  # name prefix of the pod-memory figure's pods (service account "idle")


def pod_metrics(mode: Mode) -> list[Metric]:
    out = [Metric("pods_rss_0", "node proxy RSS just restarted, its node's own pods only",
                  "MB", "lower")]
    have = 0
    for n in mode.extra_pods:
        out += [
            Metric(f"pods_rss_{n}", f"node proxy RSS with {n} more idle enrolled pods", "MB",
                   "lower"),
            Metric(f"pods_kb_{n}", f"node proxy KB per enrolled pod at +{n}", "KB", "lower"),
            Metric(f"pods_cpu_{n}", f"node proxy CPU per pod enrolled, pods +{have + 1}…+{n}",
                   "ms", "lower"),
        ]
        have = n
    return out


def idle_pods_yaml(namespace: str, node: str, first: int, last: int) -> str:
    """Pods `idle-<first>` … `idle-<last - 1>` that only sleep (JSON documents are YAML)."""
    docs = [{"apiVersion": "v1", "kind": "Pod",
             "metadata": {"name": f"{IDLE_POD}{i}", "namespace": namespace,
                          "labels": {"app": "idle"}},
             "spec": {"nodeName": node, "serviceAccountName": "idle",
                      "containers": [{"name": "idle", "command": ["sleep", "infinity"]}]}}
            for i in range(first, last)]
    return "---\n".join(json.dumps(d) + "\n" for d in docs)


def _node_admin(lab: BenchLab, node: str, path: str) -> Any:
    """The node proxy's admin answer (JSON) from inside its node netns; None if no answer."""
    netns = next((n["netns"] for n in lab.status.get("nodes", []) if n["name"] == node), None)
    if netns is None:
        raise FigureError(f"no node {node} in lab status")
    try:
        p = subprocess.run(["ip", "netns", "exec", netns, "curl", "-sS", "-f", "-m", "5",
                            f"http://127.0.0.1:15000{path}"],
                           capture_output=True, text=True, timeout=10)
    except subprocess.TimeoutExpired:
        return None
    if p.returncode != 0:
        return None
    try:
        return json.loads(p.stdout)
    except ValueError:
        log.warning("node proxy of %s: %s is not JSON: %r", node, path, p.stdout[:200])
        return None


def _settled(lab: BenchLab, node: str, pid: int, want: set[str]) -> bool:
    """The node proxy lists exactly the pods `want` (namespace/name), holds a certificate for
    each of their identities, and no certificate helper process runs under it."""
    pods = _node_admin(lab, node, "/pods")
    certs = _node_admin(lab, node, "/certificates")
    if not isinstance(pods, list) or not isinstance(certs, list):
        return False
    have = {f"{p.get('namespace')}/{p.get('name')}" for p in pods if isinstance(p, dict)}
    if have != want:
        return False
    valid = {c.get("identity") for c in certs
             if isinstance(c, dict) and c.get("state") == "valid" and not c.get("fetching")}
    if not {p.get("identity") for p in pods if isinstance(p, dict)} <= valid:
        return False
    return not any(_is_cert_helper(p) for p in labmod.process_tree(pid) if p != pid)


def _is_cert_helper(pid: int) -> bool:
    try:
        return b"nodeproxy.certs" in FsPath(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _wait_settled(lab: BenchLab, node: str, pid: int, want: set[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not _settled(lab, node, pid, want):
        if time.monotonic() > deadline:
            got = _node_admin(lab, node, "/pods")
            n = len(got) if isinstance(got, list) else "no answer"
            raise FigureError(f"the node proxy of {node} did not settle on {len(want)} pods "
                              f"in {timeout:g}s (it lists {n})")
        time.sleep(0.3)
    time.sleep(0.3)  # let the proxy finish what it does after enrolling (trim, logs)


def _meshed_pods(lab: BenchLab, node: str) -> set[str]:
    return {f"{p['namespace']}/{p['name']}" for p in lab.status.get("pods", [])
            if p.get("node") == node and p.get("meshed") and p.get("state") == "running"}


def _delete_idle_pods(lab: BenchLab, namespace: str) -> list[str]:
    """Delete every pod of the figure still in the lab; the errors, if any."""
    lab.refresh()
    refs = [ref for ref, p in lab.pods.items()
            if p.namespace == namespace and p.name.startswith(IDLE_POD)]

    def delete(ref: str) -> str | None:
        # not lab.cli(): its preexec_fn is unsafe in threads, and deleting needs no rlimit
        try:
            proc = subprocess.run([sys.executable, "-m", "nodeproxy.cli", "lab", "delete", "pod",
                                   ref], env=lab.env, cwd=labmod.ROOT, capture_output=True,
                                  text=True, timeout=120)
        except subprocess.TimeoutExpired:
            return f"{ref}: lab delete timed out"
        return None if proc.returncode == 0 else f"{ref}: {proc.stderr.strip()[-200:]}"

    # the lab deletes one pod at a time; a few CLI calls in flight hide their start-up time
    with ThreadPoolExecutor(max_workers=4) as pool:
        errors = [e for e in pool.map(delete, refs) if e]
    lab.refresh()
    return errors


def fig_pod_memory(lab: BenchLab, path: Path, mode: Mode, s: Samples) -> None:
    """RSS of the client pod's node proxy as idle pods are enrolled on its node.

    The node proxy is restarted first: a heap that earlier figures grew (and freed) would
    absorb the pods' memory and hide it. The pods are deleted again afterwards.
    """
    ns = path.pods_namespace
    if ns is None or not mode.extra_pods:
        return  # no node proxy on this path
    try:
        _grow_pods(lab, path, ns, mode.extra_pods, s)
    except (KeyboardInterrupt, SystemExit):
        raise  # the harness takes the whole lab down, pods included
    except BaseException:
        try:
            _pods_cleanup(lab, path, ns)
        except (FigureError, OSError, subprocess.SubprocessError, labmod.BenchLabError) as e:
            log.error("after the failed pod-memory figure: %s", e)
        raise
    _pods_cleanup(lab, path, ns)


def _grow_pods(lab: BenchLab, path: Path, ns: str, steps: tuple[int, ...], s: Samples
               ) -> None:
    node = lab.pod(path.client_pod).node
    lab.cli("restart", f"ztunnel-{node}")
    lab.refresh()
    pid = lab.node_proxy_pid(node)
    own = _meshed_pods(lab, node)
    _wait_settled(lab, node, pid, own, timeout=60)
    base = _rss_mb([pid])
    s.add("pods_rss_0", path.name, base)
    have = 0
    for n in steps:
        file = lab.workdir / f"idle-pods-{n}.yaml"
        file.write_text(idle_pods_yaml(ns, node, have, n))
        cpu_before = labmod.cpu_seconds([pid])
        try:
            lab.cli("apply", str(file), timeout=120 + 5 * (n - have))
        finally:
            file.unlink(missing_ok=True)
        _wait_settled(lab, node, pid, own | {f"{ns}/{IDLE_POD}{i}" for i in range(n)},
                      timeout=60 + n)
        # enrolling: the pod's listeners, its certificate (a helper process), state deltas
        cpu = labmod.cpu_seconds([pid]) - cpu_before
        rss = _rss_mb([pid])
        s.add(f"pods_rss_{n}", path.name, rss)
        s.add(f"pods_kb_{n}", path.name,
              (rss - base) * 1024 / n if rss is not None and base is not None else None)
        s.add(f"pods_cpu_{n}", path.name, cpu * 1000 / (n - have))
        have = n


def _pods_cleanup(lab: BenchLab, path: Path, ns: str) -> None:
    """Delete the figure's pods; the next figures need the mesh path working again through
    the restarted proxy."""
    errors = _delete_idle_pods(lab, ns)
    lab.wait_http(path.client_pod, path.url, timeout=60)
    if errors:
        raise FigureError("idle pods not deleted: " + "; ".join(errors))


def _nofile_limit() -> int:
    return labmod.nofile_limit()


def _hold(lab: BenchLab, path: Path, n: int,
          measure: Callable[[], tuple[float | None, float | None]]
          ) -> tuple[float | None, float | None]:
    proc = lab.popen_in(path.client_pod, [sys.executable, str(HOLD_SCRIPT), path.http_host,
                                          str(path.http_port), str(n), "/1k"])
    try:
        assert proc.stdout is not None
        line = _readline(proc, timeout=60 + n / 50)
        if not line.startswith("ready"):
            err = proc.stderr.read() if proc.poll() is not None and proc.stderr else ""
            raise FigureError(f"{path.name}: holding {n} connections failed: {line.strip()} "
                              f"{err.strip()[-300:]}")
        time.sleep(0.5)  # let both proxies finish setting up the last streams
        return measure()
    finally:
        if proc.stdin:
            proc.stdin.close()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _readline(proc: subprocess.Popen[str], timeout: float) -> str:
    import selectors

    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            proc.kill()
            raise FigureError(f"no answer from the connection holder in {timeout:g}s")
    return proc.stdout.readline()


@dataclass(frozen=True)
class Figure:
    name: str
    run: Callable[[BenchLab, Path, Mode, Samples], None]
    repeat: bool = True  # timed figures repeat; the memory figure runs once


FIGURES: dict[str, Figure] = {f.name: f for f in [
    # memory first: "idle" means before any load has grown the heaps
    Figure("memory", fig_memory, repeat=False),
    # after "memory" (its idle figure must not see the pods' heap); restarts the node proxy
    Figure("pod-memory", fig_pod_memory, repeat=False),
    *[Figure(f"throughput-{n}", fig_throughput(n)) for n in STREAMS],
    Figure("latency", fig_latency),
    Figure("rps", fig_rps),
    Figure("fixed-rate", fig_fixed_rate),
    Figure("conn-rate", fig_conn_rate),
    Figure("gateway-memory", fig_gateway_memory, repeat=False),
    Figure("h2-rps", fig_h2_rps),
]}


# -- cases ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    title: str
    figures: tuple[str, ...]
    # None when the case can run here, else why not (the report lists it as not run)
    unavailable: Callable[[], str | None]
    paths: Callable[[BenchLab], list[Path]]
    # after every path answered: make sure each path is what it claims (raises BenchLabError)
    check: Callable[[BenchLab, list[Path], Samples], None] | None = None
    # per figure, the metric rows this case shows when they differ from the default
    rows: dict[str, tuple[str, ...]] = field(default_factory=dict)


def l4_paths(lab: BenchLab) -> list[Path]:
    mesh_srv, plain_srv = lab.pod("mesh/server"), lab.pod("plain/server")

    def mesh_proxies() -> dict[str, list[int]]:
        return {"client": [lab.node_proxy_pid(lab.pod("mesh/client").node)],
                "server": [lab.node_proxy_pid(mesh_srv.node)]}

    return [
        Path("mesh", "nodeproxy (HBONE, mTLS)", "mesh/client", mesh_srv.ip, labmod.NGINX_PORT,
             mesh_srv.ip, labmod.IPERF_PORT, mesh_proxies, pods_namespace="mesh"),
        Path("direct", "direct (no mesh)", "plain/client", plain_srv.ip, labmod.NGINX_PORT,
             plain_srv.ip, labmod.IPERF_PORT),
        Path("stunnel", "stunnel pair (C, mTLS)", "plain/client", "127.0.0.1",
             labmod.STUNNEL_HTTP_LOCAL, "127.0.0.1", labmod.STUNNEL_IPERF_LOCAL,
             lab.stunnel_pids, fds_per_conn=2),
    ]


def l7_unavailable() -> str | None:
    if find_spec("l7gateway.gateway") is None:
        return "the L7 gateway is not built (no l7gateway.gateway module)"
    missing = [t for t in ("haproxy", "h2load", "wrk") if shutil.which(t) is None]
    if missing:
        return f"missing tools: {', '.join(missing)}"
    return None


def l7_paths(lab: BenchLab) -> list[Path]:
    """mesh: the Service VIP through the gateway; direct; haproxy on the gateway's node."""
    vip = lab.service_ip(labmod.L7_NS, labmod.L7_SERVICE)
    plain_srv, haproxy = lab.pod("plain/server"), lab.pod("plain/haproxy")

    def mesh_proxies() -> dict[str, list[int]]:
        return {"client": [lab.node_proxy_pid(lab.pod("mesh/client").node)],
                "gateway": lab.gateway_pids(labmod.L7_NS),
                "server": [lab.node_proxy_pid(lab.pod(f"{labmod.L7_NS}/server").node)]}

    return [
        Path("mesh", "node proxy ═HBONE═ L7 gateway ═HBONE═ node proxy", "mesh/client", vip,
             labmod.L7_SERVICE_PORT, "", 0, mesh_proxies, h2_port=labmod.L7_SERVICE_PORT),
        Path("direct", "direct (no mesh)", "plain/client", plain_srv.ip, labmod.NGINX_PORT,
             "", 0, h2_port=labmod.NGINX_H2C_PORT),
        Path("haproxy", "haproxy 1 thread (C; HTTP in, mTLS to nginx)", "plain/client",
             haproxy.ip, labmod.HAPROXY_H1_PORT, "", 0,
             lambda: {"gateway": lab.haproxy_pids()}, fds_per_conn=2,
             h2_port=labmod.HAPROXY_H2_PORT),
    ]


def l7_check(lab: BenchLab, paths: list[Path], s: Samples) -> None:
    """The mesh path really crosses the gateway (until the gateway is up, the mesh sends the
    service's traffic L4-only), and haproxy sits on the gateway's node."""
    gw_pod = lab.pod(labmod.L7_GATEWAY_POD)
    mesh = paths[0]

    def counted() -> float:
        p = lab.run_in(labmod.L7_GATEWAY_POD, ["curl", "-sS", "-m", "5",
                                               "http://127.0.0.1:15020/metrics"], 10)
        return prom_sum(p.stdout, "istio_requests_total") if p.returncode == 0 else -1.0

    deadline = time.monotonic() + 60
    while True:
        before = counted()
        lab.wait_http(mesh.client_pod, mesh.url, timeout=30)
        if before >= 0 and counted() > before:
            break
        if time.monotonic() > deadline:
            raise labmod.BenchLabError("requests to the L7 service do not reach the gateway")
        time.sleep(0.5)
    if lab.pod("plain/haproxy").node != gw_pod.node:
        s.notes.append(f"haproxy runs on {lab.pod('plain/haproxy').node}, the gateway on "
                       f"{gw_pod.node}: not the same node")


L7_ROWS: dict[str, tuple[str, ...]] = {
    "rps": ("rps", "rps_cpu", "rps_cpu_gw", "rps_cpu_np"),
    "fixed-rate": ("fr_p50", "fr_p99", "fr_vcpu", "fr_vcpu_gw"),
}


CASES: dict[str, Case] = {c.name: c for c in [
    Case("l4-cross-node", "L4 cross-node, meshed pod -> meshed pod",
         ("memory", "pod-memory", *[f"throughput-{n}" for n in STREAMS], "latency", "rps",
          "fixed-rate", "conn-rate"),
         lambda: None, l4_paths),
    Case("l7-gateway", "L7 through a namespace gateway",
         ("gateway-memory", "latency", "rps", "fixed-rate", "h2-rps", "conn-rate"),
         l7_unavailable, l7_paths,
         check=l7_check, rows=L7_ROWS),
]}


def metrics_for(case: Case, mode: Mode) -> list[Metric]:
    """The rows of a case's table, in order."""
    keys: dict[str, tuple[str, ...]] = {
        "memory": ("rss_idle_src", "rss_idle_dst"),
        **{f"throughput-{n}": (f"tput_{n}", f"tput_{n}_cpu") for n in STREAMS},
        "pod-memory": (),
        "latency": ("lat_p50", "lat_p99", "lat_added_p50"),
        "rps": ("rps", "rps_cpu"),
        "fixed-rate": ("fr_p50", "fr_p99", "fr_vcpu"),
        "conn-rate": ("cps", "cps_cpu"),
        "gateway-memory": ("rss_gw_idle",),
        "h2-rps": ("h2_rps", "h2_cpu", "h2_cpu_gw"),
        **case.rows,
    }
    out: list[Metric] = []
    for f in case.figures:
        out += [METRICS[k] for k in keys[f]]
        if f == "memory":
            for n in mode.idle_conns:
                out += conn_metrics(n)
        if f == "gateway-memory":
            for n in mode.idle_conns:
                out += gw_conn_metrics(n)
        if f == "pod-memory":
            out += pod_metrics(mode)
    return out


def warm_up(lab: BenchLab, paths: list[Path]) -> None:
    """Every path answers (and the mesh's pooled connection and stunnel's session exist)."""
    for p in paths:
        lab.wait_http(p.client_pod, p.url, timeout=60)
        if p.h2_url:
            lab.wait_http(p.client_pod, p.h2_url, 60, "--http2-prior-knowledge")


def measure_case(lab: BenchLab, case: Case, mode: Mode, figures: list[str]) -> Samples:
    """Run the case's figures on all its paths; paths interleaved within each repetition."""
    paths = case.paths(lab)
    warm_up(lab, paths)
    s = Samples()
    if case.check:
        case.check(lab, paths, s)
    chosen = [FIGURES[f] for f in case.figures if f in figures]
    for rep in range(mode.reps):
        for fig in chosen:
            if rep > 0 and not fig.repeat:
                continue
            for p in paths:
                log.info("%s rep %d/%d: %s on %s", case.name, rep + 1, mode.reps, fig.name,
                         p.name)
                try:
                    fig.run(lab, p, mode, s)
                except (FigureError, OSError, subprocess.SubprocessError,
                        labmod.BenchLabError) as e:
                    log.error("%s: %s on %s failed: %s", case.name, fig.name, p.name, e)
                    s.errors.append(f"{fig.name} on {p.name}: {e}")
    derive(s, [p.name for p in paths])
    return s


def derive(s: Samples, paths: list[str]) -> None:
    """Metrics computed from others: the p50 latency each path adds over the direct one."""
    p50 = s.values.get("lat_p50", {})
    direct = median(p50.get("direct", []))
    for name in paths:
        if name in p50 and direct is not None:
            mine = median(p50[name])
            s.add("lat_added_p50", name, mine - direct if mine is not None else None)


def summarize(s: Samples, metrics: list[Metric], paths: list[str], subject: str = "mesh"
              ) -> list[dict[str, object]]:
    """Per metric: the median per path, the samples, and the subject's ratio to each baseline."""
    rows = []
    for m in metrics:
        per_path = s.values.get(m.key, {})
        values = {p: median(per_path.get(p, [])) for p in paths}
        rows.append({
            "key": m.key, "title": m.title, "unit": m.unit, "better": m.better,
            "values": values,
            "samples": {p: per_path.get(p, []) for p in paths},
            "ratios": {f"{subject}/{p}": ratio(values.get(subject), values[p])
                       for p in paths if p != subject},
        })
    return rows
