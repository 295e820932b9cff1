"""The control plane end to end, in-process over real TLS on loopback; and the watched
resource directory."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import h11
import pytest
import trio

from controlplane.server import (
    Running,
    ServerConfig,
    StateHub,
    TokenError,
    controlplane_identity,
    parse_tokens,
    serve,
)
from controlplane.source_dir import DirectorySource
from nodeproxy import certs, httpio, model, tlsconfig
from nodeproxy.discovery import DiscoveryClient, DiscoveryError

NAMESPACE = """
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {nodeproxy.io/dataplane-mode: ambient}}
"""


def pod_yaml(name: str, node: str, ip: str, sa: str = "default") -> str:
    return f"""
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: shop, labels: {{app: {name}}}}}
spec: {{nodeName: {node}, serviceAccountName: {sa}}}
status: {{podIP: {ip}, phase: Running}}
"""


def write(path: Path, text: str) -> None:
    """Replace a file atomically (as editors and the lab do)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


async def eventually(predicate, timeout: float = 10.0) -> None:
    """Wait until ``predicate()`` holds; the deadline only guards against hangs."""
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.02)


@pytest.fixture
def cp_config(tmp_path: Path) -> ServerConfig:
    res = tmp_path / "resources"
    res.mkdir()
    write(res / "ns.yaml", NAMESPACE)
    write(res / "pods.yaml", pod_yaml("web", "node-a", "10.0.0.1", sa="web")
          + "---" + pod_yaml("db", "node-b", "10.0.0.2", sa="db"))
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text("tok-a: node-a\ntok-b: node-b\n")
    return ServerConfig(
        resources=res,
        state_dir=tmp_path / "state",
        tokens=tokens,
        listen="127.0.0.1:0",
        admin="127.0.0.1:0",
        cert_ttl=timedelta(hours=1),
        ping_interval=0.2,
        poll_interval=0.05,
    )


@pytest.fixture
async def cp(cp_config: ServerConfig, nursery) -> Running:
    return await nursery.start(serve, cp_config)


async def open_tls(cp: Running) -> trio.SSLStream:
    ctx = tlsconfig.client_context(None, None, cp.root_pem, alpn=("http/1.1",))
    tcp = await trio.open_tcp_stream("127.0.0.1", cp.port)
    tls = trio.SSLStream(tcp, ctx, server_hostname=None)
    await tls.do_handshake()
    assert tlsconfig.check_peer(tls, [controlplane_identity("cluster.local")])
    return tls


async def request(
    cp: Running, method: str, target: str, token: str | None, body: bytes | None = None,
    extra: list[tuple[str, str]] = (),  # type: ignore[assignment]
) -> httpio.Response:
    tls = await open_tls(cp)
    try:
        conn = httpio.client_connection()
        headers = [("host", "cp"), *extra]
        if token is not None:
            headers.append(("authorization", f"Bearer {token}"))
        with trio.fail_after(10):
            await httpio.send_request(tls, conn, method, target, headers, body)
            return await httpio.read_response(tls, conn)
    finally:
        await trio.aclose_forcefully(tls)


class StateStream:
    """A raw subscriber of GET /v1/state."""

    def __init__(self, tls: trio.SSLStream, conn, head: httpio.Response):
        self.tls, self.conn, self.head = tls, conn, head
        self.lines = httpio.LineSplitter()
        self.pending: list[dict] = []
        self.body = httpio.iter_body(tls, conn).__aiter__()

    @classmethod
    async def open(cls, cp: Running, token: str = "tok-a") -> StateStream:
        tls = await open_tls(cp)
        conn = httpio.client_connection()
        await httpio.send_request(
            tls, conn, "GET", "/v1/state", [("host", "cp"), ("authorization", f"Bearer {token}")]
        )
        return cls(tls, conn, await httpio.read_response_head(tls, conn))

    async def next(self, *, skip_pings: bool = True) -> dict:
        with trio.fail_after(10):
            while True:
                while not self.pending:
                    self.pending += [json.loads(x) for x in self.lines.feed(
                        await self.body.__anext__())]
                msg = self.pending.pop(0)
                if not (skip_pings and msg["type"] == "ping"):
                    return msg

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.tls)


