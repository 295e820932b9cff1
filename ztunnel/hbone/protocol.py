"""HBONE over HTTP/2, sans-IO: settings, CONNECT headers, request validation, stream events.

HBONE is one classic HTTP/2 ``CONNECT`` stream per application TCP connection, inside a TLS 1.3
connection to ``podIP:15008``. This module holds everything about it that needs no IO:
:class:`HboneH2` wraps an :class:`h2.connection.H2Connection`, applies the HBONE settings, turns
h2 events into the few per-stream events the trio driver (``connection.py``) acts on, answers
malformed requests itself, and keeps header-size limits per stream instead of per connection.
"""

from __future__ import annotations

import ipaddress
import logging
import random
import re
import secrets
import struct
from dataclasses import dataclass, field

import h2
import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.frame_buffer
import h2.settings
import hpack
import hyperframe
import hyperframe.frame
from h2.errors import ErrorCodes

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

# --------------------------------------------------------------------------------------------
# h2 4.4 formats repr(frame) for every received frame (for a trace log that is off), and a DATA
# frame's repr serialises and hex-encodes its whole body: 4x-40x slower receives. We make the
# DATA body repr constant-time, only for the versions we checked this against.
_REPR_PATCHED_VERSIONS = {("4.4.1", "6.1.0")}


def _cheap_data_body_repr(self: hyperframe.frame.DataFrame) -> str:
    return f"<{len(self.data)} bytes>"


def install_data_repr_workaround() -> bool:
    """Make ``repr(DataFrame)`` cheap; True if the workaround is in effect."""
    cls = hyperframe.frame.DataFrame
    if cls.__dict__.get("_body_repr") is _cheap_data_body_repr:
        return True
    versions = (h2.__version__, hyperframe.__version__)
    if versions not in _REPR_PATCHED_VERSIONS:
        log.warning("h2/hyperframe %s not checked for the DATA repr workaround; not applied",
                    versions)
        return False
    if "_body_repr" in cls.__dict__:  # upstream changed the class: leave it alone
        return False
    cls._body_repr = _cheap_data_body_repr  # type: ignore[method-assign]
    return True


DATA_REPR_WORKAROUND = install_data_repr_workaround()


class _CappedDecoder(hpack.Decoder):
    """HPACK decoder whose size cap ignores SETTINGS: h2 would turn an oversize block into a
    connection error, killing every stream; we check the advertised limit per stream."""

    @property  # type: ignore[override]
    def max_header_list_size(self) -> int:
        return HPACK_HARD_CAP

    @max_header_list_size.setter
    def max_header_list_size(self, value: int) -> None:
        pass


class _PlainEncoder(hpack.Encoder):
    """HPACK encoder that sends literals without Huffman coding.

    hpack's Huffman coder (and the peer's decoder) is pure Python, per character: it was a
    third of the cost of a CONNECT. Our header values are short; the few extra bytes on the
    wire are cheaper than the CPU. Any HPACK decoder accepts both forms (RFC 7541 §5.2)."""

    def encode(self, headers, huffman: bool = False) -> bytes:  # type: ignore[override]
        return super().encode(headers, huffman=False)


# Header values that differ on every request: indexing them would only churn the HPACK
# dynamic table (and make every table search longer) on both sides.
_UNIQUE_PER_REQUEST = frozenset({b"traceparent", b"forwarded"})


_BAD_NAME = re.compile(r"[^!#$%&'*+\-.^_`|~0-9a-z]")
_BAD_VALUE = re.compile(r"[\x00\r\n]")


def _check_header(name: str, value: str) -> None:
    """RFC 9113 §8.2.1 for a header we send (h2's own outbound validation is off)."""
    bare = name[1:] if name.startswith(":") else name
    if not bare or _BAD_NAME.search(bare):
        raise ValueError(f"invalid header name {name!r}")
    if _BAD_VALUE.search(value) or value[:1] in (" ", "\t") or value[-1:] in (" ", "\t"):
        raise ValueError(f"invalid value for header {name!r}")
    if bare in ("connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"):
        raise ValueError(f"connection-specific header {name!r}")


