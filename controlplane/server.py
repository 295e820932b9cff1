"""The discovery and CA server (port 15012): HTTP/1.1 over TLS 1.3.

Protocol (ARCHITECTURE.md, "Discovery and CA protocol"):

- every request carries ``Authorization: Bearer <token>``; the tokens file maps token → node
  name; a missing or unknown token gets ``401``;
- ``GET /v1/state`` → ``200 application/x-ndjson``, chunked, never ends: a snapshot, then a
  delta on every change and a ping every ``ping_interval`` seconds;
- ``POST /v1/certificate`` with ``{"csr": PEM}`` → ``{"chain": [leaf, …, root]}``; ``403``
  unless a workload with the CSR's identity runs on the caller's node; ``400`` for a
  malformed body or CSR; ``413``/``431`` for oversize bodies/headers.

Subscribers never slow each other down: each one keeps only a reference to the last state it
sent and, when it can write again, gets one delta from there to the current state (several
changes coalesce into one). A subscriber that cannot take a message within ``send_timeout``
is dropped; when it reconnects it starts again from a snapshot.
"""

from __future__ import annotations

import hmac
import json
import logging
import ssl
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

import trio
import yaml

from controlplane.admin import ControlPlaneMetrics, serve_admin
from controlplane.ca import CertificateAuthority, NotAuthorized
from controlplane.kube.client import KubeClient, KubeConfig
from controlplane.kube.publish import GatewayTemplate, Publisher
from controlplane.kube.source import KubeSource
from controlplane.kube.tokenreview import NODE_SERVICE_ACCOUNT, TokenReviewAuthenticator
from controlplane.source_dir import DirectorySource
from nodeproxy import certs, httpio, model, tlsconfig
from nodeproxy.certs import CertError
from nodeproxy.identity import IdentityError, spiffe_id
from nodeproxy.identity import parse as parse_identity
from nodeproxy.telemetry.server import parse_address

log = logging.getLogger(__name__)

CONTROLPLANE_NAMESPACE = model.ROOT_NAMESPACE
CONTROLPLANE_SERVICE_ACCOUNT = "controlplane"
ALPN = ("http/1.1",)
MAX_CSR_BODY = 64 * 1024


def controlplane_identity(trust_domain: str) -> str:
    return spiffe_id(trust_domain, CONTROLPLANE_NAMESPACE, CONTROLPLANE_SERVICE_ACCOUNT)


@dataclass
class ServerConfig:
    resources: Path | None
    state_dir: Path
    tokens: Path | None
    listen: str = "0.0.0.0:15012"
    admin: str | None = "0.0.0.0:15014"
    trust_domain: str = model.TRUST_DOMAIN
    cert_ttl: timedelta = timedelta(hours=24)
    ping_interval: float = 15.0
    poll_interval: float = 0.5
    handshake_timeout: float = 10.0
    request_timeout: float = 10.0
    # a subscriber that cannot take one message in this long is dropped
    send_timeout: float = 30.0
    # "dir": the YAML directory `resources`; "kube": the Kubernetes API (`kube`)
    source: str = "dir"
    kube: KubeConfig | None = None
    # who may authenticate by TokenReview (source "kube"): (namespace, service account)
    kube_node_service_accounts: tuple[tuple[str, str], ...] = (NODE_SERVICE_ACCOUNT,)
    # the gateway template (file or mounted ConfigMap dir); None: the built-in one
    gateway_template: Path | None = None
    gateway_image: str | None = None
    gateway_controlplane: str | None = None


@dataclass
class Running:
    """What ``serve`` hands to ``task_status.started``."""

    port: int
    admin_port: int | None
    root_pem: bytes
    hub: StateHub
    source: DirectorySource | KubeSource
    server: DiscoveryServer = field(repr=False)


# -- tokens ---------------------------------------------------------------------------------


class TokenError(ValueError):
    pass


