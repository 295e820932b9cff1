"""The per-namespace L7 gateway in the lab, with real clients (curl, h2load, wrk).

Namespace `web` is labelled for a gateway (tests/lab/gateway.yaml); `front/client` calls it.
One lab is shared by the module; tests that change it put it back.
"""

from __future__ import annotations

import json
import os
import re
import sys
import textwrap

import pytest

from tests.lab.meshlab import ROOT, Lab, metric_sum, running_lab, wait_for

pytestmark = pytest.mark.lab

GATEWAY = "web/nodeproxy-gateway"


@pytest.fixture(scope="module")
def gw():
    with running_lab("/run/nodeproxy-test-gateway", "npt-gw-", "tests/lab/gateway.yaml") as lab:
        wait_for("the gateway serves", lambda: lab.curl_json("front/client", "http://plain.web/"),
                 timeout=60)
        yield lab


LOOP = """
import collections, http.client, json
conn = http.client.HTTPConnection({host!r}, {port}, timeout=15)
counts = collections.Counter()
for i in range({n}):
    conn.request({method!r}, {path!r}, body={body!r}, headers={headers!r})
    r = conn.getresponse()
    data = r.read()
    try:
        pod = json.loads(data).get("pod")
    except ValueError:
        pod = None
    counts["%d %s" % (r.status, pod)] += 1
    if r.getheader("connection", "").lower() == "close":
        conn.close()
        conn = http.client.HTTPConnection({host!r}, {port}, timeout=15)
print(json.dumps(counts))
"""


