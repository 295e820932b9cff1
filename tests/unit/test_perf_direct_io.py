"""The second pass of L4 shortcuts behaves like the trio paths it bypasses.

- HBONE over an established TLS stream reads/writes through the SSLObject and the socket
  (``_DirectTls``): both ends use it after the handshake, TLS 1.3 session tickets still reach
  the client, bulk and many concurrent streams arrive intact, a peer's close ends the
  connection; after a short read it waits for the socket instead of trying it again
- the relay's direct socket calls: half-close, bytes and resets between HBONE and TCP
- ``_flush`` wakes only the waiters whose bytes were written; streams opened and answered
  without waiting for the writer still see a lost connection as an error
- a write by the only task of an event-loop pass, on a connection that wrote nothing in the
  pass before, goes out at once, not through the writer task; writes of several tasks in one
  pass, or of one task pass after pass, still go through the writer; what a full socket does
  not take at once follows, in order
"""

from __future__ import annotations

import os
import socket
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.testing
from test_hbone_connection import make_pki

from ztunnel.hbone.connection import (
    UNWAITED_WRITE_MAX,
    HboneConnection,
    LargeReadStream,
    _DirectTls,
)
from ztunnel.hbone.protocol import HboneError
from ztunnel.hbone.server import HboneRequest, serve_hbone_connection
from ztunnel.relay import RelayError, relay


async def echo(req: HboneRequest) -> None:
    stream = await req.accept()
    while data := await stream.receive_some():
        await stream.send_all(data)
    await stream.send_eof()


async def tls_pair(tmp_path: Path, nursery: trio.Nursery, handler) -> tuple[
    HboneConnection, HboneConnection, trio.SSLStream
]:
    """Client and server HboneConnections over TLS 1.3 on a loopback TCP connection, both
    handshaken before the connection starts (as the pool and the inbound listener do)."""
    client_ctx, server_ctx = make_pki(tmp_path)
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    tcp_client = await trio.open_tcp_stream("127.0.0.1", port)
    tcp_server = await listener.accept()
    await listener.aclose()
    server_tls = trio.SSLStream(LargeReadStream(tcp_server), server_ctx, server_side=True)
    client_tls = trio.SSLStream(tcp_client, client_ctx, server_hostname=None)
    async with trio.open_nursery() as hs:
        hs.start_soon(server_tls.do_handshake)
        hs.start_soon(client_tls.do_handshake)
    assert client_tls.version() == "TLSv1.3"
    server = await nursery.start(partial(serve_hbone_connection, server_tls, handler,
                                         peer_identity=None))
    client = HboneConnection(client_tls, client_side=True)
    await nursery.start(client.run)
    return client, server, client_tls


