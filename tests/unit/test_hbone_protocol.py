"""HBONE sans-IO layer: two in-memory h2 connections exchanging bytes, no sockets."""

from __future__ import annotations

import re

import h2.settings
import hyperframe.frame
import pytest

from ztunnel.hbone import protocol as p


def pump(client: p.HboneH2, server: p.HboneH2) -> tuple[list, list]:
    """Move bytes both ways until quiet; return (client events, server events)."""
    cev: list = []
    sev: list = []
    while True:
        a, b = client.data_to_send(), server.data_to_send()
        if not a and not b:
            return cev, sev
        if a:
            sev += server.receive(a)
        if b:
            cev += client.receive(b)


def frames(data: bytes) -> list[hyperframe.frame.Frame]:
    out = []
    view = memoryview(data)
    while len(view) >= 9:
        frame, length = hyperframe.frame.Frame.parse_frame_header(view[:9])
        frame.parse_body(view[9 : 9 + length])
        out.append(frame)
        view = view[9 + length :]
    return out


@pytest.fixture
def pair() -> tuple[p.HboneH2, p.HboneH2]:
    client, server = p.HboneH2(client_side=True), p.HboneH2(client_side=False)
    client.initiate()
    server.initiate()
    pump(client, server)
    return client, server


def of(events: list, kind: type) -> list:
    return [e for e in events if isinstance(e, kind)]


# -- headers ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "authority,expected",
    [
        ("10.1.2.3:8080", ("10.1.2.3", 8080)),
        ("[fd00::1]:443", ("fd00::1", 443)),
        ("127.0.0.1:1", ("127.0.0.1", 1)),
        ("127.0.0.1:65535", ("127.0.0.1", 65535)),
    ],
)
def test_parse_authority_accepts_ip_and_port(authority: str, expected: tuple[str, int]) -> None:
    assert p.parse_authority(authority) == expected


@pytest.mark.parametrize(
    "authority",
    ["10.1.2.3", "10.1.2.3:0", "10.1.2.3:65536", "10.1.2.3:-1", "10.1.2.3:8a", "example.com:80",
     "fd00::1:80", "[fd00::1]80", "[10.0.0.1]:80", "[fe80::1%eth0]:80", "", ":80", "1.2.3.4:"],
)
def test_parse_authority_rejects_with_400(authority: str) -> None:
    with pytest.raises(p.HboneRequestError) as e:
        p.parse_authority(authority)
    assert e.value.status == 400


def test_connect_headers_carry_forwarded_baggage_and_random_traceparent() -> None:
    baggage = p.baggage_value("default", "sleep-1")
    h1 = dict(p.connect_headers("10.0.0.2:80", forwarded_for="10.0.0.1:41234", baggage=baggage))
    h2_ = dict(p.connect_headers("10.0.0.2:80", forwarded_for=None, baggage=None))
    assert h1["forwarded"] == 'for="10.0.0.1:41234"'
    assert h1["baggage"] == "k8s.namespace.name=default,k8s.pod.name=sleep-1"
    assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-00", h1["traceparent"])
    assert h1["traceparent"] != h2_["traceparent"]
    assert set(h2_) == {"traceparent"}
    assert p.parse_forwarded_for(h1["forwarded"]) == ("10.0.0.1", 41234)
    # addressed to a service: RFC 7239's host parameter after the caller
    via_svc = dict(p.connect_headers("10.0.0.2:80", forwarded_for="10.0.0.1:41234", baggage=None,
                                     host="web.shop.svc.cluster.local"))["forwarded"]
    assert via_svc == 'for="10.0.0.1:41234";host=web.shop.svc.cluster.local'
    assert p.parse_forwarded_for(via_svc) == ("10.0.0.1", 41234)
    with pytest.raises(p.HboneRequestError):
        p.connect_headers("not-an-ip:80", forwarded_for=None, baggage=None)


