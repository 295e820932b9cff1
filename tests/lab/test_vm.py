"""A VM in the mesh: its node proxy in host mode, a pod and the VM over mTLS both ways.

The lab (tests/lab/vm.yaml) has one node with pod shop/web and one VM, shop/vm-1: its own
netns on the underlay, declared as a WorkloadEntry, both running the echo app.
"""

from __future__ import annotations

import pytest

from nodeproxy import pcap
from tests.lab.meshlab import Lab, metric_sum, running_lab, wait_for
from tests.lab.test_mesh import policy

pytestmark = pytest.mark.lab

VM = "vm/vm-1"
VM_ID = "spiffe://cluster.local/ns/shop/sa/legacy-vm"
WEB_ID = "spiffe://cluster.local/ns/shop/sa/web"


@pytest.fixture(scope="module")
def lab():
    with running_lab("/run/nodeproxy-test-vm", "npt-vm-", "tests/lab/vm.yaml") as lab:
        yield lab


def vm_ip(lab: Lab) -> str:
    (vm,) = lab.status()["vms"]
    return vm["ip"]


def echo(lab: Lab, who: str, url: str) -> dict | None:
    return lab.curl_json(who, url)


def vm_metrics(lab: Lab) -> str:
    proc = lab.exec(VM, "curl", "-sS", "-m", "5", "http://127.0.0.1:15020/metrics")
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def opened(text: str, **labels: str) -> float:
    return metric_sum(
        text, "istio_tcp_connections_opened_total",
        connection_security_policy="mutual_tls", **labels,
    )


def test_vm_is_up_with_host_capture_and_declared_as_a_workload(lab: Lab):
    (vm,) = lab.status()["vms"]
    assert vm["ip"] == "10.250.0.100"
    assert vm["components"]["ztunnel-vm-vm-1"]["state"] == "running"
    saved = lab.exec(VM, "iptables-save", "-t", "nat").stdout
    assert "-j REDIRECT --to-ports 15001" in saved and "--dport 22 -j ACCEPT" in saved
    workloads = lab.admin("node-a", "/workloads")
    (w,) = [w for w in workloads if w["uid"] == "vm/shop/vm-1"]
    assert w["identity"] == VM_ID and w["protocol"] == "HBONE" and w["node"] == "vm-1"
    assert w["addresses"] == [vm["ip"]]


def test_pod_to_vm_is_mutual_tls_and_the_vm_app_sees_the_pod(lab: Lab):
    web_ip, ip = lab.ip("shop/web"), vm_ip(lab)
    answer = echo(lab, "shop/web", f"http://{ip}:8080/from-pod")
    assert answer is not None and answer["pod"] == "vm-1"
    assert answer["peer"].split(":")[0] == web_ip
    assert opened(
        vm_metrics(lab), reporter="destination", source_workload="web",
        destination_workload="vm-1", source_principal=WEB_ID, destination_principal=VM_ID,
    ) >= 1
    assert opened(
        lab.metrics("node-a"), reporter="source", source_workload="web",
        destination_workload="vm-1", destination_principal=VM_ID,
    ) >= 1


def test_vm_to_pod_is_mutual_tls_and_the_pod_app_sees_the_vm(lab: Lab):
    web_ip, ip = lab.ip("shop/web"), vm_ip(lab)
    answer = echo(lab, VM, f"http://{web_ip}:8080/from-vm")
    assert answer is not None and answer["pod"] == "web"
    assert answer["peer"].split(":")[0] == ip
    assert opened(
        lab.metrics("node-a"), reporter="destination", source_workload="vm-1",
        destination_workload="web", source_principal=VM_ID, destination_principal=WEB_ID,
    ) >= 1
    assert opened(
        vm_metrics(lab), reporter="source", source_workload="vm-1",
        destination_workload="web", source_principal=VM_ID,
    ) >= 1


def test_a_service_selects_the_vm_by_its_labels(lab: Lab):
    answer = echo(lab, "shop/web", "http://legacy.shop/")
    assert answer is not None and answer["pod"] == "vm-1"


def test_policy_on_the_vm_denies_the_pod(lab: Lab):
    ip, web_ip = vm_ip(lab), lab.ip("shop/web")
    url = f"http://{ip}:8080/"
    assert echo(lab, "shop/web", url) is not None
    lab.apply(policy("deny-web", "shop", """\
        selector: {matchLabels: {app: legacy}}
        action: DENY
        rules: [{from: [{source: {principals: ["cluster.local/ns/shop/sa/web"]}}]}]
        """))
    try:
        wait_for("the VM denies the pod", lambda: echo(lab, "shop/web", url) is None)
        # only that caller, only that direction
        assert echo(lab, VM, f"http://{web_ip}:8080/") is not None
        assert metric_sum(
            vm_metrics(lab), "istio_tcp_connections_failed_total",
            reporter="destination", source_principal=WEB_ID, response_flags="DENY",
        ) >= 1
    finally:
        lab.delete("AuthorizationPolicy", "shop/deny-web")
    wait_for("the pod allowed again", lambda: echo(lab, "shop/web", url) is not None)


def test_policy_on_the_pod_denies_the_vm(lab: Lab):
    web_url = f"http://{lab.ip('shop/web')}:8080/"
    assert echo(lab, VM, web_url) is not None
    lab.apply(policy("deny-vm", "shop", """\
        selector: {matchLabels: {app: web}}
        action: DENY
        rules: [{from: [{source: {principals: ["cluster.local/ns/shop/sa/legacy-vm"]}}]}]
        """))
    try:
        wait_for("the pod denies the VM", lambda: echo(lab, VM, web_url) is None)
        assert echo(lab, "shop/web", f"http://{vm_ip(lab)}:8080/") is not None
        assert "policy rejection" in lab.logs("ztunnel-node-a")
    finally:
        lab.delete("AuthorizationPolicy", "shop/deny-vm")
    wait_for("the VM allowed again", lambda: echo(lab, VM, web_url) is not None)


def test_no_plaintext_between_pod_and_vm_on_the_underlay(lab: Lab):
    marker = "nodeproxy-vm-marker-93b1c2"
    web_ip, ip = lab.ip("shop/web"), vm_ip(lab)
    lab.cli("capture", "start")
    try:
        for _ in range(2):
            a = echo(lab, "shop/web", f"http://{ip}:8080/{marker}")
            b = echo(lab, VM, f"http://{web_ip}:8080/{marker}")
            assert a is not None and b is not None
            assert marker in a["path"] and marker in b["path"]
    finally:
        lab.cli("capture", "stop")
    capture = lab.dir / "capture.pcap"
    assert not pcap.contains(capture, marker.encode()), "plaintext marker seen on the underlay"
    flows = pcap.flows(capture)
    to_vm = [f for f in flows if (ip, 15008) in (f.a, f.b)]
    to_pod = [f for f in flows if (web_ip, 15008) in (f.a, f.b)]
    assert to_vm and to_pod, f"expected HBONE both ways in {flows}"
    assert all(f.tls for f in to_vm + to_pod if f.payload_bytes)
    plain = [f for f in flows if (ip, 8080) in (f.a, f.b) or (web_ip, 8080) in (f.a, f.b)]
    assert not plain, f"direct plaintext flow to an app port: {plain}"
