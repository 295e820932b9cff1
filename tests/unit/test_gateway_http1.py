"""The gateway's HTTP/1.1 path: routing, filters, retries, timeouts, L7 policy, bad input."""

from __future__ import annotations

import json
import re

import trio

from nodeproxy.model import Clause, Match, Policy, Rule
from tests.unit.test_gateway_support import (
    H1Client,
    gateway,
    mesh,
    route,
    service,
    start_echo,
    who,
    workload,
)

VIP = "10.96.0.10"


async def test_default_route_keepalive_and_chunked_upload(nursery):
    p1 = await start_echo(nursery, "web-1", "127.0.0.2")
    w1 = workload("web-1", "127.0.0.2", p1)
    state = mesh([w1], [service("web", VIP, [w1])])
    async with gateway(state) as h:
        stream = await h.tunnel(f"{VIP}:80")
        client = H1Client(stream)
        status, headers, body = await client.request("GET", "/hello?x=1")
        assert status == 200 and who(body) == "web-1"
        seen = json.loads(body)
        assert seen["path"] == "/hello?x=1"
        assert seen["headers"]["traceparent"].startswith("00-")
        # same tunnel, next request: keep-alive; a chunked upload streamed through
        status, _, body = await client.request("POST", "/up", body=[b"a" * 1000, b"b" * 5000])
        assert status == 200 and json.loads(body)["body_bytes"] == 6000
        assert len(h.dials) == 1  # one upstream connection reused


async def _two_backends(nursery, names=("web-1", "web-2")):
    ws = []
    for i, name in enumerate(names):
        ip = f"127.0.0.{i + 2}"
        ws.append(workload(name, ip, await start_echo(nursery, name, ip)))
    return ws


async def test_routing_precedence_404_and_filters(nursery):
    v1, v2 = await _two_backends(nursery, ("v1", "v2"))
    svcs = [service("web", VIP, [v1, v2]), service("web-v1", "10.96.0.11", [v1]),
            service("web-v2", "10.96.0.12", [v2])]
    rules = [
        {"matches": [{"path": {"type": "PathPrefix", "value": "/api"}}],
         "backendRefs": [{"name": "web-v1", "port": 80}],
         "filters": [
             {"type": "RequestHeaderModifier",
              "requestHeaderModifier": {"set": [{"name": "x-set", "value": "yes"}],
                                        "remove": ["x-drop"]}},
             {"type": "ResponseHeaderModifier",
              "responseHeaderModifier": {"add": [{"name": "x-resp", "value": "added"}]}}]},
        {"matches": [{"path": {"type": "PathPrefix", "value": "/api/v2"}},
                     {"headers": [{"name": "x-version", "value": "2"}],
                      "path": {"type": "PathPrefix", "value": "/api"}}],
         "backendRefs": [{"name": "web-v2", "port": 80}]},
        {"matches": [{"path": {"type": "Exact", "value": "/old"}}],
         "filters": [{"type": "RequestRedirect",
                      "requestRedirect": {"path": {"type": "ReplaceFullPath",
                                                   "replaceFullPath": "/new"},
                                          "statusCode": 301}}]},
        {"matches": [{"path": {"type": "PathPrefix", "value": "/rw"}, "method": "GET"}],
         "backendRefs": [{"name": "web-v1", "port": 80}],
         "filters": [{"type": "URLRewrite",
                      "urlRewrite": {"path": {"type": "ReplacePrefixMatch",
                                              "replacePrefixMatch": "/inner"}}}]},
    ]
    state = mesh([v1, v2], svcs, [route("r", "web", rules)])
    async with gateway(state) as h:
        c = H1Client(await h.tunnel(f"{VIP}:80"))
        status, hdrs, body = await c.request("GET", "/api/x", [("x-drop", "1")])
        seen = json.loads(body)
        assert status == 200 and seen["pod"] == "v1"
        assert seen["headers"]["x-set"] == "yes" and "x-drop" not in seen["headers"]
        assert hdrs["x-resp"] == "added"
        # longest prefix wins; a header match outranks the plain prefix of equal length
        assert who((await c.request("GET", "/api/v2/z"))[2]) == "v2"
        assert who((await c.request("GET", "/api/q", [("x-version", "2")]))[2]) == "v2"
        # whole segments: /apix is not under /api
        assert (await c.request("GET", "/apix"))[0] == 404
        status, hdrs, _ = await c.request("GET", "/old?q=1")
        assert status == 301 and hdrs["location"] == "http://web.shop/new?q=1"
        status, _, body = await c.request("GET", "/rw/a/b")
        assert json.loads(body)["path"] == "/inner/a/b"
        # method match: POST /rw matches nothing
        assert (await c.request("POST", "/rw/a", body=b"x"))[0] == 404


