"""VMs declared to the control plane: WorkloadEntry parsing, translation, CA rule, lab spec."""

from __future__ import annotations

import argparse
import textwrap

import pytest
import yaml

from controlplane.resources import ResourceError, WorkloadEntry, parse_documents
from controlplane.server import may_hold
from controlplane.translate import translate, vm_uid
from nodeproxy.lab.spec import LabSpecError, parse_lab, vm_netns, workload_entry_resource
from nodeproxy.model import HBONE, TCP
from ztunnel import hostmode

NS = """\
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {nodeproxy.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: legacy}
"""

ENTRY = """\
apiVersion: networking.nodeproxy.io/v1alpha1
kind: WorkloadEntry
metadata: {name: vm-1, namespace: shop, labels: {app: legacy, tier: db}}
spec:
  address: 10.250.0.100
  serviceAccount: legacy-vm
  node: vm-1
  ports: {http: 8080}
  labels: {tier: backend}
---
apiVersion: v1
kind: Service
metadata: {name: legacy, namespace: shop}
spec:
  selector: {app: legacy}
  ports: [{port: 80, targetPort: http}]
"""


def test_workload_entry_parses():
    (entry,) = [r for r in parse_documents(ENTRY) if isinstance(r, WorkloadEntry)]
    assert entry == WorkloadEntry(
        name="vm-1", namespace="shop", labels={"app": "legacy", "tier": "backend"},
        address="10.250.0.100", service_account="legacy-vm", node="vm-1",
        ports={"http": 8080},
    )
    assert entry.key == "WorkloadEntry/shop/vm-1"


def test_workload_entry_becomes_a_meshed_workload_that_services_select():
    state = translate(parse_documents(NS + "---\n" + ENTRY))
    w = state.workloads["vm/shop/vm-1"]
    assert (w.name, w.namespace, w.node, w.service_account) == ("vm-1", "shop", "vm-1", "legacy-vm")
    assert w.addresses == ("10.250.0.100",)
    assert w.protocol == HBONE
    assert w.identity == "spiffe://cluster.local/ns/shop/sa/legacy-vm"
    assert state.workload_by_ip("10.250.0.100") is w
    svc = state.services["shop/legacy"]
    assert svc.endpoints == ("vm/shop/vm-1",)
    assert state.target_port(svc, svc.ports[0], w) == 8080


def test_vm_in_a_namespace_that_is_not_ambient_is_plain_tcp_unless_it_opts_in():
    base = ENTRY.split("---")[0].replace("namespace: shop", "namespace: legacy")
    state = translate(parse_documents(NS + "---\n" + base))
    assert state.workloads["vm/legacy/vm-1"].protocol == TCP
    opted = base.replace("labels: {tier: backend}",
                         "labels: {nodeproxy.io/dataplane-mode: ambient}")
    state = translate(parse_documents(NS + "---\n" + opted))
    assert state.workloads["vm/legacy/vm-1"].protocol == HBONE


def test_only_the_vms_own_node_may_hold_its_identity():
    state = translate(parse_documents(NS + "---\n" + ENTRY))
    vm_id = "spiffe://cluster.local/ns/shop/sa/legacy-vm"
    assert may_hold(state, "vm-1", vm_id)
    assert not may_hold(state, "node-a", vm_id)
    assert not may_hold(state, "vm-1", "spiffe://cluster.local/ns/shop/sa/web")


def test_host_mode_finds_its_workload_by_the_uid_the_control_plane_gives():
    assert hostmode.vm_uid("shop", "vm-1") == vm_uid("shop", "vm-1") == "vm/shop/vm-1"


def _entry(spec: str, api: str = "networking.nodeproxy.io/v1alpha1") -> str:
    return (
        f"apiVersion: {api}\nkind: WorkloadEntry\nmetadata: {{name: vm-1, namespace: shop}}\n"
        + "spec:\n" + textwrap.indent(textwrap.dedent(spec), "  ")
    )


