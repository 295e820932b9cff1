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
import re
import select
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import trio

from l7gateway.h1server import take
from l7gateway.http2 import H2Config, H2Connection, H2Stream, StreamError
from l7gateway.retry import CONNECT_FAILURE, REFUSED_STREAM, RESET
from nodeproxy.certmanager import CertificateManager
from ztunnel.endpoints import Endpoint
from ztunnel.hbone.frames import ErrorCode
from ztunnel.hbone.pool import HbonePool, PoolKey, client_tls
from ztunnel.hbone.protocol import HBONE_PORT, HboneError, format_authority
from ztunnel.sockets import set_keepalive

log = logging.getLogger(__name__)

Dial = Callable[[Endpoint], Awaitable[trio.abc.Stream]]
Headers = list[tuple[str, str]]

CONNECT_TIMEOUT = 10.0
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
        return await client_tls(tcp, cert.client_context(), key.dst_identities)

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


class ProtocolError(ValueError):
    """The upstream's HTTP/1.1 is malformed (or a request cannot be written as HTTP/1.1)."""


_TOKEN = re.compile(r"[-!#$%&'*+.^_`|~0-9A-Za-z]+")
_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # CR, LF, NUL and other controls
_TARGET = re.compile(r"[\x21-\x7e\x80-\xff]+")
_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([0-9]{3})(?: [^\r\n]*)?\r?")
_HEAD_END = re.compile(rb"\n\r?\n")
_HEADER = re.compile(rb"([-!#$%&'*+.^_`|~0-9A-Za-z]+):[ \t]*(.*?)[ \t]*\r?")
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(?:;[^\r\n]*)?\r?")


def encode_request_head(head: RequestHead, extra: Headers) -> bytes:
    """The request line and header block (``host`` first, then ``head.headers``, then
    ``extra``), checked as h11 would: a header that would split the head is refused."""
    if not _TOKEN.fullmatch(head.method):
        raise ProtocolError(f"bad method {head.method!r}")
    if not _TARGET.fullmatch(head.target):
        raise ProtocolError(f"bad request target {head.target!r}")
    lines = [f"{head.method} {head.target} HTTP/1.1", f"host: {_value(head.authority)}"]
    for headers in (head.headers, extra):
        for n, v in headers:
            if not _TOKEN.fullmatch(n):
                raise ProtocolError(f"bad header name {n!r}")
            lines.append(f"{n}: {_value(v)}")
    lines.append("\r\n")
    try:
        return "\r\n".join(lines).encode("latin-1")
    except UnicodeEncodeError as e:
        raise ProtocolError(f"header not encodable as latin-1: {e}") from e


def _value(v: str) -> str:
    v = v.strip(" \t")
    if _BAD_VALUE.search(v):
        raise ProtocolError(f"bad header value {v!r}")
    return v


@dataclass
class ParsedResponse:
    status: int
    headers: Headers
    http10: bool