async def test_weighted_split(nursery):
    v1, v2 = await _two_backends(nursery, ("v1", "v2"))
    svcs = [service("web", VIP, [v1, v2]), service("web-v1", "10.96.0.11", [v1]),
            service("web-v2", "10.96.0.12", [v2])]
    rules = [{"backendRefs": [{"name": "web-v1", "port": 80, "weight": 70},
                              {"name": "web-v2", "port": 80, "weight": 30}]}]
    async with gateway(mesh([v1, v2], svcs, [route("split", "web", rules)])) as h:
        c = H1Client(await h.tunnel(f"{VIP}:80"))
        counts = {"v1": 0, "v2": 0}
        for _ in range(200):
            counts[who((await c.request("GET", "/"))[2])] += 1
        assert 110 <= counts["v1"] <= 170, counts


async def test_retry_rescues_flaky_backend_but_not_post(nursery):
    ok, bad = await _two_backends(nursery, ("ok", "bad"))

    async def flaky_dial(ep):
        # "bad" always answers 503: its requests are redirected to ?status=503
        stream = await trio.open_tcp_stream(ep.address, ep.port)
        return _Rewrite(stream, b"?status=503 " if ep.workload.name == "bad" else None)

    state = mesh([ok, bad], [service("web", VIP, [ok, bad]),
                             service("bad-only", "10.96.0.13", [bad])])
    async with gateway(state, dial=flaky_dial) as h:
        c = H1Client(await h.tunnel(f"{VIP}:80"))
        for _ in range(12):
            status, _, body = await c.request("GET", "/x")
            assert status == 200 and who(body) == "ok"
        assert retries(await h.metrics(), "status-503") >= 1
        # a service whose only endpoint fails: GET is retried (2 retries), POST is not
        c = H1Client(await h.tunnel("10.96.0.13:80"))
        before = retries(await h.metrics(), "status-503")
        assert (await c.request("POST", "/x", body=b"data"))[0] == 503
        assert retries(await h.metrics(), "status-503") == before
        assert (await c.request("GET", "/x"))[0] == 503
        assert retries(await h.metrics(), "status-503") == before + 2


def retries(metrics: str, reason: str) -> float:
    pattern = r'nodeproxy_gateway_retries_total\{reason="' + re.escape(reason) + r'"\} ([0-9.]+)'
    m = re.search(pattern, metrics)
    return float(m.group(1)) if m else 0.0


class _Rewrite(trio.abc.HalfCloseableStream):
    """Wraps a backend stream; rewrites ' HTTP/1.1' in request lines to add a query."""

    def __init__(self, stream, query):
        self.s, self.q = stream, query

    async def send_all(self, data):
        if self.q:
            data = data.replace(b" HTTP/1.1\r\n", self.q + b"HTTP/1.1\r\n", 1)
        await self.s.send_all(data)

    async def receive_some(self, max_bytes=None):
        return await self.s.receive_some(max_bytes)

    async def wait_send_all_might_not_block(self):
        await self.s.wait_send_all_might_not_block()

    async def send_eof(self):
        await self.s.send_eof()

    async def aclose(self):
        await self.s.aclose()


