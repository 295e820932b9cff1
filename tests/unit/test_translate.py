"""Resources → MeshState translation."""

from __future__ import annotations

from controlplane.resources import parse_documents
from controlplane.translate import same_content, translate
from nodeproxy import model

NS = """
kind: Namespace
metadata: {name: mesh, labels: {nodeproxy.io/dataplane-mode: ambient}}
---
kind: Namespace
metadata: {name: plain}
"""


def pod(name, ns, labels="{}", ip="", phase="Running", node="n1", uid=None, ports="[]"):
    uid_line = f", uid: {uid}" if uid else ""
    return (
        f"kind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {labels}{uid_line}}}\n"
        f"spec: {{nodeName: {node}, containers: [{{ports: {ports}}}]}}\n"
        f"status: {{podIP: '{ip}', phase: '{phase}'}}\n"
    )


def state_of(*docs, **kw):
    return translate(parse_documents("\n---\n".join(docs)), **kw)


def test_ambient_namespace_enrols_pods_and_pod_label_opts_in_or_out():
    s = state_of(
        NS,
        pod("a", "mesh", ip="10.0.0.1"),
        pod("out", "mesh", labels="{nodeproxy.io/dataplane-mode: none}"),
        pod("b", "plain"),
        pod("in", "plain", labels="{nodeproxy.io/dataplane-mode: ambient}"),
        pod("c", "undeclared"),
    )
    proto = {w.name: w.protocol for w in s.workloads.values()}
    assert proto == {"a": "HBONE", "out": "TCP", "b": "TCP", "in": "HBONE", "c": "TCP"}
    a = s.workloads["mesh/a"]  # uid defaults to ns/name
    assert a.addresses == ("10.0.0.1",) and a.node == "n1" and a.meshed
    assert a.identity == "spiffe://cluster.local/ns/mesh/sa/default"
    assert set(s.namespaces) == {"mesh", "plain"} and s.namespaces["mesh"].ambient


def test_workload_fields_uid_health_ports_and_trust_domain():
    s = state_of(
        NS,
        pod("a", "mesh", uid="abc", phase="Pending", ports="[{name: http, containerPort: 8080}]"),
        pod("b", "mesh", phase=""),
        trust_domain="example.org",
    )
    a = s.workloads["abc"]
    assert not a.healthy and a.named_ports == {"http": 8080}
    assert a.identity == "spiffe://example.org/ns/mesh/sa/default"
    assert s.workloads["mesh/b"].healthy  # no phase yet: healthy


def test_service_endpoints_follow_selector_within_namespace_and_named_target_ports():
    s = state_of(
        NS,
        pod("w1", "mesh", labels="{app: web, v: '1'}", ports="[{name: http, containerPort: 8080}]"),
        pod("w2", "mesh", labels="{app: web, v: '2'}", ports="[{name: http, containerPort: 8081}]"),
        pod("other", "mesh", labels="{app: db}"),
        pod("w3", "plain", labels="{app: web}"),
        "kind: Service\nmetadata: {name: web, namespace: mesh}\n"
        "spec: {selector: {app: web}, ports: [{port: 80, targetPort: http}]}",
        "kind: Service\nmetadata: {name: manual, namespace: mesh}\nspec: {ports: [{port: 1}]}",
    )
    web = s.services["mesh/web"]
    assert web.endpoints == ("mesh/w1", "mesh/w2")
    port = web.port(80)
    assert port is not None and port.target_port == "http"
    targets = {w.name: s.target_port(web, port, w) for w in s.endpoints(web)}
    assert targets == {"w1": 8080, "w2": 8081}
    assert s.services["mesh/manual"].endpoints == ()  # no selector: no endpoints


def test_cluster_ips_kept_allocated_or_headless():
    s = state_of(
        "kind: Service\nmetadata: {name: fixed}\nspec: {clusterIP: 10.96.0.2}",
        "kind: Service\nmetadata: {name: auto}\nspec: {}",
        "kind: Service\nmetadata: {name: headless}\nspec: {clusterIP: None}",
    )
    assert s.services["default/fixed"].addresses == ("10.96.0.2",)
    assert s.services["default/auto"].addresses == ("10.96.0.3",)  # .1 reserved, .2 taken
    assert s.services["default/headless"].addresses == ()
    assert s.service_by_vip("10.96.0.3").name == "auto"


