"""What the control plane writes into the cluster.

- The CA root, as ConfigMap ``nodeproxy-ca-root`` (key ``root-cert.pem``) in every namespace:
  created, or replaced (PUT with the resourceVersion read, retried on 409) when its data
  differs; applied again whenever a namespace appears and on every resync.
- The L7 gateway of every namespace labelled ``nodeproxy.io/l7-gateway: enabled``: the
  objects of the gateway template (a ServiceAccount and a Deployment ``nodeproxy-gateway``),
  created when the label appears and deleted when it goes. Only objects carrying our
  ``app.kubernetes.io/managed-by`` label are ever updated or deleted.

:class:`Publisher` runs both off one namespace watch. Failures are retried with back-off;
a periodic resync repairs drift (a ConfigMap deleted by hand, a gateway left behind while the
control plane was down).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
import yaml

from controlplane.kube import client as kc
from nodeproxy import model

log = logging.getLogger(__name__)

CA_CONFIGMAP = "nodeproxy-ca-root"
CA_KEY = "root-cert.pem"
GATEWAY_NAME = "nodeproxy-gateway"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "nodeproxy-controlplane"
HASH_ANNOTATION = "nodeproxy.io/applied-hash"
DEFAULT_CONTROLPLANE = "nodeproxy-controlplane.nodeproxy-system.svc:15012"
DEFAULT_IMAGE = os.environ.get("NODEPROXY_IMAGE", "nodeproxy:0.1.0")
# the kinds a gateway template may hold, in the order they are created; ServiceAccounts are
# never updated (the control plane's RBAC has no update on them, and nothing in them changes)
TEMPLATE_KINDS = {"ServiceAccount": kc.SERVICEACCOUNTS, "Deployment": kc.DEPLOYMENTS}
UPDATABLE = {"Deployment", "ConfigMap"}


class TemplateError(ValueError):
    pass


# -- applying one object --------------------------------------------------------------------


def _hash(obj: dict) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


async def apply_object(client: kc.KubeClient, rt: kc.ResourceType, obj: dict,
                       *, attempts: int = 5) -> str:
    """Create ``obj``, or replace it when what we applied last differs; "created",
    "updated" or "unchanged". Conflicts (409) are retried from a fresh read."""
    obj = copy.deepcopy(obj)
    meta = obj.setdefault("metadata", {})
    meta.setdefault("annotations", {})[HASH_ANNOTATION] = _hash(obj)
    ns, name = meta.get("namespace"), meta["name"]
    for _ in range(attempts):
        try:
            current = await client.get(rt.path(ns, name))
        except kc.ApiError as e:
            if e.status != 404:
                raise
            try:
                await client.create(rt.path(ns), obj)
                return "created"
            except kc.ApiError as e2:
                if e2.status == 409:  # created meanwhile: read it again
                    continue
                raise
        cur_meta = current.get("metadata") or {}
        same = (cur_meta.get("annotations") or {}).get(HASH_ANNOTATION) == \
            meta["annotations"][HASH_ANNOTATION]
        if "data" in obj:  # repair hand edits of the data, whatever the annotation says
            same = same and current.get("data") == obj["data"]
        if same or obj.get("kind") not in UPDATABLE:
            return "unchanged"
        new = copy.deepcopy(obj)
        new["metadata"]["resourceVersion"] = cur_meta.get("resourceVersion", "")
        try:
            await client.replace(rt.path(ns, name), new)
            return "updated"
        except kc.ApiError as e:
            if e.status == 409:
                continue
            raise
    raise kc.KubeError(f"{rt.kind} {ns}/{name}: still conflicting after {attempts} attempts")


async def delete_managed(client: kc.KubeClient, rt: kc.ResourceType, namespace: str,
                         name: str) -> bool:
    """Delete an object we manage; True when it is gone (or was never there)."""
    try:
        current = await client.get(rt.path(namespace, name))
    except kc.ApiError as e:
        if e.status == 404:
            return True
        raise
    labels = (current.get("metadata") or {}).get("labels") or {}
    if labels.get(MANAGED_BY_LABEL) != MANAGED_BY:
        log.warning("%s %s/%s is not managed by the control plane: left in place",
                    rt.kind, namespace, name)
        return False
    try:
        await client.delete(rt.path(namespace, name))
    except kc.ApiError as e:
        if e.status != 404:
            raise
    log.info("deleted %s %s/%s", rt.kind, namespace, name)
    return True


def ca_configmap(namespace: str, root_pem: bytes) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": CA_CONFIGMAP,
            "namespace": namespace,
            "labels": {MANAGED_BY_LABEL: MANAGED_BY, "app.kubernetes.io/part-of": "nodeproxy"},
        },
        "data": {CA_KEY: root_pem.decode("ascii")},
    }


# -- the gateway template -------------------------------------------------------------------


@dataclass
class GatewayTemplate:
    """YAML documents with ``{{NAMESPACE}}``, ``{{IMAGE}}``, ``{{CONTROLPLANE}}``."""

    documents: list[str]
    image: str = DEFAULT_IMAGE
    controlplane: str = DEFAULT_CONTROLPLANE

    @classmethod
    def load(cls, path: Path, **kw: Any) -> GatewayTemplate:
        """A directory of ``*.yaml`` (the template ConfigMap mounted), or one file: the
        template ConfigMap itself (its data values) or plain documents."""
        path = Path(path)
        try:
            if path.is_dir():
                docs = [p.read_text(encoding="utf-8")
                        for p in sorted(path.iterdir())
                        if p.suffix in (".yaml", ".yml") and not p.name.startswith(".")]
            else:
                text = path.read_text(encoding="utf-8")
                loaded = [d for d in yaml.safe_load_all(text) if d is not None]
                if len(loaded) == 1 and loaded[0].get("kind") == "ConfigMap":
                    docs = [v for _, v in sorted((loaded[0].get("data") or {}).items())]
                else:
                    docs = [text]
        except (OSError, UnicodeDecodeError, yaml.YAMLError, AttributeError) as e:
            raise TemplateError(f"gateway template {path}: {e}") from None
        template = cls(docs, **kw)
        template.render("template-check")  # refuse a broken template at start-up
        return template

    @classmethod
    def builtin(cls, **kw: Any) -> GatewayTemplate:
        return cls([yaml.safe_dump(o) for o in _builtin_objects()], **kw)

    def render(self, namespace: str) -> list[dict]:
        """The objects for ``namespace``, ServiceAccounts first."""
        out: list[dict] = []
        for text in self.documents:
            text = (text.replace("{{NAMESPACE}}", namespace)
                    .replace("{{IMAGE}}", self.image)
                    .replace("{{CONTROLPLANE}}", self.controlplane))
            try:
                docs = [d for d in yaml.safe_load_all(text) if d is not None]
            except yaml.YAMLError as e:
                raise TemplateError(f"gateway template: invalid YAML: {e}") from None
            for doc in docs:
                out.append(_fix(doc, namespace))
        order = list(TEMPLATE_KINDS)
        return sorted(out, key=lambda o: order.index(o["kind"]))


def _fix(doc: Any, namespace: str) -> dict:
    """Pin what the mesh relies on, whatever the template says."""
    if not isinstance(doc, dict) or doc.get("kind") not in TEMPLATE_KINDS:
        kind = doc.get("kind") if isinstance(doc, dict) else type(doc).__name__
        raise TemplateError(f"gateway template: kind {kind!r} is not one of "
                            + ", ".join(TEMPLATE_KINDS))
    meta = doc.setdefault("metadata", {})
    if not isinstance(meta, dict) or not meta.get("name"):
        raise TemplateError("gateway template: an object has no metadata.name")
    meta["namespace"] = namespace
    meta.setdefault("labels", {})[MANAGED_BY_LABEL] = MANAGED_BY
    if doc["kind"] == "Deployment":
        try:
            labels = doc["spec"]["template"].setdefault("metadata", {}).setdefault("labels", {})
        except (KeyError, TypeError, AttributeError):
            raise TemplateError("gateway template: the Deployment has no spec.template") \
                from None
        # translate.py recognises gateway pods by these; never capture the gateway itself
        labels[model.GATEWAY_POD_LABEL] = namespace
        labels[model.DATAPLANE_LABEL] = "none"
    return doc


def _builtin_objects() -> list[dict]:
    labels = {"app.kubernetes.io/name": GATEWAY_NAME, "app.kubernetes.io/part-of": "nodeproxy"}
    return [
        {
            "apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": model.GATEWAY_SERVICE_ACCOUNT, "namespace": "{{NAMESPACE}}",
                         "labels": dict(labels)},
            "automountServiceAccountToken": False,
        },
        {
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": GATEWAY_NAME, "namespace": "{{NAMESPACE}}",
                         "labels": dict(labels)},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": {"app.kubernetes.io/name": GATEWAY_NAME}},
                "template": {
                    "metadata": {"labels": dict(labels)},
                    "spec": {
                        "serviceAccountName": model.GATEWAY_SERVICE_ACCOUNT,
                        "automountServiceAccountToken": False,
                        "containers": [{
                            "name": "gateway",
                            "image": "{{IMAGE}}",
                            "command": [
                                "nodeproxy", "gateway", "--namespace", "{{NAMESPACE}}",
                                "--controlplane", "{{CONTROLPLANE}}",
                                "--ca-root", "/var/run/secrets/nodeproxy/root-cert.pem",
                                "--token-file", "/var/run/secrets/nodeproxy/token",
                            ],
                            "ports": [{"name": "tcp-hbone", "containerPort": 15008}],
                            "volumeMounts": [{"name": "credentials", "readOnly": True,
                                              "mountPath": "/var/run/secrets/nodeproxy"}],
                        }],
                        "volumes": [{"name": "credentials", "projected": {"sources": [
                            {"serviceAccountToken": {"audience": "nodeproxy",
                                                     "expirationSeconds": 3600,
                                                     "path": "token"}},
                            {"configMap": {"name": CA_CONFIGMAP,
                                           "items": [{"key": CA_KEY, "path": CA_KEY}]}},
                        ]}}],
                    },
                },
            },
        },
    ]


# -- the reconciler -------------------------------------------------------------------------


def _active(ns: dict) -> bool:
    # objects cannot be created in a namespace being deleted (403)
    return ((ns.get("status") or {}).get("phase") or "Active") != "Terminating"


def _wants_gateway(ns: dict) -> bool:
    labels = (ns.get("metadata") or {}).get("labels") or {}
    return labels.get(model.GATEWAY_LABEL) == "enabled"


class Publisher:
    """Keeps the CA root ConfigMaps and the gateways in line with the namespaces."""

    def __init__(
        self,
        client: kc.KubeClient,
        *,
        root_pem: bytes | None,
        gateway: GatewayTemplate | None = None,
        resync: float = 600.0,
        backoff: Callable[[], kc.Backoff] = kc.Backoff,
        watch_timeout: int = 300,
    ):
        self.client = client
        self.root_pem = root_pem
        self.gateway = gateway
        self.resync = resync
        self._backoff = backoff()
        self.namespaces = kc.Reflector(client, kc.NAMESPACES, self._changed,
                                       backoff=backoff, watch_timeout=watch_timeout)
        self._dirty = trio.Event()
        self._ca_done: dict[str, bytes] = {}  # namespace → the root published there
        self._gw_done: set[str] = set()
        self._swept = False  # stale gateways looked for since the last resync
        self.errors: dict[str, str] = {}

    def _changed(self) -> None:
        self._dirty.set()

    def set_root(self, root_pem: bytes) -> None:
        """A new CA root (rotation): publish it everywhere again."""
        self.root_pem = root_pem
        self._ca_done.clear()
        self._dirty.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.namespaces.run)
            task_status.started()
            next_resync = trio.current_time() + self.resync
            while True:
                ok = await self.reconcile()
                if ok:
                    self._backoff.reset()
                    deadline = next_resync
                else:
                    deadline = min(next_resync, trio.current_time() + self._backoff.next())
                with trio.move_on_at(deadline):
                    await self._dirty.wait()
                self._dirty = trio.Event()
                if trio.current_time() >= next_resync:
                    self._ca_done.clear()
                    self._gw_done.clear()
                    self._swept = False
                    next_resync = trio.current_time() + self.resync

    async def reconcile(self) -> bool:
        """One pass; False when something failed (retried after a back-off)."""
        namespaces = {n: o for n, o in self.namespaces.store.items() if _active(o)}
        ok = True
        if self.root_pem is not None:
            self._ca_done = {n: r for n, r in self._ca_done.items() if n in namespaces}
            for ns in sorted(n for n in namespaces if self._ca_done.get(n) != self.root_pem):
                ok &= await self._step(f"ConfigMap/{ns}/{CA_CONFIGMAP}", self._ensure_ca(ns))
        if self.gateway is not None:
            wanted = {n for n, o in namespaces.items() if _wants_gateway(o)}
            for ns in sorted(wanted - self._gw_done):
                ok &= await self._step(f"gateway/{ns}", self._ensure_gateway(ns))
            for ns in sorted(self._gw_done - wanted):
                ok &= await self._step(f"gateway/{ns}", self._remove_gateway(ns))
            if not self._swept:
                ok &= await self._step("gateway sweep", self._sweep(wanted))
        return ok

    async def _step(self, what: str, work: Any) -> bool:
        try:
            await work
        except kc.KubeError as e:
            if self.errors.get(what) != str(e):
                log.error("%s: %s (will retry)", what, e)
            self.errors[what] = str(e)
            return False
        self.errors.pop(what, None)
        return True

    async def _ensure_ca(self, ns: str) -> None:
        root = self.root_pem
        assert root is not None
        result = await apply_object(self.client, kc.CONFIGMAPS, ca_configmap(ns, root))
        if result != "unchanged":
            log.info("%s ConfigMap %s/%s", result, ns, CA_CONFIGMAP)
        # the root the namespace has: if it rotated meanwhile, the next pass applies it
        self._ca_done[ns] = root

    async def _ensure_gateway(self, ns: str) -> None:
        assert self.gateway is not None
        for obj in self.gateway.render(ns):
            result = await apply_object(self.client, TEMPLATE_KINDS[obj["kind"]], obj)
            if result != "unchanged":
                log.info("%s gateway %s %s/%s", result, obj["kind"], ns, obj["metadata"]["name"])
        self._gw_done.add(ns)

    async def _remove_gateway(self, ns: str) -> None:
        assert self.gateway is not None
        if ns in self.namespaces.store:  # a deleted namespace takes its objects with it
            for obj in reversed(self.gateway.render(ns)):
                await delete_managed(self.client, TEMPLATE_KINDS[obj["kind"]], ns,
                                     obj["metadata"]["name"])
        self._gw_done.discard(ns)

    async def _sweep(self, wanted: set[str]) -> None:
        """Delete gateways of namespaces no longer labelled (changed while we were down)."""
        assert self.gateway is not None
        names = {(o["kind"], o["metadata"]["name"]) for o in self.gateway.render("sweep")}
        for kind, name in sorted(names, key=lambda k: k[0] != "Deployment"):
            rt = TEMPLATE_KINDS[kind]
            items, _ = await self.client.list(
                rt.path(), labelSelector=f"{MANAGED_BY_LABEL}={MANAGED_BY}")
            for item in items:
                meta = item.get("metadata") or {}
                ns = meta.get("namespace", "")
                if meta.get("name") == name and ns not in wanted:
                    await delete_managed(self.client, rt, ns, name)
        self._swept = True
