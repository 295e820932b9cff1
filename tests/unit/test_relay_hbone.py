"""The relay between an HBONE stream and a TCP socket (the node proxy's inbound and outbound),
over a real HBONE connection (TLS on loopback) and real TCP connections: one task per
connection, half-close and resets both ways, back-pressure, cancellation, connection loss."""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

from tests.unit.test_hbone_connection import make_pki
from ztunnel.hbone import protocol as p
from ztunnel.hbone.connection import HboneConnection, HboneStream
from ztunnel.hbone.server import HboneRequest, serve_hbone_connection
from ztunnel.relay import Counters, RelayError, relay


def tcp_pair(buf: int | None = None) -> tuple[trio.SocketStream, socket.socket]:
    """A TCP connection on loopback: the proxy's end as a trio stream, and the blocking
    socket of the application behind it (``buf``: small kernel buffers)."""
    with socket.create_server(("127.0.0.1", 0)) as lst:
        app = socket.create_connection(lst.getsockname())
        proxy, _ = lst.accept()
    if buf is not None:
        for s in (app, proxy):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buf)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buf)
    return trio.SocketStream(trio.socket.from_stdlib_socket(proxy)), app


async def app_read_all(sock: socket.socket) -> bytes:
    out = bytearray()
    while chunk := await trio.to_thread.run_sync(sock.recv, 1 << 20):
        out += chunk
    return bytes(out)


async def app_recv_exactly(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = await trio.to_thread.run_sync(sock.recv, n - len(out))
        assert chunk, f"EOF after {len(out)} of {n} bytes"
        out += chunk
    return bytes(out)


def app_is_reset(sock: socket.socket) -> bool:
    """Whether the app's connection gets reset within 5 s. (After a FIN, recv() answers b""
    even once the RST came; an empty send() then fails with EPIPE.)"""
    sock.settimeout(5)
    deadline = time.monotonic() + 5
    try:
        while time.monotonic() < deadline:
            if not sock.recv(1 << 20):
                sock.send(b"")
                time.sleep(0.01)
    except (ConnectionResetError, BrokenPipeError):
        return True
    return False


async def hbone_read_all(stream: trio.abc.ReceiveStream) -> bytes:
    out = bytearray()
    while chunk := await stream.receive_some():
        out += chunk
    return bytes(out)


Handler = Callable[[HboneRequest], Awaitable[None]]


@asynccontextmanager
async def hbone_over_tls(tmp_path: Path, handler: Handler) -> AsyncIterator[HboneConnection]:
    """A client HBONE connection to a served one, over TLS on loopback (the production
    transport: the connection writes and reads the socket directly)."""
    client_ctx, server_ctx = make_pki(tmp_path)
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]

    async def serve_one() -> None:
        tcp = await listener.accept()
        tls = trio.SSLStream(tcp, server_ctx, server_side=True)
        await tls.do_handshake()
        await serve_hbone_connection(tls, handler, peer_identity="spiffe://a")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_one)
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        tls = trio.SSLStream(tcp, client_ctx, server_hostname=None)
        await tls.do_handshake()
        client = HboneConnection(tls, client_side=True, peer_identity="spiffe://b")
        await nursery.start(client.run)
        try:
            yield client
        finally:
            with trio.CancelScope(shield=True):
                await client.aclose()
                await listener.aclose()
            nursery.cancel_scope.cancel()  # last: no checkpoint after it may hide an error


class Inbound:
    """Server side: every CONNECT is relayed to a fresh app connection (as inbound.py does)."""

    def __init__(self, buf: int | None = None) -> None:
        self.buf = buf
        self.apps: trio.MemorySendChannel[socket.socket]
        self.apps, self.app_queue = trio.open_memory_channel[socket.socket](10)
        self.results: list[Counters | BaseException] = []
        self.streams: list[HboneStream] = []
        self.cancel: list[trio.CancelScope] = []

    async def __call__(self, req: HboneRequest) -> None:
        proxy_end, app = tcp_pair(self.buf)
        stream = await req.accept()
        self.streams.append(stream)
        await self.apps.send(app)
        with trio.CancelScope() as scope:
            self.cancel.append(scope)
            try:
                self.results.append(await relay(stream, proxy_end))
            except RelayError as exc:
                self.results.append(exc)
        if scope.cancelled_caught:
            self.results.append(trio.Cancelled._create())

    async def tunnel(self, client: HboneConnection) -> tuple[HboneStream, socket.socket]:
        """A CONNECT through ``client`` and the app connection it was relayed to."""
        stream = await client.open_stream("10.0.0.2:80")
        return stream, await self.app_queue.receive()

    async def finished(self) -> None:
        """Wait until the first relay has ended (its result is in :attr:`results`)."""
        with trio.fail_after(5):
            while not self.results:
                await trio.sleep(0.01)


