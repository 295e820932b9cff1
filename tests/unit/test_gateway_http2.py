"""The gateway's HTTP/2 path: concurrency, trailers (gRPC-like), protocol errors, rapid reset."""

from __future__ import annotations

import json

import h2.config
import h2.connection
import h2.events
import hyperframe.frame
import trio
from h2.errors import ErrorCodes

from l7gateway.gateway import GatewayConfig
from l7gateway.http2 import H2Config
from l7gateway.sniff import H2_PREFACE
from tests.unit.test_gateway_support import (
    H2Client,
    gateway,
    mesh,
    service,
    start_echo,
    workload,
)

VIP = "10.96.0.10"
GRPC_VIP = "10.96.0.20"


async def grpc_like_server(stream: trio.SocketStream) -> None:
    """Answers every request with its body, then trailers (grpc-status, and the request's
    trailer echoed) — an independent minimal h2 server."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=False, header_encoding="utf-8", validate_outbound_headers=False))
    conn.initiate_connection()
    bodies: dict[int, bytes] = {}
    trailers: dict[int, dict[str, str]] = {}
    paths: dict[int, str] = {}
    try:
        await stream.send_all(conn.data_to_send())
        while data := await stream.receive_some(65536):
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.RequestReceived) and dict(ev.headers).get(
                        ":path", "").endswith("/Early") and ev.stream_ended is None:
                    # as grpc-python does: the whole answer before the request's end, then
                    # RST_STREAM(NO_ERROR) ("stop sending", RFC 9113 §8.1), in one write
                    sid = ev.stream_id
                    conn.send_headers(sid, [(":status", "200"),
                                            ("content-type", "application/grpc")])
                    conn.send_data(sid, b"\x00\x00\x00\x00\x05early")
                    conn.send_headers(sid, [("grpc-status", "0"), ("x-answered", "early")],
                                      end_stream=True)
                    conn.reset_stream(sid, ErrorCodes.NO_ERROR)
                elif isinstance(ev, h2.events.DataReceived):
                    bodies[ev.stream_id] = bodies.get(ev.stream_id, b"") + ev.data
                    conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, h2.events.TrailersReceived):
                    trailers[ev.stream_id] = dict(ev.headers)
                elif isinstance(ev, h2.events.RequestReceived):
                    paths[ev.stream_id] = dict(ev.headers).get(":path", "")
                elif isinstance(ev, h2.events.StreamEnded) and paths.get(
                        ev.stream_id, "").endswith("/Short"):
                    # content-length says more than the body has: malformed (RFC 9113 §8.1.1)
                    conn.send_headers(ev.stream_id, [(":status", "200"),
                                                     ("content-length", "100")])
                    conn.send_data(ev.stream_id, b"short", end_stream=True)
                elif isinstance(ev, h2.events.StreamEnded):
                    sid = ev.stream_id
                    if paths.get(sid, "").endswith("/Hints"):
                        conn.send_headers(sid, [(":status", "103"), ("link", "</a.css>")])
                    conn.send_headers(sid, [(":status", "200"),
                                            ("content-type", "application/grpc")])
                    conn.send_data(sid, bodies.get(sid, b""))
                    got = trailers.get(sid, {}).get("x-client-trailer", "none")
                    conn.send_headers(sid, [("grpc-status", "0"), ("x-echo-trailer", got)],
                                      end_stream=True)
            await stream.send_all(conn.data_to_send())
    except (trio.BrokenResourceError, h2.exceptions.ProtocolError):
        pass


async def _setup(nursery):
    p1 = await start_echo(nursery, "web-1", "127.0.0.2")
    w1 = workload("web-1", "127.0.0.2", p1)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.5")
    nursery.start_soon(trio.serve_listeners, grpc_like_server, listeners)
    g = workload("grpc-1", "127.0.0.5", listeners[0].socket.getsockname()[1])
    return mesh([w1, g], [service("web", VIP, [w1]),
                          service("grpc", GRPC_VIP, [g], port_name="grpc")])


async def _h2_client(h, nursery, authority=f"{VIP}:80", conn=None):
    t = await h.tunnel(authority, conn)
    c = H2Client(t)
    await c.start(nursery)
    return c


async def test_many_concurrent_streams_to_an_http1_backend(nursery):
    state = await _setup(nursery)
    async with gateway(state) as h:
        c = await _h2_client(h, nursery)
        sids = [await c.send("GET", f"/s/{i}?delay=0.2") for i in range(60)]
        with trio.fail_after(10):
            results = [await c.wait(sid) for sid in sids]
        assert all(r["headers"][":status"] == "200" for r in results)
        paths = {json.loads(r["data"])["path"] for r in results}
        assert paths == {f"/s/{i}?delay=0.2" for i in range(60)}
        # a body through h2 → HTTP/1.1 (no content-length: chunked upstream)
        r = await c.request("POST", "/up", body=b"z" * 100_000)
        assert json.loads(r["data"])["body_bytes"] == 100_000


async def test_trailers_round_trip_grpc_like(nursery):
    state = await _setup(nursery)
    async with gateway(state) as h:
        c = await _h2_client(h, nursery, f"{GRPC_VIP}:80")
        r = await c.request("POST", "/pkg.Svc/Call", body=b"\x00\x00\x00\x00\x02hi",
                            headers=[("content-type", "application/grpc"), ("te", "trailers")],
                            trailers=[("x-client-trailer", "abc")])
        assert r["headers"][":status"] == "200"
        assert r["data"] == b"\x00\x00\x00\x00\x02hi"
        assert r["trailers"] == {"grpc-status": "0", "x-echo-trailer": "abc"}
        # concurrent streams multiplexed over one upstream connection
        sids = [await c.send("POST", "/pkg.Svc/Call", body=b"%d" % i,
                             headers=[("content-type", "application/grpc")]) for i in range(20)]
        for i, sid in enumerate(sids):
            r = await c.wait(sid)
            assert r["data"] == b"%d" % i and r["trailers"]["grpc-status"] == "0"
        assert sum(1 for ep in h.dials if ep.workload.name == "grpc-1") == 1
        assert 'request_protocol="grpc"' in await h.metrics()


async def test_answer_before_the_request_ends_keeps_body_and_trailers(nursery):
    # grpc-python answers a unary call as soon as it has the message, before the client's
    # END_STREAM, and resets the stream with NO_ERROR: the gateway lost the body and trailers
    # of such answers ("No status received" in a grpc client) when the reset came in the same
    # read as the answer
    state = await _setup(nursery)
    async with gateway(state) as h:
        c = await _h2_client(h, nursery, f"{GRPC_VIP}:80")
        for _ in range(5):
            sid = await c.send("POST", "/pkg.Svc/Early", body=b"\x00\x00\x00\x00\x02hi",
                               headers=[("content-type", "application/grpc"),
                                        ("te", "trailers")],
                               trailers=[("x-client-trailer", "abc")])
            with trio.fail_after(10):
                r = await c.wait(sid)
            assert r["headers"][":status"] == "200"
            assert r["data"] == b"\x00\x00\x00\x00\x05early"
            assert r.get("trailers") == {"grpc-status": "0", "x-answered": "early"}


async def _goaway_of(t) -> hyperframe.frame.GoAwayFrame | None:
    """Read raw frames from a tunnel until the GOAWAY (or the end)."""
    buf = b""
    with trio.fail_after(5):
        while True:
            try:
                chunk = await t.receive_some(65536)
            except trio.BrokenResourceError:
                return None
            if not chunk:
                return None
            buf += chunk
            while len(buf) >= 9:
                frame, length = hyperframe.frame.Frame.parse_frame_header(memoryview(buf[:9]))
                if len(buf) < 9 + length:
                    break
                frame.parse_body(memoryview(buf[9:9 + length]))
                buf = buf[9 + length:]
                if isinstance(frame, hyperframe.frame.GoAwayFrame):
                    return frame


async def test_h2_garbage_gets_goaway_protocol_error(nursery):
    state = await _setup(nursery)
    async with gateway(state) as h:
        t = await h.tunnel(f"{VIP}:80")
        # the preface, then a DATA frame on stream 0 (a connection error)
        await t.send_all(H2_PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
                         + b"\x00\x00\x04\x00\x00\x00\x00\x00\x00abcd")
        frame = await _goaway_of(t)
        assert frame is not None and frame.error_code == ErrorCodes.PROTOCOL_ERROR


async def _flood_is_cut_off(nursery, h2_config: H2Config, flood) -> None:
    """``flood(attacker)`` queues frames on an h2 client; sent on one tunnel, they end its
    HTTP/2 connection with GOAWAY ENHANCE_YOUR_CALM, while another client on the same HBONE
    connection is unaffected."""
    state = await _setup(nursery)
    async with gateway(state, config=GatewayConfig(h2=h2_config)) as h:
        conn = await h.connect()
        good = await _h2_client(h, nursery, conn=conn)
        t = await h.tunnel(f"{VIP}:80", conn)
        attacker = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        attacker.initiate_connection()
        flood(attacker)
        try:
            await t.send_all(attacker.data_to_send())
        except trio.BrokenResourceError:
            pass
        frame = await _goaway_of(t)
        assert frame is not None and frame.error_code == ErrorCodes.ENHANCE_YOUR_CALM
        r = await good.request("GET", "/still-fine")
        assert r["headers"][":status"] == "200"


async def test_rapid_reset_flood_is_cut_off(nursery):
    def flood(attacker: h2.connection.H2Connection) -> None:
        for _ in range(200):
            sid = attacker.get_next_available_stream_id()
            attacker.send_headers(sid, [(":method", "GET"), (":scheme", "http"),
                                        (":authority", "web"), (":path", "/?delay=1")])
            attacker.reset_stream(sid, ErrorCodes.CANCEL)

    await _flood_is_cut_off(nursery, H2Config(max_resets=50, reset_window=10.0), flood)


async def test_ping_flood_is_cut_off(nursery):
    def flood(attacker: h2.connection.H2Connection) -> None:
        for i in range(100):
            attacker.ping(b"%08d" % i)

    await _flood_is_cut_off(nursery, H2Config(max_pings=30, reset_window=10.0), flood)


async def test_request_body_shorter_than_its_content_length_is_reset(nursery):
    state = await _setup(nursery)
    async with gateway(state) as h:
        c = await _h2_client(h, nursery)
        sid = await c.send("POST", "/up", headers=[("content-length", "10")], body=b"abc")
        with trio.fail_after(10):
            r = await c.wait(sid)
        assert r.get("reset") == ErrorCodes.PROTOCOL_ERROR and "headers" not in r
        # the connection goes on
        r = await c.request("POST", "/up", headers=[("content-length", "3")], body=b"abc")
        assert json.loads(r["data"])["body_bytes"] == 3


async def test_upstream_1xx_is_skipped_and_a_short_body_is_not_passed_off_as_whole(nursery):
    state = await _setup(nursery)
    async with gateway(state) as h:
        c = await _h2_client(h, nursery, f"{GRPC_VIP}:80")
        r = await c.request("POST", "/pkg.Svc/Hints", body=b"\x00\x00\x00\x00\x01x",
                            headers=[("content-type", "application/grpc")])
        assert r["headers"][":status"] == "200" and r["trailers"]["grpc-status"] == "0"
        sid = await c.send("POST", "/pkg.Svc/Short", body=b"x")
        with trio.fail_after(10):
            r = await c.wait(sid)
        assert "reset" in r or r.get("headers", {}).get(":status") == "502"


async def test_cookie_crumbs_are_joined_for_an_http1_backend(nursery):
    state = await _setup(nursery)
    async with gateway(state) as h:
        c = await _h2_client(h, nursery)
        r = await c.request("GET", "/c", headers=[("cookie", "a=1"), ("x-y", "z"),
                                                  ("cookie", "b=2")])
        assert json.loads(r["data"])["headers"]["cookie"] == "a=1; b=2"
