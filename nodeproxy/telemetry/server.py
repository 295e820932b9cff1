"""A small HTTP/1.1 server (h11 on trio) for metrics, readiness and admin endpoints.

Not a general web server: GET-style handlers that return small bodies. It keeps connections
alive, bounds what a client can make it hold (16 KiB of headers, 1 MiB of body, 10 s to send a
request) and never lets a handler's exception take the process down.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import h11
import trio

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 16 * 1024
MAX_BODY_BYTES = 1024 * 1024
REQUEST_TIMEOUT = 10.0
READ_SIZE = 16 * 1024


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: dict[str, str] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str = "text/plain"


Handler = Callable[[Request], Awaitable[Response]]


def json_response(obj: Any, status: int = 200) -> Response:
    body = json.dumps(obj, indent=2, sort_keys=True, default=str).encode() + b"\n"
    return Response(status, body, "application/json")


def parse_address(address: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` → (host, port); ValueError when malformed."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"address must be HOST:PORT, got {address!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        raise ValueError(f"address must be HOST:PORT, got {address!r}")
    p = int(port)
    if p > 65535:
        raise ValueError(f"port out of range in {address!r}")
    return host, p


# -- readiness -----------------------------------------------------------------------------


class Readiness:
    """Named readiness conditions; ready when every condition is ok."""

    def __init__(self) -> None:
        self._conditions: dict[str, tuple[bool, str]] = {}

    def set(self, name: str, ok: bool, detail: str = "") -> None:
        self._conditions[name] = (ok, detail)

    @property
    def ready(self) -> bool:
        return all(ok for ok, _ in self._conditions.values())

    @property
    def reason(self) -> str:
        return "; ".join(
            f"{name}: {detail}" if detail else name
            for name, (ok, detail) in sorted(self._conditions.items())
            if not ok
        )

    def snapshot(self) -> dict[str, dict[str, Any]]:
        return {n: {"ok": ok, "detail": d} for n, (ok, d) in self._conditions.items()}


def readiness_route(readiness: Readiness) -> Handler:
    """A handler answering 200 ``ready`` or 503 ``not ready: <reason>``."""

    async def handler(_: Request) -> Response:
        if readiness.ready:
            return Response(200, b"ready")
        return Response(503, f"not ready: {readiness.reason}".encode())

    return handler


# -- the server ----------------------------------------------------------------------------


async def serve_http(
    address: str,
    routes: Mapping[str, Handler],
    *,
    request_timeout: float = REQUEST_TIMEOUT,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``routes`` (exact path → handler) on ``address`` until cancelled.

    ``task_status.started`` receives the bound port (useful with port 0).
    """
    host, port = parse_address(address)
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()[1]
    log.info("http server on %s:%d (%s)", host, bound, ", ".join(sorted(routes)))

    async def handle(stream: trio.SocketStream) -> None:
        try:
            await _serve_connection(stream, routes, request_timeout)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away; nothing to tell it
        except Exception:
            log.exception("http connection failed")
        finally:
            await trio.aclose_forcefully(stream)

    async with trio.open_nursery() as nursery:
        task_status.started(bound)
        await nursery.start(trio.serve_listeners, handle, listeners)


async def _serve_connection(
    stream: trio.SocketStream, routes: Mapping[str, Handler], timeout: float
) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
    while True:
        request: Request | None = None
        status: int | None = None
        # every request (and the idle wait before it) gets a deadline, so a slow or silent
        # client cannot hold the connection
        with trio.move_on_after(timeout) as scope:
            try:
                request = await _read_request(stream, conn)
            except h11.RemoteProtocolError as e:
                status = e.error_status_hint
                log.info("bad request: %s (%d)", e, status)
            except _Reject as e:
                status = e.status
        if scope.cancelled_caught:
            if conn.their_state is h11.IDLE and not conn.trailing_data[0]:
                return  # idle keep-alive connection: just close
            status = 408
        if request is None:
            if status is not None:
                await _send_error(stream, conn, status)
            return
        response = await _dispatch(routes, request)
        # a client that does not read its answer must not hold the connection either
        with trio.move_on_after(timeout) as send_scope:
            await _send(stream, conn, response, head=request.method == "HEAD")
        if send_scope.cancelled_caught:
            return
        if conn.our_state is h11.MUST_CLOSE or conn.their_state is not h11.DONE:
            return
        try:
            conn.start_next_cycle()
        except h11.LocalProtocolError:
            return


