"""`nodeproxy ztunnel --workers N`: fan-out of the node agent's channel, ack aggregation,
metrics merging, shared listeners, and the supervisor with real worker processes.

The supervisor tests run stand-in workers (``STUB_WORKER`` below, a real process speaking the
worker protocol over the real socketpair, with real telemetry servers) instead of full node
proxies, which would need a control plane: the full workers are exercised in
tests/lab/test_workers.py.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from nodeproxy import inpod_protocol as protocol
from nodeproxy.inpod_protocol import Add, Del, Keep, ProtocolError, Refused, SnapshotSent
from nodeproxy.model import Workload
from nodeproxy.netns import netns_id, run_in_netns
from nodeproxy.telemetry.metrics import DESTINATION, SOURCE, ConnectionLabels, ProxyMetrics
from ztunnel import podproxy
from ztunnel.sockets import listener
from ztunnel.workers import (
    GONE,
    FanOut,
    Outgoing,
    Supervisor,
    aggregate,
    decode_report,
    encode_report,
    merge_admin,
    merge_metrics,
)

ROOT = Path(__file__).resolve().parents[2]


def add(uid: str) -> Add:
    return Add(uid, f"pod-{uid}", "ns", "sa")


# -- the fan-out (sans-IO) -------------------------------------------------------------------


def test_every_agent_message_goes_to_the_workers_and_settles_the_pod_set() -> None:
    f = FanOut()
    assert f.forward(add("a"), 10) == [Outgoing(add("a"), 10)]
    assert f.settle(add("a"), 10, None).close_fds == []
    assert f.forward(Keep("a")) == [Outgoing(Keep("a"))]
    f.settle(Keep("a"), None, None)
    assert f.forward(Del("a")) == [Outgoing(Del("a"))]
    # the parent's copy of the pod's netns fd is released with the pod
    assert f.settle(Del("a"), None, None).close_fds == [10]
    assert f.pods == {}


def test_an_add_without_fd_or_an_unexpected_message_is_refused() -> None:
    f = FanOut()
    with pytest.raises(ProtocolError):
        f.forward(add("a"), None)
    with pytest.raises(ProtocolError):
        f.forward(protocol.Hello(1))


def test_a_refused_add_is_rolled_back_on_every_worker() -> None:
    f = FanOut()
    f.settle(add("a"), 10, None)
    # a new netns for the same pod, which a worker could not bind in
    settled = f.settle(add("a"), 11, "worker 1: address in use")
    assert settled.rollback == [Outgoing(Del("a"))]
    assert sorted(settled.close_fds) == [10, 11]
    assert "a" not in f.pods


def test_a_new_netns_replaces_the_pod_and_its_fd() -> None:
    f = FanOut()
    f.settle(add("a"), 10, None)
    assert f.settle(add("a"), 11, None).close_fds == [10]
    assert f.pods["a"][1] == 11


def test_snapshot_drops_pods_the_agent_did_not_replay_with_explicit_dels() -> None:
    f = FanOut()
    for uid, fd in (("a", 10), ("b", 11), ("c", 12)):
        f.settle(add(uid), fd, None)
    f.settle(SnapshotSent(), None, None)
    # the agent reconnects and replays only a and c
    assert f.settle(add("a"), 10, None).close_fds == []  # same fd number: nothing to close
    f.settle(Keep("c"), None, None)
    out = f.forward(SnapshotSent())
    assert out == [Outgoing(Del("b")), Outgoing(SnapshotSent())]
    assert f.settle(SnapshotSent(), None, None).close_fds == [11]
    assert set(f.pods) == {"a", "c"}


def test_a_joining_worker_gets_every_pod_then_the_snapshot_once_there_was_one() -> None:
    f = FanOut()
    f.settle(add("a"), 10, None)
    assert f.replay() == [Outgoing(add("a"), 10)]  # the agent's own SnapshotSent will follow
    f.settle(SnapshotSent(), None, None)
    f.settle(add("b"), 11, None)
    assert f.replay() == [Outgoing(add("a"), 10), Outgoing(add("b"), 11), Outgoing(SnapshotSent())]
    assert sorted(f.close()) == [10, 11]


def test_ack_aggregation() -> None:
    assert aggregate({0: None, 1: None}, need_one=True) is None
    assert aggregate({0: None, 1: "bind failed"}, need_one=True) == "worker 1: bind failed"
    # a worker that went away gets the replay when it is back: not the agent's problem
    assert aggregate({0: None, 1: GONE}, need_one=True) is None
    # but an Add nobody took is refused (the pod must not start without a proxy)
    assert aggregate({0: GONE}, need_one=True) == "no node proxy worker is running"
    assert aggregate({}, need_one=True) == "no node proxy worker is running"
    assert aggregate({}, need_one=False) is None


def test_worker_report_round_trip_and_garbage() -> None:
    raw = encode_report(1, {"admin": 40001, "metrics": 40002, "ready": 40003})
    assert decode_report(raw) == {"pid": os.getpid(), "admin": 40001, "metrics": 40002,
                                  "ready": 40003}
    for bad in (b"nope", b'{"type":"hello","version":1}',
                b'{"type":"worker","pid":1,"admin":0,"metrics":2,"ready":3}',
                b'{"type":"worker","pid":1,"admin":"1","metrics":2,"ready":3}'):
        with pytest.raises(ProtocolError):
            decode_report(bad)


# -- merging telemetry (sans-IO) ---------------------------------------------------------------


def _worker_metrics(opened: int, requests: list[float]) -> str:
    m = ProxyMetrics()
    wl = Workload(uid="u1", name="web", namespace="shop", addresses=["10.0.0.1"], node="n",
                  service_account="web")
    src = ConnectionLabels.from_workloads(SOURCE, source=wl)
    dst = ConnectionLabels.from_workloads(DESTINATION, destination=wl)
    for _ in range(opened):
        m.opened(src)
    m.opened(dst)
    m.bytes(src, 100, 7)
    for ms in requests:
        m.request(src, 200, ms)
    return m.exposition().decode()


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def test_metrics_of_the_workers_are_summed_label_set_by_label_set() -> None:
    a = _worker_metrics(3, [2.5, 700])
    b = _worker_metrics(2, [0.5])
    merged = merge_metrics([a, b])
    sa, sb, sm = _samples(a), _samples(b), _samples(merged)
    assert set(sm) == set(sa) | set(sb)
    for key, value in sm.items():
        if key[0] == "istio_build":
            assert value == 1  # build info is not multiplied by the number of workers
        else:
            assert value == sa.get(key, 0) + sb.get(key, 0), key
    opened = {dict(k[1])["reporter"]: v for k, v in sm.items()
              if k[0] == "istio_tcp_connections_opened_total"}
    assert opened == {"source": 5, "destination": 2}
    # histogram buckets stay cumulative and one family each: one consistent text
    buckets = sorted((float(dict(k[1])["le"]), v) for k, v in sm.items()
                     if k[0] == "istio_request_duration_milliseconds_bucket")
    assert buckets[0] == (1.0, 1) and buckets[-1] == (float("inf"), 3)
    assert [v for _, v in buckets] == sorted(v for _, v in buckets)
    assert merged.count("# TYPE istio_request_duration_milliseconds histogram") == 1


def test_a_worker_text_that_does_not_parse_is_left_out() -> None:
    good = _worker_metrics(1, [])
    merged = merge_metrics([good, 'broken{le="1" 3\n'])
    assert _samples(merged) == _samples(good)
    assert merge_metrics([]) == ""


def test_label_values_are_escaped_on_the_way_out() -> None:
    text = '# TYPE x counter\nx_total{path="a\\"b\\\\c\\nd"} 2.0\n'
    merged = merge_metrics([text, text])
    assert _samples(merged) == {("x_total", (("path", 'a"b\\c\nd'),)): 4.0}


def test_admin_pages_are_merged_with_the_worker_index() -> None:
    pods = merge_admin("/pods", [(0, [{"uid": "a"}]), (1, [{"uid": "a"}, {"uid": "b"}])])
    assert pods == [{"uid": "a", "worker": 0}, {"uid": "a", "worker": 1},
                    {"uid": "b", "worker": 1}]
    assert merge_admin("/workloads", [(0, [{"w": 1}]), (1, [{"w": 1}])]) == [{"w": 1}]
    dumps = merge_admin("/config_dump", [(0, {"node": "n"}), (1, {"node": "n"})])
    assert dumps == [{"node": "n", "worker": 0}, {"node": "n", "worker": 1}]
    assert merge_admin("/pods", []) == []


# -- shared listeners in a real pod netns ------------------------------------------------------


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"npt-wk-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"],
                       check=True)
        yield f"/var/run/netns/{name}"
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def test_two_workers_bind_the_pod_ports_and_queued_connections_migrate(netns: str) -> None:
    host_before = Path(podproxy.MIGRATE_REQ).read_text()
    fd = os.open(netns, os.O_RDONLY)
    socks: list[socket.socket] = []
    try:
        def bind_twice() -> bool:
            ok = podproxy.migrate_requests()
            socks.append(listener(15001))
            socks.append(listener(15001))  # a second worker's socket: no EADDRINUSE
            return ok

        assert run_in_netns(fd, bind_twice)
        inside = run_in_netns(fd, lambda: Path(podproxy.MIGRATE_REQ).read_text())
        assert inside.strip() == "1"
        # the pod netns only: the host's setting is untouched
        assert Path(podproxy.MIGRATE_REQ).read_text() == host_before
        # the kernel spreads connections over both sockets of the group
        clients = []
        for _ in range(64):
            c = run_in_netns(fd, lambda: socket.create_connection(("127.0.0.1", 15001)))
            clients.append(c)
        counts = []
        for s in socks:
            s.setblocking(False)
            n = 0
            while True:
                try:
                    conn, _ = s.accept()
                except BlockingIOError:
                    break
                conn.close()
                n += 1
            counts.append(n)
        assert sum(counts) == 64 and min(counts) > 0, counts
        for c in clients:
            c.close()
    finally:
        for s in socks:
            s.close()
        os.close(fd)


# -- the supervisor with real worker processes ---------------------------------------------

STUB_WORKER = r'''
import json, os, socket, sys
import trio
from nodeproxy.netns import netns_id
from nodeproxy.telemetry.metrics import ProxyMetrics, ConnectionLabels
from nodeproxy.telemetry.server import Readiness, Response, json_response, serve_http
from nodeproxy.telemetry.server import readiness_route
from ztunnel.inpod.channel import serve_agent_connection
from ztunnel.workers import encode_report

fd, index = int(sys.argv[1]), int(sys.argv[2])
pods = {}
metrics = ProxyMetrics()
ready = Readiness()
ready.set("cni snapshot", False, "waiting")
seen = set()

class Handler:
    async def add(self, pod, netns_fd):
        try:
            if pod.uid.startswith("bad") or (pod.uid.startswith("half") and index == 1):
                raise RuntimeError(f"cannot bind in {pod.uid}")
            pods[pod.uid] = "%d:%d" % netns_id(netns_fd)
            seen.add(pod.uid)
            metrics.opened(ConnectionLabels(reporter="destination", destination_workload=pod.name))
        finally:
            os.close(netns_fd)
    async def keep(self, uid):
        if uid not in pods:
            raise KeyError(uid)
        seen.add(uid)
    async def delete(self, uid):
        pods.pop(uid, None)
    async def snapshot_sent(self):
        for uid in list(pods):
            if uid not in seen:
                del pods[uid]
        seen.clear()
        ready.set("cni snapshot", True)

async def main():
    async def pods_page(_):
        return json_response([{"uid": u, "netns": n, "pid": os.getpid()} for u, n in pods.items()])
    async def metrics_page(_):
        return Response(200, metrics.exposition())
    async with trio.open_nursery() as n:
        ports = {
            "admin": await n.start(serve_http, "127.0.0.1:0", {"/pods": pods_page}),
            "metrics": await n.start(serve_http, "127.0.0.1:0", {"/metrics": metrics_page}),
            "ready": await n.start(serve_http, "127.0.0.1:0",
                                   {"/healthz/ready": readiness_route(ready)}),
        }
        sock = trio.socket.from_stdlib_socket(socket.socket(fileno=fd))
        await sock.send(encode_report(index, ports))
        try:
            await serve_agent_connection(sock, Handler())
        except Exception:
            pass
        n.cancel_scope.cancel()

trio.run(main)
'''


def stub_argv(index: int, fd: int) -> list[str]:
    return [sys.executable, "-c", STUB_WORKER, str(fd), str(index)]


async def http_get(port: int, path: str) -> tuple[int, bytes]:
    def get() -> tuple[int, bytes]:
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    return await trio.to_thread.run_sync(get)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AgentEnd:
    """The node agent's side: listens, takes the supervisor's Hello, sends in lock-step."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.listener = protocol.seqpacket_socket()
        self.sock: trio.socket.SocketType | None = None

    async def start(self) -> None:
        await self.listener.bind(self.path)
        self.listener.listen()

    async def accept(self) -> None:
        self.sock, _ = await self.listener.accept()
        msg, fd = await protocol.recv_msg(self.sock)
        assert msg == protocol.Hello(1) and fd is None

    async def send(self, msg: protocol.Message, netns: str | None = None) -> None:
        assert self.sock is not None
        fd = os.open(netns, os.O_RDONLY) if netns else None
        try:
            await protocol.exchange(self.sock, msg, fd)
        finally:
            if fd is not None:
                os.close(fd)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.listener.close()


