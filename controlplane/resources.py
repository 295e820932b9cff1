"""Kubernetes-shaped YAML resources, parsed and validated into typed objects.

``parse_documents`` reads a multi-document YAML text and returns one typed resource per
document: :class:`Namespace`, :class:`Pod`, :class:`Service`, :class:`AuthorizationPolicy`,
:class:`WorkloadEntry` (a VM), :class:`Route`, or :class:`Unhandled` for kinds this module
does not interpret (``Lab``…). Anything malformed raises :class:`ResourceError` naming the
source, the document index and the field; no other exception escapes a parse. Pure: no IO
except :func:`parse_file`.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from nodeproxy.routes import HTTPRoute, RouteError, parse_httproute

log = logging.getLogger(__name__)

CORE_API_VERSION = "v1"
HTTPROUTE_API_VERSIONS = ("gateway.networking.k8s.io/v1", "gateway.networking.k8s.io/v1beta1")
POLICY_API_VERSIONS = (
    "security.nodeproxy.io/v1",
    "security.istio.io/v1",
    "security.istio.io/v1beta1",
)
POLICY_ACTIONS = ("ALLOW", "DENY")
WORKLOADENTRY_API_VERSIONS = ("networking.nodeproxy.io/v1alpha1",)
SERVICE_PROTOCOLS = ("TCP", "UDP", "SCTP")


class ResourceError(ValueError):
    """A document that cannot be used; ``str()`` says where and why."""

    def __init__(self, source: str, document: int | str | None, field: str, reason: str):
        self.source = source
        self.document = document
        self.field = field
        self.reason = reason
        where = source
        if document is not None:
            where += f": document {document}"
        if field:
            where += f": {field}"
        super().__init__(f"{where}: {reason}")


# -- typed resources ------------------------------------------------------------------------


@dataclass(frozen=True)
class Namespace:
    name: str
    labels: dict[str, str] = field(default_factory=dict)
    kind: str = "Namespace"

    @property
    def namespace(self) -> str:
        return ""

    @property
    def key(self) -> str:
        return f"Namespace/{self.name}"


@dataclass(frozen=True)
class ContainerPort:
    container_port: int
    name: str = ""


@dataclass(frozen=True)
class Pod:
    name: str
    namespace: str = "default"
    uid: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    node_name: str = ""
    service_account: str = "default"
    ports: tuple[ContainerPort, ...] = ()
    pod_ip: str = ""
    pod_ips: tuple[str, ...] = ()
    phase: str = ""
    kind: str = "Pod"

    @property
    def key(self) -> str:
        return f"Pod/{self.namespace}/{self.name}"


@dataclass(frozen=True)
class ServicePortSpec:
    port: int
    target_port: int | str  # a number, or a container port's name
    name: str = ""
    protocol: str = "TCP"


@dataclass(frozen=True)
class Service:
    name: str
    namespace: str = "default"
    labels: dict[str, str] = field(default_factory=dict)
    selector: dict[str, str] = field(default_factory=dict)
    ports: tuple[ServicePortSpec, ...] = ()
    # None: allocate one; "None": headless (no VIP); else an IP address
    cluster_ip: str | None = None
    kind: str = "Service"

    @property
    def key(self) -> str:
        return f"Service/{self.namespace}/{self.name}"


@dataclass(frozen=True)
class Source:
    principals: tuple[str, ...] = ()
    not_principals: tuple[str, ...] = ()
    namespaces: tuple[str, ...] = ()
    not_namespaces: tuple[str, ...] = ()
    ip_blocks: tuple[str, ...] = ()
    not_ip_blocks: tuple[str, ...] = ()


@dataclass(frozen=True)
class Operation:
    ports: tuple[int, ...] = ()
    not_ports: tuple[int, ...] = ()
    methods: tuple[str, ...] = ()
    not_methods: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    not_paths: tuple[str, ...] = ()


@dataclass(frozen=True)
class PolicyRule:
    sources: tuple[Source, ...] = ()
    operations: tuple[Operation, ...] = ()
    # Istio fields this mesh cannot enforce (``when``, ``hosts``, ``requestPrincipals``…);
    # translation fails closed on them (see translate.py).
    unsupported: tuple[str, ...] = ()


@dataclass(frozen=True)
class AuthorizationPolicy:
    name: str
    namespace: str = "default"
    api_version: str = POLICY_API_VERSIONS[0]
    # None: no selector (namespace or global scope)
    selector: dict[str, str] | None = None
    action: str = "ALLOW"
    rules: tuple[PolicyRule, ...] = ()
    kind: str = "AuthorizationPolicy"

    @property
    def key(self) -> str:
        return f"AuthorizationPolicy/{self.namespace}/{self.name}"


@dataclass(frozen=True)
class WorkloadEntry:
    """A VM (or any host outside Kubernetes) that is one workload of the mesh.

    Shaped like Istio's ``WorkloadEntry``, plus ``spec.node``: the node name the VM's own node
    proxy authenticates as (its token), which the CA requires to issue the VM's identity.
    Labels are ``metadata.labels`` overlaid with ``spec.labels`` (Istio's field).
    """

    name: str
    namespace: str = "default"
    labels: dict[str, str] = field(default_factory=dict)
    address: str = ""
    service_account: str = "default"
    node: str = ""
    ports: dict[str, int] = field(default_factory=dict)  # name → port (named target ports)
    kind: str = "WorkloadEntry"

    @property
    def key(self) -> str:
        return f"WorkloadEntry/{self.namespace}/{self.name}"


@dataclass(frozen=True)
class Unhandled:
    """A well-formed resource of a kind this module does not interpret; ``raw`` is kept."""

    kind: str
    name: str
    namespace: str = ""
    api_version: str = ""
    raw: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def key(self) -> str:
        return f"{self.kind}/{self.namespace}/{self.name}"


@dataclass(frozen=True)
class Route:
    """A Gateway API HTTPRoute, already validated by :mod:`nodeproxy.routes`."""

    route: HTTPRoute

    @property
    def key(self) -> str:
        return f"HTTPRoute/{self.route.namespace}/{self.route.name}"


Resource = Namespace | Pod | Service | AuthorizationPolicy | WorkloadEntry | Route | Unhandled


# -- field access with error context -------------------------------------------------------


class _Doc:
    """Typed getters that raise ResourceError naming the field path."""

    def __init__(self, source: str, index: int | str):
        self.source = source
        self.index = index

    def error(self, path: str, reason: str) -> ResourceError:
        return ResourceError(self.source, self.index, path, reason)

    def mapping(self, obj: dict, key: str, path: str, *, required: bool = False) -> dict:
        value = obj.get(key)
        if value is None:
            if required:
                raise self.error(path, "is required")
            return {}
        if not isinstance(value, dict):
            raise self.error(path, f"must be a mapping, not {_type(value)}")
        return value

    def seq(self, obj: dict, key: str, path: str) -> list:
        value = obj.get(key)
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.error(path, f"must be a list, not {_type(value)}")
        return value

    def text(
        self, obj: dict, key: str, path: str, default: str = "", *, required: bool = False
    ) -> str:
        value = obj.get(key)
        if value is None:
            if required:
                raise self.error(path, "is required")
            return default
        if not isinstance(value, str):
            raise self.error(path, f"must be a string, not {_type(value)}")
        if required and not value:
            raise self.error(path, "must not be empty")
        return value

    def text_map(self, obj: dict, key: str, path: str) -> dict[str, str]:
        raw = self.mapping(obj, key, path)
        out: dict[str, str] = {}
        for k, v in raw.items():
            if not isinstance(k, str):
                raise self.error(path, f"key {k!r} must be a string")
            if not isinstance(v, str):
                raise self.error(f"{path}.{k}", f"must be a string (quote it), not {_type(v)}")
            out[k] = v
        return out

    def text_list(self, obj: dict, key: str, path: str) -> tuple[str, ...]:
        items = self.seq(obj, key, path)
        for i, v in enumerate(items):
            if not isinstance(v, str):
                raise self.error(f"{path}[{i}]", f"must be a string, not {_type(v)}")
        return tuple(items)

    def port(self, value: Any, path: str, *, allow_string: bool = False) -> int:
        if isinstance(value, str) and allow_string and value.strip().isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(path, f"must be a port number, not {_type(value)}")
        if not 1 <= value <= 65535:
            raise self.error(path, f"port {value} is outside 1-65535")
        return value

    def ip(self, value: Any, path: str) -> str:
        if not isinstance(value, str):
            raise self.error(path, f"must be an IP address string, not {_type(value)}")
        try:
            return str(ipaddress.ip_address(value))
        except ValueError:
            raise self.error(path, f"{value!r} is not an IP address") from None


def _type(value: Any) -> str:
    return "null" if value is None else type(value).__name__


# -- parsing --------------------------------------------------------------------------------


def parse_file(path: Path) -> list[Resource]:
    """Read and parse one YAML file; IO and decoding errors are ResourceErrors too."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ResourceError(str(path), None, "", f"cannot read: {e}") from None
    return parse_documents(text, str(path))


def parse_documents(text: str, source: str = "<string>") -> list[Resource]:
    """Parse every document of ``text``; empty documents are skipped."""
    try:
        return list(_parse_all(text, source))
    except ResourceError:
        raise
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1} column {mark.column + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ResourceError(source, None, "", f"invalid YAML: {where}{problem}") from None
    except Exception as e:  # the contract is "only ResourceError escapes"
        raise ResourceError(source, None, "", f"cannot parse: {type(e).__name__}: {e}") from e


def parse_object(obj: Any, source: str) -> list[Resource]:
    """One already-decoded object (from the Kubernetes API) → resources; only
    :class:`ResourceError` escapes."""
    try:
        return list(_parse_doc(obj, source, None))  # type: ignore[arg-type]
    except ResourceError:
        raise
    except Exception as e:  # the contract is "only ResourceError escapes"
        raise ResourceError(source, None, "", f"cannot parse: {type(e).__name__}: {e}") from e


def _parse_all(text: str, source: str) -> Iterator[Resource]:
    for index, doc in enumerate(yaml.safe_load_all(text)):
        if doc is None:
            continue
        yield from _parse_doc(doc, source, index)


def _parse_doc(doc: Any, source: str, index: int | str) -> Iterator[Resource]:
    d = _Doc(source, index)
    if not isinstance(doc, dict):
        raise d.error("", f"a resource must be a mapping, not {_type(doc)}")
    kind = d.text(doc, "kind", "kind", required=True)
    api_version = d.text(doc, "apiVersion", "apiVersion")
    if kind == "List":  # kubectl's `-o yaml` wraps many objects in one List
        for i, item in enumerate(d.seq(doc, "items", "items")):
            yield from _parse_doc(item, source, f"{index}.items[{i}]")
        return
    meta = d.mapping(doc, "metadata", "metadata", required=True)
    name = d.text(meta, "name", "metadata.name", required=True)
    if kind in ("Namespace", "Pod", "Service") and api_version not in ("", CORE_API_VERSION):
        raise d.error("apiVersion", f"{kind} must be apiVersion v1, not {api_version!r}")
    if kind == "Namespace":
        yield Namespace(name=name, labels=d.text_map(meta, "labels", "metadata.labels"))
        return
    namespace = d.text(meta, "namespace", "metadata.namespace", "default") or "default"
    if kind == "Pod":
        yield _pod(d, doc, meta, name, namespace)
    elif kind == "Service":
        yield _service(d, doc, meta, name, namespace)
    elif kind == "AuthorizationPolicy":
        # another version could mean something we would misread: refuse, do not ignore
        if api_version not in POLICY_API_VERSIONS:
            raise d.error(
                "apiVersion",
                f"AuthorizationPolicy apiVersion {api_version!r} is not one of "
                + ", ".join(POLICY_API_VERSIONS),
            )
        yield _policy(d, doc, name, namespace, api_version)
    elif kind == "WorkloadEntry":
        if api_version not in WORKLOADENTRY_API_VERSIONS:
            raise d.error(
                "apiVersion",
                f"WorkloadEntry apiVersion {api_version!r} is not one of "
                + ", ".join(WORKLOADENTRY_API_VERSIONS),
            )
        yield _workload_entry(d, doc, meta, name, namespace)
    elif kind == "HTTPRoute" and api_version in HTTPROUTE_API_VERSIONS:
        try:
            yield Route(parse_httproute(doc))
        except RouteError as e:
            raise d.error(e.field, e.message) from None
    else:
        yield Unhandled(
            kind=kind, name=name, namespace=d.text(meta, "namespace", "metadata.namespace"),
            api_version=api_version, raw=doc,
        )


def _pod(d: _Doc, doc: dict, meta: dict, name: str, namespace: str) -> Pod:
    spec = d.mapping(doc, "spec", "spec")
    status = d.mapping(doc, "status", "status")
    ports: list[ContainerPort] = []
    for ci, c in enumerate(d.seq(spec, "containers", "spec.containers")):
        cpath = f"spec.containers[{ci}]"
        if not isinstance(c, dict):
            raise d.error(cpath, f"must be a mapping, not {_type(c)}")
        for pi, p in enumerate(d.seq(c, "ports", f"{cpath}.ports")):
            ppath = f"{cpath}.ports[{pi}]"
            if not isinstance(p, dict):
                raise d.error(ppath, f"must be a mapping, not {_type(p)}")
            if "containerPort" not in p:
                raise d.error(f"{ppath}.containerPort", "is required")
            ports.append(
                ContainerPort(
                    container_port=d.port(p["containerPort"], f"{ppath}.containerPort"),
                    name=d.text(p, "name", f"{ppath}.name"),
                )
            )
    pod_ip = d.ip(status["podIP"], "status.podIP") if status.get("podIP") else ""
    pod_ips: list[str] = []
    for i, entry in enumerate(d.seq(status, "podIPs", "status.podIPs")):
        path = f"status.podIPs[{i}]"
        # Kubernetes writes [{ip: …}]; a bare string is accepted too
        if isinstance(entry, dict):
            entry = entry.get("ip")
            path += ".ip"
        pod_ips.append(d.ip(entry, path))
    return Pod(
        name=name,
        namespace=namespace,
        uid=d.text(meta, "uid", "metadata.uid"),
        labels=d.text_map(meta, "labels", "metadata.labels"),
        node_name=d.text(spec, "nodeName", "spec.nodeName"),
        service_account=d.text(spec, "serviceAccountName", "spec.serviceAccountName") or "default",
        ports=tuple(ports),
        pod_ip=pod_ip,
        pod_ips=tuple(pod_ips),
        phase=d.text(status, "phase", "status.phase"),
    )


# Istio WorkloadEntry fields that mean nothing here but are harmless; anything else unknown in
# spec is an error (a typo in ``serviceAccount`` must not silently give the VM ``default``)
_WORKLOADENTRY_FIELDS = {"address", "serviceAccount", "node", "ports", "labels"}
_WORKLOADENTRY_IGNORED = {"network", "locality", "weight"}


def _workload_entry(d: _Doc, doc: dict, meta: dict, name: str, namespace: str) -> WorkloadEntry:
    spec = d.mapping(doc, "spec", "spec", required=True)
    unknown = set(spec) - _WORKLOADENTRY_FIELDS - _WORKLOADENTRY_IGNORED
    if unknown:
        raise d.error("spec", f"unknown field(s) {sorted(map(str, unknown))}")
    if spec.get("address") is None:
        raise d.error("spec.address", "is required")
    address = d.ip(spec["address"], "spec.address")
    node = d.text(spec, "node", "spec.node", required=True)
    ports: dict[str, int] = {}
    for pname, port in d.mapping(spec, "ports", "spec.ports").items():
        if not isinstance(pname, str) or not pname:
            raise d.error("spec.ports", f"port name {pname!r} must be a non-empty string")
        ports[pname] = d.port(port, f"spec.ports.{pname}")
    labels = d.text_map(meta, "labels", "metadata.labels")
    labels.update(d.text_map(spec, "labels", "spec.labels"))
    return WorkloadEntry(
        name=name,
        namespace=namespace,
        labels=labels,
        address=address,
        service_account=d.text(spec, "serviceAccount", "spec.serviceAccount") or "default",
        node=node,
        ports=ports,
    )


def _service(d: _Doc, doc: dict, meta: dict, name: str, namespace: str) -> Service:
    spec = d.mapping(doc, "spec", "spec")
    ports: list[ServicePortSpec] = []
    for i, p in enumerate(d.seq(spec, "ports", "spec.ports")):
        path = f"spec.ports[{i}]"
        if not isinstance(p, dict):
            raise d.error(path, f"must be a mapping, not {_type(p)}")
        if "port" not in p:
            raise d.error(f"{path}.port", "is required")
        port = d.port(p["port"], f"{path}.port")
        target: int | str = port
        raw_target = p.get("targetPort")
        if isinstance(raw_target, str) and not raw_target.strip().isdigit():
            if not raw_target:
                raise d.error(f"{path}.targetPort", "must not be empty")
            target = raw_target
        elif raw_target is not None:
            target = d.port(raw_target, f"{path}.targetPort", allow_string=True)
        protocol = d.text(p, "protocol", f"{path}.protocol", "TCP").upper()
        if protocol not in SERVICE_PROTOCOLS:
            raise d.error(f"{path}.protocol", f"must be one of {', '.join(SERVICE_PROTOCOLS)}")
        ports.append(
            ServicePortSpec(
                port=port, target_port=target, name=d.text(p, "name", f"{path}.name"),
                protocol=protocol,
            )
        )
    cluster_ip: str | None = None
    raw_ip = spec.get("clusterIP")
    if raw_ip == "None":
        cluster_ip = "None"
    elif raw_ip not in (None, ""):
        cluster_ip = d.ip(raw_ip, "spec.clusterIP")
    return Service(
        name=name,
        namespace=namespace,
        labels=d.text_map(meta, "labels", "metadata.labels"),
        selector=d.text_map(spec, "selector", "spec.selector"),
        ports=tuple(ports),
        cluster_ip=cluster_ip,
    )


# Istio fields we know but cannot enforce; anything else unknown is an error (a typo in a
# policy must not silently widen it).
_SOURCE_FIELDS = {
    "principals": "principals",
    "notPrincipals": "not_principals",
    "namespaces": "namespaces",
    "notNamespaces": "not_namespaces",
    "ipBlocks": "ip_blocks",
    "notIpBlocks": "not_ip_blocks",
}
_SOURCE_UNSUPPORTED = ("requestPrincipals", "notRequestPrincipals", "remoteIpBlocks",
                       "notRemoteIpBlocks", "serviceAccounts", "notServiceAccounts")
_OPERATION_FIELDS = {
    "ports": "ports",
    "notPorts": "not_ports",
    "methods": "methods",
    "notMethods": "not_methods",
    "paths": "paths",
    "notPaths": "not_paths",
}
_OPERATION_UNSUPPORTED = ("hosts", "notHosts")


def _policy(d: _Doc, doc: dict, name: str, namespace: str, api_version: str) -> AuthorizationPolicy:
    spec = d.mapping(doc, "spec", "spec")
    selector: dict[str, str] | None = None
    if spec.get("selector") is not None:
        sel = d.mapping(spec, "selector", "spec.selector")
        unknown = set(sel) - {"matchLabels"}
        if unknown:
            raise d.error("spec.selector", f"unsupported field(s) {sorted(unknown)}")
        selector = d.text_map(sel, "matchLabels", "spec.selector.matchLabels") or None
    action = d.text(spec, "action", "spec.action", "ALLOW") or "ALLOW"
    if action not in POLICY_ACTIONS:
        raise d.error("spec.action", f"{action!r} is not one of {', '.join(POLICY_ACTIONS)}")
    for unsupported in ("provider", "targetRef", "targetRefs"):
        if spec.get(unsupported) is not None:
            raise d.error(f"spec.{unsupported}", "is not supported")
    rules = tuple(
        _rule(d, r, f"spec.rules[{i}]") for i, r in enumerate(d.seq(spec, "rules", "spec.rules"))
    )
    return AuthorizationPolicy(
        name=name, namespace=namespace, api_version=api_version, selector=selector,
        action=action, rules=rules,
    )


def _rule(d: _Doc, raw: Any, path: str) -> PolicyRule:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise d.error(path, f"must be a mapping, not {_type(raw)}")
    unknown = set(raw) - {"from", "to", "when"}
    if unknown:
        raise d.error(path, f"unknown field(s) {sorted(unknown)}")
    unsupported: list[str] = []
    if d.seq(raw, "when", f"{path}.when"):
        unsupported.append("when")
    sources = []
    for i, entry in enumerate(d.seq(raw, "from", f"{path}.from")):
        epath = f"{path}.from[{i}]"
        if not isinstance(entry, dict):
            raise d.error(epath, f"must be a mapping, not {_type(entry)}")
        src = d.mapping(entry, "source", f"{epath}.source")
        sources.append(
            Source(**_fields(d, src, f"{epath}.source", _SOURCE_FIELDS, _SOURCE_UNSUPPORTED,
                             unsupported))
        )
    operations = []
    for i, entry in enumerate(d.seq(raw, "to", f"{path}.to")):
        epath = f"{path}.to[{i}]"
        if not isinstance(entry, dict):
            raise d.error(epath, f"must be a mapping, not {_type(entry)}")
        op = d.mapping(entry, "operation", f"{epath}.operation")
        values = _fields(d, op, f"{epath}.operation", _OPERATION_FIELDS, _OPERATION_UNSUPPORTED,
                         unsupported)
        for key in ("ports", "not_ports"):
            values[key] = tuple(
                d.port(v, f"{epath}.operation.{key}[{j}]", allow_string=True)
                for j, v in enumerate(values[key])
            )
        operations.append(Operation(**values))
    for i, s in enumerate(sources):
        for block in s.ip_blocks + s.not_ip_blocks:
            try:
                ipaddress.ip_network(block, strict=False)
            except ValueError:
                raise d.error(f"{path}.from[{i}].source", f"{block!r} is not an IP or CIDR") \
                    from None
    return PolicyRule(tuple(sources), tuple(operations), tuple(unsupported))


def _fields(
    d: _Doc, raw: dict, path: str, known: dict[str, str], unsupported_names: tuple[str, ...],
    unsupported: list[str],
) -> dict[str, tuple]:
    out: dict[str, tuple] = {}
    for key in raw:
        if key in known:
            continue
        if key in unsupported_names:
            if raw[key]:
                unsupported.append(key)
            continue
        raise d.error(path, f"unknown field {key!r}")
    for key, attr in known.items():
        if attr.endswith("ports"):  # numbers or numeric strings; checked by the caller
            items = d.seq(raw, key, f"{path}.{key}")
            out[attr] = tuple(items)
        else:
            out[attr] = d.text_list(raw, key, f"{path}.{key}")
    return out