async def test_direct_tls_carries_bulk_and_concurrent_streams_intact(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        client, server, client_tls = await tls_pair(tmp_path, nursery, echo)
        assert client._direct is not None and server._direct is not None
        payloads = [os.urandom(200_000 + i * 1_000) for i in range(20)]
        got: dict[int, bytes] = {}

        async def roundtrip(i: int) -> None:
            stream = await client.open_stream("127.0.0.1:9")
            async with trio.open_nursery() as n:

                async def send() -> None:
                    for off in range(0, len(payloads[i]), 50_000):
                        await stream.send_all(payloads[i][off : off + 50_000])
                    await stream.send_eof()

                n.start_soon(send)
                chunks = []
                while data := await stream.receive_some():
                    chunks.append(data)
            got[i] = b"".join(chunks)
            await stream.aclose()

        async with trio.open_nursery() as n:
            for i in range(len(payloads)):
                n.start_soon(roundtrip, i)
        assert [got[i] for i in range(len(payloads))] == payloads
        # the server's session tickets (held back by trio until the first write) were sent
        # ahead of its first frames and taken in by the client's TLS object
        assert client_tls._ssl_object.session is not None
        assert client_tls._ssl_object.session.has_ticket
        await client.aclose()
        nursery.cancel_scope.cancel()


async def test_direct_tls_peer_close_breaks_open_streams(tmp_path: Path) -> None:
    opened = trio.Event()

    async def hold(req: HboneRequest) -> None:
        await req.accept()
        opened.set()
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        client, server, _ = await tls_pair(tmp_path, nursery, hold)
        stream = await client.open_stream("127.0.0.1:9")
        await opened.wait()
        await server.aclose()  # GOAWAY, then TLS/TCP close
        with pytest.raises(trio.BrokenResourceError):
            while await stream.receive_some():
                pass
        with trio.fail_after(5):
            while not client.closed:
                await trio.sleep(0.01)
        with pytest.raises(HboneError):
            await client.open_stream("127.0.0.1:9")
        nursery.cancel_scope.cancel()


async def test_direct_tls_garbage_from_peer_ends_connection(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        client, server, client_tls = await tls_pair(tmp_path, nursery, echo)
        stream = await client.open_stream("127.0.0.1:9")
        # bytes that are no TLS record, straight onto the client's TCP socket from the server
        server_sock = server.transport.transport_stream.socket
        await server_sock.send(b"\x17\x03\x03\x00\x05garbage-not-a-record")
        with pytest.raises(trio.BrokenResourceError):
            while await stream.receive_some():
                pass
        with trio.fail_after(5):
            while not client.closed:
                await trio.sleep(0.01)
        assert "read failed" in (client.dead_reason or "")
        nursery.cancel_scope.cancel()


class CountingSocket:
    """A socket that counts the reads that found nothing (EAGAIN)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reads = 0
        self.empty_reads = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def recv(self, n: int) -> bytes:
        self.reads += 1
        try:
            return self.sock.recv(n)
        except BlockingIOError:
            self.empty_reads += 1
            raise

    def send(self, data: bytes) -> int:
        return self.sock.send(data)


async def test_direct_tls_after_a_short_read_waits_instead_of_reading_again(
        tmp_path: Path) -> None:
    client_ctx, server_ctx = make_pki(tmp_path)
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    tcp_client = await trio.open_tcp_stream("127.0.0.1", listener.socket.getsockname()[1])
    tcp_server = await listener.accept()
    await listener.aclose()
    server_tls = trio.SSLStream(tcp_server, server_ctx, server_side=True)
    client_tls = trio.SSLStream(tcp_client, client_ctx, server_hostname=None)
    async with trio.open_nursery() as hs:
        hs.start_soon(server_tls.do_handshake)
        hs.start_soon(client_tls.do_handshake)
    client, server = _DirectTls.create(client_tls), _DirectTls.create(server_tls)
    assert client is not None and server is not None
    counting = CountingSocket(server._sock)
    server._sock = counting  # type: ignore[assignment]

    async def receive(n: int) -> bytes:
        got = b""
        while len(got) < n:
            got += b"".join(await server.receive())
        return got

    # request/response: each message comes while the reader waits
    for i in range(5):
        msg = bytes([65 + i]) * 1000
        async with trio.open_nursery() as n:

            async def later(msg: bytes = msg) -> None:
                await trio.sleep(0.02)
                await client.send([msg])

            n.start_soon(later)
            assert await receive(len(msg)) == msg
    # only the first read tried an empty socket; every later one waited for the next message
    assert counting.empty_reads == 1, (counting.reads, counting.empty_reads)
    # bulk still arrives whole, read ahead while reads come back full
    bulk = os.urandom(3_000_000)
    async with trio.open_nursery() as n:
        n.start_soon(client.send, [bulk])
        assert await receive(len(bulk)) == bulk
    for s in (tcp_client, tcp_server):
        await s.aclose()


def tcp_pair() -> tuple[trio.SocketStream, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as lst:
        b = socket.create_connection(lst.getsockname())
        a, _ = lst.accept()
    return trio.SocketStream(trio.socket.from_stdlib_socket(a)), b


async def test_relay_between_tcp_and_hbone_half_closes_and_counts(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        client, _, _ = await tls_pair(tmp_path, nursery, echo)
        proxy_side, app = tcp_pair()
        stream = await client.open_stream("127.0.0.1:9")
        result = {}

        async def run() -> None:
            result["c"] = await relay(proxy_side, stream)

        nursery.start_soon(run)
        payload = os.urandom(1_500_000)
        await trio.to_thread.run_sync(app.sendall, payload)
        app.shutdown(socket.SHUT_WR)  # half-close: the echo still answers everything
        chunks = []
        while data := await trio.to_thread.run_sync(app.recv, 1 << 20):
            chunks.append(data)
        assert b"".join(chunks) == payload
        with trio.fail_after(5):
            while "c" not in result:
                await trio.sleep(0.01)
        assert result["c"].client_to_server == result["c"].server_to_client == len(payload)
        app.close()
        await client.aclose()
        nursery.cancel_scope.cancel()


async def test_relay_tcp_reset_resets_the_hbone_stream(tmp_path: Path) -> None:
    resets: list[BaseException] = []

    async def reader(req: HboneRequest) -> None:
        stream = await req.accept()
        try:
            while await stream.receive_some():
                pass
        except trio.BrokenResourceError as exc:
            resets.append(exc)

    async with trio.open_nursery() as nursery:
        client, _, _ = await tls_pair(tmp_path, nursery, reader)
        proxy_side, app = tcp_pair()
        stream = await client.open_stream("127.0.0.1:9")
        app.sendall(b"some bytes")
        app.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        app.close()  # RST
        with pytest.raises(RelayError):
            await relay(proxy_side, stream)
        with trio.fail_after(5):
            while not resets:
                await trio.sleep(0.01)
        assert "reset" in str(resets[0])
        await client.aclose()
        nursery.cancel_scope.cancel()


async def test_flush_waiters_wake_in_order_and_see_connection_loss() -> None:
    a, b = trio.testing.memory_stream_pair()
    conn = HboneConnection(a, client_side=True)
    async with trio.open_nursery() as nursery:
        await nursery.start(conn.run)
        done: list[int] = []

        async def flusher(i: int) -> None:
            conn._proto.ping()
            await conn._flush()
            done.append(i)

        for i in range(5):
            nursery.start_soon(flusher, i)
        with trio.fail_after(5):
            while len(done) < 5:
                await b.receive_some()  # drain so the writer can write
        assert sorted(done) == list(range(5))
        # the peer goes away: a waiter is woken with the loss, not left hanging
        await b.aclose()
        with trio.fail_after(5), pytest.raises(trio.BrokenResourceError):
            while True:
                conn._proto.ping()
                await conn._flush()
        nursery.cancel_scope.cancel()



async def test_hbone_to_slow_tcp_reader_arrives_intact_in_order(tmp_path: Path) -> None:
    # the relay's sink sends from the HBONE reader while the TCP socket takes it; a slow
    # reader makes the socket fill up, so the rest must go through receive_some in order
    payload = os.urandom(4_000_000)

    async def source(req: HboneRequest) -> None:
        stream = await req.accept()
        for off in range(0, len(payload), 64_000):
            await stream.send_all(payload[off : off + 64_000])
        await stream.send_eof()
        assert await stream.receive_some() == b""

    async with trio.open_nursery() as nursery:
        client, _, _ = await tls_pair(tmp_path, nursery, source)
        proxy_side, app = tcp_pair()
        app.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32_768)
        stream = await client.open_stream("127.0.0.1:9")
        result = {}

        async def run() -> None:
            result["c"] = await relay(proxy_side, stream)

        nursery.start_soon(run)
        chunks = []
        while True:
            data = await trio.to_thread.run_sync(app.recv, 16_384)
            if not data:
                break
            chunks.append(data)
            if len(chunks) % 20 == 0:
                await trio.sleep(0.001)
        assert b"".join(chunks) == payload
        app.close()
        with trio.fail_after(5):
            while "c" not in result:
                await trio.sleep(0.01)
        assert result["c"].server_to_client == len(payload)
        await client.aclose()
        nursery.cancel_scope.cancel()


class _Steps(trio.abc.Instrument):
    """Names of the coroutines trio stepped while recording."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.names.append(task.coro.cr_code.co_name)


async def test_a_lone_write_goes_out_without_the_writer_task(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        client, _, _ = await tls_pair(tmp_path, nursery, echo)
        # idle streams beside it (a gateway's pooled keep-alive connections) change nothing
        idle = [await client.open_stream("127.0.0.1:9") for _ in range(3)]
        stream = await client.open_stream("127.0.0.1:9")
        await stream.send_all(b"warm-up")
        assert await stream.receive_some() == b"warm-up"
        steps = _Steps()
        for i in range(5):
            await trio.testing.wait_all_tasks_blocked()  # so this task runs alone
            trio.lowlevel.add_instrument(steps)
            await stream.send_all(b"ping %d" % i)
            assert await stream.receive_some() == b"ping %d" % i
            trio.lowlevel.remove_instrument(steps)
        # both ways (this task's writes and the echo handler's) went out inline
        assert "_run_handler" in steps.names
        assert "_writer_loop" not in steps.names, steps.names
        for s in idle:
            await s.aclose()
        await client.aclose()
        nursery.cancel_scope.cancel()


async def test_writes_of_many_tasks_in_one_pass_share_the_writer(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        client, _, _ = await tls_pair(tmp_path, nursery, echo)
        streams = [await client.open_stream("127.0.0.1:9") for _ in range(8)]
        steps = _Steps()
        go = trio.Event()
        got: dict[int, bytes] = {}

        async def ping(i: int) -> None:
            await go.wait()  # all eight wake in the same pass
            await streams[i].send_all(b"ping %d" % i)
            got[i] = await streams[i].receive_some()

        async with trio.open_nursery() as n:
            for i in range(8):
                n.start_soon(ping, i)
            await trio.testing.wait_all_tasks_blocked()
            trio.lowlevel.add_instrument(steps)
            go.set()
        trio.lowlevel.remove_instrument(steps)
        assert got == {i: b"ping %d" % i for i in range(8)}
        assert "_writer_loop" in steps.names
        await client.aclose()
        nursery.cancel_scope.cancel()


async def test_small_writes_of_many_streams_in_one_pass_do_not_wait_for_the_writer(
    tmp_path: Path,
) -> None:
    """Each of a busy connection's streams writing a little in the same pass goes on at once
    (no task switch to wait for the writer's turn); beyond UNWAITED_WRITE_MAX queued, writers
    wait (back-pressure)."""
    async with trio.open_nursery() as nursery:
        client, _, _ = await tls_pair(tmp_path, nursery, echo)
        streams = [await client.open_stream("127.0.0.1:9") for _ in range(8)]

        async def one_pass(size: int) -> list[bool]:
            go = trio.Event()
            waited: dict[int, bool] = {}

            async def write(i: int) -> None:
                await go.wait()  # all eight wake in the same pass
                waited[i] = await streams[i]._send(b"%d" % i * size)

            async with trio.open_nursery() as n:
                for i in range(8):
                    n.start_soon(write, i)
                await trio.testing.wait_all_tasks_blocked()
                go.set()
            for i in range(8):
                got = b""
                while len(got) < size:
                    got += await streams[i].receive_some()
                assert got == b"%d" % i * size
            return [waited[i] for i in range(8)]

        assert await one_pass(100) == [False] * 8
        assert any(await one_pass(UNWAITED_WRITE_MAX // 4))  # 8 x 16 KiB: some wait
        await client.aclose()
        nursery.cancel_scope.cancel()


async def test_a_connection_writing_pass_after_pass_goes_through_the_writer(
        tmp_path: Path) -> None:
    # one task writing in every pass (a bulk sender) is no lone write: the writer, one pass
    # later, gathers what the next pass adds
    async with trio.open_nursery() as nursery:
        client, _, _ = await tls_pair(tmp_path, nursery, echo)
        stream = await client.open_stream("127.0.0.1:9")
        steps = _Steps()
        got = bytearray()

        async def read() -> None:
            while len(got) < 100 * 100:
                got.extend(await stream.receive_some())

        async with trio.open_nursery() as n:
            n.start_soon(read)
            await trio.testing.wait_all_tasks_blocked()
            trio.lowlevel.add_instrument(steps)
            for i in range(100):
                await stream.send_all(bytes([i]) * 100)
                await trio.sleep(0)
        trio.lowlevel.remove_instrument(steps)
        assert bytes(got) == b"".join(bytes([i]) * 100 for i in range(100))
        assert "_writer_loop" in steps.names
        await client.aclose()
        nursery.cancel_scope.cancel()


async def test_a_lone_write_the_socket_cannot_take_follows_in_order(tmp_path: Path) -> None:
    payload = os.urandom(3_000_000)
    received = trio.Event()
    got = {}

    async def slow_sink(req: HboneRequest) -> None:
        stream = await req.accept()
        await trio.sleep(0.2)  # the client's socket buffers fill meanwhile
        chunks = []
        while data := await stream.receive_some():
            chunks.append(data)
        got["data"] = b"".join(chunks)
        received.set()

    async with trio.open_nursery() as nursery:
        client, _, client_tls = await tls_pair(tmp_path, nursery, slow_sink)
        client_tls.transport_stream.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16_384)
        stream = await client.open_stream("127.0.0.1:9")
        for off in range(0, len(payload), 40_000):  # under the unwaited-write limit
            await trio.testing.wait_all_tasks_blocked()
            await stream.send_all(payload[off : off + 40_000])
        await stream.send_eof()
        with trio.fail_after(10):
            await received.wait()
        assert got["data"] == payload
        await client.aclose()
        nursery.cancel_scope.cancel()


def test_settings_ack_and_large_data_in_one_read_are_accepted() -> None:
    # Direct TLS hands h2 everything decrypted in one go: the ACK of our SETTINGS (1 MiB
    # frames) and a 64 KB DATA frame sent right after it must not be refused as overlong.
    from ztunnel.hbone import protocol as p

    client, server = p.HboneH2(client_side=True), p.HboneH2(client_side=False)
    client.initiate()
    server.initiate()
    sid = client.open_request("10.0.0.2:80", [])
    events = server.receive(client.data_to_send())
    assert [type(e) for e in events if isinstance(e, p.ConnectRequested)] == [p.ConnectRequested]
    server.respond(sid, 200)
    body = os.urandom(64_000)
    assert server.send_data(sid, body) == len(body)
    events = client.receive(server.data_to_send())  # SETTINGS, ACK, HEADERS, DATA at once
    assert b"".join(e.data for e in events if isinstance(e, p.DataReceived)) == body
