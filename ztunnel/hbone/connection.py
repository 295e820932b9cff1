"""The trio driver of one HBONE HTTP/2 connection, and its streams.

One reader task feeds :class:`~ztunnel.hbone.protocol.HboneH2`; one writer task writes to the
transport whenever a write could block. Every other task changes HTTP/2 state synchronously and
then waits (``_flush``) until the writer has written what was queued so far, unless the writer was
idle (one chunk per connection may be queued unwaited): that wait, and HTTP/2's flow control
windows, are the back-pressure. The writer sends what every stream queued in one scheduler
pass as one TLS write; on a quiet connection, a write made by the only task of its pass goes
out at once (``_kick``).
A stream can hand its received bytes to a sink (the relay) from the reader task, so that a
tunnel between HBONE and a TCP socket needs no task of its own for that direction. Received DATA
is acknowledged to the peer only when the consumer takes it from
:meth:`HboneStream.receive_some` (or, for the relay, when its sink took it). Over an established
``trio.SSLStream`` both tasks bypass the SSLStream (see :class:`_DirectTls`).
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterable, Sized
from typing import Any, Protocol

import trio

from ztunnel.sockets import send_all_nonblocking

from . import protocol as p
from .frames import ErrorCode as ErrorCodes
from .frames import H2Error
from .protocol import HboneError

log = logging.getLogger(__name__)

RECEIVE_CHUNK = 256 * 1024
CLOSE_FLUSH_TIMEOUT = 1.0
# send_all() of at most this much does not wait for an idle writer (see HboneStream.send_all)
UNWAITED_WRITE_MAX = 64 * 1024


TRANSPORT_READ = 256 * 1024
# A TLS record's most plaintext: pieces of frames smaller than this are gathered into records
_TLS_RECORD = 16384


class LargeReadStream(trio.abc.HalfCloseableStream):
    """A ``trio.SocketStream`` whose ``receive_some()`` without a size reads up to 256 KiB.

    Wrap the TCP stream under a ``trio.SSLStream`` with it: SSLStream refills from its transport
    with ``receive_some()`` and no size, which a SocketStream answers with at most 64 KiB; each
    refill is a full pass of the event loop, TLS and h2 machinery, so bulk transfer paid that
    four times as often. ``socket`` is the wrapped stream's socket.
    """

    def __init__(self, stream: trio.SocketStream, read_size: int = TRANSPORT_READ) -> None:
        self.stream = stream
        self.socket = stream.socket
        self.read_size = read_size

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return await self.stream.receive_some(max_bytes or self.read_size)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.stream.send_eof()

    async def aclose(self) -> None:
        await self.stream.aclose()

    def setsockopt(self, level: int, option: int, value: int | bytes) -> None:
        self.stream.setsockopt(level, option, value)

    def getsockopt(self, level: int, option: int, buffersize: int = 0) -> int | bytes:
        return self.stream.getsockopt(level, option, buffersize)


def _tls_drainer(transport: trio.abc.Stream) -> Callable[[bytes], bytes] | None:
    """For a ``trio.SSLStream``: a function that appends to a chunk just read every further
    record that is already buffered, without another trip through the event loop.

    ``SSLStream.receive_some`` returns at most one TLS record (16 KiB) per call, and each call
    costs a full pass of trio's retry machinery and of h2's frame parser: for bulk transfer
    that per-record cost was the bottleneck. Records that are still incomplete, and any error,
    are left for the next ``receive_some``, which handles them as usual. (Uses SSLStream's
    ``_ssl_object`` and ``_incoming``, checked for here: without them, no draining.)
    """
    if not isinstance(transport, trio.SSLStream):
        return None
    ssl_object = getattr(transport, "_ssl_object", None)
    incoming = getattr(transport, "_incoming", None)
    if not isinstance(ssl_object, ssl.SSLObject) or not isinstance(incoming, ssl.MemoryBIO):
        return None

    def drain(first: bytes) -> bytes:
        if not incoming.pending and not ssl_object.pending():
            return first
        parts = [first]
        total = len(first)
        while total < RECEIVE_CHUNK:
            try:
                chunk = ssl_object.read(RECEIVE_CHUNK - total)
            except ssl.SSLError:  # SSLWantReadError: a partial record; others resurface later
                break
            if not chunk:
                break
            parts.append(chunk)
            total += len(chunk)
        return b"".join(parts) if len(parts) > 1 else first

    return drain


class _LoopBatch(trio.abc.Instrument):
    """The event loop's passes (one per wait for I/O) and how many tasks the current one runs
    (its batch), for :meth:`HboneConnection._kick`.

    trio runs, each pass, the tasks that were runnable when its wait for I/O returned; tasks
    woken during the pass wait for the next one. The count is read from the run queue, which
    trio does not export (``current_statistics()`` would, but counts every registered socket
    on each call); when that private attribute is missing, the instrument is not installed
    and :attr:`size` stays high, so every write goes through the writer task as before.
    """

    __slots__ = ("size", "passes", "_runq")

    UNKNOWN = 1 << 30

    def __init__(self, runq: Sized) -> None:
        self.size = self.UNKNOWN
        self.passes = 0
        self._runq = runq

    def after_io_wait(self, timeout: float) -> None:
        self.passes += 1
        self.size = len(self._runq)


_LOOP_BATCH: trio.lowlevel.RunVar[_LoopBatch] = trio.lowlevel.RunVar("hbone_loop_batch")


def _loop_batch() -> _LoopBatch:
    """This trio run's batch counter, installed on first use."""
    try:
        return _LOOP_BATCH.get()
    except LookupError:
        pass
    try:
        runq = trio._core._run.GLOBAL_RUN_CONTEXT.runner.runq  # type: ignore[attr-defined]
        len(runq)
    except (AttributeError, TypeError):
        batch = _LoopBatch(())
    else:
        batch = _LoopBatch(runq)
        trio.lowlevel.add_instrument(batch)
    _LOOP_BATCH.set(batch)
    return batch


