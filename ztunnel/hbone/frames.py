"""A lean HTTP/2 engine, sans-IO: frames, connection and stream state, flow control.

Used by HBONE (one CONNECT stream per tunnel) and by the L7 gateway's HTTP/2 (requests,
responses, 1xx, trailers). The generic ``h2`` library cost ≈ 250–300 µs of CPU per stream per
end (state machines, event objects, frame objects); this engine parses and writes frames
directly and keeps only the state those users need, while keeping every rule of RFC 9113 that
a peer could break: it fails closed with the error code the RFC names (GOAWAY for connection
errors, RST_STREAM for stream errors), including malformed messages (§8.1.1, §8.2, §8.3:
pseudo-headers, field syntax, content-length against DATA).

Flood limits (RFC 9113 §10.5): per connection, over a sliding window, the streams the peer
reset (or that we reset for its fault — "rapid reset", CVE-2023-44487), the PINGs
(CVE-2019-9512) and SETTINGS (CVE-2019-9515) it sent, and its empty DATA/HEADERS/CONTINUATION
frames that end nothing (CVE-2019-9518) are counted; past a :class:`FloodLimits` limit the
connection ends with GOAWAY(ENHANCE_YOUR_CALM).

:class:`H2Engine` is fed bytes with :meth:`~H2Engine.receive_data` and returns events; every
action queues frames for :meth:`~H2Engine.data_to_send`. Header blocks are (de)compressed with
the ``hpack`` library; what a header block *means* (CONNECT, status) is up to the caller
(``protocol.HboneH2``, ``l7gateway.http2``), which gets :class:`HeadersReceived` events.
"""

from __future__ import annotations

import enum
import logging
import re
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import hpack

log = logging.getLogger(__name__)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DEFAULT_WINDOW = 65535
DEFAULT_MAX_FRAME = 16384
MAX_WINDOW = 2**31 - 1
MAX_FRAME_LIMIT = 2**24 - 1
MAX_STREAM_ID = 2**31 - 1
UNLIMITED_STREAMS = 2**31 - 1
# Streams we reset are remembered (frames the peer sent before it saw our RST_STREAM are
# ignored, RFC 9113 §5.1); older ones count as plainly closed.
RESET_MEMORY = 4096


class FrameType(enum.IntEnum):
    DATA = 0x0
    HEADERS = 0x1
    PRIORITY = 0x2
    RST_STREAM = 0x3
    SETTINGS = 0x4
    PUSH_PROMISE = 0x5
    PING = 0x6
    GOAWAY = 0x7
    WINDOW_UPDATE = 0x8
    CONTINUATION = 0x9


class ErrorCode(enum.IntEnum):
    NO_ERROR = 0x0
    PROTOCOL_ERROR = 0x1
    INTERNAL_ERROR = 0x2
    FLOW_CONTROL_ERROR = 0x3
    SETTINGS_TIMEOUT = 0x4
    STREAM_CLOSED = 0x5
    FRAME_SIZE_ERROR = 0x6
    REFUSED_STREAM = 0x7
    CANCEL = 0x8
    COMPRESSION_ERROR = 0x9
    CONNECT_ERROR = 0xA
    ENHANCE_YOUR_CALM = 0xB
    INADEQUATE_SECURITY = 0xC
    HTTP_1_1_REQUIRED = 0xD


class Setting(enum.IntEnum):
    HEADER_TABLE_SIZE = 0x1
    ENABLE_PUSH = 0x2
    MAX_CONCURRENT_STREAMS = 0x3
    INITIAL_WINDOW_SIZE = 0x4
    MAX_FRAME_SIZE = 0x5
    MAX_HEADER_LIST_SIZE = 0x6


# Flags
END_STREAM = 0x1
ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20

_HEADER = struct.Struct(">HBBBL")  # 24-bit length as 16 + 8 bits, type, flags, stream id
_U32 = struct.Struct(">L")
_U32x2 = struct.Struct(">LL")
_SETTING = struct.Struct(">HL")

_T_DATA, _T_HEADERS, _T_PRIORITY, _T_RST, _T_SETTINGS = 0, 1, 2, 3, 4
_T_PUSH, _T_PING, _T_GOAWAY, _T_WINDOW, _T_CONT = 5, 6, 7, 8, 9


def frame_header(length: int, ftype: int, flags: int, stream_id: int) -> bytes:
    """The 9-byte frame header."""
    return _HEADER.pack(length >> 8, length & 0xFF, ftype, flags, stream_id)


# --------------------------------------------------------------------------------------------
# Errors


