"""The byte relay between two half-closeable streams.

Large chunks (no per-byte Python work); an end of stream on one side becomes a half-close on
the other (TCP FIN ↔ HTTP/2 END_STREAM), and an error on either side aborts both, so a reset
travels end to end (TCP RST ↔ RST_STREAM). Between an HBONE stream and a plain TCP socket (the
node proxy's case) a connection has one task: TCP → HBONE runs in it, HBONE → TCP on the HBONE
connection's reader, which sends to the socket itself (the stream's sink); only while the socket
is full does a task wait for it. Other pairs get one task per direction.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass

import trio

from ztunnel.hbone.connection import HboneStream
from ztunnel.sockets import reset_on_close, send_all_nonblocking

log = logging.getLogger(__name__)

CHUNK = 256 * 1024
_MORE = socket.MSG_MORE
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


def _try_recv(sock: socket.socket) -> bytes | None:
    """Up to CHUNK if there is something to read (b"" at the end), else None.

    (A function of its own: the exception of an empty read is caught here, so the traceback
    never references, and so never materialises, the frame of a long-lived caller: ~270 B
    per idle connection and side.)"""
    try:
        return sock.recv(CHUNK)
    except (BlockingIOError, InterruptedError):
        return None


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
                if await send_all_nonblocking(raw_dst, data):
                    scheduled = True
                if not scheduled:
                    await trio.lowlevel.checkpoint()
            elif type(dst) is HboneStream:
                # no schedule point of its own when the bytes went out at once
                if await dst._send(data):
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


class _HboneToSocket:
    """The HBONE → TCP half of a relay between an :class:`HboneStream` and a plain TCP socket,
    run by the HBONE connection's reader (the stream's sink): no task of its own while the
    socket takes the bytes at once.

    When it does not, the bytes stay buffered in the stream, unacknowledged (so HTTP/2 flow
    control bounds them), and a task of the HBONE connection waits for the socket from then
    on (:func:`_socket_drainer`). End of stream becomes a half-close of the socket here; a
    reset or a lost connection fails the relay: both ends are aborted at once, which also
    wakes the relay's task wherever it waits (no cancel scope per connection for that).
    """

    __slots__ = ("tsock", "sock", "counters", "upstream", "failure", "task_done")

    def __init__(self, tsock: trio.socket.SocketType, sock: socket.socket, counters: Counters,
                 upstream: bool) -> None:
        self.tsock = tsock  # the trio socket: closing it wakes a task waiting on it
        self.sock = sock
        self.counters = counters
        self.upstream = upstream  # counted as client → server
        self.failure: BaseException | None = None
        self.task_done: trio.Event | None = None  # set when a drainer task was started

    def data(self, data: bytes, last: bool = False) -> int:
        try:
            # When the end follows at once, MSG_MORE holds the bytes back for the shutdown
            # that comes next in this same pass (event()): bytes and FIN leave in one
            # segment. Sent apart, a client that closes as soon as it has a whole response
            # (wrk, with Connection: close) often closes first and is left with the
            # TIME_WAIT the server would have held: its ports run out at a high rate.
            n = self.sock.send(data, _MORE) if last else self.sock.send(data)
        except OSError:  # full (BlockingIOError) or broken: the drainer task finds out which
            return 0
        if self.upstream:
            self.counters.client_to_server += n
        else:
            self.counters.server_to_client += n
        return n

    def event(self, stream: HboneStream) -> None:
        if stream._reset_code is not None:
            who = "peer" if stream._reset_remote else "us"
            self.fail(stream, trio.BrokenResourceError(
                f"HBONE stream reset by {who} (code {stream._reset_code})"))
        elif stream._conn_dead:
            self.fail(stream, trio.BrokenResourceError(
                f"HBONE connection lost: {stream.connection.dead_reason}"))
        elif stream._recv:
            # the socket is full: a task waits for it, until this direction ends
            stream._evented = False
            self.task_done = trio.Event()
            if not stream.connection.start_soon(_socket_drainer, stream, self):
                self.task_done.set()
                self.fail(stream, trio.BrokenResourceError("HBONE connection ended"))
        elif stream._recv_eof:
            # stays evented: a reset that comes later still resets the socket
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # the socket's side is gone already; its direction ends on its own

    def fail(self, stream: HboneStream, exc: BaseException) -> None:
        """Abort both ends now (synchronously): RST_STREAM and a TCP RST."""
        if self.failure is None:
            self.failure = exc
        stream._sink = None
        stream._evented = False
        stream._abort()
        reset_on_close(self.sock)
        self.tsock.close()  # wakes a task waiting on the socket (ClosedResourceError)


async def _hbone_to_socket(stream: HboneStream, st: _HboneToSocket) -> bool:
    """HBONE → TCP in a task (bytes the socket did not take; the sink still takes the rest
    while this waits in receive_some). True when it ended with a half-close."""
    sock = st.sock
    try:
        while True:
            data = await stream.receive_some(CHUNK)  # always a schedule point
            if not data:
                try:
                    sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                return True
            await send_all_nonblocking(sock, data)
            if st.upstream:
                st.counters.client_to_server += len(data)
            else:
                st.counters.server_to_client += len(data)
            del data  # not kept alive while idle
    except _BROKEN as exc:
        st.fail(stream, exc)
        return False


async def _socket_drainer(stream: HboneStream, st: _HboneToSocket) -> None:
    """The HBONE connection's task for a relay whose socket was full (see _HboneToSocket)."""
    ok = False
    try:
        ok = await _hbone_to_socket(stream, st)
    finally:
        if ok:
            if stream._sink is st:
                stream._evented = True  # a reset that comes later still resets the socket
        elif st.failure is None:  # cancelled: the HBONE connection ends
            st.fail(stream, trio.BrokenResourceError("HBONE connection ended"))
        assert st.task_done is not None
        st.task_done.set()


