"""Node agent ↔ node proxy messages over a Unix SOCK_SEQPACKET socket.

One JSON object per packet (ARCHITECTURE.md, "Node agent ↔ node proxy"):

- proxy → agent: ``{"type":"hello","version":1}``, then ``{"type":"ack","error":null|"…"}``
  for each agent message;
- agent → proxy: ``{"type":"add","uid","name","namespace","service_account"}`` with exactly one
  netns fd (SCM_RIGHTS), ``{"type":"keep","uid"}``, ``{"type":"del","uid"}``,
  ``{"type":"snapshot_sent"}``.

Strict lock-step: the agent sends one message and waits (5 s) for its ack before the next.
:func:`encode`/:func:`decode` are pure; :func:`send_msg`/:func:`recv_msg`/:func:`exchange` are
the thin trio drivers.
"""

from __future__ import annotations

import array
import json
import os
import socket
from dataclasses import dataclass
from typing import Any

import trio

VERSION = 1
ACK_TIMEOUT = 5.0
MAX_MESSAGE = 64 * 1024
_FD_SPACE = socket.CMSG_SPACE(4 * array.array("i").itemsize)  # room for a few fds


class ProtocolError(Exception):
    """A malformed, unexpected or failed message exchange."""


class ChannelClosed(ProtocolError):
    """The peer closed the connection."""


class Refused(ProtocolError):
    """The peer answered with an ack carrying an error (the channel itself is fine)."""


@dataclass(frozen=True)
class Hello:
    version: int = VERSION


@dataclass(frozen=True)
class Add:
    uid: str
    name: str
    namespace: str
    service_account: str


@dataclass(frozen=True)
class Keep:
    uid: str


@dataclass(frozen=True)
class Del:
    uid: str


@dataclass(frozen=True)
class SnapshotSent:
    pass


@dataclass(frozen=True)
class Ack:
    error: str | None = None


Message = Hello | Add | Keep | Del | SnapshotSent | Ack

_TYPES: dict[str, type] = {
    "hello": Hello,
    "add": Add,
    "keep": Keep,
    "del": Del,
    "snapshot_sent": SnapshotSent,
    "ack": Ack,
}
_NAMES = {cls: name for name, cls in _TYPES.items()}


def encode(msg: Message) -> bytes:
    body: dict[str, Any] = {"type": _NAMES[type(msg)]}
    body.update(msg.__dict__)
    return json.dumps(body, separators=(",", ":")).encode()


def _str_field(data: dict[str, Any], name: str, *, empty_ok: bool = False) -> str:
    value = data.get(name)
    if not isinstance(value, str) or (not value and not empty_ok):
        raise ProtocolError(f"field {name!r} must be a non-empty string, got {value!r}")
    return value


def decode(raw: bytes) -> Message:
    """Parse and validate one packet; raise :class:`ProtocolError` on anything malformed."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ProtocolError(f"not JSON: {e}") from None
    if not isinstance(data, dict):
        raise ProtocolError("message is not a JSON object")
    kind = data.get("type")
    if kind == "hello":
        version = data.get("version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise ProtocolError(f"hello version must be an integer, got {version!r}")
        return Hello(version)
    if kind == "add":
        return Add(
            uid=_str_field(data, "uid"),
            name=_str_field(data, "name"),
            namespace=_str_field(data, "namespace"),
            service_account=_str_field(data, "service_account"),
        )
    if kind == "keep":
        return Keep(_str_field(data, "uid"))
    if kind == "del":
        return Del(_str_field(data, "uid"))
    if kind == "snapshot_sent":
        return SnapshotSent()
    if kind == "ack":
        error = data.get("error")
        if error is not None and not isinstance(error, str):
            raise ProtocolError(f"ack error must be null or a string, got {error!r}")
        return Ack(error)
    raise ProtocolError(f"unknown message type {kind!r}")


def seqpacket_socket() -> trio.socket.SocketType:
    return trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)


async def send_msg(sock: trio.socket.SocketType, msg: Message, fd: int | None = None) -> None:
    """Send one message, with ``fd`` attached by SCM_RIGHTS (the fd stays open here)."""
    ancillary = []
    if fd is not None:
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]).tobytes())]
    data = encode(msg)
    try:
        await sock.sendmsg([data], ancillary)
    except (BrokenPipeError, ConnectionResetError) as e:
        raise ChannelClosed(f"peer closed: {e}") from None


async def recv_msg(sock: trio.socket.SocketType) -> tuple[Message, int | None]:
    """Receive one message and the fd it carries (the caller owns it; at most one is kept).

    A malformed message raises :class:`ProtocolError` with any received fds already closed.
    """
    try:
        data, ancdata, flags, _ = await sock.recvmsg(MAX_MESSAGE, _FD_SPACE)
    except ConnectionResetError as e:
        raise ChannelClosed(f"peer reset: {e}") from None
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
            fds.extend(arr)
    try:
        if not data:
            # SEQPACKET: an empty read is the peer's close (we never send empty packets)
            raise ChannelClosed("peer closed the channel")
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            raise ProtocolError("message or its ancillary data was truncated")
        if len(fds) > 1:
            raise ProtocolError(f"expected at most one fd, got {len(fds)}")
        msg = decode(data)
    except ProtocolError:
        for fd in fds:
            os.close(fd)
        raise
    return msg, (fds[0] if fds else None)


async def exchange(
    sock: trio.socket.SocketType,
    msg: Message,
    fd: int | None = None,
    *,
    timeout: float = ACK_TIMEOUT,
) -> None:
    """Send ``msg`` and wait for its ack.

    Raises :class:`Refused` on a nack (the channel stays usable) and another
    :class:`ProtocolError` when the channel is out of step or closed (drop it).
    """
    with trio.move_on_after(timeout) as scope:
        await send_msg(sock, msg, fd)
        reply, extra = await recv_msg(sock)
    if scope.cancelled_caught:
        raise ProtocolError(f"no ack for {_NAMES[type(msg)]} within {timeout:g} s")
    if extra is not None:
        os.close(extra)
    if not isinstance(reply, Ack):
        raise ProtocolError(f"expected ack, got {_NAMES[type(reply)]}")
    if reply.error is not None:
        raise Refused(f"node proxy refused {_NAMES[type(msg)]}: {reply.error}")
