"""Our HTTP/2 engine (ztunnel.hbone.frames) against the real ``h2`` library as the peer, and
against hand-made malformed input: every broken rule gives the RFC 9113 error, never a crash."""

from __future__ import annotations

import random
import struct
from functools import partial

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import hpack
import hyperframe.frame
import pytest
import trio
import trio.testing

from ztunnel.hbone import frames as f
from ztunnel.hbone import protocol as p

E = f.ErrorCode
PREFACE = f.PREFACE


def h2_peer(*, client_side: bool, **settings: int) -> h2.connection.H2Connection:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=client_side, header_encoding=None))
    conn.initiate_connection()
    if settings:
        S = h2.settings.SettingCodes
        conn.update_settings({getattr(S, k.upper()): v for k, v in settings.items()})
    return conn


def pump(ours: p.HboneH2 | f.H2Engine,
         theirs: h2.connection.H2Connection) -> tuple[list, list]:
    """Move bytes both ways until quiet; return (our events, h2's events). ``ours``: the HBONE
    layer or the bare engine."""
    receive = ours.receive if isinstance(ours, p.HboneH2) else ours.receive_data
    mine: list = []
    peer: list = []
    while True:
        a, b = ours.data_to_send(), theirs.data_to_send()
        if not a and not b:
            return mine, peer
        if a:
            peer += theirs.receive_data(a)
        if b:
            mine += receive(b)


def of(events: list, kind: type) -> list:
    return [e for e in events if isinstance(e, kind)]


def parsed(wire: bytes) -> list[hyperframe.frame.Frame]:
    """Our output, parsed by an independent implementation (hyperframe)."""
    out = []
    view = memoryview(wire)
    if bytes(view[:24]) == PREFACE:
        view = view[24:]
    while view:
        assert len(view) >= 9, "truncated frame in our output"
        frame, length = hyperframe.frame.Frame.parse_frame_header(view[:9])
        assert len(view) >= 9 + length, "truncated frame in our output"
        frame.parse_body(view[9 : 9 + length])
        out.append(frame)
        view = view[9 + length :]
    return out


# -- our client ↔ h2 server ----------------------------------------------------------------------


def client_pair(**server_settings: int) -> tuple[p.HboneH2, h2.connection.H2Connection]:
    ours = p.HboneH2(client_side=True)
    ours.initiate()
    theirs = h2_peer(client_side=False, **server_settings)
    pump(ours, theirs)
    return ours, theirs


def h2_accepts(theirs: h2.connection.H2Connection, events: list) -> list[int]:
    sids = []
    for ev in of(events, h2.events.RequestReceived):
        headers = dict(ev.headers)
        assert headers[b":method"] == b"CONNECT"
        assert b":scheme" not in headers and b":path" not in headers
        theirs.send_headers(ev.stream_id, [(":status", "200")])
        sids.append(ev.stream_id)
    return sids


def test_our_client_tunnels_large_bodies_both_ways_through_an_h2_server() -> None:
    ours, theirs = client_pair()
    sid = ours.open_request("10.0.0.2:80", p.connect_headers(
        "10.0.0.2:80", forwarded_for="10.0.0.1:999", baggage="a=b"))
    mine, peer = pump(ours, theirs)
    assert h2_accepts(theirs, peer) == [sid]
    mine, _ = pump(ours, theirs)
    assert of(mine, p.ResponseReceived) == [p.ResponseReceived(sid, 200)]

    up = random.Random(1).randbytes(5 * 1024 * 1024 + 123)  # > h2's 64 KiB windows
    down = random.Random(2).randbytes(9 * 1024 * 1024 + 7)  # > our 4 MiB stream window
    sent_up = sent_down = 0
    got_up = bytearray()
    got_down = bytearray()
    ended_up = ended_down = False
    for _ in range(10_000):
        if sent_up < len(up):
            sent_up += ours.send_data(sid, memoryview(up)[sent_up:])
        elif not ended_up:
            ours.end_stream(sid)
            ended_up = True
        if sent_down < len(down):
            n = min(theirs.local_flow_control_window(sid), theirs.max_outbound_frame_size,
                    len(down) - sent_down)
            if n:
                theirs.send_data(sid, down[sent_down : sent_down + n])
                sent_down += n
        elif not ended_down:
            theirs.end_stream(sid)
            ended_down = True
        mine, peer = pump(ours, theirs)
        for ev in of(peer, h2.events.DataReceived):
            got_up += ev.data
            theirs.acknowledge_received_data(ev.flow_controlled_length, sid)
        for ev in of(mine, p.DataReceived):
            got_down += ev.data
            ours.acknowledge(sid, len(ev.data))
        if of(mine, p.EndOfStream):
            assert ended_down
        if ended_up and ended_down and len(got_up) == len(up) and len(got_down) == len(down):
            break
    assert bytes(got_up) == up
    assert bytes(got_down) == down
    pump(ours, theirs)
    assert ours.send_window(sid) == 0  # closed both ways
    assert ours.h2.open_outbound_streams == 0


def test_our_client_respects_h2s_max_concurrent_streams() -> None:
    ours, theirs = client_pair()
    assert ours.peer_max_concurrent_streams == 100  # h2's default
    sids = [ours.open_request("10.0.0.2:80") for _ in range(100)]
    with pytest.raises(f.H2Error):
        ours.open_request("10.0.0.2:80")
    _, peer = pump(ours, theirs)
    assert h2_accepts(theirs, peer) == sids
    mine, _ = pump(ours, theirs)
    assert [e.stream_id for e in of(mine, p.ResponseReceived)] == sids
    # h2 resets one, we reset another: two slots free again
    theirs.reset_stream(sids[0], E.CANCEL)
    assert ours.reset(sids[1], E.CANCEL)
    mine, peer = pump(ours, theirs)
    assert of(mine, p.StreamReset) == [p.StreamReset(sids[0], E.CANCEL, remote=True)]
    assert [(e.stream_id, e.error_code) for e in of(peer, h2.events.StreamReset)] == [
        (sids[1], E.CANCEL)]
    a, b = ours.open_request("10.0.0.2:80"), ours.open_request("10.0.0.2:80")
    _, peer = pump(ours, theirs)
    assert h2_accepts(theirs, peer) == [a, b]


