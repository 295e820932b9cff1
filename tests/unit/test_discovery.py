"""The discovery client against a real in-process control plane (TLS on loopback)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import trio

from controlplane.server import ServerConfig, serve
from nodeproxy import certs, httpio, model
from nodeproxy.discovery import DiscoveryClient, DiscoveryError

PODS = """
kind: Namespace
metadata: {name: shop, labels: {nodeproxy.io/dataplane-mode: ambient}}
---
kind: Pod
metadata: {name: web, namespace: shop}
spec: {nodeName: node-a}
status: {podIP: 10.0.0.1}
"""


def write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


async def eventually(predicate, timeout: float = 10.0) -> None:
    """Wait until ``predicate()`` holds; the deadline only guards against hangs."""
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.02)


class ControlPlane:
    """A control plane that can be stopped and started again (same CA, new port)."""

    def __init__(self, tmp_path: Path, nursery: trio.Nursery):
        self.resources = tmp_path / "resources"
        self.resources.mkdir()
        write(self.resources / "pods.yaml", PODS)
        tokens = tmp_path / "tokens.yaml"
        tokens.write_text("tok-a: node-a\n")
        self.config = ServerConfig(
            resources=self.resources, state_dir=tmp_path / "state", tokens=tokens,
            listen="127.0.0.1:0", admin=None, cert_ttl=timedelta(hours=1),
            ping_interval=0.2, poll_interval=0.05,
        )
        self.nursery = nursery
        self.port = 0
        self.root_pem = b""
        self._scope: trio.CancelScope | None = None
        self._stopped = trio.Event()

    async def start(self) -> None:
        self._stopped = trio.Event()

        async def run(task_status=trio.TASK_STATUS_IGNORED):
            try:
                with trio.CancelScope() as scope:
                    self._scope = scope
                    await serve(self.config, task_status=task_status)
            finally:
                self._stopped.set()

        running = await self.nursery.start(run)
        self.port, self.root_pem = running.port, running.root_pem

    async def stop(self) -> None:
        """Cancel the control plane and wait until its sockets are closed."""
        assert self._scope is not None
        self._scope.cancel()
        await self._stopped.wait()

    async def connect(self, host: str, port: int) -> trio.abc.Stream:
        """The client's dial hook: always reaches the current incarnation."""
        return await trio.open_tcp_stream("127.0.0.1", self.port)

    def client(self, **kw) -> DiscoveryClient:
        kw.setdefault("connect", self.connect)
        return DiscoveryClient("controlplane:15012", self.root_pem, "tok-a",
                               backoff_initial=0.05, backoff_max=0.2, **kw)


@pytest.fixture
async def cp(tmp_path: Path, nursery) -> ControlPlane:
    plane = ControlPlane(tmp_path, nursery)
    await plane.start()
    return plane


async def test_follows_snapshot_and_changes(cp: ControlPlane, nursery):
    client = cp.client()
    assert client.state.workloads == {} and not client.ready.is_set()
    await nursery.start(client.run)  # returns at once, before any connection
    with trio.fail_after(10):
        await client.ready.wait()
    assert client.connected
    assert client.state.workloads["shop/web"].meshed

    version = client.state.version
    write(cp.resources / "more.yaml",
          "kind: Pod\nmetadata: {name: db, namespace: shop}\nspec: {nodeName: node-b}\n")
    with trio.fail_after(10):
        state = await client.wait_changed(version)
    assert state.version > version and state.workloads["shop/db"].node == "node-b"


async def test_keeps_state_while_the_server_is_down_and_resyncs(cp: ControlPlane, nursery):
    client = cp.client()
    await nursery.start(client.run)
    with trio.fail_after(10):
        await client.ready.wait()
    held = client.state

    await cp.stop()
    await eventually(lambda: not client.connected)
    assert client.state is held  # still serving what it knew
    assert client.last_error

    # the world changes while the client is cut off, then the control plane comes back
    write(cp.resources / "pods.yaml", PODS.replace("name: web", "name: api"))
    await trio.sleep(0.3)  # let a few reconnects fail
    assert client.state is held
    await cp.start()
    with trio.fail_after(10):
        state = await client.wait_changed(held.version)
    assert set(state.workloads) == {"shop/api"}  # replaced by the new snapshot
    await eventually(lambda: client.connected)


