"""Parsing and validation of Kubernetes-shaped YAML resources."""

from __future__ import annotations

import pytest

from controlplane.resources import (
    AuthorizationPolicy,
    ContainerPort,
    Namespace,
    Operation,
    Pod,
    ResourceError,
    Service,
    ServicePortSpec,
    Source,
    Unhandled,
    parse_documents,
    parse_file,
)

GOOD = """
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels: {nodeproxy.io/dataplane-mode: ambient}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, uid: u-1, labels: {app: web}}
spec:
  nodeName: node-a
  serviceAccountName: web
  containers:
  - name: app
    ports: [{name: http, containerPort: 8080}, {containerPort: 9090}]
status:
  podIP: 10.0.0.5
  podIPs: [{ip: 10.0.0.5}, {ip: "fd00::5"}]
  phase: Running
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  selector: {app: web}
  clusterIP: 10.96.0.10
  ports:
  - {port: 80, targetPort: http, name: http}
  - {port: 9090}
  - {port: 8443, targetPort: "8443", protocol: tcp}
---
# an empty document is skipped
---
apiVersion: security.nodeproxy.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-frontend, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  action: ALLOW
  rules:
  - from:
    - source: {principals: [cluster.local/ns/shop/sa/frontend], notNamespaces: [evil]}
    - source: {ipBlocks: [10.1.0.0/16]}
    to:
    - operation: {ports: ["8080", 9090], methods: [GET]}
---
apiVersion: nodeproxy.io/v1
kind: Lab
metadata: {name: lab}
spec: {nodes: [a, b]}
"""


def test_parses_every_kind_with_defaults():
    ns, pod, svc, pol, lab = parse_documents(GOOD, "good.yaml")
    assert ns == Namespace("shop", {"nodeproxy.io/dataplane-mode": "ambient"})
    assert pod == Pod(
        name="web-1", namespace="shop", uid="u-1", labels={"app": "web"}, node_name="node-a",
        service_account="web", ports=(ContainerPort(8080, "http"), ContainerPort(9090)),
        pod_ip="10.0.0.5", pod_ips=("10.0.0.5", "fd00::5"), phase="Running",
    )
    assert svc == Service(
        name="web", namespace="shop", selector={"app": "web"}, cluster_ip="10.96.0.10",
        ports=(
            ServicePortSpec(80, "http", "http"),
            ServicePortSpec(9090, 9090),  # targetPort defaults to port
            ServicePortSpec(8443, 8443, protocol="TCP"),
        ),
    )
    assert isinstance(pol, AuthorizationPolicy)
    assert pol.selector == {"app": "web"} and pol.action == "ALLOW"
    (rule,) = pol.rules
    assert rule.sources == (
        Source(principals=("cluster.local/ns/shop/sa/frontend",), not_namespaces=("evil",)),
        Source(ip_blocks=("10.1.0.0/16",)),
    )
    assert rule.operations == (Operation(ports=(8080, 9090), methods=("GET",)),)
    assert isinstance(lab, Unhandled) and lab.kind == "Lab" and lab.raw["spec"]["nodes"] == [
        "a", "b"
    ]


def test_defaults_namespace_service_account_and_action():
    pod, pol = parse_documents(
        "kind: Pod\nmetadata: {name: p}\n---\n"
        "apiVersion: security.istio.io/v1beta1\nkind: AuthorizationPolicy\n"
        "metadata: {name: deny-all}\nspec: {}\n"
    )
    assert pod.namespace == "default" and pod.service_account == "default"
    assert pol.namespace == "default" and pol.action == "ALLOW" and pol.rules == ()
    assert pol.selector is None


def test_kubectl_list_is_flattened():
    (a, b) = parse_documents(
        "kind: List\nitems:\n- {kind: Namespace, metadata: {name: a}}\n"
        "- {kind: Namespace, metadata: {name: b}}\n"
    )
    assert (a.name, b.name) == ("a", "b")


def test_when_and_hosts_are_kept_as_unsupported():
    (pol,) = parse_documents(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\n"
        "spec:\n  rules:\n  - when: [{key: 'request.auth.claims[iss]', values: [x]}]\n"
        "    to: [{operation: {hosts: [a.example]}}]\n"
    )
    assert set(pol.rules[0].unsupported) == {"when", "hosts"}


