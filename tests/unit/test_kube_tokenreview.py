"""Node proxies authenticated by their projected ServiceAccount token (TokenReview)."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from controlplane.kube import client as kc
from controlplane.kube.tokenreview import TokenReviewAuthenticator
from tests import kubeapi
from tests.kubeapi import FakeKube, eventually


@pytest.fixture
async def kube(nursery: trio.Nursery) -> FakeKube:
    k = FakeKube()
    await nursery.start(k.serve)
    k.create("namespaces", kubeapi.namespace("nodeproxy-system"))
    k.create("namespaces", kubeapi.namespace("shop"))
    return k


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def auth(kube: FakeKube, tmp_path: Path, clock: Clock) -> TokenReviewAuthenticator:
    return TokenReviewAuthenticator(kc.KubeClient(kube.client_config(tmp_path)),
                                    cache_ttl=30, clock=clock)


def node_pod(kube: FakeKube, name: str, node: str) -> dict:
    return kube.create("pods", kubeapi.pod(name, "nodeproxy-system", ip=None, node=node,
                                           sa="nodeproxy-node"))


async def test_node_token_with_node_name_gives_the_node(kube, auth) -> None:
    p = node_pod(kube, "nodeproxy-abcde", "node-a")
    kube.add_sa_token("tok-a", "nodeproxy-system", "nodeproxy-node", pod=p["metadata"]["name"],
                      pod_uid=p["metadata"]["uid"], node="node-a")
    assert await auth.principal_for("tok-a") == "node-a"


async def test_node_taken_from_the_bound_pod(kube, auth) -> None:
    # API servers without node binding in the token: read the pod's spec.nodeName
    p = node_pod(kube, "nodeproxy-fghij", "node-b")
    kube.add_sa_token("tok-b", "nodeproxy-system", "nodeproxy-node", pod=p["metadata"]["name"],
                      pod_uid=p["metadata"]["uid"])
    assert await auth.principal_for("tok-b") == "node-b"
    assert any(t.endswith("/pods/nodeproxy-fghij") for _, t, _ in kube.requests)


async def test_recreated_pod_of_the_same_name_does_not_count(kube, auth) -> None:
    p = node_pod(kube, "nodeproxy-x", "node-a")
    kube.add_sa_token("old", "nodeproxy-system", "nodeproxy-node", pod="nodeproxy-x",
                      pod_uid=p["metadata"]["uid"])
    kube.delete("pods", "nodeproxy-x", "nodeproxy-system")
    assert await auth.principal_for("old") is None  # pod gone
    node_pod(kube, "nodeproxy-x", "node-z")  # same name, other uid, other node
    assert await auth.principal_for("old") is None


async def test_refused_tokens(kube, auth) -> None:
    p = kube.create("pods", kubeapi.pod("web", "shop", ip="10.1.0.1", node="node-a"))
    kube.add_sa_token("app", "shop", "default", pod="web", pod_uid=p["metadata"]["uid"],
                      node="node-a")
    assert await auth.principal_for("app") is None  # not the node proxy's account
    assert await auth.principal_for("no-such-token") is None
    assert await auth.principal_for("") is None
    node_pod(kube, "np", "node-a")
    kube.add_sa_token("api-audience", "nodeproxy-system", "nodeproxy-node", pod="np",
                      node="node-a", audiences=("https://kubernetes.default.svc",))
    assert await auth.principal_for("api-audience") is None  # a token for someone else
    kube.add_sa_token("unbound", "nodeproxy-system", "nodeproxy-node")  # a Secret token
    assert await auth.principal_for("unbound") is None


async def test_gateway_token_gives_the_gateway_principal(kube, auth) -> None:
    kube.add_sa_token("gw", "shop", "nodeproxy-gateway", pod="nodeproxy-gateway-1", node="n")
    assert await auth.principal_for("gw") == "gateway:shop"


async def test_positive_answers_are_cached_briefly(kube, auth, clock) -> None:
    node_pod(kube, "np", "node-a")
    kube.add_sa_token("tok", "nodeproxy-system", "nodeproxy-node", pod="np", node="node-a")
    assert await auth.principal_for("tok") == "node-a"
    assert await auth.principal_for("tok") == "node-a"
    assert auth.reviews == 1
    del kube.reviews["tok"]  # revoked (the pod was deleted)
    clock.now += 31
    assert await auth.principal_for("tok") is None
    assert auth.reviews == 2
    assert await auth.principal_for("nope") is None
    assert await auth.principal_for("nope") is None
    assert auth.reviews == 4  # refusals are not cached


async def test_api_server_down_fails_closed(kube, auth) -> None:
    node_pod(kube, "np", "node-a")
    kube.add_sa_token("tok", "nodeproxy-system", "nodeproxy-node", pod="np", node="node-a")
    kube.stop()
    await eventually(lambda: not kube.serving)
    assert await auth.principal_for("tok") is None


async def test_configurable_service_account(kube, tmp_path: Path) -> None:
    auth = TokenReviewAuthenticator(kc.KubeClient(kube.client_config(tmp_path)),
                                    node_service_accounts=[("nodeproxy-system", "node")])
    node_pod(kube, "np", "node-c")
    kube.add_sa_token("t1", "nodeproxy-system", "node", pod="np", node="node-c")
    kube.add_sa_token("t2", "nodeproxy-system", "nodeproxy-node", pod="np", node="node-c")
    assert await auth.principal_for("t1") == "node-c"
    assert await auth.principal_for("t2") is None
