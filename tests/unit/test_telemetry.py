"""Telemetry: the metrics/readiness/admin HTTP server, Istio-named metrics, the access log."""

from __future__ import annotations

import logging
import re
from dataclasses import replace

import h11
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from nodeproxy.model import HBONE, Service, Workload
from nodeproxy.telemetry.accesslog import format_entry, log_connection
from nodeproxy.telemetry.metrics import (
    LATENCY_BUCKETS_MS,
    ConnectionLabels,
    ProxyMetrics,
    metrics_route,
)
from nodeproxy.telemetry.server import (
    Readiness,
    Request,
    Response,
    json_response,
    parse_address,
    readiness_route,
    serve_http,
)

# -- the HTTP server ----------------------------------------------------------------------


async def _echo(req: Request) -> Response:
    return json_response(
        {
            "method": req.method,
            "path": req.path,
            "query": req.query,
            "ua": req.headers.get("user-agent", ""),
        }
    )


async def _boom(req: Request) -> Response:
    raise RuntimeError("handler bug")


@pytest.fixture
async def server(nursery):
    """A server on an ephemeral loopback port: (port, readiness, metrics)."""
    readiness = Readiness()
    metrics = ProxyMetrics()
    routes = {
        "/metrics": metrics_route(metrics),
        "/stats/prometheus": metrics_route(metrics),
        "/healthz/ready": readiness_route(readiness),
        "/echo": _echo,
        "/boom": _boom,
    }
    port = await nursery.start(
        lambda task_status: serve_http(
            "127.0.0.1:0", routes, request_timeout=0.5, task_status=task_status
        )
    )
    return port, readiness, metrics


async def curl(*args: str) -> tuple[int, str]:
    """Run curl; return (http status, body)."""
    proc = await trio.run_process(
        ["curl", "-s", "-o", "-", "-w", "\n%{http_code}", "--max-time", "5", *args],
        capture_stdout=True,
        check=False,
    )
    out = proc.stdout.decode()
    body, _, code = out.rpartition("\n")
    return int(code), body


