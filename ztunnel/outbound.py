"""Outbound: a connection an enrolled pod made, captured on its port 15001.

The original destination (SO_ORIGINAL_DST) decides the path: a service VIP goes to one of its
healthy endpoints, a meshed workload is reached by HBONE through the pool, anything else goes
out as plain TCP (passthrough). All sockets are made in the source pod's netns and marked, so
the source address is the pod's own and the capture rules let them through.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from nodeproxy.model import Gateway, MeshState, Service, Workload
from nodeproxy.telemetry.accesslog import log_connection
from nodeproxy.telemetry.metrics import ConnectionLabels
from ztunnel.endpoints import choose_endpoint, resolve_destination
from ztunnel.hbone.pool import PoolKey
from ztunnel.hbone.protocol import connect_headers, new_traceparent
from ztunnel.relay import Counters, RelayError, abort, relay
from ztunnel.sockets import HBONE_PORT, dial, original_dst

if TYPE_CHECKING:
    from ztunnel.podproxy import PodProxy
    from ztunnel.proxy import NodeProxy

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0


def fmt_addr(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


@dataclass(frozen=True, slots=True)
class Plan:
    """Where one outbound connection goes (decided without IO, see :func:`plan_outbound`)."""

    hbone: bool  # through an HBONE tunnel (else plain TCP passthrough)
    address: str  # the TCP destination: an endpoint, or the L7 gateway for its namespace
    port: int  # HBONE_PORT when hbone
    authority: str  # ip:port the tunnel asks for (the original VIP:port through a gateway)
    identity: str | None  # the SPIFFE id the peer must present
    service: Service | None
    workload: Workload | None  # the destination workload, when known
    gateway: Gateway | None = None


class NoEndpoint(Exception):
    pass


def plan_outbound(
    state: MeshState, dst_ip: str, dst_port: int, rng: random.Random
) -> Plan:
    """Decide the path of a connection to dst_ip:dst_port (raises NoEndpoint)."""
    dest = resolve_destination(state, dst_ip, dst_port)
    if dest.service is not None:
        gateway = state.gateway_for(dest.service.namespace)
        if gateway is not None:
            # a namespace with an L7 gateway: the gateway routes, we only carry the bytes
            return Plan(
                True, rng.choice(gateway.addresses), HBONE_PORT, fmt_addr(dst_ip, dst_port),
                gateway.identity, dest.service, None, gateway,
            )
        endpoint = choose_endpoint(state, dest.service, dst_port, rng)
        if endpoint is None:
            raise NoEndpoint(f"service {dest.service.key} has no healthy endpoint")
        target_ip, target_port, target = endpoint.address, endpoint.port, endpoint.workload
    else:
        target_ip, target_port, target = dst_ip, dst_port, dest.workload
    authority = fmt_addr(target_ip, target_port)
    if target is not None and target.meshed:
        return Plan(
            True, target_ip, HBONE_PORT, authority, target.identity, dest.service, target
        )
    return Plan(False, target_ip, target_port, authority, None, dest.service, target)


async def captured(
    client: trio.SocketStream, what: str
) -> tuple[tuple[str, int], tuple[str, int]] | None:
    """(caller, original destination) of a REDIRECTed connection; without an original
    destination the connection is reset and None returned."""
    src = client.socket.getpeername()[:2]
    try:
        return src, original_dst(client.socket)
    except OSError as exc:
        log.warning("%s: no original destination: %s", what, exc)
        await abort(client)
        return None


async def handle_outbound(proxy: NodeProxy, pod: PodProxy, client: trio.SocketStream) -> None:
    """Serve one captured outbound connection to its end."""
    started = time.monotonic()
    addrs = await captured(client, f"outbound from {pod.name}")
    if addrs is None:
        return
    (src_ip, src_port), (dst_ip, dst_port) = addrs
    state = proxy.state
    source = state.workloads.get(pod.uid)
    try:
        plan = plan_outbound(state, dst_ip, dst_port, proxy.rng)
    except NoEndpoint as exc:
        log.info("outbound %s -> %s: %s", pod.name, fmt_addr(dst_ip, dst_port), exc)
        service = resolve_destination(state, dst_ip, dst_port).service
        proxy.metrics.failed(
            ConnectionLabels.from_workloads(
                reporter="source", source=source, source_identity=pod.identity,
                destination=None, service=service,
            ),
            "UH",
        )
        await abort(client)
        return
    labels = ConnectionLabels.from_workloads(
        reporter="source",
        source=source,
        source_identity=pod.identity,
        destination=plan.workload,
        service=plan.service,
        destination_identity=plan.identity,
        mtls=plan.hbone,
    )
    counters = Counters()
    entry = {
        "direction": "outbound",
        "src.addr": fmt_addr(src_ip, src_port),
        "src.workload": pod.name,
        "src.namespace": pod.namespace,
        "src.identity": pod.identity,
        "dst.addr": plan.authority,
        "dst.hbone_addr": fmt_addr(plan.address, HBONE_PORT) if plan.hbone else None,
        "dst.service": plan.service.hostname if plan.service else None,
        "dst.workload": plan.workload.name if plan.workload else None,
        "dst.namespace": plan.workload.namespace if plan.workload else None,
        "dst.identity": plan.identity,
        "dst.gateway": plan.gateway.namespace if plan.gateway else None,
    }
    conn = proxy.connections.add(entry, counters)
    error: str | None = None
    flags = "-"
    try:
        if plan.hbone:
            try:
                upstream = await _open_hbone(proxy, pod, plan, src_ip, src_port)
            except Exception as exc:  # noqa: BLE001 - every failure is logged and fails closed
                flags, error = "CONNECT", f"hbone: {exc}"
                proxy.metrics.failed(labels, flags)
                await abort(client)
                return
        else:
            try:
                upstream = await _dial_plain(pod, plan.address, plan.port)
            except OSError as exc:
                flags, error = "UF", f"connect {plan.authority}: {exc}"
                proxy.metrics.failed(labels, flags)
                await abort(client)
                return
        proxy.metrics.opened(labels)
        try:
            await relay(client, upstream, counters)
        except RelayError as exc:
            error = str(exc)
        finally:
            proxy.metrics.bytes(
                labels, received=counters.client_to_server, sent=counters.server_to_client
            )
            proxy.metrics.closed(labels, flags)
    finally:
        proxy.connections.remove(conn)
        entry.update(
            bytes_sent=counters.client_to_server,
            bytes_recv=counters.server_to_client,
            duration=round((time.monotonic() - started) * 1000),
            connection_security_policy="mutual_tls" if plan.hbone else "unknown",
        )
        if error:
            entry["error"] = error
        log_connection(**entry)


async def _open_hbone(
    proxy: NodeProxy, pod: PodProxy, plan: Plan, src_ip: str, src_port: int
) -> trio.abc.HalfCloseableStream:
    """Open the CONNECT stream of ``plan`` through the pool.

    (Its own function so that the request headers and pool key are garbage once the stream
    is open, not held by the handler's frame for as long as the connection lives.)
    """
    assert plan.identity is not None
    key = PoolKey(pod.identity, frozenset({plan.identity}), (plan.address, HBONE_PORT), src_ip)
    headers = connect_headers(
        plan.authority,
        forwarded_for=fmt_addr(src_ip, src_port),
        host=plan.service.hostname if plan.service is not None else None,
        baggage=f"k8s.namespace.name={pod.namespace},k8s.pod.name={pod.name}",
        traceparent=new_traceparent(),
    )
    proxy.remember_source(src_ip, pod)
    return await proxy.pool.open(key, plan.authority, headers)


async def _dial_plain(pod: PodProxy, ip: str, port: int) -> trio.SocketStream:
    """Plain TCP from inside the pod's netns (passthrough to a destination outside the mesh)."""
    return await dial(await pod.connector(), (ip, port), CONNECT_TIMEOUT)
