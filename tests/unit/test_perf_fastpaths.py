"""The performance shortcuts of the data path behave exactly like the slow paths they replace.

- HBONE output as chunks, DATA payloads not copied (ztunnel.hbone.protocol)
- the DATA fast path of the frame parser (split reads, padding, END_STREAM, other frames)
- CONNECT headers: checked by us, unique values never indexed in HPACK
- the per-pod socket stock (sockets made in the pod netns, a thread hop per batch)
- 256 KiB transport reads under TLS (LargeReadStream) and the TLS record drain
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import subprocess
import uuid
from functools import partial

import hyperframe.frame
import pytest
import trio

from nodeproxy.netns import netns_id
from ztunnel.hbone import protocol as p
from ztunnel.hbone.connection import LargeReadStream
from ztunnel.podproxy import SocketStock
from ztunnel.sockets import (
    ACCEPT_BURST,
    PROXY_MARK,
    SO_MARK,
    accept_some,
    dial,
    prepare_connector,
)

SIOCGSKNS = 0x894C  # ioctl: an fd of the netns a socket belongs to


def connected_pair() -> tuple[p.HboneH2, p.HboneH2]:
    client, server = p.HboneH2(client_side=True), p.HboneH2(client_side=False)
    client.initiate()
    server.initiate()
    server.receive(client.data_to_send())
    client.receive(server.data_to_send())
    server.receive(client.data_to_send())
    client.receive(server.data_to_send())
    return client, server


def open_stream(client: p.HboneH2, server: p.HboneH2) -> int:
    sid = client.open_request("10.0.0.2:80", [("traceparent", p.new_traceparent())])
    events = server.receive(client.data_to_send())
    assert [type(e) for e in events] == [p.ConnectRequested]
    server.respond(sid, 200)
    client.receive(server.data_to_send())
    return sid


def received(events: list) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, p.DataReceived))


def test_data_split_at_every_byte_arrives_whole_and_in_order() -> None:
    client, server = connected_pair()
    sid = open_stream(client, server)
    payload = bytes(range(256)) * 300  # 76,800 B in 8 writes: 8 DATA frames
    for i in range(0, len(payload), 10_000):
        assert client.send_data(sid, payload[i : i + 10_000]) == len(payload[i : i + 10_000])
    client.end_stream(sid)
    wire = client.data_to_send()
    events: list = []
    for i in range(len(wire)):  # one byte at a time: every header and body boundary
        events += server.receive(wire[i : i + 1])
    assert received(events) == payload
    assert [e for e in events if isinstance(e, p.EndOfStream)] == [p.EndOfStream(sid)]


def test_padded_data_and_empty_end_stream_frames_are_parsed() -> None:
    client, server = connected_pair()
    sid = open_stream(client, server)
    padded = hyperframe.frame.DataFrame(sid, data=b"hello", pad_length=7)
    padded.flags.add("PADDED")
    empty_end = hyperframe.frame.DataFrame(sid, data=b"")
    empty_end.flags.add("END_STREAM")
    events = server.receive(padded.serialize() + empty_end.serialize())
    assert received(events) == b"hello"
    assert p.EndOfStream(sid) in events


def test_data_on_stream_zero_is_still_a_protocol_error() -> None:
    _, server = connected_pair()
    bad = b"\x00\x00\x03\x00\x00\x00\x00\x00\x00abc"  # DATA, stream 0
    with pytest.raises(p.HboneProtocolError):
        server.receive(bad)


def test_output_keeps_frame_order_and_partial_reads() -> None:
    client, server = connected_pair()
    sid = open_stream(client, server)
    client.send_data(sid, b"a" * 1000)
    client.ping()
    client.send_data(sid, memoryview(b"b" * 3000)[1000:])  # a slice: copied, not shared
    client.end_stream(sid)
    assert client.has_output()
    head = client.h2.data_to_send(7)  # h2's partial read still works
    wire = head + client.data_to_send()
    assert not client.has_output()
    kinds = [type(f).__name__ for f in _frames(wire)]
    assert kinds == ["DataFrame", "PingFrame", "DataFrame", "DataFrame"]
    events = server.receive(wire)
    assert received(events) == b"a" * 1000 + b"b" * 2000


def _frames(wire: bytes) -> list[hyperframe.frame.Frame]:
    out = []
    while wire:
        frame, length = hyperframe.frame.Frame.parse_frame_header(memoryview(wire[:9]))
        frame.parse_body(memoryview(wire[9 : 9 + length]))
        out.append(frame)
        wire = wire[9 + length :]
    return out


def test_connect_requests_leave_the_hpack_table_empty() -> None:
    """CONNECTs go out without the dynamic table or Huffman coding (the cheap encoding); the
    fields a peer decodes are the same, and its table stays empty."""
    client, server = connected_pair()
    for port in (5001, 5002, 5003):
        headers = p.connect_headers("10.0.0.2:80", forwarded_for=f"10.0.0.1:{port}",
                                    baggage="k8s.namespace.name=a,k8s.pod.name=b")
        client.open_request("10.0.0.2:80", headers)
        wire = client.data_to_send()
        assert b"k8s.namespace.name=a,k8s.pod.name=b" in wire  # a literal, not Huffman
        (req,) = server.receive(wire)
        assert req.request.headers["forwarded"] == f'for="10.0.0.1:{port}"'
        assert req.request.headers["baggage"] == "k8s.namespace.name=a,k8s.pod.name=b"
        assert req.request.headers["traceparent"] == dict(headers)["traceparent"]
    assert list(server.h2.decoder.header_table.dynamic_entries) == []


@pytest.mark.parametrize(
    "name,value",
    [("x-ok\n", "v"), ("x-bad", "a\r\nb"), ("connection", "close"), ("x-sp", " lead")],
)
def test_bad_outgoing_header_is_refused_before_sending(name: str, value: str) -> None:
    client, _ = connected_pair()
    with pytest.raises(ValueError):
        client.open_request("10.0.0.2:80", [(name, value)])
    assert not client.has_output()
    assert client.h2.open_outbound_streams == 0  # no stream left half-made


# -- the socket stock -------------------------------------------------------------------------


@contextlib.contextmanager
def scratch_netns():
    name = f"npt-perf-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    fd = -1
    try:
        fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
        yield fd
    finally:
        if fd >= 0:
            os.close(fd)
        subprocess.run(["ip", "netns", "del", name], check=False)


def socket_netns(sock: socket.socket) -> tuple[int, int]:
    fd = fcntl.ioctl(sock.fileno(), SIOCGSKNS)
    try:
        return netns_id(fd)
    finally:
        os.close(fd)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")
async def test_socket_stock_makes_sockets_in_the_pod_netns() -> None:
    with scratch_netns() as fd:
        stock = SocketStock(fd, min_batch=2, max_batch=8)
        taken = []
        try:
            for _ in range(20):
                taken.append(await stock.take())
            assert {socket_netns(s) for s in taken} == {netns_id(fd)}
            assert all(socket_netns(s) != netns_id(fd) for s in [socket.socket()])
            sock = prepare_connector(taken[0])
            assert sock.getsockopt(socket.SOL_SOCKET, SO_MARK) == PROXY_MARK
            # a spoofed source leaves the port to connect() (IP_BIND_ADDRESS_NO_PORT)
            spoofed = prepare_connector(taken[1], spoof_source="10.1.2.3")
            assert spoofed.getsockname() == ("10.1.2.3", 0)
            spare = len(stock)
        finally:
            stock.close()
            for s in taken:
                s.close()
        assert spare < 8 and len(stock) == 0
        with pytest.raises(OSError):
            await stock.take()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")
async def test_socket_stock_serves_concurrent_takers() -> None:
    with scratch_netns() as fd:
        stock = SocketStock(fd, min_batch=1, max_batch=4)
        got: list[socket.socket] = []

        async def take() -> None:
            got.append(await stock.take())

        try:
            async with trio.open_nursery() as nursery:
                for _ in range(10):
                    nursery.start_soon(take)
            assert len({s.fileno() for s in got}) == 10
        finally:
            stock.close()
            for s in got:
                s.close()


# -- large transport reads under TLS ----------------------------------------------------------


async def test_large_read_stream_reads_more_than_64k_per_call() -> None:
    a, b = trio.socket.socketpair()
    sender, receiver = trio.SocketStream(a), LargeReadStream(trio.SocketStream(b))
    payload = os.urandom(200_000)
    async with sender, receiver:
        await sender.send_all(payload)
        await trio.sleep(0.05)  # let it all land in the receive buffer
        first = await receiver.receive_some()
        assert len(first) > 65536  # a plain SocketStream stops at 64 KiB
        rest = bytearray(first)
        while len(rest) < len(payload):
            rest += await receiver.receive_some()
        assert bytes(rest) == payload
        assert receiver.socket is b


async def test_hbone_over_tls_on_large_reads_carries_bulk_intact(tmp_path) -> None:
    from test_hbone_connection import make_pki

    from ztunnel.hbone.connection import HboneConnection
    from ztunnel.hbone.server import serve_hbone_connection

    client_ctx, server_ctx = make_pki(tmp_path)
    a, b = trio.socket.socketpair()
    got = bytearray()

    async def sink(req) -> None:
        stream = await req.accept()
        while data := await stream.receive_some():
            got.extend(data)
        await stream.send_eof()

    payload = os.urandom(3_000_000)
    async with trio.open_nursery() as nursery:
        server_tls = trio.SSLStream(LargeReadStream(trio.SocketStream(b)), server_ctx,
                                    server_side=True)
        nursery.start_soon(partial(serve_hbone_connection, server_tls, sink, peer_identity=None))
        client_tls = trio.SSLStream(trio.SocketStream(a), client_ctx, server_hostname=None)
        client = HboneConnection(client_tls, client_side=True)
        await nursery.start(client.run)
        stream = await client.open_stream("127.0.0.1:9")
        for i in range(0, len(payload), 100_000):
            await stream.send_all(payload[i : i + 100_000])
        await stream.send_eof()
        assert await stream.receive_some() == b""
        await client.aclose()
        nursery.cancel_scope.cancel()
    assert bytes(got) == payload


async def test_accept_takes_every_waiting_connection_in_one_pass() -> None:
    """The pod proxy's accept loop: the connections already waiting come at once (no task
    step each), at most ACCEPT_BURST per call; a closed listener ends it."""
    lst = socket.create_server(("127.0.0.1", 0), backlog=64)
    lst.setblocking(False)
    trio_lst = trio.SocketListener(trio.socket.from_stdlib_socket(lst))
    clients = [socket.create_connection(lst.getsockname()) for _ in range(ACCEPT_BURST + 8)]
    got: list[trio.SocketStream] = []
    try:
        assert await accept_some(lst, got.append) == ACCEPT_BURST
        assert await accept_some(lst, got.append) == 8
        peers = {s.socket.getpeername() for s in got}
        assert peers == {c.getsockname() for c in clients}
        # nothing waiting: it waits for the next one
        with trio.move_on_after(0.05) as waited:
            await accept_some(lst, got.append)
        assert waited.cancelled_caught and len(got) == ACCEPT_BURST + 8
        late = socket.create_connection(lst.getsockname())
        clients.append(late)
        assert await accept_some(lst, got.append) == 1

        async def close_soon() -> None:
            await trio.sleep(0.05)
            await trio_lst.aclose()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(close_soon)
            with pytest.raises(trio.ClosedResourceError):
                await accept_some(lst, got.append)
        with pytest.raises(trio.ClosedResourceError):
            await accept_some(lst, got.append)
    finally:
        for s in got:
            await s.aclose()
        for c in clients:
            c.close()
        lst.close()


async def test_dial_uses_a_connection_the_kernel_completed_at_once() -> None:
    """To a listener of this host the handshake is done inside connect(): no wait (not even
    a schedule point, so a cancelled scope does not stop it); a refused or hanging connect
    fails with OSError and closes the socket."""
    with socket.create_server(("127.0.0.1", 0)) as lst:
        with trio.CancelScope() as scope:
            scope.cancel()  # any schedule point would raise Cancelled
            stream = await dial(nonblocking_socket(), lst.getsockname(), 5)
        assert stream.socket.getpeername() == lst.getsockname()
        await stream.aclose()
        port = lst.getsockname()[1]
    refused = nonblocking_socket()
    with pytest.raises(OSError, match="refused"):
        await dial(refused, ("127.0.0.1", port), 5)
    assert refused.fileno() == -1
    # a listener that takes nothing more: its SYNs are dropped, the connect hangs
    with socket.socket() as full:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        queued = [socket.create_connection(full.getsockname(), timeout=1)]  # the queue of 1
        hanging = nonblocking_socket()
        try:
            with pytest.raises(OSError, match="timed out"):
                await dial(hanging, full.getsockname(), 0.3)
            assert hanging.fileno() == -1
        finally:
            for q in queued:
                q.close()


def nonblocking_socket() -> socket.socket:
    sock = socket.socket()
    sock.setblocking(False)
    return sock
