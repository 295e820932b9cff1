"""Who may hold which identity: the CA's rule for nodes and for namespace gateways."""

from controlplane.server import may_hold
from nodeproxy.model import HBONE, TCP, MeshState, Workload


def state() -> MeshState:
    s = MeshState()
    for w in (
        Workload("u1", "web", "shop", "node-a", "web", ("10.0.0.1",), protocol=HBONE),
        Workload("u2", "db", "shop", "node-b", "db", ("10.0.0.2",), protocol=HBONE),
        Workload("u3", "legacy", "old", "node-a", "legacy", ("10.0.0.3",), protocol=TCP),
        Workload(
            "u4", "nodeproxy-gateway", "shop", "node-a", "nodeproxy-gateway", ("10.0.0.4",),
            labels={"gateway.nodeproxy.io/namespace": "shop"}, protocol=TCP,
        ),
    ):
        s.workloads[w.uid] = w
    return s


def test_node_may_hold_identities_of_enrolled_pods_on_it():
    s = state()
    assert may_hold(s, "node-a", "spiffe://cluster.local/ns/shop/sa/web")
    assert not may_hold(s, "node-a", "spiffe://cluster.local/ns/shop/sa/db")  # other node
    assert may_hold(s, "node-b", "spiffe://cluster.local/ns/shop/sa/db")


def test_node_may_not_hold_identities_of_pods_outside_the_mesh():
    s = state()
    assert not may_hold(s, "node-a", "spiffe://cluster.local/ns/old/sa/legacy")
    # the gateway pod is not enrolled: its node cannot get the gateway's identity
    assert not may_hold(s, "node-a", "spiffe://cluster.local/ns/shop/sa/nodeproxy-gateway")


def test_gateway_may_hold_only_its_own_identity():
    s = state()
    assert may_hold(s, "gateway:shop", "spiffe://cluster.local/ns/shop/sa/nodeproxy-gateway")
    assert not may_hold(s, "gateway:shop", "spiffe://cluster.local/ns/shop/sa/web")
    assert not may_hold(s, "gateway:shop", "spiffe://cluster.local/ns/old/sa/nodeproxy-gateway")
    assert not may_hold(s, "gateway:shop", "not a spiffe id")
