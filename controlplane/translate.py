"""Typed resources → :class:`nodeproxy.model.MeshState`. Pure: no IO, deterministic.

Policy mapping (Istio ``AuthorizationPolicy`` → ztunnel-style rules): every Istio rule becomes
one :class:`model.Rule` with up to two clauses, one for ``from`` and one for ``to``; each
clause holds one :class:`model.Match` per source (or operation), and those matches OR
together — sources of a ``from`` list are alternatives, as in Istio. An empty rule
(``rules: [{}]``) has no clauses and matches everything; a policy without rules matches
nothing, so an ALLOW policy without rules denies everything it selects, as Istio does.

Istio conditions this mesh cannot enforce (``when``, ``hosts``, ``requestPrincipals``…) fail
closed, the way ztunnel treats L7 attributes it cannot see: an ALLOW rule carrying one is
dropped (it allows nothing), a DENY rule carrying one is kept without it (it denies more).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from controlplane import resources as res
from nodeproxy import model

log = logging.getLogger(__name__)


def translate(
    resources: Iterable[res.Resource],
    *,
    version: int = 0,
    trust_domain: str = model.TRUST_DOMAIN,
) -> model.MeshState:
    """Build the mesh state; when two resources share a key the later one wins (logged)."""
    namespaces: dict[str, res.Namespace] = {}
    pods: dict[str, res.Pod] = {}
    services: dict[str, res.Service] = {}
    policies: dict[str, res.AuthorizationPolicy] = {}
    routes: dict[str, res.Route] = {}
    entries: dict[str, res.WorkloadEntry] = {}
    tables: dict[type, dict] = {
        res.Namespace: namespaces,
        res.Pod: pods,
        res.Service: services,
        res.AuthorizationPolicy: policies,
        res.Route: routes,
        res.WorkloadEntry: entries,
    }
    for r in resources:
        table = tables.get(type(r))
        if table is None:
            continue  # Unhandled kinds are someone else's (the lab)
        if r.key in table:
            log.warning("duplicate resource %s: the later definition wins", r.key)
        table[r.key] = r

    state = model.MeshState(version=version)
    for ns in namespaces.values():
        state.namespaces[ns.name] = model.Namespace(name=ns.name, labels=dict(ns.labels))

    for pod in pods.values():
        ns = namespaces.get(f"Namespace/{pod.namespace}")
        w = _workload(pod, ns.labels if ns else {}, trust_domain)
        if w.uid in state.workloads:
            log.warning("duplicate workload uid %s (pod %s): the later one wins", w.uid, pod.key)
        state.workloads[w.uid] = w
    for entry in entries.values():
        ns = namespaces.get(f"Namespace/{entry.namespace}")
        w = _vm_workload(entry, ns.labels if ns else {}, trust_domain)
        other = state.workload_by_ip(entry.address)
        if other is not None:
            log.warning(
                "WorkloadEntry %s/%s: address %s is also workload %s",
                entry.namespace, entry.name, entry.address, other.uid,
            )
        state.workloads[w.uid] = w

    vips = model.allocate_cluster_ips(
        (f"{s.namespace}/{s.name}", s.cluster_ip) for s in services.values()
        if s.cluster_ip != "None"
    )
    for svc in services.values():
        key = f"{svc.namespace}/{svc.name}"
        endpoints: tuple[str, ...] = ()
        if svc.selector:
            endpoints = tuple(
                sorted(
                    w.uid
                    for w in state.workloads.values()
                    if w.namespace == svc.namespace
                    and all(w.labels.get(k) == v for k, v in svc.selector.items())
                )
            )
        state.services[key] = model.Service(
            name=svc.name,
            namespace=svc.namespace,
            addresses=(vips[key],) if key in vips else (),
            ports=tuple(
                model.ServicePort(
                    port=p.port, target_port=p.target_port, name=p.name, protocol=p.protocol
                )
                for p in svc.ports
            ),
            selector=dict(svc.selector),
            endpoints=endpoints,
            trust_domain=trust_domain,
        )

    for pol in policies.values():
        p = _policy(pol)
        state.policies[p.key] = p
    for r in routes.values():
        state.routes[r.route.key] = r.route
    for gw in _gateways(state, trust_domain):
        state.gateways[gw.key] = gw
    return state


def _gateways(state: model.MeshState, trust_domain: str) -> list[model.Gateway]:
    """A gateway for every namespace labelled for one, once its gateway pods have addresses.

    Until then the namespace is served L4-only, so labelling it never blackholes traffic.
    """
    out = []
    for ns in state.namespaces.values():
        if ns.labels.get(model.GATEWAY_LABEL) != "enabled":
            continue
        addresses = tuple(
            sorted(
                a
                for w in state.workloads.values()
                if w.namespace == ns.name
                and w.labels.get(model.GATEWAY_POD_LABEL) == ns.name
                and w.service_account == model.GATEWAY_SERVICE_ACCOUNT
                and w.healthy
                for a in w.addresses
            )
        )
        if addresses:
            out.append(model.Gateway(ns.name, addresses, trust_domain=trust_domain))
    return out


def enrolled(pod_labels: dict[str, str], namespace_labels: dict[str, str]) -> bool:
    """Whether a pod is in the mesh: its namespace is ambient (and it did not opt out), or
    it asked for it itself."""
    own = pod_labels.get(model.DATAPLANE_LABEL)
    if own == "none":
        return False
    return own == "ambient" or namespace_labels.get(model.DATAPLANE_LABEL) == "ambient"


def _workload(pod: res.Pod, ns_labels: dict[str, str], trust_domain: str) -> model.Workload:
    addresses: list[str] = []
    for ip in (pod.pod_ip, *pod.pod_ips):
        if ip and ip not in addresses:
            addresses.append(ip)
    return model.Workload(
        uid=pod.uid or f"{pod.namespace}/{pod.name}",
        name=pod.name,
        namespace=pod.namespace,
        node=pod.node_name,
        service_account=pod.service_account,
        addresses=tuple(addresses),
        labels=dict(pod.labels),
        protocol=model.HBONE if enrolled(pod.labels, ns_labels) else model.TCP,
        trust_domain=trust_domain,
        healthy=pod.phase in ("", "Running"),
        named_ports={p.name: p.container_port for p in pod.ports if p.name},
    )


def vm_uid(namespace: str, name: str) -> str:
    """A VM's workload uid (``ztunnel.hostmode`` finds its own workload by it)."""
    return f"vm/{namespace}/{name}"


