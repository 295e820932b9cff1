"""Sans-IO HTTP/1.1 for the gateway's client-facing side: requests in, responses out.

:class:`RequestReader` parses the requests of one connection (pipelined ones in order) per
RFC 9112: request line, header fields, and the body's framing (§6.3: ``Transfer-Encoding:
chunked`` with trailers, ``Content-Length``, else no body). It is strict where a lenient
parser would let two parsers disagree about where a message ends (request smuggling):
``Transfer-Encoding`` other than exactly ``chunked``, ``Transfer-Encoding`` together with
``Content-Length``, more than one ``Content-Length`` (even equal ones), a length that is not
plain digits, obs-fold, whitespace before the colon, bad tokens, control characters (CR, LF,
NUL…) in values, a missing or repeated ``Host`` on HTTP/1.1, bare LF inside chunked framing
are all :class:`BadRequest` (400); a head over the limit is 431. Bare LF ends a line of the
head (RFC 9112 §2.2 allows it; h11 did) and empty lines before a request line are skipped.

:class:`ResponseWriter` frames one response for the request it answers: ``Content-Length``
kept and enforced, else chunked for an HTTP/1.1 client and read-to-close for HTTP/1.0; no
body for HEAD, 1xx, 204 and 304; ``Connection: close`` when the connection is not kept.
Mirrors the upstream side's :func:`l7gateway.upstream.encode_request_head` /
``ResponseReader``.
"""

from __future__ import annotations

import http
import re
from dataclasses import dataclass

Headers = list[tuple[str, str]]

MAX_HEAD = 64 * 1024
MAX_CHUNK_LINE = 4096  # chunk size + extensions

_TOKEN_CHARS = r"-!#$%&'*+.^_`|~0-9A-Za-z"
_REQUEST_LINE = re.compile(
    rf"([{_TOKEN_CHARS}]+) ([\x21-\x7e\x80-\xff]+) HTTP/([0-9])\.([0-9])")
# name ":" OWS value OWS, the value without controls (HTAB allowed); the line's CR is gone
_HEADER = re.compile(rf"([{_TOKEN_CHARS}]+):[ \t]*([^\x00-\x08\x0a-\x1f\x7f]*?)[ \t]*")
_HEADER_LINES = re.compile(
    rf"^([{_TOKEN_CHARS}]+):[ \t]*([^\x00-\x08\x0a-\x1f\x7f]*?)[ \t]*\r?$", re.MULTILINE)
_FRAMING = frozenset({"host", "content-length", "transfer-encoding", "connection", "upgrade",
                      "expect"})
_HEAD_END = re.compile(rb"\n\r?\n")
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(?:;[^\x00-\x08\x0a-\x1f\x7f]*)?\r\n")
_DIGITS = re.compile(r"[0-9]{1,18}")
# what a response may carry: names are tokens, values hold no controls but HTAB (checked on
# all of a head at once, the lines joined by "\n": see encode_head)
_NAMES = re.compile(rf"[{_TOKEN_CHARS}]+(?:\n[{_TOKEN_CHARS}]+)*")
_BAD_TEXT = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_REASONS = {s.value: s.phrase for s in http.HTTPStatus}


def take(buf: bytearray, n: int) -> bytes:
    """Up to ``n`` bytes off the front of ``buf`` (one copy when it holds no more than that).
    Shared by the request and response body readers (also ``upstream.ResponseReader``)."""
    if len(buf) <= n:
        data = bytes(buf)
        buf.clear()
        return data
    data = bytes(buf[:n])
    del buf[:n]
    return data