async def test_state_stream_snapshot_then_delta_then_pings(cp: Running, cp_config):
    stream = await StateStream.open(cp)
    try:
        assert stream.head.status == 200
        assert stream.head.headers["content-type"] == "application/x-ndjson"
        assert stream.head.headers["transfer-encoding"] == "chunked"
        snap = await stream.next()
        assert snap["type"] == "snapshot"
        state = model.MeshState.from_json(snap["state"])
        assert {w.name for w in state.workloads.values()} == {"web", "db"}
        assert state.workloads["shop/web"].meshed

        write(cp_config.resources / "more.yaml", pod_yaml("cache", "node-a", "10.0.0.3"))
        delta = await stream.next()
        assert delta["type"] == "delta" and delta["version"] > state.version
        assert [w["name"] for w in delta["upsert"]["workloads"]] == ["cache"]
        state.apply(delta)
        assert state == cp.hub.state

        (cp_config.resources / "more.yaml").unlink()
        delta = await stream.next()
        assert delta["delete"] == {"workloads": ["shop/cache"]}

        assert (await stream.next(skip_pings=False))["type"] == "ping"  # idle: pings
    finally:
        await stream.aclose()


async def test_missing_or_unknown_token_is_401(cp: Running):
    auth_headers = ([], [("authorization", "Bearer nope")], [("authorization", "Basic dG9rLWE=")],
                    [("authorization", "tok-a")])
    for extra in auth_headers:
        for method, target in (("GET", "/v1/state"), ("POST", "/v1/certificate")):
            body = b"{}" if method == "POST" else None
            resp = await request(cp, method, target, None, body, extra)
            token = extra
            assert resp.status == 401, (method, target, token)
            assert "token" in json.loads(resp.body)["error"]
            assert resp.headers["www-authenticate"] == "Bearer"


def csr_for(identity: str) -> bytes:
    return certs.make_csr(identity, certs.generate_key())


async def test_certificate_only_for_workloads_on_the_callers_node(cp: Running):
    a = DiscoveryClient(f"127.0.0.1:{cp.port}", cp.root_pem, "tok-a")
    web = "spiffe://cluster.local/ns/shop/sa/web"
    chain = await a.sign(csr_for(web))
    assert certs.cert_info(chain[0]).identity == web
    assert chain[-1].strip() == cp.root_pem.strip()

    # db runs on node-b: node-a's token may not have it, node-b's may
    with pytest.raises(DiscoveryError) as info:
        await a.sign(csr_for("spiffe://cluster.local/ns/shop/sa/db"))
    assert info.value.status == 403 and "node-a" in str(info.value)
    b = DiscoveryClient(f"127.0.0.1:{cp.port}", cp.root_pem, "tok-b")
    assert await b.sign(csr_for("spiffe://cluster.local/ns/shop/sa/db"))

    # an identity no pod has, and another trust domain
    for ident in ("spiffe://cluster.local/ns/shop/sa/ghost",):
        with pytest.raises(DiscoveryError) as info:
            await a.sign(csr_for(ident))
        assert info.value.status == 403
    with pytest.raises(DiscoveryError) as info:
        await a.sign(csr_for("spiffe://evil.org/ns/shop/sa/web"))
    assert info.value.status == 400