def test_h2_server_goaway_and_ping() -> None:
    ours, theirs = client_pair()
    sid = ours.open_request("10.0.0.2:80")
    _, peer = pump(ours, theirs)
    h2_accepts(theirs, peer)
    payload = ours.ping()
    theirs.ping(b"12345678")
    mine, peer = pump(ours, theirs)
    assert of(mine, p.PingAcked) == [p.PingAcked(payload)]
    assert [e.ping_data for e in of(peer, h2.events.PingAckReceived)] == [b"12345678"]
    theirs.close_connection(error_code=E.NO_ERROR, last_stream_id=sid)
    mine, _ = pump(ours, theirs)
    assert of(mine, p.GoAway) == [p.GoAway(0, sid)]
    assert ours.goaway_received


def test_h2_server_settings_change_is_applied() -> None:
    ours, theirs = client_pair()
    sid = ours.open_request("10.0.0.2:80")
    _, peer = pump(ours, theirs)
    h2_accepts(theirs, peer)
    pump(ours, theirs)
    assert ours.send_window(sid) == 65535
    theirs.increment_flow_control_window(1_000_000)
    S = h2.settings.SettingCodes
    theirs.update_settings({S.INITIAL_WINDOW_SIZE: 100_000, S.MAX_FRAME_SIZE: 32768,
                            S.MAX_CONCURRENT_STREAMS: 5})
    mine, _ = pump(ours, theirs)
    assert of(mine, p.WindowChanged)
    assert ours.send_window(sid) == 100_000  # existing stream adjusted by the delta
    assert ours.h2.max_outbound_frame_size == 32768
    assert ours.peer_max_concurrent_streams == 5
    assert ours.send_data(sid, b"x" * 100_001) == 100_000
    frames = parsed(ours.data_to_send())
    assert [len(fr.data) for fr in frames] == [32768, 32768, 32768, 1696]


def test_streams_that_are_not_read_do_not_stall_the_connection_window() -> None:
    client, server = p.HboneH2(client_side=True), p.HboneH2(client_side=False)
    client.initiate()
    server.initiate()
    for _ in range(3):
        server.receive(client.data_to_send())
        client.receive(server.data_to_send())
    sids = [client.open_request("10.0.0.2:80") for _ in range(4)]
    server.receive(client.data_to_send())
    block = b"\0" * p.STREAM_WINDOW
    for sid in sids[:3]:  # 12 MiB that nobody reads
        assert client.send_data(sid, block) == p.STREAM_WINDOW
        server.receive(client.data_to_send())
    active = sids[3]
    for _ in range(3):  # the fourth stream is read: it keeps going
        sent = client.send_data(active, block)
        assert sent > 0
        got = sum(len(e.data) for e in server.receive(client.data_to_send())
                  if isinstance(e, p.DataReceived))
        server.acknowledge(active, got)
        client.receive(server.data_to_send())
    assert client.send_window(active) > 0


# -- h2 client ↔ our server ----------------------------------------------------------------------


def server_pair() -> tuple[p.HboneH2, h2.connection.H2Connection]:
    ours = p.HboneH2(client_side=False)
    ours.initiate()
    theirs = h2_peer(client_side=True)
    pump(ours, theirs)
    return ours, theirs


def h2_connect(theirs: h2.connection.H2Connection, authority: str = "10.0.0.2:80",
               *, end: bool = False) -> int:
    sid = theirs.get_next_available_stream_id()
    theirs.send_headers(sid, [(":method", "CONNECT"), (":authority", authority),
                              ("baggage", "k=v")], end_stream=end)
    return sid


def test_h2_client_tunnels_through_our_server_with_flow_control() -> None:
    ours, theirs = server_pair()
    assert theirs.remote_settings.max_concurrent_streams == 200
    assert theirs.max_outbound_frame_size == 1024 * 1024
    sid = h2_connect(theirs)
    mine, _ = pump(ours, theirs)
    (req,) = of(mine, p.ConnectRequested)
    assert (req.stream_id, req.request.target, req.request.headers) == (
        sid, ("10.0.0.2", 80), {"baggage": "k=v"})
    ours.respond(sid, 200)
    _, peer = pump(ours, theirs)
    (resp,) = of(peer, h2.events.ResponseReceived)
    assert dict(resp.headers)[b":status"] == b"200"

    body = random.Random(3).randbytes(12 * 1024 * 1024)  # 3 stream windows
    sent = 0
    got = bytearray()
    while len(got) < len(body):
        n = min(theirs.local_flow_control_window(sid), theirs.max_outbound_frame_size,
                len(body) - sent)
        if n:
            theirs.send_data(sid, body[sent : sent + n], end_stream=sent + n == len(body))
            sent += n
        mine, _ = pump(ours, theirs)
        chunk = b"".join(e.data for e in of(mine, p.DataReceived))
        assert chunk or n, "stalled"
        got += chunk
        ours.acknowledge(sid, len(chunk))
    assert bytes(got) == body
    assert of(mine, p.EndOfStream) == [p.EndOfStream(sid)]
    # the answer, with our end of stream
    assert ours.send_data(sid, b"bye") == 3
    ours.end_stream(sid)
    _, peer = pump(ours, theirs)
    assert b"".join(e.data for e in of(peer, h2.events.DataReceived)) == b"bye"
    assert of(peer, h2.events.StreamEnded)
    assert ours.h2.open_inbound_streams == 0


def test_h2_client_many_streams_resets_and_graceful_goaway() -> None:
    ours, theirs = server_pair()
    sids = [h2_connect(theirs) for _ in range(50)]
    mine, _ = pump(ours, theirs)
    assert [e.stream_id for e in of(mine, p.ConnectRequested)] == sids
    for sid in sids:
        ours.respond(sid, 200)
    pump(ours, theirs)
    theirs.reset_stream(sids[0], E.CANCEL)
    ours.reset(sids[1], E.CONNECT_ERROR)
    mine, peer = pump(ours, theirs)
    assert of(mine, p.StreamReset) == [p.StreamReset(sids[0], E.CANCEL, remote=True)]
    assert [(e.stream_id, e.error_code) for e in of(peer, h2.events.StreamReset)] == [
        (sids[1], E.CONNECT_ERROR)]
    # frames sent before the peer saw our reset are ignored, not an error (h2 will not send
    # on a stream it knows is reset: a hand-made frame)
    late = f.frame_header(3, 0, 0, sids[1]) + b"abc"
    assert ours.receive(late) == []
    # graceful GOAWAY: open streams go on, a new one is refused
    ours.goaway()
    _, peer = pump(ours, theirs)
    (term,) = of(peer, h2.events.ConnectionTerminated)
    assert (term.error_code, term.last_stream_id) == (0, sids[-1])
    # (h2 itself stops sending after any GOAWAY: a hand-made DATA frame)
    assert ours.receive(f.frame_header(5, 0, 0, sids[5]) + b"still") == [
        p.DataReceived(sids[5], b"still")]
    # a new stream after our GOAWAY is refused (a fresh encoder's first block: no references
    # to h2's dynamic table entries)
    late = sids[-1] + 2
    mine = ours.receive(f.frame_header(len(connect_block()), 1, 0x4, late) + connect_block())
    assert of(mine, p.RequestRefused) == [p.RequestRefused(late, 0, "draining: stream refused")]
    assert rst_codes(ours.data_to_send()) == [(late, E.REFUSED_STREAM)]