_FRAME_HEADER = struct.Struct(">HBBBL")  # 24-bit length, type, flags, stream id
_END_STREAM = 0x1
_PADDED = 0x8


class _FrameBuffer(h2.frame_buffer.FrameBuffer):
    """h2's frame buffer with a fast path for whole, unpadded DATA frames on a stream: the
    payload is copied once out of the buffer (h2 copies it twice and parses the 9-byte
    header again on every partial read). Everything else goes through h2's own parser."""

    def __next__(self) -> hyperframe.frame.Frame:
        buf = self._data
        if len(buf) >= 9 and buf[3] == 0 and not buf[4] & _PADDED and not self._headers_buffer:
            length = int.from_bytes(buf[0:3], "big")
            stream_id = int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF
            if stream_id and length <= self.max_frame_size:
                if len(buf) < 9 + length:
                    raise StopIteration
                frame = hyperframe.frame.DataFrame(stream_id)
                frame.parse_flags(buf[4])
                with memoryview(buf) as view, view[9 : 9 + length] as body:
                    frame.data = body.tobytes()
                frame.body_len = length
                del buf[: 9 + length]
                return frame
        return super().__next__()


class _HboneH2Connection(h2.connection.H2Connection):
    """h2 treats every GOAWAY as the end of the connection: it drops queued output and refuses
    any further frame, so in-flight streams cannot finish. A drain needs the RFC 9113 §6.8
    behaviour: a NO_ERROR GOAWAY only stops *new* streams. (Checked against h2 4.4.1.)"""

    # Output as a list of chunks: h2 copies a DATA payload five times on its way out (tobytes,
    # body join, header + body, the bytearray buffer, bytes() of it); here a DATA frame's
    # payload is kept as is and copied once, when data_to_send() joins the chunks.

    def __init__(self, config: h2.config.H2Configuration) -> None:
        super().__init__(config)
        self._out: list[bytes] = []

    def _prepare_for_sending(self, frames: list[hyperframe.frame.Frame]) -> None:
        if not frames:
            return
        out = self._out
        if self._data_to_send:  # h2 wrote there directly (the preface): it goes first
            out.append(bytes(self._data_to_send))
            self._data_to_send = bytearray()
        for f in frames:
            if type(f) is hyperframe.frame.DataFrame and "PADDED" not in f.flags:
                data = f.data
                if not isinstance(data, bytes):
                    data = bytes(data)
                n = len(data)
                f.body_len = n
                flags = _END_STREAM if "END_STREAM" in f.flags else 0
                out.append(_FRAME_HEADER.pack(n >> 8, n & 0xFF, 0, flags, f.stream_id))
                if n:
                    out.append(data)
            else:
                out.append(f.serialize())

    def data_to_send(self, amount: int | None = None) -> bytes:
        if self._out:
            if self._data_to_send:
                self._out.append(bytes(self._data_to_send))
            joined = b"".join(self._out)
            self._out = []
            if amount is None:
                self._data_to_send = bytearray()
                return joined
            self._data_to_send = bytearray(joined)
        return super().data_to_send(amount)

    def clear_outbound_data_buffer(self) -> None:
        self._out = []
        super().clear_outbound_data_buffer()

    def has_output(self) -> bool:
        return bool(self._out) or bool(self._data_to_send)

    def _local_settings_acked(self):  # type: ignore[no-untyped-def]
        # h2 sets the frame buffer's size limit once per receive_data(): when the ACK of our
        # SETTINGS (MAX_FRAME_SIZE 1 MiB) and a larger DATA frame from the peer arrive in the
        # same read, the DATA frame was refused as overlong and the connection killed. Apply
        # the new limit at once (a server-first app answering on a fresh connection hit it).
        changes = super()._local_settings_acked()
        self.incoming_buffer.max_frame_size = self.max_inbound_frame_size
        return changes

    def _receive_goaway_frame(self, frame: hyperframe.frame.GoAwayFrame):  # type: ignore[override]
        if frame.error_code != ErrorCodes.NO_ERROR:
            return super()._receive_goaway_frame(frame)
        event = h2.events.ConnectionTerminated()
        event.error_code = ErrorCodes.NO_ERROR
        event.last_stream_id = frame.last_stream_id
        event.additional_data = frame.additional_data or None
        return [], [event]

    def send_graceful_goaway(self) -> None:
        """Queue a NO_ERROR GOAWAY and keep the connection open for the existing streams."""
        frame = hyperframe.frame.GoAwayFrame(
            stream_id=0, last_stream_id=self.highest_inbound_stream_id,
            error_code=ErrorCodes.NO_ERROR)
        self._prepare_for_sending([frame])


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


