"""A small Kubernetes API client on h11 + trio, and a reflector (list, then watch).

Why not a library: the async Kubernetes clients either need asyncio (lightkube's watch retry
calls ``asyncio.sleep``) or resume with a stale resourceVersion after 410 (kr8s). The API
surface the control plane needs is small: JSON requests, paged LIST and WATCH.

- :class:`KubeConfig` — where the API server is and how to authenticate; ``in_cluster()``
  reads ``KUBERNETES_SERVICE_HOST``/``PORT`` and the mounted ServiceAccount.
- :class:`KubeClient` — one TLS connection per request (watches hold theirs); the bearer token
  is re-read from its file for every request, since projected tokens rotate.
- :class:`Reflector` — keeps an informer-like cache of one resource type: LIST with paging,
  then WATCH from the list's resourceVersion with bookmarks; every event (bookmarks too)
  moves the resourceVersion on; 410 Gone (HTTP or an ERROR event) → relist; a dropped watch
  → re-watch from the last resourceVersion after a back-off (0.5 s doubling to 30 s).
"""

from __future__ import annotations

import json
import logging
import os
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import h11
import trio

from nodeproxy import httpio

log = logging.getLogger(__name__)

SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
MAX_LIST_BODY = 256 * 1024 * 1024  # one page; a page of 500 big pods is a few MB
MAX_BODY = 16 * 1024 * 1024
JSON = "application/json"
MERGE_PATCH = "application/merge-patch+json"


class KubeError(Exception):
    """The API server could not be reached or did not answer as expected."""


class ApiError(KubeError):
    """The API server answered with an error status (a ``Status`` object when it sent one)."""

    def __init__(self, status: int, reason: str = "", message: str = ""):
        self.status = status
        self.reason = reason
        self.message = message
        super().__init__(f"HTTP {status} {reason}: {message}".rstrip(": "))

    @classmethod
    def from_body(cls, status: int, body: Any) -> ApiError:
        if isinstance(body, dict) and body.get("kind") == "Status":
            err_cls = Gone if status == 410 else cls
            return err_cls(status, str(body.get("reason", "")), str(body.get("message", "")))
        return (Gone if status == 410 else cls)(status, "", "" if body is None else str(body)[:200])


class Gone(ApiError):
    """410: the resourceVersion (or continue token) is too old; the caller must relist."""


class WatchDropped(KubeError):
    """The watch stream broke before the server ended it."""


# -- configuration --------------------------------------------------------------------------


@dataclass
class KubeConfig:
    host: str
    port: int = 443
    ca_file: Path | None = SA_DIR / "ca.crt"
    token_file: Path | None = SA_DIR / "token"
    # the name the server certificate must carry; the host by default (the API server's
    # certificate holds the service IP in-cluster)
    server_name: str | None = None
    request_timeout: float = 30.0

    @classmethod
    def in_cluster(
        cls, environ: Mapping[str, str] | None = None, sa_dir: Path = SA_DIR
    ) -> KubeConfig:
        """The configuration a pod has: raises KubeError outside a cluster."""
        env = os.environ if environ is None else environ
        host = env.get("KUBERNETES_SERVICE_HOST", "")
        port = env.get("KUBERNETES_SERVICE_PORT", "443")
        if not host:
            raise KubeError("not in a cluster: KUBERNETES_SERVICE_HOST is not set")
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise KubeError(f"KUBERNETES_SERVICE_PORT {port!r} is not a port")
        sa_dir = Path(sa_dir)
        for name in ("token", "ca.crt"):
            if not (sa_dir / name).is_file():
                raise KubeError(f"not in a cluster: {sa_dir / name} is missing")
        return cls(host=host, port=int(port), ca_file=sa_dir / "ca.crt",
                   token_file=sa_dir / "token")


