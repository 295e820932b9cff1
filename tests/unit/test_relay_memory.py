"""Per-connection memory of the node proxy's relay and registry (issue 4: ≤ 10 KB per idle
connection): what an idle connection keeps alive."""

from __future__ import annotations

import gc
import socket
import tracemalloc

import trio
import trio.testing

from ztunnel.proxy import ConnectionRegistry, release_memory
from ztunnel.relay import Counters, relay

BLOB = 200 * 1024


async def _read_exactly(stream: trio.SocketStream, n: int) -> int:
    got = 0
    while got < n:
        data = await stream.receive_some(1 << 20)
        assert data
        got += len(data)
    return got


async def test_an_idle_relay_does_not_keep_its_last_chunk():
    """After a 200 KiB burst each way, the idle relay holds no copy of it (it used to keep
    the last chunk it read in each direction for as long as the connection stayed open)."""
    a_app, a_proxy = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    b_proxy, b_app = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    for s in (a_app, a_proxy, b_proxy, b_app):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    client, server = trio.SocketStream(a_proxy), trio.SocketStream(b_proxy)
    left, right = trio.SocketStream(a_app), trio.SocketStream(b_app)
    counters = Counters()
    async with trio.open_nursery() as nursery:
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            nursery.start_soon(relay, client, server, counters)
            await left.send_all(b"u" * BLOB)
            await right.send_all(b"d" * BLOB)
            assert await _read_exactly(right, BLOB) == BLOB
            assert await _read_exactly(left, BLOB) == BLOB
            await trio.testing.wait_all_tasks_blocked()
            held = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        assert counters.client_to_server == counters.server_to_client == BLOB
        assert held < 64 * 1024, f"idle relay holds {held} bytes"
        await left.send_eof()
        await right.send_eof()
        assert await left.receive_some() == b""
        assert await right.receive_some() == b""
    for s in (left, right):
        await s.aclose()


def test_only_connections_under_policy_get_a_cancel_scope():
    reg = ConnectionRegistry()
    outbound = reg.add({"direction": "outbound"}, Counters())
    inbound = reg.add({"direction": "inbound"}, Counters(), policy_check=(None, "ns", None))
    assert outbound.cancel_scope is None
    assert isinstance(inbound.cancel_scope, trio.CancelScope)
    assert not hasattr(outbound, "__dict__")  # slots: no per-connection dict
    assert not hasattr(Counters(), "__dict__")
    reg.remove(outbound)
    reg.remove(inbound)
    assert reg.live == {}


def test_release_memory_is_harmless():
    assert release_memory() in (True, False)
    assert release_memory() in (True, False)  # repeatable


def test_connections_with_the_same_labels_share_one_labels_object():
    from nodeproxy.telemetry.metrics import ConnectionLabels

    a = ConnectionLabels.from_workloads("source", source_identity="spiffe://td/ns/a/sa/b")
    b = ConnectionLabels.from_workloads("source", source_identity="spiffe://td/ns/a/sa/b")
    c = ConnectionLabels.from_workloads("destination", source_identity="spiffe://td/ns/a/sa/b")
    assert a is b and a == b
    assert c is not a and c != a
    assert a.values() is b.values()