@pytest.mark.parametrize(
    ("text", "field", "reason"),
    [
        ("- just\n- a list\n", "", "must be a mapping, not list"),
        ("metadata: {name: x}\n", "kind", "is required"),
        ("kind: Pod\n", "metadata", "is required"),
        ("kind: Pod\nmetadata: {namespace: x}\n", "metadata.name", "is required"),
        ("kind: Pod\nmetadata: {name: 7}\n", "metadata.name", "must be a string, not int"),
        ("kind: Pod\nmetadata: {name: p, labels: {mesh: true}}\n", "metadata.labels.mesh",
         "must be a string (quote it), not bool"),
        ("kind: Pod\nmetadata: {name: p}\nspec: {containers: [{ports: [{containerPort: x}]}]}\n",
         "spec.containers[0].ports[0].containerPort", "must be a port number, not str"),
        ("kind: Pod\nmetadata: {name: p}\nstatus: {podIP: 10.0.0.300}\n", "status.podIP",
         "is not an IP address"),
        ("kind: Pod\nmetadata: {name: p}\nspec: [1]\n", "spec", "must be a mapping, not list"),
        ("kind: Service\nmetadata: {name: s}\nspec: {ports: [{port: 70000}]}\n",
         "spec.ports[0].port", "outside 1-65535"),
        ("kind: Service\nmetadata: {name: s}\nspec: {ports: [{name: x}]}\n",
         "spec.ports[0].port", "is required"),
        ("kind: Service\nmetadata: {name: s}\nspec: {ports: [{port: 1, protocol: ICMP}]}\n",
         "spec.ports[0].protocol", "must be one of"),
        ("kind: Pod\napiVersion: v2\nmetadata: {name: p}\n", "apiVersion", "must be apiVersion v1"),
        ("kind: AuthorizationPolicy\napiVersion: security.istio.io/v2\nmetadata: {name: p}\n",
         "apiVersion", "is not one of"),
        ("kind: AuthorizationPolicy\napiVersion: security.nodeproxy.io/v1\nmetadata: {name: p}\n"
         "spec: {action: AUDIT}\n", "spec.action", "is not one of ALLOW, DENY"),
        ("kind: AuthorizationPolicy\napiVersion: security.nodeproxy.io/v1\nmetadata: {name: p}\n"
         "spec: {rules: [{from: [{source: {principal: [x]}}]}]}\n", "spec.rules[0].from[0].source",
         "unknown field 'principal'"),
        ("kind: AuthorizationPolicy\napiVersion: security.nodeproxy.io/v1\nmetadata: {name: p}\n"
         "spec: {rules: [{to: [{operation: {ports: [http]}}]}]}\n",
         "spec.rules[0].to[0].operation.ports[0]", "must be a port number"),
        ("kind: AuthorizationPolicy\napiVersion: security.nodeproxy.io/v1\nmetadata: {name: p}\n"
         "spec: {rules: [{from: [{source: {ipBlocks: [not-an-ip]}}]}]}\n",
         "spec.rules[0].from[0].source", "is not an IP or CIDR"),
        ("kind: AuthorizationPolicy\napiVersion: security.nodeproxy.io/v1\nmetadata: {name: p}\n"
         "spec: {rules: [{frm: []}]}\n", "spec.rules[0]", "unknown field(s) ['frm']"),
    ],
)
def test_wrong_shapes_name_file_document_and_field(text, field, reason):
    with pytest.raises(ResourceError) as info:
        parse_documents("kind: Namespace\nmetadata: {name: ok}\n---\n" + text, "bad.yaml")
    err = info.value
    assert (err.source, err.document, err.field) == ("bad.yaml", 1, field)
    assert reason in err.reason
    assert str(err).startswith(f"bad.yaml: document 1: {field}")


@pytest.mark.parametrize(
    "text",
    [
        "kind: Pod\nmetadata: {name: [unclosed\n",
        "a: b: c\n",
        "kind: Pod\n\tmetadata: {}\n",
        "!!python/object:os.system 'echo owned'\n",
        "x: *undefined_alias\n",
    ],
)
def test_invalid_yaml_is_a_resource_error_with_position(text):
    with pytest.raises(ResourceError) as info:
        parse_documents(text, "broken.yaml")
    assert str(info.value).startswith("broken.yaml: invalid YAML")


def test_parse_file_reports_unreadable_and_undecodable(tmp_path):
    with pytest.raises(ResourceError, match="cannot read"):
        parse_file(tmp_path / "missing.yaml")
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"kind: Namespace\nmetadata: {name: caf\xe9}\n")
    with pytest.raises(ResourceError, match="latin1.yaml: cannot read"):
        parse_file(bad)


def test_fuzzed_documents_only_raise_resource_error():
    import random

    rng = random.Random(7)
    atoms = ["kind", "Pod", "Service", "AuthorizationPolicy", "metadata", "name", "spec",
             "ports", "rules", "from", "to", "source", "operation", "1", "-1", "null", "[]",
             "{}", "x", "containers", "status", "podIP", "selector", "matchLabels"]
    for _ in range(500):
        doc = _random_value(rng, atoms, 0)
        text = f"kind: {rng.choice(atoms[1:4])}\nmetadata: {{name: n}}\nspec: {doc}\n"
        try:
            parse_documents(text)
        except ResourceError:
            pass


def _random_value(rng, atoms, depth):
    r = rng.random()
    if depth > 3 or r < 0.3:
        return rng.choice(atoms)
    if r < 0.65:
        return "[" + ", ".join(_random_value(rng, atoms, depth + 1) for _ in range(2)) + "]"
    return "{" + ", ".join(
        f"{rng.choice(atoms)}: {_random_value(rng, atoms, depth + 1)}" for _ in range(2)
    ) + "}"
