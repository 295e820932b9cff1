"""Socket options of the data path (Linux constants Python 3.11 lacks, see REFERENCE.md).

Every socket the node proxy makes for the data path carries SO_MARK 0x539, which the capture
rules exempt, so the proxy never captures its own traffic. These functions make plain blocking
stdlib sockets; the caller creates them inside a pod's netns (nodeproxy.netns.in_netns) and
hands them to trio.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Callable

import trio

PROXY_MARK = 0x539
SO_MARK = 36
SOL_IP = 0
SO_ORIGINAL_DST = 80
IP_TRANSPARENT = 19
IP_FREEBIND = 15
IP_BIND_ADDRESS_NO_PORT = 24

OUTBOUND_PORT = 15001
INBOUND_PLAINTEXT_PORT = 15006
HBONE_PORT = 15008


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, SO_MARK, PROXY_MARK)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def listener(port: int, *, backlog: int = 1024) -> socket.socket:
    """A marked listening socket on 0.0.0.0:port in the calling thread's netns.

    SO_REUSEPORT lets an old and a new node proxy overlap during an upgrade.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setsockopt(socket.SOL_SOCKET, SO_MARK, PROXY_MARK)
        sock.bind(("0.0.0.0", port))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def connector(*, spoof_source: str | None = None) -> socket.socket:
    """A marked, unconnected TCP socket in the calling thread's netns.

    With ``spoof_source`` the socket is bound (IP_TRANSPARENT + IP_FREEBIND) to that address,
    so the application sees the original caller's IP; the connmark 0x111 rules and routing
    table 100 bring the replies back to this socket.
    """
    return prepare_connector(socket.socket(socket.AF_INET, socket.SOCK_STREAM),
                             spoof_source=spoof_source)


def prepare_connector(sock: socket.socket, *, spoof_source: str | None = None) -> socket.socket:
    """Turn a fresh TCP socket into a :func:`connector` socket (closed on failure).

    A socket belongs to the netns it was created in; these options and the bind act on that
    netns from any thread, so only the creation needs a thread inside the pod netns.
    """
    try:
        _tune(sock)
        if spoof_source is not None:
            sock.setsockopt(SOL_IP, IP_TRANSPARENT, 1)
            sock.setsockopt(SOL_IP, IP_FREEBIND, 1)
            # the port is chosen by connect(), for the whole address pair, not by bind()
            # alone: a port in use towards one destination (or in TIME_WAIT) stays usable
            # towards others, as Envoy does for a bound source address
            sock.setsockopt(SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((spoof_source, 0))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def new_sockets(n: int) -> list[socket.socket]:
    """``n`` plain TCP sockets in the calling thread's netns (for :class:`SocketStock`)."""
    out: list[socket.socket] = []
    try:
        for _ in range(n):
            out.append(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
    except OSError:
        if not out:
            raise
    return out


def original_dst(sock: socket.socket) -> tuple[str, int]:
    """The destination a REDIRECTed connection was addressed to (SO_ORIGINAL_DST)."""
    raw = sock.getsockopt(SOL_IP, SO_ORIGINAL_DST, 16)
    port = struct.unpack("!H", raw[2:4])[0]
    return socket.inet_ntoa(raw[4:8]), port


def set_keepalive(sock: socket.socket) -> None:
    """ztunnel's TCP keepalive: 180 s idle, 180 s interval, 9 probes."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 180)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 180)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 9)


def reset_on_close(sock: socket.socket) -> None:
    """Make the next close send RST instead of FIN (SO_LINGER 0), to pass a reset on."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass


async def send_all_nonblocking(sock: socket.socket, data: bytes | memoryview) -> bool:
    """Send all of ``data`` on a non-blocking socket, waiting only while it is full; says
    whether it waited (a schedule point): trio's SocketStream yields after every call even
    when nothing blocked, which the data path cannot afford per chunk."""
    waited = False
    view = memoryview(data)
    while view:
        try:
            n = sock.send(view)
        except (BlockingIOError, InterruptedError):
            await trio.lowlevel.wait_writable(sock)
            waited = True
            continue
        view = view[n:]
    return waited


ACCEPT_BURST = 32
# accept(2) errors that concern one connection, not the listener (as trio's SocketListener)
_IGNORABLE_ACCEPT = frozenset(
    getattr(errno, name)
    for name in ("ECONNABORTED", "EPROTO", "EPERM", "ENETDOWN", "ENOPROTOOPT", "EHOSTDOWN",
                 "ENONET", "EHOSTUNREACH", "EOPNOTSUPP", "ENETUNREACH")
    if hasattr(errno, name)
)


async def accept_some(sock: socket.socket, spawn: Callable[[trio.SocketStream], object]) -> int:
    """Accept what is waiting on the listening socket ``sock`` (non-blocking), handing each
    connection to ``spawn``; wait for one first if none is. Returns how many it took.

    trio's ``SocketListener.accept()`` takes a schedule point after each connection it got
    without waiting: a task step per connection. Here the ready ones (up to ACCEPT_BURST)
    come in one pass, the wait being the only schedule point. Raises OSError for what is not
    routine (EMFILE…) and trio.ClosedResourceError once the listener is closed."""
    taken = 0
    while taken < ACCEPT_BURST:
        try:
            conn, _ = sock.accept()
        except (BlockingIOError, InterruptedError):
            if taken:
                return taken
            await trio.lowlevel.wait_readable(sock)
            continue
        except OSError as exc:
            if sock.fileno() == -1 or exc.errno == errno.EBADF:
                raise trio.ClosedResourceError("listener closed") from exc
            if exc.errno in _IGNORABLE_ACCEPT:
                continue
            raise
        spawn(trio.SocketStream(trio.socket.from_stdlib_socket(conn)))
        taken += 1
    await trio.lowlevel.checkpoint()  # a long burst: let the connections' tasks run
    return taken


async def dial(sock: socket.socket, address: tuple[str, int], timeout: float) -> trio.SocketStream:
    """Connect a fresh non-blocking socket (closed on failure: OSError, a timeout too).

    A connection to a listener of the same host (the app in its pod) is complete when
    ``connect()`` returns: the kernel runs the whole handshake inside the call, yet says
    EINPROGRESS. Then it is used at once, with no wait for writability (a task step and
    three epoll_ctl calls less per connection) and no cancel scope; only a connect still in
    progress is waited for, for at most ``timeout`` seconds."""
    try:
        if not _connected_at_once(sock, address):
            with trio.fail_after(timeout):
                await trio.lowlevel.wait_writable(sock)
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise OSError(err, os.strerror(err))
        return trio.SocketStream(trio.socket.from_stdlib_socket(sock))
    except trio.TooSlowError as exc:
        sock.close()
        raise OSError("connect timed out") from exc
    except BaseException:
        sock.close()
        raise


def _connected_at_once(sock: socket.socket, address: tuple[str, int]) -> bool:
    """Start a non-blocking connect; whether it is complete already (else in progress, or
    failed: SO_ERROR says which once the socket is writable)."""
    try:
        sock.connect(address)
        return True
    except (BlockingIOError, InterruptedError):
        pass
    try:
        sock.getpeername()
        return True
    except OSError:
        return False
