"""Shared harness for the gateway tests (no tests here).

A real Gateway in-process (real TLS from tests/pki.py, HBONE on loopback) whose endpoints are
``nodeproxy.echo`` servers on 127.0.0.x; clients speak as node proxies do: an HBONE
connection with a client identity, CONNECT to a service VIP:port, HTTP/1.1 or HTTP/2 inside.
"""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from typing import Any

import h2.config
import h2.connection
import h2.events
import h11
import trio

from l7gateway.gateway import Gateway, GatewayConfig, GatewayPorts, StaticState
from nodeproxy import echo
from nodeproxy.certmanager import CertificateManager
from nodeproxy.model import (
    HBONE,
    MeshState,
    Namespace,
    Policy,
    Service,
    ServicePort,
    Workload,
)
from nodeproxy.routes import HTTPRoute, parse_httproute
from tests.pki import make_pki
from ztunnel.endpoints import Endpoint
from ztunnel.hbone.connection import HboneConnection, HboneStream

NS = "shop"
CLIENT_ID = "spiffe://cluster.local/ns/front/sa/client"


def workload(name: str, ip: str, port: int, labels: dict[str, str] | None = None) -> Workload:
    return Workload(uid=f"uid-{name}", name=name, namespace=NS, node="n1",
                    service_account=name, addresses=(ip,), labels=labels or {"app": name},
                    protocol=HBONE, named_ports={"http": port})


def service(name: str, vip: str, endpoints: list[Workload], port: int = 80,
            port_name: str = "http") -> Service:
    return Service(name=name, namespace=NS, addresses=(vip,),
                   ports=(ServicePort(port, "http", name=port_name),),
                   endpoints=tuple(w.uid for w in endpoints))


def route(name: str, svc: str, rules: list[dict[str, Any]], *, ts: str = "") -> HTTPRoute:
    meta: dict[str, Any] = {"name": name, "namespace": NS}
    if ts:
        meta["creationTimestamp"] = ts
    return parse_httproute({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute", "metadata": meta,
        "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": svc}],
                 "rules": rules},
    })


def mesh(workloads: list[Workload], services: list[Service], routes: list[HTTPRoute] = (),
         policies: list[Policy] = (), version: int = 1) -> MeshState:  # type: ignore[assignment]
    return MeshState(
        namespaces={NS: Namespace(NS), "front": Namespace("front")},
        workloads={w.uid: w for w in workloads},
        services={s.key: s for s in services},
        policies={p.key: p for p in policies},
        routes={r.key: r for r in routes},
        version=version,
    )


@dataclass
class Harness:
    gateway: Gateway
    ports: GatewayPorts
    pki: Any
    nursery: trio.Nursery
    source: StaticState
    dials: list[Endpoint] = field(default_factory=list)

    async def connect(self, identity: str = CLIENT_ID) -> HboneConnection:
        """An HBONE connection to the gateway, as a node proxy makes one."""
        tcp = await trio.open_tcp_stream("127.0.0.1", self.ports.hbone)
        tls = trio.SSLStream(tcp, self.pki.client_context(identity), server_side=False)
        await tls.do_handshake()
        conn = HboneConnection(tls, client_side=True)
        await self.nursery.start(conn.run)
        return conn

    async def tunnel(self, authority: str, conn: HboneConnection | None = None) -> HboneStream:
        conn = conn or await self.connect()
        return await conn.open_stream(authority, [("forwarded", 'for="127.0.0.1:40000"')])

    async def metrics(self) -> str:
        stream = await trio.open_tcp_stream("127.0.0.1", self.ports.metrics)
        client = H1Client(stream)
        status, _, body = await client.request("GET", "/metrics")
        await stream.aclose()
        return body.decode()


async def start_echo(nursery: trio.Nursery, name: str, ip: str) -> int:
    ports = await nursery.start(partial(echo.serve, [0], name, NS, ip))
    return ports[0]


@asynccontextmanager
async def gateway(
    state: MeshState,
    *,
    config: GatewayConfig | None = None,
    dial: Callable[[Endpoint], Any] | None = None,
) -> AsyncIterator[Harness]:
    pki = make_pki()

    async def sign(csr: bytes) -> list[bytes]:
        return pki.ca.sign_csr(csr, timedelta(hours=1))

    certs = CertificateManager(sign, pki.root_pem)
    dials: list[Endpoint] = []

    async def loopback_dial(ep: Endpoint) -> trio.abc.Stream:
        dials.append(ep)
        return await trio.open_tcp_stream(ep.address, ep.port)

    source = StaticState(state)
    gw = Gateway(NS, source, certs, dial=dial or loopback_dial, config=config,
                 rng=random.Random(7))
    with trio.fail_after(25):
        async with trio.open_nursery() as nursery:
            ports = await nursery.start(partial(
                gw.run, listen="127.0.0.1:0", metrics="127.0.0.1:0", ready="127.0.0.1:0"))
            try:
                yield Harness(gw, ports, pki, nursery, source, dials)
            finally:
                nursery.cancel_scope.cancel()