class _DirectTls:
    """Reads and writes an established ``trio.SSLStream`` through its ``SSLObject`` and the TCP
    socket underneath, with no task switch unless the socket would block.

    Each ``SSLStream`` operation takes a lock and passes ``_retry``, and each socket call under
    it, through a schedule point: ~3 task switches (and as many event-loop passes, each an
    ``epoll_wait``) per read and per write, on every hop of every request. Here a read waits
    for the socket only when nothing is buffered, and a write returns as soon as the kernel
    took the bytes. Built by :meth:`create` only when the SSLStream's internals are as
    expected (handshake done, memory BIOs, a trio socket below); otherwise the SSLStream is
    used as is.
    """

    __slots__ = ("_obj", "_in", "_out", "_sock", "_delayed", "_drained")

    def __init__(self, obj: ssl.SSLObject, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO,
                 sock: socket.socket) -> None:
        self._obj = obj
        self._in = incoming
        self._out = outgoing
        self._sock = sock
        self._delayed: bytes | memoryview = b""
        # The last recv was short: the socket had nothing more then, so the next read waits
        # at once instead of trying (a recv failing with EAGAIN, and its exception, per
        # message of a request/response exchange). A full read keeps reading ahead (bulk).
        self._drained = False

    @classmethod
    def create(cls, transport: trio.abc.Stream) -> _DirectTls | None:
        if not isinstance(transport, trio.SSLStream):
            return None
        obj = getattr(transport, "_ssl_object", None)
        incoming = getattr(transport, "_incoming", None)
        outgoing = getattr(transport, "_outgoing", None)
        once = getattr(transport, "_handshook", None)
        trio_sock = getattr(transport.transport_stream, "socket", None)
        sock = getattr(trio_sock, "_sock", None)
        if not (
            isinstance(obj, ssl.SSLObject)
            and isinstance(incoming, ssl.MemoryBIO)
            and isinstance(outgoing, ssl.MemoryBIO)
            and getattr(once, "done", False)
            and isinstance(sock, socket.socket)
        ):
            return None
        direct = cls(obj, incoming, outgoing, sock)
        # TLS 1.3 server: trio holds the session tickets back until the first write (see
        # trio issue 819); they go first in our first write.
        delayed = getattr(transport, "_delayed_outgoing", None)
        if isinstance(delayed, bytes):
            transport._delayed_outgoing = None  # type: ignore[attr-defined]
            direct._delayed = delayed
        elif delayed is not None:
            return None
        return direct

    @property
    def has_output(self) -> bool:
        """TLS wrote bytes of its own (a key update answer, session tickets) to be sent."""
        return bool(self._out.pending)

    async def receive(self) -> list[bytes]:
        """Plaintext, up to RECEIVE_CHUNK, as the TLS records it came in (not joined: the
        HTTP/2 parser takes them as they are and copies a frame once); [] at the end.
        Errors: OSError, ssl.SSLError."""
        obj, incoming, sock = self._obj, self._in, self._sock
        waited = False
        while True:
            parts: list[bytes] = []
            total = 0
            eof = False
            # Nothing in the BIO and nothing decrypted held back: TLS has nothing to give
            # (its SSLWantReadError costs more than this test).
            while total < RECEIVE_CHUNK and (incoming.pending or obj.pending()):
                try:
                    chunk = obj.read(RECEIVE_CHUNK - total)
                except ssl.SSLWantReadError:
                    break
                except ssl.SSLZeroReturnError:  # close_notify
                    eof = True
                    break
                if not chunk:
                    eof = True
                    break
                parts.append(chunk)
                total += len(chunk)
            if parts:
                if not waited:
                    await trio.lowlevel.checkpoint()  # one schedule point per read
                return parts
            if eof:
                await trio.lowlevel.checkpoint()
                return parts
            if self._drained:
                self._drained = False
                await trio.lowlevel.wait_readable(sock)
                waited = True
            try:
                data = sock.recv(TRANSPORT_READ)
            except (BlockingIOError, InterruptedError):
                await trio.lowlevel.wait_readable(sock)
                waited = True
                continue
            if not data:  # TCP FIN without close_notify: the peer is gone all the same
                if not waited:
                    await trio.lowlevel.checkpoint()
                return parts
            self._drained = len(data) < TRANSPORT_READ
            incoming.write(data)

    def _encrypt(self, parts: list[bytes]) -> bytes:
        """Encrypt the frames' pieces; the TLS records for them.

        Not joined first (a copy of every large DATA body): small pieces (frame headers, small
        frames) are gathered, and a large body's first record takes the pieces before it, so
        the records are those of the joined bytes, but for a short last one per large body."""
        write = self._obj.write
        small: list[bytes | memoryview] = []
        small_len = 0
        for part in parts:
            n = len(part)
            if n < _TLS_RECORD:
                small.append(part)
                small_len += n
                continue
            if small:
                k = _TLS_RECORD - small_len if small_len < _TLS_RECORD else 0
                view = memoryview(part)
                small.append(view[:k])
                write(b"".join(small))
                small = []
                small_len = 0
                if k < n:
                    write(view[k:])
            else:
                write(part)
        if small:
            write(small[0] if len(small) == 1 else b"".join(small))
        return self._out.read()

    def send_nowait(self, parts: list[bytes]) -> bool:
        """Encrypt the frames' pieces and send what the socket takes now; the rest is kept
        for the next :meth:`send` (it goes first). Says whether everything went. Errors:
        OSError, ssl.SSLError."""
        wire: bytes | memoryview = self._encrypt(parts)
        if self._delayed:  # (the writer sends what is held back before anything inline)
            wire, self._delayed = b"".join((self._delayed, wire)), b""
        if not wire:
            return True
        try:
            sent = self._sock.send(wire)
        except (BlockingIOError, InterruptedError):
            sent = 0
        if sent < len(wire):
            self._delayed = memoryview(wire)[sent:]  # a view: no copy of the rest
            return False
        return True

    async def send(self, parts: list[bytes]) -> None:
        """Encrypt and send the frames' pieces (and whatever TLS queued itself), after what
        was held back. Errors: OSError, ssl.SSLError. No schedule point unless the socket is
        full: the caller has one."""
        wire = self._encrypt(parts)
        if self._delayed:
            delayed, self._delayed = self._delayed, b""
            await send_all_nonblocking(self._sock, delayed)
        if wire:
            await send_all_nonblocking(self._sock, wire)


