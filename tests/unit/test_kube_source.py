"""The Kubernetes source: list/watch → the same parsing and translation as the YAML source.

Against the fake API server (tests/kubeapi.py) over real TLS sockets on loopback.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import yaml

from controlplane.kube import client as kc
from controlplane.kube.source import KubeSource
from controlplane.source_dir import DirectorySource
from controlplane.translate import same_content
from nodeproxy import model
from tests import kubeapi
from tests.kubeapi import FakeKube, eventually, fast_backoff

AMBIENT = {model.DATAPLANE_LABEL: "ambient"}


@pytest.fixture
async def kube(nursery: trio.Nursery) -> FakeKube:
    k = FakeKube()
    await nursery.start(k.serve)
    return k


class Harness:
    def __init__(self, kube: FakeKube, tmp_path: Path, **kw):
        self.kube = kube
        self.published: list[model.MeshState] = []
        self.client = kc.KubeClient(kube.client_config(tmp_path))
        self.source = KubeSource(self.client, self.published.append, version=0,
                                 backoff=fast_backoff, **kw)

    @property
    def state(self) -> model.MeshState:
        return self.published[-1]

    def workload(self, ns: str, name: str) -> model.Workload | None:
        for w in self.state.workloads.values():
            if (w.namespace, w.name) == (ns, name):
                return w
        return None


@pytest.fixture
async def harness(kube: FakeKube, tmp_path: Path) -> Harness:
    return Harness(kube, tmp_path)


def shop(kube: FakeKube, n: int = 5) -> list[dict]:
    kube.create("namespaces", kubeapi.namespace("shop"))
    kube.create("namespaces", kubeapi.namespace("other", AMBIENT))
    pods = [kube.create("pods", kubeapi.pod(f"web-{i}", "shop", ip=f"10.1.0.{i + 1}",
                                             labels={"app": "web"},
                                             ports=(("http", 8080),)))
            for i in range(n)]
    kube.create("services", kubeapi.service("web", "shop", selector={"app": "web"},
                                             cluster_ip="10.96.0.10"))
    return pods


POLICY = {
    "apiVersion": "security.nodeproxy.io/v1",
    "kind": "AuthorizationPolicy",
    "metadata": {"name": "web-allow", "namespace": "shop"},
    "spec": {
        "selector": {"matchLabels": {"app": "web"}},
        "action": "ALLOW",
        "rules": [{"from": [{"source": {"namespaces": ["other"]}}],
                   "to": [{"operation": {"ports": ["8080"]}}]}],
    },
}


async def test_initial_list_with_paging_gives_the_state(
    kube: FakeKube, tmp_path: Path, nursery: trio.Nursery
) -> None:
    shop(kube, n=5)
    h = Harness(kube, tmp_path, page_size=2)
    await nursery.start(h.source.run)
    # the first state is published before run() reports started
    assert len(h.published) == 1
    state = h.state
    assert {w.name for w in state.workloads.values()} == {f"web-{i}" for i in range(5)}
    svc = state.services["shop/web"]
    assert svc.addresses == ("10.96.0.10",)
    assert len(svc.endpoints) == 5
    assert h.workload("shop", "web-0").protocol == model.TCP  # namespace not ambient
    assert kube.list_requests("pods") == 3  # 2 + 2 + 1
    assert h.source.errors == {}  # every kind served (CRDs present in the fake)


async def test_watch_events_update_the_state(harness: Harness, nursery: trio.Nursery) -> None:
    kube, h = harness.kube, harness
    shop(kube, n=1)
    await nursery.start(h.source.run)
    # a pod scheduled, then given its IP by the kubelet
    p = kube.create("pods", kubeapi.pod("web-new", "shop", ip=None, phase="Pending",
                                        labels={"app": "web"}))
    await eventually(lambda: h.workload("shop", "web-new") is not None)
    assert h.workload("shop", "web-new").addresses == ()
    p["status"].update(phase="Running", podIP="10.1.0.99", podIPs=[{"ip": "10.1.0.99"}])
    kube.update("pods", p)
    await eventually(lambda: h.workload("shop", "web-new").addresses == ("10.1.0.99",))
    assert h.workload("shop", "web-new").uid in h.state.services["shop/web"].endpoints
    # the namespace labelled ambient: its workloads move to HBONE
    kube.patch("namespaces", "shop", {"metadata": {"labels": AMBIENT}})
    await eventually(lambda: h.workload("shop", "web-0").protocol == model.HBONE)
    assert h.workload("shop", "web-new").meshed
    # a policy added, then deleted
    kube.create("authorizationpolicies", POLICY)
    await eventually(lambda: "shop/web-allow" in {p.key for p in h.state.policies.values()})
    pol = next(iter(h.state.policies.values()))
    assert pol.action == "ALLOW" and pol.selector == {"app": "web"}
    kube.delete("authorizationpolicies", "web-allow", "shop")
    await eventually(lambda: not h.state.policies)
    # a pod deleted
    kube.delete("pods", "web-0", "shop")
    await eventually(lambda: h.workload("shop", "web-0") is None)
    versions = [s.version for s in h.published]
    assert versions == sorted(set(versions))  # one version per change, increasing


async def test_only_content_changes_are_published(harness: Harness,
                                                  nursery: trio.Nursery) -> None:
    kube, h = harness.kube, harness
    shop(kube, n=1)
    await nursery.start(h.source.run)
    before = len(h.published)
    # a status change the mesh does not use
    p = kube.get("pods", "web-0", "shop")
    p["status"]["startTime"] = "2030-01-01T00:00:00Z"
    kube.update("pods", p)
    store = h.source.reflectors["Pod"].store
    await eventually(lambda: store["shop/web-0"]["status"]["startTime"] == "2030-01-01T00:00:00Z")
    assert h.source.scan() is None
    assert len(h.published) == before
    kube.create("pods", kubeapi.pod("marker", "other", ip="10.2.0.1"))
    await eventually(lambda: h.workload("other", "marker") is not None)
    assert len(h.published) == before + 1


async def test_bookmark_then_dropped_watch_resumes_without_relisting(
    harness: Harness, nursery: trio.Nursery
) -> None:
    kube, h = harness.kube, harness
    shop(kube, n=2)
    await nursery.start(h.source.run)
    pods = h.source.reflectors["Pod"]
    await eventually(lambda: kube.watch_count == len(h.source.reflectors))
    kube.bump(10)  # writes to resources nobody here watches
    kube.bookmark()
    bookmark_rv = str(kube.rv)
    await eventually(lambda: pods.resource_version == bookmark_rv)
    kube.compact()  # history before the bookmark is gone: only the bookmark RV still works
    kube.drop_watches()
    await eventually(lambda: len(kube.watch_requests("pods")) >= 2)
    assert kube.watch_requests("pods")[-1]["resourceVersion"] == bookmark_rv
    kube.create("pods", kubeapi.pod("after", "shop", ip="10.1.0.50"))
    await eventually(lambda: h.workload("shop", "after") is not None)
    assert pods.stats.lists == 1
    assert pods.stats.relists_after_gone == 0
    assert kube.list_requests("pods") == 1


@pytest.mark.parametrize("gone_as", ["http", "event"])
async def test_gone_relists_and_converges(harness: Harness, nursery: trio.Nursery,
                                          gone_as: str) -> None:
    kube, h = harness.kube, harness
    kube.gone_as = gone_as
    shop(kube, n=3)
    await nursery.start(h.source.run)
    kube.stop()  # the API server goes away; meanwhile the cluster changes
    await eventually(lambda: h.source.reflectors["Pod"].stats.dropped >= 1)
    kube.delete("pods", "web-0", "shop")
    kube.create("pods", kubeapi.pod("web-9", "shop", ip="10.1.0.9", labels={"app": "web"}))
    kube.patch("namespaces", "shop", {"metadata": {"labels": AMBIENT}})
    kube.compact()  # and etcd compacted: the versions we hold are too old
    await nursery.start(kube.serve, kube.port)
    await eventually(lambda: h.workload("shop", "web-9") is not None
                     and h.workload("shop", "web-0") is None
                     and h.workload("shop", "web-1").meshed)
    assert h.source.reflectors["Pod"].stats.relists_after_gone == 1
    assert len(h.state.services["shop/web"].endpoints) == 3


async def test_reconnects_after_the_server_restarts(harness: Harness,
                                                    nursery: trio.Nursery) -> None:
    kube, h = harness.kube, harness
    shop(kube, n=1)
    await nursery.start(h.source.run)
    kube.stop()
    await eventually(lambda: all(r.stats.dropped for r in h.source.reflectors.values()))
    assert any(h.source.errors.values())  # the admin endpoint shows the outage
    kube.create("pods", kubeapi.pod("while-down", "shop", ip="10.1.0.77"))
    await nursery.start(kube.serve, kube.port)
    await eventually(lambda: h.workload("shop", "while-down") is not None)
    # history was kept: the watch resumed, no relist was needed
    assert h.source.reflectors["Pod"].stats.lists == 1
    await eventually(lambda: h.source.errors == {})


async def test_malformed_object_is_reported_and_skipped(harness: Harness,
                                                        nursery: trio.Nursery) -> None:
    kube, h = harness.kube, harness
    shop(kube, n=2)
    bad = kubeapi.pod("bad", "shop", ip="10.1.0.66")
    bad["spec"]["containers"][0]["ports"] = [{"containerPort": "eighty"}]
    kube.create("pods", bad)
    await nursery.start(h.source.run)
    assert h.workload("shop", "web-0") is not None
    assert h.workload("shop", "bad") is None
    assert "containerPort" in h.source.errors["Pod/shop/bad"]
    # a good pod turned bad keeps its last good version
    p = kube.get("pods", "web-1", "shop")
    p["status"]["podIP"] = "not-an-ip"
    kube.update("pods", p)
    await eventually(lambda: "Pod/shop/web-1" in h.source.errors)
    assert h.workload("shop", "web-1").addresses == ("10.1.0.2",)
    # fixed: served again, error gone
    p["status"]["podIP"] = "10.1.0.42"
    p["status"]["podIPs"] = [{"ip": "10.1.0.42"}]
    kube.update("pods", p)
    await eventually(lambda: h.workload("shop", "web-1").addresses == ("10.1.0.42",))
    assert "Pod/shop/web-1" not in h.source.errors
    # a deleted bad object takes its error with it
    kube.delete("pods", "bad", "shop")
    await eventually(lambda: "Pod/shop/bad" not in h.source.errors)


async def test_rotated_token_is_picked_up(harness: Harness, nursery: trio.Nursery,
                                          tmp_path: Path) -> None:
    kube, h = harness.kube, harness
    shop(kube, n=1)
    await nursery.start(h.source.run)
    await eventually(lambda: kube.watch_count == len(h.source.reflectors))
    (tmp_path / "token").write_text("token-2\n")
    kube.tokens = {"token-2"}  # the old token is no longer accepted
    seen = len(kube.requests)
    kube.drop_watches()
    kube.create("pods", kubeapi.pod("fresh", "shop", ip="10.1.0.88"))
    await eventually(lambda: h.workload("shop", "fresh") is not None)
    assert {t for _, _, t in kube.requests[seen:]} == {"token-2"}


async def test_endpointslices_give_ready_endpoints(harness: Harness,
                                                   nursery: trio.Nursery) -> None:
    kube, h = harness.kube, harness
    pods = shop(kube, n=3)
    await nursery.start(h.source.run)
    assert len(h.state.services["shop/web"].endpoints) == 3  # no slice yet: the selector
    kube.create("endpointslices", kubeapi.endpointslice(
        "web", "shop", [(pods[0], True), (pods[1], False), (pods[2], True)]))
    uids = {p["metadata"]["uid"] for p in (pods[0], pods[2])}
    await eventually(lambda: set(h.state.services["shop/web"].endpoints) == uids)
    # a slice without targetRefs (a manual one) maps addresses to workloads
    manual = kubeapi.endpointslice("web", "shop", [(pods[1], True)], suffix="manual")
    del manual["endpoints"][0]["targetRef"]
    kube.create("endpointslices", manual)
    await eventually(lambda: len(h.state.services["shop/web"].endpoints) == 3)


async def test_host_network_pods_and_external_names_are_left_out(
    harness: Harness, nursery: trio.Nursery
) -> None:
    kube, h = harness.kube, harness
    shop(kube, n=1)
    node_pod = kubeapi.pod("node-agent", "shop", ip="172.18.0.2")
    node_pod["spec"]["hostNetwork"] = True
    kube.create("pods", node_pod)
    ext = kubeapi.service("ext", "shop", selector=None)
    ext["spec"] = {"type": "ExternalName", "externalName": "example.com"}
    kube.create("services", ext)
    await nursery.start(h.source.run)
    assert h.workload("shop", "node-agent") is None
    assert h.state.workload_by_ip("172.18.0.2") is None
    assert "shop/ext" not in h.state.services


SCENARIO = """
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {nodeproxy.io/dataplane-mode: ambient,
           nodeproxy.io/l7-gateway: enabled, kubernetes.io/metadata.name: shop}}