async def test_connection_failure_retried_and_ejected(nursery):
    (ok,) = await _two_backends(nursery, ("ok",))
    dead = workload("dead", "127.0.0.9", 1)  # nothing listens there
    state = mesh([ok, dead], [service("web", VIP, [ok, dead])])
    async with gateway(state) as h:
        c = H1Client(await h.tunnel(f"{VIP}:80"))
        for _ in range(20):
            status, _, body = await c.request("GET", "/")
            assert status == 200 and who(body) == "ok"
        dead_dials = sum(1 for ep in h.dials if ep.workload.name == "dead")
        # ejected after a few consecutive failures: not dialled on every request
        assert 1 <= dead_dials < 10
        metrics = await h.metrics()
        assert 'nodeproxy_gateway_retries_total{reason="connect-failure"}' in metrics


async def test_timeouts(nursery):
    (w,) = await _two_backends(nursery, ("slow",))
    rules = [
        {"matches": [{"path": {"type": "PathPrefix", "value": "/req"}}],
         "timeouts": {"request": "300ms"}, "backendRefs": [{"name": "web", "port": 80}]},
        {"matches": [{"path": {"type": "PathPrefix", "value": "/try"}}],
         "timeouts": {"request": "2s", "backendRequest": "200ms"},
         "retry": {"codes": [504], "attempts": 1},
         "backendRefs": [{"name": "web", "port": 80}]},
    ]
    state = mesh([w], [service("web", VIP, [w])], [route("t", "web", rules)])
    async with gateway(state) as h:
        c = H1Client(await h.tunnel(f"{VIP}:80"))
        assert (await c.request("GET", "/req?delay=0.05"))[0] == 200
        c = H1Client(await h.tunnel(f"{VIP}:80"))
        assert (await c.request("GET", "/req?delay=3"))[0] == 504
        c = H1Client(await h.tunnel(f"{VIP}:80"))
        assert (await c.request("GET", "/try?delay=1"))[0] == 504
        assert retries(await h.metrics(), "timeout") == 1  # the per-try timeout was retried


async def test_l7_authorization_denies_with_403(nursery):
    (w,) = await _two_backends(nursery, ("web-1",))
    deny_delete = Policy(
        "no-delete", "shop", action="DENY",
        rules=(Rule((Clause((Match(methods=("DELETE",)),)),)),))
    allow_front_get = Policy(
        "front-reads", "shop", action="ALLOW",
        rules=(Rule((Clause((Match(namespaces=("front",)),)),
                     Clause((Match(paths=("/public/*",)),)))),))
    state = mesh([w], [service("web", VIP, [w])], policies=[deny_delete, allow_front_get])
    async with gateway(state) as h:
        c = H1Client(await h.tunnel(f"{VIP}:80"))
        assert (await c.request("GET", "/public/a"))[0] == 200
        status, _, body = await c.request("GET", "/private")
        assert status == 403 and b"RBAC" in body
        assert (await c.request("DELETE", "/public/a"))[0] == 403
        # another caller namespace is not allowed at all
        other = await h.connect("spiffe://cluster.local/ns/other/sa/x")
        c2 = H1Client(await h.tunnel(f"{VIP}:80", other))
        assert (await c2.request("GET", "/public/a"))[0] == 403


async def test_connect_to_foreign_address_is_refused(nursery):
    (w,) = await _two_backends(nursery, ("web-1",))
    state = mesh([w], [service("web", VIP, [w])])
    async with gateway(state) as h:
        conn = await h.connect()
        from ztunnel.hbone.connection import HboneStatusError

        for authority in ("10.96.0.99:80", f"{VIP}:81", "127.0.0.2:8080"):
            try:
                await conn.open_stream(authority)
            except HboneStatusError as e:
                assert e.status == 400
            else:
                raise AssertionError(f"{authority} accepted")


async def _read_until(stream, marker: bytes) -> bytes:
    data = b""
    while marker not in data:
        chunk = await stream.receive_some(65536)
        if not chunk:
            break
        data += chunk
    return data