class _NoHuffman(hpack.Encoder):
    """h2's encoder, literals without Huffman coding (its pure-Python coder is slow)."""

    def encode(self, headers, huffman: bool = True) -> bytes:  # type: ignore[override]
        return super().encode(headers, huffman=False)


def test_h2_client_request_refusals() -> None:
    ours, theirs = server_pair()
    sid = theirs.get_next_available_stream_id()
    theirs.send_headers(sid, [(":method", "GET"), (":scheme", "https"), (":path", "/"),
                              (":authority", "10.0.0.2:80")], end_stream=True)
    mine, peer = pump(ours, theirs)
    assert [e.status for e in of(mine, p.RequestRefused)] == [400]
    assert dict(of(peer, h2.events.ResponseReceived)[0].headers)[b":status"] == b"400"
    big = h2_connect(theirs)
    # an oversize block: refused per stream, the connection lives (literals without Huffman
    # coding: h2's pure-Python coder would take seconds for this block)
    theirs.encoder = _NoHuffman()
    sid3 = theirs.get_next_available_stream_id()
    theirs.send_headers(sid3, [(":method", "CONNECT"), (":authority", "10.0.0.2:80"),
                               ("x-big", "a" * 100_000)])
    mine, peer = pump(ours, theirs)
    assert [(e.stream_id, e.status) for e in of(mine, p.RequestRefused)] == [(sid3, 431)]
    assert [e.stream_id for e in of(mine, p.ConnectRequested)] == [big]


def test_ping_from_h2_client_is_answered() -> None:
    ours, theirs = server_pair()
    theirs.ping(b"abcdefgh")
    _, peer = pump(ours, theirs)
    assert [e.ping_data for e in of(peer, h2.events.PingAckReceived)] == [b"abcdefgh"]


# -- malformed input ------------------------------------------------------------------------------


def frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    return f.frame_header(len(payload), ftype, flags, sid) + payload


SETTINGS = frame(4, 0, 0)


def connect_block(authority: str = "10.0.0.2:80") -> bytes:
    return hpack.Encoder().encode([(":method", "CONNECT"), (":authority", authority)])


def fresh_server() -> p.HboneH2:
    server = p.HboneH2(client_side=False)
    server.initiate()
    server.data_to_send()
    assert server.receive(PREFACE + SETTINGS) == [p.WindowChanged()]
    server.data_to_send()  # the SETTINGS ACK
    return server


def goaway_code(wire: bytes) -> int | None:
    codes = [fr.error_code for fr in parsed(wire) if isinstance(fr, hyperframe.frame.GoAwayFrame)]
    return codes[-1] if codes else None


def rst_codes(wire: bytes) -> list[tuple[int, int]]:
    return [(fr.stream_id, fr.error_code) for fr in parsed(wire)
            if isinstance(fr, hyperframe.frame.RstStreamFrame)]


HEADERS_1 = frame(1, 0x4, 1, connect_block())  # a valid CONNECT on stream 1, END_HEADERS

CONNECTION_ERRORS = {
    "garbage preface": (b"GET / HTTP/1.1\r\n\r\n" + b"\0" * 30, E.PROTOCOL_ERROR, False),
    "first frame not SETTINGS": (PREFACE + frame(6, 0, 0, b"12345678"), E.PROTOCOL_ERROR, False),
    "frame over max frame size": (f.frame_header(2 * 1024 * 1024, 0, 0, 1), E.FRAME_SIZE_ERROR,
                                  True),
    "SETTINGS length not 6n": (frame(4, 0, 0, b"\0" * 7), E.FRAME_SIZE_ERROR, True),
    "SETTINGS on a stream": (frame(4, 0, 1), E.PROTOCOL_ERROR, True),
    "SETTINGS ACK with payload": (frame(4, 1, 0, b"\0" * 6), E.FRAME_SIZE_ERROR, True),
    "ENABLE_PUSH 2": (frame(4, 0, 0, struct.pack(">HL", 2, 2)), E.PROTOCOL_ERROR, True),
    "MAX_FRAME_SIZE too small": (frame(4, 0, 0, struct.pack(">HL", 5, 100)), E.PROTOCOL_ERROR,
                                 True),
    "INITIAL_WINDOW_SIZE too large": (frame(4, 0, 0, struct.pack(">HL", 4, 2**31)),
                                      E.FLOW_CONTROL_ERROR, True),
    "PING length 7": (frame(6, 0, 0, b"1234567"), E.FRAME_SIZE_ERROR, True),
    "PING on a stream": (frame(6, 0, 1, b"12345678"), E.PROTOCOL_ERROR, True),
    "WINDOW_UPDATE length 3": (frame(8, 0, 0, b"\0\0\1"), E.FRAME_SIZE_ERROR, True),
    "connection window overflow": (frame(8, 0, 0, struct.pack(">L", 2**31 - 1)),
                                   E.FLOW_CONTROL_ERROR, True),
    "connection WINDOW_UPDATE of 0": (frame(8, 0, 0, b"\0\0\0\0"), E.PROTOCOL_ERROR, True),
    "WINDOW_UPDATE on idle stream": (frame(8, 0, 7, b"\0\0\0\1"), E.PROTOCOL_ERROR, True),
    "DATA on stream 0": (frame(0, 0, 0, b"abc"), E.PROTOCOL_ERROR, True),
    "DATA on idle stream": (frame(0, 0, 3, b"abc"), E.PROTOCOL_ERROR, True),
    "HEADERS on stream 0": (frame(1, 0x4, 0, connect_block()), E.PROTOCOL_ERROR, True),
    "HEADERS on an even stream": (frame(1, 0x4, 2, connect_block()), E.PROTOCOL_ERROR, True),
    "RST_STREAM on idle stream": (frame(3, 0, 9, b"\0\0\0\0"), E.PROTOCOL_ERROR, True),
    "RST_STREAM length 5": (frame(3, 0, 1, b"\0" * 5), E.FRAME_SIZE_ERROR, True),
    "GOAWAY too short": (frame(7, 0, 0, b"\0" * 4), E.FRAME_SIZE_ERROR, True),
    "GOAWAY on a stream": (frame(7, 0, 1, b"\0" * 8), E.PROTOCOL_ERROR, True),
    "PUSH_PROMISE": (frame(5, 0x4, 1, b"\0\0\0\2" + connect_block()), E.PROTOCOL_ERROR, True),
    "CONTINUATION without HEADERS": (frame(9, 0x4, 1, connect_block()), E.PROTOCOL_ERROR, True),
    "PING inside a header block": (frame(1, 0, 1, connect_block()[:3]) + frame(6, 0, 0, b"1" * 8),
                                   E.PROTOCOL_ERROR, True),
    "CONTINUATION on another stream": (frame(1, 0, 1, connect_block()[:3])
                                       + frame(9, 0x4, 3, connect_block()[3:]),
                                       E.PROTOCOL_ERROR, True),
    "HPACK garbage": (frame(1, 0x4, 1, b"\xff\xff\xff\xff\xff"), E.COMPRESSION_ERROR, True),
    "HPACK index out of range": (frame(1, 0x4, 1, b"\xfe"), E.COMPRESSION_ERROR, True),
    "HEADERS padding longer than frame": (frame(1, 0x4 | 0x8, 1, b"\x50" + connect_block()),
                                          E.PROTOCOL_ERROR, True),
    "DATA padding longer than frame": (HEADERS_1 + frame(0, 0x8, 1, b"\x09abc"),
                                       E.PROTOCOL_ERROR, True),
    "DATA beyond the stream window": (HEADERS_1 + b"".join(
        frame(0, 0, 1, b"\0" * (1024 * 1024)) for _ in range(5)), E.FLOW_CONTROL_ERROR, True),
}


