"""One enrolled pod's proxy: listeners 15001, 15006 and 15008 inside the pod's netns.

The sockets are created on a worker thread that has entered the pod netns; once bound they stay
in that namespace, and the trio tasks that accept on them run like any others. Stopping a pod
proxy closes its listeners and cancels its connections.

The listeners carry SO_REUSEPORT (``ztunnel.sockets.listener``): the workers of
``nodeproxy ztunnel --workers N`` each bind all three in every pod netns and the kernel spreads
new connections over them. That needs nothing else: SO_ORIGINAL_DST is read from the accepted
socket (conntrack), and the IP_TRANSPARENT upstream sockets are ordinary connected sockets of
whichever worker made them, found by the app's replies through their 4-tuple.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import trio

from nodeproxy.identity import spiffe_id
from nodeproxy.model import TRUST_DOMAIN
from nodeproxy.netns import in_netns, netns_id
from ztunnel.inbound import handle_hbone, handle_plaintext
from ztunnel.outbound import handle_outbound
from ztunnel.sockets import (
    HBONE_PORT,
    INBOUND_PLAINTEXT_PORT,
    OUTBOUND_PORT,
    accept_some,
    listener,
    new_sockets,
    prepare_connector,
)

if TYPE_CHECKING:
    from ztunnel.proxy import NodeProxy

log = logging.getLogger(__name__)

Handler = Callable[["NodeProxy", "PodProxy", trio.SocketStream], Awaitable[None]]


class SocketStock:
    """Fresh TCP sockets made inside one netns, handed out one at a time.

    socket(2) creates a socket in the calling thread's netns, so every upstream connection used
    to cost a worker-thread hop with two setns(2) calls. A socket keeps its netns for life and
    can be configured, bound and connected from any thread, so the hop now makes a batch. The
    batch grows (up to ``max_batch``) while refills follow each other within a second, and
    falls back when traffic is slow, so an idle pod holds only a few spare descriptors.
    """

    def __init__(self, netns_fd: int, *, min_batch: int = 4, max_batch: int = 64) -> None:
        self.netns_fd = netns_fd
        self.min_batch = min_batch
        self.max_batch = max_batch
        self._batch = min_batch
        self._stock: list[socket.socket] = []
        self._last_refill = 0.0
        self._lock = trio.Lock()
        self._closed = False

    def __len__(self) -> int:
        return len(self._stock)

    async def take(self) -> socket.socket:
        """One unconfigured TCP socket of the netns (the caller owns and closes it)."""
        if not self._stock:
            async with self._lock:  # one refill at a time; the others wait for its batch
                if not self._stock:
                    await self._refill()
        if self._closed:
            raise OSError("pod proxy stopped")
        return self._stock.pop()

    async def _refill(self) -> None:
        now = time.monotonic()
        if now - self._last_refill < 1.0:
            self._batch = min(self.max_batch, self._batch * 2)
        else:
            self._batch = self.min_batch
        self._last_refill = now
        socks = await in_netns(self.netns_fd, lambda: new_sockets(self._batch))
        if self._closed:
            for sock in socks:
                sock.close()
            raise OSError("pod proxy stopped")
        self._stock.extend(socks)

    def close(self) -> None:
        self._closed = True
        while self._stock:
            self._stock.pop().close()


MIGRATE_REQ = "/proc/sys/net/ipv4/tcp_migrate_req"


def migrate_requests() -> bool:
    """Let the kernel move connections queued on a closing listener to another listener of
    its SO_REUSEPORT group (``net.ipv4.tcp_migrate_req``, Linux >= 5.14, per netns).

    With several workers sharing a pod's listeners, a worker that drains or dies would
    otherwise reset the connections waiting in its accept queue. Call it on a thread inside
    the pod netns (``/proc/sys/net`` is the opening thread's netns). Best-effort: False when
    the kernel lacks it.
    """
    try:
        with open(MIGRATE_REQ, "w") as f:
            f.write("1")
        return True
    except OSError as exc:
        log.debug("%s not set: %s", MIGRATE_REQ, exc)
        return False


class PodProxy:
    def __init__(
        self,
        uid: str,
        name: str,
        namespace: str,
        service_account: str,
        netns_fd: int,
        trust_domain: str = TRUST_DOMAIN,
    ) -> None:
        self.uid = uid
        self.name = name
        self.namespace = namespace
        self.service_account = service_account
        self.trust_domain = trust_domain
        self.netns_fd = netns_fd
        self.netns = netns_id(netns_fd)
        self.identity = spiffe_id(trust_domain, namespace, service_account)
        self._scope = trio.CancelScope()
        self._stopped = trio.Event()
        self._listeners: list[trio.SocketListener] = []
        self.sockets = SocketStock(netns_fd)

    def describe(self) -> dict[str, object]:
        return {
            "uid": self.uid,
            "name": self.name,
            "namespace": self.namespace,
            "identity": self.identity,
            "netns": f"{self.netns[0]}:{self.netns[1]}",
        }

    async def connector(self, *, spoof_source: str | None = None) -> socket.socket:
        """A marked, unconnected TCP socket in the pod netns (see ``ztunnel.sockets``)."""
        return prepare_connector(await self.sockets.take(), spoof_source=spoof_source)

    async def start(self, proxy: NodeProxy, nursery: trio.Nursery) -> None:
        """Bind the three listeners in the pod netns (errors raise: the agent is nacked)."""

        shared = getattr(proxy, "shared_listeners", False)

        def bind_all():
            if shared:
                migrate_requests()
            socks = []
            try:
                for port in (OUTBOUND_PORT, INBOUND_PLAINTEXT_PORT, HBONE_PORT):
                    socks.append(listener(port))
            except BaseException:
                for s in socks:
                    s.close()
                raise
            return socks

        socks = await in_netns(self.netns_fd, bind_all)
        listeners = [trio.SocketListener(trio.socket.from_stdlib_socket(s)) for s in socks]
        self._listeners = listeners
        handlers: list[Handler] = [handle_outbound, handle_plaintext, handle_hbone]
        nursery.start_soon(self._serve, proxy, list(zip(listeners, socks, handlers, strict=True)))

    async def _serve(
        self, proxy: NodeProxy,
        pairs: list[tuple[trio.SocketListener, socket.socket, Handler]],
    ) -> None:
        try:
            with self._scope:
                async with trio.open_nursery() as nursery:
                    for _, sock, handler in pairs:
                        nursery.start_soon(self._accept_loop, proxy, sock, handler, nursery)
        finally:
            for lst, _, _ in pairs:
                with trio.CancelScope(shield=True):
                    await lst.aclose()
            self.sockets.close()
            try:
                os.close(self.netns_fd)
            except OSError:
                pass
            self._stopped.set()

    async def _accept_loop(
        self,
        proxy: NodeProxy,
        sock: socket.socket,
        handler: Handler,
        nursery: trio.Nursery,
    ) -> None:
        """Accept on one listener (its trio.SocketListener closes it) until it is closed."""

        def spawn(stream: trio.SocketStream) -> None:
            nursery.start_soon(self._guard, proxy, handler, stream)

        while True:
            try:
                await accept_some(sock, spawn)
            except trio.ClosedResourceError:
                return
            except OSError as exc:
                log.warning("pod %s/%s: accept failed: %s", self.namespace, self.name, exc)
                await trio.sleep(0.1)

    async def _guard(self, proxy: NodeProxy, handler: Handler, stream: trio.SocketStream) -> None:
        """Run one connection; a bug in it is logged and never takes the pod proxy down."""
        try:
            await handler(proxy, self, stream)
        except Exception:
            log.exception("pod %s/%s: connection handler failed", self.namespace, self.name)
            await trio.aclose_forcefully(stream)

    async def stop_listening(self) -> None:
        """Accept nothing new; connections already here carry on (draining)."""
        for lst in self._listeners:
            await lst.aclose()

    async def stop(self) -> None:
        self._scope.cancel()
        await self._stopped.wait()