def tasks_in(nursery_owner: trio.lowlevel.Task) -> int:
    """The tasks below (and including) a task."""
    return 1 + sum(tasks_in(t) for n in nursery_owner.child_nurseries for t in n.child_tasks)


# -- inbound: HBONE → app -----------------------------------------------------------------


async def test_inbound_half_close_both_ways_and_counters(tmp_path: Path) -> None:
    inbound = Inbound()
    async with hbone_over_tls(tmp_path, inbound) as client:
        stream, app = await inbound.tunnel(client)
        await stream.send_all(b"request")
        await stream.send_eof()
        assert await app_recv_exactly(app, 7) == b"request"
        assert await trio.to_thread.run_sync(app.recv, 10) == b""  # our END_STREAM: a FIN
        answer = bytes(range(256)) * (3 << 12)  # 3 MiB after the caller's half-close

        def respond() -> None:
            app.sendall(answer)
            app.shutdown(socket.SHUT_WR)

        async with trio.open_nursery() as n:
            n.start_soon(trio.to_thread.run_sync, respond)
            assert await hbone_read_all(stream) == answer
        await stream.aclose()
        await inbound.finished()
    (counters,) = inbound.results
    assert isinstance(counters, Counters)
    assert (counters.client_to_server, counters.server_to_client) == (7, len(answer))
    app.close()


async def test_inbound_app_answers_first_and_closes_first(tmp_path: Path) -> None:
    inbound = Inbound()
    async with hbone_over_tls(tmp_path, inbound) as client:
        stream, app = await inbound.tunnel(client)
        app.sendall(b"220 banner\r\n")
        app.shutdown(socket.SHUT_WR)
        assert await hbone_read_all(stream) == b"220 banner\r\n"
        # the caller still sends after the app's half-close
        await stream.send_all(b"QUIT\r\n")
        await stream.send_eof()
        assert await app_read_all(app) == b"QUIT\r\n"
        await stream.aclose()
        await inbound.finished()
    assert isinstance(inbound.results[0], Counters)
    app.close()


def tcp_segments_in(sock: socket.socket) -> int:
    """How many TCP segments the socket has received (tcpi_segs_in of TCP_INFO)."""
    return struct.unpack_from("I", sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256),
                              140)[0]


async def test_last_bytes_and_their_end_reach_the_app_in_one_segment(tmp_path: Path) -> None:
    """DATA with END_STREAM becomes one TCP segment with FIN: an app that closes as soon as
    it has what it waited for (an HTTP client given Connection: close) has already seen the
    peer's close, as it would from the server itself, and is not left in TIME_WAIT."""
    inbound = Inbound()
    async with hbone_over_tls(tmp_path, inbound) as client:
        stream, app = await inbound.tunnel(client)
        await trio.sleep(0.05)  # the app's side of the handshake is settled
        before = tcp_segments_in(app)
        await stream._send(b"HTTP/1.1 200 OK\r\n\r\nbye", eof=True)  # as the relay sends
        assert await app_read_all(app) == b"HTTP/1.1 200 OK\r\n\r\nbye"
        assert tcp_segments_in(app) - before == 1  # bytes and FIN together
        await stream.aclose()
        await inbound.finished()
    app.close()


async def test_inbound_app_reset_resets_the_tunnel(tmp_path: Path) -> None:
    inbound = Inbound()
    async with hbone_over_tls(tmp_path, inbound) as client:
        stream, app = await inbound.tunnel(client)
        await stream.send_all(b"hello")
        assert await app_recv_exactly(app, 5) == b"hello"
        app.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        app.close()  # RST
        with pytest.raises(trio.BrokenResourceError, match="reset"):
            await hbone_read_all(stream)
        await inbound.finished()
        assert isinstance(inbound.results[0], RelayError)
        assert client.is_usable  # only the stream was reset
        await stream.aclose()