async def wait_until(check, timeout: float = 30.0):  # type: ignore[no-untyped-def]
    with trio.fail_after(timeout):
        while True:
            result = await check()
            if result:
                return result
            await trio.sleep(0.1)


@pytest.fixture
def tmp_sock(tmp_path: Path) -> str:
    return str(tmp_path / "agent.sock")


async def test_supervisor_fans_out_aggregates_acks_restarts_and_replays(
    netns: str, tmp_sock: str
) -> None:
    agent = AgentEnd(tmp_sock)
    await agent.start()
    sup = Supervisor(2, stub_argv, drain_seconds=1)
    ports = {k: free_port() for k in ("admin", "metrics", "ready")}
    expected_ns = "{}:{}".format(*netns_id_of(netns))
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                lambda: sup.run(tmp_sock, admin=f"127.0.0.1:{ports['admin']}",
                                metrics=f"127.0.0.1:{ports['metrics']}",
                                ready=f"127.0.0.1:{ports['ready']}")
            )
            with trio.fail_after(60):
                await agent.accept()  # only once the workers are there
            assert all(w.live for w in sup.workers)
            status, body = await http_get(ports["ready"], "/healthz/ready")
            assert status == 503 and b"cni snapshot" in body

            await agent.send(add("p1"), netns)
            await agent.send(SnapshotSent())
            status, body = await http_get(ports["ready"], "/healthz/ready")
            assert (status, body) == (200, b"ready")

            # every worker got the pod with its own copy of the netns fd
            status, body = await http_get(ports["admin"], "/pods")
            rows = json.loads(body)
            assert sorted(r["worker"] for r in rows) == [0, 1]
            assert {r["netns"] for r in rows} == {expected_ns}

            # one worker's error is the agent's nack, and the pod is rolled back everywhere
            with pytest.raises(Refused, match="worker 1: cannot bind in half"):
                await agent.send(add("half"), netns)
            with pytest.raises(Refused, match="worker 0: .*worker 1: "):
                await agent.send(add("bad"), netns)
            rows = json.loads((await http_get(ports["admin"], "/pods"))[1])
            assert sorted(r["uid"] for r in rows) == ["p1", "p1"]

            # /metrics is the sum of the workers' counters
            text = (await http_get(ports["metrics"], "/metrics"))[1].decode()
            opened = [s.value for f in text_string_to_metric_families(text)
                      for s in f.samples if s.name == "istio_tcp_connections_opened_total"
                      and s.labels["destination_workload"] == "pod-p1"]
            assert opened == [2.0]

            # a killed worker is restarted and replayed the pods and the snapshot
            old = sup.workers[1].process
            assert old is not None
            old.send_signal(signal.SIGKILL)

            async def restarted() -> bool:
                w = sup.workers[1]
                return w.live and w.process is not old and w.starts == 2

            await wait_until(restarted)

            async def both_have_p1() -> bool:
                rows = json.loads((await http_get(ports["admin"], "/pods"))[1])
                return sorted((r["worker"], r["uid"]) for r in rows) == [(0, "p1"), (1, "p1")]

            await wait_until(both_have_p1)
            assert (await http_get(ports["ready"], "/healthz/ready"))[0] == 200
            workers_page = json.loads((await http_get(ports["admin"], "/workers"))[1])
            assert [w["starts"] for w in workers_page] == [1, 2]
            text = (await http_get(ports["metrics"], "/metrics"))[1].decode()
            assert "nodeproxy_ztunnel_worker_restarts_total 1.0" in text

            # Del reaches every worker; Keep of an unknown pod is refused by them
            await agent.send(Del("p1"))
            assert json.loads((await http_get(ports["admin"], "/pods"))[1]) == []
            with pytest.raises(Refused, match="unknown|p1"):
                await agent.send(Keep("p1"))

            # SIGTERM stops every worker and the supervisor
            pids = [w.process.pid for w in sup.workers if w.process]
            os.kill(os.getpid(), signal.SIGTERM)
            with trio.fail_after(20):
                while any(_alive(p) for p in pids):
                    await trio.sleep(0.1)
    finally:
        agent.close()
        for w in sup.workers:
            if w.process is not None and w.process.returncode is None:
                w.process.kill()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is gone for our purposes (the supervisor reaps it)
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except OSError:
        return False