@pytest.mark.parametrize("name", list(CONNECTION_ERRORS))
def test_connection_errors_queue_goaway_with_the_rfc_code(name: str) -> None:
    data, code, after_preface = CONNECTION_ERRORS[name]
    if after_preface:
        server = fresh_server()
    else:
        server = p.HboneH2(client_side=False)
        server.initiate()
        server.data_to_send()
    with pytest.raises(p.HboneProtocolError):
        server.receive(data)
    assert goaway_code(server.data_to_send()) == code
    assert server.goaway_sent
    assert server.receive(b"anything more") == []  # the connection is over: ignored


def test_data_beyond_the_connection_window_is_a_flow_control_error() -> None:
    server = fresh_server()
    wire = b""
    for sid in (1, 3, 5, 7, 9):  # 5 streams x 4 MiB > the 16 MiB connection window
        wire += frame(1, 0x4, sid, connect_block())
        wire += b"".join(frame(0, 0, sid, b"\0" * (1024 * 1024)) for _ in range(4))
    with pytest.raises(p.HboneProtocolError):
        server.receive(wire)
    assert goaway_code(server.data_to_send()) == E.FLOW_CONTROL_ERROR


def test_truncated_frames_wait_for_the_rest() -> None:
    server = fresh_server()
    wire = HEADERS_1 + frame(0, 0x1, 1, b"hello")
    events: list = []
    pieces = [wire[:5], wire[5:9], wire[9:20], wire[20 : len(HEADERS_1) + 3],
              wire[len(HEADERS_1) + 3 : -1]]
    for piece in pieces:
        events += server.receive(piece)
    assert not of(events, p.DataReceived)  # the DATA frame is not complete yet
    events += server.receive(wire[-1:])
    assert [type(e) for e in events] == [p.ConnectRequested, p.DataReceived, p.EndOfStream]


def test_frames_split_across_reads_at_random_places_arrive_whole() -> None:
    rng = random.Random(5)
    server = fresh_server()
    payloads = [rng.randbytes(n) for n in (1024 * 1024, 300_000, 5, 70_000, 16_384)]
    big_block = hpack.Encoder().encode([(":method", "CONNECT"), (":authority", "10.0.0.2:80"),
                                        ("x-pad", "p" * 30_000)])
    wire = frame(1, 0x4, 1, big_block) + b"".join(
        frame(0, 0x8, 1, b"\x03" + d + b"\0\0\0") if i % 2 else frame(0, 0, 1, d)
        for i, d in enumerate(payloads)) + frame(0, 0x1, 1)
    events: list = []
    pos = 0
    while pos < len(wire):
        n = rng.choice([1, 2, 7, 9, 10, 4096, 65_536, 262_144])
        events += server.receive(wire[pos : pos + n])
        pos += n
    (req,) = of(events, p.ConnectRequested)
    assert req.request.headers["x-pad"] == "p" * 30_000
    assert [e.data for e in of(events, p.DataReceived)] == payloads
    assert of(events, p.EndOfStream) == [p.EndOfStream(1)]


def test_stream_errors_reset_only_that_stream() -> None:
    server = fresh_server()
    events = server.receive(HEADERS_1 + frame(1, 0x4 | 0x1, 3, connect_block()))
    assert [e.stream_id for e in of(events, p.ConnectRequested)] == [1, 3]
    server.respond(3, 200, end_stream=True)  # stream 3: closed both ways
    server.data_to_send()
    cases = [
        # HEADERS on a closed stream
        (frame(1, 0x4, 3, connect_block()), (3, E.STREAM_CLOSED)),
        # stream window overflow
        (frame(8, 0, 1, struct.pack(">L", 2**31 - 1)), (1, E.FLOW_CONTROL_ERROR)),
    ]
    for data, expected in cases:
        events = server.receive(data)
        assert rst_codes(server.data_to_send()) == [expected]
    assert of(events, p.StreamReset) == [p.StreamReset(1, E.FLOW_CONTROL_ERROR, remote=False)]
    # malformed header blocks: a stream error, the HPACK state stays in step
    e2 = hpack.Encoder()
    bad_blocks = {
        5: [(":method", "CONNECT"), (":authority", "10.0.0.2:80"), ("X-Upper", "v")],
        7: [(":method", "CONNECT"), ("a", "b"), (":authority", "10.0.0.2:80")],
        9: [(":method", "CONNECT"), (":authority", "10.0.0.2:80"), ("connection", "close")],
        11: [(":method", "CONNECT"), (":method", "CONNECT"), (":authority", "10.0.0.2:80")],
        13: [(":method", "CONNECT"), (":status", "200"), (":authority", "10.0.0.2:80")],
    }
    wire = b"".join(frame(1, 0x4, sid, e2.encode(h)) for sid, h in bad_blocks.items())
    good = frame(1, 0x4, 15, e2.encode([(":method", "CONNECT"), (":authority", "10.0.0.2:80")]))
    events = server.receive(wire + good)
    assert rst_codes(server.data_to_send()) == [(sid, E.PROTOCOL_ERROR) for sid in bad_blocks]
    assert [e.stream_id for e in of(events, p.ConnectRequested)] == [15]
    # a stream id lower than one already used is a closed stream
    events = server.receive(frame(1, 0x4, 13, e2.encode([(":method", "CONNECT")])))
    assert rst_codes(server.data_to_send()) == []  # 13 was reset by us: ignored
    # DATA on a stream closed both ways (not by a reset of ours)
    events = server.receive(frame(1, 0x5, 17, e2.encode([(":method", "CONNECT"),
                                                         (":authority", "10.0.0.2:80")])))
    assert [e.stream_id for e in of(events, p.ConnectRequested)] == [17]
    server.respond(17, 200, end_stream=True)
    server.data_to_send()
    server.receive(frame(0, 0, 17, b"late"))
    assert rst_codes(server.data_to_send()) == [(17, E.STREAM_CLOSED)]


