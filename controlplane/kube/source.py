"""The Kubernetes API → mesh state, beside the YAML-directory source and with its shape.

One :class:`~controlplane.kube.client.Reflector` per kind keeps an informer-like cache
(Namespaces, Pods, Services, EndpointSlices, HTTPRoutes, AuthorizationPolicies). The cached
objects are already Kubernetes-shaped, so each one goes through the same parser as a YAML
document (:mod:`controlplane.resources`) and the lot through the same
:func:`~controlplane.translate.translate`. An object that fails to parse is reported in
:attr:`KubeSource.errors` and its last good version is kept, as the directory source keeps a
file's. A new state is published only when its content changed.

Kubernetes-only refinements:

- Services' endpoints come from their EndpointSlices when there are any (label
  ``kubernetes.io/service-name``): the ready endpoints' ``targetRef`` pods, or, without a
  targetRef, the workload holding the address. A Service with no slice (yet) keeps the
  endpoints its selector gives (as in the YAML source).
- ``hostNetwork`` pods are left out: their address is the node's, and a workload on it would
  claim every connection the node itself makes. ``ExternalName`` Services are left out: they
  have no cluster IP and the mesh would allocate one.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from controlplane import resources as res
from controlplane.kube import client as kc
from controlplane.source_dir import initial_version
from controlplane.translate import is_news, translate
from nodeproxy import model

log = logging.getLogger(__name__)

KINDS: tuple[kc.ResourceType, ...] = (
    kc.NAMESPACES,
    kc.PODS,
    kc.SERVICES,
    kc.ENDPOINTSLICES,
    kc.HTTPROUTES,
    kc.AUTHORIZATIONPOLICIES,
    kc.WORKLOADENTRIES,
)
SERVICE_NAME_LABEL = "kubernetes.io/service-name"


def parse_object(obj: dict, source: str) -> list[res.Resource]:
    """One Kubernetes object → resources, with the YAML documents' parser and its contract."""
    return res.parse_object(obj, source)


@dataclass(frozen=True)
class SliceEndpoint:
    addresses: tuple[str, ...]
    ready: bool
    pod: tuple[str, str, str] | None  # (namespace, name, uid) of a Pod targetRef


@dataclass(frozen=True)
class Slice:
    """The part of an EndpointSlice the mesh uses."""

    namespace: str
    service: str
    endpoints: tuple[SliceEndpoint, ...]


def parse_endpointslice(obj: dict, source: str) -> Slice | None:
    """An EndpointSlice; None when it belongs to no Service. ResourceError when malformed."""

    def err(path: str, reason: str) -> res.ResourceError:
        return res.ResourceError(source, None, path, reason)

    meta = obj.get("metadata")
    if not isinstance(meta, dict):
        raise err("metadata", "must be a mapping")
    labels = meta.get("labels") or {}
    if not isinstance(labels, dict):
        raise err("metadata.labels", "must be a mapping")
    service = labels.get(SERVICE_NAME_LABEL)
    if not service:
        return None
    if not isinstance(service, str):
        raise err(f"metadata.labels.{SERVICE_NAME_LABEL}", "must be a string")
    namespace = meta.get("namespace") or "default"
    raw = obj.get("endpoints") or []
    if not isinstance(raw, list):
        raise err("endpoints", "must be a list")
    endpoints = []
    for i, ep in enumerate(raw):
        path = f"endpoints[{i}]"
        if not isinstance(ep, dict):
            raise err(path, "must be a mapping")
        addresses = ep.get("addresses") or []
        if not isinstance(addresses, list) or not all(isinstance(a, str) for a in addresses):
            raise err(f"{path}.addresses", "must be a list of strings")
        conditions = ep.get("conditions") or {}
        if not isinstance(conditions, dict):
            raise err(f"{path}.conditions", "must be a mapping")
        # "ready: nil" means unknown, which consumers treat as ready (the API's own rule)
        ready = conditions.get("ready") is not False
        ref = ep.get("targetRef")
        pod = None
        if ref is not None:
            if not isinstance(ref, dict):
                raise err(f"{path}.targetRef", "must be a mapping")
            if ref.get("kind") == "Pod":
                name = ref.get("name")
                if not isinstance(name, str) or not name:
                    raise err(f"{path}.targetRef.name", "is required")
                pod = (str(ref.get("namespace") or namespace), name, str(ref.get("uid") or ""))
        endpoints.append(SliceEndpoint(tuple(addresses), ready, pod))
    return Slice(namespace, service, tuple(endpoints))


@dataclass
class _Parsed:
    resource_version: str
    good: list[Any] | None  # resources, or [Slice]; None until the object first parses


