"""The per-namespace L7 gateway process (Istio's waypoint, for one namespace).

HBONE in on 15008 (mutual TLS with the gateway's own identity
``spiffe://<td>/ns/<NS>/sa/nodeproxy-gateway``; the caller must be of our trust domain). Each
CONNECT must name a service VIP:port of this namespace (else 400). Inside the tunnel the first
bytes decide: HTTP/2 prior knowledge, HTTP/1.x, or opaque TCP relayed to one endpoint. HTTP
requests go through :class:`l7gateway.forward.Forwarder` (routes, filters, L7 policy with the
original caller's identity, retries, timeouts) to endpoints over pooled HBONE.

Metrics on 15020 (``/metrics``, ``/stats/prometheus``), readiness on 15021
(``/healthz/ready``: a first mesh state and a certificate), one access-log line per request.
"""

from __future__ import annotations

import argparse
import logging
import random
import signal
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import trio

from l7gateway.forward import Downstream, ForwardConfig, Forwarder, GatewayMetrics
from l7gateway.http1 import H1Config, serve_http1
from l7gateway.http2 import H2Config, serve_http2
from l7gateway.sniff import HTTP1, HTTP2, SNIFF_BYTES, detect
from l7gateway.upstream import Dial, HboneDialer, Upstreams
from nodeproxy.certmanager import CertificateManager
from nodeproxy.discovery import DiscoveryClient, TokenFile
from nodeproxy.identity import spiffe_id
from nodeproxy.model import GATEWAY_SERVICE_ACCOUNT, TRUST_DOMAIN, MeshState
from nodeproxy.telemetry.accesslog import log_connection
from nodeproxy.telemetry.logs import configure_logging, flush_buffered_logs, flush_logs_periodically
from nodeproxy.telemetry.metrics import ConnectionLabels
from nodeproxy.telemetry.server import (
    Readiness,
    Request,
    Response,
    json_response,
    parse_address,
    readiness_route,
    serve_http,
)
from nodeproxy.tlsconfig import PeerIdentityError, check_trust_domain
from ztunnel.endpoints import SERVICE, resolve_destination
from ztunnel.hbone.protocol import format_authority
from ztunnel.hbone.server import HboneRequest, serve_hbone_connection
from ztunnel.policy import Connection, authorize
from ztunnel.relay import Counters, RelayError, abort, relay

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 10.0
CERT_RETRY = 2.0
TCP_CONNECT_ATTEMPTS = 3


class StateSource(Protocol):
    """What the gateway needs of :class:`nodeproxy.discovery.DiscoveryClient`."""

    state: MeshState
    ready: trio.Event

    async def wait_changed(self, version: int) -> MeshState: ...
    async def run(self, *, task_status: Any = ...) -> None: ...


class StaticState:
    """A :class:`StateSource` whose state is set by hand (tests, tools)."""

    def __init__(self, state: MeshState | None = None) -> None:
        self.state = state or MeshState()
        self.ready = trio.Event()
        self._changed = trio.Event()
        if state is not None:
            self.ready.set()

    def set(self, state: MeshState) -> None:
        self.state = state
        self.ready.set()
        changed, self._changed = self._changed, trio.Event()
        changed.set()

    async def wait_changed(self, version: int) -> MeshState:
        while self.state.version == version:
            await self._changed.wait()
        return self.state

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await trio.sleep_forever()


@dataclass
class GatewayConfig:
    h1: H1Config = field(default_factory=H1Config)
    h2: H2Config = field(default_factory=H2Config)
    forward: ForwardConfig = field(default_factory=ForwardConfig)
    # a client that sends nothing this long after the tunnel opened is relayed as TCP
    # (server-first protocols); a partial first line waits for the HTTP/1 head timeout
    sniff_timeout: float = 1.0
    handshake_timeout: float = HANDSHAKE_TIMEOUT


@dataclass(frozen=True)
class GatewayPorts:
    """The bound ports (useful when asking for port 0)."""

    hbone: int
    metrics: int
    ready: int