def _vm_workload(
    entry: res.WorkloadEntry, ns_labels: dict[str, str], trust_domain: str
) -> model.Workload:
    return model.Workload(
        uid=vm_uid(entry.namespace, entry.name),
        name=entry.name,
        namespace=entry.namespace,
        node=entry.node,
        service_account=entry.service_account,
        addresses=(entry.address,),
        labels=dict(entry.labels),
        protocol=model.HBONE if enrolled(entry.labels, ns_labels) else model.TCP,
        trust_domain=trust_domain,
        named_ports=dict(entry.ports),
    )


def policy_scope(namespace: str, selector: dict[str, str] | None) -> str:
    if selector:
        return "workload"
    return "global" if namespace == model.ROOT_NAMESPACE else "namespace"


def _policy(pol: res.AuthorizationPolicy) -> model.Policy:
    rules: list[model.Rule] = []
    for i, rule in enumerate(pol.rules):
        if rule.unsupported:
            if pol.action == "ALLOW":
                log.warning(
                    "policy %s/%s rule %d uses unsupported %s: ALLOW rule dropped (fails closed)",
                    pol.namespace, pol.name, i, ", ".join(rule.unsupported),
                )
                continue
            log.warning(
                "policy %s/%s rule %d uses unsupported %s: DENY rule applied without them",
                pol.namespace, pol.name, i, ", ".join(rule.unsupported),
            )
        rules.append(_rule(rule))
    return model.Policy(
        name=pol.name,
        namespace=pol.namespace,
        scope=policy_scope(pol.namespace, pol.selector),
        action=pol.action,
        selector=dict(pol.selector or {}),
        rules=tuple(rules),
    )


def _rule(rule: res.PolicyRule) -> model.Rule:
    clauses: list[model.Clause] = []
    if rule.sources:
        clauses.append(
            model.Clause(
                matches=tuple(
                    model.Match(
                        principals=s.principals,
                        not_principals=s.not_principals,
                        namespaces=s.namespaces,
                        not_namespaces=s.not_namespaces,
                        source_ips=s.ip_blocks,
                        not_source_ips=s.not_ip_blocks,
                    )
                    for s in rule.sources
                )
            )
        )
    if rule.operations:
        clauses.append(
            model.Clause(
                matches=tuple(
                    model.Match(
                        destination_ports=o.ports,
                        not_destination_ports=o.not_ports,
                        methods=o.methods,
                        not_methods=o.not_methods,
                        paths=o.paths,
                        not_paths=o.not_paths,
                    )
                    for o in rule.operations
                )
            )
        )
    return model.Rule(clauses=tuple(clauses))


def same_content(a: model.MeshState, b: model.MeshState) -> bool:
    """Equal apart from the version number."""
    return all(getattr(a, kind) == getattr(b, kind) for kind in model.KINDS)


def is_news(old: model.MeshState | None, new: model.MeshState) -> bool:
    """Whether a source should publish ``new`` (its content differs from ``old``); logs it."""
    if old is not None and same_content(old, new):
        return False
    log.info(
        "mesh state v%d: %d workloads, %d services, %d policies, %d namespaces",
        new.version, len(new.workloads), len(new.services), len(new.policies),
        len(new.namespaces),
    )
    return True
