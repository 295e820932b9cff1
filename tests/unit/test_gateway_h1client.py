"""The gateway's own HTTP/1.1 client side (request writer, response reader) and its
pre-formatted access-log line: sans-IO, checked against what h11 and the shared access-log
formatter do."""

from __future__ import annotations

import logging

import h11
import pytest

from l7gateway.forward import Downstream, Forwarder, GatewayMetrics, HttpRequest, _Log
from l7gateway.upstream import (
    ProtocolError,
    RequestHead,
    ResponseReader,
    Upstreams,
    encode_request_head,
)
from nodeproxy.telemetry.accesslog import format_entry, parse_line
from tests.unit.test_gateway_support import mesh, service, workload
from ztunnel.endpoints import Endpoint


def head(method: str = "GET", headers: list[tuple[str, str]] | None = None,
         target: str = "/a?b=1") -> RequestHead:
    return RequestHead(method, "http", "web.shop", target, headers or [], False)


def read_all(reader: ResponseReader, wire: bytes, step: int) -> tuple[list, bytes]:
    """Feed ``wire`` ``step`` bytes at a time; the heads and the body read."""
    heads, body = [], b""
    pos = 0
    while True:
        if reader.response is None:
            h = reader.head()
            if h is not None:
                heads.append(h)
                continue
        else:
            data = reader.body()
            if data == b"":
                return heads, body
            if data is not None:
                body += data
                continue
        if pos >= len(wire):
            if reader.eof:
                raise AssertionError("reader wants more after EOF")
            reader.feed(b"")
            continue
        reader.feed(wire[pos:pos + step])
        pos += step


def test_request_head_is_what_h11_would_parse():
    data = encode_request_head(head(headers=[("user-agent", "x y"), ("accept", " */* ")]),
                               [("transfer-encoding", "chunked")])
    server = h11.Connection(h11.SERVER)
    server.receive_data(data)
    ev = server.next_event()
    assert isinstance(ev, h11.Request)
    assert ev.method == b"GET" and ev.target == b"/a?b=1"
    assert [(n, v) for n, v in ev.headers] == [
        (b"host", b"web.shop"), (b"user-agent", b"x y"), (b"accept", b"*/*"),
        (b"transfer-encoding", b"chunked")]


@pytest.mark.parametrize("bad", [
    head(headers=[("x-a", "v\r\nx-injected: 1")]),
    head(headers=[("x a", "v")]),
    head(headers=[("x-a", "v\x00")]),
    head(target="/a b"),
    head(method="GE T"),
    head(headers=[("x-a", "\u20ac")]),
])
def test_request_head_refuses_what_would_split_or_break_it(bad):
    with pytest.raises(ProtocolError):
        encode_request_head(bad, [])


@pytest.mark.parametrize("step", [1, 7, 4096])
def test_reads_content_length_chunked_and_1xx(step):
    wire = (b"HTTP/1.1 100 Continue\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A:  b \r\n\r\nhello")
    r = ResponseReader("POST")
    heads, body = read_all(r, wire, step)
    assert [h.status for h in heads] == [100, 200]
    assert heads[1].headers == [("content-length", "5"), ("x-a", "b")]
    assert body == b"hello" and r.done and r.keep_alive and not r.buf

    wire = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\ngrpc-status: 0\r\n\r\n")
    r = ResponseReader("GET")
    heads, body = read_all(r, wire, step)
    assert body == b"abcde" and r.trailers == [("grpc-status", "0")] and r.keep_alive


def test_framing_without_length_head_and_close():
    r = ResponseReader("HEAD")
    r.feed(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n")
    assert r.head().status == 200 and r.body() == b"" and r.keep_alive

    r = ResponseReader("GET")  # no length: the body runs to the close, never reused
    heads, body = read_all(r, b"HTTP/1.1 200 OK\r\n\r\nall of it", 3)
    assert body == b"all of it" and not r.keep_alive

    r = ResponseReader("GET")
    r.feed(b"HTTP/1.0 204 No Content\r\n\r\n")
    assert r.head().status == 204 and r.done and not r.keep_alive

    r = ResponseReader("GET")
    r.feed(b"HTTP/1.1 200 OK\r\nConnection: keep-alive, close\r\nContent-Length: 0\r\n\r\n")
    r.head()
    assert r.done and not r.keep_alive


@pytest.mark.parametrize("wire", [
    b"HTTP/2 200 OK\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nbad header\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nx-a: 1\r\n folded\r\n\r\n",
    b"HTTP/1.1 200 OK\r\ncontent-length: 1, 2\r\n\r\n",
    b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n",
    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
    b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort",
])
def test_malformed_responses_are_errors(wire):
    r = ResponseReader("GET", max_head=1024)
    r.feed(wire)
    r.feed(b"")  # and the connection closed
    with pytest.raises(ProtocolError):
        while r.head() is not None and r.response is None:
            pass
        while r.body():
            pass


def test_oversized_head_is_an_error():
    r = ResponseReader("GET", max_head=64)
    r.feed(b"HTTP/1.1 200 OK\r\n" + b"x-a: " + b"a" * 100)
    with pytest.raises(ProtocolError):
        r.head()


def test_access_line_matches_the_shared_formatter(caplog):
    web = workload("web-1", "127.0.0.2", 8080)
    client = workload("client", "10.0.0.9", 0)
    svc = service("web", "10.96.0.10", [web])
    state = mesh([web, client], [svc])
    fwd = Forwarder(lambda: state, Upstreams(lambda ep: None), GatewayMetrics())  # type: ignore
    down = Downstream(svc, 80, "spiffe://cluster.local/ns/front/sa/client", "10.0.0.9",
                      40000, source=client)
    ep = Endpoint(web, "127.0.0.2", 8080)
    req = HttpRequest("GET", "http", "web.shop", '/a b"c', [], None)
    info = _Log(code=503, flags="UF", backend=svc, endpoint=ep, attempts=2, route="shop/r",
                error="connect failed: x=y", extra={"request_id": "abc"})
    with caplog.at_level(logging.INFO, logger="nodeproxy.access"):
        fwd._record(down, req, info, 12.4)
        fwd._record(down, req, info, 3.0)  # the cached parts again
    expected = format_entry({
        "src.addr": "10.0.0.9:40000", "src.workload": "client", "src.namespace": "shop",
        "src.identity": down.caller, "dst.addr": "127.0.0.2:8080",
        "dst.service": svc.hostname, "dst.workload": "web-1", "dst.namespace": "shop",
        "dst.identity": web.identity, "direction": "waypoint", "duration": 12,
        "response_flags": "UF", "error": info.error, "protocol": "http/1.1", "method": "GET",
        "path": req.target, "status": 503, "route": "shop/r", "attempts": 2,
        "request_id": "abc",
    })
    lines = [r.getMessage() for r in caplog.records if r.name == "nodeproxy.access"]
    assert lines[0] == f"connection complete {expected}"
    assert parse_line(lines[1])["duration"] == "3ms"
    assert parse_line(lines[1])["path"] == req.target