@pytest.mark.parametrize(
    ("doc", "field", "reason"),
    [
        (_entry("serviceAccount: a\nnode: vm-1\n"), "spec.address", "is required"),
        (_entry("address: 10.0.0.300\nnode: vm-1\n"), "spec.address", "not an IP address"),
        (_entry("address: 10.0.0.3\n"), "spec.node", "is required"),
        (_entry("address: 10.0.0.3\nnode: vm-1\nports: {http: 70000}\n"), "spec.ports.http",
         "outside"),
        (_entry("address: 10.0.0.3\nnode: vm-1\nserviceAcount: x\n"), "spec", "unknown field"),
        (_entry("address: 10.0.0.3\nnode: vm-1\nlabels: {a: 1}\n"), "spec.labels.a",
         "must be a string"),
        (_entry("address: 10.0.0.3\nnode: vm-1\n", api="networking.istio.io/v1"), "apiVersion",
         "is not one of"),
    ],
)
def test_bad_workload_entries_are_refused_naming_the_field(doc: str, field: str, reason: str):
    with pytest.raises(ResourceError) as e:
        parse_documents(doc, "vm.yaml")
    assert e.value.field == field
    assert reason in e.value.reason


def test_workload_entry_without_spec_is_refused():
    doc = "apiVersion: networking.nodeproxy.io/v1alpha1\nkind: WorkloadEntry\nmetadata: {name: v}\n"
    with pytest.raises(ResourceError, match="spec: is required"):
        parse_documents(doc)


# -- the lab's VMs -----------------------------------------------------------------------

LAB = """\
apiVersion: nodeproxy.io/v1alpha1
kind: Lab
metadata: {name: t}
spec:
  nodes: [{name: node-a}]
  vms:
  - {name: vm-1, namespace: shop, serviceAccount: legacy-vm, labels: {app: legacy},
     ports: {http: 8080}, command: [nodeproxy, echo]}
  - {name: vm-2}
"""


def test_lab_vms_parse_and_are_declared_as_workload_entries():
    spec = parse_lab(LAB)
    vm1, vm2 = spec.vms
    assert (vm1.underlay_ip, vm2.underlay_ip) == ("10.250.0.100", "10.250.0.101")
    assert (vm2.namespace, vm2.service_account, vm2.command) == ("default", "default", [])
    assert vm_netns("npl-", "vm-1") == "npl-vm-vm-1"
    doc = yaml.safe_dump(workload_entry_resource(vm1))
    state = translate(parse_documents(NS + "---\n" + doc))
    w = state.workloads["vm/shop/vm-1"]
    assert (w.node, w.addresses, w.labels, w.named_ports) == (
        "vm-1", ("10.250.0.100",), {"app": "legacy"}, {"http": 8080}
    )


@pytest.mark.parametrize(
    ("vms", "reason"),
    [
        ("[{name: node-a}]", "already a node or VM"),
        ("[{name: v}, {name: v}]", "already a node or VM"),
        ("[{name: V_1}]", "not a DNS label"),
        ("[{name: v, serviceAccount: 3}]", "serviceAccount"),
        ("[{name: v, labels: {a: 1}}]", "labels"),
        ("[{name: v, command: echo}]", "command"),
        ("[{name: v, ports: {http: 0}}]", "not a port number"),
        ("[{name: v, nodeName: x}]", "unknown field"),
        ("{name: v}", "must be a list"),
    ],
)
def test_bad_lab_vms_are_refused(vms: str, reason: str):
    text = LAB.split("  vms:")[0] + f"  vms: {vms}\n"
    with pytest.raises(LabSpecError, match=reason):
        parse_lab(text)


# -- the host-mode command line ----------------------------------------------------------


def _args(*argv: str) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--agent-socket")
    hostmode.add_arguments(p)
    hostmode.check_arguments(p, p.parse_args(list(argv)))


def test_host_mode_command_line_is_checked():
    _args("--host-mode", "--workload", "shop/vm-1")
    _args("--agent-socket", "/x")
    for bad in (
        ["--host-mode"],
        ["--host-mode", "--workload", "vm-1"],
        ["--host-mode", "--workload", "shop/vm-1", "--agent-socket", "/x"],
        ["--workload", "shop/vm-1", "--agent-socket", "/x"],
        [],
    ):
        with pytest.raises(SystemExit):
            _args(*bad)
