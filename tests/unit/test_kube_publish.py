"""What the control plane writes into the cluster: CA root ConfigMaps and gateways."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from controlplane.kube import client as kc
from controlplane.kube import publish as pub
from nodeproxy import model
from tests import kubeapi
from tests.kubeapi import FakeKube, eventually, fast_backoff

ROOT = b"-----BEGIN CERTIFICATE-----\nMIIB...root\n-----END CERTIFICATE-----\n"
TEMPLATE = Path(__file__).resolve().parents[2] / "deploy" / "base" / "gateway-template.yaml"


@pytest.fixture
async def kube(nursery: trio.Nursery) -> FakeKube:
    k = FakeKube()
    await nursery.start(k.serve)
    for ns in ("default", "kube-system", "shop"):
        k.create("namespaces", kubeapi.namespace(ns))
    return k


@pytest.fixture
def client(kube: FakeKube, tmp_path: Path) -> kc.KubeClient:
    return kc.KubeClient(kube.client_config(tmp_path))


def ca_data(kube: FakeKube, ns: str) -> str | None:
    cm = kube.get("configmaps", pub.CA_CONFIGMAP, ns)
    return cm["data"][pub.CA_KEY] if cm else None


async def test_ca_root_in_every_namespace_and_new_ones(kube, client, nursery) -> None:
    p = pub.Publisher(client, root_pem=ROOT, backoff=fast_backoff)
    await nursery.start(p.run)
    await eventually(lambda: all(ca_data(kube, ns) == ROOT.decode()
                                 for ns in ("default", "kube-system", "shop")))
    kube.create("namespaces", kubeapi.namespace("late"))
    await eventually(lambda: ca_data(kube, "late") == ROOT.decode())
    # a rotated root is published again everywhere
    p.set_root(ROOT.replace(b"root", b"next"))
    await eventually(lambda: all("next" in (ca_data(kube, ns) or "")
                                 for ns in ("default", "kube-system", "shop", "late")))
    assert p.errors == {}


async def test_ca_configmap_edited_by_hand_is_repaired(kube, client, nursery) -> None:
    kube.create("configmaps", {"metadata": {"name": pub.CA_CONFIGMAP, "namespace": "shop"},
                               "data": {pub.CA_KEY: "tampered"}})
    kube.conflicts = 1  # someone writes between our read and our PUT: 409, read again
    p = pub.Publisher(client, root_pem=ROOT, backoff=fast_backoff, resync=0.05)
    await nursery.start(p.run)
    await eventually(lambda: ca_data(kube, "shop") == ROOT.decode())
    assert kube.conflicts == 0
    kube.delete("configmaps", pub.CA_CONFIGMAP, "shop")  # deleted by hand: the resync repairs
    await eventually(lambda: ca_data(kube, "shop") == ROOT.decode())


async def test_apply_object_reports_what_it_did(kube, client) -> None:
    obj = pub.ca_configmap("shop", ROOT)
    assert await pub.apply_object(client, kc.CONFIGMAPS, obj) == "created"
    assert await pub.apply_object(client, kc.CONFIGMAPS, obj) == "unchanged"
    assert await pub.apply_object(client, kc.CONFIGMAPS, pub.ca_configmap("shop", b"x")) \
        == "updated"
    with pytest.raises(kc.ApiError) as e:  # a namespace that does not exist
        await pub.apply_object(client, kc.CONFIGMAPS, pub.ca_configmap("nope", ROOT))
    assert e.value.status == 404


def gateway(kube: FakeKube, ns: str) -> dict | None:
    return kube.get("deployments", pub.GATEWAY_NAME, ns)


@pytest.mark.parametrize("source", ["builtin", "deploy-template"])
async def test_gateway_follows_the_namespace_label(kube, client, nursery, source) -> None:
    if source == "builtin":
        template = pub.GatewayTemplate.builtin(image="nodeproxy:test")
    else:
        if not TEMPLATE.exists():
            pytest.skip("deploy/base/gateway-template.yaml is not there")
        template = pub.GatewayTemplate.load(TEMPLATE, image="nodeproxy:test")
    p = pub.Publisher(client, root_pem=None, gateway=template, backoff=fast_backoff)
    await nursery.start(p.run)
    kube.patch("namespaces", "shop", {"metadata": {"labels": {model.GATEWAY_LABEL: "enabled"}}})
    await eventually(lambda: gateway(kube, "shop") is not None)
    dep = gateway(kube, "shop")
    pod = dep["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert labels[model.GATEWAY_POD_LABEL] == "shop"
    assert labels[model.DATAPLANE_LABEL] == "none"
    assert pod["spec"]["serviceAccountName"] == model.GATEWAY_SERVICE_ACCOUNT
    assert dep["spec"]["replicas"] == 1
    container = pod["spec"]["containers"][0]
    argv = " ".join(container.get("command", []) + container.get("args", []))
    assert "gateway" in argv and "shop" in argv
    assert pub.DEFAULT_CONTROLPLANE in argv
    assert container["image"] == "nodeproxy:test"
    assert kube.get("serviceaccounts", model.GATEWAY_SERVICE_ACCOUNT, "shop") is not None
    assert gateway(kube, "default") is None
    kube.patch("namespaces", "shop", {"metadata": {"labels": {model.GATEWAY_LABEL: None}}})
    await eventually(lambda: gateway(kube, "shop") is None)
    await eventually(lambda: kube.get("serviceaccounts", model.GATEWAY_SERVICE_ACCOUNT, "shop")
                     is None)
    assert p.errors == {}


async def test_stale_gateway_is_swept_and_foreign_ones_kept(kube, client, nursery) -> None:
    template = pub.GatewayTemplate.builtin()
    # left behind: the label went while the control plane was down
    for obj in template.render("default"):
        kube.create(kubeapi.KIND_TO_PLURAL[obj["kind"]], obj)
    # someone's own Deployment of the same name, not ours: never touched
    kube.create("deployments", {"metadata": {"name": pub.GATEWAY_NAME,
                                             "namespace": "kube-system"}, "spec": {}})
    p = pub.Publisher(client, root_pem=None, gateway=template, backoff=fast_backoff)
    await nursery.start(p.run)
    await eventually(lambda: gateway(kube, "default") is None)
    assert gateway(kube, "kube-system") is not None


def test_template_errors_are_refused_at_load(tmp_path: Path) -> None:
    bad = tmp_path / "t.yaml"
    bad.write_text("apiVersion: v1\nkind: Secret\nmetadata: {name: x}\n")
    with pytest.raises(pub.TemplateError, match="Secret"):
        pub.GatewayTemplate.load(bad)
    bad.write_text("kind: Deployment\nmetadata: {name: x}\nspec: {}\n")
    with pytest.raises(pub.TemplateError, match="spec.template"):
        pub.GatewayTemplate.load(bad)
    with pytest.raises(pub.TemplateError):
        pub.GatewayTemplate.load(tmp_path / "missing.yaml")