def netns_id_of(path: str) -> tuple[int, int]:
    fd = os.open(path, os.O_RDONLY)
    try:
        return netns_id(fd)
    finally:
        os.close(fd)


async def test_an_add_is_refused_while_no_worker_runs(netns: str, tmp_sock: str) -> None:
    sup = Supervisor(1, stub_argv, drain_seconds=1)
    fd = os.open(netns, os.O_RDONLY)
    # the worker never started: the pod must not start without a proxy
    with pytest.raises(RuntimeError, match="no node proxy worker is running"):
        from ztunnel.inpod.channel import PodInfo

        await sup.add(PodInfo("p", "p", "ns", "sa"), fd)
    assert sup.fanout.pods == {}
    await sup.delete("p")  # a Del or Keep is fine: the workers will get the replay


def test_workers_option_is_refused_in_host_mode_and_out_of_range() -> None:
    base = [sys.executable, "-m", "nodeproxy.cli", "ztunnel", "--node", "n", "--controlplane",
            "127.0.0.1:1", "--ca-root", "/nonexistent", "--token-file", "/nonexistent"]
    for extra, why in (
        (["--host-mode", "--workload", "ns/vm", "--workers", "2"], "--host-mode"),
        (["--agent-socket", "/x", "--workers", "0"], "between 1 and"),
        (["--agent-socket", "/x", "--workers", "2", "--worker-fd", "3"], "--worker-fd"),
    ):
        proc = subprocess.run(base + extra, capture_output=True, text=True, cwd=ROOT,
                              timeout=60)
        assert proc.returncode == 2, proc
        assert why in proc.stderr, proc.stderr