async def _join(st: _HboneToSocket) -> None:
    if st.task_done is not None:
        with trio.CancelScope(shield=True):
            await st.task_done.wait()  # prompt: its streams were closed or reset


async def relay(
    client: trio.abc.HalfCloseableStream,
    server: trio.abc.HalfCloseableStream,
    counters: Counters | None = None,
) -> Counters:
    """Copy both ways until both directions ended; raise RelayError after aborting on error."""
    counters = counters if counters is not None else Counters()
    # An HBONE tunnel and a plain TCP socket (the node proxy's inbound and outbound): one task,
    # this one. TCP → HBONE is the loop below, HBONE → TCP the HBONE connection's reader.
    # (Written out here, not in helper coroutines: each nested coroutine's frame and each
    # cancel scope stayed allocated for as long as the connection was open.)
    if isinstance(client, HboneStream) and (sock := _raw_socket(server)) is not None:
        hstream, sstream, hbone_is_client = client, server, True
    elif isinstance(server, HboneStream) and (sock := _raw_socket(client)) is not None:
        hstream, sstream, hbone_is_client = server, client, False
    else:
        return await _relay_tasks(client, server, counters)
    st = _HboneToSocket(sstream.socket, sock, counters, hbone_is_client)  # type: ignore[attr-defined]
    try:
        hstream._sink = st
        hstream._evented = True
        if hstream._recv:  # arrived before the relay started
            hstream._feed_sink()
        if (hstream._recv or hstream._recv_eof or hstream._reset_code is not None
                or hstream._conn_dead):
            st.event(hstream)
        # TCP → HBONE. One schedule point per pass: the wait for data, or a checkpoint. The
        # first pass needs none of its own: the caller's task has just started or waited
        # (for the tunnel's CONNECT answer), and the next pass waits or checkpoints. (A
        # client's first bytes are usually here already: a task step less per connection.)
        try:
            data = _try_recv(sock)
            scheduled = True
            while True:
                if data is None:
                    await trio.lowlevel.wait_readable(sock)
                    data = _try_recv(sock)
                    if data is None:
                        continue
                    scheduled = True
                if not data:
                    # (no checkpoint of its own: the pass before had a schedule point, and
                    # what follows waits, or ends the relay)
                    try:
                        await hstream.send_eof()
                    except _BROKEN:
                        pass  # the stream already ended: HBONE → TCP reports how
                    break
                # What follows, read now (the read the next pass would make anyway): the end
                # of the stream goes out with these bytes, in one write (e.g. a response and
                # the server's close), and an empty socket is waited for at once.
                after = _try_recv(sock)
                if await hstream._send(data, eof=after == b""):
                    scheduled = True
                if not scheduled:
                    await trio.lowlevel.checkpoint()
                if hbone_is_client:
                    counters.server_to_client += len(data)
                else:
                    counters.client_to_server += len(data)
                if after == b"":
                    break
                # not kept alive while idle (e.g. a whole response, for hours)
                data, after = after, None
                scheduled = False
        except _BROKEN as exc:
            st.fail(hstream, exc)
        # then HBONE → TCP to its end
        if st.failure is None:
            if st.task_done is not None:
                await st.task_done.wait()
            elif not hstream._recv_eof and hstream._evented:  # still open: this task takes it
                hstream._evented = False
                await _hbone_to_socket(hstream, st)
    except BaseException:
        # cancelled from outside (policy now denies, pod removed, shutdown): reset both
        hstream._sink = None
        hstream._evented = False
        await abort(hstream)
        await abort(sstream)
        await _join(st)
        raise
    hstream._sink = None
    hstream._evented = False
    if st.failure is not None:
        await abort(hstream)
        await abort(sstream)
        await _join(st)
        raise RelayError(str(st.failure) or type(st.failure).__name__) from st.failure
    # both directions ended: closing is synchronous (no schedule point, no shielded scope)
    sstream.socket.close()  # type: ignore[attr-defined]
    hstream._close_now()
    return counters


async def _relay_tasks(
    client: trio.abc.HalfCloseableStream,
    server: trio.abc.HalfCloseableStream,
    counters: Counters,
) -> Counters:
    """:func:`relay` for other pairs: one task per direction."""
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