def test_trailers_end_the_stream_and_need_end_stream() -> None:
    server = fresh_server()
    e2 = hpack.Encoder()
    block = [(":method", "CONNECT"), (":authority", "10.0.0.2:80")]
    events = server.receive(frame(1, 0x4, 1, e2.encode(block)) + frame(1, 0x4, 3, e2.encode(block)))
    assert len(of(events, p.ConnectRequested)) == 2
    events = server.receive(frame(1, 0x4 | 0x1, 1, e2.encode([("x-trailer", "1")])))
    assert events == [p.EndOfStream(1)]
    events = server.receive(frame(1, 0x4, 3, e2.encode([("x-trailer", "1")])))  # no END_STREAM
    assert events == [p.StreamReset(3, E.PROTOCOL_ERROR, remote=False)]
    assert rst_codes(server.data_to_send()) == [(3, E.PROTOCOL_ERROR)]


def test_priority_unknown_frames_and_padding_are_handled() -> None:
    server = fresh_server()
    wire = (
        frame(2, 0, 1, b"\0\0\0\0\x10")  # PRIORITY on an idle stream: ignored
        + frame(0xEE, 0xFF, 0, b"whatever")  # unknown type: ignored
        + frame(1, 0x4 | 0x8 | 0x20, 1, b"\x03" + b"\0\0\0\0\x10" + connect_block() + b"pad")
        + frame(0, 0x8, 1, b"\x04hello\0\0\0\0")
        + frame(2, 0, 1, b"\0\0\0\0\x10")
    )
    events = server.receive(wire)
    assert [type(e) for e in events] == [p.ConnectRequested, p.DataReceived]
    assert events[1] == p.DataReceived(1, b"hello")
    assert server.data_to_send() == b""  # nothing to complain about
    # a PRIORITY of the wrong length is a stream error
    server.receive(frame(2, 0, 1, b"\0\0\0"))
    assert rst_codes(server.data_to_send()) == [(1, E.FRAME_SIZE_ERROR)]


def test_max_concurrent_streams_refused_with_rst_stream() -> None:
    server = fresh_server()
    e2 = hpack.Encoder()
    block = [(":method", "CONNECT"), (":authority", "10.0.0.2:80")]
    wire = b"".join(frame(1, 0x4, 2 * i + 1, e2.encode(block)) for i in range(201))
    events = server.receive(wire)
    assert len(of(events, p.ConnectRequested)) == 200
    assert rst_codes(server.data_to_send()) == [(401, E.REFUSED_STREAM)]
    server.reset(1, E.CANCEL)  # one finishes: the next is accepted
    events = server.receive(frame(1, 0x4, 403, e2.encode(block)))
    assert [e.stream_id for e in of(events, p.ConnectRequested)] == [403]


def test_client_refuses_push_promise_and_server_initiated_streams() -> None:
    for data in (frame(5, 0x4, 1, b"\0\0\0\2" + connect_block()),
                 frame(1, 0x4, 2, hpack.Encoder().encode([(":status", "200")]))):
        client = p.HboneH2(client_side=True)
        client.initiate()
        client.open_request("10.0.0.2:80")
        client.data_to_send()
        with pytest.raises(p.HboneProtocolError):
            client.receive(frame(4, 0, 0) + data)
        assert goaway_code(client.data_to_send()) == E.PROTOCOL_ERROR


def test_client_malformed_response_resets_the_stream() -> None:
    client = p.HboneH2(client_side=True)
    client.initiate()
    a = client.open_request("10.0.0.2:80")
    b = client.open_request("10.0.0.2:80")
    c = client.open_request("10.0.0.2:80")
    client.data_to_send()
    e2 = hpack.Encoder()
    wire = (frame(4, 0, 0)
            + frame(1, 0x4, a, e2.encode([("x", "no status")]))
            + frame(1, 0x4, b, e2.encode([(":status", "100")]))  # informational: skipped
            + frame(1, 0x4, b, e2.encode([(":status", "200")]))
            + frame(1, 0x4, c, e2.encode([(":status", "2000")])))
    events = client.receive(wire)
    assert of(events, p.ResponseReceived) == [p.ResponseReceived(b, 200)]
    assert of(events, p.StreamReset) == [p.StreamReset(a, E.PROTOCOL_ERROR, remote=False),
                                         p.StreamReset(c, E.PROTOCOL_ERROR, remote=False)]
    # HEADERS on a stream of ours that was never opened
    with pytest.raises(p.HboneProtocolError):
        client.receive(frame(1, 0x4, 99, e2.encode([(":status", "200")])))


def test_random_frames_never_crash() -> None:
    rng = random.Random(4)
    for _ in range(400):
        server = fresh_server()
        wire = HEADERS_1
        for _ in range(rng.randint(1, 6)):
            ftype = rng.choice([0, 1, 2, 3, 4, 6, 7, 8, 9, 0x20])
            flags = rng.choice([0, 1, 4, 5, 8, 0x20, 0x2D, 0xFF])
            sid = rng.choice([0, 1, 2, 3, 5, 2**31 - 1])
            body = rng.randbytes(rng.choice([0, 1, 4, 5, 6, 8, 13, 64]))
            wire += frame(ftype, flags, sid, body)
        cut = rng.randint(0, len(wire))
        try:
            server.receive(wire[:cut])
            server.receive(wire[cut:])
        except p.HboneProtocolError:
            assert goaway_code(server.data_to_send()) is not None
        else:
            parsed(server.data_to_send())  # whatever we answered is well-formed HTTP/2


