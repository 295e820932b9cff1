"""The discovery client: the control plane's mesh state stream, and certificate signing.

:meth:`DiscoveryClient.run` keeps a ``GET /v1/state`` stream open (reconnecting with back-off
0.5 s → 15 s), applies the snapshot and the deltas, and keeps the last state while the control
plane is away: a proxy goes on working from what it knew. A reconnect replaces the state with
the new snapshot. :meth:`DiscoveryClient.sign` sends one CSR per call on its own connection.
The server's certificate must chain to the mesh root and carry the control plane's SPIFFE id.
"""

from __future__ import annotations

import json
import logging
import random
import ssl
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import trio

from nodeproxy import httpio, tlsconfig
from nodeproxy.model import MeshState

log = logging.getLogger(__name__)

CONTROLPLANE_IDENTITY = "spiffe://cluster.local/ns/nodeproxy-system/sa/controlplane"
ALPN = ("http/1.1",)
CONNECT_TIMEOUT = 10.0
REQUEST_TIMEOUT = 30.0
BACKOFF_INITIAL = 0.5
BACKOFF_MAX = 15.0
# the server pings every 15 s; three missed pings mean the connection is dead
IDLE_TIMEOUT = 45.0
MAX_RESPONSE = 1024 * 1024

Connect = Callable[[str, int], Awaitable[trio.abc.Stream]]


class DiscoveryError(Exception):
    """The control plane refused or failed a request; ``status`` is its HTTP status (0 when
    it could not be reached)."""

    def __init__(self, message: str, status: int = 0):
        super().__init__(message)
        self.status = status


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"control plane address must be HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


async def _open_tcp(host: str, port: int) -> trio.abc.Stream:
    return await trio.open_tcp_stream(host, port)