class Gateway:
    """The L7 gateway of ``namespace``. Run :meth:`run` in a nursery.

    ``discovery`` gives the mesh state (a :class:`~nodeproxy.discovery.DiscoveryClient`, or a
    :class:`StaticState`); ``certs`` gets the gateway's certificate. ``dial(endpoint)`` opens
    a byte stream to an endpoint: by default HBONE through a pool with the gateway's cert.
    """

    def __init__(
        self,
        namespace: str,
        discovery: StateSource,
        certs: CertificateManager,
        *,
        trust_domain: str = TRUST_DOMAIN,
        dial: Dial | None = None,
        config: GatewayConfig | None = None,
        metrics: GatewayMetrics | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.namespace = namespace
        self.discovery = discovery
        self.certs = certs
        self.trust_domain = trust_domain
        self.identity = spiffe_id(trust_domain, namespace, GATEWAY_SERVICE_ACCOUNT)
        self.config = config or GatewayConfig()
        self.metrics = metrics or GatewayMetrics()
        self._dialer = HboneDialer(certs, self.identity) if dial is None else None
        self.upstreams = Upstreams(dial or self._dialer)  # type: ignore[arg-type]
        self.forwarder = Forwarder(lambda: self.discovery.state, self.upstreams, self.metrics,
                                   config=self.config.forward, rng=rng)
        self.readiness = Readiness()
        self.readiness.set("mesh state", False, "waiting for the control plane")
        self.readiness.set("certificate", False, f"waiting for {self.identity}")
        self.tunnels = 0  # live CONNECT streams

    @property
    def state(self) -> MeshState:
        return self.discovery.state

    # -- running -------------------------------------------------------------------------
    async def run(
        self,
        *,
        listen: str = "0.0.0.0:15008",
        metrics: str = "0.0.0.0:15020",
        ready: str = "0.0.0.0:15021",
        task_status: trio.TaskStatus[GatewayPorts] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        host, port = parse_address(listen)
        async with trio.open_nursery() as nursery:
            await nursery.start(self.discovery.run)
            nursery.start_soon(self.certs.run)
            if self._dialer is not None:
                await nursery.start(self._dialer.run)
            await nursery.start(self.upstreams.run)
            self.forwarder.nursery = nursery
            mport = await nursery.start(serve_http, metrics, self.metrics_routes())
            rport = await nursery.start(
                serve_http, ready, {"/healthz/ready": readiness_route(self.readiness)})
            nursery.start_soon(self._become_ready)
            nursery.start_soon(flush_logs_periodically)
            listeners = await trio.open_tcp_listeners(port, host=host)
            hport = listeners[0].socket.getsockname()[1]
            await nursery.start(trio.serve_listeners, self._handle_tcp, listeners)
            log.info("gateway %s (%s) serving HBONE on %s:%d", self.namespace, self.identity,
                     host, hport)
            task_status.started(GatewayPorts(hport, mport, rport))

    async def _become_ready(self) -> None:
        await self.discovery.ready.wait()
        self.readiness.set("mesh state", True)
        while True:
            try:
                await self.certs.get(self.identity)
                break
            except Exception as exc:  # noqa: BLE001 - retried; readiness says why
                self.readiness.set("certificate", False, str(exc))
                log.warning("no certificate for %s yet: %s", self.identity, exc)
                await trio.sleep(CERT_RETRY)
        self.readiness.set("certificate", True)

    def metrics_routes(self) -> dict[str, Any]:
        async def metrics(_: Request) -> Response:
            return Response(
                200, self.metrics.exposition(), "text/plain; version=0.0.4; charset=utf-8")

        async def config_dump(_: Request) -> Response:
            return json_response({
                "namespace": self.namespace,
                "identity": self.identity,
                "state_version": self.state.version,
                "tunnels": self.tunnels,
                "readiness": self.readiness.snapshot(),
                "certificates": self.certs.snapshot(),
            })

        return {"/metrics": metrics, "/stats/prometheus": metrics, "/config_dump": config_dump}

    # -- HBONE in ------------------------------------------------------------------------
    async def _handle_tcp(self, tcp: trio.SocketStream) -> None:
        try:
            peer = tcp.socket.getpeername()[:2]
        except OSError:
            await trio.aclose_forcefully(tcp)
            return
        try:
            with trio.fail_after(self.config.handshake_timeout):
                cert = await self.certs.get(self.identity)
        except Exception as exc:  # noqa: BLE001 - no certificate: refuse, never fall back
            log.warning("HBONE from %s refused: no certificate: %s", peer[0], exc)
            await abort(tcp)
            return
        tls = trio.SSLStream(tcp, cert.server_context(), server_side=True)
        try:
            with trio.fail_after(self.config.handshake_timeout):
                await tls.do_handshake()
            caller = check_trust_domain(tls, self.trust_domain)
        except (trio.BrokenResourceError, trio.TooSlowError, PeerIdentityError, OSError) as exc:
            log.warning("HBONE from %s refused: %s", format_authority(*peer), exc)
            await trio.aclose_forcefully(tls)
            return

        async def on_connect(request: HboneRequest) -> None:
            await self._serve_connect(request, caller, peer)

        try:
            await serve_hbone_connection(tls, on_connect, peer_identity=caller,
                                         peer_address=peer)
        finally:
            await trio.aclose_forcefully(tls)

    async def _serve_connect(self, request: HboneRequest, caller: str,
                             peer: tuple[str, int]) -> None:
        host, port = request.authority
        state = self.state
        try:
            dest = resolve_destination(state, host, port)
        except ValueError:
            await request.reject(400)
            return
        svc = dest.service
        if dest.kind != SERVICE or svc is None or svc.namespace != self.namespace or (
            svc.port(port) is None
        ):
            log.info("CONNECT %s from %s is not a service port of namespace %s",
                     request.authority_raw, caller, self.namespace)
            await request.reject(400)
            return
        fwd = request.forwarded_for
        src_ip = peer[0]
        down = Downstream(
            service=svc, port=port, caller=caller, src_ip=src_ip,
            src_port=fwd[1] if fwd and fwd[0] == src_ip else peer[1],
            source=state.workload_by_ip(src_ip),
        )
        stream = await request.accept()
        self.tunnels += 1
        try:
            await self.serve_tunnel(stream, down)
        finally:
            self.tunnels -= 1

    async def serve_tunnel(self, stream: trio.abc.HalfCloseableStream, down: Downstream) -> None:
        """Detect the protocol on an accepted tunnel and serve it."""
        first = b""
        kind: str | None = None
        with trio.move_on_after(self.config.sniff_timeout):
            while kind is None:
                try:
                    chunk = await stream.receive_some(SNIFF_BYTES)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return
                if not chunk:
                    break
                first += chunk
                kind = detect(first)
        if kind is None:
            if not first:
                kind = "tcp"  # nothing sent yet: a server-first protocol
            else:
                kind = HTTP1 if detect(first + b" ") == HTTP1 else "tcp"
        if kind == HTTP2:
            down.protocol = HTTP2
            conn = await serve_http2(stream, down, self.forwarder, prefix=first,
                                     config=self.config.h2)
            if conn.goaway_code:
                log.info("HTTP/2 client %s: GOAWAY %s (%s)", down.src_ip, conn.goaway_code,
                         conn.dead_reason)
        elif kind == HTTP1:
            down.protocol = HTTP1
            await serve_http1(stream, down, self.forwarder, prefix=first, config=self.config.h1)
        else:
            down.protocol = "tcp"
            await self._relay_tcp(stream, down, first)

    # -- opaque TCP ----------------------------------------------------------------------
    async def _relay_tcp(self, stream: trio.abc.HalfCloseableStream, down: Downstream,
                         first: bytes) -> None:
        started = time.monotonic()
        state = self.state
        bal, eps = self.forwarder.balancer(down.service, down.port)
        tried: set[str] = set()
        upstream = None
        ep = None
        error: str | None = None
        labels = ConnectionLabels.from_workloads(
            "waypoint", source=down.source, source_identity=down.caller, service=down.service,
            mtls=True)
        for _ in range(TCP_CONNECT_ATTEMPTS):
            key = bal.pick(exclude=tried)
            if key is None:
                error = "no healthy upstream"
                break
            tried.add(key)
            ep = eps[key]
            decision = authorize(state.policies_for(ep.workload),
                                 Connection(down.caller, down.src_ip, ep.address, ep.port))
            if not decision.allowed:
                error = f"policy rejection: {decision.reason}"
                break
            token = bal.start(key)
            try:
                upstream = await self.upstreams.dial(ep)
                bal.finish(token, ok=True)
                break
            except Exception as exc:  # noqa: BLE001 - any dial failure: try another endpoint
                bal.finish(token, ok=False)
                error = f"connect: {exc!r}"
        if ep is not None:
            labels = ConnectionLabels.from_workloads(
                "waypoint", source=down.source, source_identity=down.caller,
                destination=ep.workload, service=down.service, mtls=True)
        entry: dict[str, Any] = {
            "src.addr": format_authority(down.src_ip, down.src_port),
            "src.identity": down.caller,
            "dst.addr": format_authority(ep.address, ep.port) if ep else None,
            "dst.service": down.service.hostname,
            "dst.workload": ep.workload.name if ep else None,
            "dst.namespace": ep.workload.namespace if ep else None,
            "direction": "waypoint",
            "protocol": "tcp",
        }
        if upstream is None:
            self.metrics.failed(labels, "DENY" if error and "policy" in error else "UF")
            log_connection(**entry, error=error, bytes_sent=0, bytes_recv=0, duration=0)
            await abort(stream)
            return
        self.metrics.opened(labels)
        counters = Counters()
        try:
            if first:
                await upstream.send_all(first)
                counters.client_to_server += len(first)
            await relay(stream, upstream, counters)  # type: ignore[arg-type]
        except (RelayError, trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            entry["error"] = str(e)
            await abort(stream)
            await abort(upstream)
        finally:
            self.metrics.bytes(labels, received=counters.client_to_server,
                               sent=counters.server_to_client)
            self.metrics.closed(labels)
            log_connection(**entry, bytes_sent=counters.server_to_client,
                           bytes_recv=counters.client_to_server,
                           duration=round((time.monotonic() - started) * 1000))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="nodeproxy gateway", description=__doc__)
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--controlplane", required=True, help="HOST:PORT of the control plane")
    parser.add_argument("--ca-root", required=True, type=Path)
    parser.add_argument("--token-file", required=True, type=Path)
    parser.add_argument("--listen", default="0.0.0.0:15008")
    parser.add_argument("--metrics", default="0.0.0.0:15020")
    parser.add_argument("--ready", default="0.0.0.0:15021")
    parser.add_argument("--trust-domain", default=TRUST_DOMAIN)
    args = parser.parse_args(argv)
    configure_logging()
    try:
        roots = args.ca_root.read_bytes()
        token = TokenFile(args.token_file)  # re-read as it rotates
    except (OSError, ValueError) as e:
        parser.error(str(e))
    discovery = DiscoveryClient(args.controlplane, roots, token)
    certs = CertificateManager(discovery.sign, roots, isolate_crypto=True)
    gateway = Gateway(args.namespace, discovery, certs, trust_domain=args.trust_domain)

    async def run() -> None:
        # SIGTERM (how the gateway is stopped) is a clean exit: buffered log lines are
        # written by logging.shutdown at exit
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(partial(gateway.run, listen=args.listen,
                                           metrics=args.metrics, ready=args.ready))
                async for sig in signals:
                    log.info("gateway stopping (signal %d)", sig)
                    nursery.cancel_scope.cancel()
                    break

    try:
        trio.run(run)
    except KeyboardInterrupt:
        return 0
    finally:
        flush_buffered_logs()
    return 0
