"""HBONE client pool: reuse per key, stream limits, dead/idle connections, connect failures."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import pytest
import trio
import trio.testing

from ztunnel.hbone.connection import HboneConnectError, HboneConnection
from ztunnel.hbone.pool import HbonePool, PoolKey
from ztunnel.hbone.protocol import HboneError
from ztunnel.hbone.server import HboneRequest, serve_hbone_connection

SRC = "spiffe://cluster.local/ns/default/sa/sleep"
DST = frozenset({"spiffe://cluster.local/ns/default/sa/echo"})
KEY = PoolKey(SRC, DST, ("10.0.0.2", 15008), "10.0.0.1")


async def echo_handler(req: HboneRequest) -> None:
    stream = await req.accept()
    while data := await stream.receive_some():
        await stream.send_all(data)
    await stream.send_eof()


class FakeNetwork:
    """``connect`` for the pool: a memory stream pair per connection, served by real HBONE
    server code. Port 1 refuses; ``delay`` makes connecting slow."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.connects: list[PoolKey] = []
        self.servers: list[HboneConnection] = []
        self.transports: list[trio.abc.Stream] = []
        self.delay = 0.0

    async def connect(self, key: PoolKey) -> trio.abc.Stream:
        self.connects.append(key)
        await trio.sleep(self.delay)
        if key.next_hop[1] == 1:
            raise OSError("connection refused")
        a, b = trio.testing.memory_stream_pair()
        server = await self.nursery.start(partial(
            serve_hbone_connection, b, echo_handler, peer_identity=key.src_identity))
        self.servers.append(server)
        self.transports.append(b)
        return a


@asynccontextmanager
async def running_pool(**kwargs) -> AsyncIterator[tuple[HbonePool, FakeNetwork]]:
    async with trio.open_nursery() as nursery:
        net = FakeNetwork(nursery)
        pool = HbonePool(net.connect, **kwargs)
        await nursery.start(pool.run)
        try:
            yield pool, net
        finally:
            nursery.cancel_scope.cancel()


async def roundtrip(stream, msg: bytes = b"hi") -> bytes:
    await stream.send_all(msg)
    await stream.send_eof()
    out = b""
    while data := await stream.receive_some():
        out += data
    await stream.aclose()
    return out


async def test_reuses_one_connection_for_same_key() -> None:
    async with running_pool() as (pool, net):
        for i in range(10):
            stream = await pool.open(KEY, f"10.0.0.2:{8000 + i}")
            assert await roundtrip(stream, b"%d" % i) == b"%d" % i
        # Concurrent streams too.
        streams = [await pool.open(KEY, "10.0.0.2:80") for _ in range(20)]
        assert len(net.connects) == 1
        (stat,) = pool.stats()
        assert stat["open_streams"] == 20
        assert stat["next_hop"] == "10.0.0.2:15008"
        assert stat["dst_identities"] == sorted(DST)
        for s in streams:
            await s.aclose()


async def test_new_connection_when_stream_limit_reached() -> None:
    async with running_pool(max_streams_per_conn=3) as (pool, net):
        streams = [await pool.open(KEY, "10.0.0.2:80") for _ in range(7)]
        assert len(net.connects) == 3
        assert sorted(s["open_streams"] for s in pool.stats()) == [1, 3, 3]
        # Freed capacity is used again instead of a new connection.
        await streams[0].aclose()
        streams[0] = await pool.open(KEY, "10.0.0.2:80")
        assert len(net.connects) == 3
        for s in streams:
            assert await roundtrip(s) == b"hi"


async def test_different_keys_get_different_connections() -> None:
    keys = [
        KEY,
        KEY._replace(src_identity="spiffe://cluster.local/ns/other/sa/x"),
        KEY._replace(dst_identities=frozenset({"spiffe://cluster.local/ns/default/sa/y"})),
        KEY._replace(next_hop=("10.0.0.3", 15008)),
        KEY._replace(src_ip="10.0.0.9"),
    ]
    async with running_pool() as (pool, net):
        for key in keys * 2:
            stream = await pool.open(key, "10.0.0.2:80")
            assert await roundtrip(stream) == b"hi"
        assert net.connects == keys
        assert len(pool.stats()) == len(keys)


async def test_dead_connection_is_replaced() -> None:
    async with running_pool() as (pool, net):
        first = await pool.open(KEY, "10.0.0.2:80")
        await trio.aclose_forcefully(net.transports[0])  # the peer vanishes
        with pytest.raises(trio.BrokenResourceError):
            await roundtrip(first)
        stream = await pool.open(KEY, "10.0.0.2:80")
        assert await roundtrip(stream) == b"hi"
        assert len(net.connects) == 2
        assert len(pool.stats()) == 1


async def test_drained_connection_is_replaced() -> None:
    async with running_pool() as (pool, net):
        held = await pool.open(KEY, "10.0.0.2:80")
        async with trio.open_nursery() as n:
            n.start_soon(net.servers[0].drain)  # GOAWAY; waits for `held`
            conn = pool.connections(KEY)[0]
            while conn.is_usable:
                await trio.sleep(0.001)
            stream = await pool.open(KEY, "10.0.0.2:80")
            assert await roundtrip(stream) == b"hi"
            assert len(net.connects) == 2
            assert await roundtrip(held) == b"hi"  # the drained one finished its stream


async def test_connect_failure_raises_connect_error() -> None:
    async with running_pool() as (pool, net):
        with pytest.raises(HboneConnectError):
            await pool.open(KEY._replace(next_hop=("10.0.0.2", 1)), "10.0.0.2:80")
        assert pool.stats() == []


async def test_connect_timeout(autojump_clock: trio.abc.Clock) -> None:
    async with running_pool(connect_timeout=10.0) as (pool, net):
        net.delay = 60.0
        with pytest.raises(HboneConnectError, match="timed out"):
            await pool.open(KEY, "10.0.0.2:80")


async def test_one_connect_per_key_at_a_time(autojump_clock: trio.abc.Clock) -> None:
    async with running_pool() as (pool, net):
        net.delay = 1.0
        results: list[bytes] = []

        async def one(i: int) -> None:
            stream = await pool.open(KEY, "10.0.0.2:80")
            results.append(await roundtrip(stream, b"%d" % i))

        async with trio.open_nursery() as n:
            for i in range(30):
                n.start_soon(one, i)
        assert len(net.connects) == 1
        assert sorted(results) == sorted(b"%d" % i for i in range(30))


async def test_idle_connections_are_closed(autojump_clock: trio.abc.Clock) -> None:
    async with running_pool(idle_timeout=300.0) as (pool, net):
        stream = await pool.open(KEY, "10.0.0.2:80")
        await trio.sleep(600)  # an open stream keeps its connection however long
        assert len(pool.stats()) == 1
        assert await roundtrip(stream) == b"hi"
        await trio.sleep(200)
        assert len(pool.stats()) == 1
        await trio.sleep(200)
        assert pool.stats() == []
        assert net.servers[0].closed


async def test_aclose_drains_and_refuses_new_opens() -> None:
    async with running_pool() as (pool, net):
        stream = await pool.open(KEY, "10.0.0.2:80")
        assert await roundtrip(stream) == b"hi"
        conn = pool.connections(KEY)[0]
        await pool.aclose(grace=1.0)
        assert conn.closed
        with pytest.raises(HboneError):
            await pool.open(KEY, "10.0.0.2:80")