class ResponseReader:
    """Sans-IO reader of HTTP/1.1 responses (one exchange): :meth:`feed` bytes, then
    :meth:`head` and :meth:`body` say what is there. Framing per RFC 9112 §6.3."""

    def __init__(self, method: str, max_head: int = MAX_RESPONSE_HEAD) -> None:
        self.method = method
        self.max_head = max_head
        self.buf = bytearray()
        self.eof = False
        self.got_bytes = False
        self.response: ParsedResponse | None = None
        self.keep_alive = True
        self.done = False  # the whole final response was read
        self.trailers: Headers | None = None
        self._mode = ""  # "length" | "chunked" | "close"
        self._left = 0  # length: body bytes left; chunked: bytes left in the chunk (+2: CRLF)
        self._chunk_state = "size"  # "size" | "data" | "crlf" | "trailers"

    def feed(self, data: bytes) -> None:
        if data:
            self.got_bytes = True
            self.buf += data
        else:
            self.eof = True

    def head(self) -> ParsedResponse | None:
        """The next response head (1xx included), or None when more bytes are needed."""
        buf = self.buf
        m = _HEAD_END.search(buf)
        if m is None:
            if len(buf) > self.max_head:
                raise ProtocolError("response head too large")
            if self.eof and buf:
                raise ProtocolError("connection closed in the response head")
            return None
        if m.start() > self.max_head:
            raise ProtocolError("response head too large")
        raw = bytes(buf[:m.start()])
        del buf[:m.end()]
        lines = raw.split(b"\n")
        sm = _STATUS_LINE.fullmatch(lines[0])
        if sm is None:
            raise ProtocolError(f"bad status line {lines[0][:100]!r}")
        status = int(sm.group(2))
        headers: Headers = []
        for line in lines[1:]:
            hm = _HEADER.fullmatch(line)
            if hm is None:  # obs-fold, whitespace before the colon, no colon: refused
                raise ProtocolError(f"bad header line {line[:100]!r}")
            headers.append((hm.group(1).decode("latin-1").lower(),
                            hm.group(2).decode("latin-1")))
        resp = ParsedResponse(status, headers, sm.group(1) == b"0")
        if status >= 200:
            self._frame(resp)
        return resp

    def _frame(self, resp: ParsedResponse) -> None:
        self.response = resp
        te = None
        lengths: set[str] = set()
        for n, v in resp.headers:
            if n == "transfer-encoding":
                te = v
            elif n == "content-length":
                lengths.update(x.strip() for x in v.split(","))
            elif n == "connection" and "close" in (t.strip().lower() for t in v.split(",")):
                self.keep_alive = False
        if resp.http10:
            self.keep_alive = False
        if self.method == "HEAD" or resp.status in (204, 304):
            self._mode, self._left = "length", 0
        elif te is not None:
            if te.strip().lower() != "chunked":
                raise ProtocolError(f"unsupported transfer-encoding {te!r}")
            self._mode = "chunked"
        elif lengths:
            if len(lengths) != 1 or not next(iter(lengths)).isdigit():
                raise ProtocolError(f"bad content-length {sorted(lengths)!r}")
            self._mode, self._left = "length", int(next(iter(lengths)))
        else:
            self._mode, self.keep_alive = "close", False
        if self._mode == "length" and self._left == 0:
            self.done = True

    def body(self) -> bytes | None:
        """The next body bytes; ``b""`` at the end; None when more bytes are needed."""
        if self.done:
            return b""
        buf = self.buf
        if self._mode == "length":
            if not buf:
                if self.eof:
                    raise ProtocolError("connection closed in the response body")
                return None
            data = take(buf, self._left)
            self._left -= len(data)
            if self._left == 0:
                self.done = True
            return data
        if self._mode == "close":
            if buf:
                data = bytes(buf)
                buf.clear()
                return data
            if self.eof:
                self.done = True
                return b""
            return None
        return self._chunked()

    def _chunked(self) -> bytes | None:
        buf = self.buf
        while True:
            if self._chunk_state == "data":
                if not buf:
                    break
                data = take(buf, self._left)
                self._left -= len(data)
                if self._left == 0:
                    self._chunk_state = "crlf"
                return data
            at = buf.find(b"\n")
            if at < 0:
                if len(buf) > self.max_head:
                    raise ProtocolError("chunk header or trailers too large")
                break
            line = bytes(buf[:at + 1])
            if self._chunk_state == "crlf":
                if line not in (b"\r\n", b"\n"):
                    raise ProtocolError("missing CRLF after a chunk")
                del buf[:at + 1]
                self._chunk_state = "size"
            elif self._chunk_state == "size":
                cm = _CHUNK_SIZE.fullmatch(line[:-1])
                if cm is None:
                    raise ProtocolError(f"bad chunk header {line[:100]!r}")
                del buf[:at + 1]
                self._left = int(cm.group(1), 16)
                self._chunk_state = "data" if self._left else "trailers"
                self.trailers = []
            else:  # trailers, up to an empty line
                del buf[:at + 1]
                line = line.rstrip(b"\r\n")
                if not line:
                    self.trailers = self.trailers or None
                    self.done = True
                    return b""
                hm = _HEADER.fullmatch(line)
                if hm is None:
                    raise ProtocolError(f"bad trailer line {line[:100]!r}")
                assert self.trailers is not None
                self.trailers.append((hm.group(1).decode("latin-1").lower(),
                                      hm.group(2).decode("latin-1")))
        if self.eof:
            raise ProtocolError("connection closed in the response body")
        return None


@dataclass(eq=False)
class H1Conn:
    key: str
    stream: trio.abc.Stream
    reused: bool = False
    idle_since: float = 0.0