async def test_bad_certificate_requests(cp: Running):
    for body in (b"not json", b"[]", b'{"csr": 5}', b"{}"):
        resp = await request(cp, "POST", "/v1/certificate", "tok-a", body)
        assert resp.status == 400 and "csr" in json.loads(resp.body)["error"]
    resp = await request(cp, "POST", "/v1/certificate", "tok-a", b'{"csr": "garbage"}')
    assert resp.status == 400 and "bad CSR" in json.loads(resp.body)["error"]
    # an oversize body is refused from its declared length, before it is sent
    tls = await open_tls(cp)
    try:
        conn = httpio.client_connection()
        await tls.send_all(conn.send(h11.Request(
            method="POST", target="/v1/certificate",
            headers=[("host", "cp"), ("authorization", "Bearer tok-a"),
                     ("content-length", str(200 * 1024))],
        )))
        with trio.fail_after(10):
            assert (await httpio.read_response(tls, conn)).status == 413
    finally:
        await trio.aclose_forcefully(tls)
    resp = await request(cp, "GET", "/v1/state", "tok-a", extra=[("x-big", "y" * 20000)])
    assert resp.status == 431
    assert (await request(cp, "GET", "/v1/certificate", "tok-a")).status == 405
    assert (await request(cp, "GET", "/elsewhere", "tok-a")).status == 404


async def test_admin_metrics_and_debug(cp: Running):
    a = DiscoveryClient(f"127.0.0.1:{cp.port}", cp.root_pem, "tok-a")
    await a.sign(csr_for("spiffe://cluster.local/ns/shop/sa/web"))
    with pytest.raises(DiscoveryError):
        await a.sign(csr_for("spiffe://cluster.local/ns/shop/sa/db"))

    async def get(path: str) -> bytes:
        tcp = await trio.open_tcp_stream("127.0.0.1", cp.admin_port)
        try:
            conn = httpio.client_connection()
            await httpio.send_request(tcp, conn, "GET", path, [("host", "admin")])
            resp = await httpio.read_response(tcp, conn)
            assert resp.status == 200
            return resp.body
        finally:
            await tcp.aclose()

    metrics = (await get("/metrics")).decode()
    assert "nodeproxy_controlplane_certificates_signed_total 1.0" in metrics
    assert 'nodeproxy_controlplane_certificates_refused_total{reason="not_authorized"} 1.0' \
        in metrics
    assert 'nodeproxy_controlplane_resources{kind="workloads"} 2.0' in metrics
    state = json.loads(await get("/debug/state"))
    assert {w["name"] for w in state["workloads"]} == {"web", "db"}
    assert json.loads(await get("/debug/errors")) == {}


async def test_root_is_written_for_the_lab(cp: Running, cp_config):
    assert (cp_config.state_dir / "ca" / "root.pem").read_bytes() == cp.root_pem


# -- the watched directory ------------------------------------------------------------------


def test_directory_keeps_last_good_state_and_reports_the_broken_file(tmp_path: Path):
    write(tmp_path / "ns.yaml", NAMESPACE)
    write(tmp_path / "pods.yaml", pod_yaml("web", "node-a", "10.0.0.1"))
    (tmp_path / "notes.txt").write_text("not a resource file")
    published: list[model.MeshState] = []
    src = DirectorySource(tmp_path, published.append, version=0)
    first = src.scan()
    assert first is not None and first.version == 1 and set(first.workloads) == {"shop/web"}
    assert src.scan() is None  # nothing changed

    write(tmp_path / "pods.yaml", "kind: Pod\nmetadata: {name: [broken\n")
    assert src.scan() is None  # still serving the last good pods
    assert src.state is first
    (path, reason), = src.errors.items()
    assert path.endswith("pods.yaml") and "invalid YAML" in reason

    write(tmp_path / "pods.yaml", pod_yaml("web", "node-a", "10.0.0.9"))
    fixed = src.scan()
    assert fixed is not None and fixed.version == 2 and src.errors == {}
    assert fixed.workloads["shop/web"].addresses == ("10.0.0.9",)

    # a touch that changes nothing publishes nothing
    write(tmp_path / "pods.yaml", pod_yaml("web", "node-a", "10.0.0.9") + "\n# comment\n")
    assert src.scan() is None

    # a new file that was never valid contributes nothing and is reported
    write(tmp_path / "new.yml", "kind: Service\nmetadata: {name: s}\nspec: {ports: [{}]}\n")
    assert src.scan() is None and "spec.ports[0].port" in src.errors[str(tmp_path / "new.yml")]

    (tmp_path / "pods.yaml").unlink()
    gone = src.scan()
    assert gone is not None and gone.workloads == {}


