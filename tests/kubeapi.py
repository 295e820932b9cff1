"""A fake Kubernetes API server for tests: the real list/watch protocol over HTTP/1.1 + TLS.

    kube = FakeKube()
    port = await nursery.start(kube.serve)          # 127.0.0.1, TLS, cert for the IP
    config = kube.client_config(tmp_path)           # writes ca.crt and token
    kube.create("namespaces", {"metadata": {"name": "shop"}})

What it does as the API server does (so a client that works here works there):

- one global resourceVersion counter; every write bumps it and stamps the object;
- LIST: ``limit``/``continue`` paging served from a snapshot taken at the first page; items
  carry no ``kind``/``apiVersion`` (the list does); an expired continue token → 410;
- WATCH (``?watch=1``): events since ``resourceVersion`` replayed from history, then live;
  ``ADDED``/``MODIFIED``/``DELETED``, ``BOOKMARK`` on :meth:`bookmark` (when the watcher
  asked for them); ``timeoutSeconds`` ends the stream cleanly; an RV older than the history
  (after :meth:`compact`) → 410, as an HTTP status or as an ERROR event (``gone_as``);
  :meth:`drop_watches` breaks every stream mid-body;
- bearer token checked on every request (``tokens``), 401 otherwise;
- create (POST, 409 AlreadyExists), replace (PUT, 409 Conflict on a stale resourceVersion),
  merge PATCH, DELETE (404), named GET; writes into a missing namespace → 404;
- TokenReview (POST /apis/authentication.k8s.io/v1/tokenreviews) from :meth:`add_sa_token`.
"""

from __future__ import annotations

import base64
import copy
import datetime
import ipaddress
import json
import os
import ssl
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import h11
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from nodeproxy import httpio

# plural → (apiVersion, kind, namespaced)
RESOURCES: dict[str, tuple[str, str, bool]] = {
    "namespaces": ("v1", "Namespace", False),
    "pods": ("v1", "Pod", True),
    "services": ("v1", "Service", True),
    "configmaps": ("v1", "ConfigMap", True),
    "serviceaccounts": ("v1", "ServiceAccount", True),
    "endpointslices": ("discovery.k8s.io/v1", "EndpointSlice", True),
    "deployments": ("apps/v1", "Deployment", True),
    "httproutes": ("gateway.networking.k8s.io/v1", "HTTPRoute", True),
    "authorizationpolicies": ("security.nodeproxy.io/v1", "AuthorizationPolicy", True),
    "workloadentries": ("networking.nodeproxy.io/v1alpha1", "WorkloadEntry", True),
}
KIND_TO_PLURAL = {kind: plural for plural, (_, kind, _) in RESOURCES.items()}


def status(code: int, reason: str, message: str) -> dict:
    return {
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code,
    }


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v)
    return out


