"""The gateway's HTTP/1.1 front end (:mod:`l7gateway.h1server` over the tunnel stream).

Keep-alive (HTTP/1.0 too, with ``Connection: keep-alive``), pipelined requests answered in
order, chunked bodies streamed both ways, ``Upgrade`` passed through (after the backend's 101
the connection becomes a raw byte relay), ``Expect: 100-continue`` answered per hop.
Bad input: a malformed request gets 400, a request head over the limit 431, a client that
sends its head too slowly 408; each then closes the connection (and only that one).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import trio

from l7gateway.forward import HOP_BY_HOP, ClientGone, Downstream, Forwarder, Headers, HttpRequest
from l7gateway.h1server import (
    BadRequest,
    ParsedRequest,
    RequestReader,
    ResponseError,
    ResponseWriter,
    error_response,
    informational,
)
from ztunnel.relay import RelayError, abort, relay

log = logging.getLogger(__name__)

READ_SIZE = 64 * 1024
CLOSE_LINGER = 2.0
_BROKEN = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


@dataclass
class H1Config:
    max_head_bytes: int = 64 * 1024
    header_timeout: float = 10.0  # from the first byte of a request to the end of its head
    idle_timeout: float = 60.0  # waiting for the next request on a kept-alive connection
    body_timeout: float = 60.0  # between two reads of a request body
    drain_limit: int = 64 * 1024  # unread request body we read and drop to keep the connection


class _Conn:
    """The parser, the stream, and one send lock (trio: one sender at a time)."""

    def __init__(self, stream: trio.abc.HalfCloseableStream, config: H1Config) -> None:
        self.stream = stream
        self.config = config
        self.reader = RequestReader(config.max_head_bytes)
        self.lock = trio.StrictFIFOLock()

    async def send(self, data: bytes) -> None:
        # two senders only with a request body being read (100 Continue) alongside the
        # response: take the lock without a schedule point when it is free (send_all is one)
        try:
            self.lock.acquire_nowait()
        except trio.WouldBlock:
            await self.lock.acquire()
        try:
            await self.stream.send_all(data)
        except _BROKEN as e:
            raise ClientGone(f"write failed: {e!r}") from e
        finally:
            self.lock.release()

    async def read(self, timeout: float) -> bool:
        """Read once into the parser; False on timeout."""
        with trio.move_on_after(timeout):
            await self.receive()
            return True
        return False

    async def receive(self) -> None:
        """Read once into the parser (no deadline of its own)."""
        try:
            data = await self.stream.receive_some(READ_SIZE)
        except _BROKEN as e:
            raise ClientGone(f"read failed: {e!r}") from e
        self.reader.feed(data)


class _Exchange:
    """One request on the connection: its body (what the forwarder reads) and its response
    (the :class:`~l7gateway.forward.ResponseSink` the forwarder writes to).

    A response head with a body to follow is held back until the first body bytes (or the
    end, or :meth:`flush`) so that head and body go out in one write: every write is a trip
    through the tunnel's writer. The forwarder calls :meth:`flush` before it waits for the
    upstream, so a slow body never delays the head."""

    def __init__(self, conn: _Conn, request: ParsedRequest) -> None:
        self.conn = conn
        self.request = request
        self.writer = ResponseWriter(request)
        self.started = False
        self.aborted = False
        self.upgraded = False
        self.trailers: Headers | None = None
        self.done = not request.has_body  # the body was read to its end
        self._continue_sent = False
        self._held = b""

    # -- the request body (RequestBody) ------------------------------------------------
    async def receive(self) -> bytes:
        c = self.conn
        r = c.reader
        if self.done:
            return b""
        while True:
            try:
                data = r.body()
            except BadRequest as e:
                raise ClientGone(f"bad request body: {e}") from e
            if data is not None:
                if not data:
                    self.done = True
                    self.trailers = r.trailers
                return data
            if (self.request.expect_continue and not r.body_started
                    and not self._continue_sent and not self.started):
                # the client waits for our go before sending the body
                self._continue_sent = True
                await c.send(_CONTINUE)
            if not await c.read(c.config.body_timeout):
                raise ClientGone("request body timed out")

    # -- the response (ResponseSink) ---------------------------------------------------
    async def flush(self) -> None:
        held, self._held = self._held, b""
        if held and not self.aborted:
            await self.conn.send(held)

    async def start(self, status: int, headers: Headers, end: bool) -> None:
        self.started = True
        req = self.request
        w = self.writer
        if req.expect_continue and not self._continue_sent and not self.done:
            # answered before the client sent its body: it may never come, so the
            # connection cannot be reused
            w.keep_alive = False
        try:
            head = w.head(status, headers, end)
        except ResponseError as e:
            log.info("cannot send response %s: %s", status, e)
            await self.abort()
            return
        if end:
            await self.conn.send(head)
        else:
            self._held = head

    async def data(self, data: bytes) -> None:
        if self.aborted:
            raise ClientGone("response aborted")
        try:
            out = self.writer.data(data)
        except ResponseError as e:
            log.info("response body does not fit its framing: %s", e)
            await self.abort()
            raise ClientGone("response framing broken") from e
        held, self._held = self._held, b""
        if held:
            out = held + out
        if out:
            await self.conn.send(out)

    async def end(self, trailers: Headers | None) -> None:
        if self.aborted:
            return
        try:
            out = self.writer.end(trailers)
        except ResponseError as e:
            log.info("cannot end response: %s", e)
            await self.abort()
            return
        held, self._held = self._held, b""
        if held:
            out = held + out
        if out:
            await self.conn.send(out)

    async def upgrade(self, status: int, headers: Headers, upstream: trio.abc.Stream,
                      leftover: bytes) -> None:
        """Answer 101 and relay raw bytes both ways until both sides are done."""
        c = self.conn
        self.started = self.upgraded = True
        token = self.request.upgrade
        try:
            if token is None:
                raise ResponseError("the request did not ask for an upgrade")
            head = informational(status, [
                *[(n, v) for n, v in headers if n not in ("connection", "upgrade")],
                ("connection", "upgrade"), ("upgrade", token)])
        except ResponseError as e:
            log.info("cannot switch protocols: %s", e)
            await abort(upstream)
            await self.abort()
            return
        try:
            await c.send(head)
            client_rest = c.reader.take_rest()
            if leftover:
                await c.stream.send_all(leftover)
            if client_rest:
                await upstream.send_all(client_rest)
            await relay(c.stream, upstream)  # type: ignore[arg-type]
        except (ClientGone, RelayError, *_BROKEN) as e:
            log.debug("upgraded connection ended: %s", e)
        finally:
            await trio.aclose_forcefully(upstream)

    async def abort(self) -> None:
        self._held = b""
        if not self.aborted:
            self.aborted = True
            await abort(self.conn.stream)


async def _error(conn: _Conn, status: int, message: str) -> None:
    """Answer a bad request and leave the connection to be closed."""
    try:
        await conn.send(error_response(status, message))
    except ClientGone:
        pass


async def _read_head(conn: _Conn, timer: trio.CancelScope) -> ParsedRequest | None:
    """The next request's head; None when the client closed. Raises BadRequest (400/431).

    While it waits, ``timer`` (a scope around the whole connection: entering a cancel scope
    per read cost more than the rest of the head's parsing) has the idle deadline, or the
    head's once a first byte of it is there; it is off again when this returns."""
    cfg = conn.config
    r = conn.reader
    req = r.next_request()
    if req is not None:
        return req  # pipelined: already here
    in_head = r.pending_head
    timer.deadline = trio.current_time() + (cfg.header_timeout if in_head else cfg.idle_timeout)
    try:
        while not r.eof:
            await conn.receive()
            if not in_head and r.pending_head:
                in_head = True
                timer.deadline = trio.current_time() + cfg.header_timeout
            req = r.next_request()
            if req is not None:
                return req
        return None  # closed between requests (a partial head raised BadRequest)
    finally:
        timer.deadline = math.inf


def _to_request(req: ParsedRequest, ex: _Exchange) -> HttpRequest:
    named = req.connection
    if named:
        kept = [(n, v) for n, v in req.headers if n not in HOP_BY_HOP and n not in named]
    else:
        kept = [(n, v) for n, v in req.headers if n not in HOP_BY_HOP]
    return HttpRequest(
        method=req.method,
        scheme="http",
        authority=req.host or "",
        target=req.target,
        headers=kept,
        body=ex if req.has_body else None,
        upgrade=req.upgrade,
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
    conn.reader.feed(prefix)
    try:
        with trio.CancelScope() as timer:
            await _serve(conn, down, forwarder, timer)
        if timer.cancelled_caught and conn.reader.pending_head:
            log.info("HTTP/1.1 client %s too slow sending its request head", down.src_ip)
            await _error(conn, 408, "request timeout")
        # else an idle keep-alive connection: just close it
    except ClientGone as e:
        log.debug("client %s gone: %s", down.src_ip, e)
    finally:
        await _close(stream)


async def _serve(conn: _Conn, down: Downstream, forwarder: Forwarder,
                 timer: trio.CancelScope) -> None:
    while True:
        try:
            req = await _read_head(conn, timer)
        except BadRequest as e:
            status = e.status if e.status in (400, 431) else 400
            log.info("bad HTTP/1.1 request from %s: %s (%d)", down.src_ip, e, status)
            await _error(conn, status, "request header fields too large"
                         if status == 431 else "bad request")
            return
        if req is None:
            return
        ex = _Exchange(conn, req)
        await forwarder.handle(down, _to_request(req, ex), ex)
        await ex.flush()
        if ex.upgraded or ex.aborted or not ex.writer.done:
            return
        if not ex.writer.keep_alive or not await _finish_request(conn, ex):
            return


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


async def _finish_request(conn: _Conn, ex: _Exchange) -> bool:
    """Read the rest of an unread request body (bounded) so the connection can be reused."""
    if ex.done:
        return True
    dropped = 0
    try:
        while chunk := await ex.receive():
            dropped += len(chunk)
            if dropped > conn.config.drain_limit:
                return False
    except ClientGone:
        return False
    return True