async def raw(port: int, data: bytes) -> bytes:
    """Send ``data`` on a fresh connection and read until the server closes it."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(data)
        out = b""
        with trio.fail_after(5):
            while chunk := await stream.receive_some(65536):
                out += chunk
    return out


async def test_metrics_over_curl(server):
    port, _, metrics = server
    metrics.opened(ConnectionLabels(reporter="destination"))
    for path in ("/metrics", "/stats/prometheus"):
        status, body = await curl(f"http://127.0.0.1:{port}{path}")
        assert status == 200
        assert "istio_tcp_connections_opened_total{" in body
        assert 'reporter="destination"' in body


async def test_unknown_path_404(server):
    port, _, _ = server
    status, _ = await curl(f"http://127.0.0.1:{port}/nope")
    assert status == 404


async def test_readiness(server):
    port, readiness, _ = server
    readiness.set("certificates", False, "waiting for first certificate")
    readiness.set("state", True)
    status, body = await curl(f"http://127.0.0.1:{port}/healthz/ready")
    assert status == 503
    assert body == "not ready: certificates: waiting for first certificate"
    readiness.set("certificates", True)
    status, body = await curl(f"http://127.0.0.1:{port}/healthz/ready")
    assert (status, body) == (200, "ready")


async def test_query_and_headers_reach_handler(server):
    port, _, _ = server
    status, body = await curl("-A", "probe/1", f"http://127.0.0.1:{port}/echo?ns=shop&x=%20y")
    assert status == 200
    assert '"ns": "shop"' in body and '"x": " y"' in body and '"ua": "probe/1"' in body


async def test_handler_exception_is_500_and_logged_and_server_lives(server, caplog):
    port, _, _ = server
    status, _ = await curl(f"http://127.0.0.1:{port}/boom")
    assert status == 500
    assert "handler bug" in caplog.text
    status, _ = await curl(f"http://127.0.0.1:{port}/echo")
    assert status == 200


async def test_keep_alive_serves_several_requests_on_one_connection(server):
    port, _, _ = server
    client = h11.Connection(h11.CLIENT)
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        for path in ("/echo", "/nope", "/echo"):
            await stream.send_all(
                client.send(h11.Request(method="GET", target=path, headers=[("host", "x")]))
                + client.send(h11.EndOfMessage())
            )
            status = None
            with trio.fail_after(5):
                while True:
                    ev = client.next_event()
                    if ev is h11.NEED_DATA:
                        client.receive_data(await stream.receive_some(65536))
                    elif isinstance(ev, h11.Response):
                        status = ev.status_code
                    elif isinstance(ev, h11.EndOfMessage):
                        break
            assert status == (404 if path == "/nope" else 200)
            client.start_next_cycle()


async def test_malformed_request_is_400(server):
    port, _, _ = server
    out = await raw(port, b"THIS IS NOT HTTP\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400 ")


async def test_bad_header_line_is_400(server):
    port, _, _ = server
    out = await raw(port, b"GET / HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400 ")


async def test_oversize_headers_are_431(server):
    port, _, _ = server
    big = b"GET /echo HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n"
    out = await raw(port, big)
    assert out.startswith(b"HTTP/1.1 431 ")


async def test_oversize_unfinished_header_block_is_431_without_waiting(server):
    # the block never ends; the server must refuse it once it passes 16 KiB rather than
    # keep buffering (408 would mean it waited for the deadline instead)
    port, _, _ = server
    out = await raw(port, b"GET /echo HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 17000)
    assert out.startswith(b"HTTP/1.1 431 ")


async def test_slow_client_is_cut_off(server):
    # request_timeout is 0.5 s in the fixture; a client that never finishes its headers
    # gets 408 and a closed connection instead of holding it
    port, _, _ = server
    out = await raw(port, b"GET /echo HTTP/1.1\r\nHost: x\r\n")
    assert out.startswith(b"HTTP/1.1 408 ")


async def test_idle_connection_closed_quietly(server):
    port, _, _ = server
    assert await raw(port, b"") == b""


async def test_head_has_no_body(server):
    port, _, _ = server
    out = await raw(port, b"HEAD /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and body == b""


def test_parse_address():
    assert parse_address("127.0.0.1:15000") == ("127.0.0.1", 15000)
    assert parse_address("[::1]:0") == ("::1", 0)
    for bad in ("15000", "host:", ":80", "h:99999", "h:x"):
        with pytest.raises(ValueError):
            parse_address(bad)


def test_readiness_without_conditions_is_ready():
    r = Readiness()
    assert r.ready and r.reason == ""
    r.set("a", False)
    r.set("b", False, "no state")
    assert not r.ready
    assert r.reason == "a; b: no state"


# -- metrics ------------------------------------------------------------------------------

ISTIO_LABELS = {
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "destination_service",
    "destination_service_namespace",
    "destination_service_name",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "request_protocol",
    "response_flags",
    "connection_security_policy",
}


def _samples(metrics: ProxyMetrics) -> dict[str, list]:
    out: dict[str, list] = {}
    for fam in text_string_to_metric_families(metrics.exposition().decode()):
        for s in fam.samples:
            out.setdefault(s.name, []).append(s)
    return out


def _pair():
    client = Workload(
        uid="c",
        name="client-7d9",
        namespace="shop",
        node="n1",
        service_account="client",
        protocol=HBONE,
        labels={"app": "client", "version": "v1"},
        addresses=("10.0.0.1",),
    )
    server = Workload(
        uid="s",
        name="web-5f4",
        namespace="shop",
        node="n2",
        service_account="web",
        protocol=HBONE,
        labels={"app": "web"},
        addresses=("10.0.0.2",),
    )
    svc = Service(name="web", namespace="shop", addresses=("10.96.0.10",))
    return client, server, svc


def test_connection_labels_from_workloads():
    client, server, svc = _pair()
    lab = ConnectionLabels.from_workloads(
        "destination", source=client, destination=server, service=svc, mtls=True
    )
    assert lab.source_workload == "client-7d9"
    assert lab.source_principal == "spiffe://cluster.local/ns/shop/sa/client"
    assert (lab.source_app, lab.source_version) == ("client", "v1")
    assert lab.destination_service == "web.shop.svc.cluster.local"
    assert lab.destination_service_name == "web"
    assert lab.destination_service_namespace == "shop"
    assert lab.destination_version == "latest"
    assert lab.destination_principal == "spiffe://cluster.local/ns/shop/sa/web"
    assert lab.connection_security_policy == "mutual_tls"
    plain = ConnectionLabels.from_workloads("destination", destination=server)
    assert plain.source_workload == plain.source_principal == "unknown"
    assert plain.connection_security_policy == "unknown"


def test_connection_labels_are_remembered_per_workload_objects(monkeypatch):
    """Connections between the same workloads share one labels object, built once; a
    workload replaced by the control plane (a new object) gets labels of its own."""
    client, server, svc = _pair()
    built = []
    build = ConnectionLabels._build
    monkeypatch.setattr(ConnectionLabels, "_build",
                        classmethod(lambda cls, *a: built.append(a) or build(*a)))
    first = ConnectionLabels.from_workloads("source", source=client, destination=server,
                                            service=svc, mtls=True)
    again = ConnectionLabels.from_workloads("source", source=client, destination=server,
                                            service=svc, mtls=True)
    assert again is first and len(built) == 1
    relabelled = replace(server, labels={"app": "web", "version": "v2"})
    moved = ConnectionLabels.from_workloads("source", source=client, destination=relabelled,
                                            service=svc, mtls=True)
    assert moved.destination_version == "v2" and first.destination_version == "latest"
    assert ConnectionLabels.from_workloads("source", source=client, destination=server,
                                           service=svc, mtls=False) is not first


def test_tcp_metrics_exposition_has_istio_names_and_labels():
    client, server, svc = _pair()
    m = ProxyMetrics()
    lab = ConnectionLabels.from_workloads(
        "source", source=client, destination=server, service=svc, mtls=True
    )
    m.opened(lab)
    m.bytes(lab, received=100, sent=7)
    m.bytes(lab, received=50, sent=0)
    m.closed(lab)
    m.failed(lab, "CONNECT")
    s = _samples(m)
    for name in (
        "istio_tcp_connections_opened_total",
        "istio_tcp_connections_closed_total",
        "istio_tcp_received_bytes_total",
        "istio_tcp_sent_bytes_total",
        "istio_tcp_connections_failed_total",
    ):
        assert name in s, name
        assert set(s[name][0].labels) == ISTIO_LABELS
    assert s["istio_tcp_received_bytes_total"][0].value == 150
    assert s["istio_tcp_sent_bytes_total"][0].value == 7
    opened = s["istio_tcp_connections_opened_total"][0].labels
    assert opened["reporter"] == "source"
    assert opened["destination_service"] == "web.shop.svc.cluster.local"
    assert opened["response_flags"] == "-"
    assert s["istio_tcp_connections_failed_total"][0].labels["response_flags"] == "CONNECT"
    assert not any(n.endswith("_created") for n in s)
    build = s["istio_build"][0]
    assert build.labels == {"component": "ztunnel", "tag": "unknown"} and build.value == 1


def test_closed_with_flags_is_a_separate_series():
    m = ProxyMetrics()
    lab = ConnectionLabels(reporter="destination")
    m.closed(lab)
    m.closed(lab, response_flags="DENY")
    m.closed(lab, response_flags="DENY")
    by_flag = {
        x.labels["response_flags"]: x.value
        for x in _samples(m)["istio_tcp_connections_closed_total"]
    }
    assert by_flag == {"-": 1, "DENY": 2}


def test_registries_are_independent():
    a, b = ProxyMetrics(), ProxyMetrics()
    a.opened(ConnectionLabels())
    assert "istio_tcp_connections_opened_total" in _samples(a)
    assert "istio_tcp_connections_opened_total" not in _samples(b)


def test_l7_request_metrics_with_linkerd_buckets():
    m = ProxyMetrics()
    lab = ConnectionLabels(reporter="destination", request_protocol="http")
    m.request(lab, 200, 12.0)
    m.request(lab, 503, 2500.0)
    s = _samples(m)
    codes = {x.labels["response_code"]: x.value for x in s["istio_requests_total"]}
    assert codes == {"200": 1, "503": 1}
    buckets = {float(x.labels["le"]) for x in s["istio_request_duration_milliseconds_bucket"]}
    assert buckets == {float(b) for b in LATENCY_BUCKETS_MS} | {float("inf")}


# -- access log ---------------------------------------------------------------------------


def test_format_entry_orders_and_quotes():
    line = format_entry(
        {
            "duration": 12.4,
            "src.addr": "10.0.0.1:4242",
            "src.workload": "client-7d9",
            "src.namespace": "shop",
            "src.identity": "spiffe://cluster.local/ns/shop/sa/client",
            "dst.addr": "10.0.0.2:8080",
            "dst.hbone_addr": "10.0.0.2:15008",
            "dst.service": "web.shop.svc.cluster.local",
            "dst.workload": "web-5f4",
            "dst.namespace": "shop",
            "dst.identity": "spiffe://cluster.local/ns/shop/sa/web",
            "direction": "outbound",
            "bytes_sent": 100,
            "bytes_recv": 7,
            "error": 'connect failed: "refused"',
            "response_flags": None,
        }
    )
    assert line == (
        "src.addr=10.0.0.1:4242 src.workload=client-7d9 src.namespace=shop "
        "src.identity=spiffe://cluster.local/ns/shop/sa/client dst.addr=10.0.0.2:8080 "
        "dst.hbone_addr=10.0.0.2:15008 dst.service=web.shop.svc.cluster.local "
        "dst.workload=web-5f4 dst.namespace=shop "
        "dst.identity=spiffe://cluster.local/ns/shop/sa/web direction=outbound "
        'bytes_sent=100 bytes_recv=7 duration=12ms error="connect failed: \\"refused\\""'
    )


def test_format_entry_escapes_newlines_and_empty():
    assert format_entry({"a": "x\ny", "b": ""}) == 'a="x\\ny" b=""'


def test_log_connection_writes_one_line_to_access_logger(caplog):
    caplog.set_level(logging.INFO, logger="nodeproxy.access")
    log_connection(
        src_addr="10.0.0.1:1",
        dst_addr="10.0.0.2:80",
        direction="inbound",
        bytes_sent=1,
        bytes_recv=2,
        duration=3,
        response_flags="DENY",
    )
    recs = [r for r in caplog.records if r.name == "nodeproxy.access"]
    assert len(recs) == 1
    msg = recs[0].getMessage()
    assert "\n" not in msg
    assert re.fullmatch(
        r"connection complete src\.addr=10\.0\.0\.1:1 dst\.addr=10\.0\.0\.2:80 "
        r"direction=inbound bytes_sent=1 bytes_recv=2 duration=3ms response_flags=DENY",
        msg,
    )
