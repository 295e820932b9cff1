"""The Kubernetes API client and reflector against the fake API server (real TLS sockets)."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from controlplane.kube import client as kc
from tests import kubeapi
from tests.kubeapi import FakeKube, eventually, fast_backoff


@pytest.fixture
async def kube(nursery) -> FakeKube:
    k = FakeKube()
    await nursery.start(k.serve)
    return k


def test_in_cluster_config(tmp_path: Path) -> None:
    env = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    with pytest.raises(kc.KubeError, match="token"):
        kc.KubeConfig.in_cluster(env, sa_dir=tmp_path)
    (tmp_path / "token").write_text("t")
    (tmp_path / "ca.crt").write_text("x")
    config = kc.KubeConfig.in_cluster(env, sa_dir=tmp_path)
    assert (config.host, config.port) == ("10.96.0.1", 443)
    assert config.token_file == tmp_path / "token"
    assert config.ca_file == tmp_path / "ca.crt"
    with pytest.raises(kc.KubeError, match="KUBERNETES_SERVICE_HOST"):
        kc.KubeConfig.in_cluster({}, sa_dir=tmp_path)
    with pytest.raises(kc.KubeError, match="not a port"):
        kc.KubeConfig.in_cluster({**env, "KUBERNETES_SERVICE_PORT": "https"}, sa_dir=tmp_path)


def test_backoff_doubles_to_the_cap_and_resets() -> None:
    b = kc.Backoff()
    delays = [b.next() for _ in range(9)]
    assert delays == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]
    b.reset()
    assert b.next() == 0.5


def test_resource_paths() -> None:
    assert kc.PODS.path() == "/api/v1/pods"
    assert kc.PODS.path("shop", "web-1") == "/api/v1/namespaces/shop/pods/web-1"
    assert kc.NAMESPACES.path(None, "shop") == "/api/v1/namespaces/shop"
    assert kc.ENDPOINTSLICES.path("a") == "/apis/discovery.k8s.io/v1/namespaces/a/endpointslices"
    assert kc.TOKENREVIEWS.path() == "/apis/authentication.k8s.io/v1/tokenreviews"


async def test_list_pages_through_the_collection(kube: FakeKube, tmp_path: Path) -> None:
    kube.create("namespaces", kubeapi.namespace("shop"))
    for i in range(7):
        kube.create("pods", kubeapi.pod(f"p{i}", "shop", ip=f"10.0.0.{i + 1}"))
    client = kc.KubeClient(kube.client_config(tmp_path))
    items, rv = await client.list("/api/v1/pods", limit=3)
    assert sorted(i["metadata"]["name"] for i in items) == [f"p{i}" for i in range(7)]
    assert rv == str(kube.rv)
    assert kube.list_requests("pods") == 3  # 3 + 3 + 1


async def test_expired_continue_token_is_gone(kube: FakeKube, tmp_path: Path) -> None:
    kube.create("namespaces", kubeapi.namespace("shop"))
    for i in range(3):
        kube.create("pods", kubeapi.pod(f"p{i}", "shop", ip=f"10.0.0.{i + 1}"))
    client = kc.KubeClient(kube.client_config(tmp_path))
    page = await client.get("/api/v1/pods", limit=1)
    kube.compact()
    with pytest.raises(kc.Gone):
        await client.get("/api/v1/pods", limit=1, **{"continue": page["metadata"]["continue"]})


async def test_wrong_token_and_wrong_ca_are_refused(kube: FakeKube, tmp_path: Path) -> None:
    config = kube.client_config(tmp_path, token="not-a-token")
    with pytest.raises(kc.ApiError) as e:
        await kc.KubeClient(config).get("/api/v1/namespaces")
    assert e.value.status == 401
    # a server whose certificate the cluster CA did not sign is not the API server
    other_ca, _, _ = kubeapi.make_tls()
    (tmp_path / "other.crt").write_bytes(other_ca)
    config = kube.client_config(tmp_path)
    config.ca_file = tmp_path / "other.crt"
    with pytest.raises(kc.KubeError, match="CERTIFICATE_VERIFY_FAILED"):
        await kc.KubeClient(config).get("/api/v1/namespaces")


async def test_token_is_reread_for_every_request(kube: FakeKube, tmp_path: Path) -> None:
    client = kc.KubeClient(kube.client_config(tmp_path))
    await client.get("/api/v1/namespaces")
    (tmp_path / "token").write_text("token-2\n")  # kubelet rotated the projected token
    kube.tokens = {"token-2"}
    await client.get("/api/v1/namespaces")
    assert [t for _, _, t in kube.requests] == ["token-1", "token-2"]


async def test_watch_delivers_events_and_bookmarks(kube: FakeKube, tmp_path: Path,
                                                   nursery: trio.Nursery) -> None:
    kube.create("namespaces", kubeapi.namespace("shop"))
    client = kc.KubeClient(kube.client_config(tmp_path))
    _, rv = await client.list("/api/v1/pods")
    events: list[dict] = []

    async def watch() -> None:
        await client.watch("/api/v1/pods", rv, events.append, timeout_seconds=2)

    nursery.start_soon(watch)
    await eventually(lambda: kube.watch_count == 1)
    kube.create("pods", kubeapi.pod("a", "shop", ip="10.0.0.1"))
    kube.bump(3)
    kube.bookmark()
    kube.delete("pods", "a", "shop")
    await eventually(lambda: len(events) == 3)
    assert [e["type"] for e in events] == ["ADDED", "BOOKMARK", "DELETED"]
    assert events[1]["object"]["metadata"]["resourceVersion"] == str(kube.rv - 1)
    query = kube.watch_requests("pods")[0]
    assert query["allowWatchBookmarks"] == "true"
    assert query["resourceVersion"] == rv
    assert query["timeoutSeconds"] == "2"


@pytest.mark.parametrize("gone_as", ["http", "event"])
async def test_watch_from_a_compacted_version_is_gone(kube: FakeKube, tmp_path: Path,
                                                      gone_as: str) -> None:
    kube.gone_as = gone_as
    kube.create("namespaces", kubeapi.namespace("shop"))
    client = kc.KubeClient(kube.client_config(tmp_path))
    _, rv = await client.list("/api/v1/pods")
    kube.create("pods", kubeapi.pod("a", "shop", ip="10.0.0.1"))
    kube.compact()
    with pytest.raises(kc.Gone):
        await client.watch("/api/v1/pods", rv, lambda e: None, timeout_seconds=5)


async def test_dropped_watch_is_reported(kube: FakeKube, tmp_path: Path,
                                         nursery: trio.Nursery) -> None:
    client = kc.KubeClient(kube.client_config(tmp_path))
    _, rv = await client.list("/api/v1/pods")
    outcome: list[BaseException] = []

    async def watch() -> None:
        try:
            await client.watch("/api/v1/pods", rv, lambda e: None, timeout_seconds=30)
        except kc.KubeError as e:
            outcome.append(e)

    nursery.start_soon(watch)
    await eventually(lambda: kube.watch_count == 1)
    kube.drop_watches()
    await eventually(lambda: bool(outcome))
    assert isinstance(outcome[0], kc.WatchDropped)


async def test_reflector_follows_and_relists(kube: FakeKube, tmp_path: Path,
                                             nursery: trio.Nursery) -> None:
    kube.create("namespaces", kubeapi.namespace("a"))
    client = kc.KubeClient(kube.client_config(tmp_path))
    r = kc.Reflector(client, kc.NAMESPACES, page_size=1, backoff=fast_backoff)
    await nursery.start(r.run)
    assert set(r.store) == {"a"}
    assert r.store["a"]["kind"] == "Namespace"  # filled in: list items carry no kind
    kube.create("namespaces", kubeapi.namespace("b"))
    await eventually(lambda: set(r.store) == {"a", "b"})
    # 410 while the watch was down: relist
    kube.stop()
    await eventually(lambda: r.stats.dropped >= 1)
    kube.delete("namespaces", "a")
    kube.create("namespaces", kubeapi.namespace("c"))
    kube.compact()
    await nursery.start(kube.serve, kube.port)
    await eventually(lambda: set(r.store) == {"b", "c"})
    assert r.stats.relists_after_gone == 1
    assert r.stats.lists == 2


async def test_missing_resource_is_served_empty(kube: FakeKube, tmp_path: Path,
                                                nursery: trio.Nursery) -> None:
    client = kc.KubeClient(kube.client_config(tmp_path))
    missing = kc.ResourceType("example.com/v1", "Widget", "widgets")
    r = kc.Reflector(client, missing, backoff=fast_backoff, missing_retry=5)
    await nursery.start(r.run)
    assert r.synced and r.store == {}
    assert r.error and "404" in r.error