def parse_tokens(text: str, source: str = "tokens") -> dict[str, str]:
    """A YAML mapping token → node name; anything else is a TokenError."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise TokenError(f"{source}: invalid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise TokenError(f"{source}: must be a mapping of token to node name")
    out: dict[str, str] = {}
    for token, node in data.items():
        if not isinstance(token, str) or not isinstance(node, str) or not token or not node:
            raise TokenError(f"{source}: entry {token!r}: token and node must be non-empty strings")
        out[token] = node
    return out


class TokenStore:
    """The tokens file, re-read when it changes; a broken edit keeps the last good tokens."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._stamp: tuple[int, int] | None = None
        self._tokens: dict[str, str] = {}
        self.error: str | None = None
        self.reload()

    def reload(self) -> None:
        try:
            st = self.path.stat()
            stamp = (st.st_mtime_ns, st.st_size)
            if stamp == self._stamp:
                return
            tokens = parse_tokens(self.path.read_text(encoding="utf-8"), str(self.path))
        except (OSError, UnicodeDecodeError, TokenError) as e:
            if self.error != str(e):
                log.error("tokens file: %s (keeping %d known tokens)", e, len(self._tokens))
            self.error = str(e)
            return
        self._stamp, self._tokens, self.error = stamp, tokens, None
        log.info("loaded %d node tokens from %s", len(tokens), self.path)

    async def principal_for(self, token: str) -> str | None:
        return self.node_for(token)

    def node_for(self, token: str) -> str | None:
        self.reload()
        found = None
        # compare against every token, in constant time each, so timing reveals nothing
        for known, node in self._tokens.items():
            if hmac.compare_digest(known.encode(), token.encode()):
                found = node
        return found


class Authenticator(Protocol):
    async def principal_for(self, token: str) -> str | None: ...


class FirstOf:
    """The first authenticator that knows the token (the tokens file, then TokenReview)."""

    def __init__(self, *authenticators: Authenticator):
        self.authenticators = authenticators

    async def principal_for(self, token: str) -> str | None:
        for auth in self.authenticators:
            principal = await auth.principal_for(token)
            if principal is not None:
                return principal
        return None


GATEWAY_PRINCIPAL = "gateway:"


def may_hold(state: model.MeshState, principal: str, identity: str) -> bool:
    """May this caller be issued ``identity``?

    A node (tokens file value: the node's name) may hold the identity of an enrolled workload
    scheduled on it, as istiod allows ztunnel's impersonation; a namespace's L7 gateway
    (value ``gateway:NAMESPACE``) only its own identity.
    """
    if principal.startswith(GATEWAY_PRINCIPAL):
        # (the CA itself refuses identities of another trust domain)
        try:
            wanted = parse_identity(identity)
        except IdentityError:
            return False
        return (
            wanted.namespace == principal[len(GATEWAY_PRINCIPAL) :]
            and wanted.service_account == model.GATEWAY_SERVICE_ACCOUNT
        )
    return any(
        w.identity == identity and w.node == principal and w.meshed
        for w in state.workloads.values()
    )


def bearer_token(headers: dict[str, str]) -> str | None:
    value = headers.get("authorization", "")
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


# -- the state hub --------------------------------------------------------------------------


class StateHub:
    """The current mesh state, and a wake-up for everyone waiting on a change."""

    def __init__(self, state: model.MeshState | None = None):
        self.state = state or model.MeshState()
        self._changed = trio.Event()
        self._snapshot: tuple[int, bytes] | None = None
        self._deltas: dict[int, bytes] = {}  # from-version → encoded delta to self.state

    def publish(self, state: model.MeshState) -> None:
        """Make ``state`` current (it must not be mutated afterwards) and wake subscribers."""
        self.state = state
        self._snapshot = None
        self._deltas = {}
        changed, self._changed = self._changed, trio.Event()
        changed.set()

    async def wait_changed(self, version: int) -> model.MeshState:
        while self.state.version == version:
            await self._changed.wait()
        return self.state

    def snapshot_line(self) -> tuple[model.MeshState, bytes]:
        """The current state and its encoded snapshot message (encoded once per version)."""
        state = self.state
        if self._snapshot is None or self._snapshot[0] != state.version:
            self._snapshot = (state.version, _line({"type": "snapshot", "state": state.to_json()}))
        return state, self._snapshot[1]

    def delta_line(self, old: model.MeshState) -> tuple[model.MeshState, bytes]:
        """The current state and the encoded delta from ``old`` to it (shared by every
        subscriber that was at ``old``)."""
        state = self.state
        line = self._deltas.get(old.version)
        if line is None:
            line = _line({"type": "delta", **old.diff(state)})
            self._deltas[old.version] = line
        return state, line


