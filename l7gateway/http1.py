"""The gateway's HTTP/1.1 front end (h11 over the tunnel stream).

Keep-alive, chunked bodies streamed both ways, ``Upgrade`` passed through (after the backend's
101 the connection becomes a raw byte relay), ``Expect: 100-continue`` answered per hop.
Bad input: a malformed request gets 400, a request head over the limit 431, a client that
sends its head too slowly 408; each then closes the connection (and only that one).
"""

from __future__ import annotations

import http
import logging
import re
from dataclasses import dataclass

import h11
import trio

from l7gateway.forward import (
    ClientGone,
    Downstream,
    Forwarder,
    Headers,
    HttpRequest,
    clean_headers,
)
from ztunnel.relay import RelayError, abort, relay

log = logging.getLogger(__name__)

READ_SIZE = 64 * 1024
CLOSE_LINGER = 2.0
_BROKEN = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)
# h11's own rules for a header it sends (token name; value without surrounding whitespace,
# NUL or line breaks), checked on str in one pass each instead of h11's per-header bytes work
_NAME = re.compile(r"[-!#$%&'*+.^_`|~0-9a-zA-Z]+")
_VALUE = re.compile(r"(?:[^\x00\s]+(?:[ \t]+[^\x00\s]+)*)?")


def _checked(headers: Headers) -> list[tuple[bytes, bytes]]:
    """Headers for an h11 event built with ``_parsed=True`` (h11 then skips its checks)."""
    out = []
    for n, v in headers:
        if not _NAME.fullmatch(n):
            raise h11.LocalProtocolError(f"Illegal header name {n!r}")
        if not _VALUE.fullmatch(v):
            raise h11.LocalProtocolError(f"Illegal header value {v!r}")
        try:
            out.append((n.encode("latin-1"), v.encode("latin-1")))
        except UnicodeEncodeError as e:
            raise h11.LocalProtocolError(f"header not encodable: {e}") from e
    return out


@dataclass
class H1Config:
    max_head_bytes: int = 64 * 1024
    header_timeout: float = 10.0  # from the first byte of a request to the end of its head
    idle_timeout: float = 60.0  # waiting for the next request on a kept-alive connection
    body_timeout: float = 60.0  # between two reads of a request body
    drain_limit: int = 64 * 1024  # unread request body we read and drop to keep the connection


class _Conn:
    """The h11 state, the stream, and one send lock (trio: one sender at a time)."""

    def __init__(self, stream: trio.abc.HalfCloseableStream, config: H1Config) -> None:
        self.stream = stream
        self.config = config
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=config.max_head_bytes)
        self.lock = trio.StrictFIFOLock()

    async def send(self, event: object, held: bytes = b"") -> None:
        """Send ``event`` (after ``held``: bytes serialised earlier and not yet sent)."""
        data = self.h11.send(event)  # type: ignore[arg-type]
        if held:
            data = held + data if data else held
        if data:
            await self.send_bytes(data)

    async def send_bytes(self, data: bytes) -> None:
        async with self.lock:
            try:
                await self.stream.send_all(data)
            except _BROKEN as e:
                raise ClientGone(f"write failed: {e!r}") from e

    async def read(self, timeout: float) -> bytes | None:
        """Bytes from the client; None on timeout."""
        with trio.move_on_after(timeout):
            try:
                data = await self.stream.receive_some(READ_SIZE)
            except _BROKEN as e:
                raise ClientGone(f"read failed: {e!r}") from e
            return data
        return None


class _Body:
    """A request body read from h11 as the forwarder asks for it."""

    def __init__(self, conn: _Conn) -> None:
        self.conn = conn
        self.trailers: Headers | None = None
        self.done = False

    async def receive(self) -> bytes:
        c = self.conn
        if self.done:
            return b""
        if c.h11.they_are_waiting_for_100_continue:
            await c.send(h11.InformationalResponse(status_code=100, headers=[]))
        while True:
            try:
                ev = c.h11.next_event()
            except h11.RemoteProtocolError as e:
                raise ClientGone(f"bad request body: {e}") from e
            if ev is h11.NEED_DATA:
                data = await c.read(c.config.body_timeout)
                if data is None:
                    raise ClientGone("request body timed out")
                if not data:
                    raise ClientGone("client closed in the middle of the body")
                c.h11.receive_data(data)
                continue
            if isinstance(ev, h11.Data):
                if ev.data:
                    return bytes(ev.data)
                continue
            if isinstance(ev, h11.EndOfMessage):
                self.done = True
                self.trailers = [(n.decode("latin-1").lower(), v.decode("latin-1"))
                                 for n, v in ev.headers] or None
                return b""
            raise ClientGone(f"unexpected {type(ev).__name__} in the request body")


