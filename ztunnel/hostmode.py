"""Host mode: the node proxy of a VM that is itself one workload (no CNI agent, no pods).

``nodeproxy ztunnel --host-mode --workload NS/NAME`` runs in the VM's own network namespace.
At start-up it installs the host-mode capture rules there (:func:`cni.rules.host_rules`, the
same generator as the pods'), so that from then on the VM's traffic is captured and fails
closed until the listeners exist; it waits for the mesh state to name its workload (a
``WorkloadEntry``, uid ``vm/NS/NAME``), opens the same three listeners as for a pod
(15001/15006/15008, :class:`ztunnel.podproxy.PodProxy` on its own netns) and reports ready. On
exit it removes the rules again. The proxy's own data-path sockets carry mark 0x539 and are
exempt; its control-plane connections are not marked, so the control plane's address is
exempt by destination.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
from typing import TYPE_CHECKING

import trio

from cni import netprog, rules
from nodeproxy.discovery import split_address
from nodeproxy.model import Workload
from ztunnel.inpod.channel import PodInfo

if TYPE_CHECKING:
    from ztunnel.proxy import NodeProxy

log = logging.getLogger(__name__)

CAPTURE = "host capture"
WORKLOAD = "host workload"


def vm_uid(namespace: str, name: str) -> str:
    """The uid the control plane gives a WorkloadEntry (``controlplane.translate.vm_uid``)."""
    return f"vm/{namespace}/{name}"


def own_netns_path() -> str:
    # /proc/<pid> rather than /proc/self: nsenter opens the path in its own process
    return f"/proc/{os.getpid()}/ns/net"


def parse_workload_ref(ref: str) -> tuple[str, str]:
    """``NS/NAME`` → (namespace, name); ValueError otherwise."""
    ns, sep, name = ref.partition("/")
    if not sep or not ns or not name or "/" in name:
        raise ValueError(f"--workload must be NAMESPACE/NAME, got {ref!r}")
    return ns, name


async def resolve_exempt(address: str) -> list[tuple[str, int]]:
    """The control plane's HOST:PORT as (IPv4, port) pairs to exempt from capture."""
    host, port = split_address(address)
    try:
        return [(str(ipaddress.IPv4Address(host)), port)]
    except ValueError:
        pass
    infos = await trio.socket.getaddrinfo(host, port, trio.socket.AF_INET, trio.socket.SOCK_STREAM)
    return sorted({(str(info[4][0]), port) for info in infos})