def _line(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


PING_LINE = _line({"type": "ping"})


# -- the server -----------------------------------------------------------------------------


class DiscoveryServer:
    def __init__(
        self,
        config: ServerConfig,
        ca: CertificateAuthority,
        hub: StateHub,
        tokens: Authenticator,
        metrics: ControlPlaneMetrics,
    ):
        self.config = config
        self.ca = ca
        self.hub = hub
        self.tokens = tokens
        self.metrics = metrics
        self.identity = controlplane_identity(config.trust_domain)
        self.ssl_context, self._cert_info = self._make_context()

    def _make_context(self) -> tuple[ssl.SSLContext, certs.CertInfo]:
        chain, key = self.ca.issue(self.identity, self.config.cert_ttl)
        ctx = tlsconfig.server_context(
            chain, key, self.ca.root_pem, alpn=ALPN, require_client_cert=False
        )
        return ctx, certs.cert_info(chain[0])

    async def renew_certificate(self) -> None:
        """Re-issue our own certificate at half-life; new connections use the new one."""
        while True:
            delay = (self._cert_info.refresh_at - certs.utcnow()).total_seconds()
            await trio.sleep(max(1.0, delay))
            self.ssl_context, self._cert_info = self._make_context()
            log.info("renewed the control plane certificate until %s", self._cert_info.not_after)

    async def handle(self, tcp: trio.SocketStream) -> None:
        """One client connection: TLS, one request, the answer (or the state stream)."""
        peer = _peer(tcp)
        tls = trio.SSLStream(tcp, self.ssl_context, server_side=True)
        try:
            with trio.fail_after(self.config.handshake_timeout):
                await tls.do_handshake()
            await self._serve(tls, peer)
        except trio.TooSlowError:
            log.info("%s: timed out", peer)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
            log.debug("%s: connection lost: %s", peer, e)
        except Exception:
            log.exception("%s: connection failed", peer)
        finally:
            await trio.aclose_forcefully(tls)

    async def _serve(self, tls: trio.SSLStream, peer: str) -> None:
        conn = httpio.server_connection()
        try:
            with trio.fail_after(self.config.request_timeout):
                req = await httpio.read_request(tls, conn, max_body=MAX_CSR_BODY)
        except httpio.HTTPError as e:
            log.warning("%s: refused a bad request (%d): %s", peer, e.status, e.message)
            if httpio.can_respond(conn):
                await httpio.send_json(tls, conn, e.status, {"error": e.message}, close=True)
            return
        if req is None:
            return
        token = bearer_token(req.headers)
        node = None
        if token:
            with trio.move_on_after(self.config.request_timeout):
                node = await self.tokens.principal_for(token)
        if node is None:
            self.metrics.unauthenticated.inc()
            why = "missing bearer token" if token is None else "unknown bearer token"
            log.warning("%s: %s %s refused: %s", peer, req.method, req.path, why)
            await httpio.send_response(
                tls, conn, 401, _line({"error": why}),
                [("content-type", "application/json"), ("www-authenticate", "Bearer")],
                close=True,
            )
            return
        if req.path == "/v1/state":
            if req.method != "GET":
                await self._method_not_allowed(tls, conn, "GET")
                return
            await self._stream_state(tls, conn, node, peer)
        elif req.path == "/v1/certificate":
            if req.method != "POST":
                await self._method_not_allowed(tls, conn, "POST")
                return
            status, body = await self._certificate(req.body, node, peer)
            await httpio.send_json(tls, conn, status, body, close=True)
        else:
            await httpio.send_json(tls, conn, 404, {"error": f"no such path {req.path}"},
                                   close=True)

    async def _method_not_allowed(self, tls: trio.SSLStream, conn: Any, allow: str) -> None:
        await httpio.send_response(
            tls, conn, 405, _line({"error": f"use {allow}"}),
            [("content-type", "application/json"), ("allow", allow)], close=True,
        )

    # -- GET /v1/state ----------------------------------------------------------------------

    async def _stream_state(self, tls: trio.SSLStream, conn: Any, node: str, peer: str) -> None:
        await httpio.start_stream(
            tls, conn, 200,
            [("content-type", "application/x-ndjson"), ("cache-control", "no-cache")],
        )
        self.metrics.connected.inc()
        log.info("%s: node %s subscribed", peer, node)
        try:
            sent, line = self.hub.snapshot_line()
            await self._send(tls, conn, line, node, peer)
            self.metrics.pushes.labels("snapshot").inc()
            while True:
                with trio.move_on_after(self.config.ping_interval):
                    await self.hub.wait_changed(sent.version)
                if self.hub.state.version != sent.version:
                    sent, line = self.hub.delta_line(sent)
                    await self._send(tls, conn, line, node, peer)
                    self.metrics.pushes.labels("delta").inc()
                else:
                    await self._send(tls, conn, PING_LINE, node, peer)
        finally:
            self.metrics.connected.dec()
            log.info("%s: node %s unsubscribed", peer, node)

    async def _send(self, tls: trio.SSLStream, conn: Any, line: bytes, node: str, peer: str):
        try:
            with trio.fail_after(self.config.send_timeout):
                await httpio.send_chunk(tls, conn, line)
        except trio.TooSlowError:
            self.metrics.dropped.inc()
            log.warning("%s: node %s is not reading its state stream; dropped", peer, node)
            raise

    # -- POST /v1/certificate ---------------------------------------------------------------

    async def _certificate(self, body: bytes, node: str, peer: str) -> tuple[int, dict]:
        try:
            csr = json.loads(body)["csr"]
            if not isinstance(csr, str):
                raise TypeError("csr is not a string")
        except (ValueError, KeyError, TypeError) as e:
            self.metrics.refused.labels("bad_request").inc()
            log.warning("%s: node %s sent a malformed certificate request: %s", peer, node, e)
            return 400, {"error": 'body must be JSON {"csr": "<PEM>"}'}
        state = self.hub.state  # decide on one consistent state

        def allowed(identity: str) -> bool:
            return may_hold(state, node, identity)

        try:
            chain = self.ca.sign_csr(csr.encode(), self.config.cert_ttl, allowed)
        except NotAuthorized as e:
            self.metrics.refused.labels("not_authorized").inc()
            log.warning("%s: node %s refused a certificate: %s", peer, node, e)
            return 403, {"error": f"node {node} may not hold this identity: {e}"}
        except (CertError, ValueError) as e:
            self.metrics.refused.labels("bad_csr").inc()
            log.warning("%s: node %s sent a bad CSR: %s", peer, node, e)
            return 400, {"error": f"bad CSR: {e}"}
        self.metrics.signed.inc()
        ident = certs.cert_info(chain[0]).identity
        log.info("%s: signed %s for node %s", peer, ident, node)
        return 200, {"chain": [c.decode("ascii") for c in chain]}


def _peer(stream: trio.SocketStream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]
        return f"{host}:{port}"
    except OSError:
        return "?"


# -- the process ----------------------------------------------------------------------------


async def serve(
    config: ServerConfig, *, task_status: trio.TaskStatus[Running] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run the control plane: CA, resource watch, discovery server, admin server.

    ``task_status.started`` receives a :class:`Running` once every port is bound and the
    first mesh state is published.
    """
    ca_dir = Path(config.state_dir) / "ca"
    ca = await trio.to_thread.run_sync(
        CertificateAuthority.load_or_create, ca_dir, config.trust_domain
    )
    root_file = ca_dir / "root.pem"  # the file the lab hands to node proxies
    if not root_file.exists() or root_file.read_bytes() != ca.root_pem:
        tmp = root_file.with_suffix(".tmp")
        tmp.write_bytes(ca.root_pem)
        tmp.replace(root_file)
    metrics = ControlPlaneMetrics()
    hub = StateHub()

    def publish(state: model.MeshState) -> None:
        hub.publish(state)
        metrics.observe_state(state)

    source: DirectorySource | KubeSource
    publisher: Publisher | None = None
    auths: list[Authenticator] = [TokenStore(config.tokens)] if config.tokens else []
    if config.source == "kube":
        client = KubeClient(config.kube or KubeConfig.in_cluster())
        source = KubeSource(client, publish, trust_domain=config.trust_domain)
        auths.append(TokenReviewAuthenticator(
            client, node_service_accounts=config.kube_node_service_accounts))
        kw = {k: v for k, v in (("image", config.gateway_image),
                                 ("controlplane", config.gateway_controlplane)) if v}
        template = (GatewayTemplate.load(config.gateway_template, **kw)
                    if config.gateway_template else GatewayTemplate.builtin(**kw))
        publisher = Publisher(client, root_pem=ca.root_pem, gateway=template)
    else:
        assert config.resources is not None
        source = DirectorySource(
            Path(config.resources), publish, trust_domain=config.trust_domain,
            interval=config.poll_interval,
        )
    server = DiscoveryServer(config, ca, hub, FirstOf(*auths), metrics)

    def errors() -> dict[str, str]:
        return {**source.errors, **(publisher.errors if publisher else {})}
    host, port = parse_address(config.listen)
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        await nursery.start(source.run)
        if publisher is not None:
            nursery.start_soon(publisher.run)
        admin_port = None
        if config.admin:
            admin_port = await nursery.start(
                serve_admin, config.admin, metrics, lambda: hub.state, errors
            )
        nursery.start_soon(server.renew_certificate)
        await nursery.start(trio.serve_listeners, server.handle, listeners)
        log.info(
            "control plane %s listening on %s:%d (admin %s)",
            server.identity, host, bound, admin_port,
        )
        task_status.started(Running(bound, admin_port, ca.root_pem, hub, source, server))
