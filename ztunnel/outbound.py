"""Outbound: a connection an enrolled pod made, captured on its port 15001.

The original destination (SO_ORIGINAL_DST) decides the path: a service VIP goes to one of its
healthy endpoints, a meshed workload is reached by HBONE through the pool, anything else goes
out as plain TCP (passthrough). All sockets are made in the source pod's netns and marked, so
the source address is the pod's own and the capture rules let them through.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import trio

from nodeproxy.netns import in_netns
from nodeproxy.telemetry.accesslog import log_connection
from nodeproxy.telemetry.metrics import ConnectionLabels
from ztunnel.endpoints import choose_endpoint, resolve_destination
from ztunnel.hbone.pool import PoolKey
from ztunnel.hbone.protocol import connect_headers, new_traceparent
from ztunnel.relay import Counters, RelayError, abort, relay
from ztunnel.sockets import HBONE_PORT, connector, original_dst

if TYPE_CHECKING:
    from ztunnel.podproxy import PodProxy
    from ztunnel.proxy import NodeProxy

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0


def fmt_addr(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


async def handle_outbound(proxy: NodeProxy, pod: PodProxy, client: trio.SocketStream) -> None:
    """Serve one captured outbound connection to its end."""
    started = time.monotonic()
    src_ip, src_port = client.socket.getpeername()[:2]
    try:
        dst_ip, dst_port = original_dst(client.socket)
    except OSError as exc:
        log.warning("outbound from %s: no original destination: %s", pod.name, exc)
        await abort(client)
        return
    state = proxy.state
    source = state.workloads.get(pod.uid)
    dest = resolve_destination(state, dst_ip, dst_port)
    labels = ConnectionLabels.from_workloads(
        reporter="source",
        source=source,
        source_identity=pod.identity,
        destination=None,
        service=dest.service,
    )
    target_ip, target_port, target = dst_ip, dst_port, dest.workload
    if dest.service is not None:
        endpoint = choose_endpoint(state, dest.service, dst_port, proxy.rng)
        if endpoint is None:
            log.info(
                "outbound %s -> %s: service %s has no healthy endpoint",
                pod.name, fmt_addr(dst_ip, dst_port), dest.service.key,
            )
            proxy.metrics.failed(labels, "UH")
            await abort(client)
            return
        target_ip, target_port, target = endpoint.address, endpoint.port, endpoint.workload
    labels = ConnectionLabels.from_workloads(
        reporter="source",
        source=source,
        source_identity=pod.identity,
        destination=target,
        service=dest.service,
        destination_identity=target.identity if target is not None and target.meshed else None,
        mtls=target is not None and target.meshed,
    )
    counters = Counters()
    mtls = target is not None and target.meshed
    entry = {
        "direction": "outbound",
        "src.addr": fmt_addr(src_ip, src_port),
        "src.workload": pod.name,
        "src.namespace": pod.namespace,
        "src.identity": pod.identity,
        "dst.addr": fmt_addr(target_ip, target_port),
        "dst.hbone_addr": fmt_addr(target_ip, HBONE_PORT) if mtls else None,
        "dst.service": dest.service.hostname if dest.service else None,
        "dst.workload": target.name if target else None,
        "dst.namespace": target.namespace if target else None,
        "dst.identity": target.identity if mtls else None,
    }
    conn = proxy.connections.add(entry, counters)
    error: str | None = None
    flags = "-"
    try:
        if mtls:
            assert target is not None
            key = PoolKey(
                pod.identity, frozenset({target.identity}), (target_ip, HBONE_PORT), src_ip
            )
            forwarded = f'for="{fmt_addr(src_ip, src_port)}"'
            if dest.service is not None:
                forwarded += f";host={dest.service.hostname}"
            headers = connect_headers(
                fmt_addr(target_ip, target_port),
                forwarded_for=forwarded,
                baggage=f"k8s.namespace.name={pod.namespace},k8s.pod.name={pod.name}",
                traceparent=new_traceparent(),
            )
            proxy.remember_source(src_ip, pod)
            try:
                upstream = await proxy.pool.open(key, fmt_addr(target_ip, target_port), headers)
            except Exception as exc:  # noqa: BLE001 - every failure is logged and fails closed
                flags, error = "CONNECT", f"hbone: {exc}"
                proxy.metrics.failed(labels, flags)
                await abort(client)
                return
        else:
            try:
                upstream = await _dial_plain(pod, target_ip, target_port)
            except OSError as exc:
                flags, error = "UF", f"connect {fmt_addr(target_ip, target_port)}: {exc}"
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
            connection_security_policy="mutual_tls" if mtls else "unknown",
        )
        if error:
            entry["error"] = error
        log_connection(**entry)


async def _dial_plain(pod: PodProxy, ip: str, port: int) -> trio.SocketStream:
    """Plain TCP from inside the pod's netns (passthrough to a destination outside the mesh)."""
    sock = trio.socket.from_stdlib_socket(await in_netns(pod.netns_fd, connector))
    try:
        with trio.fail_after(CONNECT_TIMEOUT):
            await sock.connect((ip, port))
    except (OSError, trio.TooSlowError) as exc:
        sock.close()
        raise OSError(str(exc) or "connect timed out") from exc
    return trio.SocketStream(sock)
