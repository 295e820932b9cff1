"""Protocol detection on the first bytes of a tunnelled connection. Pure: no IO.

HTTP/2 with prior knowledge starts with the 24-byte client preface; HTTP/1.x with a request
line (``METHOD SP ...``). Anything else is opaque TCP. :func:`detect` answers ``None`` while
the bytes seen so far are still a prefix of one of the HTTP forms.
"""

from __future__ import annotations

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
HTTP1 = "http/1.1"
HTTP2 = "h2"
TCP = "tcp"

MAX_METHOD = 20  # longest method token we accept as the start of an HTTP/1 request line
SNIFF_BYTES = len(H2_PREFACE)
_METHOD_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ-_")


def detect(data: bytes) -> str | None:
    """``"h2"``, ``"http/1.1"``, ``"tcp"``, or ``None`` when more bytes are needed."""
    if not data:
        return None
    n = min(len(data), len(H2_PREFACE))
    if data[:n] == H2_PREFACE[:n]:
        return HTTP2 if n == len(H2_PREFACE) else None
    for i, c in enumerate(data[: MAX_METHOD + 1]):
        if c == 0x20:
            return HTTP1 if i > 0 else TCP
        if c not in _METHOD_CHARS:
            return TCP
    return TCP if len(data) > MAX_METHOD else None