# -- the lab and the benchmarks start node proxies with workers -------------------------------


def test_a_lab_node_may_ask_for_node_proxy_workers(tmp_path: Path) -> None:
    from benchmarks import lab as benchlab
    from nodeproxy.lab.components import component_specs
    from nodeproxy.lab.paths import LabPaths
    from nodeproxy.lab.spec import LabSpecError, parse_lab

    text = (ROOT / "tests/lab/workers.yaml").read_text()
    spec = parse_lab(text)
    assert [n.workers for n in spec.nodes] == [2, 2]
    argv = {c.name: c.argv for c in component_specs(spec, LabPaths(tmp_path, "npt-wk-"))}
    zt = argv["ztunnel-node-a"]
    assert zt[zt.index("--workers") + 1] == "2"
    # without the field: one process, today's command line
    plain = parse_lab(text.replace(", workers: 2", ""))
    argv = {c.name: c.argv for c in component_specs(plain, LabPaths(tmp_path, "npt-wk-"))}
    assert "--workers" not in argv["ztunnel-node-a"]
    for bad in ("0", "yes", "65"):
        with pytest.raises(LabSpecError, match="workers"):
            parse_lab(text.replace("workers: 2", f"workers: {bad}", 1))
    bench = parse_lab(benchlab.lab_yaml(tmp_path, workers=3))
    assert [n.workers for n in bench.nodes] == [3, 3]


