"""The HBONE client pool: reuse HTTP/2 connections per (source identity, acceptable destination
identities, next hop, source ip), as ztunnel does.

A connection carries up to ``min(max_streams_per_conn, peer MAX_CONCURRENT_STREAMS)`` streams;
when all are busy a new one is made. Only one connection per key is being made at a time (one
lock per key), so a burst of opens does not become a burst of TLS handshakes. Connections idle
for ``idle_timeout`` are closed; dead or GOAWAY'd ones are replaced.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Awaitable, Callable, Collection, Iterable
from typing import Any, NamedTuple

import trio

from nodeproxy.tlsconfig import check_peer

from .connection import HboneConnectError, HboneConnection, HboneStatusError, HboneStream
from .protocol import HboneError

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0
HANDSHAKE_TIMEOUT = 10.0
OPEN_ATTEMPTS = 3


async def client_tls(
    transport: trio.abc.Stream, context: ssl.SSLContext, expected: Collection[str]
) -> trio.SSLStream:
    """The TLS client end of a new HBONE connection (no SNI): handshake within
    HANDSHAKE_TIMEOUT, then the server must present one of the ``expected`` identities.
    The transport is closed if either fails."""
    tls = trio.SSLStream(transport, context, server_side=False)
    try:
        with trio.fail_after(HANDSHAKE_TIMEOUT):
            await tls.do_handshake()
        check_peer(tls, expected)
    except BaseException:
        await trio.aclose_forcefully(tls)
        raise
    return tls


class PoolKey(NamedTuple):
    src_identity: str
    dst_identities: frozenset[str]
    next_hop: tuple[str, int]
    src_ip: str | None


Connector = Callable[[PoolKey], Awaitable[trio.abc.Stream]]


class HbonePool:
    """Client HBONE connections, pooled by :class:`PoolKey`. Run :meth:`run` in a nursery."""

    def __init__(
        self,
        connect: Connector,
        *,
        max_streams_per_conn: int = 100,
        idle_timeout: float = 300.0,
        connect_timeout: float = CONNECT_TIMEOUT,
        connection_options: dict[str, Any] | None = None,
    ) -> None:
        """``connect(key)`` returns a connected stream to ``key.next_hop`` (TLS with ALPN h2,
        the peer's identity checked against ``key.dst_identities``); its errors become
        :class:`HboneConnectError`. ``connection_options`` go to :class:`HboneConnection`."""
        if max_streams_per_conn < 1:
            raise ValueError("max_streams_per_conn must be >= 1")
        self._connect = connect
        self.max_streams_per_conn = max_streams_per_conn
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout
        self._conn_options = dict(connection_options or {})
        self._conns: dict[PoolKey, list[HboneConnection]] = {}
        self._locks: dict[PoolKey, trio.Lock] = {}
        self._nursery: trio.Nursery | None = None
        self._closed = False
        self.connections_made = 0

    # -- running ------------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the connections' tasks and close idle connections, until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                task_status.started()
                interval = max(0.01, min(self.idle_timeout / 4, 30.0))
                while True:
                    await trio.sleep(interval)
                    self._reap()
            finally:
                self._nursery = None
                nursery.cancel_scope.cancel()

    def _reap(self) -> None:
        now = trio.current_time()
        assert self._nursery is not None
        for key, conns in list(self._conns.items()):
            for conn in list(conns):
                if conn.open_streams:
                    continue
                idle = now - conn.last_used
                if not conn.is_usable or idle >= self.idle_timeout:
                    log.debug("closing HBONE connection to %s (idle %.0f s, usable %s)",
                              key.next_hop, idle, conn.is_usable)
                    conns.remove(conn)
                    self._nursery.start_soon(conn.aclose)
            if not conns:
                del self._conns[key]
        for key, lock in list(self._locks.items()):
            if key not in self._conns and not lock.locked():
                del self._locks[key]

    async def _run_conn(
        self, key: PoolKey, conn: HboneConnection, *, task_status: trio.TaskStatus[None]
    ) -> None:
        self._conns.setdefault(key, []).append(conn)
        try:
            await conn.run(task_status=task_status)
        finally:
            conns = self._conns.get(key)
            if conns is not None and conn in conns:
                conns.remove(conn)
                if not conns:
                    del self._conns[key]

    # -- opening --------------------------------------------------------------------------------
    def _limit(self, conn: HboneConnection) -> int:
        return min(self.max_streams_per_conn, conn.max_concurrent_streams)

    def _pick(self, key: PoolKey) -> HboneConnection | None:
        # Fill the busiest usable connection first: fewer connections, and idle ones age out.
        best = None
        for conn in self._conns.get(key, ()):
            if conn.is_usable and conn.open_streams < self._limit(conn):
                if best is None or conn.open_streams > best.open_streams:
                    best = conn
        return best

    async def _new_connection(self, key: PoolKey) -> HboneConnection:
        transport: trio.abc.Stream | None = None
        try:
            with trio.fail_after(self.connect_timeout):
                transport = await self._connect(key)
                if isinstance(transport, trio.SSLStream):
                    await transport.do_handshake()  # fail here, not in the first stream
        except HboneConnectError:
            raise
        except trio.TooSlowError:
            if transport is not None:
                await trio.aclose_forcefully(transport)
            raise HboneConnectError(f"HBONE connect to {key.next_hop} timed out") from None
        except Exception as e:
            if transport is not None:
                await trio.aclose_forcefully(transport)
            raise HboneConnectError(f"HBONE connect to {key.next_hop} failed: {e!r}") from e
        conn = HboneConnection(
            transport,
            client_side=True,
            peer_identity=getattr(transport, "peer_identity", None),
            **self._conn_options,
        )
        if self._nursery is None:
            await trio.aclose_forcefully(transport)
            raise HboneError("HBONE pool is not running")
        await self._nursery.start(self._run_conn, key, conn)
        self.connections_made += 1
        log.debug("new HBONE connection to %s for %s", key.next_hop, key.src_identity)
        return conn

    async def open(
        self, key: PoolKey, authority: str, headers: Iterable[tuple[str, str]] = ()
    ) -> HboneStream:
        """Open a CONNECT stream to ``authority`` through a pooled connection for ``key``.

        Raises :class:`HboneConnectError` if no connection could be made,
        :class:`HboneStatusError` for a non-200 answer, :class:`HboneError` otherwise."""
        headers = list(headers)
        last: HboneError | None = None
        for _ in range(OPEN_ATTEMPTS):
            if self._closed or self._nursery is None:
                raise HboneError("HBONE pool is closed or not running")
            conn = self._pick(key)
            if conn is None:
                lock = self._locks.setdefault(key, trio.Lock())
                async with lock:
                    conn = self._pick(key)
                    if conn is None:
                        conn = await self._new_connection(key)
            try:
                return await conn.open_stream(authority, headers)
            except HboneStatusError:
                raise
            except HboneError as e:
                # The connection died, was drained (GOAWAY, stream refused) or filled up
                # before our stream went out: the peer never handled it, so try again.
                if conn.is_usable and conn.open_streams < self._limit(conn):
                    raise
                last = e
        assert last is not None
        raise last

    # -- admin and shutdown ---------------------------------------------------------------------
    def connections(self, key: PoolKey) -> list[HboneConnection]:
        return list(self._conns.get(key, ()))

    def stats(self) -> list[dict[str, Any]]:
        """One entry per connection, for the admin page."""
        now = trio.current_time()
        out = []
        for key, conns in self._conns.items():
            for conn in conns:
                out.append({
                    "src_identity": key.src_identity,
                    "dst_identities": sorted(key.dst_identities),
                    "next_hop": f"{key.next_hop[0]}:{key.next_hop[1]}",
                    "src_ip": key.src_ip,
                    "open_streams": conn.open_streams,
                    "max_streams": self._limit(conn),
                    "usable": conn.is_usable,
                    "age_seconds": round(now - conn.created_at, 3),
                    "idle_seconds": round(now - conn.last_used, 3),
                })
        return out

    async def aclose(self, *, grace: float = 5.0) -> None:
        """Drain: GOAWAY on every connection, let streams finish for up to ``grace`` s, close."""
        self._closed = True
        conns = [c for cs in self._conns.values() for c in cs]

        async def drain(conn: HboneConnection) -> None:
            with trio.move_on_after(grace):
                await conn.drain()

        async with trio.open_nursery() as nursery:
            for conn in conns:
                nursery.start_soon(drain, conn)
