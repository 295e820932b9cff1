"""The node agent ↔ node proxy channel: real SEQPACKET sockets, real netns fds, acks, replay."""

from __future__ import annotations

import os
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from nodeproxy import inpod_protocol as protocol
from nodeproxy.inpod_protocol import Add, Del, Hello, Keep, ProtocolError, Refused, SnapshotSent
from nodeproxy.netns import netns_id
from ztunnel.inpod.channel import PodInfo, run_channel


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"npt-cni-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield f"/var/run/netns/{name}"
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


class Handler:
    """A stand-in node proxy: records what it was told and the netns identity of each fd."""

    def __init__(self) -> None:
        self.events: list[tuple[str, ...]] = []
        self.netns: dict[str, tuple[int, int]] = {}
        self.refuse: set[str] = set()
        self.changed = trio.Event()

    def _note(self, *event: str) -> None:
        self.events.append(event)
        self.changed.set()
        self.changed = trio.Event()

    async def add(self, pod: PodInfo, netns_fd: int) -> None:
        try:
            self.netns[pod.uid] = netns_id(netns_fd)
        finally:
            os.close(netns_fd)
        self._note("add", pod.uid, pod.name, pod.namespace, pod.service_account)
        if pod.uid in self.refuse:
            raise RuntimeError(f"cannot start the proxy of {pod.uid}")

    async def keep(self, uid: str) -> None:
        self._note("keep", uid)

    async def delete(self, uid: str) -> None:
        self._note("del", uid)

    async def snapshot_sent(self) -> None:
        self._note("snapshot")


async def listen(path: str) -> trio.socket.SocketType:
    sock = protocol.seqpacket_socket()
    await sock.bind(path)
    sock.listen()
    return sock


async def accept_hello(listener: trio.socket.SocketType) -> trio.socket.SocketType:
    conn, _ = await listener.accept()
    msg, fd = await protocol.recv_msg(conn)
    assert msg == Hello(1) and fd is None
    return conn


def test_messages_round_trip_and_bad_ones_are_rejected() -> None:
    for msg in [
        Hello(1),
        Add("u", "n", "ns", "sa"),
        Keep("u"),
        Del("u"),
        SnapshotSent(),
        protocol.Ack(None),
        protocol.Ack("boom"),
    ]:
        assert protocol.decode(protocol.encode(msg)) == msg
    assert protocol.encode(Add("u", "n", "ns", "sa")) == (
        b'{"type":"add","uid":"u","name":"n","namespace":"ns","service_account":"sa"}'
    )
    for bad in [
        b"",
        b"{",
        b"[]",
        b'{"type":"frob"}',
        b'{"type":"add","uid":"u"}',
        b'{"type":"del","uid":""}',
        b'{"type":"hello","version":"1"}',
        b'{"type":"ack","error":5}',
        b"\xff",
    ]:
        with pytest.raises(ProtocolError):
            protocol.decode(bad)


async def test_channel_passes_the_netns_fd_and_acks_each_message(
    tmp_path: Path, netns: str
) -> None:
    path = str(tmp_path / "ztunnel.sock")
    handler = Handler()
    fd = os.open(netns, os.O_RDONLY)
    try:
        original = netns_id(fd)
        with trio.fail_after(10), await listen(path) as listener:
            async with trio.open_nursery() as nursery:
                await nursery.start(run_channel, path, handler)
                conn = await accept_hello(listener)
                with conn:
                    await protocol.exchange(conn, Add("u1", "web", "shop", "web-sa"), fd)
                    await protocol.exchange(conn, Keep("u1"))
                    handler.refuse.add("u2")
                    with pytest.raises(Refused, match="cannot start the proxy of u2"):
                        await protocol.exchange(conn, Add("u2", "db", "shop", "db-sa"), fd)
                    with pytest.raises(Refused, match="without a netns fd"):
                        await protocol.exchange(conn, Add("u3", "x", "shop", "sa"))
                    # garbage gets a nack, and the channel stays in step
                    await conn.send(b"not json")
                    ack, _ = await protocol.recv_msg(conn)
                    assert isinstance(ack, protocol.Ack) and "not JSON" in (ack.error or "")
                    await protocol.exchange(conn, Del("u1"))
                    await protocol.exchange(conn, SnapshotSent())
                nursery.cancel_scope.cancel()
    finally:
        os.close(fd)
    assert handler.events == [
        ("add", "u1", "web", "shop", "web-sa"),
        ("keep", "u1"),
        ("add", "u2", "db", "shop", "db-sa"),
        ("del", "u1"),
        ("snapshot",),
    ]
    assert handler.netns["u1"] == original
    # and it is the namespace we made, not ours
    with open("/proc/self/ns/net", "rb") as own:
        assert handler.netns["u1"] != netns_id(own.fileno())


async def test_channel_waits_for_the_agent_and_reconnects_for_a_replay(
    tmp_path: Path, netns: str
) -> None:
    path = str(tmp_path / "ztunnel.sock")
    handler = Handler()
    fd = os.open(netns, os.O_RDONLY)
    try:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                # the proxy starts first: the agent is absent, it keeps retrying
                await nursery.start(
                    lambda task_status: run_channel(
                        path, handler, min_backoff=0.01, max_backoff=0.05, task_status=task_status
                    )
                )
                await trio.sleep(0.1)
                with await listen(path) as listener:
                    conn = await accept_hello(listener)
                    with conn:
                        await protocol.exchange(conn, Add("u1", "web", "shop", "sa"), fd)
                        await protocol.exchange(conn, SnapshotSent())
                    # the agent restarts: the proxy reconnects, says hello, takes the replay
                    conn = await accept_hello(listener)
                    with conn:
                        await protocol.exchange(conn, Add("u1", "web", "shop", "sa"), fd)
                        await protocol.exchange(conn, SnapshotSent())
                nursery.cancel_scope.cancel()
    finally:
        os.close(fd)
    assert handler.events == [
        ("add", "u1", "web", "shop", "sa"),
        ("snapshot",),
        ("add", "u1", "web", "shop", "sa"),
        ("snapshot",),
    ]


async def test_exchange_without_an_ack_times_out(tmp_path: Path) -> None:
    a, b = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b, trio.fail_after(5):
        with pytest.raises(ProtocolError, match="no ack"):
            await protocol.exchange(a, Keep("u"), timeout=0.05)
        got, _ = await protocol.recv_msg(b)
        assert got == Keep("u")
        b.close()
        with pytest.raises(protocol.ChannelClosed):
            await protocol.recv_msg(a)