class TokenFile:
    """A credential read from a file, re-read when the file changes (projected ServiceAccount
    tokens rotate); an unreadable or empty file keeps the last good token."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._stamp: tuple[int, int] | None = None
        self._token = ""
        self()
        if not self._token:
            raise ValueError(f"{self.path}: no token in it")

    def __call__(self) -> str:
        try:
            st = self.path.stat()
            stamp = (st.st_mtime_ns, st.st_ino)
            if stamp != self._stamp:
                token = self.path.read_text().strip()
                if token:
                    self._stamp, self._token = stamp, token
        except OSError as exc:
            log.warning("token file %s: %s (keeping the last token)", self.path, exc)
        return self._token


class DiscoveryClient:
    def __init__(
        self,
        address: str,
        roots_pem: bytes,
        token: str | Callable[[], str],
        *,
        expected_identity: str = CONTROLPLANE_IDENTITY,
        connect: Connect | None = None,
        backoff_initial: float = BACKOFF_INITIAL,
        backoff_max: float = BACKOFF_MAX,
        idle_timeout: float = IDLE_TIMEOUT,
    ):
        self.host, self.port = split_address(address)
        self.token = token
        self.expected_identity = expected_identity
        self._connect = connect or _open_tcp
        self._ssl = tlsconfig.client_context(None, None, roots_pem, alpn=ALPN)
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.idle_timeout = idle_timeout
        self.state = MeshState()
        self.ready = trio.Event()
        self.connected = False
        # why the stream is down now (None while connected); and the latest failure ever,
        # with a count, for the admin endpoint
        self.last_error: str | None = None
        self.last_failure: str | None = None
        self.failures = 0
        self._changed = trio.Event()

    # -- state ------------------------------------------------------------------------------

    async def wait_changed(self, version: int) -> MeshState:
        """Return the state once its version differs from ``version``."""
        while self.state.version == version:
            await self._changed.wait()
        return self.state

    def _set_state(self, state: MeshState) -> None:
        # a new object each time: holders of the old state may compare old and new
        self.state = state
        changed, self._changed = self._changed, trio.Event()
        changed.set()

    def handle_message(self, msg: Any) -> None:
        """Apply one stream message (sans-IO); ValueError for anything malformed."""
        if not isinstance(msg, dict):
            raise ValueError("message is not a JSON object")
        kind = msg.get("type")
        try:
            if kind == "snapshot":
                state = MeshState.from_json(msg["state"])
                self._set_state(state)
                if not self.ready.is_set():
                    self.ready.set()
            elif kind == "delta":
                if not self.ready.is_set():
                    raise ValueError("delta before the first snapshot")
                state = self.state.copy()
                state.apply(msg)
                self._set_state(state)
            elif kind != "ping":
                raise ValueError(f"unknown message type {kind!r}")
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"malformed {kind} message: {type(e).__name__}: {e}") from None

    # -- connections ------------------------------------------------------------------------

    async def _open(self) -> trio.SSLStream:
        """TCP + TLS to the control plane, server identity checked."""
        with trio.fail_after(CONNECT_TIMEOUT):
            tcp = await self._connect(self.host, self.port)
            tls = trio.SSLStream(tcp, self._ssl, server_hostname=None)
            try:
                await tls.do_handshake()
                tlsconfig.check_peer(tls, [self.expected_identity])
            except BaseException:
                await trio.aclose_forcefully(tls)
                raise
        return tls

    def _headers(self, extra: Iterable[tuple[str, str]] = ()) -> list[tuple[str, str]]:
        return [
            ("host", f"{self.host}:{self.port}"),
            ("authorization", f"Bearer {self.token() if callable(self.token) else self.token}"),
            *extra,
        ]

    async def sign(self, csr_pem: bytes) -> list[bytes]:
        """Have the control plane sign ``csr_pem``; the chain is leaf first, root last."""
        body = json.dumps({"csr": csr_pem.decode("ascii")}).encode()
        try:
            tls = await self._open()
        except (OSError, trio.TooSlowError, trio.BrokenResourceError, ssl.SSLError,
                tlsconfig.PeerIdentityError) as e:
            raise DiscoveryError(f"cannot reach the control plane: {_describe(e)}") from None
        try:
            with trio.fail_after(REQUEST_TIMEOUT):
                conn = httpio.client_connection()
                await httpio.send_request(
                    tls, conn, "POST", "/v1/certificate",
                    self._headers([("content-type", "application/json")]), body,
                )
                resp = await httpio.read_response(tls, conn, max_body=MAX_RESPONSE)
        except (trio.TooSlowError, trio.BrokenResourceError, httpio.HTTPError) as e:
            raise DiscoveryError(f"certificate request failed: {_describe(e)}") from None
        finally:
            await trio.aclose_forcefully(tls)
        if resp.status != 200:
            raise DiscoveryError(
                f"control plane answered {resp.status}: {_error_message(resp.body)}", resp.status
            )
        try:
            chain = json.loads(resp.body)["chain"]
            if not chain or not all(isinstance(c, str) for c in chain):
                raise ValueError("empty or non-string chain")
        except (ValueError, KeyError, TypeError) as e:
            raise DiscoveryError(f"malformed certificate response: {e}", resp.status) from None
        return [c.encode("ascii") for c in chain]

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Follow the state stream forever, reconnecting with back-off."""
        task_status.started()
        delay = self.backoff_initial
        while True:
            got_snapshot = False
            try:
                got_snapshot = await self._follow()
                self.last_error = "the control plane closed the stream"
            except (OSError, trio.TooSlowError, trio.BrokenResourceError, ssl.SSLError,
                    tlsconfig.PeerIdentityError, httpio.HTTPError, DiscoveryError,
                    ValueError) as e:
                self.last_error = _describe(e)
            except Exception as e:  # a bug here must not end discovery for the proxy's life
                log.exception("discovery %s:%d: unexpected failure", self.host, self.port)
                self.last_error = _describe(e)
            finally:
                self.connected = False
            self.failures += 1
            self.last_failure = self.last_error
            if got_snapshot:
                delay = self.backoff_initial  # it worked for a while: start over quickly
            log.warning(
                "discovery %s:%d: %s; keeping state v%d, retrying in %.1fs",
                self.host, self.port, self.last_error, self.state.version, delay,
            )
            await trio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(self.backoff_max, delay * 2)

    async def _follow(self) -> bool:
        """One stream: returns (or raises) when it ends; True if a snapshot arrived."""
        got_snapshot = False
        tls = await self._open()
        try:
            conn = httpio.client_connection()
            with trio.fail_after(REQUEST_TIMEOUT):
                await httpio.send_request(
                    tls, conn, "GET", "/v1/state",
                    self._headers([("accept", "application/x-ndjson")]),
                )
                head = await httpio.read_response_head(tls, conn)
            if head.status != 200:
                body = b""
                with trio.move_on_after(REQUEST_TIMEOUT):
                    async for data in httpio.iter_body(tls, conn):
                        body += data
                        if len(body) > MAX_RESPONSE:
                            break
                raise DiscoveryError(
                    f"control plane answered {head.status}: {_error_message(body)}", head.status
                )
            lines = httpio.LineSplitter()
            body_iter = httpio.iter_body(tls, conn).__aiter__()
            while True:
                # pings arrive every 15 s: silence for much longer means a dead connection
                with trio.fail_after(self.idle_timeout):
                    try:
                        data = await body_iter.__anext__()
                    except StopAsyncIteration:
                        return got_snapshot
                for line in lines.feed(data):
                    try:
                        msg = json.loads(line)
                    except ValueError as e:
                        raise ValueError(f"bad JSON in the state stream: {e}") from None
                    self.handle_message(msg)
                    if msg.get("type") == "snapshot":
                        got_snapshot = True
                        if not self.connected:
                            log.info(
                                "discovery %s:%d: synced, state v%d (%d workloads)",
                                self.host, self.port, self.state.version,
                                len(self.state.workloads),
                            )
                        self.connected = True
                        self.last_error = None
        finally:
            await trio.aclose_forcefully(tls)


def _error_message(body: bytes) -> str:
    try:
        msg = json.loads(body).get("error")
        if isinstance(msg, str):
            return msg
    except (ValueError, AttributeError):
        pass
    return body[:200].decode("utf-8", "replace").strip() or "(no message)"


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
