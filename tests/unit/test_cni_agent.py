"""The node agent end to end: real plugin requests, a real pod netns, a stand-in node proxy
speaking the real channel, and a stand-in mesh source (the discovery client's interface)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from cni import netprog, plugin
from cni.agent import Agent
from nodeproxy.model import HBONE, TCP, MeshState, Workload
from nodeproxy.netns import netns_id
from ztunnel.inpod.channel import PodInfo, run_channel


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"npt-cni-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield f"/var/run/netns/{name}"
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


class FakeMesh:
    """Stand-in for nodeproxy.discovery.DiscoveryClient (state, ready, wait_changed)."""

    def __init__(self, *workloads: Workload) -> None:
        self.state = MeshState(workloads={w.uid: w for w in workloads}, version=1)
        self.ready = trio.Event()
        self.ready.set()
        self._changed = trio.Event()

    def publish(self, *workloads: Workload) -> None:
        self.state = MeshState(
            workloads={w.uid: w for w in workloads}, version=self.state.version + 1
        )
        self._changed.set()
        self._changed = trio.Event()

    async def wait_changed(self, version: int) -> MeshState:
        while self.state.version == version:
            await self._changed.wait()
        return self.state


class ProxyStandIn:
    """The node proxy's side: records what the agent sent, keeps the netns identity of fds."""

    def __init__(self, log: list[tuple[str, ...]]) -> None:
        self.log = log
        self.netns: dict[str, tuple[int, int]] = {}
        self.refuse = False

    async def add(self, pod: PodInfo, netns_fd: int) -> None:
        try:
            self.netns[pod.uid] = netns_id(netns_fd)
        finally:
            os.close(netns_fd)
        self.log.append(("add", pod.uid, pod.name, pod.namespace, pod.service_account))
        if self.refuse:
            raise RuntimeError("no certificate for this pod")

    async def keep(self, uid: str) -> None:
        self.log.append(("keep", uid))

    async def delete(self, uid: str) -> None:
        self.log.append(("del", uid))

    async def snapshot_sent(self) -> None:
        self.log.append(("snapshot",))


def web(meshed: bool) -> Workload:
    return Workload(
        "uid-web",
        "web",
        "shop",
        "n1",
        service_account="web-sa",
        addresses=("10.1.0.5",),
        protocol=HBONE if meshed else TCP,
    )


@dataclass
class Node:
    tmp: Path
    nursery: trio.Nursery

    @property
    def plugin_socket(self) -> str:
        return str(self.tmp / "plugin.sock")

    @property
    def ztunnel_socket(self) -> str:
        return str(self.tmp / "ztunnel.sock")

    @property
    def state_file(self) -> Path:
        return self.tmp / "state" / "pods.json"

    async def start_agent(self, mesh: FakeMesh, **kw: float) -> trio.CancelScope:
        agent = Agent(node="n1", state_dir=str(self.tmp / "state"), mesh=mesh, **kw)
        scope = trio.CancelScope()

        async def run(task_status: trio.TaskStatus[None]) -> None:
            with scope:
                await agent.run(self.plugin_socket, self.ztunnel_socket, task_status=task_status)

        await self.nursery.start(run)
        return scope

    async def start_proxy(
        self, log: list[tuple[str, ...]]
    ) -> tuple[ProxyStandIn, trio.CancelScope]:
        proxy = ProxyStandIn(log)
        scope = trio.CancelScope()

        async def run() -> None:
            with scope:
                await run_channel(self.ztunnel_socket, proxy, min_backoff=0.01, max_backoff=0.1)

        self.nursery.start_soon(run)
        await until(lambda: ("snapshot",) in log)
        return proxy, scope

    async def cni(self, command: str, netns: str, name: str = "web") -> tuple[int, bytes]:
        env = {
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": f"sandbox-{name}",
            "CNI_NETNS": netns,
            "CNI_IFNAME": "eth0",
            "CNI_ARGS": f"K8S_POD_NAMESPACE=shop;K8S_POD_NAME={name};K8S_POD_UID=uid-{name}",
        }
        conf = json.dumps(
            {
                "cniVersion": "1.0.0",
                "name": "lab",
                "type": "nodeproxy-cni",
                "agentSocket": self.plugin_socket,
                "prevResult": {"cniVersion": "1.0.0", "ips": [{"address": "10.1.0.5/24"}]},
            }
        ).encode()
        path = self.plugin_socket
        return await trio.to_thread.run_sync(
            lambda: plugin.handle(env, conf, lambda req: plugin.ask_agent_socket(path, req))
        )

    def pods(self) -> dict[str, dict]:
        if not self.state_file.exists():
            return {}
        return {p["name"]: p for p in json.loads(self.state_file.read_text())["pods"]}