class StreamSink(Protocol):
    """A consumer of an :class:`HboneStream`'s received bytes that needs no task of its own
    while its destination takes bytes at once (the relay, towards a TCP socket)."""

    def data(self, data: bytes, last: bool = False) -> int:
        """Take what can be taken without blocking; return how many bytes were taken.
        ``last``: the end of the stream follows at once (the sink may send both together)."""
        ...

    def event(self, stream: HboneStream) -> None:
        """Evented stream, no task waiting: bytes are left over, the stream ended, was reset
        or its connection died. Look at the stream; must not block."""
        ...


class HboneStatusError(HboneError):
    """The server answered the CONNECT with a status other than 200."""

    def __init__(self, status: int) -> None:
        super().__init__(f"HBONE CONNECT answered {status}")
        self.status = status


class HboneConnectError(HboneError):
    """No HBONE connection could be made (TCP, TLS or identity failure)."""


class HboneStream(trio.abc.HalfCloseableStream):
    """One CONNECT tunnel. Byte stream semantics; see module docs for back-pressure."""

    # slots: one of these per open tunnel on each side (the trio.abc bases have empty slots)
    __slots__ = (
        "connection", "stream_id", "authority", "peer_identity", "status", "_recv",
        "_recv_off", "_recv_eof", "_send_eof", "_reset_code", "_reset_remote", "_conn_dead",
        "_closed", "_recv_busy", "_send_busy", "_waiter", "_sink", "_evented", "_unyielded",
        "__weakref__",
    )

    def __init__(
        self,
        conn: HboneConnection,
        stream_id: int,
        *,
        authority: str,
        peer_identity: str | None,
    ) -> None:
        self.connection = conn
        self.stream_id = stream_id
        self.authority = authority
        self.peer_identity = peer_identity
        self.status: int | None = None  # response status (client) / sent status (server)
        # a list, not a deque: a deque allocates a 64-slot block up front (~600 B per stream,
        # per idle connection); the list holds one or two chunks at a time, and is there
        # only while it does (None when empty: an idle stream keeps no empty list)
        self._recv: list[bytes] | None = None
        self._recv_off = 0  # consumed prefix of _recv[0]
        self._recv_eof = False
        self._send_eof = False
        self._reset_code: int | None = None
        self._reset_remote = False
        self._conn_dead = False
        self._closed = False
        self._recv_busy = False
        self._send_busy = False
        # the one task waiting on this stream (the reader, or the opener for the response):
        # a ParkingLot (an attrs object and an OrderedDict) per stream was ~0.6 KB per idle
        # connection per side, and slower to wake
        self._waiter: trio.lowlevel.Task | None = None
        # set by the relay: takes received bytes straight from the connection's reader while
        # the relay's task waits in receive_some() or, if _evented, while no task reads the
        # stream at all (see _on_data and StreamSink)
        self._sink: StreamSink | None = None
        self._evented = False
        self._unyielded = False  # the last send_all() had no schedule point

    def __repr__(self) -> str:
        return f"<HboneStream {self.stream_id} {self.authority}>"

    def _wake(self) -> None:
        task = self._waiter
        if task is not None:
            self._waiter = None
            trio.lowlevel.reschedule(task)

    async def _park(self) -> None:
        """Wait for ``_wake()`` (a schedule point; cancellable)."""
        if self._waiter is not None:
            raise trio.BusyResourceError("another task is waiting on this stream")
        task = trio.lowlevel.current_task()
        self._waiter = task

        def abort(_: object) -> trio.lowlevel.Abort:
            if self._waiter is task:
                self._waiter = None
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    # -- called by the connection -----------------------------------------------------------
    def _on_data(self, data: bytes, last: bool = False) -> None:
        sink = self._sink
        if sink is not None and not self._recv and (
            self._evented or (self._waiter is not None and self._recv_busy)
        ):
            # Nobody holds bytes of this stream that are not yet passed on: the consumer is
            # parked in receive_some() with nothing buffered, or there is no consumer task
            # (evented). The sink (the relay: a non-blocking send to its TCP socket) takes the
            # bytes here, which saves waking a task (a task switch per delivery); what it does
            # not take is buffered and the consumer told, as usual, so order is kept.
            n = sink.data(data, last)
            if n:
                self.connection._acknowledge(self.stream_id, n)
                if n == len(data):
                    return
                data = data[n:]
        if self._recv is None:
            self._recv = [data]
        else:
            self._recv.append(data)
        self._notify()

    def _notify(self) -> None:
        """Tell the consumer that the stream's state changed: wake its task, or, evented,
        call its sink (which may start a task or finish the direction)."""
        if self._waiter is not None:
            self._wake()
        elif self._evented and self._sink is not None:
            self._sink.event(self)

    def _on_eof(self) -> None:
        self._recv_eof = True
        self._notify()

    def _on_response(self, status: int) -> None:
        self.status = status
        self._wake()

    def _on_reset(self, code: int, *, remote: bool) -> None:
        if self._reset_code is None:
            self._reset_code = code
            self._reset_remote = remote
        self._discard_buffered()
        self._notify()
        self.connection._window_lot.unpark_all()  # a sender waiting for window must see it

    def _on_conn_dead(self) -> None:
        # Bytes already received stay readable; after them the stream reports the loss.
        self._conn_dead = True
        self._notify()

    def _discard_buffered(self) -> None:
        """Give unread bytes back to the connection window: nobody will read them."""
        n = self.buffered
        self._recv = None
        self._recv_off = 0
        if n and not self._conn_dead:
            self.connection._acknowledge(self.stream_id, n)

    @property
    def finished(self) -> bool:
        """Both directions ended, or reset, or the connection died."""
        return (self._send_eof and self._recv_eof) or self._reset_code is not None or (
            self._conn_dead
        )

    def _abort(self, code: int = ErrorCodes.CANCEL) -> None:
        """Reset unless finished; synchronous so it also works while being cancelled."""
        if not self.finished:
            self.connection._reset(self.stream_id, code)
            self._on_reset(code, remote=False)
        self.connection._forget(self)

    # -- response (client) ------------------------------------------------------------------
    async def _wait_response(self) -> int:
        while self.status is None:
            if self._reset_code is not None:
                raise HboneError(f"stream reset before response (code {self._reset_code})")
            if self._conn_dead:
                raise HboneError(f"connection lost before response: {self.connection.dead_reason}")
            await self._park()
        return self.status

    # -- receiving --------------------------------------------------------------------------
    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if max_bytes is not None and max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        if self._recv_busy:
            raise trio.BusyResourceError("another task is receiving on this stream")
        self._recv_busy = True
        try:
            # A checkpoint, but one task switch only: parking is the schedule point when no
            # data is there yet (a checkpoint *and* a park was two switches per read).
            await trio.lowlevel.checkpoint_if_cancelled()
            scheduled = False
            while True:
                if self._closed:
                    raise trio.ClosedResourceError("stream was closed")
                if self._recv:
                    if not scheduled:
                        await trio.lowlevel.cancel_shielded_checkpoint()
                        scheduled = True
                        continue  # state may have changed meanwhile
                    return self._take(max_bytes)
                if self._reset_code is not None:
                    who = "peer" if self._reset_remote else "us"
                    raise trio.BrokenResourceError(
                        f"HBONE stream reset by {who} (code {self._reset_code})")
                if self._recv_eof:
                    return b""
                if self._conn_dead:
                    raise trio.BrokenResourceError(
                        f"HBONE connection lost: {self.connection.dead_reason}")
                await self._park()
                scheduled = True
        finally:
            self._recv_busy = False

    def _take(self, max_bytes: int | None) -> bytes:
        recv = self._recv
        assert recv
        head = recv[0]
        off = self._recv_off
        avail = len(head) - off
        n = avail if max_bytes is None else min(avail, max_bytes)
        if n == avail:
            if len(recv) == 1:
                self._recv = None
            else:
                del recv[0]
            self._recv_off = 0
            out = head if off == 0 else head[off:]
        else:
            out = head[off : off + n]
            self._recv_off = off + n
        # The consumer took it: only now may the peer send more (back-pressure).
        self.connection._acknowledge(self.stream_id, n)
        return out

    def _feed_sink(self) -> None:
        """Pass buffered bytes to the sink as far as it takes them (a relay that starts after
        bytes arrived)."""
        sink = self._sink
        while sink is not None and self._recv:
            off = self._recv_off
            head = self._recv[0]
            n = sink.data(head if off == 0 else head[off:])
            if n == 0:
                return
            self._take(n)

    @property
    def buffered(self) -> int:
        """Bytes received but not yet taken by the consumer."""
        recv = self._recv
        return sum(len(c) for c in recv) - self._recv_off if recv else 0

    # -- sending ----------------------------------------------------------------------------
    def _check_send(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("stream was closed")
        if self._send_eof:
            raise trio.ClosedResourceError("send_eof() was called")
        if self._reset_code is not None:
            raise trio.BrokenResourceError(f"HBONE stream reset (code {self._reset_code})")
        if self._conn_dead:
            raise trio.BrokenResourceError(
                f"HBONE connection lost: {self.connection.dead_reason}")

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if await self._send(data):
            self._unyielded = False
        elif self._unyielded:
            # a sender in a tight loop yields at least every second call, although the
            # bytes go out at once (no writer to wait for)
            self._unyielded = False
            await trio.lowlevel.cancel_shielded_checkpoint()
        else:
            self._unyielded = True

    async def _send(self, data: bytes | bytearray | memoryview, eof: bool = False) -> bool:
        """:meth:`send_all`, but without a schedule point of its own when nothing had to
        wait; says whether it waited. (For the relay: its read was the schedule point.)
        ``eof``: then :meth:`send_eof`, in the same write (END_STREAM with the last DATA)."""
        if self._send_busy:
            raise trio.BusyResourceError("another task is sending on this stream")
        self._send_busy = True
        conn = self.connection
        waited = False
        try:
            view = memoryview(data).cast("B")
            off = 0
            self._check_send()
            if not view:
                return False
            # Cancellation is checked before anything is queued: once queued, it is sent.
            await trio.lowlevel.checkpoint_if_cancelled()
            while off < len(view):
                self._check_send()
                # a small write, and the writer has nothing to do or little that nobody waits
                # for: it need not be waited for either
                size = len(view)
                idle = size <= UNWAITED_WRITE_MAX and (
                    conn._written_seq == conn._pending_seq
                    or conn._unwaited + size <= UNWAITED_WRITE_MAX)
                try:
                    n = conn._proto.send_data(self.stream_id, view[off:])
                except H2Error as e:
                    raise trio.BrokenResourceError(f"HBONE stream not writable: {e}") from e
                if n == 0:
                    await conn._window_lot.park()  # WINDOW_UPDATE / SETTINGS wake us
                    waited = True
                    continue
                off += n
                if eof and off == len(view):
                    self._send_eof = True
                    try:
                        conn._proto.end_stream(self.stream_id)
                    except H2Error as e:
                        raise trio.BrokenResourceError(f"HBONE stream not writable: {e}") from e
                    if self.finished:
                        conn._forget(self)
                if idle and off == len(view):
                    # _kick() sends this or wakes the writer to; we need not wait for it (a
                    # task switch less per write). Back-pressure is kept: at most
                    # UNWAITED_WRITE_MAX bytes wait for the writer's next take unwaited for
                    # (the many streams of a busy connection, each writing a little in the
                    # same pass, no longer each wait for the writer's turn); beyond that,
                    # writers wait. (Large writes wait: two 256 KiB relay chunks in one batch
                    # made the writer's buffers big enough to be mmap'ed afresh, and their
                    # page faults cost more than the switch.) A failed write kills the
                    # connection; the stream's next operation reports it.
                    conn._unwaited += size
                    conn._kick()
                    break
                if await conn._flush():
                    waited = True
            conn.last_used = trio.current_time()
            return waited
        finally:
            self._send_busy = False

    async def wait_send_all_might_not_block(self) -> None:
        conn = self.connection
        while True:
            self._check_send()
            if conn._proto.send_window(self.stream_id) > 0:
                await trio.lowlevel.checkpoint()
                return
            await conn._window_lot.park()

    async def send_eof(self) -> None:
        if self._send_busy:
            raise trio.BusyResourceError("another task is sending on this stream")
        if self._send_eof and not self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._check_send()
        self._send_busy = True
        try:
            self._send_eof = True
            try:
                self.connection._proto.end_stream(self.stream_id)
            except H2Error as e:
                raise trio.BrokenResourceError(f"HBONE stream not writable: {e}") from e
            if self.finished:
                self.connection._forget(self)
            # Queued behind everything sent before it; a failed write breaks the connection
            # and the next operation reports it. Not waiting for the writer saves a switch.
            self.connection._kick()
            await trio.lowlevel.checkpoint_if_cancelled()
        finally:
            self._send_busy = False

    async def aclose(self) -> None:
        """Close; resets the stream (RST_STREAM CANCEL) unless both directions ended."""
        self._close_now()
        # No schedule point: closing is synchronous, and a close is never called in a loop
        # that could starve other tasks (a task switch less per stream).
        await trio.lowlevel.checkpoint_if_cancelled()

    def _close_now(self) -> None:
        """:meth:`aclose`, synchronously."""
        if not self._closed:
            self._closed = True
            self._abort(ErrorCodes.CANCEL)
            self._discard_buffered()
            self._wake()
            conn = self.connection
            conn._window_lot.unpark_all()
            if conn._proto.has_output():  # an RST_STREAM, or nothing at all
                conn._kick()


class HboneConnection:
    """One HBONE HTTP/2 connection over a connected trio stream (TLS in production).

    The owner runs :meth:`run` in a nursery. Client side: :meth:`open_stream`. Server side:
    ``on_request(stream, request)`` is called (synchronously, from the reader task) for every
    valid CONNECT; it must not block — start a task and answer through the stream's connection.
    """

    def __init__(
        self,
        transport: trio.abc.Stream,
        *,
        client_side: bool,
        on_request: Callable[[HboneStream, p.ConnectRequest], None] | None = None,
        peer_identity: str | None = None,
        peer_address: tuple[str, int] | None = None,
        ping_interval: float = p.PING_INTERVAL,
        ping_timeout: float = p.PING_TIMEOUT,
    ) -> None:
        self.transport = transport
        self.client_side = client_side
        self.peer_identity = peer_identity
        self.peer_address = peer_address
        self._on_request = on_request
        self._proto = p.HboneH2(client_side=client_side)
        self._streams: dict[int, HboneStream] = {}
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._ping_payload: bytes | None = None
        self._ping_sent_at: float | None = None
        self._pending_seq = 0
        self._written_seq = 0
        self._unwaited = 0  # bytes queued by writers that did not wait, not yet taken
        self._dispatching = False  # the reader is dispatching events: it kicks afterwards
        self._writer_lot = trio.lowlevel.ParkingLot()
        # _flush() waiters park in _written_lot; the writer swaps in _spare_lot when it takes
        # a batch, so only the waiters of that batch are woken when it is written (one lot
        # for all woke every waiter after every write: ~3x the task switches per stream)
        self._written_lot = trio.lowlevel.ParkingLot()
        self._spare_lot = trio.lowlevel.ParkingLot()
        self._window_lot = trio.lowlevel.ParkingLot()
        self._streams_lot = trio.lowlevel.ParkingLot()
        self._started = False
        self._direct: _DirectTls | None = None  # set in run(): the handshake is done by then
        self._batch = _loop_batch()
        self._kicked_in = -2  # the event-loop pass of the last _kick()
        self._run_scope: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None
        self._done = trio.Event()
        self.dead_reason: str | None = None
        self.created_at = trio.current_time()
        self.last_used = self.created_at

    def __repr__(self) -> str:
        side = "client" if self.client_side else "server"
        return f"<HboneConnection {side} peer={self.peer_identity} streams={self.open_streams}>"

    # -- state for the pool -------------------------------------------------------------------
    @property
    def open_streams(self) -> int:
        return len(self._streams)

    @property
    def max_concurrent_streams(self) -> int:
        """The peer's MAX_CONCURRENT_STREAMS (unbounded until its SETTINGS arrive)."""
        return self._proto.peer_max_concurrent_streams

    @property
    def is_usable(self) -> bool:
        """Running, not closed, and no GOAWAY either way."""
        return (
            self._started
            and self.dead_reason is None
            and not self._proto.goaway_received
            and not self._proto.goaway_sent
        )

    @property
    def closed(self) -> bool:
        return self.dead_reason is not None

    # -- writer ---------------------------------------------------------------------------------
    def _kick(self) -> None:
        """Send whatever HTTP/2 has queued: now, from the calling task, when this connection is
        quiet; else through the writer task.

        The writer batches the frames of every stream that wrote in the same scheduler pass
        into one TLS write, which is what makes many concurrent streams cheap. But it costs a
        task switch and an event-loop pass per write, which at one connection is a good part
        of a hop's latency. So the frames go out inline when the caller is the only task of
        this event-loop pass (nothing could join them now) and this connection wrote nothing
        in the pass before (under load the writer, which runs in the next pass, gathers the
        frames of the tasks of that pass too); what the socket does not take now, the writer
        sends. (Writing inline whenever the writer was idle cost ≈ 40 % more CPU per request
        at 32 concurrent connections: their writes no longer shared a syscall and a TLS
        record; inline on the first condition alone, ≈ 15 %.) While the reader dispatches
        events, kicks are left to the reader, which kicks once after the batch."""
        if self._dispatching:
            return
        batch = self._batch
        last, self._kicked_in = self._kicked_in, batch.passes
        direct = self._direct
        if (batch.size <= 1 and batch.passes - last > 1 and direct is not None
                and self._written_seq == self._pending_seq and self.dead_reason is None):
            self._unwaited = 0
            try:
                if direct.send_nowait(self._proto.take_output()):
                    return
            except (OSError, ssl.SSLError) as e:
                self._die(f"write failed: {e!r}")
                return
        self._pending_seq += 1
        self._writer_lot.unpark_all()

    async def _flush(self) -> bool:
        """Wait until everything queued so far has been handed to the transport; says whether
        it had to wait."""
        self._kick()
        seq = self._pending_seq
        waited = False
        while self._written_seq < seq:
            if self.dead_reason is not None:
                raise trio.BrokenResourceError(f"HBONE connection lost: {self.dead_reason}")
            await self._written_lot.park()
            waited = True
        if self.dead_reason is not None and not waited:
            raise trio.BrokenResourceError(f"HBONE connection lost: {self.dead_reason}")
        return waited

    async def _writer_loop(self) -> None:
        while True:
            if self._written_seq == self._pending_seq:
                await self._writer_lot.park()
                continue
            seq = self._pending_seq
            batch_lot, self._written_lot = self._written_lot, self._spare_lot
            try:
                parts = self._proto.take_output()
                self._unwaited = 0
                direct = self._direct
                if direct is not None:
                    try:
                        await direct.send(parts)
                    except (OSError, ssl.SSLError) as e:
                        self._die(f"write failed: {e!r}")
                        return
                elif parts:
                    try:
                        await self.transport.send_all(b"".join(parts))
                    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
                        self._die(f"write failed: {e!r}")
                        return
                self._written_seq = seq
            finally:
                # woken on every exit: written, or dead (they see dead_reason), or cancelled
                self._spare_lot = batch_lot
                batch_lot.unpark_all()

    def _acknowledge(self, stream_id: int, n: int) -> None:
        if self.dead_reason is None:
            self._proto.acknowledge(stream_id, n)
            if self._proto.has_output():  # a WINDOW_UPDATE only every half window
                self._kick()

    def _reset(self, stream_id: int, code: int) -> None:
        if self.dead_reason is None and self._proto.reset(stream_id, code):
            self._kick()

    def _forget(self, stream: HboneStream) -> None:
        if self._streams.get(stream.stream_id) is stream:
            del self._streams[stream.stream_id]
            self.last_used = trio.current_time()
            self._streams_lot.unpark_all()

    # -- lifecycle ------------------------------------------------------------------------------
    def _die(self, reason: str) -> None:
        if self.dead_reason is not None:
            return
        self.dead_reason = reason
        log.debug("HBONE connection %r ends: %s", self, reason)
        for stream in list(self._streams.values()):
            stream._on_conn_dead()
        self._streams.clear()
        for lot in (self._window_lot, self._written_lot, self._spare_lot, self._writer_lot,
                    self._streams_lot):
            lot.unpark_all()
        if self._run_scope is not None:
            self._run_scope.cancel()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Drive the connection (reader, writer, PING keepalive) until it ends; closes the
        transport on the way out."""
        if self._started:
            raise RuntimeError("HboneConnection.run() called twice")
        self._started = True
        try:
            self._direct = _DirectTls.create(self.transport)
            self._proto.initiate()
            async with trio.open_nursery() as nursery:
                self._run_scope = nursery.cancel_scope
                self._nursery = nursery
                if self.dead_reason is not None:  # aclose() before run()
                    nursery.cancel_scope.cancel()
                nursery.start_soon(self._writer_loop)
                nursery.start_soon(self._keepalive)
                self._kick()
                task_status.started()
                reason = await self._reader_loop()
                # Let the writer send a final GOAWAY, briefly.
                with trio.move_on_after(CLOSE_FLUSH_TIMEOUT):
                    try:
                        await self._flush()
                    except trio.BrokenResourceError:
                        pass
                self._die(reason)
        finally:
            self._nursery = None
            self._die("connection closed")
            await trio.aclose_forcefully(self.transport)
            self._done.set()

    async def _reader_loop(self) -> str:
        direct = self._direct
        drain = _tls_drainer(self.transport) if direct is None else None
        while True:
            try:
                if direct is not None:
                    data = await direct.receive()
                    if direct.has_output:  # TLS answered something itself: send it
                        self._kick()
                else:
                    data = await self.transport.receive_some(RECEIVE_CHUNK)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError,
                    ssl.SSLError) as e:
                return f"read failed: {e!r}"
            if drain is not None and data:
                data = drain(data)
            if not data:
                return "peer closed the connection"
            try:
                events = self._proto.receive(data)
            except p.HboneProtocolError as e:
                log.warning("HBONE peer %s (%s) broke HTTP/2, closing: %s",
                            self.peer_identity, self.peer_address, e)
                return str(e)
            self._dispatching = True
            try:
                self._dispatch(events)
            finally:
                self._dispatching = False
            if self._proto.has_output():
                self._kick()
            if self.dead_reason is not None:
                return self.dead_reason

    def _dispatch(self, events: list[p.Event]) -> None:
        streams = self._streams
        last_i = len(events) - 1
        for i, ev in enumerate(events):
            if isinstance(ev, p.DataReceived):
                stream = streams.get(ev.stream_id)
                if stream is None or stream._closed:
                    self._proto.acknowledge(ev.stream_id, len(ev.data))
                else:
                    # the stream's end right behind its bytes (END_STREAM on this frame): a
                    # relay sends both in one TCP segment, so its client sees the close with
                    # the last bytes, as it would from the server itself
                    nxt = events[i + 1] if i < last_i else None
                    stream._on_data(ev.data, type(nxt) is p.EndOfStream
                                    and nxt.stream_id == ev.stream_id)
            elif isinstance(ev, p.WindowChanged):
                self._window_lot.unpark_all()
            elif isinstance(ev, p.EndOfStream):
                stream = streams.get(ev.stream_id)
                if stream is not None:
                    stream._on_eof()
                    if stream.finished:
                        self._forget(stream)
            elif isinstance(ev, p.StreamReset):
                stream = streams.get(ev.stream_id)
                if stream is not None:
                    stream._on_reset(ev.error_code, remote=ev.remote)
                    self._forget(stream)
            elif isinstance(ev, p.ResponseReceived):
                stream = streams.get(ev.stream_id)
                if stream is None:
                    self._proto.reset(ev.stream_id, ErrorCodes.CANCEL)
                else:
                    stream._on_response(ev.status)
            elif isinstance(ev, p.ConnectRequested):
                self._on_connect(ev)
            elif isinstance(ev, p.RequestRefused):
                log.info("HBONE request from %s refused with %s: %s",
                         self.peer_identity, ev.status, ev.reason)
            elif isinstance(ev, p.PingAcked):
                if ev.data == self._ping_payload:
                    self._ping_payload = self._ping_sent_at = None
            elif isinstance(ev, p.GoAway):
                self._on_goaway(ev)

    def _on_connect(self, ev: p.ConnectRequested) -> None:
        if self._on_request is None:
            self._proto.reset(ev.stream_id, ErrorCodes.REFUSED_STREAM)
            return
        stream = HboneStream(self, ev.stream_id, authority=ev.request.authority,
                             peer_identity=self.peer_identity)
        self._streams[ev.stream_id] = stream
        self.last_used = trio.current_time()
        try:
            self._on_request(stream, ev.request)
        except Exception:
            log.exception("HBONE request callback failed")
            stream._abort(ErrorCodes.INTERNAL_ERROR)

    def _on_goaway(self, ev: p.GoAway) -> None:
        log.debug("HBONE GOAWAY from %s: code %s last stream %s",
                  self.peer_identity, ev.error_code, ev.last_stream_id)
        if ev.error_code != ErrorCodes.NO_ERROR:
            self._die(f"GOAWAY with error code {ev.error_code}")
            return
        # Streams we opened above last_stream_id were never seen by the peer.
        for sid, stream in list(self._streams.items()):
            if self.client_side == bool(sid % 2) and sid > ev.last_stream_id:
                stream._on_reset(ErrorCodes.REFUSED_STREAM, remote=True)
                self._forget(stream)
        self._window_lot.unpark_all()

    async def _keepalive(self) -> None:
        while True:
            await trio.sleep(self._ping_interval)
            now = trio.current_time()
            if self._ping_sent_at is not None:
                if now - self._ping_sent_at >= self._ping_timeout:
                    log.warning("HBONE peer %s did not answer PING for %.0f s, closing",
                                self.peer_identity, now - self._ping_sent_at)
                    self._die("PING timeout")
                    return
                continue
            self._ping_payload = self._proto.ping()
            self._ping_sent_at = now
            self._kick()

    def start_soon(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> bool:
        """Run ``fn(*args)`` as a task of this connection (cancelled when it ends); False if
        the connection no longer runs. For work a stream's sink needs only now and then (the
        relay's wait for a full TCP socket): no nursery per stream for it."""
        nursery = self._nursery
        if nursery is None or self.dead_reason is not None:
            return False
        try:
            nursery.start_soon(fn, *args)
        except RuntimeError:  # the nursery is closing
            return False
        return True

    # -- public actions -------------------------------------------------------------------------
    async def open_stream(
        self, authority: str, headers: Iterable[tuple[str, str]] = ()
    ) -> HboneStream:
        """Client: send a CONNECT and wait for the answer. 200 → the stream; other status →
        :class:`HboneStatusError`; reset, GOAWAY or connection loss → :class:`HboneError`."""
        if not self.client_side:
            raise RuntimeError("open_stream() on a server-side HBONE connection")
        if not self.is_usable:
            raise HboneError(f"HBONE connection not usable ({self.dead_reason or 'GOAWAY'})")
        if self.open_streams >= self.max_concurrent_streams:
            raise HboneError("HBONE connection has no free stream")
        try:
            sid = self._proto.open_request(authority, list(headers))
        except (H2Error, ValueError, UnicodeError) as e:
            raise HboneError(f"cannot send CONNECT {authority!r}: {e}") from e
        stream = HboneStream(self, sid, authority=authority, peer_identity=self.peer_identity)
        self._streams[sid] = stream
        self.last_used = trio.current_time()
        ok = False
        try:
            # No wait for the writer: the wait for the response covers it (a failed write
            # kills the connection, which wakes us with an error); one task switch less.
            self._kick()
            status = await stream._wait_response()
            if status != 200:
                raise HboneStatusError(status)
            ok = True
            return stream
        finally:
            if not ok:
                stream._abort(ErrorCodes.CANCEL)

    async def respond(self, stream: HboneStream, status: int) -> None:
        """Server: answer a CONNECT; non-200 also ends the stream."""
        if stream.status is not None:
            raise RuntimeError("HBONE request already answered")
        if stream._reset_code is not None or stream._conn_dead:
            raise trio.BrokenResourceError("HBONE stream gone before the answer")
        stream.status = status
        end = status != 200
        try:
            self._proto.respond(stream.stream_id, status, end_stream=end)
        except H2Error as e:
            raise trio.BrokenResourceError(f"cannot answer HBONE request: {e}") from e
        if end:
            stream._send_eof = True
            if stream.finished:
                self._forget(stream)
            await self._flush()
        else:
            # 200: the relay that follows reports a failed write; not waiting for the writer
            # here saves a task switch per tunnel.
            self._kick()
            await trio.lowlevel.checkpoint_if_cancelled()

    async def drain(self) -> None:
        """Send GOAWAY (NO_ERROR), let open streams finish, then close. Bound it with a
        cancel scope; cancellation closes at once."""
        try:
            if self.dead_reason is None:
                self._proto.goaway(ErrorCodes.NO_ERROR)
                try:
                    await self._flush()
                except trio.BrokenResourceError:
                    pass
            while self._streams and self.dead_reason is None:
                await self._streams_lot.park()
        finally:
            with trio.CancelScope(shield=True):
                await self.aclose()

    async def aclose(self) -> None:
        """Send GOAWAY and close the transport; open streams break."""
        if self.dead_reason is None and self._started:
            self._proto.goaway(ErrorCodes.NO_ERROR)
            with trio.move_on_after(CLOSE_FLUSH_TIMEOUT):
                try:
                    await self._flush()
                except trio.BrokenResourceError:
                    pass
        self._die("closed locally")
        if self._started:
            await self._done.wait()
        else:
            await trio.aclose_forcefully(self.transport)
