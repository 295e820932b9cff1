"""HTTP/2 over a trio stream (h2): the gateway's server side and its upstream client side.

One :class:`H2Connection` drives one h2 state machine: a reader task feeds bytes to h2 and
dispatches events to :class:`H2Stream` objects; one writer task is the only caller of
``send_all`` (trio allows one sender). Other tasks change h2 state synchronously and then wait
until the writer has written what was queued (:meth:`H2Connection._flush`).

Flow control is back-pressure: received DATA is acknowledged to the peer only when the
consumer takes it (:meth:`H2Stream.receive_data`), and senders wait for window.

Server-side protections: the advertised ``MAX_CONCURRENT_STREAMS`` (h2 enforces it) plus a cap
on handler tasks still running for streams h2 already considers closed; a count of the
client's RST_STREAMs per time window, past which the connection is closed with GOAWAY
ENHANCE_YOUR_CALM (the "rapid reset" attack, CVE-2023-44487). Protocol errors are answered
by h2 with a GOAWAY carrying the right error code, then the connection is closed.
"""

from __future__ import annotations

import logging
import re
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import hpack
import trio
from h2.errors import ErrorCodes

from ztunnel.hbone.protocol import install_data_repr_workaround

log = logging.getLogger(__name__)

install_data_repr_workaround()

RECEIVE_CHUNK = 64 * 1024
# a sender that does not wait for each write (``wait=False``) still waits once this much
# is queued and not yet written: back-pressure from a slow transport
UNWRITTEN_LIMIT = 256 * 1024
CLOSE_FLUSH_TIMEOUT = 1.0

Headers = list[tuple[str, str]]


@dataclass
class H2Config:
    max_concurrent_streams: int = 100
    stream_window: int = 1024 * 1024
    connection_window: int = 4 * 1024 * 1024
    max_header_list_size: int = 64 * 1024
    # rapid reset: more than ``max_resets`` client RST_STREAMs within ``reset_window`` s
    max_resets: int = 200
    reset_window: float = 10.0


class StreamError(Exception):
    """The stream was reset (``code``) or its connection died."""

    def __init__(self, message: str, code: int | None = None, *, refused: bool = False) -> None:
        super().__init__(message)
        self.code = code
        # the peer provably did not process it (REFUSED_STREAM, above GOAWAY's last id)
        self.refused = refused


def _text(v: bytes | str) -> str:
    return v.decode("latin-1") if isinstance(v, bytes | bytearray) else v


def _decode(headers: list[tuple[bytes, bytes]]) -> Headers:
    return [(_text(n), _text(v)) for n, v in headers]


_BAD_NAME = re.compile(r"[^!#$%&'*+\-.^_`|~0-9a-z]")
_BAD_VALUE = re.compile(r"[\x00\r\n]")
_CONNECTION_SPECIFIC = frozenset({
    "connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"})


def _encode(headers: Headers) -> list[tuple[bytes, bytes]]:
    """Headers as we send them, checked here (RFC 9113 §8.2): h2's own outbound validation
    and normalisation are off, they cost more than the rest of sending a response."""
    out = []
    for n, v in headers:
        n = n.lower()
        v = v.strip(" \t")
        bare = n[1:] if n[:1] == ":" else n
        if not bare or _BAD_NAME.search(bare):
            raise ValueError(f"invalid header name {n!r}")
        if _BAD_VALUE.search(v):
            raise ValueError(f"invalid value for header {n!r}")
        if bare in _CONNECTION_SPECIFIC or (bare == "te" and v.lower() != "trailers"):
            raise ValueError(f"connection-specific header {n!r}")
        out.append((n.encode("latin-1"), v.encode("latin-1")))
    return out


class _PlainEncoder(hpack.Encoder):
    """HPACK without Huffman coding: hpack's coder (and h2's decoder) is pure Python, per
    character; any decoder accepts plain literals (RFC 7541 §5.2)."""

    def encode(self, headers, huffman: bool = False) -> bytes:  # type: ignore[no-untyped-def,override]
        return super().encode(headers, huffman=False)


