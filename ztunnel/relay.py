"""The byte relay between two half-closeable streams.

Large chunks (no per-byte Python work); one task per direction; an end of stream on one side
becomes a half-close on the other (TCP FIN ↔ HTTP/2 END_STREAM), and an error on either side
aborts both, so a reset travels end to end (TCP RST ↔ RST_STREAM).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import trio

from ztunnel.sockets import reset_on_close

log = logging.getLogger(__name__)

CHUNK = 256 * 1024
_BROKEN = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


@dataclass
class Counters:
    """Live byte counts of one proxied connection (read by the admin page and metrics)."""

    client_to_server: int = 0
    server_to_client: int = 0


class RelayError(Exception):
    pass


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


async def relay(
    client: trio.abc.HalfCloseableStream,
    server: trio.abc.HalfCloseableStream,
    counters: Counters | None = None,
) -> Counters:
    """Copy both ways until both directions ended; raise RelayError after aborting on error."""
    counters = counters if counters is not None else Counters()
    failure: list[BaseException] = []

    async def pump(
        src: trio.abc.HalfCloseableStream,
        dst: trio.abc.HalfCloseableStream,
        upstream: bool,
        cancel: trio.CancelScope,
    ) -> None:
        try:
            while True:
                data = await src.receive_some(CHUNK)
                if not data:
                    try:
                        await dst.send_eof()
                    except _BROKEN:
                        # the other side already closed (ENOTCONN/EPIPE): nothing left to
                        # tell it; the other direction ends on its own
                        pass
                    return
                await dst.send_all(data)
                if upstream:
                    counters.client_to_server += len(data)
                else:
                    counters.server_to_client += len(data)
        except _BROKEN as exc:
            failure.append(exc)
            cancel.cancel()

    try:
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                # one direction in this task: one task (and its memory) less per connection
                nursery.start_soon(pump, server, client, False, scope)
                await pump(client, server, True, scope)
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
                await stream.aclose()
            except _BROKEN:
                pass
    return counters