async def until(predicate: Callable[[], bool]) -> None:
    while not predicate():
        await trio.sleep(0.01)


async def until_async(predicate: Callable[[], object]) -> None:
    while not await predicate():  # type: ignore[misc]
        await trio.sleep(0.02)


def has_capture(netns: str) -> bool:
    saved = subprocess.run(
        ["nsenter", f"--net={netns}", "iptables-save"], check=True, capture_output=True, text=True
    ).stdout
    return "ISTIO" in saved


@pytest.fixture
async def node(tmp_path: Path) -> Iterator[Node]:
    async with trio.open_nursery() as nursery:
        with trio.fail_after(25):
            yield Node(tmp_path, nursery)
        nursery.cancel_scope.cancel()


async def test_add_of_a_meshed_pod_reaches_the_proxy_before_the_plugin_gets_ok(
    node: Node, netns: str
) -> None:
    log: list[tuple[str, ...]] = []
    await node.start_agent(FakeMesh(web(True)))
    proxy, _ = await node.start_proxy(log)

    code, out = await node.cni("ADD", netns)
    log.append(("plugin ok",) if code == 0 else ("plugin failed", out.decode()))
    assert log == [
        ("snapshot",),
        ("add", "uid-web", "web", "shop", "web-sa"),
        ("plugin ok",),
    ]
    assert json.loads(out)["ips"] == [{"address": "10.1.0.5/24"}]
    fd = os.open(netns, os.O_RDONLY)
    try:
        assert proxy.netns["uid-web"] == netns_id(fd)
    finally:
        os.close(fd)
    assert await netprog.is_programmed(netns)
    assert node.pods()["web"]["enrolled"] is True
    assert node.pods()["web"]["netns"] == netns

    assert await node.cni("CHECK", netns) == (0, b"")

    assert await node.cni("DEL", netns) == (0, b"")
    assert log[-1] == ("del", "uid-web")
    assert not has_capture(netns)
    assert node.pods() == {}
    assert await node.cni("DEL", netns) == (0, b"")  # idempotent
    code, out = await node.cni("CHECK", netns)
    assert code != 0 and json.loads(out)["code"] == 3


async def test_add_without_a_proxy_or_refused_by_it_fails_closed(node: Node, netns: str) -> None:
    await node.start_agent(FakeMesh(web(True)))
    code, out = await node.cni("ADD", netns)
    assert code != 0
    assert json.loads(out)["code"] == 11
    assert "node proxy not connected" in json.loads(out)["msg"]
    assert not has_capture(netns)
    assert node.pods() == {}

    log: list[tuple[str, ...]] = []
    proxy, _ = await node.start_proxy(log)
    proxy.refuse = True
    code, out = await node.cni("ADD", netns)
    assert code != 0 and json.loads(out)["code"] == 11
    assert "no certificate for this pod" in json.loads(out)["msg"]
    assert not has_capture(netns)
    assert node.pods() == {}


async def test_unknown_pod_is_try_again_and_unmeshed_pod_is_left_alone(
    node: Node, netns: str
) -> None:
    log: list[tuple[str, ...]] = []
    await node.start_agent(FakeMesh(web(False)), mesh_wait=0.2)
    await node.start_proxy(log)

    code, out = await node.cni("ADD", netns, name="ghost")
    assert code != 0 and json.loads(out)["code"] == 11
    assert "not known to the control plane" in json.loads(out)["msg"]

    code, _ = await node.cni("ADD", netns)
    assert code == 0
    assert not has_capture(netns)
    assert node.pods()["web"]["enrolled"] is False
    assert log == [("snapshot",)]


