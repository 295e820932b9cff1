"""The byte relay on real socket pairs: half-close both ways, resets, large transfers."""

import socket
import struct

import pytest
import trio

from ztunnel.relay import RelayError, relay


def pair() -> tuple[trio.SocketStream, socket.socket]:
    """A TCP connection on loopback (TCP, for real resets): the relay's end as a trio stream,
    and the plain socket of the party behind it."""
    with socket.create_server(("127.0.0.1", 0)) as lst:
        b = socket.create_connection(lst.getsockname())
        a, _ = lst.accept()
    return trio.SocketStream(trio.socket.from_stdlib_socket(a)), b


async def read_all(sock: socket.socket) -> bytes:
    out = b""
    while True:
        chunk = await trio.to_thread.run_sync(sock.recv, 1 << 20)
        if not chunk:
            return out
        out += chunk


async def test_half_close_travels_both_ways_and_bytes_are_counted():
    client_side, client = pair()
    server_side, server = pair()
    async with trio.open_nursery() as nursery:
        result = {}

        async def run():
            result["c"] = await relay(client_side, server_side)

        nursery.start_soon(run)
        client.sendall(b"request")
        client.shutdown(socket.SHUT_WR)
        assert await read_all(server) == b"request"  # the server saw our EOF
        # the server still answers after the client's half-close
        payload = b"x" * (3 << 20)

        def answer():
            server.sendall(payload)
            server.shutdown(socket.SHUT_WR)

        nursery.start_soon(trio.to_thread.run_sync, answer)
        assert await read_all(client) == payload
    assert (result["c"].client_to_server, result["c"].server_to_client) == (7, len(payload))
    client.close()
    server.close()


async def test_a_reset_on_one_side_resets_the_other():
    client_side, client = pair()
    server_side, server = pair()
    client.sendall(b"hello")
    server.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with pytest.RaisesGroup(RelayError):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(relay, client_side, server_side)
            assert await trio.to_thread.run_sync(server.recv, 100) == b"hello"
            server.close()  # RST
    # the client's end was aborted too, not closed cleanly after a FIN
    with pytest.raises(ConnectionResetError):
        while client.recv(100):
            pass
    client.close()


async def test_cancelling_the_relay_resets_both_sides():
    client_side, client = pair()
    server_side, server = pair()
    with trio.move_on_after(0.2):
        await relay(client_side, server_side)
    for s in (client, server):
        with pytest.raises(ConnectionResetError):
            while s.recv(100):
                pass
        s.close()