# -- task switches on the HBONE path (connection.py) ----------------------------------------------


class _Steps(trio.abc.Instrument):
    """Counts the steps (task switches into it) of one task."""

    def __init__(self, task: trio.lowlevel.Task) -> None:
        self.task = task
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task is self.task:
            self.steps += 1


async def test_small_write_to_an_idle_writer_and_close_take_no_task_switch() -> None:
    from tests.unit.test_hbone_connection import echo_handler, hbone_pair, read_all

    async with hbone_pair(echo_handler) as (client, _):
        stream = await client.open_stream("10.0.0.2:80")
        await trio.testing.wait_all_tasks_blocked()
        steps = _Steps(trio.lowlevel.current_task())
        trio.lowlevel.add_instrument(steps)
        try:
            await stream.send_all(b"first")  # the writer is idle: queued, not waited for
            assert steps.steps == 0
            await stream.send_all(b"second")  # the writer has not run yet: this one waits
            assert steps.steps >= 1
        finally:
            trio.lowlevel.remove_instrument(steps)
        await stream.send_eof()
        assert await read_all(stream) == b"firstsecond"
        steps = _Steps(trio.lowlevel.current_task())
        trio.lowlevel.add_instrument(steps)
        try:
            await stream.aclose()
        finally:
            trio.lowlevel.remove_instrument(steps)
        assert steps.steps == 0


async def test_unwaited_write_still_reports_a_dead_connection() -> None:
    from tests.unit.test_hbone_connection import echo_handler, hbone_pair

    a, b = trio.testing.memory_stream_pair()
    async with hbone_pair(echo_handler, a, b) as (client, _):
        stream = await client.open_stream("10.0.0.2:80")
        await trio.testing.wait_all_tasks_blocked()
        await b.aclose()  # the server's transport goes away under the client
        with pytest.raises(trio.BrokenResourceError):
            for _ in range(10):
                await stream.send_all(b"x" * 1000)
                await trio.sleep(0.01)


# -- flood limits (RFC 9113 §10.5) ------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def limited_server(clock: FakeClock, **limits: int) -> f.H2Engine:
    """A bare server engine past the preface, with small flood limits."""
    engine = f.H2Engine(client_side=False, flood=f.FloodLimits(window=10.0, **limits),
                        clock=clock)
    engine.initiate()
    engine.receive_data(PREFACE + SETTINGS)
    engine.data_to_send()
    return engine


def get_block(sid: int, encoder: hpack.Encoder) -> bytes:
    block = encoder.encode([(":method", "GET"), (":scheme", "http"), (":path", "/"),
                            (":authority", "svc")])
    return frame(1, 0x4, sid, block)


def test_rapid_reset_is_cut_off_with_enhance_your_calm_and_the_window_slides() -> None:
    clock = FakeClock()
    server = limited_server(clock, resets=20)
    enc = hpack.Encoder()
    rst = struct.pack(">L", E.CANCEL)
    # 20 request+reset pairs: allowed
    wire = b"".join(get_block(2 * i + 1, enc) + frame(3, 0, 2 * i + 1, rst) for i in range(20))
    events = server.receive_data(wire)
    assert len(of(events, f.StreamReset)) == 20
    # a window later they no longer count (a steady trickle is fine)
    clock.now += 25
    wire = b"".join(get_block(2 * i + 41, enc) + frame(3, 0, 2 * i + 41, rst) for i in range(20))
    assert len(of(server.receive_data(wire), f.StreamReset)) == 20
    server.data_to_send()
    # a burst beyond the limit: GOAWAY(ENHANCE_YOUR_CALM), the connection is over
    wire = b"".join(get_block(2 * i + 81, enc) + frame(3, 0, 2 * i + 81, rst) for i in range(21))
    with pytest.raises(f.H2ConnectionError) as e:
        server.receive_data(wire)
    assert e.value.error_code == E.ENHANCE_YOUR_CALM
    assert goaway_code(server.data_to_send()) == E.ENHANCE_YOUR_CALM
    assert server.closed and server.receive_data(get_block(200, enc)) == []


def test_streams_we_reset_for_the_peers_fault_count_as_resets() -> None:
    server = limited_server(FakeClock(), resets=10)
    enc = hpack.Encoder()
    bad = enc.encode([(":method", "GET"), (":path", "/")])  # no :scheme: malformed
    with pytest.raises(f.H2ConnectionError) as e:
        server.receive_data(b"".join(frame(1, 0x5, 2 * i + 1, bad) for i in range(11)))
    assert e.value.error_code == E.ENHANCE_YOUR_CALM
    wire = server.data_to_send()
    assert len(rst_codes(wire)) == 11 and goaway_code(wire) == E.ENHANCE_YOUR_CALM


@pytest.mark.parametrize("kind,one", [
    ("pings", frame(6, 0, 0, b"12345678")),
    ("settings", frame(4, 0, 0, struct.pack(">HL", 4, 70000))),
    ("empty", frame(0, 0, 1, b"")),  # empty DATA without END_STREAM on an open stream
])
def test_ping_settings_and_empty_frame_floods_are_cut_off(kind: str, one: bytes) -> None:
    server = limited_server(FakeClock(), **{kind: 50})
    server.receive_data(get_block(1, hpack.Encoder()))
    server.receive_data(one * 49)  # the preface's SETTINGS counted once already: 50 in all
    assert goaway_code(server.data_to_send()) is None
    with pytest.raises(f.H2ConnectionError) as e:
        server.receive_data(one * 2)
    assert e.value.error_code == E.ENHANCE_YOUR_CALM
    assert goaway_code(server.data_to_send()) == E.ENHANCE_YOUR_CALM
    # what was not counted: PING ACKs, SETTINGS ACKs, DATA that ends the stream
    calm = limited_server(FakeClock(), **{kind: 50})
    calm.receive_data(get_block(1, hpack.Encoder()) + frame(6, 1, 0, b"12345678") * 100
                      + frame(4, 1, 0) * 100 + frame(0, 1, 1, b""))
    assert goaway_code(calm.data_to_send()) is None


