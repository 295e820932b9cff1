"""HBONE server side: one HboneConnection per accepted TLS connection, a handler per CONNECT.

Malformed requests (not CONNECT, bad ``:authority``, oversize headers) are answered by the
protocol layer (400/431) and never reach the handler. The handler decides the rest: it answers
``reject(401)`` for a policy denial, ``reject(503)`` when the upstream is unreachable, or
``accept()`` once the upstream connection is up, and relays.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from .connection import HboneConnection, HboneStream
from .frames import ErrorCode
from .protocol import ConnectRequest, parse_forwarded_for

log = logging.getLogger(__name__)


class HboneRequest:
    """An incoming CONNECT, handed to the handler."""

    # one lives as long as its tunnel: no per-instance __dict__
    __slots__ = ("_conn", "_stream", "connect", "authority", "authority_raw", "headers",
                 "peer_identity", "peer_address", "stream_id")

    def __init__(self, conn: HboneConnection, stream: HboneStream, request: ConnectRequest):
        self._conn = conn
        self._stream = stream
        self.connect = request
        #: (host, port) of ``:authority``, validated (an IP address and a port 1-65535).
        self.authority: tuple[str, int] = (request.host, request.port)
        self.authority_raw = request.authority
        #: Non-pseudo request headers, names lower-case.
        self.headers: dict[str, str] = request.headers
        self.peer_identity = conn.peer_identity
        self.peer_address = conn.peer_address
        self.stream_id = stream.stream_id

    def __repr__(self) -> str:
        return f"<HboneRequest {self.authority_raw} from {self.peer_identity}>"

    @property
    def forwarded_for(self) -> tuple[str, int] | None:
        """The original client address from ``forwarded: for="ip:port"``, if present."""
        value = self.headers.get("forwarded")
        return parse_forwarded_for(value) if value else None

    @property
    def answered(self) -> bool:
        return self._stream.status is not None

    async def reject(self, status: int) -> None:
        """Answer with a non-200 status (401 policy, 503 upstream, 400 misaddressed)."""
        if not 100 <= status <= 599 or status == 200:
            raise ValueError(f"reject() needs a non-200 HTTP status, not {status}")
        await self._conn.respond(self._stream, status)

    async def accept(self) -> HboneStream:
        """Answer 200 and return the tunnel stream."""
        await self._conn.respond(self._stream, 200)
        return self._stream


Handler = Callable[[HboneRequest], Awaitable[None]]


async def _run_handler(handler: Handler, request: HboneRequest) -> None:
    stream = request._stream
    try:
        await handler(request)
        if not request.answered:
            log.warning("HBONE handler returned without answering %r; resetting", request)
            stream._abort(ErrorCode.REFUSED_STREAM)
    except Exception:
        log.exception("HBONE handler failed for %r; resetting the stream", request)
        stream._abort(ErrorCode.INTERNAL_ERROR)
    finally:
        await stream.aclose()  # resets the stream unless both directions ended cleanly


async def serve_hbone_connection(
    stream: trio.abc.Stream,
    handler: Handler,
    *,
    peer_identity: str | None,
    peer_address: tuple[str, int] | None = None,
    ping_interval: float | None = None,
    ping_timeout: float | None = None,
    task_status: trio.TaskStatus[HboneConnection] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve HBONE on an accepted (TLS) stream until the connection ends.

    Each valid CONNECT runs ``handler(request)`` in a task of this function's nursery; a handler
    exception resets that stream only. ``task_status.started(conn)`` hands the connection out
    so the owner can ``drain()`` it. Returns when the connection is gone; handlers still running
    then are cancelled (their streams are dead anyway). Closes ``stream``.
    """
    options = {}
    if ping_interval is not None:
        options["ping_interval"] = ping_interval
    if ping_timeout is not None:
        options["ping_timeout"] = ping_timeout
    async with trio.open_nursery() as nursery:

        def on_request(hstream: HboneStream, req: ConnectRequest) -> None:
            request = HboneRequest(conn, hstream, req)
            nursery.start_soon(_run_handler, handler, request, name=f"hbone {req.authority}")

        conn = HboneConnection(stream, client_side=False, on_request=on_request,
                               peer_identity=peer_identity, peer_address=peer_address,
                               **options)
        try:
            await nursery.start(conn.run)
            task_status.started(conn)
            await conn._done.wait()
        finally:
            # conn.run() closes the transport on its way out; for a GOAWAY first, drain().
            nursery.cancel_scope.cancel()
