"""The node proxy process: one trio process per node serving every enrolled pod.

It holds the mesh state (from the control plane), the certificates of the identities of its
pods, the HBONE pool, the pod proxies handed over by the CNI node agent, the live connections,
and the telemetry servers (metrics 15020, readiness 15021, admin on localhost 15000).
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import random
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from nodeproxy.certmanager import CertificateManager
from nodeproxy.discovery import DiscoveryClient, TokenFile
from nodeproxy.inpod_protocol import ChannelClosed, ProtocolError
from nodeproxy.model import MeshState, Workload
from nodeproxy.telemetry.logs import configure_logging, flush_buffered_logs, flush_logs_periodically
from nodeproxy.telemetry.metrics import ProxyMetrics
from nodeproxy.telemetry.server import Readiness, Request, Response, json_response, serve_http
from ztunnel import hostmode
from ztunnel.hbone.connection import LargeReadStream
from ztunnel.hbone.pool import HbonePool, PoolKey, client_tls
from ztunnel.inbound import admission
from ztunnel.inpod.channel import PodInfo, run_channel, serve_agent_connection
from ztunnel.podproxy import PodProxy
from ztunnel.policy import Connection, Decision, authorize
from ztunnel.relay import Counters
from ztunnel.sockets import dial, set_keepalive

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0
TRIM_INTERVAL = 60.0

_malloc_trim: Any = None


def release_memory() -> bool:
    """Give the C heap's free pages back to the OS (glibc ``malloc_trim(0)``).

    Start-up (imports, the certificate helper's pipes, the first mesh state) frees a few MB
    that glibc would otherwise keep resident; trimming returns them. Returns False where there
    is no ``malloc_trim`` (not glibc), which is harmless.
    """
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes

            fn = ctypes.CDLL("libc.so.6").malloc_trim
            fn.argtypes = [ctypes.c_size_t]
            fn.restype = ctypes.c_int
            _malloc_trim = fn
        except (OSError, AttributeError) as exc:
            log.debug("malloc_trim unavailable: %s", exc)
            _malloc_trim = False
    if not _malloc_trim:
        return False
    _malloc_trim(0)
    return True


@dataclass(eq=False, slots=True)
class LiveConnection:
    id: int
    entry: dict[str, Any]
    counters: Counters
    started: float
    policy_check: tuple[Workload | None, str, Connection] | None = None
    # only connections under a policy need one (re-checks cancel it): ~0.5 KB less per idle
    # outbound connection without it
    cancel_scope: trio.CancelScope | None = None

    def describe(self) -> dict[str, Any]:
        out = {k: v for k, v in self.entry.items() if v is not None}
        out["bytes_client_to_server"] = self.counters.client_to_server
        out["bytes_server_to_client"] = self.counters.server_to_client
        out["age_s"] = round(time.monotonic() - self.started, 1)
        return out


class ConnectionRegistry:
    """Live proxied connections: for the admin page and for policy re-checks."""

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self.live: dict[int, LiveConnection] = {}

    def add(
        self,
        entry: dict[str, Any],
        counters: Counters,
        policy_check: tuple[Workload | None, str, Connection] | None = None,
    ) -> LiveConnection:
        conn = LiveConnection(
            next(self._ids), entry, counters, time.monotonic(), policy_check,
            trio.CancelScope() if policy_check is not None else None,
        )
        self.live[conn.id] = conn
        return conn

    def remove(self, conn: LiveConnection) -> None:
        self.live.pop(conn.id, None)


class NodeProxy:
    def __init__(
        self,
        node: str,
        discovery: DiscoveryClient,
        certs: CertificateManager,
        metrics: ProxyMetrics | None = None,
    ) -> None:
        self.node = node
        self.discovery = discovery
        self.certs = certs
        self.metrics = metrics or ProxyMetrics()
        self.rng = random.Random()
        self.pool = HbonePool(self._connect_hbone)
        self.connections = ConnectionRegistry()
        self.pods: dict[str, PodProxy] = {}
        self.readiness = Readiness()
        self.readiness.set("cni snapshot", False, "waiting for the node agent's snapshot")
        self.readiness.set("mesh state", False, "waiting for the control plane")
        self._sources: dict[str, PodProxy] = {}
        self._nursery: trio.Nursery | None = None
        self._seen_since_hello: set[str] = set()
        # a worker of `--workers N`: the pod listeners are shared with the other workers
        self.shared_listeners = False

    @property
    def state(self) -> MeshState:
        return self.discovery.state

    def authorize(self, policies: list, conn: Connection) -> Decision:
        return authorize(policies, conn)

    # -- outbound HBONE connections, made from the source pod's netns --------------------
    def remember_source(self, ip: str, pod: PodProxy) -> None:
        self._sources[ip] = pod

    async def _connect_hbone(self, key: PoolKey) -> trio.abc.Stream:
        pod = self._sources.get(key.src_ip or "")
        if pod is None or pod.uid not in self.pods:
            raise OSError(f"no enrolled pod owns source address {key.src_ip}")
        cert = await self.certs.get(key.src_identity)
        sock = await pod.connector()
        try:
            set_keepalive(sock)
        except BaseException:
            sock.close()
            raise
        # large reads under TLS: fewer passes through trio and ssl per record
        transport = LargeReadStream(await dial(sock, key.next_hop, CONNECT_TIMEOUT))
        return await client_tls(transport, cert.client_context(), key.dst_identities)

    # -- the node agent's pods (ztunnel.inpod.channel.PodHandler) ------------------------
    async def add(self, pod: PodInfo, netns_fd: int) -> None:
        assert self._nursery is not None
        old = self.pods.get(pod.uid)
        proxy = PodProxy(pod.uid, pod.name, pod.namespace, pod.service_account, netns_fd)
        if old is not None:
            if old.netns == proxy.netns:
                # same pod, same netns (a replay after reconnect): keep the running proxy
                os.close(netns_fd)
                self._seen_since_hello.add(pod.uid)
                return
            log.info("pod %s/%s has a new netns: replacing its proxy", pod.namespace, pod.name)
            self._forget_sources(old)
            await old.stop()
        await proxy.start(self, self._nursery)
        self.pods[pod.uid] = proxy
        self._seen_since_hello.add(pod.uid)
        log.info("pod %s/%s enrolled (%s)", pod.namespace, pod.name, proxy.identity)
        # fetch the pod's certificate now, so its first connection does not wait for it
        self._nursery.start_soon(self._prefetch, proxy.identity)

    async def _prefetch(self, identity: str) -> None:
        try:
            await self.certs.get(identity)
        except Exception as exc:  # noqa: BLE001 - retried on first use
            log.warning("certificate for %s not yet available: %s", identity, exc)
        release_memory()  # what issuing churned (helper process, pipes, TLS contexts)

    async def keep(self, uid: str) -> None:
        if uid not in self.pods:
            raise KeyError(f"unknown pod {uid}")
        self._seen_since_hello.add(uid)

    def _forget_sources(self, pod: PodProxy) -> None:
        # the pod's addresses may come back on another pod: no stale owner for them
        for ip in [ip for ip, owner in self._sources.items() if owner is pod]:
            del self._sources[ip]

    async def delete(self, uid: str) -> None:
        proxy = self.pods.pop(uid, None)
        if proxy is None:
            return
        self._forget_sources(proxy)
        await proxy.stop()
        if not any(p.identity == proxy.identity for p in self.pods.values()):
            self.certs.forget(proxy.identity)
        log.info("pod %s/%s released", proxy.namespace, proxy.name)

    async def snapshot_sent(self) -> None:
        for uid in list(self.pods):
            if uid not in self._seen_since_hello:
                await self.delete(uid)
        self._seen_since_hello = set()
        self.readiness.set("cni snapshot", True)
        release_memory()

    # -- mesh state ------------------------------------------------------------------------
    async def follow_state(self) -> None:
        await self.discovery.ready.wait()
        self.readiness.set("mesh state", True)
        version = -1
        while True:
            state = await self.discovery.wait_changed(version)
            version = state.version
            self.recheck_policies(state)

    def recheck_policies(self, state: MeshState) -> None:
        """Close live inbound connections that the current policy would now deny."""
        for conn in list(self.connections.live.values()):
            if conn.policy_check is None or conn.cancel_scope is None:
                continue
            workload, namespace, c = conn.policy_check
            current = state.workloads.get(workload.uid) if workload else None
            decision = admission(state, current, namespace, c, self.authorize)
            if not decision.allowed:
                log.info("closing connection %s: %s", conn.id, decision.reason)
                conn.cancel_scope.cancel()

    # -- admin -----------------------------------------------------------------------------
    def admin_routes(self) -> dict[str, Any]:
        async def config_dump(_: Request) -> Response:
            return json_response(
                {
                    "node": self.node,
                    "state": self.state.to_json(),
                    "pods": [p.describe() for p in self.pods.values()],
                    "certificates": self.certs.snapshot(),
                    "pool": self.pool.stats(),
                }
            )

        async def workloads(_: Request) -> Response:
            return json_response(
                [
                    {**w.__dict__, "identity": w.identity}
                    for w in self.state.workloads.values()
                ]
            )

        async def services(_: Request) -> Response:
            return json_response(self.state.to_json()["services"])

        async def policies(_: Request) -> Response:
            return json_response(self.state.to_json()["policies"])

        async def certificates(_: Request) -> Response:
            return json_response(self.certs.snapshot())

        async def connections(_: Request) -> Response:
            return json_response([c.describe() for c in self.connections.live.values()])

        async def pods(_: Request) -> Response:
            return json_response([p.describe() for p in self.pods.values()])

        return {
            "/config_dump": config_dump,
            "/workloads": workloads,
            "/services": services,
            "/policies": policies,
            "/certificates": certificates,
            "/connections": connections,
            "/pods": pods,
        }

    def metrics_routes(self) -> dict[str, Any]:
        async def metrics(_: Request) -> Response:
            return Response(
                200, self.metrics.exposition(), "text/plain; version=0.0.4; charset=utf-8"
            )

        return {"/metrics": metrics, "/stats/prometheus": metrics}

    async def drain(self, grace: float) -> None:
        """Stop taking connections, tell tunnel peers (GOAWAY), let live ones finish."""
        log.info("draining: %d live connections, up to %.0f s", len(self.connections.live), grace)
        self.readiness.set("draining", False, "shutting down")
        for pod in list(self.pods.values()):
            await pod.stop_listening()
        with trio.move_on_after(grace):
            await self.pool.aclose(grace=grace)
            while self.connections.live:
                await trio.sleep(0.2)
        log.info("drained (%d connections left)", len(self.connections.live))

    async def run(
        self,
        agent_socket: str | None,
        *,
        admin: str,
        metrics: str,
        ready: str,
        drain_seconds: float = 20.0,
        worker: tuple[int, int] | None = None,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until SIGTERM. ``worker`` = (index, fd of the supervisor's channel): this
        process is one worker of ``--workers N`` (``ztunnel.workers``) and takes its pods from
        the supervisor instead of the node agent."""
        from nodeproxy.telemetry.server import readiness_route

        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self.discovery.run)
            nursery.start_soon(self.certs.run)
            await nursery.start(self.pool.run)
            ports = {
                "admin": await nursery.start(serve_http, admin, self.admin_routes()),
                "metrics": await nursery.start(serve_http, metrics, self.metrics_routes()),
                "ready": await nursery.start(
                    serve_http, ready, {"/healthz/ready": readiness_route(self.readiness)}
                ),
            }
            nursery.start_soon(self.follow_state)
            if worker is not None:
                self.shared_listeners = True
                nursery.start_soon(self._serve_supervisor, worker, ports, nursery, drain_seconds)
            elif agent_socket is not None:  # None: host mode (ztunnel.hostmode), no node agent
                await nursery.start(run_channel, agent_socket, self)
            nursery.start_soon(self._on_signals, nursery, drain_seconds)
            nursery.start_soon(self._trim_periodically)
            nursery.start_soon(flush_logs_periodically)
            task_status.started()

    async def _serve_supervisor(
        self,
        worker: tuple[int, int],
        ports: dict[str, int],
        nursery: trio.Nursery,
        drain_seconds: float,
    ) -> None:
        """A worker's channel to its supervisor: once the mesh state is here (a worker joining
        the pods' listeners takes connections at once), report the telemetry ports, then serve
        the node agent protocol. The channel's end means the supervisor is gone: drain, exit."""
        from ztunnel import workers

        index, fd = worker
        sock = trio.socket.from_stdlib_socket(socket.socket(fileno=fd))
        with sock:
            try:
                await self._wait_state_or_eof(sock)
                await sock.send(workers.encode_report(index, ports))
                await serve_agent_connection(sock, self)
            except (ProtocolError, OSError) as exc:
                log.warning("worker %d: supervisor channel ended (%s): shutting down", index, exc)
        await self.drain(drain_seconds)
        nursery.cancel_scope.cancel()

    async def _wait_state_or_eof(self, sock: trio.socket.SocketType) -> None:
        """Wait for the mesh state; ChannelClosed if the supervisor goes away meanwhile (it
        sends nothing before our report, so the socket turning readable is its end)."""
        gone = False
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                nonlocal gone
                await trio.lowlevel.wait_readable(sock)
                gone = True
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            await self.discovery.ready.wait()
            nursery.cancel_scope.cancel()
        if gone:
            raise ChannelClosed("the supervisor closed the channel")

    async def _trim_periodically(self) -> None:
        """Return freed C-heap pages to the OS now and then (a few ms for a ~30 MB heap)."""
        release_memory()
        await self.discovery.ready.wait()
        while True:
            release_memory()
            await trio.sleep(TRIM_INTERVAL)

    async def _on_signals(self, nursery: trio.Nursery, drain_seconds: float) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for sig in signals:
                log.info("signal %s: shutting down", signal.Signals(sig).name)
                await self.drain(drain_seconds)
                nursery.cancel_scope.cancel()
                return


