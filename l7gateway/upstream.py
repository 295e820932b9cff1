"""Connections from the gateway to endpoints, and one request exchange over them.

``dial(endpoint)`` gives a byte stream to an endpoint: in production an HBONE stream through
:class:`~ztunnel.hbone.pool.HbonePool` (``:authority`` = ``address:port``, the endpoint's
identity checked), a plain TCP connection for an endpoint outside the mesh; tests inject their
own. On top of it:

- HTTP/1.1: keep-alive connections per endpoint, one request at a time each, reused when both
  sides ended their messages cleanly;
- HTTP/2 (prior knowledge): one multiplexed connection per endpoint (more when the peer's
  ``MAX_CONCURRENT_STREAMS`` is reached), trailers and flow control end to end.

An :class:`Exchange` is one attempt. Failures before a response are :class:`AttemptError`
with a :mod:`l7gateway.retry` outcome: ``connect-failure`` (no connection: never processed),
``refused-stream`` (never processed), ``reset`` (maybe processed).
"""

from __future__ import annotations

import logging
import select
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

import h11
import trio
from h2.errors import ErrorCodes

from l7gateway.http2 import H2Config, H2Connection, H2Stream, StreamError
from l7gateway.retry import CONNECT_FAILURE, REFUSED_STREAM, RESET
from nodeproxy.certmanager import CertificateManager
from nodeproxy.tlsconfig import check_peer
from ztunnel.endpoints import Endpoint
from ztunnel.hbone.pool import HbonePool, PoolKey
from ztunnel.hbone.protocol import HBONE_PORT, HboneError, format_authority
from ztunnel.sockets import set_keepalive

log = logging.getLogger(__name__)

Dial = Callable[[Endpoint], Awaitable[trio.abc.Stream]]
Headers = list[tuple[str, str]]

CONNECT_TIMEOUT = 10.0
HANDSHAKE_TIMEOUT = 10.0
READ_SIZE = 64 * 1024
MAX_RESPONSE_HEAD = 64 * 1024
H1_IDLE_PER_ENDPOINT = 32
H1_IDLE_TIMEOUT = 30.0
H2_STREAMS_PER_CONN = 100


class AttemptError(Exception):
    """An attempt ended without a response; ``outcome`` is a retry outcome."""

    def __init__(self, outcome: str, message: str) -> None:
        super().__init__(message)
        self.outcome = outcome


@dataclass
class RequestHead:
    """A request as it goes upstream. ``headers``: lower-case names, no hop-by-hop ones."""

    method: str
    scheme: str
    authority: str
    target: str
    headers: Headers
    has_body: bool
    upgrade: str | None = None  # HTTP/1.1 Upgrade (passed through with Connection: upgrade)


@dataclass
class ResponseHead:
    status: int
    headers: Headers
    ended: bool = False  # no body follows (e.g. an HTTP/2 trailers-only response)


class BodyCursor(Protocol):
    """The request body for one attempt."""

    async def next(self) -> bytes | None: ...  # None at the end

    @property
    def trailers(self) -> Headers | None: ...


class Exchange(Protocol):
    upgraded: tuple[trio.abc.Stream, bytes] | None
    trailers: Headers | None

    async def send_body(self, body: BodyCursor) -> None: ...
    async def response(self) -> ResponseHead: ...
    async def receive_data(self) -> bytes: ...
    async def finish(self, ok: bool) -> None: ...


# -- production dial ----------------------------------------------------------------------


class HboneDialer:
    """``dial`` for production: HBONE (pooled, multiplexed) to meshed endpoints, plain TCP to
    the others. Run :meth:`run` in a nursery (it owns the HBONE pool)."""

    def __init__(self, certs: CertificateManager, identity: str) -> None:
        self.certs = certs
        self.identity = identity
        self.pool = HbonePool(self._connect)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self.pool.run(task_status=task_status)

    async def _connect(self, key: PoolKey) -> trio.abc.Stream:
        cert = await self.certs.get(key.src_identity)
        with trio.fail_after(CONNECT_TIMEOUT):
            tcp = await trio.open_tcp_stream(*key.next_hop)
        set_keepalive(tcp.socket)  # type: ignore[arg-type]
        tls = trio.SSLStream(tcp, cert.client_context(), server_side=False)
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                await tls.do_handshake()
            check_peer(tls, key.dst_identities)
        except BaseException:
            await trio.aclose_forcefully(tls)
            raise
        return tls

    async def __call__(self, endpoint: Endpoint) -> trio.abc.Stream:
        wl = endpoint.workload
        if not wl.meshed:
            with trio.fail_after(CONNECT_TIMEOUT):
                return await trio.open_tcp_stream(endpoint.address, endpoint.port)
        key = PoolKey(self.identity, frozenset({wl.identity}), (endpoint.address, HBONE_PORT),
                      None)
        return await self.pool.open(key, format_authority(endpoint.address, endpoint.port))