---
apiVersion: v1
kind: Namespace
metadata: {name: legacy, labels: {kubernetes.io/metadata.name: legacy}}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, uid: "1111", labels: {app: web, version: v1}}
spec:
  nodeName: node-a
  serviceAccountName: web
  containers: [{name: app, image: echo, ports: [{name: http, containerPort: 8080}]}]
status: {phase: Running, podIP: 10.1.0.1, podIPs: [{ip: 10.1.0.1}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-2, namespace: shop, uid: "2222", labels: {app: web, version: v2}}
spec:
  nodeName: node-b
  serviceAccountName: web
  containers: [{name: app, image: echo, ports: [{name: http, containerPort: 8080}]}]
status: {phase: Running, podIP: 10.1.0.2, podIPs: [{ip: 10.1.0.2}]}
---
apiVersion: v1
kind: Pod
metadata: {name: gw, namespace: shop, uid: "3333",
           labels: {gateway.nodeproxy.io/namespace: shop, nodeproxy.io/dataplane-mode: none}}
spec: {nodeName: node-a, serviceAccountName: nodeproxy-gateway}
status: {phase: Running, podIP: 10.1.0.3}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: legacy, uid: "4444", labels: {app: client}}
spec: {nodeName: node-b}
status: {phase: Pending}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.1.1
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http}]
---
apiVersion: v1
kind: Service
metadata: {name: headless, namespace: shop}
spec: {clusterIP: None, selector: {app: web}, ports: [{port: 8080}]}
---
apiVersion: security.nodeproxy.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-legacy, namespace: shop}
spec:
  action: DENY
  rules: [{from: [{source: {namespaces: [legacy]}}]}]
