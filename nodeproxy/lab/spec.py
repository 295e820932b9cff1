"""The lab file: parsing, validation and the names and addresses derived from it.

A lab file is multi-document YAML: one ``Lab`` resource naming the nodes (and VMs), plus
Kubernetes-shaped ``Namespace``, ``Pod``, ``Service`` and ``AuthorizationPolicy`` documents.
Everything here is pure: no IO besides reading the YAML text handed in, so that a bad file is
refused before anything on the machine is touched.
"""

from __future__ import annotations

import copy
import hashlib
import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from nodeproxy.model import allocate_cluster_ips

LAB_API_VERSION = "nodeproxy.io/v1alpha1"
UNDERLAY_CIDR = "10.250.0.0/24"
UNDERLAY_GATEWAY = "10.250.0.1"
CONTROLPLANE_PORT = 15012
CONTROLPLANE_ADMIN_PORT = 15014
READY_PORT = 15021
BRIDGE = "npbr0"
MAX_NODES = 200
MAX_VMS = 100  # underlay 10.250.0.100-199
WORKLOADENTRY_API_VERSION = "networking.nodeproxy.io/v1alpha1"

# kinds the lab understands; anything else in the file is refused
KINDS = ("Lab", "Namespace", "Pod", "Service", "AuthorizationPolicy", "HTTPRoute")

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
# longest netns name before it is shortened with a hash (keeps /etc/netns paths readable)
MAX_NETNS_NAME = 48


class LabSpecError(ValueError):
    """The lab file is unusable; the message says why and where."""


@dataclass
class Node:
    name: str
    index: int
    workers: int = 1  # the node proxy's worker processes (`nodeproxy ztunnel --workers`)

    @property
    def underlay_ip(self) -> str:
        return f"10.250.0.{10 + self.index}"

    @property
    def pod_cidr(self) -> str:
        return f"10.244.{self.index + 1}.0/24"

    @property
    def pod_gateway(self) -> str:
        return f"10.244.{self.index + 1}.1"


@dataclass
class VM:
    """A VM node: its own netns on the underlay, one workload, its node proxy in host mode."""

    name: str
    index: int
    namespace: str
    service_account: str
    labels: dict[str, str]
    command: list[str]  # empty: the VM runs no app
    ports: dict[str, int] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def underlay_ip(self) -> str:
        return f"10.250.0.{100 + self.index}"

    def as_pod(self) -> Pod:
        """The VM seen as a pod where the lab needs one (service endpoints, commands)."""
        return Pod(
            self.namespace, self.name, self.name, self.service_account, list(self.command),
            dict(self.labels), [ContainerPort(p, n) for n, p in self.ports.items()], {},
        )


@dataclass
class ContainerPort:
    port: int
    name: str = ""


@dataclass
class Pod:
    namespace: str
    name: str
    node: str
    service_account: str
    command: list[str]
    labels: dict[str, str]
    ports: list[ContainerPort]
    doc: dict[str, Any]  # the resource as written in the file

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def named_port(self, name: str) -> int | None:
        for p in self.ports:
            if p.name == name:
                return p.port
        return None


@dataclass
class SvcPort:
    port: int
    target_port: int | str
    name: str = ""


@dataclass
class Service:
    namespace: str
    name: str
    selector: dict[str, str]
    ports: list[SvcPort]
    cluster_ip: str | None
    doc: dict[str, Any]

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass
class Resources:
    """The Kubernetes-shaped part of a lab file (also what ``lab apply`` takes)."""

    namespaces: dict[str, dict[str, Any]] = field(default_factory=dict)
    pods: dict[str, Pod] = field(default_factory=dict)
    services: dict[str, Service] = field(default_factory=dict)
    # AuthorizationPolicy / HTTPRoute: passed through untouched, keyed "Kind/ns/name"
    others: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class LabSpec:
    nodes: list[Node]
    mesh: bool
    resources: Resources
    # lifetime of workload certificates the control plane signs (tests shorten it)
    certificate_ttl: int | None = None
    vms: list[VM] = field(default_factory=list)

    def node(self, name: str) -> Node | None:
        for n in self.nodes:
            if n.name == name:
                return n
        return None


