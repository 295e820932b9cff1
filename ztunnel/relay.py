"""The byte relay between two half-closeable streams.

Large chunks (no per-byte Python work); one task per direction; an end of stream on one side
becomes a half-close on the other (TCP FIN ↔ HTTP/2 END_STREAM), and an error on either side
aborts both, so a reset travels end to end (TCP RST ↔ RST_STREAM). For HBONE → TCP the
connection's reader sends to the socket itself while that direction's task waits (a sink).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass

import trio

from ztunnel.hbone.connection import HboneStream
from ztunnel.sockets import reset_on_close

log = logging.getLogger(__name__)

CHUNK = 256 * 1024
_BROKEN = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


@dataclass(slots=True)
class Counters:
    """Live byte counts of one proxied connection (read by the admin page and metrics)."""

    client_to_server: int = 0
    server_to_client: int = 0


class RelayError(Exception):
    pass


def _raw_socket(stream: trio.abc.Stream) -> socket.socket | None:
    """The OS socket of a plain ``trio.SocketStream`` (not a subclass or wrapper), else None."""
    if type(stream) is trio.SocketStream:
        sock = getattr(stream.socket, "_sock", None)
        if isinstance(sock, socket.socket):
            return sock
    return None


def _socket_sink(
    sock: socket.socket, counters: Counters, upstream: bool
) -> Callable[[bytes], int]:
    """A non-blocking send of as much as the socket takes now; counts what it took."""

    def sink(data: bytes) -> int:
        try:
            n = sock.send(data)
        except OSError:  # full (BlockingIOError) or broken: receive_some() takes over
            return 0
        if upstream:
            counters.client_to_server += n
        else:
            counters.server_to_client += n
        return n

    return sink


async def _recv(sock: socket.socket) -> tuple[bytes, bool]:
    """Read up to CHUNK; also says whether it waited (a schedule point) or not."""
    try:
        return sock.recv(CHUNK), False
    except (BlockingIOError, InterruptedError):
        pass
    while True:
        await trio.lowlevel.wait_readable(sock)
        try:
            return sock.recv(CHUNK), True
        except (BlockingIOError, InterruptedError):
            pass


async def _send(sock: socket.socket, data: bytes) -> bool:
    """Send all of data; says whether it had to wait (a schedule point)."""
    waited = False
    view = memoryview(data)
    while view:
        try:
            n = sock.send(view)
        except (BlockingIOError, InterruptedError):
            await trio.lowlevel.wait_writable(sock)
            waited = True
            continue
        view = view[n:]
    return waited


async def abort(stream: trio.abc.AsyncResource) -> None:
    """Close a stream so that the peer sees a reset rather than a clean end."""
    sock = getattr(stream, "socket", None)
    if sock is not None:
        reset_on_close(sock)  # trio.SocketStream: SO_LINGER 0 turns close into RST
    reset = getattr(stream, "reset", None)
    with trio.CancelScope(shield=True):
        try:
            if reset is not None:
                await reset()
            else:
                await trio.aclose_forcefully(stream)
        except _BROKEN:
            pass


async def _pump(
    src: trio.abc.HalfCloseableStream,
    dst: trio.abc.HalfCloseableStream,
    upstream: bool,
    cancel: trio.CancelScope,
    counters: Counters,
    failure: list[BaseException],
) -> None:
    """One direction of :func:`relay` (a module function: no closure per connection)."""
    # For a plain trio.SocketStream, the socket calls are made here directly: trio's stream
    # adds a schedule point after every call that did not block (a task switch and an
    # event-loop pass per read and per write). One schedule point per loop pass is kept:
    # the wait for data, or an explicit checkpoint when there was no wait.
    raw_src = _raw_socket(src)
    raw_dst = _raw_socket(dst)
    if raw_dst is not None and isinstance(src, HboneStream):
        # HBONE -> TCP: the connection's reader sends straight to the socket while this
        # task waits (no wake-up per delivery); bytes the socket does not take at once
        # come through receive_some() as usual
        src._sink = _socket_sink(raw_dst, counters, upstream)
    try:
        while True:
            if raw_src is not None:
                data, scheduled = await _recv(raw_src)
            else:
                data, scheduled = await src.receive_some(CHUNK), True
            if not data:
                try:
                    if raw_dst is not None:
                        dst.socket.shutdown(socket.SHUT_WR)  # type: ignore[attr-defined]
                        if not scheduled:
                            await trio.lowlevel.checkpoint()
                    else:
                        await dst.send_eof()
                except _BROKEN:
                    # the other side already closed (ENOTCONN/EPIPE): nothing left to
                    # tell it; the other direction ends on its own
                    pass
                return
            if raw_dst is not None:
                if await _send(raw_dst, data):
                    scheduled = True
                if not scheduled:
                    await trio.lowlevel.checkpoint()
            else:
                await dst.send_all(data)
            if upstream:
                counters.client_to_server += len(data)
            else:
                counters.server_to_client += len(data)
            # drop the chunk before waiting again: an idle connection would otherwise keep
            # its last read (e.g. a whole response) alive for as long as it stays open
            del data
    except _BROKEN as exc:
        failure.append(exc)
        cancel.cancel()
    finally:
        if raw_dst is not None and isinstance(src, HboneStream):
            src._sink = None


async def relay(
    client: trio.abc.HalfCloseableStream,
    server: trio.abc.HalfCloseableStream,
    counters: Counters | None = None,
) -> Counters:
    """Copy both ways until both directions ended; raise RelayError after aborting on error."""
    counters = counters if counters is not None else Counters()
    failure: list[BaseException] = []
    try:
        async with trio.open_nursery() as nursery:
            # one direction in this task: one task (and its memory) less per connection; the
            # nursery's own scope is the one a failing direction cancels (no second scope)
            scope = nursery.cancel_scope
            nursery.start_soon(_pump, server, client, False, scope, counters, failure)
            await _pump(client, server, True, scope, counters, failure)
    except BaseException:
        # cancelled from outside (policy now denies, pod removed, shutdown): reset both
        await abort(client)
        await abort(server)
        raise
    if failure:
        await abort(client)
        await abort(server)
        raise RelayError(str(failure[0]) or type(failure[0]).__name__) from failure[0]
    with trio.CancelScope(shield=True):
        for stream in (client, server):
            try:
                if _raw_socket(stream) is not None:
                    stream.socket.close()  # type: ignore[attr-defined]  # no schedule point
                else:
                    await stream.aclose()
            except _BROKEN:
                pass
    return counters
