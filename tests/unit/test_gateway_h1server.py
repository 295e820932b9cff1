"""The gateway's own HTTP/1.1 server side (l7gateway.h1server): requests parsed byte-exactly
(each case fed in one piece and byte by byte), responses framed and read back by h11; then
through the real gateway: pipelining, Expect: 100-continue, HTTP/1.0 keep-alive, bad framing."""

from __future__ import annotations

import json

import h11
import pytest
import trio

from l7gateway.h1server import (
    BadRequest,
    ParsedRequest,
    RequestReader,
    ResponseError,
    ResponseWriter,
    encode_head,
    error_response,
)
from tests.unit.test_gateway_support import gateway, mesh, service, start_echo, workload

VIP = "10.96.0.10"


def read_all(data: bytes, *, bytewise: bool, eof: bool = False, max_head: int = 64 * 1024,
             ) -> list[tuple[ParsedRequest, bytes, list | None]]:
    """Every request in ``data`` with its body and trailers (BadRequest propagates)."""
    r = RequestReader(max_head)
    out: list = []
    pieces = [data[i:i + 1] for i in range(len(data))] if bytewise else [data]
    if eof:
        pieces.append(b"")
    state: list = []  # [request, body] while a body is being read

    def pump() -> None:
        while True:
            if not state:
                req = r.next_request()
                if req is None:
                    return
                state[:] = [req, b""]
            chunk = r.body()
            if chunk is None:
                return
            if chunk:
                state[1] += chunk
                continue
            out.append((state[0], state[1], r.trailers))
            state.clear()

    for piece in pieces:
        r.feed(piece)
        pump()
    return out


def both(data: bytes, **kw) -> list[tuple[ParsedRequest, bytes, list | None]]:
    """As read_all, in one piece and byte by byte: both must give the same."""
    whole = read_all(data, bytewise=False, **kw)
    assert read_all(data, bytewise=True, **kw) == whole
    return whole


def bad(data: bytes, status: int = 400, **kw) -> None:
    for bytewise in (False, True):
        with pytest.raises(BadRequest) as e:
            read_all(data, bytewise=bytewise, **kw)
        assert e.value.status == status, (bytewise, e.value)


# -- good requests ------------------------------------------------------------------------


def test_simple_get():
    [(req, body, trailers)] = both(
        b"GET /a/b?x=1 HTTP/1.1\r\nHost: web.shop\r\nUser-Agent:  curl/8 \r\n"
        b"X-Empty:\r\nAccept: */*\r\n\r\n")
    assert (req.method, req.target, req.http11, req.host) == ("GET", "/a/b?x=1", True,
                                                              "web.shop")
    # names lower-cased, order kept, surrounding whitespace of values removed
    assert req.headers == [("host", "web.shop"), ("user-agent", "curl/8"), ("x-empty", ""),
                           ("accept", "*/*")]
    assert req.keep_alive and not req.has_body and body == b"" and trailers is None
    assert req.upgrade is None and not req.expect_continue


def test_content_length_body_and_pipelining():
    data = (b"POST /one HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello"
            b"GET /two HTTP/1.1\r\nHost: h\r\n\r\n"
            b"PUT /three HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n0\r\n\r\n")
    got = both(data)
    assert [(r.method, r.target, b) for r, b, _ in got] == [
        ("POST", "/one", b"hello"), ("GET", "/two", b""), ("PUT", "/three", b"abc")]


def test_chunked_with_extensions_and_trailers():
    data = (b"POST /up HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: Chunked\r\n\r\n"
            b"A;name=value\r\n0123456789\r\n"
            b"1 ; ext\r\n!\r\n"
            b"0\r\nX-Checksum: abc \r\nX-Other: 1\r\n\r\n")
    [(req, body, trailers)] = both(data)
    assert req.chunked and req.has_body
    assert body == b"0123456789!"
    assert trailers == [("x-checksum", "abc"), ("x-other", "1")]


def test_empty_lines_before_a_request_and_bare_lf_heads_are_accepted():
    data = (b"\r\n\nGET / HTTP/1.1\nHost: h\nX-A: 1\n\n"
            b"POST /b HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nok\r\n"
            b"GET /c HTTP/1.1\r\nHost: h\r\n\r\n")
    got = both(data)
    assert [(r.target, b) for r, b, _ in got] == [("/", b""), ("/b", b"ok"), ("/c", b"")]
    assert got[0][0].headers == [("host", "h"), ("x-a", "1")]


