"""The echo app on real loopback sockets: HTTP keep-alive, chunked bodies, raw echo, junk."""

from __future__ import annotations

import json

import trio

from nodeproxy.echo import serve, sniff


async def _start(nursery: trio.Nursery, ports: list[int] | None = None) -> list[int]:
    return await nursery.start(serve, ports or [0], "echo-1", "", "127.0.0.1")


async def _read_response(stream: trio.SocketStream) -> tuple[bytes, dict[str, str], bytes]:
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = await stream.receive_some(65536)
        assert chunk, f"connection closed early: {buf!r}"
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers = {
        k.strip().lower().decode(): v.strip().decode()
        for k, v in (line.split(b":", 1) for line in lines[1:])
    }
    length = int(headers["content-length"])
    while len(rest) < length:
        rest += await stream.receive_some(65536)
    return lines[0], headers, rest


def test_sniff_tells_http_from_bytes() -> None:
    assert sniff(b"GET / HTTP/1.1\r\n") is True
    assert sniff(b"PO") is None
    assert sniff(b"hello") is False
    assert sniff(b"\x16\x03\x01") is False


async def test_http_keep_alive_status_and_chunked_body() -> None:
    async with trio.open_nursery() as nursery:
        (port,) = await _start(nursery)
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(b"GET /a?status=503 HTTP/1.1\r\nHost: x\r\nX-Test: 1\r\n\r\n")
            status, _, body = await _read_response(stream)
            assert status == b"HTTP/1.1 503 Service Unavailable"
            doc = json.loads(body)
            local = stream.socket.getsockname()
            assert doc["pod"] == "echo-1" and doc["path"] == "/a?status=503"
            assert doc["peer"] == f"{local[0]}:{local[1]}"
            assert doc["headers"]["x-test"] == "1" and doc["port"] == port
            # same connection, chunked request body
            await stream.send_all(
                b"POST /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
            )
            status, _, body = await _read_response(stream)
            assert status == b"HTTP/1.1 200 OK"
            assert json.loads(body)["body_bytes"] == 11
            assert json.loads(body)["method"] == "POST"
        nursery.cancel_scope.cancel()


async def test_raw_tcp_is_echoed_and_bad_http_gets_400_without_killing_the_server() -> None:
    async with trio.open_nursery() as nursery:
        port1, port2 = await _start(nursery, [0, 0])
        raw = await trio.open_tcp_stream("127.0.0.1", port2)
        async with raw:
            await raw.send_all(b"hello there")
            got = b""
            while len(got) < 11:
                got += await raw.receive_some(100)
            assert got == b"hello there"
        bad = await trio.open_tcp_stream("127.0.0.1", port1)
        async with bad:
            await bad.send_all(b"GET / HTTP/1.1\r\nno colon here\r\n\r\n")
            status, _, _ = await _read_response(bad)
            assert status.startswith(b"HTTP/1.1 400")
        ok = await trio.open_tcp_stream("127.0.0.1", port1)
        async with ok:
            await ok.send_all(b"GET /?delay=0.01 HTTP/1.1\r\nHost: x\r\n\r\n")
            status, _, _ = await _read_response(ok)
            assert status == b"HTTP/1.1 200 OK"
        nursery.cancel_scope.cancel()


def test_a_broken_replica_answers_every_request_with_its_fail_status():
    import h11

    from nodeproxy.echo import reply_for

    req = h11.Request(method="GET", target="/x", headers=[("host", "a")])
    assert reply_for(req, 0, "1.2.3.4:5", "p", "ns", 80, default_status=503)[0] == 503
    asked = h11.Request(method="GET", target="/x?status=200", headers=[("host", "a")])
    assert reply_for(asked, 0, "1.2.3.4:5", "p", "ns", 80, default_status=503)[0] == 200
    assert reply_for(req, 0, "1.2.3.4:5", "p", "ns", 80)[0] == 200
