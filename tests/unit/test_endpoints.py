"""Endpoint choice and original-destination classification."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from nodeproxy.model import HBONE, MeshState, Service, ServicePort, Workload
from ztunnel.endpoints import (
    PASSTHROUGH,
    SERVICE,
    WORKLOAD,
    Endpoint,
    choose_endpoint,
    resolve_destination,
)


def wl(uid: str, ip: str | None, **kw) -> Workload:
    return Workload(
        uid=uid,
        name=uid,
        namespace="shop",
        node="n1",
        addresses=(ip,) if ip else (),
        protocol=HBONE,
        **kw,
    )


def mesh(*workloads: Workload, target: int | str = 8080) -> tuple[MeshState, Service]:
    svc = Service(
        name="web",
        namespace="shop",
        addresses=("10.96.0.10",),
        ports=(ServicePort(port=80, target_port=target, name="http"),),
        endpoints=tuple(w.uid for w in workloads),
    )
    state = MeshState(
        workloads={w.uid: w for w in workloads},
        services={svc.key: svc},
    )
    return state, svc


def draws(state, svc, n=2000, seed=7, port=80) -> Counter:
    rng = random.Random(seed)
    return Counter(choose_endpoint(state, svc, port, rng).workload.uid for _ in range(n))


def test_single_endpoint_with_numeric_target_port():
    state, svc = mesh(wl("a", "10.0.0.1"))
    ep = choose_endpoint(state, svc, 80, random.Random(1))
    assert ep == Endpoint(state.workloads["a"], "10.0.0.1", 8080)


def test_unhealthy_and_addressless_endpoints_dropped():
    state, svc = mesh(
        wl("sick", "10.0.0.1", healthy=False), wl("ghost", None), wl("ok", "10.0.0.3")
    )
    assert set(draws(state, svc, n=200)) == {"ok"}


def test_named_target_port_resolved_per_workload():
    state, svc = mesh(
        wl("a", "10.0.0.1", named_ports={"web": 9000}),
        wl("b", "10.0.0.2", named_ports={"other": 1}),  # cannot resolve "web": dropped
        target="web",
    )
    rng = random.Random(3)
    for _ in range(50):
        ep = choose_endpoint(state, svc, 80, rng)
        assert ep.workload.uid == "a" and ep.port == 9000


def test_no_endpoint_gives_none():
    state, svc = mesh()
    assert choose_endpoint(state, svc, 80, random.Random(0)) is None
    state, svc = mesh(wl("sick", "10.0.0.1", healthy=False))
    assert choose_endpoint(state, svc, 80, random.Random(0)) is None


def test_unknown_service_port_gives_none():
    state, svc = mesh(wl("a", "10.0.0.1"))
    assert choose_endpoint(state, svc, 443, random.Random(0)) is None


def test_endpoint_uid_missing_from_state_is_skipped():
    state, svc = mesh(wl("a", "10.0.0.1"))
    svc2 = Service(**{**svc.__dict__, "endpoints": ("a", "gone")})
    assert set(draws(state, svc2, n=100)) == {"a"}


def test_weighted_by_capacity():
    state, svc = mesh(wl("small", "10.0.0.1", capacity=1), wl("big", "10.0.0.2", capacity=3))
    counts = draws(state, svc, n=4000)
    share = counts["big"] / 4000
    assert 0.70 < share < 0.80  # expected 0.75


def test_equal_capacity_spreads_evenly():
    state, svc = mesh(*(wl(f"w{i}", f"10.0.0.{i + 1}") for i in range(4)))
    counts = draws(state, svc, n=4000)
    assert set(counts) == {"w0", "w1", "w2", "w3"}
    assert all(800 < c < 1200 for c in counts.values())


def test_seeded_rng_is_deterministic():
    state, svc = mesh(*(wl(f"w{i}", f"10.0.0.{i + 1}") for i in range(5)))
    assert draws(state, svc, n=50, seed=11) == draws(state, svc, n=50, seed=11)


# -- resolve_destination -----------------------------------------------------------------


def test_resolve_service_vip():
    state, svc = mesh(wl("a", "10.0.0.1"))
    d = resolve_destination(state, "10.96.0.10", 80)
    assert d.kind == SERVICE and d.service == svc and d.port == 80


def test_resolve_workload_ip():
    state, _ = mesh(wl("a", "10.0.0.1"))
    d = resolve_destination(state, "10.0.0.1", 8080)
    assert d.kind == WORKLOAD and d.workload.uid == "a" and d.port == 8080


def test_resolve_outside_mesh_is_passthrough():
    state, _ = mesh(wl("a", "10.0.0.1"))
    d = resolve_destination(state, "192.0.2.9", 443)
    assert d.kind == PASSTHROUGH and d.service is None and d.workload is None


def test_resolve_normalizes_ipv6_and_mapped_v4():
    v6 = Workload(uid="v6", name="v6", namespace="shop", node="n1", addresses=("fd00::1",))
    state = MeshState(workloads={"v6": v6})
    assert resolve_destination(state, "fd00:0:0::1", 80).workload == v6
    state2, svc = mesh(wl("a", "10.0.0.1"))
    assert resolve_destination(state2, "::ffff:10.96.0.10", 80).service == svc


def test_resolve_rejects_garbage():
    state, _ = mesh()
    with pytest.raises(ValueError):
        resolve_destination(state, "not-an-ip", 80)