# -- the worker's side: a real NodeProxy on the supervisor's socketpair ----------------------


class StandInDiscovery:
    """What NodeProxy asks of its discovery client; the state arrives when the test says."""

    def __init__(self) -> None:
        from nodeproxy.model import MeshState

        self.state = MeshState()
        self.ready = trio.Event()

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED):  # type: ignore[no-untyped-def]
        task_status.started()
        await trio.sleep_forever()

    async def wait_changed(self, version: int):  # type: ignore[no-untyped-def]
        await trio.sleep_forever()


class StandInCerts:
    async def run(self) -> None:
        await trio.sleep_forever()

    async def get(self, identity: str) -> None:
        raise OSError("no control plane in this test")

    def forget(self, identity: str) -> None:
        pass

    def snapshot(self) -> list:
        return []


async def test_a_worker_joins_after_the_mesh_state_serves_pods_and_leaves_with_its_parent(
    netns: str,
) -> None:
    from ztunnel.proxy import NodeProxy

    discovery = StandInDiscovery()
    proxy = NodeProxy("node-a", discovery, StandInCerts())  # type: ignore[arg-type]
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    psock = trio.socket.from_stdlib_socket(parent)
    fd = os.open(netns, os.O_RDONLY)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                lambda: proxy.run(None, admin="127.0.0.1:0", metrics="127.0.0.1:0",
                                  ready="127.0.0.1:0", drain_seconds=0.5,
                                  worker=(1, child.detach()))
            )
            # no report before the mesh state: a worker must not take connections blind
            with trio.move_on_after(0.3):
                await psock.recv(protocol.MAX_MESSAGE)
                raise AssertionError("the worker reported before it had the mesh state")
            discovery.ready.set()
            with trio.fail_after(10):
                report = decode_report(await psock.recv(protocol.MAX_MESSAGE))
                assert (await protocol.recv_msg(psock)) == (protocol.Hello(1), None)
            status, _ = await http_get(report["ready"], "/healthz/ready")
            assert status == 503  # no snapshot yet
            await protocol.exchange(psock, add("p1"), fd)
            await protocol.exchange(psock, SnapshotSent())
            assert set(proxy.pods) == {"p1"} and proxy.shared_listeners

            def inside() -> tuple[str, bool]:
                # the pod's listeners take connections (this one resets it: no certificate
                # here, but nobody refuses it); the netns lets them share (migrate)
                try:
                    with socket.create_connection(("127.0.0.1", 15008), timeout=5):
                        pass
                    listening = True
                except ConnectionRefusedError:
                    listening = False
                except ConnectionResetError:
                    listening = True
                return Path(podproxy.MIGRATE_REQ).read_text().strip(), listening

            assert await trio.to_thread.run_sync(run_in_netns, fd, inside) == ("1", True)
            # the supervisor goes away: the worker drains and its run() returns
            psock.close()
            with trio.fail_after(10):
                while proxy.pods and not proxy.readiness.snapshot().get("draining"):
                    await trio.sleep(0.05)
    finally:
        os.close(fd)
        psock.close()
        child.close()