def test_keep_alive_rules():
    def one(data: bytes) -> ParsedRequest:
        [(req, _, _)] = both(data)
        return req

    assert one(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n").keep_alive
    assert not one(b"GET / HTTP/1.1\r\nHost: h\r\nConnection: Close\r\n\r\n").keep_alive
    old = one(b"GET / HTTP/1.0\r\n\r\n")  # HTTP/1.0: Host optional, closes by default
    assert not old.http11 and not old.keep_alive and old.host is None
    assert one(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").keep_alive
    assert not one(b"GET / HTTP/1.0\r\nConnection: keep-alive, close\r\n\r\n").keep_alive


def test_expect_continue_and_upgrade():
    [(req, body, _)] = both(b"POST / HTTP/1.1\r\nHost: h\r\nExpect: 100-Continue\r\n"
                            b"Content-Length: 3\r\n\r\nabc")
    assert req.expect_continue and body == b"abc"
    [(req, _, _)] = both(b"GET / HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\n\r\n")
    assert not req.expect_continue  # no body to wait for
    r = RequestReader()
    r.feed(b"GET /chat HTTP/1.1\r\nHost: h\r\nConnection: keep-alive, Upgrade\r\n"
           b"Upgrade: websocket\r\n\r\nearly bytes")
    req = r.next_request()
    assert req is not None and req.upgrade == "websocket"
    assert req.connection == frozenset({"keep-alive", "upgrade"})
    assert r.take_rest() == b"early bytes"
    # an Upgrade header without Connection: upgrade is no upgrade request
    [(req, _, _)] = both(b"GET / HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\n\r\n")
    assert req.upgrade is None


def test_partial_input_waits_and_eof_between_requests_is_clean():
    r = RequestReader()
    r.feed(b"GET / HTTP/1.1\r\nHost: h\r\n")
    assert r.next_request() is None and r.pending_head
    r.feed(b"\r\n")
    assert r.next_request() is not None and not r.pending_head
    r.feed(b"")
    assert r.next_request() is None and r.eof


# -- bad requests -------------------------------------------------------------------------


@pytest.mark.parametrize("data", [
    pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\nthis is not a header\r\n\r\n", id="no-colon"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\r\n  folded\r\n\r\n", id="obs-fold"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\r\n\tfolded\r\n\r\n", id="obs-fold-tab"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\nX-A : a\r\n\r\n", id="space-before-colon"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\nX(A): a\r\n\r\n", id="bad-name-token"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\n: a\r\n\r\n", id="empty-name"),
    pytest.param(b"G(T / HTTP/1.1\r\nHost: x\r\n\r\n", id="bad-method-token"),
    pytest.param(b"GET /a b HTTP/1.1\r\nHost: x\r\n\r\n", id="space-in-target"),
    pytest.param(b"GET /a\x01b HTTP/1.1\r\nHost: x\r\n\r\n", id="control-in-target"),
    pytest.param(b"GET  / HTTP/1.1\r\nHost: x\r\n\r\n", id="double-space"),
    pytest.param(b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", id="http2-version"),
    pytest.param(b"GET / HTTP/1.1 x\r\nHost: x\r\n\r\n", id="junk-after-version"),
    pytest.param(b"GET /\r\n\r\n", id="http09"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\rb\r\n\r\n", id="cr-in-value"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n", id="nul-in-value"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\x7fb\r\n\r\n", id="del-in-value"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\x1bb\r\n\r\n", id="esc-in-value"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\nb\r\n\r\n", id="lf-splits-value"),
    pytest.param(b"GET / HTTP/1.1\r\n\r\n", id="no-host"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", id="two-hosts"),
    pytest.param(b"GET / HTTP/1.0\r\nHost: a\r\nHost: a\r\n\r\n", id="two-hosts-1.0"),
    pytest.param(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 3\r\n"
                 b"\r\nabc", id="duplicate-content-length"),
    pytest.param(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n"
                 b"\r\nabcd", id="conflicting-content-length"),
    pytest.param(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3, 3\r\n\r\nabc",
                 id="content-length-list"),
    pytest.param(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", id="negative"),
    pytest.param(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +3\r\n\r\nabc", id="plus"),
    pytest.param(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0x3\r\n\r\nabc", id="hex"),
    pytest.param(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1 2\r\n\r\nabc", id="spaced"),
    pytest.param(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1234567890123456789\r\n\r\n",
                 id="too-long"),
    pytest.param(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", id="te-gzip"),
    pytest.param(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
                 b"0\r\n\r\n", id="te-gzip-chunked"),
    pytest.param(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", id="te-twice"),
    pytest.param(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n",
                 id="te-xchunked"),
    pytest.param(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                 b"Content-Length: 5\r\n\r\n0\r\n\r\n", id="te-and-content-length"),
    pytest.param(b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                 id="te-on-http10"),
    # chunked framing
    pytest.param(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"zz\r\n", id="bad-chunk-size"),
    pytest.param(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"11111111111111111\r\n", id="chunk-size-overflow"),
    pytest.param(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"-1\r\n", id="negative-chunk"),
    pytest.param(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"3\nabc\r\n0\r\n\r\n", id="bare-lf-after-size"),
    pytest.param(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"3\r\nabcd\r\n0\r\n\r\n", id="chunk-longer-than-size"),
    pytest.param(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"3\r\nabc\n0\r\n\r\n", id="bare-lf-after-data"),
    pytest.param(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"3;a\x00b\r\nabc\r\n0\r\n\r\n", id="nul-in-extension"),
    pytest.param(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"0\r\nnot a trailer\r\n\r\n", id="bad-trailer"),
    pytest.param(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"0\r\nX-A: 1\n\r\n", id="bare-lf-in-trailers"),
])
def test_bad_requests_are_400(data):
    bad(data, 400)


def test_over_long_heads_and_trailers_are_431():
    bad(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 2000 + b"\r\n\r\n", 431,
        max_head=1024)
    bad(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 2000, 431, max_head=1024)
    bad(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n"
        + b"x-t: 1\r\n" * 200 + b"\r\n", 431, max_head=1024)
    # a head just under the limit is fine
    head = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: "
    ok = head + b"a" * (1024 - len(head) - 2) + b"\r\n\r\n"
    assert len(both(ok, max_head=1024)) == 1


def test_eof_in_the_middle_is_an_error():
    bad(b"GET / HTTP/1.1\r\nHost: x\r\n", eof=True)
    bad(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc", eof=True)
    bad(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab", eof=True)
    # but not between requests
    assert len(both(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n\r\n", eof=True)) == 1


def test_next_request_before_the_body_is_read_is_a_bug():
    r = RequestReader()
    r.feed(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\n")
    assert r.next_request() is not None
    with pytest.raises(RuntimeError):
        r.next_request()


# -- responses ----------------------------------------------------------------------------


def request(data: bytes) -> ParsedRequest:
    r = RequestReader()
    r.feed(data)
    req = r.next_request()
    assert req is not None
    return req


GET11 = b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"


def h11_read(method: bytes, wire: bytes):
    """What an h11 client makes of ``wire`` (response, body, trailers)."""
    c = h11.Connection(h11.CLIENT)
    c.send(h11.Request(method=method, target="/", headers=[("host", "h")]))
    c.send(h11.EndOfMessage())
    c.receive_data(wire)
    c.receive_data(b"")
    resp, body, trailers = None, b"", None
    while True:
        ev = c.next_event()
        if isinstance(ev, h11.Response):
            resp = ev
        elif isinstance(ev, h11.Data):
            body += ev.data
        elif isinstance(ev, h11.EndOfMessage):
            trailers = list(ev.headers)
            break
        else:
            raise AssertionError(ev)
    return resp, body, trailers


def test_content_length_response():
    w = ResponseWriter(request(GET11))
    wire = w.head(200, [("content-type", "text/plain"), ("content-length", "11")])
    wire += w.data(b"hello ") + w.data(b"world") + w.end(None)
    assert wire.startswith(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n"
                           b"content-length: 11\r\n\r\nhello world")
    resp, body, _ = h11_read(b"GET", wire)
    assert resp.status_code == 200 and body == b"hello world" and w.keep_alive
    w = ResponseWriter(request(GET11))
    w.head(200, [("content-length", "3")])
    with pytest.raises(ResponseError):
        w.data(b"abcd")  # longer than announced
    w = ResponseWriter(request(GET11))
    w.head(200, [("content-length", "3")])
    w.data(b"ab")
    with pytest.raises(ResponseError):
        w.end(None)  # shorter than announced


def test_chunked_response_with_trailers():
    w = ResponseWriter(request(GET11))
    wire = w.head(200, [("content-type", "application/grpc"),
                        ("transfer-encoding", "gzip"), ("connection", "x")])
    wire += w.data(b"abc") + w.data(b"") + w.data(b"0123456789")
    wire += w.end([("grpc-status", "0"), (":ignored", "x")])
    assert b"\r\ntransfer-encoding: chunked\r\n" in wire and b"gzip" not in wire
    assert wire.endswith(b"3\r\nabc\r\na\r\n0123456789\r\n0\r\ngrpc-status: 0\r\n\r\n")
    resp, body, trailers = h11_read(b"GET", wire)
    assert body == b"abc0123456789" and trailers == [(b"grpc-status", b"0")]
    w = ResponseWriter(request(GET11))
    assert (w.head(200, []) + w.end(None)).endswith(b"transfer-encoding: chunked\r\n\r\n"
                                                    b"0\r\n\r\n")


def test_http10_and_closing_responses():
    w = ResponseWriter(request(b"GET / HTTP/1.0\r\n\r\n"))
    wire = w.head(200, [("x-a", "1")]) + w.data(b"body") + w.end(None)
    assert not w.keep_alive and b"chunked" not in wire
    assert wire == b"HTTP/1.1 200 OK\r\nx-a: 1\r\nconnection: close\r\n\r\nbody"
    assert h11_read(b"GET", wire)[1] == b"body"  # read to the close
    w = ResponseWriter(request(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"))
    wire = w.head(200, [("content-length", "2")]) + w.data(b"ok") + w.end(None)
    assert w.keep_alive and b"\r\nconnection: keep-alive\r\n" in wire
    w = ResponseWriter(request(b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"))
    wire = w.head(204, [], end=True)
    assert wire == b"HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n"


def test_no_body_for_head_204_304_and_empty_ends():
    w = ResponseWriter(request(b"HEAD / HTTP/1.1\r\nHost: h\r\n\r\n"))
    wire = w.head(200, [("content-length", "1024")]) + w.data(b"x" * 10) + w.end(None)
    assert wire.endswith(b"content-length: 1024\r\n\r\n")
    resp, body, _ = h11_read(b"HEAD", wire)
    assert resp.status_code == 200 and body == b""
    for status in (204, 304):
        w = ResponseWriter(request(GET11))
        wire = w.head(status, []) + w.data(b"junk") + w.end(None)
        assert b"junk" not in wire and b"chunked" not in wire and w.keep_alive
    w = ResponseWriter(request(GET11))
    assert w.head(200, [("x-a", "1")], end=True).endswith(b"content-length: 0\r\n\r\n")
    assert w.done


@pytest.mark.parametrize("headers", [
    [("x-a", "1\r\nx-injected: yes")],
    [("x-a", "1\nx-injected: yes")],
    [("x-a", "a\x00b")],
    [("x-a", "a\rb")],
    [("x a", "1")],
    [("x-a:", "1")],
    [("", "1")],
    [("x-a", "caf\u20ac")],  # not latin-1
    [("content-length", "abc")],
    [("content-length", "3"), ("content-length", "4")],
])
def test_bad_response_headers_are_refused(headers):
    w = ResponseWriter(request(GET11))
    with pytest.raises(ResponseError):
        w.head(200, headers)
    assert not w.started


def test_encode_head_and_error_response():
    assert encode_head(599, []) == b"HTTP/1.1 599 \r\n\r\n"
    assert encode_head(200, [("a", "tab\tinside")]).endswith(b"a: tab\tinside\r\n\r\n")
    wire = error_response(431, "request header fields too large")
    resp, body, _ = h11_read(b"GET", wire)
    assert resp.status_code == 431 and body == b"request header fields too large\n"
    assert (b"connection", b"close") in resp.headers


# -- through the gateway ----------------------------------------------------------------------


async def _read_until(stream, marker: bytes, have: bytes = b"") -> bytes:
    data = have
    with trio.fail_after(10):
        while marker not in data:
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            data += chunk
    return data


async def _read_all(stream) -> bytes:
    data = b""
    with trio.fail_after(10):
        while chunk := await stream.receive_some(65536):
            data += chunk
    return data


def _responses(wire: bytes, methods: list[bytes]) -> list[tuple[int, bytes]]:
    c = h11.Connection(h11.CLIENT)
    out = []
    c.receive_data(wire)
    for m in methods:
        if c.our_state is h11.DONE:
            c.start_next_cycle()
        c.send(h11.Request(method=m, target="/", headers=[("host", "h")]))
        c.send(h11.EndOfMessage())
        status, body = 0, b""
        while True:
            ev = c.next_event()
            if isinstance(ev, h11.Response):
                status = ev.status_code
            elif isinstance(ev, h11.Data):
                body += ev.data
            elif isinstance(ev, h11.EndOfMessage):
                break
            else:
                raise AssertionError(ev)
        out.append((status, body))
    return out


async def test_pipelined_requests_are_answered_in_order(nursery):
    port = await start_echo(nursery, "web-1", "127.0.0.2")
    w = workload("web-1", "127.0.0.2", port)
    async with gateway(mesh([w], [service("web", VIP, [w])])) as h:
        t = await h.tunnel(f"{VIP}:80")
        await t.send_all(b"GET /one HTTP/1.1\r\nHost: web\r\n\r\n"
                         b"POST /two HTTP/1.1\r\nHost: web\r\nContent-Length: 3\r\n\r\nabc"
                         b"GET /three HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n")
        wire = await _read_all(t)  # the last request closes the connection
        got = _responses(wire, [b"GET", b"POST", b"GET"])
        assert [s for s, _ in got] == [200, 200, 200]
        seen = [json.loads(b) for _, b in got]
        assert [s["path"] for s in seen] == ["/one", "/two", "/three"]
        assert seen[1]["body_bytes"] == 3


async def test_expect_100_continue_and_http10_keep_alive(nursery):
    port = await start_echo(nursery, "web-1", "127.0.0.2")
    w = workload("web-1", "127.0.0.2", port)
    async with gateway(mesh([w], [service("web", VIP, [w])])) as h:
        t = await h.tunnel(f"{VIP}:80")
        await t.send_all(b"POST /up HTTP/1.1\r\nHost: web\r\nExpect: 100-continue\r\n"
                         b"Content-Length: 5\r\n\r\n")
        # the client waits for the go before sending its body
        got = await _read_until(t, b"\r\n\r\n")
        assert got.startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        await t.send_all(b"hello")
        got = await _read_until(t, b'"body_bytes": 5', got[len(b"HTTP/1.1 100 Continue\r\n\r\n"):])
        assert got.startswith(b"HTTP/1.1 200 OK\r\n")
        # an HTTP/1.0 client asking for keep-alive gets it, on the same tunnel
        t = await h.tunnel(f"{VIP}:80")
        for path in (b"/a", b"/b"):
            await t.send_all(b"GET " + path + b" HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            head = await _read_until(t, b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 OK\r\n")
            assert b"\r\nconnection: keep-alive\r\n" in head.lower()
            n = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            body = head.split(b"\r\n\r\n", 1)[1]
            body = await _read_until(t, b"}\n", body) if len(body) < n else body
            assert json.loads(body)["path"] == path.decode()


async def test_smuggling_shapes_are_refused_and_the_connection_closed(nursery):
    port = await start_echo(nursery, "web-1", "127.0.0.2")
    w = workload("web-1", "127.0.0.2", port)
    async with gateway(mesh([w], [service("web", VIP, [w])])) as h:
        conn = await h.connect()
        for attack in (
            b"POST / HTTP/1.1\r\nHost: web\r\nContent-Length: 4\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: web\r\nContent-Length: 0\r\nContent-Length: 44\r\n\r\n"
            b"GET /smuggled HTTP/1.1\r\nHost: web\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked, identity\r\n\r\n",
        ):
            t = await h.tunnel(f"{VIP}:80", conn)
            await t.send_all(attack)
            wire = await _read_all(t)
            assert wire.startswith(b"HTTP/1.1 400 ") and b"smuggled" not in wire
            assert wire.count(b"HTTP/1.1") == 1
        assert not h.dials  # nothing reached the backend