def test_parse_connect_validates_method_pseudo_headers_and_authority() -> None:
    ok = p.parse_connect([(b":method", b"CONNECT"), (b":authority", b"[fd00::2]:9000"),
                          (b"Baggage", b"a=b")])
    assert (ok.host, ok.port, ok.headers) == ("fd00::2", 9000, {"baggage": "a=b"})
    bad = [
        [(":method", "GET"), (":authority", "10.0.0.1:80"), (":scheme", "https"), (":path", "/")],
        [(":method", "CONNECT")],
        [(":method", "CONNECT"), (":authority", "10.0.0.1:80"), (":path", "/")],
        [(":method", "CONNECT"), (":authority", "svc.local:80")],
    ]
    for headers in bad:
        with pytest.raises(p.HboneRequestError) as e:
            p.parse_connect(headers)
        assert e.value.status == 400


# -- the HTTP/2 exchange -------------------------------------------------------------------------


def test_settings_are_hbone_values(pair: tuple[p.HboneH2, p.HboneH2]) -> None:
    client, server = pair
    S = h2.settings.SettingCodes
    # What each side learned from the other.
    assert client.h2.remote_settings[S.MAX_CONCURRENT_STREAMS] == 200
    assert client.h2.remote_settings[S.INITIAL_WINDOW_SIZE] == 4 * 1024 * 1024
    assert client.h2.remote_settings[S.MAX_HEADER_LIST_SIZE] == 64 * 1024
    assert server.h2.remote_settings[S.MAX_HEADER_LIST_SIZE] == 16 * 1024
    assert server.h2.remote_settings[S.ENABLE_PUSH] == 0
    for side in pair:
        assert side.h2.max_outbound_frame_size == 1024 * 1024
        assert side.h2.max_inbound_frame_size == 1024 * 1024
        assert side.h2.outbound_flow_control_window == 16 * 1024 * 1024


def test_connect_request_and_response(pair: tuple[p.HboneH2, p.HboneH2]) -> None:
    client, server = pair
    headers = p.connect_headers("10.0.0.2:8080", forwarded_for="10.0.0.1:5000", baggage="x=y")
    sid = client.open_request("10.0.0.2:8080", headers)
    raw = client.data_to_send()
    _, sev = pump_bytes(client, server, raw)
    (req,) = of(sev, p.ConnectRequested)
    assert req.stream_id == sid
    assert req.request.target == ("10.0.0.2", 8080)
    assert req.request.headers["forwarded"] == 'for="10.0.0.1:5000"'
    assert req.request.headers["baggage"] == "x=y"
    server.respond(sid, 200)
    cev, _ = pump(client, server)
    assert of(cev, p.ResponseReceived) == [p.ResponseReceived(sid, 200)]


def pump_bytes(client: p.HboneH2, server: p.HboneH2, first: bytes) -> tuple[list, list]:
    sev = server.receive(first)
    cev, more = pump(client, server)
    return cev, sev + more


def test_request_has_no_scheme_or_path(pair: tuple[p.HboneH2, p.HboneH2]) -> None:
    client, server = pair
    client.open_request("10.0.0.2:80")
    (headers,) = [f for f in frames(client.data_to_send())
                  if isinstance(f, hyperframe.frame.HeadersFrame)]
    decoded = dict(server.h2.decoder.decode(headers.data))
    assert decoded == {":method": "CONNECT", ":authority": "10.0.0.2:80",
                       } | {k: v for k, v in decoded.items() if not k.startswith(":")}
    assert ":scheme" not in decoded and ":path" not in decoded


def test_non_connect_is_answered_400_by_the_protocol(pair: tuple[p.HboneH2, p.HboneH2]) -> None:
    client, server = pair
    sid = client.h2.get_next_available_stream_id()
    client.h2.send_headers(sid, [(":method", "GET"), (":scheme", "https"), (":path", "/"),
                                 (":authority", "10.0.0.2:80")], end_stream=True)
    cev, sev = pump(client, server)
    assert of(sev, p.ConnectRequested) == []
    assert [(e.status) for e in of(sev, p.RequestRefused)] == [400]
    assert of(cev, p.ResponseReceived)[0].status == 400
    assert of(cev, p.EndOfStream)  # the answer ends the stream