async def _read_all(stream) -> bytes:
    data = b""
    while chunk := await stream.receive_some(65536):
        data += chunk
    return data


async def test_upgrade_passthrough(nursery):
    async def upgrade_server(stream):
        head = await _read_until(stream, b"\r\n\r\n")
        assert b"upgrade: websocket" in head.lower()
        await stream.send_all(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                              b"Upgrade: websocket\r\n\r\nwelcome;")
        try:
            while data := await stream.receive_some(1024):
                await stream.send_all(data.upper())
        except trio.BrokenResourceError:
            pass  # the gateway resets it when the test ends

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.4")
    port = listeners[0].socket.getsockname()[1]
    nursery.start_soon(trio.serve_listeners, upgrade_server, listeners)
    w = workload("ws", "127.0.0.4", port)
    async with gateway(mesh([w], [service("ws", VIP, [w])])) as h:
        t = await h.tunnel(f"{VIP}:80")
        await t.send_all(b"GET /chat HTTP/1.1\r\nHost: ws\r\nConnection: Upgrade\r\n"
                         b"Upgrade: websocket\r\n\r\nearly")
        got = await _read_until(t, b"EARLY")
        assert got.startswith(b"HTTP/1.1 101 ") and b"welcome;" in got
        await t.send_all(b"hello")
        assert await _read_until(t, b"HELLO") == b"HELLO"


async def test_bad_requests_get_400_431_408(nursery):
    (w,) = await _two_backends(nursery, ("web-1",))
    from l7gateway.gateway import GatewayConfig
    from l7gateway.http1 import H1Config

    config = GatewayConfig(h1=H1Config(header_timeout=0.3))
    async with gateway(mesh([w], [service("web", VIP, [w])]), config=config) as h:
        conn = await h.connect()
        t = await h.tunnel(f"{VIP}:80", conn)
        await t.send_all(b"GET / HTTP/1.1\r\nHost: x\r\nthis is not a header\r\n\r\n")
        assert (await _read_all(t)).startswith(b"HTTP/1.1 400 ")
        t = await h.tunnel(f"{VIP}:80", conn)
        await t.send_all(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n")
        assert (await _read_all(t)).startswith(b"HTTP/1.1 431 ")
        t = await h.tunnel(f"{VIP}:80", conn)
        await t.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n")  # ... and never the rest
        assert (await _read_all(t)).startswith(b"HTTP/1.1 408 ")
        # the same HBONE connection still serves good requests
        c = H1Client(await h.tunnel(f"{VIP}:80", conn))
        assert (await c.request("GET", "/"))[0] == 200


async def test_opaque_tcp_is_relayed(nursery):
    (w,) = await _two_backends(nursery, ("web-1",))
    async with gateway(mesh([w], [service("web", VIP, [w])])) as h:
        t = await h.tunnel(f"{VIP}:80")
        await t.send_all(b"\x00\x01binary stuff")
        await t.send_eof()
        assert await _read_all(t) == b"\x00\x01binary stuff[eof after 14 bytes]\n"
        assert "istio_tcp_connections_opened_total" in await h.metrics()


async def test_request_mirror_copies_the_request(nursery):
    main, shadow = await _two_backends(nursery, ("main", "shadow"))
    svcs = [service("web", VIP, [main]), service("shadow", "10.96.0.14", [shadow])]
    rules = [{"backendRefs": [{"name": "web", "port": 80}],
              "filters": [{"type": "RequestMirror",
                           "requestMirror": {"backendRef": {"name": "shadow", "port": 80}}}]}]
    async with gateway(mesh([main, shadow], svcs, [route("m", "web", rules)])) as h:
        c = H1Client(await h.tunnel(f"{VIP}:80"))
        status, _, body = await c.request("POST", "/copy", body=b"payload")
        assert status == 200 and who(body) == "main"
        with trio.fail_after(5):
            while not any(ep.workload.name == "shadow" for ep in h.dials):
                await trio.sleep(0.01)