@dataclass(frozen=True)
class ResourceType:
    """One API resource: ``ResourceType("v1", "Pod", "pods")``."""

    api_version: str
    kind: str
    plural: str
    namespaced: bool = True

    def path(self, namespace: str | None = None, name: str | None = None) -> str:
        base = "/api/v1" if self.api_version == "v1" else f"/apis/{self.api_version}"
        if self.namespaced and namespace:
            base += f"/namespaces/{quote(namespace, safe='')}"
        base += f"/{self.plural}"
        if name:
            base += f"/{quote(name, safe='')}"
        return base


NAMESPACES = ResourceType("v1", "Namespace", "namespaces", namespaced=False)
PODS = ResourceType("v1", "Pod", "pods")
SERVICES = ResourceType("v1", "Service", "services")
CONFIGMAPS = ResourceType("v1", "ConfigMap", "configmaps")
SERVICEACCOUNTS = ResourceType("v1", "ServiceAccount", "serviceaccounts")
ENDPOINTSLICES = ResourceType("discovery.k8s.io/v1", "EndpointSlice", "endpointslices")
DEPLOYMENTS = ResourceType("apps/v1", "Deployment", "deployments")
HTTPROUTES = ResourceType("gateway.networking.k8s.io/v1", "HTTPRoute", "httproutes")
AUTHORIZATIONPOLICIES = ResourceType(
    "security.nodeproxy.io/v1", "AuthorizationPolicy", "authorizationpolicies"
)
WORKLOADENTRIES = ResourceType(
    "networking.nodeproxy.io/v1alpha1", "WorkloadEntry", "workloadentries"
)
TOKENREVIEWS = ResourceType(
    "authentication.k8s.io/v1", "TokenReview", "tokenreviews", namespaced=False
)


def object_key(obj: dict) -> str:
    """``namespace/name`` (or ``name`` for cluster-scoped objects)."""
    meta = obj.get("metadata") or {}
    ns, name = meta.get("namespace") or "", meta.get("name") or ""
    return f"{ns}/{name}" if ns else str(name)


# -- the client -----------------------------------------------------------------------------