def check_worker_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``--workers``: 1..64, not with host mode; a worker (``--worker-fd``) has no agent."""
    from ztunnel.workers import MAX_WORKERS

    if not 1 <= args.workers <= MAX_WORKERS:
        parser.error(f"--workers must be between 1 and {MAX_WORKERS}")
    if args.workers > 1 and args.host_mode:
        parser.error("--workers > 1 is not supported with --host-mode (one process per VM)")
    if args.worker_fd is not None and (args.workers > 1 or args.host_mode):
        parser.error("--worker-fd is set by the supervisor of --workers N only")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="nodeproxy ztunnel", description=__doc__)
    parser.add_argument("--node", required=True)
    parser.add_argument("--controlplane", required=True, help="HOST:PORT of the control plane")
    parser.add_argument("--ca-root", required=True, type=Path)
    parser.add_argument("--token-file", required=True, type=Path)
    parser.add_argument("--agent-socket")
    parser.add_argument("--admin", default="127.0.0.1:15000")
    parser.add_argument("--metrics", default="0.0.0.0:15020")
    parser.add_argument("--ready", default="0.0.0.0:15021")
    parser.add_argument(
        "--drain-seconds", type=float, default=20.0,
        help="on SIGTERM, how long live connections may take to finish",
    )
    parser.add_argument(
        "--workers", type=int, default=1,
        help="worker processes sharing the pod listeners (SO_REUSEPORT); 1 = this process "
             "serves everything",
    )
    # set by the supervisor of --workers N on each worker's command line
    parser.add_argument("--worker-fd", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--worker-index", type=int, default=0, help=argparse.SUPPRESS)
    hostmode.add_arguments(parser)
    args = parser.parse_args(argv)
    hostmode.check_arguments(parser, args)
    check_worker_arguments(parser, args)
    who = f" [worker {args.worker_index}]" if args.worker_fd is not None else ""
    # access-log lines in batches (one write per 64 lines or 100 ms; warnings at once)
    configure_logging(fmt=f"%(asctime)s %(levelname)s{who} %(name)s: %(message)s")
    try:
        roots = args.ca_root.read_bytes()
        token = TokenFile(args.token_file)  # re-read as it rotates (projected tokens)
    except OSError as exc:
        print(f"nodeproxy ztunnel: {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"nodeproxy ztunnel: {exc}", file=sys.stderr)
        return 2
    if args.workers > 1:
        from ztunnel import workers

        workers.exec_supervisor(argv)  # does not return
    discovery = DiscoveryClient(args.controlplane, roots, token)
    # keys and chain checks in a short-lived helper: cryptography never loads in this process
    certs = CertificateManager(discovery.sign, roots, isolate_crypto=True)
    proxy = NodeProxy(args.node, discovery, certs)
    try:
        if args.host_mode:
            return trio.run(hostmode.run_from_args, proxy, args)
        trio.run(
            lambda: proxy.run(
                args.agent_socket,
                admin=args.admin,
                metrics=args.metrics,
                ready=args.ready,
                drain_seconds=args.drain_seconds,
                worker=(args.worker_index, args.worker_fd) if args.worker_fd is not None
                else None,
            )
        )
    except KeyboardInterrupt:
        return 0
    finally:
        flush_buffered_logs()
    return 0
