"""Gateway pieces without backends: protocol sniffing, readiness, the h2 repr workaround."""

from __future__ import annotations

import pytest
import trio

from l7gateway import gateway as gwmod
from l7gateway.forward import clean_headers, propagate_traceparent
from l7gateway.sniff import H2_PREFACE, HTTP1, HTTP2, TCP, detect
from tests.unit.test_gateway_support import H1Client, gateway, mesh


@pytest.mark.parametrize(
    ("data", "want"),
    [
        (b"", None),
        (b"PRI * HTTP/2.0", None),
        (H2_PREFACE, HTTP2),
        (b"GET / HTTP/1.1\r\n", HTTP1),
        (b"GE", None),
        (b"M-SEARCH * HTTP/1.1", HTTP1),
        (b"\x16\x03\x01\x02\x00", TCP),  # a TLS ClientHello
        (b"SSH-2.0-OpenSSH", TCP),
        (b" GET", TCP),
        (b"A" * 30, TCP),
    ],
)
def test_detect(data, want):
    assert detect(data) == want


def test_traceparent_continued_or_started():
    tid = "4bf92f3577b34da6a3ce929d0e0e4736"
    out = propagate_traceparent(f"00-{tid}-00f067aa0ba902b7-01")
    assert out.startswith(f"00-{tid}-") and out.endswith("-01")
    assert "00f067aa0ba902b7" not in out
    fresh = propagate_traceparent("garbage")
    assert len(fresh.split("-")) == 4 and tid not in fresh


def test_hop_by_hop_headers_dropped():
    hdrs = [("Connection", "keep-alive, X-Secret"), ("X-Secret", "1"), ("Keep-Alive", "5"),
            ("TE", "trailers"), ("X-Kept", "v"), ("Host", "h")]
    assert clean_headers(hdrs) == [("te", "trailers"), ("x-kept", "v")]


async def test_readiness_and_metrics_endpoints():
    state = mesh([], [])
    async with gateway(state) as h:
        with trio.fail_after(5):
            while not h.gateway.readiness.ready:
                await trio.sleep(0.01)
        stream = await trio.open_tcp_stream("127.0.0.1", h.ports.ready)
        status, _, body = await H1Client(stream).request("GET", "/healthz/ready")
        await stream.aclose()
        assert status == 200 and body == b"ready"
        assert "istio_build" in await h.metrics()


def test_main_requires_its_flags(capsys):
    with pytest.raises(SystemExit):
        gwmod.main(["--namespace", "shop"])
    assert "--controlplane" in capsys.readouterr().err