class HostMode:
    """One VM's capture and listeners around a :class:`~ztunnel.proxy.NodeProxy`."""

    def __init__(
        self,
        proxy: NodeProxy,
        namespace: str,
        name: str,
        *,
        outbound_exempt: list[tuple[str, int]],
        inbound_exempt_ports: tuple[int, ...] = rules.HOST_INBOUND_EXEMPT_PORTS,
        netns_path: str | None = None,
    ) -> None:
        self.proxy = proxy
        self.namespace = namespace
        self.name = name
        self.uid = vm_uid(namespace, name)
        self.netns_path = netns_path or own_netns_path()
        self.rule_set = rules.host_rules(
            inbound_exempt_ports=inbound_exempt_ports, outbound_exempt=outbound_exempt
        )
        # there is no node agent in host mode: its snapshot is not awaited
        proxy.readiness.set("cni snapshot", True, "host mode: no node agent")
        proxy.readiness.set(CAPTURE, False, "capture rules not installed yet")
        proxy.readiness.set(WORKLOAD, False, f"waiting for workload {self.uid} in the mesh state")

    async def wait_for_workload(self) -> Workload:
        """The VM's own workload, once the mesh state has it (logged while it does not)."""
        await self.proxy.discovery.ready.wait()
        warned = False
        while True:
            state = self.proxy.state
            w = state.workloads.get(self.uid)
            if w is not None:
                return w
            if not warned:
                log.warning(
                    "workload %s is not in the mesh state: declare a WorkloadEntry %s/%s",
                    self.uid, self.namespace, self.name,
                )
                warned = True
            await self.proxy.discovery.wait_changed(state.version)

    async def start(self, nursery: trio.Nursery) -> None:
        """Capture first (fail closed), then the workload's listeners; ready after both."""
        await netprog.program_host(self.netns_path, self.rule_set)
        self.proxy.readiness.set(CAPTURE, True)
        log.info("host capture installed in %s", self.netns_path)
        workload = await self.wait_for_workload()
        if not workload.meshed:
            log.warning(
                "workload %s is not in an ambient namespace: peers will not use HBONE to it",
                self.uid,
            )
        fd = os.open(self.netns_path, os.O_RDONLY)
        try:
            await self.proxy.add(
                PodInfo(self.uid, self.name, self.namespace, workload.service_account), fd
            )
        except BaseException:
            os.close(fd)
            raise
        self.proxy.readiness.set(WORKLOAD, True)
        nursery.start_soon(self._watch, workload)

    async def _watch(self, first: Workload) -> None:
        """Log when the declaration changes under us (its identity is fixed at start)."""
        version = self.proxy.state.version
        while True:
            state = await self.proxy.discovery.wait_changed(version)
            version = state.version
            w = state.workloads.get(self.uid)
            if w is None:
                log.warning("workload %s left the mesh state; serving as before", self.uid)
            elif w.service_account != first.service_account:
                log.warning(
                    "workload %s now has service account %s; restart to take it on",
                    self.uid, w.service_account,
                )

    async def remove_capture(self) -> None:
        try:
            await netprog.unprogram_pod(self.netns_path, host_mode=True)
            log.info("host capture removed from %s", self.netns_path)
        except netprog.NetprogError as exc:
            log.error("removing the host capture failed: %s", exc)

    async def run(
        self,
        *,
        admin: str,
        metrics: str,
        ready: str,
        drain_seconds: float = 20.0,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        async def run_proxy(task_status: trio.TaskStatus[None]) -> None:
            try:
                await self.proxy.run(
                    None, admin=admin, metrics=metrics, ready=ready,
                    drain_seconds=drain_seconds, task_status=task_status,
                )
            finally:
                # the proxy stopped (a signal, after draining): so does everything here
                nursery.cancel_scope.cancel()

        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(run_proxy)
                await self.start(nursery)
                task_status.started()
        finally:
            with trio.CancelScope(shield=True):
                await self.remove_capture()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--host-mode", action="store_true",
        help="capture this host's own traffic (a VM that is one workload); no CNI agent",
    )
    parser.add_argument("--workload", help="host mode: the VM's WorkloadEntry, NAMESPACE/NAME")


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exit with a usage error for a contradictory command line."""
    if args.host_mode:
        if args.agent_socket:
            parser.error("--host-mode has no node agent: drop --agent-socket")
        if not args.workload:
            parser.error("--host-mode needs --workload NAMESPACE/NAME")
        try:
            parse_workload_ref(args.workload)
        except ValueError as exc:
            parser.error(str(exc))
    else:
        if args.workload:
            parser.error("--workload is for --host-mode")
        if not args.agent_socket:
            parser.error("--agent-socket is required (or --host-mode)")


async def run_from_args(proxy: NodeProxy, args: argparse.Namespace) -> int:
    """The ``nodeproxy ztunnel --host-mode`` process; 1 when the capture cannot be installed."""
    ns, name = parse_workload_ref(args.workload)
    try:
        exempt = await resolve_exempt(args.controlplane)
        host = HostMode(proxy, ns, name, outbound_exempt=exempt)
        await host.run(
            admin=args.admin, metrics=args.metrics, ready=args.ready,
            drain_seconds=args.drain_seconds,
        )
    except Exception as exc:  # noqa: BLE001 - reported, exit status 1
        leaves = list(_leaves(exc))
        if all(isinstance(e, netprog.NetprogError | OSError | ValueError) for e in leaves):
            log.error("host mode failed: %s", "; ".join(str(e) for e in leaves))
        else:
            log.exception("host mode failed")
        return 1
    return 0


def _leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups, as trio's nurseries raise them."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for e in exc.exceptions for leaf in _leaves(e)]
    return [exc]
