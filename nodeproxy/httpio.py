"""Small HTTP/1.1 helpers: h11 over any trio stream (plain or TLS).

Server side: :func:`read_request` (bounded headers and body; :class:`HTTPError` carries the
status to answer), :func:`send_response`, :func:`send_json`, and chunked streaming with
:func:`start_stream` / :func:`send_chunk`. Client side: :func:`send_request`,
:func:`read_response_head`, :func:`iter_body`, :func:`read_response` and :class:`LineSplitter`
for newline-delimited bodies. Timeouts are the caller's (cancel scopes).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any

import h11
import trio

MAX_HEADER_BYTES = 16 * 1024
MAX_BODY_BYTES = 1024 * 1024
READ_SIZE = 64 * 1024

REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    413: "Payload Too Large",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}

Headers = Iterable[tuple[str, str]]


class HTTPError(Exception):
    """A request (or response) that cannot be accepted; ``status`` says how to answer."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Request:
    method: str
    target: str
    headers: dict[str, str] = field(default_factory=dict)  # lower-case names, repeats joined
    body: bytes = b""

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]


@dataclass
class Response:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


def server_connection(max_header_bytes: int = MAX_HEADER_BYTES) -> h11.Connection:
    return h11.Connection(h11.SERVER, max_incomplete_event_size=max_header_bytes)


def client_connection(max_header_bytes: int = MAX_HEADER_BYTES) -> h11.Connection:
    return h11.Connection(h11.CLIENT, max_incomplete_event_size=max_header_bytes)


