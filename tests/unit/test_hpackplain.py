"""ztunnel.hbone.hpackplain: the table-free HPACK we send, and the fast path that reads it,
checked against the hpack library's decoder (the reference)."""

from __future__ import annotations

import random

import hpack
import pytest

from ztunnel.hbone.hpackplain import StatelessEncoder, decode_plain

BIG = 1 << 20


def reference(block: bytes) -> list[tuple[bytes, bytes]]:
    decoder = hpack.Decoder()
    decoder.max_header_list_size = BIG
    return [tuple(f) for f in decoder.decode(block, raw=True)]  # type: ignore[misc]


def random_fields(rng: random.Random) -> list[tuple[str, str]]:
    names = [":method", ":authority", ":path", ":status", "user-agent", "accept", "cookie",
             "content-type", "forwarded", "x-custom", "x-" + "n" * 200]
    values = ["", "GET", "200", "a", "k8s.namespace.name=a,k8s.pod.name=b", "v" * 126,
              "v" * 127, "v" * 128, "w" * 20_000]
    return [(rng.choice(names), rng.choice(values)) for _ in range(rng.randint(1, 6))]


def test_what_we_send_decodes_as_hpack_does_and_without_it() -> None:
    rng = random.Random(7)
    enc = StatelessEncoder(uncached=frozenset({"forwarded"}))
    enc.encode([(":method", "GET")])  # the first block's table size update (hpack's path)
    for _ in range(2000):
        fields = random_fields(rng)
        block = enc.encode(fields)
        got = decode_plain(block, BIG)
        # only names of 127 bytes and more (a multi-byte length) are left to hpack
        assert (got is None) == any(len(n) >= 127 for n, _ in fields)
        if got is not None:
            assert got == reference(block)


def test_other_blocks_are_left_to_hpack() -> None:
    huffman = hpack.Encoder().encode([(":method", "GET"), ("x-a", "hello")])
    indexed = hpack.Encoder().encode([("x-a", "hello")], huffman=False)  # inserts into table
    size_update = b"\x20" + StatelessEncoder().encode([(":status", "200")])[1:]
    dynamic_ref = bytes([0x80 | 62])  # the first dynamic table entry
    for block in (huffman, indexed, size_update, dynamic_ref):
        assert decode_plain(block, BIG) is None
    # cut anywhere, a block is never read as something else: None, or what hpack reads
    block = StatelessEncoder().encode([(":authority", "10.0.0.2:80"), ("x-long", "v" * 300)])
    block = block[1:]  # (without the size update)
    for cut in range(1, len(block)):
        got = decode_plain(block[:cut], BIG)
        if got is not None:
            assert got == reference(block[:cut])


def test_a_header_list_over_the_cap_is_refused() -> None:
    block = StatelessEncoder().encode([("x-big", "v" * 5000)])[1:]
    assert decode_plain(block, 6000) == [(b"x-big", b"v" * 5000)]
    with pytest.raises(hpack.OversizedHeaderListError):
        decode_plain(block, 5000)


@pytest.mark.parametrize(
    "name,value",
    [("x-ok\n", "v"), ("x-bad", "a\r\nb"), ("connection", "close"), ("te", "gzip")],
)
def test_fields_http2_forbids_are_refused(name: str, value: str) -> None:
    with pytest.raises(ValueError):
        StatelessEncoder().encode([(name, value)])
    with pytest.raises(ValueError):  # strict: surrounding whitespace is not trimmed away
        StatelessEncoder(strict=True).encode([("x-sp", " lead")])
