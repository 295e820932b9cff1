"""The control plane with --source kube end to end: the fake API server, TokenReview auth."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import trio

from controlplane.kube.client import KubeConfig
from controlplane.server import ServerConfig, serve
from tests import kubeapi
from tests.kubeapi import FakeKube, eventually
from tests.unit.test_controlplane_server import StateStream, request


async def test_kube_source_and_tokenreview(tmp_path: Path, nursery: trio.Nursery) -> None:
    kube = FakeKube()
    await nursery.start(kube.serve)
    kube.create("namespaces", kubeapi.namespace("nodeproxy-system"))
    kube.create("namespaces", kubeapi.namespace("shop", {"nodeproxy.io/dataplane-mode": "ambient"}))
    kube.create("pods", kubeapi.pod("web", "shop", ip="10.1.0.1", node="node-a", sa="web"))
    np = kube.create("pods", kubeapi.pod("np-1", "nodeproxy-system", ip=None, node="node-a",
                                         sa="nodeproxy-node"))
    kube.add_sa_token("node-tok", "nodeproxy-system", "nodeproxy-node", pod="np-1",
                      pod_uid=np["metadata"]["uid"])
    config = ServerConfig(
        resources=None, tokens=None, state_dir=tmp_path / "state", source="kube",
        kube=kube.client_config(tmp_path), listen="127.0.0.1:0", admin=None,
        cert_ttl=timedelta(hours=1), ping_interval=0.2,
    )
    assert isinstance(config.kube, KubeConfig)
    cp = await nursery.start(serve, config)
    assert (await request(cp, "GET", "/v1/state", "bogus")).status == 401
    stream = await StateStream.open(cp, token="node-tok")
    try:
        assert stream.head.status == 200
        snap = await stream.next()
        assert [w["name"] for w in snap["state"]["workloads"]] == ["np-1", "web"] or \
            {w["name"] for w in snap["state"]["workloads"]} == {"np-1", "web"}
        kube.create("pods", kubeapi.pod("db", "shop", ip="10.1.0.2", node="node-b"))
        delta = await stream.next()
        assert any(w["name"] == "db" for w in delta["upsert"]["workloads"])
    finally:
        await stream.aclose()
    await eventually(lambda: kube.get("configmaps", "nodeproxy-ca-root", "shop") is not None)
    assert kube.get("configmaps", "nodeproxy-ca-root", "shop")["data"]["root-cert.pem"] == \
        cp.root_pem.decode()