async def test_refuses_a_server_with_another_identity(cp: ControlPlane, nursery):
    client = cp.client(expected_identity="spiffe://cluster.local/ns/other/sa/impostor")
    await nursery.start(client.run)
    await eventually(lambda: client.last_error is not None)
    assert "PeerIdentityError" in client.last_error and not client.ready.is_set()
    with pytest.raises(DiscoveryError, match="not one of the expected"):
        await client.sign(certs.make_csr("spiffe://cluster.local/ns/shop/sa/default",
                                         certs.generate_key()))


async def test_bad_token_is_reported_and_retried(cp: ControlPlane, nursery):
    client = cp.client()
    client.token = "wrong"
    await nursery.start(client.run)
    await eventually(lambda: client.last_error is not None)
    assert "401" in client.last_error and not client.ready.is_set()
    client.token = "tok-a"  # e.g. the operator fixed the token file; back-off retries
    with trio.fail_after(10):
        await client.ready.wait()


async def test_sign_errors(cp: ControlPlane):
    client = cp.client()
    key = certs.generate_key()
    chain = await client.sign(certs.make_csr("spiffe://cluster.local/ns/shop/sa/default", key))
    assert certs.cert_info(chain[0]).identity == "spiffe://cluster.local/ns/shop/sa/default"
    with pytest.raises(DiscoveryError) as info:
        await client.sign(b"-----BEGIN CERTIFICATE REQUEST-----\nnope\n")
    assert info.value.status == 400 and "bad CSR" in str(info.value)
    await cp.stop()
    with pytest.raises(DiscoveryError, match="cannot reach") as info:
        await client.sign(certs.make_csr("spiffe://cluster.local/ns/shop/sa/default", key))
    assert info.value.status == 0


def test_stream_messages_sans_io():
    client = DiscoveryClient("cp:1", _any_root(), "t")
    with pytest.raises(ValueError, match="before the first snapshot"):
        client.handle_message({"type": "delta", "version": 2})
    for bad in ([], {"type": "mystery"}, {"type": "snapshot"},
                {"type": "snapshot", "state": {"workloads": [{"bogus": 1}]}}):
        with pytest.raises(ValueError):
            client.handle_message(bad)
    assert client.state == model.MeshState()

    first = model.MeshState(namespaces={"a": model.Namespace("a")}, version=5)
    client.handle_message({"type": "snapshot", "state": first.to_json()})
    assert client.ready.is_set() and client.state == first
    held = client.state
    second = model.MeshState(namespaces={"b": model.Namespace("b")}, version=6)
    client.handle_message({"type": "delta", **first.diff(second)})
    client.handle_message({"type": "ping"})
    assert client.state == second
    assert held == first  # the old object was not mutated


def test_line_splitter():
    s = httpio.LineSplitter(max_line=10)
    assert s.feed(b'{"a"') == []
    assert s.feed(b':1}\n{"b":2}\n{') == [b'{"a":1}', b'{"b":2}']
    with pytest.raises(httpio.HTTPError):
        s.feed(b"x" * 20)


def _any_root() -> bytes:
    from controlplane.ca import CertificateAuthority

    return CertificateAuthority.create().root_pem


async def test_silent_connection_is_abandoned_and_redialled(tmp_path: Path, nursery):
    plane = ControlPlane(tmp_path, nursery)
    plane.config.ping_interval = 3600  # the server goes quiet after the snapshot
    await plane.start()
    client = plane.client(idle_timeout=0.2)
    await nursery.start(client.run)
    with trio.fail_after(10):
        await client.ready.wait()
    held = client.state
    await eventually(lambda: client.failures >= 1)
    assert "TooSlowError" in client.last_failure
    await eventually(lambda: client.connected)
    assert client.state == held  # resynced from a fresh snapshot


def test_token_file_is_reread_when_it_rotates_and_keeps_the_last_good(tmp_path):
    import os

    from nodeproxy.discovery import TokenFile

    path = tmp_path / "token"
    path.write_text("first\n")
    token = TokenFile(path)
    assert token() == "first"
    path.write_text("second\n")
    os.utime(path, ns=(1, 10**18))  # a rotation: new content, new mtime
    assert token() == "second"
    path.write_text("")  # half-written: keep the last good token
    os.utime(path, ns=(1, 2 * 10**18))
    assert token() == "second"
    path.unlink()
    assert token() == "second"
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ValueError):
        TokenFile(empty)