class BadRequest(ValueError):
    """The client's bytes are not an acceptable HTTP/1.1 request (answer ``status``)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class ResponseError(ValueError):
    """A response that cannot be written as HTTP/1.1 (bad header, body not fitting)."""


@dataclass(slots=True)
class ParsedRequest:
    """A request head. ``headers``: lower-case names, in the order received."""

    method: str
    target: str
    http11: bool  # HTTP/1.1 (or a later 1.x); False: HTTP/1.0
    headers: Headers
    host: str | None
    keep_alive: bool  # the client allows another request on this connection
    chunked: bool
    length: int  # the body's content-length (0: no body, or chunked)
    expect_continue: bool  # Expect: 100-continue (HTTP/1.1 with a body only)
    upgrade: str | None  # the Upgrade value when Connection names "upgrade"
    connection: frozenset[str]  # the Connection tokens, lower-case

    @property
    def has_body(self) -> bool:
        return self.chunked or self.length > 0


class RequestReader:
    """Requests of one connection: :meth:`feed` bytes (``b""`` = the client closed its
    side), :meth:`next_request` for a head, then :meth:`body` until it returns ``b""``."""

    def __init__(self, max_head: int = MAX_HEAD) -> None:
        self.max_head = max_head
        self.buf = bytearray()
        self.eof = False
        self.request: ParsedRequest | None = None  # the current one
        self.body_done = True
        self.body_started = False  # any body bytes were received for the current request
        self.trailers: Headers | None = None
        self._scanned = 0  # head bytes already searched for its end
        self._left = 0  # length: body bytes left; chunked: bytes left in the chunk
        self._chunk_state = "size"  # "size" | "data" | "crlf" | "trailers"
        self._trailer_bytes = 0

    def feed(self, data: bytes) -> None:
        if data:
            self.buf += data
        else:
            self.eof = True

    @property
    def pending_head(self) -> bool:
        """Bytes of a next request head are buffered (its head timeout runs)."""
        return self.body_done and bool(self.buf)

    def take_rest(self) -> bytes:
        """Everything buffered (after a protocol switch: bytes for the new protocol)."""
        rest = bytes(self.buf)
        self.buf.clear()
        return rest

    # -- the head ----------------------------------------------------------------------
    def next_request(self) -> ParsedRequest | None:
        """The next request's head; None when more bytes are needed, or when the client
        closed between requests (then ``eof`` is set)."""
        if not self.body_done:
            raise RuntimeError("the previous request's body was not read to its end")
        buf = self.buf
        while buf[:1] == b"\n" or buf[:2] == b"\r\n":  # empty lines before a request line
            del buf[:1 if buf[0] == 0x0A else 2]
            self._scanned = 0
        m = _HEAD_END.search(buf, max(0, self._scanned - 2))
        if m is None:
            if len(buf) > self.max_head + 3:  # + the end of the head, not yet all there
                raise BadRequest("request head too large", 431)
            if self.eof and buf and buf != b"\r":
                raise BadRequest("connection closed in the request head")
            self._scanned = len(buf)
            return None
        if m.start() > self.max_head:
            raise BadRequest("request head too large", 431)
        text = buf[:m.start()].decode("latin-1")
        del buf[:m.end()]
        self._scanned = 0
        req = _parse_head(text)
        self.request = req
        self.trailers = None
        self.body_started = False
        if req.chunked:
            self.body_done, self._chunk_state = False, "size"
        elif req.length:
            self.body_done, self._left = False, req.length
        return req

    # -- the body ----------------------------------------------------------------------
    def body(self) -> bytes | None:
        """The next body bytes; ``b""`` at the end (``trailers`` then set for a chunked
        body that had some); None when more bytes are needed."""
        if self.body_done:
            return b""
        req = self.request
        assert req is not None
        buf = self.buf
        if not req.chunked:
            if not buf:
                if self.eof:
                    raise BadRequest("connection closed in the request body")
                return None
            self.body_started = True
            data = take(buf, self._left)
            self._left -= len(data)
            if self._left == 0:
                self.body_done = True
            return data
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
            if self._chunk_state == "crlf":
                if len(buf) < 2:
                    break
                if buf[:2] != b"\r\n":
                    raise BadRequest("chunk data not followed by CRLF")
                del buf[:2]
                self._chunk_state = "size"
                continue
            at = buf.find(b"\n")
            if at < 0:
                if self._chunk_state == "size" and len(buf) > MAX_CHUNK_LINE:
                    raise BadRequest("chunk header too long")
                if self._chunk_state == "trailers" and (
                        self._trailer_bytes + len(buf) > self.max_head):
                    raise BadRequest("request trailers too large", 431)
                break
            if self._chunk_state == "size":
                cm = _CHUNK_SIZE.fullmatch(buf, 0, at + 1)
                if cm is None:
                    raise BadRequest(f"bad chunk header {bytes(buf[:min(at, 100)])!r}")
                self.body_started = True
                self._left = int(cm.group(1), 16)  # before the del: cm reads from buf
                del buf[:at + 1]
                if self._left:
                    self._chunk_state = "data"
                else:
                    self._chunk_state, self._trailer_bytes = "trailers", 0
                continue
            # trailers: field lines up to an empty line, each ending in CRLF
            if at == 0 or buf[at - 1] != 0x0D:
                raise BadRequest("bare LF in the request trailers")
            self._trailer_bytes += at + 1
            if self._trailer_bytes > self.max_head:
                raise BadRequest("request trailers too large", 431)
            line = buf[:at - 1].decode("latin-1")
            del buf[:at + 1]
            if not line:
                self.body_done = True
                return b""
            hm = _HEADER.fullmatch(line)
            if hm is None:
                raise BadRequest(f"bad trailer line {line[:100]!r}")
            if self.trailers is None:
                self.trailers = []
            self.trailers.append((hm.group(1).lower(), hm.group(2)))
        if self.eof:
            raise BadRequest("connection closed in the request body")
        return None


def _parse_head(text: str) -> ParsedRequest:
    first, _, block = text.partition("\n")
    if first.endswith("\r"):
        first = first[:-1]
    rm = _REQUEST_LINE.fullmatch(first)
    if rm is None:
        raise BadRequest(f"bad request line {first[:100]!r}")
    method, target, major, minor = rm.groups()
    if major != "1":
        raise BadRequest(f"unsupported HTTP version {major}.{minor}")
    http11 = minor != "0"
    headers: Headers = []
    if block:
        # every line at once (a match is a whole line; a line that does not match is missed,
        # which the count shows)
        pairs = _HEADER_LINES.findall(block)
        if len(pairs) != block.count("\n") + 1:
            _bad_line(block)
        headers = [(n.lower(), v) for n, v in pairs]
    host: str | None = None
    hosts = 0
    lengths: list[str] = []
    codings: list[str] | None = None
    connection: set[str] = set()
    upgrade: str | None = None
    expect: str | None = None
    for name, value in headers:
        if name not in _FRAMING:
            continue
        if name == "host":
            host, hosts = value, hosts + 1
        elif name == "content-length":
            lengths.append(value)
        elif name == "transfer-encoding":
            codings = (codings or []) + [c.strip().lower() for c in value.split(",")]
        elif name == "connection":
            connection.update(t.strip().lower() for t in value.split(","))
        elif name == "upgrade":
            upgrade = value
        else:
            expect = value
    if hosts > 1 or (http11 and hosts == 0):
        raise BadRequest("a request needs exactly one Host header" if http11
                         else "more than one Host header")
    chunked = False
    length = 0
    if codings is not None:
        if lengths:
            raise BadRequest("both Transfer-Encoding and Content-Length")
        if codings != ["chunked"] or not http11:
            raise BadRequest(f"unsupported transfer-encoding {', '.join(codings)!r}")
        chunked = True
    elif lengths:
        if len(lengths) > 1:
            raise BadRequest("more than one Content-Length")
        if not _DIGITS.fullmatch(lengths[0]):
            raise BadRequest(f"bad content-length {lengths[0][:40]!r}")
        length = int(lengths[0])
    connection.discard("")
    keep_alive = "close" not in connection and (http11 or "keep-alive" in connection)
    return ParsedRequest(
        method=method, target=target, http11=http11, headers=headers, host=host,
        keep_alive=keep_alive, chunked=chunked, length=length,
        expect_continue=(http11 and (chunked or length > 0) and expect is not None
                         and expect.strip().lower() == "100-continue"),
        upgrade=upgrade if "upgrade" in connection else None,
        connection=frozenset(connection),
    )


# -- responses -----------------------------------------------------------------------------


def _bad_line(block: str) -> None:
    for line in block.split("\n"):
        if line.endswith("\r"):
            line = line[:-1]
        if _HEADER.fullmatch(line) is None:
            if line[:1] in (" ", "\t"):
                raise BadRequest("obsolete line folding in the request head")
            raise BadRequest(f"bad header line {line[:100]!r}")
    raise BadRequest("bad header block")  # not reached: some line did not match


def reason(status: int) -> str:
    return _REASONS.get(status, "")


def encode_head(status: int, headers: Headers) -> bytes:
    """A status line and header block; refuses what would split or corrupt the head."""
    if not 100 <= status <= 999:
        raise ResponseError(f"bad status {status}")
    lines = [f"HTTP/1.1 {status} {reason(status)}"]
    if headers:
        if not _NAMES.fullmatch("\n".join([n for n, _ in headers])):
            bad = next(n for n, _ in headers if not _NAMES.fullmatch(n))
            raise ResponseError(f"bad header name {bad!r}")
        lines += [f"{n}: {v}" for n, v in headers]
    text = "\n".join(lines)
    # one "\n" per joined line, and no other control: no value can split the head
    if _BAD_TEXT.search(text) or text.count("\n") != len(headers):
        bad = next((v for _, v in headers if _BAD_TEXT.search(v) or "\n" in v), text)
        raise ResponseError(f"bad header value {bad[:100]!r}")
    try:
        return text.replace("\n", "\r\n").encode("latin-1") + b"\r\n\r\n"
    except UnicodeEncodeError as e:
        raise ResponseError(f"header not encodable as latin-1: {e}") from e


_HOP = frozenset({"connection", "transfer-encoding", "keep-alive"})


class ResponseWriter:
    """The framing of one response to ``request``: :meth:`head`, :meth:`data`,
    :meth:`end` return the bytes to send. ``keep_alive`` says, once the head is made,
    whether the connection may carry another request after this response."""

    def __init__(self, request: ParsedRequest) -> None:
        self.request = request
        self.keep_alive = request.keep_alive
        self.started = False
        self.done = False
        self.chunked = False
        self.no_body = False
        self._left: int | None = None  # content-length: bytes still to send

    def head(self, status: int, headers: Headers, end: bool = False) -> bytes:
        """The head of a final response (``end``: no body follows, the response is done).
        ``connection``/``transfer-encoding``/``keep-alive`` are the writer's to set."""
        if self.started:
            raise ResponseError("response already started")
        if status < 200:
            raise ResponseError(f"{status} is not a final status")
        req = self.request
        out = [(n, v) for n, v in headers if n not in _HOP]
        length: str | None = None
        for n, v in out:
            if n == "content-length":
                if length is not None and v != length or not _DIGITS.fullmatch(v):
                    raise ResponseError(f"bad content-length {v!r}")
                length = v
        self.no_body = req.method == "HEAD" or status in (204, 304)
        if self.no_body:
            self._left = 0
        elif length is not None:
            self._left = int(length)
        elif end:
            out.append(("content-length", "0"))
            self._left = 0
        elif req.http11:
            out.append(("transfer-encoding", "chunked"))
            self.chunked = True
        else:
            self.keep_alive = False  # an HTTP/1.0 client: the body ends when we close
        if self.keep_alive:
            if not req.http11:
                out.append(("connection", "keep-alive"))
        else:
            out.append(("connection", "close"))
        data = encode_head(status, out)
        self.started = True
        if end:
            data += self.end(None)
        return data

    def data(self, data: bytes) -> bytes:
        if not self.started or self.done:
            raise ResponseError("body outside a response")
        if not data or self.no_body:
            return b""  # a HEAD/204/304 response has no body, whatever the upstream says
        if self.chunked:
            return b"%x\r\n%s\r\n" % (len(data), data)
        if self._left is not None:
            if len(data) > self._left:
                raise ResponseError("response body longer than its content-length")
            self._left -= len(data)
        return data

    def end(self, trailers: Headers | None) -> bytes:
        if not self.started or self.done:
            raise ResponseError("end outside a response")
        if self._left and not self.no_body:
            raise ResponseError(f"response body {self._left} bytes short of its "
                                f"content-length")
        self.done = True
        if not self.chunked:
            return b""
        if not trailers:
            return b"0\r\n\r\n"
        block = encode_head(200, [(n, v) for n, v in trailers if not n.startswith(":")])
        return b"0\r\n" + block[block.index(b"\r\n") + 2:]


def informational(status: int, headers: Headers) -> bytes:
    """A 1xx response head (``100 Continue``, ``101 Switching Protocols``)."""
    if not 100 <= status < 200:
        raise ResponseError(f"{status} is not informational")
    return encode_head(status, headers)


def error_response(status: int, message: str) -> bytes:
    """A complete small plain-text answer that closes the connection."""
    body = f"{message}\n".encode()
    return encode_head(status, [("content-type", "text/plain"),
                                ("content-length", str(len(body))),
                                ("connection", "close")]) + body