async def test_tunnel_reset_resets_the_app_connection(tmp_path: Path) -> None:
    inbound = Inbound()
    async with hbone_over_tls(tmp_path, inbound) as client:
        stream, app = await inbound.tunnel(client)
        await stream.send_all(b"hello")
        assert await app_recv_exactly(app, 5) == b"hello"
        await stream.aclose()  # RST_STREAM
        assert await trio.to_thread.run_sync(app_is_reset, app)
        await inbound.finished()
        assert isinstance(inbound.results[0], RelayError)
    app.close()


async def test_tunnel_reset_after_its_half_close_still_resets_the_app(tmp_path: Path) -> None:
    inbound = Inbound()
    async with hbone_over_tls(tmp_path, inbound) as client:
        stream, app = await inbound.tunnel(client)
        await stream.send_all(b"hello")
        await stream.send_eof()
        assert await app_recv_exactly(app, 5) == b"hello"
        assert await trio.to_thread.run_sync(app.recv, 10) == b""
        await stream.aclose()  # RST_STREAM after END_STREAM
        assert await trio.to_thread.run_sync(app_is_reset, app)
        await inbound.finished()
        assert isinstance(inbound.results[0], RelayError)
    app.close()


async def test_slow_app_reader_gets_everything_in_order_and_buffering_is_bounded(
    tmp_path: Path,
) -> None:
    """The app does not read: the proxy buffers at most the stream window (the caller is held
    back by HTTP/2 flow control); once the app reads, every byte arrives in order."""
    inbound = Inbound(buf=64 * 1024)
    payload = bytes(range(251)) * (16 * 1024 * 1024 // 251)  # ~16 MiB, not a power of two
    sent = 0
    async with hbone_over_tls(tmp_path, inbound) as client:
        stream, app = await inbound.tunnel(client)

        async def sender() -> None:
            nonlocal sent
            for off in range(0, len(payload), 100_000):
                await stream.send_all(payload[off : off + 100_000])
                sent = min(off + 100_000, len(payload))
            await stream.send_eof()

        async with trio.open_nursery() as n:
            n.start_soon(sender)
            # let the sender run into the window (real sockets: poll, no timing assertion)
            last = -1
            while last != sent:
                last = sent
                await trio.sleep(0.2)
            (server_stream,) = inbound.streams
            assert sent < len(payload)
            assert server_stream.buffered <= p.STREAM_WINDOW
            assert sent <= p.STREAM_WINDOW + 4 * 1024 * 1024  # window + socket buffers
            got = await app_read_all(app)
        assert got == payload
        app.shutdown(socket.SHUT_WR)
        assert await hbone_read_all(stream) == b""
        await stream.aclose()
        await inbound.finished()
    assert isinstance(inbound.results[0], Counters)
    assert inbound.results[0].client_to_server == len(payload)
    app.close()


async def test_cancelling_an_inbound_relay_resets_both_sides(tmp_path: Path) -> None:
    """What a policy change does to a live connection: both ends see a reset."""
    inbound = Inbound()
    async with hbone_over_tls(tmp_path, inbound) as client:
        stream, app = await inbound.tunnel(client)
        await stream.send_all(b"hello")
        assert await app_recv_exactly(app, 5) == b"hello"
        inbound.cancel[0].cancel()
        assert await trio.to_thread.run_sync(app_is_reset, app)
        with pytest.raises(trio.BrokenResourceError, match="reset"):
            await hbone_read_all(stream)
        await stream.aclose()
        assert client.is_usable
    app.close()


async def test_an_idle_tunnel_is_one_task_at_each_end(tmp_path: Path) -> None:
    """Per-connection memory: an open idle relay is the handler's own task, no nursery and no
    second task (the HBONE connection's reader delivers to the socket)."""
    inbound = Inbound()
    async with hbone_over_tls(tmp_path, inbound) as client:
        root = trio.lowlevel.current_root_task()
        await trio.testing.wait_all_tasks_blocked()
        before = tasks_in(root)
        conns = []
        for _ in range(5):
            app_side, app_peer = tcp_pair()
            conns.append((app_side, app_peer))
        ends = []
        async with trio.open_nursery() as n:
            for app_side, _ in conns:
                upstream = await client.open_stream("10.0.0.2:80")
                n.start_soon(relay, app_side, upstream)  # an outbound relay
            apps = [await inbound.app_queue.receive() for _ in conns]
            for (_, app_peer), app in zip(conns, apps, strict=True):
                app_peer.sendall(b"ping")
                assert await app_recv_exactly(app, 4) == b"ping"
                app.sendall(b"pong")
                assert await app_recv_exactly(app_peer, 4) == b"pong"
            await trio.testing.wait_all_tasks_blocked()
            # per connection: the outbound relay's task and the inbound handler's task
            assert tasks_in(root) - before == 2 * len(conns)
            for (_, app_peer), app in zip(conns, apps, strict=True):
                app_peer.shutdown(socket.SHUT_WR)
                app.shutdown(socket.SHUT_WR)
                ends.append((app_peer, app))
        for app_peer, app in ends:
            assert await app_read_all(app_peer) == b""
            assert await app_read_all(app) == b""
            app_peer.close()
            app.close()


# -- outbound: app → HBONE ------------------------------------------------------------------


async def test_outbound_bytes_before_the_relay_starts_come_first(tmp_path: Path) -> None:
    """A server-first protocol: the banner arrives with the CONNECT's answer, before the
    relay is set up; it reaches the app first, then the rest in order."""

    async def server_first(req: HboneRequest) -> None:
        stream = await req.accept()
        await stream.send_all(b"banner;")
        got = await hbone_read_all(stream)
        await stream.send_all(b"echo:" + got)
        await stream.send_eof()

    async with hbone_over_tls(tmp_path, server_first) as client:
        upstream = await client.open_stream("10.0.0.2:80")
        with trio.fail_after(5):
            while upstream.buffered < 7:
                await trio.sleep(0.01)
        app_side, app = tcp_pair()
        async with trio.open_nursery() as n:
            result: list[Counters] = []

            async def run() -> None:
                result.append(await relay(app_side, upstream))

            n.start_soon(run)
            assert await app_recv_exactly(app, 7) == b"banner;"
            app.sendall(b"hi")
            app.shutdown(socket.SHUT_WR)
            assert await app_read_all(app) == b"echo:hi"
        assert (result[0].client_to_server, result[0].server_to_client) == (2, 14)
        app.close()


async def test_outbound_connection_loss_resets_the_app(tmp_path: Path) -> None:
    async def hold(req: HboneRequest) -> None:
        stream = await req.accept()
        await hbone_read_all(stream)

    async with hbone_over_tls(tmp_path, hold) as client:
        upstream = await client.open_stream("10.0.0.2:80")
        app_side, app = tcp_pair()
        with pytest.RaisesGroup(RelayError):
            async with trio.open_nursery() as n:
                n.start_soon(relay, app_side, upstream)
                app.sendall(b"x")
                await trio.testing.wait_all_tasks_blocked()
                await client.aclose()  # the HBONE connection goes away
        assert await trio.to_thread.run_sync(app_is_reset, app)
        app.close()


async def test_outbound_app_reset_resets_the_stream(tmp_path: Path) -> None:
    seen: list[BaseException] = []

    async def hold(req: HboneRequest) -> None:
        stream = await req.accept()
        try:
            await hbone_read_all(stream)
        except trio.BrokenResourceError as exc:
            seen.append(exc)

    async with hbone_over_tls(tmp_path, hold) as client:
        upstream = await client.open_stream("10.0.0.2:80")
        app_side, app = tcp_pair()
        with pytest.RaisesGroup(RelayError):
            async with trio.open_nursery() as n:
                n.start_soon(relay, app_side, upstream)
                app.sendall(b"x")
                await trio.testing.wait_all_tasks_blocked()
                app.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                app.close()
        with trio.fail_after(5):
            while not seen:
                await trio.sleep(0.01)
        assert "reset" in str(seen[0])
        assert client.is_usable
