"""MeshState's address lookups follow every way its tables change (they are indexed)."""

from __future__ import annotations

from nodeproxy.model import MeshState, Service, Workload


def _pod(uid: str, ip: str) -> Workload:
    return Workload(uid=uid, name=uid, namespace="shop", node="node-a", addresses=(ip,))


def test_workload_lookup_follows_adds_replacements_and_deletes():
    state = MeshState()
    assert state.workload_by_ip("10.244.0.5") is None
    state.workloads["a"] = _pod("a", "10.244.0.5")
    assert state.workload_by_ip("10.244.0.5").uid == "a"
    state.workloads["a"] = _pod("a", "10.244.0.6")  # the pod got another address
    assert state.workload_by_ip("10.244.0.5") is None
    assert state.workload_by_ip("10.244.0.6").uid == "a"
    state.workloads.pop("a")
    assert state.workload_by_ip("10.244.0.6") is None
    state.workloads.update({"b": _pod("b", "10.244.0.7")})
    assert state.workload_by_ip("10.244.0.7").uid == "b"
    del state.workloads["b"]
    assert state.workload_by_ip("10.244.0.7") is None


def test_lookups_after_replacing_a_table_delta_and_copy():
    state = MeshState()
    state.workloads = {"a": _pod("a", "10.244.0.5")}  # a plain dict, assigned whole
    assert state.workload_by_ip("10.244.0.5").uid == "a"
    state.workloads["c"] = _pod("c", "10.244.0.9")
    assert state.workload_by_ip("10.244.0.9").uid == "c"

    svc = Service(name="web", namespace="shop", addresses=("10.96.0.10",))
    new = state.copy()
    new.services[svc.key] = svc
    new.version = 2
    assert state.service_by_vip("10.96.0.10") is None  # the copy is its own state
    state.apply(state.diff(new))
    assert state.service_by_vip("10.96.0.10") == svc
    state.apply({"version": 3, "delete": {"services": [svc.key]}})
    assert state.service_by_vip("10.96.0.10") is None
    again = MeshState.from_json(new.to_json())
    assert again.service_by_vip("10.96.0.10") == svc
    assert again.workload_by_ip("10.244.0.9").uid == "c"


def test_a_reused_address_resolves_to_the_first_holder_as_before():
    # a deleted pod's address can come back on a new pod before the old one is gone:
    # the first in table order wins, as the scan this index replaced did
    state = MeshState()
    state.workloads["old"] = _pod("old", "10.244.0.5")
    state.workloads["new"] = _pod("new", "10.244.0.5")
    assert state.workload_by_ip("10.244.0.5").uid == "old"
    state.workloads.pop("old")
    assert state.workload_by_ip("10.244.0.5").uid == "new"