class H2Stream:
    """One HTTP/2 stream: headers, body and trailers in, and the same out."""

    def __init__(self, conn: H2Connection, stream_id: int) -> None:
        self.conn = conn
        self.id = stream_id
        self.headers: Headers | None = None  # request (server) / final response (client)
        self.trailers: Headers | None = None
        self.ended = False  # the peer's END_STREAM was received
        self.reset_code: int | None = None
        self.refused = False
        self.sent_end = False
        self._data: deque[tuple[bytes, int]] = deque()
        self._lot = trio.lowlevel.ParkingLot()
        self.cancel_scope = trio.CancelScope()  # the server handler's

    def __repr__(self) -> str:
        return f"<H2Stream {self.id}>"

    # -- from the connection -------------------------------------------------------------
    def _wake(self) -> None:
        self._lot.unpark_all()

    def _on_reset(self, code: int, refused: bool = False) -> None:
        if self.reset_code is None:
            self.reset_code = code
            self.refused = refused or code == ErrorCodes.REFUSED_STREAM
        if self.ended:
            # the peer's message was complete before the reset (a server that answered
            # before reading the whole request resets it with NO_ERROR, RFC 9113 §8.1, as
            # gRPC servers do): what was received stays readable, only sending stops
            self._wake()
            return
        for _, flow in self._data:
            self.conn._ack(self.id, flow)
        self._data.clear()
        self._wake()

    @property
    def closed(self) -> bool:
        return self.reset_code is not None or (self.ended and self.sent_end)

    def _check(self) -> None:
        if self.reset_code is not None:
            raise StreamError(
                f"stream {self.id} reset (code {self.reset_code})", self.reset_code,
                refused=self.refused)
        if self.conn.dead_reason is not None:
            raise StreamError(f"connection lost: {self.conn.dead_reason}")

    # -- receiving -----------------------------------------------------------------------
    async def receive_headers(self) -> Headers:
        """Client: wait for the final (non-1xx) response headers."""
        while self.headers is None:
            self._check()
            await self._lot.park()
        return self.headers

    async def receive_data(self) -> bytes:
        """The next body chunk; ``b""`` at the end (then :attr:`trailers` is set, if any)."""
        while True:
            data = self.receive_data_nowait()
            if data is not None:
                return data
            self._check()
            await self._lot.park()

    def receive_data_nowait(self) -> bytes | None:
        """As :meth:`receive_data` when that would not wait; else None."""
        if self._data:
            data, flow = self._data.popleft()
            self.conn._ack(self.id, flow)  # only now may the peer send more
            return data
        if self.ended:
            return b""
        return None

    # -- sending -------------------------------------------------------------------------
    async def send_headers(self, headers: Headers, end_stream: bool = False, *,
                           wait: bool = True) -> None:
        """Queue HEADERS; ``wait``: until written (else the writer is only woken)."""
        self._check()
        try:
            self.conn._h2.send_headers(self.id, _encode(headers), end_stream=end_stream)
        except (h2.exceptions.ProtocolError, ValueError) as e:
            raise StreamError(f"cannot send headers: {e}") from e
        if end_stream:
            self.sent_end = True
        await self.conn._flush(wait)

    async def send_data(self, data: bytes, end_stream: bool = False, *,
                        wait: bool = True) -> None:
        """Queue DATA as the windows allow; ``wait``: until written (else only when more
        than :data:`UNWRITTEN_LIMIT` is queued)."""
        conn = self.conn
        view = memoryview(data)
        while True:
            self._check()
            if not view:
                if end_stream:
                    try:
                        conn._h2.end_stream(self.id)
                    except h2.exceptions.ProtocolError as e:
                        raise StreamError(f"cannot end stream: {e}") from e
                    self.sent_end = True
                    await conn._flush(wait)
                return
            try:
                window = conn._h2.local_flow_control_window(self.id)
            except h2.exceptions.ProtocolError as e:
                raise StreamError(f"stream not writable: {e}") from e
            n = min(window, conn._h2.max_outbound_frame_size, len(view))
            if n <= 0:
                await conn._window_lot.park()
                continue
            last = end_stream and n == len(view)
            try:
                conn._h2.send_data(self.id, view[:n].tobytes(), end_stream=last)
            except h2.exceptions.ProtocolError as e:
                raise StreamError(f"stream not writable: {e}") from e
            view = view[n:]
            conn._unwritten += n
            if last:
                self.sent_end = True
            await conn._flush(wait or conn._unwritten > UNWRITTEN_LIMIT)
            if last:
                return

    async def end(self, trailers: Headers | None = None, *, wait: bool = True) -> None:
        """End our side, with trailers if given."""
        if trailers:
            await self.send_headers(trailers, end_stream=True, wait=wait)
        else:
            await self.send_data(b"", end_stream=True, wait=wait)

    def reset(self, code: int = ErrorCodes.CANCEL) -> None:
        """Reset unless already closed; synchronous, safe while being cancelled."""
        if self.closed or self.conn.dead_reason is not None:
            self.conn._forget(self)
            return
        try:
            self.conn._h2.reset_stream(self.id, code)
        except h2.exceptions.ProtocolError:
            pass
        self._on_reset(code)
        self.conn._forget(self)
        self.conn._kick()