def loop(lab: Lab, n: int, host: str, path: str = "/", method: str = "GET",
         body: str | None = None, headers: dict | None = None, port: int = 80) -> dict[str, int]:
    """Send n requests on one keep-alive connection from front/client; count status+pod."""
    script = LOOP.format(host=host, port=port, n=n, method=method, path=path, body=body,
                         headers=headers or {})
    proc = lab.exec("front/client", sys.executable, "-c", script, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def gateway_metrics(lab: Lab) -> str:
    proc = lab.exec(GATEWAY, "curl", "-sS", "-m", "5", "http://127.0.0.1:15020/metrics")
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def status_of(lab: Lab, url: str, *extra: str) -> int:
    proc = lab.exec("front/client", "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                    "-m", "10", *extra, url)
    return int(proc.stdout or 0)


# -- through the gateway ------------------------------------------------------------------


def test_service_traffic_goes_through_the_gateway(gw: Lab):
    answer = gw.curl_json("front/client", "http://plain.web/")
    assert answer is not None and answer["pod"] == "echo-v1-a" or answer["pod"] == "echo-v1-b"
    gateway_ip = gw.ip(GATEWAY)
    assert answer["peer"].split(":")[0] == gateway_ip
    assert metric_sum(gateway_metrics(gw), "istio_requests_total", response_code="200") >= 1


def test_a_service_without_routes_is_routed_to_itself(gw: Lab):
    counts = loop(gw, 20, "plain.web")
    assert set(counts) <= {"200 echo-v1-a", "200 echo-v1-b"}
    assert sum(counts.values()) == 20


def test_unmatched_request_on_a_routed_service_is_404(gw: Lab):
    assert status_of(gw, "http://strict.web/only") == 200
    assert status_of(gw, "http://strict.web/other") == 404


def test_weighted_split_70_30(gw: Lab):
    counts = loop(gw, 1000, "echo.web", "/split")
    v2 = counts.get("200 echo-v2", 0)
    assert sum(counts.values()) == 1000 and all(k.startswith("200 ") for k in counts)
    assert 0.25 <= v2 / 1000 <= 0.35, counts  # ±5 % (3.4 standard deviations)


def test_header_match_routes_to_the_canary(gw: Lab):
    counts = loop(gw, 20, "echo.web", headers={"x-canary": "true"})
    assert counts == {"200 echo-v2": 20}


def test_query_param_match(gw: Lab):
    counts = loop(gw, 20, "echo.web", "/?canary=yes")
    assert counts == {"200 echo-v2": 20}


def test_a_route_attached_to_one_port_leaves_the_other_alone(gw: Lab):
    on_80 = gw.curl_json("front/client", "http://multi.web/")
    on_81 = gw.curl_json("front/client", "http://multi.web:81/")
    assert on_80["headers"].get("x-route") == "multi-80"
    assert "x-route" not in on_81["headers"] and on_81["pod"].startswith("echo-v1")


def test_a_consumer_route_applies_only_to_its_own_namespace(gw: Lab):
    assert loop(gw, 10, "consumer.web") == {"200 echo-v2": 10}  # front: its own route
    proc = gw.exec("other/caller", "curl", "-sS", "-m", "5", "http://consumer.web/")
    assert json.loads(proc.stdout)["pod"].startswith("echo-v1")  # other: the service itself


def test_path_prefix_rewrite(gw: Lab):
    answer = gw.curl_json("front/client", "http://echo.web/api/items?x=1")
    assert answer is not None and answer["path"] == "/v1/items?x=1"


def test_redirect(gw: Lab):
    proc = gw.exec("front/client", "curl", "-s", "-D", "-", "-o", "/dev/null", "-m", "5",
                   "http://echo.web/old")
    assert proc.stdout.startswith("HTTP/1.1 301")
    assert re.search(r"(?im)^location: http://echo\.web(:80)?/new\r?$", proc.stdout), proc.stdout


def test_request_and_response_header_modifiers(gw: Lab):
    proc = gw.exec("front/client", "curl", "-s", "-D", "/dev/stderr", "-m", "5",
                   "-H", "x-drop-me: 1", "http://echo.web/hdr")
    answer = json.loads(proc.stdout)
    assert answer["headers"].get("x-added") == "yes"
    assert "x-drop-me" not in answer["headers"]
    assert re.search(r"(?im)^x-resp: ok\r?$", proc.stderr)


def test_traceparent_is_started_or_propagated(gw: Lab):
    started = gw.curl_json("front/client", "http://plain.web/")
    assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-0[01]",
                        started["headers"].get("traceparent", ""))
    given = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    passed = gw.curl_json("front/client", "http://plain.web/", "-H", f"traceparent: {given}")
    assert passed["headers"]["traceparent"].split("-")[1] == given.split("-")[1]


# -- retries and timeouts -------------------------------------------------------------------


def test_retries_rescue_a_flaky_backend(gw: Lab):
    # every request succeeds although one of the two replicas answers only 503: a request
    # sent to it is retried on the other (how often it is sent there at all is the
    # balancer's business; test_non_idempotent_post_is_not_retried counts retries exactly)
    assert loop(gw, 40, "flaky.web") == {"200 flaky-good": 40}


def test_non_idempotent_post_is_not_retried(gw: Lab):
    def retries() -> float:
        return metric_sum(gateway_metrics(gw), "nodeproxy_gateway_retries_total")

    start = retries()
    assert loop(gw, 4, "broken.web") == {"503 flaky-bad": 4}
    after_get = retries()
    assert after_get - start == 4 * 3  # GET: every attempt retried, 3 times each
    assert loop(gw, 4, "broken.web", method="POST", body="order=1") == {"503 flaky-bad": 4}
    assert retries() == after_get  # POST answered 503: the backend may have acted on it


def test_request_timeout_gives_504(gw: Lab):
    assert status_of(gw, "http://echo.web/slow?delay=3") == 504
    assert status_of(gw, "http://echo.web/slow?delay=0") == 200


# -- L7 policy ------------------------------------------------------------------------------


def test_l7_policy_denies_by_method_and_path(gw: Lab):
    assert status_of(gw, "http://plain.web/", "-X", "DELETE") == 403
    assert status_of(gw, "http://plain.web/admin/panel") == 403
    assert status_of(gw, "http://plain.web/", "-X", "PUT") == 200


def test_direct_pod_access_that_bypasses_the_gateway_is_refused(gw: Lab):
    url = f"http://{gw.ip('web/echo-v1-a')}:8080/"
    assert gw.curl("front/client", url).returncode != 0
    assert "bypassed the L7 gateway" in gw.logs("ztunnel-node-a")


# -- protocols and real clients ---------------------------------------------------------------


def test_http2_prior_knowledge(gw: Lab):
    proc = gw.exec("front/client", "curl", "-sS", "-m", "5", "--http2-prior-knowledge",
                   "-w", "\n%{http_version}", "http://plain.web/h2")
    body, _, version = proc.stdout.rpartition("\n")
    assert version == "2", proc.stdout + proc.stderr
    assert json.loads(body)["path"] == "/h2"


def test_h2load_many_concurrent_streams(gw: Lab):
    proc = gw.exec("front/client", "h2load", "-n", "400", "-c", "4", "-m", "20",
                   "http://plain.web/load", timeout=120)
    assert proc.returncode == 0, proc.stderr
    m = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
                  r"(\d+) failed", proc.stdout)
    assert m and m.group(4) == "400" and m.group(5) == "0", proc.stdout