# -- parsing -----------------------------------------------------------------------------


def load_documents(text: str, source: str = "lab file") -> list[dict[str, Any]]:
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:
        raise LabSpecError(f"{source}: bad YAML: {e}") from None
    for i, d in enumerate(docs):
        if not isinstance(d, dict):
            raise LabSpecError(f"{source}: document {i + 1} is not a mapping")
        kind = d.get("kind")
        if kind not in KINDS:
            raise LabSpecError(
                f"{source}: document {i + 1}: kind {kind!r} is not one of {', '.join(KINDS)}"
            )
    return docs


def _meta(doc: dict[str, Any], where: str, namespaced: bool = True) -> tuple[str, str]:
    meta = doc.get("metadata")
    if not isinstance(meta, dict):
        raise LabSpecError(f"{where}: metadata missing")
    name = meta.get("name")
    if not isinstance(name, str) or not _DNS_LABEL.match(name):
        raise LabSpecError(f"{where}: metadata.name {name!r} is not a DNS label")
    ns = ""
    if namespaced:
        ns = meta.get("namespace", "default")
        if not isinstance(ns, str) or not _DNS_LABEL.match(ns):
            raise LabSpecError(f"{where}: metadata.namespace {ns!r} is not a DNS label")
    labels = meta.get("labels", {}) or {}
    if not isinstance(labels, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
    ):
        raise LabSpecError(f"{where}: metadata.labels must map strings to strings")
    return ns, name


