"""HBONE over HTTP/2, sans-IO: settings, CONNECT headers, request validation, stream events.

HBONE is one classic HTTP/2 ``CONNECT`` stream per application TCP connection, inside a TLS 1.3
connection to ``podIP:15008``. This module holds everything about it that needs no IO:
:class:`HboneH2` drives our own HTTP/2 engine (``frames.py``; the ``h2`` library cost ≈ 250 µs
per stream per end), applies the HBONE settings, turns header blocks into the few per-stream
events the trio driver (``connection.py``) acts on, answers malformed requests itself, and keeps
header-size limits per stream instead of per connection.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import random
import secrets
from dataclasses import dataclass, field

import hpack
import hpack.table

from .frames import (
    DataReceived,
    EndOfStream,
    ErrorCode,
    GoAway,
    H2ConnectionError,
    H2Engine,
    HeadersReceived,
    PingAcked,
    Setting,
    StreamReset,
    WindowChanged,
)
from .hpackplain import StatelessEncoder, decode_plain

log = logging.getLogger(__name__)

HBONE_PORT = 15008
STREAM_WINDOW = 4 * 1024 * 1024
# Larger than the stream window: equal values can deadlock a connection whose streams all wait.
CONNECTION_WINDOW = 16 * 1024 * 1024
MAX_FRAME_SIZE = 1024 * 1024
SERVER_MAX_CONCURRENT_STREAMS = 200
CLIENT_MAX_HEADER_LIST = 16 * 1024
SERVER_MAX_HEADER_LIST = 64 * 1024
# What the HPACK decoder tolerates before h2 tears the whole connection down. Header blocks
# between the advertised limit and this cap are refused per stream (431 / RST_STREAM).
HPACK_HARD_CAP = MAX_FRAME_SIZE
PING_INTERVAL = 10.0
PING_TIMEOUT = 20.0
H2_DEFAULT_WINDOW = 65535

class _CappedDecoder(hpack.Decoder):
    """HPACK decoder with a hard size cap above the advertised limit: a block beyond the cap
    is a connection error, one between the limit and the cap is refused per stream (431)."""

    @property  # type: ignore[override]
    def max_header_list_size(self) -> int:
        return HPACK_HARD_CAP

    @max_header_list_size.setter
    def max_header_list_size(self, value: int) -> None:
        pass

    def decode(self, data: bytes, raw: bool = False):  # type: ignore[no-untyped-def]
        # A block in plain HPACK (what our peers send: ":status: 200", a CONNECT) changes no
        # state: read directly; anything else goes through hpack's generic path.
        if raw:
            fields = decode_plain(data, HPACK_HARD_CAP)
            if fields is not None:
                return fields
        return super().decode(data, raw=raw)


# Header values that differ on every request: kept out of the encoder's cache of fields.
_UNIQUE_PER_REQUEST = frozenset({"traceparent", "forwarded"})


# --------------------------------------------------------------------------------------------
# Requests


class HboneError(Exception):
    """Anything that makes an HBONE stream or connection fail."""


class HboneRequestError(HboneError):
    """An incoming request the server answers itself (``status``) without calling a handler."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status}: {reason}")
        self.status = status
        self.reason = reason


@dataclass(frozen=True, slots=True)  # slots: one per open tunnel, for as long as it is open
class ConnectRequest:
    """A valid HBONE CONNECT request."""

    authority: str
    host: str
    port: int
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def target(self) -> tuple[str, int]:
        return (self.host, self.port)


@functools.lru_cache(maxsize=1024)  # a node proxy talks to the same few hundred targets
def parse_authority(authority: str) -> tuple[str, int]:
    """``ip:port`` or ``[v6]:port`` → (ip, port); raise :class:`HboneRequestError` (400)."""
    if authority.startswith("["):
        end = authority.find("]")
        if end < 0 or authority[end + 1 : end + 2] != ":":
            raise HboneRequestError(400, f"bad authority {authority!r}")
        host, port_s, want_v6 = authority[1:end], authority[end + 2 :], True
    else:
        host, sep, port_s = authority.rpartition(":")
        if not sep:
            raise HboneRequestError(400, f"authority without port {authority!r}")
        want_v6 = False
    if "%" in host:
        raise HboneRequestError(400, f"scoped address in authority {authority!r}")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise HboneRequestError(400, f"authority host is not an IP {authority!r}") from None
    if (ip.version == 6) != want_v6:
        raise HboneRequestError(400, f"bad authority {authority!r}")
    if not port_s.isdigit() or not port_s.isascii() or len(port_s) > 5:
        raise HboneRequestError(400, f"bad port in authority {authority!r}")
    port = int(port_s)
    if not 1 <= port <= 65535:
        raise HboneRequestError(400, f"port out of range in authority {authority!r}")
    return str(ip), port


