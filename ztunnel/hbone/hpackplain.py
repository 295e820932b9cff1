"""Plain HPACK (RFC 7541): no dynamic table, no Huffman coding.

Every HTTP/2 sender of ours (HBONE's CONNECT requests and answers, the L7 gateway both ways)
encodes this way: a field's encoding depends only on the field, so it is cached, and nothing
is searched or evicted per field. A peer may use any HPACK feature: decoding is hpack's
``Decoder``, except that a block in this plain form is read by :func:`decode_plain` (a
tenth of the cost), which leaves any other block to hpack.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import hpack
import hpack.table

_BAD_NAME = re.compile(r"[^!#$%&'*+\-.^_`|~0-9a-z]")
_BAD_VALUE = re.compile(r"[\x00\r\n]")
_CONNECTION_SPECIFIC = frozenset({
    "connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"})

# RFC 7541 Appendix A
_STATIC_FIELD: dict[tuple[str, str], int] = {}
_STATIC_NAME: dict[str, int] = {}
for _i, (_n, _v) in enumerate(hpack.table.HeaderTable.STATIC_TABLE, start=1):
    _STATIC_FIELD.setdefault((_n.decode(), _v.decode()), _i)
    _STATIC_NAME.setdefault(_n.decode(), _i)
_FIELD_CACHE_MAX = 4096


def _hpack_int(value: int, prefix_bits: int, first: int) -> bytes:
    """An HPACK integer (RFC 7541 §5.1) with ``first``'s high bits above the prefix."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = bytearray([first | limit])
    value -= limit
    while value >= 128:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _hpack_str(raw: bytes) -> bytes:
    return _hpack_int(len(raw), 7, 0) + raw  # no Huffman coding


class StatelessEncoder:
    """HPACK that never uses the dynamic table: an exact static-table match is one index,
    anything else a literal "without indexing" (RFC 7541 §6.1, §6.2.2), never Huffman coded.

    A field's encoding then depends only on the field, so it is cached: the repeated fields of
    responses (content-type, server…) cost a dict lookup, where hpack's encoder searched and
    grew its table for every field (≈ a tenth of the gateway's CPU per HTTP/2 request). The
    wire form is a little larger; any decoder accepts it. Fields are checked as RFC 9113 §8.2
    wants (names lower-cased, no connection-specific ones, no CR/LF/NUL in values).

    The dynamic table is declared empty (size update to 0) in the first block, and again
    after the peer changes SETTINGS_HEADER_TABLE_SIZE (the engine sets
    :attr:`header_table_size`), which some decoders insist on."""

    def __init__(self, *, uncached: frozenset[str] = frozenset(), strict: bool = False) -> None:
        self._cache: dict[tuple[str, str], bytes] = {}
        self._size_update = True
        # fields whose value differs every time (traceparent…): caching them only churns
        self._uncached = uncached
        # strict: a value with surrounding whitespace is refused, not trimmed
        self._strict = strict

    @property
    def header_table_size(self) -> int:
        return 0

    @header_table_size.setter
    def header_table_size(self, value: int) -> None:
        self._size_update = True

    def encode(self, headers: Iterable[tuple[str, str]]) -> bytes:
        """The header block; ValueError for a field HTTP/2 does not allow."""
        cache = self._cache
        parts = []
        if self._size_update:
            self._size_update = False
            parts.append(b"\x20")  # dynamic table size update: 0
        uncached = self._uncached
        for name, value in headers:
            if name in uncached:
                parts.append(self._field(name, value))
                continue
            key = (name, value)
            enc = cache.get(key)
            if enc is None:
                enc = self._field(name, value)
                if len(cache) >= _FIELD_CACHE_MAX:
                    cache.clear()
                cache[key] = enc
            parts.append(enc)
        return b"".join(parts)

    def _field(self, name: str, value: str) -> bytes:
        n = name.lower()
        v = value.strip(" \t")
        if self._strict and v != value:
            raise ValueError(f"invalid value for header {n!r} (surrounding whitespace)")
        bare = n[1:] if n[:1] == ":" else n
        if not bare or _BAD_NAME.search(bare):
            raise ValueError(f"invalid header name {n!r}")
        if _BAD_VALUE.search(v):
            raise ValueError(f"invalid value for header {n!r}")
        if bare in _CONNECTION_SPECIFIC or (bare == "te" and v.lower() != "trailers"):
            raise ValueError(f"connection-specific header {n!r}")
        index = _STATIC_FIELD.get((n, v))
        if index is not None:
            return _hpack_int(index, 7, 0x80)
        try:
            raw_value = v.encode("latin-1")
            index = _STATIC_NAME.get(n)
            if index is not None:
                return _hpack_int(index, 4, 0x00) + _hpack_str(raw_value)
            return b"\x00" + _hpack_str(n.encode("latin-1")) + _hpack_str(raw_value)
        except UnicodeEncodeError as e:
            raise ValueError(f"header {n!r} not encodable as latin-1") from e


_STATIC = tuple(hpack.table.HeaderTable.STATIC_TABLE)
_N_STATIC = len(_STATIC)


def decode_plain(data: bytes, max_list_size: int) -> list[tuple[bytes, bytes]] | None:
    """The fields of a header block that uses only the static table and literals that are
    not indexed, none Huffman coded (what StatelessEncoder sends); None for any other block
    (a dynamic-table reference or insertion, a size update, Huffman, a malformed one):
    hpack's decoder then takes it. OversizedHeaderListError past ``max_list_size``."""
    out: list[tuple[bytes, bytes]] = []
    static = _STATIC
    size = 0
    i, n = 0, len(data)
    while i < n:
        b = data[i]
        if b & 0x80:  # indexed field: the static table only
            index = b & 0x7F
            if not 0 < index <= _N_STATIC:
                return None
            field = static[index - 1]
            i += 1
        elif b & 0xE0:  # incremental indexing (0x40) or a table size update (0x20)
            return None
        else:  # literal without indexing (0000) or never indexed (0001)
            index = b & 0x0F
            i += 1
            if index == 0x0F:
                if i >= n or data[i] & 0x80:
                    return None  # an index past 142: not static
                index += data[i]
                i += 1
            if index:
                if index > _N_STATIC:
                    return None
                name = static[index - 1][0]
            else:
                if i >= n or data[i] & 0x80:  # Huffman coded
                    return None
                length = data[i]
                i += 1
                if length == 0x7F:
                    return None  # a long name: hpack's
                name = data[i : i + length]
                i += length
            if i >= n or data[i] & 0x80:
                return None
            length = data[i]
            i += 1
            if length == 0x7F:
                # a multi-byte length (RFC 7541 §5.1)
                length, shift = 0x7F, 0
                while True:
                    if i >= n:
                        return None
                    c = data[i]
                    i += 1
                    length += (c & 0x7F) << shift
                    shift += 7
                    if not c & 0x80:
                        break
                    if shift > 28:
                        return None
            if i + length > n:
                return None
            field = (name, data[i : i + length])
            i += length
        size += len(field[0]) + len(field[1]) + 32
        if size > max_list_size:
            raise hpack.OversizedHeaderListError(
                f"A header list larger than {max_list_size} has been received")
        out.append(field)
    return out
