"""The mesh state every proxy works from: workloads, services, policies, namespaces.

The control plane builds a :class:`MeshState` from resources and sends it to node proxies
and node agents as JSON (a full snapshot, then deltas). The shapes follow ztunnel's
``workload.proto`` and ``authorization.proto``, trimmed to what nodeproxy uses.
Everything here is plain data: no IO.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from nodeproxy.identity import spiffe_id
from nodeproxy.routes import HTTPRoute

TRUST_DOMAIN = "cluster.local"
ROOT_NAMESPACE = "nodeproxy-system"
DATAPLANE_LABEL = "nodeproxy.io/dataplane-mode"
GATEWAY_LABEL = "nodeproxy.io/l7-gateway"
SERVICE_CIDR = "10.96.0.0/16"
GATEWAY_SERVICE_ACCOUNT = "nodeproxy-gateway"
# the label the control plane (or the lab) puts on a namespace's gateway pods
GATEWAY_POD_LABEL = "gateway.nodeproxy.io/namespace"

HBONE = "HBONE"
TCP = "TCP"


@dataclass(frozen=True)
class Namespace:
    name: str
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return self.name

    @property
    def ambient(self) -> bool:
        return self.labels.get(DATAPLANE_LABEL) == "ambient"


@dataclass(frozen=True)
class Workload:
    """A pod (or VM). ``protocol`` is HBONE when it is enrolled in the mesh, TCP when not."""

    uid: str
    name: str
    namespace: str
    node: str
    service_account: str = "default"
    addresses: tuple[str, ...] = ()
    labels: dict[str, str] = field(default_factory=dict)
    protocol: str = TCP
    trust_domain: str = TRUST_DOMAIN
    healthy: bool = True
    capacity: int = 1
    # named container ports, for Service targetPorts given by name
    named_ports: dict[str, int] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return self.uid

    @property
    def identity(self) -> str:
        return spiffe_id(self.trust_domain, self.namespace, self.service_account)

    @property
    def canonical_name(self) -> str:
        return (
            self.labels.get("service.istio.io/canonical-name")
            or self.labels.get("app.kubernetes.io/name")
            or self.labels.get("app")
            or self.name
        )

    @property
    def canonical_revision(self) -> str:
        return (
            self.labels.get("service.istio.io/canonical-revision")
            or self.labels.get("app.kubernetes.io/version")
            or self.labels.get("version")
            or "latest"
        )

    @property
    def meshed(self) -> bool:
        return self.protocol == HBONE


@dataclass(frozen=True)
class ServicePort:
    port: int
    target_port: int | str  # a number, or the name of a container port
    name: str = ""
    protocol: str = "TCP"


@dataclass(frozen=True)
class Service:
    name: str
    namespace: str
    addresses: tuple[str, ...] = ()  # cluster IPs (VIPs)
    ports: tuple[ServicePort, ...] = ()
    selector: dict[str, str] = field(default_factory=dict)
    # uids of the workloads selected, computed by the control plane
    endpoints: tuple[str, ...] = ()
    trust_domain: str = TRUST_DOMAIN

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def hostname(self) -> str:
        return f"{self.name}.{self.namespace}.svc.cluster.local"

    def port(self, port: int) -> ServicePort | None:
        for p in self.ports:
            if p.port == port:
                return p
        return None


@dataclass(frozen=True)
class Match:
    """One clause's values; any value matching makes the match true (values OR).

    Field names follow ztunnel's ``authorization.proto``. Principals are written as Istio
    writes them (``cluster.local/ns/NS/sa/SA``, ``*`` prefix/suffix wildcards).
    """

    namespaces: tuple[str, ...] = ()
    not_namespaces: tuple[str, ...] = ()
    principals: tuple[str, ...] = ()
    not_principals: tuple[str, ...] = ()
    source_ips: tuple[str, ...] = ()
    not_source_ips: tuple[str, ...] = ()
    destination_ips: tuple[str, ...] = ()
    not_destination_ips: tuple[str, ...] = ()
    destination_ports: tuple[int, ...] = ()
    not_destination_ports: tuple[int, ...] = ()
    # L7 fields (enforced by the L7 gateway; the node proxy fails closed on them)
    methods: tuple[str, ...] = ()
    not_methods: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    not_paths: tuple[str, ...] = ()
    headers: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def has_l7(self) -> bool:
        return bool(
            self.methods or self.not_methods or self.paths or self.not_paths or self.headers
        )


@dataclass(frozen=True)
class Clause:
    """Matches OR together (e.g. the sources of one ``from`` list)."""

    matches: tuple[Match, ...] = ()


@dataclass(frozen=True)
class Rule:
    """Clauses AND together; rules of a policy OR together."""

    clauses: tuple[Clause, ...] = ()


@dataclass(frozen=True)
class Policy:
    name: str
    namespace: str
    # "global" (root namespace, no selector), "namespace" (no selector), "workload" (selector)
    scope: str = "namespace"
    action: str = "ALLOW"  # ALLOW | DENY
    selector: dict[str, str] = field(default_factory=dict)
    rules: tuple[Rule, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def applies_to(self, workload: Workload) -> bool:
        if self.scope == "global":
            return True
        if workload.namespace != self.namespace:
            return False
        if self.scope == "namespace":
            return True
        return all(workload.labels.get(k) == v for k, v in self.selector.items())


@dataclass(frozen=True)
class Gateway:
    """A namespace's L7 gateway, present in the state only once it has an address.

    Node proxies send connections addressed to the namespace's services to it (HBONE, the
    original VIP:port as authority) and refuse connections to the namespace's pods that did
    not come through it.
    """

    namespace: str
    addresses: tuple[str, ...] = ()
    service_account: str = GATEWAY_SERVICE_ACCOUNT
    trust_domain: str = TRUST_DOMAIN

    @property
    def key(self) -> str:
        return self.namespace

    @property
    def identity(self) -> str:
        return spiffe_id(self.trust_domain, self.namespace, self.service_account)


KINDS = ("namespaces", "workloads", "services", "policies", "gateways", "routes")


class _Table(dict):  # type: ignore[type-arg]
    """A dict that counts its changes, so lookups derived from it know when to rebuild."""

    generation = 0

    def __setitem__(self, key: Any, value: Any) -> None:
        self.generation += 1
        super().__setitem__(key, value)

    def __delitem__(self, key: Any) -> None:
        self.generation += 1
        super().__delitem__(key)

    def pop(self, *args: Any) -> Any:
        self.generation += 1
        return super().pop(*args)

    def popitem(self) -> Any:
        self.generation += 1
        return super().popitem()

    def setdefault(self, key: Any, default: Any = None) -> Any:
        self.generation += 1
        return super().setdefault(key, default)

    def update(self, *args: Any, **kw: Any) -> None:
        self.generation += 1
        super().update(*args, **kw)

    def clear(self) -> None:
        self.generation += 1
        super().clear()

    def __ior__(self, other: Any) -> _Table:
        self.generation += 1
        return super().__ior__(other)  # type: ignore[no-any-return]


def _address_index(table: _Table) -> dict[str, Any]:
    """address → object, the first in table order winning (as a scan would find it)."""
    index: dict[str, Any] = {}
    for obj in table.values():
        for addr in obj.addresses:
            index.setdefault(addr, obj)
    return index


@dataclass
class MeshState:
    """Everything a proxy knows about the mesh, keyed for lookup."""

    namespaces: dict[str, Namespace] = field(default_factory=dict)
    workloads: dict[str, Workload] = field(default_factory=dict)
    services: dict[str, Service] = field(default_factory=dict)
    policies: dict[str, Policy] = field(default_factory=dict)
    gateways: dict[str, Gateway] = field(default_factory=dict)
    routes: dict[str, HTTPRoute] = field(default_factory=dict)
    version: int = 0

    def __setattr__(self, name: str, value: Any) -> None:
        # every table is a _Table, however it was given, so the address indexes below
        # notice any change to it
        if name in KINDS and not isinstance(value, _Table):
            value = _Table(value)
        object.__setattr__(self, name, value)

    # -- lookups -------------------------------------------------------------------------
    def _indexed(self, kind: str) -> dict[str, Any]:
        """The address index of ``kind``, rebuilt when its table changed (every connection
        looks up its source and destination: a scan per lookup grows with the mesh)."""
        table = getattr(self, kind)
        cache = self.__dict__.setdefault("_indexes", {})
        hit = cache.get(kind)
        if hit is None or hit[0] is not table or hit[1] != table.generation:
            hit = (table, table.generation, _address_index(table))
            cache[kind] = hit
        return hit[2]

    def workload_by_ip(self, ip: str) -> Workload | None:
        return self._indexed("workloads").get(ip)

    def service_by_vip(self, ip: str) -> Service | None:
        return self._indexed("services").get(ip)

    def gateway_for(self, namespace: str) -> Gateway | None:
        """The namespace's L7 gateway, if it has one that is up."""
        gw = self.gateways.get(namespace)
        return gw if gw is not None and gw.addresses else None

    def routes_for(self, service: Service) -> list[HTTPRoute]:
        """HTTPRoutes whose parentRefs name this Service (any port)."""
        return [
            r
            for r in self.routes.values()
            if any(
                p.is_service and p.name == service.name and p.namespace == service.namespace
                for p in r.parent_refs
            )
        ]

    def workloads_on(self, node: str) -> list[Workload]:
        return [w for w in self.workloads.values() if w.node == node]

    def policies_for(self, workload: Workload) -> list[Policy]:
        return [p for p in self.policies.values() if p.applies_to(workload)]

    def endpoints(self, service: Service) -> list[Workload]:
        return [self.workloads[u] for u in service.endpoints if u in self.workloads]

    def target_port(self, service: Service, port: ServicePort, workload: Workload) -> int | None:
        if isinstance(port.target_port, int):
            return port.target_port
        return workload.named_ports.get(port.target_port)

    # -- wire form -----------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            **{kind: [to_json(o) for o in getattr(self, kind).values()] for kind in KINDS},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> MeshState:
        state = cls(version=int(data.get("version", 0)))
        for kind in KINDS:
            table = getattr(state, kind)
            for raw in data.get(kind, []):
                obj = from_json(kind, raw)
                table[obj.key] = obj
        return state

    def diff(self, new: MeshState) -> dict[str, Any]:
        """The delta that turns ``self`` into ``new`` (see :meth:`apply`)."""
        upsert: dict[str, list[Any]] = {}
        delete: dict[str, list[str]] = {}
        for kind in KINDS:
            old_t, new_t = getattr(self, kind), getattr(new, kind)
            changed = [to_json(o) for k, o in new_t.items() if old_t.get(k) != o]
            gone = [k for k in old_t if k not in new_t]
            if changed:
                upsert[kind] = changed
            if gone:
                delete[kind] = gone
        return {"version": new.version, "upsert": upsert, "delete": delete}

    def apply(self, delta: dict[str, Any]) -> None:
        for kind, keys in delta.get("delete", {}).items():
            table = getattr(self, kind)
            for k in keys:
                table.pop(k, None)
        for kind, objs in delta.get("upsert", {}).items():
            table = getattr(self, kind)
            for raw in objs:
                obj = from_json(kind, raw)
                table[obj.key] = obj
        self.version = int(delta.get("version", self.version))

    def copy(self) -> MeshState:
        return MeshState(
            dict(self.namespaces),
            dict(self.workloads),
            dict(self.services),
            dict(self.policies),
            dict(self.gateways),
            dict(self.routes),
            self.version,
        )