POLICIES = """
apiVersion: security.nodeproxy.io/v1
kind: AuthorizationPolicy
metadata: {name: global, namespace: nodeproxy-system}
spec: {action: DENY, rules: [{from: [{source: {namespaces: [evil]}}]}]}
---
apiVersion: security.nodeproxy.io/v1
kind: AuthorizationPolicy
metadata: {name: ns-wide, namespace: mesh}
spec: {rules: [{}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: web, namespace: mesh}
spec:
  selector: {matchLabels: {app: web}}
  rules:
  - from:
    - source: {principals: [cluster.local/ns/mesh/sa/fe], notIpBlocks: [10.9.0.0/16]}
    - source: {namespaces: [ops], notPrincipals: ["*/sa/bad"]}
    to:
    - operation: {ports: ["8080"], notPaths: [/admin]}
    - operation: {notPorts: [9090], methods: [GET, HEAD]}
  - to: [{operation: {ports: [22]}}]
---
apiVersion: security.nodeproxy.io/v1
kind: AuthorizationPolicy
metadata: {name: nothing, namespace: mesh}
spec: {selector: {matchLabels: {app: locked}}}
"""


def test_policy_scopes_and_rule_mapping():
    s = state_of(NS, POLICIES)
    glob, ns_wide, web, nothing = (
        s.policies[k] for k in ("nodeproxy-system/global", "mesh/ns-wide", "mesh/web",
                                "mesh/nothing")
    )
    assert (glob.scope, glob.action) == ("global", "DENY")
    assert glob.rules == (model.Rule((model.Clause((model.Match(namespaces=("evil",)),)),)),)
    assert ns_wide.scope == "namespace"
    assert ns_wide.rules == (model.Rule(clauses=()),)  # rules: [{}] matches everything
    assert web.scope == "workload" and web.selector == {"app": "web"}
    assert web.rules == (
        model.Rule(
            (
                model.Clause(
                    (
                        model.Match(
                            principals=("cluster.local/ns/mesh/sa/fe",),
                            not_source_ips=("10.9.0.0/16",),
                        ),
                        model.Match(namespaces=("ops",), not_principals=("*/sa/bad",)),
                    )
                ),
                model.Clause(
                    (
                        model.Match(destination_ports=(8080,), not_paths=("/admin",)),
                        model.Match(not_destination_ports=(9090,), methods=("GET", "HEAD")),
                    )
                ),
            )
        ),
        model.Rule((model.Clause((model.Match(destination_ports=(22,)),)),)),
    )
    # ALLOW without rules: a policy that matches nothing, i.e. denies all it selects
    assert (nothing.action, nothing.rules, nothing.scope) == ("ALLOW", (), "workload")
    # survives the wire form the proxies receive
    assert model.MeshState.from_json(s.to_json()) == s


def test_unsupported_conditions_fail_closed():
    s = state_of(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
        "metadata: {name: allow, namespace: mesh}\n"
        "spec: {rules: [{when: [{key: 'request.auth.claims[iss]', values: [x]}]}, {to: [{operation:"
        " {ports: [80]}}]}]}",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
        "metadata: {name: deny, namespace: mesh}\n"
        "spec: {action: DENY, rules: [{to: [{operation: {ports: [80], hosts: [x]}}]}]}",
    )
    # the ALLOW rule with `when` is dropped; the other one stays
    assert s.policies["mesh/allow"].rules == (
        model.Rule((model.Clause((model.Match(destination_ports=(80,)),)),)),
    )
    # the DENY rule keeps applying, without the host condition (denies more)
    assert s.policies["mesh/deny"].rules == (
        model.Rule((model.Clause((model.Match(destination_ports=(80,)),)),)),
    )


def test_later_duplicate_wins_and_version_is_the_callers():
    s = state_of(NS, pod("a", "mesh", ip="10.0.0.1"), pod("a", "mesh", ip="10.0.0.2"), version=7)
    assert s.version == 7 and s.workloads["mesh/a"].addresses == ("10.0.0.2",)
    t = state_of(NS, pod("a", "mesh", ip="10.0.0.2"), version=8)
    assert same_content(s, t) and s != t
    assert not same_content(s, state_of(NS, version=7))