class _Reject(Exception):
    """A request refused before dispatch; ``status`` is the answer."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


def _header_size(req: h11.Request) -> int:
    # request line + "name: value\r\n" per header; h11 alone only limits an incomplete
    # block, so a block that arrives whole in one read must be measured
    line = len(req.method) + len(req.target) + 12
    return line + sum(len(n) + len(v) + 4 for n, v in req.headers)


async def _read_request(stream: trio.SocketStream, conn: h11.Connection) -> Request | None:
    """Read one full request; None when the client closed cleanly between requests."""
    req: h11.Request | None = None
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            if conn.they_are_waiting_for_100_continue:
                await stream.send_all(conn.send(h11.InformationalResponse(status_code=100)))
            data = await stream.receive_some(READ_SIZE)
            conn.receive_data(data)
            continue
        if isinstance(event, h11.Request):
            req = event
            if _header_size(req) > MAX_HEADER_BYTES:
                raise _Reject(431)
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_BODY_BYTES:
                raise _Reject(413)
        elif isinstance(event, h11.EndOfMessage):
            assert req is not None
            return _to_request(req, bytes(body))
        elif isinstance(event, h11.ConnectionClosed):
            if req is not None:
                raise h11.RemoteProtocolError("connection closed mid-request", 400)
            return None


def _to_request(req: h11.Request, body: bytes) -> Request:
    target = req.target.decode("latin-1")
    parts = urlsplit(target)
    headers: dict[str, str] = {}
    for name, value in req.headers:
        k = name.decode("latin-1")
        v = value.decode("latin-1")
        headers[k] = f"{headers[k]}, {v}" if k in headers else v
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    return Request(
        method=req.method.decode("ascii", "replace"),
        path=unquote(parts.path) or "/",
        query=query,
        headers=headers,
        body=body,
    )


async def _dispatch(routes: Mapping[str, Handler], request: Request) -> Response:
    handler = routes.get(request.path)
    if handler is None:
        return Response(404, b"not found\n")
    try:
        response = await handler(request)
        if not isinstance(response, Response):
            raise TypeError(f"handler returned {type(response).__name__}, not Response")
        return response
    except Exception:
        log.exception("handler for %s %s failed", request.method, request.path)
        return Response(500, b"internal error\n")


def _headers(response: Response, length: int) -> list[tuple[str, str]]:
    return [("content-type", response.content_type), ("content-length", str(length))]


async def _send(
    stream: trio.SocketStream, conn: h11.Connection, response: Response, *, head: bool = False
) -> None:
    out = conn.send(
        h11.Response(status_code=response.status, headers=_headers(response, len(response.body)))
    )
    if not head and response.body:
        out += conn.send(h11.Data(data=response.body))
    out += conn.send(h11.EndOfMessage())
    await stream.send_all(out)


async def _send_error(stream: trio.SocketStream, conn: h11.Connection, status: int) -> None:
    # h11 lets a server answer a broken request from IDLE or SEND_RESPONSE only
    if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
        return
    body = f"{status} {_REASONS.get(status, 'error')}\n".encode()
    resp = Response(status, body)
    try:
        out = conn.send(
            h11.Response(
                status_code=status,
                headers=[*_headers(resp, len(body)), ("connection", "close")],
            )
        )
        out += conn.send(h11.Data(data=body))
        out += conn.send(h11.EndOfMessage())
    except h11.LocalProtocolError:
        return
    with trio.move_on_after(1):
        await stream.send_all(out)


_REASONS = {
    400: "bad request",
    408: "request timeout",
    413: "payload too large",
    431: "request header fields too large",
    500: "internal error",
    501: "not implemented",
    505: "http version not supported",
}