class KubeClient:
    def __init__(self, config: KubeConfig):
        self.config = config
        self._ctx: ssl.SSLContext | None = None
        self._ctx_stamp: tuple[int, int] | None = None

    # connection ----------------------------------------------------------------------------

    def _ssl_context(self) -> ssl.SSLContext:
        """The cluster CA, reloaded when its file changes (CA rotation)."""
        ca = self.config.ca_file
        if ca is None:
            raise KubeError("no cluster CA configured")
        try:
            st = ca.stat()
        except OSError as e:
            raise KubeError(f"cannot read the cluster CA {ca}: {e}") from None
        stamp = (st.st_mtime_ns, st.st_size)
        if self._ctx is None or stamp != self._ctx_stamp:
            try:
                self._ctx = ssl.create_default_context(cafile=str(ca))
            except (OSError, ssl.SSLError) as e:
                raise KubeError(f"cannot load the cluster CA {ca}: {e}") from None
            self._ctx.set_alpn_protocols(["http/1.1"])
            self._ctx_stamp = stamp
        return self._ctx

    def _token(self) -> str | None:
        """Read on every request: kubelet rewrites projected tokens before they expire."""
        path = self.config.token_file
        if path is None:
            return None
        try:
            token = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise KubeError(f"cannot read the token {path}: {e}") from None
        if not token:
            raise KubeError(f"the token file {path} is empty")
        return token

    def _host_header(self) -> str:
        host = self.config.host
        if ":" in host:  # IPv6 literal
            host = f"[{host}]"
        return host if self.config.port == 443 else f"{host}:{self.config.port}"

    async def _connect(self) -> trio.SSLStream:
        ctx = self._ssl_context()
        tcp = await trio.open_tcp_stream(self.config.host, self.config.port)
        tls = trio.SSLStream(
            tcp, ctx, server_hostname=self.config.server_name or self.config.host,
            https_compatible=True,
        )
        try:
            await tls.do_handshake()
        except BaseException:
            await trio.aclose_forcefully(tls)
            raise
        return tls

    def _headers(self, body: bytes | None, content_type: str) -> list[tuple[str, str]]:
        headers = [
            ("host", self._host_header()),
            ("accept", JSON),
            ("user-agent", "nodeproxy-controlplane"),
            ("connection", "close"),
        ]
        token = self._token()
        if token:
            headers.append(("authorization", f"Bearer {token}"))
        if body is not None:
            headers.append(("content-type", content_type))
        return headers

    # requests ------------------------------------------------------------------------------

    async def request(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, Any] | None = None,
        body: Any = None,
        content_type: str = JSON,
        max_body: int = MAX_BODY,
    ) -> Any:
        """One request; the decoded JSON answer of a 2xx, else :class:`ApiError`."""
        target = path + (f"?{urlencode(query)}" if query else "")
        data = None if body is None else json.dumps(body).encode()
        try:
            with trio.fail_after(self.config.request_timeout):
                headers = self._headers(data, content_type)
                tls = await self._connect()
                try:
                    conn = httpio.client_connection()
                    await httpio.send_request(tls, conn, method, target, headers, data)
                    resp = await httpio.read_response(tls, conn, max_body=max_body)
                finally:
                    await trio.aclose_forcefully(tls)
        except trio.TooSlowError:
            raise KubeError(f"{method} {path}: timed out") from None
        except (OSError, ssl.SSLError, trio.BrokenResourceError, httpio.HTTPError,
                h11.ProtocolError) as e:
            raise KubeError(f"{method} {path}: {_describe(e)}") from None
        decoded = _decode(resp.body)
        if not 200 <= resp.status < 300:
            raise ApiError.from_body(resp.status, decoded)
        if decoded is None and resp.body.strip():
            raise KubeError(f"{method} {path}: the answer is not JSON")
        return decoded

    async def get(self, path: str, **query: Any) -> Any:
        return await self.request("GET", path, query=query or None)

    async def create(self, path: str, obj: dict) -> Any:
        return await self.request("POST", path, body=obj)

    async def replace(self, path: str, obj: dict) -> Any:
        """PUT; carries the object's resourceVersion, so a concurrent write gets 409."""
        return await self.request("PUT", path, body=obj)

    async def patch(self, path: str, patch: dict) -> Any:
        return await self.request("PATCH", path, body=patch, content_type=MERGE_PATCH)

    async def delete(self, path: str) -> Any:
        return await self.request(
            "DELETE", path,
            body={"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": "Background"},
        )

    async def list(self, path: str, *, limit: int = 500, **query: Any) -> tuple[list[dict], str]:
        """Every item of a collection, page by page; ``(items, resourceVersion)``.

        A continue token that expired mid-list raises :class:`Gone`: start over.
        """
        items: list[dict] = []
        cont = ""
        while True:
            q = dict(query, limit=limit)
            if cont:
                q["continue"] = cont
            page = await self.request("GET", path, query=q, max_body=MAX_LIST_BODY)
            if not isinstance(page, dict) or not isinstance(page.get("items", []), list):
                raise KubeError(f"GET {path}: the answer is not a list")
            meta = page.get("metadata") or {}
            items.extend(i for i in page.get("items") or [] if isinstance(i, dict))
            cont = meta.get("continue") or ""
            if not cont:
                rv = meta.get("resourceVersion")
                if not isinstance(rv, str) or not rv:
                    raise KubeError(f"GET {path}: the list has no resourceVersion")
                return items, rv

    async def watch(
        self,
        path: str,
        resource_version: str,
        on_event: Callable[[dict], None],
        *,
        timeout_seconds: int = 300,
        idle_timeout: float | None = None,
        on_open: Callable[[], None] | None = None,
    ) -> int:
        """Watch from ``resource_version``, calling ``on_event`` with each event.

        Returns the number of events (bookmarks included) when the server ended the watch
        (its ``timeoutSeconds``); raises :class:`Gone` for 410 (HTTP or an ERROR event),
        :class:`ApiError` for other errors, :class:`WatchDropped` when the stream broke or
        went silent for ``idle_timeout`` (default: ``timeout_seconds`` + 30 s).
        ``on_open`` is called once the server accepted the watch.
        """
        query = {
            "watch": "1",
            "resourceVersion": resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(timeout_seconds),
        }
        target = f"{path}?{urlencode(query)}"
        idle = idle_timeout if idle_timeout is not None else timeout_seconds + 30.0
        count = 0
        try:
            with trio.fail_after(self.config.request_timeout):
                headers = self._headers(None, JSON)
                tls = await self._connect()
        except trio.TooSlowError:
            raise WatchDropped(f"watch {path}: connect timed out") from None
        except (OSError, ssl.SSLError, trio.BrokenResourceError) as e:
            raise WatchDropped(f"watch {path}: {_describe(e)}") from None
        try:
            conn = httpio.client_connection()
            with trio.fail_after(self.config.request_timeout):
                await httpio.send_request(tls, conn, "GET", target, headers)
                head = await httpio.read_response_head(tls, conn)
            if head.status != 200:
                with trio.fail_after(self.config.request_timeout):
                    body = bytearray()
                    async for data in httpio.iter_body(tls, conn):
                        body += data
                        if len(body) > MAX_BODY:
                            break
                raise ApiError.from_body(head.status, _decode(bytes(body)))
            if on_open is not None:
                on_open()
            lines = httpio.LineSplitter()
            with trio.CancelScope() as idle_scope:
                idle_scope.deadline = trio.current_time() + idle
                async for data in httpio.iter_body(tls, conn):
                    idle_scope.deadline = trio.current_time() + idle
                    for line in lines.feed(data):
                        event = _decode(line)
                        if not isinstance(event, dict) or not isinstance(
                            event.get("object"), dict
                        ):
                            raise WatchDropped(f"watch {path}: malformed event {line[:200]!r}")
                        if event.get("type") == "ERROR":
                            status = event["object"]
                            code = status.get("code")
                            raise ApiError.from_body(code if isinstance(code, int) else 500,
                                                     status)
                        count += 1
                        on_event(event)
            if idle_scope.cancelled_caught:
                raise WatchDropped(f"watch {path}: nothing received for {idle:.0f} s")
            return count
        except trio.TooSlowError:
            raise WatchDropped(f"watch {path}: timed out") from None
        except (OSError, ssl.SSLError, trio.BrokenResourceError, httpio.HTTPError,
                h11.ProtocolError) as e:
            raise WatchDropped(f"watch {path}: {_describe(e)} (after {count} events)") from None
        finally:
            await trio.aclose_forcefully(tls)