def to_json(obj: Any) -> dict[str, Any]:
    if isinstance(obj, HTTPRoute):
        return obj.to_json()
    return asdict(obj)


def _tuples(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def from_json(kind: str, raw: dict[str, Any]) -> Any:
    if kind == "namespaces":
        return Namespace(**raw)
    if kind == "workloads":
        return Workload(**{k: _tuples(v) for k, v in raw.items()})
    if kind == "services":
        d = {k: _tuples(v) for k, v in raw.items()}
        d["ports"] = tuple(ServicePort(**p) for p in raw.get("ports", []))
        return Service(**d)
    if kind == "gateways":
        return Gateway(**{k: _tuples(v) for k, v in raw.items()})
    if kind == "routes":
        return HTTPRoute.from_json(raw)
    if kind == "policies":
        d = dict(raw)
        d["rules"] = tuple(
            Rule(
                clauses=tuple(
                    Clause(
                        matches=tuple(
                            Match(
                                **{
                                    k: (
                                        {hk: tuple(hv) for hk, hv in v.items()}
                                        if k == "headers"
                                        else tuple(v)
                                    )
                                    for k, v in m.items()
                                }
                            )
                            for m in c.get("matches", [])
                        )
                    )
                    for c in r.get("clauses", [])
                )
            )
            for r in raw.get("rules", [])
        )
        return Policy(**d)
    raise ValueError(f"unknown kind {kind!r}")


def allocate_cluster_ips(
    wanted: Iterable[tuple[str, str | None]], cidr: str = SERVICE_CIDR
) -> dict[str, str]:
    """Give every service key without a cluster IP one, the way the API server would.

    ``wanted`` is (``ns/name``, clusterIP or None). Allocation is deterministic (sorted
    keys, lowest free address) so the lab and the control plane agree.
    """
    items = sorted(wanted)
    net = ipaddress.ip_network(cidr)
    taken = {ip for _, ip in items if ip}
    out: dict[str, str] = {k: ip for k, ip in items if ip}
    hosts = (str(h) for h in net.hosts())
    next(hosts)  # .1 is kept for the "kubernetes" service by convention
    for key, ip in items:
        if ip:
            continue
        for candidate in hosts:
            if candidate not in taken:
                out[key] = candidate
                taken.add(candidate)
                break
        else:
            raise ValueError(f"service CIDR {cidr} exhausted")
    return out