async def test_labelling_the_namespace_enrols_and_releases_a_running_pod(
    node: Node, netns: str
) -> None:
    log: list[tuple[str, ...]] = []
    mesh = FakeMesh(web(False))
    await node.start_agent(mesh)
    await node.start_proxy(log)
    assert (await node.cni("ADD", netns))[0] == 0
    assert not has_capture(netns)

    mesh.publish(web(True))  # namespace labelled ambient
    await until(lambda: ("add", "uid-web", "web", "shop", "web-sa") in log)
    await until_async(lambda: netprog.is_programmed(netns))
    await until(lambda: node.pods()["web"]["enrolled"] is True)

    mesh.publish(web(False))  # label removed
    await until(lambda: ("del", "uid-web") in log)
    assert not has_capture(netns)
    await until(lambda: node.pods()["web"]["enrolled"] is False)


async def test_a_pod_labelled_while_no_proxy_runs_is_enrolled_when_one_connects(
    node: Node, netns: str
) -> None:
    mesh = FakeMesh(web(False))
    await node.start_agent(mesh, retry_interval=0.05)
    assert (await node.cni("ADD", netns))[0] == 0
    mesh.publish(web(True))
    # no proxy behind the capture: the agent does not capture the pod yet
    await trio.sleep(0.2)
    assert not has_capture(netns)
    log: list[tuple[str, ...]] = []
    await node.start_proxy(log)
    await until(lambda: len(log) == 2)
    assert log == [("snapshot",), ("add", "uid-web", "web", "shop", "web-sa")]
    assert await netprog.is_programmed(netns)


async def test_enrolled_pods_are_replayed_to_a_new_proxy_and_by_a_restarted_agent(
    node: Node, netns: str
) -> None:
    mesh = FakeMesh(web(True))
    agent_scope = await node.start_agent(mesh)
    first: list[tuple[str, ...]] = []
    _, proxy_scope = await node.start_proxy(first)
    assert (await node.cni("ADD", netns))[0] == 0

    # the node proxy restarts: the new one gets the pod again, then the snapshot marker
    proxy_scope.cancel()
    second: list[tuple[str, ...]] = []
    proxy, _ = await node.start_proxy(second)
    assert second == [("add", "uid-web", "web", "shop", "web-sa"), ("snapshot",)]

    # the agent restarts: it reads its state file and replays to the reconnecting proxy
    agent_scope.cancel()
    second.clear()
    await node.start_agent(mesh)
    await until(lambda: ("snapshot",) in second)
    assert second == [("add", "uid-web", "web", "shop", "web-sa"), ("snapshot",)]
    assert await netprog.is_programmed(netns)


async def test_bad_plugin_requests_get_errors_and_the_agent_keeps_serving(node: Node) -> None:
    await node.start_agent(FakeMesh(web(True)))
    path = node.plugin_socket

    def raw(payload: bytes) -> dict:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(path)
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            return json.loads(s.makefile("rb").readline())

    for payload, code in [
        (b"\xff garbage\n", 6),
        (b"[1,2]\n", 4),
        (b'{"command":"FROB"}\n', 4),
        (b'{"command":"ADD","container_id":"c"}\n', 4),
        (
            b'{"command":"ADD","container_id":"c","netns":"/tmp","pod_namespace":"shop",'
            b'"pod_name":"web"}\n',
            4,
        ),
        (b"", 6),
    ]:
        reply = await trio.to_thread.run_sync(raw, payload)
        assert reply["ok"] is False and reply["code"] == code, (payload, reply)
    assert await trio.to_thread.run_sync(raw, b'{"command":"STATUS"}\n') == {"ok": True}


def test_a_corrupt_state_file_is_set_aside(tmp_path: Path) -> None:
    state = tmp_path / "pods.json"
    state.write_text("{not json")
    agent = Agent(node="n1", state_dir=str(tmp_path), mesh=FakeMesh.__new__(FakeMesh))
    agent.load()
    assert agent.pods == {}
    assert (tmp_path / "pods.corrupt").read_text() == "{not json"


def test_main_without_credentials_exits_with_an_error(tmp_path: Path) -> None:
    from cni.agent import main

    argv = [
        "--node",
        "n1",
        "--controlplane",
        "127.0.0.1:15012",
        "--ca-root",
        str(tmp_path / "absent.pem"),
        "--token-file",
        str(tmp_path / "absent"),
        "--plugin-socket",
        str(tmp_path / "p.sock"),
        "--ztunnel-socket",
        str(tmp_path / "z.sock"),
    ]
    assert main(argv) == 2