async def test_broken_edit_is_reported_on_admin_and_state_kept(cp: Running, cp_config):
    before = cp.hub.state
    write(cp_config.resources / "pods.yaml", "kind: Pod\nmetadata: name\n")
    await eventually(lambda: cp.source.errors)
    assert cp.hub.state is before
    assert "metadata" in next(iter(cp.source.errors.values()))


def test_hub_coalesces_changes_for_a_subscriber_that_fell_behind():
    hub = StateHub(model.MeshState(version=1))
    seen, _ = hub.snapshot_line()
    ns = model.Namespace("a")
    hub.publish(model.MeshState(namespaces={"a": ns}, version=2))
    hub.publish(model.MeshState(namespaces={"a": ns, "b": model.Namespace("b")}, version=3))
    current, line = hub.delta_line(seen)
    msg = json.loads(line)
    assert current.version == 3 and msg["version"] == 3
    caught_up = seen.copy()
    caught_up.apply(msg)
    assert caught_up == current
    assert hub.delta_line(seen)[1] is line  # encoded once for every subscriber at v1


def test_tokens_file_shape():
    assert parse_tokens("t1: node-a\nt2: node-b\n") == {"t1": "node-a", "t2": "node-b"}
    assert parse_tokens("") == {}
    for bad in ("- a\n- b\n", "t1: [x]\n", "t1: ''\n", "a: b: c\n"):
        with pytest.raises(TokenError):
            parse_tokens(bad)


async def test_a_subscriber_that_stops_reading_is_dropped_without_stalling_others(
    cp_config: ServerConfig, nursery
):
    cp_config.send_timeout = 0.5
    cp = await nursery.start(serve, cp_config)
    stuck = await StateStream.open(cp)  # subscribes, then never reads again
    good = await StateStream.open(cp)
    try:
        await good.next()  # snapshot
        # states big enough to fill every socket buffer between the server and `stuck`
        for round_ in range(3):
            big = cp.hub.state.copy()
            big.version += 1
            for i in range(6000):
                uid = f"bulk/w{i}"
                big.workloads[uid] = model.Workload(
                    uid=uid, name=f"w{i}", namespace="bulk", node="node-x",
                    labels={"round": str(round_), "pad": "x" * 300},
                )
            cp.hub.publish(big)
            msg = await good.next()
            assert msg["type"] == "delta" and msg["version"] == big.version
        registry = cp.server.metrics.registry
        dropped = "nodeproxy_controlplane_slow_subscribers_dropped_total"
        await eventually(lambda: registry.get_sample_value(dropped) == 1)
        connected = "nodeproxy_controlplane_connected_proxies"
        await eventually(lambda: registry.get_sample_value(connected) == 1)
    finally:
        await stuck.aclose()
        await good.aclose()


def test_command_line_errors_are_clear(tmp_path: Path, capsys):
    from controlplane.main import main

    tokens = tmp_path / "tokens.yaml"
    tokens.write_text("t: n\n")
    base = ["--state-dir", str(tmp_path / "s"), "--tokens", str(tokens)]
    assert main(["--resources", str(tmp_path / "missing"), *base]) == 2
    assert "--resources" in capsys.readouterr().err
    assert main(["--resources", str(tmp_path), *base, "--listen", "nonsense"]) == 2
    assert "HOST:PORT" in capsys.readouterr().err
    assert main(["--resources", str(tmp_path), *base, "--cert-ttl", "0"]) == 2
    assert "--cert-ttl" in capsys.readouterr().err