class _Sink:
    """The response side of one request.

    A response head with a body to follow is held back until the first body bytes (or the
    end, or :meth:`flush`) so that head and body go out in one write: every write is a trip
    through the tunnel's writer. The forwarder calls :meth:`flush` before it waits for the
    upstream, so a slow body never delays the head."""

    def __init__(self, conn: _Conn, request: h11.Request) -> None:
        self.conn = conn
        self.request = request
        self.started = False
        self.aborted = False
        self.upgraded = False
        self._chunked = False
        self._held = b""

    async def flush(self) -> None:
        held, self._held = self._held, b""
        if held and not self.aborted:
            await self.conn.send_bytes(held)

    async def start(self, status: int, headers: Headers, end: bool) -> None:
        self.started = True
        names = {n for n, _ in headers}
        out = list(headers)
        if end and "content-length" not in names and status not in (204, 304) and (
            status >= 200
        ):
            out.append(("content-length", "0"))
        self._chunked = "content-length" not in names and not end
        try:
            head = self.conn.h11.send(h11.Response(
                status_code=int(status), headers=_checked(out), reason=_reason(status),
                http_version=b"1.1", _parsed=True))
            if end:
                await self.conn.send(h11.EndOfMessage(), head or b"")
            else:
                self._held = head or b""
        except h11.LocalProtocolError as e:
            log.info("cannot send response %s: %s", status, e)
            await self.abort()

    async def data(self, data: bytes) -> None:
        if self.aborted:
            raise ClientGone("response aborted")
        held, self._held = self._held, b""
        try:
            await self.conn.send(h11.Data(data=data), held)
        except h11.LocalProtocolError as e:
            log.info("response body does not fit its framing: %s", e)
            await self.abort()
            raise ClientGone("response framing broken") from e

    async def end(self, trailers: Headers | None) -> None:
        if self.aborted:
            return
        trailers = [(n, v) for n, v in trailers or [] if not n.startswith(":")]
        held, self._held = self._held, b""
        try:
            await self.conn.send(h11.EndOfMessage(headers=trailers if self._chunked else []),
                                 held)
        except h11.LocalProtocolError as e:
            log.info("cannot end response: %s", e)
            await self.abort()

    async def upgrade(self, status: int, headers: Headers, upstream: trio.abc.Stream,
                      leftover: bytes) -> None:
        """Answer 101 and relay raw bytes both ways until both sides are done."""
        c = self.conn
        self.started = self.upgraded = True
        token = next((v for n, v in self.request.headers if n.lower() == b"upgrade"), b"")
        out = [*headers, ("connection", "upgrade"), ("upgrade", token.decode("latin-1"))]
        try:
            await c.send(h11.InformationalResponse(status_code=101, headers=out))
        except h11.LocalProtocolError as e:
            log.info("cannot switch protocols: %s", e)
            await abort(upstream)
            await self.abort()
            return
        client_rest, _ = c.h11.trailing_data
        try:
            if leftover:
                await c.stream.send_all(leftover)
            if client_rest:
                await upstream.send_all(bytes(client_rest))
            await relay(c.stream, upstream)  # type: ignore[arg-type]
        except (RelayError, *_BROKEN) as e:
            log.debug("upgraded connection ended: %s", e)
        finally:
            await trio.aclose_forcefully(upstream)

    async def abort(self) -> None:
        self._held = b""
        if not self.aborted:
            self.aborted = True
            await abort(self.conn.stream)


def _reason(status: int) -> bytes:
    try:
        return http.HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


async def _error(conn: _Conn, status: int, message: str) -> None:
    """Answer a bad request and leave the connection to be closed."""
    if conn.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
        return
    body = f"{message}\n".encode()
    try:
        await conn.send(h11.Response(status_code=status, reason=_reason(status), headers=[
            ("content-type", "text/plain"), ("content-length", str(len(body))),
            ("connection", "close")]))
        await conn.send(h11.Data(data=body))
        await conn.send(h11.EndOfMessage())
    except (h11.LocalProtocolError, ClientGone):
        pass