def format_authority(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def header_list_size(headers: list[tuple[bytes, bytes]] | list[tuple[str, str]]) -> int:
    """RFC 9113 §6.5.2 size: name + value + 32 per field."""
    return sum(len(n) + len(v) + 32 for n, v in headers)


def _text(v: bytes | str) -> str:
    return v.decode("latin-1") if isinstance(v, bytes | bytearray) else v


# Header names an HBONE request carries, as shared strings: the request's headers live as long
# as its tunnel, and a decoded, lower-cased copy of each name per tunnel was ~60 B a name.
_KNOWN_NAMES: dict[bytes | str, str] = {}
for _name in (":method", ":authority", ":scheme", ":path", ":protocol", "forwarded",
              "baggage", "traceparent", "tracestate", "x-forwarded-for", "user-agent"):
    _KNOWN_NAMES[_name] = _KNOWN_NAMES[_name.encode()] = _name


def parse_connect(headers: list[tuple[bytes, bytes]] | list[tuple[str, str]]) -> ConnectRequest:
    """Validate an incoming request header block; raise :class:`HboneRequestError` (400)."""
    method = authority = None
    plain: dict[str, str] = {}
    for raw_name, raw_value in headers:
        name = _KNOWN_NAMES.get(raw_name) or _text(raw_name).lower()
        value = _text(raw_value)
        if name == ":method":
            method = value
        elif name == ":authority":
            authority = value
        elif name.startswith(":"):
            continue  # :scheme/:path/:protocol → not a classic CONNECT; caught below
        elif name in plain:
            plain[name] = f"{plain[name]},{value}"
        else:
            plain[name] = value
    if method != "CONNECT":
        raise HboneRequestError(400, f"method {method!r} is not CONNECT")
    pseudo = {_text(n) for n, _ in headers if _text(n).startswith(":")}
    if pseudo - {":method", ":authority"}:
        raise HboneRequestError(400, f"not a classic CONNECT: {sorted(pseudo)}")
    if not authority:
        raise HboneRequestError(400, "missing :authority")
    host, port = parse_authority(authority)
    return ConnectRequest(authority=authority, host=host, port=port, headers=plain)


_trace_rng = random.Random()


def new_traceparent() -> str:
    """A random W3C traceparent, as ztunnel sends one per connection.

    Trace ids need to be unique, not secret: a PRNG seeded from the OS, instead of two
    getrandom(2) calls per connection."""
    trace = _trace_rng.getrandbits(128) or 1  # all-zero ids are invalid
    span = _trace_rng.getrandbits(64) or 1
    return f"00-{trace:032x}-{span:016x}-00"


def connect_headers(
    authority: str,
    *,
    forwarded_for: str | None,
    baggage: str | None,
    traceparent: str | None = None,
    host: str | None = None,
) -> list[tuple[str, str]]:
    """Request headers for an HBONE CONNECT (without the pseudo-headers).

    ``forwarded_for`` is the client's ``ip:port`` (``host``: the service it addressed, when
    it addressed one); ``traceparent`` defaults to a new random one.
    """
    parse_authority(authority)  # fail early on our own bad input
    headers: list[tuple[str, str]] = []
    if forwarded_for is not None:
        value = f'for="{forwarded_for}"'
        headers.append(("forwarded", f"{value};host={host}" if host else value))
    if baggage is not None:
        headers.append(("baggage", baggage))
    headers.append(("traceparent", traceparent or new_traceparent()))
    return headers


def baggage_value(namespace: str, pod: str, **more: str) -> str:
    """``k8s.namespace.name=…,k8s.pod.name=…`` plus e.g. ``service_name=…`` → ``service.name``."""
    items = [("k8s.namespace.name", namespace), ("k8s.pod.name", pod)]
    items += [(k.replace("_", "."), v) for k, v in more.items()]
    return ",".join(f"{k}={v}" for k, v in items)


def parse_forwarded_for(value: str) -> tuple[str, int] | None:
    """The ``for=`` address of a ``forwarded`` header, or None if absent or malformed."""
    for part in value.split(";"):
        key, _, v = part.strip().partition("=")
        if key.strip().lower() == "for":
            try:
                return parse_authority(v.strip().strip('"'))
            except HboneRequestError:
                return None
    return None


# --------------------------------------------------------------------------------------------
# Per-stream events produced by HboneH2.receive()


@dataclass
class ConnectRequested:
    """Server: a valid CONNECT arrived (``ended``: it came with END_STREAM)."""

    stream_id: int
    request: ConnectRequest
    ended: bool = False


@dataclass
class RequestRefused:
    """Server: a request was answered by the protocol itself (400/431); no handler runs."""

    stream_id: int
    status: int
    reason: str


@dataclass
class ResponseReceived:
    """Client: the response status of a CONNECT."""

    stream_id: int
    status: int
    ended: bool = False


Event = (
    ConnectRequested
    | RequestRefused
    | ResponseReceived
    | DataReceived
    | EndOfStream
    | StreamReset
    | WindowChanged
    | PingAcked
    | GoAway
)


class HboneProtocolError(HboneError):
    """The peer broke HTTP/2; a GOAWAY is queued in :meth:`HboneH2.data_to_send`."""


class HboneH2:
    """One HBONE HTTP/2 connection, sans-IO. Feed bytes to :meth:`receive`; send
    :meth:`data_to_send` after every call that may have produced output.

    The HTTP/2 work is done by :class:`~ztunnel.hbone.frames.H2Engine` (``self.h2``); this
    class applies the HBONE settings and turns header blocks into CONNECT requests and
    responses, answering malformed requests itself."""

    def __init__(self, *, client_side: bool) -> None:
        self.client_side = client_side
        self.max_header_list = CLIENT_MAX_HEADER_LIST if client_side else SERVER_MAX_HEADER_LIST
        settings = {
            Setting.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            Setting.MAX_FRAME_SIZE: MAX_FRAME_SIZE,
            Setting.MAX_HEADER_LIST_SIZE: self.max_header_list,
        }
        if client_side:
            settings[Setting.ENABLE_PUSH] = 0
        else:
            settings[Setting.MAX_CONCURRENT_STREAMS] = SERVER_MAX_CONCURRENT_STREAMS
        self.h2 = H2Engine(
            client_side=client_side,
            local_settings=settings,
            connection_window=CONNECTION_WINDOW,
            # no dynamic table, no Huffman: a CONNECT's fields are one dict lookup each or
            # (traceparent, forwarded) a few bytes joined; hpack's encoder searched and grew
            # its table per field (≈ 3 times the CPU). A few more bytes on the wire.
            encoder=StatelessEncoder(uncached=_UNIQUE_PER_REQUEST, strict=True),
            decoder=_CappedDecoder(),
        )
        self.goaway_sent = False

    @property
    def goaway_received(self) -> bool:
        return self.h2.goaway_received

    # -- setup and connection-level actions -------------------------------------------------
    def initiate(self) -> None:
        """Queue the preface and the HBONE settings and grow the connection window."""
        self.h2.initiate()

    def data_to_send(self) -> bytes:
        return self.h2.data_to_send()

    def take_output(self) -> list[bytes]:
        """What :meth:`data_to_send` would return, as pieces (not joined)."""
        return self.h2.take_output()

    def has_output(self) -> bool:
        """Whether :meth:`data_to_send` would return bytes (saves waking the writer)."""
        return bool(self.h2._out)

    def ping(self) -> bytes:
        payload = secrets.token_bytes(8)
        self.h2.send_ping(payload)
        return payload

    def goaway(self, error_code: int = ErrorCode.NO_ERROR) -> None:
        """Queue a GOAWAY. NO_ERROR drains: open streams go on, new ones are refused."""
        if error_code != ErrorCode.NO_ERROR or not self.goaway_sent:
            self.h2.send_goaway(error_code)  # a no-op once the connection is closed
        self.goaway_sent = True

    @property
    def peer_max_concurrent_streams(self) -> int:
        return self.h2.peer_max_concurrent_streams

    # -- stream actions -----------------------------------------------------------------------
    def open_request(self, authority: str, headers: list[tuple[str, str]] | tuple = ()) -> int:
        """Client: queue a CONNECT and return its stream id."""
        # encoded first: the encoder checks every field as RFC 9113 §8.2 wants, and a
        # ValueError must leave no stream behind
        block = self.h2.encoder.encode(
            [(":method", "CONNECT"), (":authority", authority), *headers])
        sid = self.h2.get_next_available_stream_id()
        self.h2.send_header_block(sid, block)
        return sid

    def respond(self, stream_id: int, status: int, *, end_stream: bool = False) -> None:
        self.h2.send_headers(stream_id, [(":status", str(status))],
                             end_stream=end_stream)

    def send_window(self, stream_id: int) -> int:
        """How many bytes of DATA may be queued on the stream now."""
        return self.h2.local_flow_control_window(stream_id)

    def send_data(self, stream_id: int, data: bytes | memoryview) -> int:
        """Queue as much of ``data`` as the windows allow, in frames of at most the peer's max
        frame size; return the number of bytes queued."""
        return self.h2.send_data(stream_id, data)

    def end_stream(self, stream_id: int) -> None:
        self.h2.end_stream(stream_id)

    def reset(self, stream_id: int, error_code: int = ErrorCode.CANCEL) -> bool:
        """Queue RST_STREAM unless the stream is already closed; True if one was queued."""
        return self.h2.reset_stream(stream_id, error_code)

    def acknowledge(self, stream_id: int, n: int) -> None:
        """Hand ``n`` consumed bytes back to the peer's windows (the back-pressure point)."""
        self.h2.acknowledge_received_data(stream_id, n)

    # -- input ----------------------------------------------------------------------------------
    def receive(self, data: bytes | list[bytes]) -> list[Event]:
        """Feed bytes from the peer (one chunk or a list of them, in order); raise
        :class:`HboneProtocolError` if HTTP/2 is broken."""
        try:
            events = self.h2.receive_data(data)
        except H2ConnectionError as e:
            self.goaway_sent = True  # the engine queued it
            raise HboneProtocolError(
                f"HTTP/2 protocol error ({ErrorCode(e.error_code).name}): {e}") from e
        dropped = False
        for i, ev in enumerate(events):
            if type(ev) is HeadersReceived:
                mapped = self._on_headers(ev)
                if mapped is None:  # trailers: nothing to report but their END_STREAM
                    dropped = True
                events[i] = mapped
        return [ev for ev in events if ev is not None] if dropped else events

    def _on_headers(self, ev: HeadersReceived) -> Event | None:
        if ev.trailers:
            return None  # END_STREAM follows as its own event
        if self.client_side:
            return self._on_response(ev)
        return self._on_request(ev)

    def _on_request(self, ev: HeadersReceived) -> Event:
        sid = ev.stream_id
        headers = ev.headers
        if self.goaway_sent:
            self.reset(sid, ErrorCode.REFUSED_STREAM)
            return RequestRefused(sid, 0, "draining: stream refused")
        size = header_list_size(headers)
        try:
            if size > self.max_header_list:
                raise HboneRequestError(431, f"header list {size} B > {self.max_header_list} B")
            request = parse_connect(headers)
        except HboneRequestError as e:
            self.respond(sid, e.status, end_stream=True)
            return RequestRefused(sid, e.status, e.reason)
        return ConnectRequested(sid, request, ended=ev.ended)

    def _on_response(self, ev: HeadersReceived) -> Event:
        sid = ev.stream_id
        headers = ev.headers
        size = header_list_size(headers)
        if size > self.max_header_list:
            self.reset(sid, ErrorCode.PROTOCOL_ERROR)
            return StreamReset(sid, ErrorCode.PROTOCOL_ERROR, remote=False)
        status = 0
        for name, value in headers:
            if name == b":status":
                status = int(value)  # the engine checked: three digits
        return ResponseReceived(sid, status, ended=ev.ended)