class H1Exchange:
    """One request/response on an HTTP/1.1 connection (written and parsed here: h11 cost
    more than the rest of the gateway's upstream side together)."""

    def __init__(self, pool: Upstreams, conn: H1Conn, head: RequestHead) -> None:
        self.pool = pool
        self.conn = conn
        self.head = head
        self.upgraded: tuple[trio.abc.Stream, bytes] | None = None
        self.trailers: Headers | None = None
        self._chunked = False
        self._length: int | None = None  # content-length of the request body, if given
        self._sent_all = False  # the request (with its body) was written completely
        self._reader = ResponseReader(head.method)

    async def _write(self, data: bytes) -> None:
        await self.conn.stream.send_all(data)

    async def start(self) -> None:
        head = self.head
        extra: Headers = []
        if head.has_body:
            for n, v in head.headers:
                if n == "content-length":
                    if not v.strip().isdigit():
                        raise AttemptError(RESET, f"bad request for HTTP/1.1: content-length "
                                                  f"{v!r}")
                    self._length = int(v)
            if self._length is None:
                extra.append(("transfer-encoding", "chunked"))
                self._chunked = True
        if head.upgrade:
            extra += [("connection", "upgrade"), ("upgrade", head.upgrade)]
        try:
            data = encode_request_head(head, extra)
        except ProtocolError as e:
            raise AttemptError(RESET, f"bad request for HTTP/1.1: {e}") from e
        try:
            await self._write(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            raise AttemptError(CONNECT_FAILURE if self.conn.reused else RESET,
                               f"write failed: {e!r}") from e
        if not head.has_body:
            self._sent_all = True

    async def send_body(self, body: BodyCursor) -> None:
        if not self.head.has_body:
            return
        left = self._length
        try:
            while (chunk := await body.next()) is not None:
                if not chunk:
                    continue
                if self._chunked:
                    await self._write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                else:
                    assert left is not None
                    if len(chunk) > left:
                        raise ProtocolError("request body longer than its content-length")
                    left -= len(chunk)
                    await self._write(chunk)
            if self._chunked:
                trailers = body.trailers or []
                end = "".join(f"{n}: {_value(v)}\r\n" for n, v in trailers
                              if _TOKEN.fullmatch(n))
                await self._write(b"0\r\n" + end.encode("latin-1") + b"\r\n")
            elif left:
                raise ProtocolError("request body shorter than its content-length")
            self._sent_all = True
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, ProtocolError,
                UnicodeEncodeError) as e:
            # the response side notices the broken connection; nothing more to send
            log.debug("request body to %s not fully sent: %s", self.conn.key, e)

    async def _fill(self) -> None:
        """Read more of the response into the reader."""
        try:
            data = await self.conn.stream.receive_some(READ_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            raise self._lost(f"read failed: {e!r}") from e
        r = self._reader
        if not data and not r.got_bytes and self.conn.reused:
            raise self._lost("pooled connection closed")
        r.feed(data)

    def _lost(self, message: str) -> AttemptError:
        # a reused keep-alive connection that dies before any response byte was very likely
        # closed by the server while idle: the request was not processed
        if not self._reader.got_bytes and self.conn.reused:
            return AttemptError(CONNECT_FAILURE, message)
        return AttemptError(RESET, message)

    async def response(self) -> ResponseHead:
        r = self._reader
        while True:
            try:
                resp = r.head()
            except ProtocolError as e:
                raise AttemptError(RESET, f"bad HTTP/1.1 from upstream: {e}") from e
            if resp is None:
                if r.eof:
                    raise self._lost("connection closed before the response")
                await self._fill()
                continue
            if resp.status < 200:
                if resp.status == 101 and self.head.upgrade:
                    self.upgraded = (self.conn.stream, bytes(r.buf))
                    r.buf.clear()
                    return ResponseHead(101, resp.headers, ended=True)
                continue  # 100, 103: nothing to pass on
            return ResponseHead(resp.status, resp.headers)

    def poll_data(self) -> bytes | None:
        """What :meth:`receive_data` would return, if it is already received; else None."""
        try:
            data = self._reader.body()
        except ProtocolError as e:
            raise AttemptError(RESET, f"bad HTTP/1.1 from upstream: {e}") from e
        if data == b"":
            self.trailers = self._reader.trailers
        return data

    async def receive_data(self) -> bytes:
        while True:
            data = self.poll_data()
            if data is not None:
                return data
            await self._fill()

    def finish_nowait(self, ok: bool) -> bool:
        """:meth:`finish` when it needs no IO (the connection is reusable, or upgraded);
        False: call :meth:`finish`."""
        if self.upgraded is not None:
            return True  # the stream now belongs to the upgrade relay
        r = self._reader
        if ok and r.done and r.keep_alive and self._sent_all and not r.buf:
            self.pool._release_h1(self.conn)
            return True
        return False

    async def finish(self, ok: bool) -> None:
        if not self.finish_nowait(ok):
            await trio.aclose_forcefully(self.conn.stream)


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
        s = self.stream
        status = s.status  # parsed and checked by the engine (200-599 here: 1xx are skipped)
        rest: Headers = [(n, v) for n, v in headers if n[:1] != ":"]
        if not 200 <= status <= 599:
            raise AttemptError(RESET, f"bad :status from upstream {status}")
        # ended: nothing at all follows the head (trailers after the head are not nothing)
        return ResponseHead(status, rest, ended=s.ended and not s._data and s.trailers is None)

    async def receive_data(self) -> bytes:
        try:
            data = await self.stream.receive_data()
        except StreamError as e:
            raise AttemptError(RESET, str(e)) from e
        if not data:
            self.trailers = self.stream.trailers
        return data

    def poll_data(self) -> bytes | None:
        """What :meth:`receive_data` would return, if it is already received; else None."""
        s = self.stream
        if not s._data and not s.ended:
            return None
        data = s.receive_data_nowait()
        if not data:
            self.trailers = s.trailers
        return data

    async def finish(self, ok: bool) -> None:
        if not self.stream.closed:
            self.stream.reset(ErrorCode.CANCEL)
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
