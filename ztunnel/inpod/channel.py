"""The node proxy's end of the node agent channel.

The proxy connects to the agent's SOCK_SEQPACKET socket, says Hello, then serves the agent's
messages in lock-step: every Add (with the pod's netns fd), Keep, Del and SnapshotSent is handed
to a :class:`PodHandler` and answered with an ack carrying the handler's error text, if any.
When the agent goes away the proxy reconnects with back-off; the agent replays every pod and
SnapshotSent on each new connection, so the handler sees the whole set again.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Protocol

import trio

from nodeproxy import inpod_protocol as protocol
from nodeproxy.inpod_protocol import (
    Ack,
    Add,
    ChannelClosed,
    Del,
    Hello,
    Keep,
    ProtocolError,
    SnapshotSent,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PodInfo:
    uid: str
    name: str
    namespace: str
    service_account: str


class PodHandler(Protocol):
    """What the proxy does with the agent's messages; raising nacks the message."""

    async def add(self, pod: PodInfo, netns_fd: int) -> None:
        """Start (or replace) the pod's in-pod proxy. The handler owns ``netns_fd`` from here
        on, also when it raises."""

    async def keep(self, uid: str) -> None: ...

    async def delete(self, uid: str) -> None: ...

    async def snapshot_sent(self) -> None:
        """All current pods have been (re)sent: drop pods that were not among them."""


async def _dispatch(handler: PodHandler, msg: protocol.Message, fd: int | None) -> None:
    if isinstance(msg, Add):
        if fd is None:
            raise ProtocolError("add without a netns fd")
        await handler.add(PodInfo(msg.uid, msg.name, msg.namespace, msg.service_account), fd)
        return
    if fd is not None:
        os.close(fd)  # only Add carries a namespace
    if isinstance(msg, Keep):
        await handler.keep(msg.uid)
    elif isinstance(msg, Del):
        await handler.delete(msg.uid)
    elif isinstance(msg, SnapshotSent):
        await handler.snapshot_sent()
    else:
        raise ProtocolError(f"unexpected message from the agent: {type(msg).__name__}")


async def serve_agent_connection(sock: trio.socket.SocketType, handler: PodHandler) -> None:
    """Say Hello on a connected socket and serve messages until the agent closes it."""
    await protocol.send_msg(sock, Hello())
    while True:
        try:
            msg, fd = await protocol.recv_msg(sock)
        except ChannelClosed:
            raise
        except ProtocolError as e:
            log.warning("bad message from the node agent: %s", e)
            await protocol.send_msg(sock, Ack(str(e)))
            continue
        error: str | None = None
        try:
            await _dispatch(handler, msg, fd)
        except Exception as e:  # the handler's failure is the agent's nack, not ours to die of
            error = str(e) or type(e).__name__
            log.warning("node agent %s failed: %s", type(msg).__name__, error)
        await protocol.send_msg(sock, Ack(error))


async def run_channel(
    path: str,
    handler: PodHandler,
    *,
    min_backoff: float = 0.1,
    max_backoff: float = 5.0,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Keep a connection to the agent at ``path`` and serve it; never returns."""
    task_status.started()
    backoff = min_backoff
    while True:
        sock = protocol.seqpacket_socket()
        try:
            await sock.connect(path)
        except OSError as e:
            sock.close()
            log.debug("node agent at %s not reachable (%s); retry in %.1f s", path, e, backoff)
            await trio.sleep(backoff)
            backoff = min(backoff * 2, max_backoff)
            continue
        backoff = min_backoff
        log.info("connected to the node agent at %s", path)
        with sock:
            try:
                await serve_agent_connection(sock, handler)
            except ChannelClosed:
                log.info("node agent closed the channel; reconnecting")
            except (OSError, ProtocolError) as e:
                log.warning("node agent channel failed: %s; reconnecting", e)
        await trio.sleep(min_backoff)