def make_tls(hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> tuple[bytes, bytes, bytes]:
    """``(ca_pem, server_chain_pem, server_key_pem)``: a cluster CA and an API server cert."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fake-kubernetes-ca")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                       critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
        .issuer_name(ca_name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return ca.public_bytes(pem), cert.public_bytes(pem), key_pem


@dataclass(eq=False)
class _Watch:
    plural: str
    namespace: str | None
    bookmarks: bool
    send: trio.MemorySendChannel
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)


@dataclass
class Review:
    namespace: str
    service_account: str
    pod: str | None = None
    pod_uid: str | None = None
    node: str | None = None
    audiences: tuple[str, ...] = ("nodeproxy",)


class FakeKube:
    def __init__(self) -> None:
        self.rv = 1000
        self.objects: dict[str, dict[tuple[str, str], dict]] = {p: {} for p in RESOURCES}
        self.history: list[tuple[int, str, str, dict]] = []  # (rv, plural, type, object)
        self.oldest = 0  # watches from an RV below this get 410
        self.gone_as = "event"  # or "http"
        self.conflicts = 0  # the next N PUTs get 409, as if someone wrote in between
        self.tokens: set[str] = {"token-1"}
        self.reviews: dict[str, Review] = {}
        self.requests: list[tuple[str, str, str]] = []  # (method, target, bearer token)
        self.ca_pem, self._chain, self._key = make_tls()
        self._watches: set[_Watch] = set()
        self._snapshots: dict[str, list[dict]] = {}
        self._scope: trio.CancelScope | None = None
        self.port = 0
        self.serving = False

    # -- test-side API ----------------------------------------------------------------------

    def client_config(self, directory: Path, token: str = "token-1") -> Any:
        from controlplane.kube.client import KubeConfig

        (directory / "ca.crt").write_bytes(self.ca_pem)
        (directory / "token").write_text(token + "\n")
        return KubeConfig(host="127.0.0.1", port=self.port, ca_file=directory / "ca.crt",
                          token_file=directory / "token", request_timeout=10.0)

    def get(self, plural: str, name: str, namespace: str = "") -> dict | None:
        obj = self.objects[plural].get((namespace, name))
        return copy.deepcopy(obj) if obj else None

    def names(self, plural: str, namespace: str | None = None) -> set[str]:
        return {n for (ns, n) in self.objects[plural] if namespace is None or ns == namespace}

    def create(self, plural: str, obj: dict) -> dict:
        obj = copy.deepcopy(obj)
        api_version, kind, namespaced = RESOURCES[plural]
        obj["apiVersion"], obj["kind"] = api_version, kind
        meta = obj.setdefault("metadata", {})
        if namespaced:
            meta.setdefault("namespace", "default")
        else:
            meta.pop("namespace", None)
        key = (meta.get("namespace", ""), meta["name"])
        if key in self.objects[plural]:
            raise KeyError(f"{plural} {key} exists")
        meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("creationTimestamp", _now())
        if plural == "namespaces":
            obj.setdefault("spec", {"finalizers": ["kubernetes"]})
            obj.setdefault("status", {"phase": "Active"})
            meta.setdefault("labels", {})["kubernetes.io/metadata.name"] = meta["name"]
        return self._write(plural, key, obj, "ADDED")

    def update(self, plural: str, obj: dict) -> dict:
        obj = copy.deepcopy(obj)
        api_version, kind, _ = RESOURCES[plural]
        obj["apiVersion"], obj["kind"] = api_version, kind
        meta = obj["metadata"]
        key = (meta.get("namespace", "") if RESOURCES[plural][2] else "", meta["name"])
        old = self.objects[plural][key]
        for k in ("uid", "creationTimestamp", "namespace"):
            if k in old["metadata"]:
                meta[k] = old["metadata"][k]
        return self._write(plural, key, obj, "MODIFIED")

    def apply(self, plural: str, obj: dict) -> dict:
        """Create or update (test convenience, no conflict checks)."""
        meta = obj["metadata"]
        ns = (meta.get("namespace") or "default") if RESOURCES[plural][2] else ""
        if (ns, meta["name"]) in self.objects[plural]:
            return self.update(plural, obj)
        return self.create(plural, obj)

    def patch(self, plural: str, name: str, patch: dict, namespace: str = "") -> dict:
        old = self.objects[plural][(namespace, name)]
        new = merge_patch(old, patch)
        return self._write(plural, (namespace, name), new, "MODIFIED")

    def delete(self, plural: str, name: str, namespace: str = "") -> dict:
        obj = self.objects[plural].pop((namespace, name))
        self.rv += 1
        obj = copy.deepcopy(obj)
        obj["metadata"]["resourceVersion"] = str(self.rv)
        self._emit(plural, "DELETED", obj)
        return obj

    def bump(self, n: int = 1) -> None:
        """Writes elsewhere (resources nobody watches) move the global RV on."""
        self.rv += n

    def bookmark(self) -> None:
        """A BOOKMARK at the current RV to every watcher that asked for bookmarks."""
        for w in list(self._watches):
            if w.bookmarks:
                api_version, kind, _ = RESOURCES[w.plural]
                self._send(w, {"type": "BOOKMARK", "object": {
                    "kind": kind, "apiVersion": api_version,
                    "metadata": {"resourceVersion": str(self.rv),
                                 "annotations": {"k8s.io/initial-events-end": "true"}},
                }})

    def compact(self) -> None:
        """Forget history: watches (and continue tokens) from older RVs now get 410."""
        self.history.clear()
        self._snapshots.clear()
        self.oldest = self.rv

    def drop_watches(self) -> None:
        """Break every open watch stream mid-body (no terminating chunk)."""
        for w in list(self._watches):
            w.scope.cancel()

    @property
    def watch_count(self) -> int:
        return len(self._watches)

    def watch_requests(self, plural: str) -> list[dict[str, str]]:
        """The query of every watch request of a collection, in order."""
        return [q for m, t, _ in self.requests if (q := _watch_query(t, plural)) is not None]

    def list_requests(self, plural: str) -> int:
        return sum(1 for m, t, _ in self.requests
                   if m == "GET" and _watch_query(t, plural) is None
                   and urlsplit(t).path.endswith(f"/{plural}"))

    def add_sa_token(self, token: str, namespace: str, service_account: str, *,
                     pod: str | None = None, pod_uid: str | None = None,
                     node: str | None = None, audiences: tuple[str, ...] = ("nodeproxy",)
                     ) -> None:
        self.reviews[token] = Review(namespace, service_account, pod, pod_uid, node, audiences)

    def stop(self) -> None:
        """Stop serving: the listener and every connection close (the server 'crashed')."""
        if self._scope is not None:
            self._scope.cancel()

    async def serve(self, port: int = 0, *,
                    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        chain = self._chain + self._key
        fd, path = tempfile.mkstemp()
        try:
            os.write(fd, chain)
            os.close(fd)
            ctx.load_cert_chain(path)
        finally:
            os.unlink(path)
        ctx.set_alpn_protocols(["http/1.1"])
        with trio.CancelScope() as scope:
            self._scope = scope
            listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
            self.port = listeners[0].socket.getsockname()[1]
            try:
                async with trio.open_nursery() as nursery:
                    await nursery.start(trio.serve_listeners,
                                        lambda s: self._handle(s, ctx), listeners)
                    self.serving = True
                    task_status.started(self.port)
            finally:
                self.serving = False
                self._watches.clear()

    # -- internals --------------------------------------------------------------------------

    def _write(self, plural: str, key: tuple[str, str], obj: dict, kind: str) -> dict:
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        self.objects[plural][key] = obj
        self._emit(plural, kind, obj)
        return copy.deepcopy(obj)

    def _emit(self, plural: str, kind: str, obj: dict) -> None:
        self.history.append((self.rv, plural, kind, copy.deepcopy(obj)))
        for w in list(self._watches):
            if w.plural == plural and _in_ns(obj, w.namespace):
                self._send(w, {"type": kind, "object": copy.deepcopy(obj)})

    def _send(self, w: _Watch, event: dict) -> None:
        try:
            w.send.send_nowait(event)
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            w.scope.cancel()  # a watcher that does not keep up is cut off, as the server does

    async def _handle(self, tcp: trio.SocketStream, ctx: ssl.SSLContext) -> None:
        tls = trio.SSLStream(tcp, ctx, server_side=True, https_compatible=True)
        try:
            await tls.do_handshake()
            conn = httpio.server_connection()
            while True:
                req = await httpio.read_request(tls, conn, max_body=16 * 1024 * 1024)
                if req is None:
                    return
                await self._dispatch(tls, conn, req)
                if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, httpio.HTTPError,
                h11.ProtocolError, ssl.SSLError, OSError):
            pass
        finally:
            await trio.aclose_forcefully(tls)

    async def _reply(self, tls: trio.abc.Stream, conn: h11.Connection, code: int,
                     obj: Any) -> None:
        body = json.dumps(obj).encode()
        await httpio.send_response(tls, conn, code, body, [("content-type", "application/json")])

    async def _dispatch(self, tls: trio.abc.Stream, conn: h11.Connection,
                        req: httpio.Request) -> None:
        auth = req.headers.get("authorization", "")
        token = auth[7:] if auth.startswith("Bearer ") else ""
        self.requests.append((req.method, req.target, token))
        if token not in self.tokens:
            await self._reply(tls, conn, 401, status(401, "Unauthorized", "Unauthorized"))
            return
        url = urlsplit(req.target)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        body: Any = None
        if req.body:
            try:
                body = json.loads(req.body)
            except ValueError:
                await self._reply(tls, conn, 400, status(400, "BadRequest", "invalid JSON"))
                return
        if url.path == "/apis/authentication.k8s.io/v1/tokenreviews" and req.method == "POST":
            await self._reply(tls, conn, 201, self._review(body))
            return
        route = _route(url.path)
        if route is None:
            await self._reply(tls, conn, 404, status(404, "NotFound",
                                                     "the server could not find the resource"))
            return
        plural, namespace, name = route
        if name is None:
            if req.method == "GET" and query.get("watch") in ("1", "true"):
                await self._watch(tls, conn, plural, namespace, query)
            elif req.method == "GET":
                code, obj = self._list(plural, namespace, query)
                await self._reply(tls, conn, code, obj)
            elif req.method == "POST":
                code, obj = self._create(plural, namespace, body)
                await self._reply(tls, conn, code, obj)
            else:
                await self._reply(tls, conn, 405, status(405, "MethodNotAllowed", req.method))
            return
        key = (namespace or "", name)
        current = self.objects[plural].get(key)
        gr = plural if "/" not in RESOURCES[plural][0] else \
            f"{plural}.{RESOURCES[plural][0].split('/')[0]}"
        not_found = status(404, "NotFound", f'{gr} "{name}" not found')
        if req.method == "GET":
            if current is None:
                await self._reply(tls, conn, 404, not_found)
            else:
                await self._reply(tls, conn, 200, current)
        elif req.method == "PUT":
            if current is None:
                await self._reply(tls, conn, 404, not_found)
                return
            rv = ((body or {}).get("metadata") or {}).get("resourceVersion")
            if self.conflicts > 0:
                self.conflicts -= 1
                self.patch(plural, name, {"metadata": {"annotations": {"touched": "yes"}}},
                           namespace or "")
                rv = "stale"
            if rv and rv != current["metadata"]["resourceVersion"]:
                await self._reply(tls, conn, 409, status(
                    409, "Conflict",
                    f'Operation cannot be fulfilled on {gr} "{name}": the object has been '
                    "modified; please apply your changes to the latest version and try again"))
                return
            body.setdefault("metadata", {})["name"] = name
            if namespace:
                body["metadata"]["namespace"] = namespace
            await self._reply(tls, conn, 200, self.update(plural, body))
        elif req.method == "PATCH":
            if current is None:
                await self._reply(tls, conn, 404, not_found)
            elif req.headers.get("content-type") != "application/merge-patch+json":
                await self._reply(tls, conn, 415, status(415, "UnsupportedMediaType", "?"))
            else:
                await self._reply(tls, conn, 200, self.patch(plural, name, body, namespace or ""))
        elif req.method == "DELETE":
            if current is None:
                await self._reply(tls, conn, 404, not_found)
            else:
                await self._reply(tls, conn, 200, self.delete(plural, name, namespace or ""))
        else:
            await self._reply(tls, conn, 405, status(405, "MethodNotAllowed", req.method))

    def _create(self, plural: str, namespace: str | None, body: Any) -> tuple[int, dict]:
        if not isinstance(body, dict) or not (body.get("metadata") or {}).get("name"):
            return 422, status(422, "Invalid", "metadata.name: Required value")
        if RESOURCES[plural][2]:
            ns = namespace or body["metadata"].get("namespace") or "default"
            if ("", ns) not in self.objects["namespaces"]:
                return 404, status(404, "NotFound", f'namespaces "{ns}" not found')
            body["metadata"]["namespace"] = ns
        try:
            return 201, self.create(plural, body)
        except KeyError:
            return 409, status(409, "AlreadyExists",
                               f'{plural} "{body["metadata"]["name"]}" already exists')

    def _list(self, plural: str, namespace: str | None, query: dict[str, str]
              ) -> tuple[int, dict]:
        api_version, kind, _ = RESOURCES[plural]
        cont = query.get("continue")
        if cont:
            try:
                token = json.loads(base64.urlsafe_b64decode(cont))
                snap_id, offset, rv = token["snap"], int(token["offset"]), token["rv"]
            except (ValueError, KeyError, TypeError):
                return 400, status(400, "BadRequest", "invalid continue token")
            if snap_id not in self._snapshots:
                return 410, status(410, "Expired",
                                   "The provided continue parameter is too old to display a "
                                   "consistent list result. You can start a new list without "
                                   "the continue parameter.")
            items = self._snapshots[snap_id]
        else:
            items = [copy.deepcopy(o) for k, o in sorted(self.objects[plural].items())
                     if _in_ns(o, namespace)]
            for o in items:  # list items carry no kind/apiVersion; the list does
                o.pop("kind", None)
                o.pop("apiVersion", None)
            offset, rv = 0, str(self.rv)
            snap_id = str(uuid.uuid4())
            self._snapshots[snap_id] = items
        selector = query.get("labelSelector")
        if selector:
            want = dict(part.split("=", 1) for part in selector.split(","))
            items = [o for o in items
                     if all((o["metadata"].get("labels") or {}).get(k) == v
                            for k, v in want.items())]
        limit = int(query.get("limit") or 0)
        page = items[offset:offset + limit] if limit else items[offset:]
        meta: dict[str, Any] = {"resourceVersion": rv}
        if limit and offset + limit < len(items):
            meta["continue"] = base64.urlsafe_b64encode(json.dumps(
                {"snap": snap_id, "offset": offset + limit, "rv": rv}).encode()).decode()
            meta["remainingItemCount"] = len(items) - offset - limit
        return 200, {"kind": f"{kind}List", "apiVersion": api_version, "metadata": meta,
                     "items": page}

    async def _watch(self, tls: trio.abc.Stream, conn: h11.Connection, plural: str,
                     namespace: str | None, query: dict[str, str]) -> None:
        rv_text = query.get("resourceVersion", "")
        rv = int(rv_text) if rv_text.isdigit() else self.rv
        gone = status(410, "Expired", f"too old resource version: {rv} ({self.oldest})")
        if rv < self.oldest:
            if self.gone_as == "http":
                await self._reply(tls, conn, 410, gone)
                return
            await httpio.start_stream(tls, conn, 200, [("content-type", "application/json")])
            await httpio.send_chunk(
                tls, conn, json.dumps({"type": "ERROR", "object": gone}).encode() + b"\n")
            await tls.send_all(conn.send(h11.EndOfMessage()))
            return
        send, receive = trio.open_memory_channel(10000)
        w = _Watch(plural, namespace, query.get("allowWatchBookmarks") == "true", send)
        # replay and subscribe with no checkpoint in between: nothing is missed or doubled
        for ev_rv, ev_plural, ev_type, obj in self.history:
            if ev_rv > rv and ev_plural == plural and _in_ns(obj, namespace):
                send.send_nowait({"type": ev_type, "object": copy.deepcopy(obj)})
        self._watches.add(w)
        timeout = int(query.get("timeoutSeconds") or 1800)
        try:
            await httpio.start_stream(tls, conn, 200, [("content-type", "application/json")])
            with w.scope:
                with trio.move_on_after(timeout):
                    async for event in receive:
                        await httpio.send_chunk(tls, conn, json.dumps(event).encode() + b"\n")
                await tls.send_all(conn.send(h11.EndOfMessage()))
                return
            # dropped: close the connection with the chunked body unfinished
            await trio.aclose_forcefully(tls)
            raise trio.ClosedResourceError("watch dropped")
        finally:
            self._watches.discard(w)

    def _review(self, body: Any) -> dict:
        spec = (body or {}).get("spec") or {}
        token = spec.get("token", "")
        audiences = spec.get("audiences") or []
        out = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
               "metadata": {"creationTimestamp": None}, "spec": spec}
        r = self.reviews.get(token)
        if r is None:
            out["status"] = {"user": {}, "error": "[invalid bearer token, token lookup failed]"}
            return out
        if audiences and not set(audiences) & set(r.audiences):
            out["status"] = {"user": {},
                             "error": "[invalid bearer token, token audiences is invalid]"}
            return out
        extra: dict[str, list[str]] = {}
        if r.pod:
            extra["authentication.kubernetes.io/pod-name"] = [r.pod]
            extra["authentication.kubernetes.io/pod-uid"] = [r.pod_uid or ""]
        if r.node:
            extra["authentication.kubernetes.io/node-name"] = [r.node]
        extra["authentication.kubernetes.io/credential-id"] = ["JTI=" + str(uuid.uuid4())]
        out["status"] = {
            "authenticated": True,
            "user": {
                "username": f"system:serviceaccount:{r.namespace}:{r.service_account}",
                "uid": str(uuid.uuid5(uuid.NAMESPACE_DNS, r.service_account)),
                "groups": ["system:serviceaccounts", f"system:serviceaccounts:{r.namespace}",
                           "system:authenticated"],
                "extra": extra,
            },
            "audiences": list(audiences or r.audiences),
        }
        return out


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _in_ns(obj: dict, namespace: str | None) -> bool:
    return namespace is None or (obj.get("metadata") or {}).get("namespace") == namespace


def _route(path: str) -> tuple[str, str | None, str | None] | None:
    """``(plural, namespace, name)`` of an API path, or None."""
    parts = [p for p in path.split("/") if p]
    if parts[:2] == ["api", "v1"]:
        rest, group_version = parts[2:], "v1"
    elif len(parts) >= 3 and parts[0] == "apis":
        rest, group_version = parts[3:], f"{parts[1]}/{parts[2]}"
    else:
        return None
    namespace = None
    if len(rest) >= 3 and rest[0] == "namespaces":
        namespace, rest = rest[1], rest[2:]
    if not rest or rest[0] not in RESOURCES or len(rest) > 2:
        return None
    if RESOURCES[rest[0]][0] != group_version:
        return None
    return rest[0], namespace, rest[1] if len(rest) == 2 else None


def _watch_query(target: str, plural: str) -> dict[str, str] | None:
    url = urlsplit(target)
    query = {k: v[-1] for k, v in parse_qs(url.query).items()}
    if query.get("watch") not in ("1", "true") or not url.path.endswith(f"/{plural}"):
        return None
    return query


# -- real object shapes (as `kubectl get -o json` prints them, trimmed) -----------------------


def namespace(name: str, labels: dict[str, str] | None = None) -> dict:
    return {"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": dict(labels or {})}}


def pod(name: str, ns: str, *, ip: str | None, node: str = "node-a", sa: str = "default",
        labels: dict[str, str] | None = None, phase: str = "Running",
        ports: tuple[tuple[str, int], ...] = (), uid: str | None = None) -> dict:
    """A Pod as the API server returns it, status included."""
    obj: dict[str, Any] = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": name, "namespace": ns, "uid": uid or str(uuid.uuid4()),
            "labels": dict(labels or {"app": name}),
            "generateName": f"{name}-",
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                 "name": f"{name}-rs", "uid": str(uuid.uuid4()),
                                 "controller": True, "blockOwnerDeletion": True}],
        },
        "spec": {
            "containers": [{
                "name": "app", "image": "registry.k8s.io/e2e-test-images/agnhost:2.45",
                "ports": [{"name": n, "containerPort": p, "protocol": "TCP"} for n, p in ports],
                "resources": {}, "terminationMessagePath": "/dev/termination-log",
                "terminationMessagePolicy": "File", "imagePullPolicy": "IfNotPresent",
            }],
            "restartPolicy": "Always", "terminationGracePeriodSeconds": 30,
            "dnsPolicy": "ClusterFirst", "serviceAccountName": sa, "serviceAccount": sa,
            "nodeName": node, "securityContext": {}, "schedulerName": "default-scheduler",
            "tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists",
                             "effect": "NoExecute", "tolerationSeconds": 300}],
            "priority": 0, "enableServiceLinks": True, "preemptionPolicy": "PreemptLowerPriority",
        },
        "status": {
            "phase": phase,
            "conditions": [{"type": "Ready", "status": "True" if phase == "Running" else "False",
                            "lastProbeTime": None, "lastTransitionTime": _now()}],
            "hostIP": "172.18.0.2", "hostIPs": [{"ip": "172.18.0.2"}],
            "startTime": _now(), "qosClass": "BestEffort",
        },
    }
    if ip:
        obj["status"]["podIP"] = ip
        obj["status"]["podIPs"] = [{"ip": ip}]
    return obj


def service(name: str, ns: str, *, selector: dict[str, str] | None,
            ports: tuple[tuple[str, int, int | str], ...] = (("http", 80, 8080),),
            cluster_ip: str | None = None) -> dict:
    spec: dict[str, Any] = {
        "ports": [{"name": n, "protocol": "TCP", "port": p, "targetPort": t}
                  for n, p, t in ports],
        "type": "ClusterIP", "sessionAffinity": "None", "ipFamilies": ["IPv4"],
        "ipFamilyPolicy": "SingleStack", "internalTrafficPolicy": "Cluster",
    }
    if selector is not None:
        spec["selector"] = selector
    if cluster_ip:
        spec["clusterIP"] = cluster_ip
        spec["clusterIPs"] = [cluster_ip]
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": ns, "uid": str(uuid.uuid4())},
            "spec": spec, "status": {"loadBalancer": {}}}


def endpointslice(service_name: str, ns: str, endpoints: list[tuple[dict, bool]],
                  *, port: tuple[str, int] = ("http", 8080), suffix: str = "abcde") -> dict:
    """An EndpointSlice as the endpointslice controller writes it, for (pod, ready) pairs."""
    return {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {
            "name": f"{service_name}-{suffix}", "namespace": ns,
            "generateName": f"{service_name}-",
            "labels": {"kubernetes.io/service-name": service_name,
                       "endpointslice.kubernetes.io/managed-by":
                           "endpointslice-controller.k8s.io"},
            "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": service_name,
                                 "uid": str(uuid.uuid4()), "controller": True,
                                 "blockOwnerDeletion": True}],
        },
        "addressType": "IPv4",
        "endpoints": [
            {
                "addresses": [p["status"]["podIP"]],
                "conditions": {"ready": ready, "serving": ready, "terminating": False},
                "nodeName": p["spec"]["nodeName"],
                "targetRef": {"kind": "Pod", "namespace": ns, "name": p["metadata"]["name"],
                              "uid": p["metadata"]["uid"]},
            }
            for p, ready in endpoints
        ],
        "ports": [{"name": port[0], "port": port[1], "protocol": "TCP"}],
    }


# -- test helpers ---------------------------------------------------------------------------


def fast_backoff() -> Any:
    """Back-off for tests: the same doubling, in milliseconds."""
    from controlplane.kube.client import Backoff

    return Backoff(initial=0.01, maximum=0.1)


async def eventually(predicate: Any, timeout: float = 10.0) -> None:
    """Wait until ``predicate()`` holds; the deadline only guards against hangs."""
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


def load_objects(kube: FakeKube, docs: list[dict]) -> None:
    """Create each (Kubernetes-shaped) document in the fake, namespaces first."""
    for doc in sorted(docs, key=lambda d: d.get("kind") != "Namespace"):
        kube.apply(KIND_TO_PLURAL[doc["kind"]], doc)