def test_empty_continuation_flood_is_cut_off() -> None:
    server = limited_server(FakeClock(), empty=100)
    block = get_block(1, hpack.Encoder())[9:]
    with pytest.raises(f.H2ConnectionError) as e:
        server.receive_data(frame(1, 0, 1, block[:2]) + frame(9, 0, 1, b"") * 1000)
    assert e.value.error_code == E.ENHANCE_YOUR_CALM


def test_hbone_defaults_allow_real_use_but_not_a_flood() -> None:
    # a keepalive PING every few seconds, a tunnel reset now and then: far below the limits
    ours, theirs = server_pair()
    for _ in range(50):
        sid = h2_connect(theirs)
        theirs.ping(b"abcdefgh")
        theirs.reset_stream(sid)
    mine, _ = pump(ours, theirs)
    assert len(of(mine, p.StreamReset)) == 50 and not ours.h2.closed
    # 2,000 PINGs at once (CVE-2019-9512): the connection is cut off
    with pytest.raises(p.HboneProtocolError, match="ENHANCE_YOUR_CALM"):
        ours.receive(frame(6, 0, 0, b"12345678") * 2000)
    assert goaway_code(ours.data_to_send()) == E.ENHANCE_YOUR_CALM


async def test_hbone_server_sends_goaway_and_closes_on_a_ping_flood() -> None:
    from tests.unit.test_hbone_connection import echo_handler
    from ztunnel.hbone.server import serve_hbone_connection

    client_end, server_end = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(serve_hbone_connection, server_end, echo_handler,
                                   peer_identity="spiffe://cluster.local/ns/a/sa/b"))
        raw = h2_peer(client_side=True)
        for _ in range(1500):
            raw.ping(b"abcdefgh")
        await client_end.send_all(raw.data_to_send())
        got = b""
        with trio.fail_after(10):
            while chunk := await client_end.receive_some(65536):
                got += chunk
        # the GOAWAY went out, then the server closed the connection
        codes = [fr.error_code for fr in parsed(got)
                 if isinstance(fr, hyperframe.frame.GoAwayFrame)]
        assert codes == [E.ENHANCE_YOUR_CALM]
        nursery.cancel_scope.cancel()


# -- HTTP semantics for the gateway: requests, responses, 1xx, trailers, content-length --------


def http_server() -> f.H2Engine:
    engine = f.H2Engine(client_side=False)
    engine.initiate()
    engine.receive_data(PREFACE + SETTINGS)
    engine.data_to_send()
    return engine


REQUEST = [(":method", "POST"), (":scheme", "https"), (":path", "/x"), (":authority", "svc")]


def test_malformed_requests_are_stream_errors_and_good_ones_pass() -> None:
    server = http_server()
    enc = hpack.Encoder()
    bad = {
        1: [(":scheme", "http"), (":path", "/"), (":authority", "a")],  # no :method
        3: [(":method", "GET"), (":path", "/"), (":authority", "a")],  # no :scheme
        5: [(":method", "GET"), (":scheme", "http"), (":authority", "a")],  # no :path
        7: [(":method", "GET"), (":scheme", "http"), (":path", ""), (":authority", "a")],
        9: [(":method", "GET"), (":scheme", "http"), (":path", "/")],  # no authority or host
        11: [*REQUEST[:3], (":authority", "a"), ("host", "b")],  # they differ
        13: [(":method", "CONNECT"), (":authority", "a:1"), (":path", "/")],
        15: [(":method", "CONNECT")],
        17: [(":method", "GET"), (":protocol", "websocket"), *REQUEST[1:]],
        19: [*REQUEST, ("content-length", "x1")],
        21: [*REQUEST, ("content-length", "1"), ("content-length", "2")],
        23: [*REQUEST, ("te", "gzip")],
        25: [*REQUEST, ("x-bad", "a\r\nb")],
    }
    wire = b"".join(frame(1, 0x5, sid, enc.encode(h)) for sid, h in bad.items())
    good = {
        27: [(":method", "GET"), (":scheme", "http"), (":path", "/"), ("host", "a")],
        29: [*REQUEST, ("content-length", "0, 0"), ("te", "trailers")],
        31: [(":method", "CONNECT"), (":authority", "a:1")],
    }
    wire += b"".join(frame(1, 0x5, sid, enc.encode(h)) for sid, h in good.items())
    events = server.receive_data(wire)
    assert rst_codes(server.data_to_send()) == [(sid, E.PROTOCOL_ERROR) for sid in bad]
    assert [e.stream_id for e in of(events, f.HeadersReceived)] == list(good)


def test_content_length_must_match_the_data() -> None:
    server = http_server()
    enc = hpack.Encoder()
    cl5 = enc.encode([*REQUEST, ("content-length", "5")])
    wire = (
        frame(1, 0x4, 1, cl5) + frame(0, 0, 1, b"abc") + frame(0, 0x1, 1, b"de")  # exact
        + frame(1, 0x4, 3, cl5) + frame(0, 0, 3, b"abcdef")  # too much
        + frame(1, 0x4, 5, cl5) + frame(0, 0x1, 5, b"abc")  # too little
        + frame(1, 0x5, 7, cl5)  # none at all
        + frame(1, 0x4, 9, cl5) + frame(0, 0, 9, b"abc")
        + frame(1, 0x5, 9, enc.encode([("x-t", "1")]))  # trailers end it short
    )
    events = server.receive_data(wire)
    assert rst_codes(server.data_to_send()) == [(s, E.PROTOCOL_ERROR) for s in (3, 5, 7, 9)]
    assert [(e.stream_id, e.data) for e in of(events, f.DataReceived)] == [
        (1, b"abc"), (1, b"de"), (9, b"abc")]
    assert of(events, f.EndOfStream) == [f.EndOfStream(1)]
    # the connection window of refused DATA is handed back at once, of delivered DATA when
    # it is consumed: none of it is lost
    for e in of(events, f.DataReceived):
        server.acknowledge_received_data(e.stream_id, len(e.data))
    assert server.inbound_flow_control_window + server._conn_unacked == f.DEFAULT_WINDOW


