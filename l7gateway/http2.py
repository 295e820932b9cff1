"""HTTP/2 over a trio stream: the gateway's server side and its upstream client side.

The protocol is our own sans-IO engine (:class:`ztunnel.hbone.frames.H2Engine`, shared with
HBONE; the ``h2`` library cost ≈ 2x more CPU per request). One :class:`H2Connection` drives one
engine: a reader task feeds it bytes and dispatches its events to :class:`H2Stream` objects;
one writer task is the only caller of ``send_all`` (trio allows one sender). Other tasks change
engine state synchronously and then wait until the writer has written what was queued
(:meth:`H2Connection._flush`).

Flow control is back-pressure: received DATA is acknowledged to the peer only when the
consumer takes it (:meth:`H2Stream.receive_data`), and senders wait for window.

Protections: the advertised ``MAX_CONCURRENT_STREAMS`` (the engine refuses streams beyond
it) plus, server side, a cap on handler tasks still running for streams already closed; the
engine's flood limits (:class:`H2Config` ``max_resets`` per ``reset_window``: "rapid reset",
CVE-2023-44487; PINGs, SETTINGS, empty frames), past which the connection is closed with
GOAWAY(ENHANCE_YOUR_CALM). Protocol errors are answered by the engine with a GOAWAY or
RST_STREAM carrying the RFC 9113 code; a connection error closes the connection.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import hpack
import trio

from ztunnel.hbone.frames import (
    DataReceived,
    EndOfStream,
    ErrorCode,
    FloodLimits,
    GoAway,
    H2ConnectionError,
    H2Engine,
    H2Error,
    HeadersReceived,
    Setting,
    StreamReset,
    WindowChanged,
)
from ztunnel.hbone.hpackplain import StatelessEncoder

log = logging.getLogger(__name__)

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
    # flood limits within ``reset_window`` s (None: unlimited). Rapid reset: streams the
    # peer reset, or that we reset because of it (malformed, refused).
    max_resets: int | None = 200
    reset_window: float = 10.0
    max_pings: int | None = 1000
    max_settings: int | None = 100
    max_empty_frames: int | None = 1000

    def flood_limits(self) -> FloodLimits:
        return FloodLimits(window=self.reset_window, resets=self.max_resets,
                           pings=self.max_pings, settings=self.max_settings,
                           empty=self.max_empty_frames)


class StreamError(Exception):
    """The stream was reset (``code``) or its connection died."""

    def __init__(self, message: str, code: int | None = None, *, refused: bool = False) -> None:
        super().__init__(message)
        self.code = code
        # the peer provably did not process it (REFUSED_STREAM, above GOAWAY's last id)
        self.refused = refused


def _decode(headers: list[tuple[bytes, bytes]]) -> Headers:
    return [(n.decode("latin-1"), v.decode("latin-1")) for n, v in headers]


class H2Stream:
    """One HTTP/2 stream: headers, body and trailers in, and the same out."""

    def __init__(self, conn: H2Connection, stream_id: int) -> None:
        self.conn = conn
        self.id = stream_id
        self.headers: Headers | None = None  # request (server) / final response (client)
        self.status = 0  # client: the final response's status
        self.trailers: Headers | None = None
        self.ended = False  # the peer's END_STREAM was received
        self.reset_code: int | None = None
        self.refused = False
        self.sent_end = False
        self._data: deque[bytes] = deque()
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
            self.refused = refused or code == ErrorCode.REFUSED_STREAM
        if self.ended:
            # the peer's message was complete before the reset (a server that answered
            # before reading the whole request resets it with NO_ERROR, RFC 9113 §8.1, as
            # gRPC servers do): what was received stays readable, only sending stops
            self._wake()
            return
        for data in self._data:
            self.conn._ack(self.id, len(data))
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
            data = self._data.popleft()
            self.conn._ack(self.id, len(data))  # only now may the peer send more
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
            conn = self.conn
            conn._e.send_header_block(self.id, conn._encoder.encode(headers), end_stream)
        except (H2Error, ValueError) as e:
            raise StreamError(f"cannot send headers: {e}") from e
        if end_stream:
            self.sent_end = True
        await self.conn._flush(wait)

    async def send_data(self, data: bytes, end_stream: bool = False, *,
                        wait: bool = True) -> None:
        """Queue DATA as the windows allow; ``wait``: until written (else only when more
        than :data:`UNWRITTEN_LIMIT` is queued)."""
        conn = self.conn
        engine = conn._e
        if type(data) is not bytes:
            data = bytes(data)
        total = len(data)
        pos = 0
        while True:
            self._check()
            if pos == total:
                if end_stream:
                    try:
                        engine.end_stream(self.id)
                    except H2Error as e:
                        raise StreamError(f"cannot end stream: {e}") from e
                    self.sent_end = True
                    await conn._flush(wait)
                return
            try:
                n = engine.send_data(self.id, data if not pos else memoryview(data)[pos:],
                                     end_stream=end_stream)
            except H2Error as e:
                raise StreamError(f"stream not writable: {e}") from e
            if not n:
                if not engine.stream_open(self.id):
                    raise StreamError(f"stream {self.id} not writable")
                await conn._window_lot.park()
                continue
            pos += n
            conn._unwritten += n
            last = end_stream and pos == total
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

    def reset(self, code: int = ErrorCode.CANCEL) -> None:
        """Reset unless already closed; synchronous, safe while being cancelled."""
        if self.closed or self.conn.dead_reason is not None:
            self.conn._forget(self)
            return
        if self.conn._e.reset_stream(self.id, code):
            self.conn._kick()
        self._on_reset(code)
        self.conn._forget(self)


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
        self.config = c = config or H2Config()
        self.on_request = on_request
        self.name = name
        self._prefix = prefix
        settings = {
            Setting.INITIAL_WINDOW_SIZE: c.stream_window,
            Setting.MAX_HEADER_LIST_SIZE: c.max_header_list_size,
        }
        if client_side:
            settings[Setting.ENABLE_PUSH] = 0
        else:
            settings[Setting.MAX_CONCURRENT_STREAMS] = c.max_concurrent_streams
        self._encoder = StatelessEncoder()
        self._e = H2Engine(
            client_side=client_side,
            encoder=self._encoder,  # type: ignore[arg-type]  # told of table size changes
            local_settings=settings,
            connection_window=c.connection_window,
            decoder=hpack.Decoder(max_header_list_size=c.max_header_list_size),
            flood=c.flood_limits(),
            clock=trio.current_time,
        )
        self.streams: dict[int, H2Stream] = {}
        self.handlers = 0  # server: handler tasks still running
        self._pending_seq = 0
        self._written_seq = 0
        self._unwritten = 0  # DATA bytes queued since the writer last took its batch
        self._writer_lot = trio.lowlevel.ParkingLot()
        self._written_lot = trio.lowlevel.ParkingLot()
        self._window_lot = trio.lowlevel.ParkingLot()
        self._reader_scope = trio.CancelScope()
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
        return self._e.peer_max_concurrent_streams

    def _forget(self, stream: H2Stream) -> None:
        if self.streams.pop(stream.id, None) is not None and self.goaway_received and (
            not self.streams
        ):
            # the peer is going away and the last stream it let finish is done
            self._die("GOAWAY received and every stream done")

    def _ack(self, stream_id: int, n: int) -> None:
        if n <= 0 or self.dead_reason is not None:
            return
        engine = self._e
        engine.acknowledge_received_data(stream_id, n)
        if engine.has_output():  # a WINDOW_UPDATE is due (only every half window)
            self._kick()

    def _die(self, reason: str) -> None:
        if self.dead_reason is not None:
            return
        self.dead_reason = reason
        self._reader_scope.cancel()
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
        engine = self._e
        while True:
            if self._written_seq == self._pending_seq:
                await self._writer_lot.park()
                continue
            seq = self._pending_seq
            data = engine.data_to_send()
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
                self._e.initiate()
                self._started = True
                nursery.start_soon(self._writer_loop)
                self._kick()
                task_status.started()
                reason = None
                with self._reader_scope:
                    reason = await self._reader_loop()
                self._die(reason or "closed")
                # let the writer send what is queued (a GOAWAY, the last frames), briefly
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
        engine = self._e
        while True:
            if data:
                try:
                    events = engine.receive_data(data)
                except H2ConnectionError as e:
                    self.goaway_code = int(e.error_code)
                    log.info("HTTP/2 peer %s broke the protocol (%s): %s",
                             self.name, ErrorCode(e.error_code).name, e)
                    self._kick()  # the GOAWAY
                    return f"protocol error: {e}"
                except Exception as e:  # a bug of ours: fail closed, this connection only
                    log.exception("HTTP/2 engine failed on input from %s", self.name)
                    self.goaway(ErrorCode.INTERNAL_ERROR)
                    return f"internal error: {e!r}"
                if events:
                    self._dispatch(events)
                if engine.has_output():
                    self._kick()
                if self.dead_reason is not None:
                    return self.dead_reason
            try:
                data = await self.transport.receive_some(RECEIVE_CHUNK)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
                return f"read failed: {e!r}"
            if not data:
                return "peer closed the connection"

    def _dispatch(self, events: list) -> None:
        streams = self.streams
        for ev in events:
            if self.dead_reason is not None:
                return
            kind = type(ev)
            if kind is DataReceived:
                s = streams.get(ev.stream_id)
                if s is None or s.reset_code is not None:
                    self._ack(ev.stream_id, len(ev.data))
                else:
                    s._data.append(ev.data)
                    s._wake()
            elif kind is HeadersReceived:
                if ev.trailers:
                    s = streams.get(ev.stream_id)
                    if s is not None:
                        s.trailers = _decode(ev.headers)
                elif self.client_side:
                    s = streams.get(ev.stream_id)
                    if s is not None:
                        s.headers = _decode(ev.headers)
                        s.status = ev.status
                        s._wake()
                else:
                    self._on_request(ev)
            elif kind is EndOfStream:
                s = streams.get(ev.stream_id)
                if s is not None:
                    s.ended = True
                    s._wake()
                    if s.closed:
                        self._forget(s)
            elif kind is StreamReset:
                s = streams.get(ev.stream_id)
                if s is not None:
                    s._on_reset(ev.error_code)
                    s.cancel_scope.cancel()
                    self._forget(s)
                    self._window_lot.unpark_all()  # a sender waiting for window: it is over
            elif kind is WindowChanged:
                self._window_lot.unpark_all()
            elif kind is GoAway:
                self._on_goaway(ev)
            # PingAcked: nothing to do; 1xx responses are not asked for

    def goaway(self, code: int) -> None:
        """Queue a GOAWAY (the writer sends it before the connection closes)."""
        self.goaway_code = int(code)
        self._e.send_goaway(code)
        self._kick()

    def _on_goaway(self, ev: GoAway) -> None:
        self.goaway_received = True
        last = ev.last_stream_id
        failed = ev.error_code != ErrorCode.NO_ERROR
        for s in list(self.streams.values()):
            refused = self.client_side and s.id > last
            if refused or failed:
                # above last_stream_id: never processed (the engine dropped it); after an
                # error GOAWAY nothing more arrives
                s._on_reset(ErrorCode.REFUSED_STREAM if refused else int(ev.error_code),
                            refused=refused)
                s.cancel_scope.cancel()
                self.streams.pop(s.id, None)
        if failed:
            self._die(f"GOAWAY received (code {ev.error_code})")
        elif not self.streams:
            self._die("GOAWAY received")
        # else: a graceful GOAWAY lets the streams below last_stream_id finish (_forget)

    def _on_request(self, ev: HeadersReceived) -> None:
        if self.client_side or self.on_request is None or (
            self.handlers >= self.config.max_concurrent_streams
        ):
            # (the engine counts only open streams; reset ones whose work still runs count
            # here)
            if self._e.reset_stream(ev.stream_id, ErrorCode.REFUSED_STREAM):
                self._kick()
            return
        s = H2Stream(self, ev.stream_id)
        s.headers = _decode(ev.headers)
        if ev.ended:
            s.ended = True
        self.streams[ev.stream_id] = s
        self.on_request(s)

    # -- client --------------------------------------------------------------------------
    async def open_stream(self, headers: Headers, end_stream: bool = False) -> H2Stream:
        """Client: send a request's headers; the response comes on the stream."""
        if not self.usable:
            raise StreamError(f"connection not usable ({self.dead_reason or 'GOAWAY'})",
                              refused=True)
        engine = self._e
        try:
            sid = engine.get_next_available_stream_id()
            block = self._encoder.encode(headers)
            head = any(n == ":method" and v == "HEAD" for n, v in headers)
            engine.send_header_block(sid, block, end_stream, head=head)
        except (H2Error, ValueError) as e:
            raise StreamError(f"cannot send request headers: {e}", refused=True) from e
        s = H2Stream(self, sid)
        self.streams[sid] = s
        s.sent_end = end_stream
        await self._flush()
        return s

    async def aclose(self, code: int = ErrorCode.NO_ERROR) -> None:
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
                stream.reset(ErrorCode.INTERNAL_ERROR)
            finally:
                conn.handlers -= 1
                if not stream.closed:
                    # a complete response with the request body unread: NO_ERROR tells the
                    # client to stop sending (RFC 9113 §8.1)
                    stream.reset(ErrorCode.NO_ERROR if stream.sent_end else ErrorCode.CANCEL)
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
        self.stream.reset(ErrorCode.INTERNAL_ERROR)
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
        cookies: list[str] = []
        for n, v in stream.headers or []:
            if n[:1] == ":":
                pseudo[n] = v
            elif n == "cookie":
                cookies.append(v)
            else:
                regular.append((n, v))
        if cookies:
            # HTTP/2 may split cookies into crumbs; one header again before they go to an
            # HTTP/1.1 hop (RFC 9113 §8.2.3)
            regular.append(("cookie", "; ".join(cookies)))
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
            stream.reset(ErrorCode.CANCEL)

    return await serve_h2(transport, handle, prefix=prefix, config=config,
                          name=f"{getattr(down, 'src_ip', '?')}")
