"""The node proxy's pure decisions: where an outbound connection goes, who may come in."""

import random

import pytest

from nodeproxy.model import (
    HBONE,
    TCP,
    Gateway,
    MeshState,
    Policy,
    Service,
    ServicePort,
    Workload,
)
from ztunnel.inbound import admission
from ztunnel.outbound import NoEndpoint, plan_outbound
from ztunnel.policy import Connection


def mesh(gateway: bool = False) -> MeshState:
    s = MeshState()
    for w in (
        Workload("a", "web-a", "shop", "n1", "web", ("10.0.1.2",), {"app": "web"}, HBONE),
        Workload("b", "web-b", "shop", "n2", "web", ("10.0.2.2",), {"app": "web"}, HBONE),
        Workload("c", "old", "legacy", "n1", "default", ("10.0.1.9",), {"app": "old"}, TCP),
    ):
        s.workloads[w.uid] = w
    s.services["shop/web"] = Service(
        "web", "shop", ("10.96.0.5",), (ServicePort(80, 8080),), {"app": "web"}, ("a", "b")
    )
    s.services["legacy/old"] = Service(
        "old", "legacy", ("10.96.0.6",), (ServicePort(80, 8080),), {"app": "old"}, ("c",)
    )
    if gateway:
        s.gateways["shop"] = Gateway("shop", ("10.0.1.50",))
    return s


def test_service_vip_goes_to_an_endpoint_over_hbone():
    plan = plan_outbound(mesh(), "10.96.0.5", 80, random.Random(1))
    assert plan.hbone and plan.port == 15008
    assert plan.address in ("10.0.1.2", "10.0.2.2")
    assert plan.authority == f"{plan.address}:8080"
    assert plan.identity == "spiffe://cluster.local/ns/shop/sa/web"


def test_pod_ip_of_a_meshed_workload_goes_over_hbone_to_that_pod():
    plan = plan_outbound(mesh(), "10.0.2.2", 9090, random.Random(1))
    assert (plan.hbone, plan.address, plan.authority) == (True, "10.0.2.2", "10.0.2.2:9090")


def test_destinations_outside_the_mesh_pass_through():
    for ip, port, want in (("10.96.0.6", 80, "10.0.1.9"), ("10.0.1.9", 8080, "10.0.1.9"),
                           ("192.0.2.7", 443, "192.0.2.7")):
        plan = plan_outbound(mesh(), ip, port, random.Random(1))
        assert not plan.hbone and plan.address == want and plan.identity is None


def test_service_without_endpoints_fails_closed():
    s = mesh()
    s.services["shop/web"] = Service("web", "shop", ("10.96.0.5",), (ServicePort(80, 8080),))
    with pytest.raises(NoEndpoint):
        plan_outbound(s, "10.96.0.5", 80, random.Random(1))


def test_service_of_a_gateway_namespace_goes_to_its_gateway_keeping_the_vip():
    plan = plan_outbound(mesh(gateway=True), "10.96.0.5", 80, random.Random(1))
    assert (plan.hbone, plan.address, plan.port) == (True, "10.0.1.50", 15008)
    assert plan.authority == "10.96.0.5:80"
    assert plan.identity == "spiffe://cluster.local/ns/shop/sa/nodeproxy-gateway"


def conn(identity: str | None) -> Connection:
    return Connection(identity, "10.0.1.7", "10.0.2.2", 8080)


def test_admission_applies_policy_without_a_gateway():
    s = mesh()
    s.policies["shop/deny"] = Policy("deny", "shop", action="DENY", rules=())  # matches nothing
    assert admission(s, s.workloads["b"], "shop", conn(None)).allowed
    s.policies["shop/allow-none"] = Policy("allow-none", "shop", action="ALLOW")
    assert not admission(s, s.workloads["b"], "shop", conn(None)).allowed


def test_admission_with_a_gateway_lets_only_the_gateway_in():
    s = mesh(gateway=True)
    s.policies["shop/allow-none"] = Policy("allow-none", "shop", action="ALLOW")
    gw = "spiffe://cluster.local/ns/shop/sa/nodeproxy-gateway"
    assert admission(s, s.workloads["b"], "shop", conn(gw)).allowed
    refused = admission(s, s.workloads["b"], "shop", conn("spiffe://cluster.local/ns/x/sa/y"))
    assert not refused.allowed and "bypassed the L7 gateway" in refused.reason
    assert not admission(s, s.workloads["b"], "shop", conn(None)).allowed