def test_client_responses_1xx_head_204_and_status_checks() -> None:
    client = f.H2Engine(client_side=True, informational=True)
    client.initiate()
    enc = hpack.Encoder()
    sids = []
    for method in ("GET", "HEAD", "GET", "GET", "GET", "GET"):
        sid = client.get_next_available_stream_id()
        client.send_headers(sid, [(":method", method), (":scheme", "http"), (":path", "/"),
                                  (":authority", "a")], end_stream=True)
        sids.append(sid)
    client.data_to_send()
    a, head, no_content, switching, weird, short = sids
    wire = (frame(4, 0, 0)
            + frame(1, 0x4, a, enc.encode([(":status", "100")]))
            + frame(1, 0x4, a, enc.encode([(":status", "103"), ("link", "</s.css>")]))
            + frame(1, 0x4, a, enc.encode([(":status", "200"), ("content-length", "2")]))
            + frame(0, 0x1, a, b"ok")
            + frame(1, 0x5, head, enc.encode([(":status", "200"), ("content-length", "99")]))
            + frame(1, 0x5, no_content, enc.encode([(":status", "204")]))
            + frame(1, 0x4, switching, enc.encode([(":status", "101")]))
            + frame(1, 0x4, weird, enc.encode([(":status", "099")]))
            + frame(1, 0x5, short, enc.encode([(":status", "200"), ("content-length", "1")])))
    events = client.receive_data(wire)
    assert [(e.stream_id, e.status) for e in of(events, f.InformationalReceived)] == [
        (a, 100), (a, 103)]
    assert [(e.stream_id, e.status) for e in of(events, f.HeadersReceived)] == [
        (a, 200), (head, 200), (no_content, 204)]
    assert of(events, f.DataReceived) == [f.DataReceived(a, b"ok")]
    assert rst_codes(client.data_to_send()) == [(switching, E.PROTOCOL_ERROR),
                                                (weird, E.PROTOCOL_ERROR),
                                                (short, E.PROTOCOL_ERROR)]


def test_requests_with_1xx_and_trailers_both_ways_against_h2() -> None:
    """Our client engine ↔ the h2 library as a server: a request with a body and trailers, a
    100 Continue, the response with a body and trailers (gRPC's shape)."""
    ours = f.H2Engine(client_side=True, informational=True)
    ours.initiate()
    theirs = h2_peer(client_side=False)

    pump(ours, theirs)
    sid = ours.get_next_available_stream_id()
    ours.send_headers(sid, [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/S/M"),
                            (b":authority", b"svc"), (b"te", b"trailers"),
                            (b"content-length", b"5")])
    ours.send_data(sid, b"hello")
    ours.send_headers(sid, [(b"x-client-trailer", b"abc")], end_stream=True)
    _, peer = pump(ours, theirs)
    (req,) = of(peer, h2.events.RequestReceived)
    assert dict(req.headers)[b":path"] == b"/S/M"
    assert of(peer, h2.events.DataReceived)[0].data == b"hello"
    assert dict(of(peer, h2.events.TrailersReceived)[0].headers) == {b"x-client-trailer": b"abc"}
    theirs.send_headers(sid, [(":status", "100")])
    theirs.send_headers(sid, [(":status", "200"), ("content-type", "application/grpc")])
    theirs.send_data(sid, b"world")
    theirs.send_headers(sid, [("grpc-status", "0")], end_stream=True)
    mine, _ = pump(ours, theirs)
    assert [type(e) for e in mine if not isinstance(e, f.WindowChanged)] == [
        f.InformationalReceived, f.HeadersReceived, f.DataReceived, f.HeadersReceived,
        f.EndOfStream]
    final, trailers = of(mine, f.HeadersReceived)
    assert final.status == 200 and not final.trailers
    assert trailers.trailers and trailers.headers == [(b"grpc-status", b"0")]
    assert not ours.stream_open(sid)  # closed both ways


# -- input as a list of chunks, output as pieces ---------------------------------------------


def _a_client_stream() -> tuple[bytes, int]:
    """An h2 client's preface, a CONNECT and DATA frames of assorted sizes (up to our 1 MiB
    frame limit), as one byte string; and how many DATA bytes it carries."""
    theirs = h2_peer(client_side=True)
    theirs.receive_data(fresh_server_raw().data_to_send())  # our SETTINGS, window
    sid = h2_connect(theirs)
    sent = 0
    rng = random.Random(7)
    for size in (1, 500, 16_384, 16_385, 40_000, 65_000, 300_000):
        theirs.send_data(sid, rng.randbytes(size))
        sent += size
    return theirs.data_to_send(), sent


def _events_as_text(events: list) -> list[str]:
    return [f"{type(e).__name__}:{getattr(e, 'stream_id', '')}:"
            f"{getattr(e, 'data', b'').hex() if hasattr(e, 'data') else ''}" for e in events]


def test_a_list_of_chunks_is_read_as_their_join_wherever_they_are_cut() -> None:
    wire, carried = _a_client_stream()
    whole = fresh_server_raw()
    expected = _events_as_text(whole.receive(wire))
    assert sum(len(d.split(":")[2]) // 2 for d in expected if d.startswith("DataReceived")) == (
        carried)
    rng = random.Random(11)
    for _ in range(40):
        cuts = sorted(rng.sample(range(1, len(wire)), rng.randint(1, 30)))
        chunks = [wire[a:b] for a, b in zip([0, *cuts], [*cuts, len(wire)], strict=True)]
        server = fresh_server_raw()
        got: list = []
        # the chunks in lists of assorted lengths, as TLS records come in per read
        i = 0
        while i < len(chunks):
            k = rng.randint(1, 5)
            got += server.receive(chunks[i : i + k])
            i += k
        assert _events_as_text(got) == expected


def fresh_server_raw() -> p.HboneH2:
    """Our server before any input (its preface and SETTINGS queued)."""
    server = p.HboneH2(client_side=False)
    server.initiate()
    return server


def test_take_output_hands_a_large_body_on_as_the_object_queued() -> None:
    client, server = p.HboneH2(client_side=True), fresh_server_raw()
    client.initiate()
    for _ in range(3):  # settings both ways, and their ACKs
        server.receive(client.data_to_send())
        client.receive(server.data_to_send())
    sid = client.open_request("10.0.0.2:80")
    (req,) = of(server.receive(client.data_to_send()), p.ConnectRequested)
    server.respond(sid, 200)
    client.receive(server.data_to_send())
    body = bytes(range(256)) * 1000  # 256,000 B: one frame (the peer allows 1 MiB)
    assert client.send_data(sid, body) == len(body)
    parts = client.take_output()
    assert any(piece is body for piece in parts)  # not copied into a joined buffer
    assert client.take_output() == [] and not client.has_output()
    got = server.receive(parts)
    assert b"".join(e.data for e in of(got, p.DataReceived)) == body
