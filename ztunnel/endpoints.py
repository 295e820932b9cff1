"""Where a captured connection goes: classify the original destination, choose an endpoint.

Pure functions over :class:`~nodeproxy.model.MeshState`. Endpoint choice follows ztunnel:
drop unhealthy endpoints and those we cannot address, then pick at random weighted by
capacity. No retries, no outlier detection (that is the L7 gateway's business).
"""

from __future__ import annotations

import ipaddress
import logging
import random
from dataclasses import dataclass

from nodeproxy.model import MeshState, Service, Workload

log = logging.getLogger(__name__)

SERVICE = "service"
WORKLOAD = "workload"
PASSTHROUGH = "passthrough"


@dataclass(frozen=True)
class Endpoint:
    """One concrete place to send a connection: a workload's address and target port."""

    workload: Workload
    address: str
    port: int


@dataclass(frozen=True)
class Destination:
    """An original destination, classified.

    ``kind`` is ``"service"`` (``service`` set; ``port`` is the service port), ``"workload"``
    (``workload`` set) or ``"passthrough"`` (outside the mesh: forward as is).
    """

    kind: str
    ip: str
    port: int
    service: Service | None = None
    workload: Workload | None = None


def normalize_ip(ip: str) -> str:
    """Canonical text form of an IP (IPv4-mapped IPv6 becomes IPv4); ValueError if invalid."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0].strip("[]"))
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return str(addr)


def resolve_destination(state: MeshState, ip: str, port: int) -> Destination:
    """Classify an original destination ``ip:port``.

    A service VIP wins over a workload address (VIPs are never pod IPs). Raises
    ``ValueError`` for an address that is not an IP.
    """
    norm = normalize_ip(ip)
    svc = state.service_by_vip(norm)
    if svc is not None:
        return Destination(SERVICE, norm, port, service=svc)
    wl = state.workload_by_ip(norm)
    if wl is not None:
        return Destination(WORKLOAD, norm, port, workload=wl)
    return Destination(PASSTHROUGH, norm, port)


def candidates(state: MeshState, service: Service, port: int) -> list[Endpoint]:
    """The usable endpoints of ``service`` for service port ``port`` (unweighted)."""
    svc_port = service.port(port)
    if svc_port is None:
        return []
    out: list[Endpoint] = []
    for wl in state.endpoints(service):
        if not wl.healthy or not wl.addresses:
            continue
        target = state.target_port(service, svc_port, wl)
        if target is None or not 0 < int(target) < 65536:
            continue
        out.append(Endpoint(wl, wl.addresses[0], int(target)))
    return out


def choose_endpoint(
    state: MeshState, service: Service, port: int, rng: random.Random
) -> Endpoint | None:
    """Pick one endpoint of ``service`` for service port ``port``, weighted by capacity.

    ``None`` when the service has no such port or no usable endpoint.
    """
    eps = candidates(state, service, port)
    if not eps:
        if service.port(port) is None:
            log.info("service %s has no port %d", service.key, port)
        return None
    if len(eps) == 1:
        return eps[0]
    # a listed, healthy endpoint always gets some share, even with a nonsensical capacity
    weights = [max(1, int(e.workload.capacity)) for e in eps]
    return rng.choices(eps, weights=weights, k=1)[0]