def _describe(e: BaseException) -> str:
    """trio wraps TLS failures (BrokenResourceError from SSLError): say what broke."""
    text = str(e) or type(e).__name__
    if e.__cause__ is not None:
        text += f": {e.__cause__}"
    return text


def _decode(body: bytes) -> Any:
    if not body.strip():
        return None
    try:
        return json.loads(body)
    except ValueError:
        return None


# -- back-off -------------------------------------------------------------------------------


@dataclass
class Backoff:
    """Doubling delays from ``initial`` to ``maximum``; ``reset()`` after a success."""

    initial: float = 0.5
    maximum: float = 30.0
    factor: float = 2.0
    _next: float = field(default=0.0, init=False)

    def next(self) -> float:
        delay = self._next or self.initial
        self._next = min(self.maximum, delay * self.factor)
        return delay

    def reset(self) -> None:
        self._next = 0.0


# -- the reflector --------------------------------------------------------------------------


@dataclass
class ReflectorStats:
    lists: int = 0
    watches: int = 0
    relists_after_gone: int = 0
    dropped: int = 0
    events: int = 0


class Reflector:
    """The informer-like cache of one resource type, kept current by list + watch.

    ``store`` maps ``namespace/name`` to the object as the API server last sent it (list
    items get their ``kind``/``apiVersion`` filled in: the API server leaves them out).
    ``on_change`` is called after every list and every ADDED/MODIFIED/DELETED event.
    """

    def __init__(
        self,
        client: KubeClient,
        resource: ResourceType,
        on_change: Callable[[], None] = lambda: None,
        *,
        page_size: int = 500,
        watch_timeout: int = 300,
        backoff: Callable[[], Backoff] = Backoff,
        missing_retry: float | None = None,
    ):
        self.client = client
        self.resource = resource
        self.on_change = on_change
        self.page_size = page_size
        self.watch_timeout = watch_timeout
        self._backoff = backoff()
        # a resource the server does not have (a CRD not installed) is served empty and
        # looked for again this often
        self.missing_retry = self._backoff.maximum if missing_retry is None else missing_retry
        self.store: dict[str, dict] = {}
        self.resource_version = ""
        self.synced = False
        self.error: str | None = None
        self.stats = ReflectorStats()

    @property
    def path(self) -> str:
        return self.resource.path()

    def _fill(self, obj: dict) -> dict:
        obj.setdefault("kind", self.resource.kind)
        obj.setdefault("apiVersion", self.resource.api_version)
        return obj

    def replace(self, items: list[dict], resource_version: str) -> None:
        self.store = {object_key(o): self._fill(o) for o in items}
        self.resource_version = resource_version
        self.synced = True
        self.on_change()

    def apply(self, event: dict) -> None:
        """One watch event (not ERROR; the client raises those)."""
        kind = event.get("type")
        obj = event["object"]
        rv = (obj.get("metadata") or {}).get("resourceVersion")
        self.stats.events += 1
        if kind == "BOOKMARK":
            if isinstance(rv, str) and rv:
                self.resource_version = rv
            return
        if kind not in ("ADDED", "MODIFIED", "DELETED"):
            log.warning("watch %s: ignoring an event of type %r", self.path, kind)
            return
        key = object_key(obj)
        if kind == "DELETED":
            self.store.pop(key, None)
        else:
            self.store[key] = self._fill(obj)
        if isinstance(rv, str) and rv:
            self.resource_version = rv
        self.on_change()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """List and watch forever; ``started`` after the first successful list."""
        started = False
        need_list = True
        while True:
            try:
                if need_list:
                    try:
                        items, rv = await self.client.list(self.path, limit=self.page_size)
                    except ApiError as e:
                        if e.status != 404:
                            raise
                        self._missing(e)
                        if not started:
                            started = True
                            task_status.started()
                        await trio.sleep(self.missing_retry)
                        continue
                    self.stats.lists += 1
                    self.replace(items, rv)
                    need_list = False
                    if self.error:
                        log.info("list %s: recovered", self.path)
                    self.error = None
                    log.debug("listed %d %s at %s", len(items), self.path, rv)
                    if not started:
                        started = True
                        task_status.started()
                begun = trio.current_time()
                self.stats.watches += 1
                count = await self.client.watch(
                    self.path, self.resource_version, self.apply,
                    timeout_seconds=self.watch_timeout, on_open=self._opened,
                )
                if count or trio.current_time() - begun > 1.0:
                    self._backoff.reset()
                else:  # a server that ends watches at once must not make us spin
                    await trio.sleep(self._backoff.next())
            except Gone as e:
                self.stats.relists_after_gone += 1
                log.info("watch %s: %s: relisting", self.path, e)
                need_list = True
            except KubeError as e:
                if isinstance(e, WatchDropped):
                    self.stats.dropped += 1
                delay = self._backoff.next()
                self.error = str(e)
                log.warning("%s (%s from resourceVersion %s): retrying in %.1f s", e,
                            "relist" if need_list else "re-watch",
                            self.resource_version or "-", delay)
                await trio.sleep(delay)

    def _opened(self) -> None:
        if self.error:
            log.info("watch %s: connected again", self.path)
        self.error = None

    def _missing(self, e: ApiError) -> None:
        if self.store or not self.synced:
            log.warning("%s is not served by the API server (%s): treated as empty",
                        self.path, e)
        self.error = f"not served by the API server: {e}"
        self.store = {}
        self.resource_version = ""
        self.synced = True
        self.on_change()