# -- clients ----------------------------------------------------------------------------


class H1Client:
    """HTTP/1.1 over any trio stream, keep-alive."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)

    async def _send(self, ev: Any) -> None:
        data = self.conn.send(ev)
        if data:
            await self.stream.send_all(data)

    async def request(self, method: str, target: str, headers: list[tuple[str, str]] = (),
                      body: bytes | list[bytes] | None = None,  # type: ignore[assignment]
                      host: str = "web.shop") -> tuple[int, dict[str, str], bytes]:
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        hdrs = [("host", host), *headers]
        chunks = body if isinstance(body, list) else ([body] if body else [])
        if isinstance(body, list):
            hdrs.append(("transfer-encoding", "chunked"))
        elif body is not None:
            hdrs.append(("content-length", str(len(body))))
        await self._send(h11.Request(method=method, target=target, headers=hdrs))
        for c in chunks:
            await self._send(h11.Data(data=c))
        await self._send(h11.EndOfMessage())
        return await self.response()

    async def response(self) -> tuple[int, dict[str, str], bytes]:
        status = 0
        headers: dict[str, str] = {}
        body = b""
        while True:
            ev = self.conn.next_event()
            if ev is h11.NEED_DATA:
                self.conn.receive_data(await self.stream.receive_some(65536))
                continue
            if isinstance(ev, h11.Response):
                status = ev.status_code
                headers = {n.decode().lower(): v.decode() for n, v in ev.headers}
            elif isinstance(ev, h11.Data):
                body += ev.data
            elif isinstance(ev, h11.EndOfMessage | h11.ConnectionClosed):
                return status, headers, body


def who(body: bytes) -> str:
    return json.loads(body)["pod"]


class H2Client:
    """A small HTTP/2 (prior knowledge) client over a trio stream, for the tests."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=True, header_encoding="utf-8"))
        self.responses: dict[int, dict[str, Any]] = {}
        self.events: list[Any] = []
        self.closed = trio.Event()
        self._lot = trio.lowlevel.ParkingLot()
        self.lock = trio.Lock()

    async def start(self, nursery: trio.Nursery) -> None:
        self.h2.initiate_connection()
        await self.flush()
        nursery.start_soon(self._reader)

    async def flush(self) -> None:
        async with self.lock:
            data = self.h2.data_to_send()
            if data:
                await self.stream.send_all(data)

    async def _reader(self) -> None:
        try:
            while True:
                data = await self.stream.receive_some(65536)
                if not data:
                    break
                for ev in self.h2.receive_data(data):
                    self.events.append(ev)
                    r = self.responses.setdefault(getattr(ev, "stream_id", 0) or 0,
                                                  {"data": b"", "done": False})
                    if isinstance(ev, h2.events.ResponseReceived):
                        r["headers"] = dict(ev.headers)
                    elif isinstance(ev, h2.events.DataReceived):
                        r["data"] += ev.data
                        self.h2.acknowledge_received_data(ev.flow_controlled_length,
                                                          ev.stream_id)
                    elif isinstance(ev, h2.events.TrailersReceived):
                        r["trailers"] = dict(ev.headers)
                    elif isinstance(ev, h2.events.StreamEnded):
                        r["done"] = True
                    elif isinstance(ev, h2.events.StreamReset):
                        r["done"] = True
                        r["reset"] = ev.error_code
                await self.flush()
                self._lot.unpark_all()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h2.exceptions.ProtocolError):
            pass
        finally:
            self.closed.set()
            self._lot.unpark_all()

    async def send(self, method: str, path: str, headers: list[tuple[str, str]] = (),
                   body: bytes | None = None, trailers: list[tuple[str, str]] | None = None,
                   authority: str = "web.shop") -> int:  # type: ignore[assignment]
        sid = self.h2.get_next_available_stream_id()
        hdrs = [(":method", method), (":scheme", "http"), (":authority", authority),
                (":path", path), *headers]
        end = body is None and trailers is None
        self.h2.send_headers(sid, hdrs, end_stream=end)
        if body is not None:
            size = self.h2.max_outbound_frame_size
            chunks = [body[i:i + size] for i in range(0, len(body), size)] or [b""]
            for i, chunk in enumerate(chunks):
                last = i == len(chunks) - 1 and trailers is None
                self.h2.send_data(sid, chunk, end_stream=last)
        if trailers is not None:
            self.h2.send_headers(sid, trailers, end_stream=True)
        await self.flush()
        return sid

    async def wait(self, sid: int) -> dict[str, Any]:
        while not self.responses.get(sid, {}).get("done"):
            if self.closed.is_set():
                raise ConnectionError("connection closed")
            await self._lot.park()
        return self.responses[sid]

    async def request(self, method: str, path: str, **kw: Any) -> dict[str, Any]:
        return await self.wait(await self.send(method, path, **kw))