def _headers(raw: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in raw:
        k, v = name.decode("latin-1").lower(), value.decode("latin-1")
        out[k] = f"{out[k]}, {v}" if k in out else v
    return out


async def _next_event(stream: trio.abc.Stream, conn: h11.Connection) -> Any:
    """The next h11 event, reading as needed; protocol errors become HTTPError."""
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as e:
            raise HTTPError(e.error_status_hint, str(e)) from None
        if event is not h11.NEED_DATA:
            return event
        if conn.they_are_waiting_for_100_continue:
            await stream.send_all(conn.send(h11.InformationalResponse(status_code=100)))
        conn.receive_data(await stream.receive_some(READ_SIZE))


async def read_request(
    stream: trio.abc.Stream,
    conn: h11.Connection,
    *,
    max_body: int = MAX_BODY_BYTES,
    max_header: int = MAX_HEADER_BYTES,
) -> Request | None:
    """Read one whole request; ``None`` when the peer closed before sending one.

    Raises HTTPError 400 (malformed), 413 (body over ``max_body``), 431 (request line and
    headers over ``max_header``).
    """
    event = await _next_event(stream, conn)
    if isinstance(event, h11.ConnectionClosed):
        return None
    if not isinstance(event, h11.Request):
        raise HTTPError(400, f"unexpected {type(event).__name__}")
    # h11's own limit only applies while the head is incomplete, so a head that arrives in
    # one piece can exceed it: measure it here
    size = len(event.target) + sum(len(n) + len(v) + 4 for n, v in event.headers)
    if size > max_header:
        raise HTTPError(431, f"request head is over the {max_header} byte limit")
    headers = _headers(event.headers)
    declared = headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_body:  # refuse before reading it
        raise HTTPError(413, f"body of {declared} bytes is over the {max_body} byte limit")
    req = Request(event.method.decode("ascii", "replace"), event.target.decode("latin-1"), headers)
    body = bytearray()
    while True:
        event = await _next_event(stream, conn)
        if isinstance(event, h11.Data):
            body += event.data
            if len(body) > max_body:
                raise HTTPError(413, f"body is over the {max_body} byte limit")
        elif isinstance(event, h11.EndOfMessage):
            req.body = bytes(body)
            return req
        else:  # ConnectionClosed mid-body
            raise HTTPError(400, "connection closed mid-request")


def _response_headers(headers: Headers, *, close: bool) -> list[tuple[str, str]]:
    out = list(headers)
    if close:
        out.append(("connection", "close"))
    return out


async def send_response(
    stream: trio.abc.Stream,
    conn: h11.Connection,
    status: int,
    body: bytes = b"",
    headers: Headers = (),
    *,
    close: bool = False,
) -> None:
    """Send a whole response with a content-length."""
    hdrs = _response_headers(headers, close=close) + [("content-length", str(len(body)))]
    out = conn.send(h11.Response(status_code=status, headers=hdrs, reason=_reason(status)))
    if body:
        out += conn.send(h11.Data(data=body))
    out += conn.send(h11.EndOfMessage())
    await stream.send_all(out)


async def send_json(
    stream: trio.abc.Stream,
    conn: h11.Connection,
    status: int,
    obj: Any,
    *,
    close: bool = False,
) -> None:
    body = json.dumps(obj).encode() + b"\n"
    await send_response(
        stream, conn, status, body, [("content-type", "application/json")], close=close
    )


def can_respond(conn: h11.Connection) -> bool:
    """Whether a response can still be started (not after one began)."""
    return conn.our_state in (h11.IDLE, h11.SEND_RESPONSE)


async def start_stream(
    stream: trio.abc.Stream, conn: h11.Connection, status: int, headers: Headers = ()
) -> None:
    """Send a response head without a length; h11 then chunks the body (HTTP/1.1 peers)."""
    out = conn.send(h11.Response(status_code=status, headers=list(headers), reason=_reason(status)))
    await stream.send_all(out)


async def send_chunk(stream: trio.abc.Stream, conn: h11.Connection, data: bytes) -> None:
    if data:
        await stream.send_all(conn.send(h11.Data(data=data)))


def _reason(status: int) -> bytes:
    return REASONS.get(status, "").encode()


# -- client side ----------------------------------------------------------------------------


async def send_request(
    stream: trio.abc.Stream,
    conn: h11.Connection,
    method: str,
    target: str,
    headers: Headers,
    body: bytes | None = None,
) -> None:
    """Send a request; with a body, content-length is set."""
    hdrs = list(headers)
    if body is not None:
        hdrs.append(("content-length", str(len(body))))
    out = conn.send(h11.Request(method=method, target=target, headers=hdrs))
    if body:
        out += conn.send(h11.Data(data=body))
    out += conn.send(h11.EndOfMessage())
    await stream.send_all(out)


async def read_response_head(stream: trio.abc.Stream, conn: h11.Connection) -> Response:
    """Read the status line and headers (skipping 1xx); raises HTTPError on a bad answer."""
    while True:
        event = await _next_event(stream, conn)
        if isinstance(event, h11.InformationalResponse):
            continue
        if isinstance(event, h11.Response):
            return Response(event.status_code, _headers(event.headers))
        if isinstance(event, h11.ConnectionClosed):
            raise HTTPError(502, "connection closed before a response")
        raise HTTPError(502, f"unexpected {type(event).__name__}")


async def iter_body(stream: trio.abc.Stream, conn: h11.Connection) -> AsyncIterator[bytes]:
    """Yield the body's data as it arrives; ends at the end of the message."""
    while True:
        event = await _next_event(stream, conn)
        if isinstance(event, h11.Data):
            yield bytes(event.data)
        elif isinstance(event, h11.EndOfMessage):
            return
        else:
            raise HTTPError(502, "connection closed mid-response")


async def read_response(
    stream: trio.abc.Stream, conn: h11.Connection, *, max_body: int = MAX_BODY_BYTES
) -> Response:
    """Read a whole response, the body bounded by ``max_body``."""
    resp = await read_response_head(stream, conn)
    body = bytearray()
    async for data in iter_body(stream, conn):
        body += data
        if len(body) > max_body:
            raise HTTPError(502, f"response body is over the {max_body} byte limit")
    resp.body = bytes(body)
    return resp


class LineSplitter:
    """Bytes in, complete lines out (without the newline); a line over ``max_line`` is an
    error rather than unbounded memory."""

    def __init__(self, max_line: int = 64 * 1024 * 1024):
        self.max_line = max_line
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        if b"\n" not in data:  # only split when a line ended: keeps big lines linear
            if len(self._buf) > self.max_line:
                raise HTTPError(502, f"line longer than {self.max_line} bytes")
            return []
        lines = self._buf.split(b"\n")
        self._buf = bytearray(lines.pop())
        if len(self._buf) > self.max_line:
            raise HTTPError(502, f"line longer than {self.max_line} bytes")
        return [bytes(line.rstrip(b"\r")) for line in lines if line.strip()]