class KubeSource:
    """Watch the Kubernetes API and publish mesh states (the DirectorySource's shape)."""

    def __init__(
        self,
        client: kc.KubeClient,
        publish: Callable[[model.MeshState], None],
        *,
        trust_domain: str = model.TRUST_DOMAIN,
        version: int | None = None,
        kinds: tuple[kc.ResourceType, ...] = KINDS,
        page_size: int = 500,
        watch_timeout: int = 300,
        backoff: Callable[[], kc.Backoff] = kc.Backoff,
    ):
        self.client = client
        self.publish = publish
        self.trust_domain = trust_domain
        self.version = initial_version() if version is None else version
        self.state: model.MeshState | None = None
        self.reflectors = {
            rt.kind: kc.Reflector(client, rt, self._changed, page_size=page_size,
                                  watch_timeout=watch_timeout, backoff=backoff)
            for rt in kinds
        }
        self._parse_errors: dict[str, str] = {}
        self._memo: dict[tuple[str, str], _Parsed] = {}
        self._dirty = trio.Event()

    @property
    def errors(self) -> dict[str, str]:
        """Object (``Kind/namespace/name``) or API path → reason, for the admin endpoint."""
        out = dict(self._parse_errors)
        for r in self.reflectors.values():
            if r.error:
                out[r.path] = r.error
        return out

    def _changed(self) -> None:
        self._dirty.set()

    # -- cache → resources ------------------------------------------------------------------

    def _parsed(self, kind: str, key: str, obj: dict) -> list[Any]:
        """The object's resources, parsed once per resourceVersion; the last good ones when
        this version does not parse."""
        rv = str((obj.get("metadata") or {}).get("resourceVersion") or "")
        memo = self._memo.get((kind, key))
        if memo is not None and rv and memo.resource_version == rv:
            return memo.good or []
        ident = f"{kind}/{key}"
        try:
            good = self._convert(kind, obj, ident)
        except res.ResourceError as e:
            kept = memo.good if memo else None
            if self._parse_errors.get(ident) != str(e):
                log.error("%s (keeping the last good version: %s)", e,
                          "yes" if kept else "none")
            self._parse_errors[ident] = str(e)
            self._memo[(kind, key)] = _Parsed(rv, kept)
            return kept or []
        if ident in self._parse_errors:
            log.info("%s is valid again", ident)
            del self._parse_errors[ident]
        self._memo[(kind, key)] = _Parsed(rv, good)
        return good

    def _convert(self, kind: str, obj: dict, ident: str) -> list[Any]:
        spec = obj.get("spec")
        if kind == "EndpointSlice":
            s = parse_endpointslice(obj, ident)
            return [s] if s else []
        if kind == "Pod" and isinstance(spec, dict) and spec.get("hostNetwork") is True:
            return []
        if kind == "Service" and isinstance(spec, dict) and spec.get("type") == "ExternalName":
            return []
        return parse_object(obj, ident)

    def _collect(self) -> tuple[list[res.Resource], list[Slice]]:
        resources: list[res.Resource] = []
        slices: list[Slice] = []
        live: set[tuple[str, str]] = set()
        for kind, reflector in self.reflectors.items():
            for key in sorted(reflector.store):
                live.add((kind, key))
                for item in self._parsed(kind, key, reflector.store[key]):
                    (slices if isinstance(item, Slice) else resources).append(item)
        for gone in [k for k in self._memo if k not in live]:  # deleted objects
            del self._memo[gone]
            self._parse_errors.pop(f"{gone[0]}/{gone[1]}", None)
        return resources, slices

    @property
    def resources(self) -> list[res.Resource]:
        return self._collect()[0]

    def build(self) -> model.MeshState:
        """The mesh state of the current caches (the next version; nothing published)."""
        resources, slices = self._collect()
        state = translate(resources, version=self.version + 1, trust_domain=self.trust_domain)
        apply_endpointslices(state, slices)
        return state

    def scan(self) -> model.MeshState | None:
        """Rebuild; the new state when its content changed (not yet published)."""
        new = self.build()
        if not is_news(self.state, new):
            return None
        self.version += 1
        self.state = new
        return new

    # -- running ----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """List every kind (the first state is published before ``started``: never an empty
        state from a cache not yet filled), then follow the watches forever."""
        async with trio.open_nursery() as nursery:
            for reflector in self.reflectors.values():
                await nursery.start(reflector.run)
            self._dirty = trio.Event()
            self._scan_and_publish()
            task_status.started()
            while True:
                await self._dirty.wait()
                self._dirty = trio.Event()
                # let a burst of events (a relist, a rollout) land before rebuilding once
                await trio.sleep(0)
                try:
                    self._scan_and_publish()
                except Exception:  # a bug in one rebuild must not stop the watch
                    log.exception("building the mesh state failed")

    def _scan_and_publish(self) -> None:
        new = self.scan()
        if new is not None:
            self.publish(new)


def apply_endpointslices(state: model.MeshState, slices: list[Slice]) -> None:
    """Replace the endpoints of every Service that has EndpointSlices by their ready ones."""
    by_service: dict[str, list[Slice]] = {}
    for s in slices:
        by_service.setdefault(f"{s.namespace}/{s.service}", []).append(s)
    if not by_service:
        return
    by_name = {(w.namespace, w.name): w.uid for w in state.workloads.values()}
    for key, svc_slices in by_service.items():
        svc = state.services.get(key)
        if svc is None:
            continue
        uids: set[str] = set()
        for s in svc_slices:
            for ep in s.endpoints:
                if not ep.ready:
                    continue
                if ep.pod is not None:
                    ns, name, uid = ep.pod
                    if uid and uid in state.workloads:
                        uids.add(uid)
                    elif (ns, name) in by_name:
                        uids.add(by_name[(ns, name)])
                    continue
                for address in ep.addresses:  # a manual slice: find the workload by address
                    w = state.workload_by_ip(address)
                    if w is not None:
                        uids.add(w.uid)
        state.services[key] = dataclasses.replace(svc, endpoints=tuple(sorted(uids)))