async def _read_head(conn: _Conn) -> h11.Request | None:
    """The next request's head; None when the client closed or idled out. Raises
    h11.RemoteProtocolError (400/431) and trio.TooSlowError (408)."""
    cfg = conn.config
    head_deadline: float | None = None
    idle_deadline = trio.current_time() + cfg.idle_timeout
    while True:
        ev = conn.h11.next_event()
        if isinstance(ev, h11.Request):
            return ev
        if isinstance(ev, h11.ConnectionClosed):
            return None
        if ev is not h11.NEED_DATA:
            raise h11.RemoteProtocolError(f"unexpected {type(ev).__name__}", 400)
        if head_deadline is None and conn.h11.trailing_data[0]:
            head_deadline = trio.current_time() + cfg.header_timeout
        limit = head_deadline if head_deadline is not None else idle_deadline
        data = await conn.read(max(0.0, limit - trio.current_time()))
        if data is None:
            if head_deadline is None:
                return None  # an idle keep-alive connection: just close it
            raise trio.TooSlowError("request head not received in time")
        if data and head_deadline is None:
            head_deadline = trio.current_time() + cfg.header_timeout
        conn.h11.receive_data(data)


def _to_request(ev: h11.Request, conn: _Conn) -> HttpRequest:
    headers = [(n.decode("latin-1").lower(), v.decode("latin-1")) for n, v in ev.headers]
    host = next((v for n, v in headers if n == "host"), "")
    connection = {
        t.strip().lower() for n, v in headers if n == "connection" for t in v.split(",")
    }
    upgrade = next((v for n, v in headers if n == "upgrade"), None)
    if "upgrade" not in connection:
        upgrade = None
    has_body = any(n == "transfer-encoding" for n, _ in headers) or any(
        n == "content-length" and v.strip() != "0" for n, v in headers)
    kept = clean_headers(headers, keep_te_trailers=False)
    return HttpRequest(
        method=ev.method.decode("ascii", "replace"),
        scheme="http",
        authority=host,
        target=ev.target.decode("latin-1"),
        headers=kept,
        body=_Body(conn) if has_body else None,
        upgrade=upgrade,
    )


async def serve_http1(
    stream: trio.abc.HalfCloseableStream,
    down: Downstream,
    forwarder: Forwarder,
    *,
    prefix: bytes = b"",
    config: H1Config | None = None,
) -> None:
    """Serve HTTP/1.1 requests on one tunnelled connection until it closes."""
    conn = _Conn(stream, config or H1Config())
    conn.h11.receive_data(prefix)
    try:
        while True:
            try:
                ev = await _read_head(conn)
            except h11.RemoteProtocolError as e:
                status = e.error_status_hint if e.error_status_hint in (400, 431) else 400
                log.info("bad HTTP/1.1 request from %s: %s (%d)", down.src_ip, e, status)
                await _error(conn, status, "request header fields too large"
                             if status == 431 else "bad request")
                return
            except trio.TooSlowError:
                log.info("HTTP/1.1 client %s too slow sending its request head", down.src_ip)
                await _error(conn, 408, "request timeout")
                return
            if ev is None:
                return
            req = _to_request(ev, conn)
            sink = _Sink(conn, ev)
            try:
                await forwarder.handle(down, req, sink)
                await sink.flush()
            except ClientGone as e:
                log.debug("client %s gone: %s", down.src_ip, e)
                return
            if sink.upgraded or sink.aborted:
                return
            if not await _finish_request(conn, req):
                return
            if conn.h11.our_state is not h11.DONE or conn.h11.their_state is not h11.DONE:
                return
            conn.h11.start_next_cycle()
    except ClientGone as e:
        log.debug("client %s gone: %s", down.src_ip, e)
    finally:
        await _close(stream)


async def _close(stream: trio.abc.HalfCloseableStream) -> None:
    """Half-close, then wait briefly for the client's end: closing at once would reset the
    tunnel and could throw away the last response bytes still in flight."""
    with trio.CancelScope(shield=True):
        try:
            await stream.send_eof()
            with trio.move_on_after(CLOSE_LINGER):
                while await stream.receive_some(READ_SIZE):
                    pass
        except (*_BROKEN, trio.BusyResourceError):
            pass
        await trio.aclose_forcefully(stream)


async def _finish_request(conn: _Conn, req: HttpRequest) -> bool:
    """Read the rest of an unread request body (bounded) so the connection can be reused."""
    body = req.body
    if body is None:
        # h11 yields the (empty) body's end only when asked
        body = _Body(conn)
    if getattr(body, "done", True):
        return conn.h11.their_state is h11.DONE
    dropped = 0
    try:
        while chunk := await body.receive():
            dropped += len(chunk)
            if dropped > conn.config.drain_limit:
                return False
    except ClientGone:
        return False
    return True