def test_wrk_keep_alive_load(gw: Lab):
    proc = gw.exec("front/client", "wrk", "-t1", "-c8", "-d2s", "http://plain.web/wrk",
                   timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "Non-2xx" not in proc.stdout and "Socket errors" not in proc.stdout, proc.stdout
    assert int(re.search(r"(\d+) requests in", proc.stdout).group(1)) > 50


def test_chunked_upload_through_the_gateway(gw: Lab):
    proc = gw.exec("front/client", "sh", "-c",
                   "head -c 300000 /dev/zero | curl -sS -m 10 -H 'Transfer-Encoding: chunked' "
                   "--data-binary @- http://plain.web/upload")
    assert json.loads(proc.stdout)["body_bytes"] == 300000


# -- bad input ------------------------------------------------------------------------------

RAW = """
import socket, sys
s = socket.create_connection(("plain.web", 80), timeout=15)
s.sendall({data!r})
{extra}
out = b""
try:
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        out += chunk
except OSError as e:
    out += ("<%s>" % e).encode()
print(out[:200].decode("latin-1"))
"""


def raw(lab: Lab, data: bytes, extra: str = "") -> str:
    proc = lab.exec("front/client", sys.executable, "-c", RAW.format(data=data, extra=extra),
                    timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_malformed_http1_is_400(gw: Lab):
    assert raw(gw, b"GET / HTTP/1.1\r\nHost: x\r\nbad header line\r\n\r\n").startswith(
        "HTTP/1.1 400")


def test_oversize_headers_are_431(gw: Lab):
    big = "x" * 80_000
    assert status_of(gw, "http://plain.web/", "-H", f"x-big: {big}") == 431


def test_slow_headers_are_timed_out(gw: Lab):
    out = raw(gw, b"GET / HTTP/1.1\r\nHost: plain.web\r\n", extra="import time; time.sleep(14)")
    assert out.startswith("HTTP/1.1 408") or out.strip() == "" or "<" in out, out
    # and the gateway still serves others
    assert gw.curl_json("front/client", "http://plain.web/") is not None


H2_GARBAGE = """
import socket, struct
s = socket.create_connection(("plain.web", 80), timeout=10)
# the client preface, then DATA on stream 0: a connection error (PROTOCOL_ERROR)
s.sendall(b"PRI * HTTP/2.0\\r\\n\\r\\nSM\\r\\n\\r\\n"
          + b"\\x00\\x00\\x00\\x04\\x00\\x00\\x00\\x00\\x00"
          + b"\\x00\\x00\\x04\\x00\\x00\\x00\\x00\\x00\\x00junk")
buf = b""
try:
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        buf += chunk
except OSError:
    pass
frames = []
while len(buf) >= 9:
    length = int.from_bytes(buf[:3], "big")
    ftype = buf[3]
    payload = buf[9:9 + length]
    if ftype == 7:
        frames.append(("GOAWAY", int.from_bytes(payload[4:8], "big")))
    else:
        frames.append((ftype, None))
    buf = buf[9 + length:]
print(frames)
"""


def test_h2_garbage_gets_goaway(gw: Lab):
    proc = gw.exec("front/client", sys.executable, "-c", H2_GARBAGE, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "('GOAWAY', 1)" in proc.stdout, proc.stdout  # PROTOCOL_ERROR
    assert gw.curl_json("front/client", "http://plain.web/") is not None


RAPID_RESET = """
import socket, h2.connection, h2.config, h2.events
s = socket.create_connection(("plain.web", 80), timeout=15)
c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
c.initiate_connection()
s.sendall(c.data_to_send())
sent = 0
try:
    for i in range(5000):
        sid = c.get_next_available_stream_id()
        c.send_headers(sid, [(":method", "GET"), (":scheme", "http"), (":path", "/"),
                             (":authority", "plain.web")])
        c.reset_stream(sid)
        s.sendall(c.data_to_send())
        sent += 1
    s.settimeout(5)
    codes = []
    while True:
        data = s.recv(65536)
        if not data:
            break
        for ev in c.receive_data(data):
            if isinstance(ev, h2.events.ConnectionTerminated):
                codes.append(int(ev.error_code))
    print("codes", codes, "sent", sent)
except (OSError, Exception) as e:
    print("closed", type(e).__name__, "sent", sent)
"""


def test_rapid_reset_flood_is_bounded(gw: Lab):
    proc = gw.exec("front/client", "env", f"PYTHONPATH={ROOT}", sys.executable, "-c",
                   RAPID_RESET, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    # the gateway cut the flood: GOAWAY ENHANCE_YOUR_CALM (11) or a closed connection
    assert "codes [11]" in out or "closed" in out, out
    assert gw.curl_json("front/client", "http://plain.web/") is not None


# -- the label ------------------------------------------------------------------------------


def test_removing_the_label_goes_back_to_l4_and_adding_it_restores_the_gateway(gw: Lab):
    # (the flaky pods: the L7-only DENY policy on app=echo would, without a gateway to enforce
    # it, deny everything at L4 — fail closed, as ztunnel does)
    client_ip = gw.ip("front/client")
    gw.cli("label", "namespace", "web", "nodeproxy.io/l7-gateway-")
    try:
        def l4():
            a = gw.curl_json("front/client", "http://flaky.web/")
            return a if a and a["peer"].split(":")[0] == client_ip else None

        wait_for("traffic L4-only, straight from the client", l4)
        assert GATEWAY not in {f"{p['namespace']}/{p['name']}" for p in gw.status()["pods"]}
    finally:
        gw.cli("label", "namespace", "web", "nodeproxy.io/l7-gateway=enabled")

    def via_gateway():
        a = gw.curl_json("front/client", "http://flaky.web/")
        return a if a and a["peer"].split(":")[0] == gw.ip(GATEWAY) else None

    wait_for("traffic through the gateway again", via_gateway, timeout=60)


def test_gateway_holds_only_its_own_identity(gw: Lab):
    token = (gw.dir / "gateways" / "web" / "token").read_text().strip()
    script = textwrap.dedent(f"""
        import json, trio
        from nodeproxy.certs import generate_key, make_csr
        from nodeproxy.discovery import DiscoveryClient, DiscoveryError
        roots = open({str(gw.dir / 'controlplane/ca/root.pem')!r}, 'rb').read()
        client = DiscoveryClient("10.250.0.1:15012", roots, {token!r})
        async def main():
            out = {{}}
            for ident in ("spiffe://cluster.local/ns/web/sa/nodeproxy-gateway",
                          "spiffe://cluster.local/ns/web/sa/echo"):
                try:
                    await client.sign(make_csr(ident, generate_key()))
                    out[ident] = "signed"
                except DiscoveryError as e:
                    out[ident] = e.status
            print(json.dumps(out))
        trio.run(main)
    """)
    proc = gw.exec("node/node-a", "env", f"PYTHONPATH={ROOT}", sys.executable, "-c", script)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {
        "spiffe://cluster.local/ns/web/sa/nodeproxy-gateway": "signed",
        "spiffe://cluster.local/ns/web/sa/echo": 403,
    }


# -- connection failures, attempts, ejection, per-attempt timeouts ----------------------------


def test_connection_failures_are_retried_on_another_endpoint_even_for_post(gw: Lab):
    assert loop(gw, 20, "mixed.web") == {"200 mixed-ok": 20}
    # never processed (the connect failed), so a POST is safe to retry too
    assert loop(gw, 10, "mixed.web", method="POST", body="x=1") == {"200 mixed-ok": 10}


def test_a_failing_endpoint_gets_little_traffic(gw: Lab):
    counts = loop(gw, 80, "flaky-noretry.web")
    bad = counts.get("503 flaky-bad", 0)
    # round robin would send it half; the balancer (failures raise an endpoint's cost, and
    # repeated ones eject it — unit-tested in test_l7_balancer/test_gateway_basics) keeps
    # it to a few
    assert bad <= 16, counts
    assert counts.get("200 flaky-good", 0) >= 64, counts


def gateway_log_line(lab: Lab, marker: str) -> str:
    """The gateway's access-log line of the request whose path holds ``marker``."""

    def logged() -> str | None:
        for line in lab.logs("pod-web-nodeproxy-gateway").splitlines():
            if marker in line and "direction=waypoint" in line:
                return line
        return None

    return wait_for("the gateway's access-log line", logged)


def test_retry_attempts_are_bounded(gw: Lab):
    marker = f"/attempts/{os.getpid()}"
    # ?status=503 makes the healthy replica fail too: every attempt fails
    proc = gw.exec("front/client", "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                   "-m", "10", f"http://allbad.web{marker}?status=503")
    assert proc.stdout == "503"

    line = gateway_log_line(gw, marker)
    assert "attempts=2" in line, line  # the first try and exactly one retry


def test_the_gateway_logs_the_callers_own_address_and_port(gw: Lab):
    """The client's node proxy names the caller in the CONNECT's `forwarded: for="ip:port"`
    header; the gateway's access log shows that address, not the tunnel's."""
    marker = f"/who/{os.getpid()}"
    proc = gw.exec("front/client", "curl", "-s", "-o", "/dev/null", "-m", "10",
                   "-w", "%{local_ip}:%{local_port}", f"http://plain.web{marker}")
    caller = proc.stdout.strip()
    assert re.fullmatch(r"[0-9.]+:[0-9]+", caller), proc

    line = gateway_log_line(gw, marker)
    assert f"src.addr={caller} " in line, line


def test_backend_request_timeout_bounds_one_attempt(gw: Lab):
    assert status_of(gw, "http://allbad.web/backend-slow?delay=2") == 504
    assert status_of(gw, "http://allbad.web/backend-slow?delay=0") == 200


def test_request_bodies_are_replayed_on_retry_within_the_buffer(gw: Lab):
    def retries() -> float:
        return metric_sum(gateway_metrics(gw), "nodeproxy_gateway_retries_total")

    # PUT is idempotent: retried on 503, its 10 KB body replayed to every attempt (the last
    # attempt's answer, which the client gets, says how many body bytes arrived)
    start = retries()
    proc = gw.exec("front/client", "sh", "-c",
                   "head -c 10000 /dev/zero | curl -sS -m 10 -X PUT --data-binary @- "
                   "http://broken.web/")
    answer = json.loads(proc.stdout)
    assert (answer["pod"], answer["body_bytes"]) == ("flaky-bad", 10000)
    assert retries() - start == 3
    # past the 64 KiB replay buffer: answered once, never retried
    start = retries()
    proc = gw.exec("front/client", "sh", "-c",
                   "head -c 100000 /dev/zero | curl -sS -m 10 -X PUT --data-binary @- "
                   "http://broken.web/")
    assert json.loads(proc.stdout)["body_bytes"] == 100000
    assert retries() == start


GRPC_CLIENT = """
import grpc
for c in range(CHANNELS):
    # a new channel (a new connection through the gateway) each time: an answer that comes
    # with the upstream's RST_STREAM(NO_ERROR) in one read once lost its trailers, mostly on
    # the first calls of a connection
    with grpc.insecure_channel("grpc.web:50051") as channel:
        say = channel.unary_unary("/nodeproxy.Echo/Say")
        for i in range(5):
            reply, call = say.with_call(b"hello %d" % i, timeout=10)
            print(reply.decode(), dict(call.trailing_metadata()).get("x-served-by"),
                  call.code().name)
"""


def test_grpc_works_through_the_gateway(gw: Lab):
    # the gRPC server starts beside the echo app: wait until it answers at all
    wait_for("the gRPC backend", lambda: gw.exec(
        "front/client", sys.executable, "-c", GRPC_CLIENT.replace("CHANNELS", "1"),
        timeout=60).returncode == 0)
    before = metric_sum(gateway_metrics(gw), "istio_requests_total", request_protocol="grpc")
    proc = gw.exec("front/client", sys.executable, "-c", GRPC_CLIENT.replace("CHANNELS", "12"),
                   timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [f"echo:hello {i} grpc-echo OK" for i in range(5)] * 12
    after = metric_sum(gateway_metrics(gw), "istio_requests_total", request_protocol="grpc")
    assert after - before == 60  # through the gateway, as gRPC