@dataclass(frozen=True)
class ConnectRequest:
    """A valid HBONE CONNECT request."""

    authority: str
    host: str
    port: int
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def target(self) -> tuple[str, int]:
        return (self.host, self.port)


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


def parse_connect(headers: list[tuple[bytes, bytes]] | list[tuple[str, str]]) -> ConnectRequest:
    """Validate an incoming request header block; raise :class:`HboneRequestError` (400)."""
    method = authority = None
    plain: dict[str, str] = {}
    for raw_name, raw_value in headers:
        name, value = _text(raw_name).lower(), _text(raw_value)
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
) -> list[tuple[str, str]]:
    """Request headers for an HBONE CONNECT (without the pseudo-headers).

    ``forwarded_for`` is the client's ``ip:port``; ``traceparent`` defaults to a new random one.
    """
    parse_authority(authority)  # fail early on our own bad input
    headers: list[tuple[str, str]] = []
    if forwarded_for is not None:
        headers.append(("forwarded", f'for="{forwarded_for}"'))
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


@dataclass
class DataReceived:
    stream_id: int
    data: bytes


@dataclass
class EndOfStream:
    stream_id: int


@dataclass
class StreamReset:
    stream_id: int
    error_code: int
    remote: bool = True


@dataclass
class WindowChanged:
    """More may be sendable (WINDOW_UPDATE or new SETTINGS)."""


@dataclass
class PingAcked:
    data: bytes