RequestHandler = Callable[[H2Stream], None]


class H2Connection:
    """One HTTP/2 connection over ``transport``; :meth:`run` drives it until it ends.

    Server side: ``on_request(stream)`` is called synchronously (from the reader task) when a
    request's headers arrive; it must start a task (and run it in ``stream.cancel_scope``).
    """

    def __init__(
        self,
        transport: trio.abc.Stream,
        *,
        client_side: bool,
        config: H2Config | None = None,
        on_request: RequestHandler | None = None,
        prefix: bytes = b"",
        name: str = "",
    ) -> None:
        self.transport = transport
        self.client_side = client_side
        self.config = config or H2Config()
        self.on_request = on_request
        self.name = name
        self._prefix = prefix
        cfg = h2.config.H2Configuration(
            client_side=client_side, header_encoding=None, validate_inbound_headers=True,
            normalize_inbound_headers=True, validate_outbound_headers=False,
            normalize_outbound_headers=False,  # done in _encode
        )
        self._h2 = h2.connection.H2Connection(config=cfg)
        self._h2.encoder = _PlainEncoder()
        self.streams: dict[int, H2Stream] = {}
        self.handlers = 0  # server: handler tasks still running
        self._resets: deque[float] = deque()
        self._pending_seq = 0
        self._written_seq = 0
        self._unwritten = 0  # DATA bytes queued since the writer last took its batch
        self._writer_lot = trio.lowlevel.ParkingLot()
        self._written_lot = trio.lowlevel.ParkingLot()
        self._window_lot = trio.lowlevel.ParkingLot()
        self.dead_reason: str | None = None
        self.goaway_received = False
        self.goaway_code: int | None = None  # the code of a GOAWAY we sent
        self.closed = trio.Event()
        self._started = False
        self._writer_failed = False

    def __repr__(self) -> str:
        return f"<H2Connection {self.name} {'client' if self.client_side else 'server'}>"

    # -- state ---------------------------------------------------------------------------
    @property
    def usable(self) -> bool:
        return self._started and self.dead_reason is None and not self.goaway_received

    @property
    def open_streams(self) -> int:
        return len(self.streams)

    @property
    def peer_max_streams(self) -> int:
        return self._h2.remote_settings.max_concurrent_streams

    def _forget(self, stream: H2Stream) -> None:
        self.streams.pop(stream.id, None)

    def _ack(self, stream_id: int, n: int) -> None:
        if n <= 0 or self.dead_reason is not None:
            return
        try:
            self._h2.acknowledge_received_data(n, stream_id)
        except (h2.exceptions.ProtocolError, KeyError):
            # the stream is gone: still give the connection window back
            try:
                self._h2.increment_flow_control_window(n)
            except h2.exceptions.ProtocolError:
                return
        self._kick()

    def _die(self, reason: str) -> None:
        if self.dead_reason is not None:
            return
        self.dead_reason = reason
        for stream in list(self.streams.values()):
            stream._wake()
            stream.cancel_scope.cancel()
        self._window_lot.unpark_all()
        self._written_lot.unpark_all()
        self._writer_lot.unpark_all()

    # -- writer --------------------------------------------------------------------------
    def _kick(self) -> int:
        self._pending_seq += 1
        self._writer_lot.unpark_all()
        return self._pending_seq

    async def _flush(self, wait: bool = True) -> None:
        """Wake the writer and (``wait``) wait until it has written what is queued now;
        without waiting, only a checkpoint (a dead connection still raises)."""
        seq = self._kick()
        if not wait:
            if self.dead_reason is not None:
                raise StreamError(f"connection lost: {self.dead_reason}")
            await trio.lowlevel.checkpoint_if_cancelled()
            return
        while self._written_seq < seq:
            if self.dead_reason is not None:
                raise StreamError(f"connection lost: {self.dead_reason}")
            await self._written_lot.park()

    async def _drain_writes(self) -> None:
        """Wait until everything queued is written, even on a dying connection."""
        seq = self._kick()
        while self._written_seq < seq and not self._writer_failed:
            await self._written_lot.park()

    async def _writer_loop(self) -> None:
        while True:
            if self._written_seq == self._pending_seq:
                await self._writer_lot.park()
                continue
            seq = self._pending_seq
            data = self._h2.data_to_send()
            self._unwritten = 0
            if data:
                try:
                    await self.transport.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
                    self._writer_failed = True
                    self._die(f"write failed: {e!r}")
                    self._written_lot.unpark_all()
                    return
            self._written_seq = seq
            self._written_lot.unpark_all()

    # -- running -------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._h2.initiate_connection()
                c = self.config
                settings = {
                    h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: c.stream_window,
                    h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: c.max_header_list_size,
                }
                if not self.client_side:
                    settings[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] = (
                        c.max_concurrent_streams)
                self._h2.update_settings(settings)
                extra = c.connection_window - self._h2.inbound_flow_control_window
                if extra > 0:
                    self._h2.increment_flow_control_window(extra)
                self._started = True
                nursery.start_soon(self._writer_loop)
                self._kick()
                task_status.started()
                reason = await self._reader_loop()
                self._die(reason)
                # let the writer send what is queued (a GOAWAY), briefly
                with trio.move_on_after(CLOSE_FLUSH_TIMEOUT):
                    await self._drain_writes()
                nursery.cancel_scope.cancel()
        finally:
            self._die("connection closed")
            await self._close_transport()
            self.closed.set()

    async def _close_transport(self) -> None:
        """Half-close and give the peer a moment to read our last frames (a GOAWAY) and
        close its side: closing at once could reset a tunnel with those bytes in flight."""
        with trio.CancelScope(shield=True):
            with trio.move_on_after(CLOSE_FLUSH_TIMEOUT):
                try:
                    if not self._writer_failed and hasattr(self.transport, "send_eof"):
                        await self.transport.send_eof()  # type: ignore[attr-defined]
                        while await self.transport.receive_some(RECEIVE_CHUNK):
                            pass
                except (trio.BrokenResourceError, trio.ClosedResourceError,
                        trio.BusyResourceError, OSError):
                    pass
            await trio.aclose_forcefully(self.transport)

    async def _reader_loop(self) -> str:
        data, self._prefix = self._prefix, b""
        while True:
            if data:
                try:
                    events = self._h2.receive_data(data)
                except h2.exceptions.ProtocolError as e:
                    code = getattr(e, "error_code", ErrorCodes.PROTOCOL_ERROR)
                    self.goaway_code = int(code)
                    log.info("HTTP/2 peer %s broke the protocol (code %s): %s",
                             self.name, code, e)
                    return f"protocol error: {e}"
                self._dispatch(events)
                self._kick()
                if self.dead_reason is not None:
                    return self.dead_reason
            try:
                data = await self.transport.receive_some(RECEIVE_CHUNK)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
                return f"read failed: {e!r}"
            if not data:
                return "peer closed the connection"

    def _dispatch(self, events: list[h2.events.Event]) -> None:
        for ev in events:
            if self.dead_reason is not None:
                return  # e.g. closed for too many resets: the rest of the batch is moot
            if isinstance(ev, h2.events.RequestReceived):
                self._on_request(ev)
            elif isinstance(ev, h2.events.ResponseReceived):
                s = self.streams.get(ev.stream_id)
                if s is not None:
                    s.headers = _decode(ev.headers)
                    s._wake()
            elif isinstance(ev, h2.events.InformationalResponseReceived):
                pass  # 1xx: nothing to pass on (100-continue is handled per hop)
            elif isinstance(ev, h2.events.DataReceived):
                s = self.streams.get(ev.stream_id)
                flow = ev.flow_controlled_length
                if s is None or s.reset_code is not None:
                    self._ack(ev.stream_id, flow)
                else:
                    if ev.data:
                        s._data.append((ev.data, flow))
                    else:
                        self._ack(ev.stream_id, flow)  # padding only
                    s._wake()
            elif isinstance(ev, h2.events.TrailersReceived):
                s = self.streams.get(ev.stream_id)
                if s is not None:
                    s.trailers = _decode(ev.headers)
            elif isinstance(ev, h2.events.StreamEnded):
                s = self.streams.get(ev.stream_id)
                if s is not None:
                    s.ended = True
                    s._wake()
                    if s.closed:
                        self._forget(s)
            elif isinstance(ev, h2.events.StreamReset):
                s = self.streams.get(ev.stream_id)
                if s is not None:
                    s._on_reset(ev.error_code)
                    s.cancel_scope.cancel()
                    self._forget(s)
                if ev.remote_reset and not self.client_side:
                    self._count_reset()
            elif isinstance(ev, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
                self._window_lot.unpark_all()
            elif isinstance(ev, h2.events.ConnectionTerminated):
                self._on_goaway(ev)

    def _count_reset(self) -> None:
        now = trio.current_time()
        window = self.config.reset_window
        self._resets.append(now)
        while self._resets and self._resets[0] < now - window:
            self._resets.popleft()
        if len(self._resets) > self.config.max_resets and self.dead_reason is None:
            log.warning("HTTP/2 peer %s reset %d streams in %.0f s: closing (rapid reset)",
                        self.name, len(self._resets), window)
            self.goaway(ErrorCodes.ENHANCE_YOUR_CALM)
            self._die("too many stream resets")

    def goaway(self, code: int) -> None:
        """Queue a GOAWAY (the writer sends it before the connection closes)."""
        self.goaway_code = int(code)
        try:
            self._h2.close_connection(error_code=code)
        except h2.exceptions.ProtocolError:
            pass
        self._kick()

    def _on_goaway(self, ev: h2.events.ConnectionTerminated) -> None:
        self.goaway_received = True
        last = ev.last_stream_id if ev.last_stream_id is not None else 0
        for s in list(self.streams.values()):
            refused = self.client_side and s.id > last
            if refused or ev.error_code != ErrorCodes.NO_ERROR or s.headers is None:
                # h2 accepts no more frames after a GOAWAY: unfinished streams cannot end
                s._on_reset(ErrorCodes.REFUSED_STREAM if refused else int(ev.error_code),
                            refused=refused)
        self._die(f"GOAWAY received (code {ev.error_code})")

    def _on_request(self, ev: h2.events.RequestReceived) -> None:
        if self.client_side or self.on_request is None or (
            self.handlers >= self.config.max_concurrent_streams
        ):
            # (h2 counts only open streams; reset ones whose work still runs count here)
            try:
                self._h2.reset_stream(ev.stream_id, ErrorCodes.REFUSED_STREAM)
            except h2.exceptions.ProtocolError:
                pass
            return
        s = H2Stream(self, ev.stream_id)
        s.headers = _decode(ev.headers)
        if ev.stream_ended is not None:
            s.ended = True
        self.streams[ev.stream_id] = s
        self.on_request(s)

    # -- client --------------------------------------------------------------------------
    async def open_stream(self, headers: Headers, end_stream: bool = False) -> H2Stream:
        """Client: send a request's headers; the response comes on the stream."""
        if not self.usable:
            raise StreamError(f"connection not usable ({self.dead_reason or 'GOAWAY'})",
                              refused=True)
        try:
            sid = self._h2.get_next_available_stream_id()
        except h2.exceptions.NoAvailableStreamIDError as e:
            raise StreamError("no stream ids left", refused=True) from e
        s = H2Stream(self, sid)
        self.streams[sid] = s
        try:
            self._h2.send_headers(sid, _encode(headers), end_stream=end_stream)
        except (h2.exceptions.ProtocolError, ValueError) as e:
            self._forget(s)
            raise StreamError(f"cannot send request headers: {e}", refused=True) from e
        s.sent_end = end_stream
        await self._flush()
        return s

    async def aclose(self, code: int = ErrorCodes.NO_ERROR) -> None:
        if self.dead_reason is None and self._started:
            self.goaway(code)
            with trio.move_on_after(CLOSE_FLUSH_TIMEOUT):
                await self._drain_writes()
        self._die("closed locally")
        if self._started:
            await self.closed.wait()
        else:
            await trio.aclose_forcefully(self.transport)


async def serve_h2(
    transport: trio.abc.Stream,
    handle: Callable[[H2Stream], Awaitable[None]],
    *,
    prefix: bytes = b"",
    config: H2Config | None = None,
    name: str = "",
) -> H2Connection:
    """Serve HTTP/2 on ``transport`` (``prefix``: bytes already read from it), one
    ``handle(stream)`` task per request, until the connection ends. Returns the connection
    (for its ``goaway_code``)."""
    async with trio.open_nursery() as nursery:

        async def run_handler(stream: H2Stream) -> None:
            try:
                with stream.cancel_scope:
                    await handle(stream)
            except StreamError as e:
                log.debug("stream %s ended: %s", stream.id, e)
            except Exception:
                log.exception("HTTP/2 request handler failed")
                stream.reset(ErrorCodes.INTERNAL_ERROR)
            finally:
                conn.handlers -= 1
                if not stream.closed:
                    # a complete response with the request body unread: NO_ERROR tells the
                    # client to stop sending (RFC 9113 §8.1)
                    stream.reset(ErrorCodes.NO_ERROR if stream.sent_end else ErrorCodes.CANCEL)
                conn._forget(stream)

        def on_request(stream: H2Stream) -> None:
            conn.handlers += 1
            nursery.start_soon(run_handler, stream)

        conn = H2Connection(transport, client_side=False, config=config, on_request=on_request,
                            prefix=prefix, name=name)
        await conn.run()
        nursery.cancel_scope.cancel()
    return conn


# -- the gateway's HTTP/2 front end ------------------------------------------------------


class _Body:
    def __init__(self, stream: H2Stream) -> None:
        self.stream = stream
        self.trailers: Headers | None = None

    async def receive(self) -> bytes:
        from l7gateway.forward import ClientGone

        try:
            data = await self.stream.receive_data()
        except StreamError as e:
            raise ClientGone(str(e)) from e
        if not data:
            self.trailers = [(n, v) for n, v in self.stream.trailers or []] or None
        return data


class _Sink:
    def __init__(self, stream: H2Stream) -> None:
        self.stream = stream
        self.started = False

    async def start(self, status: int, headers: Headers, end: bool) -> None:
        from l7gateway.forward import ClientGone

        self.started = True
        out = [(":status", str(status))]
        out += [(n.lower(), v) for n, v in headers if n.lower() != "connection"]
        try:
            # not waiting for each frame to be written: head, body and end then go out in
            # one write (DATA still waits once much is queued)
            await self.stream.send_headers(out, end_stream=end, wait=False)
        except StreamError as e:
            raise ClientGone(str(e)) from e

    async def data(self, data: bytes) -> None:
        from l7gateway.forward import ClientGone

        try:
            await self.stream.send_data(data, wait=False)
        except StreamError as e:
            raise ClientGone(str(e)) from e

    async def end(self, trailers: Headers | None) -> None:
        from l7gateway.forward import ClientGone

        clean = [(n.lower(), v) for n, v in trailers or [] if not n.startswith(":")]
        try:
            await self.stream.end(clean or None, wait=False)
        except StreamError as e:
            raise ClientGone(str(e)) from e

    async def upgrade(self, status: int, headers: Headers, upstream: trio.abc.Stream,
                      leftover: bytes) -> None:
        await trio.aclose_forcefully(upstream)  # HTTP/2 has no Upgrade: never asked for
        await self.abort()

    async def abort(self) -> None:
        self.stream.reset(ErrorCodes.INTERNAL_ERROR)
        await trio.lowlevel.checkpoint()


async def serve_http2(
    transport: trio.abc.Stream,
    down: object,
    forwarder: object,
    *,
    prefix: bytes = b"",
    config: H2Config | None = None,
) -> H2Connection:
    """Serve gateway requests over HTTP/2 (prior knowledge) on one tunnelled connection.

    ``down`` is a :class:`l7gateway.forward.Downstream`, ``forwarder`` a
    :class:`l7gateway.forward.Forwarder` (typed loosely: forward imports this module)."""
    from l7gateway.forward import ClientGone, HttpRequest, clean_headers

    async def handle(stream: H2Stream) -> None:
        pseudo: dict[str, str] = {}
        regular: Headers = []
        for n, v in stream.headers or []:
            if n.startswith(":"):
                pseudo[n] = v
            else:
                regular.append((n, v))
        method = pseudo.get(":method", "")
        if method == "CONNECT" or ":path" not in pseudo:
            await stream.send_headers([(":status", "405"), ("content-length", "0")],
                                      end_stream=True)
            return
        authority = pseudo.get(":authority") or next(
            (v for n, v in regular if n == "host"), "")
        req = HttpRequest(
            method=method,
            scheme=pseudo.get(":scheme", "http"),
            authority=authority,
            target=pseudo[":path"],
            headers=clean_headers(regular),
            body=None if stream.ended and not stream._data else _Body(stream),
        )
        try:
            await forwarder.handle(down, req, _Sink(stream))  # type: ignore[attr-defined]
        except ClientGone as e:
            log.debug("HTTP/2 stream %s: client gone: %s", stream.id, e)
            stream.reset(ErrorCodes.CANCEL)

    return await serve_h2(transport, handle, prefix=prefix, config=config,
                          name=f"{getattr(down, 'src_ip', '?')}")