class H2Error(Exception):
    """HTTP/2 failure; ``error_code`` is the RFC 9113 code."""

    def __init__(self, message: str, error_code: int = ErrorCode.PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.error_code = error_code


class H2ConnectionError(H2Error):
    """The peer broke HTTP/2: a GOAWAY with ``error_code`` is queued; the connection is over."""


class StreamClosedError(H2Error):
    """A local action on a stream that is closed (or never was open) in that direction."""


class ConnectionClosedError(H2Error):
    """A local action after the connection ended with an error GOAWAY (ours or the peer's)."""


def _conn_error(code: int, message: str) -> H2ConnectionError:
    return H2ConnectionError(message, code)


# --------------------------------------------------------------------------------------------
# Flood limits (RFC 9113 §10.5)


@dataclass(frozen=True, slots=True)
class FloodLimits:
    """How much of each costly-but-legal thing a peer may do within ``window`` seconds on one
    connection before it is cut off with GOAWAY(ENHANCE_YOUR_CALM); None: not limited.

    The defaults are generous enough for any real client (a busy pooled connection resetting
    its tunnels as applications abort them, keepalive PINGs, a SETTINGS change now and then)
    and still bound an attacker to a few hundred wasted streams or frames per second."""

    window: float = 10.0
    #: streams the peer reset, plus those we reset because of the peer (malformed, refused…)
    resets: int | None = 10_000
    #: PING frames received (not ACKs)
    pings: int | None = 1_000
    #: SETTINGS frames received (not ACKs)
    settings: int | None = 500
    #: DATA/HEADERS/CONTINUATION frames without payload that end neither stream nor block
    empty: int | None = 10_000


DEFAULT_FLOOD_LIMITS = FloodLimits()
_F_RESETS, _F_PINGS, _F_SETTINGS, _F_EMPTY = 0, 1, 2, 3


def _limit(limits: FloodLimits, kind: int) -> int | None:
    return (limits.resets, limits.pings, limits.settings, limits.empty)[kind]


class _Rate:
    """Events in a sliding window, estimated from two fixed buckets (the current one, plus the
    previous one weighted by the part of it the window still covers): O(1) time and memory
    per connection, where a deque of timestamps would hold up to ``limit`` floats."""

    __slots__ = ("limit", "window", "start", "cur", "prev")

    def __init__(self, limit: int, window: float, now: float) -> None:
        self.limit = limit
        self.window = window
        self.start = now
        self.cur = 0
        self.prev = 0

    def hit(self, now: float) -> bool:
        """Count one event; True when the estimate is over the limit."""
        elapsed = now - self.start
        window = self.window
        if elapsed >= window:
            self.prev = self.cur if elapsed < 2 * window else 0
            self.cur = 0
            self.start = now - elapsed % window
            elapsed = now - self.start
        self.cur += 1
        return self.cur + self.prev * (1.0 - elapsed / window) > self.limit


# --------------------------------------------------------------------------------------------
# Events (re-exported by ``protocol``)


@dataclass(slots=True)
class HeadersReceived:
    """A complete, well-formed header block opening a stream (request), answering it (final
    response, ``status`` parsed), or — ``trailers`` — ending it. 1xx responses are reported
    as :class:`InformationalReceived` only if the engine was asked to."""

    stream_id: int
    headers: list[tuple[bytes, bytes]]
    ended: bool = False
    trailers: bool = False
    status: int = 0  # a response's :status


@dataclass(slots=True)
class InformationalReceived:
    """A 1xx response (100 Continue, 103 Early Hints…); a final response follows."""

    stream_id: int
    headers: list[tuple[bytes, bytes]]
    status: int


@dataclass(slots=True)
class DataReceived:
    stream_id: int
    data: bytes


@dataclass(slots=True)
class EndOfStream:
    stream_id: int


@dataclass(slots=True)
class StreamReset:
    stream_id: int
    error_code: int
    remote: bool = True


@dataclass(slots=True)
class WindowChanged:
    """More may be sendable (WINDOW_UPDATE or new SETTINGS)."""


@dataclass(slots=True)
class PingAcked:
    data: bytes


@dataclass(slots=True)
class GoAway:
    error_code: int
    last_stream_id: int


_WINDOW_CHANGED = WindowChanged()


# --------------------------------------------------------------------------------------------
# Inbound header checks (RFC 9113 §8.2, §8.3): a malformed block is a stream error.

_REQUEST_PSEUDO = frozenset({b":method", b":scheme", b":authority", b":path", b":protocol"})
_RESPONSE_PSEUDO = frozenset({b":status"})
_CONNECTION_SPECIFIC = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"})
_BAD_NAME = re.compile(rb"[^!#$%&'*+\-.^_`|~0-9a-z]")
_BAD_VALUE = re.compile(rb"[\x00\r\n]|^[ \t]|[ \t]$")


def malformed(headers: list[tuple[bytes, bytes]], *, request: bool, trailers: bool) -> str | None:
    """Why a received header block is malformed (RFC 9113 §8.2, §8.3), or None."""
    return inspect_block(headers, request=request, trailers=trailers)[0]


def inspect_block(headers: list[tuple[bytes, bytes]], *, request: bool,
                  trailers: bool) -> tuple[str | None, int, int]:
    """Check a received header block: (why it is malformed or None, its content-length or -1,
    a response's :status or 0)."""
    pseudo_ok = _REQUEST_PSEUDO if request else _RESPONSE_PSEUDO
    pseudo: dict[bytes, bytes] = {}
    regular = False
    length = -1
    host: bytes | None = None
    for name, value in headers:
        if name[:1] == b":":
            if regular or trailers:
                return f"pseudo-header {name!r} after regular headers or in trailers", -1, 0
            if name not in pseudo_ok:
                return f"pseudo-header {name!r} not allowed here", -1, 0
            if name in pseudo:
                return f"duplicate pseudo-header {name!r}", -1, 0
            pseudo[name] = value
        else:
            regular = True
            if not name or _BAD_NAME.search(name):
                return f"invalid header name {name!r}", -1, 0
            if name in _CONNECTION_SPECIFIC or (name == b"te" and value != b"trailers"):
                return f"connection-specific header {name!r}", -1, 0
            if name == b"content-length":
                # one value, or a list of the same value (RFC 9110 §8.6); digits only
                values = {v.strip() for v in value.split(b",")}
                v = values.pop()
                if values or not v.isdigit() or (length >= 0 and int(v) != length):
                    return f"bad content-length {value!r}", -1, 0
                length = int(v)
            elif name == b"host":
                host = value
        if _BAD_VALUE.search(value):
            return f"invalid value for header {name!r}", -1, 0
    if trailers:
        return None, -1, 0
    if request:
        method = pseudo.get(b":method")
        if method is None:
            return "request without :method", -1, 0
        if method == b"CONNECT" and b":protocol" not in pseudo:
            if b":scheme" in pseudo or b":path" in pseudo:
                return "CONNECT with :scheme or :path", -1, 0
            if not pseudo.get(b":authority"):
                return "CONNECT without :authority", -1, 0
            return None, length, 0
        if b":protocol" in pseudo and method != b"CONNECT":
            return ":protocol without CONNECT", -1, 0
        if not pseudo.get(b":scheme"):
            return "request without :scheme", -1, 0
        if not pseudo.get(b":path"):
            return "request without :path, or an empty one", -1, 0
        authority = pseudo.get(b":authority")
        if pseudo[b":scheme"] in (b"http", b"https"):
            if authority is None and host is None:
                return "request without :authority or host", -1, 0
            if authority == b"" or host == b"":
                return "empty :authority or host", -1, 0
        if authority is not None and host is not None and authority != host:
            return ":authority and host differ", -1, 0
        return None, length, 0
    raw = pseudo.get(b":status")
    if raw is None:
        return "response without :status", -1, 0
    if len(raw) != 3 or not raw.isdigit():
        return f"bad :status {raw!r}", -1, 0
    status = int(raw)
    if status < 100 or status == 101:  # HTTP/2 has no 101 (RFC 9113 §8.6)
        return f"bad :status {raw!r}", -1, 0
    return None, length, status


# --------------------------------------------------------------------------------------------


class _Stream:
    __slots__ = ("send_window", "recv_window", "unacked", "local_closed", "remote_closed",
                 "got_headers", "local", "left", "head")

    def __init__(self, send_window: int, recv_window: int, local: bool) -> None:
        self.send_window = send_window
        self.recv_window = recv_window  # what the peer may still send
        self.unacked = 0  # consumed, not yet handed back with WINDOW_UPDATE
        self.local_closed = False  # we sent END_STREAM
        self.remote_closed = False  # the peer sent END_STREAM
        self.got_headers = False  # request (server) / final response (client) received
        self.local = local  # opened by us
        # DATA bytes the peer's content-length still announces (-1: no content-length); a
        # message whose DATA do not add up to it is malformed (RFC 9113 §8.1.1)
        self.left = -1
        self.head = False  # client: a HEAD request (its response has no content)


class H2Engine:
    """One HTTP/2 connection, sans-IO.

    ``local_settings`` are what :meth:`initiate` announces; they apply at once (they only
    raise the defaults, so a peer that has not yet seen them cannot overrun them).
    ``connection_window`` is the receive window of the whole connection. ``informational``:
    report 1xx responses (:class:`InformationalReceived`) instead of skipping them.
    ``flood`` bounds what the peer may do per ``clock`` window (:class:`FloodLimits`)."""

    def __init__(
        self,
        *,
        client_side: bool,
        local_settings: dict[int, int] | None = None,
        connection_window: int = DEFAULT_WINDOW,
        encoder: hpack.Encoder | None = None,
        decoder: hpack.Decoder | None = None,
        informational: bool = False,
        flood: FloodLimits = DEFAULT_FLOOD_LIMITS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client_side = client_side
        self.informational = informational
        self.flood = flood
        self._clock = clock
        self._meters: list[_Rate | None] | None = None  # per flood kind, made when first hit
        self.local_settings: dict[int, int] = dict(local_settings or {})
        self.remote_settings: dict[int, int] = {
            Setting.HEADER_TABLE_SIZE: 4096,
            Setting.ENABLE_PUSH: 1,
            Setting.INITIAL_WINDOW_SIZE: DEFAULT_WINDOW,
            Setting.MAX_FRAME_SIZE: DEFAULT_MAX_FRAME,
        }
        self.encoder = encoder if encoder is not None else hpack.Encoder()
        self.decoder = decoder if decoder is not None else hpack.Decoder()
        ls = self.local_settings
        self.max_inbound_frame_size = ls.get(Setting.MAX_FRAME_SIZE, DEFAULT_MAX_FRAME)
        self.max_outbound_frame_size = DEFAULT_MAX_FRAME
        self._local_initial_window = ls.get(Setting.INITIAL_WINDOW_SIZE, DEFAULT_WINDOW)
        self._local_max_streams = ls.get(Setting.MAX_CONCURRENT_STREAMS, UNLIMITED_STREAMS)
        self._remote_initial_window = DEFAULT_WINDOW
        self._remote_max_streams = UNLIMITED_STREAMS
        self._conn_window_target = max(connection_window, DEFAULT_WINDOW)
        self.outbound_flow_control_window = DEFAULT_WINDOW  # what we may send, connection
        self.inbound_flow_control_window = self._conn_window_target  # what the peer may send
        self._conn_unacked = 0
        self._streams: dict[int, _Stream] = {}
        self._open_local = 0  # open streams we initiated
        self._open_remote = 0
        self.highest_inbound_stream_id = 0
        self.highest_outbound_stream_id = 0
        self._reset_by_us: dict[int, None] = {}  # insertion-ordered set, bounded
        self._out: list[bytes] = []
        self._parts: list[memoryview] = []  # an incomplete frame: see _complete()
        self._parts_len = 0
        self._parts_need = 0
        self._need_preface = not client_side
        self._preface_got = b""
        self._got_settings = False
        # CONTINUATION in progress: stream id, flags of the HEADERS frame, fragments
        self._cont_sid = 0
        self._cont_flags = 0
        self._cont_parts: list[bytes] = []
        self._cont_size = 0
        self.goaway_sent = False
        self.goaway_received = False
        self.closed = False  # error GOAWAY sent or received: nothing more happens

    # -- output ------------------------------------------------------------------------------
    def data_to_send(self, amount: int | None = None) -> bytes:
        """Everything queued (or its first ``amount`` bytes)."""
        out = self._out
        if not out:
            return b""
        data = out[0] if len(out) == 1 else b"".join(out)
        if amount is None or amount >= len(data):
            self._out = []
            return data
        self._out = [data[amount:]]
        return data[:amount]

    def take_output(self) -> list[bytes]:
        """Everything queued, as the frames' pieces (headers and bodies, not joined: a
        large DATA body goes on as the very object it was queued as)."""
        out, self._out = self._out, []
        return out

    def has_output(self) -> bool:
        return bool(self._out)

    def _frame(self, ftype: int, flags: int, sid: int, payload: bytes = b"") -> None:
        n = len(payload)
        self._out.append(_HEADER.pack(n >> 8, n & 0xFF, ftype, flags, sid) + payload)

    # -- connection actions ------------------------------------------------------------------
    def initiate(self) -> None:
        """Queue the preface (client), our SETTINGS and the connection window's growth."""
        if self.client_side:
            self._out.append(PREFACE)
        payload = b"".join(_SETTING.pack(k, v) for k, v in self.local_settings.items())
        self._frame(_T_SETTINGS, 0, 0, payload)
        grow = self._conn_window_target - DEFAULT_WINDOW
        if grow > 0:
            self._frame(_T_WINDOW, 0, 0, _U32.pack(grow))

    @property
    def peer_max_concurrent_streams(self) -> int:
        return self._remote_max_streams

    @property
    def open_outbound_streams(self) -> int:
        return self._open_local

    @property
    def open_inbound_streams(self) -> int:
        return self._open_remote

    def send_ping(self, payload: bytes) -> None:
        if len(payload) != 8:
            raise ValueError("PING payload must be 8 bytes")
        if not self.closed:  # a keepalive racing the end of the connection: nothing to do
            self._frame(_T_PING, 0, 0, payload)

    def send_goaway(self, error_code: int = ErrorCode.NO_ERROR, debug: bytes = b"") -> None:
        """Queue a GOAWAY naming the highest stream the peer opened that we saw. NO_ERROR keeps
        the open streams going (RFC 9113 §6.8); any other code ends the connection."""
        if self.closed:
            return
        self._frame(_T_GOAWAY, 0, 0,
                    _U32x2.pack(self.highest_inbound_stream_id, int(error_code)) + debug)
        self.goaway_sent = True
        if error_code != ErrorCode.NO_ERROR:
            self.closed = True

    def _check_open(self) -> None:
        if self.closed:
            raise ConnectionClosedError("HTTP/2 connection closed")

    # -- stream actions ----------------------------------------------------------------------
    def get_next_available_stream_id(self) -> int:
        last = self.highest_outbound_stream_id
        sid = (last + 2) if last else (1 if self.client_side else 2)
        if sid > MAX_STREAM_ID:
            raise H2Error("stream ids exhausted: open a new connection")
        return sid

    def _is_local_id(self, sid: int) -> bool:
        return bool(sid & 1) == self.client_side

    def send_headers(self, stream_id: int, headers: Iterable[tuple[bytes | str, bytes | str]],
                     end_stream: bool = False) -> None:
        """Queue a header block (HEADERS + CONTINUATION); opens the stream if it is new."""
        head = False
        if self.client_side and stream_id not in self._streams:
            if type(headers) is not list:
                headers = list(headers)
            for name, value in headers:  # :method comes first
                if name == b":method" or name == ":method":
                    head = value == b"HEAD" or value == "HEAD"
                    break
        self._send_block(stream_id, None, headers, end_stream, head)

    def send_header_block(self, stream_id: int, block: bytes, end_stream: bool = False, *,
                          head: bool = False) -> None:
        """:meth:`send_headers` with a block the caller encoded (with :attr:`encoder`, or
        statelessly); ``head``: it opens a HEAD request (the response has no content)."""
        self._send_block(stream_id, block, (), end_stream, head)

    def _send_block(self, stream_id: int, block: bytes | None,
                    headers: Iterable[tuple[bytes | str, bytes | str]], end_stream: bool,
                    head: bool) -> None:
        self._check_open()
        st = self._streams.get(stream_id)
        if st is None:
            if not self.client_side:
                raise H2Error("a server cannot open streams (no push)")
            if not self._is_local_id(stream_id) or stream_id <= self.highest_outbound_stream_id:
                raise StreamClosedError(f"stream {stream_id} cannot be opened")
            if stream_id > MAX_STREAM_ID:
                raise H2Error("stream ids exhausted")
            if self._open_local >= self._remote_max_streams:
                raise H2Error(f"peer allows {self._remote_max_streams} concurrent streams")
            st = _Stream(self._remote_initial_window, self._local_initial_window, True)
            st.head = head
            self._streams[stream_id] = st
            self._open_local += 1
            self.highest_outbound_stream_id = stream_id
        elif st.local_closed:
            raise StreamClosedError(f"stream {stream_id} already ended")
        if block is None:
            block = self.encoder.encode(headers)
        flags = END_STREAM if end_stream else 0
        maxf = self.max_outbound_frame_size
        if len(block) <= maxf:
            self._frame(_T_HEADERS, flags | END_HEADERS, stream_id, block)
        else:
            self._frame(_T_HEADERS, flags, stream_id, block[:maxf])
            for off in range(maxf, len(block), maxf):
                last = off + maxf >= len(block)
                self._frame(_T_CONT, END_HEADERS if last else 0, stream_id, block[off : off + maxf])
        if end_stream:
            self._local_end(stream_id, st)

    def stream_open(self, stream_id: int) -> bool:
        """Whether the stream is open (in either direction) as far as HTTP/2 goes."""
        return stream_id in self._streams

    def local_flow_control_window(self, stream_id: int) -> int:
        """Bytes of DATA we may send on the stream now (0 if it is not writable)."""
        st = self._streams.get(stream_id)
        if st is None or st.local_closed or self.closed:
            return 0
        w = st.send_window
        c = self.outbound_flow_control_window
        return w if w < c else c

    def send_data(self, stream_id: int, data: bytes | memoryview, end_stream: bool = False) -> int:
        """Queue as much of ``data`` as the windows allow, in frames no larger than the peer's
        limit; END_STREAM with the last byte if ``end_stream`` and all of it fitted. Returns
        the number of bytes queued. A whole ``bytes`` object is queued without a copy."""
        self._check_open()
        st = self._streams.get(stream_id)
        if st is None or st.local_closed:
            raise StreamClosedError(f"stream {stream_id} is not writable")
        total = len(data)
        if total == 0:
            if end_stream:
                self._frame(_T_DATA, END_STREAM, stream_id)
                self._local_end(stream_id, st)
            return 0
        window = st.send_window
        if self.outbound_flow_control_window < window:
            window = self.outbound_flow_control_window
        if window <= 0:
            return 0
        maxf = self.max_outbound_frame_size
        out = self._out
        hdr = _HEADER.pack
        whole: bytes | None = None
        if isinstance(data, bytes):
            whole = data
        elif isinstance(data.obj, bytes) and len(data.obj) == data.nbytes:
            whole = data.obj
        sent = 0
        view: memoryview | None = None
        while sent < total and window > 0:
            n = min(window, maxf, total - sent)
            if whole is not None and n == total:
                chunk = whole
            else:
                if view is None:
                    view = memoryview(data).cast("B") if isinstance(data, memoryview) else (
                        memoryview(data))
                chunk = view[sent : sent + n].tobytes()
            sent += n
            window -= n
            flags = END_STREAM if end_stream and sent == total else 0
            out.append(hdr(n >> 8, n & 0xFF, _T_DATA, flags, stream_id))
            out.append(chunk)
        st.send_window -= sent
        self.outbound_flow_control_window -= sent
        if end_stream and sent == total:
            self._local_end(stream_id, st)
        return sent

    def end_stream(self, stream_id: int) -> None:
        """Queue an empty DATA frame with END_STREAM (a half-close)."""
        self.send_data(stream_id, b"", end_stream=True)

    def reset_stream(self, stream_id: int, error_code: int = ErrorCode.CANCEL) -> bool:
        """Queue RST_STREAM unless the stream is not open; True if one was queued."""
        if self.closed or stream_id not in self._streams:
            return False
        self._frame(_T_RST, 0, stream_id, _U32.pack(int(error_code)))
        self._drop(stream_id)
        self._remember_reset(stream_id)
        return True

    def acknowledge_received_data(self, stream_id: int, n: int) -> None:
        """``n`` received bytes of the stream were consumed: hand them back to the peer's
        windows, with a WINDOW_UPDATE once half a window is owed."""
        if n <= 0 or self.closed:
            return
        self._conn_unacked += n
        # Half a window owed, or more owed than the peer may still send: streams whose
        # consumers do not read can hold most of the connection window, and the ones that
        # do read must not stall behind them (h2 does the same when the window is empty).
        unacked = self._conn_unacked
        if unacked >= self._conn_window_target >> 1 or unacked >= (
            self.inbound_flow_control_window
        ):
            inc = self._conn_unacked
            self._conn_unacked = 0
            self.inbound_flow_control_window += inc
            self._frame(_T_WINDOW, 0, 0, _U32.pack(inc))
        st = self._streams.get(stream_id)
        if st is not None and not st.remote_closed:
            st.unacked += n
            if st.unacked >= self._local_initial_window >> 1:
                inc = st.unacked
                st.unacked = 0
                st.recv_window += inc
                self._frame(_T_WINDOW, 0, stream_id, _U32.pack(inc))

    # -- stream bookkeeping --------------------------------------------------------------------
    def _local_end(self, sid: int, st: _Stream) -> None:
        st.local_closed = True
        if st.remote_closed:
            self._drop(sid)

    def _remote_end(self, sid: int, st: _Stream) -> None:
        st.remote_closed = True
        if st.local_closed:
            self._drop(sid)

    def _drop(self, sid: int) -> _Stream | None:
        st = self._streams.pop(sid, None)
        if st is not None:
            if st.local:
                self._open_local -= 1
            else:
                self._open_remote -= 1
        return st

    def _remember_reset(self, sid: int) -> None:
        memory = self._reset_by_us
        memory[sid] = None
        if len(memory) > RESET_MEMORY:
            del memory[next(iter(memory))]

    def _stream_error(self, sid: int, code: int, why: str, events: list) -> None:
        """RST_STREAM the stream; report it if it was open."""
        log.debug("HTTP/2 stream %d error %s: %s", sid, code, why)
        self._frame(_T_RST, 0, sid, _U32.pack(int(code)))
        if self._drop(sid) is not None:
            events.append(StreamReset(sid, int(code), remote=False))
        self._remember_reset(sid)
        self._flooded(_F_RESETS, "stream resets")

    def _flooded(self, kind: int, what: str) -> None:
        """Count one costly event of ``kind``; a connection error (ENHANCE_YOUR_CALM) when the
        peer is over its limit."""
        meters = self._meters
        if meters is None:
            meters = self._meters = [None, None, None, None]
        meter = meters[kind]
        if meter is None:
            limit = _limit(self.flood, kind)
            if limit is None:
                return
            meter = meters[kind] = _Rate(limit, self.flood.window, self._clock())
        if meter.hit(self._clock()):
            log.warning("HTTP/2 peer over the flood limit: more than %d %s in %g s",
                        meter.limit, what, meter.window)
            raise _conn_error(ErrorCode.ENHANCE_YOUR_CALM,
                              f"more than {meter.limit} {what} in {meter.window:g} s")

    def _is_idle(self, sid: int) -> bool:
        """A stream id never used yet (RFC 9113 §5.1 'idle')."""
        if self._is_local_id(sid):
            return sid > self.highest_outbound_stream_id
        return sid > self.highest_inbound_stream_id

    # -- input --------------------------------------------------------------------------------
    def receive_data(self, data: bytes | list[bytes]) -> list:
        """Feed bytes from the peer (one chunk, or several in order: e.g. the TLS records of
        one read, which then need not be joined); return events. Raise
        :class:`H2ConnectionError` (with a GOAWAY queued) if the peer broke HTTP/2."""
        if self.closed or not data:
            return []
        events: list = []
        try:
            for chunk in data if type(data) is list else (data,):
                if self._need_preface:
                    chunk = self._check_preface(chunk)
                if not chunk:
                    continue
                view = memoryview(chunk)
                if self._parts:
                    view = self._complete(view, events)
                    if view is None:
                        continue
                self._parse(view, events)
                if self.closed:  # the peer's GOAWAY with an error: nothing after it counts
                    break
        except H2ConnectionError as e:
            self._parts = []
            self.send_goaway(e.error_code)
            self.closed = True
            log.debug("HTTP/2 connection error %s: %s", e.error_code, e)
            raise
        return events

    def _check_preface(self, data: bytes) -> bytes:
        """Consume the client preface; return what follows it (b"" while incomplete)."""
        have = self._preface_got + bytes(data)
        n = min(len(have), len(PREFACE))
        if have[:n] != PREFACE[:n]:
            raise _conn_error(ErrorCode.PROTOCOL_ERROR, "invalid connection preface")
        if n < len(PREFACE):
            self._preface_got = have
            return b""
        self._need_preface = False
        self._preface_got = b""
        return have[len(PREFACE):]

    # An incomplete frame is kept as views of the chunks it arrived in (no copy), and joined
    # once, when complete: a frame payload is copied exactly once on its way in. (Appending
    # the rest of each read to a buffer allocated a fresh 256 KiB buffer per read, and its
    # page faults cost more system time than all the copying.)

    def _complete(self, view: memoryview, events: list) -> memoryview | None:
        """Finish the frame begun in ``self._parts`` with ``view``; return the bytes after
        it (None: still incomplete)."""
        parts = self._parts
        have = self._parts_len
        if len(parts[0]) < 9:  # the header itself was split: rare, and small
            head = b"".join(parts) + view.tobytes()
            self._parts = []
            self._parts_len = 0
            return memoryview(head)
        need = self._parts_need
        if have + len(view) < need:
            parts.append(view)
            self._parts_len = have + len(view)
            return None
        k = need - have  # bytes of view that belong to this frame
        _, _, ftype, flags, sid = _HEADER.unpack_from(parts[0])
        body = b"".join([parts[0][9:], *parts[1:], view[:k]])  # the one copy
        self._parts = []
        self._parts_len = 0
        self._dispatch(ftype, flags, sid & 0x7FFFFFFF, body, events)
        return view[k:]

    def _parse(self, view: memoryview, events: list) -> None:
        """Handle every whole frame in ``view``; keep an incomplete one for later."""
        pos = 0
        end = len(view)
        unpack = _HEADER.unpack_from
        maxf = self.max_inbound_frame_size
        while end - pos >= 9:
            hi, lo, ftype, flags, sid = unpack(view, pos)
            length = hi << 8 | lo
            if length > maxf:
                raise _conn_error(ErrorCode.FRAME_SIZE_ERROR, f"frame of {length} B > {maxf} B")
            start = pos + 9
            if end - start < length:
                self._parts_need = 9 + length
                break
            pos = start + length
            self._dispatch(ftype, flags, sid & 0x7FFFFFFF, view[start:pos], events)
            if self.closed:  # the peer's GOAWAY with an error: nothing after it counts
                return
        if pos < end:
            self._parts = [view[pos:]]
            self._parts_len = end - pos

    def _dispatch(self, ftype: int, flags: int, sid: int, body: memoryview | bytes,
                  events: list) -> None:
        if ftype == _T_DATA and not self._cont_sid and self._got_settings:
            self._on_data(sid, flags, body, len(body), events)
        else:
            self._on_frame(ftype, flags, sid, body if type(body) is bytes else body.tobytes(),
                           events)

    def _on_frame(self, ftype: int, flags: int, sid: int, body: bytes, events: list) -> None:
        if self._cont_sid:
            if ftype != _T_CONT or sid != self._cont_sid:
                raise _conn_error(ErrorCode.PROTOCOL_ERROR,
                                  "frame in the middle of a header block")
            self._on_continuation(flags, body, events)
            return
        if not self._got_settings:
            if ftype != _T_SETTINGS or flags & ACK:
                raise _conn_error(ErrorCode.PROTOCOL_ERROR,
                                  "connection preface must start with SETTINGS")
            self._got_settings = True
        if ftype == _T_DATA:
            self._on_data(sid, flags, body, len(body), events)
        elif ftype == _T_HEADERS:
            self._on_headers(sid, flags, body, events)
        elif ftype == _T_WINDOW:
            self._on_window_update(sid, body, events)
        elif ftype == _T_RST:
            self._on_rst(sid, body, events)
        elif ftype == _T_SETTINGS:
            self._on_settings(sid, flags, body, events)
        elif ftype == _T_PING:
            if sid:
                raise _conn_error(ErrorCode.PROTOCOL_ERROR, "PING on a stream")
            if len(body) != 8:
                raise _conn_error(ErrorCode.FRAME_SIZE_ERROR, "PING length not 8")
            if flags & ACK:
                events.append(PingAcked(body))
            else:
                self._flooded(_F_PINGS, "PINGs")
                self._frame(_T_PING, ACK, 0, body)
        elif ftype == _T_GOAWAY:
            self._on_goaway(sid, body, events)
        elif ftype == _T_PRIORITY:
            if not sid:
                raise _conn_error(ErrorCode.PROTOCOL_ERROR, "PRIORITY on stream 0")
            if len(body) != 5:
                self._stream_error(sid, ErrorCode.FRAME_SIZE_ERROR, "PRIORITY length", events)
            elif _U32.unpack_from(body)[0] & 0x7FFFFFFF == sid:
                self._stream_error(sid, ErrorCode.PROTOCOL_ERROR, "depends on itself", events)
            # otherwise ignored: RFC 9113 deprecates the priority scheme
        elif ftype == _T_CONT:
            raise _conn_error(ErrorCode.PROTOCOL_ERROR, "CONTINUATION without HEADERS")
        elif ftype == _T_PUSH:
            raise _conn_error(ErrorCode.PROTOCOL_ERROR, "PUSH_PROMISE (push is disabled)")
        # unknown frame types are ignored (RFC 9113 §4.1)

    # -- DATA ---------------------------------------------------------------------------------
    def _on_data(self, sid: int, flags: int, body: memoryview | bytes, length: int,
                 events: list) -> None:
        if not sid:
            raise _conn_error(ErrorCode.PROTOCOL_ERROR, "DATA on stream 0")
        if flags & PADDED:
            if not length:
                raise _conn_error(ErrorCode.FRAME_SIZE_ERROR, "padded DATA without pad length")
            pad = body[0]
            if pad >= length:
                raise _conn_error(ErrorCode.PROTOCOL_ERROR, "padding longer than the frame")
            body = body[1 : length - pad]
        if not len(body) and not flags & END_STREAM:
            self._flooded(_F_EMPTY, "empty frames")
        if length > self.inbound_flow_control_window:
            raise _conn_error(ErrorCode.FLOW_CONTROL_ERROR,
                              "DATA beyond the connection window")
        self.inbound_flow_control_window -= length
        st = self._streams.get(sid)
        if st is None or st.remote_closed:
            if self._is_idle(sid):
                raise _conn_error(ErrorCode.PROTOCOL_ERROR, f"DATA on idle stream {sid}")
            # nobody will read it: the connection credit goes back at once (st, if any, is
            # half-closed: only the connection window is credited)
            self.acknowledge_received_data(sid, length)
            if sid not in self._reset_by_us:
                self._stream_error(sid, ErrorCode.STREAM_CLOSED, "DATA after END_STREAM",
                                   events)
            return
        if length > st.recv_window:
            raise _conn_error(ErrorCode.FLOW_CONTROL_ERROR, f"DATA beyond stream {sid}'s window")
        st.recv_window -= length
        n = len(body)
        left = st.left
        if left >= 0:
            left -= n
            if left < 0 or (left and flags & END_STREAM):
                self._stream_error(sid, ErrorCode.PROTOCOL_ERROR,
                                   "DATA do not add up to content-length", events)
                self.acknowledge_received_data(sid, length)  # the connection's share
                return
            st.left = left
        if n:
            events.append(DataReceived(sid, body if type(body) is bytes else body.tobytes()))
        if n != length:  # padding is never buffered: hand it back now
            self.acknowledge_received_data(sid, length - n)
        if flags & END_STREAM:
            events.append(EndOfStream(sid))
            self._remote_end(sid, st)

    # -- HEADERS and CONTINUATION -------------------------------------------------------------
    def _on_headers(self, sid: int, flags: int, body: bytes, events: list) -> None:
        if not sid:
            raise _conn_error(ErrorCode.PROTOCOL_ERROR, "HEADERS on stream 0")
        start, end = 0, len(body)
        if flags & PADDED:
            if not end:
                raise _conn_error(ErrorCode.FRAME_SIZE_ERROR, "padded HEADERS without length")
            pad = body[0]
            start = 1
            end -= pad
        if flags & PRIORITY_FLAG:
            if end - start < 5:
                raise _conn_error(ErrorCode.FRAME_SIZE_ERROR, "HEADERS priority truncated")
            dep = _U32.unpack_from(body, start)[0] & 0x7FFFFFFF
            start += 5
            if dep == sid:  # still decoded below: HPACK state must stay in step
                flags |= 0x100  # internal marker: self-dependency
        if end < start:
            raise _conn_error(ErrorCode.PROTOCOL_ERROR, "padding longer than the frame")
        if not self._is_local_id(sid) and sid not in self._streams and sid > (
            self.highest_inbound_stream_id
        ):
            if self.client_side:
                raise _conn_error(ErrorCode.PROTOCOL_ERROR, f"server opened stream {sid}")
        elif self._is_local_id(sid) and sid > self.highest_outbound_stream_id:
            raise _conn_error(ErrorCode.PROTOCOL_ERROR, f"HEADERS on idle stream {sid}")
        fragment = body[start:end]
        if not fragment and not flags & END_STREAM:
            self._flooded(_F_EMPTY, "empty frames")
        if flags & END_HEADERS:
            self._on_header_block(sid, flags, fragment, events)
        else:
            self._cont_sid = sid
            self._cont_flags = flags
            self._cont_parts = [fragment]
            self._cont_size = len(fragment)

    def _on_continuation(self, flags: int, body: bytes, events: list) -> None:
        if not body and not flags & END_HEADERS:
            self._flooded(_F_EMPTY, "empty frames")
        self._cont_parts.append(body)
        self._cont_size += len(body)
        # A header block larger than what the decoder would accept at all: no need to wait
        # for the rest (HPACK literals can at most be ~4x larger when Huffman coded).
        if self._cont_size > 4 * self.decoder.max_header_list_size + 4096:
            raise _conn_error(ErrorCode.ENHANCE_YOUR_CALM, "header block too large")
        if flags & END_HEADERS:
            sid, hflags = self._cont_sid, self._cont_flags
            block = b"".join(self._cont_parts)
            self._cont_sid = 0
            self._cont_parts = []
            self._cont_size = 0
            self._on_header_block(sid, hflags, block, events)

    def _on_header_block(self, sid: int, flags: int, block: bytes, events: list) -> None:
        try:
            headers = self.decoder.decode(block, raw=True)
        except hpack.OversizedHeaderListError as e:
            raise _conn_error(ErrorCode.ENHANCE_YOUR_CALM, f"header list too large: {e}") from e
        except (hpack.HPACKError, ValueError, IndexError, TypeError) as e:
            raise _conn_error(ErrorCode.COMPRESSION_ERROR, f"HPACK: {e}") from e
        ended = bool(flags & END_STREAM)
        st = self._streams.get(sid)
        if st is None:
            if self._is_local_id(sid) or sid <= self.highest_inbound_stream_id:
                # closed: frames in flight after our RST_STREAM are ignored
                if sid not in self._reset_by_us:
                    self._stream_error(sid, ErrorCode.STREAM_CLOSED, "HEADERS on a closed stream",
                                       events)
                return
            # a new stream from the client (the checks in _on_headers ruled out the rest)
            self.highest_inbound_stream_id = sid
            if flags & 0x100:
                self._stream_error(sid, ErrorCode.PROTOCOL_ERROR, "depends on itself", events)
                return
            if self._open_remote >= self._local_max_streams:
                self._stream_error(sid, ErrorCode.REFUSED_STREAM, "too many streams", events)
                return
            st = _Stream(self._remote_initial_window, self._local_initial_window, False)
            self._streams[sid] = st
            self._open_remote += 1
            trailers = False
        elif st.remote_closed:
            self._stream_error(sid, ErrorCode.STREAM_CLOSED, "HEADERS after END_STREAM", events)
            return
        else:
            trailers = st.got_headers
        if flags & 0x100:
            self._stream_error(sid, ErrorCode.PROTOCOL_ERROR, "depends on itself", events)
            return
        request = not self.client_side
        why, length, status = inspect_block(headers, request=request, trailers=trailers)
        if why is None:
            if trailers:
                if not ended:
                    why = "trailers without END_STREAM"
                elif st.left > 0:
                    why = "DATA do not add up to content-length"
            elif status < 200 and not request:
                if ended:
                    why = "1xx response with END_STREAM"
                else:  # informational: the final response is still to come
                    if self.informational:
                        events.append(InformationalReceived(sid, headers, status))
                    return
            else:
                if not request and (st.head or status == 204 or status == 304):
                    length = 0  # no content, whatever content-length says (RFC 9110 §8.6)
                if ended and length > 0:
                    why = "DATA do not add up to content-length"
                st.left = length
        if why is not None:
            self._stream_error(sid, ErrorCode.PROTOCOL_ERROR, f"malformed: {why}", events)
            return
        if not trailers:
            st.got_headers = True
        events.append(HeadersReceived(sid, headers, ended, trailers, status))
        if ended:
            events.append(EndOfStream(sid))
            self._remote_end(sid, st)

    # -- control frames -----------------------------------------------------------------------
    def _on_window_update(self, sid: int, body: bytes, events: list) -> None:
        if len(body) != 4:
            raise _conn_error(ErrorCode.FRAME_SIZE_ERROR, "WINDOW_UPDATE length not 4")
        inc = _U32.unpack(body)[0] & 0x7FFFFFFF
        if not sid:
            if not inc:
                raise _conn_error(ErrorCode.PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            w = self.outbound_flow_control_window + inc
            if w > MAX_WINDOW:
                raise _conn_error(ErrorCode.FLOW_CONTROL_ERROR, "connection window overflow")
            self.outbound_flow_control_window = w
            events.append(_WINDOW_CHANGED)
            return
        st = self._streams.get(sid)
        if st is None:
            if self._is_idle(sid):
                raise _conn_error(ErrorCode.PROTOCOL_ERROR, f"WINDOW_UPDATE on idle stream {sid}")
            return  # closed: allowed for a while, ignored
        if not inc:
            self._stream_error(sid, ErrorCode.PROTOCOL_ERROR, "WINDOW_UPDATE of 0", events)
            return
        w = st.send_window + inc
        if w > MAX_WINDOW:
            self._stream_error(sid, ErrorCode.FLOW_CONTROL_ERROR, "stream window overflow",
                               events)
            return
        st.send_window = w
        events.append(_WINDOW_CHANGED)

    def _on_rst(self, sid: int, body: bytes, events: list) -> None:
        if not sid:
            raise _conn_error(ErrorCode.PROTOCOL_ERROR, "RST_STREAM on stream 0")
        if len(body) != 4:
            raise _conn_error(ErrorCode.FRAME_SIZE_ERROR, "RST_STREAM length not 4")
        if self._drop(sid) is not None:
            events.append(StreamReset(sid, _U32.unpack(body)[0]))
        elif self._is_idle(sid):
            raise _conn_error(ErrorCode.PROTOCOL_ERROR, f"RST_STREAM on idle stream {sid}")
        self._flooded(_F_RESETS, "stream resets")

    def _on_settings(self, sid: int, flags: int, body: bytes, events: list) -> None:
        if sid:
            raise _conn_error(ErrorCode.PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            if body:
                raise _conn_error(ErrorCode.FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            return
        if len(body) % 6:
            raise _conn_error(ErrorCode.FRAME_SIZE_ERROR, "SETTINGS length not a multiple of 6")
        self._flooded(_F_SETTINGS, "SETTINGS frames")
        rs = self.remote_settings
        for off in range(0, len(body), 6):
            code, value = _SETTING.unpack_from(body, off)
            if code == Setting.ENABLE_PUSH:
                if value > 1 or (value and self.client_side):
                    raise _conn_error(ErrorCode.PROTOCOL_ERROR, f"ENABLE_PUSH {value}")
            elif code == Setting.INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise _conn_error(ErrorCode.FLOW_CONTROL_ERROR,
                                      f"INITIAL_WINDOW_SIZE {value}")
                delta = value - self._remote_initial_window
                self._remote_initial_window = value
                if delta:
                    for st in self._streams.values():
                        st.send_window += delta
                        if st.send_window > MAX_WINDOW:
                            raise _conn_error(ErrorCode.FLOW_CONTROL_ERROR,
                                              "stream window overflow by SETTINGS")
            elif code == Setting.MAX_FRAME_SIZE:
                if not DEFAULT_MAX_FRAME <= value <= MAX_FRAME_LIMIT:
                    raise _conn_error(ErrorCode.PROTOCOL_ERROR, f"MAX_FRAME_SIZE {value}")
                self.max_outbound_frame_size = value
            elif code == Setting.MAX_CONCURRENT_STREAMS:
                self._remote_max_streams = value
            elif code == Setting.HEADER_TABLE_SIZE:
                self.encoder.header_table_size = value
            rs[code] = value  # unknown settings are kept, and otherwise ignored
        self._frame(_T_SETTINGS, ACK, 0)
        events.append(_WINDOW_CHANGED)

    def _on_goaway(self, sid: int, body: bytes, events: list) -> None:
        if sid:
            raise _conn_error(ErrorCode.PROTOCOL_ERROR, "GOAWAY on a stream")
        if len(body) < 8:
            raise _conn_error(ErrorCode.FRAME_SIZE_ERROR, "GOAWAY shorter than 8 bytes")
        last, code = _U32x2.unpack_from(body)
        last &= 0x7FFFFFFF
        self.goaway_received = True
        # Our streams above last_stream_id were never processed: gone (the caller retries).
        for s in [s for s in self._streams if s > last and self._is_local_id(s)]:
            self._drop(s)
            self._remember_reset(s)
        events.append(GoAway(code, last))
        if code != ErrorCode.NO_ERROR:
            self.closed = True