def _port(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise LabSpecError(f"{where}: {value!r} is not a port number")
    return value


def parse_pod(doc: dict[str, Any], where: str = "Pod") -> Pod:
    ns, name = _meta(doc, where)
    where = f"Pod {ns}/{name}"
    spec = doc.get("spec")
    if not isinstance(spec, dict):
        raise LabSpecError(f"{where}: spec missing")
    node = spec.get("nodeName")
    if not isinstance(node, str) or not node:
        raise LabSpecError(f"{where}: spec.nodeName missing")
    sa = spec.get("serviceAccountName", "default")
    if not isinstance(sa, str) or not _DNS_LABEL.match(sa):
        raise LabSpecError(f"{where}: spec.serviceAccountName {sa!r} is not a DNS label")
    containers = spec.get("containers")
    if not isinstance(containers, list) or not containers:
        raise LabSpecError(f"{where}: spec.containers missing")
    if len(containers) != 1:
        raise LabSpecError(f"{where}: the lab runs exactly one container per pod")
    c = containers[0]
    if not isinstance(c, dict):
        raise LabSpecError(f"{where}: container is not a mapping")
    command = c.get("command")
    if (
        not isinstance(command, list)
        or not command
        or not all(isinstance(a, str | int) and not isinstance(a, bool) for a in command)
    ):
        raise LabSpecError(f"{where}: containers[0].command missing (a list of arguments)")
    ports = []
    for i, p in enumerate(c.get("ports", []) or []):
        if not isinstance(p, dict):
            raise LabSpecError(f"{where}: ports[{i}] is not a mapping")
        ports.append(
            ContainerPort(_port(p.get("containerPort"), f"{where}: ports[{i}]"), p.get("name", ""))
        )
    labels = dict((doc.get("metadata") or {}).get("labels") or {})
    return Pod(ns, name, node, sa, [str(a) for a in command], labels, ports, doc)


def parse_service(doc: dict[str, Any], where: str = "Service") -> Service:
    ns, name = _meta(doc, where)
    where = f"Service {ns}/{name}"
    spec = doc.get("spec")
    if not isinstance(spec, dict):
        raise LabSpecError(f"{where}: spec missing")
    selector = spec.get("selector", {}) or {}
    if not isinstance(selector, dict):
        raise LabSpecError(f"{where}: spec.selector must be a mapping")
    raw_ports = spec.get("ports")
    if not isinstance(raw_ports, list) or not raw_ports:
        raise LabSpecError(f"{where}: spec.ports missing")
    ports = []
    for i, p in enumerate(raw_ports):
        if not isinstance(p, dict):
            raise LabSpecError(f"{where}: ports[{i}] is not a mapping")
        port = _port(p.get("port"), f"{where}: ports[{i}].port")
        target = p.get("targetPort", port)
        if not isinstance(target, str):
            target = _port(target, f"{where}: ports[{i}].targetPort")
        ports.append(SvcPort(port, target, str(p.get("name", ""))))
    cip = spec.get("clusterIP")
    if cip in ("", "None"):
        raise LabSpecError(f"{where}: headless services are not supported")
    if cip is not None:
        try:
            ipaddress.IPv4Address(cip)
        except ValueError:
            raise LabSpecError(f"{where}: clusterIP {cip!r} is not an IPv4 address") from None
    return Service(ns, name, {str(k): str(v) for k, v in selector.items()}, ports, cip, doc)


def parse_resources(docs: list[dict[str, Any]], source: str = "lab file") -> Resources:
    """The Kubernetes-shaped documents (``Lab`` is skipped); duplicates are refused."""
    res = Resources()
    for i, doc in enumerate(docs):
        kind = doc["kind"]
        where = f"{source}: document {i + 1} ({kind})"
        if kind == "Lab":
            continue
        if kind == "Namespace":
            _, name = _meta(doc, where, namespaced=False)
            if name in res.namespaces:
                raise LabSpecError(f"{where}: duplicate Namespace {name}")
            res.namespaces[name] = doc
        elif kind == "Pod":
            pod = parse_pod(doc, where)
            if pod.key in res.pods:
                raise LabSpecError(f"{where}: duplicate Pod {pod.key}")
            res.pods[pod.key] = pod
        elif kind == "Service":
            svc = parse_service(doc, where)
            if svc.key in res.services:
                raise LabSpecError(f"{where}: duplicate Service {svc.key}")
            res.services[svc.key] = svc
        else:
            ns, name = _meta(doc, where)
            key = f"{kind}/{ns}/{name}"
            if key in res.others:
                raise LabSpecError(f"{where}: duplicate {kind} {ns}/{name}")
            res.others[key] = doc
    return res


def parse_lab(text: str, source: str = "lab file") -> LabSpec:
    """Parse and validate a whole lab file; raise :class:`LabSpecError` with the reason."""
    docs = load_documents(text, source)
    labs = [d for d in docs if d["kind"] == "Lab"]
    if len(labs) != 1:
        raise LabSpecError(f"{source}: needs exactly one kind: Lab document, found {len(labs)}")
    lab = labs[0]
    if lab.get("apiVersion") != LAB_API_VERSION:
        raise LabSpecError(f"{source}: Lab apiVersion must be {LAB_API_VERSION}")
    spec = lab.get("spec")
    if not isinstance(spec, dict):
        raise LabSpecError(f"{source}: Lab spec missing")
    raw_nodes = spec.get("nodes")
    if not isinstance(raw_nodes, list) or not raw_nodes:
        raise LabSpecError(f"{source}: Lab spec.nodes must list at least one node")
    if len(raw_nodes) > MAX_NODES:
        raise LabSpecError(f"{source}: at most {MAX_NODES} nodes")
    nodes: list[Node] = []
    for i, n in enumerate(raw_nodes):
        name = n.get("name") if isinstance(n, dict) else None
        if not isinstance(name, str) or not _DNS_LABEL.match(name):
            raise LabSpecError(f"{source}: Lab spec.nodes[{i}].name {name!r} is not a DNS label")
        if any(x.name == name for x in nodes):
            raise LabSpecError(f"{source}: duplicate node {name}")
        workers = n.get("workers", 1)
        if not isinstance(workers, int) or isinstance(workers, bool) or not 1 <= workers <= 64:
            raise LabSpecError(
                f"{source}: Lab spec.nodes[{i}].workers must be an integer from 1 to 64"
            )
        nodes.append(Node(name, i, workers))
    mesh = spec.get("mesh", True)
    if not isinstance(mesh, bool):
        raise LabSpecError(f"{source}: Lab spec.mesh must be true or false")
    ttl = spec.get("certificateTTL")
    if ttl is not None and (not isinstance(ttl, int) or isinstance(ttl, bool) or ttl < 4):
        raise LabSpecError(f"{source}: Lab spec.certificateTTL must be seconds (>= 4)")
    vms = parse_vms(spec.get("vms"), {n.name for n in nodes}, source)
    res = parse_resources(docs, source)
    spec_obj = LabSpec(nodes, mesh, res, ttl, vms)
    check_pods_placed(spec_obj, res.pods.values())
    assign_cluster_ips(res.services)
    return spec_obj


def parse_vms(raw: Any, node_names: set[str], source: str = "lab file") -> list[VM]:
    """``Lab spec.vms``: [{name, namespace, serviceAccount, labels, command, ports}]."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise LabSpecError(f"{source}: Lab spec.vms must be a list")
    if len(raw) > MAX_VMS:
        raise LabSpecError(f"{source}: at most {MAX_VMS} VMs")
    vms: list[VM] = []
    for i, v in enumerate(raw):
        where = f"{source}: Lab spec.vms[{i}]"
        if not isinstance(v, dict):
            raise LabSpecError(f"{where} is not a mapping")
        unknown = set(v) - {"name", "namespace", "serviceAccount", "labels", "command", "ports"}
        if unknown:
            raise LabSpecError(f"{where}: unknown field(s) {sorted(map(str, unknown))}")
        name = v.get("name")
        if not isinstance(name, str) or not _DNS_LABEL.match(name):
            raise LabSpecError(f"{where}.name {name!r} is not a DNS label")
        # the VM's name is its node name for the CA: it must not be a node's
        if name in node_names or any(x.name == name for x in vms):
            raise LabSpecError(f"{where}: name {name} is already a node or VM")
        ns = v.get("namespace", "default")
        sa = v.get("serviceAccount", "default")
        for field_name, value in (("namespace", ns), ("serviceAccount", sa)):
            if not isinstance(value, str) or not _DNS_LABEL.match(value):
                raise LabSpecError(f"{where}.{field_name} {value!r} is not a DNS label")
        labels = v.get("labels") or {}
        if not isinstance(labels, dict) or not all(
            isinstance(k, str) and isinstance(x, str) for k, x in labels.items()
        ):
            raise LabSpecError(f"{where}.labels must map strings to strings")
        command = v.get("command") or []
        if not isinstance(command, list) or not all(
            isinstance(a, str | int) and not isinstance(a, bool) for a in command
        ):
            raise LabSpecError(f"{where}.command must be a list of arguments")
        ports = v.get("ports") or {}
        if not isinstance(ports, dict) or not all(isinstance(k, str) and k for k in ports):
            raise LabSpecError(f"{where}.ports must map port names to numbers")
        vms.append(
            VM(
                name, i, ns, sa, dict(labels), [str(a) for a in command],
                {k: _port(p, f"{where}.ports.{k}") for k, p in ports.items()},
            )
        )
    return vms


def check_pods_placed(spec: LabSpec, pods: Any) -> None:
    names = {n.name for n in spec.nodes}
    for pod in pods:
        if pod.node not in names:
            raise LabSpecError(
                f"Pod {pod.key}: spec.nodeName {pod.node!r} is not a lab node "
                f"({', '.join(sorted(names))})"
            )


def assign_cluster_ips(services: dict[str, Service]) -> None:
    """Fill in missing cluster IPs exactly as the control plane would allocate them."""
    seen: dict[str, str] = {}
    for s in services.values():
        if s.cluster_ip:
            if s.cluster_ip in seen:
                raise LabSpecError(
                    f"Service {s.key}: clusterIP {s.cluster_ip} already used by "
                    f"{seen[s.cluster_ip]}"
                )
            seen[s.cluster_ip] = s.key
    ips = allocate_cluster_ips((s.key, s.cluster_ip) for s in services.values())
    for key, s in services.items():
        s.cluster_ip = ips[key]


# -- names -------------------------------------------------------------------------------


def _short(name: str) -> str:
    digest = hashlib.sha256(name.encode()).hexdigest()[:10]
    return f"{name[: MAX_NETNS_NAME - 11]}-{digest}"


def underlay_netns(prefix: str) -> str:
    return f"{prefix}underlay"


def node_netns(prefix: str, node: str) -> str:
    name = f"{prefix}node-{node}"
    return name if len(name) <= MAX_NETNS_NAME else _short(name)


def vm_netns(prefix: str, vm: str) -> str:
    name = f"{prefix}vm-{vm}"
    return name if len(name) <= MAX_NETNS_NAME else _short(name)


def pod_netns(prefix: str, namespace: str, pod: str) -> str:
    name = f"{prefix}{namespace}-{pod}"
    return name if len(name) <= MAX_NETNS_NAME else _short(name)


# -- resources as the control plane sees them --------------------------------------------


def pod_resource(
    pod: Pod, uid: str, ip: str | None = None, phase: str | None = None
) -> dict[str, Any]:
    """The Pod as the API server would hold it: the file's document plus uid (and status)."""
    doc = copy.deepcopy(pod.doc)
    doc.setdefault("apiVersion", "v1")
    meta = doc.setdefault("metadata", {})
    meta.setdefault("namespace", pod.namespace)
    meta["uid"] = uid
    doc.pop("status", None)
    if ip is not None:
        doc["status"] = {"phase": phase or "Running", "podIP": ip, "podIPs": [{"ip": ip}]}
    elif phase is not None:
        doc["status"] = {"phase": phase}
    return doc


def workload_entry_resource(vm: VM) -> dict[str, Any]:
    """The VM declared to the control plane: address, identity, labels, its node name."""
    spec: dict[str, Any] = {
        "address": vm.underlay_ip,
        "serviceAccount": vm.service_account,
        "node": vm.name,
    }
    if vm.ports:
        spec["ports"] = dict(vm.ports)
    return {
        "apiVersion": WORKLOADENTRY_API_VERSION,
        "kind": "WorkloadEntry",
        "metadata": {"name": vm.name, "namespace": vm.namespace, "labels": dict(vm.labels)},
        "spec": spec,
    }


def service_resource(svc: Service) -> dict[str, Any]:
    doc = copy.deepcopy(svc.doc)
    doc.setdefault("apiVersion", "v1")
    doc.setdefault("metadata", {}).setdefault("namespace", svc.namespace)
    doc["spec"]["clusterIP"] = svc.cluster_ip
    doc["spec"]["clusterIPs"] = [svc.cluster_ip]
    return doc


def namespace_resource(name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": name, "labels": dict(labels or {})},
    }


def resource_filename(kind: str, namespace: str, name: str) -> str:
    kind = kind.lower()
    return f"{kind}-{name}.yaml" if kind == "namespace" else f"{kind}-{namespace}-{name}.yaml"


# -- names inside pods -------------------------------------------------------------------


def hosts_file(
    pod_namespace: str, pod_name: str, pod_ip: str | None, services: list[Service]
) -> str:
    """``/etc/hosts`` for a pod: its own name and every service's names → cluster IP.

    glibc's ``files`` backend does not apply the resolv.conf search list, so every form a
    caller may use is written out: ``SVC.NS.svc.cluster.local``, ``SVC.NS.svc``, ``SVC.NS``,
    and the bare ``SVC`` for services of the pod's own namespace.
    """
    lines = [
        "# written by nodeproxy lab",
        "127.0.0.1\tlocalhost",
        "::1\tlocalhost ip6-localhost ip6-loopback",
    ]
    if pod_ip:
        lines.append(f"{pod_ip}\t{pod_name}")
    for s in sorted(services, key=lambda s: s.key):
        if not s.cluster_ip:
            continue
        names = [
            f"{s.name}.{s.namespace}.svc.cluster.local",
            f"{s.name}.{s.namespace}.svc",
            f"{s.name}.{s.namespace}",
        ]
        if s.namespace == pod_namespace:
            names.append(s.name)
        lines.append(f"{s.cluster_ip}\t{' '.join(names)}")
    return "\n".join(lines) + "\n"


def resolv_conf(pod_namespace: str) -> str:
    """No name server: names resolve through the hosts file only, and fail fast otherwise."""
    return (
        "# written by nodeproxy lab: service names are in /etc/hosts\n"
        f"search {pod_namespace}.svc.cluster.local svc.cluster.local cluster.local\n"
        "nameserver 127.0.0.1\n"
        "options ndots:5 timeout:1 attempts:1\n"
    )


# -- kube-proxy role ---------------------------------------------------------------------

SERVICES_CHAIN = "NPLAB-SERVICES"
POSTROUTING_CHAIN = "NPLAB-POSTROUTING"


def endpoints_of(svc: Service, pods: list[tuple[Pod, str]]) -> list[tuple[Pod, str]]:
    """(pod, ip) of running pods the service selects (same namespace, all labels match)."""
    if not svc.selector:
        return []
    return sorted(
        (
            (p, ip)
            for p, ip in pods
            if p.namespace == svc.namespace
            and all(p.labels.get(k) == v for k, v in svc.selector.items())
        ),
        key=lambda t: t[0].key,
    )


def kube_proxy_rules(
    services: list[Service], pods: list[tuple[Pod, str]], node_pod_cidr: str
) -> str:
    """``iptables-restore --noflush`` input for one node's nat table.

    Declaring the chains flushes them, so each call replaces the whole rule set. Endpoints
    are chosen at random with the usual 1/n, 1/(n-1), … probabilities. Traffic DNATed to a
    pod on this same node is masqueraded, or the reply would skip the node's conntrack.
    """
    out = [
        "*nat",
        f":{SERVICES_CHAIN} - [0:0]",
        f":{POSTROUTING_CHAIN} - [0:0]",
    ]
    for svc in sorted(services, key=lambda s: s.key):
        eps = endpoints_of(svc, pods)
        for sp in svc.ports:
            targets = []
            for pod, ip in eps:
                tp = sp.target_port if isinstance(sp.target_port, int) else pod.named_port(
                    sp.target_port
                )
                if tp is not None:
                    targets.append(f"{ip}:{tp}")
            n = len(targets)
            for i, target in enumerate(targets):
                match = (
                    f"-A {SERVICES_CHAIN} -d {svc.cluster_ip}/32 -p tcp -m tcp --dport {sp.port}"
                )
                comment = f'-m comment --comment "{svc.key}:{sp.port}"'
                if i < n - 1:
                    prob = 1.0 / (n - i)
                    out.append(
                        f"{match} {comment} -m statistic --mode random --probability "
                        f"{prob:.10f} -j DNAT --to-destination {target}"
                    )
                else:
                    out.append(f"{match} {comment} -j DNAT --to-destination {target}")
    out.append(
        f"-A {POSTROUTING_CHAIN} -s {node_pod_cidr} -d {node_pod_cidr} "
        "-m conntrack --ctstate DNAT -j MASQUERADE"
    )
    out.append("COMMIT")
    return "\n".join(out) + "\n"