def test_oversize_headers_refused_per_stream(pair: tuple[p.HboneH2, p.HboneH2]) -> None:
    client, server = pair
    good = client.open_request("10.0.0.2:80")
    pump(client, server)
    server.respond(good, 200)
    big = client.open_request("10.0.0.2:80", [("x-big", "a" * 100_000)])  # > 64 KiB
    cev, sev = pump(client, server)
    assert [e.status for e in of(sev, p.RequestRefused)] == [431]
    assert [(e.stream_id, e.status) for e in of(cev, p.ResponseReceived)] == [(good, 200),
                                                                             (big, 431)]
    # The other stream still works.
    assert client.send_data(good, b"still here") == 10
    _, sev = pump(client, server)
    assert of(sev, p.DataReceived) == [p.DataReceived(good, b"still here")]


def test_flow_control_limits_and_reopens_the_stream_window(
    pair: tuple[p.HboneH2, p.HboneH2],
) -> None:
    client, server = pair
    sid = client.open_request("10.0.0.2:80")
    pump(client, server)
    server.respond(sid, 200)
    pump(client, server)
    payload = bytes(range(256)) * (6 * 4096)  # 6 MiB
    sent = client.send_data(sid, payload)
    assert sent == p.STREAM_WINDOW
    out = client.data_to_send()
    data_frames = [f for f in frames(out) if isinstance(f, hyperframe.frame.DataFrame)]
    assert max(len(f.data) for f in data_frames) == p.MAX_FRAME_SIZE
    sev = server.receive(out)
    got = b"".join(e.data for e in of(sev, p.DataReceived))
    assert got == payload[:sent]
    assert client.send_data(sid, payload[sent:]) == 0  # window exhausted: nothing more
    # Not acknowledged → no WINDOW_UPDATE; acknowledged → the window reopens.
    pump(client, server)
    assert client.send_window(sid) == 0
    server.acknowledge(sid, len(got))
    pump(client, server)
    assert client.send_window(sid) == p.STREAM_WINDOW
    assert client.send_data(sid, payload[sent:]) == len(payload) - sent


def test_graceful_goaway_keeps_open_streams_and_refuses_new(
    pair: tuple[p.HboneH2, p.HboneH2],
) -> None:
    client, server = pair
    sid = client.open_request("10.0.0.2:80")
    pump(client, server)
    server.respond(sid, 200)
    server.goaway()
    cev, _ = pump(client, server)
    assert of(cev, p.GoAway) == [p.GoAway(0, sid)]
    assert client.goaway_received
    # The open stream goes on both ways (h2 alone would refuse every frame after a GOAWAY).
    client.send_data(sid, b"ping")
    server.send_data(sid, b"pong")
    cev, sev = pump(client, server)
    assert of(sev, p.DataReceived) == [p.DataReceived(sid, b"ping")]
    assert of(cev, p.DataReceived) == [p.DataReceived(sid, b"pong")]
    # A stream opened after the GOAWAY is refused.
    late = client.open_request("10.0.0.2:80")
    cev, _ = pump(client, server)
    assert [e.stream_id for e in of(cev, p.StreamReset)] == [late]


def test_garbage_preface_is_a_protocol_error_with_goaway() -> None:
    server = p.HboneH2(client_side=False)
    server.initiate()
    server.data_to_send()
    with pytest.raises(p.HboneProtocolError):
        server.receive(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"\0" * 64)
    assert any(isinstance(f, hyperframe.frame.GoAwayFrame)
               for f in frames(server.data_to_send()))


def test_data_frame_repr_workaround_in_effect() -> None:
    from tests import h2peer

    assert h2peer.DATA_REPR_WORKAROUND is True
    frame = hyperframe.frame.DataFrame(1, b"\xab" * (1024 * 1024))
    text = repr(frame)
    # Without the workaround, the body is serialised and hex-encoded ("<hex:abab...").
    assert "hex" not in text and "abab" not in text
    assert "1048576 bytes" in text
    assert len(text) < 200
    assert h2peer.install_data_repr_workaround() is True  # idempotent
