"""Reading a tcpdump capture of the lab underlay: which TCP flows crossed, and what they carried.

Only what the demo and the tests need: classic pcap files (tcpdump -w), Ethernet + IPv4 + TCP.
"""

from __future__ import annotations

import socket
import struct
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Segment:
    src: str
    dst: str
    sport: int
    dport: int
    payload: bytes


@dataclass
class Flow:
    """TCP segments between two endpoints, seen from the side that had the lower port."""

    a: tuple[str, int]
    b: tuple[str, int]
    packets: int = 0
    payload_bytes: int = 0
    tls: bool = False
    samples: list[bytes] = field(default_factory=list)


def segments(path: Path) -> Iterator[Segment]:
    data = path.read_bytes()
    if len(data) < 24:
        return
    magic = data[:4]
    if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1"):
        endian = "<"
    elif magic in (b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d"):
        endian = ">"
    else:
        raise ValueError(f"{path}: not a pcap file")
    linktype = struct.unpack(endian + "I", data[20:24])[0]
    off = 24
    while off + 16 <= len(data):
        incl = struct.unpack(endian + "I", data[off + 8 : off + 12])[0]
        frame = data[off + 16 : off + 16 + incl]
        off += 16 + incl
        if linktype == 1:  # Ethernet
            if len(frame) < 14 or frame[12:14] != b"\x08\x00":
                continue
            ip = frame[14:]
        elif linktype == 113:  # Linux cooked capture
            if len(frame) < 16 or frame[14:16] != b"\x08\x00":
                continue
            ip = frame[16:]
        else:
            continue
        if len(ip) < 20 or ip[0] >> 4 != 4 or ip[9] != 6:
            continue
        ihl = (ip[0] & 0x0F) * 4
        total = struct.unpack("!H", ip[2:4])[0]
        tcp = ip[ihl:total]
        if len(tcp) < 20:
            continue
        sport, dport = struct.unpack("!HH", tcp[:4])
        doff = (tcp[12] >> 4) * 4
        yield Segment(
            socket.inet_ntoa(ip[12:16]), socket.inet_ntoa(ip[16:20]), sport, dport, tcp[doff:]
        )


def flows(path: Path) -> list[Flow]:
    """Group segments into flows; a flow is TLS if its first payload is a TLS record."""
    table: dict[tuple, Flow] = {}
    for seg in segments(path):
        ends = sorted([(seg.src, seg.sport), (seg.dst, seg.dport)], key=lambda e: e[1])
        key = tuple(ends)
        flow = table.get(key)
        if flow is None:
            flow = table[key] = Flow(ends[0], ends[1])
        flow.packets += 1
        if seg.payload:
            if flow.payload_bytes == 0:
                # TLS record: content type 0x14-0x17, version 0x03 0x0X
                p = seg.payload
                flow.tls = len(p) >= 3 and 0x14 <= p[0] <= 0x17 and p[1] == 3
            flow.payload_bytes += len(seg.payload)
            if len(flow.samples) < 4:
                flow.samples.append(seg.payload[:64])
    return list(table.values())


def contains(path: Path, marker: bytes) -> bool:
    """Does any TCP stream in the capture carry ``marker``, even split across segments?"""
    streams: dict[tuple[str, int, str, int], bytearray] = defaultdict(bytearray)
    for seg in segments(path):
        streams[(seg.src, seg.sport, seg.dst, seg.dport)] += seg.payload
    return any(marker in bytes(data) for data in streams.values())


def ports_by_destination(path: Path) -> dict[int, int]:
    out: dict[int, int] = defaultdict(int)
    for f in flows(path):
        out[f.a[1]] += f.payload_bytes
    return dict(out)