@dataclass
class GoAway:
    error_code: int
    last_stream_id: int


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
    :meth:`data_to_send` after every call that may have produced output."""

    def __init__(self, *, client_side: bool) -> None:
        self.client_side = client_side
        # Outbound header blocks are ours (CONNECT, :status): open_request() checks them
        # itself, cheaper than h2's generic validation and normalisation chain.
        config = h2.config.H2Configuration(
            client_side=client_side,
            header_encoding=None,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
        self.h2 = _HboneH2Connection(config)
        self.h2.incoming_buffer = _FrameBuffer(server=not client_side)
        self.h2.decoder = _CappedDecoder()
        self.h2.encoder = _PlainEncoder()
        self.max_header_list = CLIENT_MAX_HEADER_LIST if client_side else SERVER_MAX_HEADER_LIST
        self.goaway_received = False
        self.goaway_sent = False

    # -- setup and connection-level actions -------------------------------------------------
    def initiate(self) -> None:
        """Queue the preface and the HBONE settings and grow the connection window."""
        self.h2.initiate_connection()
        S = h2.settings.SettingCodes
        settings = {
            S.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            S.MAX_FRAME_SIZE: MAX_FRAME_SIZE,
            S.MAX_HEADER_LIST_SIZE: self.max_header_list,
        }
        if self.client_side:
            settings[S.ENABLE_PUSH] = 0
        else:
            settings[S.MAX_CONCURRENT_STREAMS] = SERVER_MAX_CONCURRENT_STREAMS
        # After initiate_connection(): replacing local_settings would leave h2's inbound frame
        # limit at 16 KiB.
        self.h2.update_settings(settings)
        self.h2.increment_flow_control_window(CONNECTION_WINDOW - H2_DEFAULT_WINDOW)

    def data_to_send(self) -> bytes:
        return self.h2.data_to_send()

    def has_output(self) -> bool:
        """Whether :meth:`data_to_send` would return bytes (saves waking the writer)."""
        return self.h2.has_output()

    def ping(self) -> bytes:
        payload = secrets.token_bytes(8)
        self.h2.ping(payload)
        return payload

    def goaway(self, error_code: int = ErrorCodes.NO_ERROR) -> None:
        """Queue a GOAWAY. NO_ERROR drains: open streams go on, new ones are refused."""
        if error_code == ErrorCodes.NO_ERROR:
            if not self.goaway_sent:
                self.h2.send_graceful_goaway()
        else:
            try:
                self.h2.close_connection(error_code=error_code)
            except h2.exceptions.ProtocolError:
                pass  # already closed
        self.goaway_sent = True

    @property
    def peer_max_concurrent_streams(self) -> int:
        return self.h2.remote_settings.max_concurrent_streams

    # -- stream actions -----------------------------------------------------------------------
    def open_request(self, authority: str, headers: list[tuple[str, str]] | tuple = ()) -> int:
        """Client: queue a CONNECT and return its stream id."""
        sid = self.h2.get_next_available_stream_id()
        block = [(":method", "CONNECT"), (":authority", authority)]
        block += [(n.lower(), v) for n, v in headers]
        encoded = []
        for n, v in block:
            _check_header(n, v)
            name = n.encode()
            if name in _UNIQUE_PER_REQUEST:
                encoded.append(hpack.NeverIndexedHeaderTuple(name, v.encode()))
            else:
                encoded.append((name, v.encode()))
        self.h2.send_headers(sid, encoded)
        return sid

    def respond(self, stream_id: int, status: int, *, end_stream: bool = False) -> None:
        self.h2.send_headers(stream_id, [(b":status", str(status).encode())],
                             end_stream=end_stream)

    def send_window(self, stream_id: int) -> int:
        """How many bytes of DATA may be queued on the stream now."""
        try:
            return self.h2.local_flow_control_window(stream_id)
        except (h2.exceptions.StreamClosedError, h2.exceptions.NoSuchStreamError):
            return 0

    def send_data(self, stream_id: int, data: bytes | memoryview) -> int:
        """Queue as much of ``data`` as the windows allow, in frames of at most the peer's max
        frame size; return the number of bytes queued."""
        view = memoryview(data)
        window = self.send_window(stream_id)
        frame = self.h2.max_outbound_frame_size
        sent = 0
        whole = view.obj if isinstance(view.obj, bytes) and len(view.obj) == len(view) else None
        while sent < len(view) and window > 0:
            n = min(window, frame, len(view) - sent)
            if whole is not None and n == len(view):
                self.h2.send_data(stream_id, whole)  # h2 would copy a memoryview
            else:
                self.h2.send_data(stream_id, view[sent : sent + n])
            sent += n
            window -= n
        return sent

    def end_stream(self, stream_id: int) -> None:
        self.h2.end_stream(stream_id)

    def reset(self, stream_id: int, error_code: int = ErrorCodes.CANCEL) -> bool:
        """Queue RST_STREAM unless the stream is already closed; True if one was queued."""
        try:
            self.h2.reset_stream(stream_id, error_code)
            return True
        except (h2.exceptions.StreamClosedError, h2.exceptions.NoSuchStreamError):
            return False
        except h2.exceptions.ProtocolError:
            return False

    def acknowledge(self, stream_id: int, n: int) -> None:
        """Hand ``n`` consumed bytes back to the peer's windows (the back-pressure point)."""
        if n <= 0:
            return
        try:
            self.h2.acknowledge_received_data(n, stream_id)
        except h2.exceptions.ProtocolError:
            pass  # connection already closed: nothing to give back

    # -- input ----------------------------------------------------------------------------------
    def receive(self, data: bytes) -> list[Event]:
        """Feed bytes from the peer; raise :class:`HboneProtocolError` if HTTP/2 is broken."""
        try:
            h2_events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as e:
            # h2 queued a GOAWAY for frame errors, but not for a bad preface.
            if self.h2.state_machine.state != h2.connection.ConnectionState.CLOSED:
                try:
                    self.h2.close_connection(error_code=ErrorCodes.PROTOCOL_ERROR)
                except h2.exceptions.ProtocolError:
                    pass
            self.goaway_sent = True
            raise HboneProtocolError(f"HTTP/2 protocol error: {e}") from e
        out: list[Event] = []
        for ev in h2_events:
            self._map_event(ev, out)
        return out

    def _map_event(self, ev: h2.events.Event, out: list[Event]) -> None:
        if isinstance(ev, h2.events.DataReceived):
            padding = ev.flow_controlled_length - len(ev.data)
            if padding:
                self.acknowledge(ev.stream_id, padding)  # padding is never buffered
            if ev.data:
                out.append(DataReceived(ev.stream_id, ev.data))
        elif isinstance(ev, h2.events.RequestReceived):
            self._on_request(ev, out)
        elif isinstance(ev, h2.events.ResponseReceived):
            self._on_response(ev, out)
        elif isinstance(ev, h2.events.StreamEnded):
            # h2 reports END_STREAM as its own event right after the frame's event.
            out.append(EndOfStream(ev.stream_id))
        elif isinstance(ev, h2.events.StreamReset):
            out.append(StreamReset(ev.stream_id, int(ev.error_code or 0), remote=ev.remote_reset))
        elif isinstance(ev, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
            out.append(WindowChanged())
        elif isinstance(ev, h2.events.PingAckReceived):
            out.append(PingAcked(ev.ping_data or b""))
        elif isinstance(ev, h2.events.ConnectionTerminated):
            self.goaway_received = True
            out.append(GoAway(int(ev.error_code or 0), ev.last_stream_id or 0))
        # TrailersReceived, InformationalResponseReceived, PingReceived (auto-acked),
        # SettingsAcknowledged, PriorityUpdated, UnknownFrameReceived: nothing to do.

    def _on_request(self, ev: h2.events.RequestReceived, out: list[Event]) -> None:
        sid = ev.stream_id
        headers = list(ev.headers or [])
        if self.client_side:  # h2 refuses pushes from servers already; be safe
            self.reset(sid, ErrorCodes.REFUSED_STREAM)
            return
        if self.goaway_sent:
            self.reset(sid, ErrorCodes.REFUSED_STREAM)
            out.append(RequestRefused(sid, 0, "draining: stream refused"))
            return
        size = header_list_size(headers)
        try:
            if size > self.max_header_list:
                raise HboneRequestError(431, f"header list {size} B > {self.max_header_list} B")
            request = parse_connect(headers)
        except HboneRequestError as e:
            self.respond(sid, e.status, end_stream=True)
            out.append(RequestRefused(sid, e.status, e.reason))
            return
        out.append(ConnectRequested(sid, request, ended=ev.stream_ended is not None))

    def _on_response(self, ev: h2.events.ResponseReceived, out: list[Event]) -> None:
        sid = ev.stream_id
        headers = list(ev.headers or [])
        size = header_list_size(headers)
        if size > self.max_header_list:
            self.reset(sid, ErrorCodes.PROTOCOL_ERROR)
            out.append(StreamReset(sid, ErrorCodes.PROTOCOL_ERROR, remote=False))
            return
        status = 0
        for name, value in headers:
            if name == b":status":
                try:
                    status = int(value)
                except ValueError:
                    status = 0
        out.append(ResponseReceived(sid, status, ended=ev.stream_ended is not None))
