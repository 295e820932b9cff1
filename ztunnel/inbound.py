"""Inbound: HBONE on 15008 and plaintext on 15006, inside the destination pod's netns.

HBONE: mutual TLS with the pod's own certificate; the caller must present a SPIFFE identity of
our trust domain. Each CONNECT is checked (the authority must be this pod, L4 policy must allow)
and the app is dialled with the caller's IP as source before 200 is sent, as ztunnel does.
Plaintext 15006 serves callers outside the mesh: the same policy, with no identity.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import trio

from nodeproxy.model import MeshState, Workload
from nodeproxy.telemetry.accesslog import log_connection
from nodeproxy.telemetry.metrics import ConnectionLabels
from nodeproxy.tlsconfig import PeerIdentityError, check_trust_domain
from ztunnel.hbone.connection import LargeReadStream
from ztunnel.hbone.server import serve_hbone_connection
from ztunnel.outbound import captured, fmt_addr
from ztunnel.policy import Connection, Decision, authorize
from ztunnel.relay import Counters, RelayError, abort, relay
from ztunnel.sockets import dial

if TYPE_CHECKING:
    from ztunnel.hbone.server import HboneRequest
    from ztunnel.podproxy import PodProxy
    from ztunnel.proxy import NodeProxy

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 10.0
CONNECT_TIMEOUT = 10.0


async def handle_hbone(proxy: NodeProxy, pod: PodProxy, tcp: trio.SocketStream) -> None:
    """Terminate mTLS for one HBONE connection and serve its CONNECT streams."""
    peer = tcp.socket.getpeername()[:2]
    local_ip = tcp.socket.getsockname()[0]
    try:
        cert = await proxy.certs.get(pod.identity)
    except Exception as exc:  # noqa: BLE001 - no certificate: refuse, never fall back
        log.warning("inbound HBONE to %s: no certificate for %s: %s", pod.name, pod.identity, exc)
        await abort(tcp)
        return
    tls = trio.SSLStream(LargeReadStream(tcp), cert.server_context(), server_side=True)
    try:
        with trio.fail_after(HANDSHAKE_TIMEOUT):
            await tls.do_handshake()
        caller = check_trust_domain(tls, pod.trust_domain)
    except (trio.BrokenResourceError, trio.TooSlowError, PeerIdentityError, OSError) as exc:
        log.warning("inbound HBONE to %s from %s refused: %s", pod.name, fmt_addr(*peer), exc)
        proxy.metrics.failed(
            ConnectionLabels.from_workloads(
                reporter="destination",
                source=None,
                destination=proxy.state.workloads.get(pod.uid),
                destination_identity=pod.identity,
            ),
            "TLS_FAILURE",
        )
        await trio.aclose_forcefully(tls)
        return

    # a partial of a plain function, not a closure coroutine: no extra coroutine frame kept
    # for as long as each tunnel stays open
    on_connect = functools.partial(_serve_connect, proxy, pod, caller, peer[0], local_ip)
    try:
        await serve_hbone_connection(tls, on_connect, peer_identity=caller, peer_address=peer)
    finally:
        await trio.aclose_forcefully(tls)


def _addressed_to_pod(proxy: NodeProxy, pod: PodProxy, host: str, local_ip: str) -> bool:
    workload = proxy.state.workloads.get(pod.uid)
    addresses = set(workload.addresses) if workload else set()
    addresses.add(local_ip)
    try:
        return str(ipaddress.ip_address(host)) in addresses
    except ValueError:
        return False


def _serve_connect(
    proxy: NodeProxy,
    pod: PodProxy,
    caller: str,
    src_ip: str,
    local_ip: str,
    request: HboneRequest,
) -> Awaitable[None]:
    """The handler of one CONNECT: a reject, or :func:`_admit`. (A plain function returning
    the coroutine to run, so its frame is not kept for the life of the tunnel.)"""
    host, port = request.authority
    if not _addressed_to_pod(proxy, pod, host, local_ip):
        log.info("inbound %s: CONNECT %s is not an address of this pod", pod.name, host)
        return request.reject(400)
    return _admit(proxy, pod, src_ip, caller, host, port, hbone=request)


async def handle_plaintext(proxy: NodeProxy, pod: PodProxy, client: trio.SocketStream) -> None:
    """A caller outside the mesh, redirected to 15006: policy with no identity."""
    addrs = await captured(client, f"inbound plaintext to {pod.name}")
    if addrs is None:
        return
    (src_ip, src_port), (dst_ip, dst_port) = addrs
    await _admit(proxy, pod, src_ip, None, dst_ip, dst_port, plain=client, src_port=src_port)


async def _admit(
    proxy: NodeProxy,
    pod: PodProxy,
    src_ip: str,
    caller: str | None,
    dst_ip: str,
    dst_port: int,
    *,
    hbone: HboneRequest | None = None,
    plain: trio.SocketStream | None = None,
    src_port: int | None = None,
) -> None:
    """Policy, dial the app as the caller, then relay (shared by 15008 and 15006)."""
    started = time.monotonic()
    state = proxy.state
    workload = state.workloads.get(pod.uid)
    source = state.workload_by_ip(src_ip)
    labels = ConnectionLabels.from_workloads(
        reporter="destination",
        source=source,
        source_identity=caller,
        destination=workload,
        destination_identity=pod.identity,
        mtls=caller is not None,
    )
    conn = Connection(src_identity=caller, src_ip=src_ip, dst_ip=dst_ip, dst_port=dst_port)
    decision = admission(state, workload, pod.namespace, conn, proxy.authorize)
    entry = {
        "direction": "inbound",
        "src.addr": fmt_addr(src_ip, src_port) if src_port else src_ip,
        "src.workload": source.name if source else None,
        "src.namespace": source.namespace if source else None,
        "src.identity": caller,
        "dst.addr": fmt_addr(dst_ip, dst_port),
        "dst.hbone_addr": fmt_addr(dst_ip, 15008) if hbone else None,
        "dst.workload": pod.name,
        "dst.namespace": pod.namespace,
        "dst.identity": pod.identity,
    }

    if not decision.allowed:
        log.info("inbound %s denied: %s", fmt_addr(dst_ip, dst_port), decision.reason)
        await _refuse(proxy, labels, entry, hbone, plain, 401, "DENY",
                      f"policy rejection: {decision.reason}")
        return
    try:
        app = await _dial_app(pod, src_ip, dst_ip, dst_port)
    except OSError as exc:
        log.info("inbound %s: app unreachable: %s", fmt_addr(dst_ip, dst_port), exc)
        await _refuse(proxy, labels, entry, hbone, plain, 503, "UF", f"connect: {exc}")
        return
    if hbone is not None:
        try:
            client = await hbone.accept()
        except Exception as exc:  # noqa: BLE001 - the tunnel went away meanwhile
            log.info("inbound %s: tunnel gone before accept: %s", pod.name, exc)
            await abort(app)
            return
    else:
        assert plain is not None
        client = plain
    counters = Counters()
    live = proxy.connections.add(entry, counters, policy_check=(workload, pod.namespace, conn))
    scope = live.cancel_scope
    assert scope is not None  # made for every connection with a policy check
    proxy.metrics.opened(labels)
    try:
        with scope:
            await relay(client, app, counters)
    except RelayError as exc:
        entry["error"] = str(exc)
    finally:
        proxy.connections.remove(live)
        if scope.cancelled_caught:
            entry["error"] = "closed: policy now denies"
        proxy.metrics.bytes(
            labels, received=counters.client_to_server, sent=counters.server_to_client
        )
        proxy.metrics.closed(labels, "-")
        log_connection(
            **entry,
            bytes_sent=counters.server_to_client,
            bytes_recv=counters.client_to_server,
            duration=round((time.monotonic() - started) * 1000),
        )


async def _refuse(
    proxy: NodeProxy,
    labels: ConnectionLabels,
    entry: dict,
    hbone: HboneRequest | None,
    plain: trio.SocketStream | None,
    status: int,
    flags: str,
    error: str,
) -> None:
    """Count, log, and answer: an HBONE status, or a reset for a plaintext caller.

    (A module function, not a closure in ``_admit``: a closure and its cells would live as
    long as every admitted connection does.)
    """
    proxy.metrics.failed(labels, flags)
    entry["error"] = error
    log_connection(**entry, bytes_sent=0, bytes_recv=0, duration=0)
    if hbone is not None:
        await hbone.reject(status)
    elif plain is not None:
        await abort(plain)


def admission(
    state: MeshState,
    workload: Workload | None,
    namespace: str,
    conn: Connection,
    authorize: Callable[[list, Connection], Decision] = authorize,
) -> Decision:
    """May this connection reach the pod? (pure)

    In a namespace with an L7 gateway only the gateway may connect, and it has already applied
    the policies (L4 and L7) with the original caller's identity; everyone else bypassed it.
    """
    gateway = state.gateway_for(namespace)
    if gateway is not None:
        if conn.src_identity == gateway.identity:
            return Decision(True, None, "from the namespace's L7 gateway")
        return Decision(
            False, None, f"bypassed the L7 gateway of namespace {namespace}"
        )
    policies = state.policies_for(workload) if workload else []
    return authorize(policies, conn)


async def _dial_app(pod: PodProxy, src_ip: str, ip: str, port: int) -> trio.SocketStream:
    """Connect to the app inside the pod, with the caller's address as source."""

    return await dial(await pod.connector(spoof_source=src_ip), (ip, port), CONNECT_TIMEOUT)