---
apiVersion: security.nodeproxy.io/v1
kind: AuthorizationPolicy
metadata: {name: web-get, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  rules:
  - to: [{operation: {methods: [GET], paths: [/api/*]}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web-split, namespace: shop, creationTimestamp: "2025-01-02T03:04:05Z"}
spec:
  parentRefs: [{group: "", kind: Service, name: web, port: 80}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /api}}]
    backendRefs: [{name: web, port: 80, weight: 90}, {name: headless, port: 8080, weight: 10}]
"""


async def test_same_scenario_as_the_yaml_source(kube: FakeKube, tmp_path: Path,
                                                nursery: trio.Nursery) -> None:
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "mesh.yaml").write_text(SCENARIO)
    from_dir = DirectorySource(tmp_path / "dir", lambda s: None, version=0).scan()
    assert from_dir is not None and from_dir.routes and from_dir.gateways
    docs = [d for d in yaml.safe_load_all(SCENARIO) if d]
    kubeapi.load_objects(kube, docs)
    # the endpointslice controller's view agrees with the selector
    web = [kube.get("pods", n, "shop") for n in ("web-1", "web-2")]
    kube.create("endpointslices", kubeapi.endpointslice("web", "shop",
                                                        [(p, True) for p in web]))
    h = Harness(kube, tmp_path)
    await nursery.start(h.source.run)
    assert same_content(from_dir, h.state), from_dir.diff(h.state)


async def test_a_workload_entry_becomes_a_vm_workload(harness: Harness,
                                                      nursery: trio.Nursery) -> None:
    kube, h = harness.kube, harness
    shop(kube, n=1)
    await nursery.start(h.source.run)
    kube.create("workloadentries", {
        "apiVersion": "networking.nodeproxy.io/v1alpha1",
        "kind": "WorkloadEntry",
        "metadata": {"name": "vm-1", "namespace": "shop", "labels": {"app": "web"}},
        "spec": {"address": "10.250.0.100", "serviceAccount": "legacy", "node": "vm-1"},
    })
    await eventually(lambda: h.workload("shop", "vm-1") is not None)
    vm = h.workload("shop", "vm-1")
    assert vm.addresses == ("10.250.0.100",) and vm.node == "vm-1"
    assert vm.identity == "spiffe://cluster.local/ns/shop/sa/legacy"
    assert vm.uid in h.state.services["shop/web"].endpoints  # selected like a pod