def _looks_closed(stream: trio.abc.Stream) -> bool:
    """Whether an idle pooled connection was closed by the peer meanwhile."""
    if getattr(stream, "finished", False) or getattr(stream, "_recv_eof", False):
        return True
    sock = getattr(stream, "socket", None)
    if isinstance(sock, trio.socket.SocketType):
        # an idle HTTP/1.1 server sends nothing: readable means closed (or broken)
        try:
            readable, _, _ = select.select([sock.fileno()], [], [], 0)
        except (OSError, ValueError):
            return True
        return bool(readable)
    return False


# -- HTTP/1.1 -----------------------------------------------------------------------------


@dataclass(eq=False)
class H1Conn:
    key: str
    stream: trio.abc.Stream
    h11: h11.Connection = field(default_factory=lambda: h11.Connection(
        h11.CLIENT, max_incomplete_event_size=MAX_RESPONSE_HEAD))
    reused: bool = False
    idle_since: float = 0.0


class H1Exchange:
    def __init__(self, pool: Upstreams, conn: H1Conn, head: RequestHead) -> None:
        self.pool = pool
        self.conn = conn
        self.head = head
        self.upgraded: tuple[trio.abc.Stream, bytes] | None = None
        self.trailers: Headers | None = None
        self._chunked = False
        self._got_bytes = False
        self._done = False

    async def _send(self, event: object) -> None:
        data = self.conn.h11.send(event)  # type: ignore[arg-type]
        if data:
            await self.conn.stream.send_all(data)

    async def start(self) -> None:
        head = self.head
        headers = [("host", head.authority)]
        headers += head.headers
        names = {n for n, _ in head.headers}
        if head.has_body and "content-length" not in names:
            headers.append(("transfer-encoding", "chunked"))
            self._chunked = True
        if head.upgrade:
            headers += [("connection", "upgrade"), ("upgrade", head.upgrade)]
        try:
            await self._send(h11.Request(method=head.method, target=head.target,
                                         headers=headers))
            if not head.has_body:
                await self._send(h11.EndOfMessage())
        except h11.LocalProtocolError as e:
            raise AttemptError(RESET, f"bad request for HTTP/1.1: {e}") from e
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            raise AttemptError(CONNECT_FAILURE if self.conn.reused else RESET,
                               f"write failed: {e!r}") from e

    async def send_body(self, body: BodyCursor) -> None:
        if not self.head.has_body:
            return
        try:
            while (chunk := await body.next()) is not None:
                if chunk:
                    await self._send(h11.Data(data=chunk))
            trailers = body.trailers if self._chunked else None
            await self._send(h11.EndOfMessage(headers=trailers or []))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError,
                h11.LocalProtocolError) as e:
            # the response side notices the broken connection; nothing more to send
            log.debug("request body to %s not fully sent: %s", self.conn.key, e)

    async def _next_event(self) -> object:
        while True:
            try:
                ev = self.conn.h11.next_event()
            except h11.RemoteProtocolError as e:
                raise AttemptError(RESET, f"bad HTTP/1.1 from upstream: {e}") from e
            if ev is not h11.NEED_DATA:
                return ev
            try:
                data = await self.conn.stream.receive_some(READ_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
                raise self._lost(f"read failed: {e!r}") from e
            if not data and not self._got_bytes and self.conn.reused:
                raise self._lost("pooled connection closed")
            self._got_bytes = True
            self.conn.h11.receive_data(data)

    def _lost(self, message: str) -> AttemptError:
        # a reused keep-alive connection that dies before any response byte was very likely
        # closed by the server while idle: the request was not processed
        if not self._got_bytes and self.conn.reused:
            return AttemptError(CONNECT_FAILURE, message)
        return AttemptError(RESET, message)

    async def response(self) -> ResponseHead:
        while True:
            ev = await self._next_event()
            if isinstance(ev, h11.InformationalResponse):
                if ev.status_code == 101 and self.head.upgrade:
                    leftover, _ = self.conn.h11.trailing_data
                    self.upgraded = (self.conn.stream, bytes(leftover))
                    return ResponseHead(101, _h11_headers(ev.headers), ended=True)
                continue
            if isinstance(ev, h11.Response):
                return ResponseHead(ev.status_code, _h11_headers(ev.headers))
            if isinstance(ev, h11.ConnectionClosed):
                raise self._lost("connection closed before the response")
            raise AttemptError(RESET, f"unexpected {type(ev).__name__} from upstream")

    async def receive_data(self) -> bytes:
        while True:
            ev = await self._next_event()
            if isinstance(ev, h11.Data):
                if ev.data:
                    return bytes(ev.data)
            elif isinstance(ev, h11.EndOfMessage):
                self.trailers = _h11_headers(ev.headers) or None
                self._done = True
                return b""
            else:
                raise AttemptError(RESET, "connection closed in the response body")

    async def finish(self, ok: bool) -> None:
        conn = self.conn
        if self.upgraded is not None:
            return  # the stream now belongs to the upgrade relay
        reusable = (
            ok and self._done and conn.h11.our_state is h11.DONE
            and conn.h11.their_state is h11.DONE
        )
        if reusable:
            try:
                conn.h11.start_next_cycle()
            except h11.LocalProtocolError:
                reusable = False
        if reusable:
            self.pool._release_h1(conn)
        else:
            await trio.aclose_forcefully(conn.stream)


def _h11_headers(headers: object) -> Headers:
    return [(n.decode("latin-1").lower(), v.decode("latin-1")) for n, v in headers]  # type: ignore


# -- HTTP/2 -------------------------------------------------------------------------------


class H2Exchange:
    def __init__(self, stream: H2Stream) -> None:
        self.stream = stream
        self.upgraded: tuple[trio.abc.Stream, bytes] | None = None
        self.trailers: Headers | None = None

    async def send_body(self, body: BodyCursor) -> None:
        s = self.stream
        if s.sent_end:
            return
        try:
            while (chunk := await body.next()) is not None:
                if chunk:
                    await s.send_data(chunk)
            await s.end(body.trailers)
        except StreamError as e:
            log.debug("request body on stream %s not fully sent: %s", s.id, e)

    async def response(self) -> ResponseHead:
        try:
            headers = await self.stream.receive_headers()
        except StreamError as e:
            raise AttemptError(REFUSED_STREAM if e.refused else RESET, str(e)) from e
        status = 0
        rest: Headers = []
        for n, v in headers:
            if n == ":status":
                status = int(v) if v.isdigit() else 0
            elif not n.startswith(":"):
                rest.append((n, v))
        if not 100 <= status <= 599:
            raise AttemptError(RESET, f"bad :status from upstream {status}")
        s = self.stream
        return ResponseHead(status, rest, ended=s.ended and not s._data)

    async def receive_data(self) -> bytes:
        try:
            data = await self.stream.receive_data()
        except StreamError as e:
            raise AttemptError(RESET, str(e)) from e
        if not data:
            self.trailers = self.stream.trailers
        return data

    async def finish(self, ok: bool) -> None:
        if not self.stream.closed:
            self.stream.reset(ErrorCodes.CANCEL)
        self.stream.conn._forget(self.stream)
        await trio.lowlevel.checkpoint()


# -- the pools ----------------------------------------------------------------------------


class Upstreams:
    """Per-endpoint HTTP/1.1 and HTTP/2 connections. Run :meth:`run` in a nursery."""

    def __init__(self, dial: Dial, *, h2_config: H2Config | None = None) -> None:
        self.dial = dial
        self.h2_config = h2_config or H2Config(max_resets=1_000_000)
        self._h1_idle: dict[str, list[H1Conn]] = {}
        self._h2: dict[str, list[H2Connection]] = {}
        self._h2_locks: dict[str, trio.Lock] = {}
        self._nursery: trio.Nursery | None = None
        self.connections_made = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                while True:
                    await trio.sleep(H1_IDLE_TIMEOUT / 2)
                    await self._reap()
            finally:
                self._nursery = None
                for conns in self._h1_idle.values():
                    for c in conns:
                        await trio.aclose_forcefully(c.stream)
                self._h1_idle.clear()
                nursery.cancel_scope.cancel()

    async def _reap(self) -> None:
        now = trio.current_time()
        for key, conns in list(self._h1_idle.items()):
            for c in list(conns):
                if now - c.idle_since > H1_IDLE_TIMEOUT:
                    conns.remove(c)
                    await trio.aclose_forcefully(c.stream)
            if not conns:
                del self._h1_idle[key]

    @staticmethod
    def key(ep: Endpoint) -> str:
        return f"{ep.workload.uid}@{format_authority(ep.address, ep.port)}"

    async def _dial(self, ep: Endpoint) -> trio.abc.Stream:
        try:
            stream = await self.dial(ep)
        except (OSError, trio.TooSlowError, HboneError, trio.BrokenResourceError) as e:
            raise AttemptError(CONNECT_FAILURE, f"connect to {self.key(ep)}: {e!r}") from e
        except Exception as e:  # noqa: BLE001 - TLS/identity failures and the like
            raise AttemptError(CONNECT_FAILURE, f"connect to {self.key(ep)}: {e!r}") from e
        self.connections_made += 1
        return stream

    # -- HTTP/1.1
    def _release_h1(self, conn: H1Conn) -> None:
        idle = self._h1_idle.setdefault(conn.key, [])
        if len(idle) >= H1_IDLE_PER_ENDPOINT or self._nursery is None:
            self._close_later(conn.stream)
            return
        conn.reused = True
        conn.idle_since = trio.current_time()
        idle.append(conn)

    def _close_later(self, stream: trio.abc.Stream) -> None:
        if self._nursery is not None:
            self._nursery.start_soon(trio.aclose_forcefully, stream)

    async def _h1_conn(self, ep: Endpoint, fresh: bool) -> H1Conn:
        key = self.key(ep)
        idle = self._h1_idle.get(key, [])
        while idle and not fresh:
            conn = idle.pop()
            if _looks_closed(conn.stream):
                self._close_later(conn.stream)
                continue
            return conn
        return H1Conn(key, await self._dial(ep))

    async def start_h1(self, ep: Endpoint, head: RequestHead) -> H1Exchange:
        """Send a request's head over a pooled (or new) HTTP/1.1 connection."""
        conn = await self._h1_conn(ep, fresh=bool(head.upgrade))
        ex = H1Exchange(self, conn, head)
        try:
            await ex.start()
        except BaseException:
            await trio.aclose_forcefully(conn.stream)
            raise
        return ex

    # -- HTTP/2
    async def _h2_conn(self, ep: Endpoint) -> H2Connection:
        key = self.key(ep)

        def pick() -> H2Connection | None:
            for c in self._h2.get(key, ()):
                limit = min(H2_STREAMS_PER_CONN, c.peer_max_streams)
                if c.usable and c.open_streams < limit:
                    return c
            return None

        conn = pick()
        if conn is not None:
            return conn
        lock = self._h2_locks.setdefault(key, trio.Lock())
        async with lock:
            conn = pick()
            if conn is not None:
                return conn
            if self._nursery is None:
                raise AttemptError(CONNECT_FAILURE, "upstream pool is not running")
            stream = await self._dial(ep)
            conn = H2Connection(stream, client_side=True, config=self.h2_config, name=key)
            await self._nursery.start(self._run_h2, key, conn)
            return conn

    async def _run_h2(self, key: str, conn: H2Connection,
                      task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._h2.setdefault(key, []).append(conn)
        try:
            await conn.run(task_status=task_status)
        finally:
            conns = self._h2.get(key, [])
            if conn in conns:
                conns.remove(conn)
            if not conns:
                self._h2.pop(key, None)
                self._h2_locks.pop(key, None)

    async def start_h2(self, ep: Endpoint, head: RequestHead) -> H2Exchange:
        """Open a stream on the endpoint's multiplexed HTTP/2 connection."""
        conn = await self._h2_conn(ep)
        headers = [
            (":method", head.method),
            (":scheme", head.scheme),
            (":authority", head.authority),
            (":path", head.target),
            *head.headers,
        ]
        try:
            stream = await conn.open_stream(headers, end_stream=not head.has_body)
        except StreamError as e:
            raise AttemptError(REFUSED_STREAM if e.refused else RESET, str(e)) from e
        return H2Exchange(stream)
